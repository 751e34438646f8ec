"""Lightning's W&B logger, made safe for a cluster: W&B's refusal to start is a one-line error, a server it cannot
reach makes the run log offline, and a lost service process does not end the training."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning_fabric.utilities.logger import _add_prefix
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pipeline.errors import ConfigError
from pipeline.wandb_service import close_wandb_service

log = logging.getLogger(__name__)


class ServiceSafeWandbLogger(WandbLogger):
    """Lightning's W&B logger, whose lost service process does not end the training.

    W&B talks to a service process of its own; once that is gone (Slurm's SIGTERM reaches every process
    of the job step, the OOM killer, a crash) each ``log`` raises ``ConnectionResetError``, and a log call
    in flight when a preemption's SIGTERM came ended the run before its save. ``WandbBacklog`` sets
    ``on_service_lost``: it puts a ``Recorder`` in this logger's place, which keeps the rows for the
    resumed run."""

    on_service_lost: Any = None  # (error, metrics, step) -> None, set by WandbBacklog.setup

    @property
    def experiment(self) -> Any:
        """W&B's run; its refusal to start one (a bad key, a run id or setting it does not take) is a one-line
        error with exit 2: in a traceback it ended the job as a crash, which Slurm restarted (the same
        refusal each time) and blamed on the node."""
        import wandb

        try:
            return super().experiment
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:
            raise ConfigError(f"tracking.wandb: W&B refused to start the run: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
        except wandb.errors.CommError as e:  # no server within W&B's init_timeout (a node without internet)
            if self._offline or self._experiment is not None:
                raise
            return self._offline_instead(e)

    def _offline_instead(self, error: Exception) -> Any:
        """A W&B server this process cannot reach (compute nodes without internet, a W&B outage, a proxy) ended
        the run with W&B's traceback after its ``init_timeout`` (90 s), and a Slurm job so restarted failed the
        same way each time: the run logs offline instead, under the same run id, for ``wandb sync`` later."""
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        why = "; ".join(lines[:2])[:400] or repr(error)
        close_wandb_service()  # its service still holds the run id it could not start online
        self._offline = True  # Lightning's offline: WANDB_MODE=dryrun for this process
        log.warning("W&B: cannot start the run online (%s: %s); it logs offline into %s/wandb/offline-run-*, "
                    "which `wandb sync` uploads once the server is reachable (on machines without internet, "
                    "WANDB_MODE=offline skips this wait)", type(error).__name__, why, self.save_dir)
        return super().experiment

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, Mapping):  # LightningCLI's `_instantiator` (a class path) is not a setting
            params = {k: v for k, v in params.items() if not str(k).startswith("_")}
        try:
            super().log_hyperparams(params, *args, **kwargs)
        except ConnectionError as e:
            self._lost(e, None, None)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Lightning's; offline, with W&B's own step (``_step``) set to the row's ``trainer/global_step``. Left to
        count by itself, it started at 0 again in every start of an offline run (W&B learns a resumed run's last
        step from its server only), so ``wandb sync`` uploaded a resumed run's later starts with the step numbers
        its first start had used. Rows of one step go into one W&B row. Online, W&B's count goes on from the
        server's, and a row at a lower step would be dropped (the held rows a resume logs at their step, where
        the stopped start's last row was at that step too): there W&B counts as before."""
        try:
            if step is None or not getattr(self.experiment, "offline", False):
                super().log_metrics(metrics, step)
            else:
                row = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
                self.experiment.log(dict(row, **{"trainer/global_step": step}), step=int(step))
        except ConnectionError as e:
            self._lost(e, metrics, step)

    def _lost(self, error: Exception, metrics: dict[str, Any] | None, step: int | None) -> None:
        if self.on_service_lost is None:
            raise error
        self.on_service_lost(error, metrics, step)
