"""Resume mid-epoch (from a mid-epoch stop, a cut epoch, a mid-epoch validation), under gradient
accumulation, and the logged rows and throughput around a stop and its resume. Split from test_resume.py
(one file per xdist worker: that file alone was 19 minutes of a CI run).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import torch

from bench.kill_resume import compare, fit_command, run_to_end, saved_step
from tests import preloaded_python
from tests.conftest import REPO
from tests.test_resume import _recording_scontrol, _train_rows

STEPS = 13  # 11 steps per epoch at batch 128: crosses an epoch end (validation, epoch-end checkpoint)


def test_preemption_under_gradient_accumulation_waits_for_the_optimizer_step(digits_shards, tmp_path):
    """accumulate 2: a trainer stopped after a micro-batch between two optimizer steps saves the position of
    the last step. A signal during the 3rd micro-batch (the first half of step 2) saves after the 4th,
    at global step 2 with 4 batches consumed, and the resumed run ends bit-exact with the uninterrupted
    one. A save between the two micro-batches would lose one micro-batch's gradients.
    The interrupted run saves no periodic checkpoint (``every_n_train_steps 0``, as the configs' first steps):
    Lightning's ``on_train_end`` then saved ``last.ckpt`` a second time, after the epoch count had moved
    on, and the resume skipped the rest of epoch 0 and the start of epoch 1."""
    ref, cut, stopped = tmp_path / "ref", tmp_path / "cut", tmp_path / "stopped"
    extra = ["--trainer.accumulate_grad_batches", "2", "--data.batch_size", "64"]
    steps = 5
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, ref, steps, extra), log)
        # should_stop after the 5th micro-batch (max_time's way: Lightning stops after any micro-batch): the
        # stop waits for step 3, 6 micro-batches (it saved after the 5th, whose gradients were never applied:
        # the resume went on from the 6th, and step 3 trained one micro-batch)
        run_to_end(fit_command(digits_shards, stopped, steps, extra + [
            "--checkpoint.every_n_train_steps", "0",
            "--trainer.callbacks+=tests.preemption_helpers.StopAtBatch", "--trainer.callbacks.batch_idx=4"]), log)
        saved = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 3, saved["global_step"]
        pos = saved["ShardDataModule"]
        assert (pos["epoch"], pos["batches"], pos["consumed"]) == (0, 6, 6 * 64), pos
        run_to_end(fit_command(digits_shards, stopped, steps, extra), log)
        diffs = compare(ref / "checkpoints" / "last.ckpt", stopped / "checkpoints" / "last.ckpt")
        assert not diffs, "stopped between micro-batches: " + "; ".join(diffs[:10])
        run_to_end(fit_command(digits_shards, cut, steps, extra + [
            "--checkpoint.every_n_train_steps", "0",
            "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=2"]), log)
        saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 2 and saved["ShardDataModule"]["epoch"] == 0, saved["ShardDataModule"]
        assert saved["ShardDataModule"]["batches"] == 4 and saved["ShardDataModule"]["consumed"] == 4 * 64
        run_to_end(fit_command(digits_shards, cut, steps, extra), log)
    text = (tmp_path / "runs.log").read_text()
    assert "preemption (SIGUSR1)" in text and "resuming from" in text
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_resume_into_accumulation_steps_on_whole_global_batches(digits_shards, tmp_path):
    """3 steps of batch 64, resumed with batch 32: the CLI keeps the global batch (accumulation 2) and
    Lightning's counter is restated as 6 batches of 32, so each later step takes two micro-batches: at
    step 6 the loader has consumed 6 x 64 samples (a counter left at 3 would step after one micro-batch
    first and end at 352)."""
    run = tmp_path / "run"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, 3, ["--data.batch_size", "64"]), log)
        run_to_end(fit_command(digits_shards, run, 6, ["--data.batch_size", "32"]), log)
    text = (tmp_path / "runs.log").read_text()
    assert "accumulate 2 (global 64)" in text, text[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    pos = saved["ShardDataModule"]
    assert saved["global_step"] == 6
    assert (pos["consumed"], pos["batches"], pos["batch_size"], pos["accumulate"]) == (6 * 64, 12, 32, 2), pos


UNTIL_END = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--model.schedule", "constant",
             "--model.warmup_epochs", "0"]


@pytest.fixture(scope="module")
def two_epochs(digits_shards, tmp_path_factory):
    """An uninterrupted run of two epochs (22 steps), no step limit, the lr constant."""
    ref = tmp_path_factory.mktemp("two_epochs") / "ref"
    with open(ref.parent / "run.log", "w") as log:
        run_to_end(fit_command(digits_shards, ref, -1, UNTIL_END), log)
    return ref


def test_a_run_stopped_mid_epoch_resumes_mid_epoch(two_epochs, digits_shards, tmp_path):
    """A run the trainer ends mid-epoch (here ``max_steps``; ``trainer.max_time`` and any ``should_stop`` end
    the epoch loop the same way, tested by hand with ``tests.preemption_helpers.StopAt``) saves last.ckpt
    in Lightning's epoch-end hook with the epoch counted processed. Resumed by a run without a step limit,
    Lightning took it for an epoch's end and started the next epoch: epoch 0's other batches were never
    trained on (the loader went on mid-epoch 0 under the name of epoch 1). It must resume mid-epoch and
    end as the uninterrupted run."""
    cut = tmp_path / "cut"
    with open(tmp_path / "runs.log", "w") as log:
        first = ["--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "0"]  # the end's save only
        run_to_end(fit_command(digits_shards, cut, -1, UNTIL_END + first), log)
        assert saved_step(cut / "checkpoints" / "last.ckpt") == 5
        run_to_end(fit_command(digits_shards, cut, -1, UNTIL_END), log)
    text = (tmp_path / "runs.log").read_text()
    resumed = text[text.rindex("resuming from"):]
    assert "epoch 0 batch 6/11" in resumed and "epoch 1 batch 11/11" in resumed, resumed[-3000:]
    assert saved_step(cut / "checkpoints" / "last.ckpt") == 22
    diffs = compare(two_epochs / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_resume_after_an_epoch_cut_by_limit_train_batches(digits_shards, tmp_path):
    """With ``trainer.limit_train_batches`` Lightning ends each epoch after that many batches, before the
    loader's end. The checkpoint of that epoch's end recorded the loader mid-epoch, so the resumed run
    trained epoch 1 on the rest of epoch 0's order (other samples, other crops): it must start epoch 1's."""
    common = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5",
              "--checkpoint.every_n_train_steps", "0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, ref, -1, common), log)
        killed = preloaded_python.run(fit_command(digits_shards, cut, -1, common + [
            "--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt", "--trainer.callbacks.step=7"]),
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        assert killed.returncode == -signal.SIGKILL
        assert saved_step(cut / "checkpoints" / "last.ckpt") == 5  # epoch 0's end
        run_to_end(fit_command(digits_shards, cut, -1, common), log)
    text = (tmp_path / "runs.log").read_text()
    assert "resuming epoch 0" not in text[text.rindex("resuming from"):], text[-3000:]
    assert saved_step(cut / "checkpoints" / "last.ckpt") == 10
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


MID_EPOCH_VAL = ["--trainer.val_check_interval", "5", "--checkpoint.save_top_k", "2"]  # after batches 5 and 10


def _validated_steps(run_dir) -> list[str]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r["step"] for r in csv.DictReader(f) if r.get("val/top1")]


def _ends_as(ref, cut) -> None:
    """Validated at the same steps, the same best-k files, bit-exact ``last.ckpt``."""
    assert _validated_steps(cut) == _validated_steps(ref)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == \
        sorted(p.name for p in (ref / "checkpoints").iterdir())
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


@pytest.fixture(scope="module")
def mid_epoch_ref(digits_shards, tmp_path_factory):
    """An uninterrupted run validating inside the epoch (after its 5th and 10th batches of 11)."""
    ref = tmp_path_factory.mktemp("mid_epoch_val") / "ref"
    with open(ref.parent / "run.log", "w") as log:
        run_to_end(fit_command(digits_shards, ref, STEPS, MID_EPOCH_VAL), log)
    assert _validated_steps(ref) == ["4", "9"]  # the CSV logger's step: optimizer steps before the validation
    return ref


def test_a_resume_from_an_earlier_checkpoint_by_name_keeps_the_later_history(mid_epoch_ref, digits_shards,
                                                                                tmp_path):
    """What a start killed after its last.ckpt leaves is cleaned at a resume of that last.ckpt (above); a
    run a user takes back by hand to one of its own earlier checkpoints (``--ckpt_path RUN/checkpoints/best-
    ...step5...``) keeps its later best-k files and metrics rows, at that start and at the next (a requeue,
    which resumes the new last.ckpt): the later history is theirs, not debris."""
    run = tmp_path / "run"
    shutil.copytree(mid_epoch_ref, run)
    later = sorted(p.name for p in (run / "checkpoints").glob("best-*step0000010-*"))
    earlier = next((run / "checkpoints").glob("best-*step0000005-*"))
    assert later, sorted(p.name for p in (run / "checkpoints").iterdir())
    with open(tmp_path / "run.log", "w") as log:
        run_to_end([a if a != "last" else str(earlier) for a in fit_command(digits_shards, run, 7, MID_EPOCH_VAL)],
                   log)
        assert "removed" not in (tmp_path / "run.log").read_text()
        assert all((run / "checkpoints" / name).exists() for name in later)
        assert _validated_steps(run)[:2] == ["4", "9"]
        # its next start (a requeue: --ckpt_path last) resumes its own last.ckpt, now at step 7: the old
        # timeline's best files of step 10 and its rows of steps 7-12 are not a killed start's debris
        old_rows = len(_train_rows(run))
        run_to_end(fit_command(digits_shards, run, 8, MID_EPOCH_VAL), log)
    assert saved_step(run / "checkpoints" / "last.ckpt") == 8
    assert "removed" not in (tmp_path / "run.log").read_text()
    assert all((run / "checkpoints" / name).exists() for name in later)
    assert len(_train_rows(run)) == old_rows + 1


def test_a_crash_during_a_mid_epoch_validation_validates_it_after_the_resume(mid_epoch_ref, digits_shards,
                                                                             tmp_path):
    """``trainer.val_check_interval`` 5, a save every step, SIGKILL as the first validation starts. The
    periodic save of step 5 was made before that validation, and Lightning, resuming from it, skips the
    validation due at that step: it was never run (nor ranked best-k), silently. Step 5 is saved after the
    validation instead, so the resume trains step 5 again and validates it, once; bit-exact."""
    cut = tmp_path / "cut"
    with open(tmp_path / "runs.log", "w") as log:
        killed = preloaded_python.run(fit_command(digits_shards, cut, STEPS, MID_EPOCH_VAL + [
            "--trainer.callbacks+=tests.preemption_helpers.KillInValidation"]),
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        assert killed.returncode == -signal.SIGKILL
        assert saved_step(cut / "checkpoints" / "last.ckpt") == 4
        run_to_end(fit_command(digits_shards, cut, STEPS, MID_EPOCH_VAL), log)
    _ends_as(mid_epoch_ref, cut)


def test_preemption_at_a_mid_epoch_validation_step_validates_before_stopping(mid_epoch_ref, digits_shards,
                                                                            tmp_path):
    """USR1 during batch 5, after which a validation is due: ``last.ckpt`` is saved at once, then the
    validation runs (and may save a best-k checkpoint), ``last.ckpt`` is saved again after it, and the run
    stops. Saved before the validation only (as a preemption elsewhere in the epoch is), the resume skipped
    it. The resumed run validates at step 10 only and ends bit-exact."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "81")}
    cut = tmp_path / "cut"
    proc = preloaded_python.run(fit_command(digits_shards, cut, STEPS, MID_EPOCH_VAL + [
        "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=4"]),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "at step 5, then stopping after this validation" in out, out[-3000:]
    assert _validated_steps(cut) == ["4"]
    assert saved_step(cut / "checkpoints" / "last.ckpt") == 5
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 81"]
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, cut, STEPS, MID_EPOCH_VAL), log)
    _ends_as(mid_epoch_ref, cut)


