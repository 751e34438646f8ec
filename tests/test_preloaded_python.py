"""The suite's preloaded Python (tests/preloaded_python.py) starts what ``python -m`` starts: a child forked
from it and a real process of the same command see the same command line, paths, environment and ``__main__``,
end with the same exit status, and are signalled by their pid; what a fork cannot reproduce starts anew."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import preloaded_python
from tests.conftest import REPO, unavailable_here

PROBE = [sys.executable, "-m", "tests.preloaded_probe"]


@pytest.fixture
def probe_forked(monkeypatch):
    """The probe module is forked like the pipeline's commands; RP_PRELOADED=0 would make this test pointless."""
    monkeypatch.setattr(preloaded_python, "FORKED_PACKAGES", ("pipeline", "tests"))
    monkeypatch.delenv("RP_PRELOADED", raising=False)
    log = []
    monkeypatch.setattr(preloaded_python, "_log", lambda how, cmd, why="": log.append(how))
    return log


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PROBE": "seen", **extra}


def test_a_forked_child_holds_what_a_started_interpreter_holds(probe_forked, tmp_path):
    real = subprocess.run([*PROBE, "exit", "0"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    forked = preloaded_python.run([*PROBE, "exit", "0"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300)
    again = preloaded_python.run([*PROBE, "exit", "0"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60)
    assert probe_forked == ["forked", "forked"]
    a, b, c = (json.loads(p.stdout) for p in (real, forked, again))
    for key in ("argv", "cwd", "path", "probe", "main", "main_names", "pipeline_imported", "stdin_is", "gc",
                "capabilities"):
        assert a[key] == b[key], (key, a[key], b[key])
    # the command line ps shows: the same but for slashes in front of the interpreter's path, the same file
    assert b["cmdline"][0].startswith("//") and os.path.realpath(b["cmdline"][0]) == os.path.realpath(sys.executable)
    assert a["cmdline"][1:] == b["cmdline"][1:] == ["-m", "tests.preloaded_probe", "exit", "0", ""], b["cmdline"][1:]
    assert a["argv"] == [str(REPO / "tests" / "preloaded_probe.py"), "exit", "0"] and a["cwd"] == str(tmp_path)
    assert a["path"][:2] == [str(tmp_path), str(REPO)] and a["probe"] == "seen" and not a["pipeline_imported"]
    assert b["gc"] == [True, True], "the child's garbage collection is on and frees its own cycles"
    assert (real.returncode, forked.returncode, forked.stderr) == (0, 0, real.stderr) == (0, 0, "to stderr\n")
    assert len({a["random"], b["random"], c["random"]}) == 3, "each child seeds its own random numbers"
    assert b["pid"] != c["pid"] and b["pgid"] != b["pid"], "a child of its own, in the server's process group"


@pytest.mark.parametrize("how, code", [(["exit", "3"], 3), (["raise"], 1), (["kill"], -signal.SIGKILL)])
def test_exit_statuses_are_a_real_processs(probe_forked, how, code):
    real = subprocess.run([*PROBE, *how], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    forked = preloaded_python.run([*PROBE, *how], env=_env(), cwd=REPO, capture_output=True, text=True,
                                  timeout=300)
    assert probe_forked == ["forked"]
    assert real.returncode == forked.returncode == code
    assert real.stderr.splitlines()[-1:] == forked.stderr.splitlines()[-1:]  # the traceback's last line
    if how == ["raise"]:
        assert "ValueError: the probe failed" in forked.stderr and "Traceback" in forked.stderr


def test_a_forked_child_is_signalled_by_its_pid_and_its_session_and_times_out(probe_forked, tmp_path):
    with open(tmp_path / "out", "w") as out:
        proc = preloaded_python.popen([*PROBE, "sleep", "60"], env=_env(), cwd=REPO, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "to stderr" not in (tmp_path / "out").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGTERM)  # as the kill/resume helpers signal a run's process group
        assert proc.wait(60) == -signal.SIGTERM
    seen = json.loads((tmp_path / "out").read_text().splitlines()[0])
    assert seen["pid"] == seen["pgid"] == proc.pid, "start_new_session: a session of its own"
    with pytest.raises(subprocess.TimeoutExpired):
        preloaded_python.run([*PROBE, "sleep", "60"], env=_env(), cwd=REPO, capture_output=True, timeout=1)


def test_a_command_behind_setpriv_forks_and_drops_the_same_capabilities(probe_forked, tmp_path):
    """As root, test_file_access runs commands through ``setpriv`` without root's way past file permissions: the
    forked child drops those capabilities itself, and its sets (bounding, permitted, effective, inheritable)
    are those of the real ``setpriv`` process, which no longer reads a file of mode 000."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        unavailable_here("dropping capabilities needs root and setpriv (util-linux)")  # CI runs as root
    drop = "-dac_override,-dac_read_search,-fowner"
    cmd = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *PROBE, "read", str(tmp_path / "secret")]
    (tmp_path / "secret").write_text("x")
    (tmp_path / "secret").chmod(0o000)
    real = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    forked = preloaded_python.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe_forked == ["forked"]
    a, b = json.loads(real.stdout.splitlines()[0]), json.loads(forked.stdout.splitlines()[0])
    assert a["capabilities"] == b["capabilities"], (a["capabilities"], b["capabilities"])
    mine = json.loads(subprocess.run(PROBE, env=_env(), capture_output=True, text=True, timeout=60).stdout)
    assert a["capabilities"] != mine["capabilities"], "setpriv dropped nothing"
    assert real.stdout.splitlines()[1:] == forked.stdout.splitlines()[1:] == ["read: PermissionError"]


@pytest.mark.parametrize("cmd, env", [
    (PROBE, {"OMP_NUM_THREADS": "3"}),  # read when torch is imported
    (PROBE, {"PYTHONHASHSEED": "1"}),  # read by the interpreter's start-up
    ([sys.executable, "-m", "data_prep", "--help"], {}),  # not a pipeline command
    ([*PROBE, "x" * preloaded_python.COMMAND_LINE_ROOM], {}),  # a command line longer than a child can show
])
def test_what_a_fork_cannot_reproduce_starts_anew(probe_forked, cmd, env):
    proc = preloaded_python.run(cmd, env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe_forked == ["started"], proc.stderr[-2000:]


def test_another_rank_started_by_a_forked_child_finds_its_parent_as_by_a_real_one(probe_forked):
    """Lightning's launcher in rank 0 runs rank 0's command again for each other local rank, and such a rank
    follows its parent when that parent's ``/proc/PID/cmdline`` is its own command (``pipeline.parent_death``):
    true of a forked rank 0 as of a real one. Several ranks fork rank 0 (devices, num_nodes, a config's)."""
    for runner in (subprocess.run, preloaded_python.run):
        proc = runner([*PROBE, "rank"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        started, seen = (json.loads(line) for line in proc.stdout.splitlines())
        assert seen == {"rank_zero": started["pid"], "parent": started["pid"]}, (seen, started)
    for args in (["--trainer.devices", "2"], ["--trainer.num_nodes=2"],
                 ["--config", str(REPO / "conf" / "imagenet_resnet50.yaml")]):  # devices: 8
        proc = preloaded_python.run([*PROBE, "exit", "0", *args], env=_env(), cwd=REPO, capture_output=True,
                                    text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert probe_forked == ["forked"] * 4


def test_one_rank_forks_whatever_its_strategy_and_paths(probe_forked, tmp_path):
    """One rank starts no other: DDP or DeepSpeed on one device, a config of one device, a folder named ddp."""
    config = tmp_path / "one.yaml"
    config.write_text("trainer: {devices: 1, strategy: ddp}\n")
    for args in (["--trainer.strategy", "ddp", "--trainer.devices", "1", "--data.root", str(tmp_path / "ddp_8")],
                 ["--trainer.strategy=deepspeed_stage_2_cpu", "--trainer.num_nodes=1"], ["--config", str(config)]):
        proc = preloaded_python.run([*PROBE, "exit", "0", *args], env=_env(), cwd=REPO, capture_output=True,
                                    text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert probe_forked == ["forked"] * 3
