"""What a run prints: one logging configuration (Hydra's job logging), each event once, one line per validation.

Lightning configures logging of its own on import: the ``lightning`` package puts an ``INFO: message`` handler on
the ``lightning`` logger, and ``lightning.pytorch`` / ``lightning.fabric`` each add a bare handler and stop their
records from reaching the root when the root had no handler yet. Depending on whether Lightning or Hydra's logging
came first, a Lightning line (the model summary too) was printed by Lightning's handlers and Hydra's alike, or only
by Lightning's, outside Hydra's format and ``run.log``. ``use_hydra_logging`` removes Lightning's handlers, so every
record takes one path: the root logger Hydra configured (console and ``run.log``).
"""

from __future__ import annotations

import logging
import time
import warnings

from lightning.pytorch.callbacks import Callback

from lightning_modules.metrics import format_metrics
from lightning_modules.progress import time_left

log = logging.getLogger("experiments.run")

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# rank_zero_info logs through one of these, whichever Lightning package was imported last.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``: one named message, not a level or a logger."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Every Trainer without Lightning's own cloud logger advertises it (logger_connector.py).
LITLOGGER_ADVERT = DropMessage("💡 Tip: For seamless cloud logging")


def use_hydra_logging() -> None:
    """Lightning's records go to the root logger that Hydra configured (console and ``run.log``), once."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(LITLOGGER_ADVERT)


def silence_known_noise() -> None:
    """Warnings that say nothing about this run, each named by its message."""
    # Lightning 2.6 builds torch's deprecated LeafSpec when it flattens a batch (utilities/_pytree.py).
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # Evaluation metrics are reduced across ranks before they are logged, so Lightning's advice to sync them
    # again (one warning per metric and evaluation under DDP) does not apply.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class ValidationLine(Callback):
    """One line per validation: the step, the task's metrics (mIoU; box / point / poly / avg on SAM tasks), the
    time since training began and an estimate of the time left."""

    def on_train_start(self, trainer, pl_module) -> None:
        # After a resume has restored the step, so the rate counts only the steps this process trains.
        self.started, self.first_step = time.monotonic(), trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step, total = trainer.global_step, trainer.max_steps
        timing = time_left(step, total, time.monotonic() - self.started, step - self.first_step)
        metrics = format_metrics(pl_module.last_results["metrics"])
        log.info("step %d/%d | val %s | %s", step, total, metrics, timing)
