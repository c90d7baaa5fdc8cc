"""The benchmark's arithmetic on constructed results: gain, gap closed, step ratio, and the flag on a
method that does not beat source-only; its protocols only name methods and tasks that exist."""

import json
import shutil

import pytest
from PIL import Image

from datamodules.errors import CheckpointError
from experiments import benchmark
from experiments.benchmark import (
    Progress,
    Row,
    markdown,
    per_class_means,
    protocols,
    stage_refs,
    summarise,
    task_plot,
    with_task,
)
from experiments.run import available, check_keys, compose_config
from lightning_modules.networks.sam import build_configured_sam, build_sam, save_sam_checkpoint


def result(row: Row, miou: float, step: float, seed: int = 0) -> dict:
    return {"row": row, "seed": seed, "metrics": {"mIoU": miou}, "step_time_s": step, "peak_memory_mb": 900.0}


def test_gain_gap_ratio_and_flag():
    protocol = protocols(600, 400)["synth2real"]
    source, oracle = Row("source_only", (), "source"), Row("oracle", (), "upper")
    good, bad = Row("good", ()), Row("bad", ())
    lines = {
        line["method"]: line
        for line in summarise(
            protocol,
            [result(source, 40.0, 0.5), result(oracle, 80.0, 0.5), result(good, 50.0, 1.0), result(bad, 39.0, 2.0)],
        )
    }
    assert lines["good"]["gain"] == [10.0] and lines["good"]["gap_closed"] == [25.0]
    assert lines["good"]["step_ratio"] == [2.0] and lines["good"]["status"] == ""
    assert lines["bad"]["status"] == "✗ does not beat source-only"
    table = markdown(protocol, list(lines.values()), None)
    assert "| deeplabv2 | good | 50.00 | +10.00 | 25.00 |" in table


def test_seeds_give_mean_and_spread():
    protocol = protocols(600, 400)["synth2real"]
    source, method = Row("source_only", (), "source"), Row("m", ())
    lines = summarise(
        protocol,
        [
            result(source, 40.0, 1.0, 0),
            result(source, 42.0, 1.0, 1),
            result(method, 44.0, 1.0, 0),
            result(method, 50.0, 1.0, 1),
        ],
    )
    table = markdown(protocol, lines, None)
    assert "| deeplabv2 | m | 47.00 ± 4.24 | +6.00 ± 2.83 |" in table


def test_protocols_name_existing_methods_and_tasks():
    methods, tasks = set(available("method")), set(available("task"))
    for protocol in protocols(600, 400).values():
        assert protocol.task in tasks
        commands = [c for r in protocol.rows for c in r.commands] + [s.overrides for s in protocol.stages]
        for command in commands:
            named = [o.split("=", 1)[1] for o in command if o.startswith("+method=")]
            assert named and named[0] in methods
            assert all(o.split("=", 1)[1] in tasks for o in command if o.startswith("+task="))
        stage_names = {s.name for s in protocol.stages} | {"row_dir", "stage_dir"}
        assert {ref for c in commands for o in c for ref in stage_refs(o)} <= stage_names
        for index, stage in enumerate(protocol.stages):  # a stage uses only the stages before it
            earlier = {s.name for s in protocol.stages[:index]} | {"stage_dir"}
            assert {ref for o in stage.overrides for ref in stage_refs(o)} <= earlier


def test_every_benchmark_command_composes_including_the_ablation_rows():
    for protocol in protocols(600, 400).values():
        assert any(r.ablation for r in protocol.rows)
        commands = [c for r in protocol.rows for c in r.commands] + [s.overrides for s in protocol.stages]
        names = [s.name for s in protocol.stages] + ["row_dir", "stage_dir"]
        placeholders = {name: f"/placeholder/{name}" for name in names}
        for command in commands:
            overrides = with_task(command, protocol.task, placeholders)
            cfg = compose_config([*overrides, "run_dir=x"])
            assert cfg.method.name == overrides[0].split("=", 1)[1]
            assert check_keys(overrides) is None  # the launcher's key check accepts what Hydra composes


