"""Multi-node DDP across two real network hosts (two network namespaces on this machine), gloo, torchrun
rendezvous: identical weights on both ranks, SyncBN run == one-process run on the same global batch,
clean exit; then a resume of that run with one process keeps the global batch via accumulation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import preloaded_python
from tests.import_hook import AFTER_IMPORT
from tests.conftest import REPO, SMALL_NET, free_port, run_module

CONF = str(REPO / "conf" / "demo.yaml")
TOOL = REPO / "tools" / "netns_hosts.sh"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 4


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nsenter", "unshare"))


@pytest.fixture(scope="module")
def hosts():
    """Two hosts: network namespaces NAME-h1/-h2 at 10.77.NET.11/.12 (fallback: two processes on
    localhost where namespaces cannot be made, e.g. without root)."""
    if not _can_make_namespaces():
        yield None
        return
    name, net = f"pl{os.getpid() % 10000}", 100 + os.getpid() % 150
    up = subprocess.run(["bash", str(TOOL), "up", name, str(net), "2"], capture_output=True, text=True)
    if up.returncode != 0:
        subprocess.run(["bash", str(TOOL), "down", name, str(net), "2"], capture_output=True)
        yield None
        return
    try:
        yield name, net
    finally:
        subprocess.run(["bash", str(TOOL), "down", name, str(net), "2"], capture_output=True)


def _fit_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", CONF, *SMALL_NET, "--data.root", str(shards), "--trainer.default_root_dir", str(run_dir),
            "--data.num_workers", "1", "--trainer.num_sanity_val_steps", "0", "--tracking.wandb", "false",
            "--trainer.precision", "64-true", "--trainer.max_steps", str(STEPS), *extra]


def _two_host_fit(hosts, shards: Path, run_dir: Path, port: int) -> list[subprocess.CompletedProcess]:
    addr = f"10.77.{hosts[1]}.11" if hosts else "127.0.0.1"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    args = _fit_args(shards, run_dir, "--trainer.num_nodes", "2", "--trainer.devices", "1",
                     "--trainer.strategy", "ddp", "--trainer.sync_batchnorm", "true", "--data.batch_size", "32")
    procs = []
    for i in (1, 2):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{addr}:{port}", "--rdzv-id", f"t{port}", "-m", "pipeline", "fit", *args]
        if hosts:
            cmd = ["bash", str(TOOL), "run", f"{hosts[0]}-h{i}", *cmd]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_two_hosts_ddp_syncbn_matches_one_process_then_resumes_on_one(hosts, digits_shards, tmp_path):
    two, one = tmp_path / "two_hosts", tmp_path / "one_process"
    with open(tmp_path / "one_process.log", "w") as ref_log:  # beside the two hosts' run
        ref = preloaded_python.popen([sys.executable, "-m", "pipeline", "fit",
                                      *_fit_args(digits_shards, one, "--data.batch_size", "64")],
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=ref_log,
                                     stderr=subprocess.STDOUT)
        runs = _two_host_fit(hosts, digits_shards, two, 29400 + os.getpid() % 500)
        ref.wait(600)
    ref_out = (tmp_path / "one_process.log").read_text()
    assert ref.returncode == 0, ref_out[-3000:]
    for i, r in enumerate(runs):
        # (c) both hosts exit 0, no abort at teardown
        assert r.returncode == 0, f"host {i + 1}:\n{r.stdout[-4000:]}"
        assert "terminate called" not in r.stdout and "Aborted" not in r.stdout, r.stdout[-3000:]
        assert "is deprecated" not in r.stdout, r.stdout[-3000:]  # torch's all_reduce with autograd, once
    # (a) the parity check compared both ranks' weights bit for bit
    assert "weight parity: identical on 2 ranks" in runs[0].stdout, runs[0].stdout[-3000:]
    # ranks run the process group's threads: their workers come from a fork server (data.worker_start_method
    # auto; CPython gh-112275), a single process forks its own
    assert "cpu loader: 1 worker process per rank, started by a fork server" in runs[0].stdout, runs[0].stdout[-3000:]
    assert "cpu loader: 1 worker process per rank, started by fork" in ref_out, ref_out[-3000:]

    # (b) 2 ranks x 32 with SyncBN == 1 rank x 64, same samples, same augmentation (fp64: tight tolerance)
    a, b = _state(two), _state(one)
    assert a["global_step"] == b["global_step"] == STEPS
    worst = max(((a["state_dict"][k] - v).abs().max() / v.abs().max().clamp(min=1e-12)).item()
                for k, v in b["state_dict"].items() if v.is_floating_point())
    assert worst < 1e-9, f"two-host SyncBN run differs from the one-process run: rel {worst:.3g}"
    assert a["ShardDataModule"]["world_size"] == 2 and a["ShardDataModule"]["consumed"] == STEPS * 64

    # resume the two-host run with ONE process: same global batch (accumulate 2), the epoch continues
    res = run_module("pipeline", "fit", *_fit_args(digits_shards, two, "--data.batch_size", "32",
                                                   "--trainer.max_steps", str(STEPS + 2)))
    assert ("world size changed on resume: saved world 2 x batch 32 x accumulate 1 (global 64) -> now"
            " world 1 x batch 32 x accumulate 2 (global 64)") in res.stderr, res.stderr[-3000:]
    c = _state(two)
    assert c["global_step"] == STEPS + 2
    pos = c["ShardDataModule"]
    assert (pos["world_size"], pos["batch_size"], pos["accumulate"]) == (1, 32, 2)
    assert pos["consumed"] == (STEPS + 2) * 64, "2 more global batches of 64, nothing repeated or skipped"


def test_under_slurm_only_our_preemption_requeues(digits_shards, tmp_path, monkeypatch):
    """Under Slurm the trainer gets SLURMEnvironment(auto_requeue=False): Lightning's own USR1 requeue is
    off, the Preemption callback (save at a batch boundary, one requeue from rank 0) is on, and
    checkpoints are written atomically."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from pipeline.checkpoint_io import AtomicCheckpointIO
    from pipeline.cli import PipelineCLI
    from pipeline.datamodule import ShardDataModule
    from pipeline.module import ImageClassifier
    from pipeline.preemption import Preemption

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "resnet")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    cli = PipelineCLI(ImageClassifier, ShardDataModule, run=False, auto_configure_optimizers=False,
                      trainer_defaults={"use_distributed_sampler": False},
                      args=_fit_args(digits_shards, tmp_path / "run")[:-4] + ["--tracking.wandb", "false"])
    env = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, Preemption) for c in cli.trainer.callbacks) == 1


