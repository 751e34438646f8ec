"""Training CLI edge cases a user hits: where checkpoints and the config land, explicit ``--ckpt_path``,
unreadable checkpoints for ``fit`` and ``validate``, a bad batch size on resume, a failed checkpoint
write (file-size limit), debris of a save killed mid-write."""

from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint_io import TMP_PREFIX
from tests.conftest import REPO, SMALL_NET, run_cli_in_process, run_module
from tests.damaged_checkpoints import flip_a_weight_byte

CONF = str(REPO / "conf" / "demo.yaml")


def _args(cmd: str, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pipeline", cmd, "--config", CONF, *SMALL_NET, "--data.root", str(shards), "--trainer.default_root_dir",
            str(run_dir), "--data.num_workers", "1", "--tracking.wandb", "false", *extra]


def _fails_clearly(proc: subprocess.CompletedProcess, rc: int, *needles: str) -> None:
    assert proc.returncode == rc, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> Path:
    """A run of 3 steps (W&B off, so Lightning's config and default checkpoints would go to RUN/csv/) in a
    directory with a space, started over the temporary file a save killed mid-write leaves behind."""
    run = tmp_path_factory.mktemp("review") / "run dir"
    stale = run / "checkpoints" / f"{TMP_PREFIX}last.ckpt.k1ll3d"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)
    run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "3"))
    return run


def test_one_checkpoint_tree_config_in_run_dir_readable_files(trained):
    ckpts = sorted(p.relative_to(trained).as_posix() for p in trained.rglob("*.ckpt"))
    assert ckpts == ["checkpoints/last.ckpt"], f"Lightning's default ModelCheckpoint wrote more: {ckpts}"
    assert (trained / "config.yaml").is_file() and not (trained / "csv" / "config.yaml").exists()
    assert not list((trained / "checkpoints").glob(TMP_PREFIX + "*")), "the killed save's temp file is gone"
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((trained / "checkpoints" / "last.ckpt").stat().st_mode)
    assert mode == 0o666 & ~umask, f"{mode:o}: not what a plain write gives under umask {umask:o}"


def test_explicit_ckpt_path_keeps_the_config(trained, digits_shards, tmp_path):
    """``--ckpt_path FILE`` behaves as a resume from ``last``: the command line wins (Lightning's CLI
    would load the checkpoint's hyper-parameters over it), another arch is refused."""
    last = trained / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    run = tmp_path / "run"
    run_module(*_args("fit", digits_shards, run, "--ckpt_path", str(last), "--model.lr", "0.05",
                      "--model.weight_decay", "0.0003", "--model.momentum", "0.8", "--trainer.max_steps", "4"))
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["lr"] == 0.05
    # the optimizer ran with them too: Lightning's restore of the optimizer and scheduler state brought back
    # the saved peak lr, weight decay and momentum, while the hyper-parameters above showed the new ones
    old_peak = before["lr_schedulers"][0]["base_lrs"][0]
    peak = old_peak * 0.05 / before["hyper_parameters"]["lr"]  # the same global batch: lr scales alone
    assert saved["lr_schedulers"][0]["base_lrs"] == pytest.approx([peak, peak])
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0003, 0.0] and all(g["momentum"] == 0.8 for g in groups)
    assert groups[0]["lr"] == pytest.approx(saved["lr_schedulers"][0]["_last_lr"][0]) and groups[0]["lr"] <= peak
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "other", "--ckpt_path", str(last),
                                     "--model.arch", "cifar_resnet32")[1:])
    _fails_clearly(proc, 2, f"the checkpoint {last} was trained with model.arch='cifar_resnet8'", "cifar_resnet32",
                   "use the original setting or a new run directory")
    assert not (tmp_path / "other").exists(), "refused before anything was written there"
    # validate of another network, W&B on: refused before the loggers start (it left a W&B run and a csv
    # version folder in RUN/validate/); the way out is the config of the run that saved the checkpoint (it
    # named no file, and said "a new run directory")
    args = _args("validate", digits_shards, trained, "--ckpt_path", str(last), "--model.arch", "cifar_resnet32")
    args[args.index("--tracking.wandb") + 1] = "true"
    before = sorted((trained / "validate").rglob("*"))
    proc = run_cli_in_process(*args[1:], env={"WANDB_MODE": "offline"})
    _fails_clearly(proc, 2, f"the checkpoint {last} was trained with model.arch='cifar_resnet8', this run has "
                   f"model.arch='cifar_resnet32'; validate it with the config it was trained with: --config "
                   f"{trained / 'config.yaml'}")
    assert sorted((trained / "validate").rglob("*")) == before


def test_a_resume_reads_last_ckpt_not_a_newer_copy_beside_it(trained, digits_shards, tmp_path):
    """Lightning's ``ckpt_path="last"`` loads the newest ``last*.ckpt`` of the folder: a user's copy there
    (``last_before_lr_change.ckpt``, an old ``last-v1.ckpt``) was resumed while the log said last.ckpt, whose
    position, geometry and W&B id were the ones checked."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckdir = run / "checkpoints"
    copy = ckdir / "last_before_lr_change.ckpt"
    shutil.copy2(ckdir / "last.ckpt", copy)  # step 3
    run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "5"))
    os.utime(copy)  # the newest file of the folder now
    proc = run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1"))
    assert f"resuming from {ckdir / 'last.ckpt'} at step 5" in proc.stderr, proc.stderr[-3000:]
    # a line per batch trained: step 5's alone (the copy, at step 3, would train batches 4, 5 and 6)
    assert re.findall(r"^epoch 0 batch (\d+)/", proc.stdout, re.M) == ["6"], proc.stdout
    saved = torch.load(ckdir / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 6 and copy.exists()


def test_a_resume_set_up_for_another_world_size_than_the_trainers_is_refused(trained, digits_shards, tmp_path):
    """The checkpoint's global batch is kept by adapting batch and accumulation to the world size expected
    before the trainer exists (WORLD_SIZE, Slurm's task count, the trainer settings). Where the trainer then
    runs another one (here Slurm says 2 tasks, a user's cluster environment says 1 process), the global
    batch and the loader's position would silently be wrong: refused, naming both."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    proc = run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "5", "--trainer.plugins",
                             "lightning_fabric.plugins.environments.LightningEnvironment"), check=False,
                      env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"})
    _fails_clearly(proc, 2, "this run has 1 rank", "global batch for 2")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3


def test_unreadable_checkpoints_and_bad_batch_fail_in_one_line(trained, digits_shards, tmp_path):
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes()[:100_000])
    for cmd in ("validate", "fit"):
        proc = run_cli_in_process(*_args(cmd, digits_shards, tmp_path / cmd, "--ckpt_path", str(torn))[1:])
        _fails_clearly(proc, 2, "cannot read checkpoint", str(torn))
    proc = run_cli_in_process(*_args("validate", digits_shards, tmp_path / "v", "--ckpt_path",
                                     str(tmp_path / "no.ckpt"))[1:])
    _fails_clearly(proc, 2, "does not exist", str(tmp_path / "no.ckpt"))
    proc = run_cli_in_process(*_args("fit", digits_shards, trained, "--data.batch_size", "0")[1:])
    _fails_clearly(proc, 2, "data.batch_size")