def test_seco_reads_the_region_sam_the_benchmark_trains(tmp_path):
    """The region SAM stage and seco's labelling stages build the same tiny SAM, so its sam.pth loads there."""
    protocol = protocols(600, 400)["synth2real"]
    stages = {s.name: s for s in protocol.stages}
    products = {name: str(tmp_path / name) for name in stages} | {"stage_dir": str(tmp_path / "stage")}

    def config(stage):
        return compose_config([*with_task(stage.overrides, protocol.task, products), "run_dir=x"])

    region_sam = build_configured_sam(config(stages["region_sam"]).model)
    save_sam_checkpoint(region_sam, tmp_path / "region_sam")
    seco_sam = config(stages["seco_labels_of_source"]).method.sam
    assert seco_sam.checkpoint == str(tmp_path / "region_sam")
    loaded = build_sam(seco_sam.variant, seco_sam.checkpoint, seco_sam.image_size, seco_sam.tiny)
    assert loaded.image_encoder.patch_embed.proj.kernel_size == (8, 8)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_sam(seco_sam.variant, seco_sam.checkpoint, seco_sam.image_size, None)  # 16 px patches


def test_first_seed_picks_the_seeds_run(monkeypatch, tmp_path):
    """--first-seed 1 --seeds 2 runs seeds 1 and 2 only, so machines sharing --out can split the seeds."""
    seeds_run = []
    monkeypatch.setattr(benchmark, "run_protocol", lambda protocol, seed, *args: seeds_run.append(seed) or [])
    monkeypatch.setattr(benchmark, "loader_throughput", lambda task: {"images_per_s_per_worker": 1.0, "batch_size": 1})
    benchmark.main(["--tasks", "synth_shapes", "--first-seed", "1", "--seeds", "2", "--out", str(tmp_path)])
    assert seeds_run == [1, 2]


def test_no_seed_to_run_is_an_error_that_names_the_flags(capsys):
    for argv in (["--seeds", "0"], ["--first-seed", "-1"]):
        with pytest.raises(SystemExit):
            benchmark.main(["--tasks", "synth_shapes", *argv])
        assert "expected --seeds >= 1 and --first-seed >= 0" in capsys.readouterr().err


