"""Under torchrun, a rank that ends with the trainer's one-line ``error:`` stops its agent: no restart.

torchrun's agent restarts all ranks after any non-zero exit, up to ``--max-restarts`` times; it cannot tell
a refused setting or a corrupt sample (every round would resume, fail the same way and print the same
line) from a crash. The one way to make it stop from outside is SIGTERM to the agent: it stops its ranks
and exits without a restart (``SignalException`` in ``torch.distributed.elastic.agent.server.api``'s
``run``; torchrun then exits 1 with that exception's traceback, and leaves the rendezvous open). So the
rank that printed the line sends it, once per agent: a second SIGTERM that lands while the agent stops its
ranks would interrupt that stop.

Other nodes' agents are not told by that signal: their ranks end with ``pipeline.peer_gone``'s line, and
their agents would start a new round and wait in the rendezvous for the stopped node (``join_timeout``,
600 s). ``launch torchrun`` names a file in the run directory (``ERROR_FILE_ENV``); the failed rank writes it
(its rank, exit status and round) before it exits, and a rank of the same round whose peer ended stops its
own agent too when the file is there. A peer killed outright writes nothing: a crash, restarted as before.
``launch torchrun --run`` reads the file after torchrun ends and exits with the trainer's own status.

A rank that refuses its start before the process group forms (a ``data.root`` one node lacks) is no peer in a
collective: the others waited for it in the group's start-up (gloo's 30 minutes, then a new round waiting in
the rendezvous). And a rank of another node in an NCCL collective does not notice a peer's end: it waits for it
until the collective's timeout (30 minutes). ``watch_the_error_file`` has each rank look for the error file of its
round for the whole run; a rank that finds it, and has not ended by itself, says so in one line and stops its
agent. One rank per node watches (local rank 0): stopping the agent stops every rank of the node, and 1,024 ranks
polling one file on a shared file system every few seconds is load its metadata server need not carry."""

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

from pipeline.parent_death import _is_torchrun  # also `python -m launch torchrun --run`: its argv holds "torchrun"
from pipeline.process_start import start_ticks

ERROR_FILE_ENV = "RESNET_PIPELINE_TORCHRUN_ERROR_FILE"
_PEER_WAIT_S = 3
_GUARD_PREFIX = "resnet-pipeline-torchrun-stopped-"  # + AGENT_PID-START: one SIGTERM per agent
_FORMING_POLL_S = 0.25  # how often a rank waiting for its group looks whether it formed (in memory)
_FILE_POLL_S = 1.0  # and for the error file (a file system read: local rank 0 of every node, while it waits)
_FILE_POLL_RUNNING_S = 5.0  # for the error file once the group has formed, for the rest of the run
_RUNNING_GRACE_S = 60.0  # then for this rank to end by itself, as it does in a gloo collective

_peer_ended = False


def a_peer_ended() -> None:
    """Called where a rank prints ``pipeline.peer_gone``'s line: its exit status 1 is no ``error:`` of its own.
    Stops this rank's agent only when the peer that ended wrote the error file of this round."""
    global _peer_ended
    _peer_ended = True
    path = os.environ.get(ERROR_FILE_ENV, "")
    if not path or not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    # the peer wrote it before it exited, so before this rank heard of its end; a few seconds for a shared
    # file system that shows another node's new file late. A crashed peer writes none: a restart that late
    for _ in range(_PEER_WAIT_S * 10):
        record = read_error_file(path)
        if record is not None and record.get("round") == _round(os.environ):
            _stop_agent(os.environ)
            return
        time.sleep(0.1)


