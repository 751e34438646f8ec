"""Provenance: every checkpoint says what code and software trained it, one record per start (a resume adds
its own and keeps the earlier ones), W&B's config, the CSV hparams and TensorBoard get each start's record,
`launch status` and `export` name the commit; outside a git checkout the commit is unknown, with the reason,
and the run trains all the same; a DeepSpeed checkpoint directory holds the records too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import provenance
from pipeline.checkpoint_read import read_checkpoint
from tests.conftest import REPO, SMALL_NET, run_module, unavailable_here
from tests.test_tracking import _wandb_run_and_config

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards: Path, run: Path, steps: int, *extra: str, env: dict | None = None, cwd: Path | None = None):
    return run_module(
        "pipeline", "fit", "--config", CONF, *SMALL_NET,
        "--data.root", str(shards), "--trainer.default_root_dir", str(run),
        "--data.batch_size", "128", "--data.val_batch_size", "256", "--data.num_workers", "1",
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "2", "--checkpoint.every_n_train_steps",
        "2", "--trainer.num_sanity_val_steps", "0", *extra, env={"WANDB_MODE": "offline", **(env or {})}, cwd=cwd)


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable_here(f"{REPO} is not a git checkout git reads here: {proc.stderr.strip()}")
    return proc.stdout


def _records(ckpt: Path) -> list[dict]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain strings and numbers only
    return saved[provenance.KEY]


@pytest.fixture(scope="module")
def resumed(digits_shards, tmp_path_factory):
    """A run of two starts (2 steps, then a resume to 4) with W&B (offline), CSV and TensorBoard; the first
    start's checkpoint records, kept as they were."""
    run = tmp_path_factory.mktemp("provenance") / "run"
    _fit(digits_shards, run, 2, "--tracking.tensorboard", "true")
    first = _records(run / "checkpoints" / "last.ckpt")
    _fit(digits_shards, run, 4, "--tracking.tensorboard", "true")
    return run, first


def test_each_start_records_the_code_and_software_in_every_checkpoint(resumed):
    run, first = resumed
    head = _git("rev-parse", "HEAD").strip()
    dirty = "yes" if _git("status", "--porcelain").strip() else "no"
    assert len(first) == 1 and first[0]["start"] == 1 and first[0]["start_step"] == 0, first
    records = _records(run / "checkpoints" / "last.ckpt")
    assert len(records) == 2 and records[0] == first[0], records  # the resume kept the first start's record
    assert records[1]["start"] == 2 and records[1]["start_step"] == 2, records[1]
    import pytorch_lightning

    for r in records:
        assert (r["git_commit"], r["git_dirty"], r["git_note"]) == (head, dirty, ""), r
        assert r["torch"] == torch.__version__ and r["pytorch_lightning"] == pytorch_lightning.__version__, r
        assert r["code_path"] == str(REPO.resolve()) and r["run_dir"] == str(run), r
        assert (r["world_size"], r["hostname"], r["gpu"]) == (1, socket.gethostname(), "none"), r
        assert r["python"].count(".") == 2 and r["webdataset"] and r["deepspeed"], r
        assert all(type(v) in (str, int) for v in r.values()), r  # flat: W&B's config and weights_only take it
    assert records[0]["started_at"] <= records[1]["started_at"], records


def test_the_loggers_get_each_starts_record(resumed):
    run, _ = resumed
    head = _git("rev-parse", "HEAD").strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2, offline
    for start, step in zip(offline, (0, 2)):  # each start's W&B config, beside the resolved config
        _, config = _wandb_run_and_config(next(start.glob("*.wandb")))
        assert config["provenance"]["git_commit"] == head and config["provenance"]["start_step"] == step, config
        assert config["provenance"]["torch"] == torch.__version__ and config["trainer"]["max_steps"] == step + 2
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())  # the newest start's
    assert hparams["provenance"]["git_commit"] == head and hparams["provenance"]["start_step"] == 2, hparams
    assert hparams["arch"] == "cifar_resnet8", sorted(hparams)  # the module's own hyper-parameters stay
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("provenance/text_summary")}
    assert sorted(texts) == [0, 2] and all(f"| git_commit | {head} |" in t for t in texts.values()), texts


