"""Tracking across a restart: one W&B run (offline), the run id in the run directory and in checkpoints,
the metrics (loss, lr, top-1/5, img/s, data-wait share) in CSV and TensorBoard, one image grid of an
augmented batch, and no trace of the API key anywhere in the run directory or checkpoints."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.run_layout import RUN_ID_FILE
from pipeline.tracking import TrackingConfig, make_eval_loggers, run_id
from tests import preloaded_python
from tests.conftest import REPO, SMALL_NET, run_cli_in_process, run_module

CONF = str(REPO / "conf" / "demo.yaml")
FAKE_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0deadbeef"  # 40 characters, like a real key


def _fit(shards: Path, run: Path, steps: int, quiet: bool = True, *extra: str):
    return run_module(
        "pipeline", "fit", "--config", CONF, *SMALL_NET,
        "--data.root", str(shards), "--trainer.default_root_dir", str(run), *extra,
        "--data.batch_size", "128", "--data.val_batch_size", "256", "--data.num_workers", "1",
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "2", "--tracking.tensorboard", "true",
        "--checkpoint.every_n_train_steps", "4", "--trainer.num_sanity_val_steps", "0",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "true" if quiet else "false"},
    )


def test_one_wandb_run_across_restarts_metrics_and_no_secret(digits_shards, tmp_path):
    run = tmp_path / "run"
    first = _fit(digits_shards, run, 12, quiet=False)  # epoch 0 has 11 steps: validation at its end
    log = first.stderr + first.stdout
    assert "Tracking run with wandb" in log, log[-3000:]
    assert "anonymous setting has no effect" not in log  # noise Lightning caused in every job log
    # the run is finished by the trainer: left to W&B's exit hook, its service process printed the footer
    # to stdout with terminal colour codes, into Slurm's log file too
    assert "\x1b[" not in log and "wandb: You can sync this run to the cloud" in first.stderr, log[-3000:]
    # where the offline run is and how to upload it, without W&B's tips and its debug logs' folder
    offline_dir = next((run / "wandb").glob("offline-run-*"))
    assert f"wandb: Run data is saved locally in {offline_dir}" in first.stderr, first.stderr[-3000:]
    assert f"wandb: wandb sync {offline_dir}\n" in first.stderr, first.stderr[-3000:]
    for tip in ("wandb leet", "wandb online", "Find logs at"):
        assert tip not in log, (tip, log[-3000:])
    assert "could not find the monitored key" not in log  # step 12 ends mid-epoch 1, before its validation
    run_id = (run / "wandb_run_id").read_text().strip()
    resumed = _fit(digits_shards, run, 14, True, "--trainer.precision", "bf16-mixed")
    assert "resuming from" in resumed.stderr
    # Lightning's notes at every resume and every mixed-precision run, about nothing wrong
    assert "exists and is not empty" not in resumed.stderr and "not supported by the model summary" not in \
        resumed.stderr, resumed.stderr[-3000:]

    # one W&B run: both starts wrote into offline runs of the same id, which the checkpoint carries too
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith("-" + run_id) for p in offline), offline
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["wandb_run_id"] == run_id
    assert any(p.suffix == ".wandb" for p in offline[0].iterdir()), "an offline run file `wandb sync` can upload"
    # in the group its validate/test runs join; its config the whole resolved one (it held the model's
    # settings alone, and LightningCLI's `_instantiator`), the resume's new precision in the second start
    for start, precision in zip(offline, ("32-true", "bf16-mixed")):
        record, config = _wandb_run_and_config(next(start.glob("*.wandb")))
        assert (record.run_id, record.run_group, record.job_type) == (run_id, run_id, "fit"), record
        assert config["trainer"]["precision"] == precision and config["data"]["batch_size"] == 128, config
        assert "_instantiator" not in config and config["lr"] == config["model"]["lr"], sorted(config)

    # W&B's own step is the row's trainer/global_step in every start: left to count by itself it began at 0
    # again in the resumed start of an offline run, and `wandb sync` uploaded its rows with steps already used
    histories = [_wandb_history(next(start.glob("*.wandb"))) for start in offline]
    for history in histories:
        assert history and all(r["_step"] == r["trainer/global_step"] for r in history), history[:3]
    assert max(r["_step"] for r in histories[0]) < min(r["_step"] for r in histories[1]), "steps go on"
    for history in histories:  # the rows of one step (train, lr, val) are one W&B row
        assert len({r["_step"] for r in history}) == len(history), [r["_step"] for r in history]

    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0])
    for name in ("train/loss", "train/top1", "lr-SGD/pg1", "lr-SGD/pg2", "val/top1", "val/top5",
                 "perf/img_per_s_per_rank", "perf/img_per_s_total",
                 "perf/data_wait_share", "perf/step_time_s"):
        assert name in cols, f"{name} not logged: {sorted(cols)}"
    waits = [float(r["perf/data_wait_share"]) for r in rows if r.get("perf/data_wait_share")]
    speeds = [float(r["perf/img_per_s_total"]) for r in rows if r.get("perf/img_per_s_total")]
    assert waits and all(0.0 <= w <= 1.0 for w in waits)
    assert speeds and all(s > 0 for s in speeds)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert max(steps) >= 12 and len(steps) == len(set(steps)), "the restart continued the step axis"

    # the image grid, once per run (not again after the restart), also in TensorBoard and W&B media
    assert (run / "train_batch_grid.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples/train_batch" in events.Tags()["images"]
    assert "perf/data_wait_share" in events.Tags()["scalars"]
    assert list((offline[0] / "files" / "media" / "images").rglob("*.png")), "wandb.Image of the batch"
    assert not list(offline[1].rglob("media/images/**/*.png")), "no second grid after the restart"

    # a copy of the run directory that lost its id file resumes its own last.ckpt: the same W&B run; a new
    # run directory started from this run's checkpoint (a branch) is a new W&B run (it reused this one's id,
    # and both histories went into one run over the same steps)
    moved = tmp_path / "moved"
    shutil.copytree(run / "checkpoints", moved / "checkpoints")
    _fit(digits_shards, moved, 16)
    assert (moved / "wandb_run_id").read_text().strip() == run_id
    branch = tmp_path / "branch"
    branched = _fit(digits_shards, branch, 16, True, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    new_id = (branch / "wandb_run_id").read_text().strip()
    assert new_id != run_id
    assert (f"W&B: a new run {new_id} for {branch}: {run / 'checkpoints' / 'last.ckpt'} is another run "
            f"directory's checkpoint (W&B run {run_id})") in branched.stderr, branched.stderr[-3000:]
    assert torch.load(branch / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "wandb_run_id"] == new_id

    # the secret is nowhere: not in logs, configs, W&B files, checkpoints, stdout/stderr
    assert FAKE_KEY not in resumed.stdout + resumed.stderr
    leaks = [p for p in run.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, f"API key found in {leaks}"


def test_validate_in_a_run_directory_logs_apart_from_its_training(digits_shards, tmp_path):
    """An evaluation of a checkpoint (as README's `validate` line does, in the training's run directory)
    leaves the training's metrics.csv and W&B run as they were: it appended a step-0 row and wrote a second
    offline run under the training's id before."""
    run = tmp_path / "run"
    _fit(digits_shards, run, 11)  # epoch 0 has 11 steps: validation at its end, the last rows
    run_id = (run / "wandb_run_id").read_text().strip()
    training_csv = (run / "csv" / "metrics.csv").read_bytes()
    out = run_module(
        "pipeline", "validate", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
        "--trainer.default_root_dir", str(run), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        "--tracking.tensorboard", "true",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow"},
    )  # WANDB_RUN_ID: exported by the Slurm script for the training's run
    assert (run / "csv" / "metrics.csv").read_bytes() == training_csv
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1, "only the training's W&B run"
    with open(run / "validate" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    assert len(top1) == 1 and f"{top1[0]:.4f}"[:5] in out.stdout, (top1, out.stdout[-2000:])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 11
    # at the step and epoch where its training logged the validation of these weights (they all sat at step 0,
    # epoch 0; then one step later, at the checkpoint's global_step)
    with open(run / "csv" / "metrics.csv") as f:
        trained = [(int(r["step"]), int(r["epoch"])) for r in csv.DictReader(f) if r.get("val/top1")]
    assert trained == [(10, 0)], trained
    assert [(int(r["step"]), int(r["epoch"])) for r in rows if r.get("val/top1")] == trained, rows
    assert "\x1b[" not in out.stdout + out.stderr, out.stdout[-2000:]  # the evaluation's run is finished too
    evals = list((run / "validate" / "wandb").glob("offline-run-*"))
    assert len(evals) == 1 and not evals[0].name.endswith("-" + run_id), evals
    assert run_id.encode() in next(evals[0].glob("*.wandb")).read_bytes(), "grouped with the training's run"
    steps = [row["trainer/global_step"] for row in _wandb_history(next(evals[0].glob("*.wandb"))) if "val/top1" in row]
    assert steps == [10], steps
    assert list((run / "validate" / "tensorboard").glob("version_0/events.*"))
    leaks = [p for p in run.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, f"API key found in {leaks}"


def test_sigterm_detaches_wandb_before_the_preemption_save(tmp_path):
    """Slurm's SIGTERM also ends W&B's service process: after it, no log call may reach W&B."""
    import os
    import signal

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from pipeline.preemption import Preemption

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(logger=[wandb_logger, csv_logger], accelerator="cpu", enable_progress_bar=False)
    cb = Preemption(tmp_path / "last.ckpt", requeue=False)
    cb.setup(trainer, None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == signal.SIGUSR1 and wandb_logger in trainer.loggers, "USR1 keeps W&B"
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.loggers == [csv_logger]
    finally:
        cb.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGTERM) is not cb._handler

    # with a backlog (as the CLI runs it): a recorder in W&B's place keeps what W&B misses
    from pipeline.wandb_backlog import Recorder, WandbBacklog

    trainer.loggers = [wandb_logger, csv_logger]
    backlog = WandbBacklog()
    cb = Preemption(tmp_path / "last.ckpt", requeue=False, wandb_backlog=backlog)
    cb.setup(trainer, None, "fit")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(trainer.loggers[0], Recorder) and trainer.loggers[1] is csv_logger
        trainer.loggers[0].log_metrics({"val/top1": torch.tensor(0.5)}, step=7)
        assert backlog.state_dict() == {"held": [{"step": 7, "metrics": {"val/top1": 0.5}}]}
    finally:
        cb.teardown(trainer, None, "fit")


def test_a_sample_grid_that_cannot_be_written_leaves_no_file_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """A full disk at the grid's PNG ended the run with a traceback and left a truncated file."""
    from types import SimpleNamespace

    import pipeline.sample_grid as sample_grid

    def full_disk(tensor, fp, format=None):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample_grid, "save_image", full_disk)
    grid = sample_grid.SampleGrid(tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], global_step=0)
    module = SimpleNamespace(mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1))
    batch = (torch.rand(4, 3, 8, 8), torch.arange(4))
    grid.on_train_batch_start(trainer, module, batch, 0)
    assert not list(tmp_path.iterdir()), "no partial PNG left behind"
    assert "cannot write" in caplog.text and "No space left on device" in caplog.text