def test_a_signal_on_one_rank_stops_both_at_one_step_and_resumes_exactly(digits_shards, tmp_path):
    """USR1 on rank 1 only (a node whose tasks got the signal first): the vote reaches rank 0, both ranks
    save last.ckpt at the same step, one optimizer step after the signal (the vote of a step is read at
    the next), exit 0, and the resumed run ends bit-identical to an uninterrupted 2-rank run. Two ranks
    of Lightning's own launcher (rank 0 starts rank 1): the vote is the same under torchrun and srun."""
    from bench.kill_resume import compare, fit_command

    steps = 8

    def two_ranks(run_dir: Path, *extra: str, port_: int) -> str:
        cmd = fit_command(digits_shards, run_dir, steps, ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                                         "--data.batch_size", "32", *extra])
        proc = run_module(*cmd[2:], env={"WANDB_MODE": "offline", "MASTER_PORT": str(port_)})  # cmd: python -m
        return proc.stdout + proc.stderr

    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref_out = two_ranks(ref, port_=free_port())
    # val/loss is reduced over the ranks by hand (an exact mean): no advice to let Lightning average it
    assert "sync_dist=True" not in ref_out, ref_out[-3000:]
    out = two_ranks(cut, "--checkpoint.every_n_train_steps", "0",  # the preemption's save is the only one
                    "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch",
                    "--trainer.callbacks.batch_idx=2", "--trainer.callbacks.rank=1", port_=free_port())
    assert "preemption (a peer's signal): saving" in out, out[-3000:]  # rank 0 never got the signal itself
    saved = _state(cut)
    assert saved["global_step"] == 4, "signal at the start of step 3, voted at its end, read at step 4"
    assert saved["ShardDataModule"]["consumed"] == 4 * 64 and saved["ShardDataModule"]["epoch"] == 0
    # another shuffle window from the next epoch on: the stopped epoch ends in its own order (bit-identical), said
    # once (each rank said it)
    out = two_ranks(cut, "--data.window_shards", "2", port_=free_port())
    assert out.count("data.seed 0 / data.window_shards 2 differ from the checkpoint's (0 / 4)") == 1, out[-3000:]
    diffs = compare(ref / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def _children_with_local_rank(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(status.split("PPid:")[1].split()[0])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"LOCAL_RANK=1" in environ:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_rank_started_by_lightning_ends_when_rank_zero_is_killed(digits_shards, tmp_path):
    """``trainer.devices 2`` without torchrun: rank 0 starts rank 1 as its own child. Rank 0 killed during
    start-up (the OOM killer, a kill of that process) left rank 1 waiting for the rendezvous for 30 minutes
    and more (it could even join the next run on the same port); it must end, here finding rank 0 gone."""
    import signal
    import time

    cmd = [sys.executable, "-m", "pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"), *SMALL_NET,
           "--data.root",
           str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--tracking.wandb", "false", "--trainer.max_steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())}
    rank0 = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank1 = None
    try:
        deadline = time.monotonic() + 180
        while rank1 is None and time.monotonic() < deadline and rank0.poll() is None:
            rank1 = next(iter(_children_with_local_rank(rank0.pid)), None)
            time.sleep(0.05)
        assert rank1 is not None, "rank 0 started no rank 1"
        time.sleep(1)  # rank 1 is importing: it will look for rank 0's rendezvous after rank 0 is gone
        rank0.kill()
        rank0.wait()
        deadline = time.monotonic() + 60
        while _alive(rank1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(rank1), "rank 1 outlived rank 0"
    finally:
        for pid in (rank0.pid, rank1):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_rank_started_by_lightning_gets_sigterm_when_rank_zero_ends(tmp_path):
    """The same command's rank with LOCAL_RANK=1 asks the kernel for SIGTERM when its parent, rank 0, ends
    (Lightning's watch over its ranks is a thread of rank 0): it then stops as on a preemption."""
    import time

    child = ("import sys, time; from pipeline.parent_death import follow_lightning_rank_zero; "
             f"r = follow_lightning_rank_zero(); open({str(tmp_path / 'asked')!r}, 'w').write(repr(r)); time.sleep(120)")
    parent = ("import os, subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, 'fit', '--x'], env={{**os.environ, 'LOCAL_RANK': '1'}}); "
              f"open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); "
              f"[time.sleep(0.1) for _ in range(600) if not os.path.exists({str(tmp_path / 'asked')!r})]")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "LOCAL_RANK"))}
    subprocess.run([sys.executable, "-c", parent, "fit", "--x"], env={**env, "PYTHONPATH": str(REPO)}, check=True,
                   timeout=120)  # ends once the child has asked
    assert (tmp_path / "asked").read_text() == "None"
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
        raise AssertionError("the rank outlived rank 0")