def test_a_method_without_rows_in_the_tasks_is_an_error_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"no row of \['wesam'\] in the tasks \['synth2real'\]; their methods: bicl"):
        benchmark.main(["--tasks", "synth2real", "--methods", "wesam", "tmt", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"no row of \['tmtt'\]"):
        benchmark.main(["--methods", "tmtt", "--out", str(out)])
    assert not out.exists()


def test_the_benchmark_draws_its_rows_seed_spread_and_per_class_iou(monkeypatch, tmp_path):
    """benchmark.png from constructed rows: bars, the source-only / oracle lines and the per-class heat map."""
    protocol = protocols(600, 400)["synth2real"]
    rows = {r.name: r for r in protocol.rows if r.network == "deeplabv2" and not r.ablation}

    def seed_results(protocol, seed, *args):
        table = {"source_only": 40.0, "bicl": 55.0, "mt_metric": 60.0, "oracle": 80.0}
        per_class = {"road": 50.0, "car": None if seed else 9.0}
        return [{**result(rows[n], miou + seed, 1.0, seed), "per_class_iou": per_class} for n, miou in table.items()]

    monkeypatch.setattr(benchmark, "run_protocol", seed_results)
    monkeypatch.setattr(benchmark, "loader_throughput", lambda task: {"images_per_s_per_worker": 1.0, "batch_size": 1})
    benchmark.main(["--tasks", "synth2real", "--seeds", "2", "--out", str(tmp_path)])
    results = seed_results(protocol, 0) + seed_results(protocol, 1)
    plot = task_plot(protocol, summarise(protocol, results), results)
    assert [(r.name, r.role) for r in plot.rows] == [
        ("source_only", "source"),
        ("bicl", "method"),
        ("mt_metric", "method"),
        ("oracle", "upper"),
    ]
    assert plot.rows[1].mean == 55.5 and plot.rows[1].spread == pytest.approx(0.7071, abs=1e-4)
    assert plot.rows[1].per_class == {"road": 50.0, "car": 9.0}
    with Image.open(tmp_path / "benchmark.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] > 100


def test_per_class_means_skip_a_seed_without_the_class():
    results = [{"per_class_iou": {"road": 50.0, "car": None}}, {"per_class_iou": {"road": 70.0, "car": 10.0}}]
    assert per_class_means(results) == {"road": 60.0, "car": 10.0}


def test_progress_counts_rows_and_estimates_from_the_rows_it_ran(monkeypatch, capsys):
    clock = iter([0.0, 100.0, 100.0])
    monkeypatch.setattr(benchmark.time, "monotonic", lambda: next(clock))
    progress = Progress(4)
    progress.row_finished("reused row", reused=True)
    progress.row_finished("new row", reused=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  [1/4 rows] reused row (reused): 0:01:40 elapsed, time left unknown yet"
    assert lines[1] == "  [2/4 rows] new row: 0:01:40 elapsed, about 0:03:20 left"


def test_per_prompt_rows_run_each_kind_alone_and_take_each_column_from_its_own_run(monkeypatch, tmp_path):
    """WeSAM's protocol: one adaptation run per prompt kind; the row's box / point / poly come from three runs."""
    protocol = protocols(600, 400)["synth_polyp"]
    wesam = next(r for r in protocol.rows if r.name == "wesam")
    assert wesam.per_prompt and not next(r for r in protocol.rows if r.role == "upper").per_prompt
    commands = []

    def fake_run(overrides, task, seed, run_dir, products):
        commands.append(overrides)
        (kind,) = [o.split("=[")[1].rstrip("]") for o in overrides if o.startswith("task.prompt_kinds=")]
        run_dir.mkdir(parents=True)
        # Each run reports only its own prompt; a different value per kind shows which run fed which column.
        metrics = {kind: {"box": 60.0, "point": 40.0, "poly": 50.0}[kind]}
        time_s = {"box": 0.1, "point": 0.2, "poly": 0.3}[kind]
        payload = {
            "metrics": {**metrics, "avg": metrics[kind]},
            "step_time_s": time_s,
            "peak_memory_mb": 10.0 * len(kind),
        }
        (run_dir / "results.json").write_text(json.dumps(payload))
        return run_dir

    monkeypatch.setattr(benchmark, "run", fake_run)
    merged = benchmark.prompt_wise_result(wesam, protocol, 0, tmp_path / "wesam", {"sam_source": "s.pth"})
    assert merged["metrics"] == {"box": 60.0, "point": 40.0, "poly": 50.0, "avg": 50.0}
    assert merged["step_time_s"] == pytest.approx(0.2) and merged["peak_memory_mb"] == 50.0
    assert [c[-2:] for c in commands] == [
        ("task.prompt_kinds=[box]", "task.monitor=val/box"),
        ("task.prompt_kinds=[point]", "task.monitor=val/point"),
        ("task.prompt_kinds=[poly]", "task.monitor=val/poly"),
    ]


def test_bicl_rows_run_the_authors_rounds_each_from_the_last_rounds_checkpoint(monkeypatch, tmp_path):
    """A bicl row is BICL_ROUNDS runs that split the budget: round 0 reads the shared stage's labels; round k starts
    from the checkpoint round k-1 left, at the halved rate of round k; the last round's results are the row's."""
    monkeypatch.setattr(benchmark, "BICL_ROUNDS", 3)
    protocol = protocols(600, 300)["synth2real"]
    bicl = next(r for r in protocol.rows if r.name == "bicl")
    assert len(bicl.commands) == 3
    runs = []

    def fake_run(overrides, task, seed, run_dir, products):
        resolved = dict(o.split("=", 1) for o in with_task(overrides, task, products))
        runs.append((run_dir, resolved))
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"metrics": {"mIoU": 50.0 + len(runs)}}))
        return run_dir

    monkeypatch.setattr(benchmark, "run", fake_run)
    monkeypatch.setattr(benchmark, "selected_rows", lambda *args: [bicl])
    (result,) = benchmark.run_protocol(protocol, 0, tmp_path, None, False, Progress(1))
    stages = tmp_path / "stages" / "seed0"
    runs = [(d, r) for d, r in runs if not d.is_relative_to(stages)]  # the source model and round 0's labels
    assert result["metrics"]["mIoU"] == 55.0  # the last round's (the two stages ran first)
    (first_dir, first), (second_dir, second), (last_dir, last) = runs
    assert first["method.source_ckpt"] == f"{stages}/source/checkpoints/last.ckpt"
    assert first["method.label_dir"] == f"{stages}/bicl_static_labels/static_labels"
    assert second["method.source_ckpt"] == f"{first_dir}/checkpoints/last.ckpt" and "method.label_dir" not in second
    assert last["method.source_ckpt"] == f"{second_dir}/checkpoints/last.ckpt"
    assert last_dir == tmp_path / "synth2real" / "seed0" / "deeplabv2_bicl"
    assert [r["optim.first_round"] for r in (first, second, last)] == ["0", "1", "2"]
    assert {r["trainer.max_steps"] for r in (first, second, last)} == {"100"}
    assert {r["optim.round_steps"] for r in (first, second, last)} == {"100"}
    short = next(r for r in protocols(600, 2)["synth2real"].rows if r.name == "bicl")
    assert len(short.commands) == 2 and "trainer.max_steps=1" in short.commands[-1]


