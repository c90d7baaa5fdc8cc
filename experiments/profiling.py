"""Training-step cost of a run, recorded into its results.json: the numbers the benchmark compares.

The step time is the median wall time of the optimisation steps after a warm-up (data loading
excluded: the clock starts when the batch is in hand); the validation time is the median wall time of
one validation pass (what evaluation, and the prediction panels, cost); peak memory is the accelerator's
peak allocation, or the process's peak resident set on CPU.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from lightning.pytorch.callbacks import Callback

WARMUP_STEPS = 5


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class StepProfiler(Callback):
    def __init__(self, warmup_steps: int = WARMUP_STEPS):
        self.warmup_steps = warmup_steps
        self.durations: list[float] = []
        self.validations: list[float] = []
        self.started = self.validation_started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.durations.append(time.perf_counter() - self.started)

    def on_validation_start(self, trainer, pl_module) -> None:
        synchronize()
        self.validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        synchronize()
        if not trainer.sanity_checking:
            self.validations.append(time.perf_counter() - self.validation_started)

    def summary(self) -> dict:
        """``step_time_s`` (median after warm-up; all steps if the run was shorter), ``validation_time_s`` (median)
        and ``peak_memory_mb``."""
        timed = self.durations[self.warmup_steps :] or self.durations
        summary = {"peak_memory_mb": round(peak_memory_mb(), 1)}
        if timed:
            summary.update(step_time_s=statistics.median(timed), timed_steps=len(timed))
        if self.validations:
            summary.update(validation_time_s=statistics.median(self.validations))
        return summary
