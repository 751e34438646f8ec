"""A shared cluster's file system: run directories of another user, caches under a HOME that cannot be
written, inputs that cannot be read. What this user cannot write or read is said in one line naming the path
and the setting, before anything starts; never a traceback, never an image dropped without a word.

Permissions do not stop root: as root these tests run the commands without the capabilities that let root
past them (``setpriv``: no CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so a mode says to root what
it says to the files' owner (a ``pipeline`` command forked from the preloaded Python drops them itself:
tests/preloaded_python.py); as another user they run them as that user. Either way the commands run as the
owner of the files the test made, and the modes that stop them are the owner's (000, 555). (Run as ``nobody``
instead, they skipped wherever the interpreter lives under a folder only root may enter: ``/root/.pyenv``.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.file_access import me
from tests import preloaded_python
from tests.conftest import REPO

DEMO = REPO / "conf" / "demo.yaml"


def _as_other_user() -> list[str]:
    """The prefix that runs a command as a user that permissions apply to: none for a plain user."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): permissions would not apply")
    drop = "-dac_override,-dac_read_search,-fowner"
    prefix = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]
    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0o000)
        probe = subprocess.run([*prefix, "cat", f.name], capture_output=True, text=True)
    if probe.returncode == 0 or "Permission denied" not in probe.stderr:
        pytest.skip(f"setpriv cannot take root's way past permissions away here: {probe.stderr[-300:]}")
    return prefix


def _run(*args: str, env: dict | None = None, cwd: str | Path = "/") -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    return preloaded_python.run([*_as_other_user(), sys.executable, "-m", *args], capture_output=True, text=True,
                                timeout=600, cwd=cwd, env=full)