def test_a_failed_stage_fails_the_rows_that_need_it_and_the_benchmark_goes_on(monkeypatch, tmp_path, capsys):
    """The source SAM stage fails: every row that reads it is reported failed with the stage's name; none is run."""
    protocol = protocols(600, 400)["synth_polyp"]
    ran = []

    def fake_run(overrides, task, seed, run_dir, products):
        ran.append(run_dir)
        raise RuntimeError(f"run failed (exit 1); see {run_dir}/stdout.log")

    monkeypatch.setattr(benchmark, "run", fake_run)
    results = benchmark.run_protocol(protocol, 0, tmp_path, {"wesam"}, False, Progress(3))
    assert ran == [tmp_path / "stages" / "seed0" / "sam_source"]
    assert [r["row"].name for r in results] == ["source (unadapted)", "wesam", "target (sam_finetune)"]
    assert {r["error"] for r in results} == {"prerequisite stage sam_source failed"}
    assert "stage sam_source failed: run failed (exit 1)" in capsys.readouterr().out


def test_unit_input_rows_are_ablations_measured_against_the_unadapted_sam_on_the_same_input():
    protocol = protocols(600, 400)["synth_shapes"]
    plain = {(r.network, r.name) for r in benchmark.selected_rows(protocol, {"wesam"}, False)}
    assert plain == {("sam", "source (unadapted)"), ("sam", "wesam"), ("sam", "target (sam_finetune)")}
    rows = {(r.network, r.name): r for r in benchmark.selected_rows(protocol, {"wesam"}, True)}
    unit = {name: row for (network, name), row in rows.items() if network == "sam (unit input)"}
    assert set(unit) == {"source (unadapted)", "wesam", "target (sam_finetune)"}
    assert all("data.sam_input=unit" in row.commands[-1] for row in unit.values())
    assert not any("data.sam_input=unit" in row.commands[-1] for (network, _), row in rows.items() if network == "sam")

    def sam_result(row, avg, step):
        metrics = {column: avg for column in protocol.columns}
        return {"row": row, "seed": 0, "metrics": metrics, "step_time_s": step, "peak_memory_mb": 900.0}

    lines = summarise(
        protocol,
        [
            sam_result(rows["sam", "source (unadapted)"], 44.0, None),
            sam_result(rows["sam", "target (sam_finetune)"], 58.0, 0.2),
            sam_result(rows["sam", "wesam"], 43.0, 0.2),
            sam_result(unit["source (unadapted)"], 42.0, None),
            sam_result(unit["target (sam_finetune)"], 62.0, 0.1),
            sam_result(unit["wesam"], 52.0, 0.2),
        ],
    )
    wesam = {line["network"]: line for line in lines if line["method"] == "wesam"}
    assert wesam["sam"]["gain"] == [-1.0] and wesam["sam"]["step_ratio"] == [1.0]
    assert wesam["sam (unit input)"]["gain"] == [10.0] and wesam["sam (unit input)"]["gap_closed"] == [50.0]
    assert wesam["sam (unit input)"]["step_ratio"] == [2.0]


