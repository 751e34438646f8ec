"""`launch torchrun --run` really trains: one node, two gloo processes, the demo config; after a rank is
killed the agent's restart resumes it, bit-exact."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bench.kill_resume import compare, saved_step
from pipeline.torchelastic import restart_warning
from tests.conftest import REPO, SMALL_NET, free_port
from tests.import_hook import AFTER_IMPORT


STEPS = 8


def _launch(run_dir: Path, shards: Path, *launch_args: str, extra: tuple[str, ...] = (),
            config_check: bool = False) -> subprocess.CompletedProcess:
    return _finish(_start(run_dir, shards, *launch_args, extra=extra, config_check=config_check), run_dir)


def _start(run_dir: Path, shards: Path, *launch_args: str, extra: tuple[str, ...] = (), nnodes: int = 1,
           nproc_per_node: int = 2, endpoint: str | None = None, config_check: bool = False,
           cwd: Path = REPO, site: Path | None = None, more_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``config_check``: the trainer-settings check before the agent starts (a process importing Lightning,
    seconds of CPU), which test_launch_config_check.py tests; here only the uninterrupted run makes it."""
    if not config_check:
        launch_args = ("--no-config-check", *launch_args)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "WANDB_API_KEY", "TORCHELASTIC_", "TORCH_DISABLE_SHARE", "OMP_NUM_THREADS"))}
    # LOGLEVEL: the agent's info lines, one "will restart worker group" per restart (_rounds)
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}" if site else str(REPO), WANDB_MODE="offline", LOGLEVEL="INFO",
               **(more_env or {}))
    # OMP_NUM_THREADS is the launcher's (cores / --nproc-per-node): on 2 cores 1 thread a rank, as every run here
    cores = sorted(os.sched_getaffinity(0))[:2]
    if nnodes * nproc_per_node > len(cores):
        env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "launch", "torchrun", "--config", str(REPO / "conf" / "demo.yaml"),
            "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
            "--rdzv-endpoint", endpoint or f"127.0.0.1:{free_port()}",
            "--run-dir", str(run_dir), "--cpu", *launch_args, "--run", "--",
            *SMALL_NET, "--data.root", str(shards), "--trainer.max_steps", str(STEPS), "--data.num_workers", "0",
            "--checkpoint.every_n_train_steps", "2", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung run: the ranks too (torchrun starts each in a session of its own)
        subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(timed out after {timeout:.0f} s: killed)\n"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _two_agents(run_dir: Path, shards: Path, *launch_args: str, cwds: tuple[Path, Path] = (REPO, REPO),
                timeout: float = 200, **kw) -> list[subprocess.CompletedProcess]:
    """Two `launch torchrun --run` agents of one rank each (two nodes) on one rendezvous and run directory, each in
    its working directory of ``cwds``; the first started gets rank 0."""
    kw = dict(nnodes=2, nproc_per_node=1, endpoint=f"127.0.0.1:{free_port()}", **kw)
    first = _start(run_dir, shards, *launch_args, cwd=cwds[0], **kw)
    for _ in range(600):  # the W&B id (the rendezvous id) is made once, by the first launcher
        if (run_dir / "wandb_run_id").exists():
            break
        time.sleep(0.1)
    second = _start(run_dir, shards, *launch_args, cwd=cwds[1], **kw)
    return [_finish(p, run_dir, timeout=timeout) for p in (first, second)]


@pytest.fixture(scope="module")
def uninterrupted(digits_shards: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    return run_dir, _launch(run_dir, digits_shards, config_check=True)


@pytest.mark.slow
def test_torchrun_run_trains_two_processes(uninterrupted) -> None:
    run_dir, r = uninterrupted
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr
    # torchrun's block when it had to choose the threads ("Setting OMP_NUM_THREADS environment variable for
    # each process to be 1 in default, to avoid your system being overloaded, ..."): the launcher chose them
    assert "OMP_NUM_THREADS" not in r.stdout + r.stderr, r.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)


