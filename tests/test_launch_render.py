"""The launcher without a cluster: rendered sbatch scripts, quoting, errors, torchrun, status from a run dir."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import template
from launch.errors import LaunchError
from launch.scripts import SlurmOptions, TrainJob
from pipeline.run_layout import FAILURES_FILE, LAST_CHECKPOINT, SLURM_LOG_GLOB, TRAIN_SCRIPT, last_checkpoint, slurm_log

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str, cwd: Path, env: dict[str, str] | None = None,
           config_check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m launch ARGS``. ``submit train`` and ``torchrun`` without their trainer config check (a
    Lightning import, about 6 s) unless ``config_check``: these tests are about the script or command; the
    check's own tests turn it on."""
    if args[:2] == ("submit", "train") and not config_check:
        args = (*args[:2], "--no-config-check", *args[2:])
    if args[:1] == ("torchrun",) and not config_check:
        args = (args[0], "--no-config-check", *args[1:])
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=60)


@pytest.fixture()
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "conf" / "resnet50.yaml"
    p.parent.mkdir()
    p.write_text("trainer:\n  max_epochs: 90\n")
    return p


def sbatch_directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_argv(script: str) -> list[str]:
    """The srun command (up to the next blank line), continuation lines joined, split the way bash would,
    without the train script's `|| status=$?` (which keeps the exit status for the retry decision)."""
    assert script.count("\nsrun ") == 1
    command = script[script.index("\nsrun ") + 1:].split("\n\n")[0]
    argv = shlex.split(command.replace("\\\n", " "))
    return argv[:-2] if argv[-2:] == ["||", "status=$?"] else argv


