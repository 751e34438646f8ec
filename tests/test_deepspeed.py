"""DeepSpeed ZeRO-2 through the CLI on CPU (the registered deepspeed_stage_2_cpu variant), 2 ranks and 1:
trains, saves a checkpoint directory (swapped in whole; a crash between its renames is repaired at the next
start), resumes from it, and ``python -m pipeline export`` turns it into a plain fp32 state_dict that
torchvision's resnet18 loads. A ZeRO checkpoint of 2 ranks resumed with 1 or 4 is refused at start with one
line (DeepSpeed cannot re-partition the sharded optimizer state); resumed with 2 it continues bit-exactly.
The first DeepSpeed init compiles a C++ extension (~45 s, cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.export import main as export_main
from pipeline.export import state_dict_from_checkpoint
from tests.conftest import REPO, SMALL_NET, free_port, run_cli_in_process, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def _fit_args(shards, run_dir, steps: int, *extra: str) -> list[str]:
    """Loader workers 0: this file tests ZeRO's state, resume and export, not the loader (whose key order
    is the same with any ``num_workers``). A CI run hung once at a rank's DataLoader worker fork: the child
    stuck in CPython 3.11's after-fork thread clean-up (``_PyThreadState_DeleteExcept``), a lock a thread
    of the DeepSpeed rank held at the fork (CPython gh-112275; the cpu backend's workers now start from a fork
    server, ``pipeline/data/worker_start.py``)."""
    return [
        "pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(shards), "--trainer.default_root_dir",
        str(run_dir), "--model.arch", "resnet18", "--trainer.strategy", "deepspeed_stage_2_cpu",
        "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.max_steps", str(steps),
        "--checkpoint.every_n_train_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--tracking.wandb", "false", "--ckpt_path", "last", *extra,
    ]


def _fit(shards, run_dir, steps: int, *extra: str, check: bool = True):
    return run_module(*_fit_args(shards, run_dir, steps, *extra), check=check)


def _fit_two_ranks(shards, run_dir, steps: int, port: int) -> str:
    """Two ranks of Lightning's own launcher (rank 0 starts rank 1), as one node of a multi-node run."""
    proc = run_module(*_fit_args(shards, run_dir, steps, "--trainer.devices", "2"), env={"MASTER_PORT": str(port)})
    return proc.stdout + proc.stderr


def _zero_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights, fp32 master partitions and momentum partitions of every rank's shard, by name."""
    out = {}
    for f in sorted((ckpt / "checkpoint").glob("*.pt")):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        if "module" in sd:
            out.update({f"{f.name}:{k}": v for k, v in sd["module"].items()})
            continue
        opt = sd["optimizer_state_dict"]
        out.update({f"{f.name}:fp32.{i}": t for i, t in enumerate(opt["single_partition_of_fp32_groups"])})
        out.update({f"{f.name}:momentum.{i}": s["momentum_buffer"]
                    for i, s in opt["base_optimizer_state"]["state"].items()})
    return out