@pytest.mark.slow
def test_a_branch_with_branch_from_starts_from_the_other_runs_checkpoint(uninterrupted, digits_shards: Path,
                                                                        tmp_path: Path) -> None:
    """`launch torchrun --branch-from OTHER/checkpoints/last.ckpt`: the line passes `--ckpt_path last` (every
    restart resumes the run's own checkpoint), so the origin is recorded in the run directory first."""
    other, _ = uninterrupted
    origin = os.path.realpath(other / "checkpoints" / "last.ckpt")
    run_dir = tmp_path / "branch"
    r = _launch(run_dir, digits_shards, "--branch-from", str(other / "checkpoints" / "last.ckpt"),
                extra=("--trainer.max_steps", str(STEPS + 2)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"branch: {run_dir / 'branched_from'} records {origin}: the first start starts from it" in r.stderr
    assert f"this run is a branch of {origin} ({run_dir / 'branched_from'})" in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS + 2 and ckpt["branched_from"] == origin


@pytest.mark.slow
def test_rank_killed_then_restarted_by_torchrun_is_bit_exact(uninterrupted, digits_shards: Path,
                                                               tmp_path: Path) -> None:
    """Rank 0 dies at step 5 (last.ckpt at step 4); with one restart allowed the agent starts both ranks
    again, they resume, and the run ends as the uninterrupted one. Without a fresh rendezvous store per
    round the restarted ranks read the dead round's addresses and the one restart fails."""
    ref, r0 = uninterrupted
    assert r0.returncode == 0, r0.stderr[-3000:]
    run_dir = tmp_path / "run"
    r = _launch(run_dir, digits_shards, "--max-restarts", "1",
                extra=("--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                       "--trainer.callbacks.step=5"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "exitcode: -9" in out and out.count("resuming from") == 1, out[-4000:]
    assert "connectFullMesh failed" not in out
    diffs = compare(ref / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


def test_the_same_command_again_on_a_complete_run_ends_every_rank(uninterrupted, digits_shards: Path,
                                                                    tmp_path: Path) -> None:
    """Rank 0 finds the run complete and ends (exit 0); rank 1 waits until ``RUN/.lock`` names its job. A refused
    start's putting back the earlier record took that name away: rank 1 waited 30 minutes."""
    ref, r0 = uninterrupted
    assert r0.returncode == 0, r0.stderr[-3000:]
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    r = _finish(_start(run_dir, digits_shards), run_dir, timeout=120)
    assert r.returncode == 0 and "fit: the run is complete" in r.stderr, r.stderr[-3000:]


def test_a_rank_failing_past_max_restarts_ends_in_one_line(digits_shards: Path, tmp_path: Path) -> None:
    """Out of ``--max-restarts``: torch's ChildFailedError traceback through the launcher (35 lines), and no line
    saying it gave up and how to go on."""
    run_dir = tmp_path / "run"
    r = _launch(run_dir, digits_shards, "--max-restarts", "0",
                extra=("--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                       "--trainer.callbacks.step=3", "--trainer.callbacks.rank=1"))
    assert r.returncode == 1, r.stderr[-4000:]
    assert r.stderr.rstrip().splitlines()[-1] == (
        "launch: torchrun gave up: a rank failed again after 0 restarts (--max-restarts 0; torch's table above "
        "names it); the same command resumes from last.ckpt"), r.stderr[-4000:]
    assert "Traceback" not in r.stderr and "exitcode: -9" in r.stderr, r.stderr[-4000:]


def test_a_rendezvous_port_in_use_here_is_refused_at_once(digits_shards: Path, tmp_path: Path) -> None:
    """Another program (or the same `launch torchrun` still running) listening on the endpoint's port: the agent
    joined it as a client and waited without a word (12 minutes, then a timeout)."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        proc = _start(tmp_path / "run", digits_shards, endpoint=f"localhost:{port}")
        r = _finish(proc, tmp_path / "run", timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.rstrip().splitlines()[-1] == (
        f"launch: error: --rdzv-endpoint localhost:{port}: port {port} is in use on this machine (another program, "
        f"or a launch torchrun already running with this endpoint, whose rendezvous this one would join); give a "
        f"free port"), r.stderr[-3000:]


@pytest.mark.slow
def test_ranks_of_a_killed_agent_save_and_stop_then_resume_bit_exact(uninterrupted, digits_shards: Path,
                                                                    tmp_path: Path) -> None:
    """The agent SIGKILLed at step 3 (a `kill -9` of the torchrun pid): the kernel sends its ranks SIGTERM,
    they save last.ckpt together and stop, as on a preemption (before, they trained on to the end with no
    agent watching them). A new torchrun resumes and ends as the uninterrupted run."""
    ref, r0 = uninterrupted
    assert r0.returncode == 0, r0.stderr[-3000:]
    run_dir = tmp_path / "run"
    r = _launch(run_dir, digits_shards, extra=("--trainer.callbacks+=tests.preemption_helpers.KillAgentAt",
                                               "--trainer.callbacks.step=3"))
    out = r.stdout + r.stderr
    assert r.returncode == -9, out[-4000:]
    assert "preemption (SIGTERM)" in out, out[-4000:]
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert not left, f"ranks still running: {left}"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 3 < saved["global_step"] < STEPS, saved["global_step"]
    r = _launch(run_dir, digits_shards)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "resuming from" in out, out[-4000:]
    diffs = compare(ref / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert not diffs, "; ".join(diffs[:10])


# In every rank: the first checkpoint save after step 2 takes TEST_SLOW_SAVE_S more seconds (a large model on a slow
# shared file system). A test harness, not a setting.
SLOW_SAVE = AFTER_IMPORT + """
import os, time


def patch(module):
    save = module.AtomicCheckpointIO.save_checkpoint
    slept = []

    def slow_save(self, checkpoint, path, storage_options=None):
        if checkpoint.get("global_step", 0) > 2 and not slept:
            slept.append(1)
            time.sleep(float(os.environ["TEST_SLOW_SAVE_S"]))
        return save(self, checkpoint, path, storage_options)
    module.AtomicCheckpointIO.save_checkpoint = slow_save


if os.environ.get("TEST_SLOW_SAVE_S"):
    after_import("pipeline.checkpoint_io", patch)
"""


@pytest.mark.slow
def test_ctrl_c_to_the_agent_stops_its_ranks_with_a_save_and_one_line(digits_shards: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches `launch torchrun --run` (the agent; its ranks are in sessions of their own), which sends
    SIGINT on to its ranks: they save last.ckpt at one step and stop, as on a preemption. The agent then ended
    with torch's `SignalException: Process PID got signal: 2` traceback, exit 1, which read as a crash; now one
    line, exit 130 (128 + SIGINT), no restart. That save takes 35 s here: torch's agent SIGKILLed ranks 30 s
    after the signal (its --shutdown-timeout), which lost it; `launch torchrun` gives them 120 s."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    proc = _start(run_dir, digits_shards, "--max-restarts", "2", extra=("--trainer.max_steps", "400"), site=site,
                  more_env={"TEST_SLOW_SAVE_S": "35"})
    deadline = time.monotonic() + 150
    while saved_step(last) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    r = _finish(proc, run_dir)
    out = r.stdout + r.stderr
    assert r.returncode == 130, out[-4000:]
    assert ("launch: torchrun stopped by SIGINT: its agent sent SIGINT to its ranks, which save last.ckpt and stop "
            "(their lines above say at which step); the same command resumes") in r.stderr, out[-4000:]
    assert "Traceback" not in out and _rounds(out) == 1, out[-4000:]
    assert out.count("Ctrl-C: saving last.ckpt at the next step") == 1, out[-4000:]
    stopped = re.search(r"the run is not finished \(stopped at step (\d+)\)", out)
    assert stopped and saved_step(last) == int(stopped.group(1)) > 2, out[-4000:]


@pytest.mark.slow
def test_ctrl_c_after_a_refused_second_launch_is_told_as_ctrl_c(digits_shards: Path, tmp_path: Path) -> None:
    """A second `launch torchrun` into the run directory of one still running is refused by the run's lock: its
    rank's one-line `error:` writes RUN/torchrun-error (the first run's ranks, of another round, ignore it). The
    first launcher's later Ctrl-C then read that file as its own and said "stopped without a restart: rank 0
    ended with the trainer's one-line error", exit 2; it is a Ctrl-C, told as one, exit 130."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = _start(run_dir, digits_shards, extra=("--trainer.max_steps", "400"))
    deadline = time.monotonic() + 150
    while saved_step(last) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    second = _finish(_start(run_dir, digits_shards, extra=("--trainer.max_steps", "400")), run_dir)
    refused = second.stdout + second.stderr
    assert second.returncode == 2 and "launch: torchrun stopped without a restart" in refused, refused[-4000:]
    assert (run_dir / "torchrun-error").exists() and first.poll() is None, refused[-4000:]
    first.send_signal(signal.SIGINT)
    r = _finish(first, run_dir)
    out = r.stdout + r.stderr
    assert r.returncode == 130 and "launch: torchrun stopped by SIGINT" in r.stderr, out[-4000:]
    assert "stopped without a restart" not in out, out[-4000:]


def _rounds(out: str) -> int:
    """Worker-group starts of torchrun's agent: the first, and one per restart."""
    assert "starting workers for entrypoint" in out, "the agent's info lines (LOGLEVEL=INFO) are needed"
    return 1 + out.count("will restart worker group")


@pytest.mark.slow
@pytest.mark.parametrize("setting, says", [("--data.root", "data.root"),  # pipeline.cli.main returns 2
                                           ("--trainer.max_stepz", "unrecognized arguments")])  # the parser exits 2
def test_a_setting_error_under_torchrun_ends_after_one_round_with_its_status(digits_shards: Path, tmp_path: Path,
                                                                            setting: str, says: str) -> None:
    """A setting the trainer refuses (its one-line `error:`, exit 2) under `--max-restarts 2`: every restart
    would refuse it again. Before, torchrun restarted the ranks twice (three rounds of `error:` lines) and
    exited 1 with its ChildFailedError summary; now the rank stops its agent: one round, exit 2."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, digits_shards, "--max-restarts", "2",
                  extra=(setting, str(tmp_path / "missing")))
    r = _finish(proc, run_dir)
    # the agent was `launch torchrun --run` itself: its one-SIGTERM guard file does not stay behind
    assert not list(Path(tempfile.gettempdir()).glob(f"resnet-pipeline-torchrun-stopped-{proc.pid}-*"))
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    # rank 1 refuses it too, and prints the same line when it gets there before its agent's SIGTERM
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, out[-4000:]
    assert says in errors[0] and str(tmp_path / "missing") in errors[0], out[-4000:]
    assert _rounds(out) == 1, out[-4000:]
    assert r.returncode == 2, out[-4000:]
    assert "launch: torchrun stopped without a restart: rank" in out and "Traceback" not in out, out[-4000:]


@pytest.mark.slow
def test_a_corrupt_sample_on_one_rank_under_torchrun_is_not_restarted(digits_shards: Path, tmp_path: Path) -> None:
    """A corrupt sample that only rank 1 reads, at step 4 of 8 under data.on_corrupt fail and `--max-restarts
    2`: rank 1's `error:` stops the agent, rank 0 stops with its one peer line; one round (before: three, each
    resuming from the step-2 save and failing on the same sample), exit 1, the step-2 save intact."""
    from pipeline.data.shards import ShardSet

    shards, sample = _corrupt_for_rank_1(digits_shards, tmp_path)  # rank 1's first sample of step 4
    run_dir = tmp_path / "run"
    r = _launch(run_dir, shards, "--max-restarts", "2",
                extra=("--data.batch_size", "32", "--trainer.precision", "32-true", "--data.on_corrupt", "fail"))
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    shard = ShardSet(shards, "train").shard_name(sample)
    assert len(errors) == 1 and f"of shard {shard!r}" in errors[0], out[-4000:]
    assert _rounds(out) == 1 and "resuming from" not in out, out[-4000:]
    assert r.returncode == 1, out[-4000:]
    assert "launch: torchrun stopped without a restart: rank 1 ended with the trainer's one-line error:" in out, \
        out[-4000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2


@pytest.mark.slow
def test_a_corrupt_sample_on_one_node_stops_the_other_nodes_agent_too(digits_shards: Path, tmp_path: Path) -> None:
    """Two agents (two nodes of one rank each, one run directory): rank 1's `error:` stops its own agent; rank 0,
    on the other node, ends with its peer line, finds rank 1's RUN/torchrun-error of this round and stops its
    agent too. Before, that agent started a new round and waited in the rendezvous for the stopped node."""
    shards, sample = _corrupt_for_rank_1(digits_shards, tmp_path)
    nodes = _two_agents(tmp_path / "run", shards, "--max-restarts", "2",
                        extra=("--data.batch_size", "32", "--trainer.precision", "32-true"))
    out = "".join(r.stdout + r.stderr for r in nodes)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "repair the shard" in errors[0], out[-6000:]
    assert [r.returncode for r in nodes] == [1, 1], out[-6000:]
    for r in nodes:
        node = r.stdout + r.stderr
        assert _rounds(node) == 1 and "launch: torchrun stopped without a restart: rank 1 ended" in node, node[-4000:]
    assert sum("rank 0 stopped: another rank of this run ended" in r.stderr for r in nodes) == 1, out[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("lacking", ["second", "first"])
def test_a_rank_refused_before_the_process_group_formed_stops_the_other_nodes_too(digits_shards: Path,
                                                                                 tmp_path: Path, lacking: str) -> None:
    """Two agents (two nodes of one rank each, one run directory) with a node-local ``--data.root shards``: one
    node has none, and its rank refuses the start before the process group forms. Before, the other node's rank
    waited for it in the process group's start-up (gloo's 30 minutes, then a new round waiting in the
    rendezvous); now it finds the refused rank's RUN/torchrun-error of this round while it waits, says so in one
    line and stops its agent: both nodes end after one round with the trainer's status. The first agent started
    gets rank 0 here, whose rank hosts the group's store: "first" is rank 0 refused, rank 1 waiting to reach it."""
    nodes_dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    for folder in nodes_dirs:
        folder.mkdir()
    has_shards = nodes_dirs[1] if lacking == "first" else nodes_dirs[0]
    (has_shards / "shards").symlink_to(digits_shards)
    nodes = _two_agents(tmp_path / "run", Path("shards"), "--max-restarts", "2", cwds=(nodes_dirs[0], nodes_dirs[1]),
                        timeout=150)
    out = "".join(r.stdout + r.stderr for r in nodes)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data.root" in errors[0] and "'shards'" in errors[0], out[-6000:]
    waiting = [r for r in nodes if not any(line.startswith("error: ") for line in r.stderr.splitlines())]
    assert len(waiting) == 1, out[-6000:]
    waiting = waiting[0]
    stopped = [line for line in waiting.stderr.splitlines() if " stopped: rank " in line]
    assert len(stopped) == 1 and stopped[0].endswith(
        "of this run ended with its one-line error: (exit 2) while this rank waited for the process group to form; "
        "that rank's line says why"), waiting.stderr[-4000:]
    assert [r.returncode for r in nodes] == [2, 2], out[-6000:]
    for r in nodes:
        node = r.stdout + r.stderr
        assert _rounds(node) == 1 and "launch: torchrun stopped without a restart: rank" in node, node[-4000:]
        assert "Traceback" not in node, node[-4000:]


# Under torchrun, in rank 0 alone (RANK=0 at its start): its training step TEST_RANK0_BUSY_AT (a global step) starts
# with 120 s before its collectives (a long save, or a collective that waits for a dead peer, as NCCL's does), and the
# error-file watcher's running phase is shortened (poll 1 s, grace 5 s). A test harness, not a setting.
RANK0_BUSY = AFTER_IMPORT + """
import os, time


def patch(module):
    def on_train_batch_start(self, *args, **kwargs):  # before the step's first collective (DDP's)
        if self.global_step == int(os.environ["TEST_RANK0_BUSY_AT"]):
            time.sleep(120)
    module.ImageClassifier.on_train_batch_start = on_train_batch_start


if os.environ.get("RANK") == "0" and os.environ.get("TEST_RANK0_BUSY_AT"):
    import pipeline.torchrun_stop as watcher
    watcher._FILE_POLL_RUNNING_S, watcher._RUNNING_GRACE_S = 1.0, 5.0
    after_import("pipeline.module", patch)
"""


@pytest.mark.slow
def test_a_rank_that_hears_nothing_of_another_nodes_error_stops_after_the_grace(digits_shards: Path,
                                                                                tmp_path: Path) -> None:
    """Two agents of one rank each; rank 1 ends with its `error:` (a corrupt sample in its share of step 4) while
    rank 0 spends 120 s in that step before its collectives. Under NCCL a rank in a collective waits for a dead
    peer until the collective's timeout (30 minutes): the same as this busy rank, which heard nothing of it. Now
    its watcher finds rank 1's error file of this round, waits the grace (5 s here, 60 s in a run) for the rank to
    end by itself, then prints one line and stops its agent: both nodes end after one round, long before the
    120 s."""
    shards, _ = _corrupt_for_rank_1(digits_shards, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RANK0_BUSY)
    started = time.monotonic()
    nodes = _two_agents(tmp_path / "run", shards, "--max-restarts", "2", site=site,
                        extra=("--data.batch_size", "32", "--trainer.precision", "32-true"),
                        more_env={"TEST_RANK0_BUSY_AT": "3"})
    elapsed = time.monotonic() - started
    out = "".join(r.stdout + r.stderr for r in nodes)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "repair the shard" in errors[0], out[-6000:]
    stopped = [line for line in out.splitlines() if line.startswith("rank 0 stopped: ")]
    assert stopped == ["rank 0 stopped: rank 1 of this run ended with its one-line error: (exit 1) and this rank heard "
                       "nothing of it for 5 s (a collective that does not notice a peer's end, such as NCCL's, or a "
                       "step or save that long); that rank's line says why"], out[-6000:]
    assert [r.returncode for r in nodes] == [1, 1], out[-6000:]
    for r in nodes:
        node = r.stdout + r.stderr
        assert _rounds(node) == 1 and "launch: torchrun stopped without a restart: rank 1 ended" in node, node[-4000:]
    assert elapsed < 120, f"{elapsed:.0f} s: rank 0 slept its 120 s"


def _corrupt_for_rank_1(digits_shards: Path, tmp_path: Path, step: int = 3, batch: int = 32) -> tuple[Path, int]:
    """A copy of the shards whose sample that global rank 1 (of 2) reads first in step ``step + 1`` is corrupt."""
    from pipeline.data.contract import TrainSampler
    from pipeline.data.shards import ShardSet
    from tests.test_dali_backend import corrupt_copy, zero_head

    order = iter(TrainSampler(ShardSet(digits_shards, "train").shard_sizes, 0, 2, 1, batch))
    sample = int([next(order) for _ in range(step + 1)][step][0][0])
    return corrupt_copy(digits_shards, tmp_path / "shards", "train", sample, zero_head), sample


def test_a_rank_whose_agent_is_gone_does_not_start(tmp_path: Path) -> None:
    """A rank that finds its agent already gone (killed between starting it and the rank's request to the
    kernel: no SIGTERM would ever come) stops at once with one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHELASTIC_RUN_ID": "x"}
    rank = ("import sys, time; time.sleep(1); from pipeline.cli import main; "
            f"open({str(tmp_path / 'rc')!r}, 'w').write(str(main(['fit', '--help'])))")
    agent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {rank!r}], stderr=open({str(tmp_path / 'err')!r}, 'w'))"
    subprocess.run([sys.executable, "-c", agent], env=env, check=True, timeout=60)  # ends before the rank asks
    for _ in range(1200):
        if (tmp_path / "rc").exists() and (tmp_path / "rc").read_text():
            break
        time.sleep(0.1)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text() == "1", err
    assert "error: the torchrun agent that started this rank" in err and "has ended" in err, err


def test_a_rank_of_a_torchrun_that_is_pid_1_starts(tmp_path: Path) -> None:
    """In a container whose command is torchrun the live agent is pid 1, which is also what a rank's parent
    reads after its agent died (init adopts orphans): that rank must start (it was refused)."""
    from tests.conftest import unavailable_here

    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        unavailable_here("unshare --pid is not permitted here (needs root)")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(torchrun), "--nnodes", "1",
                           "--nproc-per-node", "1", "--max-restarts", "0", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "pipeline", "fit", "--help"],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=180)
    assert proc.returncode == 0 and "--trainer.max_steps" in proc.stdout, proc.stderr[-3000:]


def test_a_torch_heartbeat_timer_dropped_in_its_own_thread_ends_without_a_traceback(monkeypatch) -> None:
    """The agent's rendezvous handler, dropped while its heartbeat thread holds it (the agent's end): the timer's
    finalizer then runs in that thread and joined it, "cannot join current thread", printed as an ignored
    exception's traceback under `launch torchrun`'s last line (a CI failure). Here the timer's last reference is
    dropped in its own thread."""
    import threading
    from datetime import timedelta

    from launch.torchrun import no_self_join_in_torch_timers
    from torch.distributed.elastic.rendezvous.utils import _PeriodicTimer

    no_self_join_in_torch_timers()
    raised: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: raised.append(info.exc_value))
    holder: dict[str, _PeriodicTimer] = {}
    dropped = threading.Event()

    def tick() -> None:
        if holder.pop("timer", None) is not None:  # the last reference goes here, in the timer's thread
            dropped.set()

    timer = _PeriodicTimer(timedelta(seconds=0.01), tick)
    timer.start()
    holder["timer"] = timer
    del timer
    assert dropped.wait(5)
    time.sleep(0.2)
    assert raised == []


def test_restart_warning_only_for_a_shared_store_with_restarts() -> None:
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3",
              "TORCHELASTIC_RESTART_COUNT": "0"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning(shared)
    assert restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # fresh store
    assert restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_warning({**shared, "TORCHELASTIC_RESTART_COUNT": "1"}) is None  # said once, at the start
    assert restart_warning({}) is None  # not under torchrun
    static = restart_warning({**shared, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # --master-port: shared anyway
    assert "--rdzv-backend c10d" in static and "export" not in static


def test_only_an_error_file_of_this_round_makes_a_rank_whose_peer_ended_stop_its_agent(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """A peer that ended with its `error:` wrote RUN/torchrun-error for this round: the agent is stopped, once per
    agent. No file (a peer killed outright: a crash) or another round's: no signal, the agent restarts."""
    import signal

    from pipeline import torchrun_stop

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(torchrun_stop, "_is_torchrun", lambda pid: True)
    monkeypatch.setattr(torchrun_stop.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(torchrun_stop.signal, "signal", lambda *a: None)
    monkeypatch.setattr(torchrun_stop.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(torchrun_stop, "_PEER_WAIT_S", 1)
    monkeypatch.setattr(torchrun_stop, "_peer_ended", False)
    error_file = tmp_path / "torchrun-error"
    env = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "node0", "MASTER_PORT": "4000", "RANK": "1",
           torchrun_stop.ERROR_FILE_ENV: str(error_file)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    torchrun_stop.a_peer_ended()  # no file: a crash
    error_file.write_text('{"rank": "1", "status": 2, "round": "abc node0:3999"}\n')
    torchrun_stop.a_peer_ended()  # an earlier round's
    assert sent == []
    monkeypatch.setattr(torchrun_stop, "_peer_ended", False)
    assert torchrun_stop.after_exit(2, env) == 2  # this rank's own error: line
    assert torchrun_stop.read_error_file(error_file) == {"rank": "1", "status": 2, "round": "abc node0:4000"}
    assert sent == [(os.getppid(), signal.SIGTERM)]
    torchrun_stop.a_peer_ended()  # another rank of the same node: its agent is stopping already
    assert sent == [(os.getppid(), signal.SIGTERM)]
    assert torchrun_stop.after_exit(1, env) == 1 and len(sent) == 1  # a peer's end is no error: of its own


def test_a_rank_waiting_for_its_group_stops_on_an_error_file_of_this_round_only(tmp_path: Path, monkeypatch,
                                                                               capfd) -> None:
    """``watch_the_error_file``: an earlier round's record or this rank's own is no reason to stop; another
    rank's of this round is (one line, the agent stopped, exit 1): at once while the group forms; once it has
    formed, only when this process has not ended by itself within the grace (its own peer path goes first); after
    the command has ended (the event) never."""
    import signal
    import threading

    import torch.distributed as dist

    from pipeline import torchrun_stop

    sent: list[tuple[int, int]] = []
    exits: list[int] = []
    exited, released = threading.Event(), threading.Event()

    def fake_exit(status: int) -> None:  # the watcher's thread waits here until the test is done with it
        exits.append(status)
        exited.set()
        released.wait(30)

    monkeypatch.setattr(torchrun_stop, "_is_torchrun", lambda pid: True)
    monkeypatch.setattr(torchrun_stop.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(torchrun_stop.signal, "signal", lambda *a: None)  # a_peer_ended's: not this process's
    monkeypatch.setattr(torchrun_stop.os, "_exit", fake_exit)
    monkeypatch.setattr(torchrun_stop.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(torchrun_stop, "_peer_ended", False)
    monkeypatch.setattr(torchrun_stop, "_FILE_POLL_S", 0.1)
    monkeypatch.setattr(torchrun_stop, "_FORMING_POLL_S", 0.05)
    error_file = tmp_path / "torchrun-error"
    env = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "node0", "MASTER_PORT": "4000", "RANK": "0",
           torchrun_stop.ERROR_FILE_ENV: str(error_file)}
    assert torchrun_stop.watch_the_error_file({k: v for k, v in env.items()
                                                       if k != torchrun_stop.ERROR_FILE_ENV}) is None
    # one watcher per node: local rank 0's stop of the agent stops the node's other ranks
    assert torchrun_stop.watch_the_error_file({**env, "LOCAL_RANK": "1"}) is None
    local_rank_0 = torchrun_stop.watch_the_error_file({**env, "LOCAL_RANK": "0"})
    assert local_rank_0 is not None
    local_rank_0.set()

    done = torchrun_stop.watch_the_error_file(env)
    error_file.write_text('{"rank": "1", "status": 2, "round": "abc node0:3999"}\n')  # an earlier round's
    assert not exited.wait(0.6)
    error_file.write_text('{"rank": "0", "status": 2, "round": "abc node0:4000"}\n')  # this rank's own
    assert not exited.wait(0.6)
    error_file.write_text('{"rank": "1", "status": 2, "round": "abc node0:4000"}\n')
    assert exited.wait(5) and exits == [1]
    assert sent == [(os.getppid(), signal.SIGTERM)] and torchrun_stop.peer_ended()
    assert ("rank 0 stopped: rank 1 of this run ended with its one-line error: (exit 2) while this rank waited for "
            "the process group to form; that rank's line says why") in capfd.readouterr().err
    done.set()
    released.set()

    monkeypatch.setattr(torchrun_stop, "_peer_ended", False)
    exited.clear()
    error_file.unlink()
    ended = torchrun_stop.watch_the_error_file(env)
    ended.set()  # the command ended (its own error: line writes this file next)
    time.sleep(0.2)
    error_file.write_text('{"rank": "1", "status": 2, "round": "abc node0:4000"}\n')
    assert not exited.wait(0.6)

    error_file.unlink()
    monkeypatch.setattr(torchrun_stop, "_FILE_POLL_RUNNING_S", 0.1)
    monkeypatch.setattr(torchrun_stop, "_RUNNING_GRACE_S", 0.8)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        heard = torchrun_stop.watch_the_error_file(env)
        time.sleep(0.3)  # it sees the group formed
        error_file.write_text('{"rank": "1", "status": 2, "round": "abc node0:4000"}\n')
        time.sleep(0.3)
        for guard in tmp_path.glob("resnet-pipeline-torchrun-stopped-*"):  # the one-SIGTERM-per-agent mark
            guard.unlink()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        torchrun_stop.a_peer_ended()  # the main thread's collective failed (gloo): it ends by itself
        assert not exited.wait(1.5) and len(sent) == 2  # a_peer_ended stopped the agent, the watcher did nothing
        heard.set()

        monkeypatch.setattr(torchrun_stop, "_peer_ended", False)
        for guard in tmp_path.glob("resnet-pipeline-torchrun-stopped-*"):
            guard.unlink()
        busy = torchrun_stop.watch_the_error_file(env)  # a main thread that hears nothing (NCCL, a long save)
        time.sleep(0.5)
        assert not exited.is_set(), "within the grace"
        assert exited.wait(5) and exits == [1, 1] and len(sent) == 3 and torchrun_stop.peer_ended()
        assert ("rank 0 stopped: rank 1 of this run ended with its one-line error: (exit 2) and this rank heard "
                "nothing of it for 1 s (a collective that does not notice a peer's end, such as NCCL's, or a step or "
                "save that long); that rank's line says why") in capfd.readouterr().err
        busy.set()
        released.set()
    finally:
        dist.destroy_process_group()


def test_a_rank_without_a_temporary_directory_under_torchrun_is_not_restarted(digits_shards: Path,
                                                                              tmp_path: Path) -> None:
    """A node with no usable temporary directory: the rank's start is refused before the trainer's imports
    (pipeline/temp_dir.py), in one `error:` line, exit 2. That refusal ended the process at once, without writing
    the error file or stopping its agent, so torchrun restarted it (three rounds of the same line under
    `--max-restarts 2`) and the other nodes were never told. Now it ends as the CLI's refusals end. The rank is a
    real torchrun worker, whose script makes tempfile settle on an unusable folder and runs `pipeline`."""
    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_text("")
    script = tmp_path / "without_tmp.py"
    script.write_text(f"import runpy, sys, tempfile\n"
                      f"tempfile.tempdir = {str(not_a_folder)!r}\n"
                      f"sys.argv[0] = 'pipeline'\n"
                      f"runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")
    error_file = tmp_path / "torchrun-error"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS"))}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", LOGLEVEL="INFO", TMPDIR=str(not_a_folder),
               OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               RESNET_PIPELINE_TORCHRUN_ERROR_FILE=str(error_file))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script),
                           "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"TMPDIR '{not_a_folder}'" in errors[0], out[-4000:]
    assert _rounds(out) == 1, out[-4000:]
    from pipeline.torchrun_stop import read_error_file

    record = read_error_file(error_file)
    assert record is not None and record["rank"] == "0" and record["status"] == 2, out[-4000:]
    assert not (tmp_path / "run").exists()
