"""The run's planned length (``ImageClassifier.planned_steps``) when the run has no step or epoch limit, and
the warm-up warning's word on the peak lr: a run with ``trainer.max_steps -1 --trainer.max_epochs -1`` (or
``trainer.max_time`` alone) was planned as one epoch, warned that milestones after it were never reached
while the lr dropped at them, and `launch status` said "step 117 of 11 (100%); done"."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.module import ImageClassifier
from pipeline.optim import lr_factor, schedule_against_run
from tests.conftest import REPO, run_module


def _planned(max_steps: int, max_epochs: int, steps_per_epoch: int = 11) -> int | None:
    fake = SimpleNamespace(trainer=SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs),
                           steps_per_epoch=lambda: steps_per_epoch)
    return ImageClassifier.planned_steps(fake)  # type: ignore[arg-type]


def test_a_run_without_a_step_or_epoch_limit_has_no_planned_length() -> None:
    """-1 and -1 (Lightning's max_epochs for max_time alone is -1 too): no length, not one epoch's steps."""
    assert _planned(-1, -1) is None
    assert _planned(-1, 3) == 33 and _planned(20, -1) == 20 and _planned(20, 3) == 20 and _planned(50, 3) == 33
    assert _planned(-1, 1000) == 11_000  # max_epochs null, no max_time: Lightning's 1000 epochs


def test_no_length_no_warning_of_the_runs_end() -> None:
    """Nothing ends such a run before a milestone or the warm-up's end; a warm-up in epochs that rounds to no
    step is still said."""
    assert schedule_against_run(None, 50, [30, 40], "step", 0, 11) == []
    said = schedule_against_run(None, 0, [30], "step", 0.01, 11)
    assert len(said) == 1 and said[0].startswith("model.warmup_epochs 0.01 is 0 optimizer steps"), said


def test_the_warmup_warning_says_whether_the_peak_is_reached() -> None:
    """The linear warm-up's lr is (k+1)/W of the peak at step k: a run of W steps ends at the peak (step W-1),
    one shorter never reaches it; a constant warm-up (model.warmup_factor < 1) stays below it."""
    assert lr_factor(21, 22, 22, "cosine", [], 0.1) == 1.0 and lr_factor(20, 21, 22, "cosine", [], 0.1) < 1.0
    assert schedule_against_run(22, 22, [], "cosine", 0, 22) == [
        "the warm-up (22 optimizer steps) is not shorter than the run (22 steps): the lr reaches model.lr's peak "
        "only at the run's last step and the cosine schedule never starts"]
    assert schedule_against_run(21, 22, [], "cosine", 0, 22) == [
        "the warm-up (22 optimizer steps) is not shorter than the run (21 steps): the lr never reaches model.lr's "
        "peak and the cosine schedule never starts"]
    assert lr_factor(21, 22, 22, "step", [], 0.1, warmup_factor=0.1) == 0.1
    assert "the lr never reaches model.lr's peak" in schedule_against_run(22, 22, [], "step", 0, 22, 0.1)[0]
    assert "the lr stays at model.lr's peak (model.warmup_factor 1)" in \
        schedule_against_run(22, 22, [], "step", 0, 22, 1.0)[0]
    assert schedule_against_run(23, 22, [], "cosine", 0, 22) == []


def test_a_run_with_max_time_alone_plans_no_length(digits_shards: Path, tmp_path: Path) -> None:
    """The user's trial, shortened: a step schedule, no step or epoch limit, max_time. No "never reached"
    warning, the lr drops at its milestones, the checkpoint records no planned steps, and `launch status`
    says the step with no "of N" nor a percentage."""
    import torch

    from launch.status import report

    run_dir = tmp_path / "runs" / "open"
    proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                      str(digits_shards), "--trainer.default_root_dir", str(run_dir), "--model.arch", "cifar_resnet8",
                      "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:04",
                      "--model.schedule", "step", "--model.milestone_steps", "[1, 2]", "--model.warmup_epochs", "0",
                      "--trainer.limit_val_batches", "0", "--data.num_workers", "0", "--trainer.log_every_n_steps",
                      "1", "--tracking.wandb", "false", timeout=300)
    assert "never reached" not in proc.stderr and "run's end" not in proc.stderr, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = ckpt["global_step"]
    assert steps >= 3 and ckpt["progress"]["planned_steps"] is None, (steps, ckpt["progress"])
    with open(run_dir / "csv" / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr-SGD/pg1"]) for r in csv.DictReader(f) if r.get("lr-SGD/pg1")}
    assert [round(lrs[s], 6) for s in range(3)] == [0.05, 0.005, 0.0005], lrs  # peak 0.1 x 64 / 128
    text = report(run_dir)
    line = next(line for line in text.splitlines() if line.startswith("progress"))
    assert line == (f"progress     step {steps:,} (no planned end: the run has no trainer.max_steps or "
                    f"trainer.max_epochs limit)"), text
    row = next(line for line in report(run_dir.parent).splitlines() if line.strip().startswith("open"))
    assert f" {steps:,} " in row and " of " not in row and "done" not in row, row


def test_a_checkpoint_without_a_plan_has_no_progress_line(tmp_path: Path) -> None:
    """One saved before checkpoints recorded their plan: no progress line (docs/training.md), as before."""
    import torch

    from launch.checkpoints import read_checkpoint
    from launch.status import _progress_line

    old = tmp_path / "old.ckpt"
    torch.save({"global_step": 7, "epoch": 0}, old)
    assert _progress_line(read_checkpoint(old), None) is None
    planned = tmp_path / "planned.ckpt"
    torch.save({"global_step": 7, "epoch": 0, "progress": {"planned_steps": 14, "global_batch": 64}}, planned)
    assert _progress_line(read_checkpoint(planned), None) == "progress     step 7 of 14 (50%)"


@pytest.mark.parametrize("limits", [["--trainer.max_epochs", "-1"],
                                    ["--trainer.max_epochs", "null", "--trainer.max_time", "00:00:10:00"]])
def test_a_cosine_run_without_a_length_is_refused_before_submitting(digits_shards: Path, tmp_path: Path,
                                                                   limits: list[str]) -> None:
    """fit refuses it at its start (ImageClassifier.check_run_length); the check `launch submit train` runs
    before the queue accepted it."""
    proc = run_module("pipeline.config_check", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                      str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps",
                      "-1", *limits, "--tracking.wandb", "false", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: model.schedule: cosine decays over the run's length, and this run has none (no positive "
        "trainer.max_steps or trainer.max_epochs;"), proc.stderr[-3000:]
    ok = run_module("pipeline.config_check", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                    str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps",
                    "-1", "--trainer.max_epochs", "null", "--tracking.wandb", "false", check=False, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]  # Lightning's 1000 epochs
