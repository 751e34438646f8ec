"""The torchrun command for clusters without Slurm: one agent per node, c10d rendezvous, and restarts
that resume from ``last.ckpt``."""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path

from launch.errors import LaunchError
from launch.validate import launcher_fit_args, no_launcher_args, positive_int, yaml_config
from pipeline.run_layout import TORCHRUN_ERROR_FILE
from pipeline.torchelastic import FRESH_STORE_ENV
from pipeline.torchrun_stop import ERROR_FILE_ENV, read_error_file, remove_stop_guard

_ENDPOINT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:(\d{1,5})$")


STOP_GRACE_S = 120  # as Slurm's script gives its ranks (USR1 300 s before the limit) time to save


def command(config: Path, nnodes: int, nproc_per_node: int, rdzv_endpoint: str, run_dir: Path,
            rdzv_id: str = "resnet", cpu: bool = False, extra_args: list[str] | None = None,
            max_restarts: int = 3, stop_grace: int = STOP_GRACE_S) -> list[str]:
    """argv for `torchrun ... -m pipeline fit ...`; the same on every node. After a failed rank the
    agents restart all ranks (up to ``max_restarts`` times), which resume from ``last.ckpt``. An agent that gets
    a signal (Ctrl-C, a ``kill``) sends it on to its ranks, a preemption for them, and SIGKILLs those still
    running ``stop_grace`` seconds later (torchrun's ``--shutdown-timeout``, whose default of 30 s cut short a
    stop that waited for a validation or a slow save)."""
    config = yaml_config(config, "--config")
    positive_int(nnodes, "--nnodes")
    positive_int(nproc_per_node, "--nproc-per-node")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts: {max_restarts} is negative")
    positive_int(stop_grace, "--stop-grace")
    no_launcher_args(extra_args or [], launcher_fit_args("--nnodes", "--nproc-per-node"))
    if not rdzv_id.strip():  # torchrun would take it; the launcher used a fixed "pending" for every run
        raise LaunchError("--rdzv-id: empty; leave it out to use the run's W&B id")
    m = _ENDPOINT.match(rdzv_endpoint)
    if not m or not 0 < int(m.group(1)) < 65536:
        raise LaunchError(f"--rdzv-endpoint: {rdzv_endpoint!r} is not HOST:PORT")
    local = Path(sys.executable).parent / "torchrun"  # this environment's, like `submit`'s default --python
    head = [str(local) if local.is_file() else "torchrun"]
    argv = [*head, f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", f"--shutdown-timeout={stop_grace}", "-m", "pipeline", "fit", "--config", str(config.resolve()),
            *(extra_args or []),  # before the launcher's own, which win over any --config they add
            "--trainer.default_root_dir", str(run_dir.resolve()),
            "--trainer.num_nodes", str(nnodes), "--trainer.devices", str(nproc_per_node)]
    if cpu:
        argv += ["--trainer.accelerator", "cpu"]
    argv += ["--ckpt_path", "last"]
    return argv


def env(run_dir: Path, run_id: str) -> dict[str, str]:
    """The same W&B resume settings the sbatch script exports, a fresh rendezvous store per restart round
    (see ``pipeline.torchelastic.restart_warning``), and the file where a rank's one-line ``error:`` stops the
    other nodes' agents too (``pipeline.torchrun_stop``)."""
    return {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow", "WANDB_DIR": str(run_dir.resolve()),
            FRESH_STORE_ENV: "1", ERROR_FILE_ENV: str(run_dir.resolve() / TORCHRUN_ERROR_FILE)}


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(a) for a in argv])