def test_status_and_export_name_the_commit(resumed, tmp_path):
    run, _ = resumed
    head = _git("rev-parse", "HEAD").strip()
    status = run_module("launch", "status", str(run)).stdout
    assert f"\ncode         git {head[:12]}" in status and "(start 2, from step 2): torch " in status, status
    exported = run_module("pipeline", "export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "w.pt"))
    assert exported.stdout.startswith(f"wrote {tmp_path / 'w.pt'}: "), exported.stdout
    assert f"last.ckpt was trained by git {head[:12]}" in exported.stderr, exported.stderr
    assert all(isinstance(v, torch.Tensor) for v in torch.load(tmp_path / "w.pt", weights_only=True).values())
    scored = run_module("pipeline", "validate", "--config", str(run / "config.yaml"), "--trainer.default_root_dir",
                        str(tmp_path / "scored"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                        "--trainer.limit_val_batches", "1", "--tracking.wandb", "false")
    assert f"validate: {run / 'checkpoints' / 'last.ckpt'} (step 4), trained by git {head[:12]}" in scored.stderr, \
        scored.stderr[-3000:]


def test_outside_a_git_checkout_the_commit_is_unknown_and_the_run_trains(digits_shards, tmp_path):
    """The code as an installed copy (no ``.git``); ``GIT_DIR`` naming this repository does not make git
    describe it in place of the copy."""
    code = tmp_path / "code"
    for package in ("pipeline", "data_prep", "launch"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(code), "GIT_DIR": str(REPO / ".git")}
    fit = _fit(digits_shards, run, 2, "--tracking.wandb", "false", env=env, cwd=code)
    assert "provenance:" not in fit.stderr, fit.stderr[-3000:]  # an installed copy is nothing to warn about
    (record,) = _records(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert record["code_path"] == str(code.resolve()), record  # the copy ran
    assert (record["git_commit"], record["git_dirty"]) == ("unknown", "unknown"), record
    assert record["git_note"].startswith("not a git checkout"), record
    assert record["torch"] == torch.__version__, record
    status = run_module("launch", "status", str(run), env={"PYTHONPATH": str(code)}, cwd=code).stdout
    assert "code         resnet-pipeline " in status and "commit unknown (not a git checkout" in status, status


def test_a_deepspeed_checkpoint_directory_holds_the_records(digits_shards, tmp_path):
    run = tmp_path / "run"
    args = ("--model.arch", "cifar_resnet8", "--trainer.strategy", "deepspeed_stage_2_cpu", "--data.batch_size", "32",
            "--data.num_workers", "0", "--checkpoint.every_n_train_steps", "1", "--tracking.wandb", "false")
    for steps in (1, 2):
        run_module("pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                   "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
                   "--trainer.num_sanity_val_steps", "0", *args)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()
    records = provenance.records(read_checkpoint(ckpt))  # rank 0's model states
    assert [(r["start"], r["start_step"]) for r in records] == [(1, 0), (2, 1)], records
    assert records[0]["git_commit"] == _git("rev-parse", "HEAD").strip()


def test_two_ranks_save_rank_zeros_record_and_only_rank_zero_asks_git(digits_shards, tmp_path):
    from tests.conftest import free_port

    calls, bindir = tmp_path / "git.calls", tmp_path / "bin"  # git, recording who asks it
    bindir.mkdir()
    (bindir / "git").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("git")} "$@"\n')
    (bindir / "git").chmod(0o755)
    run = tmp_path / "run"
    run_module("pipeline", "fit", "--config", CONF, *SMALL_NET,
               "--data.root", str(digits_shards), "--trainer.default_root_dir",
               str(run), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
               "--data.num_workers", "0", "--trainer.num_sanity_val_steps", "0", "--tracking.wandb", "false",
               env={"MASTER_PORT": str(free_port()), "PATH": f"{bindir}:{os.environ['PATH']}"})
    (record,) = _records(run / "checkpoints" / "last.ckpt")
    assert record["world_size"] == 2 and record["git_commit"] == _git("rev-parse", "HEAD").strip(), record
    assert [line.split()[2] for line in calls.read_text().splitlines()] == ["rev-parse", "status"], calls.read_text()


def _repo(path: Path) -> Path:
    path.mkdir()
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                                  "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


def test_git_state_of_a_checkout_and_why_it_is_unknown(tmp_path, monkeypatch):
    repo = _repo(tmp_path / "repo")
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(repo), "add", "a.py"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "a"],
                   check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    state = provenance.git_state(repo)
    assert (state["git_commit"], state["git_dirty"], state["git_changed"], state["git_note"]) == (head, "no", "0", "")
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("")  # a new module is a change of the code too
    state = provenance.git_state(repo)
    assert (state["git_commit"], state["git_dirty"]) == (head, "yes") and \
        state["git_changed"] == "2: a.py, new.py (untracked)", state
    assert provenance.code(state) == f"git {head[:12]} with uncommitted changes"

    (repo / "sub").mkdir()
    assert provenance.git_state(repo / "sub")["git_note"] == f"not a git checkout ({repo / 'sub'} is inside the " \
                                                                f"repository {repo})"
    assert provenance.git_state(tmp_path)["git_note"] == "not a git checkout"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))  # not where git looks for the code's checkout
    assert provenance.git_state(repo)["git_commit"] == head

    slow = tmp_path / "slow"  # a git that hangs (a checkout on a file system that does not answer)
    slow.mkdir()
    (slow / "git").write_text("#!/bin/sh\nsleep 60 &\nwait\n")
    (slow / "git").chmod(0o755)
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.5)
    monkeypatch.setenv("PATH", f"{slow}:{os.environ['PATH']}")
    began = time.monotonic()
    state = provenance.git_state(repo)
    assert time.monotonic() - began < 5 and state["git_note"] == "git did not answer within 0.5 s", state
    assert provenance.code(state) == "commit unknown (git did not answer within 0.5 s)"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance.git_state(repo)["git_note"] == "git is not installed here"
    record = provenance.collect(root=repo)  # what cannot be found out is unknown; the record is still made
    assert record["git_commit"] == "unknown" and record["torch"] == torch.__version__, record


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a checkout owned by another user (chown: root only)")
def test_a_checkout_git_refuses_is_unknown_with_the_reason(tmp_path):
    repo = _repo(tmp_path / "theirs")
    for path in (repo, *repo.rglob("*")):
        os.lchown(path, 65534, 65534)
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode == 0:
        pytest.skip("git trusts checkouts of other users here (safe.directory)")
    state = provenance.git_state(repo)
    assert state["git_commit"] == "unknown" and "dubious ownership" in state["git_note"], state
    assert f"safe.directory {repo}" in state["git_note"], state


