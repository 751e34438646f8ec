"""The launcher against a real two-node Slurm cluster (tools/slurm_cluster.sh): jobs really run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SMALL_NET, cifar_tar
from tests.slurm_fixtures import REPO, SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)



ARGV_DUMP = """\
import hashlib, json, os, sys
key = os.environ.get("WANDB_API_KEY", "")
env = {k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "MASTER_ADDR", "MASTER_PORT",
                                      "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODEID", "OMP_NUM_THREADS")}
print("ARGV " + json.dumps(sys.argv[1:]), flush=True)
print("ENV " + json.dumps(env), flush=True)
print("KEYHASH " + hashlib.sha256(key.encode()).hexdigest(), flush=True)
"""


def test_hostile_values_cannot_inject_and_the_secret_stays_out(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A real 2-node job whose "interpreter" prints the argv it receives: every hostile value arrives as one
    literal argument, no canary file appears, and WANDB_API_KEY reaches the job without being written."""
    canary = tmp_path / "CANARY"
    hostile = [f"a;touch {canary}", f"$(touch {canary})", f"`touch {canary}`", f"x\ntouch {canary}",
               f"'; touch {canary}; '", "${HOME}", "--trainer.max_steps", "30"]
    cdir = tmp_path / "conf;$(touch CANARY)"  # relative: the job runs in tmp_path
    cdir.mkdir()
    cfg = cdir / "demo`touch CANARY`.yaml"
    cfg.write_text("trainer: {}\n")
    dump = tmp_path / "argv_dump.py"
    dump.write_text(f"#!{sys.executable}\n" + ARGV_DUMP)
    dump.chmod(0o755)
    run_dir = tmp_path / "run"
    secret = "wandb-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:32]

    r = slurm_cluster.launch("submit", "train", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "0",
                             "--time", "00:02:00", "--signal-lead", "30", "--run-dir", str(run_dir),
                             "--python", str(dump), "--no-config-check",  # the trainer would refuse these arguments
                             "--", *hostile, cwd=tmp_path, env={"WANDB_API_KEY": secret})
    m = re.search(r"Submitted train job (\d+)", r.stdout)
    assert m, r.stdout
    job = m.group(1)
    slurm_cluster.wait_gone([job], timeout=60)
    assert slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=20) == "COMPLETED"

    log = (run_dir / f"slurm-{job}.out").read_text()
    argvs = [json.loads(line[5:]) for line in log.splitlines() if line.startswith("ARGV ")]
    envs = [json.loads(line[4:]) for line in log.splitlines() if line.startswith("ENV ")]
    expected = ["-m", "pipeline", "fit", "--config", str(cfg), *hostile, "--trainer.default_root_dir", str(run_dir),
                "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
                "--ckpt_path", "last"]
    assert argvs == [expected, expected]  # one task per node, identical argv
    assert not canary.exists()
    assert sorted(e["SLURM_PROCID"] for e in envs) == ["0", "1"]
    assert {e["SLURM_NODEID"] for e in envs} == {"0", "1"}
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    for e in envs:
        assert e["WANDB_RUN_ID"] == run_id and e["WANDB_RESUME"] == "allow" and e["WANDB_DIR"] == str(run_dir)
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == str(10000 + int(job) % 20000)
        assert e["SLURM_NTASKS"] == "2" and e["OMP_NUM_THREADS"] == "1"
    # the key was inherited (same hash on both tasks) but appears in no file of the run
    assert [line.split()[1] for line in log.splitlines() if line.startswith("KEYHASH")] == \
        [hashlib.sha256(secret.encode()).hexdigest()] * 2
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f
    assert f"launch: job {job} restart 0 nodes n[1-2] master 127.0.0.1" in log

    # the saved script resubmitted by hand, from elsewhere: same run directory, same W&B id, and status sees it
    again = slurm_cluster.run("sbatch", "--parsable", str(run_dir / "train.sbatch"), cwd=Path("/")).stdout.strip()
    slurm_cluster.wait_gone([again], timeout=60)
    log2 = (run_dir / f"slurm-{again}.out").read_text()
    assert [json.loads(line[5:]) for line in log2.splitlines() if line.startswith("ARGV ")] == [expected, expected]
    assert {json.loads(line[4:])["WANDB_RUN_ID"] for line in log2.splitlines() if line.startswith("ENV ")} == {run_id}

    # status: sacct knows the jobs; with accounting switched off it falls back to squeue/scontrol and says so
    def status_lists_both_jobs() -> None:
        st = slurm_cluster.launch("status", str(run_dir))
        assert re.search(rf"^  {job}\s+train-demo_touch_CANARY\s+COMPLETED\s", st.stdout, re.M), st.stdout
        # (slurmdbd may still carry a placeholder name for a job that ended seconds ago: match the id only)
        assert re.search(rf"^  {again}\s+\S+\s+COMPLETED\s", st.stdout, re.M), st.stdout
        assert "jobs (sacct):" in st.stdout and f"W&B run id   {run_id}" in st.stdout
        assert "checkpoint   none yet" in st.stdout

    _eventually(status_lists_both_jobs)
    queue = slurm_cluster.launch("status")  # no run directory: the user's queue
    assert queue.stdout.split()[:4] == ["JOBID", "NAME", "STATE", "TIME"], queue.stdout
    st = slurm_cluster.launch("status", str(run_dir),
                              env={"SLURM_CONF": str(_no_accounting_conf(slurm_cluster, tmp_path))})
    assert st.returncode == 0, st.stderr
    assert "sacct unavailable" in st.stdout and "finished jobs are not listed" in st.stdout
    assert "Traceback" not in st.stderr