def test_ctrl_c_under_slurm_saves_and_stops_without_a_requeue(digits_shards, tmp_path):
    """Ctrl-C on an interactive ``srun`` (SIGINT): saved like a preemption, but the user asked to stop, so no
    requeue; a second Ctrl-C would stop at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "79")}
    run = tmp_path / "run"
    proc = preloaded_python.run(fit_command(digits_shards, run, 6, [
        "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=2",
        f"--trainer.callbacks.signum={int(signal.SIGINT)}"]), env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "preemption (SIGINT): saving" in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "Ctrl-C: saving last.ckpt at the next step, then stopping (Ctrl-C again: stop now" in out
    assert saved_step(run / "checkpoints" / "last.ckpt") == 3
    assert not (tmp_path / "scontrol.calls").exists(), "a Ctrl-C requeued the job"


def test_the_stopping_steps_metrics_row_has_its_own_throughput(digits_shards, tmp_path):
    """Lightning logs the step a preempted run stops at (step 7 here, between the every-5-steps rows): its
    perf/* values were the previous row's (step 4) repeated, stale numbers on the dashboard's last point."""
    import csv

    run = tmp_path / "run"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, STEPS, [
            "--trainer.log_every_n_steps", "5", "--checkpoint.requeue", "false",
            "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=7"]), log)
    assert saved_step(run / "checkpoints" / "last.ckpt") == 8
    with open(run / "csv" / "metrics.csv") as f:
        perf = [r for r in csv.DictReader(f) if r.get("perf/step_time_s")]
    assert [r["step"] for r in perf] == ["4", "7"], [r["step"] for r in perf]
    for key in ("perf/img_per_s_per_rank", "perf/step_time_s", "perf/data_wait_share"):
        assert perf[0][key] != perf[1][key], (key, perf)


def test_rows_and_console_lines_follow_the_loggers_steps_across_an_epoch_end(digits_shards, tmp_path):
    """Two epochs of 11 steps, a row every 4 global steps, the validation slowed by 5 s.

    Throughput: Lightning writes no row at an epoch's last step, so the window closed there was computed
    and never written. It goes on into the next epoch, less the time between the epochs: the row at step
    11 (global steps 9-12: three of epoch 0, one of epoch 1) has the step time of the others, and
    images/s x step time is one batch.

    Console: the log file's lines counted batches of the epoch (every 4th), the loggers global steps: they
    parted after epoch 0, the console showing losses no logger recorded and reading the metrics (a GPU
    synchronisation) at other steps than the loggers. Lines now come at the loggers' steps, and at an
    epoch's last batch."""
    import csv

    run = tmp_path / "run"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, 22, [
            "--trainer.log_every_n_steps", "4", "--trainer.callbacks+=tests.preemption_helpers.SlowValidation",
            "--trainer.callbacks.seconds=5"]), log)
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    perf = {r["step"]: r for r in rows if r.get("perf/step_time_s")}
    assert sorted(perf, key=int)[:5] == ["3", "7", "11", "15", "19"], sorted(perf)
    times = {k: float(r["perf/step_time_s"]) for k, r in perf.items()}
    assert times["11"] < max(times["3"], times["7"]) + 0.8, times  # 5 s over 4 steps: +1.25 s each if counted
    for r in perf.values():
        assert float(r["perf/img_per_s_per_rank"]) * float(r["perf/step_time_s"]) == pytest.approx(128, rel=1e-6), r

    text = (tmp_path / "runs.log").read_text()
    lines = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("epoch ") and " batch " in line]
    assert lines == ["epoch 0 batch 4/11", "epoch 0 batch 8/11", "epoch 0 batch 11/11", "epoch 1 batch 1/11",
                     "epoch 1 batch 5/11", "epoch 1 batch 9/11", "epoch 1 batch 11/11"], lines
    logged = [int(r["step"]) + 1 for r in rows if r.get("train/loss")]  # global steps done
    assert logged[:5] == [4, 8, 12, 16, 20], logged


def test_throughput_under_accumulation_is_per_optimizer_step(digits_shards, tmp_path):
    """With gradient accumulation the window closed on micro-batches where no row is written (Lightning
    logs at a group's last micro-batch): rows covered one micro-batch, and perf/step_time_s was a
    micro-batch's. Every row, the stop row of a preemption inside a group too, spans whole optimizer
    steps: images/s x time per step = the images of one optimizer step (2 x 128)."""
    import csv

    run = tmp_path / "run"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, run, STEPS, [
            "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "2", "--checkpoint.requeue",
            "false", "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=4"]),
            log)
    with open(run / "csv" / "metrics.csv") as f:
        perf = [r for r in csv.DictReader(f) if r.get("perf/step_time_s")]
    assert [r["step"] for r in perf] == ["1", "2"], perf  # global steps 2 (every 2) and 3, where it stopped
    for r in perf:
        images = float(r["perf/img_per_s_per_rank"]) * float(r["perf/step_time_s"])
        assert images == pytest.approx(256, rel=1e-6), r