@pytest.fixture
def base():
    """A folder every user can read (pytest's own tmp_path is root's alone); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="file-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for dirpath, dirnames, _files in os.walk(path):  # top-down: each folder opened before it is entered
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shards(digits_shards, base) -> Path:
    out = base / "shards"
    shutil.copytree(digits_shards, out)
    for p in [out, *out.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)  # read-only for everyone, as on a read-only dataset mount
    return out


def _fit_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pipeline", "fit", "--config", str(DEMO), "--data.root", str(shards), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(run_dir), *extra]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _trained_run(shards: Path, run_dir: Path) -> Path:
    """A run directory with a checkpoint, written by this process's user (then made read-only to others)."""
    proc = preloaded_python.run([sys.executable, "-m", *_fit_args(shards, run_dir)], capture_output=True, text=True,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
                                timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return run_dir


def test_fit_refuses_another_users_run_whose_lock_is_writable(shards, base):
    """Another user's run directory whose lock file (and folder) were left writable, its checkpoints not: the
    start went on into W&B's PermissionError traceback (RUN/wandb/... is not writable) as the loggers started."""
    run_dir = _trained_run(shards, base / "theirs")
    run_dir.chmod(0o777)
    (run_dir / ".lock").chmod(0o666)
    for p in run_dir.iterdir():  # the owner: the write bit off the folders below
        if p.is_dir():
            p.chmod(0o555)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = _run(*_fit_args(shards, run_dir, "--trainer.max_epochs", "2"))
    line = _one_error_line(proc)
    assert "trainer.default_root_dir" in line and "is not writable" in line, line
    assert str(run_dir) in line and "--trainer.default_root_dir DIR" in line, line
    # the test's own files (modes stand for another user's): said so, with the chmod that would do
    bad = line.split("trainer.default_root_dir: ", 1)[1].split(" ", 1)[0]
    assert f"is {me()}'s own, without write permission: `chmod u+w {bad}` gives it; or a run directory of " \
        f"another user" in line, line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing started


def test_validate_of_another_users_run_says_where_to_log(shards, base):
    """``validate`` of a colleague's run directory (not writable here): a jsonargparse traceback after the
    checkpoint was scored (``.config-validate.yaml.PID.tmp`` not creatable); now one line saying how to score
    it from a run directory of one's own, which then works."""
    run_dir = _trained_run(shards, base / "theirs")
    run_dir.chmod(0o555)
    args = ["pipeline", "validate", "--config", str(run_dir / "config.yaml"), "--trainer.limit_val_batches", "1",
            "--data.num_workers", "0"]
    line = _one_error_line(_run(*args))
    assert f"{run_dir} is not writable" in line, line
    assert f"--trainer.default_root_dir DIR --ckpt_path {run_dir}/checkpoints/last.ckpt" in line, line
    check = _run("pipeline.config_check", *args[1:])  # what `launch submit` runs before sbatch: a warning
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"warning: trainer.default_root_dir: {run_dir} is not writable" in check.stderr, check.stderr[-3000:]
    mine = base / "mine"
    mine.mkdir(mode=0o777)
    mine.chmod(0o777)
    ok = _run(*args, "--trainer.default_root_dir", str(mine / "eval"), "--ckpt_path",
              str(run_dir / "checkpoints" / "last.ckpt"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (mine / "eval" / "config-validate.yaml").is_file()


def test_deepspeed_cpu_with_home_not_writable_says_torch_extensions_dir(digits_shards, tmp_path):
    """``deepspeed_stage_N_cpu`` builds a C++ extension under ``~/.cache/torch_extensions`` unless
    TORCH_EXTENSIONS_DIR says otherwise; with a HOME that cannot hold it (read-only, missing, or here a file,
    which stops root too) the start was a ``makedirs`` traceback once DeepSpeed initialised. Now one line
    naming the folder and the variable, before the run starts (its run directory is removed again)."""
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HOME": str(home)}
    for name in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):
        env.pop(name, None)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", *_fit_args(digits_shards, run_dir, "--trainer.strategy",
                                                            "deepspeed_stage_1_cpu")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    line = _one_error_line(proc)
    assert line.startswith("error: TORCH_EXTENSIONS_DIR:"), line
    assert f"{home}/.cache/torch_extensions" in line and f"{home} is not writable" in line, line
    assert not run_dir.exists()


def test_data_prep_unreadable_inputs_are_named_and_read_again_by_a_rerun(base):
    """An input tree with a class folder and an image this user cannot read: the folder stops the run (its class
    would be missing, the labels after it shift); the image is a reject naming it, said as a warning, and, once
    readable, a rerun of the same command reads it again. The rerun kept the shard without it ("1 of 1 shards
    were complete from an earlier run and kept"): the image stayed out for good, without a word."""
    import json

    from tests.fixtures_images import write_imagefolder

    src = base / "src"
    write_imagefolder(src, ["a", "b", "c"], per_class=4)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = base / "out"
    out.mkdir()
    out.chmod(0o777)
    prep = ("data_prep", "imagefolder", str(src), str(out / "shards"), "--split", "train", "--workers", "1")

    (src / "b").chmod(0o000)
    line = _one_error_line_of_prep(_run(*prep))
    assert f"{src / 'b'}: class folder 'b': cannot list folder: Permission denied" in line, line
    (src / "b").chmod(0o755)

    image = src / "c" / "c_1.jpg"
    image.chmod(0o000)
    first = _run(*prep)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 11 and manifest["splits"]["train"]["rejected"] == 1
    rejects = [json.loads(x) for x in (out / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejects] == [str(image)] and "Permission denied" in rejects[0]["reason"]
    assert f"1 input could not be read and is not in the shards (first: {image}" in first.stderr, first.stderr

    image.chmod(0o644)
    again = _run(*prep)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 12 and manifest["splits"]["train"]["rejected"] == 0, again.stderr
    assert (out / "shards" / "rejects.jsonl").read_text() == ""
    assert "could not be read" not in again.stderr.replace("could not be read when it was built", "")


def _one_error_line_of_prep(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_shard_this_user_cannot_read_is_named_by_fit_and_verify(shards, base):
    """A shard of another user's (mode 600; here 000: the test runs as its owner): ``fit`` started, and a
    loader worker stopped it in a PermissionError traceback; ``verify`` stopped at that shard in one line that
    did not say which split, checking none after it. Now ``fit`` refuses at the start, naming the shard, and
    ``verify`` reports it among its problems (exit 1) and goes on."""
    tar = shards / "train-000001.tar"
    tar.chmod(0o000)
    run_dir = base / "runs"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)
    line = _one_error_line(_run(*_fit_args(shards, run_dir / "r")))
    assert f"error: shard '{tar}' listed in the manifest cannot be read: Permission denied" in line, line
    assert f"chmod -R a+rX {shards}" in line, line
    assert not (run_dir / "r").exists()
    proc = _run("data_prep", "verify", str(shards))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "train/train-000001.tar: cannot read: Permission denied" in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.parametrize("unreadable", ["train/n01443537", "val"])
def test_imagenet_folder_this_user_cannot_list_stops_the_scan(base, unreadable):
    """The extracted ImageNet layout with a class folder (or the split folder) this user cannot list: the class
    folder was one reject standing for all its images (``train: 18 samples in 1 shards, 1 rejected``, 6 images
    gone, and without the devkit the labels after it shifted); the val folder gave a val split of 0 samples.
    Now one error line naming the folder, as ``imagefolder`` says of its class folders."""
    from tests.fixtures_images import build_imagenet

    src = base / "ilsvrc"
    build_imagenet(src, extracted=True)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = base / "out"
    out.mkdir()
    out.chmod(0o777)
    (src / unreadable).chmod(0o000)
    line = _one_error_line_of_prep(_run("data_prep", "imagenet", str(src), str(out / "shards"), "--workers", "1"))
    assert f"error: {src / unreadable}: " in line and "cannot list folder: Permission denied" in line, line
    assert not (out / "shards" / "manifest.json").exists()


def test_imagefolder_source_this_user_cannot_list_says_so(base):
    """SRC itself unreadable said "no class folders with files found (expected <class>/<image> layout)"."""
    from tests.fixtures_images import write_imagefolder

    src = base / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    src.chmod(0o000)
    out = base / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    line = _one_error_line_of_prep(_run("data_prep", "imagefolder", str(src), str(out / "s"), "--split", "train"))
    assert line.endswith(f"error: {src}: cannot list folder: Permission denied; fix its permissions and run again"), line


def test_shards_under_a_folder_this_user_cannot_enter(digits_shards, base):
    """data.root inside another user's folder (mode 700): Python's Path.exists raised PermissionError, so
    ``fit`` and ``config_check`` (what ``launch submit`` runs) ended in a traceback. Now ``fit`` refuses in one
    line naming the folder it may not enter; ``config_check`` warns, as of other paths it cannot see."""
    private = base / "private"
    shutil.copytree(digits_shards, private / "shards")
    private.chmod(0o000)
    runs = base / "runs"
    runs.mkdir(mode=0o777)
    runs.chmod(0o777)
    line = _one_error_line(_run(*_fit_args(private / "shards", runs / "r")))
    assert line.startswith(f"error: data.root: cannot reach shard directory '{private / 'shards'}': Permission "
                           f"denied: ") and f"may not enter {private} (owned by " in line, line
    check = _run("pipeline.config_check", *_fit_args(private / "shards", runs / "r")[1:])
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"warning: data.root: cannot reach {private / 'shards'} here: Permission denied" in check.stderr
    # nor a run directory in there (its last.ckpt is looked at for the network it resumes)
    check = _run("pipeline.config_check", *_fit_args(digits_shards, private / "run")[1:])
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stderr[-3000:]
    assert "warning: " in check.stderr, check.stderr[-3000:]


def test_fit_with_no_usable_temporary_directory_says_tmpdir(digits_shards, tmp_path, monkeypatch):
    """No temporary directory this process can write (every one tempfile tries missing, full or read-only):
    one line naming TMPDIR before anything starts, exit 2 (was W&B's FileNotFoundError traceback as the
    loggers started)."""
    import pipeline.cli  # noqa: F401  (its imports make torch._dynamo's cache folder: here in the usable one)
    from tests.conftest import run_cli_in_process

    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))  # what tempfile settled on: unusable
    r = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                           "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
                           env={"TMPDIR": str(not_a_folder)})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"TMPDIR '{not_a_folder}'" in r.stderr and "set TMPDIR" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("sub", ["fit", "validate"])
