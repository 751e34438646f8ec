"""DeepSpeed ZeRO-2 through the CLI on CPU (the registered deepspeed_stage_2_cpu variant): trains, saves a
checkpoint directory (swapped in whole; a crash between its renames is repaired at the next start), resumes from it, and ``python -m pipeline export`` turns it into a plain fp32
state_dict that torchvision's resnet18 loads. One DeepSpeed run set only: its first init compiles a C++
extension (~45 s, cached in TORCH_EXTENSIONS_DIR)."""

from __future__ import annotations

import os

import torch

from pipeline.export import main as export_main
from tests.conftest import REPO, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards, run_dir, steps: int):
    return run_module(
        "pipeline", "fit", "--config", CONF, "--data.root", str(shards), "--trainer.default_root_dir",
        str(run_dir), "--model.arch", "resnet18", "--trainer.strategy", "deepspeed_stage_2_cpu",
        "--data.batch_size", "32", "--data.num_workers", "1", "--trainer.max_steps", str(steps),
        "--checkpoint.every_n_train_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--tracking.wandb", "false", "--ckpt_path", "last",
    )


def test_zero2_cpu_trains_resumes_and_exports_for_torchvision(digits_shards, tmp_path):
    import deepspeed  # noqa: F401  (a dependency: `make setup` installs the gpu extra)
    import torchvision
    run = tmp_path / "run"
    _fit(digits_shards, run, 2)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "ZeRO checkpoints are directories"
    states = last / "checkpoint" / "mp_rank_00_model_states.pt"
    first = torch.load(states, map_location="cpu", weights_only=False)
    assert first["global_step"] == 2 and first["ShardDataModule"]["consumed"] == 64

    # a crash between the two renames of the next save: last.ckpt moved aside, the new one unfinished
    os.rename(last, last.with_name("last.ckpt.old"))
    (run / "checkpoints" / "last.ckpt.partial" / "checkpoint").mkdir(parents=True)
    resumed = _fit(digits_shards, run, 3)
    assert "restored" in resumed.stderr and "resuming from" in resumed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "last" in p.name) == ["last.ckpt"]
    ms = torch.load(states, map_location="cpu", weights_only=False)
    assert ms["global_step"] == 3 and ms["ShardDataModule"]["consumed"] == 96

    out = tmp_path / "resnet18.pt"
    proc = run_module("pipeline", "export", str(last), str(out))
    assert "wrote" in proc.stdout
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(sd)  # strict: every key and shape matches torchvision's
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