def test_submit_into_a_reader_that_stopped_reading_goes_on(tmp_path: Path, cfg: Path) -> None:
    """`launch submit ... | head -1`: the first line met a closed pipe, and submit stopped there with `launch:
    error: file system: Broken pipe`, exit 2 (after sbatch had queued the jobs, or before, by where the pipe
    closed). The rest of the output is dropped, the command goes on to its end, exit 0."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "launch", "submit", "train", "--no-config-check", "--config",
                               str(cfg), "--nodes", "1", "--time", "1:00:00", "--run-dir", str(tmp_path / "r"),
                               "--dry-run"], stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert f"sbatch --parsable {tmp_path / 'r'}/train.sbatch" in proc.stderr, proc.stderr  # said after the script


def test_dry_run_4x8_gpu_job_has_what_srun_needs(tmp_path: Path, cfg: Path) -> None:
    run_dir = tmp_path / "runs" / "r50"
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "4", "--gpus-per-node", "8",
               "--time", "04:00:00", "--partition", "gpu", "--account", "proj1", "--qos", "high",
               "--cpus-per-task", "12", "--signal-lead", "240", "--run-dir", str(run_dir), "--dry-run",
               "--", "--trainer.max_epochs", "90", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_directives(script) == [
        "--job-name=train-resnet50",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--time=04:00:00",
        "--signal=USR1@240",
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir}/slurm-%j.out",
        "--export=ALL",
        "--partition=gpu",
        "--account=proj1",
        "--qos=high",
    ]
    # no #SBATCH after the first command (sbatch stops reading there)
    first_cmd = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in script.splitlines()[first_cmd:])
    argv = srun_argv(script)
    assert argv == [
        "srun", "--kill-on-bad-exit=1", sys.executable, "-m", "pipeline", "fit", "--config", str(cfg),
        "--trainer.max_epochs", "90",
        "--trainer.default_root_dir", "$RUN_DIR", "--trainer.num_nodes", "4", "--trainer.devices", "8",
        "--ckpt_path", "last",
    ]
    for line in ("export WANDB_RESUME=allow", 'export WANDB_DIR="$RUN_DIR"', "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"', f"RUN_DIR={run_dir}", f"cd {tmp_path}"):
        assert line in script.splitlines(), line
    # a new run directory has no id yet: the script exports none (it exported a placeholder W&B refused at
    # every start), and the first start makes RUN/wandb_run_id; so the printed script can be submitted as is
    assert not re.search(r"WANDB_RUN_ID=", script) and "\nunset WANDB_RUN_ID\n" in script, script
    assert "its first start makes RUN/wandb_run_id, every start reads it" in script
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "wandb_run_id").write_text("0llx4e10\n")
    again = launch("submit", "train", "--config", str(cfg), "--nodes", "1", "--time", "1:00:00", "--run-dir",
                   str(tmp_path / "existing"),
                   "--dry-run", cwd=tmp_path)
    assert "export WANDB_RUN_ID=0llx4e10\n" in again.stdout and "first start makes" not in again.stdout
    assert "unset WANDB_RUN_ID" not in again.stdout
    assert re.search(r"^export MASTER_ADDR=", script, re.M) and re.search(r"^export MASTER_PORT=", script, re.M)
    assert not run_dir.exists(), "--dry-run must not create the run directory"
    assert f"sbatch --parsable {run_dir}/train.sbatch" in r.stderr
    # the whole script is valid bash
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_cpu_job_drops_gpu_lines_and_sets_accelerator(tmp_path: Path, cfg: Path) -> None:
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--time", "0:10:00",
               "--signal-lead", "30", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = sbatch_directives(r.stdout)
    assert "--nodes=2" in d and "--ntasks-per-node=1" in d
    assert not any(x.startswith(("--gpus", "--gres", "--gpu")) for x in d)
    argv = srun_argv(r.stdout)
    assert argv[argv.index("--trainer.devices") + 1] == "1"
    assert argv[argv.index("--trainer.accelerator") + 1] == "cpu"
    assert f"--output={tmp_path}/runs/resnet50/slurm-%j.out" in d  # default run dir: runs/<config name>


def test_container_image_renders_pyxis_flags(tmp_path: Path, cfg: Path) -> None:
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00",
               "--container-image", "nvcr.io#nvidia/pytorch:25.10-py3", "--container-mounts", "/datasets:/data:ro",
               "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = srun_argv(r.stdout)
    assert "--container-image=nvcr.io#nvidia/pytorch:25.10-py3" in argv
    mounts = next(a for a in argv if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert mounts == [str(tmp_path / "run"), str(tmp_path), str(cfg.parent), "/datasets:/data:ro"]
    assert f"--container-workdir={tmp_path}" in argv
    assert argv[argv.index("-m") - 1] == "python"  # the container's interpreter, not this machine's
    # pyxis splits the mounts at commas and each at colons, and a space breaks them: such a run directory (or
    # OUT, SRC, working directory) failed only after the queue wait
    for bad, char in (("lr=0.1,bs=256", ","), ("a:b", ":")):
        r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--container-image", "img",
                   "--run-dir", str(tmp_path / bad), "--dry-run", cwd=tmp_path)
        assert r.returncode == 2 and f"pyxis cannot mount a path with {char!r}" in r.stderr, r.stderr
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--container-image", "img",
               "--container-mounts", "/a b:/c", "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "--container-mounts '/a b:/c': pyxis cannot mount a path with ' '" in r.stderr, r.stderr
    src = tmp_path / "my images"
    src.mkdir()
    r = launch("submit", "prep", "imagenet", str(src), str(tmp_path / "out"), "--tasks", "2", "--container-image",
               "img", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and f"{str(src)!r} must be mounted in the container" in r.stderr, r.stderr
    r = launch("submit", "prep", "imagenet", str(src), str(tmp_path / "out"), "--tasks", "2", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # without a container a space is only quoted


HOSTILE = ["a;touch CANARY", "$(touch CANARY)", "`touch CANARY`", "x\ntouch CANARY", "'; touch CANARY; '"]


def test_hostile_values_are_quoted_in_the_srun_line(tmp_path: Path) -> None:
    weird = tmp_path / "conf;$(touch CANARY)`touch CANARY`"
    weird.mkdir()
    cfg = weird / "x'y\ntouch CANARY.yaml"
    cfg.write_text("trainer: {}\n")
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00",
               "--run-dir", str(tmp_path / "run"), "--dry-run", "--", *HOSTILE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = srun_argv(r.stdout)
    at = argv.index("--config") + 1
    assert argv[at] == str(cfg)
    assert argv[at + 1:at + 1 + len(HOSTILE)] == HOSTILE


@pytest.mark.parametrize("args, setting", [
    (["--config", "missing.yaml"], "--config: file 'missing.yaml' does not exist"),
    (["--config", "conf"], "--config: 'conf' is a directory, not a file"),
    (["--config", ""], "argument --config: empty path"),
    (["--run-dir", ""], "argument --run-dir: empty path (an unset shell variable?)"),  # was the current directory
    (["--time", "4h"], "--time: '4h' is not a time limit; use one of Slurm's forms"),
    (["--time", " 90"], "--time: ' 90' is not a time limit"),  # rendered `#SBATCH --time= 90`
    (["--time", "90\n"], "--time: '90\\n' is not a time limit"),  # a newline ended the #SBATCH line
    (["--time", "-1"], "--time: '-1' means no time limit to Slurm"),
    (["--time", "0"], "--time: '0' means no time limit to Slurm; give a finite one"),
    (["--time", "UNLIMITED"], "--time: 'UNLIMITED' means no time limit to Slurm"),
    (["--time", "5"], "--signal-lead: 300 s + Slurm's 30 s check interval is not shorter than --time 5"),
    (["--time", "00:00:30"], "--time: '00:00:30' is shorter than one minute"),
    (["--time", "\u0661:00:00"], "--time: '\u0661:00:00' is not a time limit"),  # an Arabic-Indic 1 matched \\d
    (["--nodes", "0"], "--nodes: must be at least 1, got 0"),
    (["--gpus-per-node", "-1"], "--gpus-per-node: must be at least 0"),
    (["--partition", "gpu\n#SBATCH --x"], "--partition:"),
    (["--account", "a b"], "--account:"),
    (["--run-dir", "runs/my run"], "--run-dir:"),
    (["--run-dir", "runs/x;y"], "--run-dir:"),
    (["--run-dir", "conf/resnet50.yaml"], "resnet50.yaml' is a file, not a directory"),
    (["--run-dir", "conf/resnet50.yaml/run"], "/run' cannot be made: "),
    (["--signal-lead", "3600"], "--signal-lead: 3600 s + Slurm's 30 s check interval is not shorter than --time"),
    (["--time", "00:05:20"], "--signal-lead: 300 s + Slurm's 30 s check interval is not shorter than --time 00:05:20"),
    (["--time", "30-00:00:00", "--signal-lead", "70000"], "--signal-lead: 70000 s is more than Slurm's --signal"),
])
def test_bad_settings_exit_2_naming_the_setting(tmp_path: Path, cfg: Path, args: list[str], setting: str) -> None:
    base = {"--config": str(cfg), "--nodes": "1", "--gpus-per-node": "1", "--time": "01:00:00"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    r = launch("submit", "train", *flat, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert setting in r.stderr
    assert "Traceback" not in r.stderr


def test_secret_is_never_rendered(tmp_path: Path, cfg: Path) -> None:
    secret = "wandb-secret-0123456789abcdef"
    r = launch("submit", "train", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00",
               "--dry-run", cwd=tmp_path, env={"WANDB_API_KEY": secret})
    assert r.returncode == 0
    assert secret not in r.stdout + r.stderr
    assert "WANDB_API_KEY=" not in r.stdout
    assert "--export=ALL" in sbatch_directives(r.stdout)  # how the job gets the key instead


def test_prep_dry_run_array_and_finalize(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "shards"
    r = launch("submit", "prep", "imagefolder", str(src), str(out), "--split", "train", "--tasks", "3",
               "--cpus-per-task", "4", "--dry-run", "--", "--samples-per-shard", "100", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    array, finalize = r.stdout.split("# ---- prep-finalize-imagefolder-train.sbatch\n")
    d = sbatch_directives(array)
    assert "--array=0-2" in d and "--ntasks=1" in d and "--cpus-per-task=4" in d
    assert f"--output={tmp_path}/shards-slurm/prep-%A_%a.out" in d
    argv = srun_argv(array)
    assert argv == ["srun", sys.executable, "-m", "data_prep", "imagefolder", str(src), str(out), "--split", "train",
                    "--samples-per-shard", "100", "--task-index", "$SLURM_ARRAY_TASK_ID", "--num-tasks", "3",
                    "--no-progress", "--finalize-queued", "--workers", "4"]
    assert srun_argv(finalize) == ["srun", sys.executable, "-m", "data_prep", "finalize", str(out), "--splits", "train"]
    assert not any(x.startswith("--array") for x in sbatch_directives(finalize))
    assert "--dependency=afterok:ARRAY_JOB_ID --kill-on-invalid-dep=yes" in r.stderr
    r = launch("submit", "prep", "imagenet", str(tmp_path / "nope"), str(out), "--tasks", "2", "--dry-run",
               cwd=tmp_path)
    assert r.returncode == 2 and "SRC:" in r.stderr and "nope" in r.stderr
    r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--time", "0", "--dry-run",
               cwd=tmp_path)  # a prep job has no checkpoint to time a signal for: its own reason
    assert r.returncode == 2 and "--time: '0' means no time limit" in r.stderr and "checkpoint" not in r.stderr \
        and "would hold its node for good" in r.stderr, r.stderr
    # imagenet: the user's --splits is what finalize merges; the user's --workers wins over --cpus-per-task's
    r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--cpus-per-task", "8", "--dry-run",
               "--", "--splits", "val", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    array, finalize = r.stdout.split("# ---- prep-finalize-imagenet.sbatch\n")
    assert srun_argv(array)[-8:] == ["--workers", "2", "--task-index", "$SLURM_ARRAY_TASK_ID", "--num-tasks", "2",
                                     "--no-progress", "--finalize-queued"]
    assert srun_argv(finalize)[-2:] == ["--splits", "val"]
    r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--dry-run", cwd=tmp_path)
    assert srun_argv(r.stdout.split("# ---- prep-finalize-imagenet.sbatch\n")[1])[-2:] == ["--splits", "train,val"]
    for owned in (["--task-index", "0"], ["--num-tasks=4"]):  # they came after the launcher's and won
        r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--dry-run", "--", *owned,
                   cwd=tmp_path)
        assert r.returncode == 2 and f"arguments after --: {owned[0].split('=')[0]} is set by the launcher" in r.stderr
    # a prefix of an option was that option to data_prep (argparse's abbreviations): past the check above, and
    # `--worker 1` lost to the launcher's --workers without a word
    for prefix in (["--task-ind", "0"], ["--worker", "1"]):
        r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--dry-run", "--", *prefix,
                   cwd=tmp_path)
        assert r.returncode == 2 and r.stderr == ("launch: error: data_prep would refuse this in every array task: "
                                                  f"unrecognized arguments: {' '.join(prefix)}\n"), r.stderr


def test_a_splits_finalize_job_leaves_a_split_still_being_prepared(tmp_path: Path) -> None:
    """Train and val prepared into one OUT by two submissions, as docs/slurm.md shows: the finalize job of
    val ran `data_prep finalize OUT`, which merges every split with a plan, and failed on train's shards
    that another array job was still writing."""
    from pipeline.demo_data import write_digits

    write_digits(tmp_path / "images")
    out = tmp_path / "shards"
    scripts = {}
    for split in ("train", "val"):
        r = launch("submit", "prep", "imagefolder", str(tmp_path / "images" / split), str(out), "--split", split,
                   "--tasks", "2", "--dry-run", "--", "--samples-per-shard", "200", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        scripts[split] = r.stdout.split(f"# ---- prep-finalize-imagefolder-{split}.sbatch\n")
    tasks = {"train": [0], "val": [0, 1]}  # train's task 1 still runs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for split, ids in tasks.items():
        for i in ids:
            argv = [a.replace("$SLURM_ARRAY_TASK_ID", str(i)) for a in srun_argv(scripts[split][0])[1:]]
            subprocess.run(argv, check=True, capture_output=True, env=env, cwd=tmp_path, timeout=300)
    done = subprocess.run(srun_argv(scripts["val"][1])[1:], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = (out / "manifest.json").read_text()
    assert '"val"' in manifest and '"train"' not in manifest


def test_torchrun_prints_a_command_per_node(tmp_path: Path, cfg: Path) -> None:
    r = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
               "--rdzv-endpoint", "node0:29400", "--run-dir", str(tmp_path / "run"), "--", "--trainer.max_steps", "5",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    env = dict(a.split("=", 1) for a in argv[:6])
    assert env["WANDB_RESUME"] == "allow" and env["WANDB_DIR"] == str(tmp_path / "run")
    assert env["WANDB_RUN_ID"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts need a fresh store
    # where a rank's one-line error: stops every node's agent (pipeline/torchrun_stop.py)
    assert env["RESNET_PIPELINE_TORCHRUN_ERROR_FILE"] == str(tmp_path / "run" / "torchrun-error")
    assert env["OMP_NUM_THREADS"] == "${OMP_NUM_THREADS:-$(( $(nproc) < 4 ? 1 : $(nproc) / 4 ))}"  # each node's
    rest = argv[6:]
    assert Path(rest[0]).name == "torchrun"
    assert rest[1:8] == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
                         f"--rdzv-id={env['WANDB_RUN_ID']}", "--max-restarts=3", "--shutdown-timeout=120"]
    assert rest[8:] == ["-m", "pipeline", "fit", "--config", str(cfg), "--trainer.max_steps", "5",
                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.num_nodes", "2",
                        "--trainer.devices", "4", "--ckpt_path", "last"]
    bad = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
                 "--rdzv-endpoint", "node0", cwd=tmp_path)
    assert bad.returncode == 2 and "--rdzv-endpoint: 'node0' is not HOST:PORT" in bad.stderr
    bad = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
                 "--rdzv-endpoint", "node0:29400", "--max-restarts", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--max-restarts: -1 is negative" in bad.stderr
    bad = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
                 "--rdzv-endpoint", "node0:29400", "--rdzv-id", "", cwd=tmp_path)  # was a fixed "pending"
    assert bad.returncode == 2 and "--rdzv-id: empty" in bad.stderr, bad.stdout
    # another run's checkpoint: --branch-from, as for submit train (the refusal named no way to start from one)
    bad = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
                 "--rdzv-endpoint", "node0:29400", "--", "--ckpt_path", "/x/other.ckpt", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.rstrip().endswith("; to start from another run's checkpoint use "
                                                                "--branch-from)"), bad.stderr


def test_torchrun_sets_each_ranks_threads_unless_the_user_did(tmp_path: Path, cfg: Path, monkeypatch) -> None:
    """Without OMP_NUM_THREADS torchrun set 1 for every rank and printed its "Setting OMP_NUM_THREADS
    environment variable for each process to be 1 in default" block at every start. The printed line works
    the count out on the node that runs it; `--run` here, from the cores this process may use."""
    from launch import cli

    r = launch("torchrun", "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "4",
               "--rdzv-endpoint", "node0:29400", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    prefix = re.match(r'OMP_NUM_THREADS="[^"]*" ', r.stdout)
    assert prefix, r.stdout
    prefix = prefix.group(0)
    cores = len(os.sched_getaffinity(0))
    for given, threads in ((None, max(1, cores // 4)), ("3", 3)):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if given is not None:
            env["OMP_NUM_THREADS"] = given
        said = subprocess.run(["bash", "-c", f"{prefix}sh -c 'echo $OMP_NUM_THREADS'"], capture_output=True,
                              text=True, env=env, check=True).stdout
        assert said == f"{threads}\n", (given, said)

    assert cli.threads_per_rank(1) == cores and cli.threads_per_rank(cores + 1) == 1

    class Started(Exception):
        pass

    def run_here(argv: list[str], env: dict[str, str]) -> int:
        raise Started({**os.environ, **env})  # run_here adds env to this process's environment

    monkeypatch.setattr(cli.torchrun, "run_here", run_here)
    args = ["torchrun", "--no-config-check", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "2",
            "--rdzv-endpoint", "127.0.0.1:29400", "--run-dir", str(tmp_path / "run"), "--run"]
    for given, threads in ((None, str(max(1, cores // 2))), ("5", "5")):
        if given is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", given)
        with pytest.raises(Started) as started:
            cli.main(args)
        assert started.value.args[0]["OMP_NUM_THREADS"] == threads, given


def test_template_placeholders_must_match_values() -> None:
    assert template.render("a {{x}} {{q:y}}\n{{#z}}dropped {{z}}\nkept\n", {"x": 1, "y": "a b", "z": None}) == \
        "a 1 'a b'\nkept\n"
    with pytest.raises(LaunchError, match="no value for placeholder"):
        template.render("{{x}}", {})
    with pytest.raises(LaunchError, match="never used: y"):
        template.render("{{x}}", {"x": 1, "y": 2})
    # bash's own ${...} passes through untouched
    assert template.render("echo ${A:-{{x}}}\n", {"x": 0}) == "echo ${A:-0}\n"


def _exports_before_srun(script: str, env: dict[str, str]) -> dict[str, str]:
    """Run a script's set-up (up to its start line; without the Slurm queries) and return the exports."""
    lines = script.splitlines()
    setup = [line for line in lines[:next(i for i, x in enumerate(lines) if x.startswith('echo "launch:'))]
             if not line.startswith(("first_node=", 'if [ -z "$first_node" ]', "MASTER_ADDR=", "export MASTER", "cd "))]
    out = subprocess.run(["bash", "-c", "\n".join(setup) + "\nenv -0"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", **env}, check=True)
    return dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)


def test_srun_gets_the_jobs_cpus_per_task(tmp_path: Path, cfg: Path) -> None:
    """Slurm >= 22.05 no longer passes the job's --cpus-per-task on to srun: without SRUN_CPUS_PER_TASK each
    rank (or data_prep task) would be bound to one CPU, starving its loader workers."""
    train = launch("submit", "train", "--config", str(cfg), "--gpus-per-node", "8", "--cpus-per-task", "12",
                   "--time", "1:00:00", "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    prep = launch("submit", "prep", "imagenet", str(src), str(tmp_path / "out"), "--tasks", "2",
                  "--cpus-per-task", "4", "--dry-run", cwd=tmp_path)
    assert train.returncode == 0 and prep.returncode == 0, train.stderr + prep.stderr
    array = prep.stdout.split("# ---- prep-finalize-imagenet.sbatch\n")[0]
    for script, cpus in ((train.stdout, "12"), (array, "4")):
        assert _exports_before_srun(script, {"SLURM_CPUS_PER_TASK": cpus})["SRUN_CPUS_PER_TASK"] == cpus
        assert "SRUN_CPUS_PER_TASK" not in _exports_before_srun(script, {})  # no --cpus-per-task: srun's default


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_a_job_name_lightning_takes_for_an_interactive_session_is_refused(tmp_path: Path, cfg: Path,
                                                                          name: str) -> None:
    """Lightning's SLURMEnvironment stands aside for a job named bash or interactive: every rank of such a job
    trained alone, each on all the data."""
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--job-name", name,
               "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"launch: error: --job-name {name}: Lightning takes a Slurm job named '{name}' for an interactive" \
        in r.stderr, r.stderr
    ok = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--job-name", f"{name}-1",
                "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert ok.returncode == 0 and f"#SBATCH --job-name={name}-1\n" in ok.stdout, ok.stderr


def test_a_bad_default_run_dir_says_it_is_the_default(tmp_path: Path) -> None:
    """The user never typed the path: the error says where it came from and which option picks another."""
    cfg = tmp_path / "my conf" / "r 50.yaml"
    cfg.parent.mkdir()
    cfg.write_text("trainer: {}\n")
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(
        "launch: error: run directory (default runs/<config name>; choose one with --run-dir): "), r.stderr
    r = launch("submit", "prep", "imagenet", str(cfg.parent), str(tmp_path / "out dir"), "--tasks", "2",
               "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "run directory (default OUT-slurm next to OUT; choose one with --run-dir)" \
        in r.stderr, r.stderr


def test_train_submit_refuses_when_slurm_cannot_say_whether_the_run_dir_is_busy(tmp_path: Path, cfg: Path) -> None:
    """A run directory with a recorded train job and no way to ask Slurm about it: `submit train` refuses
    (one line, the reason, nothing written) rather than risk a second job on the same checkpoints. --dry-run
    asks nothing, and jobs of other kinds do not count (here sbatch is then what is missing)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "jobs.jsonl").write_text('{"job_id": "41", "kind": "prep-array", "script": "x"}\n'
                                    '{"job_id": "42", "kind": "train", "script": "x"}\n')
    no_slurm = {"PATH": str(tmp_path / "no-slurm-here")}
    args = ["submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir", str(run)]
    r = launch(*args, cwd=tmp_path, env=no_slurm)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"launch: error: run directory {run}: cannot tell whether its earlier train jobs "
                               "have ended: squeue: command not found"), r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["jobs.jsonl"]
    assert launch(*args, "--dry-run", cwd=tmp_path, env=no_slurm).returncode == 0
    (run / "jobs.jsonl").write_text('{"job_id": "41", "kind": "prep-array", "script": "x"}\n')
    r = launch(*args, cwd=tmp_path, env=no_slurm)
    assert r.returncode == 2 and "sbatch: command not found" in r.stderr, r.stderr


FAKE_SRUN = """#!/bin/bash
# srun as the batch script sees it: the trainer's output, then its exit status (from the test's plan)
n=$(cat "$PLAN.n" 2>/dev/null || echo 0); echo $((n + 1)) > "$PLAN.n"
line=$(sed -n "$((n + 1))p" "$PLAN")
rc=${line%% *}; say=${line#* }
[ "$say" != "$line" ] && echo "$say"
if [ "${line#*usr1-to-batch}" != "$line" ]; then  # scancel --signal=USR1 --batch: the batch shell alone
  kill -USR1 "$PPID"; sleep 0.2
fi
if [ "${line#*move-run-dir}" != "$line" ]; then  # the run directory renamed while the job ran
  mv "$RUN" "$RUN-moved"
fi
if [ "${line#*new-checkpoint}" != "$line" ]; then  # a new file replaces last.ckpt, as the trainer's saves do
  mkdir -p "$RUN/checkpoints" && : > "$RUN/checkpoints/new" && mv "$RUN/checkpoints/new" "$RUN/checkpoints/last.ckpt"
fi
exit "$rc"
"""
FAKE_SCONTROL = """#!/bin/bash
# a controller away: the first N calls of SUBCOMMAND fail where $RUN/scontrol-fails has a line "SUBCOMMAND N"
fails=$(sed -n "s/^$1 //p" "$RUN/scontrol-fails" 2>/dev/null)
if [ -n "$fails" ] && [ "$fails" -gt 0 ]; then
  sed -i "s/^$1 .*/$1 $((fails - 1))/" "$RUN/scontrol-fails"
  echo "scontrol: error: Unable to contact slurm controller (connect failure)" >&2
  exit 1
fi
case "$1" in
  show) if [ "$2" = hostnames ]; then echo n1; seq -f 'n%g' 2 "${NODES:-1}"; else echo "NodeName=n1 NodeAddr=10.0.0.1"; fi ;;
  requeue) echo "$2" >> "$RUN/requeues" ;;
esac
"""


def _attempts(tmp_path: Path, cfg: Path, plan: list[str], max_failures: int = 2,
              env_extra: dict[str, str] | None = None) -> list[tuple[int, bool]]:
    """Run the rendered train script once per entry of ``plan`` ("RC [trainer output]") with a fake srun and
    scontrol, as Slurm would run a job and its requeues; (exit status, requeued?) per attempt."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    job = TrainJob(config=cfg, nodes=1, gpus_per_node=0, run_dir=run, slurm=SlurmOptions(time="01:00:00"),
                   python=sys.executable, workdir=tmp_path, max_failures=max_failures)
    script = tmp_path / "train.sbatch"
    script.write_text(job.render("abc123"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tmp_path / "plan").write_text("\n".join(plan) + "\n")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PLAN": str(tmp_path / "plan"),
           "RUN": str(run), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1", **(env_extra or {})}
    out = []
    for attempt in range(len(plan)):
        requeues = (run / "requeues").read_text().count("\n") if (run / "requeues").exists() else 0
        with open(slurm_log(run, "4242"), "a") as log:  # Slurm appends the job's output there (--output)
            rc = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": str(attempt)},
                                stdout=log, stderr=subprocess.STDOUT, timeout=60).returncode
        now = (run / "requeues").read_text().count("\n") if (run / "requeues").exists() else 0
        out.append((rc, now > requeues))
    return out


