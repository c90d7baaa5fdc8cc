"""Shared helpers: compose the real Hydra config in-process and run it with a tiny budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.run import build_module, execute
from experiments.run import compose_config as compose_overrides

TINY = {
    "semantic": [
        "data.source.options.length=16",
        "data.target.options.length=16",
        "data.val.options.length=6",
        "data.batch_size=4",
    ],
    "prompted": [
        "data.source.options.length=8",
        "data.target.options.length=8",
        "data.val.options.length=4",
        "data.batch_size=2",
    ],
}
KIND = {"synth2real": "semantic", "synth_shapes": "prompted", "synth_polyp": "prompted"}


def tiny_overrides(method: str, task: str, run_dir: Path, *overrides: str) -> list[str]:
    """The overrides of a tiny run; also the arguments of the same run as `python -m experiments.run`."""
    return [
        f"+method={method}",
        f"+task={task}",
        f"run_dir={run_dir}",
        "logger=csv",
        "data.num_workers=0",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        *TINY.get(KIND.get(task), []),  # real-data tasks: the test writes a tiny dataset itself
        *overrides,
    ]


def compose_config(method: str, task: str, run_dir: Path, *overrides: str):
    return compose_overrides(tiny_overrides(method, task, run_dir, *overrides))


def method_module(method: str, task: str, *overrides: str, run_dir: Path | str = "unused"):
    """The LightningModule a tiny ``+method=... +task=...`` run trains, built from the composed config (no run)."""
    return build_module(OmegaConf.to_container(compose_config(method, task, run_dir, *overrides), resolve=True))


def prompted_datamodule_config(target: dict, val: dict, **data) -> dict:
    """The keys ``build_prompted_datamodule`` reads, for a 32-px target-stream SAM run; ``data`` adds or replaces."""
    return {
        "seed": 0,
        "model": {"image_size": 32},
        "method": {"streams": ["tgt"]},
        "data": {
            "source": None,
            "target": target,
            "val": val,
            "labelled_domain": "target",
            "batch_size": 2,
            "num_workers": 0,
            "max_instances": 40,
            "strong_view": False,
            "sam_views": "jitter",
            "sam_input": "sam",
            **data,
        },
    }


@pytest.fixture
def run_tiny(tmp_path):
    """Run a method on a procedural task with a tiny budget; returns (results, run_dir)."""

    def run(method: str, task: str, *overrides: str, name: str = "run"):
        run_dir = tmp_path / name
        return execute(compose_config(method, task, run_dir, *overrides)), run_dir

    return run


DDP = (
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
)


def run_ddp(method: str, task: str, run_dir: Path, *overrides: str, timeout: int = 600):
    """A 2-process CPU DDP run of the command line, two steps; returns the finished subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", f"+method={method}", f"+task={task}", f"run_dir={run_dir}", *DDP,
         *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="session")
def source_ckpt(tmp_path_factory):
    """A tiny source model for the methods that adapt one: the last.ckpt of a 2-step source_only run."""
    run_dir = tmp_path_factory.mktemp("source_only")
    execute(compose_config("source_only", "synth2real", run_dir, "trainer.max_steps=2"))
    return run_dir / "checkpoints" / "last.ckpt"
