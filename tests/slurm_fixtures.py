"""A real two-node Slurm cluster (tools/slurm_cluster.sh) for the launcher's tests, started once per session.

Import the fixture into a test module with ``from tests.slurm_fixtures import slurm_cluster  # noqa: F401``.
Several modules may import it: the cluster is reference-counted and started only once.
Skipped only where it cannot work at all: not root, or Slurm missing and no apt-get to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import unavailable_here

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_cluster.sh"
PORT_OFFSETS = (6, 17, 19, 21, 22)


def _ports_free(base: int) -> bool:
    for off in PORT_OFFSETS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", base + off))
            except OSError:
                return False
    return True


def _free_port_base() -> int:
    # pytest-xdist workers (gw0, gw1, ...) each start their own cluster: disjoint ranges, no race for one
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = 17800 + 400 * (int(worker) % 5 if worker.isdigit() else 0)
    for base in range(first, 19800, 40):
        if _ports_free(base):
            return base
    raise RuntimeError("no free port range for the test cluster in 17800-19800")


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: its directory, the client environment, helpers to wait on jobs."""

    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def launch(self, *args: str, check: bool = True, timeout: float = 120, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m launch ARGS`` against this cluster, from the repository (or ``cwd``)."""
        return self.run(sys.executable, "-m", "launch", *args, check=check, timeout=timeout, cwd=cwd or REPO,
                        env={"PYTHONPATH": str(REPO), **(env or {})})

    def job_state(self, job_id: str) -> str:
        """Current state from squeue, else the last sacct record ('' when Slurm does not know the job)."""
        q = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        if q.returncode == 0 and q.stdout.strip():
            return q.stdout.split()[0]
        a = self.run("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State", check=False)
        states = [line.split()[0] for line in a.stdout.splitlines() if line.strip()]  # "CANCELLED by 0": the state
        return states[-1] if states else ""

    def wait_gone(self, job_ids: list[str], timeout: float) -> None:
        """Block until none of ``job_ids`` is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self.run("squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T", check=False)
            if q.returncode == 0 and not q.stdout.strip():
                # accounting reaches slurmdbd a moment later: wait until no record is still open
                a = self.run("sacct", "-n", "-P", "-X", "-D", "-j", ",".join(job_ids), "-o", "State", check=False)
                if a.returncode != 0 or not {"PENDING", "RUNNING", "COMPLETING"} & set(a.stdout.split()):
                    return
            time.sleep(0.5)
        state = self.run("squeue", "-r", "-j", ",".join(job_ids), check=False).stdout
        self.run("scancel", *job_ids, check=False)
        raise AssertionError(f"jobs {job_ids} still queued after {timeout:.0f} s:\n{state}")

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.job_state(job_id)
            if s in states:
                return s
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} never reached {states} within {timeout:.0f} s (last: {s!r})")

    def sacct_states(self, job_id: str) -> list[tuple[str, str]]:
        """(JobID, State) for every record of a job, requeued runs included (sacct -D)."""
        a = self.run("sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State")
        return [tuple(line.split("|")[:2]) for line in a.stdout.splitlines() if line]  # type: ignore[misc]


_state: dict[str, object] = {"refs": 0, "cluster": None}


def _start() -> SlurmCluster:
    if os.geteuid() != 0:
        unavailable_here("the Slurm test cluster needs root (it starts slurmctld/slurmd/munged)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        unavailable_here("Slurm is not installed and apt-get is not available to install it")
    d = Path(tempfile.mkdtemp(prefix="launch-slurm-"))
    d.chmod(0o755)  # MariaDB runs as mysql and must reach its data dir below
    env = {**os.environ, "PORT_BASE": str(_free_port_base())}
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(d / "cluster")], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode == 3:  # Slurm missing and apt-get unable to install it
        shutil.rmtree(d, ignore_errors=True)
        unavailable_here(f"cannot install Slurm here: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        raise RuntimeError(f"test cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    _stop_when_gone(os.getpid(), d)
    conf = d / "cluster" / "etc" / "slurm.conf"
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    client_env["SLURM_CONF"] = str(conf)
    return SlurmCluster(dir=d, env=client_env)


def _stop_when_gone(pid: int, d: Path) -> None:
    """Stop the cluster once process ``pid`` has ended, however it ended. A pytest worker that crashed, or that
    pytest-timeout ended with os._exit, ran no fixture teardown: its slurmctld, slurmd, slurmdbd and MariaDB
    ran on, orphans, after the suite. (After a normal teardown, a stop of the removed folder does nothing.)"""
    watch = 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; bash "$2" stop "$3"; rm -rf "$4"'
    _state["guard"] = subprocess.Popen(["bash", "-c", watch, "stop-when-gone", str(pid), str(SCRIPT),
                                        str(d / "cluster"), str(d)], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(cluster: SlurmCluster) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(cluster.dir / "cluster")], capture_output=True, timeout=120)
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The shared cluster: two nodes n1, n2 (1 CPU each), partition debug, sacct via slurmdbd."""
    if _state["cluster"] is None:
        _state["cluster"] = _start()
    _state["refs"] = int(_state["refs"]) + 1  # type: ignore[call-overload]
    cluster = _state["cluster"]
    assert isinstance(cluster, SlurmCluster)
    try:
        yield cluster
    finally:
        _state["refs"] = int(_state["refs"]) - 1  # type: ignore[call-overload]
        if _state["refs"] == 0:
            _state["cluster"] = None
            _stop(cluster)
