"""A rank whose peer has ended: one line, not a traceback.

When one rank of a multi-process run stops (its own one-line ``error:``, say a corrupt sample under
``data.on_corrupt: fail`` or a full disk at a checkpoint, a traceback, a kill), the others learn of it in
their next collective: gloo raises ``RuntimeError: [.../gloo/transport/tcp/pair.cc:561] Connection closed by
peer [ADDR]:PORT. This is typically caused by a remote worker crashing. ...`` (or ``Connection reset by
peer``). Each of them printed it as a traceback of some 100 lines through Lightning, DDP and gloo, below the
real cause, so the end of the job's log (what ``tail`` shows, what a reader sees first) was a gloo error
that says nothing of the cause. Such a rank prints this one line instead, exit status 1. NCCL raises
``DistBackendError: NCCL error in: ...ProcessGroupNCCL.cpp:N, remote process exited or there was a network
error, NCCL version V`` / ``ncclRemoteError: ...`` there (as users report it), which cannot tell a peer's end from
a network failure: its line says both.

The line is no ``error:`` line on purpose: the Slurm script does not retry a trainer's ``error:``, and a
peer that was killed (the OOM killer, a node lost) is a crash, to be retried. Only these words are matched: gloo's
(CPU runs, DeepSpeed's CPU strategies, tested) and NCCL's remote error (its text only: no GPUs here); any other
NCCL error, and a process that NCCL's watchdog aborts (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), keep their own.
A rank in an NCCL collective may not learn of a peer's end at all until the collective's timeout: under
``launch torchrun`` the error file ends it (``pipeline.torchrun_stop``), under srun ``--kill-on-bad-exit``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_GONE = ("Connection closed by peer", "Connection reset by peer")
_ADDRESS = re.compile(r"by peer (\[[^\]]*\]:\d+)")


_NCCL_GONE = "remote process exited or there was a network error"


def peer_gone(error: BaseException) -> bool:
    """Whether ``error`` is gloo's report that the other end of a collective went away, or NCCL's that it went
    away or the network failed."""
    text = str(error)
    if not isinstance(error, RuntimeError):  # DistBackendError is one
        return False
    return ("gloo" in text and any(m in text for m in _GONE)) or ("NCCL" in text and _NCCL_GONE in text)


def peer_gone_message(error: BaseException) -> str:
    """``rank R stopped: another rank of this run ended (gloo: Connection closed by peer [ADDR]:PORT); ...``."""
    text = str(error)
    if _NCCL_GONE in text and "NCCL" in text:
        return (f"rank {this_rank()} stopped: another rank of this run ended, or the network between the ranks "
                f"failed, during a collective (NCCL: {_NCCL_GONE}); that rank's own message (an error: line or a "
                f"traceback), if it ended, says why")
    what = next(m for m in _GONE if m in text)
    address = _ADDRESS.search(text)
    where = f" {address.group(1)}" if address else ""
    return (f"rank {this_rank()} stopped: another rank of this run ended during a collective (gloo: {what}{where}); "
            f"that rank's own message (an error: line or a traceback) says why")


def this_rank(env: Mapping[str, str] = os.environ) -> str:
    """This process's global rank: the process group's, else ``RANK`` (else ``LOCAL_RANK``: a child of
    Lightning's launcher before the group forms), else ``?``."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except (ImportError, RuntimeError, ValueError):
        pass
    return env.get("RANK", env.get("LOCAL_RANK", "?"))