def test_train_script_requeues_crashes_until_they_stop_making_progress(tmp_path: Path, cfg: Path) -> None:
    # crash, crash (no checkpoint in between: 2 of 2), crash after a new checkpoint (count starts over),
    # crash, crash: the 3rd in a row without a new checkpoint is not requeued
    plan = ["137", "137", "1 new-checkpoint", "134", "137"]
    assert _attempts(tmp_path, cfg, plan) == [(0, True), (0, True), (0, True), (0, True), (137, False)]
    log = (tmp_path / "run" / "slurm-4242.out").read_text()
    assert "failure 2 of at most 2 without a new checkpoint; requeueing job 4242" in log
    assert "srun failed (exit 137), 3 times in a row without a new checkpoint; not requeueing job 4242" in log


def test_train_script_whose_run_directory_was_moved_ends_without_a_requeue(tmp_path: Path, cfg: Path) -> None:
    """The trainer stops with its one line (exit 2) when RUN is moved mid-run; the script then read its log and
    wrote its failure record under the old path: a bash error and exit 1, not the trainer's status."""
    said = "error: trainer.default_root_dir: run directory RUN was moved to RUN-moved while this job ran."
    assert _attempts(tmp_path, cfg, [f"2 {said} move-run-dir"]) == [(2, False)]
    log = (tmp_path / "run-moved" / "slurm-4242.out").read_text()
    assert f"launch: {tmp_path / 'run'} is gone (moved or deleted while job 4242 ran; the trainer's error above says " \
        "where it went); not requeueing job 4242" in log, log
    assert "No such file" not in log and not (tmp_path / "run").exists(), log