def _eventually(check: Callable[[], object], timeout: float = 45) -> None:
    """Retry ``check`` (which asserts) until it passes: slurmdbd gets a job's final record (its name, its
    array task ids) a few seconds after squeue forgets the job, later still on a loaded machine. The last
    failure is re-raised unchanged, so the assertions themselves are as strict as before."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)


def _no_accounting_conf(cluster: SlurmCluster, tmp_path: Path) -> Path:
    """The cluster's slurm.conf as a client without slurmdbd sees it: sacct then reports accounting off."""
    no_acct = tmp_path / "slurm-noacct.conf"
    conf = Path(cluster.env["SLURM_CONF"]).read_text()
    no_acct.write_text(re.sub(r"^AccountingStorage.*$", "", conf, flags=re.M)
                       + "AccountingStorageType=accounting_storage/none\n")
    return no_acct


def _cifar_imagefolder(dst: Path, per_class: int) -> Path:
    """A small ImageFolder tree of real CIFAR-10 JPEGs (train/<class>/<n>.jpg)."""
    counts: dict[str, int] = {}
    with tarfile.open(cifar_tar("cifar10-train.tar")) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            cls = parts[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            out = dst / cls / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
            if len(counts) == 10 and all(v >= per_class for v in counts.values()):
                break
    return dst


def _manifest_view(out: Path) -> dict:
    """The manifest minus fields that legitimately differ between runs (timestamps, host, timings)."""
    m = json.loads((out / "manifest.json").read_text())
    volatile = {"created", "created_at", "host", "hostname", "elapsed", "elapsed_s", "duration_s", "timestamp",
                "workers", "tasks", "num_tasks", "command", "argv", "python", "version_info"}

    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in volatile}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(m)  # type: ignore[return-value]


@pytest.mark.slow
def test_prep_array_plus_finalize_matches_single_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    src = _cifar_imagefolder(tmp_path / "src", per_class=12)
    opts = ["--split", "train", "--samples-per-shard", "16"]
    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(src), str(single), *opts,
                          "--workers", "1", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert one.returncode == 0, one.stderr

    out = tmp_path / "sharded"
    r = slurm_cluster.launch("submit", "prep", "imagefolder", str(src), str(out), "--split", "train", "--tasks", "3",
                             "--cpus-per-task", "1", "--time", "00:05:00", "--", "--samples-per-shard", "16")
    m = re.search(r"Submitted prep array job (\d+) \(tasks 0-2\) and finalize job (\d+) \(afterok:(\d+)\)", r.stdout)
    assert m and m.group(1) == m.group(3), r.stdout
    array, fin = m.group(1), m.group(2)
    # the same command again while those have not ended: refused (two array jobs built the same shards at
    # once). The finalize job is held, so one job is surely pending however fast the tasks run.
    slurm_cluster.run("scontrol", "hold", fin)
    slurm_cluster.wait_gone([array], timeout=180)  # every train task planned train with its own 10 classes
    again = slurm_cluster.launch("submit", "prep", "imagefolder", str(src), str(out), "--split", "train", "--tasks",
                                 "3", "--cpus-per-task", "1", "--time", "00:05:00", "--", "--samples-per-shard", "16",
                                 check=False)
    # another split of the same OUT meanwhile: accepted. A val folder without 'cat': train is not in the manifest
    # yet, so val is labelled by its own 9 classes and listed first; train's finalize then lists train and takes
    # val out (it refused train before), `launch status` names val, and val submitted again follows train's list
    val_src = tmp_path / "val_src"
    shutil.copytree(src, val_src, ignore=lambda folder, names: ["cat"] if Path(folder) == src else [])

    def submit_val() -> tuple[str, str]:
        other = slurm_cluster.launch("submit", "prep", "imagefolder", str(val_src), str(out), "--split", "val",
                                     "--tasks", "1", "--cpus-per-task", "1", "--time", "00:05:00", "--",
                                     "--samples-per-shard", "16")
        m_val = re.search(r"Submitted prep array job (\d+) \(tasks 0-0\) and finalize job (\d+)", other.stdout)
        assert m_val, other.stdout + other.stderr
        slurm_cluster.wait_gone(list(m_val.groups()), timeout=180)
        return m_val.group(1), m_val.group(2)

    val_jobs = submit_val()
    assert sorted(_manifest_view(out)["splits"]) == ["val"]
    slurm_cluster.run("scontrol", "release", fin)
    assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
    assert again.stderr.startswith(f"launch: error: split 'train' of {out} is being prepared by job") and \
        f"{fin} PENDING" in again.stderr, again.stderr
    assert re.search(rf"\(`scancel {fin}`\)$", again.stderr.rstrip()), again.stderr
    slurm_cluster.wait_gone([fin], timeout=180)
    fin_log = (tmp_path / "sharded-slurm" / f"prep-finalize-{fin}.out").read_text()
    assert f"data_prep: warning: {out / 'manifest.json'} no longer lists split 'val': its labels count the 9 " \
           f"classes it listed before split 'train' (with ['cat'] besides) was finalized" in fin_log, fin_log
    assert sorted(_manifest_view(out)["splits"]) == ["train"]
    st = slurm_cluster.launch("status", str(tmp_path / "sharded-slurm"))
    assert "; not listed: val, whose labels count another class list than the manifest's (run the data_prep " \
        "command of split 'val' again to relabel it)" in st.stdout, st.stdout
    val_again = submit_val()
    def all_tasks_completed() -> None:
        states = dict(slurm_cluster.sacct_states(array) + slurm_cluster.sacct_states(fin))
        assert states == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
                          fin: "COMPLETED"}, states
        val_states = dict(sum((slurm_cluster.sacct_states(job) for job in (*val_jobs, *val_again)), []))
        assert set(val_states.values()) == {"COMPLETED"}, val_states

    _eventually(all_tasks_completed)
    view = _manifest_view(out)
    assert sorted(view["splits"]) == ["train", "val"], view["splits"].keys()
    assert view["splits"]["val"]["class_counts"] == [0 if name == "cat" else 12 for name in view["classes"]]
    assert view["classes"][3] == "cat" and view["splits"]["val"]["samples"] == 9 * 12
    del view["splits"]["val"]
    assert {**view, "source": "val_src"} == {**_manifest_view(single), "source": "val_src"}  # the last one written
    shards = sorted(p.name for p in out.rglob("train-*.tar"))
    assert shards == sorted(p.name for p in single.rglob("*.tar")) and shards
    for name in shards:
        a, b = next(out.rglob(name)), next(single.rglob(name))
        assert a.read_bytes() == b.read_bytes(), name
    st = slurm_cluster.launch("status", str(tmp_path / "sharded-slurm"))
    for jid in (f"{array}_0", f"{array}_1", f"{array}_2", fin):
        assert re.search(rf"^  {jid}\s+\S+\s+COMPLETED", st.stdout, re.M), st.stdout
    n_val = len(list(out.glob("val-*.tar")))
    assert f"shards       {out}: train {len(shards)} of {len(shards)} done; val {n_val} of {n_val} done\n" in \
        st.stdout, st.stdout
    assert f"manifest     {out / 'manifest.json'} (" in st.stdout and "checkpoint" not in st.stdout, st.stdout
    log = (tmp_path / "sharded-slurm" / f"prep-{array}_0.out").read_text()
    assert "the queued finalize job writes the manifest once every array task succeeded" in log, log


