"""``python -m pipeline.config_check fit --config conf/X.yaml [ARGS]``: would ``pipeline`` accept this command line?

The checks ``python -m pipeline`` makes before it builds a trainer (the parse: unknown keys, types, nulls;
value ranges of the trainer, model, data, checkpoint and tracking settings; the model and data module built
from them), and nothing else: no run directory is touched, no trainer, process group or W&B run is made,
no sample is read. What only the trainer can refuse is found at the job's start (docs/training.md).
``launch submit train`` runs it before ``sbatch``: a typo in a config would otherwise fail the job at its
first line, after its wait in the queue. Exit status 0 (accepted) or 2 with one ``error:`` line; 1 when it
cannot check on this machine (no usable temporary directory, which the trainer's imports need: the job's nodes
may have one).

Paths need not exist here (a container may mount them elsewhere, a compute node may see another file
system): a ``data.root`` without a manifest or a ``model.init_weights`` that this machine does not have is a
``warning:`` line, and the network is then checked with ImageNet's 1000 classes; so is a run directory this
user cannot write here (another user's, a read-only mount), which the start refuses. With the manifest, the
splits the command reads are checked too (names, shard files).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: torch._dynamo's makes its cache folder in the temp dir
    import sys

    from pipeline.temp_dir import temp_dir_problem

    if (problem := temp_dir_problem()) is not None:
        sys.exit(f"config_check: cannot check on this machine: {problem}")

import logging
import sys
from pathlib import Path

from data_prep.format import MANIFEST_NAME
from pipeline.cli import (PipelineCLI, check_run_settings, check_trainer, main, refuse_branch_past_its_end,
                          resumed_in_place_of_last)
from pipeline.checkpoint_read import read_checkpoint
from pipeline.datamodule import ShardDataModule
from pipeline.deepspeed_checks import configured_deepspeed, refuse_accumulation
from pipeline.errors import ConfigError
from pipeline.file_access import unreachable_reason
from pipeline.module import ImageClassifier
from pipeline.optim import ignored_schedule_settings, schedule_against_run
from pipeline.run_dir_access import check_run_dir_writable
from pipeline.run_layout import checkpoint_dir, last_checkpoint
from pipeline.trainer_devices import devices_per_node

CLASSES_WITHOUT_MANIFEST = 1000
SEED_LOGGER = "lightning_fabric.utilities.seed"


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class DataModuleSeenFromHere(ShardDataModule):
    """The data module, whose class count (the network's output width) needs the manifest: when this machine
    cannot read it, the network's other settings are still checked, with 1000 classes."""

    @property
    def num_classes(self) -> int:
        if (why := unreachable_reason(Path(self.root) / MANIFEST_NAME)) is not None:
            _warn(f"data.root: cannot reach {self.root} here: {why}; the model is checked with "
                  f"{CLASSES_WITHOUT_MANIFEST} classes")
            return CLASSES_WITHOUT_MANIFEST
        if (Path(self.root) / MANIFEST_NAME).is_file():
            return super().num_classes
        _warn(f"data.root: {_why_no_manifest(Path(self.root))}; the model is checked with "
              f"{CLASSES_WITHOUT_MANIFEST} classes")
        return CLASSES_WITHOUT_MANIFEST


def _schedule_against_max_steps(cfg) -> list[str]:
    """What ``fit`` warns of at its start where the run's length is ``trainer.max_steps``: step milestones at or
    after the end (a schedule shortened for a test run, its milestones left at 32k and 48k), a warm-up in steps
    as long as the run. (Milestones in epochs and a run of epochs need the manifest's counts: fit says those.)"""
    total = cfg.trainer.get("max_steps")
    model = cfg.model
    if not isinstance(total, int) or total <= 0:
        return []
    return schedule_against_run(total, int(model.get("warmup_steps") or 0), list(model.get("milestone_steps") or []),
                                str(model.get("schedule")), 0, 1, model.get("warmup_factor"))


def _check_run_length(model: ImageClassifier, trainer) -> None:
    """A cosine schedule with no step or epoch limit (-1, or ``trainer.max_time`` alone), refused as fit
    refuses it once its trainer is built: the check before submitting accepted it, and the job failed at its
    start. ``max_epochs`` null is what Lightning makes of it (``_parse_loop_limits``): 1000 epochs without a
    step or time limit, else no epoch limit."""
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 and trainer.get("max_time") is None else -1
    model.check_run_length(max_steps, max_epochs)


def _why_no_manifest(root: Path) -> str:
    """Why this machine cannot read ``root``'s manifest, most likely cause first: a folder that is missing
    next to ones that are there is a typo more often than a mount only the compute nodes have."""
    if root.is_file():
        return f"{root} is a file, not data_prep's output folder (the job stops at its start)"
    if root.is_dir():
        from data_prep.source_hint import shard_command  # the warning's path only: it imports the ImageNet reader

        if hint := shard_command(root):
            return f"{root} has no {MANIFEST_NAME}: it is not data_prep's output: {hint} (the job stops at its start)"
        return (f"{root} has no {MANIFEST_NAME} (data_prep writes it last, `data_prep finalize` after array "
                f"tasks; the job stops at its start without it)")
    parent = next((p for p in root.parents if p.is_dir()), None)
    if parent is not None and parent != Path(root.anchor):
        return (f"{root} does not exist ({parent} does: a typo? the job stops at its start unless its nodes "
                f"see another file system)")
    return f"{root} does not exist on this machine (the job reads its {MANIFEST_NAME} at its start)"


def _configured_world(trainer) -> int | None:
    """num_nodes x devices when the config says how many (None for 'auto' or -1: this machine is not the
    one that runs it); GPU indices ("0,1") count, as the resume's expected_world_size counts them."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    count = devices_per_node(devices)
    return int(nodes) * count if count else None


class ConfigCheckCLI(PipelineCLI):
    """Parses, checks and builds the model and the data module; no trainer, no run."""

    # its --help and usage line named `python -m pipeline` and described training
    PROG = "python -m pipeline.config_check"
    DESCRIPTION = ("Would `python -m pipeline fit|validate|test` accept this command line? Parses it, checks the "
                   "settings' ranges and builds the model and the data module, then stops: no trainer, no run "
                   "directory, no sample read. Exit 0 (accepted, `warning:` lines for paths this machine does "
                   "not have) or 2 with one `error:` line. The settings are the subcommand's (`python -m "
                   "pipeline.config_check fit --help`).")

    def __init__(self, model_class, datamodule_class, *args, **kwargs) -> None:
        super().__init__(model_class, DataModuleSeenFromHere, *args, **kwargs)

    def _set_seed(self) -> None:
        """Seeded as the run would be (the model is built), without Lightning's "Seed set to N": the first
        line of a check read as a run's start."""
        seed_log = logging.getLogger(SEED_LOGGER)
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_log.setLevel(level)

    def before_instantiate_classes(self) -> None:
        check_trainer(self._cfg.trainer)

    def instantiate_trainer(self, **kwargs) -> None:  # type: ignore[override]
        cfg = self._cfg
        check_run_settings(cfg)
        accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
        if (self.subcommand or "fit") == "fit" and accumulate > 1 and configured_deepspeed(cfg.trainer.get("strategy")):
            refuse_accumulation(accumulate)  # fit refuses it once the trainer is built: on the compute node
        data = self.datamodule
        manifest = Path(data.root) / MANIFEST_NAME if isinstance(data, ShardDataModule) else None
        if manifest is not None and unreachable_reason(manifest) is None and manifest.is_file():  # (warned of)
            # the split names; every shard file is there
            data.check_splits(self.subcommand or "fit", validating=cfg.trainer.get("limit_val_batches") != 0)
            world = _configured_world(cfg.trainer)
            if (self.subcommand or "fit") == "fit" and world:
                data.check_one_global_batch(world, max(1, int(cfg.trainer.get("accumulate_grad_batches") or 1)))
        if (self.subcommand or "fit") == "fit":
            if isinstance(self.model, ImageClassifier):
                _check_run_length(self.model, cfg.trainer)
            for line in ignored_schedule_settings(cfg.model) + _schedule_against_max_steps(cfg):
                _warn(line)
            self._check_resumed_network(cfg, with_classes=manifest is not None and unreachable_reason(manifest) is None
                                        and manifest.is_file())
        weights = cfg.model.get("init_weights")
        if weights and not Path(weights).exists():
            _warn(f"model.init_weights: {weights} does not exist on this machine")
        try:  # the start refuses it (run_dir_access); a warning here: a compute node may mount it otherwise
            sub = self.subcommand or "fit"
            ckpt = cfg.get("ckpt_path") if sub != "fit" else None
            check_run_dir_writable(cfg.trainer.get("default_root_dir") or "runs/default", sub,
                                   bool(cfg.tracking.wandb), str(ckpt) if ckpt else None)
        except ConfigError as e:
            _warn(str(e))
        return None

    def _check_resumed_network(self, cfg, with_classes: bool) -> None:
        """The network of the checkpoint the start resumes (the run directory's last.ckpt, else --ckpt_path, else
        the best-k one a start without last.ckpt resumes) is this config's: one of another arch was refused at the
        job's start, after its wait in the queue. Its settings alone are read (memory-mapped); the class count
        only where this machine has the manifest."""
        ckpt = cfg.get("ckpt_path")
        last = last_checkpoint(cfg.trainer.get("default_root_dir") or "runs/default")
        # (a run directory or checkpoint this user cannot reach here: warned of above, or the start's to say)
        path = last if unreachable_reason(last) is None and last.exists() else \
            (Path(ckpt) if ckpt not in (None, "last") else resumed_in_place_of_last(last.parent.parent))
        if path is None or "://" in str(path) or unreachable_reason(path) is not None or not path.exists():
            return
        checkpoint = read_checkpoint(path)  # (a torn one: the start's own error, here)
        run_dir = last.parent.parent
        if not (last.exists() or path.resolve().parent == checkpoint_dir(run_dir).resolve()):
            refuse_branch_past_its_end(cfg.trainer, path, checkpoint, run_dir)  # a branch that trains nothing
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, dict) and isinstance(self.model, ImageClassifier):
            if not with_classes:
                saved = {k: v for k, v in saved.items() if k != "num_classes"}
            self.model.check_network_of(saved, checkpoint=str(path))
        # the dataset it was trained on (classes, the training split's shards): the start's load_state_dict
        # refused another data.root's only after the queue wait
        position = checkpoint.get(ShardDataModule.__qualname__)
        if with_classes and isinstance(position, dict) and isinstance(self.datamodule, ShardDataModule):
            try:
                self.datamodule._check_same_dataset(position)
            except ConfigError as e:
                raise ConfigError(f"{e}; the start would resume {path}") from None

    def _run_subcommand(self, subcommand: str) -> None:
        print(f"config_check: `python -m pipeline {subcommand}` accepts these settings", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(cli=ConfigCheckCLI))
