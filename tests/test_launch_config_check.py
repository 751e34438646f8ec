"""``launch submit train`` checks the trainer's settings before sbatch (``pipeline.config_check``): a typo in the
config fails at submit, not at the job's start after its wait in the queue."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launch.errors import LaunchError
from launch.scripts import SlurmOptions, TrainJob
from launch.trainer_check import check_trainer_settings
from tests.test_launch_render import launch, srun_argv

REPO = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, config: Path, extra: list[str], **kw) -> TrainJob:
    return TrainJob(config=config, nodes=2, gpus_per_node=8, run_dir=tmp_path / "run",
                    slurm=SlurmOptions(time="1:00:00"), extra_args=extra, workdir=REPO, **kw)


@pytest.mark.parametrize("config_text, extra, expected", [
    ("model:\n  lrr: 0.1\n", [], "--config {cfg}: unknown key model.lrr"),
    ("trainer:\n  max_epochs: 90\n", ["--model.lr", "1e9"], "model.lr must be in [0, 10000]"),
    ("trainer:\n  max_epochs: 90\n", ["--trainer.max_steps", "0"], "trainer.max_steps must be >= 1 or -1"),
    ("data:\n  num_workers: null\n", [], "data.num_workers must be an int, got null"),
    ("checkpoint:\n  save_top_k: -5\n", [], "checkpoint.save_top_k must be >= -1"),
    ("trainer:\n  strategy: dpp\n", [], "trainer.strategy: 'dpp' is not one of: auto, ddp, "),
], ids=["unknown-key", "lr-after-dashes", "trainer-range", "null", "checkpoint-range", "strategy-name"])
def test_submit_refuses_what_the_trainer_would_refuse(tmp_path: Path, config_text: str, extra: list[str],
                                                      expected: str) -> None:
    cfg = tmp_path / "r50.yaml"
    cfg.write_text(config_text)
    run = tmp_path / "runs" / "r50"
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--time", "1:00:00",
               "--run-dir", str(run), *(["--", *extra] if extra else []), cwd=tmp_path, config_check=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: the trainer would refuse this job at its start: ")
    assert expected.format(cfg=cfg) in lines[0], lines[0]
    assert not run.exists(), "a refused submit writes nothing (no sbatch was called: there is none here)"


def test_dry_run_checks_the_arguments_the_job_runs(tmp_path: Path) -> None:
    """An accepted config: the script is printed, the check's warning about a shard directory this machine
    lacks is passed on, the check made no run directory, and what it checked is the srun line's command."""
    cfg = tmp_path / "r50.yaml"
    cfg.write_text("data:\n  root: /nonexistent/imagenet\nmodel:\n  arch: resnet50\n")
    run = tmp_path / "run"
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--time", "1:00:00",
               "--run-dir", str(run), "--dry-run", "--", "--model.lr", "0.2", cwd=tmp_path, config_check=True)
    assert r.returncode == 0, r.stderr
    assert ("warning: data.root: /nonexistent/imagenet does not exist on this machine (the job reads its manifest.json "
            "at its start); the model is checked with 1000 classes") in r.stderr.splitlines()
    assert not run.exists()
    job = _job(tmp_path, cfg, ["--model.lr", "0.2"])
    job.run_dir, job.workdir = run, tmp_path
    argv = srun_argv(r.stdout)
    assert argv[argv.index("-m") + 1:] == ["pipeline", *job.trainer_args(run_dir="$RUN_DIR")]


@pytest.mark.parametrize("root, why", [
    ("shards-typo", "{root} does not exist ({tmp} does: a typo? the job stops at its start unless its nodes see "
                    "another file system)"),
    ("empty", "{root} has no manifest.json (data_prep writes it last, `data_prep finalize` after array tasks; the "
              "job stops at its start without it)"),
])
def test_a_data_root_without_a_manifest_says_why(tmp_path: Path, root: str, why: str) -> None:
    """It said "has no manifest.json on this machine" of a mistyped folder next to the real one too."""
    (tmp_path / "empty").mkdir()
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(tmp_path / root)], cpu=True)
    warning = why.format(root=tmp_path / root, tmp=tmp_path)
    assert check_trainer_settings(job) == [f"warning: data.root: {warning}; the model is checked with 1000 classes"]