def test_a_torn_last_checkpoint_names_the_checkpoint_beside_it(digits_shards, tmp_path):
    """A last.ckpt cut short was refused with no way on: users deleted it and the run started over from step
    0 in its own directory. The error names the newest best-k checkpoint beside it; resuming from it works."""
    run = tmp_path / "run"
    steps = ["--data.batch_size", "128", "--trainer.max_steps"]
    run_module(*_args("fit", digits_shards, run, *steps, "12"))  # an epoch of 11 steps: its best-k save
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100_000])
    for cmd, verb in (("fit", "resume from"), ("validate", "score")):
        proc = run_cli_in_process(*_args(cmd, digits_shards, run, *steps, "14")[1:])
        _fails_clearly(proc, 2, f"cannot read checkpoint {last}: ", f"; {verb} the newest other checkpoint beside "
                       f"it: --ckpt_path {best}")
    proc = run_module(*_args("fit", digits_shards, run, *steps, "14", "--ckpt_path", str(best)))
    assert f"resuming from {best} at step 11" in proc.stderr, proc.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 14


def test_a_checkpoint_that_cannot_be_read_now_is_not_called_damaged(digits_shards, tmp_path, monkeypatch):
    """Only a torn or damaged checkpoint's error names a best-k checkpoint to go on from: one that could not be
    read now (a permission, an I/O error) may be whole and newer than every best-k save."""
    from pipeline.cli import PipelineCLI
    from pipeline.errors import ConfigError

    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / "best-epoch000-step0000011-top1=0.5000.ckpt").write_bytes(b"")
    last = ckdir / "last.ckpt"
    torch.save({"state_dict": {}}, last)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(last))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(ConfigError) as said:
        PipelineCLI._check_checkpoint(last, resume=True)
    assert "Permission denied" in str(said.value) and "beside it" not in str(said.value), said.value
    monkeypatch.undo()
    last.write_bytes(last.read_bytes()[:40])
    with pytest.raises(ConfigError, match="; resume from the newest other checkpoint beside it: --ckpt_path "):
        PipelineCLI._check_checkpoint(last, resume=True)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))  # ResNet-8's checkpoints are ~1 MB: writes fail


def test_failed_checkpoint_write_exits_1_naming_the_file_and_keeps_the_old_one(trained, digits_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    before = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(before)
    proc = subprocess.run(
        [sys.executable, "-m", *_args("fit", digits_shards, run, "--trainer.max_steps", "5")],
        capture_output=True, text=True, timeout=600, cwd=REPO, preexec_fn=_limit_file_size,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    _fails_clearly(proc, 1, "cannot write checkpoint", str(run / "checkpoints" / "last.ckpt"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_typo_in_the_augment_recipe_is_a_parse_error_naming_the_key(digits_shards, tmp_path):
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path, "--data.augment.recipe", "cifarr")[1:])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "recipe" in proc.stderr and "cifarr" in proc.stderr and "'imagenet', 'cifar'" in proc.stderr


@pytest.mark.parametrize("backend", ["cpu", "dali-cpu"])
def test_skipped_corrupt_samples_are_counted_in_the_logs(digits_shards, tmp_path, backend):
    """data.on_corrupt skip: the epoch's count reaches the loggers, also when DataLoader workers (whose own
    counters the training process never sees) did the decoding."""
    import csv

    from tests.test_dali_backend import corrupt_copy, zero_head

    shards = corrupt_copy(digits_shards, tmp_path / "shards", "train", 100, zero_head)
    # data.on_corrupt fail (the default): one `error:` line naming the sample as `data_prep verify` counts
    # it (the job script requeues a crash, not an `error:`), also from a DataLoader worker
    proc = run_module(*_args("fit", shards, tmp_path / "failed", "--data.backend", backend,
                             "--data.num_workers", "2", "--trainer.max_epochs", "1"), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"error: corrupt sample 100 \(train_\d+\.jpg\) of shard 'train-000000\.tar': .*; repair the"
                    r" shard .* or set data\.on_corrupt: skip$", errors[0]), errors[0]
    run = tmp_path / "run"
    run_module(*_args("fit", shards, run, "--data.backend", backend, "--data.num_workers", "2",
                      "--data.on_corrupt", "skip", "--trainer.max_epochs", "1"))
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    counts = [float(r["train/corrupt_skipped"]) for r in rows if r.get("train/corrupt_skipped")]
    assert counts == [1.0], counts


def test_a_user_callback_keeps_the_pipelines_defaults(digits_shards, tmp_path):
    """With any callback in ``trainer.callbacks`` the run still gets the plain progress lines and no second
    checkpoint tree: Lightning appends its default bar and ``ModelCheckpoint`` to the configured list, which
    the CLI took for the user's own and kept (a rich bar in every job log, a checkpoint per epoch in
    RUN/csv/checkpoints/)."""
    run = tmp_path / "run"
    proc = run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "23", "--data.num_workers", "0",
                             "--checkpoint.save_top_k", "0",
                             "--trainer.callbacks+=pytorch_lightning.callbacks.LambdaCallback"),
                      env={"PYTHONUNBUFFERED": "1"}, timeout=300)
    out = proc.stdout + proc.stderr
    assert "epoch 0 batch 5/22 | train/loss" in out and "━" not in out, out[-2000:]
    ckpts = sorted(p.relative_to(run).as_posix() for p in run.rglob("*.ckpt"))
    assert ckpts == ["checkpoints/last.ckpt"], ckpts


