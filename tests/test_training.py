"""End-to-end training through the CLI on real shards (digits): fit, validate, resume, clear errors."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli_in_process, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards: Path, run_dir: Path, *extra: str, check: bool = True, env: dict | None = None):
    return run_module(
        "pipeline", "fit", "--config", CONF, "--data.root", str(shards),
        "--trainer.default_root_dir", str(run_dir), "--data.num_workers", "1", *extra, check=check, env=env,
    )


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_lowers_loss_then_validate_then_resume(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = _fit(digits_shards, run, "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "1",
                 "--checkpoint.every_n_train_steps", "10")
    assert f"starting a new run in {run} (checkpoints: {run / 'checkpoints'})" in first.stderr, first.stderr[-3000:]
    refused = run_cli_in_process("fit", "--config", CONF, "--data.root", str(digits_shards), "--trainer.default_root_dir",
                                 str(tmp_path / "refused"), "--data.val_split", "nope")
    assert refused.returncode == 2 and "starting a new run" not in refused.stderr, "said of a start that never was"
    # stdout is a pipe here, as under Slurm: plain progress lines, no carriage returns or cursor codes
    assert "\r" not in first.stdout and "\x1b[" not in first.stdout
    assert re.search(r"^epoch 0 batch 1/22 \| train/loss \d[\d.]* \| [\d.]+ it/s$", first.stdout, re.M), first.stdout
    assert re.search(r"^epoch 0 validation \| val/top1 0\.\d+ \| val/top5 0\.\d+ \| val/loss", first.stdout, re.M)
    losses = [float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")]
    assert len(losses) >= 25
    # chance is ln 10 = 2.30; 30 steps take it to about 1.4 (a net that does not learn stays near 1.0 x)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, f"loss did not go down: {losses}"

    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30
    assert ckpt["ShardDataModule"]["consumed"] == (30 - 22) * 64, "loader position: 8 steps into epoch 1"

    out = run_module("pipeline", "validate", "--config", CONF, "--data.root", str(digits_shards),
                     "--trainer.default_root_dir", str(tmp_path / "val"), "--ckpt_path", str(last))
    assert "val/top1" in out.stdout + out.stderr
    # the scores once: Lightning's table, without a progress line of the same numbers above it
    assert out.stdout.count("val/top1") == 1 and "validation |" not in out.stdout, out.stdout
    # the checkpoint and its step, in one line of ours (Lightning's two lines named the path again, no step)
    assert f"validate: {last} (step 30)" in out.stderr, out.stderr[-3000:]
    assert "Restoring states" not in out.stderr and "Loaded model weights" not in out.stderr, out.stderr[-3000:]
    assert "dirpath has changed" not in out.stderr, "Lightning's warning about another run's best-k bookkeeping"

    resumed = _fit(digits_shards, run, "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1",
                   "--checkpoint.every_n_train_steps", "10")
    assert f"resuming from {last} at step 30" in resumed.stderr, resumed.stderr[-3000:]
    assert "Restoring states" not in resumed.stderr and "Restored all states" not in resumed.stderr
    assert "starting a new run" not in resumed.stderr
    assert "💡 Tip" not in resumed.stdout + resumed.stderr, "Lightning's product adverts in the run's log"
    assert "LeafSpec" not in resumed.stderr
    assert re.search(r"^epoch 1 batch 9/22 \| train/loss", resumed.stdout, re.M), "lines go on mid-epoch"
    if shutil.which("srun") and "SLURM_JOB_ID" not in os.environ:  # Slurm's tools here, but not in a job
        assert "`srun` command is available" not in resumed.stderr, "Lightning's srun hint outside a job"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 40, "continued from step 30, not from 0"
    assert ckpt["ShardDataModule"]["consumed"] == (40 - 22) * 64
    steps = [int(r["step"]) for r in _metrics(run) if r.get("train/loss")]
    assert max(steps) == 39 and steps.count(30) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model.arch", "resnet9000"], "resnet9000"),
        (["--data.root", "/nonexistent/shards"], "/nonexistent/shards"),
        (["--model.no_such_key", "1"], "no_such_key"),
        (["--data.backend", "tpu"], "tpu"),
        # numbers torch, DALI or the DataLoader would reject later, as a traceback not naming the setting
        (["--model.lr", "-1"], "model.lr must be in [0, 10000]"),
        (["--data.augment.scale", "[0.5, 0.1]"], "data.augment.scale must be (min, max)"),
        (["--checkpoint.every_n_train_steps", "-5"], "checkpoint.every_n_train_steps must be >= 0"),
        pytest.param(["--data.backend", "dali"], "data.backend 'dali' decodes on a CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run 'dali'")),
    ],
)
def test_bad_input_gives_a_clear_error(digits_shards, tmp_path, args, needle):
    proc = run_cli_in_process("fit", "--config", CONF, "--data.root", str(digits_shards), "--trainer.default_root_dir",
                              str(tmp_path / "run"), "--data.num_workers", "1", *args, "--trainer.max_steps", "1")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if needle.startswith(("model.", "data.", "checkpoint.")):  # ours: one line, exit 2, nothing trained
        assert proc.returncode == 2 and proc.stderr.rstrip().splitlines()[-1].startswith("error: " + needle)
        assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
        assert not (tmp_path / "run" / "wandb").exists(), "no W&B run for a refused setting"


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"lr_reference_batch": 0}, "model.lr_reference_batch must be >= 1"),
        ({"momentum": 1.0}, "model.momentum must be in [0, 1)"),
        ({"nesterov": True, "momentum": 0.0}, "model.momentum must be > 0 with model.nesterov true"),
        ({"weight_decay": -1e-4}, "model.weight_decay must be >= 0"),
        ({"label_smoothing": 1.5}, "model.label_smoothing must be in [0, 1)"),
        ({"warmup_epochs": -1}, "model.warmup_epochs must be >= 0"),
        ({"gamma": 0.0}, "model.gamma must be > 0"),
        ({"milestones": [82, -1]}, "model.milestones must be epochs >= 0"),
    ],
)
def test_model_settings_are_checked(kwargs, needle):
    from pipeline.errors import ConfigError
    from pipeline.module import ImageClassifier

    with pytest.raises(ConfigError, match=re.escape(needle)):
        ImageClassifier(arch="cifar_resnet20", num_classes=10, **kwargs)
    ImageClassifier(arch="cifar_resnet20", num_classes=10)  # the defaults pass


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"val_batch_size": 0}, "data.val_batch_size must be >= 1"),
        ({"num_workers": -1}, "data.num_workers must be in [0, 256]"),
        ({"worker_start_method": "spawn"}, "data.worker_start_method must be one of 'auto', 'forkserver', 'fork'"),
        ({"seed": -1}, "data.seed must be >= 0"),
        ({"window_shards": 0}, "data.window_shards must be >= 1"),
        ({"dali_hw_decoder_load": 1.5}, "data.dali_hw_decoder_load must be in [0, 1]"),
        ({"dali_source_workers": -1}, "data.dali_source_workers must be >= 0"),
        ({"prefetch_batches": 0}, "data.prefetch_batches must be >= 1"),
        ({"on_corrupt": "ignore"}, "data.on_corrupt must be 'fail' or 'skip'"),
        ({"augment": {"train_size": 0}}, "data.augment.train_size must be in [1, 4096]"),
        ({"augment": {"pad": -1}}, "data.augment.pad must be in [0, data.augment.train_size]"),
        ({"augment": {"ratio": (1.5, 1.0)}}, "data.augment.ratio must be (min, max)"),
        ({"augment": {"std": (0.2, 0.0, 0.2)}}, "data.augment.std must be 3 numbers in (0, 1]"),
    ],
)
def test_data_settings_are_checked(kwargs, needle, tmp_path):
    from pipeline.data.augment import AugmentConfig
    from pipeline.datamodule import ShardDataModule
    from pipeline.errors import ConfigError

    if "augment" in kwargs:
        kwargs = {"augment": AugmentConfig(recipe="cifar", **kwargs["augment"])}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ShardDataModule(root=str(tmp_path), **kwargs)
    ShardDataModule(root=str(tmp_path), augment=AugmentConfig(recipe="cifar"))  # the defaults pass


@pytest.mark.parametrize("prefetch", [None, 5])
def test_prefetch_batches_reaches_each_backend(digits_shards, prefetch):
    """data.prefetch_batches is the cpu loader's prefetch_factor (and its /dev/shm estimate's: test_resource_limits)
    and DALI's queue depth; unset, each keeps its default (2; 2 on dali-cpu)."""
    from pipeline.data.augment import AugmentConfig
    from pipeline.datamodule import ShardDataModule

    def loader(backend: str, workers: int):
        dm = ShardDataModule(root=str(digits_shards), backend=backend, num_workers=workers, batch_size=64,
                             prefetch_batches=prefetch, augment=AugmentConfig(recipe="cifar", train_size=32,
                                                                               val_size=32))
        dm.setup("fit")
        return dm, dm.val_dataloader()

    dm, cpu = loader("cpu", 3)
    assert cpu.prefetch_factor == (prefetch or 2)
    assert dm._cpu_prefetch() == (prefetch or 2)
    dm, dali = loader("dali-cpu", 1)
    assert dali.prefetch == (prefetch or 2)
    dm.teardown("fit")


