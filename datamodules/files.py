"""Files a run writes for later stages to read (pseudo-labels, caches): written whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)`` next to ``path``, then rename: a reader (or a resumed run) never sees a partial file,
    and a write that fails leaves neither the temporary file nor a change to ``path``. The temporary name holds the
    writer's process id, so runs writing into one folder (bicl rows sharing a round's labels) never collide; the
    leftovers of killed writers of ``path`` are removed."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    for leftover in path.parent.glob(f".{path.stem}.*tmp{path.suffix}"):
        if not writer_alive(leftover.name[len(path.stem) + 2 : -len(f".tmp{path.suffix}")]):
            leftover.unlink(missing_ok=True)


def writer_alive(pid: str) -> bool:
    """Whether the process that named a temporary file still runs (a name without a process id: no)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """A uint8 label map as a single-channel PNG."""

    def write(temporary: Path) -> None:
        if not cv2.imwrite(str(temporary), labels.astype(np.uint8)):
            raise OSError(f"could not write {temporary}")

    write_atomically(path, write)


def save_json(path: Path, value) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2, sort_keys=True)))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: what identifies a checkpoint whatever its name or location."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_npz(path: Path, **arrays) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, write)
