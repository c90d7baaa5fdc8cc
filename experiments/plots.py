"""The benchmark's and the report's figure: per task, each row's headline metric as a bar with its seed spread, the
source-only and oracle / target rows as horizontal lines over the rows of their network, and on semantic tasks the
per-class IoU of every row as a heat map. Drawn with matplotlib's Agg canvas, so no display is needed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

ROLE_COLOURS = {"source": "tab:grey", "method": "tab:blue", "upper": "tab:green"}
REFERENCE_NAMES = {"source": "source-only", "upper": "oracle / target"}


@dataclass(frozen=True)
class PlotRow:
    name: str
    mean: float  # the headline metric, mean over seeds
    spread: float  # its standard deviation over seeds (0 for one seed)
    role: str = "method"  # "source" and "upper" rows are drawn as lines, "method" rows as bars
    group: str = ""  # the network: reference lines span the bars of their own group
    per_class: dict[str, float] = field(default_factory=dict)  # mean IoU per class (semantic tasks)


@dataclass(frozen=True)
class TaskPlot:
    task: str
    metric: str
    rows: list[PlotRow]


def draw_bars(axes, plot: TaskPlot) -> None:
    bars = [row for row in plot.rows if row.role == "method"]
    positions = {id(row): index for index, row in enumerate(bars)}
    for row in bars:
        axes.bar(positions[id(row)], row.mean, yerr=row.spread, capsize=3, color=ROLE_COLOURS["method"])
    labelled = set()
    for row in plot.rows:
        if row.role == "method":
            continue
        group = [positions[id(b)] for b in bars if b.group == row.group] or [0]
        label = REFERENCE_NAMES[row.role] if row.role not in labelled else None
        labelled.add(row.role)
        axes.hlines(
            row.mean, min(group) - 0.4, max(group) + 0.4, colors=ROLE_COLOURS[row.role], linestyles="--", label=label
        )
    axes.set_xticks(range(len(bars)), [f"{b.group} {b.name}".strip() for b in bars], rotation=30, ha="right")
    axes.set_ylabel(plot.metric)
    axes.set_title(f"{plot.task}: {plot.metric} (bars: mean ± std over seeds)")
    if labelled:
        axes.legend(loc="best", fontsize="small")


def draw_heat_map(figure, axes, plot: TaskPlot) -> None:
    rows = [row for row in plot.rows if row.per_class]
    classes = list(rows[0].per_class)
    values = [[row.per_class.get(name, math.nan) for name in classes] for row in rows]
    image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), [f"{row.group} {row.name}".strip() for row in rows])
    for y, line in enumerate(values):
        for x, value in enumerate(line):
            if not math.isnan(value):
                colour = "black" if value > 60 else "white"  # readable on viridis' light and dark ends
                axes.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=6, color=colour)
    axes.set_title(f"{plot.task}: per-class IoU")
    figure.colorbar(image, ax=axes, fraction=0.03)


def plot_tasks(plots: list[TaskPlot], path: Path) -> Path:
    """One figure row per task (bars, and the heat map where rows have per-class IoU), written to ``path``."""
    from matplotlib.figure import Figure

    heat_maps = any(row.per_class for plot in plots for row in plot.rows)
    figure = Figure(figsize=(16 if heat_maps else 8, 5 * len(plots)), layout="constrained")
    grid = figure.subplots(len(plots), 2 if heat_maps else 1, squeeze=False)
    for plot, axes in zip(plots, grid):
        draw_bars(axes[0], plot)
        if heat_maps and any(row.per_class for row in plot.rows):
            draw_heat_map(figure, axes[1], plot)
        elif heat_maps:
            axes[1].set_axis_off()
    figure.savefig(path, dpi=120)
    return path