def test_records_are_carried_capped_and_described():
    a = {"git_commit": "a" * 40, "git_dirty": "no", "torch": "2", "world_size": 8, "hostname": "n1"}
    b = {**a, "git_commit": "b" * 40, "git_dirty": "yes"}
    kept: list[dict] = []
    for i in range(provenance.MAX_STARTS + 20):
        kept = provenance.with_start(kept, {**(a if i < 3 else b), "start_step": 10 * i})
        if i == 4:
            lines = provenance.describe(kept)
    assert len(kept) == provenance.MAX_STARTS and kept[0]["start"] == 1, kept[:2]  # the first start stays
    assert [r["start"] for r in kept[1:3]] == [22, 23] and kept[-1]["start"] == provenance.MAX_STARTS + 20
    assert lines[0].startswith(f"git {'b' * 12} with uncommitted changes (start 5, from step 40): torch 2; "
                               "8 ranks (rank 0 on n1)"), lines
    assert lines[1] == (f"code changed between starts: starts 1-3 (from step 0): git {'a' * 12}; starts 4-5 "
                        f"(from step 30): git {'b' * 12} with uncommitted changes"), lines
    # a resume of a checkpoint saved before provenance was recorded: its steps have no record
    legacy = provenance.with_start(provenance.records({"global_step": 500}), {**a, "start_step": 500})
    assert provenance.describe(legacy)[-1] == "steps before 500: no record (trained before provenance was recorded)"


def test_short_code_is_the_newest_starts_commit_in_a_table_cell():
    """`launch status runs/` shows which code each run's newest checkpoint was trained with, in one cell."""
    a = {"git_commit": "a" * 40, "git_dirty": "no"}
    b = {"git_commit": "b" * 40, "git_dirty": "yes"}
    assert provenance.short_code([]) == "-"
    assert provenance.short_code([a, a]) == "aaaaaaaa"
    assert provenance.short_code([a, b]) == "bbbbbbbb+ changed"
    assert provenance.short_code([{**a, "git_dirty": provenance.UNKNOWN}]) == "aaaaaaaa?"
    assert provenance.short_code([{"git_commit": provenance.UNKNOWN, "git_note": "no git"}]) == "unknown"