def test_train_script_with_no_retries_says_so(tmp_path: Path, cfg: Path) -> None:
    """`--max-failures 0` ended the first crash with "1 times in a row without a new checkpoint"."""
    assert _attempts(tmp_path, cfg, ["137"], max_failures=0) == [(137, False)]
    log = (tmp_path / "run" / "slurm-4242.out").read_text()
    assert "srun failed (exit 137); not requeueing job 4242 (--max-failures 0: no retries; resubmit " in log, log
    assert "times in a row" not in log, log


def test_train_script_rides_out_a_controller_away_for_some_seconds(tmp_path: Path, cfg: Path) -> None:
    """Under `set -e`, one failed scontrol ended the job FAILED, not requeued: the rendezvous lookup at the start
    (a controller busy or failing over; or the node list of a big job, whose scontrol `head -n 1` killed with
    SIGPIPE), the requeue after a crash (counted as a failure, then lost) and the requeue the trainer could not
    make before the time limit. Each is asked again; one that never answers ends with what to do."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "scontrol-fails").write_text("show 3\nrequeue 2\n")
    quick = {"LAUNCH_SCONTROL_RETRY_S": "0", "NODES": "40000"}  # a node list well past a pipe's 64 KiB
    assert _attempts(tmp_path, cfg, ["137", "0 requeue of Slurm job 4242 failed: connect failure"],
                     env_extra=quick) == [(0, True), (0, True)]
    log = slurm_log(run, "4242").read_text()
    assert "launch: scontrol show failed (try 3 of 5); asking again in 0 s" in log, log
    assert " master 10.0.0.1:" in log, log  # the address the lookup gave, after the retries
    assert ("launch: scontrol requeue 4242 failed (try 2 of 5): scontrol: error: Unable to contact slurm controller "
            "(connect failure)") in log, log
    assert "requeueing it from the batch script" in log
    (run / "scontrol-fails").write_text("requeue 10\n")
    (run / "requeues").unlink()
    (tmp_path / "plan.n").unlink()
    shutil.rmtree(tmp_path / "bin")
    assert _attempts(tmp_path, cfg, ["137", "0 requeue of Slurm job 4242 failed: connect failure"],
                     env_extra=quick) == [(137, False), (1, False)]
    log = slurm_log(run, "4242").read_text()
    assert (f"launch: could not requeue job 4242 (scontrol failed 5 times); resubmit {run / TRAIN_SCRIPT} to resume "
            "from its last checkpoint") in log, log
    assert (f"launch: could not requeue job 4242 (scontrol failed 5 times); its last checkpoint is saved: resubmit "
            f"{run / TRAIN_SCRIPT} to resume from it") in log, log


def test_train_script_passes_over_a_rendezvous_port_another_job_listens_on(tmp_path: Path, cfg: Path) -> None:
    """The port is 10000 + job id % 20000: jobs 20,000 ids apart whose first node is the same shared node both
    took it, and the later job's rendezvous failed at every start (the same port at each requeue)."""
    import socket

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 10000 + 4242 % 20000))
    except OSError:
        pytest.skip("port 14242 is in use here already")
    taken.listen()
    try:
        assert _attempts(tmp_path, cfg, ["0"]) == [(0, False)]
    finally:
        taken.close()
    log = slurm_log(tmp_path / "run", "4242").read_text()
    assert "launch: port 14242 is taken on " in log and " master 10.0.0.1:15239 " in log, log


