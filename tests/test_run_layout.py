"""The run directory's names (pipeline/run_layout.py): what the trainer saves, its readers read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from pipeline.run_layout import BEST_FILENAME, BEST_GLOB, BestName, best_name, best_step, best_top1


def _saved_name(tmp_path: Path, ver: int | None = None) -> str:
    """The name the trainer's best-k ModelCheckpoint gives a save (pipeline/cli.py's settings)."""
    callback = ModelCheckpoint(dirpath=tmp_path, filename=BEST_FILENAME, auto_insert_metric_name=False)
    metrics = {"epoch": torch.tensor(4), "step": torch.tensor(40), "val/top1": torch.tensor(0.7)}
    return Path(callback.format_checkpoint_name(metrics, ver=ver)).name


def test_every_reader_reads_the_name_the_trainer_saves(tmp_path):
    name = _saved_name(tmp_path)
    assert name == "best-epoch004-step0000040-top1=0.7000.ckpt"
    assert Path(name).match(BEST_GLOB)
    assert best_name(name) == BestName(4, 40, 0.7) and best_top1(name) == 0.7 and best_step(name) == 40


def test_a_taken_name_s_version_is_read_for_its_step_only(tmp_path):
    """``-vN``: the step (remove_best_after removes such a file too); not a best by top-1 (launch status and
    ``validate --ckpt_path best`` skip it, as they always did)."""
    name = _saved_name(tmp_path, ver=1)
    assert name == "best-epoch004-step0000040-top1=0.7000-v1.ckpt"
    assert best_step(name) == 40 and best_name(name) is None and best_top1(name) is None


def test_runs_before_the_equals_sign_are_read_too():
    name = "best-epoch002-step0000020-top10.6500.ckpt"
    assert best_name(name) == BestName(2, 20, 0.65) and best_top1(name) == 0.65 and best_step(name) == 20


def test_branched_from_written_by_writers_of_one_pid_at_once(tmp_path: Path) -> None:
    """`launch torchrun --branch-from` runs on every node at once, and in containers their launchers may have
    one pid: the temporary file, named by the pid alone, was truncated and renamed by two writers, and the
    second rename failed (FileNotFoundError: a launcher's error on that node). Threads share a pid."""
    import threading

    from pipeline.branch_record import record_origin, recorded_origin
    from pipeline.run_layout import BRANCH_FILE

    errors: list[BaseException] = []
    for _ in range(200):
        (tmp_path / BRANCH_FILE).unlink(missing_ok=True)
        start = threading.Barrier(4)

        def write() -> None:
            start.wait()
            try:
                record_origin(tmp_path, "/runs/other/checkpoints/last.ckpt")
            except OSError as e:
                errors.append(e)

        threads = [threading.Thread(target=write) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert recorded_origin(tmp_path) == "/runs/other/checkpoints/last.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [BRANCH_FILE]


def test_a_branched_from_of_other_bytes_is_read_as_a_path_not_a_traceback(tmp_path: Path) -> None:
    """RUN/branched_from damaged (bytes that are not UTF-8): `launch status RUN` and `fit` raised
    UnicodeDecodeError; it reads as a path (that does not exist: fit names the file and the ways out)."""
    import subprocess
    import sys

    from pipeline.branch_record import recorded_origin
    from pipeline.run_layout import BRANCH_FILE

    (tmp_path / BRANCH_FILE).write_bytes(b"/runs/a\xff\xfe/last.ckpt\n")
    assert recorded_origin(tmp_path) == "/runs/a\ufffd\ufffd/last.ckpt"
    (tmp_path / "wandb_run_id").write_text("abc12345\n")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "launch", "status", str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0 and "branch of    /runs/a\ufffd\ufffd/last.ckpt" in r.stdout, r.stdout + r.stderr


def test_a_run_directory_that_is_the_shards_folder_is_refused(digits_shards, tmp_path: Path) -> None:
    """--trainer.default_root_dir given data.root: fit trained and wrote checkpoints/, csv/ and config.yaml among
    the shards, and data_prep then refused that folder as a run directory (its repair and add-a-split commands).
    One line now, for fit and for validate, before anything is written there."""
    import shutil

    from tests.conftest import REPO, run_cli_in_process

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    before = sorted(p.relative_to(shards) for p in shards.rglob("*"))
    for sub in ("fit", "validate"):
        r = run_cli_in_process(sub, "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(shards),
                       "--trainer.default_root_dir", str(shards), "--trainer.max_steps", "1",
                       "--tracking.wandb", "false", *(["--ckpt_path", str(tmp_path / "x.ckpt")] if sub != "fit" else
                                                       []))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert (f"trainer.default_root_dir: {shards} holds manifest.json: it is a data_prep output folder (the "
                "shards' data.root?), not a run directory") in r.stderr, r.stderr[-2000:]
        assert sorted(p.relative_to(shards) for p in shards.rglob("*")) == before


@pytest.mark.parametrize("sub", ["fit", "test"])
def test_several_nodes_with_nothing_to_start_the_others_is_refused(digits_shards, tmp_path, monkeypatch, sub):
    """`pipeline test --config RUN/config.yaml` of a 2-node run, typed on the login node, waited forever for the
    second node's rank, without a word (a Slurm trial). One line now, naming the setting and the way out."""
    from pipeline.cli import LAUNCHED
    from tests.conftest import REPO, run_cli_in_process

    for var in LAUNCHED:
        monkeypatch.delenv(var, raising=False)
    r = run_cli_in_process(sub, "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(digits_shards),
                           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.num_nodes", "2",
                           "--tracking.wandb", "false", *(["--ckpt_path", str(tmp_path / "x.ckpt")] if sub != "fit"
                                                          else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert ("error: trainer.num_nodes 2: no launcher started the other nodes' ranks here (no srun, torchrun or "
            "NODE_RANK/MASTER_ADDR), so this process would wait for them forever; ") in r.stderr, r.stderr[-2000:]
    assert ("--trainer.num_nodes 1 (every sample is scored once" in r.stderr) == (sub == "test"), r.stderr
    assert not (tmp_path / "run").exists()
