"""Resume semantics: bit-exact after SIGKILLs at random steps and a preemption signal, atomic checkpoint
writes, clear errors for incompatible resumes, the global batch kept across world sizes."""

from __future__ import annotations

import os
import random
import shutil
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.kill_resume import ARCH, compare, fit_command, run_and_kill_at, run_to_end, saved_step
from pipeline.checkpoint_io import TMP_PREFIX, AtomicCheckpointIO
from pipeline.errors import ConfigError
from pipeline.resume_geometry import Geometry, adapt, expected_world_size
from tests import preloaded_python
from tests.conftest import REPO, run_cli_in_process, run_module

STEPS = 13  # 11 steps per epoch at batch 128: crosses an epoch end (validation, epoch-end checkpoint)


def _recording_scontrol(work, job_id: str) -> dict[str, str]:
    """The environment of a run "under Slurm" whose ``scontrol`` is a stand-in appending its arguments to
    ``work/scontrol.calls`` (the real requeue is tested in launch/)."""
    bindir = work / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {work}/scontrol.calls\n')
    (bindir / "scontrol").chmod(0o755)
    return {"SLURM_JOB_ID": job_id, "PATH": f"{bindir}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def interrupted(digits_shards, tmp_path_factory):
    """An uninterrupted run and the same run SIGKILLed, then stopped by SIGTERM (no Slurm), then by
    SIGUSR1 under "Slurm", resumed each time. Signals go to the whole process group, as Slurm sends them."""
    work = tmp_path_factory.mktemp("killresume")
    seed = int(os.environ.get("KILL_SEED", time.time()))
    kills = sorted(random.Random(seed).sample(range(1, STEPS - 3), 3))  # room to act after the last
    ref, cut = work / "uninterrupted", work / "interrupted"
    last = cut / "checkpoints" / "last.ckpt"
    slurm = _recording_scontrol(work, "4242")
    landed = []
    with open(work / "runs.log", "w") as log:
        print(f"kill seed {seed}: {kills}", file=log, flush=True)
        run_to_end(fit_command(digits_shards, ref, STEPS), log)
        for i, k in enumerate(kills):
            k = max(k, saved_step(last) + 1)
            sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)[i]  # USR1 "under Slurm": requeue
            landed.append((sig, run_and_kill_at(fit_command(digits_shards, cut, STEPS), last, k, log,
                                                sig=sig, env=slurm if sig == signal.SIGUSR1 else None)))
        run_to_end(fit_command(digits_shards, cut, STEPS), log)
    return work, ref, cut, landed, seed


def test_killed_and_preempted_run_is_bit_exact(interrupted):
    work, ref, cut, landed, seed = interrupted
    assert len(landed) == 3, landed
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, f"kill seed {seed}, kills at {landed}: " + "; ".join(diffs[:10])
    assert saved_step(cut / "checkpoints" / "last.ckpt") == STEPS
    assert not (cut / "config-history").exists(), "restarts with the same settings keep no earlier config"
    text = (work / "runs.log").read_text()
    assert "preemption (SIGTERM)" in text and "preemption (SIGUSR1)" in text
    assert "the run is not finished (stopped at step" in text, "outside Slurm, exit 0 says it is unfinished"
    assert text.count("resuming from") >= 3
    # rank 0 asked Slurm, once, to requeue the job (and nobody without SLURM_JOB_ID)
    assert (work / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]
    assert not list((cut / "checkpoints").glob(TMP_PREFIX + "*")), "a killed save left no temp file behind"


