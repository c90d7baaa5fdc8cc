"""Checkpoint writes that either land whole or fail the run with the path named.

Lightning's default writer buffers the checkpoint, writes it into a temporary file in the system temp folder
and moves it into place inside an fsspec transaction whose errors do not reach the run: a run whose
``checkpoints/`` is unwritable ended with exit 0 and no checkpoint, and a killed save left its partial file in
/tmp. Here the temporary file sits next to its target, is synced and renamed over it (so a kill mid-save leaves
the previous checkpoint intact), and the result is checked before training goes on.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.errors import CheckpointError
from datamodules.files import write_atomically


class VerifiedCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, write)
        except OSError as error:
            raise CheckpointError(
                f"checkpoint {path} could not be written ({error.strerror or error}); its folder must be a "
                "writable directory with free space"
            ) from error
        verify_checkpoint(path)


def verify_checkpoint(path: Path) -> None:
    """A written checkpoint exists and is a complete torch archive (its zip directory reads back)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is missing or incomplete after writing ({error})") from error
