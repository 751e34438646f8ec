"""Loader workers and the job's signals: Slurm signals every process of a job step, workers included.

A preemption signal sent to the whole process group must still end in a saved checkpoint and an exact
resume, with loader processes of every kind (DataLoader workers, DALI's spawned source workers); and a
failure in the training process must end the process, not leave it waiting for workers that ignore
SIGTERM.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.kill_resume import compare, fit_command, run_and_kill_at, run_to_end, saved_step
from pipeline.data.worker_signals import shield_worker, spawned_without_preemption_signals
from pipeline.data.worker_start import worker_context
from tests.conftest import REPO, run_module

STEPS = 6


def _shielded_sleep(ready) -> None:
    shield_worker()
    ready.set()
    time.sleep(60)


def _send(sig: signal.Signals, pid: int, check: bool = True) -> None:
    """Signal ``pid`` from another process (as slurmstepd does), not from its parent."""
    subprocess.run(["kill", "-s", sig.name[3:], str(pid)], check=check)


def _blocked(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("SigBlk")).split()[1], 16)


def test_a_shielded_spawned_worker_obeys_only_its_parents_sigterm():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    ctx = multiprocessing.get_context("spawn")
    try:
        ready = ctx.Event()
        with spawned_without_preemption_signals():
            child = ctx.Process(target=_shielded_sleep, args=(ready,), daemon=True)
            child.start()
            signal.raise_signal(signal.SIGUSR1)
        for _ in range(100):  # the handler runs in the main thread once the signal is unblocked
            if got:
                break
            time.sleep(0.01)
        assert got == [signal.SIGUSR1], "a signal that arrived inside the block was delivered after it"
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), "the parent's mask is restored"
        for s in (signal.SIGUSR1, signal.SIGTERM):  # from birth (the resource tracker must not unblock TERM)
            assert _blocked(child.pid) & (1 << (s - 1)), f"{s.name} not blocked in the spawned child"
        assert ready.wait(120), "the child did not start"
        _send(signal.SIGUSR1, child.pid)
        _send(signal.SIGTERM, child.pid)
        child.join(2)
        assert child.is_alive(), "USR1 or a SIGTERM from another process ended the worker"
        child.terminate()  # the parent's SIGTERM: how multiprocessing, torch and DALI end their workers
        child.join(30)
        assert child.exitcode == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGUSR1, previous)
        if child.is_alive():
            child.kill()
            child.join()


def _ended(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


_TRACKER = """
import os, signal, time
from multiprocessing import resource_tracker
from pipeline.data.worker_start import worker_context
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
ctx = worker_context("forkserver")  # starts multiprocessing's resource tracker first
tracker = resource_tracker._resource_tracker._pid
os.kill(tracker, signal.SIGUSR1)  # as Slurm's USR1 to every process of the job step
time.sleep(1)
lock = ctx.Lock()  # a semaphore: registered with the tracker, which is relaunched if it died
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.2)
state = open(f"/proc/{tracker}/status").read().split("State:")[1].split()[0]
print(tracker, state, got == [signal.SIGUSR1], flush=True)
"""


def test_the_resource_tracker_outlives_slurms_usr1():
    """Slurm's USR1 reaches every process of the step, multiprocessing's resource tracker too, which died
    of it (it ignores SIGINT and SIGTERM only); its relaunched successor printed "process died
    unexpectedly" and a KeyError traceback per semaphore into a 2-rank job's log at every preemption. The
    trainer's own USR1 handler is untouched."""
    proc = subprocess.run([sys.executable, "-c", _TRACKER], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    tracker, state, handled = proc.stdout.split()
    assert state in ("S", "R") and handled == "True", proc.stdout
    assert "died unexpectedly" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr[-3000:]


def test_a_fork_server_worker_obeys_only_its_starters_sigterm():
    """The cpu backend's workers are forked by a fork server (``pipeline.data.worker_start``): their parent
    is the server, their starter (which ends them) the trainer. They were taken for orphans and ended at
    once (the shield's parent check), or on any SIGTERM; the server itself died of Slurm's."""
    from multiprocessing import forkserver

    ctx = worker_context("forkserver")
    server = forkserver._forkserver._forkserver_pid
    ready = ctx.Event()
    child = ctx.Process(target=_shielded_sleep, args=(ready,), daemon=True)
    child.start()
    try:
        assert ready.wait(120), f"the worker did not start (exit code {child.exitcode})"
        assert os.getppid() != child.pid and int(open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[1]) == server
        for pid in (server, child.pid):  # from birth: the server was started with them blocked
            for s in (signal.SIGUSR1, signal.SIGTERM):
                assert _blocked(pid) & (1 << (s - 1)), f"{s.name} not blocked in {pid}"
            _send(signal.SIGUSR1, pid)
            _send(signal.SIGTERM, pid)
        child.join(2)
        assert child.is_alive() and not _ended(server), "a signal from another process ended the worker or server"
        child.terminate()  # from the trainer: how torch's DataLoader ends a worker that does not stop
        child.join(30)
        assert child.exitcode == 128 + signal.SIGTERM
    finally:
        if child.is_alive():
            child.kill()
            child.join()


_TRAINER = """
import time
from multiprocessing import forkserver
from pipeline.data.worker_start import worker_context
from tests.test_worker_signals import _shielded_sleep
ctx = worker_context("forkserver")
ready = ctx.Event()
worker = ctx.Process(target=_shielded_sleep, args=(ready,))
worker.start()
assert ready.wait(120)
print(worker.pid, forkserver._forkserver._forkserver_pid, flush=True)
time.sleep(300)
"""


def test_fork_server_workers_and_server_end_with_a_trainer_killed_outright():
    """A trainer killed outright (the OOM killer, ``kill -9``): its fork server's workers are not its
    children, so the kernel does not end them with it; they and the server must end by themselves."""
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        worker, server = map(int, trainer.stdout.readline().split())
        assert not _ended(worker) and not _ended(server)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (_ended(worker) and _ended(server)):
            time.sleep(0.1)
        assert _ended(worker), "the worker outlived its trainer"
        assert _ended(server), "the fork server outlived its trainer and workers"
    finally:
        trainer.kill()
        trainer.wait()


_WATCHER = """
import os, sys, time
from pipeline.data import worker_signals
if sys.argv[2] == "poll":  # as on a kernel before 5.3
    def no_pidfd(pid):
        raise OSError(38, "Function not implemented")
    os.pidfd_open = no_pidfd
worker_signals._die_with_starter(int(sys.argv[1]))
print("watching", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("watch", ["pidfd", "poll"])
def test_a_worker_ends_when_its_starter_ends_with_or_without_pidfd(watch):
    """The starter's end is seen through a pidfd, or by polling where the kernel has no pidfd_open; either
    way the worker ends (SIGKILL) within seconds, not at the end of its sleep."""
    starter = subprocess.Popen(["sleep", "60"])
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(starter.pid), watch], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert watcher.stdout.readline().strip() == "watching"
        time.sleep(1.5)
        assert watcher.poll() is None, "the worker ended while its starter lived"
        starter.kill()
        starter.wait()  # reaped: a zombie would still answer kill(pid, 0)
        assert watcher.wait(timeout=15) == -signal.SIGKILL
    finally:
        for p in (starter, watcher):
            p.kill()
            p.wait()


def _close_then_exit(conn) -> None:
    conn.close()  # what its consumer sees first (DALI: "Worker data receiving interrupted")
    time.sleep(0.5)  # the process is still being torn down
    os._exit(9)


def test_an_error_from_a_dying_worker_is_not_taken_for_a_decoder_error():
    """DALI notices a lost source worker by its closed connection, which can be before the process has
    ended; the loader then checked once, saw every worker alive and took the error for a decoder error
    (fallback batch, a fresh pipeline: a CI run hung there). ``check_after_error`` waits for the death."""
    from pipeline.data.worker_watchdog import WorkerWatchdog

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    worker = ctx.Process(target=_close_then_exit, args=(theirs,))
    worker.start()
    theirs.close()
    watchdog = WorkerWatchdog("a test worker", "nothing to change")
    try:
        watchdog.watch([worker])
        with pytest.raises(EOFError):
            ours.recv()  # the connection closed: the worker is on its way out, not yet gone
        watchdog.check()  # too early to tell
        with pytest.raises(RuntimeError, match=r"a test worker .*exit"):
            watchdog.check_after_error(wait=5.0)
    finally:
        watchdog.stop()
        worker.join()


def serve_an_epoch_after_the_signals(root: str, kill: bool = False, inside_wait: bool = False) -> None:
    """Run by the tests below in a fresh process: DALI's source workers get USR1 and TERM after the first
    batch, as every process of a Slurm job step does; the rest of the epoch must still come, in order.
    ``kill``: one worker is SIGKILLed instead (as by the OOM killer). ``inside_wait``: the loader's check
    between batches is skipped, as when the worker dies just after it, while the loader waits in DALI."""
    import numpy as np

    from pipeline.data.augment import AugmentConfig
    from pipeline.data.contract import TrainSampler
    from pipeline.data.dali_backend import DaliLoader
    from pipeline.data.shards import ShardSet

    shards = ShardSet(root, "train")
    sampler = TrainSampler(shards.shard_sizes, seed=3, world_size=1, rank=0, batch_size=50)
    cfg = AugmentConfig(recipe="cifar", train_size=32, val_size=32, flip=False)
    loader = DaliLoader(shards, sampler, cfg, train=True, cpu=True, num_threads=1, py_workers=2)
    if inside_wait:
        loader._watchdog.check = lambda: None
        loader._watchdog.grace = 2.0
    expected = [rows[0] for rows in sampler]
    batches = iter(loader)
    got = [next(batches)[1]]
    workers = multiprocessing.active_children()
    assert len(workers) >= 2, workers
    if kill:
        os.kill(workers[0].pid, signal.SIGKILL)
    for w in workers[kill:]:  # sent by another process: Slurm's, not the parent's
        _send(signal.SIGUSR1, w.pid, check=not kill)  # after a kill DALI may already have ended the others
        _send(signal.SIGTERM, w.pid, check=not kill)
    time.sleep(1)
    got += [labels for _, labels, _ in batches]
    labels = shards.labels()
    assert len(got) == len(expected)
    assert all(np.array_equal(g.numpy(), labels[ids]) for g, ids in zip(got, expected))
    print("served", len(got), "batches")


def _serve(root, kill: bool = False, inside_wait: bool = False) -> subprocess.CompletedProcess:
    code = (f"from tests.test_worker_signals import serve_an_epoch_after_the_signals as f; "
            f"f({str(root)!r}, {kill}, {inside_wait})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_dali_source_workers_keep_serving_after_the_preemption_signals(digits_shards):
    """Before the workers were shielded they died of the signal and the pipeline hung once the batches
    already computed were used up (the run below then times out)."""
    proc = _serve(digits_shards)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "served 28 batches" in proc.stdout  # 1434 // 50


def test_a_killed_dali_source_worker_is_an_error_naming_it(digits_shards):
    """DALI's pool cannot lose a worker (the next batch waits forever): the loader says so instead."""
    proc = _serve(digits_shards, kill=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a DALI source worker process (pid" in proc.stderr and "signal 9" in proc.stderr


def test_a_dali_source_worker_killed_while_the_loader_waits_ends_the_process(digits_shards):
    """Killed while it held the shared queue's lock, the worker leaves the loader waiting forever inside
    DALI (the run below timed out before the watchdog); now the process ends, naming the worker."""
    proc = _serve(digits_shards, kill=True, inside_wait=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a DALI source worker process (pid" in proc.stderr and "signal 9" in proc.stderr
    assert "served" not in proc.stdout


@pytest.mark.parametrize(("backend", "sig", "ranks"), [
    ("cpu", signal.SIGUSR1, 1), ("dali-cpu", signal.SIGTERM, 1), ("cpu", signal.SIGINT, 1),
    ("dali-cpu", signal.SIGINT, 1), ("cpu", signal.SIGINT, 2),
], ids=["cpu-USR1", "dali-cpu-TERM", "cpu-INT", "dali-cpu-INT", "cpu-2-ranks-INT"])
def test_group_signal_with_loader_workers_saves_and_resumes_exactly(digits_shards, tmp_path, backend, sig, ranks):
    """The signal goes to the process group (trainer and loader workers), as Slurm sends it, and as a
    terminal sends Ctrl-C's SIGINT (which saved nothing: a KeyboardInterrupt, wherever it landed). Ctrl-C's
    line is said once: before, each forked worker ran the trainer's handler too, DALI's source workers died of
    it (a traceback each), and the workers of a two-rank run's fork servers too (the run failed: "DataLoader
    worker ... exited unexpectedly", no save)."""
    workers = (["--data.num_workers", "2" if ranks == 1 else "1"] if backend == "cpu"
               else ["--data.num_workers", "1", "--data.dali_source_workers", "2"])
    extra = ["--data.backend", backend, *workers]
    if ranks > 1:  # a fork server's workers (data.worker_start_method auto)
        extra += ["--trainer.accelerator", "cpu", "--trainer.devices", str(ranks)]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    last = cut / "checkpoints" / "last.ckpt"
    with open(tmp_path / "runs.log", "w") as log:
        run_to_end(fit_command(digits_shards, ref, STEPS, extra), log)
        stopped = run_and_kill_at(fit_command(digits_shards, cut, STEPS, extra), last, 2, log, timeout=300, sig=sig)
        run_to_end(fit_command(digits_shards, cut, STEPS, extra), log)
    text = (tmp_path / "runs.log").read_text()
    assert f"preemption ({signal.Signals(sig).name})" in text, text[-3000:]
    if sig == signal.SIGINT:
        assert "the run is not finished (stopped at step" in text and "KeyboardInterrupt" not in text, text[-3000:]
        assert text.count("Ctrl-C: saving last.ckpt at the next step") == 1 and "Traceback" not in text, text[-3000:]
    assert 2 <= stopped < STEPS
    assert saved_step(last) == STEPS
    diffs = compare(ref / "checkpoints" / "last.ckpt", last)
    assert not diffs, "; ".join(diffs[:10])


def test_a_failure_with_live_loader_workers_exits(digits_shards, tmp_path):
    """An exception in the training process while persistent DataLoader workers are alive: at exit
    multiprocessing sends them SIGTERM and waits for them; when they ignored every SIGTERM (before the
    shield obeyed the parent's), the process waited forever."""
    proc = run_module(
        "pipeline", "fit", "--config", "conf/demo.yaml", "--data.root", str(digits_shards),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "2",
        "--data.backend", "cpu", "--data.num_workers", "2", "--tracking.wandb", "false",
        "--trainer.callbacks+=tests.preemption_helpers.FailAtValidationEnd",
        check=False, timeout=240,
    )
    assert proc.returncode != 0
    assert "FailAtValidationEnd: a failure in the training process" in proc.stderr


@pytest.mark.parametrize("queue", ["put", "get"], ids=["result-queue-lock", "task-queue-lock"])
def test_a_worker_dying_with_a_dali_queue_lock_ends_the_run_with_its_name(digits_shards, tmp_path, queue):
    """A source worker SIGKILLed while it holds a lock of DALI's shared queues (tests/dali_worker_death):
    the run must end, exit status 1, naming the worker. With the result queue's lock, the error between
    batches was printed and then the process hung at exit (DALI's close waited for the lock) until killed."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'dali_worker_death'}:{REPO}",
           "DIE_IN_QUEUE": queue, "DIE_FLAG": str(tmp_path / "died")}
    cmd = [sys.executable, "-m", "pipeline", "fit", "--config", "conf/demo.yaml", "--data.root", str(digits_shards),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "2",
           "--data.backend", "dali-cpu", "--data.num_workers", "1", "--data.dali_source_workers", "2",
           "--tracking.wandb", "false"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert (tmp_path / "died").exists(), "no worker died: the test did not test anything"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "a DALI source worker process (pid" in proc.stderr and "ended (signal 9)" in proc.stderr


def test_ctrl_c_while_the_trainer_starts_is_one_line(digits_shards, tmp_path):
    """Ctrl-C in a fit's first seconds (torch and Lightning importing, before the trainer handles it) printed a
    40-line KeyboardInterrupt traceback through the imports. One line now, and no run directory; the process
    still ends by SIGINT (a shell script around it stops, as for any Ctrl-C'd command; exit 130 let it go on)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "fit", "--config", str(REPO / "conf" / "demo.yaml"),
                             "--data.root", str(digits_shards), "--trainer.default_root_dir", str(run),
                             "--tracking.wandb", "false"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the imports take several seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("python -m pipeline: interrupted (Ctrl-C); rerun the command to start or "
                                            "resume the run"), err[-3000:]
    assert not run.exists()