def _val_top1(run_dir: Path) -> float:
    import csv

    versions = sorted((run_dir / "validate" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv") as f:
        return float(next(r for r in csv.DictReader(f) if r.get("val/top1"))["val/top1"])


def test_validate_scores_the_run_directorys_checkpoint_or_refuses(trained, digits_shards, tmp_path):
    """Without ``--ckpt_path`` (or with ``last``) ``validate`` scored the untrained network, exit 0, its
    metrics logged as the run's: it now scores ``RUN/checkpoints/last.ckpt``, as ``fit`` resumes it, and a
    run directory without one is an error. Weights alone (an export) given as a checkpoint are named."""
    last = trained / "checkpoints" / "last.ckpt"
    run_module(*_args("validate", digits_shards, trained, "--ckpt_path", str(last)))
    explicit = _val_top1(trained)
    proc = run_module(*_args("validate", digits_shards, trained))
    assert f"validate: {last}" in proc.stderr, proc.stderr[-2000:]
    assert _val_top1(trained) == explicit
    proc = run_cli_in_process(*_args("validate", digits_shards, tmp_path / "empty", "--ckpt_path", "last")[1:])
    _fails_clearly(proc, 2, "ckpt_path: nothing to validate", "last.ckpt does not exist")

    weights = tmp_path / "net.pt"
    torch.save(torch.load(last, map_location="cpu", weights_only=False)["state_dict"], weights)
    for cmd in ("validate", "fit"):
        proc = run_cli_in_process(*_args(cmd, digits_shards, tmp_path / cmd, "--ckpt_path", str(weights))[1:])
        use = "score weights with --ckpt_path null --model.init_weights" if cmd == "validate" else \
            "start from weights with --model.init_weights"  # validate needs the null: it scores a checkpoint
        _fails_clearly(proc, 2, f"ckpt_path: {weights} is not a training checkpoint", use)


def _eval_row(run_dir: Path, stage: str) -> dict[str, float]:
    import csv

    versions = sorted((run_dir / stage / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv") as f:
        return {k: float(v) for k, v in next(csv.DictReader(f)).items() if v}


def test_test_scores_the_test_split_as_validation_does_and_predict_is_no_command(trained, digits_shards, tmp_path):
    """``python -m pipeline test`` failed ("No `test_step()` method defined") and ``predict`` did only after
    loading the checkpoint ("`predict_dataloader` must be implemented"), both listed in ``--help``. ``test``
    scores ``data.test_split`` (default: the val split) with the validation's exact metrics, as ``test/...``."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    run_module(*_args("validate", digits_shards, run))
    run_module(*_args("test", digits_shards, run))
    val, test = _eval_row(run, "validate"), _eval_row(run, "test")
    assert {k.replace("val/", "test/"): v for k, v in val.items() if k.startswith("val/")} == \
        {k: v for k, v in test.items() if k.startswith("test/")}, (val, test)
    run_module(*_args("test", digits_shards, run, "--data.test_split", "train"))
    train_samples = json.loads((digits_shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert _eval_row(run, "test")["test/samples"] == train_samples
    proc = run_cli_in_process(*_args("test", digits_shards, run, "--data.test_split", "foo")[1:])
    _fails_clearly(proc, 2, "data.test_split: split 'foo' is not in", "(it has: ['train', 'val'])")
    proc = run_cli_in_process(*_args("predict", digits_shards, run)[1:])
    assert proc.returncode == 2 and "invalid choice: 'predict'" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize("setting, value, needle", [
    ("trainer.accumulate_grad_batches", "-2", "trainer.accumulate_grad_batches must be an integer >= 1"),
    ("trainer.val_check_interval", "0", "trainer.val_check_interval must be a fraction"),
    ("trainer.check_val_every_n_epoch", "0", "trainer.check_val_every_n_epoch must be >= 1"),
    ("trainer.devices", "0", "trainer.devices must be >= 1"),
    ("trainer.max_time", "5min", "error: trainer: "),
    ("trainer.max_epochs", "0", "trainer.max_epochs must be >= 1 or -1"),  # were exit 0 with nothing trained
    ("trainer.limit_train_batches", "0", "trainer.limit_train_batches must be > 0"),
    # an option of the ImageNet nets on a CIFAR net: its options named, without num_classes (refused as one)
    ("model.arch_kwargs.stride_in_1x1", "true", "error: model.arch_kwargs: model 'cifar_resnet8' does not take "
     "['stride_in_1x1']; its options are ['plain', 'shortcut', 'zero_init_residual']"),
    ("model.arch_kwargs", '{"num_classes": 5}', "model.arch_kwargs.num_classes: not a setting: the number of "
     "classes comes from the shards' manifest"),
    ("data.augment.mean", "[123.675,116.28,103.53]", "data.augment.mean must be 3 numbers in [0, 1]"),
    ("data.augment.val_resize", "16", "data.augment.val_resize must be >= data.augment.val_size"),
    # found by a fuzz of the settings: tracebacks, or a kill by the kernel for memory
    ("trainer.strategy", "foo", "error: trainer.strategy: 'foo' is not one of: auto, ddp, "),
    ("trainer.accelerator", "tpu9", "error: trainer.accelerator: 'tpu9' is not one of: auto, cpu, cuda, gpu, mps, tpu"),
    ("trainer.devices", "abc", "error: trainer.devices must be a number of devices, -1 (all), 'auto', or GPU indices"),
    ("trainer.strategy", "deepspeed_stage_2", "trainer.strategy: DeepSpeed runs on CUDA GPUs and this run has none"),
    ("trainer.log_every_n_steps", "-1", "trainer.log_every_n_steps must be >= 1"),
    ("trainer.precision", "17", "error: trainer.precision: 17 is not one of: 64, 32, 16, transformer-engine, "),
    # weights and SGD state in half precision: late updates and the weight decay rounded away, silently
    ("trainer.precision", "bf16-true", "error: trainer.precision: bf16-true keeps the weights, the momentum and "
     "BatchNorm's statistics in bf16 without an fp32 copy"),
    ("trainer.precision", "16-true", "use 16-mixed"),
    # Lightning's TransformerEnginePrecision casts the module too (and without the package: a traceback)
    ("trainer.precision", "transformer-engine", "error: trainer.precision: transformer-engine (NVIDIA Transformer "
     "Engine) casts the whole network to bf16"),
    ("trainer.precision", "transformer-engine-float16", "to fp16 and speeds up its Linear layers only"),
    # a list setting: it said "is not one of:  (or null)"
    ("model.milestone_steps", "32000", "error: model.milestone_steps: expected list[int] in brackets, e.g. [30, 45] "
     "(or null), got 32000"),
    ("trainer.max_st", "0", "error: unrecognized arguments: --trainer.max_st 0"),  # a prefix was max_steps
    ("trainer.min_epochs", "-3", "trainer.min_epochs must be >= 0"),
    ("seed_everything", "-1", "seed_everything must be in [0, 4294967295]"),
    ("model.lr", "1e300", "model.lr must be in [0, 10000]"),
    ("data.augment.pad", "100000", "data.augment.pad must be in [0, data.augment.train_size]"),
    ("data.augment.train_size", "100000", "data.augment.train_size must be in [1, 4096]"),
    ("data.augment.pad", "null", "data.augment.pad must be set (its default: 4)"),
    ("data.num_workers", "100000", "data.num_workers must be in [0, 256]"),
    ("tracking.project", "a/b", "tracking.project: 'a/b' is not a W&B project name"),
    ("ckpt_path", "best", "ckpt_path: 'best' is not supported here"),
    pytest.param("trainer.accelerator", "gpu", "No supported gpu backend found! (trainer.accelerator asks for GPUs, "
                 "and this machine has none: --trainer.accelerator cpu)",  # the ImageNet configs' setting
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("model.arch_kwargs.plain", "no", "option plain of model 'cifar_resnet8' is true or false, not 'no'"),
    # Lightning's DistributedSampler over ours: each rank would read half its share under 2-rank DDP
    ("trainer.use_distributed_sampler", "true", "error: trainer.use_distributed_sampler must be false: the data "
     "module splits every epoch across the ranks itself"),
])
def test_bad_trainer_and_augment_settings_fail_in_one_line(digits_shards, tmp_path, setting, value, needle):
    """Each was a traceback (accumulate -2 as "Invalid learning rate", val_check_interval 0 as a
    ZeroDivisionError after the first step, Lightning's own refusals), or ran silently wrong (mean on the
    0-255 scale: near-constant inputs; a centre crop larger than the resize: black borders)."""
    extra = ["--data.augment.recipe", "imagenet", "--data.augment.val_size", "32"] if "val_resize" in setting else []
    extra += ["--tracking.wandb", "true"] if setting.startswith("tracking.") else []
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", *extra, f"--{setting}", value,
                                     "--trainer.max_steps", "2")[1:], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert not (tmp_path / "r").exists(), "a refused start left its run directory"


def test_a_cosine_schedule_without_a_run_length_is_refused(digits_shards, tmp_path):
    """``trainer.max_epochs -1`` with only ``trainer.max_time``: the cosine spanned one epoch, then the run
    trained on at lr 0 for as long as the job lasted, saying nothing."""
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--trainer.max_epochs", "-1",
                                     "--trainer.max_time", "00:00:01:00")[1:])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and "model.schedule: cosine decays over the run's length" in last, last


def test_parse_errors_are_short_and_name_the_config_file(digits_shards, tmp_path):
    """jsonargparse printed about 100 lines of usage before the error, a malformed YAML as
    ``in "<unicode string>"`` and a misspelt key in a config file without naming the file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [0.1, 0.2\ntrainer:\n  max_epochs: 1\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lrr: 0.1\n")
    aug = tmp_path / "aug.yaml"
    aug.write_text("data:\n  augment:\n    flipp: false\n")
    for extra, needles in [
        (["--config", str(bad)], [f"error: --config {bad} is not valid YAML: ", "at line 3, column 8"]),
        (["--config", str(typo)], [f"error: --config {typo}: unknown key model.lrr",
                                   "`python -m pipeline fit --help`"]),
        (["--model.num_classes", "5"], ["error: model.num_classes: not a setting"]),
        # inside data.augment (an optional settings class) jsonargparse listed every type of the union it tried
        (["--data.augment.flipp", "false"], ["error: unknown key data.augment.flipp"]),
        (["--config", str(aug)], [f"error: --config {aug}: unknown key data.augment.flipp"]),
        (["--data.augment.recipe", "imagnet"],
         ["error: data.augment.recipe: expected one of ['imagenet', 'cifar'], got imagnet"]),
        (["--data.augment.train_size", "abc"], ["error: data.augment.train_size: expected int, got abc"]),
    ]:
        proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", *extra)[1:])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and all(n in lines[-1] for n in needles), proc.stderr[-3000:]
        assert lines[-3].startswith("usage: python -m pipeline fit [--config FILE ...]") and len(lines) == 3, lines


def test_help_says_what_each_subcommand_does_here():
    """Lightning described the subcommands by their Trainer methods' first docstring lines: fit "Runs the full
    optimization routine.", test cut mid-sentence ("... make sure you never run on your")."""
    top = run_cli_in_process("--help")
    text = " ".join(top.stdout.split())
    assert top.returncode == 0 and "never run on your" not in text and "optimization routine" not in text, text
    from pipeline.cli import SUBCOMMAND_HELP

    assert all(" ".join(help.split()) in text for help in SUBCOMMAND_HELP.values()), text
    sub = run_cli_in_process("test", "--help")
    assert " ".join(SUBCOMMAND_HELP["test"].split()) in " ".join(sub.stdout.split()), sub.stdout[:3000]


def test_an_empty_validation_split_is_an_error_unless_validation_is_off(digits_shards, tmp_path):
    """A val split without samples trained with no validation and no best checkpoint, silently."""
    import json
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["val"].update(shards=[], samples=0, class_counts=[0] * len(manifest["classes"]))
    (root / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli_in_process(*_args("fit", root, tmp_path / "r", "--trainer.max_steps", "2")[1:])
    _fails_clearly(proc, 2, "the 'val' split", "has no samples", "--trainer.limit_val_batches 0")
    run_module(*_args("fit", root, tmp_path / "r2", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"))


def _one_split_of(shards: Path, split: str, to: Path, edit_manifest: bool = True) -> Path:
    """A copy of ``shards`` holding ``split``'s shards alone; its manifest lists no other split, or, as a copy of
    the shards of one split with the manifest would have it, every split."""
    import json
    import shutil

    shutil.copytree(shards, to)
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["splits"] = {split: manifest["splits"][split]} if edit_manifest else manifest["splits"]
    (to / "manifest.json").write_text(json.dumps(manifest))
    for other in [*to.glob("*.tar"), *to.glob(".work/*")]:  # the other split's shards and data_prep's work
        if not other.name.startswith(split):
            shutil.rmtree(other) if other.is_dir() else other.unlink()
    return to


def test_a_folder_of_one_split_trains_without_validation_and_is_scored(trained, digits_shards, tmp_path):
    """A fit with ``trainer.limit_val_batches 0`` on a folder of training shards alone was refused for want of
    the val split it would never read; validate and test on a folder of validation shards alone (copied to
    an evaluation machine) for want of the train split (the class count was read from it). Both run now;
    the scores equal those on the whole folder, and fit without a val split says how to train without it."""
    train_only = _one_split_of(digits_shards, "train", tmp_path / "train-only")
    val_only = _one_split_of(digits_shards, "val", tmp_path / "val-only")
    val_copied = _one_split_of(digits_shards, "val", tmp_path / "val-copied", edit_manifest=False)
    run_module(*_args("fit", train_only, tmp_path / "r", "--trainer.max_steps", "2", "--trainer.limit_val_batches",
                      "0"))
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()
    proc = run_cli_in_process(*_args("fit", train_only, tmp_path / "r2", "--trainer.max_steps", "2")[1:])
    _fails_clearly(proc, 2, "data.val_split: split 'val' is not in", "; or train without validation: "
                   "--trainer.limit_val_batches 0")
    proc = run_cli_in_process(*_args("fit", val_only, tmp_path / "r3", "--trainer.max_steps", "2")[1:])
    _fails_clearly(proc, 2, "data.train_split: split 'train' is not in", "(it has: ['val'])")

    last = str(trained / "checkpoints" / "last.ckpt")
    for stage in ("validate", "test"):
        rows = []
        for root in (digits_shards, val_only, val_copied):
            run = tmp_path / f"{stage}-{root.name}"
            run_module(*_args(stage, root, run, "--ckpt_path", last))
            rows.append(_eval_row(run, stage))
        assert rows[0] == rows[1] == rows[2] and rows[0][f"{'val' if stage == 'validate' else stage}/samples"] > 0, \
            rows
    proc = run_cli_in_process(*_args("fit", val_copied, tmp_path / "r4", "--trainer.max_steps", "2")[1:])
    _fails_clearly(proc, 2, f"shard '{val_copied / 'train-000000.tar'}' listed in the manifest is missing")


def test_data_root_and_split_mistakes_name_the_setting(digits_shards, tmp_path):
    a_file = tmp_path / "manifest.json"
    a_file.write_text("{}")
    proc = run_cli_in_process(*_args("fit", a_file, tmp_path / "r1", "--trainer.max_steps", "1")[1:])
    _fails_clearly(proc, 2, f"data.root: '{a_file}' is a file")
    for key in ("data.train_split", "data.val_split"):
        proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r2", f"--{key}", "foo",
                                         "--trainer.max_steps", "1")[1:])
        _fails_clearly(proc, 2, f"{key}: split 'foo' is not in", "(it has: ['train', 'val'])")


def test_validate_where_its_logs_cannot_be_written_fails_in_one_line(trained, digits_shards, tmp_path):
    """``RUN/validate`` not writable (here: a file in its place; a read-only run directory alike) was a
    traceback from the loggers."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    (run / "validate").write_text("in the way")
    proc = run_cli_in_process(*_args("validate", digits_shards, run)[1:])
    _fails_clearly(proc, 2, f"trainer.default_root_dir: cannot write {run / 'validate'}")


@pytest.mark.parametrize("sub", ["fit", "validate", "test"])
def test_help_describes_this_clis_run_directory_and_ckpt_path(sub):
    """``--help`` printed Lightning's texts: ``--ckpt_path last`` "the last model checkpoint from the previous
    ``trainer.fit`` call" and the run directory's default ``os.getcwd()``, neither what this CLI does."""
    proc = run_cli_in_process(sub, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps the help at the terminal's width
    assert "previous ``trainer.fit`` call" not in text and "os.getcwd()" not in text
    assert "The run directory RUN: checkpoints/" in text
    assert "RUN/checkpoints/last.ckpt" in text
    assert ("else a fresh start" in text) == (sub == "fit")
    # --ckpt_path's group was titled by Lightning's Trainer docstring: "Runs the full optimization routine:"
    assert "Runs the full optimization routine" not in text and "Perform one evaluation epoch" not in text
    title = "Checkpoint to resume or branch from:" if sub == "fit" else "Checkpoint to score:"
    assert re.search(rf"\n{title}\n +--ckpt_path CKPT_PATH\n", proc.stdout), proc.stdout


def test_top_level_help_names_export():
    """README names ``python -m pipeline export``; the top-level ``--help`` listed fit/validate/test only,
    under Lightning's "Lightning Trainer command line tool"."""
    proc = run_cli_in_process("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "python -m pipeline export CKPT OUT.pt" in text and "Lightning Trainer command line tool" not in text


def test_config_files_with_null_settings_scalars_for_sections_binary_or_empty_are_refused(digits_shards, tmp_path):
    """A config file's ``null`` passed jsonargparse for any setting (then a TypeError traceback), ``trainer: 5``
    was dropped without a word (the run trained with the defaults), a binary file was a UnicodeDecodeError,
    an empty one "Unexpected config:" and nothing after it."""
    files = {
        "null.yaml": ("data:\n  batch_size: null\n", "data.batch_size must be an int, got null (its default: 256)"),
        "nullsave.yaml": ("checkpoint:\n  save_top_k: null\n", "checkpoint.save_top_k must be an int, got null"),
        "scalar.yaml": ("trainer: 5\n", "trainer: expected a mapping of settings (trainer.KEY: VALUE), got 5"),
        "list.yaml": ("checkpoint: [1]\n", "checkpoint: expected a mapping of settings"),
        "binary.yaml": (b"\xff\xfe\x00bad", "is not a text (UTF-8) file"),
        "empty.yaml": ("# nothing here\n", "holds no settings (an empty file, or only comments)"),
    }
    for name, (text, needle) in files.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--config", str(path))[1:])
        _fails_clearly(proc, 2, needle)
        assert not (tmp_path / "r").exists(), name
        if name.startswith("null"):  # the file that set the null, also when it is not the last one read
            assert f"error: --config {path}: " in proc.stderr, proc.stderr
            other = tmp_path / "other.yaml"
            other.write_text("model:\n  lr: 0.05\n")
            proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--config", str(path),
                                             "--config", str(other))[1:])
            _fails_clearly(proc, 2, f"--config {path}: {needle}")


def test_refused_after_the_run_directory_was_made_removes_it(digits_shards, tmp_path):
    """An integer ``val_check_interval`` beyond an epoch was Lightning's traceback at the fit loop's start;
    refused starts left ``.lock`` and ``csv/`` behind (now removed when they hold only what a start writes)."""
    proc = run_module(*_args("fit", digits_shards, tmp_path / "r", "--trainer.val_check_interval", "100000"),
                      check=False)
    _fails_clearly(proc, 2, "trainer.val_check_interval must be at most the", "batches of an epoch here")
    assert not (tmp_path / "r").exists()
    a_file = tmp_path / "afile"
    a_file.write_text("")
    proc = run_cli_in_process(*_args("fit", digits_shards, a_file / "run")[1:])
    _fails_clearly(proc, 2, f"trainer.default_root_dir: {a_file} is a file, not a directory")


def test_val_check_interval_counts_the_epoch_under_gradient_accumulation(digits_shards, tmp_path):
    """The check counted an epoch's batches without ``trainer.accumulate_grad_batches`` (the loader's epochs
    are whole optimizer steps): an interval between the two counts passed it and was Lightning's traceback."""
    from pipeline.data.shards import ShardSet

    batches = len(ShardSet(digits_shards, "train")) // 64  # conf/demo.yaml's data.batch_size
    accumulate = next(a for a in (2, 3, 4, 5) if batches % a)
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--trainer.val_check_interval",
                                     str(batches), "--trainer.accumulate_grad_batches", str(accumulate))[1:])
    _fails_clearly(proc, 2, f"trainer.val_check_interval must be at most the {batches // accumulate * accumulate} "
                            f"batches of an epoch here")


def test_incomplete_or_torn_checkpoints_are_refused_in_one_line(trained, digits_shards, tmp_path):
    """Checkpoints that load but lack what a resume needs were KeyError or "Missing key(s)" tracebacks; a
    torn copy said "[Errno 22] Invalid argument" or miniz's internal error."""
    full = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cases = {
        "no_optimizer.ckpt": ({k: v for k, v in full.items() if k != "optimizer_states"},
                              "is an incomplete training checkpoint (it has no optimizer_states)"),
        "no_fc.ckpt": ({**full, "state_dict": {k: v for k, v in full["state_dict"].items() if ".fc." not in k}},
                       "the checkpoint's network does not fit model.arch 'cifar_resnet8' (missing: model.fc.weight"),
    }
    for name, (ckpt, needle) in cases.items():
        torch.save(ckpt, tmp_path / name)
        proc = run_module(*_args("fit", digits_shards, tmp_path / f"run_{name}", "--ckpt_path", str(tmp_path / name),
                                 "--trainer.max_steps", "5"), check=False)
        _fails_clearly(proc, 2, needle)
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    for cut in (50_000, 100_000):
        torn = tmp_path / f"torn{cut}.ckpt"
        torn.write_bytes(data[:cut])
        proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "torn", "--ckpt_path", str(torn))[1:])
        _fails_clearly(proc, 2, f"cannot read checkpoint {torn}: not a torch checkpoint, or torn (a copy cut short?)")
    # one byte of the weights flipped: loaded without a word, it resumed (or scored) other weights
    flipped = tmp_path / "flipped.ckpt"
    damaged, record = flip_a_weight_byte(data)
    flipped.write_bytes(damaged)
    for cmd in ("fit", "validate"):
        proc = run_cli_in_process(*_args(cmd, digits_shards, tmp_path / f"flipped_{cmd}", "--ckpt_path",
                                         str(flipped))[1:])
        _fails_clearly(proc, 2, f"checkpoint {flipped} is damaged: its record {record} does not match the CRC-32")


def test_validate_best_scores_the_highest_best_checkpoint_and_limit_0_is_refused(digits_shards, tmp_path):
    from pipeline.cli import best_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("best-epoch001-step0000010-top10.4000.ckpt", "best-epoch002-step0000020-top10.6500.ckpt",
                 "best-epoch003-step0000030-top1=0.5000.ckpt", "last.ckpt"):  # names before and since the "="
        (folder / name).write_bytes(b"")
    assert best_checkpoint(folder).name == "best-epoch002-step0000020-top10.6500.ckpt"
    (folder / "best-epoch004-step0000040-top1=0.7000.ckpt").write_bytes(b"")
    assert best_checkpoint(folder).name == "best-epoch004-step0000040-top1=0.7000.ckpt"
    proc = run_cli_in_process(*_args("validate", digits_shards, tmp_path / "empty", "--ckpt_path", "best")[1:])
    _fails_clearly(proc, 2, "ckpt_path: 'best':", "has no best-*.ckpt")
    proc = run_cli_in_process(*_args("validate", digits_shards, tmp_path, "--trainer.limit_val_batches", "0")[1:])
    _fails_clearly(proc, 2, "trainer.limit_val_batches is 0: validate would score no batch")


def test_a_wandb_run_id_path_that_is_a_directory_is_a_clear_error(digits_shards, tmp_path):
    (tmp_path / "r" / "wandb_run_id").mkdir(parents=True)
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--tracking.wandb", "true")[1:],
                              env={"WANDB_MODE": "offline"})
    _fails_clearly(proc, 2, "wandb_run_id holds '<a directory>', not a W&B run id")
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "s", "--tracking.wandb", "true")[1:],
                              env={"WANDB_MODE": "bogus"})
    _fails_clearly(proc, 2, "WANDB_MODE='bogus' is not a W&B mode")


