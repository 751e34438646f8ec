"""Loader worker processes and the job's preemption signals.

Slurm sends ``--signal=USR1@T`` (and a preemption's SIGTERM) to every process of the job step, loader
workers included. A worker that dies of it breaks the very step at which the main process saves its
checkpoint: a DataLoader raises "worker exited unexpectedly", and DALI's parallel source hangs the
pipeline for good (tested). So workers never act on these signals; the main process alone decides when
to stop, and shuts its workers down itself.

Workers that ignore SIGTERM have one more consequence: at interpreter exit, multiprocessing terminates its
daemonic children with SIGTERM and then waits for them, forever. That exit path is taken when an
exception leaves a loader alive (its traceback holds the iterator), so ``stop_workers_at_exit`` ends them
first.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.resource_tracker
import multiprocessing.util  # registers multiprocessing's exit hook before ours: ours runs first
import signal
from collections.abc import Iterator

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (forked workers): ignore the preemption signals."""
    for s in PREEMPTION_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def spawned_without_preemption_signals() -> Iterator[None]:
    """Processes started inside the block never receive the preemption signals.

    For workers that are spawned (DALI's parallel source: a fresh interpreter that runs no code of ours
    before it serves batches): the block runs with the signals blocked in this thread, and a child inherits
    that mask through fork and exec and keeps it. Signals sent to this process meanwhile are not lost: they
    stay pending, or another thread takes them, and Python runs the handler in the main thread as usual.
    """
    stop_workers_at_exit()
    # The first spawn starts multiprocessing's resource tracker, and starting it unblocks SIGTERM in this
    # thread: start it before the block.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_registered = False


def stop_workers_at_exit() -> None:
    """Make sure worker processes still alive at interpreter exit are ended (once per process)."""
    global _registered
    if not _registered:
        atexit.register(_kill_leftover_workers)
        _registered = True


def _kill_leftover_workers() -> None:
    """End what multiprocessing's exit hook would terminate and then join: daemonic children (DataLoader
    workers). They ignore SIGTERM, so they get SIGKILL, which for them is no different: a worker has
    nothing to save, and SIGTERM's default would not have let it clean up either."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for p in children:
        p.kill()
    for p in children:
        p.join(5)
