"""The entry point end to end on the procedural street task: training, evaluation, run directory,
resume, determinism, bf16 and two-process DDP."""

import json
import subprocess
import sys

import torch

from experiments.run import check_choices, check_keys, normalise_overrides


def test_source_only_trains_and_writes_its_run_directory(run_tiny):
    results, run_dir = run_tiny("source_only", "synth2real")
    assert set(results["metrics"]) == {"mIoU"}
    assert set(results["per_class_iou"]) == {
        "road",
        "sidewalk",
        "building",
        "pole",
        "traffic sign",
        "vegetation",
        "sky",
        "person",
        "car",
    }
    assert 0 <= results["metrics"]["mIoU"] <= 100
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["method"] == "source_only" and saved["global_step"] == 4


def test_oracle_is_source_only_on_target_labels(run_tiny):
    results, run_dir = run_tiny("oracle", "synth2real")
    assert "labelled_domain: target" in (run_dir / "config.yaml").read_text()
    assert results["metrics"]["mIoU"] >= 0


def test_same_seed_gives_identical_metrics(run_tiny):
    first, _ = run_tiny("source_only", "synth2real", "trainer.deterministic=true", name="a")
    second, _ = run_tiny("source_only", "synth2real", "trainer.deterministic=true", name="b")
    assert first["metrics"] == second["metrics"] and first["per_class_iou"] == second["per_class_iou"]


def test_resume_from_last_checkpoint_continues_to_max_steps(run_tiny):
    _, run_dir = run_tiny("source_only", "synth2real", "trainer.max_steps=2", name="resume")
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    # A finished run is never resumed into, nor under another config: this one "was killed" at step 2 of 4.
    (run_dir / "results.json").unlink()
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 2\n", "max_steps: 4\n"))
    results, _ = run_tiny("source_only", "synth2real", "trainer.max_steps=4", "ckpt_path=last", name="resume")
    assert results["global_step"] == 4
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_last_checkpoint_holds_the_final_step_when_training_ends_between_validations(run_tiny):
    _, run_dir = run_tiny("source_only", "synth2real", "trainer.max_steps=3", "trainer.val_check_interval=2")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_bf16_mixed_precision_runs(run_tiny):
    results, _ = run_tiny("source_only", "synth2real", "trainer.precision=bf16-mixed")
    assert results["metrics"]["mIoU"] >= 0


def test_missing_or_unknown_choice_is_one_sentence():
    assert check_choices(["+task=synth2real"]).startswith("Choose a method with +method=NAME; available: ")
    message = check_choices(["+method=nope", "+task=synth2real"])
    assert message.startswith("Unknown method 'nope'; available: ") and "source_only" in message
    assert "Unknown task 'mars'" in check_choices(["+method=source_only", "+task=mars"])
    assert check_choices(["+method=source_only", "+task=synth2real"]) is None
    chosen = ["+method=source_only", "+task=synth2real"]
    assert check_choices([*chosen, "model=huge"]) == "Unknown model 'huge'; available: paper, tiny."
    assert check_choices([*chosen, "arch=vit"]).startswith("Unknown arch 'vit'; available: deeplabv2, sam")
    assert check_choices([*chosen, "arch=segformer", "model=tiny", "logger=csv", "model.sam_checkpoint=x"]) is None
    assert check_choices(["-m", "+method=source_only,tmt", "+task=synth2real"]) is None  # a multirun's list
    assert check_choices(["-m", "+method=source_only,tmtt", "+task=synth2real"]).startswith("Unknown method 'tmtt'")
    seco = ["+method=seco", "+task=synth2real"]
    assert check_choices([*seco, "seco_psa=v1"]) is None
    assert check_choices([*seco, "seco_psa=v3"]) == "Unknown seco_psa 'v3'; available: v1, v2."
    wrong_method = "seco_psa is a setting of +method=seco, not of +method=source_only."
    assert check_choices([*chosen, "seco_psa=v1"]) == wrong_method


def test_an_unknown_config_key_is_one_sentence_with_the_nearest_keys():
    """Hydra's own message suggests +key=value, which would add a key nothing reads."""
    chosen = ["+method=tmt", "+task=synth2real"]
    typo = check_keys([*chosen, "method.settting=uda"])
    assert typo == "Unknown config key 'method.settting'; did you mean method.setting?"
    assert check_keys([*chosen, "trainer.max_step=3"]).endswith("did you mean trainer.max_steps?")
    assert check_keys([*chosen, "foo=1"]) == "Unknown config key 'foo' (+key=value adds a new key)."
    known = ["method.attention_strength=2", "data.target.options.domain=diverse", "model=tiny", "+method.extra=1"]
    assert check_keys([*chosen, *known, "hydra.run.dir=/x", "trainer.max_steps=3"]) is None
    # bicl's label_dir defaults to a path under Hydra's runtime output directory, unknown outside hydra.main
    assert check_keys(["+method=bicl", "+task=synth2real", "method.label_dir=/labels"]) is None
    assert normalise_overrides(["+model=tiny", "+task=x"]) == ["model=tiny", "+task=x"]


def cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_refuses_missing_task_and_incompatible_pair():
    missing = cli("+method=source_only")
    assert missing.returncode == 2 and missing.stderr.strip().startswith("Choose a task with +task=NAME")
    wrong = cli("+method=source_only", "+task=synth_shapes", "logger=csv")
    assert wrong.returncode != 0
    assert "works on semantic tasks, but task 'synth_shapes' is a prompted task" in wrong.stderr


def test_unknown_key_is_named():
    result = cli("+method=source_only", "+task=synth2real", "optim.lrr=1")
    assert result.returncode != 0 and "optim.lrr" in result.stderr


def test_two_process_ddp_run_agrees_with_itself(tmp_path):
    result = cli(
        "+method=source_only",
        "+task=synth2real",
        f"run_dir={tmp_path}",
        "logger=csv",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        "data.source.options.length=16",
        "data.val.options.length=7",
        "data.batch_size=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 3
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
