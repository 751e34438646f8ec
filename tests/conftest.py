"""Shared fixtures: real-image shard sets built once per session with the project's own data_prep."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# One compute thread per process while `make test` runs test files side by side (pytest-xdist): each
# training subprocess would otherwise start one OpenMP thread per core, and two of them on 2 cores spin
# against each other (a training test took twice as long next to another one as alone). Set before torch
# is imported, so the in-process tests and every subprocess (which inherits it) agree.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import bench.kill_resume  # noqa: E402  (imports torch: after OMP_NUM_THREADS)
from tests import preloaded_python  # noqa: E402


def _import_keeping_the_environment(module: str) -> None:
    """Import ``module`` and take back what its import set in ``os.environ``."""
    before = dict(os.environ)
    __import__(module)
    os.environ.clear()
    os.environ.update(before)


# scikit-learn's first import sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK in os.environ; the fixtures import it
# (its digits and sample photos are the real images of the tests), session fixtures before any test's environment
# is saved. Those variables then differed from the preloaded Python's, which forked no command of that pytest worker
# any more: each started anew (seconds of imports), and every process of the tests inherited them. Imported here
# first, they never enter the environment.
_import_keeping_the_environment("sklearn")

# the kill/resume helpers' runs fork from the preloaded Python too
bench.kill_resume.run_process, bench.kill_resume.start_process = preloaded_python.run, preloaded_python.popen

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The tests of training mechanics (resume, signals, ranks, launchers, logging) run the demo's config with ResNet-8:
# the demo ResNet-20's blocks and option-A shortcuts at a third of its compute (ResNet-20's steps were a third to
# a half of such a test's CPU time). Tests about learning (the loss falls, the demo's accuracy) keep ResNet-20.
SMALL_NET = ("--model.arch", "cifar_resnet8")


@pytest.fixture(autouse=True)
def _environment_as_before() -> Iterator[None]:
    """What a test's own code leaves in ``os.environ`` is taken out after it: Lightning's ``seed_everything``
    in an in-process ``PipelineCLI`` sets ``PL_GLOBAL_SEED``, which every later test's processes inherited (and
    for an environment not its own the preloaded Python starts a real process: every later command of that
    pytest worker started anew)."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


_SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}, key=int)


@pytest.fixture(autouse=True)
def _signals_as_before() -> Iterator[None]:
    """What a test's own code leaves in this process's signal handlers and blocked mask is put back after it: a
    SIGTERM left ignored (the torchrun stop ignores it before it signals its agent) is inherited through exec by
    every later process of that pytest worker, whose ranks then outlived their parent and whose pools of workers
    never ended (seen in CI: three later tests of the worker hung)."""
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) != handler:
            signal.signal(sig, handler)
    if signal.pthread_sigmask(signal.SIG_BLOCK, []) != mask:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def unavailable_here(reason: str) -> None:
    """Skip on a developer machine that cannot run a test's real service (Slurm, namespaces); fail in CI,
    which must run them (.ci/run installs what they need), so a broken setup never passes as a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def cifar_tar(name: str = "cifar10-test.tar") -> Path:
    """One of the real CIFAR-10 tars (``<class>/<n>.jpg``) that this project's CI lays beside the clone
    (``../shared/data/cifar10/``; the repository cannot ship them). Elsewhere the tests that need them skip."""
    path = SHARED / "data" / "cifar10" / name
    if not path.is_file():
        unavailable_here(f"{path} is not here (the real CIFAR-10 tars, beside the clone in this project's CI)")
    return path


def arguments_without_help(parser: argparse.ArgumentParser, where: str = "") -> list[str]:
    """The arguments of ``parser`` and its subcommands whose ``--help`` line says nothing (argparse prints the
    bare name: ``src``, ``--nnodes NNODES``)."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += arguments_without_help(sub, f"{where} {name}".strip())
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{where} {action.option_strings[-1] if action.option_strings else action.dest}".strip())
    return missing


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick): rendezvous ports of tests that may run at the
    same time as others (``make test`` runs two test files at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` of this repo in a subprocess, as a user would (``pipeline`` commands of one rank
    forked from a Python that has imported torch and Lightning: tests/preloaded_python.py)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = preloaded_python.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env,
                                timeout=timeout, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def run_cli_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` as ``pipeline.cli.main(ARGS)`` in this process, for invocations that end
    before training starts (a refused setting): the same exit status and stderr, without the seconds a
    new process spends importing torch and Lightning. The environment, warning filters and signal
    handlers the CLI sets are put back afterwards."""
    from pipeline.cli import main

    saved_env, saved_argv = dict(os.environ), sys.argv
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    sys.argv = [sys.executable, *args]  # what main() parses, as in `python -m pipeline ARGS`
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as e:  # the argument parser's errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["pipeline", *args], code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as 32x32 JPEGs, sharded into train (3 shards) and val (1 shard)."""
    from pipeline.demo_data import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")
    out = root / "shards"
    for split in ("train", "val"):
        run_module("data_prep", "imagefolder", str(root / "images" / split), str(out), "--split", split,
                   "--samples-per-shard", "500", "--workers", "1")
    return out


# ---- tests isolated in a pytest process of their own ---------------------------------------------------------
# DALI 2.4's CPU pipelines with source worker processes (parallel external_source) segfaulted, rarely, in a
# thread of DALI's own inside the pytest worker that ran them: twice in about 60 CI runs, in two different tests
# (faulthandler: no Python frame in the crashing thread; 200 runs of one such test alone never crashed). A
# crashed pytest-xdist worker ends the whole run (pyproject.toml). The tests that run such pipelines in the
# test process are marked `isolated`: each runs in a pytest process of its own, and once more if that process
# died of a signal (said as a warning); an assertion that fails, or a second crash, fails the test.
ISOLATED_CHILD = "RP_ISOLATED_TEST"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "isolated: run in a pytest process of its own, again once after a crash "
                                       "(tests/conftest.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem) -> bool | None:
    if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(ISOLATED_CHILD):
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, ISOLATED_CHILD: "1"}, capture_output=True, text=True,
                              timeout=900)
        said = (proc.stdout + proc.stderr)[-6000:]
        crashed = proc.returncode < 0 or "Fatal Python error" in said
        if proc.returncode == 0:
            return True
        if not crashed or attempt == 2:
            pytest.fail(f"{pyfuncitem.nodeid} in a process of its own: exit status {proc.returncode}\n{said}",
                        pytrace=False)
        full = proc.stdout + proc.stderr
        at = full.find("Fatal Python error")
        warnings.warn(f"{pyfuncitem.nodeid}: its process crashed (exit status {proc.returncode}); run again once:\n"
                      f"{full[at:at + 2500] if at >= 0 else said[-1500:]}", stacklevel=1)
    return True