def test_a_data_root_of_images_says_the_command_that_shards_them(tmp_path: Path) -> None:
    """`launch submit train` with data.root at the images: the warning names the data_prep command (the job
    would stop at its start saying the same)."""
    from tests.fixtures_images import write_imagefolder

    write_imagefolder(tmp_path / "photos", ["cat", "dog"], 1)
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(tmp_path / "photos")], cpu=True)
    assert check_trainer_settings(job) == [
        f"warning: data.root: {tmp_path / 'photos'} has no manifest.json: it is not data_prep's output: it holds a "
        f"folder of images per class: shard it with `python -m data_prep imagefolder {tmp_path / 'photos'} OUT "
        f"--split train` (the job stops at its start); the model is checked with 1000 classes"]


def test_demo_config_with_its_shards_passes_without_warnings(tmp_path: Path, digits_shards: Path) -> None:
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards)], cpu=True)
    assert check_trainer_settings(job) == []
    assert not (tmp_path / "run").exists()


def test_the_check_run_by_hand_says_what_it_is(digits_shards: Path) -> None:
    """`python -m pipeline.config_check` run by hand: its --help and usage line named `python -m pipeline` and
    described training, and an accepted command line began with Lightning's "Seed set to 0", as a run does."""
    from tests.conftest import run_module

    ok = run_module("pipeline.config_check", "fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root",
                    str(digits_shards))
    assert ok.stderr.splitlines() == ["config_check: `python -m pipeline fit` accepts these settings"], ok.stderr
    usage = run_module("pipeline.config_check", "--help")
    assert usage.stdout.startswith("usage: python -m pipeline.config_check ") and "Would `python -m pipeline" in \
        usage.stdout, usage.stdout[:2000]
    bad = run_module("pipeline.config_check", "fit", "--model.lrr", "1", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: python -m pipeline.config_check fit "), bad.stderr


def test_a_split_the_manifest_lacks_is_refused_when_the_manifest_is_here(tmp_path: Path, digits_shards: Path) -> None:
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards), "--data.val_split", "vall"],
               cpu=True)
    with pytest.raises(LaunchError, match=r"data.val_split: split 'vall' is not in .*manifest.json"):
        check_trainer_settings(job)


@pytest.mark.parametrize("strategy", [["--trainer.strategy", "deepspeed_stage_2"],
                                      ["--trainer.strategy", "deepspeed_stage_1_cpu"],
                                      ["--trainer.strategy.class_path",
                                       "pytorch_lightning.strategies.DeepSpeedStrategy"]],
                         ids=["name", "cpu-name", "class-path"])
def test_gradient_accumulation_under_deepspeed_is_refused_before_the_job_queues(tmp_path: Path, strategy: list[str],
                                                                                 digits_shards: Path) -> None:
    """fit refuses it once its trainer is built, on the compute node after the queue wait; the check said the
    settings were fine. Any DeepSpeed way of naming the strategy; DDP's accumulation stays accepted."""
    common = ["--data.root", str(digits_shards), "--trainer.accumulate_grad_batches", "2", "--data.batch_size", "8"]
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", [*common, *strategy], cpu=True)
    with pytest.raises(LaunchError, match=r"trainer.accumulate_grad_batches 2: under DeepSpeed Lightning and "
                                          r"DeepSpeed both divide the loss by it"):
        check_trainer_settings(job)
    assert check_trainer_settings(_job(tmp_path, REPO / "conf" / "demo.yaml", common, cpu=True)) == []


def test_a_class_count_the_network_cannot_take_is_found_from_the_manifest(tmp_path: Path, digits_shards: Path) -> None:
    """The manifest is read when this machine has it: its 10 classes reach the network (a CIFAR ResNet needs
    none of ImageNet's 1000 to be checked), and arch_kwargs that do not fit the arch are refused."""
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards),
                                                       "--model.arch_kwargs", "{shortcut: Z}"], cpu=True)
    with pytest.raises(LaunchError, match=r"model.arch / model.arch_kwargs: .*shortcut"):
        check_trainer_settings(job)


