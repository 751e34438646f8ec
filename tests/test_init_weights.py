"""``model.init_weights``: a new run starts from exported (or torchvision's) network weights; the optimizer,
step and loader start fresh; a resume ignores it; a file of another network is a one-line error."""
from __future__ import annotations

import csv

import torch
import torchvision

from pipeline.module import ImageClassifier
from tests.conftest import REPO, SMALL_NET, run_cli_in_process, run_module

CONF = str(REPO / "conf" / "demo.yaml")


def _fit(shards, run, steps: int, *extra: str, check: bool = True):
    return run_module("pipeline", "fit", "--config", CONF, *SMALL_NET, "--data.root", str(shards),
                      "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
                      "--tracking.wandb", "false", "--data.num_workers", "0", *extra, check=check)


def _fit_refused(shards, run, *extra: str):
    """A ``fit`` that must stop before training: run in this process (``run_cli_in_process``)."""
    return run_cli_in_process("fit", "--config", CONF, *SMALL_NET,
                              "--data.root", str(shards), "--trainer.default_root_dir",
                              str(run), "--trainer.max_steps", "1", "--tracking.wandb", "false", *extra)


def _params(ckpt_path) -> dict[str, torch.Tensor]:
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in sd.items()
            if k.startswith("model.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_a_new_run_starts_from_exported_weights_and_a_resume_ignores_them(digits_shards, tmp_path):
    _fit(digits_shards, tmp_path / "source", 4)
    weights = tmp_path / "source.pt"
    run_module("pipeline", "export", str(tmp_path / "source" / "checkpoints" / "last.ckpt"), str(weights))
    exported = torch.load(weights, weights_only=True)

    run = tmp_path / "run"
    first = _fit(digits_shards, run, 1, "--model.init_weights", str(weights), "--model.lr", "0")
    assert f"initial weights from {weights}" in first.stderr
    assert "warning: model.lr is 0: the weights will not change" in first.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1, "a fresh run, not the source's step"
    params = _params(run / "checkpoints" / "last.ckpt")
    assert params and all(torch.equal(v, exported[k]) for k, v in params.items()), "lr 0: still the exported weights"

    # validate (as test) scores the weights given, as it scores the checkpoint they came from: it scored the
    # untrained network, loading them only in fit
    scores = {}
    for name, how in (("checkpoint", ["--ckpt_path", str(tmp_path / "source" / "checkpoints" / "last.ckpt")]),
                      ("weights", ["--model.init_weights", str(weights)])):
        proc = run_module("pipeline", "validate", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                          "--trainer.default_root_dir", str(tmp_path / f"val-{name}"), "--tracking.wandb", "false",
                          "--data.num_workers", "0", *how)
        with open(next((tmp_path / f"val-{name}" / "validate" / "csv").glob("version_*/metrics.csv"))) as f:
            scores[name] = next(r for r in csv.DictReader(f) if r.get("val/top1"))
    assert f"validate: weights from {weights}" in proc.stderr
    assert scores["weights"]["val/top1"] == scores["checkpoint"]["val/top1"], scores
    assert scores["weights"]["val/loss"] == scores["checkpoint"]["val/loss"], scores

    weights.unlink()  # a resume takes the weights from its checkpoint and never reads the file
    resumed = _fit(digits_shards, run, 2, "--model.init_weights", str(weights), "--model.lr", "0")
    assert "resuming from" in resumed.stderr and "not loaded: resuming" in resumed.stderr


def test_weights_of_another_network_are_a_one_line_error(digits_shards, tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    proc = _fit_refused(digits_shards, tmp_path / "run", "--model.init_weights", str(tmp_path / "r18.pt"))
    assert proc.returncode == 2
    assert f"error: model.init_weights: {tmp_path / 'r18.pt'} does not fit model.arch 'cifar_resnet8'" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = _fit_refused(digits_shards, tmp_path / "run2", "--model.init_weights", str(tmp_path / "no.pt"))
    assert missing.returncode == 2 and f"model.init_weights: checkpoint {tmp_path / 'no.pt'} does not exist" in missing.stderr
    # validate refused the same way left the empty RUN/validate/ its loggers made (and a new RUN around it)
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)  # a run directory of a user's own: stays, with what it held
    for run in (tmp_path / "new-run", kept):
        scored = run_cli_in_process("validate", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                                    "--trainer.default_root_dir", str(run), "--tracking.wandb", "false",
                                    "--model.init_weights", str(tmp_path / "r18.pt"))
        assert scored.returncode == 2 and "does not fit model.arch 'cifar_resnet8'" in scored.stderr, scored.stderr
        assert not (run / "validate").exists()
    assert not (tmp_path / "new-run").exists() and sorted(p.name for p in kept.iterdir()) == ["notes"]


def test_torchvision_weights_load_into_the_same_network(tmp_path):
    reference = torchvision.models.resnet18(num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "tv.pt")
    module = ImageClassifier(arch="resnet18", num_classes=10, init_weights=str(tmp_path / "tv.pt"))
    module.load_init_weights(str(tmp_path / "tv.pt"))
    mine = module.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in reference.state_dict().items())
    assert module.model.conv1.weight.is_contiguous(memory_format=torch.channels_last), "layout kept"
    reference.eval(), module.model.eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(module.model(x.contiguous(memory_format=torch.channels_last)), reference(x))


