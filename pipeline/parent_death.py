"""A signal from the kernel when this process's parent ends (Linux ``PR_SET_PDEATHSIG``).

Two kinds of process here must not outlive the one that started them: loader workers (their trainer was
killed outright: they would hold memory and its stdout forever) and training ranks under torchrun (their
agent was killed outright, ``kill -9`` of the torchrun pid or the OOM killer: they would train on
unsupervised, with nobody to restart a failed rank or to stop them) or under Lightning's own launcher
(rank 0 starts the others and was killed: they waited for it forever). The kernel sends the signal when the
thread that started the process ends; every launcher used here (multiprocessing, DALI's worker pool,
torchrun's agent) starts its children from its main thread, so in effect when the parent process ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

_PR_SET_PDEATHSIG = 1


def signal_when_parent_ends(signum: int, parent: int) -> bool | None:
    """Ask the kernel for ``signum`` when ``parent`` ends; ``parent`` is this process's parent, read by the
    caller *before* the call. False when it has ended already (the request came too late: no signal
    will come), None where the kernel cannot be asked (not Linux), else True."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return os.getppid() == parent


def follow_torchrun_agent(env: Mapping[str, str] = os.environ) -> str | None:
    """In a rank started by torchrun: SIGTERM when the agent dies, so the rank saves ``last.ckpt`` and stops
    as on a preemption (``pipeline.preemption``; ranks on other nodes learn of it from the vote and stop
    at the same step). Returns an error line when the agent is already gone, else None (also when not
    under torchrun: srun keeps its own watch over its tasks; for Lightning's see below)."""
    if not env.get("TORCHELASTIC_RUN_ID"):
        return None
    agent = os.getppid()
    # a parent of pid 1 is init after the agent died, unless the agent is pid 1 itself (a container whose
    # command is torchrun)
    gone = agent == 1 and not _is_torchrun(1)
    if gone or signal_when_parent_ends(signal.SIGTERM, agent) is False:
        return f"the torchrun agent that started this rank (pid {agent}) has ended; not starting"
    return None


def follow_lightning_rank_zero(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> str | None:
    """In a rank that Lightning's launcher started (``trainer.devices`` > 1 with neither torchrun nor srun:
    rank 0 runs the same command again for each other local rank, with ``LOCAL_RANK`` set): SIGTERM when
    rank 0 ends. Lightning's own watch over these ranks is a thread of rank 0 and ends with it; a rank left
    behind during start-up waited for rank 0's rendezvous for 30 minutes and more, and could join the next
    run started on the same port. Returns an error line when rank 0 is already gone, else None."""
    argv = sys.argv if argv is None else argv
    if env.get("TORCHELASTIC_RUN_ID") or env.get("LOCAL_RANK", "0") in ("", "0") or len(argv) < 2:
        return None
    parent = os.getppid()
    if lightning_rank_zero(env, argv) == parent:
        if signal_when_parent_ends(signal.SIGTERM, parent) is False:
            return f"rank 0 of this run (pid {parent}), which started this rank, has ended; not starting"
        return None
    if parent == 1 and not env.get("SLURM_STEP_ID"):  # adopted by init: rank 0 ended before we could ask
        return "rank 0 of this run, which started this rank, has ended; not starting"
    return None  # another launcher that sets LOCAL_RANK (srun with an exported LOCAL_RANK, mpirun): its watch


def lightning_rank_zero(env: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> int | None:
    """The pid of rank 0 when Lightning's launcher started this process as one of its other local ranks (its
    parent runs the same arguments: Lightning re-runs ``sys.argv[1:]``), else None."""
    argv = sys.argv if argv is None else argv
    if env.get("TORCHELASTIC_RUN_ID") or env.get("LOCAL_RANK", "0") in ("", "0") or len(argv) < 2:
        return None
    parent = os.getppid()
    args = [a.encode() for a in argv[1:]]
    return parent if _cmdline(parent)[-len(args):] == args else None


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return []


def _is_torchrun(pid: int) -> bool:
    argv = _cmdline(pid)
    return any(a.endswith(b"torchrun") or a in (b"torch.distributed.run", b"torch.distributed.launch") for a in argv)