def test_an_id_file_without_an_id_is_an_error_naming_it(tmp_path, monkeypatch):
    """An id file created empty and never written (a kill between the two) gave every later start an empty id:
    a new W&B run each time."""
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    made = run_id(tmp_path / "new")
    assert made and (tmp_path / "new" / RUN_ID_FILE).read_text() == made + "\n"
    assert run_id(tmp_path / "new", from_checkpoint="other") == made, "the file's id wins over the checkpoint's"
    assert not [p for p in (tmp_path / "new").iterdir() if p.name != RUN_ID_FILE], "no temporary file left"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / RUN_ID_FILE).write_text("")
    with pytest.raises(ConfigError, match=f"tracking.wandb: {tmp_path / 'empty' / RUN_ID_FILE} holds '', not a W&B"):
        run_id(tmp_path / "empty")


def test_wandb_run_id_from_the_environment_is_the_run_directorys_or_refused(tmp_path, monkeypatch):
    """A WANDB_RUN_ID left in the shell from another run sent a resume to that W&B run without a word (the
    directory's file still named the first: the next start went back to it, one training in two W&B runs)."""
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv1")
    assert run_id(tmp_path / "new") == "fromenv1"
    assert (tmp_path / "new" / RUN_ID_FILE).read_text() == "fromenv1\n", "kept: a start without it continues it"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert run_id(tmp_path / "new") == "fromenv1"
    monkeypatch.setenv("WANDB_RUN_ID", "otherid1")
    with pytest.raises(ConfigError, match=rf"WANDB_RUN_ID='otherid1' is another W&B run than this run directory's "
                                          rf"\({tmp_path / 'new' / RUN_ID_FILE}: 'fromenv1'\).*unset WANDB_RUN_ID; a job script "
                                          rf"of launch's exports the id it was written with"):
        run_id(tmp_path / "new")
    assert (tmp_path / "new" / RUN_ID_FILE).read_text() == "fromenv1\n"


