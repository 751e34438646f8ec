"""The time-limit warning when it arrives before the training's own handlers exist.

Slurm sends USR1 (``--signal``: the time limit is near) whenever the job's clock says so, also while
``python -m pipeline fit`` is still importing torch, reading the config or building the model: seconds to
minutes before the ``Preemption`` callback installs its handlers at the fit's setup. USR1's default action
kills the process (exit 138, which the batch script counts as a crash). So ``fit`` holds USR1 from its
first line: it is only recorded, and ``Preemption`` takes it over at setup (the run stops after its first
step, saved, and requeues, as for a signal during training). SIGTERM keeps its default until the setup:
it means "go now" (a preemption's grace time, a torchrun agent that died), and a process held alive
through its start-up could wait for a peer or a rendezvous that is gone.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1,)

_pending: int | None = None
_previous: dict[int, object] = {}


def _record(signum, frame) -> None:
    global _pending
    if _pending is None:
        _pending = signum


def hold() -> None:
    """Record USR1 instead of dying of it, until ``take``. Call first thing in the main thread."""
    for s in SIGNALS:
        if s not in _previous:
            _previous[s] = signal.signal(s, _record)


def take() -> int | None:
    """Put the previous handlers back and return the first signal held meanwhile (None: none came)."""
    global _pending
    for s, h in _previous.items():
        try:
            signal.signal(s, h)
        except ValueError:  # not the main thread: the held handlers stay (they only record)
            pass
    _previous.clear()
    got, _pending = _pending, None
    return got
