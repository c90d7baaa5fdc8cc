"""Pre-flight data check: every file a run will read is checked before the first training step.

A bad file on a shared cluster (a truncated copy, a file without read permission, a label of the wrong size or id
encoding, an image whose pair went missing) would otherwise stop a run hours in, or decode into a silently wrong
image or mask. ``verify_dataset`` runs the dataset's own ``verify_item`` over all its items in a thread pool (the
image read from its header and checked complete, the label decoded as the reader decodes it) and raises one
``DatasetLayoutError`` naming the first bad files.

A passing verdict is cached as a small JSON under ``cache_directory(data_root)``, keyed by the path, size and
mtime of every file, so a rerun on an unchanged dataset costs only the stat calls; any change of a file, or of
``CHECKS_VERSION``, checks the dataset again. A failure is not cached: its message always describes the files as
they are now.

Every DDP rank runs the check itself, without a barrier: the verdict depends on the files only, so all ranks stop
together or none does, and with the cache warm a rank only stats its files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch.utils.data import Dataset

from datamodules.errors import DatasetLayoutError
from datamodules.files import write_atomically

log = logging.getLogger(__name__)

# Bump when what ``verify_item`` checks changes, so that verdicts of the older checks are not trusted.
CHECKS_VERSION = 1
MAX_REPORTED = 5


def cache_directory(data_root: str | Path | None) -> Path:
    """``data_root/.verify_cache`` where it can be written, else the user's cache (e.g. a read-only dataset mount)."""
    if data_root is not None:
        directory = Path(data_root) / ".verify_cache"
        try:
            directory.mkdir(exist_ok=True)
        except OSError:
            pass
        else:
            if os.access(directory, os.W_OK):
                return directory
    directory = Path.home() / ".cache" / "cross-domain-seg" / "verify"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def stat_line(path: Path) -> str:
    """Path, size and mtime; a file that cannot be stat'ed gets a marker (verify_item then says why)."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path}\tunreadable"
    return f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}"


def digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def cached_pass(cache_file: Path, signature: str) -> list[str] | None:
    """The notes of a cached pass, or None: an entry that cannot be read (half-written by another rank, edited)
    only means checking again."""
    try:
        entry = json.loads(cache_file.read_text())
        return list(entry.get("notes", [])) if entry["signature"] == signature else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def record_pass(cache_file: Path, signature: str, items: int, notes: list[str]) -> None:
    """A failed write costs the next run a full check, never this run: it is logged, not raised."""
    content = json.dumps({"signature": signature, "items": items, "checks_version": CHECKS_VERSION, "notes": notes})
    try:
        write_atomically(cache_file, lambda temporary: temporary.write_text(content))
    except OSError as error:
        log.warning("could not cache the data check in %s (%s); the next run checks again", cache_file, error)


def find_problems(dataset: Dataset, workers: int | None) -> tuple[list[str], list[str]]:
    """Each item's first problem and each item's note (a label the reader resizes to its image), in item order;
    decoding releases the GIL, so threads overlap I/O and decoding."""

    def check(index: int) -> tuple[str | None, str | None]:
        try:
            return None, dataset.verify_item(index)
        except DatasetLayoutError as error:
            return str(error), None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, range(len(dataset))))
    return [p for p, _ in results if p is not None], [n for _, n in results if n is not None]


def shown(messages: list[str]) -> str:
    return " | ".join(messages[:MAX_REPORTED]) + (" | ..." if len(messages) > MAX_REPORTED else "")


def log_resized_labels(name: str, notes: list[str]) -> None:
    if notes:
        log.warning(
            "data check of %s: %d labels are a few pixels off their image's size and are resized to it (nearest): %s",
            name,
            len(notes),
            shown(notes),
        )


def verify_dataset(dataset: Dataset, split: str, data_root: str | Path | None, workers: int | None = None) -> None:
    """Check every item of a file-backed dataset (procedural ones have no files) or raise one DatasetLayoutError."""
    if getattr(dataset, "procedural", False):
        return
    started = time.perf_counter()
    name = f"{type(dataset).__name__} {split}"
    paths = sorted({path for pair in dataset.file_pairs() for path in pair if path is not None})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        stats = list(pool.map(stat_line, paths))
    signature = digest([f"checks {CHECKS_VERSION}", *stats])
    cache_file = cache_directory(data_root) / f"{type(dataset).__name__}-{digest(map(str, paths))[:16]}.json"
    notes = cached_pass(cache_file, signature)
    if notes is not None:
        log.info("data check of %s: unchanged since it passed (%s)", name, cache_file)
        log_resized_labels(name, notes)
        return
    problems, notes = find_problems(dataset, workers)
    if problems:
        raise DatasetLayoutError(
            f"data check of {name} failed for {len(problems)} of {len(dataset)} items: {shown(problems)}"
        )
    log_resized_labels(name, notes)
    record_pass(cache_file, signature, len(dataset), notes)
    log.info("data check of %s: %d items passed in %.1f s", name, len(dataset), time.perf_counter() - started)