def test_wandb_mode_disabled_makes_no_wandb_run(digits_shards, tmp_path):
    """Lightning's W&B logger set WANDB_MODE=dryrun over the user's `disabled` (it is offline without a key):
    the run wrote an offline W&B run and told the user to sync it."""
    run = tmp_path / "run"
    r = run_module("pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                   "--trainer.default_root_dir", str(run), "--data.num_workers", "0", "--trainer.max_steps", "2",
                   "--trainer.num_sanity_val_steps", "0", env={"WANDB_MODE": "disabled"})
    assert "W&B: off (WANDB_MODE=disabled), as with --tracking.wandb false" in r.stderr, r.stderr
    assert not (run / "wandb").exists() and not (run / RUN_ID_FILE).exists() and "wandb sync" not in r.stderr
    assert "wandb: false" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()


def test_a_resume_into_another_wandb_project_says_the_history_splits(digits_shards, tmp_path):
    """W&B keeps a run in one project: the resume's rows went to a new run there, the first half stayed in the old
    project, and only the general "settings changed" line named tracking.project among others."""
    run = tmp_path / "run"
    _fit(digits_shards, run, 2)
    r = _fit(digits_shards, run, 4, True, "--tracking.project", "other-project")
    rid = (run / RUN_ID_FILE).read_text().strip()
    assert (f"warning: tracking.project changed (resnet-pipeline-demo -> other-project): W&B keeps a run in one "
            f"project, so this start logs to a new W&B run {rid} in other-project and the history so far stays in "
            f"resnet-pipeline-demo; --tracking.project resnet-pipeline-demo continues that run") in r.stderr, r.stderr
    r = _fit(digits_shards, run, 6, True, "--tracking.project", "other-project")
    assert "tracking.project changed" not in r.stderr, r.stderr


