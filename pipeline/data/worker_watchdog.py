"""Loader worker processes that die: an error between batches, and an exit when the loader waits on them.

DALI's parallel source cannot survive a lost worker. Its pool stops the other workers, and a worker
killed while it held the shared task queue's lock (the kernel's OOM killer does not choose its moment)
leaves the training process waiting on that lock forever, inside DALI, where no Python error can be
raised: the job hangs, without a checkpoint, until its time limit. So the loader checks its workers
before each batch (``check``: an error naming the worker), and a thread watches them while the loader
waits inside DALI (``waiting``): when a worker has died and the wait has not ended ``grace`` seconds
later, the thread prints which worker died and how, and ends the process with exit status 1. The job
then fails at once with the reason in its log (under ``srun --kill-on-bad-exit`` its other ranks too)
instead of hanging.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence

EXIT_STATUS = 1


def describe_death(worker, what: str, advice: str) -> str:
    """One line: which worker ended, how, what it usually means and what to change."""
    code = worker.exitcode
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return (f"{what} (pid {worker.pid}) ended ({how}); signal 9 (SIGKILL) usually means the kernel's OOM "
            f"killer. {advice}.")


class WorkerWatchdog:
    """Watches a set of ``multiprocessing`` processes (``watch``) from a daemon thread until ``stop``.

    Args:
        what: how the messages name one of the workers.
        advice: the end of the messages (what the user can change).
        grace: seconds a wait may still last after a death before the process is ended (DALI itself
            raises within a second when the worker died outside the queue's lock).
    """

    def __init__(self, what: str, advice: str, grace: float = 10.0) -> None:
        self.what, self.advice, self.grace = what, advice, float(grace)
        self.workers: list = []
        self._entered: float | None = None  # monotonic time the current wait began
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, workers: Sequence) -> None:
        """Watch ``workers`` (the processes the loader cannot do without) instead of the previous ones."""
        self.stop()
        self.workers, self._stopped = list(workers), threading.Event()
        if self.workers:
            self._thread = threading.Thread(target=self._watch, args=(self.workers, self._stopped),
                                            name="loader-worker-watchdog", daemon=True)
            self._thread.start()

    def check(self) -> None:
        """Raise ``RuntimeError`` naming the first worker that has ended."""
        for w in self.workers:
            if w.exitcode is not None:
                raise RuntimeError(describe_death(w, self.what, self.advice))

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Mark a call that blocks on the workers (one at a time)."""
        self._entered = time.monotonic()
        try:
            yield
        finally:
            self._entered = None

    def stop(self) -> None:
        """End the watch (before the workers are stopped on purpose)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread, self.workers = None, []

    def _watch(self, workers: list, stopped: threading.Event) -> None:
        sentinels = {w.sentinel: w for w in workers}
        dead = None
        while dead is None:
            if stopped.is_set():
                return
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            dead = sentinels[ready[0]] if ready else None
        died = time.monotonic()
        while not stopped.wait(0.5):
            entered = self._entered
            if entered is not None and time.monotonic() - max(entered, died) > self.grace:
                self._end_process(dead, workers)

    def _end_process(self, dead, workers: list) -> None:
        waited = time.monotonic() - (self._entered or time.monotonic())
        print(f"error: {describe_death(dead, self.what, self.advice)} The loader has waited {waited:.0f} s for "
              f"it and cannot go on; ending this process (exit status {EXIT_STATUS}).", file=sys.stderr, flush=True)
        for w in workers:  # the parent's SIGKILL, which a shielded worker cannot refuse
            if w.exitcode is None:
                w.kill()
        os._exit(EXIT_STATUS)
