"""The lr schedule: the paper's CIFAR-10 recipe in steps, the linear and the constant warm-up, and the
lr a real run logs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from pipeline.optim import ignored_schedule_settings, lr_factor, schedule_against_run
from tests.conftest import REPO, run_cli_in_process, run_module


def test_cifar_config_is_the_papers_step_schedule() -> None:
    """He et al. sec. 4.2: lr 0.1, /10 at 32k and 48k iterations, stop at 64k; weight decay on every
    parameter. In steps, so a 45k/5k split (351 steps an epoch) or two ranks of 64 keep it."""
    conf = yaml.safe_load((REPO / "conf" / "cifar10_resnet20.yaml").read_text())
    model, trainer = conf["model"], conf["trainer"]
    assert model["milestone_steps"] == [32_000, 48_000] and not model["milestones"]
    assert trainer["max_steps"] == 64_000 and trainer["max_epochs"] is None
    assert model["weight_decay"] == 1e-4 and model["decay_norm_and_bias"] is True
    assert model["lr"] * conf["data"]["batch_size"] / model["lr_reference_batch"] == 0.1

    def lr(step: int) -> float:
        return model["lr"] * lr_factor(step, 64_000, 0, model["schedule"], model["milestone_steps"], model["gamma"])

    assert lr(0) == pytest.approx(0.1) and lr(31_999) == pytest.approx(0.1)
    assert lr(32_000) == pytest.approx(0.01) and lr(47_999) == pytest.approx(0.01)
    assert lr(48_000) == pytest.approx(0.001) and lr(63_999) == pytest.approx(0.001)


def test_the_cifar_config_runs_its_step_schedule_and_decays_every_parameter(digits_shards: Path,
                                                                           tmp_path: Path) -> None:
    """The CIFAR config itself, its milestones moved to steps 3 and 5: the logged lr and the optimizer's
    groups (BN and biases decay too; with decay_norm_and_bias false they do not)."""
    import torch

    def fit(run_dir: Path, *extra: str) -> tuple[dict[int, float], list[float]]:
        proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "cifar10_resnet20.yaml"),
                   "--data.root", str(digits_shards), "--data.val_split", "val", "--trainer.default_root_dir",
                   str(run_dir), "--trainer.max_steps", "7", "--model.milestone_steps", "[3, 5]",
                   "--trainer.limit_val_batches", "0", "--data.num_workers", "0", "--data.backend", "cpu",
                   "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "1", "--tracking.wandb",
                   "false", *extra, timeout=300)
        with open(run_dir / "csv" / "metrics.csv") as f:
            lrs = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in csv.DictReader(f) if r.get("lr-SGD/pg1")}
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        # max_epochs null: the progress lines still count the epoch's 11 batches (they counted the steps
        # left: "batch 6/1", "batch 7/0")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch 0 batch ")]
        assert [line.split(" | ")[0] for line in lines] == [f"epoch 0 batch {n}/11" for n in range(1, 8)], lines
        return lrs, [g["weight_decay"] for g in ckpt["optimizer_states"][0]["param_groups"]]

    lrs, decays = fit(tmp_path / "paper")
    assert [round(lrs[s], 6) for s in range(7)] == [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], lrs
    assert decays == [1e-4, 1e-4]
    _, decays = fit(tmp_path / "imagenet_style", "--model.decay_norm_and_bias", "false")
    assert decays == [1e-4, 0.0]
    proc = run_cli_in_process("fit", "--config", str(REPO / "conf" / "cifar10_resnet20.yaml"), "--data.root",
                              str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "both"),
                              "--model.milestones", "[82, 123]")
    assert proc.returncode == 2 and "model.milestone_steps must be null or [] when model.milestones is set" \
        in proc.stderr, proc.stderr[-2000:]


def test_warmups() -> None:
    linear = [lr_factor(s, 100, 4, "constant", [], 0.1) for s in range(6)]
    assert linear == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    constant = [lr_factor(s, 100, 4, "step", [50], 0.1, warmup_factor=0.1) for s in (0, 3, 4, 49, 50)]
    assert constant == pytest.approx([0.1, 0.1, 1.0, 1.0, 0.1])  # ResNet-110's 0.01, then 0.1, then /10
    cosine = [lr_factor(s, 104, 4, "cosine", [], 0.1) for s in (3, 4, 54, 104)]
    assert cosine == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_a_run_logs_the_constant_warmup_then_the_peak(digits_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
               "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "24", "--data.num_workers", "0",
               "--trainer.log_every_n_steps", "1", "--tracking.wandb", "false", "--model.schedule", "constant",
               "--model.warmup_epochs", "1", "--model.warmup_factor", "0.1", timeout=300)
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD/pg1")]
    lrs = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in rows}
    spe = 22  # 1437 digits // batch 64; peak lr 0.1 * 64 / 128 = 0.05
    assert lrs[0] == pytest.approx(0.005) and lrs[spe - 1] == pytest.approx(0.005), lrs
    assert lrs[spe] == pytest.approx(0.05), lrs


def test_fractional_milestones_fall_at_the_nearest_step_halves_up(digits_shards: Path, tmp_path: Path) -> None:
    """Epochs of 22 steps: milestones 0.25 and 0.75 are steps 5.5 and 16.5, so 6 and 17. Python's round (halves
    to even) put the second at 16, before its half-step, and the first after it."""
    run_dir = tmp_path / "run"
    run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
               "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "18", "--data.num_workers", "0",
               "--trainer.log_every_n_steps", "1", "--tracking.wandb", "false", "--model.schedule", "step",
               "--model.warmup_epochs", "0", "--model.milestones", "[0.25, 0.75]", "--trainer.limit_val_batches", "0",
               timeout=300)
    with open(run_dir / "csv" / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in csv.DictReader(f) if r.get("lr-SGD/pg1")}
    assert [round(lrs[s], 7) for s in (5, 6, 16, 17)] == [0.05, 0.005, 0.005, 0.0005], lrs


def test_a_warmup_in_steps_is_the_papers_resnet110_start(digits_shards: Path, tmp_path: Path) -> None:
    """model.warmup_steps: the paper's 400 iterations at lr 0.01 for ResNet-110, whatever an epoch's length
    (here 5 steps of 22 at 0.1 x the peak, then the peak); refused together with warmup_epochs."""
    run_dir = tmp_path / "run"
    run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
               "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "8", "--data.num_workers", "0",
               "--trainer.log_every_n_steps", "1", "--tracking.wandb", "false", "--model.schedule", "constant",
               "--model.warmup_epochs", "0", "--model.warmup_steps", "5", "--model.warmup_factor", "0.1",
               "--trainer.limit_val_batches", "0", timeout=300)
    with open(run_dir / "csv" / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in csv.DictReader(f) if r.get("lr-SGD/pg1")}
    assert [round(lrs[s], 6) for s in range(8)] == [0.005] * 5 + [0.05] * 3, lrs
    proc = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                              str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "both"),
                              "--model.warmup_steps", "400")  # demo.yaml warms up for 1 epoch
    assert proc.returncode == 2 and "model.warmup_steps must be null or 0 when model.warmup_epochs is set" \
        in proc.stderr, proc.stderr[-2000:]


def test_warmup_factor_out_of_range_is_a_config_error(digits_shards: Path, tmp_path: Path) -> None:
    proc = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                              str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"),
                              "--model.warmup_factor", "10")
    assert proc.returncode == 2 and "model.warmup_factor must be in (0, 1]" in proc.stderr, proc.stderr[-2000:]


def test_the_schedule_spans_the_steps_the_run_takes(digits_shards: Path, tmp_path: Path) -> None:
    """The cosine spans the optimizer steps where the trainer stops, counted as Lightning counts them:
    2 epochs cut to 9 batches (``limit_train_batches``) with accumulation 2 are 2 x 5 = 10 steps (Lightning
    steps on an epoch's last batch too). Each miscount was a bug: the ``max_steps`` cap (1000) stretched the
    cosine and the run ended near its peak lr; 4 steps an epoch took the lr to 0 a step early and
    `launch status` said "step 10 of 8"; the uncut 6 never reached the cosine's end. Every checkpoint
    records the planned steps and the global batch, which `launch status` reads."""
    import torch

    run_dir = tmp_path / "run"
    proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                      str(digits_shards), "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", "2",
                      "--trainer.max_steps", "1000", "--data.batch_size", "128", "--trainer.accumulate_grad_batches",
                      "2", "--trainer.limit_train_batches", "9", "--trainer.limit_val_batches", "0",
                      "--data.num_workers", "0", "--trainer.log_every_n_steps", "1", "--tracking.wandb", "false",
                      "--model.warmup_epochs", "0", "--model.milestone_steps", "[3]", timeout=300)
    # the step schedule's milestone, given to a cosine run: said, and it changes nothing below
    assert "warning: model.milestone_steps [3] is ignored: model.schedule is cosine" in proc.stderr, proc.stderr[-3000:]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [(int(r["step"]), float(r["lr-SGD/pg1"])) for r in csv.DictReader(f) if r.get("lr-SGD/pg1")]
    lrs = dict(rows)
    assert len(rows) == len(lrs), rows  # one lr row per optimizer step: Lightning's monitor wrote one per micro-batch
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10 and ckpt["progress"] == {"planned_steps": 10, "global_batch": 256}, ckpt["progress"]
    assert sorted(lrs) == list(range(10)) and lrs[0] == pytest.approx(0.2), lrs  # peak 0.1 * 256 / 128
    assert lrs[9] == pytest.approx(0.2 * lr_factor(9, 10, 0, "cosine", [], 0.1)) and 0 < lrs[9] < 0.01, lrs


def test_schedule_settings_that_would_do_nothing_are_said() -> None:
    """Accepted in silence before: a warm-up as long as the run (its lr never reached the peak, the cosine
    never started), milestones after the run's end, a warm-up in epochs that rounds to no step, milestones
    given to a cosine run, a warm-up factor without a warm-up."""
    assert schedule_against_run(100, 10, [50], "step", 0.5, 20) == []
    said = schedule_against_run(6, 110, [], "cosine", 5, 22)
    assert said == ["the warm-up (110 optimizer steps) is not shorter than the run (6 steps): the lr never reaches "
                    "model.lr's peak and the cosine schedule never starts"], said
    assert schedule_against_run(100, 0, [50, 100, 120], "step", 0, 20) == [
        "lr milestones at steps [100, 120] come at or after the run's end (100 steps): never reached"]
    assert schedule_against_run(100, 0, [], "cosine", 0.01, 20)[0].startswith(
        "model.warmup_epochs 0.01 is 0 optimizer steps at 20 steps an epoch: no warm-up")
    cosine = {"schedule": "cosine", "milestones": [30, 60], "milestone_steps": None, "warmup_factor": 0.1,
              "warmup_epochs": 0, "warmup_steps": None}
    assert ignored_schedule_settings(cosine) == [
        "model.milestones [30, 60] is ignored: model.schedule is cosine (milestones and model.gamma belong to the "
        "step schedule)",
        "model.warmup_factor 0.1 is ignored: there is no warm-up (model.warmup_epochs 0, model.warmup_steps null)"]
    assert ignored_schedule_settings({**cosine, "schedule": "step", "warmup_steps": 400}) == []