def test_preemption_at_an_epochs_last_batch_validates_that_epoch_first(interrupted, digits_shards, tmp_path):
    """A signal at epoch 0's last batch (step 11), best 1 as in the configs: ``last.ckpt`` is saved at once,
    then the epoch's validation and best checkpoint run before the stop (Lightning resumes a last-batch
    checkpoint in the next epoch: that epoch was never validated and never a best candidate). The periodic
    save would fall on that batch too (``every_n_train_steps`` 11; it waits for the epoch end), and the
    epoch end skips the step the preemption saved, so ``last.ckpt`` stays the last-batch one: a start that
    trains nothing (``max_epochs`` 1 reached)
    must leave it as it is (it rewrote it with the epoch count one ahead, and a run extended from there
    trained its next epoch in the wrong order). The resumed run is bit-exact."""
    import csv
    import hashlib

    _, ref, *_ = interrupted
    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"
    settings = ["--checkpoint.every_n_train_steps", "11", "--checkpoint.save_top_k", "1"]
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, cut, STEPS, settings + [
            "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=10"]), log)
        saved = torch.load(last, map_location="cpu", weights_only=False)
        assert saved["global_step"] == 11, saved["global_step"]
        pos = saved["ShardDataModule"]
        assert (pos["epoch"], pos["consumed"]) == (1, 0), pos  # epoch 0 finished: epoch 1 starts fresh
        with open(cut / "csv" / "metrics.csv") as f:
            validated = {r["epoch"] for r in csv.DictReader(f) if r.get("val/top1")}
        assert validated == {"0"}, validated
        assert [p.name for p in (cut / "checkpoints").glob("best-*")] != [], "epoch 0 was a best candidate"

        done = tmp_path / "done"  # the same state, with max_epochs 1: nothing left to train
        shutil.copytree(cut, done)
        digest = hashlib.sha256((done / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
        run_to_end(fit_command(digits_shards, done, -1, settings + ["--trainer.max_epochs", "1"]), log)
        assert hashlib.sha256((done / "checkpoints" / "last.ckpt").read_bytes()).hexdigest() == digest
        # said, and before anything starts (it opened an empty W&B start and trained nothing)
        said = (tmp_path / "runs.log").read_text()
        assert f"fit: the run is complete: {done / 'checkpoints' / 'last.ckpt'} ends epoch 0 and " \
               f"trainer.max_epochs is 1; nothing to train" in said, said[-3000:]

        run_to_end(fit_command(digits_shards, cut, STEPS, settings), log)
    assert "then stopping at the end of epoch 0, after its validation" in (tmp_path / "runs.log").read_text()
    diffs = compare(ref / "checkpoints" / "last.ckpt", last)
    assert not diffs, "; ".join(diffs[:10])


def test_a_crash_during_an_epochs_validation_validates_that_epoch_after_the_resume(interrupted, digits_shards,
                                                                                    tmp_path):
    """Saves every step; SIGKILLed as epoch 0's validation starts. The periodic save of epoch 0's last step
    (11) made before that validation was resumed in epoch 1: epoch 0 was never validated (nor a best-k
    candidate), silently. The last step is saved after the validation instead, so the resume trains step 11
    again and validates epoch 0, once; bit-exact with the uninterrupted run."""
    import csv

    _, ref, *_ = interrupted
    cut = tmp_path / "cut"
    with open(tmp_path / "runs.log", "w") as log:
        killed = preloaded_python.run(fit_command(digits_shards, cut, STEPS, [
            "--trainer.callbacks+=tests.preemption_helpers.KillInValidation"]),
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        assert killed.returncode == -signal.SIGKILL
        assert saved_step(cut / "checkpoints" / "last.ckpt") == 10
        run_to_end(fit_command(digits_shards, cut, STEPS), log)
    with open(cut / "csv" / "metrics.csv") as f:
        validated = [r["epoch"] for r in csv.DictReader(f) if r.get("val/top1")]
    assert validated == ["0"], validated
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_a_signal_during_validation_stops_at_the_epochs_end(interrupted, digits_shards, tmp_path):
    """USR1 "under Slurm" during epoch 0's validation: the run stops with epoch 0's end checkpoint (step 11,
    epoch 1 at sample 0) and requeues; it went on into epoch 1 and stopped a step or two later, so the new
    epoch's loaders and steps had to fit in the grace time. The resumed run ends bit-exact."""
    _, ref, *_ = interrupted
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "79")}
    cut = tmp_path / "cut"
    proc = preloaded_python.run(fit_command(digits_shards, cut, STEPS, [
        "--trainer.callbacks+=tests.preemption_helpers.SignalInValidation"]),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "preemption (SIGUSR1): saving" in out and "at step 11, then stopping at the end of epoch 0\n" in out, \
        out[-3000:]
    saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    pos = saved["ShardDataModule"]
    assert (saved["global_step"], pos["epoch"], pos["consumed"]) == (11, 1, 0), (saved["global_step"], pos)
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 79"]
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, cut, STEPS), log)
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    mask = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(mask >> (int(sig) - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1-imports", "TERM-sanity-check"])
def test_a_signal_before_the_first_step_stops_after_it_and_requeues(digits_shards, tmp_path, sig):
    """A signal during start-up, before the training loop: USR1 killed the process (exit 138, Slurm's batch
    script counted a crash), SIGTERM went to Lightning's handler, which ended the run with exit 0 and no
    requeue (the job ended COMPLETED, unfinished). Now either stops the run after its first step, saved, and
    requeues the job. USR1 arrives while ``fit`` still imports (as soon as it catches USR1, seconds before
    the trainer exists), TERM during the sanity-check validation (the Preemption callback's own handler)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "77")}
    run = tmp_path / "run"
    extra = ["--trainer.callbacks+=tests.preemption_helpers.SignalAtSanityCheck",
             f"--trainer.callbacks.signum={int(sig)}"] if sig == signal.SIGTERM else []
    cmd = fit_command(digits_shards, run, STEPS, ["--checkpoint.every_n_train_steps", "0", *extra])
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if sig == signal.SIGUSR1:
        deadline = time.monotonic() + 120
        while not _catches(proc.pid, sig) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    if sig == signal.SIGUSR1:
        assert "preemption (SIGUSR1) received during start-up" in out, out[-3000:]
    assert f"preemption ({sig.name}): saving" in out, out[-3000:]
    assert saved_step(run / "checkpoints" / "last.ckpt") == 1
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 77"]


def test_a_signal_during_start_up_of_a_resume_at_an_epochs_end_makes_progress(digits_shards, tmp_path):
    """A run stopped at an epoch's last step (max_steps there), resumed with more steps, USR1 during the
    resume's start-up (a time-limit warning that comes as the requeued job starts): Lightning ends the
    restored epoch again, and the stop came there, saved at the step it began at; every requeue did the same
    (five requeues, no step). It stops after its first step now."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "79")}
    run = tmp_path / "run"
    epoch = 1434 // 128  # the digits' train split in batches of 128: the first epoch's last step
    run_to_end(fit_command(digits_shards, run, epoch, ["--checkpoint.every_n_train_steps", "0"]), subprocess.DEVNULL)
    assert saved_step(run / "checkpoints" / "last.ckpt") == epoch
    proc = subprocess.Popen(fit_command(digits_shards, run, epoch + 3, ["--checkpoint.every_n_train_steps", "0"]),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not _catches(proc.pid, signal.SIGUSR1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption (SIGUSR1) received during start-up" in out, out[-3000:]
    assert f"preemption (SIGUSR1): saving {run / 'checkpoints' / 'last.ckpt'} at step {epoch + 1}, then " \
           f"stopping" in out, out[-3000:]
    assert saved_step(run / "checkpoints" / "last.ckpt") == epoch + 1
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 79"]


def test_usr1_after_the_fit_ended_is_ignored(tmp_path):
    """Slurm's time-limit USR1 after `Trainer.fit` stopped (a run that ended near its time limit): the handlers
    were put back at the fit's teardown, and USR1's default action killed the process (exit 138) in what comes
    after (the weight check, W&B's finish): the batch script took the finished run for a crash, requeued it
    and kept its node out. A fit's Preemption callback set up and torn down, then USR1: the process lives."""
    code = (
        "import os, signal, time\n"
        "from types import SimpleNamespace\n"
        "from pipeline.preemption import Preemption\n"
        "p = Preemption('last.ckpt')\n"
        "trainer = SimpleNamespace(_signal_connector=None, global_rank=0, world_size=1, is_global_zero=True)\n"
        "p.setup(trainer, None, 'fit'); p.teardown(trainer, None, 'fit')\n"
        "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2); print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "alive\n", (proc.returncode, proc.stderr[-2000:])
    assert "preemption (SIGUSR1) after the fit ended: nothing left to save; ignored" in proc.stderr


def test_a_signal_at_the_runs_last_step_does_not_requeue_a_finished_run(digits_shards, tmp_path):
    """USR1 "under Slurm" at step 3 of max_steps 3: saved and stopped as the run would anyway; the job was
    requeued all the same, and its next start queued only to find nothing to train."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **_recording_scontrol(tmp_path, "78")}
    run = tmp_path / "run"
    proc = preloaded_python.run(fit_command(digits_shards, run, 3, [
        "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx=2"]),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "at step 3, then stopping (the run's last step: it is complete, no requeue)" in out, out[-3000:]
    assert saved_step(run / "checkpoints" / "last.ckpt") == 3
    assert not (tmp_path / "scontrol.calls").exists(), "a finished run was requeued"
    assert "not finished" not in out


def _train_rows(run) -> list[tuple[int, str]]:
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_a_resume_from_an_epochs_end_logs_on_the_same_steps(interrupted, tmp_path, digits_shards):
    """11 steps (one epoch: last.ckpt saved at its end), then resumed to 13: the logs' rows are on the steps
    of the run never stopped. Lightning added one to its logging step at each such restart: step 11 was
    missing and every later row was one step on (CSV, TensorBoard and W&B alike; the weights were right)."""
    _, ref, _, _, _ = interrupted
    run = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        run_to_end(fit_command(digits_shards, run, 11), log)
        run_to_end(fit_command(digits_shards, run, STEPS), log)
    got, want = _train_rows(run), _train_rows(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(STEPS)), (got, want)
    assert got == want  # the same loss on each step, too
    stepped = [torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["loops"]
               ["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] for r in (run, ref)]
    assert stepped[0] == stepped[1], stepped


def _rows(run) -> list[tuple[int, str, str]]:
    """Every logged value of ``RUN/csv/metrics.csv`` but the timings, as (step, key, value)."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        return sorted((int(r["step"]), k, v) for r in csv.DictReader(f) for k, v in r.items()
                      if v and k not in ("step", "epoch") and not k.startswith("perf/"))


def test_a_start_killed_between_a_best_save_and_its_last_ckpt(interrupted, tmp_path, digits_shards):
    """The state a SIGKILL leaves after the epoch's validation saved its best-k checkpoint (step 11) and
    before the ``last.ckpt`` after it, here still at step 10 (a start that went on to step 13 and is put back
    there), with the killed start's metrics rows logged up to its end. The resume trains and validates step
    11 again: it saved a second best file beside the first (``best-...-v1.ckpt``; the first, unknown to the
    checkpoint's best-k list, stayed for good) and logged every step after 10 a second time in metrics.csv.
    Now: the files of the killed start's end and the rows of the run never stopped, each step once."""
    _, ref, _, _, _ = interrupted
    run = tmp_path / "run"
    best = ["--checkpoint.save_top_k", "1"]
    with open(tmp_path / "log", "w") as log:
        run_to_end(fit_command(digits_shards, run, STEPS, [*best, "--trainer.callbacks+=tests.preemption_helpers.CopyLastAt",
                                                           "--trainer.callbacks.step=10"]), log)
        files = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert any(f.startswith("best-epoch000-step0000011-") for f in files), files
        os.replace(run / "last-at-step10.ckpt", run / "checkpoints" / "last.ckpt")
        run_to_end(fit_command(digits_shards, run, STEPS, best), log)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == files
    assert _rows(run) == _rows(ref)  # each step once, with the values of the run never stopped
    assert not compare(ref / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_a_runs_config_names_no_checkpoint(interrupted, tmp_path, digits_shards):
    """RUN/config.yaml recorded the --ckpt_path a start resumed from; given back as --config (to validate
    the run, or to run it again), a branched run reloaded the other run's checkpoint: validate scored the
    other run, and fit continued the other run over the branch's own last.ckpt."""
    import yaml

    _, _, cut, _, _ = interrupted
    branch = tmp_path / "branch"
    cmd = fit_command(digits_shards, branch, STEPS + 1)
    cmd[cmd.index("--ckpt_path") + 1] = str(cut / "checkpoints" / "last.ckpt")
    with open(tmp_path / "log", "w") as log:
        run_to_end(cmd, log)
    assert yaml.safe_load((branch / "config.yaml").read_text())["ckpt_path"] is None
    proc = run_module("pipeline", "validate", "--config", str(branch / "config.yaml"), "--trainer.limit_val_batches",
                      "1", env={"WANDB_MODE": "offline"})
    assert f"validate: {branch / 'checkpoints' / 'last.ckpt'}" in proc.stderr, proc.stderr[-3000:]
    assert str(cut) not in proc.stderr + proc.stdout


def test_a_branch_run_again_resumes_its_own_checkpoint_bit_exact(interrupted, tmp_path, digits_shards):
    """`fit --ckpt_path OTHER/checkpoints/last.ckpt --trainer.default_root_dir NEW`, killed and run again as
    it was (a user's own job script, its requeue): it started over from OTHER, training over the steps NEW
    had done and overwriting NEW's last.ckpt with them. It resumes NEW's own last.ckpt now, ending
    bit-identical to the branch run uninterrupted; a --ckpt_path that is not where NEW started is refused,
    NEW untouched."""
    _, ref, _, _, _ = interrupted
    other = ref / "checkpoints" / "last.ckpt"  # step STEPS

    def branch_command(run, ckpt=other):
        cmd = fit_command(digits_shards, run, STEPS + 6)
        cmd[cmd.index("--ckpt_path") + 1] = str(ckpt)
        return cmd

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(branch_command(whole), log)
        landed = run_and_kill_at(branch_command(cut), last, STEPS + 2, log)
        assert STEPS < landed < STEPS + 6, landed
        run_to_end(branch_command(cut), log)
    text = (tmp_path / "runs.log").read_text()
    assert f"this run is a branch of {other} (--ckpt_path) and has its own checkpoint: resuming that" in text
    assert f"resuming from {last}" in text
    diffs = compare(whole / "checkpoints" / "last.ckpt", last)
    assert not diffs, f"kill at {landed}: " + "; ".join(diffs[:10])
    assert torch.load(last, map_location="cpu", weights_only=False)["branched_from"] == os.path.realpath(other)
    before = last.read_bytes()
    proc = run_cli_in_process(*branch_command(cut, whole / "checkpoints" / "last.ckpt")[3:])
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith(f"error: ckpt_path: {whole / 'checkpoints' / 'last.ckpt'} is another run's checkpoint, "
                           f"and this run directory has its own {last} (step {STEPS + 6}, a branch of "
                           f"{os.path.realpath(other)}): "), said
    assert "Drop --ckpt_path to resume this run where it stopped" in said
    assert last.read_bytes() == before

    # killed before its first checkpoint, then started with no --ckpt_path (`fit --config RUN/config.yaml`,
    # whose ckpt_path is null): it trained a new network from scratch under the branch's name; it starts from
    # OTHER again now (RUN/branched_from), ending bit-identical to the uninterrupted branch
    early = tmp_path / "early"
    with open(tmp_path / "early.log", "w") as log:
        # no periodic save in the killed start (its first would come at the epoch's end, after the run's last
        # step): the kill lands before any checkpoint of its own, however late the poll sees branched_from
        proc = preloaded_python.popen(branch_command(early) + ["--checkpoint.every_n_train_steps", "0"], env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (early / "branched_from").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert (early / "branched_from").read_text() == os.path.realpath(other) + "\n"
        assert not (early / "checkpoints" / "last.ckpt").exists(), "killed too late: it saved a checkpoint"
        rerun = fit_command(digits_shards, early, STEPS + 6)
        del rerun[rerun.index("--ckpt_path"):rerun.index("--ckpt_path") + 2]
        run_to_end(rerun, log)
    text = (tmp_path / "early.log").read_text()
    assert (f"this run is a branch of {os.path.realpath(other)} ({early / 'branched_from'}) with no checkpoint of "
            f"its own yet: starting from {os.path.realpath(other)} again") in text, text[-3000:]
    diffs = compare(whole / "checkpoints" / "last.ckpt", early / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_a_keyword_or_a_folder_as_ckpt_path_is_refused_as_such_in_a_run_with_its_own_checkpoint(interrupted,
                                                                                                   digits_shards):
    """In a run directory with its own last.ckpt, `--ckpt_path best` (hpc, registry...), the run directory itself or
    a checkpoints/ folder was refused as "another run's checkpoint" (the branch check came first), which named
    neither the keyword nor the last.ckpt to pass; they are refused as in a fresh run directory now."""
    _, ref, _, _, _ = interrupted
    last = ref / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    for given, said in (("best", "error: ckpt_path: 'best' is not supported here: pass 'last' "),
                        (str(ref), f"error: {ref} is a run directory, not a checkpoint: name one of its checkpoints, "
                                   f"e.g. {last}"),
                        (str(ref / "checkpoints"), f"error: {ref / 'checkpoints'} is a folder of checkpoints, not one: "
                                                   f"name one of them, e.g. {last}")):
        cmd = fit_command(digits_shards, ref, STEPS + 2)
        cmd[cmd.index("--ckpt_path") + 1] = given
        proc = run_cli_in_process(*cmd[3:])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(said), (given, proc.stderr[-3000:])
    assert last.read_bytes() == before


def test_a_run_directory_given_through_a_symlink_resumes_its_own_checkpoint_by_its_real_path(interrupted, tmp_path,
                                                                                               digits_shards):
    """`--trainer.default_root_dir LINK --ckpt_path REAL/checkpoints/last.ckpt` (LINK -> REAL): the same run,
    refused as "another run's checkpoint" (paths compared without resolving links)."""
    _, ref, _, _, _ = interrupted
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(ref, real)
    link.symlink_to(real)
    cmd = fit_command(digits_shards, link, STEPS + 2)
    cmd[cmd.index("--ckpt_path") + 1] = str(real / "checkpoints" / "last.ckpt")
    proc = run_module(*cmd[2:])
    assert f"resuming from {real / 'checkpoints' / 'last.ckpt'} at step {STEPS}" in proc.stderr, proc.stderr[-3000:]
    assert torch.load(real / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == \
        STEPS + 2


def test_a_branch_whose_origin_is_gone_says_so_naming_its_record(tmp_path):
    """A branch with no checkpoint of its own whose recorded origin (RUN/branched_from) was moved or removed:
    a start without --ckpt_path said "ckpt_path: checkpoint ... does not exist", naming a setting not given,
    and not the file that sent it there nor the way out."""
    run = tmp_path / "run"
    run.mkdir()
    gone = tmp_path / "gone" / "checkpoints" / "last.ckpt"
    (run / "branched_from").write_text(f"{gone}\n")
    for how in ([], ["--ckpt_path", "last"]):
        r = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--trainer.default_root_dir",
                               str(run), "--tracking.wandb", "false", *how)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: {run / 'branched_from'}: this run is a branch of {gone}, which does not exist (moved or "
            f"removed?), and has no checkpoint of its own yet: put it back, start the branch from another "
            f"checkpoint with --ckpt_path, or remove {run / 'branched_from'} to train this run from scratch"), r.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock", "branched_from"]


def test_resume_refuses_another_architecture(interrupted, tmp_path, digits_shards):
    _, _, cut, _, _ = interrupted
    run = tmp_path / "run"
    shutil.copytree(cut / "checkpoints", run / "checkpoints")
    shutil.copy(cut / "config.yaml", run / "config.yaml")
    proc = run_cli_in_process(*fit_command(digits_shards, run, STEPS + 2, ["--model.arch", "cifar_resnet32"])[3:])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.arch='cifar_resnet8'" in proc.stderr and "cifar_resnet32" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the refused start left the run's config as it was (it wrote the refused one over it)
    assert (run / "config.yaml").read_bytes() == (cut / "config.yaml").read_bytes()


def test_resume_refuses_another_dataset(interrupted, tmp_path, digits_shards):
    """The train split prepared again with another seed (other shards), or a manifest of other classes: the
    checkpoint's position, or its labels, would mean other samples."""
    _, _, cut, _, _ = interrupted
    run, shards = tmp_path / "run", tmp_path / "shards"
    shutil.copytree(cut / "checkpoints", run / "checkpoints")
    shutil.copytree(digits_shards, shards)
    run_module("data_prep", "imagefolder", str(digits_shards.parent / "images" / "train"), str(shards), "--split",
               "train", "--samples-per-shard", "500", "--workers", "1", "--seed", "1")
    proc = run_cli_in_process(*fit_command(shards, run, STEPS + 2)[3:])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "another dataset: the 'train' split (data.train_split)" in proc.stderr and "manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    shutil.rmtree(shards)
    shutil.copytree(digits_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"][3] = "three"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    for sub in ("fit", "validate"):
        cmd = fit_command(shards, run, STEPS + 2)[3:]
        cmd[0] = sub
        if sub == "validate":
            cmd = [a for a in cmd if a not in ("--trainer.max_steps", str(STEPS + 2))]
        proc = run_cli_in_process(*cmd)
        assert proc.returncode == 2, (sub, proc.stderr[-2000:])
        assert "another dataset: the classes of" in proc.stderr, (sub, proc.stderr[-2000:])
    # the validation split prepared again (another seed: other shards; another hold-out would hold other images)
    shutil.rmtree(shards)
    shutil.copytree(digits_shards, shards)
    run_module("data_prep", "imagefolder", str(digits_shards.parent / "images" / "val"), str(shards), "--split",
               "val", "--samples-per-shard", "100", "--workers", "1")
    cmd = [a for a in fit_command(shards, run, STEPS + 2)[3:] if a not in ("--trainer.max_steps", str(STEPS + 2))]
    proc = run_cli_in_process("validate", *cmd[1:])
    assert proc.returncode == 2 and "another dataset: split val of" in proc.stderr, proc.stderr[-2000:]


def test_an_evaluation_on_another_dataset_says_the_evaluations_way_out(tmp_path, digits_shards):
    """validate/test of a checkpoint on another dataset advised "start a new run directory", fit's way out: it
    names the data.root the checkpoint's run trained on, and (where the labels mean the same classes) how to
    score its weights on this data on purpose, which then works. fit keeps its advice."""
    run, shards = tmp_path / "run", tmp_path / "shards"
    cmd = fit_command(digits_shards, run, 1)[3:]
    run_module("pipeline", *cmd)
    last = run / "checkpoints" / "last.ckpt"
    shutil.copytree(digits_shards, shards)
    run_module("data_prep", "imagefolder", str(digits_shards.parent / "images" / "val"), str(shards), "--split",
               "val", "--samples-per-shard", "100", "--workers", "1")  # the val split prepared again
    validate = ["validate", "--config", str(run / "config.yaml"), "--data.root", str(shards)]
    proc = run_cli_in_process(*validate)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"(validate it on the data it was trained on: --data.root {digits_shards} ({run / 'config.yaml'}'s); or score "
        f"its weights on this data on purpose: --ckpt_path null --model.init_weights {last})"), proc.stderr[-2000:]
    proc = run_cli_in_process(*validate, "--ckpt_path", "null", "--model.init_weights", str(last))
    assert proc.returncode == 0 and f"validate: weights from {last}" in proc.stderr, proc.stderr[-2000:]

    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"][3] = "three"  # other classes: its weights scored on them would mean nothing
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli_in_process(*validate)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        f"(its labels would mean other classes) (validate it on the data it was trained on: --data.root "
        f"{digits_shards} ({run / 'config.yaml'}'s))"), proc.stderr[-2000:]
    proc = run_cli_in_process("fit", *validate[1:], "--trainer.max_steps", "2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "(its labels would mean other classes) (start a new run directory, or point data.root back)"), proc.stderr


def test_a_split_prepared_after_training_keeps_the_run(interrupted, tmp_path, digits_shards):
    """data_prep adds a split to an OUT (docs/data_prep.md): a test split prepared after the training changes
    manifest.json, not the training's data. The run still resumes, validates and tests (the whole file's
    digest locked it out of all three)."""
    _, _, cut, _, _ = interrupted
    run, shards = tmp_path / "run", tmp_path / "shards"
    shutil.copytree(cut / "checkpoints", run / "checkpoints")
    shutil.copytree(digits_shards, shards)
    run_module("data_prep", "imagefolder", str(digits_shards.parent / "images" / "val"), str(shards), "--split",
               "test", "--samples-per-shard", "500", "--workers", "1")
    assert "test" in json.loads((shards / "manifest.json").read_text())["splits"]
    with open(tmp_path / "log", "w") as log:
        run_to_end(fit_command(shards, run, STEPS + 1), log)
        assert saved_step(run / "checkpoints" / "last.ckpt") == STEPS + 1
        for sub, split in (("validate", []), ("test", ["--data.test_split", "test"])):
            run_to_end([sys.executable, "-m", "pipeline", sub, "--config", str(run / "config.yaml"), "--ckpt_path",
                        str(run / "checkpoints" / "last.ckpt"), *split], log)
    assert len(list((run / "test" / "csv").glob("version_*/metrics.csv"))) == 1


class _Unpicklable:
    def __reduce__(self):
        raise OSError("disk full (simulated)")


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 7, "w": torch.arange(5.0)}, path)
    with pytest.raises(OSError, match="disk full"):
        io_.save_checkpoint({"global_step": 8, "w": torch.zeros(10**6), "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 7
    # a failure in the write itself (after serialisation): the temp file goes, the old file stays
    import pipeline.checkpoint_io as cio

    real_fsync = cio.os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError("I/O error (simulated)")

    cio.os.fsync = failing_fsync
    try:
        with pytest.raises(OSError, match="I/O error"):
            io_.save_checkpoint({"global_step": 9}, path)
    finally:
        cio.os.fsync = real_fsync
    assert calls and torch.load(path, weights_only=True)["global_step"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_the_expected_world_size_is_slurms_only_where_lightning_uses_slurm(monkeypatch):
    """In a shell from ``srun --pty bash`` Lightning starts ``trainer.devices`` ranks itself; Slurm's
    SLURM_NTASKS=1 there was taken for the world size, and a 4-device resume quadrupled the global batch."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert expected_world_size(2, 4) == 8
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for shell in ("bash", "interactive"):
        monkeypatch.setenv("SLURM_JOB_NAME", shell)
        assert expected_world_size(1, 4) == 4
    monkeypatch.setenv("SLURM_JOB_NAME", "train-imagenet_resnet50")  # a batch job's srun: Slurm's tasks
    assert expected_world_size(1, 4) == 1
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun's
    assert expected_world_size(1, 4) == 16


def test_geometry_keeps_the_global_batch():
    saved = Geometry(world_size=2, batch_size=32)
    assert adapt(saved, 1, 32, 1) == Geometry(1, 32, 2)  # fewer ranks: accumulate
    assert adapt(saved, 4, 32, 1) == Geometry(4, 16, 1)  # more ranks: smaller per-rank batch
    assert adapt(saved, 2, 32, 1) == Geometry(2, 32, 1)
    assert adapt(Geometry(8, 32, 1), 2, 32, 1) == Geometry(2, 32, 4)
    # the configured accumulation kept (world x batch, so the epoch's length, as saved); it was 2 x 96 x 1,
    # whose shorter epoch had ended before the checkpoint's position: that epoch went unvalidated
    assert adapt(Geometry(1, 64, 3), 2, 64, 3) == Geometry(2, 32, 3)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        adapt(saved, 3, 32, 1)


def test_export_of_a_checkpoint_file(interrupted, tmp_path):
    from pipeline.export import export
    from pipeline.models import build

    _, _, cut, _, _ = interrupted
    ckpt = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sd = export(cut / "checkpoints" / "last.ckpt", tmp_path / "net.pt")
    net = build(ARCH, num_classes=10)
    net.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))  # strict
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"]["model." + k]), k
    assert set(sd) == set(net.state_dict())
    # the output named as the input, or another training checkpoint, would lose its optimizer and loop state
    src = tmp_path / "copy.ckpt"
    shutil.copy(cut / "checkpoints" / "last.ckpt", src)
    before = src.read_bytes()
    with pytest.raises(ConfigError, match="is the checkpoint being exported"):
        export(src, src)
    other = tmp_path / "other.ckpt"
    shutil.copy(src, other)
    with pytest.raises(ConfigError, match="is a training checkpoint; name another output file"):
        export(src, other)
    assert src.read_bytes() == before and other.read_bytes() == before
    export(src, tmp_path / "net.pt")  # an existing weights file is replaced


def test_resume_from_the_epoch_end_checkpoint_is_bit_exact(interrupted, digits_shards, tmp_path):
    """Killed as epoch 1 starts (last.ckpt is the one saved at epoch 0's end, after validation), then killed
    again mid-epoch 1, then run to the end. Lightning resumes an epoch-end checkpoint by re-entering the
    finished epoch, counts it processed twice and passes ``set_epoch`` one epoch too many: epoch 1 ran in
    epoch 2's order, and the mid-epoch checkpoint after it carried the extra count on (its resume skipped
    the epoch start and the order was wrong from there). ``LoopPosition`` corrects both."""
    _, ref, *_ = interrupted
    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    every2 = ["--checkpoint.every_n_train_steps", "2"]  # at step 11 (odd) only the epoch end saves

    def run(*extra: str) -> subprocess.CompletedProcess:
        return preloaded_python.run(fit_command(digits_shards, cut, STEPS, [*every2, *extra]), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    for step, counts in ((11, (1, 0)), (12, (1, 1))):  # epoch 0's end, then mid epoch 1: (processed, completed)
        killed = run("--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                     f"--trainer.callbacks.step={step}")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        saved = torch.load(last, map_location="cpu", weights_only=False)
        progress = saved["loops"]["fit_loop"]["epoch_progress"]["current"]
        assert (saved["global_step"], progress["processed"], progress["completed"]) == (step, *counts)
    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diffs = compare(ref / "checkpoints" / "last.ckpt", last)
    assert not diffs, "; ".join(diffs[:10])
