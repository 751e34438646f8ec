"""``launch status`` of `submit prep` array jobs, with Slurm's clients as stand-ins answering as Slurm 22.05 did
on the two-node test cluster (tools/slurm_cluster.sh): a pending array's reason, prep tasks that FAILED (SRC
moved away: real data_prep runs), and a prep run directory in the folder view."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stand_ins(tmp_path: Path, sacct: str, squeue: dict[str, str] | None = None) -> dict[str, str]:
    """Slurm clients printing ``sacct`` (whatever asked) and, for squeue, ``squeue[ID]`` where its ``-j`` is ID
    (nothing for other ids); the arguments each got go to tmp_path/NAME.args."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sacct").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/sacct.args\nprintf '{_fmt(sacct)}'\n")
    cases = "".join(f"  '{jid}') printf '{_fmt(text)}' ;;\n" for jid, text in (squeue or {}).items())
    (bindir / "squeue").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/squeue.args\n"
                                   f"case \"$4\" in\n{cases}  *) ;;\nesac\n")
    (bindir / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sacct", "squeue", "scontrol"):
        (bindir / tool).chmod(0o755)
    return {"PATH": f"{bindir}:/usr/bin:/bin"}


def _fmt(text: str) -> str:
    """``text`` as printf's format prints it (an array's ``%3``, at most 3 tasks at once, is no conversion)."""
    return text.replace("%", "%%")


def _status(path: Path, tmp_path: Path, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "launch", "status", str(path)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _prep_run(tmp_path: Path, array: str = "2", finalize: str = "3") -> tuple[Path, Path]:
    """A `submit prep` run directory (OUT-slurm) recording array job ``array`` and its finalize job; OUT made, as
    submit makes it."""
    from launch.rundir import record_job

    out, run = tmp_path / "shards", tmp_path / "shards-slurm"
    out.mkdir()
    record_job(run, array, "prep-array", run / "prep-imagefolder-train.sbatch", out, ["train"])
    record_job(run, finalize, "prep-finalize", run / "prep-finalize-imagefolder-train.sbatch", out, ["train"])
    return out, run


def test_a_pending_arrays_reason_comes_from_its_tasks_in_squeue(tmp_path: Path) -> None:
    """sacct lists an array's tasks not started yet as one row, ``2_[2-4%3]``, its reason None for a while; squeue
    asked for that id answers with task 2_0 RUNNING (or nothing), so the row said ``-``. Asked for the array
    job, squeue lists each task: the row gets their reason. (Both answers as seen on the test cluster.)"""
    _, run = _prep_run(tmp_path)
    sacct = ("2_0|prep-imagefolder-train|RUNNING|00:00:03|0:0|None\\n"
             "2_1|prep-imagefolder-train|RUNNING|00:00:03|0:0|None\\n"
             "2_[2-4%3]|prep-imagefolder-train|PENDING|00:00:00|0:0|None\\n"
             "3|prep-finalize-imagefolder-train|PENDING|00:00:00|0:0|None\\n")
    tasks = ("2_2|prep-imagefolder-train|PENDING|0:00|Resources\\n2_3|prep-imagefolder-train|PENDING|0:00|Resources\\n"
             "2_4|prep-imagefolder-train|PENDING|0:00|Resources\\n2_1|prep-imagefolder-train|RUNNING|0:03|None\\n"
             "2_0|prep-imagefolder-train|RUNNING|0:03|None\\n"
             "3|prep-finalize-imagefolder-train|PENDING|0:00|Dependency\\n")
    squeue = {"2_[2-4%3]": "2_0|prep-imagefolder-train|RUNNING|0:03|None\\n",  # what Slurm 22.05 answers
              "2_[2-4%3],3": "2_0|prep-imagefolder-train|RUNNING|0:03|None\\n"
                             "3|prep-finalize-imagefolder-train|PENDING|0:00|Dependency\\n",
              "2,3": tasks, "3,2": tasks}
    text = _status(run, tmp_path, _stand_ins(tmp_path, sacct, squeue))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  2") or
            line.startswith("  3")}
    assert rows["2_[2-4%3]"][2:] == ["PENDING", "00:00:00", "0", "Resources"], text
    assert rows["3"][-1] == "Dependency" and rows["2_0"][-1] == "0:0", text


def test_a_held_arrays_tasks_give_their_reasons_once_each(tmp_path: Path) -> None:
    """Tasks of one array pending for different reasons: each reason once, in squeue's order; tasks outside the
    row's list (here 2_5, pending on its own row) are not counted in it."""
    _, run = _prep_run(tmp_path)
    sacct = ("2_[0-1,3]|prep-imagefolder-train|PENDING|00:00:00|0:0|None\\n"
             "2_5|prep-imagefolder-train|PENDING|00:00:00|0:0|None\\n"
             "3|prep-finalize-imagefolder-train|PENDING|00:00:00|0:0|Dependency\\n")
    squeue = {"2": "2_0|prep-imagefolder-train|PENDING|0:00|JobHeldUser\\n"
                   "2_1|prep-imagefolder-train|PENDING|0:00|JobHeldUser\\n"
                   "2_3|prep-imagefolder-train|PENDING|0:00|Priority\\n"
                   "2_5|prep-imagefolder-train|PENDING|0:00|BeginTime\\n"}
    squeue["2,2_5"] = squeue["2_5,2"] = squeue["2"]
    text = _status(run, tmp_path, _stand_ins(tmp_path, sacct, squeue))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  2")}
    assert rows["2_[0-1,3]"][-1] == "JobHeldUser,Priority", text
    assert rows["2_5"][-1] == "BeginTime", text


def _failed_tasks(src: Path, out: Path) -> None:
    """The two array tasks as they ran after SRC was moved away: real data_prep runs, each refused."""
    from data_prep.cli import main as prep

    for task in ("0", "1"):
        assert prep(["imagefolder", str(src), str(out), "--split", "train", "--workers", "1", "--no-progress",
                     "--num-tasks", "2", "--task-index", task]) == 2


FAILED = ("2_0|prep-imagefolder-train|FAILED|00:00:02|2:0|None\\n"
          "2_1|prep-imagefolder-train|FAILED|00:00:02|2:0|None\\n"
          "3|prep-finalize-imagefolder-train|CANCELLED|00:00:00|0:0|None\\n")


def test_prep_tasks_that_failed_are_not_said_to_have_not_started(tmp_path: Path) -> None:
    """SRC moved away: both tasks FAILED before planning anything, and status said `none planned yet (no array
    task has started)`. Now it names them; without Slurm's word it claims nothing of the tasks."""
    out, run = _prep_run(tmp_path)
    _failed_tasks(tmp_path / "moved-away", out)
    text = _status(run, tmp_path, _stand_ins(tmp_path, FAILED))
    assert f"shards       {out}: none planned (array tasks 2_0 FAILED, 2_1 FAILED: see their logs)\n" in text, text
    assert "no array task has started" not in text
    assert "manifest     not yet, and no finalize job will write it: array tasks 2_0 FAILED, 2_1 FAILED" in text, text
    text = _status(run, tmp_path, {"PATH": str(tmp_path / "no-slurm-here")})
    assert f"shards       {out}: none planned yet\n" in text, text
    # OUT itself gone too: not "does not exist yet (the first array task makes it)" of tasks that ran
    out.rmdir()
    text = _status(run, tmp_path, _stand_ins(tmp_path, FAILED))
    assert f"shards       {out}: does not exist (array tasks 2_0 FAILED, 2_1 FAILED: see their logs)\n" in text, text
    assert "manifest     not yet, and no finalize job will write it: array tasks 2_0 FAILED, 2_1 FAILED" in text, text


def test_the_folder_view_shows_a_prep_arrays_failure_not_only_its_finalize_cancelled(tmp_path: Path) -> None:
    """`launch status PARENT`: a prep run directory's last job is its finalize job, which Slurm cancels when a
    task fails (its dependency never met): the line said `3  CANCELLED`, as if a user had cancelled it. The
    latest array is asked about too, and its failure shown."""
    out, run = _prep_run(tmp_path)
    _failed_tasks(tmp_path / "moved-away", out)
    env = _stand_ins(tmp_path, FAILED)
    text = _status(tmp_path, tmp_path, env)
    lines = text.splitlines()
    assert lines[0] == f"runs in {tmp_path.resolve()}: 1", text
    assert lines[2].split() == ["shards-slurm", "2_0", "FAILED", "(+1", "task)", "-", "-", "-"], text
    assert "-j 2,3 " in (tmp_path / "sacct.args").read_text()  # one sacct: the array and the finalize job
    # the array's tasks all done, the finalize job's own state stands
    done = FAILED.replace("FAILED|00:00:02|2:0", "COMPLETED|00:00:02|0:0").replace("CANCELLED", "FAILED")
    text = _status(tmp_path, tmp_path, _stand_ins(tmp_path, done))
    assert text.splitlines()[2].split() == ["shards-slurm", "3", "FAILED", "-", "-", "-"], text