def test_zero2_trains_refuses_another_world_size_resumes_and_exports_for_torchvision(digits_shards, tmp_path):
    """2 ranks of ZeRO-2 train 2 steps into a checkpoint directory. DeepSpeed cannot re-partition ZeRO
    optimizer state for another world size (its load raises after the engine is up, elastic_checkpoint or
    not), so resuming it with 1 rank (fewer) or 4 (more) fails before DeepSpeed starts, with one line naming
    the checkpoint, both world sizes and the ways out, and leaves the checkpoint as it was. One way out, a
    new 1-rank run from its weights alone, starts from exactly those weights; the other, 2 ranks again,
    continues from the saved momentum bit-identical to an uninterrupted 2-rank run, after repairing a
    crash between the two renames of a save. ``python -m pipeline export`` then gives the plain fp32
    state_dict that torchvision's resnet18 loads, equal to the trained weights."""
    import deepspeed  # noqa: F401  (a dependency: `make setup` installs the gpu extra)
    import torchvision

    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    _fit_two_ranks(digits_shards, run, 2, free_port())
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "ZeRO checkpoints are directories"
    states = last / "checkpoint" / "mp_rank_00_model_states.pt"
    first = torch.load(states, map_location="cpu", weights_only=False)
    assert first["global_step"] == 2 and first["ShardDataModule"]["consumed"] == 2 * 2 * 32
    saved = _zero_state(last)
    files = {p: p.stat().st_mtime_ns for p in last.rglob("*")}
    assert sum(".pt:momentum." in k for k in saved) == 4, "2 ranks x 2 param groups of momentum shards"

    for devices in (1, 4):
        proc = run_cli_in_process(*_fit_args(digits_shards, run, 3, "--trainer.devices", str(devices))[1:])
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: cannot resume the DeepSpeed ZeRO checkpoint {last} with another world size: it was saved by 2"
            f" ranks, this run has {devices}, and DeepSpeed cannot re-partition its sharded optimizer state"
            f" (momentum); resume with 2 ranks (trainer.num_nodes x trainer.devices), or start a new run (another"
            f" trainer.default_root_dir) from its weights alone with --model.init_weights {last}"
        ], out[-3000:]
        assert "Traceback" not in out and "initializing deepspeed" not in out, "refused before DeepSpeed starts"
        assert {p: p.stat().st_mtime_ns for p in last.rglob("*")} == files, "the checkpoint is untouched"

    # the way out the message offers: a new 1-rank run from the ZeRO directory's weights
    fresh = _fit(digits_shards, tmp_path / "one-rank", 1, "--model.init_weights", str(last), "--model.lr", "0")
    assert f"initial weights from {last}" in fresh.stderr
    one = _zero_state(tmp_path / "one-rank" / "checkpoints" / "last.ckpt")
    consolidated = state_dict_from_checkpoint(last)
    names = {k: k.split(":", 1)[1].removeprefix("model.") for k in one}
    convs = [k for k, name in names.items() if name in ("conv1.weight", "fc.weight", "layer4.1.conv2.weight")]
    assert len(convs) == 3 and all(torch.equal(one[k].float(), consolidated[names[k]]) for k in convs), convs

    # a crash between the two renames of the next save: last.ckpt moved aside, the new one unfinished
    os.rename(last, last.with_name("last.ckpt.old"))
    (run / "checkpoints" / "last.ckpt.partial" / "checkpoint").mkdir(parents=True)
    resumed_log = _fit_two_ranks(digits_shards, run, 3, free_port())
    assert "restored" in resumed_log and "resuming from" in resumed_log, resumed_log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "last" in p.name) == ["last.ckpt"]
    _fit_two_ranks(digits_shards, ref, 3, free_port())
    resumed, uninterrupted = _zero_state(last), _zero_state(ref / "checkpoints" / "last.ckpt")
    assert resumed.keys() == uninterrupted.keys() == saved.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"the resumed 2-rank run differs from the uninterrupted one: {differ[:5]}"
    assert not any(torch.equal(resumed[k], saved[k]) for k in saved if ":momentum." in k), "step 3 ran"

    out = tmp_path / "resnet18.pt"
    proc = run_module("pipeline", "export", str(last), str(out))
    assert "wrote" in proc.stdout and f"and {tmp_path / 'resnet18.pt.classes.json'}: what each output means" in \
        proc.stdout, proc.stdout
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert json.loads((tmp_path / "resnet18.pt.classes.json").read_text())["classes"] == manifest["classes"]
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(sd)  # strict: every key and shape matches torchvision's
    ms = torch.load(states, map_location="cpu", weights_only=False)
    assert ms["global_step"] == 3 and ms["ShardDataModule"]["consumed"] == 3 * 2 * 32
    trained = {k[len("model."):]: v for k, v in ms["module"].items() if k.startswith("model.")}
    for k, v in trained.items():
        assert torch.equal(sd[k], v.float()), f"{k} differs from the trained weights"
    assert not torch.equal(sd["conv1.weight"], first["module"]["model.conv1.weight"]), "step 3 changed weights"


