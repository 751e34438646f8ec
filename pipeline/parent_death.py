"""A signal from the kernel when this process's parent ends (Linux ``PR_SET_PDEATHSIG``).

Two kinds of process here must not outlive the one that started them: loader workers (their trainer was
killed outright: they would hold memory and its stdout forever) and training ranks under torchrun (their
agent was killed outright, ``kill -9`` of the torchrun pid or the OOM killer: they would train on
unsupervised, with nobody to restart a failed rank or to stop them). The kernel sends the signal when the
thread that started the process ends; every launcher used here (multiprocessing, DALI's worker pool,
torchrun's agent) starts its children from its main thread, so in effect when the parent process ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
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
    under torchrun: srun and Lightning keep their own watch over their ranks)."""
    if not env.get("TORCHELASTIC_RUN_ID"):
        return None
    agent = os.getppid()
    # a parent of pid 1 is init after the agent died, unless the agent is pid 1 itself (a container whose
    # command is torchrun)
    gone = agent == 1 and not _is_torchrun(1)
    if gone or signal_when_parent_ends(signal.SIGTERM, agent) is False:
        return f"the torchrun agent that started this rank (pid {agent}) has ended; not starting"
    return None


def _is_torchrun(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"torchrun") or a in (b"torch.distributed.run", b"torch.distributed.launch") for a in argv)
