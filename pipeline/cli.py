"""``python -m pipeline fit|validate|test --config conf/X.yaml``: LightningCLI with the project's run layout.

A run directory (``trainer.default_root_dir``) holds everything of one training run: ``checkpoints/``
(``last.ckpt`` and the best k by val top-1), the W&B run id and files, CSV/TensorBoard logs and the
resolved config. ``fit`` resumes from ``checkpoints/last.ckpt`` when the run directory has one (or with
``--ckpt_path last``, which starts fresh when there is none yet).

Around Lightning's trainer the CLI adds: a lock on the run directory (one ``fit`` at a time), atomic
checkpoint files, preemption handling (USR1/TERM -> save, requeue, stop; Lightning's own SLURM requeue
off), RNG states and the W&B run id in checkpoints, a check at start that all ranks read the same data with the
same settings, code and software, a weight parity check across ranks, speed
telemetry, and -- on a resume with another world size -- a per-rank batch / accumulation that keeps the
global batch.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import Namespace
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint, ModelSummary, ProgressBar, RichModelSummary
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.accelerators import AcceleratorRegistry
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DeepSpeedStrategy, StrategyRegistry

import pipeline.strategies  # noqa: F401  (registers the deepspeed_stage_*_cpu strategies)
from pipeline.strategies import AtomicDeepSpeedStrategy, CPUDeepSpeedStrategy, check_extensions_dir
from data_prep.format import ManifestError
from pipeline.arg_parser import PipelineArgumentParser
from pipeline.best_checkpoints import BestCheckpoints
from pipeline.branch_origin import KEY as BRANCH_KEY
from pipeline.branch_origin import BranchOrigin, resume_point
from pipeline.branch_record import origin_name, recorded_origin
from pipeline.checkpoint_io import AtomicCheckpointIO, recover_directories, remove_best_after
from pipeline.checkpoint_read import checkpoint_file, read_checkpoint, verify_checkpoint
from pipeline.config_history import changed_settings, keep_earlier_config, recorded_setting
from pipeline.data.shards import CorruptSampleError
from pipeline.data.open_files import open_files_advice, out_of_file_descriptors, raise_open_files_limit
from pipeline.data.shared_memory import SharedMemoryError, semaphore_error
from pipeline.data.shared_memory import advice as shm_advice
from pipeline.datamodule import ShardDataModule
from pipeline.disk_full import disk_full_message
from pipeline.deepspeed_checks import (check_accumulation, check_checkpoint_kind, check_zero_shards,
                                       check_zero_world_size, configured_deepspeed)
from pipeline.errors import (CheckpointWriteError, ConfigError, DiskFullError, RunComplete, TrainingDiverged,
                             require)
from pipeline.evaluation_way_out import saving_run_config
from pipeline.finite_weights import FiniteWeights
from pipeline.last_checkpoint import LastCheckpoint
from pipeline.lightning_lines import drop_lightning_lines, quiet_other_ranks
from pipeline.model_summary import FlopsModelSummary, FlopsRichModelSummary
from pipeline.moved_run_checkpoints import MovedRunCheckpoints
from pipeline.models.registry import typed_options
from pipeline.module import ImageClassifier
from pipeline.optim import ignored_schedule_settings
from pipeline.parent_death import follow_lightning_rank_zero, follow_torchrun_agent
from pipeline.parity import WeightParity
from pipeline.parsed_config import check_parsed
from pipeline.launcher_ranks import children_outcome, keep_rank_zero_to_its_line
from pipeline.peer_gone import peer_gone, peer_gone_message
from pipeline.torchrun_stop import a_peer_ended
from pipeline import preemption, provenance
from pipeline.preemption import Preemption
from pipeline.rank_agreement import RankAgreement, flat_settings
from pipeline.wandb_backlog import WandbBacklog, held_rows, log_rows_of_complete_run, logged_already
from pipeline.wandb_service import finish_pending_wandb_run
from pipeline.progress import console_progress
from pipeline.provenance_callback import ProvenanceRecord
from pipeline.resume_geometry import Geometry, LoopPosition, adapt, expected_world_size
from pipeline.rng_state import RNGState
from pipeline.time_limit import time_limit_reached
from pipeline.run_dir_access import check_run_dir_is_no_dataset, check_run_dir_reachable, check_run_dir_writable
from pipeline.run_dir_still_ours import RunDirStillOurs
from pipeline.run_layout import (BEST_FILENAME, BEST_GLOB, CHECKPOINTS_DIR, CONFIG_FILE, CSV_DIR,
                                 LAST_CHECKPOINT, BRANCH_FILE, RUN_ID_FILE, TENSORBOARD_DIR, WANDB_DIR, best_top1,
                                 checkpoint_dir, last_checkpoint)
from pipeline.run_lock import RunDirLock, is_global_rank_zero
from pipeline.sample_grid import SampleGrid
from pipeline.sync_batchnorm import GlooSyncBatchNormPlugin
from pipeline.temp_dir import check_temp_dir
from pipeline.throughput import Throughput
from pipeline.torchelastic import restart_warning
from pipeline.tracking import (RUN_ID_KEY, CheckpointStep, RunIdInCheckpoint, StepLearningRateMonitor,
                               TrackingConfig, check_wandb_settings, make_eval_loggers, make_loggers, rewind_metrics,
                               run_id, set_aside_metrics, wandb_disabled)
from pipeline.trainer_devices import devices_as_int
from pipeline.wording import plural

log = logging.getLogger("pipeline")

RUN_DIR_HELP = (f"The run directory RUN: {CHECKPOINTS_DIR}/ ({LAST_CHECKPOINT}, {BEST_GLOB}), {CONFIG_FILE}, "
                f"{RUN_ID_FILE}, {WANDB_DIR}/, {CSV_DIR}/, {TENSORBOARD_DIR}/ (docs/training.md).")
_EVAL_CKPT_HELP = (f"The training checkpoint to score. Omitted or 'last': {last_checkpoint('RUN')} (an error when "
                   "it does not exist; omitted with --model.init_weights W: those weights). The config given "
                   "here is what runs (the checkpoint's hyper-parameters are not applied); a checkpoint of "
                   "another network is refused.")
CKPT_PATH_HELP = {
    "fit": (f"The training checkpoint to resume from. Omitted: {last_checkpoint('RUN')} when it exists, else "
            f"the checkpoint a branch started from (RUN/{BRANCH_FILE}), else a fresh start. 'last': the same (not "
            "the newest last*.ckpt; what the Slurm launcher passes at every start). A path (another run's: a "
            "branch): that file (or DeepSpeed directory). "
            "The config given here is what runs: the checkpoint's hyper-parameters are not applied, so a resume "
            "may change e.g. model.lr; a checkpoint of another network, or weights alone (use "
            "--model.init_weights), is refused."),
    "validate": _EVAL_CKPT_HELP,
    "test": _EVAL_CKPT_HELP,
}

# the --help group of --ckpt_path (Lightning titles it with the first line of the Trainer method's docstring)
CKPT_PATH_GROUP = {"fit": "Checkpoint to resume or branch from", "validate": "Checkpoint to score",
                   "test": "Checkpoint to score"}
SUBCOMMAND_HELP = {
    "fit": (f"train the run in trainer.default_root_dir (RUN), resuming it from {last_checkpoint('RUN')} when "
            "there is one"),
    "validate": (f"score a checkpoint ({last_checkpoint('RUN')} unless --ckpt_path) on data.val_split; logs "
                 "into RUN/validate/"),
    "test": (f"score a checkpoint ({last_checkpoint('RUN')} unless --ckpt_path) on data.test_split (null: the "
             "val split); logs into RUN/test/"),
}


@dataclass
class CheckpointConfig:
    """Checkpoints: ``RUN/checkpoints/last.ckpt`` at every epoch end and on preemption, and the best by val/top1.

    Args:
        every_n_train_steps: also save last.ckpt every N optimizer steps (0: only at epoch ends).
        save_top_k: keep the best K checkpoints by val/top1 (best-epochE-stepS-top1=T.ckpt; 0: none, -1: all).
        requeue: on SIGUSR1/SIGTERM under Slurm, requeue the job after the save.
    """

    every_n_train_steps: int = 0
    save_top_k: int = 3
    requeue: bool = True


def best_checkpoint(folder: Path) -> Path:
    """The ``best-*-top1=T.ckpt`` of ``folder`` with the highest T (the best-k ``ModelCheckpoint``'s names;
    ``-top1T.ckpt`` as runs before the ``=`` named them)."""
    scored = [(top1, p) for p in folder.glob(BEST_GLOB) if (top1 := best_top1(p.name)) is not None]
    if not scored:
        raise ConfigError(f"ckpt_path: 'best': {folder} has no {BEST_GLOB} (checkpoint.save_top_k 0, or no "
                          f"validation yet)")
    return max(scored)[1]


def _network_advice(ckpt: str | None, subcommand: str | None) -> dict[str, str | None]:
    """``check_network_of``'s checkpoint and, for ``validate``/``test``, its way out: the config of the run that
    saved it (given a config of another run; "a new run directory" is ``fit``'s)."""
    if subcommand not in ("validate", "test") or ckpt is None:
        return {"checkpoint": ckpt}
    run_config = saving_run_config(ckpt)
    named = f": --config {run_config}" if run_config is not None else ""
    return {"checkpoint": ckpt, "fix": f"{subcommand} it with the config it was trained with{named}"}


def _started_from(last: Path, weights: str) -> bool:
    """Whether the run's ``last.ckpt`` was trained from ``weights`` (``model.init_weights``, which its
    ``config.yaml`` keeps): then that config, given to ``validate``/``test``, names the run, not the weights.
    A ``last.ckpt`` that cannot be read was not: the weights asked for are scored (it refused them)."""
    if not last.exists():
        return False
    try:
        saved = read_checkpoint(last)
    except ConfigError:
        return False
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    return isinstance(hparams, dict) and hparams.get("init_weights") == weights


def _in_folder(path: str | Path, folder: Path) -> bool:
    """Whether the file ``path`` is in ``folder``, the folders' links resolved (a run directory given through a
    symlink, its checkpoint by its real path: it was "another run's checkpoint"); the file itself is not
    followed."""
    return Path(path).absolute().parent.resolve() == Path(folder).absolute().resolve()


def _newest_best(folder: Path, but: str | None = None) -> Path | None:
    """The best-k checkpoint of ``folder`` written last, other than the one named ``but``; None when there is
    none. The newest file, not the highest step its name says: a run taken back by hand to an earlier checkpoint
    keeps the later best-k files of the timeline it left (``remove_best_after`` removes only a killed start's)."""
    try:  # (a folder this user may not enter, a file removed while listed: none to name)
        others = [f for f in folder.glob(BEST_GLOB) if f.name != but]
        return max(others, key=lambda f: f.stat().st_mtime) if others else None
    except OSError:
        return None


def _of_this_run(best: Path, run_dir: Path) -> bool:
    """Whether ``best`` is this run's progress: any best-k of a run directory that is no branch; of a branch
    (``RUN/branched_from``, written by ``launch submit train --branch-from`` before its first start), one that
    records the same origin. A directory's old best-k files were resumed in place of the branch it was given."""
    origin = recorded_origin(run_dir)
    if origin is None:
        return True
    try:
        return read_checkpoint(best).get(BRANCH_KEY) == origin
    except ConfigError:  # unreadable: not resumed in the branch's place (the branch starts from its origin)
        return False


def resumed_in_place_of_last(run_dir: Path) -> Path | None:
    """The best-k checkpoint a start resumes where ``RUN/checkpoints/last.ckpt`` is missing (the newest one of
    this run), or None (a new run, or a branch's start from its origin). Also what ``config_check`` checks."""
    best = _newest_best(checkpoint_dir(run_dir))
    return best if best is not None and _of_this_run(best, run_dir) else None


def refuse_branch_past_its_end(trainer, path: str | Path, meta: dict, run_dir: Path) -> None:
    """A branch (another run's checkpoint, this run without one of its own) from a checkpoint at or past the run's
    end would be a run directory that trains nothing: refused (this run's own checkpoint there is a finished
    run). Also what ``config_check`` says of ``launch submit train --branch-from`` before the queue wait."""
    steps, done = trainer.get("max_steps"), meta.get("global_step")
    if isinstance(steps, int) and steps > 0 and isinstance(done, int) and done >= steps:
        raise ConfigError(f"trainer.max_steps {steps}: {path} is at step {done} already, so a branch from it "
                          f"into {run_dir} would train nothing; give a larger trainer.max_steps")
    epochs, position = trainer.get("max_epochs"), meta.get(ShardDataModule.__qualname__) or {}
    if isinstance(epochs, int) and epochs > 0 and position.get("consumed") == 0 and \
            int(position.get("epoch", 0)) >= epochs:
        raise ConfigError(f"trainer.max_epochs {epochs}: {path} ends epoch {int(position['epoch']) - 1} "
                          f"already, so a branch from it into {run_dir} would train nothing; give a larger "
                          f"trainer.max_epochs")
    if reached := time_limit_reached(trainer.get("max_time"), meta):
        raise ConfigError(f"trainer.max_time {reached[1]}: {path} has trained for {reached[0]} already, so a branch "
                          f"from it into {run_dir} would train nothing; give a larger trainer.max_time")


def _checkpoint_beside(path: str | Path, resume: bool) -> str:
    """The way past a checkpoint that cannot be read: the newest best-k checkpoint in its folder, named ("" when
    there is none)."""
    p = Path(path)
    newest = _newest_best(p.parent, but=p.name)
    if newest is None:
        return ""
    return f"; {'resume from' if resume else 'score'} the newest other checkpoint beside it: --ckpt_path {newest}"


def _scale_micro_batch_counts(trainer, configured: int, now: int) -> None:
    """Integer ``limit_train_batches`` and ``val_check_interval`` count micro-batches of a rank: where a resume
    keeps the global batch by another accumulation, they are scaled with it so they still mean the optimizer
    steps they meant (a run limited to 6 steps an epoch on 2 ranks ran 3 on 1, and its cosine schedule, planned
    for those, reached 0 half-way)."""
    for key in ("limit_train_batches", "val_check_interval"):
        value = trainer.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            continue  # a fraction of the epoch (or None) means the same whatever the accumulation
        scaled, rest = divmod(value * now, configured)
        if rest:
            raise ConfigError(f"trainer.{key} {value} counts micro-batches of accumulate_grad_batches {configured}; "
                              f"this resume keeps the global batch with accumulation {now}, where it is no whole "
                              f"number of them: give a multiple of {configured // math.gcd(configured, now)}, or a "
                              f"fraction of the epoch")
        _say(f"trainer.{key} {value} -> {scaled} micro-batches: the same optimizer steps at accumulation {now}")
        setattr(trainer, key, scaled)


def _on_cpu(accelerator) -> bool:
    import torch

    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    return "cpu" in str(name).lower() or (name in (None, "auto") and not torch.cuda.is_available())


def _at_step(meta: dict, text: str) -> str:
    """``text`` with the checkpoint's step, for the line that names the checkpoint a start loads (Lightning's
    own lines, dropped by ``pipeline/lightning_lines.py``, named it without); "" when it records none."""
    step = meta.get("global_step")
    return text.format(step) if isinstance(step, int) and not isinstance(step, bool) else ""


def _say(msg: str) -> None:
    if is_global_rank_zero():
        print(msg, file=sys.stderr, flush=True)


def check_trainer(t: Namespace) -> None:
    """The trainer settings that Lightning, the loader contract or torch would reject later, in a traceback
    (``accumulate_grad_batches -2`` surfaced as "Invalid learning rate"; ``val_check_interval 0`` as a
    ZeroDivisionError after the first step)."""
    def number(key: str):
        value = t.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    acc = t.get("accumulate_grad_batches")
    require(acc is None or (isinstance(acc, int) and acc >= 1), "trainer.accumulate_grad_batches", "an integer >= 1",
            acc)
    precision = str(t.get("precision"))
    if precision in ("16-true", "bf16-true"):  # Lightning casts the module: no fp32 copy anywhere
        raise ConfigError(f"trainer.precision: {precision} keeps the weights, the momentum and BatchNorm's statistics in "
                          f"{ {'16-true': 'fp16', 'bf16-true': 'bf16'}[precision]} without an fp32 "
                          f"copy: SGD's small updates and the weight decay round away (most weights would not change "
                          f"late in a run); use {precision.replace('true', 'mixed')}")
    if precision in ("16-mixed", "16") and configured_deepspeed(t.get("strategy")):
        raise ConfigError(f"trainer.precision: {precision} under DeepSpeed is its fp16 mode, which casts the "
                          f"parameters alone to fp16: the network's first convolution met its fp32 input (a "
                          f"traceback after the engine started); use bf16-mixed (DeepSpeed's torch autocast, as a "
                          f"DDP run's bf16-mixed) or 32-true")
    if precision.startswith("transformer-engine"):  # Lightning casts the module to its weights_dtype as well
        raise ConfigError(f"trainer.precision: {precision} (NVIDIA Transformer Engine) casts the whole network to "
                          f"{'fp16' if precision.endswith('float16') else 'bf16'} and speeds up its Linear layers "
                          f"only (a ResNet is convolutions): SGD's updates would round away as under bf16-true; "
                          f"use bf16-mixed")
    if t.get("use_distributed_sampler"):  # (ShardDataModule.check_trainer_sampler says why, to a Trainer of one's own)
        raise ConfigError("trainer.use_distributed_sampler must be false: the data module splits every epoch across "
                          "the ranks itself, and Lightning's DistributedSampler would split each rank's share again")
    vci = number("val_check_interval")
    require(vci is None or (vci > 0 and (isinstance(vci, int) or vci <= 1)), "trainer.val_check_interval",
            "a fraction of an epoch in (0, 1] or a number of batches >= 1", t.get("val_check_interval"))
    every = t.get("check_val_every_n_epoch")
    require(every is None or every >= 1, "trainer.check_val_every_n_epoch", ">= 1 (or null)", every)
    for key in ("max_steps", "max_epochs"):  # 0 ended the fit before its first step, exit 0, nothing saved
        value = t.get(key)
        require(value is None or value >= 1 or value == -1, f"trainer.{key}", ">= 1 or -1 (no limit)", value)
    limit = number("limit_train_batches")  # 0 skipped training, exit 0: `validate` is what scores a checkpoint
    require(limit is None or limit > 0, "trainer.limit_train_batches",
            "> 0 (a fraction of the epoch, or a number of batches)", t.get("limit_train_batches"))
    nodes = t.get("num_nodes")
    require(nodes is None or nodes >= 1, "trainer.num_nodes", ">= 1", nodes)
    devices = t.get("devices")
    count = devices_as_int(devices)
    require(not isinstance(count, int) or count >= 1 or count == -1, "trainer.devices",
            ">= 1, -1 (all) or 'auto'", devices)
    require(not isinstance(count, str) or count.strip() == "auto" or re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*,?\s*", count),
            "trainer.devices", "a number of devices, -1 (all), 'auto', or GPU indices such as '0,1'", devices)
    _check_name(t.get("strategy"), "trainer.strategy", StrategyRegistry.available_strategies(), lowercased=True)
    _check_name(t.get("accelerator"), "trainer.accelerator", AcceleratorRegistry.available_accelerators() | {"gpu"},
                lowercased=False)
    for key, low, rule in (("min_epochs", 0, ">= 0 (or null)"), ("min_steps", -1, ">= 0, -1 or null"),
                           ("log_every_n_steps", 1, ">= 1 (optimizer steps between logged rows)"),
                           ("num_sanity_val_steps", -1, ">= 0 or -1 (all validation batches)")):
        value = t.get(key)  # Lightning took the negative ones without a word
        require(value is None or not isinstance(value, int) or value >= low, f"trainer.{key}", rule, value)
    clip = number("gradient_clip_val")
    require(clip is None or clip >= 0, "trainer.gradient_clip_val", ">= 0 (0 or null: no clipping)",
            t.get("gradient_clip_val"))


# what a launcher of several nodes' ranks sets (srun, torchrun, a hand-started node of Lightning's own environment)
LAUNCHED = ("WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS")


def check_other_nodes(num_nodes: int | None, subcommand: str) -> None:
    """Refuse ``trainer.num_nodes`` > 1 where nothing started the other nodes' ranks: the process waited for them
    forever, without a word (``pipeline test --config RUN/config.yaml`` of a 2-node run, typed on the login node).
    Not in launch's check before a submission, whose ranks srun starts."""
    nodes = int(num_nodes or 1)
    if nodes <= 1 or any(os.environ.get(k) for k in LAUNCHED):
        return
    way = ("score on this machine with --trainer.num_nodes 1 (every sample is scored once at any world size)"
           if subcommand in ("validate", "test") else
           "start it on every node (python -m launch submit train, srun, torchrun), or train here with "
           "--trainer.num_nodes 1")
    raise ConfigError(f"trainer.num_nodes {nodes}: no launcher started the other nodes' ranks here (no srun, "
                      f"torchrun or NODE_RANK/MASTER_ADDR), so this process would wait for them forever; {way}")


def check_run_settings(cfg: Namespace) -> None:
    """The ``checkpoint`` and ``tracking`` settings that would fail once the trainer is being built."""
    ckpt = cfg.checkpoint
    require(ckpt.every_n_train_steps >= 0, "checkpoint.every_n_train_steps", ">= 0 (0: at epoch ends only)",
            ckpt.every_n_train_steps)
    require(ckpt.save_top_k >= -1, "checkpoint.save_top_k", ">= -1 (-1: keep all, 0: none)", ckpt.save_top_k)
    check_wandb_settings(cfg.tracking)


def _check_name(value, key: str, names, lowercased: bool) -> None:
    """A strategy or accelerator given by name, refused before the run directory is touched, with the names
    there are (Lightning's own refusal came once the trainer was being built). Lightning lowercases a strategy's
    name, not an accelerator's."""
    name = value.lower() if lowercased and isinstance(value, str) else value
    if isinstance(name, str) and name != "auto" and name not in names:
        raise ConfigError(f"{key}: {value!r} is not one of: auto, {', '.join(sorted(names))}")


class RunDirConfig(SaveConfigCallback):
    """The resolved config in ``RUN/config.yaml`` whichever loggers are on (Lightning's callback writes it
    into the first logger's directory: ``RUN/csv/`` without W&B). Subcommands other than ``fit`` write
    ``RUN/config-<stage>.yaml``, so a ``validate`` in the run directory keeps the training config. Written
    once the checkpoint is restored, as the stage starts: a resume refused then (another ``model.arch`` or
    dataset) left a config that never ran in place of the run's own."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = getattr(stage, "value", stage)  # a TrainerFn

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # (fit's sanity check runs before on_train_start)
            self._save(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        """Written beside and renamed into place (a kill mid-write left a torn config.yaml); a ``fit`` whose
        settings differ from the file's keeps the earlier one in ``RUN/config-history/``."""
        if self.already_saved:
            return
        if trainer.is_global_zero:
            stage = getattr(self, "_stage", "fit")
            name = self.config_filename if stage == "fit" else f"config-{stage}.yaml"
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            target, written = run_dir / name, run_dir / f".{name}.{os.getpid()}.tmp"
            config = self.config
            if stage == "fit" and config.get("ckpt_path") is not None:
                # what this start resumed from, not a setting of the run: `fit --config RUN/config.yaml` (or
                # validate) of a branched run reloaded the other run's checkpoint, over its own progress
                config = config.clone()
                config["ckpt_path"] = None
            try:
                self.parser.save(config, str(written), skip_none=False, overwrite=True, multifile=self.multifile)
                if stage == "fit" and (kept := keep_earlier_config(target, written, trainer.global_step)):
                    changed = changed_settings(target, written)
                    _say(f"settings changed{f' ({changed})' if changed else ''}: the earlier config is kept as {kept}")
                os.replace(written, target)
            finally:
                written.unlink(missing_ok=True)
            if stage == "fit":  # W&B's config had the model's settings alone: no batch size, devices, precision
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_hyperparams(self.config.as_dict())  # with what this start resumed from
        self.already_saved = True


class PipelineCLI(LightningCLI):
    PROG = "python -m pipeline"  # what --help and a parse error's usage line call the command
    DESCRIPTION = ("Train (fit) and evaluate (validate, test) the ResNet family on data_prep's shards; each "
                   "subcommand's --help lists its settings. Also: `python -m pipeline export CKPT OUT.pt` writes a "
                   "checkpoint's network weights (`python -m pipeline export --help`).")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``; no ``predict``: the module has no prediction step and the data
        module no prediction loader (it failed after loading the checkpoint)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def __init__(self, *args, **kwargs) -> None:
        self._run_lock: RunDirLock | None = None
        self._run_dir: Path | None = None  # known once parsed (validate/test hold no lock on it)
        self._eval_dirs_made: list[Path] = []  # folders validate/test made for their loggers (RUN, RUN/<stage>)
        # the data module splits each epoch across the ranks itself (check_trainer refuses Lightning's sampler)
        kwargs["trainer_defaults"] = {"use_distributed_sampler": False, **(kwargs.get("trainer_defaults") or {})}
        ran = False
        try:
            super().__init__(*args, **kwargs)  # parses, builds and runs the subcommand
            ran = True
        except OSError as e:
            if e.errno == errno.ENOSPC and semaphore_error(e):  # the loader's queues, in a full /dev/shm
                raise SharedMemoryError(f"out of shared memory: {e}; {shm_advice(backend=self._backend())}") from e
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or self._run_dir is None:
                raise
            raise DiskFullError(disk_full_message(e, self._run_dir, self.subcommand or "fit")) from e
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
            if not ran:
                self._remove_empty_eval_dirs()

    def _remove_empty_eval_dirs(self) -> None:
        """A refused ``validate``/``test`` (weights of another network, a ZeRO directory without DeepSpeed) left
        the empty ``RUN/validate/`` its loggers made, and a new run directory around it; ``fit`` leaves none."""
        for folder in reversed(self._eval_dirs_made):  # RUN/<stage> first, then RUN where this start made it
            try:
                folder.rmdir()  # only an empty one
            except OSError:
                return

    @property
    def _cfg(self):
        """The parsed settings of the subcommand that runs (the whole config where there is none)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def _cfg_init(self):
        """``_cfg`` instantiated (the trainer's strategy, plugins and callbacks as objects)."""
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def _backend(self) -> str:
        """The loader backend of this run (``data.backend``, ``auto`` resolved once the data module is built;
        "cpu" before the parse)."""
        if isinstance(datamodule := getattr(self, "datamodule", None), ShardDataModule):
            return datamodule.resolved_backend()
        try:
            return str(self._cfg.data.backend)
        except (AttributeError, KeyError, TypeError):
            return "cpu"

    def _add_subcommands(self, parser, **kwargs) -> None:
        """What each subcommand does here (``SUBCOMMAND_HELP``), in ``--help``: Lightning took the first line of
        the Trainer method's docstring, "Runs the full optimization routine." for fit, and for test half a
        sentence ("... It's separated from fit to make sure you never run on your")."""
        for name, text in SUBCOMMAND_HELP.items():
            kwargs.setdefault(name, {}).setdefault("description", text)
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    def _parse_ckpt_path(self) -> None:
        """Off. Lightning's CLI would replace the whole ``model`` config by the hyper-parameters of an
        explicit ``--ckpt_path FILE`` (silently dropping ``--model.lr`` and the like, and passing another
        ``model.arch``), unlike a resume from ``last``. The config is what runs; a checkpoint of another
        network is refused by ``ImageClassifier.on_load_checkpoint`` with a message naming the setting."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        """``--help`` says what this CLI does with the run directory and ``--ckpt_path``: Lightning's texts
        (``last`` = the newest ``last*.ckpt``, the default root is the working directory) describe
        behaviour this CLI replaces."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        helps = {"trainer.default_root_dir": RUN_DIR_HELP, "ckpt_path": CKPT_PATH_HELP[subcommand]}
        for action in parser._actions:
            if action.dest in helps:
                action.help = helps[action.dest]
        for group in parser._action_groups:  # titled by the Trainer method's docstring ("Runs the full
            if any(a.dest == "ckpt_path" for a in group._group_actions):  # optimization routine:" for fit)
                group.title = CKPT_PATH_GROUP[subcommand]
        return parser

    def _set_seed(self) -> None:
        """After the checks of what the parse let through (``pipeline/parsed_config.py``): the first use of
        the parsed config."""
        sub = self.config.get("subcommand")
        parser = self._subcommand_parsers[sub] if sub else self.parser
        check_parsed(parser, self.config[sub] if sub else self.config)
        super()._set_seed()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(TrackingConfig, "tracking")
        parser.add_class_arguments(CheckpointConfig, "checkpoint")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes" if self.subclass_mode_model
                              else "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self._cfg
        run_dir = Path(cfg.trainer.default_root_dir or "runs/default")
        cfg.trainer.default_root_dir = str(run_dir)
        self._run_dir = run_dir
        last = last_checkpoint(run_dir)
        self._saved_run_id: str | None = None
        self._new_run = False  # a fit's first start (no checkpoint to resume)
        self._ckpt_hparams: dict = {}  # the checkpoint's model settings, checked before the loggers start
        self._branched_from: tuple[str, str | None] | None = None  # (checkpoint, its W&B id): another run's
        self._branch_origin: str | None = None  # where this run started, when from another run (branch_origin)
        check_trainer(cfg.trainer)
        check_other_nodes(cfg.trainer.get("num_nodes"), sub)
        if isinstance(cfg.model.get("arch_kwargs"), dict):  # a dotted `--model.arch_kwargs.plain false` arrives
            # as the word: RUN/config.yaml kept 'false' (a string), and a resume written as false said it changed
            cfg.model.arch_kwargs = typed_options(str(cfg.model.get("arch")), cfg.model.arch_kwargs)
        if cfg.tracking.wandb and wandb_disabled():  # as tracking.wandb false: config.yaml says what ran
            _say("W&B: off (WANDB_MODE=disabled), as with --tracking.wandb false")
            cfg.tracking.wandb = False
        if sub != "fit":
            limit_key = f"limit_{'val' if sub == 'validate' else 'test'}_batches"
            if sub in ("validate", "test") and cfg.trainer.get(limit_key) == 0:  # exit 0 and no metrics, said nothing
                raise ConfigError(f"trainer.{limit_key} is 0: {sub} would score no batch")
            if sub in ("validate", "test"):  # (None: a CLI built with run=False, as tests do)
                check_run_dir_reachable(run_dir)  # before its last.ckpt is looked for
                check_run_dir_is_no_dataset(run_dir)
                self._default_checkpoint(cfg, sub, last)
            meta = self._check_checkpoint(cfg.get("ckpt_path"))
            self._ckpt_hparams = meta.get("hyper_parameters") or {}
            if sub in ("validate", "test"):  # its config and logs go into RUN: another user's run is refused here
                ckpt = cfg.get("ckpt_path")
                check_run_dir_writable(run_dir, sub, bool(cfg.tracking.wandb), str(ckpt) if ckpt else None)
                check_temp_dir()
            if sub in ("validate", "test") and cfg.get("ckpt_path") is not None:
                trained = provenance.records(meta)  # the code that trained it, as launch status and export say
                by = f", trained by {provenance.code(trained[-1])}" if trained else ""
                _say(f"{sub}: {cfg.ckpt_path}{_at_step(meta, ' (step {})')}{by}")
            return
        if cfg.model.get("lr") == 0:  # allowed (a batch-norm recalibration, a check that weights stay), but said
            _say("warning: model.lr is 0: the weights will not change (batch-norm running statistics will)")
        for line in ignored_schedule_settings(cfg.model):
            _say(f"warning: {line}")
        check_run_dir_reachable(run_dir)  # the lock's own look at the path would be a PermissionError traceback
        check_run_dir_is_no_dataset(run_dir)  # (the lock file would be the first thing left among the shards)
        self._run_lock = RunDirLock(run_dir)  # before anything in the run directory is touched
        self._run_lock.acquire()
        # another user's run whose lock file was left writable: refused here, not in a W&B traceback later
        check_run_dir_writable(run_dir, "fit", bool(cfg.tracking.wandb))
        check_temp_dir()
        if warning := restart_warning(os.environ):
            _say(warning)
        for path, newer in recover_directories(checkpoint_dir(run_dir)):  # a crash in a DeepSpeed directory swap
            # said by the rank that did it: every rank recovers, the first one wins (rank 0 may find it done)
            print(f"restored {path} " + ("(its save had ended; the crash came between the two renames that put it in"
                                        " place)" if newer else "(the last whole checkpoint; the save after it was"
                                        " interrupted)"), file=sys.stderr, flush=True)
        if cfg.get("ckpt_path") is None and last.exists():
            cfg.ckpt_path = "last"
        if cfg.get("ckpt_path") in (None, "last") and not last.exists() and \
                (best := resumed_in_place_of_last(run_dir)) is not None:
            # it started over from step 0 among them, and called the earlier start's metrics "a start that saved
            # no checkpoint"
            _say(f"{last} is missing (moved or deleted? a kill between an epoch's best-k save and its last.ckpt?) "
                 f"but this run saved best-k checkpoints: resuming the newest of them, {best}; to train "
                 f"from step 0 instead, move {checkpoint_dir(run_dir)} away or use another trainer.default_root_dir")
            cfg.ckpt_path = str(best)
            self._resumes_best_for_last = True  # its rows and files after that step go, as after last.ckpt's
        if cfg.get("ckpt_path") in (None, "last") and not last.exists() and (origin := recorded_origin(run_dir)):
            if not Path(origin).exists():  # it said "ckpt_path: checkpoint ... does not exist", of no ckpt_path given
                raise ConfigError(f"{run_dir / BRANCH_FILE}: this run is a branch of {origin}, which does not exist "
                                  f"(moved or removed?), and has no checkpoint of its own yet: put it back, start the "
                                  f"branch from another checkpoint with --ckpt_path, or remove {run_dir / BRANCH_FILE} "
                                  f"to train this run from scratch")
            _say(f"this run is a branch of {origin} ({run_dir / BRANCH_FILE}) with no checkpoint of its own yet: "
                 f"starting from {origin} again")
            cfg.ckpt_path = origin
        ckpt = cfg.get("ckpt_path")
        path = last if ckpt == "last" else (Path(ckpt) if ckpt else None)
        if ckpt == "last" and not last.exists():
            cfg.ckpt_path = None  # first start of a run launched with --ckpt_path last
            path = None
        if path is None:
            self._new_run = True  # said once the start's checks have passed (before_fit)
            return
        if ckpt == "last":  # that file: Lightning's "last" is the newest last*.ckpt (a user's copy, an old last-v1)
            cfg.ckpt_path = str(last)
        elif last.exists() and not _in_folder(path, checkpoint_dir(run_dir)):
            # another run's checkpoint, into a run directory with its own: the same branch command again? (A
            # keyword, a run directory or a checkpoints/ folder is refused as such first, not as another run's.)
            self._refuse_keyword(path)
            if Path(path).is_dir():
                checkpoint_file(path)
            path = resume_point(Path(path), last, self._check_checkpoint(last, resume=True))
            if path == last:
                _say(f"this run is a branch of {ckpt} (--ckpt_path) and has its own checkpoint: resuming that")
                cfg.ckpt_path = str(last)
        meta = self._check_checkpoint(path, resume=True)
        self._ckpt_hparams = meta.get("hyper_parameters") or {}
        steps, done = cfg.trainer.get("max_steps"), meta.get("global_step")
        # a branch (another run's checkpoint, this run without one of its own) past the end would be a run
        # directory that trains nothing: refused; this run's own checkpoint past it is a finished run
        branch = not _in_folder(path, checkpoint_dir(run_dir))
        if branch:
            refuse_branch_past_its_end(cfg.trainer, path, meta, run_dir)
        if isinstance(steps, int) and steps > 0 and isinstance(done, int) and done >= steps:
            self._log_held_wandb_rows(cfg, run_dir, path, meta)
            raise RunComplete(f"the run is complete: {path} is at step {done} and trainer.max_steps is {steps}; "
                              f"nothing to train (a larger trainer.max_steps trains on)")
        if reached := time_limit_reached(cfg.trainer.get("max_time"), meta):
            self._log_held_wandb_rows(cfg, run_dir, path, meta)
            raise RunComplete(f"the run is complete: {path} has trained for {reached[0]} and trainer.max_time is "
                              f"{reached[1]}; nothing to train (a larger trainer.max_time trains on)")
        epochs, position = cfg.trainer.get("max_epochs"), meta.get(ShardDataModule.__qualname__) or {}
        if isinstance(epochs, int) and epochs > 0 and position.get("consumed") == 0 and \
                int(position.get("epoch", 0)) >= epochs:  # (a re-run opened an empty W&B start, trained nothing)
            self._log_held_wandb_rows(cfg, run_dir, path, meta)
            raise RunComplete(f"the run is complete: {path} ends epoch {int(position['epoch']) - 1} and "
                              f"trainer.max_epochs is {epochs}; nothing to train (a larger trainer.max_epochs trains on)")
        _say(f"resuming from {path}{_at_step(meta, ' at step {}')}")
        # the files and rows a killed start wrote after the run's own last.ckpt go (not those after another of
        # its checkpoints a user resumes by name, a best-k one: the later history is theirs to keep)
        own_last = (_in_folder(path, last.parent) and Path(path).name == last.name) or \
            getattr(self, "_resumes_best_for_last", False)
        self._resume_step = done if isinstance(done, int) and own_last else None
        if not branch:
            self._saved_run_id = meta.get(RUN_ID_KEY)  # this run's own (its id file may be lost)
            self._branch_origin = meta.get(BRANCH_KEY)  # kept in its later checkpoints
        else:  # a branch of another run: its W&B run would get two histories over the same steps
            self._branched_from = (str(path), meta.get(RUN_ID_KEY))
            self._branch_origin = origin_name(path)  # RUN/branched_from once restored (BranchOrigin)
        self._adapt_geometry(cfg, path, meta.get(ShardDataModule.__qualname__) or {})

    @staticmethod
    def _log_held_wandb_rows(cfg, run_dir: Path, path: str | Path, meta: dict) -> None:
        """The W&B rows a start stopped by a SIGTERM in its last steps held (its final validation): a start that
        finds the run complete logs them (global rank 0), or W&B would never get the run's last val/top1."""
        if not cfg.tracking.wandb or not is_global_rank_zero() or not held_rows(meta, Path(path).parent) or \
                logged_already(path):  # (no W&B folder or id file made for nothing)
            return
        tracking = TrackingConfig(wandb=True, project=cfg.tracking.project, name=cfg.tracking.name, csv=False,
                                  tensorboard=False)
        loggers = make_loggers(tracking, run_dir, run_id(run_dir, from_checkpoint=meta.get(RUN_ID_KEY)))
        if rows := log_rows_of_complete_run(loggers[0], path, meta):
            _say(f"W&B: logged the {len(rows)} metric rows its last start held after a SIGTERM (last at step "
                 f"{rows[-1]['step']})")

    @staticmethod
    def _default_checkpoint(cfg, sub: str, last: Path) -> None:
        """``validate`` (and ``test``) of the run directory's ``last.ckpt`` when no checkpoint is
        named, as ``fit`` resumes it; ``--ckpt_path last`` means that file too. Lightning's own ``last`` looks
        for a checkpoint callback's latest save, which a new process has not made: it went on with the
        untrained network and printed its metrics as a result."""
        ckpt = cfg.get("ckpt_path")
        if ckpt == "best":
            cfg.ckpt_path = str(best_checkpoint(last.parent))
            return
        weights = cfg.model.get("init_weights")
        if ckpt not in (None, "last") or (ckpt is None and weights and not _started_from(last, weights)):
            return
        if not last.exists():
            raise ConfigError(f"ckpt_path: nothing to {sub}: {last} does not exist (trainer.default_root_dir "
                              f"{last.parent.parent}); pass --ckpt_path FILE, or --model.init_weights WEIGHTS for a "
                              f"network's weights alone")
        cfg.ckpt_path = str(last)
        if ckpt is None and weights:  # (the checkpoint itself is named with its step once read)
            _say(f"{sub}: model.init_weights {weights} is where this run started: not scored (score it in another "
                 f"trainer.default_root_dir)")

    @staticmethod
    def _refuse_keyword(path: str | Path | None) -> None:
        if str(path) in ("best", "hpc") or str(path).startswith("registry"):
            raise ConfigError(f"ckpt_path: {str(path)!r} is not supported here: pass 'last' ({last_checkpoint('RUN')}) or "
                              f"a file; `validate --ckpt_path best` scores the {BEST_GLOB} with the highest val/top1")

    @staticmethod
    def _check_checkpoint(path: str | Path | None, resume: bool = False) -> dict:
        """The checkpoint's contents; a missing, torn or foreign file is a one-line error naming it.
        Lightning's other keywords look for a checkpoint of an earlier ``fit`` in the same process (``best``
        for ``fit``), a Slurm ``hpc_ckpt`` this CLI never writes, or Lightning's model registry: refused."""
        PipelineCLI._refuse_keyword(path)
        if path is None or str(path) == "last" or "://" in str(path):
            return {}
        if not Path(path).exists():
            raise ConfigError(f"ckpt_path: checkpoint {path} does not exist")
        try:
            meta = read_checkpoint(path)
            # every rank reads this: of a DeepSpeed directory, the model states every rank loads, not every rank's
            # optimizer shard (at 1,024 ranks the whole directory read 1,024 times)
            verify_checkpoint(checkpoint_file(path))
        except ConfigError as e:  # torn or damaged: a user deleted it and started the run over from step 0
            # (not one that could not be read now: a permission, an I/O error; it may be whole, and newer)
            damaged = any(w in str(e) for w in (" is damaged: ", ", or torn (", ": an empty file"))
            raise ConfigError(f"{e}{_checkpoint_beside(path, resume) if damaged else ''}") from None
        if not Path(path).is_dir() and "pytorch-lightning_version" not in meta:
            use = (f"start from weights with --model.init_weights {path}" if resume else
                   f"score weights with --ckpt_path null --model.init_weights {path}")
            raise ConfigError(f"ckpt_path: {path} is not a training checkpoint (no trainer state: weights alone, "
                              f"as `python -m pipeline export` writes?); {use}")
        if not Path(path).is_dir():
            needed = ("state_dict", "optimizer_states", "loops") if resume else ("state_dict",)
            lacks = [key for key in needed if key not in meta]
            if lacks:  # Lightning's KeyError came after the run directory was set up
                raise ConfigError(f"ckpt_path: {path} is an incomplete training checkpoint (it has no "
                                  f"{', '.join(lacks)}); resume from another, or start from its weights with "
                                  f"--model.init_weights {path}")
        return meta

    def _adapt_geometry(self, cfg, path: Path, state: dict) -> None:
        """Same global batch as the checkpoint, whatever the new world size (see resume_geometry); a ZeRO
        checkpoint directory only with the world size that wrote it (its optimizer state is sharded)."""
        world = expected_world_size(cfg.trainer.get("num_nodes"), cfg.trainer.get("devices"))
        self._resume_world = world  # checked against the trainer's (instantiate_trainer)
        check_zero_world_size(path, world)  # before DeepSpeed starts
        check_zero_shards(path, world)
        if "world_size" not in state:
            return
        saved = Geometry(int(state["world_size"]), int(state["batch_size"]), int(state.get("accumulate", 1)))
        acc = cfg.trainer.get("accumulate_grad_batches") or 1
        for key, value in (("data.batch_size", cfg.data.batch_size), ("trainer.accumulate_grad_batches", acc)):
            if int(value) < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        now = adapt(saved, world, int(cfg.data.batch_size), int(acc))
        if (now.batch_size, now.accumulate) != (int(cfg.data.batch_size), int(acc)) or world != saved.world_size:
            _say(f"world size changed on resume: saved {saved.describe()} -> now {now.describe()}"
                 if world != saved.world_size else
                 f"keeping the checkpoint's global batch: config {Geometry(world, cfg.data.batch_size, acc).describe()}"
                 f" -> {now.describe()}")
        if now.accumulate != int(acc):
            self._adapted_accumulation = f"{saved.describe()} -> {now.describe()}"
            _scale_micro_batch_counts(cfg.trainer, int(acc), now.accumulate)
        cfg.data.batch_size = now.batch_size
        cfg.trainer.accumulate_grad_batches = now.accumulate

    def _atomic_deepspeed(self) -> None:
        """DeepSpeed given as ``class_path: ...DeepSpeedStrategy`` (how offload and other options are set)
        saves atomically too: the registered ``deepspeed*`` names already make ``AtomicDeepSpeedStrategy``
        (``pipeline.strategies``), a class path made Lightning's, which writes each rank's files into
        ``last.ckpt/`` in place (a kill mid-save left a torn shard, or new files beside old ones)."""
        init = self._cfg_init
        strategy = init.trainer.get("strategy")
        if type(strategy) is DeepSpeedStrategy:  # the subclass adds one method and no state
            strategy.__class__ = AtomicDeepSpeedStrategy

    def _plugins(self, cfg) -> list:
        """The user's plugins (instantiated) plus ours where the user gave none of that kind."""
        init = self._cfg_init
        plugins = init.trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if (not any(isinstance(p, ClusterEnvironment) for p in plugins) and SLURMEnvironment.detect()
                and not TorchElasticEnvironment.detect()):
            plugins.append(SLURMEnvironment(auto_requeue=False))  # requeue is the Preemption callback's job
        if cfg.trainer.get("sync_batchnorm") and _on_cpu(cfg.trainer.get("accelerator")):
            plugins.append(GlooSyncBatchNormPlugin())  # torch's SyncBatchNorm is GPU-only
        return plugins

    def instantiate_trainer(self, **kwargs):
        cfg = self._cfg
        run_dir = Path(cfg.trainer.default_root_dir)
        ckpt = cfg.checkpoint
        check_run_settings(cfg)
        if isinstance(self.datamodule, ShardDataModule):  # before the loggers start a W&B run for nothing
            self.datamodule.check_backend()
            self.datamodule.check_splits(self.subcommand or "fit",
                                         validating=cfg.trainer.get("limit_val_batches") != 0)
        if isinstance(self.model, ImageClassifier) and getattr(self, "_ckpt_hparams", None):
            self.model.check_network_of(self._ckpt_hparams, **_network_advice(cfg.get("ckpt_path"), self.subcommand))
        ckdir = checkpoint_dir(run_dir)
        backlog = WandbBacklog(ckdir)
        callbacks = [
            RankAgreement(flat_settings(cfg.as_dict(), str(run_dir))),  # first: before any other collective
            FiniteWeights(every_n_steps=int(cfg.trainer.get("log_every_n_steps") or 50)),  # before any save
            *([RunDirStillOurs(self._run_lock)] if self._run_lock is not None else []),
            BestCheckpoints(
                dirpath=ckdir,
                filename=BEST_FILENAME,
                auto_insert_metric_name=False, monitor="val/top1", mode="max",
                save_top_k=ckpt.save_top_k, save_last=False,
            ),
            LastCheckpoint(ckdir, ckpt.every_n_train_steps),
            MovedRunCheckpoints(ckdir),  # a run directory moved since its checkpoint: its best k still kept
            Preemption(last_checkpoint(run_dir), requeue=ckpt.requeue, wandb_backlog=backlog),
            backlog,
            RNGState(),
            LoopPosition(),
            Throughput(),
            SampleGrid(run_dir),
            WeightParity(),
        ]
        if self.subcommand in ("validate", "test"):
            callbacks.append(CheckpointStep())
        elif getattr(self, "_branch_origin", None):  # a start from another run's: recorded for the next start
            callbacks.append(BranchOrigin(self._branch_origin,
                                          run_dir if getattr(self, "_branched_from", None) else None))
        if self.subcommand not in ("validate", "test"):  # what code and software trained each checkpoint
            callbacks.append(ProvenanceRecord())
        if self.subcommand not in (None, "fit") and cfg.trainer.get("logger") in (None, True):
            ckpt = cfg.get("ckpt_path")
            self._eval_dirs_made = [d for d in (Path(run_dir), Path(run_dir) / self.subcommand) if not d.exists()]
            kwargs.setdefault("logger", make_eval_loggers(cfg.tracking, run_dir, self.subcommand,
                                                          str(ckpt) if ckpt else None) or False)
        elif self.trainer_class is not None and cfg.trainer.get("logger") in (None, True):
            wandb_id = None
            if cfg.tracking.wandb:
                new_id = not (run_dir / RUN_ID_FILE).exists() and not os.environ.get("WANDB_RUN_ID")
                wandb_id = run_id(run_dir, from_checkpoint=getattr(self, "_saved_run_id", None))
                branched = getattr(self, "_branched_from", None)
                if branched and new_id:
                    _say(f"W&B: a new run {wandb_id} for {run_dir}: {branched[0]} is another run directory's "
                         f"checkpoint" + (f" (W&B run {branched[1]})" if branched[1] else ""))
                callbacks.append(RunIdInCheckpoint(wandb_id))
                before = recorded_setting(run_dir / CONFIG_FILE, "tracking.project")
                if (cfg.get("ckpt_path") is not None and isinstance(before, str)
                        and recorded_setting(run_dir / CONFIG_FILE, "tracking.wandb") is True
                        and before != cfg.tracking.project and is_global_rank_zero()):
                    # the settings-changed line named it among others; the dashboard then showed half a run
                    _say(f"warning: tracking.project changed ({before} -> {cfg.tracking.project}): W&B keeps a run "
                         f"in one project, so this start logs to a new W&B run {wandb_id} in "
                         f"{cfg.tracking.project} and the history so far stays in {before}; --tracking.project "
                         f"{before} continues that run")
            if cfg.get("ckpt_path") is None and cfg.tracking.csv and is_global_rank_zero() and \
                    (aside := set_aside_metrics(run_dir)):
                _say(f"a new start: the metrics of an earlier one that saved no checkpoint are kept as {aside}")
            elif cfg.get("ckpt_path") is not None and cfg.tracking.csv and is_global_rank_zero() and \
                    getattr(self, "_resume_step", None) is not None:  # rows a killed start logged after it
                rewind_metrics(run_dir, self._resume_step)
            kwargs.setdefault("logger", make_loggers(
                cfg.tracking, run_dir, wandb_id,
                resume_step=getattr(self, "_resume_step", None) if cfg.get("ckpt_path") is not None else None) or False)
        kwargs.setdefault("plugins", self._plugins(cfg))
        if any(isinstance(p, GlooSyncBatchNormPlugin) for p in kwargs["plugins"]):
            kwargs["sync_batchnorm"] = False  # the plugin above does it
        extra = kwargs.pop("callbacks", [])
        self._atomic_deepspeed()
        self._user_callbacks()  # before the trainer appends its own to the configured list
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # Lightning's refusal of a strategy, accelerator or devices value
            if _raised_in_this_package(e):  # a bug of ours (this package says a bad setting as a ConfigError)
                raise
            raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
        world = getattr(self, "_resume_world", None)
        if world is not None and trainer.world_size != world:
            raise ConfigError(
                f"this run has {plural(trainer.world_size, 'rank')}, but its resume from {cfg.ckpt_path} kept the"
                f" checkpoint's global batch for {world} (WORLD_SIZE, else Slurm's SLURM_NTASKS, else trainer.num_nodes x"
                f" trainer.devices): the batch and the loader's position would be wrong; start it as its launcher"
                f" does (srun, torchrun), or set trainer.num_nodes and trainer.devices to the ranks that run")
        check_checkpoint_kind(trainer.strategy, cfg.get("ckpt_path"), self.subcommand or "fit")
        if (self.subcommand or "fit") == "fit":  # W&B starts with the fit; these need the built trainer
            check_accumulation(trainer.strategy, int(trainer.accumulate_grad_batches),
                               getattr(self, "_adapted_accumulation", None))
            if isinstance(self.datamodule, ShardDataModule):
                self.datamodule.check_one_global_batch(trainer.world_size, max(1, int(trainer.accumulate_grad_batches)))
            if isinstance(self.model, ImageClassifier):
                self.model.check_run_length(trainer.max_steps, trainer.max_epochs)
        if getattr(self, "_resume_step", None) is not None:  # a start killed between a best-k save and its
            # last.ckpt: after the checks above (a refused start removes nothing)
            for gone in remove_best_after(cfg.ckpt_path, self._resume_step):
                _say(f"removed {gone}: saved after step {self._resume_step} by a start that stopped before its "
                     f"next {LAST_CHECKPOINT}; this run validates that step again")
        self._drop_default_checkpointing(trainer)
        if trainer.loggers:  # Lightning's monitor refuses a run without loggers (trainer.logger false)
            after = next(i for i, c in enumerate(callbacks) if isinstance(c, LoopPosition))  # it sets the step
            callbacks.insert(after + 1, StepLearningRateMonitor())
        trainer.callbacks.extend(callbacks + list(extra))
        self._use_console_progress(trainer)
        self._use_flops_summary(trainer)
        if isinstance(trainer.strategy, DeepSpeedStrategy) and isinstance(trainer.strategy.config, dict):
            # Lightning reads it from loader.batch_sampler, which our batch-yielding loaders do not have
            trainer.strategy.config.setdefault("train_micro_batch_size_per_gpu", int(cfg.data.batch_size))
        return trainer

    def _check_deepspeed_device(self) -> None:
        """Lightning's DeepSpeed strategies refuse a machine without CUDA only at the run's start, in a traceback
        (a CLI built with ``run=False`` may hold one: it runs nothing)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, CPUDeepSpeedStrategy):
            check_extensions_dir()
        if isinstance(strategy, DeepSpeedStrategy) and not isinstance(strategy, CPUDeepSpeedStrategy) \
                and strategy.root_device.type != "cuda":
            raise ConfigError(f"trainer.strategy: DeepSpeed runs on CUDA GPUs and this run has none (accelerator "
                              f"{type(self.trainer.accelerator).__name__}); on the CPU use the deepspeed_stage_N_cpu "
                              f"strategies (docs/training.md)")

    def before_fit(self) -> None:
        """``model.init_weights`` at a run's first start; a resume has the weights in its checkpoint. A first
        start names its run directory, as a resume names its checkpoint (with W&B off no line said where the
        checkpoints go); here, after the start's checks: a refused start removes the directory again."""
        self._check_deepspeed_device()
        if self._new_run:
            run_dir = Path(self.trainer.default_root_dir)
            _say(f"starting a new run in {run_dir} (checkpoints: {checkpoint_dir(run_dir)})")
        cfg = self.config["fit"]
        path = self.model.hparams.get("init_weights")
        if not path:
            return
        if cfg.get("ckpt_path") is not None:
            _say(f"model.init_weights {path} not loaded: resuming (the checkpoint holds the weights)")
            return
        note = self.model.load_init_weights(path)
        _say(f"initial weights from {path}")
        if note:
            _say(note)

    def before_validate(self) -> None:
        self._check_deepspeed_device()
        self._evaluate_init_weights("validate")

    def before_test(self) -> None:
        self._check_deepspeed_device()
        self._evaluate_init_weights("test")

    def _evaluate_init_weights(self, sub: str) -> None:
        """``validate``/``test --model.init_weights WEIGHTS`` without ``--ckpt_path`` scores those weights (they
        were loaded by ``fit`` alone: the untrained network was scored, and printed as the result)."""
        path = self.model.hparams.get("init_weights")
        if path and self.config[sub].get("ckpt_path") is None:
            note = self.model.load_init_weights(path)
            _say(f"{sub}: weights from {path}")
            if note:
                _say(note)

    def _user_callbacks(self) -> list:
        """The callbacks the user configured (``trainer.callbacks``), which the defaults below never replace:
        as they were before the trainer was built (LightningCLI and the Trainer append their own callbacks,
        Lightning's default bar and ``ModelCheckpoint`` among them, to that same list)."""
        own = getattr(self, "_own_callbacks", None)
        if own is None:
            init = self._cfg_init
            own = init.trainer.get("callbacks") or []
            own = list(own) if isinstance(own, list) else [own]
            self._own_callbacks = own
        return own

    def _drop_default_checkpointing(self, trainer) -> None:
        """Lightning adds a ``ModelCheckpoint()`` of its own when the trainer is built without one (ours
        join after): a second full checkpoint every epoch in the logger's directory
        (``RUN/<project>/<id>/checkpoints/``, ``RUN/csv/checkpoints/``), outside ``RUN/checkpoints``.
        A ``ModelCheckpoint`` the user configures stays."""
        own = self._user_callbacks()
        trainer.callbacks = [c for c in trainer.callbacks
                             if not isinstance(c, ModelCheckpoint) or any(c is o for o in own)]

    def _use_flops_summary(self, trainer) -> None:
        """Lightning's default model summary in place of ours (pipeline/model_summary.py: with the network's
        FLOPs, which Lightning's shows as 0). A summary the user configures stays."""
        own = self._user_callbacks()
        for i, c in enumerate(trainer.callbacks):
            if isinstance(c, ModelSummary) and not any(c is o for o in own):
                cls = FlopsRichModelSummary if isinstance(c, RichModelSummary) else FlopsModelSummary
                trainer.callbacks[i] = cls(max_depth=c._max_depth)

    def _use_console_progress(self, trainer) -> None:
        """Lightning's default bar in place of ours (pipeline/progress.py: tqdm on a terminal, plain lines in
        a log file), refreshed every ``trainer.log_every_n_steps`` steps. A bar the user configures stays.
        Ours runs last: after the preemption callback has stopped the run at a step (``trainer.should_stop``),
        which gets a line as it gets the loggers' row (the job's log ended at the grid's step before)."""
        if any(isinstance(c, ProgressBar) for c in self._user_callbacks()):
            return
        for i, c in enumerate(trainer.callbacks):
            if isinstance(c, ProgressBar):
                del trainer.callbacks[i]
                trainer.callbacks.append(console_progress(max(1, int(trainer.log_every_n_steps or 1))))
                break


def _refuse_config_before_subcommand(args: list[str]) -> None:
    """``python -m pipeline --config C fit``: LightningCLI reads a config given before the subcommand as settings
    of every subcommand, nested under its name (``fit: {trainer: ...}``), so a config written for ``fit --config``
    was refused naming its first key (``Option 'trainer.max_steps' is not accepted before subcommand 'fit'``), and
    ``--print_config`` printed the defaults as if C were not there, exit 0."""
    subcommands = ("fit", "validate", "test", "predict")
    for i, arg in enumerate(args):
        if arg in subcommands:
            return
        if arg == "--config" or arg.startswith("--config=") or (arg.startswith("-c") and not arg.startswith("--")):
            sub = next((a for a in args[i + 1:] if a in subcommands), "fit")
            raise ConfigError(f"--config goes after the subcommand: python -m pipeline {sub} --config FILE (before "
                              f"it, LightningCLI would read FILE's settings nested under the subcommand's name)")


def main(argv: list[str] | None = None, cli: type[PipelineCLI] = PipelineCLI) -> int:
    """Run ``cli`` (``pipeline.config_check`` passes one that builds no trainer) and turn a refusal into one
    ``error:`` line and exit status 2 (a setting, a file) or 1 (the run failed)."""
    if error := follow_torchrun_agent() or follow_lightning_rank_zero():
        print(f"error: {error}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # a log file that cannot be written (W&B's debug.log on a full disk) is not worth a traceback per record:
    # those were tens of thousands of lines before the run's own `error:` line
    logging.raiseExceptions = False
    if raised := raise_open_files_limit():  # before any loader worker starts: they inherit it
        log.debug("limit of open files raised from %d to %d", *raised)
    preemption.defer_requeue_to_caller()  # a preempted fit's requeue waits for the end of this function
    keep_rank_zero_to_its_line()  # Lightning's launcher: a child's end no longer SIGKILLs rank 0 without a word
    drop_lightning_lines()
    quiet_other_ranks(is_global_rank_zero())
    # the loader position is in every checkpoint (ShardDataModule.state_dict): mid-epoch resumes are exact
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
    # checkpoints written before _drop_default_checkpointing hold the state of Lightning's default
    # ModelCheckpoint, which is gone on purpose
    warnings.filterwarnings("ignore", message=r"(?s).*Please add the following callbacks: "
                            r"\[\"ModelCheckpoint\{'monitor': None, [^\]]*\}\"\]\.$")
    # the best-k ModelCheckpoint after a validation that logged no val/top1: nothing to rank, not a misnamed
    # metric (pipeline.best_checkpoints ranks only after a validation)
    warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/top1'\)` could not find the monitored key")
    # val/ and test/ loss and samples are reduced over the ranks by hand (ImageClassifier.on_validation_epoch_end:
    # the exact mean over all samples, where sync_dist would average the ranks' means, and the summed count);
    # Lightning still advises sync_dist at every run (test's: under DeepSpeed, even with one rank)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/(loss|samples)', \.\.\., sync_dist=True\)`")
    # Lightning 2.6 calls a torch API that torch 2.14 deprecates (internal to Lightning, once per run)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # every resume: the checkpoint directory is the run's own, and fit resumes from it
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # a checkpoint of another run directory (`validate --ckpt_path OTHER/...`, a branch): its best-k
    # bookkeeping is that directory's; validate saves nothing and a branch keeps its own best k. Lightning's
    # warning printed its internal attribute names (`kth_best_model_path`, ...) at every such start
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")
    # mixed precision keeps the parameters in float32, which is what the summary then counts
    warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")
    if "SLURM_JOB_ID" not in os.environ:  # a login node or a laptop with Slurm's tools: not in a job, no hint
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    try:
        _refuse_config_before_subcommand(sys.argv[1:] if argv is None else argv)
        cli(
            ImageClassifier,
            ShardDataModule,
            args=argv,
            parser_class=PipelineArgumentParser,
            parser_kwargs={"prog": cli.PROG, "description": cli.DESCRIPTION},
            auto_configure_optimizers=False,
            save_config_callback=RunDirConfig,
            save_config_kwargs={"overwrite": True, "config_filename": CONFIG_FILE},
            trainer_defaults={"use_distributed_sampler": False, "default_root_dir": "runs/default"},
        )
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunComplete as e:
        _say(f"fit: {e}")
        return 0
    except MisconfigurationException as e:  # Lightning's own refusal of a trainer setting
        why = str(e).strip().splitlines()[0]
        if "no supported gpu backend" in why.lower():  # the ImageNet configs say accelerator: gpu
            why += " (trainer.accelerator asks for GPUs, and this machine has none: --trainer.accelerator cpu)"
        print(f"error: trainer: {why}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, DiskFullError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CorruptSampleError as e:  # the same sample would stop every retry: an `error:` line, no requeue
        print(f"error: {worker_error_message(e)}; repair the shard (`python -m data_prep verify` names damaged"
              " shards; rerunning the same data_prep command rewrites them) or set data.on_corrupt: skip",
              file=sys.stderr)
        return 1
    except SharedMemoryError as e:  # /dev/shm too small for the loader: every retry would stop the same way
        print(f"error: {worker_error_message(e)}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as e:  # the limit of open files: every retry would stop the same way
        if peer_gone(e):  # another rank ended: its own message says why (no `error:`: a crash is retried)
            # rank 0 of Lightning's launcher ends as the child rank that ended did (pipeline/launcher_ranks.py)
            line, status = children_outcome() or (peer_gone_message(e), 1)
            print(line, file=sys.stderr)
            a_peer_ended()
            return status
        if not out_of_file_descriptors(e):
            raise
        print(f"error: {open_files_advice()}", file=sys.stderr)
        return 1
    preemption.ignore_sigterm_before_requeue()
    _teardown_process_group()
    finish_pending_wandb_run()
    preemption.requeue_pending_job()  # last: Slurm cancels the step at once
    return 0


def _raised_in_this_package(error: BaseException) -> bool:
    """Whether this package's own code (a callback, a strategy, a plugin that Lightning called) raised
    ``error``: its traceback's innermost frame is here. (Not any frame of ours on the way: a strategy of ours
    passes the user's DeepSpeed settings on to Lightning's, whose refusal is the user's to read.)"""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here)


def worker_error_message(error: Exception) -> str:
    """The loader's one-line message. Raised in a DataLoader worker, the error reaches the trainer re-made
    by torch with the worker's whole traceback as its text; the message is that traceback's last line."""
    text = str(error).strip()
    if "Traceback (most recent call last)" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def _teardown_process_group() -> None:
    """barrier + destroy at the very end: without it gloo/NCCL processes sometimes abort at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