def test_a_corrupt_sample_on_one_rank_stops_both_with_one_line_each(digits_shards, tmp_path):
    """``trainer.devices 2`` (Lightning's launcher), a corrupt sample that only rank 1 reads, mid-epoch under
    data.on_corrupt fail: rank 1 ends with its `error:` line, rank 0 learns of it in its next collective and
    stops within seconds (not the process group's 30 minutes). Rank 0 printed gloo's `Connection closed by peer`
    as a traceback of some 100 lines below the cause, the last lines of the log; now one line that is no
    `error:` (a peer killed outright is a crash, which the Slurm script retries). last.ckpt, saved before the
    sample, is intact."""
    from pipeline.data.contract import TrainSampler
    from pipeline.data.shards import ShardSet
    from tests.test_dali_backend import corrupt_copy, zero_head

    batch, step = 32, 10
    order = iter(TrainSampler(ShardSet(digits_shards, "train").shard_sizes, 0, 2, 1, batch))
    sample = int([next(order) for _ in range(step + 1)][step][0][0])  # rank 1's first sample of step 11
    shards = corrupt_copy(digits_shards, tmp_path / "shards", "train", sample, zero_head)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "fit", *_fit_args(shards, run_dir, "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--data.batch_size", str(batch), "--checkpoint.every_n_train_steps", "2",
           "--trainer.precision", "32-true", "--trainer.max_steps", "20")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 1's own status for a corrupt sample
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    shard = ShardSet(shards, "train").shard_name(sample)
    assert len(errors) == 1 and f"of shard {shard!r}" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    # rank 0 started rank 1 (Lightning's launcher): it names rank 1 and its error: line, last, not "another rank"
    assert "another rank of this run ended" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("rank 0 stopped: rank 1 of this run") and "error: above; exit status 1" in lines[-1], \
        proc.stderr[-3000:]
    assert lines.index(errors[0]) < len(lines) - 1, "the cause first"
    assert _state(run_dir)["global_step"] == step


