"""Under Lightning's own launcher, the command ends as the rank that failed first did.

With ``trainer.devices`` > 1 and neither torchrun nor srun, rank 0 runs in the command's own process and
Lightning's ``_SubprocessScriptLauncher`` starts the node's other ranks as its children. When one of them
ended with the trainer's one-line ``error:`` (a corrupt sample under ``data.on_corrupt: fail`` in its share of
a batch, a refused setting: exit status 1 or 2), rank 0 learned of it in its next collective and printed
``pipeline.peer_gone``'s line, exit status 1: the command's status and last line were rank 0's, not the cause's
(a wrapper that retries a crash retried it, and the line under the cause said "another rank ended").

So such a child, before it exits, leaves a small record (its rank and status) in the temp directory, named
after rank 0's pid and start time; rank 0, once it knows a peer ended, waits a few seconds for its children
(Lightning's ``_ChildProcessObserver``, a thread of rank 0 that SIGKILLs rank 0 within 5 s of a child's
non-zero exit, is stopped first: it would end the wait as a crash) and ends with one line that names the
child and the child's status. A child killed by a signal (the OOM killer) writes nothing and prints
nothing: rank 0 names the signal, exit status 1 (a crash, retried). A child that ended with a traceback keeps
``pipeline.peer_gone``'s line (its traceback is above). A rank 0 that is in no collective when the observer
sees the child's end (a save, a long step, NCCL) ends the same way, from the observer's thread, after a grace
period (``keep_rank_zero_to_its_line``). Under torchrun and srun there are no children: nothing changes there."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from pipeline.parent_death import lightning_rank_zero
from pipeline.peer_gone import this_rank
from pipeline.process_start import start_ticks

WAIT_S = 5  # for the children to end, once a peer ended: they exit right after their last words
OBSERVER_GRACE_S = 10  # for rank 0 to reach its next collective, after Lightning's observer saw a child's end
_PREFIX = "resnet-pipeline-rank-ended-"  # + RANK0_PID-START-LOCAL_RANK.json


def _record_path(rank_zero: int, local_rank: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{_PREFIX}{rank_zero}-{start_ticks(rank_zero) or 0}-{local_rank}.json"


def after_exit(status: int, peer_ended: bool, env: Mapping[str, str] = os.environ) -> int:
    """In a rank that Lightning's launcher started: a status of 1 or 2 from ``pipeline.cli.main`` comes with
    its one-line ``error:`` (unless ``peer_ended``: the line of ``pipeline.peer_gone``): leave the record for
    rank 0. Returns ``status``."""
    if status not in (1, 2) or peer_ended:
        return status
    rank_zero = lightning_rank_zero(env)
    if rank_zero is None:
        return status
    local_rank = env.get("LOCAL_RANK", "?")
    try:
        path = _record_path(rank_zero, local_rank)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rank": this_rank(env), "status": status}) + "\n")
        os.replace(tmp, path)
    except OSError:  # a full temp directory: rank 0 sees the status alone
        pass
    return status


def _observer() -> threading.Thread | None:
    """Lightning's ``_ChildProcessObserver`` of this process (rank 0 of its launcher), if any."""
    for thread in threading.enumerate():
        if type(thread).__name__ == "_ChildProcessObserver" and isinstance(getattr(thread, "_child_processes", None), list):
            return thread
    return None


def children_outcome(wait_s: float = WAIT_S) -> tuple[str, int] | None:
    """In rank 0 of Lightning's launcher, whose peer ended: wait up to ``wait_s`` for its children, then
    ``(line, status)`` naming the child that ended with the trainer's ``error:`` (its status), else one that a
    signal killed (status 1). None where this process started no ranks, or none of them ended so (a traceback,
    or still running: ``pipeline.peer_gone``'s line then)."""
    observer = _observer()
    if observer is None:
        return None
    observer._run = lambda: True  # no SIGKILL of this process while it waits: it ends by itself
    if not _claim_the_end():  # the observer's thread is ending this process already, with the line
        while True:
            time.sleep(1)
    return _outcome(list(observer._child_processes), wait_s)


