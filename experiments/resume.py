"""The process's random streams in every checkpoint, so a resumed run draws what the uninterrupted run drew.

Training steps draw from the global streams of the main process (ClassMix masks, photometric noise applied
inside a step); the data's randomness is per item (datamodules.loading.item_seeds) and the loaders' position
is their own state, so these are the last part of a run's state that a checkpoint did not hold.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

KEY = "rng_states"


def capture_rng_states() -> dict:
    """python ``random``, numpy's global and torch's CPU (and CUDA) states, as plain values and tensors that
    ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """The inverse of ``capture_rng_states``; CUDA states only where this process has CUDA devices."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


class RNGStateCheckpoint(Callback):
    """Stores the RNG states in each checkpoint it saves and restores them when training resumes from one
    (a checkpoint written before this callback existed resumes without them)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = capture_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if KEY in checkpoint:
            restore_rng_states(checkpoint[KEY])