def run_here(argv: list[str], env: dict[str, str]) -> int:
    """``--run``: torchrun's own ``main`` in this process, so this process is the agent (signals reach it as
    they reached the torchrun it used to exec). When a rank ended with the trainer's one-line ``error:`` it
    stops the agent (``pipeline.torchrun_stop``: a SIGTERM, which torchrun ends with a ``SignalException``
    traceback and exit 1); then this says so in one line instead, below the rank's, and exits with the
    trainer's status (2 for a setting). A signal from anyone else (Ctrl-C, a ``kill`` of the agent), which the
    agent sends its ranks too, also ends in one line, with 128 + the signal's number."""
    os.environ.update(env)
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.run import main
    except ImportError:  # no torch in this Python: the torchrun found on PATH
        sys.stdout.flush()
        os.execvpe(argv[0], argv, os.environ)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if next(a.split("=", 1)[1] for a in argv if a.startswith("--nnodes=")) == "1":  # (nodes: another agent's)
        check_rendezvous_port(next(a.split("=", 1)[1] for a in argv if a.startswith("--rdzv-endpoint=")))
    error_file = env[ERROR_FILE_ENV]
    earlier = _identity(error_file)  # a file of an earlier torchrun says nothing of this one
    no_self_join_in_torch_timers()
    try:
        main(argv[1:])
    except ChildFailedError:  # its failures table is above; torch's traceback through this module was not news
        restarts = next(a.split("=", 1)[1] for a in argv if a.startswith("--max-restarts="))
        print(f"launch: torchrun gave up: a rank failed again after {restarts} "
              f"restart{'' if restarts == '1' else 's'} (--max-restarts {restarts}; torch's table above names it); "
              f"the same command resumes from last.ckpt", file=sys.stderr)
        return 1
    except SignalException as e:
        # a rank of this agent's stopped it where it left its guard file; a record without one is another
        # launch's (a second launch torchrun into this run directory, refused by its lock, writes one too)
        stopped_by_a_rank = remove_stop_guard(os.getpid())
        record = read_error_file(error_file)
        if (not stopped_by_a_rank or record is None or _identity(error_file) in (None, earlier)
                or not isinstance(record.get("status"), int)):
            return _stopped_by(e.sigval)
        print(f"launch: torchrun stopped without a restart: rank {record.get('rank')} ended with the trainer's "
              f"one-line error: (above, or in its node's log), which every restart would end with again "
              f"({error_file}); exit status {record['status']}", file=sys.stderr)
        return record["status"]
    return 0


def check_rendezvous_port(endpoint: str) -> None:
    """On the machine the endpoint names, its port must be free: torch's agent that cannot listen there joins
    whatever does as a client, and waited in silence (another program: 12 minutes, no line) or joined the
    rendezvous of a ``launch torchrun`` of the same command still running (then a traceback of the store's
    lost connection when that one ended). Other machines' agents connect to it and do not check; so does
    every agent of a run of several nodes (two of them may share a machine: the second finds the first's)."""
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    host, port = endpoint.rsplit(":", 1)
    host = host.strip("[]")
    if not _matches_machine_hostname(host):
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is no obstacle
        try:
            probe.bind(("::" if family == socket.AF_INET6 else "", int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return
            raise LaunchError(f"--rdzv-endpoint {endpoint}: port {port} is in use on this machine (another "
                              f"program, or a launch torchrun already running with this endpoint, whose rendezvous "
                              f"this one would join); give a free port") from None


def no_self_join_in_torch_timers() -> None:
    """torch's rendezvous heartbeat (``_PeriodicTimer``) stops its thread in a finalizer that joins it. When the
    agent drops its rendezvous handler while that thread holds it for a heartbeat (at the agent's end), the
    finalizer runs in the timer's own thread, whose ``join`` raised "cannot join current thread": a traceback
    (``Exception ignored in: <finalize ...>``) under the agent's last line (seen in CI). The thread ends all the
    same (its event is set first); here it is not joined from itself."""
    try:
        from torch.distributed.elastic.rendezvous.utils import _PeriodicTimer
    except ImportError:
        return

    def stop_thread(thread: threading.Thread, stop_event: threading.Event) -> None:
        stop_event.set()
        if thread is not threading.current_thread():
            thread.join()

    if hasattr(_PeriodicTimer, "_stop_thread"):
        _PeriodicTimer._stop_thread = staticmethod(stop_thread)


def _stopped_by(signum: int) -> int:
    """The agent got ``signum`` and stopped its ranks with it (torch's agent sends them the signal it got): for
    them a preemption, each saving ``last.ckpt`` at one step (they say where) unless they were still starting.
    One line instead of torch's ``SignalException`` traceback, which read as a crash after a clean stop."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    print(f"launch: torchrun stopped by {name}: its agent sent {name} to its ranks, which save last.ckpt and stop "
          f"(their lines above say at which step); the same command resumes", file=sys.stderr)
    return 128 + int(signum)


def _identity(path: str) -> tuple[int, int] | None:
    """Which file is at ``path`` (inode, modification time in ns): a rank's write replaces it by a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