def test_train_script_finds_its_attempt_after_an_unfinished_last_line(tmp_path: Path, cfg: Path) -> None:
    """An attempt killed mid-line left the log without a final newline: the next attempt's start line was
    appended to it, and what that attempt said (a trainer's `error:`) was not found, so it was requeued."""
    run = tmp_path / "run"
    run.mkdir()
    slurm_log(run, "4242").write_text("epoch 3:  41%|####     | 41/100 [00:12<00:17")
    assert _attempts(tmp_path, cfg, ["2 error: model.lr: expected a float"]) == [(2, False)]


def test_train_script_never_requeues_a_trainer_error_or_a_success(tmp_path: Path, cfg: Path) -> None:
    plan = ["2 error: model.lr: expected a float", "0"]
    assert _attempts(tmp_path, cfg, plan) == [(2, False), (0, False)]
    assert "not requeueing job 4242" in (tmp_path / "run" / "slurm-4242.out").read_text()


def test_train_script_survives_a_usr1_sent_to_the_batch_shell(tmp_path: Path, cfg: Path) -> None:
    """``scancel --signal=USR1 --batch`` (or ``--full``) signals the batch shell too: USR1's default killed it
    mid-srun, the job ended FAILED without a requeue and Slurm killed the trainer during its preemption save.
    The trainer's own requeue (here its exit 0 after a save) is left to work."""
    assert _attempts(tmp_path, cfg, ["0 usr1-to-batch"]) == [(0, False)]


def test_train_script_starts_over_on_a_failures_file_it_did_not_write(tmp_path: Path, cfg: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / FAILURES_FILE).write_text("4242 1.5 none\n")  # bash arithmetic would fail on it
    assert _attempts(tmp_path, cfg, ["137"], max_failures=1) == [(0, True)]
    assert "failure 1 of at most 1" in (tmp_path / "run" / "slurm-4242.out").read_text()


