"""How the cpu backend's DataLoader workers start: in a multi-rank run, forked by a fork server, not by the
training process.

A rank starts its workers at the first epoch and at the first validation, while its other threads run
(in a multi-rank run the process group's and the strategy's C++ threads, which can enter Python). On CPython before 3.11.10 a fork at
the moment another thread creates or deletes a Python thread state leaves the child stuck for good inside
``os.fork`` (CPython gh-112275: the child takes the runtime's thread-list lock before re-creating it), and
its rank waits for that worker until the job's time limit. A CI run hung so in a DeepSpeed rank;
``bench/fork_race.py`` shows it here in 1 or 2 forks of 500. Any fork of a threaded process risks the
same with other locks (3.12 warns of it; 3.14 made the fork server its default).

``auto`` (the default) takes the fork server when the run has more than one rank, where those threads
run (which one held the lock in the CI hang is not known). A single process forks its workers
itself, which costs nothing; the fork server imports torch once more per training process (seconds).

The fork server is a fresh process (fork and exec) with one thread; it imports the backend once, so its
workers start as fast as forked ones. It is started here, from the trainer's main thread, with Slurm's
preemption signals blocked: the server never dies of them (it serves the trainer until the trainer ends)
and its workers are born with them blocked (``pipeline.data.worker_signals``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver

from pipeline.data.worker_signals import spawned_without_preemption_signals

START_METHODS = ("auto", "forkserver", "fork")

# what every cpu-backend worker imports, once, in the server: a main script run by path (workers import it
# as multiprocessing's spawn does; ``python -m pipeline`` imports nothing there), torch, torchvision, PIL
_PRELOAD = ["__main__", "pipeline.data.cpu_backend"]


def resolve(method: str, world_size: int) -> str:
    """``fork`` or ``forkserver`` for ``data.worker_start_method`` in a run of ``world_size`` ranks."""
    if method not in START_METHODS:
        raise ValueError(f"worker start method must be one of {START_METHODS}, got {method!r}")
    if method == "auto":
        return "forkserver" if world_size > 1 else "fork"
    return method


def worker_context(method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the loader's workers (``fork`` or ``forkserver``: ``resolve`` of
    ``data.worker_start_method``); for ``forkserver``, its server is running when this returns."""
    if method not in ("fork", "forkserver"):
        raise ValueError(f"worker start method must be 'fork' or 'forkserver' here, got {method!r}")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
        with spawned_without_preemption_signals():
            multiprocessing.forkserver.ensure_running()
    return context