def test_an_evaluation_groups_with_the_training_run_and_refuses_a_garbled_id_file(tmp_path, monkeypatch):
    """``validate``/``test`` read the run's id through the same reader as ``fit`` and the launcher: a garbled id
    file was a UnicodeDecodeError traceback (or became the W&B group as it was)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    cfg = TrackingConfig(csv=False)
    run = tmp_path / "run"
    (logger,) = make_eval_loggers(cfg, run, "validate", None)
    assert logger._wandb_init.get("group") is None, "no training yet: no group"
    made = run_id(run)
    (logger,) = make_eval_loggers(cfg, run, "validate", None)
    assert logger._wandb_init["group"] == made and logger._wandb_init["id"] != made
    (run / RUN_ID_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=f"tracking.wandb: {run / RUN_ID_FILE} holds .*not a W&B run id"):
        make_eval_loggers(cfg, run, "validate", None)


def _wandb_records(run_file: Path):
    """The protobuf ``Record``s of an offline ``.wandb`` file: LevelDB's log format (32 KiB blocks of
    records with a 7-byte header; a 7-byte ``:W&B`` file header)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, pending = run_file.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows (``run.log`` calls) of an offline ``.wandb`` file."""
    import json

    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in _wandb_records(run_file) if record.WhichOneof("record_type") == "history"]


def _wandb_run_and_config(run_file: Path) -> tuple[object, dict]:
    """The run record (id, group, job type) and the config updates, merged, of an offline ``.wandb`` file."""
    import json

    run, config = None, {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return run, config


def _stopped_in_epoch_0_validation(shards: Path, run: Path, steps: int, env: dict) -> str:
    """A W&B fit of `steps` max steps stopped by a SIGTERM to all its processes (as Slurm sends it) in epoch
    0's validation, after its 11th step; its output."""
    from bench.kill_resume import fit_command

    stopped = preloaded_python.run(fit_command(shards, run, steps, [
        "--tracking.wandb", "true", "--trainer.callbacks+=tests.preemption_helpers.TermStepInValidation"]),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0 and "preemption (SIGTERM)" in out, out[-3000:]
    return out


def test_metrics_after_a_sigterm_reach_wandb_when_the_run_resumes(digits_shards, tmp_path):
    """SIGTERM during epoch 0's validation: W&B's service is going away, so the W&B logger is detached and
    the validation's metrics reached only CSV; the resumed run never validates epoch 0 again, so W&B had a
    hole in its val/top1 curve. The stopped run keeps them in its checkpoint, the resumed one logs them to
    the same W&B run at their step. The signal goes to every process of the run, as Slurm sends it."""
    import os

    from bench.kill_resume import fit_command

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = _stopped_in_epoch_0_validation(digits_shards, run, 13, env)
    # W&B's exit hook, talking to its service killed by the same SIGTERM, printed a 30-line traceback
    for noise in ("Traceback", "socket.send() raised exception", "`weights_only` was not set"):
        assert noise not in out, out[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        val = [r for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(val) == 1 and int(val[0]["step"]) == 10, val  # epoch 0's validation, after its 11th step
    first = sorted((run / "wandb").glob("offline-run-*"))
    assert len(first) == 1
    assert not [r for r in _wandb_history(next(first[0].glob("*.wandb"))) if "val/top1" in r], "W&B was detached"

    resumed = preloaded_python.run(fit_command(digits_shards, run, 12, ["--tracking.wandb", "true"]), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    second = [p for p in sorted((run / "wandb").glob("offline-run-*")) if p not in first]
    assert len(second) == 1 and second[0].name.split("-")[-1] == first[0].name.split("-")[-1], "the same W&B run"
    logged = [r for r in _wandb_history(next(second[0].glob("*.wandb"))) if "val/top1" in r]
    assert len(logged) == 1, logged
    assert logged[0]["val/top1"] == pytest.approx(float(val[0]["val/top1"]))
    assert logged[0]["trainer/global_step"] == 10
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["callbacks"]["WandbBacklog"] == {"held": []}, "logged once, not again at the next resume"


def test_a_sigterm_in_the_last_validation_reaches_wandb_at_the_start_that_finds_the_run_complete(digits_shards,
                                                                                                  tmp_path):
    """SIGTERM in the validation after the run's last step (Slurm's preemption, whose requeue starts the job
    again): the run is complete, so no resume ever logged what the detached W&B logger held, the run's final
    val/top1. The start that finds it complete logs them, once; a later resume (a larger max_steps) does not
    log them again."""
    import os

    from bench.kill_resume import fit_command
    from pipeline.wandb_backlog import LOGGED

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = _stopped_in_epoch_0_validation(digits_shards, run, 11, env)
    assert "the run's last step: it is complete" in out, out[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        val = [r for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(val) == 1 and int(val[0]["step"]) == 10, val
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert not [r for r in _wandb_history(next(runs[0].glob("*.wandb"))) if "val/top1" in r], "W&B was detached"

    def start(steps: int) -> subprocess.CompletedProcess:
        r = preloaded_python.run(fit_command(digits_shards, run, steps, ["--tracking.wandb", "true"]), env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    complete = start(11)
    assert "fit: the run is complete" in complete.stderr, complete.stderr[-3000:]
    assert "W&B: logged the" in complete.stderr and "(last at step 10)" in complete.stderr, complete.stderr[-3000:]
    new = [p for p in sorted((run / "wandb").glob("offline-run-*")) if p not in runs]
    assert len(new) == 1 and new[0].name.split("-")[-1] == runs[0].name.split("-")[-1], "the same W&B run"
    logged = [r for r in _wandb_history(next(new[0].glob("*.wandb"))) if "val/top1" in r]
    assert [(r["trainer/global_step"], r["val/top1"]) for r in logged] == \
        [(10, pytest.approx(float(val[0]["val/top1"])))], logged
    assert (run / "checkpoints" / LOGGED).is_file()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    again = start(11)  # once: no W&B run started for them again
    assert "W&B: logged the" not in again.stderr and sorted((run / "wandb").glob("offline-run-*")) == runs
    longer = start(12)  # trains on: its W&B start does not log them again either
    assert "resuming from" in longer.stderr, longer.stderr[-3000:]
    new = [p for p in sorted((run / "wandb").glob("offline-run-*")) if p not in runs]
    assert len(new) == 1 and not [r for r in _wandb_history(next(new[0].glob("*.wandb"))) if "val/top1" in r
                                  and r["trainer/global_step"] == 10]


def test_the_backlog_holds_numbers_only():
    """A log_image in flight when W&B's service went (the sample grid, at a run's first step) is held with
    the rest: float() of its pictures raised TypeError and ended the run the guard was there to keep."""
    import numpy as np
    import wandb

    from pipeline.wandb_backlog import WandbBacklog

    backlog = WandbBacklog()
    backlog.hold({"samples/train_batch": [wandb.Image(np.zeros((4, 4, 3), np.uint8))], "trainer/global_step": 3,
                  "train/loss": torch.tensor(2.5)}, 3)
    backlog.hold({"samples/train_batch": [wandb.Image(np.zeros((4, 4, 3), np.uint8))]}, 4)
    assert backlog.held == [{"step": 3, "metrics": {"trainer/global_step": 3.0, "train/loss": 2.5}}]


def test_a_run_id_wandb_refuses_is_a_one_line_error(digits_shards, tmp_path, monkeypatch):
    """W&B's refusal to start a run (here a run id it does not take; online also a bad API key) came as a
    traceback at the first log, exit 1: the Slurm script took it for a crash, restarted the job three times
    with the same refusal and excluded a sound node. A WANDB_RUN_ID that is no id is refused before
    anything starts; a refusal at W&B's start is the same one-line error, exit 2."""
    from pipeline.errors import ConfigError
    from pipeline.wandb_logger import ServiceSafeWandbLogger

    run = tmp_path / "run"
    proc = run_cli_in_process("fit", "--config", CONF, *SMALL_NET,
                              "--data.root", str(digits_shards), "--trainer.default_root_dir",
                              str(run), "--trainer.max_steps", "2", env={"WANDB_MODE": "offline",
                                                                         "WANDB_RUN_ID": "<new id, created on submit>"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: tracking.wandb: WANDB_RUN_ID='<new id, created on submit>' is not a W&B run id" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "checkpoints").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = ServiceSafeWandbLogger(save_dir=str(tmp_path), offline=True, id="a:b")
    with pytest.raises(ConfigError, match=r"tracking.wandb: W&B refused to start the run: UsageError: .?Run ID cannot"):
        logger.experiment


def test_a_wandb_server_out_of_reach_makes_the_run_log_offline(digits_shards, tmp_path):
    """A key is set but the W&B server cannot be reached (compute nodes without internet, an outage): the run
    waited W&B's init_timeout (90 s), then ended with W&B's CommError traceback, exit 1, nothing trained, and
    a Slurm job restarted so failed the same way each time. Now it logs offline under the same run id, says
    so in one line, and trains."""
    from tests.conftest import free_port

    run = tmp_path / "run"
    proc = run_module(
        "pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
        "--trainer.default_root_dir", str(run), "--data.num_workers", "0", "--trainer.max_steps", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0", check=False,
        env={"WANDB_MODE": "online", "WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
             "WANDB_INIT_TIMEOUT": "5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("W&B: cannot start the run online")]
    assert len(said) == 1 and "CommError" in said[0] and f"{run}/wandb/offline-run-*" in said[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run_id = (run / RUN_ID_FILE).read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    steps = [row.get("trainer/global_step") for row in _wandb_history(next(offline[0].glob("*.wandb")))]
    assert 1 in steps, steps  # the training's metrics are in the offline run
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2


def test_a_lost_wandb_service_does_not_end_the_training(digits_shards, tmp_path):
    """W&B's service process gone mid-run (killed here at batch 2; Slurm's SIGTERM reaches it too, the OOM
    killer may pick it): every W&B log call raised ConnectionResetError, and the run ended there, before
    a preemption's save. Now the training goes on, a SIGTERM at batch 6 still saves and requeues, and the
    rows W&B missed reach the same W&B run when the run resumes."""
    import os

    from bench.kill_resume import fit_command

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    stopped = preloaded_python.run(fit_command(digits_shards, run, 9, [
        "--tracking.wandb", "true", "--checkpoint.every_n_train_steps", "0",
        "--trainer.callbacks+=tests.preemption_helpers.KillWandbService", "--trainer.callbacks.batch_idx", "2",
        "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx", "6",
        "--trainer.callbacks.signum", "15"]), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0 and "preemption (SIGTERM)" in out, out[-3000:]
    # the first log call after the kill that fails: step 2's, or under load a later one (W&B's client may
    # hand a row to its socket before the reset of the dead peer's end comes back; CI saw step 3)
    lost = re.search(r"W&B: its service process is gone \(ConnectionResetError\) at step (\d+); the training goes on",
                     out)
    assert lost and 2 <= int(lost.group(1)) <= 5, out[-3000:]
    first = int(lost.group(1))
    assert "Traceback" not in out, out[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 7
    held_steps = sorted({r["step"] for r in saved["callbacks"]["WandbBacklog"]["held"]})
    assert held_steps[0] == first and held_steps[-1] >= 5, held_steps

    resumed = preloaded_python.run(fit_command(digits_shards, run, 8, ["--tracking.wandb", "true"]), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    second = sorted((run / "wandb").glob("offline-run-*"))[-1]
    steps = {r.get("trainer/global_step") for r in _wandb_history(next(second.glob("*.wandb"))) if "train/loss" in r}
    assert set(range(first, 6)) <= steps, sorted(s for s in steps if s is not None)


def test_the_stopping_steps_train_metrics_reach_wandb_when_the_run_resumes(digits_shards, tmp_path):
    """SIGTERM mid-epoch: Lightning logs the stopping step's train metrics after the preemption save, so they
    were in no checkpoint and W&B never got them (CSV did). They are kept beside the checkpoint and logged
    by the resume from that checkpoint."""
    import os

    from bench.kill_resume import fit_command
    from pipeline.wandb_backlog import AFTER_SAVE

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # the SIGTERM to this process alone (W&B's service lives on), W&B not silent: its service finished the
    # run in teardown and printed the footer itself, in terminal colours, into the (file) stdout
    stopped = preloaded_python.run(fit_command(digits_shards, run, 9, [
        "--tracking.wandb", "true", "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch",
        "--trainer.callbacks.batch_idx", "3", "--trainer.callbacks.signum", "15"]),
        env={k: v for k, v in env.items() if k != "WANDB_SILENT"}, cwd=REPO, capture_output=True, text=True,
        timeout=300)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0 and "preemption (SIGTERM)" in out, out[-3000:]
    assert "\x1b[" not in out and "wandb: You can sync this run to the cloud" in stopped.stderr, out[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("train/loss")][-1]
    step = int(last["step"])
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert (run / "checkpoints" / AFTER_SAVE).is_file(), "the rows logged after the save were not kept"

    resumed = preloaded_python.run(fit_command(digits_shards, run, 6, ["--tracking.wandb", "true"]), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    second = sorted((run / "wandb").glob("offline-run-*"))[-1]
    rows = [r for r in _wandb_history(next(second.glob("*.wandb"))) if r.get("trainer/global_step") == step
            and "train/loss" in r]
    assert len(rows) == 1 and rows[0]["train/loss"] == pytest.approx(float(last["train/loss"])), rows
    assert not (run / "checkpoints" / AFTER_SAVE).exists(), "used once"


def test_a_new_start_after_one_that_saved_nothing_keeps_its_metrics_apart(digits_shards, tmp_path):
    """Killed before its first checkpoint, a run starts over at step 0: its rows were appended to the killed
    start's ``metrics.csv``, every step twice. The killed start's file is set aside, whole."""
    import csv as csv_module

    run = tmp_path / "run"
    common = ("--tracking.wandb", "false", "--checkpoint.every_n_train_steps", "0")
    killed = run_module("pipeline", "fit", "--config", CONF, *SMALL_NET,
                        "--data.root", str(digits_shards), "--trainer.default_root_dir",
                        str(run), "--data.num_workers", "0", "--trainer.max_steps", "6", "--trainer.log_every_n_steps",
                        "1", *common, "--trainer.callbacks+=tests.preemption_helpers.KillFirstAttempt",
                        "--trainer.callbacks.step=4", check=False)
    assert killed.returncode == -9 and not (run / "checkpoints" / "last.ckpt").exists(), killed.stderr[-2000:]
    before = (run / "csv" / "metrics.csv").read_bytes()
    again = run_module("pipeline", "fit", "--config", CONF, *SMALL_NET,
                       "--data.root", str(digits_shards), "--trainer.default_root_dir",
                       str(run), "--data.num_workers", "0", "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1",
                       *common)
    aside = run / "csv" / "metrics-lost-start-1.csv"
    assert f"the metrics of an earlier one that saved no checkpoint are kept as {aside}" in again.stderr
    assert aside.read_bytes() == before
    with open(run / "csv" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv_module.DictReader(f) if r.get("train/loss")]
    assert steps and len(steps) == len(set(steps)), steps


def test_wandb_tips_are_dropped_from_its_lines() -> None:
    from pipeline.wandb_lines import kept_lines

    header = ("W&B syncing is set to `offline` in this directory. Run `wandb online` or set WANDB_MODE=online to "
              "enable cloud syncing.\nRun data is saved locally in \x1b[35m\x1b[1mRUN/wandb/offline-run-x\x1b[0m\n"
              "View this run in the terminal with \x1b[1m`wandb leet`\x1b[0m")
    assert kept_lines(header) == "Run data is saved locally in \x1b[35m\x1b[1mRUN/wandb/offline-run-x\x1b[0m"
    assert kept_lines("Find logs at: ./RUN/wandb/offline-run-x/logs") is None
    sync = "You can sync this run to the cloud by running:\nwandb sync RUN/wandb/offline-run-x"
    assert kept_lines(sync) == sync


def test_a_failed_fit_finishes_its_wandb_run_too(digits_shards, tmp_path):
    """Lightning calls no callback's teardown after an exception: the run was left to W&B's exit hook, whose
    service process printed the footer with terminal colour codes into the job's log."""
    run = tmp_path / "run"
    proc = run_module(
        "pipeline", "fit", "--config", CONF, *SMALL_NET,
        "--data.root", str(digits_shards), "--trainer.default_root_dir",
        str(run), "--data.num_workers", "0", "--trainer.max_steps", "30", "--trainer.num_sanity_val_steps", "0",
        "--trainer.callbacks+=tests.preemption_helpers.FailAtValidationEnd",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "false"}, check=False)
    assert proc.returncode != 0 and "FailAtValidationEnd" in proc.stderr, proc.stderr[-3000:]
    assert "wandb: You can sync this run to the cloud" in proc.stderr, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_a_two_rank_fit_finishes_its_wandb_run_after_the_last_barrier(digits_shards, tmp_path):
    """Rank 0 finishes the W&B run after the process group's teardown (the other rank would wait at the
    last barrier while W&B uploads), not left to W&B's exit hook (its footer with colour codes)."""
    from tests.conftest import free_port

    proc = run_module(
        "pipeline", "fit", "--config", CONF, *SMALL_NET,
        "--data.root", str(digits_shards), "--trainer.default_root_dir",
        str(tmp_path / "run"), "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "3",
        "--data.num_workers", "0", "--trainer.num_sanity_val_steps", "0",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_SILENT": "false",
             "MASTER_PORT": str(free_port())})
    assert proc.stderr.count("wandb: You can sync this run to the cloud") == 1, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_a_run_without_loggers_trains_checkpoints_and_resumes(digits_shards, tmp_path):
    """Lightning's LearningRateMonitor refuses a trainer without loggers: ``--trainer.logger false`` (or every
    tracker off) ended the run at its first step with "Cannot use LearningRateMonitor"."""
    run = tmp_path / "run"
    common = ("pipeline", "fit", "--config", CONF, *SMALL_NET,
              "--data.root", str(digits_shards), "--trainer.default_root_dir",
              str(run), "--data.num_workers", "0", "--trainer.num_sanity_val_steps", "0")
    run_module(*common, "--trainer.logger", "false", "--trainer.max_steps", "4")
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert not (run / "csv").exists() and not (run / "wandb").exists()
    run_module(*common, "--tracking.csv", "false", "--tracking.wandb", "false", "--trainer.max_steps", "6")
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
    assert not (run / "csv").exists() and not (run / "wandb").exists()


def test_no_wandb_package_is_one_line(monkeypatch):
    """wandb is a dependency, but an environment without it (a container built otherwise) ended the run
    in a traceback from Lightning's logger: now the setting is named, before the run directory is touched."""
    import importlib.util

    from pipeline.tracking import TrackingConfig, check_wandb_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="tracking.wandb: the wandb package is not installed here"):
        check_wandb_settings(TrackingConfig(wandb=True))
    check_wandb_settings(TrackingConfig(wandb=False))  # nothing to check without W&B


def test_a_requeue_that_ends_the_wandb_service_leaves_no_traceback(digits_shards, tmp_path):
    """A USR1 stop under Slurm finishes the W&B run, then requeues the job; the requeue makes Slurm SIGTERM
    every process of the step, W&B's service too (the stand-in ``scontrol`` does that here, as Slurm does
    before the process has exited). W&B's exit hook then told the dead service that the process was done:
    a ``ConnectionResetError`` traceback ("Exception ignored in atexit callback") in the job's log after a
    stop that had gone well. Now W&B's teardown comes before the requeue."""
    import os

    from bench.kill_resume import fit_command

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(  # the trainer is this script's parent; SIGTERM to all of its children
        f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n'
        '[ "$1" = requeue ] && for p in $(ps -o pid= --ppid "$PPID"); do [ "$p" != $$ ] && kill -TERM "$p"; done\n'
        'exit 0\n')
    (bindir / "scontrol").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "SLURM_JOB_ID": "4343", "PATH": f"{bindir}:{os.environ['PATH']}"}
    run = tmp_path / "run"
    stopped = preloaded_python.run(fit_command(digits_shards, run, 9, [
        "--tracking.wandb", "true", "--checkpoint.every_n_train_steps", "0",
        "--trainer.callbacks+=tests.preemption_helpers.SignalAtBatch", "--trainer.callbacks.batch_idx", "2"]),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0 and "requeued Slurm job 4343" in out, out[-3000:]
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 4343"]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]


def test_rewind_metrics_drops_only_the_last_rows_and_sets_aside_an_unreadable_file(tmp_path, caplog):
    """At a resume of last.ckpt (step 7): the rows a killed start logged from step 7 on, at the end of the file,
    go; rows of steps 7-12 above them are an earlier timeline's (a run taken back by hand to step 5) and stay;
    a row cut short by the kill goes too. A file a node crash left with a long tail of NUL bytes (csv's
    "field larger than field limit") was a traceback at every restart: it is set aside."""
    import logging

    from pipeline.tracking import rewind_metrics

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    path = csv_dir / "metrics.csv"
    old = [f"{s},0,{s / 10}" for s in range(13)]
    new = [f"{s},0,{s / 100}" for s in (5, 6, 7, 8)]
    path.write_text("step,epoch,train/loss\n" + "\n".join(old + new) + "\n9,0\n")
    assert rewind_metrics(tmp_path, 7) == 3
    assert path.read_text() == "step,epoch,train/loss\n" + "\n".join(old + new[:2]) + "\n"
    assert rewind_metrics(tmp_path, 7) == 0
    assert [p.name for p in csv_dir.iterdir()] == ["metrics.csv"]  # no temporary file left

    path.write_bytes(b"step,epoch,train/loss\n1,0,0.5\n" + b"\0" * 200_000)
    with caplog.at_level(logging.WARNING):
        assert rewind_metrics(tmp_path, 1) == 0
    assert not path.exists() and (csv_dir / "metrics-unreadable-1.csv").stat().st_size > 200_000
    assert "cannot be read" in caplog.text and "metrics-unreadable-1.csv" in caplog.text


def test_tensorboard_drops_what_a_killed_start_logged_after_the_resumed_checkpoint(tmp_path):
    """A start killed (SIGKILL, a node failure) some steps after its last save logged those steps to
    TensorBoard; the resume trains and logs them again. ``metrics.csv`` drops the first copies
    (``rewind_metrics``); TensorBoard kept both: every such step twice, for good, after each kill of a long
    run. The resume's writer starts with a purge at its step (torch's ``purge_step``: a SessionLog START
    event), so TensorBoard reads each step once, the resumed run's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.tracking import make_loggers

    cfg = TrackingConfig(wandb=False, csv=False, tensorboard=True)
    (killed,) = make_loggers(cfg, tmp_path)
    for step in range(10):  # saved at step 6, killed at step 9
        killed.log_metrics({"train/loss": float(step)}, step=step)
    killed.finalize("success")
    (resumed,) = make_loggers(cfg, tmp_path, resume_step=6)
    for step in range(6, 12):
        resumed.log_metrics({"train/loss": 100.0 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == list(range(12))
    assert [e.value for e in events] == [float(s) for s in range(6)] + [100.0 + s for s in range(6, 12)]
    (fresh,) = make_loggers(cfg, tmp_path / "fresh")  # no resume: no purge event
    fresh.log_metrics({"train/loss": 1.0}, step=0)
    fresh.finalize("success")
    assert [e.step for e in EventAccumulator(str(tmp_path / "fresh" / "tensorboard")).Reload()
            .Scalars("train/loss")] == [0]
