"""How far a long job is: elapsed time and an estimate of the time left, in one phrase every progress line shares
(the validation line of a run, seco's labelling stage, the benchmark's rows)."""

from __future__ import annotations

import datetime


def duration(seconds: float) -> str:
    """``H:MM:SS``, rounded to the second."""
    return str(datetime.timedelta(seconds=round(seconds)))


def time_left(done: int, total: int, elapsed: float, timed: int | None = None) -> str:
    """``0:12:03 elapsed, about 0:40:00 left`` after ``done`` of ``total`` items. The rate comes from the ``timed``
    items (default: all done), so items that cost nothing, such as ones reused from an earlier run, do not make the
    estimate optimistic."""
    timed = done if timed is None else timed
    if done >= total:
        return f"{duration(elapsed)} elapsed"
    if timed <= 0:
        return f"{duration(elapsed)} elapsed, time left unknown yet"
    return f"{duration(elapsed)} elapsed, about {duration(elapsed / timed * (total - done))} left"
