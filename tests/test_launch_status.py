"""`launch status` on a run directory with real Lightning checkpoints and a CSV metrics log, and the
script's report of the checkpoint the trainer resumes from (run through bash)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real Lightning training steps that checkpoint into RUN_DIR/checkpoints and log img/s to CSV."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.demos.boring_classes import BoringModel
    from pytorch_lightning.loggers import CSVLogger

    class Timed(BoringModel):
        def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, outputs: object, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("train/img_per_s", batch.shape[0] / (time.perf_counter() - self._t0))

    run = tmp_path_factory.mktemp("run")
    trainer = pl.Trainer(default_root_dir=run, max_steps=6, accelerator="cpu", devices=1, log_every_n_steps=1,
                         logger=CSVLogger(run), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", every_n_train_steps=3,
                                                    save_last=True, save_top_k=-1)])
    trainer.fit(Timed())
    return run


def test_status_reports_step_throughput_and_wandb_id(trained_run: Path) -> None:
    (trained_run / "wandb_run_id").write_text("abc123xy\n")
    r = launch("status", str(trained_run), cwd=trained_run)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(None, 1) if not line.startswith("W&B") else ("W&B", line[13:])
                 for line in r.stdout.splitlines() if line and not line.startswith(" "))
    assert lines["jobs"].startswith("none (no jobs.jsonl")
    assert " global_step 6 " in lines["checkpoint"] and "/checkpoints/" in lines["checkpoint"]
    assert lines["throughput"].endswith(f"(train/img_per_s in {next(trained_run.rglob('metrics.csv'))})")
    assert float(lines["throughput"].split()[0]) > 0 and "at step 5" in lines["throughput"]
    assert lines["W&B"] == "abc123xy"


def _copy_checkpoint(trained_run: Path, name: str, run: Path, as_name: str) -> Path:
    """A copy of the trained run's checkpoint ``name`` as RUN/checkpoints/``as_name``."""
    path = run / "checkpoints" / as_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((trained_run / "checkpoints" / name).read_bytes())
    return path