def _claim_the_end() -> bool:
    """Whether this caller (the main thread's peer path, or the observer's thread) is the first to end rank 0
    for a child's end: the other then leaves it to this one."""
    with _end_lock:
        global _end_claimed
        first, _end_claimed = not _end_claimed, True
        return first


_end_lock = threading.Lock()
_end_claimed = False


def keep_rank_zero_to_its_line() -> None:
    """Lightning's ``_ChildProcessObserver`` (a thread of rank 0, every 5 s) SIGKILLs rank 0 and its children as
    soon as it sees a child's non-zero exit. Rank 0 in a collective learns of the end itself (gloo) and ends with
    ``children_outcome``'s line and the child's status; rank 0 outside one for those seconds (a checkpoint save, a
    long step, NCCL, which does not notice a peer's end) was killed: exit status 137, no line, the cause's status
    lost (a refused setting retried as a crash). Its kill is replaced: it waits ``OBSERVER_GRACE_S`` for rank 0
    to reach its next collective; then it prints the line, kills the children as Lightning did, and ends rank 0
    with the child's status. A Lightning without this private class keeps its own."""
    try:
        from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:
        return
    if not callable(getattr(_ChildProcessObserver, "_terminate_all", None)):
        return

    def _terminate_all(observer) -> None:
        deadline = time.monotonic() + OBSERVER_GRACE_S
        while time.monotonic() < deadline and not _end_claimed:
            time.sleep(0.1)
        if not _claim_the_end():  # the main thread's peer path ends this process
            return
        procs = list(getattr(observer, "_child_processes", []))
        line, status = _outcome(procs, 0) or _plain_exit(procs)
        print(line, file=sys.stderr, flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)  # as Lightning does: SIGTERM does not end a rank in a collective
        sys.stdout.flush()
        os._exit(status)

    _ChildProcessObserver._terminate_all = _terminate_all


def _plain_exit(procs: list) -> tuple[str, int]:
    """The line for a child that ended with a non-zero status and no record (a traceback, above)."""
    mine = this_rank()
    for i, p in enumerate(procs):
        if p.returncode:
            return (f"rank {mine} stopped: rank {_child_rank(mine, i)} of this run (started by this process, "
                    f"Lightning's launcher) ended with exit status {p.returncode} (its traceback is above)"), 1
    return f"rank {mine} stopped: a rank this process started ended", 1


def _child_rank(mine: str, i: int) -> str:
    """The global rank of the ``i``-th child (0-based) of rank ``mine``, which starts them in order after itself."""
    return str(int(mine) + i + 1) if mine.isdigit() else f"local {i + 1}"


def _outcome(procs: list, wait_s: float) -> tuple[str, int] | None:
    """``children_outcome`` of the child processes ``procs``."""
    if not procs:
        return None
    me = os.getpid()
    deadline = time.monotonic() + wait_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    mine = this_rank()
    records, killed = [], []
    for i, p in enumerate(procs):
        rank = _child_rank(mine, i)
        path = _record_path(me, str(i + 1))
        record = _read(path)
        path.unlink(missing_ok=True)
        code = p.returncode
        if record is not None and isinstance(record.get("status"), int) and code in (None, record["status"]):
            records.append((str(record.get("rank", rank)), record["status"]))
        elif code is not None and code < 0:
            killed.append((rank, -code))
    if records:
        rank, status = records[0]
        return (f"rank {mine} stopped: rank {rank} of this run (started by this process, Lightning's launcher) "
                f"ended with the trainer's one-line error: above; exit status {status}, as rank {rank}'s"), status
    if killed:
        rank, signum = killed[0]
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return (f"rank {mine} stopped: rank {rank} of this run (started by this process, Lightning's launcher) "
                f"was killed by {name} and said nothing (the OOM killer, a kill); exit status 1, a crash"), 1
    return None


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