def watch_the_error_file(env: Mapping[str, str] = os.environ) -> threading.Event | None:
    """Under torchrun with ``ERROR_FILE_ENV`` set, on local rank 0: a thread that reads the error file until the
    returned event is set (``python -m pipeline``'s end). A record of another rank of this round means that rank
    ended with its ``error:`` line and its agent starts no new round: this rank prints one line naming it, stops
    its own agent (and so the node's other ranks) and exits 1 (its main thread is in a call that no signal
    interrupts).

    * Before this rank's process group has formed (once a second): at once. The main thread waits in the
      group's start-up for a rank that refused its start (a ``data.root`` one node lacks); nothing was trained.
    * After (every ``_FILE_POLL_RUNNING_S``): only when this process has not ended by itself
      ``_RUNNING_GRACE_S`` later. Under gloo its next collective fails at once and ``a_peer_ended`` ends it with
      its own line; NCCL's collectives wait for the peer until their timeout (30 minutes), and a rank busy outside
      them for that long (a slow save) is left to finish first."""
    path = env.get(ERROR_FILE_ENV, "")
    if not path or not env.get("TORCHELASTIC_RUN_ID") or env.get("LOCAL_RANK", "0") != "0":
        return None  # local rank 0's stop of the agent stops this rank too
    done = threading.Event()
    this_round, me = _round(env), env.get("RANK")

    def formed() -> bool:
        dist = sys.modules.get("torch.distributed")  # imported by the main thread, never from this one
        return dist is not None and dist.is_available() and dist.is_initialized()

    def peer_record() -> dict | None:
        record = read_error_file(path)
        if record is None or record.get("round") != this_round or record.get("rank") == me:
            return None
        return record

    def stop(record: dict, how: str) -> None:
        global _peer_ended
        _peer_ended = True
        print(f"rank {me or '?'} stopped: rank {record.get('rank', '?')} of this run ended with its one-line error: "
              f"(exit {record.get('status', '?')}) {how}; that rank's line says why", file=sys.stderr, flush=True)
        _stop_agent(env)
        sys.stdout.flush()
        os._exit(1)

    def watch() -> None:
        next_read = 0.0
        while not done.wait(_FORMING_POLL_S):  # before the group forms
            if formed():
                break
            if time.monotonic() < next_read:
                continue
            next_read = time.monotonic() + _FILE_POLL_S
            if (record := peer_record()) is not None and not done.is_set() and not formed():
                stop(record, "while this rank waited for the process group to form")
        while not done.wait(_FILE_POLL_RUNNING_S):  # after: the main thread's own way out goes first
            if (record := peer_record()) is None:
                continue
            if done.wait(_RUNNING_GRACE_S) or _peer_ended:
                return
            stop(record, f"and this rank heard nothing of it for {_RUNNING_GRACE_S:.0f} s (a collective that does "
                         f"not notice a peer's end, such as NCCL's, or a step or save that long)")

    threading.Thread(target=watch, name="torchrun-error-file", daemon=True).start()
    return done


def peer_ended() -> bool:
    """Whether this rank stopped because a peer ended (``a_peer_ended`` was called)."""
    return _peer_ended


def after_exit(status: int, env: Mapping[str, str] = os.environ) -> int:
    """``python -m pipeline``'s last step: a status of 1 or 2 from ``pipeline.cli.main`` (returned, or the
    parser's exit) comes with its one-line ``error:`` (a traceback raises; a peer's end is told apart by
    ``a_peer_ended``). Under torchrun, write the error file and stop this rank's agent. Returns ``status``."""
    if status not in (1, 2) or _peer_ended or not env.get("TORCHELASTIC_RUN_ID"):
        return status
    if not _is_torchrun(os.getppid()):  # the agent is gone (follow_torchrun_agent's error) or not ours
        return status
    path = env.get(ERROR_FILE_ENV, "")
    if path:
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps({"rank": env.get("RANK", "?"), "status": status,
                                             "round": _round(env)}) + "\n")
            os.replace(tmp, path)
        except OSError:  # a full or unreachable run directory: this node's agent still stops
            pass
    _stop_agent(env)
    return status


def read_error_file(path: str | os.PathLike) -> dict | None:
    """The failed rank's record (``{"rank", "status", "round"}``), or None when there is none or it is unreadable."""
    if not str(path):
        return None
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _round(env: Mapping[str, str]) -> str:
    """The same on every rank of one restart round, on every node: the rendezvous id and the round's master
    address, whose port the agents choose anew for each round where they keep their store from the ranks
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which ``launch torchrun`` sets): a file of an earlier round or
    torchrun does not match."""
    return f"{env.get('TORCHELASTIC_RUN_ID', '')} {env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _stop_agent(env: Mapping[str, str]) -> None:
    agent = os.getppid()
    if not env.get("TORCHELASTIC_RUN_ID") or not _is_torchrun(agent):
        return
    # the agent's SIGTERM to its ranks reaches this one too, which has said what it had to say (the watcher's
    # thread cannot set a handler: its process exits at once)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # an empty file per stopped agent in the temp directory (the agent outlives its ranks; launch's removes it)
        guard = Path(tempfile.gettempdir()) / f"{_GUARD_PREFIX}{agent}-{start_ticks(agent) or 0}"
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:  # another rank of this node stopped it already
        return
    except OSError:
        pass
    try:
        os.kill(agent, signal.SIGTERM)
    except OSError:
        pass


def remove_stop_guard(agent: int) -> bool:
    """Remove the file that marked ``agent`` stopped, once it has ended (``launch torchrun --run`` is the agent:
    it calls this); a torchrun line run by hand leaves its one empty file in the temp directory. Returns whether
    there was one: whether a rank of this agent's (or its watcher of another node's error) stopped it."""
    found = False
    this = f"{_GUARD_PREFIX}{agent}-{start_ticks(agent) or 0}"  # not one of an earlier process with this pid
    for guard in Path(tempfile.gettempdir()).glob(f"{_GUARD_PREFIX}{agent}-*"):
        guard.unlink(missing_ok=True)
        found = found or guard.name == this
    return found