def test_second_train_job_into_a_busy_run_dir_is_refused(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """While a train job of the run directory is running, or requeued and held (it looks dead, but a release
    starts it again), `submit train` into that directory is refused with one line naming the job and what to
    do, and writes and submits nothing. Once the job has ended, the same command submits."""
    cfg = tmp_path / "busy.yaml"
    cfg.write_text("trainer: {}\n")
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 300\n")  # the "trainer": runs until cancelled
    sleeper.chmod(0o755)
    run_dir = tmp_path / "run"

    def submit(time_limit: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return slurm_cluster.launch("submit", "train", "--no-config-check", "--config", str(cfg), "--gpus-per-node",
                                    "0", "--time", time_limit, "--signal-lead", "30", "--run-dir", str(run_dir),
                                    "--python", str(sleeper), check=False, cwd=tmp_path, env=env)

    def refused(state: str) -> None:
        again = submit("00:03:00")  # another --time: a rewritten script would differ
        assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
        assert again.stderr.count("\n") == 1 and again.stderr.startswith(
            f"launch: error: run directory {run_dir} is in use by train job {first} {state}"), again.stderr
        assert again.stderr.endswith(f"(`scancel {first}`), or choose another --run-dir\n"), again.stderr
        assert (run_dir / "train.sbatch").read_bytes() == script
        assert (run_dir / "jobs.jsonl").read_bytes() == recorded
        queued = slurm_cluster.run("squeue", "-h", "-n", "train-busy", "-o", "%i").stdout.split()
        assert queued == [first], queued

    jobs: list[str] = []
    try:
        r = submit("00:02:00")
        m = re.search(r"Submitted train job (\d+)", r.stdout)
        assert r.returncode == 0 and m, r.stdout + r.stderr
        first = m.group(1)
        jobs.append(first)
        script, recorded = (run_dir / "train.sbatch").read_bytes(), (run_dir / "jobs.jsonl").read_bytes()
        slurm_cluster.wait_state(first, {"RUNNING"}, timeout=30)
        refused("RUNNING")
        slurm_cluster.run("scontrol", "requeuehold", first)
        slurm_cluster.wait_state(first, {"PENDING"}, timeout=30)
        refused("PENDING (job requeued in held state)")

        def status_says_why_it_waits() -> None:  # sacct's Reason column (status showed the exit code, 0:0)
            st = slurm_cluster.launch("status", str(run_dir))
            assert re.search(rf"^  {first}\s+train-busy\s+PENDING\s+\S+\s+1  JobHeldUser$", st.stdout, re.M), \
                st.stdout
        _eventually(status_says_why_it_waits)

        slurm_cluster.run("scancel", first)
        slurm_cluster.wait_gone([first], timeout=30)
        # the script submitted by hand (not recorded in jobs.jsonl): found by its log in the run directory
        hand = slurm_cluster.run("sbatch", "--parsable", str(run_dir / "train.sbatch"), cwd=tmp_path).stdout.strip()
        jobs.append(hand)
        slurm_cluster.wait_state(hand, {"RUNNING"}, timeout=30)
        def its_log_is_there() -> None:
            assert (run_dir / f"slurm-{hand}.out").exists()
        _eventually(its_log_is_there)
        again = submit("00:03:00")
        assert again.returncode == 2 and f"is in use by train job {hand} RUNNING" in again.stderr, again.stderr
        slurm_cluster.run("scancel", hand)
        slurm_cluster.wait_gone([hand], timeout=30)
        jobs.remove(hand)
        # SQUEUE_STATES=all: squeue now lists the ended job too (CANCELLED), which must not count
        r = submit("00:03:00", env={"SQUEUE_STATES": "all"})
        m = re.search(r"Submitted train job (\d+)", r.stdout)
        assert r.returncode == 0 and m, r.stdout + r.stderr
        jobs.append(m.group(1))
        assert [json.loads(line)["job_id"] for line in (run_dir / "jobs.jsonl").read_text().splitlines()] == jobs
        assert "--time=00:03:00" in (run_dir / "train.sbatch").read_text()

        # a submission sbatch refuses keeps the last working script (it was overwritten before sbatch ran)
        slurm_cluster.run("scancel", jobs[-1])
        slurm_cluster.wait_gone([jobs[-1]], timeout=30)
        script, recorded = (run_dir / "train.sbatch").read_bytes(), (run_dir / "jobs.jsonl").read_bytes()
        bad = slurm_cluster.launch("submit", "train", "--no-config-check", "--config", str(cfg), "--gpus-per-node",
                                   "0", "--time", "00:04:00", "--signal-lead", "30", "--partition", "nosuch",
                                   "--run-dir", str(run_dir), "--python", str(sleeper), check=False, cwd=tmp_path)
        assert bad.returncode == 2 and f"sbatch {run_dir / 'train.sbatch'} failed: " in bad.stderr, bad.stderr
        assert bad.stderr.rstrip().endswith(f"; {run_dir / 'train.sbatch'} is unchanged"), bad.stderr
        assert (run_dir / "train.sbatch").read_bytes() == script and (run_dir / "jobs.jsonl").read_bytes() == recorded
        assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [], "no .new file left"
    finally:
        slurm_cluster.run("scancel", "-n", "train-busy", check=False)  # a second job, had one got through


def test_the_cifar10_sweep_run_again_skips_a_run_still_queued_and_submits_the_rest(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """docs/cifar10.md adds seeds by running the sweep again. A run whose job still ran was refused by
    `launch submit` (one job per run directory), and `set -e` ended the sweep there: the new seeds were never
    submitted. It is skipped with a note now, the rest submitted; any other refusal still stops the sweep."""
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 300\n")  # the "trainer": runs until cancelled
    sleeper.chmod(0o755)
    runs = tmp_path / "runs"

    def sweep(seeds: int, *launch_opts: str) -> subprocess.CompletedProcess[str]:
        return slurm_cluster.run(
            "bash", str(REPO / "tools" / "cifar10_sweep.sh"), "--depths", "20", "--seeds", str(seeds), "--runs",
            str(runs), "--root", str(tmp_path / "shards"), "--", "--time", "00:05:00", "--gpus-per-node", "0",
            "--signal-lead", "30", "--python", str(sleeper), "--no-config-check", *launch_opts,
            check=False, timeout=300, cwd=REPO, env={"PYTHON": sys.executable})

    def submitted(r: subprocess.CompletedProcess[str]) -> list[str]:
        return re.findall(r"Submitted train job (\d+)", r.stdout)

    try:
        first = sweep(1)
        assert first.returncode == 0 and len(submitted(first)) == 1, first.stdout + first.stderr
        job = submitted(first)[0]
        slurm_cluster.wait_state(job, {"RUNNING"}, timeout=30)
        again = sweep(3)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(submitted(again)) == 2, again.stdout + again.stderr
        seed0 = runs / "cifar_resnet20-seed0"
        assert f"launch: error: run directory {seed0} is in use by train job {job} RUNNING" in again.stderr, again.stderr
        assert again.stderr.rstrip().endswith(
            f"cifar10_sweep: not submitted again, their jobs still queued or running (python -m launch status RUN): "
            f"{seed0}"), again.stderr
        for seed in (1, 2):
            assert (runs / f"cifar_resnet20-seed{seed}" / "jobs.jsonl").exists()
        st = slurm_cluster.launch("status", str(runs))  # one line per run, states from the real sacct/squeue
        rows = [line.split() for line in st.stdout.splitlines()[2:]]
        assert [r[:2] for r in rows] == [[f"cifar_resnet20-seed{k}", j] for k, j in enumerate([job, *submitted(again)])], \
            st.stdout
        assert rows[0][2] == "RUNNING" and all(r[2] in ("RUNNING", "PENDING") for r in rows[1:]), st.stdout
        # another refusal (a partition that does not exist) stops the sweep at its first job, as before
        jobs = [job, *submitted(again)]
        slurm_cluster.run("scancel", *jobs)
        slurm_cluster.wait_gone(jobs, timeout=60)
        bad = sweep(3, "--partition", "nosuch")
        assert bad.returncode == 2 and submitted(bad) == [], bad.stdout + bad.stderr
        assert bad.stderr.count("== cifar_resnet20 seed") == 1 and "sbatch " in bad.stderr, bad.stderr
    finally:
        slurm_cluster.run("scancel", "-n", "c10-resnet20-s0,c10-resnet20-s1,c10-resnet20-s2", check=False)


def test_a_job_that_could_never_start_is_cancelled_and_refused(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """sbatch accepts `--nodes 3` on the two-node partition (and --cpus-per-task 4 on its 1-CPU nodes), and
    the job would wait forever (reason PartitionConfig), keeping the run directory busy: the launcher cancels
    it and refuses in one line naming the reason; the run's last script stays, nothing is recorded or left."""
    cfg = tmp_path / "never.yaml"
    cfg.write_text("trainer: {}\n")
    run_dir = tmp_path / "run"

    def train(*opts: str) -> subprocess.CompletedProcess[str]:
        return slurm_cluster.launch("submit", "train", "--config", str(cfg), "--gpus-per-node", "0", "--time",
                                    "00:03:00", "--signal-lead", "30", "--run-dir", str(run_dir), "--python", "true",
                                    "--no-config-check", *opts, check=False, cwd=tmp_path)

    try:
        first = train("--nodes", "3")
        assert first.returncode == 2 and first.stdout == "" and first.stderr.count("\n") == 1, first.stderr
        job = re.match(r"launch: error: job (\d+) \(--nodes 3, 1 task and no GPU per node, --time 00:03:00\) "
                       r"could never start on the default partition: Slurm keeps it pending with reason "
                       r"PartitionConfig: ", first.stderr)
        assert job and first.stderr.endswith("; it was cancelled\n"), first.stderr
        assert not run_dir.exists(), "a refused first submission leaves no directory"
        assert slurm_cluster.job_state(job.group(1)) in ("CANCELLED", ""), slurm_cluster.job_state(job.group(1))

        ok = train("--nodes", "2")
        m = re.search(r"Submitted train job (\d+)", ok.stdout)
        assert ok.returncode == 0 and m, ok.stderr
        slurm_cluster.wait_gone([m.group(1)], timeout=60)  # `true` as the trainer: done at once
        script, recorded = (run_dir / "train.sbatch").read_bytes(), (run_dir / "jobs.jsonl").read_bytes()
        again = train("--nodes", "2", "--cpus-per-task", "4")
        assert again.returncode == 2 and "--cpus-per-task 4) could never start" in again.stderr, again.stderr
        assert again.stderr.rstrip().endswith(f"; {run_dir / 'train.sbatch'} is unchanged"), again.stderr
        assert (run_dir / "train.sbatch").read_bytes() == script and (run_dir / "jobs.jsonl").read_bytes() == recorded

        src = tmp_path / "src" / "cat"
        src.mkdir(parents=True)
        (src / "a.jpg").write_bytes(b"")
        prep = slurm_cluster.launch("submit", "prep", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"),
                                    "--split", "train", "--tasks", "2", "--cpus-per-task", "4", "--time", "00:05:00",
                                    check=False, cwd=tmp_path)
        array = re.match(
            r"launch: error: job (\d+) \(--tasks 2 array tasks, --time 00:05:00, --cpus-per-task 4 each\) could never "
            r"start on the default partition: Slurm keeps it pending with reason PartitionConfig", prep.stderr)
        assert prep.returncode == 2 and array, prep.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "out-slurm").exists()
        assert slurm_cluster.job_state(array.group(1)) in ("CANCELLED", ""), slurm_cluster.job_state(array.group(1))
    finally:
        slurm_cluster.run("scancel", "-n", "train-never", check=False)


# ---------------------------------------------------------------- training through Slurm (needs the trainer)

STEPS = 30  # optimizer steps of every demo run below; last.ckpt every 5 steps


def _needs_trainer() -> Path:
    return REPO / "conf" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_shards(digits_shards: Path) -> Path:
    """The demo dataset (scikit-learn digits, sharded by data_prep: tests/conftest.py's session fixture)."""
    _needs_trainer()
    return digits_shards


def _train_args(run_dir: Path, shards: Path, time_limit: str = "00:05:00", lead: str = "60",
                steps: int = STEPS, epochs: int | None = None,
                loader: tuple[str, ...] = ("--data.num_workers", "0"), config_check: bool = False) -> list[str]:
    """``loader``: loader settings; with worker processes, Slurm's signals reach them too. ``config_check``:
    the trainer-settings check before sbatch (a process importing Lightning, seconds of CPU), which
    test_launch_config_check.py tests; here only the uninterrupted run's submission makes it."""
    return ["submit", "train", *([] if config_check else ["--no-config-check"]),
            "--config", str(REPO / "conf" / "demo.yaml"), "--nodes", "2",
            "--gpus-per-node", "0", "--time", time_limit, "--signal-lead", lead, "--run-dir", str(run_dir),
            "--", *SMALL_NET, "--data.root", str(shards), "--trainer.max_steps", str(steps),
            "--checkpoint.every_n_train_steps", "5", *loader,
            *(["--trainer.max_epochs", str(epochs)] if epochs else [])]


TRAIN_ENV = {"WANDB_MODE": "offline", "WANDB_API_KEY": ""}


def _submit(cluster: SlurmCluster, args: list[str]) -> str:
    r = cluster.launch(*args, env=TRAIN_ENV)
    m = re.search(r"Submitted train job (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def _step(path: Path) -> int | None:
    """global_step of a checkpoint that may be mid-write (None until it is readable)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:
        return None


def _wait_step(run_dir: Path, at_least: int, job: str, cluster: SlurmCluster, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    last = run_dir / "checkpoints" / "last.ckpt"
    while time.monotonic() < deadline:
        step = _step(last) if last.is_file() else None
        if step is not None and step >= at_least:
            return step
        if cluster.job_state(job) in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED", "NODE_FAIL"):
            break
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    raise AssertionError(f"no checkpoint at step >= {at_least} (job {job}: {cluster.job_state(job)})\n{logs[-4000:]}")


def _wait_requeued(cluster: SlurmCluster, job: str, n: int, timeout: float, run_dir: Path) -> None:
    """Until sacct shows ``n`` interrupted-and-requeued runs of the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [s for _, s in cluster.sacct_states(job)]
        if states.count("REQUEUED") >= n:
            return
        if states and states[-1] in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED", "NODE_FAIL"):
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job} not requeued {n}x: {cluster.sacct_states(job)}\n{_log(run_dir, job)[-4000:]}")


def _log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    job = _submit(slurm_cluster, _train_args(run_dir, demo_shards, config_check=True))
    slurm_cluster.wait_gone([job], timeout=240)
    return run_dir, job


@pytest.mark.slow
def test_train_demo_on_two_nodes_completes(slurm_cluster: SlurmCluster, uninterrupted: tuple[Path, str]) -> None:
    run_dir, job = uninterrupted
    log = _log(run_dir, job)
    assert slurm_cluster.sacct_states(job) == [(job, "COMPLETED")], log[-4000:]
    assert f"launch: job {job} restart 0 nodes n[1-2]" in log
    assert _step(run_dir / "checkpoints" / "last.ckpt") == STEPS
    st = slurm_cluster.launch("status", str(run_dir))
    assert re.search(rf"^  {job}\s+train-demo\s+COMPLETED\s", st.stdout, re.M), st.stdout
    assert f"global_step {STEPS}" in st.stdout and "requeues     0" in st.stdout
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert f"W&B run id   {run_id}" in st.stdout
    assert [p.name for p in (run_dir / "wandb").glob("offline-run-*")] and \
        all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_branch_submitted_with_branch_from_starts_there_once(slurm_cluster: SlurmCluster, demo_shards: Path,
                                                               uninterrupted: tuple[Path, str], tmp_path: Path) -> None:
    """`submit train --branch-from OTHER/checkpoints/last.ckpt`: every start of a job passes `--ckpt_path last`
    (so `--ckpt_path` after `--` is refused), and a branch under Slurm was not possible. The origin is recorded
    in the run directory before the job is queued: its first start trains on from OTHER's step; the same
    submission again resumes the branch's own checkpoint; a branch of another checkpoint is refused."""
    import torch

    other, _ = uninterrupted
    origin = other / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "branch"

    def branch(steps: int, source: Path = origin, check: bool = True) -> subprocess.CompletedProcess[str]:
        args = _train_args(run_dir, demo_shards, steps=steps)
        at = args.index("--")
        return slurm_cluster.launch(*args[:at], "--branch-from", str(source), *args[at:], env=TRAIN_ENV,
                                    check=check)

    r = branch(STEPS + 3)
    job = re.search(r"Submitted train job (\d+)", r.stdout).group(1)
    assert f"  branch  from {os.path.realpath(origin)} (its first start; every later one resumes " \
           f"{run_dir / 'checkpoints' / 'last.ckpt'})" in r.stdout, r.stdout
    slurm_cluster.wait_gone([job], timeout=240)
    log = _log(run_dir, job)
    assert slurm_cluster.sacct_states(job) == [(job, "COMPLETED")], log[-4000:]
    assert f"this run is a branch of {os.path.realpath(origin)} ({run_dir / 'branched_from'}) with no checkpoint " \
           f"of its own yet: starting from {os.path.realpath(origin)} again" in log, log[-4000:]
    own = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(own, map_location="cpu", weights_only=False)
    assert saved["global_step"] == STEPS + 3 and saved["branched_from"] == os.path.realpath(origin)
    st = slurm_cluster.launch("status", str(run_dir))
    assert f"\nbranch of    {os.path.realpath(origin)}\n" in st.stdout, st.stdout

    r = branch(STEPS + 5)  # the same submission again, further: the branch's own checkpoint
    job = re.search(r"Submitted train job (\d+)", r.stdout).group(1)
    slurm_cluster.wait_gone([job], timeout=240)
    log = _log(run_dir, job)
    assert f"this run is a branch of {origin} (--ckpt_path)" not in log and f"resuming from {own}" in log, log[-4000:]
    assert _step(own) == STEPS + 5

    before = own.read_bytes()
    refused = branch(STEPS + 9, source=own.parent / "elsewhere.ckpt", check=False)
    assert refused.returncode == 2 and "--branch-from: " in refused.stderr and "does not exist" in refused.stderr
    other_copy = tmp_path / "other.ckpt"
    other_copy.write_bytes(origin.read_bytes())
    refused = branch(STEPS + 9, source=other_copy, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"launch: error: --branch-from: the run directory {run_dir} has a checkpoint of its own ({own}, a branch of "
        f"{os.path.realpath(origin)}): "), refused.stderr
    assert own.read_bytes() == before and (run_dir / "branched_from").read_text() == os.path.realpath(origin) + "\n"


def _preempted_at(log: str, signame: str, last: Path) -> list[int]:
    """Steps at which the trainer's preemption callback saved last.ckpt on ``signame`` (rank 0's log line; a
    signal that lands in a validation stops at the epoch's end and says so after "then stopping")."""
    pat = rf"^preemption \({signame}\): saving {re.escape(str(last))} at step (\d+), then stopping(?: .*)?$"
    return [int(n) for n in re.findall(pat, log, re.M)]


@pytest.mark.slow
def test_preempted_twice_resumes_to_the_same_step(slurm_cluster: SlurmCluster, demo_shards: Path,
                                                   uninterrupted: tuple[Path, str], tmp_path: Path) -> None:
    """Preemption as Slurm does it: USR1 to the job's tasks (what --signal delivers; the trainer saves
    checkpoints/last.ckpt at the next step and requeues the job itself), then a hard `scontrol requeue`
    (Slurm's SIGTERM, then SIGKILL after KillWait). Every start resumes from last.ckpt and the run ends at
    the uninterrupted run's step, in one W&B run. Each rank has a DataLoader worker process, which gets
    the same signals (it must not die of them)."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = _submit(slurm_cluster, _train_args(run_dir, demo_shards, loader=("--data.num_workers", "1")))
    _wait_step(run_dir, 10, job, slurm_cluster)
    slurm_cluster.run("scancel", "--signal=USR1", job)  # to the srun tasks, like --signal=USR1@lead
    _wait_requeued(slurm_cluster, job, 1, timeout=90, run_dir=run_dir)
    saved = _preempted_at(_log(run_dir, job), "SIGUSR1", last)
    assert len(saved) == 1 and 10 <= saved[0] < STEPS, _log(run_dir, job)[-4000:]
    assert f"requeued Slurm job {job}" in _log(run_dir, job)
    # the requeue cancels the step: made before the ranks' last barrier, it ended a rank there and the
    # other one's barrier raised (a traceback, "task 1: Exited with exit code 1") in 2 of 5 stops
    first = _log(run_dir, job).split(f"launch: job {job} restart 1", 1)[0]
    assert "_teardown_process_group" not in first and "Exited with exit code" not in first, first[-4000:]
    # the USR1 killed multiprocessing's resource tracker; its successor printed a KeyError per semaphore
    assert "Traceback" not in first and "died unexpectedly" not in first, first[-4000:]
    slurm_cluster.wait_state(job, {"RUNNING"}, timeout=90)
    _wait_step(run_dir, saved[0] + 5, job, slurm_cluster)
    slurm_cluster.run("scontrol", "requeue", job)
    slurm_cluster.wait_gone([job], timeout=240)

    log = _log(run_dir, job)
    records = slurm_cluster.sacct_states(job)
    assert [s for _, s in records] == ["REQUEUED", "REQUEUED", "COMPLETED"], log[-4000:]
    assert _step(last) == _step(uninterrupted[0] / "checkpoints" / "last.ckpt") == STEPS
    # each start said what it resumes from: nothing, then the trainer's last.ckpt twice
    starts = re.findall(rf"^launch: job {job} restart (\d) .* ckpt (\S+) at", log, re.M)
    assert starts == [("0", "none"), ("1", str(last)), ("2", str(last))], starts
    assert log.count(f"resuming from {last}") == 2, log[-4000:]
    # Lightning's own requeue handler stays off: no hpc checkpoints, no second requeue path
    assert "Handling auto-requeue signal" not in log and not list(run_dir.glob("hpc_ckpt_*"))
    # W&B's exit hook, talking to its service killed by the same SIGTERM, printed a traceback per start
    assert "Exception ignored in atexit callback" not in log and "socket.send() raised" not in log, log[-4000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3 and all(name.endswith(run_id) for name in offline), offline
    st = slurm_cluster.launch("status", str(run_dir))
    assert re.search(rf"^  {job}\s+train-demo\s+COMPLETED\s+\S+\s+2\s", st.stdout, re.M), st.stdout
    assert f"requeues     2 (job {job}: 2)" in st.stdout and f"global_step {STEPS}" in st.stdout
    # the newest file in checkpoints/ (last.ckpt, or a best-k one written after it at the same step)
    newest = rf"^checkpoint   {re.escape(str(last.parent))}/\S+\.ckpt  global_step {STEPS} "
    assert re.search(newest, st.stdout, re.M), st.stdout
    assert f"W&B run id   {run_id}" in st.stdout


@pytest.mark.slow
def test_scancel_stops_the_job_for_good(slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """`scancel JOB` sends SIGTERM: the trainer saves last.ckpt and stops, and does not requeue the job (Slurm
    takes a requeue in the kill grace time, and the cancelled job came back, again at every scancel)."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = _submit(slurm_cluster, _train_args(run_dir, demo_shards, steps=100_000, epochs=10_000))
    _wait_step(run_dir, 5, job, slurm_cluster)
    slurm_cluster.run("scancel", job)
    slurm_cluster.wait_gone([job], timeout=120)
    time.sleep(3)  # a requeue would show as a pending job again
    log = _log(run_dir, job)
    states = [s for _, s in slurm_cluster.sacct_states(job)]
    assert len(states) == 1 and states[0].startswith("CANCELLED"), (states, log[-4000:])  # "CANCELLED by 0"
    saved = _preempted_at(log, "SIGTERM", last)
    assert len(saved) == 1 and _step(last) == saved[0] >= 5, log[-4000:]
    assert f"Slurm job {job} was cancelled: not requeued; the run stopped at step {saved[0]}" in log, log[-4000:]
    assert f"requeued Slurm job {job}" not in log and "launch: the trainer could not requeue" not in log


REQUEUE_FAILS = """#!/bin/bash
# scontrol as the trainer sees it when it cannot requeue: inside a container image without Slurm, or with the
# controller unreachable for a moment. Every other subcommand is the real one.
if [ "$1" = requeue ]; then echo "slurm_requeue error: Unable to contact slurm controller" >&2; exit 1; fi
exec {scontrol} "$@"
"""


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_the_batch_script_requeues_when_the_trainer_cannot(
        slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """--signal=USR1@5 at a 1-minute limit: Slurm itself signals the running trainer. slurmctld checks
    every 30 s and signals once the end is within lead + 30 s, so USR1 comes 25-55 s in (after the
    trainer's start-up); the trainer saves checkpoints/last.ckpt instead of letting the job time out (the
    kill would come at least one 30 s check later). Its own `scontrol requeue` fails here (as inside a
    container without Slurm, or with the controller unreachable for a moment): it logs the failure and
    exits 0, and the batch script (outside any container, where scontrol works) requeues the job instead of
    letting the run end as COMPLETED, unfinished; the next start resumes from last.ckpt. (The trainer's own
    requeue, under the same USR1 to the tasks: test_preempted_twice_resumes_to_the_same_step.) The loader is
    dali-cpu with a spawned source worker per rank, which gets the USR1 too (it must not die of it)."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "scontrol").write_text(REQUEUE_FAILS.format(scontrol=shutil.which("scontrol")))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\nexport PATH={fakebin}:"$PATH"\nexec {sys.executable} "$@"\n')
    for exe in (fakebin / "scontrol", python):
        exe.chmod(0o755)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = _train_args(run_dir, demo_shards, time_limit="00:01:00", lead="5", steps=100000, epochs=1000,
                       loader=("--data.backend", "dali-cpu", "--data.num_workers", "1",
                               "--data.dali_source_workers", "1"))  # still training when USR1 comes
    job = _submit(slurm_cluster, _with_launch_args(args, "--python", str(python)))
    try:
        _wait_requeued(slurm_cluster, job, 1, timeout=150, run_dir=run_dir)
        log = _log(run_dir, job)
        saved = _preempted_at(log, "SIGUSR1", last)
        assert saved and saved[0] > 0, log[-4000:]
        assert (_step(last) or 0) >= saved[0]
        assert f"requeue of Slurm job {job} failed" in log and f"requeued Slurm job {job}" not in log, log[-4000:]
        assert f"launch: the trainer could not requeue job {job}; requeueing it from the batch script" in log
        assert "TIME LIMIT" not in log and not list(run_dir.glob("hpc_ckpt_*"))
        # without accounting, status still sees the requeued job and its restart count (scontrol)
        st = slurm_cluster.launch("status", str(run_dir), env={"SLURM_CONF": str(_no_accounting_conf(
            slurm_cluster, tmp_path))})
        row = rf"^  {job}\s+train-demo\s+(PENDING|CONFIGURING|RUNNING|COMPLETING)\s+\S+\s+1\s"
        assert re.search(row, st.stdout, re.M), st.stdout
        # the next start resumes from the saved step
        deadline = time.monotonic() + 120
        while f"resuming from {last}" not in _log(run_dir, job) and time.monotonic() < deadline:
            time.sleep(0.5)
        log = _log(run_dir, job)
        starts = re.findall(rf"^launch: job {job} restart (\d) .* ckpt (\S+) at", log, re.M)
        assert starts == [("0", "none"), ("1", str(last))], starts
        assert f"resuming from {last}" in log, log[-4000:]
    finally:
        slurm_cluster.run("scancel", job, check=False)


def _with_launch_args(args: list[str], *launch_args: str) -> list[str]:
    at = args.index("--")
    return [*args[:at], *launch_args, *args[at:]]


KILL = "--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt"


@pytest.mark.slow
def test_crashed_rank_requeues_and_resumes_bit_exact(slurm_cluster: SlurmCluster, demo_shards: Path,
                                                     uninterrupted: tuple[Path, str], tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed at step 12 of the first start (last.ckpt is at step 10): srun fails, the batch
    script requeues the job, the next start resumes from last.ckpt, and the run ends bit-identical to the
    uninterrupted one. Before, the job ended FAILED and the run stopped until someone resubmitted it."""
    from bench.kill_resume import compare

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = _submit(slurm_cluster, _train_args(run_dir, demo_shards) + [
        KILL, "--trainer.callbacks.step=12", "--trainer.callbacks.rank=1"])
    slurm_cluster.wait_gone([job], timeout=300)
    log = _log(run_dir, job)
    assert [s for _, s in slurm_cluster.sacct_states(job)] == ["REQUEUED", "COMPLETED"], log[-4000:]
    failed = re.search(rf"^launch: srun failed \(exit \d+\), failure 1 of at most 3 without a new checkpoint; "
                       rf"requeueing job {job} .*\(first failure: (n\d): task 1: Killed\)$", log, re.M)
    assert failed, log[-4000:]
    # the job needs both nodes of the partition: excluding the failed one would leave it pending forever
    assert f"launch: not excluding node {failed.group(1)}: 1 usable node of partition" in log, log[-4000:]
    starts = re.findall(rf"^launch: job {job} restart (\d) .* ckpt (\S+) at", log, re.M)
    assert starts == [("0", "none"), ("1", str(last))], starts
    assert not compare(uninterrupted[0] / "checkpoints" / "last.ckpt", last)


@pytest.mark.slow
def test_crash_retries_end_without_progress_and_trainer_errors_are_not_retried(
        slurm_cluster: SlurmCluster, demo_shards: Path, tmp_path: Path) -> None:
    """A crash at step 2 of every start, before any checkpoint, with one retry allowed: the second crash
    ends the job (FAILED) instead of requeueing it forever. The job takes one node of two: the retry runs
    on the other one, the failed one excluded. A setting the trainer rejects (its one-line `error:`) would
    fail again at every start: never requeued."""
    run_dir = tmp_path / "crash"
    one_node = _train_args(run_dir, demo_shards)
    one_node[one_node.index("--nodes") + 1] = "1"
    job = _submit(slurm_cluster, _with_launch_args(one_node, "--max-failures", "1") + [
        KILL, "--trainer.callbacks.step=2", "--trainer.callbacks.every_attempt=true"])
    bad_dir = tmp_path / "bad"
    # without the config check (_train_args): it would refuse this at submit; a setting can still fail at the
    # job's start (a path the login node cannot see), and such a job must not be retried
    bad = _submit(slurm_cluster, _train_args(bad_dir, demo_shards) + ["--model.warmup_factor", "10"])
    slurm_cluster.wait_gone([job, bad], timeout=300)

    log = _log(run_dir, job)
    assert [s for _, s in slurm_cluster.sacct_states(job)] == ["REQUEUED", "FAILED"], log[-4000:]
    assert "failure 1 of at most 1 without a new checkpoint; requeueing" in log, log[-4000:]
    nodes = re.findall(rf"^launch: job {job} restart \d nodes (\S+) ", log, re.M)
    assert len(nodes) == 2 and nodes[0] != nodes[1], log[-4000:]
    assert f"launch: excluding node {nodes[0]} from the next starts of job {job} (excluded now: {nodes[0]})" \
        in log, log[-4000:]
    assert f"2 times in a row without a new checkpoint; not requeueing job {job}" in log, log[-4000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()

    log = _log(bad_dir, bad)
    assert [s for _, s in slurm_cluster.sacct_states(bad)] == ["FAILED"], log[-4000:]
    # the trainer's exit status, not srun's 15 for the ranks it ended (sacct showed a refusal as a kill)
    exit_code = slurm_cluster.run("sacct", "-n", "-P", "-X", "-j", bad, "-o", "ExitCode").stdout.split()
    assert exit_code == ["2:0"], (exit_code, log[-4000:])
    assert "error: model.warmup_factor must be in (0, 1]" in log
    assert f"launch: the trainer stopped with an error (above); not requeueing job {bad}" in log
