"""The run's W&B record: its resolved config as the run config (the UI groups by ``method.*``), tags for method and
task, the prediction panels as media (``lightning_modules/panels.py``), and results.json as the run summary.

Offline, W&B prints nothing itself: its banner repeated what the run says in one log line (offline, and how to
sync); online it keeps its banner, which holds the run's URL. Lightning's WandbLogger passes wandb a deprecated
``anonymous`` argument that wandb warns about on every run; ``RunWandbLogger`` does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from experiments.run_dir import wandb_run_id

log = logging.getLogger("experiments.run")


class RunWandbLogger(WandbLogger):
    """WandbLogger without the ``anonymous`` argument: Lightning always passes it (as None), and wandb >= 0.19 warns
    that it has no effect whenever it is passed at all."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)


def build_wandb_logger(
    cfg, resolved: dict, run_dir: Path, mode: str, resume_step: int | None, reason: str
) -> RunWandbLogger:
    import wandb

    if mode == "offline":
        log.info("W&B runs offline (%s); sync later with `wandb sync %s/wandb`", reason, run_dir)
    return RunWandbLogger(
        project=cfg.logger.wandb.project,
        entity=cfg.logger.wandb.entity,
        save_dir=str(run_dir),
        mode=mode,
        config=resolved,
        tags=[cfg.method.name, cfg.task.name, *cfg.logger.wandb.tags],
        name=f"{cfg.method.name}-{cfg.task.name}-s{cfg.seed}",
        id=wandb_run_id(run_dir, resuming=resume_step is not None),
        resume="allow",
        settings=wandb.Settings(silent=mode == "offline"),
    )


def finish_wandb(loggers: list, results: dict) -> None:
    """On rank 0: results.json as the run summary, then the run closed (a Hydra multirun starts the next job's run
    in the same process, and Lightning would otherwise attach it to this one)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(results)
            logger.experiment.finish()