def test_train_script_takes_the_run_directory_s_names_from_run_layout(tmp_path: Path, cfg: Path) -> None:
    """The template spelled checkpoints/last.ckpt, slurm-$SLURM_JOB_ID.out, launch-failures and train.sbatch in
    shell, so a name changed in pipeline/run_layout.py would leave jobs resuming from, reading and counting in
    the old one. Now it names none of them; launch writes run_layout's into the rendered script (a shell script
    of its own, to resubmit as is), which uses them: it resumes from last.ckpt, finds the failed task in the job
    log and counts the failure in the failures file."""
    source = template.load("train.sbatch")
    job_log_prefix = SLURM_LOG_GLOB.split("*")[0]
    for name in (LAST_CHECKPOINT, FAILURES_FILE, TRAIN_SCRIPT, job_log_prefix):
        assert name not in source, name
    run = tmp_path / "run"
    job = TrainJob(config=cfg, nodes=1, gpus_per_node=0, run_dir=run, slurm=SlurmOptions(time="01:00:00"),
                   python=sys.executable, workdir=tmp_path, max_failures=1)
    script = job.render("abc123")
    assert "{{" not in script and "}}" not in script
    assert f'\nLAST_CKPT="$RUN_DIR"/{last_checkpoint(".")}\n' in script
    assert f'\nJOB_LOG="$RUN_DIR"/{job_log_prefix}"$SLURM_JOB_ID".out  # ' in script
    assert f'\nFAILURES="$RUN_DIR"/{FAILURES_FILE}  # ' in script
    assert f"--output={slurm_log(run, '%j')}\n" in script and job.script_path == run / TRAIN_SCRIPT

    last_checkpoint(run).parent.mkdir(parents=True)
    last_checkpoint(run).write_bytes(b"")
    failed = "srun: error: n1: task 0: Exited with exit code 137"
    assert _attempts(tmp_path, cfg, [f"137 {failed}", "137"], max_failures=1) == [(0, True), (137, False)]
    log = slurm_log(run, "4242").read_text()
    assert f"ckpt {last_checkpoint(run)} at " in log
    assert "(first failure: n1: task 0: Exited with exit code 137)" in log
    assert f"(resubmit {run / TRAIN_SCRIPT} once the cause is fixed)" in log
    assert (run / FAILURES_FILE).read_text().split()[:2] == ["4242", "2"]


def test_prep_scripts_run_hostile_paths_as_literal_text(tmp_path: Path) -> None:
    """OUT reaches the finalize job's log line too: a `$(...)` in it was run there (the quoted value sat inside
    a double-quoted echo), and a `"` broke the script."""
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / 'shards $(touch CANARY) `touch CANARY` "x'
    r = launch("submit", "prep", "imagenet", str(src), str(out), "--tasks", "2", "--run-dir", str(tmp_path / "run"),
               "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    array, finalize = r.stdout.split("# ---- prep-finalize-imagenet.sbatch\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text('#!/bin/bash\nprintf "srun:%s\\n" "$@"\n')
    (bindir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8",
           "SLURM_ARRAY_TASK_ID": "0"}
    for script in (array, finalize):
        ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        assert f"srun:{out}\n" in ran.stdout
    assert f"launch: finalize {out} (job 9)" in ran.stdout
    assert not (tmp_path / "CANARY").exists()


def test_a_run_dir_that_cannot_be_a_directory_is_one_error_line(tmp_path: Path, cfg: Path) -> None:
    """A file where the run directory (or OUT) should be was a traceback on submit (and --dry-run printed a
    script for it); so was a directory that cannot be made. Now one line naming the path, nothing written."""
    no_slurm = {"PATH": str(tmp_path / "no-slurm-here")}
    train = ["submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir"]
    torch = ["torchrun", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint", "h:29400",
             "--run-dir"]
    src = tmp_path / "src"
    src.mkdir()
    prep = ["submit", "prep", "imagenet", str(src)]
    for args in ([*train, str(cfg)], [*train, str(cfg), "--dry-run"], [*train, f"{cfg}/run"], [*torch, str(cfg)],
                 [*prep, str(tmp_path / "out"), "--tasks", "2", "--run-dir", str(cfg)],
                 [*prep, str(cfg), "--tasks", "2", "--run-dir", str(tmp_path / "run"), "--dry-run"]):
        r = launch(*args, cwd=tmp_path, env=no_slurm)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stderr.startswith("launch: error: ") and "is a file, not a directory" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf", "src"]
    if Path("/proc/self").is_dir():  # mkdir fails there even for root: the error the file system gives, one line
        r = launch(*train, "/proc/no-such-run", cwd=tmp_path, env=no_slurm)
        assert r.returncode == 2 and r.stderr == "launch: error: /proc/no-such-run: No such file or directory\n", \
            r.stderr


@pytest.mark.parametrize("arg, why", [
    (["--trainer.devices", "4"], "--trainer.devices is set by the launcher (from --gpus-per-node)"),
    (["--trainer.num_nodes=2"], "--trainer.num_nodes is set by the launcher (from --nodes)"),
    (["--trainer.default_root_dir", "/elsewhere"], "--trainer.default_root_dir is set by the launcher"),
    (["--ckpt_path", "/x/pretrained.ckpt"], "--ckpt_path is set by the launcher (always `last`"),
])
def test_trainer_args_after_dashdash_cannot_override_the_launchers(tmp_path: Path, cfg: Path, arg: list[str],
                                                                   why: str) -> None:
    """They came after the launcher's own in the srun line, so they won: devices or nodes no longer matching
    the tasks Slurm starts, checkpoints outside the run directory (no resume, no status), or one checkpoint
    reloaded at every requeue. Accepted silently before."""
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--dry-run", "--",
               "--trainer.max_epochs", "3", *arg, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"launch: error: arguments after --: {why}"), r.stderr
    r = launch("torchrun", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint",
               "h:29400", "--run-dir", str(tmp_path / "run"), "--", *arg, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"launch: error: arguments after --: {arg[0].split('=')[0]} is "
                                                     "set by the launcher"), r.stderr