def test_a_resume_with_new_settings_keeps_the_earlier_config(trained, digits_shards, tmp_path):
    """``RUN/config.yaml`` was rewritten by a resume with another ``model.lr``: what the first steps ran with
    was gone. It is kept in ``RUN/config-history/``, named by the step the new settings start from."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    first = (run / "config.yaml").read_text()
    proc = run_module(*_args("fit", digits_shards, run, "--model.lr", "0.05", "--trainer.max_steps", "4"))
    kept = run / "config-history" / "config-until-step0000003.yaml"
    # what changed, by name (the copy moved the run directory too)
    assert (f"settings changed (model.lr 0.1 -> 0.05, trainer.default_root_dir {trained} -> {run}, "
            f"trainer.max_steps 3 -> 4): the earlier config is kept as {kept}") in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    assert kept.read_text() == first
    now = yaml.safe_load((run / "config.yaml").read_text())
    assert now["model"]["lr"] == 0.05 and now["trainer"]["max_steps"] == 4
    assert yaml.safe_load(first)["model"]["lr"] != 0.05
    assert not list(run.glob(".config.yaml.*")), "the file written beside config.yaml was renamed into place"


def test_config_history_compares_settings_not_the_checkpoint_path(tmp_path):
    from pipeline.config_history import keep_earlier_config

    current, new = tmp_path / "config.yaml", tmp_path / "new.yaml"
    current.write_text("model:\n  lr: 0.1\nckpt_path: null\n")
    new.write_text("ckpt_path: /run/checkpoints/last.ckpt\nmodel: {lr: 0.1}\n")  # a restart: same settings
    assert keep_earlier_config(current, new, 7) is None and not (tmp_path / "config-history").exists()
    new.write_text("model:\n  lr: 0.2\n")
    assert keep_earlier_config(current, new, 7) == tmp_path / "config-history" / "config-until-step0000007.yaml"
    assert keep_earlier_config(current, new, 7) == tmp_path / "config-history" / "config-until-step0000007-2.yaml"
    current.write_bytes(b"\xff\x00torn")  # not YAML: kept, compared as bytes
    assert keep_earlier_config(current, new, 9).read_bytes() == b"\xff\x00torn"


def test_the_changed_settings_are_named_as_the_command_line_names_them(tmp_path):
    """"settings changed: the earlier config is kept as ..." said that something changed, not what: the user
    had to diff two YAML files to see which of a resume's flags took effect."""
    from pipeline.config_history import changed_settings

    current, new = tmp_path / "config.yaml", tmp_path / "new.yaml"
    current.write_text("ckpt_path: null\nmodel:\n  lr: 0.1\n  milestones: [30, 60]\n  init_weights: null\n"
                       "trainer: {max_steps: 10, precision: 32-true, deterministic: true}\n")
    new.write_text("ckpt_path: /r/checkpoints/last.ckpt\nmodel:\n  lr: 0.05\n  milestones: [30, 80]\n"
                   "  init_weights: null\ntrainer: {max_steps: 30, precision: bf16-mixed, deterministic: false}\n")
    assert changed_settings(current, new) == ("model.lr 0.1 -> 0.05, model.milestones [30, 60] -> [30, 80], "
                                              "trainer.deterministic true -> false, trainer.max_steps 10 -> 30 "
                                              "and 1 more")
    new.write_text("model: {lr: 0.1, milestones: [30, 60], init_weights: w.pt}\ntrainer: {max_steps: 10, "
                   "precision: 32-true, deterministic: true, max_epochs: 5}\n")
    assert changed_settings(current, new) == "model.init_weights null -> w.pt, trainer.max_epochs added"
    current.write_bytes(b"\xff\x00torn")  # not YAML: nothing to name
    assert changed_settings(current, new) == ""


