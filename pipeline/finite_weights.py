"""Stop a diverged run before it saves non-finite weights over the last good checkpoint.

An lr too high for the batch, an fp16 overflow, a bad sample: once a weight is NaN or inf every further
step is wasted, and the next periodic save overwrites ``last.ckpt`` (the point a requeued or resubmitted
job resumes from) with a state nothing can recover. So the weights and float buffers (BatchNorm's
running statistics) are checked every ``every_n_steps`` optimizer steps and before every checkpoint
is written; the ranks agree on the answer (a ZeRO-3 shard may go bad on one rank only), and a bad
answer ends the run with ``TrainingDiverged`` before anything is saved.

The loss is only watched, on the device and without a host sync: a non-finite loss with finite
weights is what fp16's loss scaler skips on purpose; the first such step on a rank goes into the message.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from pipeline.errors import TrainingDiverged


class FiniteWeights(Callback):
    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._first_bad_loss: torch.Tensor | None = None  # on the device; -1 while every loss was finite
        self._checked_step = -1
        self._batch_step = 0  # the step a batch's loss belongs to: the logs' `step` of its row

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # at the batch's end it counts the step just taken too

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            if self._first_bad_loss is None or self._first_bad_loss.device != loss.device:
                self._first_bad_loss = torch.full((), -1, dtype=torch.long, device=loss.device)
            bad = ~torch.isfinite(loss.detach()) & (self._first_bad_loss < 0)
            self._first_bad_loss = torch.where(bad, self._batch_step, self._first_bad_loss)
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._checked_step:  # once per optimizer step
            self._checked_step = step
            self._check(trainer, pl_module, f"after step {step}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer, pl_module, f"at step {trainer.global_step}, before saving a checkpoint")

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        tensors = [t.detach() for t in (*pl_module.parameters(), *pl_module.buffers())
                   if t.is_floating_point() and t.numel()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        bad = trainer.strategy.reduce_boolean_decision(not bool(finite), all=False)
        if not bad:
            return
        names = [n for n, t in (*pl_module.named_parameters(), *pl_module.named_buffers())
                 if t.is_floating_point() and t.numel() and not torch.isfinite(t.detach()).all()]
        first = int(self._first_bad_loss) if self._first_bad_loss is not None else -1
        loss = (f"the loss was first non-finite on this rank at step {first}" if first >= 0
                else "the loss stayed finite on this rank")
        where = f"non-finite: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" if names \
            else "non-finite on another rank"
        raise TrainingDiverged(
            f"training diverged {when}: weights {where}; {loss}. Nothing was saved after the last finite "
            f"state (checkpoints/last.ckpt is left as it was). Lower model.lr or raise "
            f"model.warmup_epochs (or model.warmup_steps); with precision 16-mixed try bf16-mixed")