def test_common_weight_file_layouts_load(tmp_path):
    """A legacy (non-zip) torch.save, a DDP-wrapped state_dict ("module." keys) and torchvision's reference
    scripts' checkpoints ({"model": ..., "optimizer": ...}) are the same weights."""
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    files = {
        "legacy.pt": (reference, {"_use_new_zipfile_serialization": False}),
        "ddp.pt": ({f"module.{k}": v for k, v in reference.items()}, {}),
        "references.pth": ({"model": reference, "optimizer": {}, "epoch": 3}, {}),
    }
    for name, (obj, kwargs) in files.items():
        torch.save(obj, tmp_path / name, **kwargs)
        module = ImageClassifier(arch="resnet18", num_classes=10)
        module.load_init_weights(str(tmp_path / name))
        mine = module.model.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in reference.items()), name


def _training_checkpoint(path, arch: str, **arch_kwargs) -> None:
    """What a ``fit`` saves, as far as ``init_weights`` reads it: the network's tensors and its record."""
    module = ImageClassifier(arch=arch, num_classes=10, arch_kwargs=arch_kwargs or None)
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": "2.6.6"}, path)


def test_weights_of_a_twin_network_are_refused_when_the_file_says_so(tmp_path):
    """Names and shapes cannot tell a residual net with option A from its plain counterpart, nor a v1
    bottleneck net from a v1.5 one: such weights loaded silently into a network computing something else.
    A training checkpoint records its network; another one is an error, the same one (another init
    option) loads."""
    import pytest

    from pipeline.errors import ConfigError

    cases = [("cifar_resnet20", {}, "plain_cifar_resnet20", {}, "cifar_resnet20 (option A)", "plain_cifar_resnet20"),
             ("resnet50", {"stride_in_1x1": True}, "resnet50", {},
              "resnet50 (option B, v1: stride in the 1x1)", "resnet50 (option B, v1.5: stride in the 3x3)")]
    for arch, kwargs, own_arch, own_kwargs, theirs, mine in cases:
        ckpt = tmp_path / f"{arch}.ckpt"
        _training_checkpoint(ckpt, arch, **kwargs)
        module = ImageClassifier(arch=own_arch, num_classes=10, arch_kwargs=own_kwargs or None)
        with pytest.raises(ConfigError) as e:
            module.load_init_weights(str(ckpt))
        assert str(e.value) == (f"model.init_weights: {ckpt} holds the weights of {theirs}, this run builds {mine}: "
                                f"the same tensors, another computation; set model.arch / model.arch_kwargs as the "
                                f"checkpoint's")
    ckpt = tmp_path / "same.ckpt"
    _training_checkpoint(ckpt, "cifar_resnet20", zero_init_residual=True)
    module = ImageClassifier(arch="cifar_resnet20", num_classes=10, arch_kwargs={"shortcut": "A"})
    assert module.load_init_weights(str(ckpt)) is None


def test_tensors_alone_load_with_a_note_where_a_twin_network_has_the_same_ones(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    assert ImageClassifier(arch="resnet18", num_classes=10).load_init_weights(str(weights)) is None
    torch.save(ImageClassifier(arch="cifar_resnet20", num_classes=10).model.state_dict(), weights)
    note = ImageClassifier(arch="plain_cifar_resnet20", num_classes=10).load_init_weights(str(weights))
    assert note.startswith(f"note: {weights} holds tensors alone, which fit plain_cifar_resnet20 by names and shapes")


def test_validate_with_a_runs_own_config_scores_its_checkpoint_not_the_weights_it_started_from(digits_shards,
                                                                                                tmp_path):
    """``RUN/config.yaml`` of a run started with ``--model.init_weights W`` keeps W (a setting of the run: a new
    start before the first checkpoint needs it). ``validate --config RUN/config.yaml`` (docs: without
    ``--ckpt_path``, ``RUN/checkpoints/last.ckpt``) scored W, the weights before any training, and printed
    their metrics as the run's."""
    from pipeline.models import build

    weights = tmp_path / "start.pt"
    torch.save(build(SMALL_NET[1], num_classes=10).state_dict(), weights)
    run = tmp_path / "run"
    _fit(digits_shards, run, 2, "--model.init_weights", str(weights), "--trainer.num_sanity_val_steps", "0")
    last = run / "checkpoints" / "last.ckpt"
    losses = []
    for how in ([], ["--ckpt_path", "last"]):
        proc = run_module("pipeline", "validate", "--config", str(run / "config.yaml"), *how)
        assert f"validate: {last}" in proc.stderr and "validate: weights from" not in proc.stderr, proc.stderr[-2000:]
        with open(sorted((run / "validate" / "csv").glob("version_*/metrics.csv"))[-1]) as f:
            losses.append(next(r for r in csv.DictReader(f) if r.get("val/loss"))["val/loss"])
    assert losses[0] == losses[1], losses


def test_validate_of_weights_in_a_run_directory_with_an_unreadable_last_ckpt_scores_the_weights(digits_shards,
                                                                                                 tmp_path):
    """``validate --model.init_weights W`` reads the run directory's ``last.ckpt`` to tell whether the run
    started from W (then that file is scored); one that cannot be read (torn, cut short) refused the
    validation of W ("cannot read checkpoint RUN/checkpoints/last.ckpt"), which never asked for that file."""
    from pipeline.models import build

    weights = tmp_path / "w.pt"
    torch.save(build(SMALL_NET[1], num_classes=10).state_dict(), weights)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    proc = run_module("pipeline", "validate", "--config", CONF, *SMALL_NET, "--data.root", str(digits_shards),
                      "--trainer.default_root_dir", str(run), "--tracking.wandb", "false", "--data.num_workers", "0",
                      "--model.init_weights", str(weights), check=False)
    assert proc.returncode == 0 and f"validate: weights from {weights}" in proc.stderr, proc.stderr[-2000:]
