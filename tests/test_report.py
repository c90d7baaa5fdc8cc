"""experiments.report: paper-style tables from results.json files."""

import json

import pytest
from PIL import Image

from experiments import report


def write(run_dir, **payload):
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(payload))


def test_semantic_table_averages_seeds_and_gives_gain_over_source_only(tmp_path):
    for seed, (road, miou) in enumerate([(50.0, 40.0), (60.0, 44.0)]):
        write(
            tmp_path / f"so{seed}",
            method="source_only",
            task="synth2real",
            kind="semantic",
            seed=seed,
            metrics={"mIoU": miou},
            per_class_iou={"road": road},
        )
    write(
        tmp_path / "oracle",
        method="oracle",
        task="synth2real",
        kind="semantic",
        seed=0,
        metrics={"mIoU": 80.0},
        per_class_iou={"road": 90.0},
    )
    table = report.main([str(tmp_path)])
    lines = table.splitlines()
    assert lines[0] == "### synth2real"
    assert "| method | road | mIoU | gain |" in lines
    assert "| source_only | 55.00 ± 7.07 | 42.00 ± 2.83 | - |" in lines
    assert "| oracle | 90.00 | 80.00 | +38.00 |" in lines


def test_prompted_table_gain_is_over_the_unadapted_row(tmp_path):
    write(
        tmp_path / "unadapted",
        method="sam_finetune",
        task="camo",
        kind="prompted",
        seed=0,
        trained=False,
        metrics={"box": 60.0, "point": 50.0, "poly": 40.0, "avg": 50.0},
    )
    write(
        tmp_path / "target",
        method="sam_finetune",
        task="camo",
        kind="prompted",
        seed=0,
        trained=True,
        metrics={"box": 80.0, "point": 70.0, "poly": 60.0, "avg": 70.0},
    )
    lines = report.main([str(tmp_path)]).splitlines()
    assert "| method | box | point | poly | avg | gain |" in lines
    assert "| sam_finetune (unadapted) | 60.00 | 50.00 | 40.00 | 50.00 | - |" in lines
    assert "| sam_finetune | 80.00 | 70.00 | 60.00 | 70.00 | +20.00 |" in lines


def test_missing_directory_and_empty_directory_are_named(tmp_path):
    with pytest.raises(SystemExit, match="nowhere"):
        report.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no results.json"):
        report.main([str(tmp_path)])


def test_a_results_file_that_is_not_a_runs_is_named(tmp_path):
    cut_short = tmp_path / "cut" / "results.json"
    cut_short.parent.mkdir()
    cut_short.write_text('{"method": "bicl", "metr')
    with pytest.raises(SystemExit, match=f"{cut_short} is not valid JSON .*; re-run that run or move the file away"):
        report.load_results([str(cut_short.parent)])
    cut_short.write_text('{"method": "bicl"}')
    with pytest.raises(SystemExit, match=f"{cut_short} lacks task, metrics; expected the results.json an"):
        report.load_results([str(tmp_path)])


def test_plot_draws_the_tables_next_to_the_runs(tmp_path, capsys):
    for method, miou in (("source_only", 40.0), ("bicl", 50.0), ("oracle", 80.0)):
        for seed in (0, 1):
            write(
                tmp_path / f"{method}{seed}",
                method=method,
                task="synth2real",
                kind="semantic",
                seed=seed,
                metrics={"mIoU": miou + seed},
                per_class_iou={"road": miou, "car": None},
            )
    report.main([str(tmp_path), "--plot"])
    assert f"plot: {tmp_path / 'report.png'}" in capsys.readouterr().out
    with Image.open(tmp_path / "report.png") as picture:
        assert picture.format == "PNG"
    summary = report.summarise_task(report.load_results([str(tmp_path)]), None)
    plot = report.task_plot("synth2real", summary)
    assert [(r.name, r.role) for r in plot.rows] == [("bicl", "method"), ("oracle", "upper"), ("source_only", "source")]
    assert plot.rows[0].mean == 50.5 and plot.rows[0].per_class == {"road": 50.0}