def test_a_new_process_with_no_usable_temporary_directory_says_tmpdir_before_its_imports(digits_shards, tmp_path, sub):
    """``python -m pipeline fit|validate|test`` started afresh with no usable temporary directory: importing
    torch._dynamo (Lightning imports torchvision, which imports it) makes its cache folder there, so the start was
    that import's traceback (FileNotFoundError "No usable temporary directory found"), before the CLI's own check.
    The check now runs before the imports. (The test above ran in this process, whose imports were done.)"""
    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_text("")
    code = ("import runpy, sys, tempfile; tempfile.tempdir = sys.argv.pop(1); "  # what tempfile settles on: unusable
            "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # torch's import in pytest set it
    proc = subprocess.run([sys.executable, "-c", code, str(not_a_folder), sub, "--config", str(DEMO), "--data.root",
                           str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run")],
                          env={**env, "PYTHONPATH": str(REPO), "TMPDIR": str(not_a_folder)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert line.startswith(f"error: no temporary directory this user can write (TMPDIR '{not_a_folder}': "), line
    assert "set TMPDIR to a folder this user can write" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sub", ["fit", "validate", "test"])
def test_a_run_directory_inside_a_folder_this_user_may_not_enter(shards, base, sub):
    """RUN inside another user's folder of mode 700: one line naming that folder and its owner, exit 2 (was
    Path.exists' PermissionError traceback, from the run lock in fit and the checkpoint lookup otherwise)."""
    locked = base / "their-home"
    locked.mkdir()
    os.chown(locked, 65534, 65534)
    locked.chmod(0o700)
    run_dir = locked / "run"
    args = _fit_args(shards, run_dir)
    args[1] = sub
    line = _one_error_line(_run(*args))
    assert f"cannot reach {run_dir}" in line and f"may not enter {locked} (owned by" in line, line


def test_data_prep_into_a_folder_this_user_cannot_create_names_it(base):
    """OUT under a folder this user may not write: the error named OUT/.work/manifest.lock, two levels below the
    folder that could not be made, and not whose the parent is."""
    from tests.fixtures_images import write_imagefolder

    src = base / "src"
    write_imagefolder(src, ["a", "b"], per_class=2)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = base / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    line = _one_error_line_of_prep(_run("data_prep", "imagefolder", str(src), str(locked / "new" / "shards"),
                                        "--split", "train"))
    assert line.endswith(f"error: {locked / 'new' / 'shards'}: cannot create the output folder: Permission denied: "
                         f"{me()} may not write in {locked} (owned by {me()}, dr-xr-xr-x)"), line
    assert not (locked / "new").exists()
