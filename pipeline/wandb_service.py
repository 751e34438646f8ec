"""W&B's service process, around a run's end: finish the run (after a distributed stage's last barrier, where
the other ranks would wait under the collective timeout while rank 0 uploads) and close the connection
before a Slurm requeue, whose SIGTERM reaches the service too."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_finish_pending = False  # a distributed stage ended well: rank 0 finishes its W&B run after the last barrier


def finish_after_teardown() -> None:
    """A distributed stage ended well: rank 0 finishes its W&B run after the process group's last barrier
    (``finish_pending_wandb_run``, called by ``pipeline.cli.main``)."""
    global _finish_pending
    _finish_pending = True


def finish_wandb_run(exit_code: int) -> None:
    """Finish the W&B run this process holds (rank 0's; none where W&B is off)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.run.finish(exit_code=exit_code)
    except Exception as e:  # noqa: BLE001 (the metrics are in the run already; the exit hook tries again)
        log.warning("W&B: could not finish the run (%s: %s)", type(e).__name__, e)


def close_wandb_service() -> None:
    """Before this process's Slurm job is requeued: the requeue makes Slurm SIGTERM every process of the job
    step, W&B's service too, and W&B's exit hook, which then told the dead service that this process was
    done, printed a ``ConnectionResetError`` traceback ("Exception ignored in atexit callback") into the
    job's log after a stop that had gone well (seen after a USR1 stop, its run finished and its footer
    printed). Its teardown is done here, while the service still runs (none where W&B is off). Also after a
    SIGTERM (``WandbBacklog.teardown``), when the service may be gone already: then one line says so."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        wandb.teardown()
    except Exception as e:  # noqa: BLE001 (the service is gone already: nothing left to tell it)
        log.info("W&B: its service process is gone (%s); a resume continues the same W&B run", type(e).__name__)


def wandb_service_alive() -> bool:
    """Whether this process's W&B service process still runs (False when it cannot tell: a wandb whose
    internals differ, where teardown alone is the safe way)."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton()._connection._proc._process.poll() is None
    except Exception:  # noqa: BLE001 (private API: no service, or another wandb version)
        return False


def finish_pending_wandb_run() -> None:
    """The finish a distributed stage left for after its process group's teardown (``WandbBacklog.teardown``)."""
    global _finish_pending
    if _finish_pending:
        _finish_pending = False
        finish_wandb_run(0)