def test_status_reads_only_checkpoints_dir_newest_first_and_names_unreadable_ones(trained_run: Path,
                                                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    old = _copy_checkpoint(trained_run, "epoch=0-step=3.ckpt", run, "step=3.ckpt")
    last = _copy_checkpoint(trained_run, "last.ckpt", run, "last.ckpt")
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(last, (now - 50, now - 50))
    # a file left over from Lightning's own auto-requeue (off now): newest, but not where the trainer resumes from
    stray = run / "hpc_ckpt_1.ckpt"
    stray.write_bytes(old.read_bytes())
    r = launch("status", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"checkpoint   {last}  global_step 6" in r.stdout, r.stdout
    os.utime(old, (now, now))  # the older step is now the newest file: status follows mtime, not names
    r = launch("status", str(run), cwd=tmp_path)
    assert f"checkpoint   {old}  global_step 3" in r.stdout, r.stdout
    os.utime(old, (now - 100, now - 100))
    last.write_bytes(b"half-written")  # named, and the rest still reported (it failed with that line alone)
    r = launch("status", str(run), cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"checkpoint   UNREADABLE checkpoint {last}: cannot be read" in r.stdout, r.stdout
    assert f"checkpoint   {old}  global_step 3" in r.stdout and "W&B run id" in r.stdout, r.stdout
    r = launch("status", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2 and "RUN_DIR:" in r.stderr


def test_status_skips_a_checkpoint_deleted_after_listing(trained_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """While a job runs, ModelCheckpoint deletes a best-k file when a better one is saved: a file listed a
    moment ago may be gone when it is read. status then reports the next newest instead of failing."""
    import launch.checkpoints as ck

    run = tmp_path / "run"
    last = _copy_checkpoint(trained_run, "epoch=0-step=3.ckpt", run, "last.ckpt")
    best = _copy_checkpoint(trained_run, "last.ckpt", run, "best-epoch000-step0000006-top10.5000.ckpt")
    os.utime(last, (time.time() - 10, time.time() - 10))
    listed = ck.checkpoint_files

    def list_then_trainer_deletes(run_dir: Path) -> list[Path]:
        files = listed(run_dir)
        best.unlink()  # what ModelCheckpoint does between our listing and our read
        return files

    monkeypatch.setattr(ck, "checkpoint_files", list_then_trainer_deletes)
    info = ck.latest_checkpoint(run)
    assert info is not None and info.path == last and info.global_step == 3


def test_status_without_slurm_reports_the_run_and_sums_requeues(trained_run: Path, tmp_path: Path) -> None:
    """A login node whose Slurm cannot be reached (controller down, no client here): status still shows what
    the run directory knows. Requeues are per job: two jobs requeued 2 and 3 times make 5."""
    run = tmp_path / "run"
    _copy_checkpoint(trained_run, "last.ckpt", run, "last.ckpt")
    (run / "slurm-5.out").write_text("".join(f"launch: job 5 restart {n} nodes n1\n" for n in range(3)))
    (run / "slurm-9.out").write_text("".join(f"launch: job 9 restart {n} nodes n1\n" for n in range(4)))
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": str(tmp_path / "no-slurm-here")})
    assert r.returncode == 0, r.stderr
    assert "jobs (Slurm unavailable: squeue: command not found" in r.stdout, r.stdout
    assert "requeues     5 (job 5: 2, job 9: 3)" in r.stdout, r.stdout
    assert f"checkpoint   {run / 'checkpoints' / 'last.ckpt'}  global_step 6 " in r.stdout, r.stdout


def test_status_into_a_reader_that_stopped_reading_says_nothing(trained_run: Path, tmp_path: Path) -> None:
    """`launch status RUN | head -4`: the report went to a pipe whose reader had ended, and status said
    `launch: error: file system: Broken pipe`, exit 2."""
    run = tmp_path / "run"
    _copy_checkpoint(trained_run, "last.ckpt", run, "last.ckpt")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "launch", "status", str(run)], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "PATH": str(tmp_path / "no-slurm-here")})
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _deepspeed_checkpoint(trained_run: Path, path: Path, states: str = "mp_rank_00_model_states.pt") -> None:
    """The layout Lightning's DeepSpeedStrategy saves (tests/test_deepspeed.py runs the real one): a directory
    whose rank-0 model states under tag ``checkpoint`` hold the Lightning keys minus weights and optimizer."""
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    client = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
    (path / "checkpoint").mkdir(parents=True)
    torch.save({"module": ckpt["state_dict"], **client}, path / "checkpoint" / states)
    (path / "latest").write_text("checkpoint")


def test_status_reads_deepspeed_checkpoint_directories(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    old = _copy_checkpoint(trained_run, "epoch=0-step=3.ckpt", run, "best-epoch000-step0000003-top10.1000.ckpt")
    os.utime(old, (time.time() - 100, time.time() - 100))
    _deepspeed_checkpoint(trained_run, run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / "last.ckpt.partial" / "checkpoint").mkdir(parents=True)  # an unfinished save
    r = launch("status", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"checkpoint   {run / 'checkpoints' / 'last.ckpt'}  global_step 6  epoch " in r.stdout, r.stdout
    # ZeRO-3 names rank 0's file otherwise: it was skipped, and status showed the older best-k file
    shutil.rmtree(run / "checkpoints" / "last.ckpt")
    _deepspeed_checkpoint(trained_run, run / "checkpoints" / "last.ckpt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    r = launch("status", str(run), cwd=tmp_path)
    assert f"checkpoint   {run / 'checkpoints' / 'last.ckpt'}  global_step 6  epoch " in r.stdout, r.stdout


def _resume_line(script: str, run_dir: Path) -> str:
    """Run the script's own resume block in bash and return the checkpoint its start line reports."""
    lines = script.splitlines()
    start = lines.index("CKPT=none")
    name = next(line for line in lines if line.startswith("LAST_CKPT="))  # the script's name for last.ckpt
    block = "\n".join([name, *lines[start:start + 2]])
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", f'RUN_DIR={run_dir}\n{block}\necho "$CKPT"'],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_job_resumes_from_last_ckpt_only(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {}\n")
    run = tmp_path / "run"
    r = launch("submit", "train", "--config", str(cfg), "--gpus-per-node", "0", "--time", "00:10:00",
               "--signal-lead", "60", "--run-dir", str(run), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert "hpc_ckpt" not in script
    assert "--ckpt_path last || status=$?\n" in script  # the trainer resumes from checkpoints/last.ckpt itself
    run.mkdir()
    assert _resume_line(script, run) == "none"  # nothing yet: the trainer starts fresh
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # not the trainer's any more: ignored
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best-epoch000-step0000005-top10.1000.ckpt").write_bytes(b"x")
    assert _resume_line(script, run) == "none"
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert _resume_line(script, run) == str(run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt" / "checkpoint").mkdir(parents=True)  # DeepSpeed saves a directory
    assert _resume_line(script, run) == str(run / "checkpoints" / "last.ckpt")


HOLD = """
import sys, time
from pipeline.run_lock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_status_says_who_trains_in_the_run_directory_now(tmp_path: Path) -> None:
    """From the lock `fit` holds on RUN/.lock: held by a live process, then free once it is gone."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIPELINE_RUN_LOCK"))}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**env, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        now = launch("status", str(run), cwd=tmp_path)
        assert now.returncode == 0, now.stderr
        assert f"training     now: process {holder.pid} on " in now.stdout and ", since 20" in now.stdout
    finally:
        holder.kill()
        holder.wait()
    later = launch("status", str(run), cwd=tmp_path)
    assert f"training     not now (last: process {holder.pid} on " in later.stdout, later.stdout


def test_a_lock_free_here_while_slurm_runs_its_job_is_not_said_as_not_training(tmp_path: Path) -> None:
    """Lustre mounted with ``localflock`` (NFS with ``local_lock=flock``): the lock a job's rank 0 holds on a
    compute node is not seen from the login node, and status said ``not now`` of a job training. The lock here
    is free and RUN/.lock names Slurm job 12; the Slurm clients are stand-ins, sacct saying it runs."""
    from launch.rundir import record_job
    from pipeline.run_layout import LOCK_NAME

    bindir, run = tmp_path / "bin", tmp_path / "run"
    bindir.mkdir()
    (bindir / "sacct").write_text('#!/bin/sh\nprintf "$SACCT"\n')
    (bindir / "squeue").write_text("#!/bin/sh\n")
    for tool in ("sacct", "squeue"):
        (bindir / tool).chmod(0o755)
    record_job(run, "12", "train", run / "train.sbatch")
    (run / LOCK_NAME).write_text(json.dumps({"job": "slurm job 12 step 0 restart 0", "slurm_job_id": "12",
                                             "restart": 0, "host": "n1", "pid": 4242}) + "\n")
    # requeued: restart 1 runs, its trainer not up yet (the lock names restart 0, whose process is gone): it was
    # "probably now" of the dead start, for the seconds of every start-up
    for state, says in (("RUNNING", "training     probably now: slurm job 12 step 0 restart 0, host n1, pid 4242 "
                                    "(Slurm runs job 12, though its lock on "),
                        ("COMPLETED", "training     not now (last: slurm job 12 step 0 restart 0, host n1"),
                        ("REQUEUED|00:05:00|0:0|None\\n12|train|RUNNING", "training     starting: job 12 restart 1 (its "
                         "trainer takes the lock once it is up; last: slurm job 12 step 0 restart 0, host n1")):
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "SACCT": f"12|train|{state}|00:05:00|0:0|None\\n"}
        r = launch("status", str(run), cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert says in r.stdout, r.stdout


def test_status_shows_progress_and_the_best_checkpoint_of_a_real_run(digits_shards: Path, tmp_path: Path) -> None:
    """A real `pipeline fit` of 2 epochs (22 steps) killed at step 16: status says how far it is, how long
    the rest takes at the logged speed, and which kept checkpoint validated best (epoch 0, step 11)."""
    import re

    from tests.conftest import run_module

    run = tmp_path / "run"
    proc = run_module("pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                      "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "2", "--data.batch_size", "128",
                      "--data.num_workers", "0", "--checkpoint.every_n_train_steps", "4", "--tracking.wandb", "false",
                      "--trainer.log_every_n_steps", "2", "--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                      "--trainer.callbacks.step=16", check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": str(tmp_path / "no-slurm-here")})
    assert r.returncode == 0, r.stderr
    speed = float(re.search(r"^throughput   ([\d.]+) img/s", r.stdout, re.M).group(1))
    m = re.search(r"^progress     step 16 of 22 \(72%\); about (\d+) min to go at ([\d.]+) img/s$", r.stdout, re.M)
    assert m, r.stdout
    assert float(m.group(2)) == speed and int(m.group(1)) == max(1, round(6 * 128 / speed / 60))
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert re.fullmatch(r"best-epoch000-step0000011-top1=\d\.\d{4}\.ckpt", best.name), best.name  # not "top10.5..."
    top1 = torch.load(best, map_location="cpu", weights_only=False)["callbacks"]
    top1 = next(v["best_model_score"] for k, v in top1.items() if k.startswith("ModelCheckpoint"))
    assert f"best         val/top1 {float(top1):.4f} at epoch 0 step 11  ({best})" in r.stdout, r.stdout


def test_a_torn_jobs_file_is_one_error_line_naming_it(tmp_path: Path) -> None:
    """A jobs.jsonl line cut short (a full disk) or edited into something else was a traceback, in status and
    in `submit train` (whose check for a running train job reads it). Now one line naming the file and the
    line; submit refuses (a job it cannot read could still be training there) and writes nothing; and a record
    appended after a torn line starts a line of its own."""
    from launch import rundir

    run = tmp_path / "run"
    run.mkdir()
    (run / "jobs.jsonl").write_text('{"job_id": "5", "kind": "train", "script": "x"}\n{"job_id": "6", "ki')
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("trainer: {}\n")
    no_slurm = {"PATH": str(tmp_path / "no-slurm-here")}
    for args in (["status", str(run)], ["submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir",
                                        str(run)]):
        r = launch(*args, cwd=tmp_path, env=no_slurm)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"launch: error: {run / 'jobs.jsonl'} line 2: not a job record"), r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["jobs.jsonl"]
    (run / "jobs.jsonl").write_text('[1, 2]\n')
    r = launch("status", str(run), cwd=tmp_path, env=no_slurm)
    assert r.returncode == 2 and "jobs.jsonl line 1: not a job record ('[1, 2]')" in r.stderr, r.stderr
    (run / "jobs.jsonl").write_text('{"job_id": "5", "kind": "train", "script": "x"}\n{"job_id": "6", "ki')
    rundir.record_job(run, "7", "train", run / "train.sbatch")
    assert (run / "jobs.jsonl").read_text().splitlines()[-1] == \
        f'{{"job_id": "7", "kind": "train", "script": "{run / "train.sbatch"}"}}'


def test_a_wandb_id_file_without_an_id_is_named_not_used(tmp_path: Path) -> None:
    """An empty RUN/wandb_run_id (a write cut short) went into the script as WANDB_RUN_ID='', so every start of
    the job began a new W&B run; bytes that are not UTF-8 were a traceback. Submit and torchrun now refuse in
    one line naming the file, status says so on its W&B line and still reports the rest."""
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("trainer: {}\n")
    run = tmp_path / "run"
    run.mkdir()
    for content in (b"", b"\n", b"\xff\xfe\x00garbage"):
        (run / "wandb_run_id").write_bytes(content)
        for args in (["submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir", str(run), "--dry-run"],
                     ["torchrun", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "1",
                      "--rdzv-endpoint", "h:29400", "--run-dir", str(run)]):
            r = launch(*args, cwd=tmp_path)
            assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
            assert r.stderr.startswith(f"launch: error: {run / 'wandb_run_id'}: "), r.stderr
            assert "is not a W&B run id" in r.stderr
        r = launch("status", str(run), cwd=tmp_path, env={"PATH": str(tmp_path / "no-slurm-here")})
        assert r.returncode == 0, r.stderr
        assert f"W&B run id   unreadable: {run / 'wandb_run_id'}: " in r.stdout, r.stdout
        assert "checkpoint   none yet" in r.stdout
    fresh = tmp_path / "fresh"
    r = launch("torchrun", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint",
               "h:29400", "--run-dir", str(fresh), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in fresh.iterdir()] == ["wandb_run_id"]
    assert f"WANDB_RUN_ID={(fresh / 'wandb_run_id').read_text().strip()} " in r.stdout


def test_status_reads_past_a_metrics_row_cut_short(tmp_path: Path) -> None:
    """A run killed while the CSV logger wrote (what status is for) leaves a torn last row: it was a traceback
    (float('1e')). Status now reports the last whole value."""
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    for torn in ("2,1e", "2,10\0\0\0", "2.5x,", "2"):
        (run / "csv" / "metrics.csv").write_text(f"step,perf/img_per_s_total\n0,90.0\n1,100.5\n{torn}")
        r = launch("status", str(run), cwd=tmp_path, env={"PATH": str(tmp_path / "no-slurm-here")})
        assert r.returncode == 0, r.stderr
        assert f"throughput   100.5 img/s at step 1 (perf/img_per_s_total in {run / 'csv' / 'metrics.csv'})" \
            in r.stdout, r.stdout


def test_status_of_a_prep_run_directory_shows_shards_and_manifest_not_checkpoints(tmp_path: Path) -> None:
    """A `submit prep` run directory: what matters is how many shards the array tasks have finished and
    whether finalize wrote the manifest; it showed `checkpoint none yet` and a W&B id line instead."""
    from data_prep.cli import main as prep
    from launch.rundir import record_job
    from tests.fixtures_images import write_imagefolder

    src = tmp_path / "src"
    write_imagefolder(src, ["cat", "dog"], per_class=9)
    out, run = tmp_path / "shards", tmp_path / "shards-slurm"
    record_job(run, "41", "prep-array", run / "prep-imagefolder-train.sbatch", out)
    record_job(run, "42", "prep-finalize", run / "prep-finalize-imagefolder-train.sbatch", out)
    no_slurm = {"PATH": str(tmp_path / "no-slurm-here")}

    def status() -> str:
        r = launch("status", str(run), cwd=tmp_path, env=no_slurm)
        assert r.returncode == 0, r.stderr
        assert "checkpoint" not in r.stdout and "W&B run id" not in r.stdout, r.stdout
        return r.stdout

    assert f"shards       {out}: does not exist yet" in status()
    common = [str(src), str(out), "--split", "train", "--samples-per-shard", "4", "--workers", "1", "--no-progress",
              "--num-tasks", "2"]
    assert prep(["imagefolder", *common, "--task-index", "1"]) == 0  # 18 images: shards 0..4, task 1 has 1 and 3
    text = status()
    assert f"shards       {out}: train 2 of 5 done\n" in text, text
    assert "manifest     not yet: the finalize job writes it once every array task succeeded" in text, text
    assert prep(["imagefolder", *common, "--task-index", "0"]) == 0
    assert (f"manifest     not yet, though every shard is built: the finalize job writes it (where it failed or was "
            f"cancelled, `python -m data_prep finalize {out}` writes it or says why)") in status()
    assert prep(["finalize", str(out)]) == 0
    text = status()
    assert f"shards       {out}: train 5 of 5 done\n" in text, text
    assert f"manifest     {out / 'manifest.json'} (" in text and "): train 18 samples (0 rejected)" in text, text
    # val's array tasks ended, its finalize has not run (or failed): named, with the command that lists it
    for task in ("0", "1"):
        assert prep(["imagefolder", *common[:3], "val", *common[4:], "--task-index", task]) == 0
    assert (f"): train 18 samples (0 rejected); not listed: val, whose shards are all built (`python -m data_prep "
            f"finalize {out} --splits val` lists it or says why)\n") in status()


def test_a_failed_array_task_is_named_where_the_manifest_would_come(tmp_path: Path) -> None:
    """One array task FAILED (a shard it could not write), so Slurm cancelled the finalize job, its dependency
    never met: status said "the finalize job writes it once every array task succeeded", which never comes."""
    from data_prep.cli import main as prep
    from launch.rundir import record_job
    from tests.fixtures_images import write_imagefolder

    src, out, run, bindir = tmp_path / "src", tmp_path / "shards", tmp_path / "shards-slurm", tmp_path / "bin"
    write_imagefolder(src, ["cat", "dog"], per_class=9)
    assert prep(["imagefolder", str(src), str(out), "--split", "train", "--samples-per-shard", "4", "--workers", "1",
                 "--no-progress", "--num-tasks", "2", "--task-index", "0"]) == 0
    bindir.mkdir()
    (bindir / "sacct").write_text("#!/bin/sh\nprintf '35_0|prep-imagefolder-train|COMPLETED|00:00:05|0:0|None\\n"
                                  "35_1|prep-imagefolder-train|FAILED|00:00:03|2:0|None\\n"
                                  "36|prep-finalize-imagefolder-train|CANCELLED|00:00:00|0:0|None\\n'\n")
    (bindir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sacct", "squeue"):
        (bindir / tool).chmod(0o755)
    record_job(run, "35", "prep-array", run / "prep-imagefolder-train.sbatch", out, ["train"])
    record_job(run, "36", "prep-finalize", run / "prep-finalize-imagefolder-train.sbatch", out, ["train"])
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert ("manifest     not yet, and no finalize job will write it: array task 35_1 FAILED (the task's "
            "prep-*-JOB_TASK.out says why); fix that and submit the same prep again (the shards built are kept): its "
            "finalize writes it") in r.stdout, r.stdout
    # submitted again (a new array, not ended): the earlier failure is no longer the story
    record_job(run, "37", "prep-array", run / "prep-imagefolder-train.sbatch", out, ["train"])
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert "manifest     not yet: the finalize job writes it once every array task succeeded" in r.stdout, r.stdout


def _status_with_stand_ins(tmp_path: Path, sacct_lines: str, squeue_lines: str,
                           sacct_fails: str = "") -> tuple[list[list[str]], str]:
    """`launch status` of a prep run directory (array job 12, finalize job 13) whose sacct and squeue are
    stand-ins printing ``sacct_lines`` and ``squeue_lines`` (``sacct_fails``: sacct's error instead): the table's
    job rows, split at spaces, and the arguments squeue got."""
    from launch.rundir import record_job

    bindir, run = tmp_path / "bin", tmp_path / "shards-slurm"
    bindir.mkdir(exist_ok=True)
    (bindir / "sacct").write_text(f"#!/bin/sh\necho '{sacct_fails}' >&2\nexit 1\n" if sacct_fails else
                                  f"#!/bin/sh\nprintf '{sacct_lines}'\n")
    (bindir / "squeue").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/squeue.args\nprintf '{squeue_lines}'\n")
    for tool in ("sacct", "squeue"):
        (bindir / tool).chmod(0o755)
    record_job(run, "12", "prep-array", run / "prep-imagefolder-train.sbatch", tmp_path / "shards")
    record_job(run, "13", "prep-finalize", run / "prep-finalize-imagefolder-train.sbatch", tmp_path / "shards")
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("  1")]
    return rows, (tmp_path / "squeue.args").read_text()


def test_an_array_tasks_restarts_without_accounting_are_its_own(tmp_path: Path) -> None:
    """Accounting off: restarts come from `scontrol show job`. Asked for the array job (12), scontrol lists every
    task and the first one's count stood for all; each task is asked for by its own id now."""
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text('#!/bin/sh\ncase "$4" in\n'
                        '  12) echo "JobId=12 ArrayTaskId=0 Restarts=0"; echo "JobId=13 ArrayTaskId=1 Restarts=2" ;;\n'
                        '  12_0) echo "JobId=12 ArrayJobId=12 ArrayTaskId=0 Restarts=0" ;;\n'
                        '  12_1) echo "JobId=13 ArrayJobId=12 ArrayTaskId=1 Restarts=2" ;;\n'
                        '  *) exit 1 ;;\nesac\n')
    scontrol.chmod(0o755)
    rows, _ = _status_with_stand_ins(
        tmp_path, "", "12_0|prep-imagefolder-train|RUNNING|0:10|None\\n12_1|prep-imagefolder-train|RUNNING|0:05|None\\n",
        sacct_fails="sacct: error: Slurm accounting storage is disabled")
    assert [(r[0], r[4]) for r in rows] == [("12_0", "0"), ("12_1", "2")], rows


def test_a_job_accounting_has_not_recorded_yet_comes_from_squeue(tmp_path: Path) -> None:
    """slurmdbd records a job seconds after its submission: right after `submit prep`, sacct knew the array
    job and not the finalize job, and status said nothing of the latter. Slurm's clients are stand-ins that
    answer as Slurm 22.05 does (sacct: the array's tasks; squeue: the finalize job, pending)."""
    rows, asked = _status_with_stand_ins(
        tmp_path, "12_0|prep-imagefolder-train|RUNNING|00:00:05|0:0|None\\n"
                  "12_1|prep-imagefolder-train|PENDING|00:00:00|0:0|Resources\\n",
        "13|prep-finalize-imagefolder-train|PENDING|0:00|Dependency\\n")
    assert rows == [["12_0", "prep-imagefolder-train", "RUNNING", "00:00:05", "0", "0:0"],
                    ["12_1", "prep-imagefolder-train", "PENDING", "00:00:00", "0", "Resources"],
                    ["13", "prep-finalize-imagefolder-train", "PENDING", "0:00", "-", "Dependency"]], rows
    assert "-j 13 " in asked  # only the job sacct did not list


def test_accountings_placeholder_row_of_a_new_job_gives_way_to_squeue(tmp_path: Path) -> None:
    """For a second or two after a job starts, slurmdbd answers with a placeholder: the job named
    "allocation", an array as one row, here even COMPLETED while its tasks run (seen on the test cluster,
    Slurm 22.05). squeue's rows replace it; a placeholder squeue does not know (the job ended) stays,
    named as what it is."""
    rows, asked = _status_with_stand_ins(
        tmp_path, "12|allocation|COMPLETED|00:00:01|0:0|None\\n13|allocation|COMPLETED|00:00:01|0:0|None\\n",
        "12_0|prep-imagefolder-train|RUNNING|0:02|None\\n12_1|prep-imagefolder-train|RUNNING|0:02|None\\n")
    assert rows == [["12_0", "prep-imagefolder-train", "RUNNING", "0:02", "-"],
                    ["12_1", "prep-imagefolder-train", "RUNNING", "0:02", "-"],
                    ["13", "(sacct", "catching", "up)", "COMPLETED", "00:00:01", "0", "0:0"]], rows
    assert "-j 12,13 " in asked


def test_a_pending_jobs_reason_comes_from_squeue_while_accounting_has_none(tmp_path: Path) -> None:
    """slurmdbd gets a pending job's reason from the controller later than squeue does: on a loaded test
    cluster still "None" after 45 s for a job held by scontrol (JobHeldUser), and the row said ``-``."""
    rows, asked = _status_with_stand_ins(
        tmp_path, "12_0|prep-imagefolder-train|RUNNING|00:00:05|0:0|None\\n"
                  "13|prep-finalize-imagefolder-train|PENDING|00:00:00|0:0|None\\n",
        "13|prep-finalize-imagefolder-train|PENDING|0:00|JobHeldUser\\n")
    assert rows == [["12_0", "prep-imagefolder-train", "RUNNING", "00:00:05", "0", "0:0"],
                    ["13", "prep-finalize-imagefolder-train", "PENDING", "00:00:00", "0", "JobHeldUser"]], rows
    assert "-j 13 " in asked  # only the pending job without a reason


def test_a_pending_job_shows_its_reason_never_an_exit_code() -> None:
    """sacct gives a job just submitted ExitCode 0:0 and no reason for a few seconds: the column said 0:0 of a
    job that had not run (an array's pending meta-row too)."""
    from launch.slurm import JobRow
    from launch.status import _table

    rows = [JobRow("44", "train-demo", "PENDING", "00:00:00", exit_code="0:0"),
            JobRow("45", "train-demo", "PENDING", "00:00:00", exit_code="0:0", reason="ReqNodeNotAvail"),
            JobRow("46", "train-demo", "FAILED", "00:01:00", exit_code="2:0")]
    lines = _table(rows)[1:]
    assert [line.split()[-1] for line in lines] == ["-", "ReqNodeNotAvail", "2:0"], lines


def test_status_of_a_folder_of_runs_is_one_line_per_run(trained_run: Path, tmp_path: Path) -> None:
    """`launch status runs/cifar10` (a sweep's --runs: 10 networks x 5 seeds) was the report of an empty run
    directory ("jobs none, checkpoint none yet"). One line per run now: its last job and that job's state
    (one sacct for all; here a stand-in answering as Slurm does), the newest checkpoint's step, the best kept
    val/top1. Folders that hold no run are left out; `status RUN` of one run is unchanged."""
    from launch.rundir import record_job

    from pipeline import provenance

    runs = tmp_path / "runs"
    done = runs / "cifar_resnet20-seed0"
    for name in ("last.ckpt", "best-epoch001-step0000004-top1=0.9125.ckpt", "best-epoch000-step0000002-top1=0.8500.ckpt"):
        path = _copy_checkpoint(trained_run, "last.ckpt", done, name)
        ckpt = torch.load(path, weights_only=False)  # as if trained by code with uncommitted changes
        ckpt[provenance.KEY] = [{"start": 1, "git_commit": "1a2b3c4d5e6f" + "0" * 28, "git_dirty": "yes"}]
        torch.save(ckpt, path)
    record_job(done, "41", "train", done / "train.sbatch")
    record_job(done, "42", "train", done / "train.sbatch")
    waiting = runs / "plain_cifar_resnet20-seed0"
    record_job(waiting, "43", "train", waiting / "train.sbatch")
    (runs / "notes").mkdir()  # no run
    (runs / "README").write_text("sweep of 2026-12\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sacct").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sacct.args\n"
                                  "printf '42|c10-resnet20-s0|RUNNING|00:10:00|0:0|None\\n"
                                  "43|c10-plain_resnet20-s0|PENDING|00:00:00|0:0|Priority\\n'\n")
    (bindir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sacct", "squeue"):
        (bindir / tool).chmod(0o755)
    r = launch("status", str(runs), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"runs in {runs.resolve()}: 2", r.stdout
    assert lines[1].split() == ["RUN", "JOB", "STATE", "STEP", "CODE", "BEST", "val/top1"], r.stdout
    assert lines[2].split() == ["cifar_resnet20-seed0", "42", "RUNNING", "6", "1a2b3c4d+", "0.9125", "(step", "4)"], r.stdout
    assert lines[3].split() == ["plain_cifar_resnet20-seed0", "43", "PENDING", "(Priority)", "-", "-", "-"], r.stdout
    assert len(lines) == 4, r.stdout
    assert "-j 42,43 " in (tmp_path / "sacct.args").read_text()  # the last job of each run, in one call
    one = launch("status", str(done), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert one.stdout.startswith(f"run dir      {done.resolve()}\n"), one.stdout


def test_status_of_a_folder_of_runs_without_sacct_says_a_job_squeue_no_longer_knows_has_ended(tmp_path: Path) -> None:
    """Accounting off: squeue lists queued and running jobs alone. A run whose last job it no longer knows
    said "ended" while another job was still queued, and "-" (as if Slurm could not be asked) when none was."""
    from launch.rundir import record_job

    runs = tmp_path / "runs"
    for run, job in (("a-seed0", "51"), ("a-seed1", "52")):
        record_job(runs / run, job, "train", runs / run / "train.sbatch")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (bindir / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    for queued, states in (("", ["ended", "ended"]), ("52|c10-a-s1|RUNNING|00:01:00|None", ["ended", "RUNNING"])):
        (bindir / "squeue").write_text(f"#!/bin/sh\necho '{queued}'\n" if queued else "#!/bin/sh\nexit 0\n")
        for tool in ("sacct", "squeue", "scontrol"):
            (bindir / tool).chmod(0o755)
        r = launch("status", str(runs), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"runs in {runs.resolve()}: 2 (finished jobs are not listed without sacct)", r.stdout
        assert [line.split()[2] for line in lines[2:]] == states, r.stdout
    # no Slurm at all: the table says so and why, not the one-run report's "requeues from the job logs only"
    # (the table shows no requeues)
    (bindir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
                                   "exit 1\n")
    r = launch("status", str(runs), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (f"runs in {runs.resolve()}: 2 (Slurm unavailable: squeue failed: slurm_load_jobs error: Unable to contact "
                        "slurm controller; the jobs' states are not known)"), r.stdout
    assert [line.split()[2] for line in lines[2:]] == ["-", "-"], r.stdout


def test_a_prep_submission_waits_only_for_jobs_of_its_own_splits(tmp_path: Path, monkeypatch) -> None:
    """Which recorded prep jobs a new submission must wait for: those of a split it writes too, in the same OUT
    (a hold-out's split counts), and any record of before the splits were recorded (it may write any)."""
    from launch import status
    from launch.rundir import record_job
    from launch.scripts import PrepJob, SlurmOptions

    run, out, other_out = tmp_path / "shards-slurm", tmp_path / "shards", tmp_path / "elsewhere"
    record_job(run, "1", "prep-array", run / "a.sbatch", out, ["train"])
    record_job(run, "2", "prep-array", run / "b.sbatch", out, ["val"])
    record_job(run, "3", "prep-array", run / "c.sbatch", other_out, ["test"])
    asked = []
    monkeypatch.setattr(status, "_active", lambda ids: asked.append(ids) or [])
    for splits, expected in ((["train"], ["1"]), (["val"], ["2"]), (["test"], []), (["train", "holdout"], ["1"])):
        status.active_prep_jobs(run, out, splits)
        assert asked.pop() == expected, splits
    record_job(run, "4", "prep-finalize", run / "d.sbatch", out)  # an older launcher's record: no splits
    status.active_prep_jobs(run, out, ["test"])
    assert asked.pop() == ["4"]

    def job(*prep_args: str, command: str = "imagefolder", label: str = "train") -> PrepJob:
        return PrepJob(command=command, src=tmp_path, out=out, tasks=2, run_dir=run,
                       slurm=SlurmOptions(time="00:10:00"),
                       prep_args=list(prep_args), label=label)

    assert job("--split", "train").written_splits == ["train"]
    assert job("--split", "train", "--holdout", "500", "--holdout-split", "val").written_splits == ["train", "val"]
    assert job(command="imagenet", label="").written_splits == ["train", "val"]
    assert job("--splits", "val", command="imagenet", label="").written_splits == ["val"]


def test_status_of_the_queue_when_slurm_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    """`launch status` without a directory on a node whose slurm.conf is missing: squeue says it in three lines
    (as Slurm 22.05's does), which the error printed as they were, over several lines."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "squeue").write_text(
        "#!/bin/sh\n"
        "echo 'squeue: error: s_p_parse_file: cannot stat file /etc/slurm/slurm.conf: No such file or directory' >&2\n"
        "echo 'squeue: error: ClusterName needs to be specified' >&2\n"
        "echo 'squeue: fatal: Unable to process configuration file' >&2\n"
        "exit 1\n")
    (bindir / "squeue").chmod(0o755)
    r = launch("status", cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr == (
        "launch: error: squeue failed: squeue: error: s_p_parse_file: cannot stat file /etc/slurm/slurm.conf: No such "
        "file or directory; squeue: error: ClusterName needs to be specified; squeue: fatal: Unable to process "
        "configuration file\n"), r.stderr


def test_a_requeue_that_accounting_has_not_recorded_yet_is_counted(tmp_path: Path) -> None:
    """Right after `scontrol requeue`, sacct (slurmdbd, seconds behind) still lists one run of the job and the
    status said `requeues     0`; the controller's `Restarts=` counts it at once."""
    from launch.rundir import record_job

    bindir, run = tmp_path / "bin", tmp_path / "run"
    bindir.mkdir()
    for tool, text in (("sacct", "printf '12|r50|PENDING|00:00:00|0:0|BeginTime\\n'"),
                       ("squeue", "printf '12|r50|PENDING|0:00|BeginTime\\n'"),
                       ("scontrol", 'case "$4" in 12) echo "JobId=12 JobName=r50 Restarts=1" ;; *) exit 1 ;; esac')):
        (bindir / tool).write_text(f"#!/bin/sh\n{text}\n")
        (bindir / tool).chmod(0o755)
    record_job(run, "12", "train", run / "train.sbatch")
    r = launch("status", str(run), cwd=tmp_path, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "requeues     1 (job 12: 1)" in r.stdout, r.stdout
