"""The LightningModule: a ResNet from the registry, the recipe's loss, optimizer and schedule, metrics."""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.contract import steps_in_epoch
from pipeline.errors import ConfigError, require
from pipeline.models import build
from pipeline.wording import plural
from pipeline.models.registry import computation, describe, option_names, typed_options
from pipeline.optim import epoch_to_step, lr_factor, make_sgd, param_groups, schedule_against_run

MAX_LR = 1e4  # SGD's useful rates are below 10; 1e300 overflowed float32 in the first step (a traceback)

NUM_CLASSES_HINT = ("not a setting: the number of classes comes from the shards' manifest (data.root); "
                    "shard a dataset with the classes you want")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits go to fp32 for the loss; fp64 (64-true, used by exactness tests) stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


IGNORED = -100  # the label of a masked sample for the validation metrics


def masked_top1(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy over the valid samples of a batch, as a device tensor (no mask indexing: no sync)."""
    correct = (logits.argmax(dim=1) == labels) & valid
    return correct.sum() / valid.sum().clamp(min=1)


class ImageClassifier(pl.LightningModule):
    """Classification with the paper's recipe knobs.

    Args:
        arch: registry name (``pipeline.models.available()``), e.g. resnet50, cifar_resnet20.
        num_classes: linked from the dataset's manifest by the CLI.
        arch_kwargs: extra model options (shortcut, plain, stride_in_1x1, zero_init_residual).
        lr: peak learning rate for a global batch of ``lr_reference_batch`` (scaled linearly).
        lr_reference_batch: the global batch ``lr`` is given for; the run's lr is lr x global batch / this.
        momentum: SGD's momentum.
        nesterov: SGD with Nesterov momentum.
        weight_decay: SGD's L2 weight decay; not on BN parameters and biases unless ``decay_norm_and_bias``.
        decay_norm_and_bias: weight decay on every parameter (the paper's CIFAR-10 recipe), BN and biases too.
        label_smoothing: of the cross entropy.
        warmup_epochs: warm-up length, linear up to the peak lr (step k of W at (k+1)/W of it), or with
            ``warmup_factor`` constant at that fraction of it (the paper's ResNet-110: 0.1, about 1 epoch).
        warmup_factor: a constant warm-up at this fraction of the peak lr instead of the linear ramp.
        warmup_steps: or its length in optimizer steps (the paper's ResNet-110: about 400 iterations,
            independent of the epoch length); at most one of the two.
        schedule: "cosine", "step" or "constant", per optimizer step.
        milestones: epochs at which "step" multiplies the lr by ``gamma`` (fractions allowed: the nearest
            step, a half up).
        gamma: the factor "step" multiplies the lr by at each milestone.
        milestone_steps: or the optimizer steps at which it does (the paper's CIFAR-10 recipe: 32000, 48000
            iterations); at most one of the two.
        channels_last: NHWC memory format for model and inputs (the fast layout for cuDNN on GPUs).
        compile: wrap the forward in torch.compile.
        init_weights: start a new run from these network weights: a ``pipeline export`` file, torchvision's
            weights of the same network, or any checkpoint of this pipeline (file or ZeRO directory); the
            optimizer, schedule, step and loader start fresh. ``fit`` loads them at its first start only
            (a resume takes everything from its checkpoint).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 1000,
        arch_kwargs: dict | None = None,
        lr: float = 0.1,
        lr_reference_batch: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        decay_norm_and_bias: bool = False,
        label_smoothing: float = 0.0,
        warmup_epochs: float = 0.0,
        warmup_factor: float | None = None,
        warmup_steps: int | None = None,
        schedule: str = "cosine",
        milestones: list[float] | None = None,
        milestone_steps: list[int] | None = None,
        gamma: float = 0.1,
        channels_last: bool = True,
        compile: bool = False,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        if arch_kwargs:  # before the hyper-parameters are kept: the checkpoint records what was built
            arch_kwargs = typed_options(arch, arch_kwargs)
        self.save_hyperparameters()
        require(schedule in ("cosine", "step", "constant"), "model.schedule", "'cosine', 'step' or 'constant'",
                schedule)
        require(warmup_factor is None or 0 < warmup_factor <= 1, "model.warmup_factor",
                "in (0, 1] or null (linear warm-up)", warmup_factor)
        require(0 <= lr <= MAX_LR, "model.lr", f"in [0, {MAX_LR:g}] (per model.lr_reference_batch images)", lr)
        require(lr_reference_batch >= 1, "model.lr_reference_batch", ">= 1", lr_reference_batch)
        require(0 <= momentum < 1, "model.momentum", "in [0, 1)", momentum)
        require(not nesterov or momentum > 0, "model.momentum", "> 0 with model.nesterov true", momentum)
        require(weight_decay >= 0, "model.weight_decay", ">= 0", weight_decay)
        require(0 <= label_smoothing < 1, "model.label_smoothing", "in [0, 1)", label_smoothing)
        require(warmup_epochs >= 0, "model.warmup_epochs", ">= 0", warmup_epochs)
        require(warmup_steps is None or warmup_steps >= 0, "model.warmup_steps", "optimizer steps >= 0 or null",
                warmup_steps)
        require(not (warmup_steps and warmup_epochs), "model.warmup_steps",
                "null or 0 when model.warmup_epochs is set (epochs or steps, not both)", warmup_steps)
        require(gamma > 0, "model.gamma", "> 0", gamma)
        require(all(m >= 0 for m in milestones or []), "model.milestones", "epochs >= 0", milestones)
        require(all(m >= 0 for m in milestone_steps or []), "model.milestone_steps", "optimizer steps >= 0",
                milestone_steps)
        require(not (milestones and milestone_steps), "model.milestone_steps",
                "null or [] when model.milestones is set (epochs or steps, not both)", milestone_steps)
        if "num_classes" in (arch_kwargs or {}):
            raise ConfigError(f"model.arch_kwargs.num_classes: {NUM_CLASSES_HINT}")
        unknown = sorted(set(arch_kwargs or {}) - set(names := option_names(arch)))
        if names and unknown:  # (build's own list of what it accepts has num_classes, refused just above)
            raise ConfigError(f"model.arch_kwargs: model {arch!r} does not take {unknown}; its options are {names}")
        try:
            self.model = build(arch, num_classes=num_classes, **(arch_kwargs or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.arch / model.arch_kwargs: {e}") from None
        self._channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # dynamic=False: the training batch never changes size; by default the first other size (the sanity
        # check's or validation's batch) recompiled the network with a symbolic batch dimension, training too
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        # masked samples (padding, skipped corrupt ones) are given the label IGNORED rather than indexed out:
        # boolean-mask indexing waits for the GPU, and a batch with no valid sample (all padding, or all
        # corrupt) would be empty, which torchmetrics' top-k refuses. Labels are range-checked where they are
        # read (ShardSet.read_label), so the metric's own argument checks (more host syncs) are off.
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=IGNORED,
                                           validate_args=False)
        # with 5 classes or fewer every sample is in the top 5: a metric that is always 1 is not logged
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro", ignore_index=IGNORED,
                                           validate_args=False) if num_classes > 5 else None

    def __setattr__(self, name, value):
        if name == "_forward":  # an alias of self.model (maybe compiled), not a second submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def load_init_weights(self, path: str) -> str | None:
        """``init_weights``: the network's tensors from ``path``; a file of another network or class count is
        a one-line error naming the file and the first differences. Names and shapes cannot tell option A
        from a plain net, nor v1 from v1.5: a training checkpoint's record of its network is compared too
        (another one is an error); for a file of tensors alone, a note saying so is returned (for the
        variants whose twin torchvision's weights are not)."""
        from pipeline.export import state_dict_from_checkpoint

        try:
            weights = state_dict_from_checkpoint(path)
        except ConfigError as e:
            raise ConfigError(f"model.init_weights: {e}") from None
        own = self.model.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in weights and weights[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            what = _first_keys(missing=missing, unexpected=unexpected, other_shapes=shapes)
            raise ConfigError(f"model.init_weights: {path} does not fit model.arch {self.hparams.arch!r} with "
                              f"{self.hparams.num_classes} classes ({what})")
        mine = computation(self.hparams.arch, **(self.hparams.arch_kwargs or {}))
        saved = _saved_network(path)
        note = None
        if saved is not None:
            theirs = computation(saved["arch"], **(saved.get("arch_kwargs") or {}))
            if theirs != mine:
                raise ConfigError(f"model.init_weights: {path} holds the weights of {describe(theirs)}, this run "
                                  f"builds {describe(mine)}: the same tensors, another computation; set "
                                  f"model.arch / model.arch_kwargs as the checkpoint's")
        elif mine["plain"] or mine["shortcut"] == "A" or mine["stride_in_1x1"]:
            note = (f"note: {path} holds tensors alone, which fit {describe(mine)} by names and shapes; a plain net "
                    f"and option A, or v1 and v1.5, have the same ones (torchvision's weights are option B, v1.5)")
        self.model.load_state_dict(weights)  # copies into the existing tensors: their memory format stays
        return note

    # ---- data on the device -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = getattr(self.trainer, "strategy", None)
        if self.hparams.channels_last and "deepspeed" in type(strategy).__name__.lower():
            # DeepSpeed broadcasts and flattens parameters as dense NCHW tensors; channels_last weights
            # fail there ("stride(-1) must be 1"), so ZeRO runs keep the default layout.
            self.model.to(memory_format=torch.contiguous_format)
            self._channels_last = False
        dm = getattr(self.trainer, "datamodule", None)
        aug = getattr(dm, "augment", None)
        if aug is not None:
            self.mean.copy_(torch.tensor(aug.mean).view(1, 3, 1, 1) * 255)
            self.std.copy_(torch.tensor(aug.std).view(1, 3, 1, 1) * 255)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batches (cpu backend) are normalised here, on the device; DALI's come normalised, in float16,
        which autocast takes as it is and anything else (``trainer.precision 32-true``) gets in its own dtype."""
        if images.dtype == torch.uint8:
            images = (images.to(self.mean.dtype) - self.mean) / self.std  # fp32, or fp64 under 64-true
        elif images.dtype != self.mean.dtype and not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.mean.dtype)
        fmt = torch.channels_last if self._channels_last else torch.contiguous_format
        return images.contiguous(memory_format=fmt)  # mixed layouts fall onto slow convolution paths

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(self.normalize(images))

    # ---- steps --------------------------------------------------------------------------------------
    def _masked_loss(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(
            _at_least_fp32(logits), labels, reduction="none", label_smoothing=self.hparams.label_smoothing
        )
        return (losses * valid).sum() / valid.sum().clamp(min=1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Free of device-to-host synchronisation, so the host queues the next step while the GPU runs this
        one: no boolean-mask indexing (its output size is data-dependent), no metric object validating its
        inputs, no Python number logged (each would be a blocking host-to-device copy), nothing logged with
        ``prog_bar`` (Lightning reads those at every step). The logged tensors are read on the host only at
        logging steps and at the progress bar's refreshes (pipeline/progress.py)."""
        images, labels, valid = batch
        logits = self(images)
        loss = self._masked_loss(logits, labels, valid)
        top1 = masked_top1(logits.detach(), labels, valid)
        self.log("train/loss", loss)  # not prog_bar: see pipeline/progress.py
        self.log("train/top1", top1, on_step=True, on_epoch=False)
        # corrupt samples skipped (data.on_corrupt: skip) come masked; summed on the device, over all ranks
        # at the epoch's end only: whatever the backend and wherever its workers counted them
        self.log("train/corrupt_skipped", (~valid).sum().float(), on_step=False, on_epoch=True, reduce_fx="sum",
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._evaluation_start()

    def on_test_epoch_start(self) -> None:
        self._evaluation_start()

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    def _evaluation_step(self, batch) -> None:
        images, labels, valid = batch
        logits = self(images)
        losses = F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")
        self._val_loss_sum += (losses * valid).sum()
        self._val_count += valid.sum()
        target = torch.where(valid, labels, IGNORED)
        self.val_top1.update(logits, target)
        if self.val_top5 is not None:
            self.val_top5.update(logits, target)

    def _evaluation_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_count = torch.zeros((), device=self.device)

    def _evaluation_end(self, prefix: str) -> None:
        """``val/...`` (validation) or ``test/...`` (``python -m pipeline test``): the same exact metrics."""
        loss_sum, count = self._val_loss_sum, self._val_count
        if self.trainer.world_size > 1:  # exact mean over all samples of all ranks
            loss_sum = self.trainer.strategy.reduce(loss_sum, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.log(f"{prefix}/loss", loss_sum / count.clamp(min=1), sync_dist=False, rank_zero_only=False)
        # the samples the metrics cover: the split's size, less skipped corrupt samples (data.on_corrupt: skip)
        # and whatever trainer.limit_val_batches leaves out
        self.log(f"{prefix}/samples", count.float(), sync_dist=False, rank_zero_only=False)
        self.log(f"{prefix}/top1", self.val_top1, prog_bar=True)
        if self.val_top5 is not None:
            self.log(f"{prefix}/top5", self.val_top5)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def check_network_of(self, saved: dict, checkpoint: str | None = None, fix: str | None = None) -> None:
        """A checkpoint's hyper-parameters (``saved``) name this network: a one-line error naming the
        setting (and the ``checkpoint`` file, with the way out ``fix``) otherwise. The CLI calls it before the
        loggers start, ``on_load_checkpoint`` again. The class count is no setting of the user's (the CLI takes
        it from data.root's manifest): its error names the dataset (it named model.num_classes and advised "a new
        run directory", which a --ckpt_path into a new one already was)."""
        for key in ("arch", "num_classes", "arch_kwargs"):
            if key == "arch_kwargs" and key in saved and self._same_computation(saved):
                continue  # written another way: {} and {shortcut: A} are one ResNet-20, zero_init one start
            if key in saved and (saved[key] or None) != (self.hparams.get(key) or None):
                if key == "num_classes":
                    raise ConfigError(
                        f"the checkpoint{f' {checkpoint}' if checkpoint else ''} was trained on {saved[key]!r} "
                        f"classes, this run's dataset has {self.hparams.get(key)!r} (model.num_classes comes from "
                        f"data.root's manifest); {fix or 'point data.root at the dataset it was trained on'}")
                fix = fix or "use the original setting or a new run directory"
                raise ConfigError(
                    f"the checkpoint{f' {checkpoint}' if checkpoint else ''} was trained with model.{key}="
                    f"{saved[key]!r}, this run has model.{key}={self.hparams.get(key)!r}; {fix}"
                )

    def _same_computation(self, saved: dict) -> bool:
        """Whether the checkpoint's ``arch_kwargs`` build the network this run's do (defaults filled in;
        options that only initialize the weights, such as ``zero_init_residual``, left out). The saved ones
        are taken as they were built: a checkpoint of before the words were read (``plain: 'false'``) is of
        a plain net, as Python took the word."""
        arch = self.hparams.arch
        if saved.get("arch", arch) != arch:
            return False
        try:
            theirs = computation(arch, **(saved.get("arch_kwargs") or {}))
            return theirs == computation(arch, **(self.hparams.get("arch_kwargs") or {}))
        except (ValueError, TypeError, KeyError):  # options of another version: compared as written
            return False

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with a clear message, a checkpoint of another network (the state-dict error would
        list hundreds of keys)."""
        self.check_network_of(checkpoint.get("hyper_parameters") or {})
        tensors = checkpoint.get("state_dict")
        if isinstance(tensors, dict) and tensors:  # (a DeepSpeed checkpoint loads its tensors itself)
            own = self.state_dict()
            missing = [k for k in own if k not in tensors]
            unexpected = [k for k in tensors if k not in own]
            if missing or unexpected:  # torch's "Missing key(s)" came as a traceback listing every key
                what = _first_keys(missing=missing, unexpected=unexpected)
                raise ConfigError(f"the checkpoint's network does not fit model.arch {self.hparams.arch!r} ({what}); "
                                  f"it is damaged or of another network")

    def on_fit_start(self) -> None:
        """An integer ``trainer.val_check_interval`` beyond an epoch's batches is refused here, naming the
        epoch's length (Lightning refused it later, as a traceback)."""
        vci, dm = self.trainer.val_check_interval, getattr(self.trainer, "datamodule", None)
        if not isinstance(vci, int) or self.trainer.check_val_every_n_epoch is None or \
                getattr(dm, "train_shards", None) is None:
            return
        batches = self.batches_per_epoch()
        require(vci <= batches, "trainer.val_check_interval", f"at most the {plural(batches, 'batch', 'batches')} of "
                f"an epoch here (or a fraction in (0, 1]; with trainer.check_val_every_n_epoch null it may count across epochs)", vci)

    def on_train_start(self) -> None:
        """A resume runs with this command's optimizer settings, as docs/training.md says a resume may change
        ``model.lr``: Lightning restores the checkpoint's optimizer and scheduler state over the ones just
        configured, which brought back the saved peak lr (the scheduler's ``base_lrs``), momentum, nesterov
        and weight decay while the checkpoint's hyper-parameters showed the new ones. Unchanged settings
        give the same numbers (an exact resume stays exact)."""
        if self.trainer.ckpt_path is None or not self.trainer.optimizers or not self.trainer.lr_scheduler_configs:
            return
        hp, peak = self.hparams, self.peak_lr()
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        configured = param_groups(self.model, hp.weight_decay, hp.get("decay_norm_and_bias", False))
        for group, fresh in zip(optimizer.param_groups, configured):
            group.update(momentum=hp.momentum, nesterov=hp.nesterov, initial_lr=peak, weight_decay=fresh["weight_decay"])
        scheduler.base_lrs = [peak] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = peak * factor(scheduler.last_epoch)  # what LambdaLR computes at its next step

    # ---- optimisation -------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        return dm.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def batches_per_epoch(self) -> int:
        """Batches (micro-batches under accumulation) Lightning runs in a training epoch: the contract's whole
        optimizer steps, cut by ``trainer.limit_train_batches``. The ``val_check_interval`` check once left
        the accumulation out, and let pass an interval beyond the epoch (Lightning's traceback)."""
        dm = self.trainer.datamodule
        batches = steps_in_epoch(len(dm.train_shards), self.trainer.world_size, dm.batch_size,
                                 accumulate=self.trainer.accumulate_grad_batches)
        limit = self.trainer.limit_train_batches  # a debugging cut: Lightning ends the epoch there
        if isinstance(limit, int) and limit >= 0:
            batches = min(batches, limit)
        elif isinstance(limit, float) and limit < 1.0:
            batches = int(batches * limit)  # Lightning's own rounding (_parse_num_batches)
        return batches

    def steps_per_epoch(self) -> int:
        # Lightning also steps on an epoch's last batch when the accumulation is not complete there (an epoch
        # cut by limit_train_batches: the contract's epochs are whole optimizer batches)
        return max(1, -(-self.batches_per_epoch() // self.trainer.accumulate_grad_batches))

    def planned_steps(self) -> int | None:
        """Optimizer steps the run will take: ``trainer.max_steps`` or ``max_epochs`` epochs, whichever ends
        it first (as the trainer stops). The schedule spans them; every checkpoint records them. None when
        the run has neither limit (-1, or ``trainer.max_time`` alone: Lightning then sets no epoch limit):
        its length is not known (one epoch's steps were said here, and the start warned that milestones
        after it were never reached while the run went on past them)."""
        max_steps, max_epochs = self.trainer.max_steps, self.trainer.max_epochs
        by_epochs = self.steps_per_epoch() * max_epochs if max_epochs and max_epochs > 0 else None
        limits = [n for n in (max_steps, by_epochs) if n and n > 0]
        return min(limits) if limits else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """How far the run has to go, for ``launch status``: the planned optimizer steps (null: the run has
        no step or epoch limit) and the images in one (the global batch)."""
        checkpoint["progress"] = {"planned_steps": self.planned_steps(), "global_batch": self.global_batch_size()}

    def peak_lr(self) -> float:
        """``model.lr`` scaled to the global batch (``lr_reference_batch``)."""
        return self.hparams.lr * self.global_batch_size() / self.hparams.lr_reference_batch

    def check_run_length(self, max_steps: int | None, max_epochs: int | None) -> None:
        """A cosine schedule needs the run's length. The CLI calls it once the trainer is built, before the
        loggers start; ``configure_optimizers`` again."""
        if self.hparams.schedule == "cosine" and not any(n and n > 0 for n in (max_steps, max_epochs)):
            raise ConfigError("model.schedule: cosine decays over the run's length, and this run has none (no positive "
                              "trainer.max_steps or trainer.max_epochs; trainer.max_time does not say how many steps): "
                              "set one, or use schedule constant or step")

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        self.check_run_length(self.trainer.max_steps, self.trainer.max_epochs)
        peak = self.peak_lr()
        optimizer = make_sgd(self.model, peak, hp.momentum, hp.nesterov, hp.weight_decay,
                             hp.get("decay_norm_and_bias", False))
        spe = self.steps_per_epoch()
        total = self.planned_steps()  # None (no step or epoch limit): step and constant need none, cosine is refused
        warmup = int(hp.get("warmup_steps") or 0) or epoch_to_step(hp.warmup_epochs, spe)
        milestones = [epoch_to_step(m, spe) for m in (hp.milestones or [])] + list(hp.get("milestone_steps") or [])
        if getattr(self.trainer, "is_global_zero", True):
            for line in schedule_against_run(total, warmup, milestones, hp.schedule, hp.warmup_epochs, spe,
                                             hp.get("warmup_factor")):
                print(f"warning: {line}", file=sys.stderr, flush=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, hp.schedule, milestones, hp.gamma,
                                             hp.get("warmup_factor"))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _saved_network(path: str) -> dict | None:
    """The ``arch`` and ``arch_kwargs`` a training checkpoint (file or DeepSpeed directory) was made with;
    None for a file of tensors alone (an export, torchvision's weights)."""
    from pipeline.checkpoint_read import read_checkpoint

    try:
        saved = read_checkpoint(path).get("hyper_parameters")
    except (ConfigError, AttributeError):  # a legacy (non-zip) file, a list: not a training checkpoint
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("arch"), str):
        return None
    return saved


def _first_keys(**groups: list[str]) -> str:
    """``missing: a, b, c ...; unexpected: d``: the first three keys of each non-empty group (a state-dict
    error would list hundreds)."""
    names = {"other_shapes": "other shapes (file vs model)"}
    return "; ".join(f"{names.get(group, group)}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                     for group, keys in groups.items() if keys)