# rank 1 alone (LOCAL_RANK=1: Lightning's launcher passes the command's environment on) ends in its first
# training step, as TEST_RANK1_ENDS says: `error` raises a ConfigError (the trainer's `error:` line, exit 2), `kill`
# SIGKILLs itself (the OOM killer). With TEST_RANK0_BUSY=S rank 0 (no LOCAL_RANK at its start) spends S seconds
# in its first training step before its first collective (a save, a slow step). A test harness: every setting
# agrees across ranks, so no setting does it.
RANK1_ENDS = AFTER_IMPORT + """
import os, signal, time


def patch(module):
    step = module.ImageClassifier.training_step

    def training_step(self, *args, **kwargs):
        if os.environ.get("LOCAL_RANK_AT_START") is None:  # rank 0
            time.sleep(float(os.environ.get("TEST_RANK0_BUSY") or 0))
            os.environ["TEST_RANK0_BUSY"] = "0"
            return step(self, *args, **kwargs)
        if os.environ["TEST_RANK1_ENDS"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        from pipeline.errors import ConfigError
        raise ConfigError("test.setting: refused on rank 1 alone")
    module.ImageClassifier.training_step = training_step


if os.environ.get("TEST_RANK1_ENDS") and (os.environ.get("LOCAL_RANK") == "1" or os.environ.get("TEST_RANK0_BUSY")):
    if "LOCAL_RANK" in os.environ:
        os.environ["LOCAL_RANK_AT_START"] = os.environ["LOCAL_RANK"]
    after_import("pipeline.module", patch)
"""


def _fit_where_rank1_ends(shards: Path, tmp_path: Path, how: str, rank0_busy_s: float = 0) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RANK1_ENDS)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "fit", *_fit_args(shards, run_dir, "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--data.batch_size", "16", "--trainer.enable_checkpointing", "false",
           "--data.num_workers", "0", "--trainer.precision", "32-true")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "LOCAL_RANK"))}
    env.update({"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "WANDB_MODE": "offline", "MASTER_PORT": str(free_port()),
                "OMP_NUM_THREADS": "1", "TEST_RANK1_ENDS": how, "TEST_RANK0_BUSY": str(rank0_busy_s or "")})
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    left = []  # no rank outlives the command (rank 0 waited for its children; the kernel's SIGTERM for the rest)
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir).encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                left.append(int(entry.name))
        except OSError:
            pass
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"processes left: {left}"
    return proc


def test_lightning_launcher_ends_with_its_child_ranks_error_status(digits_shards, tmp_path):
    """``trainer.devices 2`` without torchrun or srun: rank 1, rank 0's child, ends with the trainer's `error:`
    line and exit 2 (a setting). The command (rank 0) ended with exit 1 and "rank 0 stopped: another rank of
    this run ended ..." below it: a crash to a wrapper that retries one, the cause not the last line. Now
    exit 2 and one closing line that names rank 1."""
    proc = _fit_where_rank1_ends(digits_shards, tmp_path, "error")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == ["error: test.setting: refused on rank 1 alone"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "another rank of this run ended" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1] == ("rank 0 stopped: rank 1 of this run (started by this process, Lightning's launcher) ended "
                         "with the trainer's one-line error: above; exit status 2, as rank 1's"), proc.stderr[-3000:]


