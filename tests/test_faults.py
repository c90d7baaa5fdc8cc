"""Fault injection on the runner: each fault a user on a shared cluster meets gives one sentence naming the path or
key and a non-zero exit, and no run overwrites another."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from datamodules.errors import ConfigError, DatasetLayoutError
from experiments.run import check_counts, compatible, normalise_overrides, one_line, write_results
from experiments.run_dir import check_resumed_config, launch_id, resume_checkpoint
from lightning_modules.source_only import SourceOnly
from tests.conftest import TINY, method_module

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parent.parent
RUN = ["+method=source_only", "+task=synth2real", "logger=csv", "data.num_workers=0", "trainer.max_steps=2",
       "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", *TINY["semantic"]]  # fmt: skip


def cli(*args, cwd=ROOT):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, cwd=cwd, env=environment
    )


def error_line(result) -> str:
    """The one line a refused run prints (Lightning's own info lines aside)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_two_runs_started_together_keep_separate_folders(tmp_path):
    commands = [
        [sys.executable, "-m", "experiments.run", *RUN, "train=false", f"seed={seed}"] for seed in (1, 2)
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen(c, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL) for c in commands]
    assert [p.wait() for p in processes] == [0, 0]
    folders = sorted((tmp_path / "runs" / "synth2real" / "source_only").iterdir())
    assert len(folders) == 2
    for folder in folders:  # each folder is one run's: its config, log, Hydra record and results agree
        seed = json.loads((folder / "results.json").read_text())["seed"]
        assert f"seed: {seed}" in (folder / "config.yaml").read_text()
        assert (folder / "run.log").is_file() and (folder / ".hydra" / "config.yaml").is_file()
    assert launch_id() != launch_id()


def test_run_dir_holds_everything_the_run_writes(tmp_path):
    assert normalise_overrides(["run_dir=/x", "seed=1"]) == ["hydra.run.dir=/x", "seed=1"]
    assert normalise_overrides(["-m", "run_dir=/x"]) == ["-m", "hydra.sweep.dir=/x"]
    result = cli(*RUN, "train=false", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {".hydra", "run.log", "config.yaml", "results.json"}
    assert not (tmp_path / "runs").exists()


def test_a_run_dir_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert cli(*RUN, f"run_dir={run_dir}").returncode == 0
    before = (run_dir / "results.json").read_text()
    assert "holds a finished run (results.json); choose a new run_dir" in error_line(cli(*RUN, f"run_dir={run_dir}"))
    assert "holds a finished run (results.json)" in error_line(cli(*RUN, f"run_dir={run_dir}", "ckpt_path=last"))
    assert (run_dir / "results.json").read_text() == before
    line = error_line(cli(*RUN, f"run_dir={tmp_path / 'typo'}", "ckpt_path=last"))
    assert f"{tmp_path / 'typo' / 'checkpoints' / 'last.ckpt'} does not exist; nothing to resume" in line


def test_a_run_that_fails_before_its_first_checkpoint_gives_its_run_dir_back(tmp_path):
    run_dir, broken = tmp_path / "run", tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert "cannot be read" in error_line(cli(*RUN, f"method.source_ckpt={broken}", f"run_dir={run_dir}"))
    assert not (run_dir / "config.yaml").exists()
    fixed = cli(*RUN, f"run_dir={run_dir}")  # the same run_dir, the cause fixed
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (run_dir / "results.json").is_file()


def test_a_held_run_dir_is_refused_with_what_its_run_left(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")  # a run killed before its first validation, or starting
    with pytest.raises(ConfigError, match="saved no checkpoint yet .* delete this one if that run is gone"):
        resume_checkpoint(run_dir, None, "train", True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # a run stopped after a validation
    with pytest.raises(ConfigError, match="already holds a run .*; resume it with ckpt_path=last"):
        resume_checkpoint(run_dir, None, "train", True)
    assert resume_checkpoint(run_dir, "last", "train", True) == str(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run"):
        resume_checkpoint(run_dir, None, "train", True)
    assert resume_checkpoint(run_dir, None, "pseudo_label", True) is None  # a method's stage resumes its own cache


def test_a_resume_runs_its_own_config(tmp_path):
    config = {
        "seed": 0,
        "optim": {"lr": 0.002},
        "trainer": {"max_steps": 400, "enable_progress_bar": False},
        "data": {"num_workers": 2, "streams": ["src", "tgt"]},
        "logger": {"csv": {"enabled": True}},
    }
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    watched_differently = {
        **config,
        "trainer": {"max_steps": 400, "enable_progress_bar": True},
        "data": {"num_workers": 0, "streams": ["src", "tgt"]},
        "logger": {},
        "debug": True,
    }
    check_resumed_config(tmp_path, watched_differently)
    changed = {**config, "optim": {"lr": 0.5}, "data": {"num_workers": 2, "streams": ["src"]}, "seed": 1}
    expected = r"\(data.streams: \['src', 'tgt'\] -> \['src'\]; optim.lr: 0.002 -> 0.5; seed: 0 -> 1\)"
    with pytest.raises(ConfigError, match=expected):
        check_resumed_config(tmp_path, changed)
    with pytest.raises(ConfigError, match="method.name: '<absent>' -> 'bicl'"):
        check_resumed_config(tmp_path, {**config, "method": {"name": "bicl"}})


def test_an_unwritable_checkpoint_fails_the_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "last.ckpt").mkdir(parents=True)  # a folder where the file must go
    line = error_line(cli(*RUN, f"run_dir={run_dir}"))
    assert f"checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} could not be written" in line
    assert not (run_dir / "results.json").exists()
    assert not list((run_dir / "checkpoints").glob("*tmp*"))  # the temporary file is removed too


def test_a_bad_value_or_checkpoint_is_one_sentence(tmp_path):
    assert "trainer.max_steps='abc' must be int like its default" in error_line(
        cli(*RUN, "trainer.max_steps=abc", f"run_dir={tmp_path / 'a'}")
    )
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert f"checkpoint {broken} cannot be read" in error_line(
        cli(*RUN, f"method.source_ckpt={broken}", f"run_dir={tmp_path / 'b'}")
    )
    debug = cli(*RUN, f"method.source_ckpt={broken}", f"run_dir={tmp_path / 'c'}", "debug=true")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_count_below_what_a_run_needs_is_one_sentence(tmp_path):
    assert "data.batch_size=0 must be at least 1" in error_line(cli(*RUN, "data.batch_size=0", f"run_dir={tmp_path}"))

    def config(train=True, batch_size=4, max_steps=2, num_workers=0, seed=0, crop_size=None, max_instances=40):
        return OmegaConf.create(
            {"train": train, "seed": seed, "trainer": {"max_steps": max_steps}, "task": {"kind": "prompted"},
             "data": {"batch_size": batch_size, "num_workers": num_workers, "crop_size": crop_size,
                      "max_instances": max_instances}}
        )  # fmt: skip

    with pytest.raises(ConfigError, match=r"trainer.max_steps=0 must be at least 1 \(train=false evaluates"):
        check_counts(config(max_steps=0))
    with pytest.raises(ConfigError, match="trainer.max_steps=-1 must be at least 1"):
        check_counts(config(max_steps=-1))
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be 0"):
        check_counts(config(num_workers=-1))
    with pytest.raises(ConfigError, match=r"seed=-1 must be in \[0, 2\*\*32\)"):
        check_counts(config(seed=-1))
    with pytest.raises(ConfigError, match=r"data.crop_size=\[0, 512\] must be \[height, width\], each at least 1"):
        check_counts(config(crop_size=[0, 512]))
    with pytest.raises(ConfigError, match="data.max_instances=0 must be at least 1"):
        check_counts(config(max_instances=0))
    check_counts(config(train=False, max_steps=0))  # evaluation only: the step budget is not used
    check_counts(config(crop_size=[512, 512]))
    check_counts(config())


def test_what_lightning_or_wandb_refuse_is_one_sentence(tmp_path):
    precision = error_line(cli(*RUN, "trainer.precision=fp7", f"run_dir={tmp_path / 'a'}"))
    assert "trainer.*: Lightning's Trainer refused it: Precision 'fp7' is invalid. Allowed precision" in precision
    wandb = ("logger.wandb.enabled=true", "logger.wandb.mode=bogus")
    wandb_mode = error_line(cli(*RUN, *wandb, f"run_dir={tmp_path / 'b'}"))
    assert "logger.wandb.mode (or WANDB_MODE)='bogus'; expected one of ('online', 'offline'" in wandb_mode


def test_config_values_keep_their_types():
    assert compatible(3, 600) and compatible(0.5, 200) and compatible("16-mixed", "auto")
    assert not compatible("abc", 600) and not compatible(True, 600) and not compatible(1, True)
    assert not compatible([1], 8) and compatible(None, 8) and compatible("${data.root}/x", 0)


def test_a_worker_error_keeps_only_the_original_sentence():
    error = DatasetLayoutError(
        "Caught DatasetLayoutError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ndatamodules.errors.DatasetLayoutError: /data/a.png cannot be decoded\n'
    )
    assert one_line(error) == "/data/a.png cannot be decoded"
    assert one_line(ConfigError("method.teacher='x'; expected one of ('shared', 'ema')")).startswith("method.teacher")


def test_results_json_is_strict_json(tmp_path):
    path = tmp_path / "results.json"
    write_results(path, {"metrics": {"mIoU": 50.0}, "per_class_iou": {"road": 90.0, "pole": math.nan}})
    saved = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert saved["per_class_iou"] == {"road": 90.0, "pole": None}


def test_an_evaluation_without_labelled_pixels_is_an_error(tmp_path):

    module = method_module("source_only", "synth2real", run_dir=tmp_path)
    module.trainer = SimpleNamespace(sanity_checking=False)
    with pytest.raises(DatasetLayoutError, match="has no pixel labelled with a class of the task"):
        module.log_evaluation("val")


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{key: value for key, value in row.items() if value} for row in csv.DictReader(file)]


def test_the_resumed_csv_log_keeps_the_rows_before_the_checkpoint(run_tiny, monkeypatch):
    common = ("trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.deterministic=true")
    _, whole = run_tiny("source_only", "synth2real", *common, name="whole")
    original = SourceOnly.training_step

    def dies_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SourceOnly, "training_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_tiny("source_only", "synth2real", *common, name="killed")
    monkeypatch.setattr(SourceOnly, "training_step", original)
    run_tiny("source_only", "synth2real", *common, "ckpt_path=last", name="killed")
    resumed, uninterrupted = metric_rows(whole.parent / "killed"), metric_rows(whole)
    # The rows logged before the step-2 checkpoint are kept as they were; every later step is logged once.
    assert [row for row in resumed if int(row["step"]) < 2] == [row for row in uninterrupted if int(row["step"]) < 2]
    assert [(row["step"], sorted(row)) for row in resumed] == [(row["step"], sorted(row)) for row in uninterrupted]


WORKER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from torch.utils.data import Dataset
    from datamodules.loading import build_evaluation_loader

    class Pids(Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, index):
            time.sleep(0.05)
            return os.getpid()

    loader = build_evaluation_loader(Pids(), list(range(1000)), batch_size=1, num_workers=1)
    for batch in loader:
        print(int(batch[0]), flush=True)
        time.sleep(60)
    """
)


def test_loader_workers_die_with_their_parent():
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], stdout=subprocess.PIPE, text=True, env=environment)
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{worker}").exists():
        state = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}/stat").exists() else "X"
        if state == "Z":  # exited, waiting for its (re-parented) reaper
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists() or state == "Z"


def test_atomic_writes_of_one_file_by_two_processes_never_collide_and_killed_writers_leave_nothing(tmp_path):
    import multiprocessing

    from datamodules.files import save_json

    target = tmp_path / "results.json"
    # A killed writer's partial file (its process is gone) and a live writer's, in flight.
    (tmp_path / ".results.999999999.tmp.json").write_text("partial")
    live = tmp_path / f".results.{os.getppid()}.tmp.json"
    live.write_text("in flight")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=save_json, args=(target, {"value": 1})) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert all(writer.exitcode == 0 for writer in writers)
    assert json.loads(target.read_text()) == {"value": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.json", live.name])
