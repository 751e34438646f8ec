"""The launcher against a real two-node Slurm cluster (tools/slurm_cluster.sh): jobs really run.

Tests that need the trainer (`python -m pipeline`) or data_prep skip until those modules exist.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.slurm_fixtures import REPO, SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

CIFAR_TRAIN = Path("/work/shared/data/cifar10/cifar10-train.tar")


def needs_module(name: str) -> None:
    """Skip while a sibling package's command-line entry point is not on this branch yet."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not on this branch yet")


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
                             "--python", str(dump), "--", *hostile, cwd=tmp_path, env={"WANDB_API_KEY": secret})
    m = re.search(r"Submitted train job (\d+)", r.stdout)
    assert m, r.stdout
    job = m.group(1)
    slurm_cluster.wait_gone([job], timeout=60)
    assert slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=20) == "COMPLETED"

    log = (run_dir / f"slurm-{job}.out").read_text()
    argvs = [json.loads(line[5:]) for line in log.splitlines() if line.startswith("ARGV ")]
    envs = [json.loads(line[4:]) for line in log.splitlines() if line.startswith("ENV ")]
    expected = ["-m", "pipeline", "fit", "--config", str(cfg), "--trainer.default_root_dir", str(run_dir),
                "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
                "--ckpt_path", "last", *hostile]
    assert argvs == [expected, expected]  # one task per node, identical argv
    assert not canary.exists()
    assert sorted(e["SLURM_PROCID"] for e in envs) == ["0", "1"]
    assert {e["SLURM_NODEID"] for e in envs} == {"0", "1"}
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    for e in envs:
        assert e["WANDB_RUN_ID"] == run_id and e["WANDB_RESUME"] == "allow" and e["WANDB_DIR"] == str(run_dir)
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == str(20000 + int(job) % 20000)
        assert e["SLURM_NTASKS"] == "2" and e["OMP_NUM_THREADS"] == "1"
    # the key was inherited (same hash on both tasks) but appears in no file of the run
    assert [line.split()[1] for line in log.splitlines() if line.startswith("KEYHASH")] == \
        [hashlib.sha256(secret.encode()).hexdigest()] * 2
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f
    assert f"launch: job {job} restart 0 nodes n[1-2] master 127.0.0.1" in log

    # status: sacct knows the job; with accounting switched off it falls back to squeue/scontrol and says so
    st = slurm_cluster.launch("status", str(run_dir))
    assert re.search(rf"^  {job}\s+train-demo_touch_CANARY\s+COMPLETED\s", st.stdout, re.M), st.stdout
    assert "jobs (sacct):" in st.stdout and f"W&B run id   {run_id}" in st.stdout
    assert "checkpoint   none yet" in st.stdout
    no_acct = tmp_path / "slurm-noacct.conf"
    conf = Path(slurm_cluster.env["SLURM_CONF"]).read_text()
    no_acct.write_text(re.sub(r"^AccountingStorage.*$", "", conf, flags=re.M)
                       + "AccountingStorageType=accounting_storage/none\n")
    st = slurm_cluster.launch("status", str(run_dir), env={"SLURM_CONF": str(no_acct)})
    assert st.returncode == 0, st.stderr
    assert "sacct unavailable" in st.stdout and "finished jobs are not listed" in st.stdout
    assert "Traceback" not in st.stderr


def _cifar_imagefolder(dst: Path, per_class: int) -> Path:
    """A small ImageFolder tree of real CIFAR-10 JPEGs (train/<class>/<n>.jpg)."""
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TRAIN) as tar:
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
    needs_module("data_prep.__main__")
    if not CIFAR_TRAIN.is_file():
        pytest.skip(f"{CIFAR_TRAIN} not available")
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
    slurm_cluster.wait_gone([array, fin], timeout=180)
    states = dict(slurm_cluster.sacct_states(array) + slurm_cluster.sacct_states(fin))
    assert states == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
                      fin: "COMPLETED"}, states
    assert _manifest_view(out) == _manifest_view(single)
    shards = sorted(p.name for p in out.rglob("*.tar"))
    assert shards == sorted(p.name for p in single.rglob("*.tar")) and shards
    for name in shards:
        a, b = next(out.rglob(name)), next(single.rglob(name))
        assert a.read_bytes() == b.read_bytes(), name
    st = slurm_cluster.launch("status", str(tmp_path / "sharded-slurm"))
    for jid in (f"{array}_0", f"{array}_1", f"{array}_2", fin):
        assert re.search(rf"^  {jid}\s+\S+\s+COMPLETED", st.stdout, re.M), st.stdout
