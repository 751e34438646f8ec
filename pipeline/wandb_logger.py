"""Lightning's W&B logger, made safe for a cluster: W&B's refusal to start is a one-line error, and a lost
service process does not end the training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pipeline.errors import ConfigError


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
        try:
            super().log_metrics(metrics, step)
        except ConnectionError as e:
            self._lost(e, metrics, step)

    def _lost(self, error: Exception, metrics: dict[str, Any] | None, step: int | None) -> None:
        if self.on_service_lost is None:
            raise error
        self.on_service_lost(error, metrics, step)
