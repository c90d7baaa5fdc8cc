"""What a run shows, read from a real command: the console says each thing once, and the offline W&B run holds the
config, the tags, the panels and results.json as its summary."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest
from wandb.proto import wandb_internal_pb2

from tests.conftest import TINY

# Hydra's console format, and Lightning's own ("INFO: ..."), which printed its lines a second time.
PREFIX = re.compile(r"^(\[[^]]*\]\[[^]]*\]\[[A-Z]+\] - |INFO: )")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny run from the command line with W&B offline: (its stdout + stderr, its run directory)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    environment = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    environment.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "+method=source_only",
            "+task=synth2real",
            f"run_dir={run_dir}",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "data.num_workers=0",
            *TINY["semantic"],
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr, run_dir


def test_the_console_says_each_thing_once(cli_run):
    output, _ = cli_run
    messages = [PREFIX.sub("", line) for line in output.splitlines() if PREFIX.match(line)]
    repeated = {message for message in messages if messages.count(message) > 1}
    assert not repeated, repeated
    assert output.count("Total params") == 1  # the model summary
    for noise in ("litlogger", "anonymous setting", "LeafSpec", "weights_only", "wandb:"):
        assert noise not in output
    validations = [m for m in messages if re.match(r"step [24]/4 \| val mIoU \d+\.\d\d \| 0:00:\d\d elapsed", m)]
    assert len(validations) == 2
    assert sum("W&B runs offline" in m for m in messages) == 1


def wandb_records(path):
    """The records of a W&B transaction log (``run-*.wandb``): LevelDB-style 32 KiB blocks of chunks, each with a
    7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header. wandb >= 0.20
    ships no Python reader of its own; the records are its protobuf ``Record``."""
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    offset, pending = header, b""
    while offset + header <= len(data):
        if block - offset % block < header:
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + header])
        payload, offset = data[offset + header : offset + header + length], offset + header + length
        if kind == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_the_offline_wandb_run_holds_config_tags_panels_and_results(cli_run):
    _, run_dir = cli_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(offline.glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"]["name"] == "source_only" and config["task"]["name"] == "synth2real"
    assert config["trainer"]["max_steps"] == 4
    assert {"source_only", "synth2real"} <= set(run.tags)
    summary = {
        tuple(item.nested_key) or (item.key,): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    results = json.loads((run_dir / "results.json").read_text())
    assert summary[("metrics",)]["mIoU"] == pytest.approx(results["metrics"]["mIoU"])
    assert summary[("step_time_s",)] == pytest.approx(results["step_time_s"])
    assert (
        summary[("validation_time_s",)] == pytest.approx(results["validation_time_s"])
        and results["validation_time_s"] > 0
    )
    panels = sorted((offline / "files" / "media" / "images").glob("val/predictions_*.png"))
    assert len(panels) == 2 and sorted(p.name for p in (run_dir / "predictions").iterdir()) == [
        "step_000002.png",
        "step_000004.png",
    ]
