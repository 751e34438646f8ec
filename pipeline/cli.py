"""``python -m pipeline fit|validate --config conf/X.yaml``: LightningCLI with the project's run layout.

A run directory (``trainer.default_root_dir``) holds everything of one training run: ``checkpoints/``
(``last.ckpt`` and the best k by val top-1), the W&B run id and files, CSV/TensorBoard logs and the
resolved config. ``fit`` resumes from ``checkpoints/last.ckpt`` when the run directory has one.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from data_prep.format import ManifestError
from pipeline.datamodule import ShardDataModule
from pipeline.errors import ConfigError
from pipeline.module import ImageClassifier
from pipeline.tracking import TrackingConfig, make_loggers

log = logging.getLogger("pipeline")


@dataclass
class CheckpointConfig:
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps (0: only at epoch ends) and at each
    epoch end; the best ``save_top_k`` by val/top1."""

    every_n_train_steps: int = 0
    save_top_k: int = 3


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


class PipelineCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(TrackingConfig, "tracking")
        parser.add_class_arguments(CheckpointConfig, "checkpoint")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes" if self.subclass_mode_model
                              else "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        run_dir = Path(cfg.trainer.default_root_dir or "runs/default")
        cfg.trainer.default_root_dir = str(run_dir)
        if sub == "fit" and cfg.get("ckpt_path") is None and (checkpoint_dir(run_dir) / "last.ckpt").is_file():
            cfg.ckpt_path = "last"
            print(f"resuming from {checkpoint_dir(run_dir) / 'last.ckpt'}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs):
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg.trainer.default_root_dir)
        ckpt = cfg.checkpoint
        callbacks = [
            ModelCheckpoint(
                dirpath=checkpoint_dir(run_dir),
                filename="best-epoch{epoch:03d}-step{step:07d}-top1{val/top1:.4f}",
                auto_insert_metric_name=False, monitor="val/top1", mode="max",
                save_top_k=ckpt.save_top_k, save_last=True,
            ),
            LearningRateMonitor(logging_interval="step"),
        ]
        if ckpt.every_n_train_steps > 0:
            callbacks.append(
                ModelCheckpoint(dirpath=checkpoint_dir(run_dir), save_top_k=0, save_last=True,
                                every_n_train_steps=ckpt.every_n_train_steps)
            )
        if self.trainer_class is not None and cfg.trainer.get("logger") in (None, True):
            kwargs.setdefault("logger", make_loggers(cfg.tracking, run_dir) or False)
        extra = kwargs.pop("callbacks", [])
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend(callbacks + list(extra))
        return trainer


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        PipelineCLI(
            ImageClassifier,
            ShardDataModule,
            args=argv,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"use_distributed_sampler": False, "default_root_dir": "runs/default"},
        )
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