def test_a_config_after_dashdash_cannot_override_the_launchers_settings(tmp_path: Path) -> None:
    """`-- --config overrides.yaml` (layered configs) came after the launcher's own arguments, so a file
    setting trainer.devices or trainer.default_root_dir won: checkpoints outside the run directory (no
    resume, no status), devices not matching the tasks Slurm starts. Parsed here by the trainer itself."""
    over = tmp_path / "overrides.yaml"
    over.write_text("trainer:\n  devices: 8\n  default_root_dir: /elsewhere\n  max_epochs: 7\n")
    run_dir = tmp_path / "run"
    r = launch("submit", "train", "--config", str(REPO / "conf" / "demo.yaml"), "--gpus-per-node", "2",
               "--time", "1:00:00", "--run-dir", str(run_dir), "--dry-run", "--", "--config", str(over), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = [a.replace("$RUN_DIR", str(run_dir)) for a in srun_argv(r.stdout)]
    argv = argv[argv.index(sys.executable):]
    parsed = subprocess.run([*argv, "--print_config"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parsed.returncode == 0, parsed.stderr[-3000:]
    trainer = parsed.stdout[parsed.stdout.index("\ntrainer:"):]
    assert f"  default_root_dir: {run_dir}\n" in trainer and "  devices: '2'\n" in trainer, trainer[:2000]
    assert "  max_epochs: 7\n" in trainer  # the rest of the user's file still applies


def test_the_launcher_imports_neither_torch_nor_lightning() -> None:
    """Every `python -m launch` command (`--help`, `--dry-run`, `status`) took about 6 s on a login node
    while `launch.status` imported Lightning through the run lock."""
    code = ("import sys, launch.cli, launch.status, launch.torchrun; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytorch_lightning', 'lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("text, needle", [
    ("model:\n  lr: [0.1, 0.2\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1"),
    ("- trainer\n- model\n", "is not a config (a YAML mapping such as `trainer: ...`), it holds a list"),
    ("model: 5\n", "sets model to 5; a section is a mapping of settings (model.KEY: VALUE)"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_refused_at_submit(tmp_path: Path, text: str, needle: str) -> None:
    """It was submitted, and failed at the job's first line, after the wait for its nodes."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    submit = launch("submit", "train", "--config", str(bad), "--nodes", "1", "--time", "1:00:00", "--dry-run",
                    cwd=tmp_path)
    torchrun = launch("torchrun", "--config", str(bad), "--nnodes", "1", "--nproc-per-node", "1",
                      "--rdzv-endpoint", "127.0.0.1:29500", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    for r in (submit, torchrun):
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.strip() == f"launch: error: --config: '{bad}' {needle}", r.stderr


@pytest.mark.parametrize("value, seconds", [
    ("90", 5400), ("90:30", 5430), ("1:30:00", 5400), ("2-12", 216000), ("2-12:30", 217800),
    ("2-12:30:15", 217815), ("04:00:00", 14400), ("1:60:00", 7200), ("90:75", 5475)])
def test_every_slurm_time_form_is_accepted_and_read_as_sbatch_reads_it(value: str, seconds: int) -> None:
    """sbatch --time: MINUTES, MINUTES:SECONDS, H:M:S, D-H, D-H:M, D-H:M:S (`--time 90` was refused), no
    field bounded (Slurm's time_str2secs reads 1:60:00 as two hours)."""
    from launch.validate import slurm_time, time_seconds

    assert slurm_time(value) == value
    assert time_seconds(value) == seconds


def test_signal_lead_is_checked_against_a_time_in_minutes(tmp_path: Path, cfg: Path) -> None:
    """`--time 6` is 6 minutes: 300 s + 30 s fits; its script carries the user's text."""
    r = launch("submit", "train", "--config", str(cfg), "--time", "6", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--time=6" in sbatch_directives(r.stdout)


@pytest.mark.parametrize("cmd", ["submit", "torchrun"])
def test_a_second_config_before_dashdash_is_refused_naming_the_overlay_form(tmp_path: Path, cfg: Path,
                                                                           cmd: str) -> None:
    """argparse kept the last --config: the overlay became the whole config and named the run directory."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("trainer:\n  max_epochs: 1\n")
    configs = ["--config", str(cfg), "--config", str(overlay)]
    if cmd == "submit":
        r = launch("submit", "train", *configs, "--time", "1:00:00", "--dry-run", cwd=tmp_path)
    else:
        r = launch("torchrun", *configs, "--nnodes", "1", "--nproc-per-node", "1",
                   "--rdzv-endpoint", "127.0.0.1:29500", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith(f"launch: error: --config given twice ({cfg} and {overlay})"), r.stderr
    assert f"-- --config {overlay}" in r.stderr
    ok = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--dry-run", "--",
                "--config", str(overlay), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert srun_argv(ok.stdout).count("--config") == 2


@pytest.mark.parametrize("args, line", [
    (["submit", "train", "--config", "c.yaml", "--nodes", "abc", "--time", "1:00:00"],
     "launch: error: argument --nodes: invalid int value: 'abc' (options: `python -m launch submit train --help`)"),
    (["submit"], "launch: error: the following arguments are required: {train,prep} "
                 "(options: `python -m launch submit --help`)"),
])
def test_argument_errors_are_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    """argparse printed its usage of every option (a screenful for `submit train`) above the error."""
    r = launch(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == line + "\n", r.stderr


@pytest.mark.parametrize("out, split, needle", [
    ("src/shards", "train", "OUT: '{tmp}/src/shards' is inside SRC '{tmp}/src', so a rerun would list the shards as "
                            "inputs"),
    ("shards", "a b", "--split 'a b': use letters, digits, '_' or '-' only"),  # and 'a_b' would share its scripts
])
def test_prep_refuses_what_data_prep_would_refuse_after_the_queue_wait(tmp_path: Path, out: str, split: str,
                                                                      needle: str) -> None:
    (tmp_path / "src").mkdir()
    r = launch("submit", "prep", "imagefolder", "src", out, "--tasks", "2", "--split", split, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("launch: error: " + needle.format(tmp=tmp_path)), r.stderr
    assert not (tmp_path / "shards-slurm").exists() and not (tmp_path / "src" / "shards-slurm").exists()


@pytest.mark.parametrize("kind, extra, needle", [
    ("imagefolder", ["--", "--samples-per-shard", "0"], "--samples-per-shard 0: must be positive"),
    ("imagefolder", ["--", "--quality", "500"], "--quality 500: must be in 1..100"),
    ("imagefolder", ["--", "--bogus"], "unrecognized arguments: --bogus"),
    ("imagenet", ["--", "--splits", "bogus"], "--splits 'bogus': choose from train,val"),
])
def test_prep_arguments_data_prep_would_refuse_are_refused_at_submit(tmp_path: Path, kind: str, extra: list[str],
                                                                     needle: str) -> None:
    """They were submitted, and every array task failed on them after the queue wait."""
    (tmp_path / "src").mkdir()
    split = ["--split", "train"] if kind == "imagefolder" else []
    r = launch("submit", "prep", kind, "src", "shards", "--tasks", "2", *split, "--dry-run", *extra, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr == f"launch: error: data_prep would refuse this in every array task: {needle}\n", r.stderr
    (tmp_path / "notes.txt").write_text("not a tar")
    r = launch("submit", "prep", "imagefolder", "notes.txt", "shards", "--tasks", "2", "--split", "train", "--dry-run",
               cwd=tmp_path)
    assert r.returncode == 2 and "is a file but not a tar archive" in r.stderr, r.stderr


def test_a_refused_finalize_submission_names_the_running_array_job(tmp_path: Path) -> None:
    """sbatch took the array job and refused the finalize job (a QoS limit on jobs per user): the error said
    only that, so the user submitted again, starting a second array job on the same shards."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/bash\nif [ -e "$0.took" ]; then echo "sbatch: error: QOSMaxSubmitJobPerUser'
                                   'Limit" >&2; exit 1; fi\ntouch "$0.took"; echo 101\n')
    (bindir / "sbatch").chmod(0o755)
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "shards"
    r = launch("submit", "prep", "imagefolder", str(src), str(out), "--split", "val", "--tasks", "2", cwd=tmp_path,
               env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "QOSMaxSubmitJobPerUserLimit" in r.stderr and "array job 101 was submitted and runs" in r.stderr
    assert f"python -m data_prep finalize {out} --splits val" in r.stderr and "scancel 101" in r.stderr


def test_a_refused_submission_leaves_no_new_directories(tmp_path: Path, cfg: Path) -> None:
    """sbatch refused (a mistyped partition): `submit train` left a new run directory holding only its fresh
    W&B id, `submit prep` an empty OUT and OUT-slurm with two scripts, listed later as runs that never were."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/bash\necho "sbatch: error: invalid partition specified: gpuu" >&2\n'
                                   'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
                                   'exit 1\n')  # two lines, as Slurm 22.05's sbatch says it
    (bindir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    run = tmp_path / "runs" / "new"
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir", str(run), cwd=tmp_path, env=env)
    assert r.returncode == 2 and "invalid partition specified" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "launch: error: sbatch " + str(run / "train.sbatch") + " failed: sbatch: error: invalid partition specified: "
        "gpuu; sbatch: error: Batch job submission failed: Invalid partition name specified"], r.stderr
    assert not run.exists() and not run.parent.exists()
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "data" / "shards"
    r = launch("submit", "prep", "imagefolder", str(src), str(out), "--split", "val", "--tasks", "2", cwd=tmp_path,
               env=env)
    assert r.returncode == 2 and "invalid partition specified" in r.stderr, r.stderr
    assert not out.exists() and not out.parent.exists() and not (tmp_path / "data" / "shards-slurm").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    r = launch("submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir", str(existing), cwd=tmp_path,
               env=env)
    assert r.returncode == 2 and existing.is_dir()  # a directory the user made stays


def test_the_cifar10_sweep_submits_the_papers_networks(tmp_path: Path) -> None:
    """tools/cifar10_sweep.sh: one job per network and seed, each in its own run directory and named after
    it, the CIFAR config with the network's arch, ResNet-110s (and 1202s) with the paper's 400-step start at lr 0.01."""
    script = REPO / "tools" / "cifar10_sweep.sh"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(script), "--depths", "20 110 1202", "--plain", "--seeds", "2", "--root",
                        str(tmp_path / "shards"), "--runs", str(tmp_path / "runs"), "--", "--time", "1-00:00:00",
                        "--dry-run", "--no-config-check", "--", "--trainer.precision", "32-true"], cwd=REPO, env=env,
                       capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    scripts = r.stdout.split("#!/bin/bash\n")[1:]
    jobs = []
    for text in scripts:
        argv = srun_argv(text)
        fit = argv[argv.index("fit") + 1:]
        opts = dict(zip(fit[::2], fit[1::2]))
        name = next(d for d in sbatch_directives(text) if d.startswith("--job-name="))
        assert opts["--trainer.default_root_dir"] == "$RUN_DIR"
        run_dir = shlex.split(re.search(r"^RUN_DIR=(.*)$", text, re.M).group(1))[0]
        jobs.append((opts["--model.arch"], opts["--seed_everything"], run_dir,
                     name, opts.get("--model.warmup_steps"), opts.get("--model.warmup_factor")))
        assert opts["--config"] == str(REPO / "conf" / "cifar10_resnet20.yaml")
        assert opts["--trainer.precision"] == "32-true"  # after a second --: to every trainer
        assert opts["--data.seed"] == opts["--seed_everything"], "seeds differ in init and in data order"
        assert opts["--data.root"] == str(tmp_path / "shards") and "--time=1-00:00:00" in sbatch_directives(text)
    runs = tmp_path / "runs"
    assert jobs == [(arch, str(s), f"{runs}/{arch}-seed{s}", f"--job-name=c10-{arch.replace('cifar_', '')}-s{s}",
                     "400" if arch.endswith(("110", "1202")) else None, "0.1" if arch.endswith(("110", "1202")) else None)
                    for arch in ("cifar_resnet20", "plain_cifar_resnet20", "cifar_resnet110", "plain_cifar_resnet110",
                                 "cifar_resnet1202", "plain_cifar_resnet1202")
                    for s in (0, 1)], jobs
    bad = subprocess.run(["bash", str(script), "--depths", "26", "--", "--time", "1:00:00", "--dry-run"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--depths: 26 is not one of the paper's depths" in bad.stderr, bad.stderr
    # an option with no value before `--`: it was "unknown option --time", the `--` taken as the depths
    bad = subprocess.run(["bash", str(script), "--depths", "--", "--time", "1:00:00", "--dry-run"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "cifar10_sweep: --depths needs a value\n", bad.stderr


def test_the_cifar10_sweep_skips_a_run_with_two_jobs_still_active(tmp_path: Path) -> None:
    """A run directory with two train jobs still queued or running (one resubmitted by hand) is refused as
    `... is in use by train jobs 5 RUNNING, 6 PENDING ...`: the sweep took that for another refusal and
    stopped there (the seeds after it never submitted), where one job was skipped."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n"
                    "case \"$*\" in *seed0*) echo \"launch: error: run directory $PWD/runs/x-seed0 is in use by train "
                    "jobs 5 RUNNING, 6 PENDING (Dependency), and a second job would write its checkpoints/last.ckpt "
                    "too: wait until it ends, cancel it (\\`scancel 5 6\\`), or choose another --run-dir\" >&2; "
                    "exit 2 ;; esac\n"
                    f"echo \"$*\" >> {tmp_path}/submitted\n")
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(REPO / "tools" / "cifar10_sweep.sh"), "--depths", "20", "--seeds", "2", "--runs",
                        str(tmp_path / "runs"), "--", "--time", "1:00:00"], cwd=REPO,
                       env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cifar10_sweep: not submitted again, their jobs still queued or running" in r.stderr, r.stderr
    assert "seed1" in (tmp_path / "submitted").read_text()


def test_branch_from_a_run_directory_is_refused_naming_its_checkpoint(tmp_path: Path, cfg: Path) -> None:
    """`--branch-from OTHER` (the run directory) or `OTHER/checkpoints` was recorded and the job queued; its
    first start, maybe hours later, was refused ("OTHER is a run directory, not a checkpoint"), and every start
    after it too. Refused at submission now, naming the checkpoint to give, nothing written."""
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    (other / "checkpoints" / "best-epoch000-step0000002-top1=0.5000.ckpt").write_bytes(b"another")
    run = tmp_path / "run"
    no_slurm = {"PATH": f"{tmp_path / 'no-slurm-here'}:/usr/bin:/bin"}
    for given, said in ((other, f"{other} is a run directory, not a checkpoint: name one of its checkpoints, e.g. "
                                f"{other / 'checkpoints' / 'last.ckpt'}"),
                        (other / "checkpoints", f"{other / 'checkpoints'} is a folder of checkpoints, not one: name "
                                                f"one of them, e.g. {other / 'checkpoints' / 'last.ckpt'}")):
        for how in (["submit", "train", "--config", str(cfg), "--time", "1:00:00", "--run-dir", str(run)],
                    ["torchrun", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "1", "--rdzv-endpoint",
                     "h:29400", "--run-dir", str(run)]):
            r = launch(*how, "--branch-from", str(given), cwd=tmp_path, env=no_slurm)
            assert r.returncode == 2 and r.stderr == f"launch: error: --branch-from: {said}\n", r.stderr
    assert not (run / "branched_from").exists()


def test_every_launch_argument_has_a_help_line():
    """``launch torchrun --help`` listed ``--nnodes``, ``--nproc-per-node`` and ``--cpu`` with nothing beside
    them, ``status`` its ``run_dir`` (a training run? a prep run? omitted?)."""
    from launch.cli import build_parser
    from tests.conftest import arguments_without_help

    assert arguments_without_help(build_parser()) == []