def test_fit_of_a_complete_run_says_so_and_starts_nothing(trained, digits_shards, tmp_path):
    """The same ``fit`` again after the run reached ``trainer.max_steps`` restored everything, started a W&B
    run and ended with Lightning's "`Trainer.fit` stopped: `max_steps=3` reached"."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    stamp = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    proc = run_cli_in_process(*_args("fit", digits_shards, run, "--trainer.max_steps", "3",
                                     "--tracking.wandb", "true")[1:], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"fit: the run is complete: {run / 'checkpoints' / 'last.ckpt'} is at step 3 and trainer.max_steps is 3; "
            "nothing to train") in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before, "no W&B run, no new files"
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


def test_a_branch_from_a_checkpoint_past_its_end_is_refused_and_leaves_nothing(trained, digits_shards, tmp_path):
    """A branch into a new run directory from a checkpoint at or past trainer.max_steps said "the run is
    complete" (exit 0) of a run that did not exist, and checked nothing else of the command."""
    branch = tmp_path / "branch"
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = run_cli_in_process(*_args("fit", digits_shards, branch, "--trainer.max_steps", "2")[1:],
                              "--ckpt_path", str(ckpt))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: trainer.max_steps 2: {ckpt} is at step 3 already, so a branch from it into {branch} would train "
        f"nothing; give a larger trainer.max_steps"), proc.stderr[-3000:]
    assert not branch.exists()


