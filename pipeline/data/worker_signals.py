"""Loader worker processes and the job's preemption signals.

Slurm sends ``--signal=USR1@T`` (and a preemption's SIGTERM) to every process of the job step, loader
workers included. A worker that dies of it breaks the very step at which the main process saves its
checkpoint: a DataLoader raises "worker exited unexpectedly", and DALI's parallel source hangs for good
once all its workers are gone (tested). So a worker never acts on USR1, and acts on SIGTERM only when its
parent sends it: that is how multiprocessing (``terminate()``, and at interpreter exit), torch's DataLoader
and DALI's worker pool end workers, and they must keep working (a worker that ignored its parent's SIGTERM
would hang the parent waiting for it).

How: the worker blocks both signals and a thread takes them with ``sigwaitinfo``, which says who sent
each one. Forked workers (DataLoader) call ``shield_worker`` first thing (``worker_init_fn``). Spawned
workers (DALI's parallel source: a fresh interpreter) are started inside
``spawned_without_preemption_signals``, so they inherit the blocked signals from birth, and call
``shield_worker`` when they unpickle the source. A shielded worker also dies with its parent (the kernel
sends it SIGKILL when the parent is gone), so none outlives a trainer killed outright.

Ctrl-C's SIGINT reaches every process of the terminal's foreground process group: the trainer (which saves
at its next step and stops: ``pipeline.preemption``), its ranks, and their workers. A worker ignores it: its
trainer ends it. Before, a fork server's DataLoader worker and DALI's source workers died of the
``KeyboardInterrupt`` (a multi-rank run then failed with "DataLoader worker ... exited unexpectedly" and saved
nothing; DALI printed a traceback per worker), and a forked worker ran the trainer's handler, its line once
more per worker. Spawned workers are born with it blocked too, until ``shield_worker`` ignores it.

A worker forked by a fork server (``pipeline.data.worker_start``) has two parents: the server forked it
(its ``getppid``), the trainer started it and ends it. It dies with either: the kernel's SIGKILL when the
server ends, a thread that waits on the trainer's pidfd when the trainer ends (the server itself outlives
a trainer killed outright until its last worker is gone).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.resource_tracker
import os
import select
import signal
import threading
import time
from collections.abc import Iterator

from pipeline.parent_death import signal_when_parent_ends

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
BLOCKED_FROM_BIRTH = (*PREEMPTION_SIGNALS, signal.SIGINT)  # in spawned workers, until shield_worker

_shielded_pid: int | None = None


def shield_worker(worker_id: int = 0) -> None:
    """In a worker process (also a DataLoader ``worker_init_fn``): never die of USR1, nor of a SIGTERM that
    does not come from the parent; ignore Ctrl-C's SIGINT. Once per process."""
    global _shielded_pid
    if _shielded_pid == os.getpid():
        return
    _shielded_pid = os.getpid()
    try:  # for every thread of the process; a pending one (blocked from birth) is dropped
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: this thread's threads at least
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    forked_by = os.getppid()  # the trainer, or a fork server
    known = multiprocessing.parent_process()
    parent = known.pid if known is not None else forked_by  # the process that started it and ends it
    _die_with(forked_by)
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)  # threads started later inherit it
    if parent != forked_by:
        _die_with_starter(parent)
    threading.Thread(target=_take_signals, args=(parent, forked_by), name="preemption-signals",
                     daemon=True).start()


def _die_with(parent: int) -> None:
    """SIGKILL from the kernel when the parent ends: a parent killed outright, or one that ends itself with
    ``os._exit`` (the loader's watchdog), would leave its workers running forever, holding memory and the
    parent's stdout/stderr, outside Slurm's cgroup clean-up."""
    if signal_when_parent_ends(signal.SIGKILL, parent) is False:  # the parent ended before the call
        os._exit(1)


def _die_with_starter(starter: int) -> None:
    """The same for the process that started this one without being its parent (a fork server's client):
    a thread waits for it to end (pidfd), then this process ends as the kernel would end it."""
    try:
        fd = os.pidfd_open(starter)
    except ProcessLookupError:  # ended already
        os._exit(1)
    except OSError:  # a kernel before 5.3: poll
        fd = None

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(starter):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="starter-death", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _take_signals(parent: int, forked_by: int) -> None:
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        # the parent ends its worker; an orphan (parent gone, reparented) ends on any SIGTERM
        if info.si_signo == signal.SIGTERM and (info.si_pid == parent or os.getppid() != forked_by):
            os._exit(128 + signal.SIGTERM)  # what SIGTERM's default would do: no cleanup, now


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker (a process of its own, once per trainer), started with USR1
    ignored, which it keeps through its exec. It ignores SIGINT and SIGTERM itself, not USR1: Slurm's
    USR1 to every process of the step killed it, and the tracker relaunched in its place printed a
    ``KeyError`` traceback for each semaphore the first one had registered (44 lines in a 2-rank job's
    log at every preemption). USR1 is blocked meanwhile: one sent to the trainer in that window stays
    pending (Linux never discards a blocked signal) and reaches its handler afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        try:
            handler = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        except ValueError:  # not the main thread: the tracker starts as it would
            multiprocessing.resource_tracker.ensure_running()
            return
        try:
            multiprocessing.resource_tracker.ensure_running()
        finally:
            signal.signal(signal.SIGUSR1, handler if handler is not None else signal.SIG_DFL)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def spawned_without_preemption_signals() -> Iterator[None]:
    """Processes started inside the block begin life with the preemption signals and SIGINT blocked.

    The block runs with them blocked in this thread, and a child inherits that mask through fork and exec
    (it must then call ``shield_worker`` to obey its parent's SIGTERM). Signals sent to this process
    meanwhile are not lost: they stay pending, or another thread takes them, and Python runs the handler
    in the main thread as usual.
    """
    # The first spawn starts multiprocessing's resource tracker, and starting it unblocks SIGTERM in this
    # thread: start it before the block.
    start_resource_tracker()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_FROM_BIRTH)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
