"""The rules of a run's directory: one launch, one directory; a resume continues its own run and nothing else.

- The default directory is ``runs/<task>/<method>/<time>-<id>``: the id is shared by every process of one launch
  (torchrun and SLURM give them a common job id) and differs between launches, so two runs started in the same
  second never share a folder.
- A directory that already holds a run (its ``config.yaml``) is refused unless the run resumes it
  (``ckpt_path=last``), and a finished run (its ``results.json``) is never resumed into: its results stand.
- A new run that fails before its first checkpoint (a missing dataset, a bad path) gives its directory back, so the
  same command runs again once the cause is fixed.
- A resume runs the run's own config: a key that changes what the run computes (the data, the method, the
  optimiser, the step budget) is refused with the key named; how the run is watched and fed may change.
- On resume the CSV log keeps the rows up to the resumed step and W&B continues the same run id.
"""

from __future__ import annotations

import csv
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from datamodules.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id.txt"
# What a resume may change: how the run is watched and fed, not what it computes.
RESUME_FREE_KEYS = (
    "ckpt_path",
    "debug",
    "logger",
    "performance",
    "run_dir",
    "data.num_workers",
    "data.verify",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
)


def launch_id() -> str:
    """Six hex digits naming one launch: derived from the job id its processes share, else random."""
    shared = os.environ.get("SLURM_JOB_ID")
    if shared:
        shared += f".{os.environ.get('SLURM_STEP_ID', '')}"
    elif os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun's run id defaults to "none"; the rendezvous port tells concurrent launches apart.
        shared = f"{os.environ['TORCHELASTIC_RUN_ID']}.{os.environ.get('MASTER_PORT', '')}"
    if shared:
        return hashlib.sha1(shared.encode()).hexdigest()[:6]
    return secrets.token_hex(3)


def is_launching_process() -> bool:
    """False in the extra processes of a DDP launch (they join the directory rank 0 prepared)."""
    return (_get_rank() or 0) == 0


def resume_checkpoint(run_dir: Path, ckpt_path: str | None, stage: str, train: bool) -> str | None:
    """The checkpoint a run resumes from (None for a fresh run), after refusing what would overwrite a run."""
    holds_run = (run_dir / "config.yaml").is_file()
    if ckpt_path is None:
        # A method's own stage (e.g. seco's pseudo-labelling) caches per item and resumes into its directory.
        if holds_run and stage == "train" and is_launching_process():
            raise ConfigError(f"run_dir {run_dir} {occupant(run_dir)}")
        return None
    if not train:
        raise ConfigError("train=false evaluates the starting weights; drop ckpt_path or use train=true to resume.")
    if (run_dir / "results.json").is_file() and is_launching_process():
        raise ConfigError(
            f"run_dir {run_dir} holds a finished run (results.json); a resume would rewrite its results: "
            "start a new run_dir instead"
        )
    path = last_checkpoint(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: {path} does not exist; nothing to resume (check run_dir, or drop ckpt_path "
            "to start a new run)"
        )
    return str(path)


def config_changes(stored: dict, resumed: dict) -> Iterator[str]:
    """``key: old -> new`` for each leaf of two configs that differs, the free keys (RESUME_FREE_KEYS) aside."""
    from experiments.run import config_leaves

    old, new = dict(config_leaves(stored)), dict(config_leaves(resumed))
    for key in sorted(old.keys() | new.keys()):
        free = any(key == name or key.startswith(f"{name}.") for name in RESUME_FREE_KEYS)
        if not free and old.get(key, "<absent>") != new.get(key, "<absent>"):
            yield f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"


def check_resumed_config(run_dir: Path, resolved: dict) -> None:
    """A resume continues the run whose ``config.yaml`` lies in ``run_dir``, under that same config."""
    from omegaconf import OmegaConf

    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return
    changes = list(config_changes(OmegaConf.to_container(OmegaConf.load(stored)), resolved))
    if changes:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise ConfigError(
            f"ckpt_path resumes the run in {run_dir} under a different config ({shown}); resume with that run's own "
            "overrides (its .hydra/overrides.yaml), or start a new run_dir"
        )


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def occupant(run_dir: Path) -> str:
    """What the run already in ``run_dir`` left there, and what a new launch can do instead."""
    if (run_dir / "results.json").is_file():
        return "holds a finished run (results.json); choose a new run_dir"
    if last_checkpoint(run_dir).is_file():
        return "already holds a run (config.yaml); resume it with ckpt_path=last, or choose a new run_dir"
    return (
        "holds a run that saved no checkpoint yet (config.yaml, no checkpoints/last.ckpt): it is still starting, "
        "or it was killed before its first validation; choose a new run_dir, or delete this one if that run is gone"
    )


@contextmanager
def claimed(run_dir: Path, config_yaml: str, new_run: bool) -> Iterator[None]:
    """Holds ``run_dir`` while the run works in it: its ``config.yaml`` is the claim a second launch is refused on.
    A new run that fails before its first checkpoint removes the claim again: it has nothing to resume, and the
    same command (same run_dir) must be able to run once the cause is fixed."""
    launching = is_launching_process()
    if launching:
        (run_dir / "config.yaml").write_text(config_yaml)
    try:
        yield
    except BaseException:
        if launching and new_run and not last_checkpoint(run_dir).is_file():
            (run_dir / "config.yaml").unlink(missing_ok=True)
        raise


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was saved at, read without loading its tensors."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


class _ResumingWriter(ExperimentWriter):
    """Keeps metrics.csv rows logged up to ``resume_step`` (Lightning's writer deletes the file on start)."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            kept = [row for row in reader if int(row["step"]) < self.resume_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = sorted(fields)


class ResumingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv, on resume from step k, keeps the rows before k and appends the rest."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.resume_step)
        return super().experiment


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: made on the first start, read back on resume."""
    path = run_dir / WANDB_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if is_launching_process():
        path.write_text(run_id)
    return run_id