def test_selecting_bicl_also_runs_the_threshold_self_training_it_is_judged_against():
    protocol = protocols(600, 400)["synth2real"]
    names = {r.name for r in benchmark.selected_rows(protocol, {"bicl"}, False)}
    assert {"bicl", "mt_metric (threshold ST)", "source_only", "oracle"} <= names
    assert "mt_metric" not in names and "mt_metric (unweighted)" not in names


def test_a_finished_run_is_reused_only_for_the_same_command(monkeypatch, tmp_path):
    """A row whose command changed (another setting, another round count) runs again instead of reporting the old
    run's results under the new name."""
    calls = []

    def fake_subprocess_run(command, stdout, stderr):
        calls.append(command)
        (run_dir / "results.json").write_text(json.dumps({"overrides": command}))
        return type("Finished", (), {"returncode": 0})()

    monkeypatch.setattr(benchmark.subprocess, "run", fake_subprocess_run)
    run_dir = tmp_path / "row"
    benchmark.run(("+method=bicl", "trainer.max_steps=400"), "synth2real", 0, run_dir, {})
    benchmark.run(("+method=bicl", "trainer.max_steps=400"), "synth2real", 0, run_dir, {})
    assert len(calls) == 1
    (run_dir / "stale.txt").write_text("from the earlier command")
    benchmark.run(("+method=bicl", "trainer.max_steps=200"), "synth2real", 0, run_dir, {})
    assert len(calls) == 2 and "trainer.max_steps=200" in calls[1]
    assert not (run_dir / "stale.txt").exists()
    assert "trainer.max_steps=200" in (run_dir / "benchmark.done").read_text()


def test_a_finished_run_is_run_again_when_a_default_it_composes_changed(monkeypatch, tmp_path):
    """The same command after a method yaml changed a default (as seco's PSA release did) is not the same run."""
    import experiments.run

    configs = tmp_path / "configs"
    shutil.copytree(experiments.run.CONFIG_DIR, configs)
    monkeypatch.setattr(experiments.run, "CONFIG_DIR", configs)
    calls = []
    monkeypatch.setattr(
        benchmark.subprocess, "run", lambda command, **_: calls.append(command) or type("R", (), {"returncode": 0})()
    )
    run_dir = tmp_path / "row"
    benchmark.run(("+method=seco",), "synth2real", 0, run_dir, {})
    benchmark.run(("+method=seco",), "synth2real", 0, run_dir, {})
    assert len(calls) == 1
    v2 = configs / "seco_psa" / "v2.yaml"
    v2.write_text(v2.read_text().replace("stuff_align_threshold: 0.1", "stuff_align_threshold: 0.15"))
    benchmark.run(("+method=seco",), "synth2real", 0, run_dir, {})
    assert len(calls) == 2 and calls[0] == calls[1]


def test_the_pseudo_label_quality_table_averages_each_rule_over_seeds():
    bicl, plain = Row("bicl", ()), Row("source_only", (), "source")

    def quality(static_density, hybrid_accuracy):
        return {
            "static": {"density": static_density, "accuracy": 99.0},
            "hybrid": {"density": 30.0, "accuracy": hybrid_accuracy},
        }

    results = [
        {**result(bicl, 50.0, 1.0, seed), "pseudo_labels": quality(10.0 + 2 * seed, 90.0 + seed)} for seed in (0, 1)
    ] + [result(plain, 40.0, 1.0)]
    lines = benchmark.pseudo_label_quality_table(results).splitlines()
    assert lines[2] == "| row | static | hybrid |"
    assert lines[4] == "| bicl | 11.00 ± 1.41 / 99.00 ± 0.00 | 30.00 ± 0.00 / 90.50 ± 0.71 |"
    assert len(lines) == 5  # source_only reports no pseudo-labels
    assert benchmark.pseudo_label_quality_table([result(plain, 40.0, 1.0)]) == ""
