"""Paper-style Markdown tables of finished runs: ``python -m experiments.report RUN_DIR [RUN_DIR ...]``.

Every ``results.json`` under the given directories is one row; rows are grouped by task. Semantic
tasks get per-class IoU and the task's mIoU columns; SAM tasks get box / point / poly / avg and the
gain over the task's unadapted row (a ``train=false`` run, or the method named by ``--baseline``).
Several seeds of one method are averaged, with the spread given as +- one standard deviation. ``--plot`` also
draws them into ``report.png`` in the first run directory: per task, each row's headline metric as a bar with its
spread against the reference row (and an ``oracle`` row) as lines, and on semantic tasks the per-class IoU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from experiments.plots import PlotRow, TaskPlot, plot_tasks


def read_results(file: Path) -> dict:
    """One run's results.json; a file that is not one (cut short, edited, another tool's) is named."""
    try:
        row = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{file} is not valid JSON ({error}); re-run that run or move the file away") from None
    missing = [key for key in ("method", "task", "metrics") if key not in row]
    if missing:
        raise SystemExit(f"{file} lacks {', '.join(missing)}; expected the results.json an experiments.run writes")
    return row


def load_results(paths: list[str]) -> list[dict]:
    results = []
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"{path} does not exist; expected a run directory or a folder of run directories")
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            row = read_results(file)
            row["name"] = row["method"] if row.get("trained", True) else f"{row['method']} (unadapted)"
            results.append(row)
    if not results:
        raise SystemExit(f"no results.json under {', '.join(paths)}; finished runs write one after testing")
    return results


def aggregate(rows: list[dict], columns: list[str]) -> dict[str, tuple[float, float, int]]:
    """Mean, standard deviation and count of each column over the rows (seeds) of one method; a class a seed did not
    score (null in results.json) is left out."""
    out = {}
    for column in columns:
        values = [row["values"][column] for row in rows if row["values"].get(column) is not None]
        if values:
            out[column] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "-"
    mean, spread, count = stat
    return f"{mean:.2f}" if count == 1 else f"{mean:.2f} ± {spread:.2f}"


@dataclass(frozen=True)
class TaskSummary:
    """One task's rows aggregated over seeds, as the table and the plot both read them."""

    per_class: list[str]  # per-class IoU columns (semantic tasks)
    metrics: list[str]  # the task's metric columns
    headline: str
    stats: dict[str, dict[str, tuple[float, float, int]]]  # method -> column -> (mean, std, seeds)
    reference: str | None  # the row the gain is measured against


def summarise_task(rows: list[dict], baseline: str | None) -> TaskSummary:
    kind = rows[0]["kind"]
    for row in rows:
        row["values"] = {**row.get("per_class_iou", {}), **row["metrics"]}
    metric_columns = list(rows[0]["metrics"])
    per_class = list(rows[0].get("per_class_iou", {}))
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["name"]].append(row)
    stats = {name: aggregate(group, per_class + metric_columns) for name, group in by_method.items()}
    reference = baseline or next((n for n in stats if n.endswith("(unadapted)")), None)
    if kind == "semantic":
        reference = baseline or ("source_only" if "source_only" in stats else None)
    headline = metric_columns[-1] if kind == "prompted" else metric_columns[0]
    return TaskSummary(per_class, metric_columns, headline, stats, reference)


def task_table(task: str, summary: TaskSummary) -> str:
    stats, reference, headline = summary.stats, summary.reference, summary.headline
    columns = summary.per_class + summary.metrics
    show_gain = reference in stats
    header = ["method", *columns] + (["gain"] if show_gain else [])
    lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stat in stats.items():
        cells = [name, *(cell(stat.get(c)) for c in columns)]
        if show_gain:
            gain = stat[headline][0] - stats[reference][headline][0] if headline in stat else None
            cells.append("-" if name == reference or gain is None else f"{gain:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_plot(task: str, summary: TaskSummary) -> TaskPlot:
    """The reference row (gain baseline) and an ``oracle`` row become the plot's lines, every other row a bar."""
    rows = []
    for name, stat in summary.stats.items():
        if summary.headline not in stat:
            continue
        role = "source" if name == summary.reference else "upper" if name == "oracle" else "method"
        per_class = {c: stat[c][0] for c in summary.per_class if c in stat}
        rows.append(PlotRow(name, stat[summary.headline][0], stat[summary.headline][1], role, per_class=per_class))
    return TaskPlot(task, summary.headline, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively for results.json)")
    parser.add_argument("--baseline", help="row the gain column is measured against")
    parser.add_argument(
        "--plot", action="store_true", help="also draw the tables into report.png in the first run directory"
    )
    args = parser.parse_args(argv)
    by_task = defaultdict(list)
    for row in load_results(args.runs):
        by_task[row["task"]].append(row)
    summaries = {task: summarise_task(rows, args.baseline) for task, rows in sorted(by_task.items())}
    report = "\n\n".join(task_table(task, summary) for task, summary in summaries.items())
    print(report)
    if args.plot:
        first = Path(args.runs[0])
        path = plot_tasks(
            [task_plot(t, s) for t, s in summaries.items()], (first if first.is_dir() else first.parent) / "report.png"
        )
        print(f"\nplot: {path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
