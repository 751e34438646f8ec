"""Real resource exhaustion: a small /dev/shm (a private mount namespace), few file descriptors, a full disk
(a small tmpfs). What a user sees must be one line naming the setting or the path, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests import preloaded_python
from tests.conftest import REPO, unavailable_here


def _small_shm(size: str, full: bool = False) -> list[str]:
    """A command prefix that runs the rest with a ``size`` tmpfs as /dev/shm (Docker's is 64 MB), ``full``
    (filled by another process's file), in a private mount namespace (the machine's /dev/shm is untouched)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode != 0:
        unavailable_here("unshare -m and mount are not permitted here (need root)")
    fill = " && (cat /dev/zero > /dev/shm/other 2>/dev/null; true)" if full else ""
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm{fill} && exec "$@"', "sh"]


def test_a_small_dev_shm_stops_the_cpu_loader_with_one_line_not_a_hang(digits_shards, tmp_path):
    """1 MiB of /dev/shm for 2 workers x 2 prefetched batches of 128 32x32 images (1.5 MiB). Torch copied
    each batch into shared memory in the worker's queue feeder thread, which printed a traceback, dropped
    the batch and left the trainer waiting for it forever."""
    from pipeline.models import build

    weights = tmp_path / "w.pt"
    torch.save(build("cifar_resnet20", num_classes=10).state_dict(), weights)
    proc = subprocess.run(
        [*_small_shm("1M"), sys.executable, "-m", "pipeline", "validate", "--config", "conf/demo.yaml",
         "--data.root", str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"),
         "--model.init_weights", str(weights), "--data.num_workers", "2", "--data.val_batch_size", "128",
         "--tracking.wandb", "false"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "out of shared memory" in errors[0] and "/dev/shm: 1.0 MiB" in errors[0]
    assert "--shm-size" in errors[0] and "data.num_workers" in errors[0]
    assert "Traceback" not in proc.stderr



def test_dali_source_workers_on_a_small_dev_shm_stop_with_one_line_not_a_bus_error(digits_shards, tmp_path):
    """DALI's source workers write each batch into shared memory chunks mapped at the pipeline's start; on a
    /dev/shm without room the write is a SIGBUS. 200 KiB for 2 workers x 6 batches in flight of 128 digits
    (0.8 MiB): the training process died of it (exit 135) without a word. Refused at the start now, one line
    naming the setting; 1 MiB has room and runs."""
    from pipeline.models import build

    weights = tmp_path / "w.pt"
    torch.save(build("cifar_resnet20", num_classes=10).state_dict(), weights)

    def validate(size: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*_small_shm(size), sys.executable, "-m", "pipeline", "validate", "--config", "conf/demo.yaml",
             "--data.root", str(digits_shards), "--trainer.default_root_dir", str(tmp_path / f"run{size}"),
             "--model.init_weights", str(weights), "--data.backend", "dali-cpu", "--data.num_workers", "1",
             "--data.dali_source_workers", "2", "--data.val_batch_size", "128", "--tracking.wandb", "false"],
            capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})

    proc = validate("200k")
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("error: out of shared memory: DALI's 2 source workers per rank "
                                "(data.dali_source_workers) fill about 0.8 MiB of /dev/shm (1 rank x 6 batches in "
                                "flight x 128 samples of "), errors[0]
    assert "which has 0.2 MiB free of 0.2 MiB" in errors[0] and "--shm-size" in errors[0], errors[0]
    proc = validate("1M")
    assert proc.returncode == 0 and "val/top1" in proc.stdout, proc.stderr[-3000:]


def test_dali_shortage_counts_the_other_ranks_chunks_once(monkeypatch):
    """8 ranks of 100 MiB of source batches each on a 1 GiB /dev/shm: they fit. A rank that starts its workers
    after the others have written theirs (a later start, a pipeline rebuilt after a corrupt sample mid-run)
    saw 724 MiB free and refused it all the same, counting the others' 700 MiB twice: once in what is no
    longer free, once in its 8 x 100 MiB. Its own share is checked against what is free, all 8 against the
    size; either short is refused."""
    from pipeline.data import shared_memory

    mib = 2**20
    per_rank = dict(batches=10, batch=100, sample_bytes=0.1 * mib, workers=4)  # 100 MiB a rank
    space = {"now": (1024 * mib, 724 * mib)}
    monkeypatch.setattr(shared_memory, "shm_space", lambda path=shared_memory.SHM: space["now"])
    assert shared_memory.dali_shortage(**per_rank, ranks_here=8) is None
    space["now"] = (1024 * mib, 1024 * mib)  # the first rank to start
    assert shared_memory.dali_shortage(**per_rank, ranks_here=8) is None
    space["now"] = (1024 * mib, 90 * mib)  # its own batches do not fit: the others' and something else's
    said = shared_memory.dali_shortage(**per_rank, ranks_here=8)
    assert said is not None and "which has 90.0 MiB free of 1024.0 MiB" in said, said
    space["now"] = (512 * mib, 512 * mib)  # all 8 ranks' never fit
    said = shared_memory.dali_shortage(**per_rank, ranks_here=8)
    assert said is not None and said.startswith("out of shared memory: DALI's 4 source workers per rank "
                                                 "(data.dali_source_workers) fill about 800.0 MiB of /dev/shm "
                                                 "(8 ranks x 10 batches in flight x 100 samples of 102.4 KiB), "
                                                 "which has 512.0 MiB free of 512.0 MiB"), said


@pytest.mark.isolated
def test_dali_training_and_validation_loaders_count_each_others_source_chunks(digits_shards, monkeypatch):
    """Training and validation each have their own DALI source workers, side by side in a fit. Each loader
    checked its own chunks alone: on a /dev/shm that holds either but not both, the second one started (its
    room counted against the size, and against a free space the first had not written into yet) and the
    run died of SIGBUS when both had written. The second now counts the first's; closed, it holds none."""
    import gc

    import pytest

    pytest.importorskip("nvidia.dali")
    from pipeline.data import shared_memory
    from pipeline.data.augment import AugmentConfig
    from pipeline.data.contract import TrainSampler, ValSampler
    from pipeline.data.dali_backend import DaliLoader
    from pipeline.data.shards import ShardSet

    cfg = AugmentConfig(recipe="cifar", train_size=32, val_size=32)
    train_shards, val_shards = ShardSet(digits_shards, "train"), ShardSet(digits_shards, "val")
    train = DaliLoader(train_shards, TrainSampler(train_shards.shard_sizes, seed=0, world_size=1, rank=0,
                                                  batch_size=64), cfg, train=True, cpu=True, num_threads=1,
                       py_workers=1)
    val = DaliLoader(val_shards, ValSampler(len(val_shards), world_size=1, rank=0, batch_size=64), cfg,
                     train=False, cpu=True, num_threads=1, py_workers=1)
    each = (train.prefetch + 2) * 64 * float(train_shards.sizes.mean())  # bytes a loader's chunks take
    size = int(1.5 * each)  # either fits, both do not; nothing written yet: all of it free
    monkeypatch.setattr(shared_memory, "shm_space", lambda path=shared_memory.SHM: (size, size))
    next(iter(train))
    with pytest.raises(shared_memory.SharedMemoryError) as refused:
        next(iter(val))
    said = str(refused.value)
    assert "DALI's 1 source worker per rank (data.dali_source_workers) fill about " in said, said
    assert f" of the training loader's), which has {size / 2**20:.1f} MiB free" in said, said
    del train
    gc.collect()
    images, labels, valid = next(iter(val))  # the training loader's chunks went with it
    assert images.shape[0] == 64 and bool(valid.all())


def test_a_worker_killed_by_sigbus_is_said_as_a_full_dev_shm():
    """A DALI source worker that wrote to a full /dev/shm dies of SIGBUS; the message said "signal 9
    (SIGKILL) usually means the kernel's OOM killer", which sent the user to the wrong limit."""
    import multiprocessing
    import signal as signals

    from pipeline.data.worker_watchdog import describe_death

    worker = multiprocessing.get_context("fork").Process(target=_die_of_sigbus)
    worker.start()
    worker.join(60)
    assert worker.exitcode == -signals.SIGBUS
    said = describe_death(worker, "a DALI source worker process", "data.dali_source_workers 0 reads in-process")
    assert said.startswith(f"a DALI source worker process (pid {worker.pid}) ended (signal 7); SIGBUS usually means a "
                           f"write to a full /dev/shm ("), said
    assert "--shm-size" in said and said.endswith("data.dali_source_workers 0 reads in-process."), said
    assert "OOM" not in said


def _die_of_sigbus() -> None:
    import signal as signals

    signals.signal(signals.SIGBUS, signals.SIG_DFL)
    os.kill(os.getpid(), signals.SIGBUS)


def test_a_full_dev_shm_is_named_as_such_not_as_a_full_output_disk(digits_shards, tmp_path):
    """/dev/shm full (another process's files): creating the loader's queues, or data_prep's progress
    counter, fails with a `No space left on device` that names no file. The trainer printed a traceback;
    data_prep said `error: [Errno 28] No space left on device`, which reads as its output disk."""
    from pipeline.models import build
    from tests.fixtures_images import write_imagefolder

    write_imagefolder(tmp_path / "src", ["a", "b"], per_class=3)
    prep = subprocess.run([*_small_shm("64k", full=True), sys.executable, "-m", "data_prep", "imagefolder",
                           str(tmp_path / "src"), str(tmp_path / "o"), "--split", "train", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert prep.returncode == 2 and prep.stderr.startswith(
        "python -m data_prep: error: [Errno 28] No space left on device in /dev/shm (0 KiB free), not in OUT: "), prep.stderr
    weights = tmp_path / "w.pt"
    torch.save(build("cifar_resnet20", num_classes=10).state_dict(), weights)
    proc = subprocess.run(
        [*_small_shm("64k", full=True), sys.executable, "-m", "pipeline", "validate", "--config", "conf/demo.yaml",
         "--data.root", str(digits_shards), "--trainer.default_root_dir", str(tmp_path / "run"),
         "--model.init_weights", str(weights), "--data.num_workers", "2", "--tracking.wandb", "false"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in errors if "out of shared memory: [Errno 28]" in line and "0.0 MiB free" in line]
    assert len(errors) == 1, proc.stderr[-3000:]


_READ_AT_THE_LIMIT = """
import os, resource, sys
import numpy as np
from pipeline.data.augment import AugmentConfig
from pipeline.data.cpu_backend import ShardBatches
from pipeline.data.shards import ShardSet
shards = ShardSet(sys.argv[1], "train")
data = ShardBatches(shards, AugmentConfig(recipe="cifar", train_size=32, val_size=32), True, 0, on_corrupt="skip")
first = [int(np.searchsorted(shards.shard_of, s)) for s in range(len(shards.shard_names))]  # one sample per shard
data[np.array([first[:1], [0], [0]])]  # the first shard's file is open
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))  # no new descriptor
try:
    data[np.array([first, list(range(len(first))), [0] * len(first)])]
except OSError as e:
    print("raised", e.errno, data.corrupt_seen)
else:
    print("returned", data.corrupt_seen)
"""


def test_a_shard_the_loader_cannot_open_is_not_skipped_as_a_corrupt_sample(digits_shards):
    """Under data.on_corrupt skip, a read that fails for the file system's reasons (here the limit of open
    files, for real; on a network file system an I/O error) skipped whole samples, counted as corrupt: images
    lost although every shard was whole. It is the file system's error now, raised."""
    import errno

    proc = subprocess.run([sys.executable, "-c", _READ_AT_THE_LIMIT, str(digits_shards)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["raised", str(errno.EMFILE), "0"], proc.stdout + proc.stderr[-2000:]



_WORKER_AT_THE_LIMIT = """
import os, resource, sys
import numpy as np
import torch
from pipeline.cli import worker_error_message
from pipeline.data.augment import AugmentConfig
from pipeline.data.contract import ValSampler
from pipeline.data.cpu_backend import ShardBatches
from pipeline.data.shards import ShardSet
from pipeline.data.open_files import open_files_advice, out_of_file_descriptors

def no_new_descriptor(_):
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

shards = ShardSet(sys.argv[1], "val")
data = ShardBatches(shards, AugmentConfig(recipe="cifar", train_size=32, val_size=32), False, 0)
loader = torch.utils.data.DataLoader(data, sampler=ValSampler(len(shards), 1, 0, 16), batch_size=None,
                                     num_workers=1, worker_init_fn=no_new_descriptor)
try:
    next(iter(loader))
except Exception as e:
    print(type(e).__name__, out_of_file_descriptors(e))
    print(open_files_advice())
"""


def test_a_worker_out_of_file_descriptors_is_told_as_the_limit_and_its_fix(digits_shards):
    """A loader worker that cannot open a file (the limit of open files, for real): the CLI tells it by
    ``out_of_file_descriptors`` as one `error:` line with the limit and what to change (no requeue), where
    torch's traceback said to call set_sharing_strategy in code a user of the CLI does not write. (Whether
    the trainer or a worker hits the limit first in a whole run depends on how far the workers are ahead.)"""
    proc = subprocess.run(["sh", "-c", 'ulimit -n 512 && exec "$@"', "sh", sys.executable, "-c", _WORKER_AT_THE_LIMIT,
                           str(digits_shards)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caught, advice = proc.stdout.splitlines()
    assert caught == "RuntimeError True", proc.stderr[-3000:]  # its batch's shared memory is its first new descriptor
    assert advice.startswith("too many open files (ulimit -n: 512): ") and "data.num_workers" in advice


def _fill(folder, leave: int = 0) -> None:
    """Fill the file system of ``folder`` until ``leave`` bytes are free (a real full disk)."""
    st = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
            f.flush()
        except OSError:
            pass


def test_data_prep_on_a_full_tmpfs_names_the_file_and_a_rerun_completes_the_dataset(tmp_path, capsys):
    """A real tmpfs, filled mid-shard and then when only the records are left to write (done-records,
    manifest, rejects): the error named no file there (`error: [Errno 28] No space left on device`, write()
    errors carry none). After space is freed, the rerun gives the bytes of an uninterrupted run."""
    from data_prep.cli import main
    from tests.fixtures_images import write_imagefolder

    src, clean, fs = tmp_path / "src", tmp_path / "clean", tmp_path / "fs"
    write_imagefolder(src, ["a", "b", "c"], per_class=20, size=(160, 120))
    args = ["imagefolder", str(src), None, "--split", "train", "--samples-per-shard", "10", "--workers", "1",
            "--no-progress"]
    assert main([a or str(clean) for a in args]) == 0
    capsys.readouterr()
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(fs)], capture_output=True).returncode:
        unavailable_here("mount -t tmpfs is not permitted here (needs root)")
    try:
        out = fs / "o"
        run = [a or str(out) for a in args]
        _fill(fs, leave=64 << 10)  # room for a shard or two of six
        assert main(run) == 2
        err = capsys.readouterr().err
        assert "cannot write shard: No space left on device" in err and str(out) in err, err
        (fs / "filler").unlink()
        assert main(run) == 0
        (out / "manifest.json").unlink()
        (out / "rejects.jsonl").unlink()
        capsys.readouterr()
        _fill(fs)  # every shard is kept; only the records are written
        assert main(run) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m data_prep: error: {out}/") and ": cannot write: No space left on device" in err, err
        assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "manifest.json").exists()
        (fs / "filler").unlink()
        assert main(run) == 0 and main(["verify", str(out)]) == 0
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == \
            {p.name: p.read_bytes() for p in clean.iterdir() if p.is_file()}
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_fit_on_a_full_disk_is_one_line_naming_the_run_directory_and_a_rerun_starts(digits_shards, tmp_path):
    """The run directory on a real 8 KiB tmpfs: W&B's offline run, the CSV logger's hparams.yaml or the
    sample grid fill it before any checkpoint. That was a traceback (and a Slurm requeue) after some 35,000
    lines of `--- Logging error ---` from W&B's debug.log handler; now a few lines, the last one the error
    naming the run directory and its free space. With room again, the same command starts."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(fs)], capture_output=True).returncode:
        unavailable_here("mount -t tmpfs is not permitted here (needs root)")
    run = fs / "run"
    command = [sys.executable, "-m", "pipeline", "fit", "--config", "conf/demo.yaml", "--data.root", str(digits_shards),
               "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1", "--data.num_workers", "0",
               "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    try:
        proc = preloaded_python.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) < 12 and "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
        assert lines[-1].startswith("error: [Errno 28] No space left on device"), lines[-1]
        assert f"(trainer.default_root_dir {run}: 0.0 MiB free); free space" in lines[-1]
        subprocess.run(["mount", "-o", "remount,size=32M", str(fs)], check=True)
        again = preloaded_python.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        # full again: `validate` (no run lock) writes its own logs, and said it as a traceback
        try:  # unbuffered: no flush at close that fails again
            with open(fs / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e
        score = [*command[:3], "validate", *command[4:]]
        proc = preloaded_python.run(score, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "No space left on device" in last, last
        assert f"(trainer.default_root_dir {run}: 0.0 MiB free)" in last and f"{run / 'validate'}" in last, last
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_the_loader_warns_at_start_when_dev_shm_is_smaller_than_its_batches_in_flight(tmp_path):
    """Docker's 64 MB /dev/shm (here a real 64 MiB tmpfs) and ImageNet's loader: 8 workers x 2 prefetched + 1
    batches of 256 at 224 px are 625 MiB; 2 workers of batches of 64 at 32 px fit."""
    from pipeline.data.shared_memory import batch_bytes, shortage

    shm = tmp_path / "shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(shm)], capture_output=True).returncode:
        unavailable_here("mount -t tmpfs is not permitted here (needs root)")
    try:
        assert batch_bytes(256, 224) == 256 * 3 * 224 * 224 + 4096 + 4096  # images, labels, mask (a page each)
        warning = shortage(256, 224, 8, 1, path=str(shm))
        assert warning.startswith(f"warning: {shm} has 64.0 MiB free of 64.0 MiB, and the cpu loader may hold "
                                  "624.9 MiB of batches there (1 rank x 8 workers"), warning
        assert "--shm-size" in warning and "data.num_workers" in warning
        assert shortage(64, 32, 2, 1, path=str(shm)) is None
        assert "x 2 workers" in shortage(64, 32, 2, 80, path=str(shm))  # 80 ranks on one machine: 78 MiB
        assert shortage(256, 32, 2, 1, path=str(shm)) is None  # batches of 0.8 MiB: 5 of them fit
        said = shortage(256, 32, 2, 1, 50, path=str(shm))  # data.prefetch_batches 50: 101 of them do not
        assert "(1 rank x 2 workers x 50 prefetched + 1, batches of 256 at 32 px)" in said, said
    finally:
        subprocess.run(["umount", str(shm)], check=True)


def test_only_a_full_dev_shm_is_blamed_and_only_the_process_limit_gets_ulimit_advice():
    """data_prep said "in /dev/shm ... free some" for any error of a multiprocessing lock (a /dev/shm that is
    missing or not writable too); the loader told a machine out of open files (ENFILE, "... in system") to
    raise `ulimit -n`, which does not change that limit."""
    import errno

    from data_prep.cli import _in_shared_memory
    from pipeline.data.open_files import out_of_file_descriptors

    where = {}  # a frame of multiprocessing's lock code, as the error's traceback has it
    exec(compile("def make_lock(code):\n    raise OSError(code, os.strerror(code))\n",
                 os.path.join("lib", "multiprocessing", "synchronize.py"), "exec"), {"os": os}, where)
    for code, blamed in ((errno.ENOSPC, True), (errno.EACCES, False), (errno.ENOSYS, False)):
        try:
            where["make_lock"](code)
        except OSError as e:
            assert ("in /dev/shm" in _in_shared_memory(e)) is blamed, code
    assert out_of_file_descriptors(OSError(errno.EMFILE, "Too many open files"))
    assert not out_of_file_descriptors(OSError(errno.ENFILE, "Too many open files in system"))


def test_a_training_reader_keeps_two_shuffle_windows_open_within_a_quarter_of_its_limit(digits_shards):
    """64 open shards thrashed with a shuffle window of more (a full shuffle: every shard): each read of
    another shard reopened it, a metadata round trip on Lustre/NFS."""
    import resource

    from pipeline.data.shards import MAX_OPEN_SHARDS, open_shards_for_window

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert open_shards_for_window(4) == MAX_OPEN_SHARDS
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
        assert open_shards_for_window(300) == 600
        assert open_shards_for_window(5000) == 1024
        from pipeline.datamodule import ShardDataModule

        data = ShardDataModule(root=str(digits_shards), window_shards=300)
        assert data._shards(data.train_split).max_open == 600 and data._shards(data.val_split).max_open == 64
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
        assert open_shards_for_window(300) == MAX_OPEN_SHARDS
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


_LIMIT_AFTER_MAIN = """
import resource, sys
from pipeline.cli import main
try:
    main(["fit", "--help"])
except SystemExit:
    pass
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_a_run_raises_its_soft_limit_of_open_files_to_the_hard_one():
    """Clusters and containers often start jobs with a soft limit of 1,024 open files under a far higher
    hard limit; the cpu loader's workers hold more (a descriptor per batch in flight, their open shards),
    and the run stopped with `too many open files` until the user raised it by hand. ``main`` raises it
    (towards 65,536, never past the hard limit) before any worker starts; a soft limit already higher is
    left alone."""
    from pipeline.data.open_files import WANTED

    def limits_after_main(soft: int, hard: int) -> list[int]:
        proc = subprocess.run(["sh", "-c", f'ulimit -Sn {soft} && ulimit -Hn {hard} && exec "$@"', "sh",
                               sys.executable, "-c", _LIMIT_AFTER_MAIN], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [int(n) for n in proc.stdout.split()[-2:]]

    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        unavailable_here(f"the hard limit of open files here is {hard}")
    assert limits_after_main(256, 2048) == [2048, 2048]  # the hard limit is the ceiling
    top = WANTED if hard == resource.RLIM_INFINITY else min(hard, WANTED)
    assert limits_after_main(256, top) == [top, top]
    assert limits_after_main(1000, 1500) == [1500, 1500]
    assert limits_after_main(1500, 2048) == [2048, 2048]


def test_a_disk_full_message_without_a_home_or_a_writable_temporary_directory(tmp_path, monkeypatch):
    """The message of a write error that names no file lists the other file systems a run writes to; where
    the user has no home directory (no passwd entry and no HOME: a container run with --user) or tempfile
    finds no temporary directory it can write a file in (all full), looking them up raised RuntimeError or
    FileNotFoundError in the error's handler: a traceback in place of the one line."""
    import errno
    import tempfile
    from pathlib import Path

    from pipeline.disk_full import disk_full_message

    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")

    def no_tmp():
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/var/tmp']")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    monkeypatch.setattr(tempfile, "gettempdir", no_tmp)
    monkeypatch.delenv("TMPDIR", raising=False)
    said = disk_full_message(OSError(errno.ENOSPC, "No space left on device"), tmp_path, "fit")
    assert said.startswith(f"[Errno 28] No space left on device (trainer.default_root_dir {tmp_path}: "), said
    assert said.endswith(f"fit resumes from {tmp_path / 'checkpoints' / 'last.ckpt'} (if there is one yet)"), said


def test_a_full_disk_elsewhere_is_named_not_the_run_directory(tmp_path):
    """A write that fails on another file system (a full node-local /tmp, a $HOME over its quota) was said
    as the run directory's, with the run directory's free space: the user freed the wrong disk. A named
    file's own file system is said now; one inside the run directory's file system is said as the run
    directory's; one that names no file (torch's, Lightning's writes) as the run directory's, with every
    other file system the run writes to (TMPDIR, $HOME, /dev/shm) and its free space."""
    import errno

    from pipeline.disk_full import disk_full_message

    fs = tmp_path / "tmp"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,nr_inodes=2", "tmpfs", str(fs)],
                      capture_output=True).returncode:
        unavailable_here("mount -t tmpfs is not permitted here (needs root)")
    run = tmp_path / "run"
    run.mkdir()
    full = None
    try:
        (fs / "cache").mkdir()  # the file system's last inode: a file of its own cannot be made now
        try:
            (fs / "cache" / "compiled").mkdir()
        except OSError as e:
            full = e
        assert full is not None and full.errno == errno.ENOSPC and full.filename
        said = disk_full_message(full, run)
        assert said.startswith(f"[Errno 28] No space left on device: '{fs / 'cache' / 'compiled'}' (the file system at {fs}: 0.0 "
                               f"MiB free, not trainer.default_root_dir {run}'s: "), said
        assert "free space there" in said and f"fit resumes from {run / 'checkpoints' / 'last.ckpt'}" in said
        same = OSError(errno.EDQUOT, "Disk quota exceeded", str(run / "wandb" / "x" / "run.wandb"))
        said = disk_full_message(same, run, "validate")
        assert f"(trainer.default_root_dir {run}: " in said and "free space (or raise the quota)" in said, said
        assert said.endswith(f"validate writes its logs under {run / 'validate'}"), said
        assert "names no file" not in said and str(fs) not in said, said
        # an error that names no file (torch's, Lightning's writes): the run directory's, and every other file
        # system the run writes to, here the full TMPDIR, in a fresh process that reads TMPDIR as a run would
        said = subprocess.run(
            [sys.executable, "-c", "import errno, sys; from pathlib import Path; from pipeline.disk_full import "
             "disk_full_message; print(disk_full_message(OSError(errno.ENOSPC, 'No space left on device'), "
             "Path(sys.argv[1]), 'validate'))", str(run)],
            capture_output=True, text=True, check=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(fs)}).stdout.strip()
        assert said.startswith(f"[Errno 28] No space left on device (trainer.default_root_dir {run}: "), said
        assert f"; the error names no file, and the run also writes to {fs}: 0.0 MiB free, " in said, said
        assert said.endswith(f"validate writes its logs under {run / 'validate'}"), said
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_a_file_size_limit_is_one_line_naming_the_limit_and_the_sample_grid_is_not_worth_a_traceback(
        digits_shards, tmp_path):
    """Past `ulimit -f` a write fails with EFBIG (Python ignores SIGXFSZ). A checkpoint said so already; any
    other file of a fit (config.yaml, the loggers') was a traceback, and so was W&B's copy of the sample grid
    (a PNG it writes in the temporary directory), which no run should stop for. Real limits here: 2 KiB
    stops the run at its first files, 8 KiB at its checkpoint, the grid only warned of."""
    def fit(kib: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "-c", f'ulimit -f {kib * 2} && exec "$@"', "sh",  # sh counts 512-byte blocks
             sys.executable, "-m", "pipeline", "fit", "--config", "conf/demo.yaml", "--data.root", str(digits_shards),
             "--trainer.default_root_dir", str(tmp_path / f"run{kib}"), "--trainer.max_steps", "1",
             "--data.num_workers", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1"],
            capture_output=True, text=True, cwd=REPO, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})

    proc = fit(2)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [Errno 27] File too large (the process's file-size limit, ulimit -f: 2 KiB; "), last
    assert "ulimit -f unlimited" in last and "fit resumes from" in last, last
    proc = fit(8)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot log the sample grid to W&B (File too large); training goes on" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write checkpoint ")