def test_export_errors_are_clear(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out.pt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert export_main([str(tmp_path / "junk.ckpt"), str(tmp_path / "out.pt")]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert export_main([str(tmp_path / "junk.ckpt"), str(tmp_path)]) == 2  # an existing directory as out
    assert f"out: {tmp_path} is a directory" in capsys.readouterr().err
    folder = tmp_path / "checkpoints"  # a run's checkpoints/ folder: DeepSpeed's "no 'latest' file" said nothing useful
    folder.mkdir()
    (folder / "best-epoch000.ckpt").write_bytes(b"x")
    (folder / "last.ckpt").write_bytes(b"x")
    assert export_main([str(folder), str(tmp_path / "out.pt")]) == 2
    assert f"{folder} is a folder of checkpoints, not one: name one of them, e.g. {folder / 'last.ckpt'}" in \
        capsys.readouterr().err


def test_a_deepspeed_strategy_given_by_class_path_saves_atomically(digits_shards, tmp_path):
    """``trainer.strategy: {class_path: ...DeepSpeedStrategy, init_args: {...}}`` (how offload and the other
    options are set) made Lightning's own strategy, which writes each rank's files into ``last.ckpt/`` in
    place; only the registered ``deepspeed*`` names were the atomic one."""
    from pipeline.cli import PipelineCLI
    from pipeline.datamodule import ShardDataModule
    from pipeline.module import ImageClassifier
    from pipeline.strategies import AtomicDeepSpeedStrategy

    cli = PipelineCLI(ImageClassifier, ShardDataModule, run=False, auto_configure_optimizers=False, args=[
        "--config", CONF, *SMALL_NET,
        "--data.root", str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.strategy", "pytorch_lightning.strategies.DeepSpeedStrategy", "--trainer.strategy.stage", "2",
        "--tracking.wandb", "false"])
    assert type(cli.trainer.strategy) is AtomicDeepSpeedStrategy
    assert cli.trainer.strategy.config["zero_optimization"]["stage"] == 2  # the user's options kept


def _bf16_fit(shards, run_dir, strategy: str, precision: str = "bf16-mixed"):
    return run_module("pipeline", "fit", "--config", CONF, *SMALL_NET,
                      "--data.root", str(shards), "--trainer.default_root_dir",
                      str(run_dir), "--trainer.strategy", strategy, "--trainer.precision", precision,
                      "--model.channels_last", "false",  # as DeepSpeed runs: its flattened parameters are NCHW
                      "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.max_steps", "3",
                      "--trainer.num_sanity_val_steps", "0", "--tracking.wandb", "false")


def test_the_bf16_overlay_trains_as_a_single_process_bf16_mixed_run(digits_shards, tmp_path):
    """conf/deepspeed_stage_*.yaml ask for bf16-mixed: DeepSpeed's bf16 mode cast the parameters alone to bf16
    and the first step failed ("Input type (float) and weight type (BFloat16)"). As DeepSpeed's torch
    autocast, one ZeRO-2 rank now trains bit-identically to a one-process bf16-mixed run (and not as fp32)."""
    _bf16_fit(digits_shards, tmp_path / "zero2", "deepspeed_stage_2_cpu")
    _bf16_fit(digits_shards, tmp_path / "single", "auto")
    _bf16_fit(digits_shards, tmp_path / "fp32", "auto", "32-true")
    zero2 = state_dict_from_checkpoint(tmp_path / "zero2" / "checkpoints" / "last.ckpt")
    single = state_dict_from_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")
    fp32 = state_dict_from_checkpoint(tmp_path / "fp32" / "checkpoints" / "last.ckpt")
    assert zero2.keys() == single.keys()
    assert all(torch.equal(zero2[k], single[k]) for k in zero2), [k for k in zero2 if not torch.equal(zero2[k], single[k])]
    assert not torch.equal(zero2["conv1.weight"], fp32["conv1.weight"])


def test_what_deepspeed_would_get_wrong_is_refused_before_it_starts(digits_shards, tmp_path):
    """Gradient accumulation (Lightning and DeepSpeed both divided the loss by it: updates 1/k of their
    size, silently); a ZeRO directory given to DDP and a DDP file to DeepSpeed, a ZeRO-2 directory to
    ZeRO-3, a directory without `latest`, a missing or torn optimizer shard (tracebacks once the engine was
    up): each one line naming the setting or file, nothing trained."""
    zero, ddp = tmp_path / "zero2", tmp_path / "ddp"
    _fit(digits_shards, zero, 1)
    # export's stdout is its own line: DeepSpeed's accelerator warning and progress ("Processing zero checkpoint
    # ...") were printed there too; they are on stderr
    out = tmp_path / "zero2.pt"
    proc = run_module("pipeline", "export", str(zero / "checkpoints" / "last.ckpt"), str(out))
    said = (rf"wrote {re.escape(str(out))}: \d+ tensors, [\d,]+ fp32 values \(and \d+ integer BatchNorm batch "
            rf"counts\); and {re.escape(str(tmp_path / 'zero2.pt.classes.json'))}: what each output means\n")
    assert re.fullmatch(said, proc.stdout), proc.stdout
    assert "Processing zero checkpoint" in proc.stderr, proc.stderr
    run_module("pipeline", "fit", "--config", CONF, *SMALL_NET,
               "--data.root", str(digits_shards), "--trainer.default_root_dir",
               str(ddp), "--model.arch", "resnet18", "--data.batch_size", "32", "--data.num_workers", "0",
               "--trainer.max_steps", "1",
               "--trainer.num_sanity_val_steps", "0", "--tracking.wandb", "false")

    def refused(run_dir: Path, *args: str) -> str:
        r = run_cli_in_process(*_fit_args(digits_shards, run_dir, 5, *args)[1:])
        assert r.returncode == 2 and r.stderr.count("\n") >= 1, r.stderr
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
        return line

    line = refused(tmp_path / "acc", "--trainer.accumulate_grad_batches", "2", "--ckpt_path", "null")
    assert line.startswith("error: trainer.accumulate_grad_batches 2: under DeepSpeed Lightning and DeepSpeed both "
                           "divide the loss by it, so each update would be 2x too small"), line
    line = refused(ddp, "--ckpt_path", str(ddp / "checkpoints" / "last.ckpt"))
    assert f"{ddp / 'checkpoints' / 'last.ckpt'} is a checkpoint file (DDP or one device) and trainer.strategy is " \
           f"DeepSpeed" in line, line
    line = refused(zero, "--trainer.strategy", "auto")
    assert f"{zero / 'checkpoints' / 'last.ckpt'} is a DeepSpeed checkpoint directory and trainer.strategy is " \
           f"SingleDeviceStrategy" in line and "use trainer.strategy deepspeed_stage_2 " in line, line
    line = refused(zero, "--trainer.strategy", "deepspeed_stage_3_cpu")
    assert "was saved by ZeRO stage 2 and this run is stage 3" in line, line

    # the run directory for its checkpoint: DeepSpeed's model states were found in the ZeRO save inside it, and
    # validate failed in DeepSpeed's traceback ("not a valid DeepSpeed checkpoint"), fit said it had no `latest`
    said = (f"error: {zero} is a run directory, not a checkpoint: name one of its checkpoints, e.g. "
            f"{zero / 'checkpoints' / 'last.ckpt'}")
    assert refused(tmp_path / "elsewhere", "--ckpt_path", str(zero)) == said
    r = run_cli_in_process("validate", "--config", str(zero / "config.yaml"), "--ckpt_path", str(zero))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == said, r.stderr[-3000:]
    # a folder above the run directories: it was taken for the ZeRO save two levels down ("has no `latest` file")
    line = refused(tmp_path / "elsewhere", "--ckpt_path", str(tmp_path))
    assert line == f"error: checkpoint directory {tmp_path} holds no DeepSpeed model states", line

    tag = zero / "checkpoints" / "last.ckpt" / "checkpoint"
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    assert f"{shard} is torn" in refused(zero)
    assert export_main([str(zero / "checkpoints" / "last.ckpt"), str(tmp_path / "out.pt")]) == 2  # a traceback before
    states = tag / "mp_rank_00_model_states.pt"
    for torn, data in ((shard, whole), (states, states.read_bytes())):  # cut early: torch's reader raises EINVAL,
        torn.write_bytes(data[:5000])  # an OSError, and export and --model.init_weights were a traceback
        with pytest.raises(ConfigError, match=f"{re.escape(str(torn))} is torn"):
            state_dict_from_checkpoint(zero / "checkpoints" / "last.ckpt")
        torn.write_bytes(data)
    shard.unlink()
    assert f"{tag} lacks rank 0's optimizer shard" in refused(zero)
    shard.write_bytes(whole)
    (zero / "checkpoints" / "last.ckpt" / "latest").unlink()
    assert "has no `latest` file" in refused(zero)
    # validate said "DeepSpeed was unable to load the checkpoint", naming no file
    r = run_cli_in_process("validate", "--config", str(zero / "config.yaml"))
    last = zero / "checkpoints" / "last.ckpt"
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: ckpt_path: {last} has no `latest` file (the tag of the save DeepSpeed loads): not a whole DeepSpeed "
        f"checkpoint; score its weights alone with --ckpt_path null --model.init_weights {last}"), r.stderr[-3000:]


def test_a_two_rank_zero_run_validates_what_its_checkpoint_holds(digits_shards, tmp_path):
    """DeepSpeed broadcasts the module's buffers once, at start (DDP at every forward): each rank's BatchNorm
    running statistics followed its own batches, and rank 1 scored its half of the validation split with
    statistics no checkpoint holds. The val/loss the training logged (and best-k files are named after) then
    differed from what ``validate`` of the same checkpoint gives. Every rank validates with rank 0's now."""
    import csv

    run = tmp_path / "run"
    proc = run_module(*_fit_args(digits_shards, run, 3, "--trainer.devices", "2", "--model.arch", "cifar_resnet8",
                                 "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "0"),
                      env={"MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(logged) == 1, logged
    scored = run_module("pipeline", "validate", "--config", str(run / "config.yaml"), "--trainer.devices", "1",
                        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    with open(next((run / "validate" / "csv").rglob("metrics.csv"))) as f:
        again = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(again) == 1, scored.stderr[-3000:]
    assert again[0] == pytest.approx(logged[0], rel=1e-5, abs=0), (logged, again)


def test_validate_scores_a_bf16_zero_checkpoint_in_bf16_as_its_training_did(digits_shards, tmp_path):
    """A bf16-mixed run under DeepSpeed trains under DeepSpeed's torch autocast; Lightning's evaluation engine
    (``_initialize_deepspeed_inference``) takes only DeepSpeed's fp16/bf16 settings, so `validate` and `test` of
    its checkpoints ran in fp32: another val/loss and top-1 than the training logged (and named its best-k files
    after). They run under the same autocast now."""
    import csv

    run = tmp_path / "run"
    proc = run_module(*_fit_args(digits_shards, run, 3, "--model.arch", "cifar_resnet8", "--trainer.precision",
                                 "bf16-mixed", "--model.channels_last", "false", "--trainer.val_check_interval", "3",
                                 "--checkpoint.every_n_train_steps", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "csv" / "metrics.csv") as f:
        logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(logged) == 1, logged
    scored = run_module("pipeline", "validate", "--config", str(run / "config.yaml"),
                        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    with open(next((run / "validate" / "csv").rglob("metrics.csv"))) as f:
        again = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert again == logged, (logged, again, scored.stderr[-2000:])
    tested = run_module("pipeline", "test", "--config", str(run / "config.yaml"),
                        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    with open(next((run / "test" / "csv").rglob("metrics.csv"))) as f:
        assert [float(r["test/loss"]) for r in csv.DictReader(f) if r.get("test/loss")] == logged  # (val = test)
    assert "It is recommended to use" not in tested.stderr, tested.stderr[-2000:]  # test/loss is reduced by hand


def test_validate_of_a_zero3_checkpoint_is_refused_with_the_way_that_works(digits_shards, tmp_path):
    """DeepSpeed 0.19's evaluation engine (no optimizer) fails to load a ZeRO-3 checkpoint ('DeepSpeedZeRoOffload'
    object has no attribute '_restore_from_bit16_weights', a traceback, exit 1). Refused in one line naming the
    way that works: its weights alone, which score as the training logged."""
    import csv

    run = tmp_path / "z3"
    proc = run_module(*_fit_args(digits_shards, run, 2, "--model.arch", "cifar_resnet8", "--trainer.strategy",
                                 "deepspeed_stage_3_cpu", "--trainer.val_check_interval", "2",
                                 "--checkpoint.every_n_train_steps", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    r = run_cli_in_process("validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(last))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: ckpt_path: {last} is a ZeRO-3 checkpoint, which DeepSpeed (0.19) cannot load for validate (its "
        f"evaluation engine fails in load_checkpoint: 'DeepSpeedZeRoOffload' object has no attribute "
        f"'_restore_from_bit16_weights'); score its weights alone with --ckpt_path null --model.init_weights {last}")
    scored = run_module("pipeline", "validate", "--config", str(run / "config.yaml"), "--ckpt_path", "null",
                        "--model.init_weights", str(last))
    with open(run / "csv" / "metrics.csv") as f:
        logged = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    with open(next((run / "validate" / "csv").rglob("metrics.csv"))) as f:
        again = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(logged) == 1 and again == logged, (logged, again, scored.stderr[-2000:])
