"""``trainer.max_time`` across starts: Lightning's Timer counts the training time of every start of a run
(its elapsed time is in each checkpoint), so a resume with the same ``max_time`` as the start that reached it
restored everything, said "Time limit reached", trained nothing and exited 0, as if it had resumed. ``fit``
says the run is complete instead, with the setting that trains on, as it does for ``max_steps``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pytorch_lightning.callbacks import Timer

_DURATION = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")  # Lightning's DD:HH:MM:SS


def max_time_seconds(value: Any) -> float | None:
    """``trainer.max_time`` in seconds, as Lightning's Timer reads it ("DD:HH:MM:SS", a dict of timedelta's
    keywords, a timedelta); None for none, or for a value Lightning will refuse itself."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        try:
            return timedelta(**value).total_seconds()
        except TypeError:
            return None
    if isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        days, hours, minutes, seconds = (int(g) for g in match.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    return None


def trained_seconds(checkpoint: dict) -> float | None:
    """The training time the checkpoint's Timer had counted (all starts of the run), None where it has no
    Timer state (a run without ``max_time``)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.split("{")[0] == Timer.__qualname__ and isinstance(state, dict):
            elapsed = (state.get("time_elapsed") or {}).get("train")
            if isinstance(elapsed, (int, float)):
                return float(elapsed)
    return None


def time_limit_reached(max_time: Any, checkpoint: dict) -> tuple[timedelta, str] | None:
    """(training time counted, ``trainer.max_time`` as said) where a resume of ``checkpoint`` would train
    nothing under ``trainer.max_time``, or None."""
    limit, trained = max_time_seconds(max_time), trained_seconds(checkpoint)
    if limit is None or trained is None or trained < limit:
        return None
    shown = max_time.strip() if isinstance(max_time, str) else str(timedelta(seconds=limit))
    return timedelta(seconds=round(trained)), shown