def test_a_bug_of_ours_while_the_trainer_is_built_is_a_traceback_not_a_setting(digits_shards, tmp_path, monkeypatch):
    """Lightning's ValueError/TypeError while it builds the Trainer is its refusal of a setting (one `error:
    trainer: ...` line, as `trainer.max_time 5min` above). The same errors from this package's own code that
    Lightning calls there (a callback's ``state_key``, a strategy, a plugin) are bugs: said as a setting, their
    traceback was gone. Here a real TypeError in code compiled as ``pipeline/lightning_lines.py``'s: the
    filter of Lightning's log records that the CLI installs, which Lightning's messages pass through while it
    builds the Trainer."""
    from pipeline.lightning_lines import DropLightningLines

    where = {}
    exec(compile("def filter(self, record):\n    return record.getMessage() + None\n",
                 str(REPO / "pipeline" / "lightning_lines.py"), "exec"), where)
    monkeypatch.setattr(DropLightningLines, "filter", where["filter"])
    with pytest.raises(TypeError, match="can only concatenate str"):
        run_cli_in_process(*_args("fit", digits_shards, tmp_path / "run")[1:])


def test_a_devices_value_that_only_looks_like_a_number_is_refused_in_one_line(digits_shards, tmp_path):
    """`--trainer.devices=--3` passed the digits check (``lstrip("-")``) and ended in int()'s traceback."""
    from pipeline.trainer_devices import devices_as_int, devices_per_node

    assert [devices_as_int(v) for v in ("2", " 2 ", "-1", "--3", "3-", "")] == [2, 2, -1, "--3", "3-", ""]
    assert [devices_per_node(v) for v in ("--3", "0,1", [0, 1], "auto", 4)] == [None, 2, 2, None, 4]
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--trainer.devices=--3")[1:])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: trainer.devices must be a number of devices, -1 (all), "
                                                   "'auto', or GPU indices such as '0,1', got '--3'")