def test_lightning_launcher_names_a_child_rank_killed_by_a_signal(digits_shards, tmp_path):
    """Rank 1 SIGKILLed (the OOM killer) prints nothing: rank 0's "another rank ... that rank's own message says
    why" pointed at nothing. Now rank 0 names rank 1 and the signal, and keeps exit 1: a crash, retried."""
    proc = _fit_where_rank1_ends(digits_shards, tmp_path, "kill")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not [line for line in lines if line.startswith("error: ")], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("rank 0 stopped: rank 1 of this run") and "killed by SIGKILL" in lines[-1] \
        and lines[-1].endswith("exit status 1, a crash"), proc.stderr[-3000:]


@pytest.mark.parametrize("how, status, says", [
    ("error", 2, "ended with the trainer's one-line error: above; exit status 2, as rank 1's"),
    ("kill", 1, "was killed by SIGKILL and said nothing (the OOM killer, a kill); exit status 1, a crash"),
])
def test_lightning_launcher_ends_with_the_childs_line_when_rank_zero_is_in_no_collective(digits_shards, tmp_path,
                                                                                         how, status, says):
    """Rank 1 ends while rank 0 spends 60 s before its next collective (a save, a long step; NCCL, which does not
    notice a peer's end, looks the same): Lightning's observer thread SIGKILLed rank 0 within 5 s, so the
    command ended with exit status -9 and no line of its own, a refused setting looking like a crash. Now it
    waits OBSERVER_GRACE_S for rank 0's collective, then prints the same line the peer path prints and ends with
    the child's status, long before rank 0's 60 s are over."""
    started = time.monotonic()
    proc = _fit_where_rank1_ends(digits_shards, tmp_path, how, rank0_busy_s=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == status, proc.stderr[-3000:]
    assert lines[-1] == ("rank 0 stopped: rank 1 of this run (started by this process, Lightning's launcher) "
                         + says), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < 60, "rank 0 slept its 60 s: the observer did not end it"


def test_only_gloos_lost_peer_becomes_the_one_line() -> None:
    """Other errors keep their traceback: a gloo error of another kind, or the same words from elsewhere. NCCL's
    remote error (its words as users report them: no GPU here) is the one line too, saying that it may be the
    network; NCCL's other errors are not."""
    from torch.distributed import DistBackendError

    from pipeline.peer_gone import peer_gone, peer_gone_message

    nccl = DistBackendError(
        "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3763, remote process exited or "
        "there was a network error, NCCL version 2.28.8\nncclRemoteError: A call failed possibly due to a network "
        "error or a remote process exiting prematurely.\nLast error:\nsocketProgressOpt: Call to recv from "
        "10.0.0.7<33759> failed : Connection reset by peer")
    assert peer_gone(nccl)
    assert peer_gone_message(nccl).endswith(
        "stopped: another rank of this run ended, or the network between the ranks failed, during a collective "
        "(NCCL: remote process exited or there was a network error); that rank's own message (an error: line or a "
        "traceback), if it ended, says why")
    assert not peer_gone(DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1331, unhandled cuda error (run with "
                                          "NCCL_DEBUG=INFO for details), NCCL version 2.19.3"))

    closed = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed "
                          "by peer [127.0.0.1]:22169. This is typically caused by a remote worker crashing.")
    assert peer_gone(closed)
    assert "(gloo: Connection closed by peer [127.0.0.1]:22169)" in peer_gone_message(closed)
    assert not peer_gone_message(closed).startswith("error:")  # a crash of the peer stays retried under Slurm
    assert not peer_gone(RuntimeError("[../gloo/transport/tcp/pair.cc:598] Timed out waiting 1800000ms for recv"))
    assert not peer_gone(OSError("Connection reset by peer"))  # W&B, a file system: not a rank's peer
    assert not peer_gone(RuntimeError("Connection closed by peer"))