def test_a_normalised_float16_batch_runs_under_every_precision():
    """The dali backend's batches are float16, normalised, channels_last: under ``trainer.precision
    32-true`` the first step failed ("expected scalar type Half but found Float")."""
    from pipeline.module import ImageClassifier

    module = ImageClassifier(arch="cifar_resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32).to(torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fp32 = module(x)  # 32-true: no autocast
        assert fp32.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed
            mixed = module(x)
        assert mixed.dtype == torch.bfloat16
        torch.testing.assert_close(mixed.float(), fp32, atol=0.1, rtol=0.1)
        torch.testing.assert_close(module.double()(x), fp32.double(), atol=1e-3, rtol=1e-3)  # 64-true


def test_the_trainers_start_up_lines_leave_out_what_says_nothing_here():
    """A real Trainer's start-up lines through the filter the CLI installs: the GPU line stays, the TPU line
    (this pipeline has no TPU path) goes; it was in every run's log."""
    import logging

    import pytorch_lightning as pl

    from pipeline.lightning_lines import RANK_ZERO_LOGGER, drop_lightning_lines

    drop_lightning_lines()
    logger, seen = logging.getLogger(RANK_ZERO_LOGGER), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    finally:
        logger.removeHandler(handler)
    assert any(line.startswith("GPU available: ") for line in seen), seen
    assert not any("TPU" in line for line in seen), seen


def test_a_two_rank_log_has_lightnings_start_up_lines_once(digits_shards, tmp_path):
    """Both ranks' stderr go to one log (a terminal, Slurm's file): each rank logged Lightning's "Seed set to 0"
    and "Initializing distributed: GLOBAL_RANK: k, ..." (and on GPUs its CUDA_VISIBLE_DEVICES), three lines per
    rank of a 32-GPU job. Rank 0's say it once."""
    from tests.conftest import free_port

    proc = _fit(digits_shards, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                "--trainer.max_steps", "2", "--tracking.wandb", "false", "--data.num_workers", "0",
                "--trainer.num_sanity_val_steps", "0", env={"MASTER_PORT": str(free_port())})
    assert proc.stderr.count("Seed set to 0") == 1 and "[rank: 1]" not in proc.stderr, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in proc.stderr and "GLOBAL_RANK: 1" not in proc.stderr, proc.stderr[-3000:]
    assert "weight parity: identical on 2 ranks" in proc.stderr, "the run itself went through"


def test_the_demo_outside_the_repository_and_a_failed_step_say_so_in_one_line(tmp_path):
    """Run from another folder (an installed package has no conf/), the demo ended in jsonargparse's error and a
    CalledProcessError traceback; a step that fails (a refused setting) ended in that traceback too."""
    from tests.conftest import REPO

    proc = run_module("pipeline.demo", check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --config conf/demo.yaml: no such file in") and "make demo" in proc.stderr
    proc = run_module("pipeline.demo", "--config", str(REPO / "conf" / "demo.yaml"), "--model.lr", "-1",
                      check=False, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: model.lr" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: the demo stopped: `python -m pipeline fit ...` "
                                                            "exited 2"), proc.stderr[-3000:]


def test_the_demos_help_names_the_command_and_where_other_arguments_go():
    """``python -m pipeline.demo --help`` said ``usage: demo.py`` and not that the demo passes any argument it
    does not know on to ``pipeline fit``."""
    for module in ("pipeline.demo", "pipeline.demo_data"):
        out = run_module(module, "--help").stdout
        assert out.startswith(f"usage: python -m {module} "), out
    assert "goes to `python -m pipeline fit`" in run_module("pipeline.demo", "--help").stdout


def test_the_augment_help_describes_the_recipes_and_every_setting():
    """README's ``--data.augment.help AugmentConfig`` printed the class description cut after its first line
    (jsonargparse shows a docstring's first paragraph), mid-sentence, and no option said what it does."""
    out = run_cli_in_process("fit", "--data.augment.help", "AugmentConfig").stdout
    text = " ".join(out.split())
    assert "What the loaders do to images, the same on every backend:" in text, out
    assert '"cifar" (the paper\'s 4-pixel pad + random crop + flip; eval on the image as is)' in text, out
    for option in ("recipe", "train_size", "val_resize", "val_size", "scale", "ratio", "pad", "pad_fill", "flip",
                   "mean", "std"):
        help_text = re.search(rf"--data\.augment\.{option} \S+ (.*?) \(type: ", text)
        assert help_text and help_text.group(1).strip(), f"--data.augment.{option} has no help: {out}"


def test_the_demo_again_keeps_its_earlier_run(tmp_path):
    """A second `make demo` deleted the first run (checkpoints, and the offline W&B run its summary had just said
    to upload later) and trained it all again. It is kept: fit finds it complete (or resumes it). The summary's
    upload command is the one this Python has (a plain `wandb` was not found outside the virtual environment)."""
    args = ["pipeline.demo", "--config", str(REPO / "conf" / "demo.yaml"), "--data", str(tmp_path / "data"),
            "--run-dir", str(tmp_path / "run"), "--model.arch", "cifar_resnet8", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--data.num_workers", "0"]
    first = run_module(*args, check=False, env={"WANDB_MODE": "offline"}, cwd=tmp_path)
    assert "== demo summary ==" in first.stdout, first.stderr[-3000:]  # (2 steps: short of the target, exit 1)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stamp, offline = last.stat().st_mtime_ns, sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    again = run_module(*args, check=False, env={"WANDB_MODE": "offline"}, cwd=tmp_path)
    assert f"fit: the run is complete: {last} is at step 2" in again.stderr, again.stderr[-3000:]
    assert last.stat().st_mtime_ns == stamp and offline and offline[0].is_dir()
    assert "== demo summary ==" in again.stdout, again.stdout[-3000:]
    from pipeline.demo import wandb_command

    assert f"(upload later: {wandb_command()} sync {offline[-1]})" in first.stdout
    assert shutil.which(wandb_command()), "the printed command runs from this shell"


def test_make_clean_removes_the_demo_and_no_other_run(tmp_path):
    """`make clean` ("starts over", the README says of the demo) was `rm -rf runs ...`: it also deleted every
    real run in `runs/`, where the configs put them (runs/imagenet_resnet50, checkpoints and W&B runs)."""
    import subprocess

    for d in ("runs/demo/checkpoints", "runs/imagenet_resnet50/checkpoints", "data/demo/shards", "data/imagenet",
              ".cache/torch_extensions"):
        (tmp_path / d).mkdir(parents=True)
    subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path), "clean"], check=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "data", "data/imagenet", "runs", "runs/imagenet_resnet50", "runs/imagenet_resnet50/checkpoints"]