def test_a_run_whose_last_checkpoint_is_gone_resumes_its_newest_best_k(digits_shards, tmp_path):
    """last.ckpt moved away (a failed copy, a rename; or a kill between an epoch's best-k save and its last.ckpt)
    with best-k checkpoints beside it: the start trained from step 0 among them and called the earlier start's
    metrics those of "an earlier one that saved no checkpoint"."""
    run, kept = tmp_path / "run", tmp_path / "kept"
    common = ("--data.batch_size", "128", "--trainer.num_sanity_val_steps", "0", "--checkpoint.save_top_k", "2")
    run_module(*_args("fit", digits_shards, run, "--trainer.max_epochs", "2", *common))
    shutil.copytree(run, kept)  # resumed from its last.ckpt below: what the best-k resume must equal
    last = run / "checkpoints" / "last.ckpt"
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 2, best
    newest = max(best, key=lambda p: p.stat().st_mtime)
    steps = torch.load(newest, map_location="cpu", weights_only=False)["global_step"]
    last.rename(run / "checkpoints" / "last-backup.ckpt")
    r = run_module(*_args("fit", digits_shards, run, "--trainer.max_epochs", "3", *common))
    assert f"{last} is missing (moved or deleted?" in r.stderr and f"resuming the newest of them, {newest}" \
        in r.stderr, r.stderr[-3000:]
    assert f"at step {steps}" in r.stderr and "saved no checkpoint" not in r.stderr, r.stderr[-3000:]
    assert not list((run / "csv").glob("metrics-lost-start-*.csv"))
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == steps * 3 // 2
    # the same training as the resume of last.ckpt: the best-k checkpoint holds the loader position too
    run_module(*_args("fit", digits_shards, kept, "--trainer.max_epochs", "3", *common))
    ref = torch.load(kept / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ref["global_step"] == resumed["global_step"]
    differ = [k for k, v in ref["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, differ


def test_a_resume_at_another_accumulation_keeps_the_steps_an_integer_limit_meant(digits_shards, tmp_path):
    """Integer trainer.limit_train_batches (and val_check_interval) count a rank's micro-batches: a resume that
    keeps the global batch by accumulating 2 (2 ranks -> 1, or a smaller data.batch_size) ran half the steps per
    epoch, and the cosine schedule planned for those reached lr 0 half-way through the run."""
    run = tmp_path / "run"
    common = ("--trainer.limit_train_batches", "4", "--trainer.num_sanity_val_steps", "0",
              "--trainer.limit_val_batches", "0", "--checkpoint.save_top_k", "0")
    run_module(*_args("fit", digits_shards, run, "--data.batch_size", "64", "--trainer.max_epochs", "1", *common))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    r = run_module(*_args("fit", digits_shards, run, "--data.batch_size", "32", "--trainer.max_epochs", "2", *common))
    assert "x accumulate 2 (global 64)" in r.stderr, r.stderr[-3000:]
    assert ("trainer.limit_train_batches 4 -> 8 micro-batches: the same optimizer steps at accumulation 2"
            in r.stderr), r.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8


def test_a_micro_batch_count_that_another_accumulation_cannot_keep_is_refused():
    """Accumulating 2 -> 1 (a run of 1 rank x 32 x 2 resumed on 2 ranks): 3 micro-batches were 1.5 steps."""
    from jsonargparse import Namespace

    from pipeline.cli import _scale_micro_batch_counts
    from pipeline.errors import ConfigError

    trainer = Namespace(limit_train_batches=4, val_check_interval=0.5)
    _scale_micro_batch_counts(trainer, 2, 1)
    assert (trainer.limit_train_batches, trainer.val_check_interval) == (2, 0.5)
    trainer = Namespace(limit_train_batches=1.0, val_check_interval=3)
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval 3 counts micro-batches of "
                                          r"accumulate_grad_batches 2; .* give a multiple of 2, or a fraction"):
        _scale_micro_batch_counts(trainer, 2, 1)


def test_a_branch_without_last_checkpoint_starts_from_its_origin_not_from_older_best_k(digits_shards, tmp_path):
    """`launch submit train --branch-from ORIGIN` into a directory whose best-k files are of an earlier run (its
    last.ckpt gone): the job's `fit --ckpt_path last` resumed those in the branch's place."""
    from pipeline.branch_record import origin_name, record_origin

    origin_run, run = tmp_path / "origin", tmp_path / "run"
    common = ("--data.batch_size", "128", "--trainer.num_sanity_val_steps", "0")
    run_module(*_args("fit", digits_shards, origin_run, "--trainer.max_epochs", "1", *common))
    shutil.copytree(origin_run, run)
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "wandb_run_id").unlink(missing_ok=True)
    origin = origin_name(origin_run / "checkpoints" / "last.ckpt")
    record_origin(run, origin)  # as launch writes it before the job is queued
    r = run_module(*_args("fit", digits_shards, run, "--trainer.max_epochs", "2", "--ckpt_path", "last", *common))
    assert "is missing (moved or deleted?" not in r.stderr, r.stderr[-3000:]
    assert f"this run is a branch of {origin}" in r.stderr and f"starting from {origin} again" in r.stderr, \
        r.stderr[-3000:]


def test_a_run_ending_mid_epoch_ranks_no_best_k_checkpoint_it_did_not_validate(digits_shards, tmp_path):
    """Epoch 0 has 11 steps and validates at its end; the run stops at step 13, mid-epoch 1, with no validation
    after step 11. Lightning's best-k callback still ranked the end of epoch 1 by epoch 0's val/top1: a
    `best-epoch001-step0000013-top1=<epoch 0's score>.ckpt` of weights no validation had seen, which
    `--ckpt_path best` picked over the real one on a tie. Only validated weights are best-k; the key of the
    callback's state is Lightning's ModelCheckpoint's, as in the checkpoints saved before."""
    from pipeline.cli import best_checkpoint

    run = tmp_path / "run"
    proc = run_module(*_args("fit", digits_shards, run, "--trainer.max_steps", "13", "--checkpoint.save_top_k", "3",
                             "--data.batch_size", "128"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        validated = [int(r["step"]) + 1 for r in csv.DictReader(f) if r.get("val/top1")]
    assert validated == [11], validated
    best = sorted(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and best[0].startswith("best-epoch000-step0000011-"), best
    assert best_checkpoint(run / "checkpoints").name == best[0]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = [k for k in saved["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val/top1'")]
    assert len(keys) == 1 and saved["callbacks"][keys[0]]["best_k_models"], sorted(saved["callbacks"])


def test_16_mixed_under_deepspeed_is_refused_before_the_engine_starts(digits_shards, tmp_path):
    """DeepSpeed's fp16 mode (Lightning's 16-mixed under it) casts the parameters alone to fp16: the first
    convolution met its fp32 input, a 110-line traceback after the engine started, and config_check accepted it."""
    proc = run_cli_in_process(*_args("fit", digits_shards, tmp_path / "r", "--trainer.strategy",
                                     "deepspeed_stage_2_cpu", "--trainer.precision", "16-mixed",
                                     "--trainer.max_steps", "2")[1:])
    _fails_clearly(proc, 2, "trainer.precision: 16-mixed under DeepSpeed is its fp16 mode", "use bf16-mixed")
    assert not (tmp_path / "r").exists()
    check = run_module("pipeline.config_check", "fit", "--config", CONF, "--trainer.strategy", "deepspeed_stage_2_cpu",
                       "--trainer.precision", "16-mixed", check=False)
    assert check.returncode == 2 and "16-mixed under DeepSpeed" in check.stderr, check.stderr[-2000:]


def test_a_dotted_arch_option_is_saved_as_a_boolean_and_the_same_setting_again_is_no_change(digits_shards, tmp_path):
    """`--model.arch_kwargs.zero_init_residual false` reached RUN/config.yaml as the string 'false' (the network
    was right: the word is read as a boolean), and a resume with the same setting from a YAML file said
    "settings changed (model.arch_kwargs.zero_init_residual false -> false)" and kept a copy of a config that
    had not changed."""
    run = tmp_path / "run"
    proc = run_module(*_args("fit", digits_shards, run, "--model.arch_kwargs.zero_init_residual", "false",
                             "--trainer.max_steps", "1"))
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["arch_kwargs"]["zero_init_residual"] is False
    overlay = tmp_path / "zir.yaml"
    overlay.write_text("model:\n  arch_kwargs:\n    zero_init_residual: false\n")
    proc = run_module(*_args("fit", digits_shards, run, "--config", str(overlay), "--trainer.max_steps", "2"))
    assert "settings changed (trainer.max_steps 1 -> 2)" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("args", [("--config", CONF, "fit", "--print_config"), (f"--config={CONF}", "fit"),
                                  ("-c", CONF, "validate"), (f"-c{CONF}", "fit")])
def test_a_config_before_the_subcommand_is_refused_saying_where_it_goes(args):
    """LightningCLI reads a config before the subcommand as settings nested under the subcommand's name: with
    `--print_config` it printed the defaults (the file ignored), exit 0; without, a refusal naming the file's
    first key ("Option 'trainer.max_steps' is not accepted before subcommand 'fit'")."""
    proc = run_cli_in_process(*args)
    sub = next(a for a in args if a in ("fit", "validate"))
    _fails_clearly(proc, 2, f"--config goes after the subcommand: python -m pipeline {sub} --config FILE")


def test_every_fit_option_has_a_description_in_its_help():
    """`fit --help` showed SGD's momentum, nesterov and weight decay, the splits and every tracking.* and
    checkpoint.* option with their type alone (their docstrings described them in groups, or not at all)."""
    proc = run_module("pipeline", "fit", "--help")
    lines = proc.stdout.splitlines()
    bare = [line.split()[0] for line, after in zip(lines, lines[1:])
            if re.match(r"^  --[\w.]+( \S+)?\s*$", line) and after.strip().startswith("(type:")]
    assert not bare, bare
    assert re.search(r"--model\.momentum MOMENTUM\s+SGD's momentum", proc.stdout), proc.stdout[:2000]


def test_a_config_of_before_the_boolean_arch_options_is_no_change(tmp_path):
    """A run started before the CLI saved dotted arch options as booleans has 'false' in RUN/config.yaml; its
    first resume with the same setting said it changed (false -> false) and kept a copy."""
    from pipeline.config_history import changed_settings, keep_earlier_config

    old, new = tmp_path / "config.yaml", tmp_path / "new.yaml"
    old.write_text("model:\n  arch: cifar_resnet20\n  arch_kwargs:\n    zero_init_residual: 'false'\n")
    new.write_text("model:\n  arch: cifar_resnet20\n  arch_kwargs:\n    zero_init_residual: false\n")
    assert changed_settings(old, new) == "" and keep_earlier_config(old, new, 3) is None