def test_a_check_that_cannot_run_is_a_warning(tmp_path: Path) -> None:
    """A login node whose Python lacks the trainer's packages (the job runs in a container): say so, submit."""
    bare = "/usr/bin/python3"
    probe = subprocess.run([bare, "-c", "import pytorch_lightning"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare} has pytorch_lightning")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {}\n")
    warnings = check_trainer_settings(_job(tmp_path, cfg, []), python=bare)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: trainer settings not checked before submitting: `python -m "
                                  "pipeline.config_check` failed (exit 1): ModuleNotFoundError"), warnings


def test_a_login_node_with_no_usable_temporary_directory_submits_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No temporary directory this machine can write: importing the trainer (torch._dynamo makes its cache folder
    there) made the check die in that import's traceback. It now says it cannot check here (exit 1), which
    ``launch submit train`` turns into a warning: the job's nodes have temporary directories of their own,
    which its start checks. A refusal (exit 2) would have stopped the submission."""
    import sys

    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_text("")
    python = tmp_path / "python-without-tmp"  # this Python, with tempfile settled on an unusable folder
    python.write_text(f"#!{sys.executable}\n"
                      f"import runpy, sys, tempfile\n"
                      f"tempfile.tempdir = {str(not_a_folder)!r}\n"
                      f"assert sys.argv[1] == '-m', sys.argv\n"
                      f"sys.argv = [sys.argv[2], *sys.argv[3:]]\n"
                      f"runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    python.chmod(0o755)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # where torch's import in pytest put it
    monkeypatch.setenv("TMPDIR", str(not_a_folder))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {}\n")
    by_hand = subprocess.run([str(python), "-m", "pipeline.config_check", "fit", "--config", str(cfg)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert by_hand.returncode == 1 and by_hand.stderr.splitlines() == [
        f"config_check: cannot check on this machine: no temporary directory this user can write (TMPDIR "
        f"'{not_a_folder}': Not a directory; one that is missing, full or read-only is skipped), which W&B, the "
        f"DALI loader and torch.compile need: set TMPDIR to a folder this user can write, e.g. a node-local disk"], \
        by_hand.stderr[-3000:]
    warnings = check_trainer_settings(_job(tmp_path, cfg, []), python=str(python))
    assert warnings == ["warning: trainer settings not checked before submitting: `python -m pipeline.config_check` "
                        f"failed (exit 1): {by_hand.stderr.strip()}"], warnings


def test_torchrun_checks_the_command_it_prints(tmp_path: Path) -> None:
    """``launch torchrun`` printed (or ran) a command whose typo failed every rank at its start."""
    cfg = tmp_path / "r50.yaml"
    cfg.write_text("model:\n  lrr: 0.1\n")
    run = tmp_path / "run"
    r = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint",
               "node0:29400", "--run-dir", str(run), cwd=tmp_path, config_check=True)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"launch: error: the trainer would refuse this job at its start: --config {cfg}: "
                               "unknown key model.lrr"), r.stderr
    assert not run.exists(), "nothing made: no run directory, no W&B id"


def test_a_run_directory_whose_checkpoint_is_of_another_network_is_refused_before_the_job_queues(
        tmp_path: Path, digits_shards: Path) -> None:
    """The run directory's last.ckpt, which the job resumes, is of cifar_resnet8 and the config says
    cifar_resnet20: the start refused it, after the queue wait; the check said the settings were fine."""
    import torch

    from pipeline.module import ImageClassifier
    from pipeline.run_layout import last_checkpoint

    trained = ImageClassifier(arch="cifar_resnet8", num_classes=10)
    last = last_checkpoint(tmp_path / "run")
    last.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(trained.hparams), "state_dict": trained.state_dict()}, last)
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards)], cpu=True)
    with pytest.raises(LaunchError, match=rf"the checkpoint {last} was trained with model.arch='cifar_resnet8', this "
                                          r"run has model.arch='cifar_resnet20'"):
        check_trainer_settings(job)
    ok = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards), "--model.arch",
                                                      "cifar_resnet8"], cpu=True)
    assert check_trainer_settings(ok) == []


def test_a_shortened_run_with_the_recipes_milestones_is_warned_of(tmp_path: Path) -> None:
    """`--trainer.max_steps 60` with the CIFAR recipe's milestones at 32k and 48k: fit warned at the job's start
    that they are never reached; the check before submitting said nothing."""
    job = _job(tmp_path, REPO / "conf" / "cifar10_resnet20.yaml",
               ["--data.root", str(tmp_path / "none"), "--trainer.max_steps", "60"], cpu=True)
    assert "warning: lr milestones at steps [32000, 48000] come at or after the run's end (60 steps): never " \
           "reached" in check_trainer_settings(job)
    whole = _job(tmp_path, REPO / "conf" / "cifar10_resnet20.yaml", ["--data.root", str(tmp_path / "none")], cpu=True)
    assert not [w for w in check_trainer_settings(whole) if "milestones" in w]


def test_a_run_directory_whose_checkpoint_trained_on_other_shards_is_refused_before_the_job_queues(
        tmp_path: Path, digits_shards: Path) -> None:
    """The run directory's last.ckpt recorded another train split than data.root's (prepared again, another
    dataset): the start refused it in load_state_dict, after the queue wait; the check passed it."""
    import torch

    from pipeline.datamodule import ShardDataModule
    from pipeline.module import ImageClassifier
    from pipeline.run_layout import last_checkpoint

    trained = ImageClassifier(arch="cifar_resnet20", num_classes=10)
    same = ShardDataModule(root=str(digits_shards)).state_dict()
    last = last_checkpoint(tmp_path / "run")
    last.parent.mkdir(parents=True)

    def save(position: dict) -> None:
        torch.save({"hyper_parameters": dict(trained.hparams), "state_dict": trained.state_dict(),
                    ShardDataModule.__qualname__: position}, last)

    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards)], cpu=True)
    save(same)
    assert check_trainer_settings(job) == []
    save({**same, "splits_sha256": {**same["splits_sha256"], "train": "0" * 64}})
    with pytest.raises(LaunchError, match=r"the checkpoint was trained on another dataset: the 'train' split "
                                          rf"\(data.train_split\) of .*; the start would resume {last}"):
        check_trainer_settings(job)


def test_the_best_k_checkpoint_a_start_without_last_resumes_is_checked_too(tmp_path: Path, digits_shards: Path) -> None:
    """No last.ckpt, a best-k checkpoint of cifar_resnet8 (the one the start resumes in its place): the check
    looked at last.ckpt alone and passed a job that its start refused."""
    import torch

    from pipeline.module import ImageClassifier
    from pipeline.run_layout import checkpoint_dir

    trained = ImageClassifier(arch="cifar_resnet8", num_classes=10)
    best = checkpoint_dir(tmp_path / "run") / "best-epoch000-step0000011-top1=0.5000.ckpt"
    best.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(trained.hparams), "state_dict": trained.state_dict()}, best)
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards)], cpu=True)
    with pytest.raises(LaunchError, match=rf"the checkpoint {best} was trained with model.arch='cifar_resnet8'"):
        check_trainer_settings(job)


def test_a_branch_that_would_train_nothing_is_refused_before_the_job_queues(tmp_path: Path, digits_shards: Path) -> None:
    """`--branch-from OTHER/last.ckpt` at step 300 with max_steps 300: the submit passed, the job's first start
    refused it after the queue wait."""
    import torch

    from pipeline.module import ImageClassifier

    trained = ImageClassifier(arch="cifar_resnet20", num_classes=10)
    other = tmp_path / "other" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(trained.hparams), "state_dict": trained.state_dict(), "global_step": 300},
               other)
    job = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards), "--trainer.max_steps",
                                                      "300"], cpu=True)
    assert check_trainer_settings(job) == []  # no branch: nothing to resume, a new run
    with pytest.raises(LaunchError, match=rf"trainer.max_steps 300: {other} is at step 300 already, so a branch "
                                          rf"from it into {tmp_path / 'run'} would train nothing"):
        check_trainer_settings(job, origin=str(other))
    longer = _job(tmp_path, REPO / "conf" / "demo.yaml", ["--data.root", str(digits_shards), "--trainer.max_steps",
                                                         "400"], cpu=True)
    assert check_trainer_settings(longer, origin=str(other)) == []
