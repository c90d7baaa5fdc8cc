"""Paper-style Markdown tables of finished runs: ``python -m experiments.report RUN_DIR [RUN_DIR ...]``.

Every ``results.json`` under the given directories is one row; rows are grouped by task. Semantic
tasks get per-class IoU and the task's mIoU columns; SAM tasks get box / point / poly / avg and the
gain over the task's unadapted row (a ``train=false`` run, or the method named by ``--baseline``).
Several seeds of one method are averaged, with the spread given as +- one standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load_results(paths: list[str]) -> list[dict]:
    results = []
    for path in map(Path, paths):
        if not path.exists():
            raise SystemExit(f"{path} does not exist; expected a run directory or a folder of run directories")
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            row = json.loads(file.read_text())
            row["name"] = row["method"] if row.get("trained", True) else f"{row['method']} (unadapted)"
            results.append(row)
    if not results:
        raise SystemExit(f"no results.json under {', '.join(paths)}; finished runs write one after testing")
    return results


def aggregate(rows: list[dict], columns: list[str]) -> dict[str, tuple[float, float, int]]:
    """Mean, standard deviation and count of each column over the rows (seeds) of one method."""
    out = {}
    for column in columns:
        values = [row["values"][column] for row in rows if column in row["values"]]
        if values:
            out[column] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return out


def cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "-"
    mean, spread, count = stat
    return f"{mean:.2f}" if count == 1 else f"{mean:.2f} ± {spread:.2f}"


def task_table(task: str, rows: list[dict], baseline: str | None) -> str:
    kind = rows[0]["kind"]
    for row in rows:
        row["values"] = {**row.get("per_class_iou", {}), **row["metrics"]}
    metric_columns = list(rows[0]["metrics"])
    columns = list(rows[0].get("per_class_iou", {})) + metric_columns
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["name"]].append(row)
    stats = {name: aggregate(group, columns) for name, group in by_method.items()}
    reference = baseline or next((n for n in stats if n.endswith("(unadapted)")), None)
    if kind == "semantic":
        reference = baseline or ("source_only" if "source_only" in stats else None)
    headline = metric_columns[-1] if kind == "prompted" else metric_columns[0]
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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively for results.json)")
    parser.add_argument("--baseline", help="row the gain column is measured against")
    args = parser.parse_args(argv)
    by_task = defaultdict(list)
    for row in load_results(args.runs):
        by_task[row["task"]].append(row)
    report = "\n\n".join(task_table(task, rows, args.baseline) for task, rows in sorted(by_task.items()))
    print(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
