"""Loader worker processes that die: an error between batches, and an exit when the loader waits on them.

DALI's parallel source cannot survive a lost worker. Its pool stops the other workers, and a worker
killed while it held a lock of the pool's shared queues (the kernel's OOM killer does not choose its
moment) leaves whoever takes that lock next waiting forever, inside DALI, where no Python error can be
raised: the next batch, and also the pool's own close when the pipeline is dropped or the interpreter
exits. The job would hang, without a checkpoint, until its time limit. So the loader checks its workers
before each batch (``check``: an error naming the worker), and a thread watches them. Once a worker has
died, the thread ends the process (exit status 1, after printing which worker died and how) when the
loader is still inside a wait on DALI ``grace`` seconds later (``waiting``), when the interpreter is
still not gone ``grace`` seconds after its main thread ended (DALI's close at exit), or when the
process still lives ``after_error`` seconds after ``check`` reported the death. The job then fails at
once with the reason in its log (under ``srun --kill-on-bad-exit`` its other ranks too).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess

from pipeline.data.shared_memory import MORE_SHM, SHM, shm_space

EXIT_STATUS = 1


def describe_death(worker: BaseProcess, what: str, advice: str = "") -> str:
    """One line: which worker ended, how, what it usually means and what to change."""
    code = worker.exitcode
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    if code == -signal.SIGBUS:  # a write to shared memory that has no room left (tmpfs pages are taken on write)
        space = shm_space()
        room = f"{space[1] / 2**20:.1f} MiB free of {space[0] / 2**20:.1f} MiB" if space else "its room unknown"
        return (f"{what} (pid {worker.pid}) ended ({how}); SIGBUS usually means a write to a full {SHM} ({room} "
                f"now): {MORE_SHM}."
                + (f" {advice}." if advice else ""))
    return (f"{what} (pid {worker.pid}) ended ({how}); signal 9 (SIGKILL) usually means the kernel's OOM "
            f"killer." + (f" {advice}." if advice else ""))


def first_death(workers: Sequence[BaseProcess]) -> BaseProcess | None:
    """The worker that died first, as far as can be told, or None: when one dies DALI's pool ends the others
    with SIGTERM (exit code 143 through ``shield_worker``), so one that ended otherwise is the cause."""
    ended = [w for w in workers if w.exitcode is not None]
    return next((w for w in ended if w.exitcode != 128 + signal.SIGTERM), ended[0] if ended else None)


class WorkerWatchdog:
    """Watches a set of ``multiprocessing`` processes (``watch``) from a daemon thread until ``stop``.

    Args:
        what: how the messages name one of the workers.
        advice: the end of the messages (what the user can change).
        grace: seconds a wait (or the exit) may still last after a death before the process is ended (DALI
            itself raises within a second when the worker died outside the queues' locks).
        after_error: seconds the process may live on after ``check`` raised (its teardown: loggers, W&B).
    """

    def __init__(self, what: str, advice: str, grace: float = 10.0, after_error: float = 300.0) -> None:
        self.what, self.advice, self.grace, self.after_error = what, advice, float(grace), float(after_error)
        self.workers: list = []
        self._entered: float | None = None  # monotonic time the current wait began
        self._reported: float | None = None  # monotonic time check() raised
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, workers: Sequence) -> None:
        """Watch ``workers`` (the processes the loader cannot do without) instead of the previous ones."""
        self.stop()
        self.workers, self._stopped, self._reported = list(workers), threading.Event(), None
        if self.workers:
            self._thread = threading.Thread(target=self._watch, args=(self.workers, self._stopped),
                                            name="loader-worker-watchdog", daemon=True)
            self._thread.start()

    def dead(self) -> BaseProcess | None:
        """A watched worker that has ended (``first_death``), or None."""
        return first_death(self.workers)

    def check(self) -> None:
        """Raise ``RuntimeError`` naming the first worker that has ended."""
        self._raise_if_dead()

    def check_after_error(self, wait: float = 1.0) -> None:
        """``check`` for an error the workers' consumer got: DALI notices a lost worker by its closed
        connection ("Worker data receiving interrupted"), which can be before the process is reaped and its
        death visible; so wait up to ``wait`` s for one to end. Without it the error passed for a decoder
        error, and the loader went on with a pipeline whose worker was gone."""
        if self.workers and self.dead() is None:
            ended = multiprocessing.connection.wait([w.sentinel for w in self.workers], timeout=wait)
            for w in self.workers:
                if w.sentinel in ended:
                    w.join(wait)  # its exit status: the sentinel closes before the kernel reports the exit
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        w = self.dead()
        if w is not None:
            self._reported = time.monotonic()
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
        if not threading.main_thread().is_alive():
            return  # the interpreter is exiting: DALI stops its workers on purpose
        died, main_gone = time.monotonic(), None
        while not stopped.wait(0.5):
            now, entered, reported = time.monotonic(), self._entered, self._reported
            if main_gone is None and not threading.main_thread().is_alive():
                main_gone = now
            if entered is not None and now - max(entered, died) > self.grace:
                self._end_process(dead, workers, f"the loader has waited {now - entered:.0f} s for it")
            if main_gone is not None and now - main_gone > self.grace:
                self._end_process(dead, workers, "the process could not exit (DALI's close waits for it)")
            if reported is not None and now - reported > self.after_error:
                self._end_process(dead, workers, f"the process still runs {now - reported:.0f} s after the error")

    def _end_process(self, dead, workers: list, why: str) -> None:
        dead = first_death(workers) or dead
        print(f"error: {describe_death(dead, self.what, self.advice)} {why[0].upper()}{why[1:]} and cannot go on; "
              f"ending this process (exit status {EXIT_STATUS}).", file=sys.stderr, flush=True)
        for w in workers:  # the parent's SIGKILL, which a shielded worker cannot refuse
            if w.exitcode is None:
                w.kill()
        os._exit(EXIT_STATUS)
