"""Checkpoint directories (DeepSpeed's) are swapped in whole: a real SIGKILL while the new one is written
leaves the previous checkpoint; one between the two renames leaves the new one complete, which the next
start puts in place (it put the previous one back, losing a whole save: a preemption's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.checkpoint_io import (COMPLETE, OLD, PARTIAL, fsync_tree, partial_path, recover_directories,
                                    replace_directory)
from tests.conftest import REPO


def save_dir(final: Path, files: dict[str, bytes]) -> None:
    partial = partial_path(final)
    partial.mkdir(parents=True)
    for name, data in files.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_bytes(data)
    fsync_tree(partial)
    replace_directory(partial, final)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


V1 = {"latest": b"checkpoint", "checkpoint/model.pt": b"weights v1" * 100, "checkpoint/optim.pt": b"v1" * 50}
V2 = {"latest": b"checkpoint", "checkpoint/model.pt": b"weights v2" * 100, "checkpoint/optim.pt": b"v2" * 50}


def killed_run(code: str) -> int:
    """Run ``code`` in a fresh interpreter that has this module's helpers; return its exit signal."""
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom tests.test_checkpoint_dirs import *\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO)
    return -proc.returncode


def test_a_save_replaces_the_directory_and_leaves_nothing_beside_it(tmp_path):
    final = tmp_path / "last.ckpt"
    save_dir(final, V1)
    save_dir(final, V2)
    assert contents(final) == {**V2, COMPLETE: b""}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert recover_directories(tmp_path) == []


def test_a_start_removes_killed_saves_temporary_files_but_not_a_live_exports(tmp_path):
    """A training start removed every ``.tmp-*`` in its checkpoint folder, also the file an export into that
    folder was still writing: its rename then failed, the weights not written. A save's leftovers go, and an
    export's only when its writer is gone (as the next export does)."""
    from pipeline import export_temp_files

    (tmp_path / "last.ckpt").write_bytes(b"whole")
    killed_save = tmp_path / ".tmp-last.ckpt.0123456789ab"
    killed_save.write_bytes(b"half a checkpoint")
    live_export = export_temp_files.temp_path(tmp_path / "weights.pt")  # this process: alive
    live_export.write_bytes(b"half the weights")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_export = tmp_path / live_export.name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-")
    dead_export.write_bytes(b"a killed export's")
    assert recover_directories(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live_export.name])


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    final = tmp_path / "last.ckpt"
    save_dir(final, V1)
    sig = killed_run(f"""
        import os, signal
        from pathlib import Path
        partial = partial_path(Path({str(final)!r}))
        partial.mkdir()
        (partial / "latest").write_bytes(b"checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)  # the rank dies half-way through its files
    """)
    assert sig == signal.SIGKILL
    assert contents(final) == {**V1, COMPLETE: b""} and (tmp_path / ("last.ckpt" + PARTIAL)).is_dir()
    assert recover_directories(tmp_path) == []  # nothing to put back: last.ckpt is whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert contents(final) == {**V1, COMPLETE: b""}


def test_sigkill_between_the_renames_is_repaired_at_the_next_start(tmp_path):
    final = tmp_path / "last.ckpt"
    save_dir(final, V1)
    sig = killed_run(f"""
        import os, signal
        from pathlib import Path
        import pipeline.checkpoint_io as cio
        real_rename, calls = os.rename, []

        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:  # last.ckpt -> last.ckpt.old is done; die before partial -> last.ckpt
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)

        cio.os.rename = rename
        save_dir(Path({str(final)!r}), V2)
    """)
    assert sig == signal.SIGKILL
    assert not final.exists()
    assert contents(tmp_path / ("last.ckpt" + OLD)) == {**V1, COMPLETE: b""}
    assert recover_directories(tmp_path) == [(final, True)]
    assert contents(final) == {**V2, COMPLETE: b""}, "the newer save, which had ended"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert recover_directories(tmp_path) == []  # idempotent (every rank runs it)


def test_an_unfinished_save_beside_a_moved_checkpoint_puts_the_previous_one_back(tmp_path):
    """No completion mark in the new directory (a save of an earlier version, or a rank's files not all
    written): the previous checkpoint goes back, the unfinished one is removed."""
    final = tmp_path / "last.ckpt"
    save_dir(final, V1)
    final.rename(tmp_path / ("last.ckpt" + OLD))
    (tmp_path / ("last.ckpt" + PARTIAL) / "checkpoint").mkdir(parents=True)
    assert recover_directories(tmp_path) == [(final, False)]
    assert contents(final) == {**V1, COMPLETE: b""}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    save_dir(tmp_path / "first.ckpt", V2)  # the very first save, killed before its one rename
    (tmp_path / "first.ckpt").rename(tmp_path / ("first.ckpt" + PARTIAL))
    assert recover_directories(tmp_path) == [(tmp_path / "first.ckpt", True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.ckpt", "last.ckpt"]


def test_deepspeed_names_save_atomically():
    from pytorch_lightning.strategies import StrategyRegistry

    from pipeline.strategies import AtomicDeepSpeedStrategy, CPUDeepSpeedStrategy

    for name in ("deepspeed", "deepspeed_stage_2", "deepspeed_stage_3_offload"):
        assert StrategyRegistry[name]["strategy"] is AtomicDeepSpeedStrategy
    assert StrategyRegistry["deepspeed_stage_2"]["init_params"] == {"stage": 2}
    assert issubclass(CPUDeepSpeedStrategy, AtomicDeepSpeedStrategy)


def test_a_file_system_that_cannot_fsync_a_directory_still_saves(tmp_path, monkeypatch):
    """Some FUSE mounts answer EINVAL to fsync on a directory: every save failed there, after the new file
    was already in place, with an error saying the previous one was intact."""
    import errno
    import os
    import stat

    import pipeline.checkpoint_io as cio

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(cio.os, "fsync", fsync)
    target = tmp_path / "last.ckpt"
    cio.atomic_write_bytes(b"one", target)
    cio.atomic_write_bytes(b"two", target)
    assert target.read_bytes() == b"two"
    save_dir(tmp_path / "zero.ckpt", V1)  # the directory swap fsyncs directories too
    assert contents(tmp_path / "zero.ckpt") == {**V1, COMPLETE: b""}


def test_remove_best_after_takes_only_what_a_killed_start_wrote_after_last_ckpt(tmp_path):
    """Best-k files of a later step than last.ckpt, written after it (a start killed between a validation's
    best-k save and its last.ckpt) go, files and DeepSpeed directories; those written before it (an earlier
    timeline of a run taken back by hand to one of its checkpoints) and a user's copy (``.bak``) stay."""
    import os

    from pipeline.checkpoint_io import remove_best_after

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    old = ckpts / "best-epoch000-step0000010-top1=0.5000.ckpt"
    copy = ckpts / "best-epoch000-step0000012-top1=0.6000.ckpt.bak"
    for path in (old, copy):
        path.write_bytes(b"x")
        os.utime(path, (1_000_000, 1_000_000))
    last = ckpts / "last.ckpt"
    last.write_bytes(b"x")
    os.utime(last, (2_000_000, 2_000_000))
    debris = ckpts / "best-epoch001-step0000011-top1=0.7000.ckpt"
    again = ckpts / "best-epoch001-step0000011-top1=0.7000-v1.ckpt"
    zero = ckpts / "best-epoch001-step0000012-top1=0.7100.ckpt"  # a DeepSpeed directory
    kept = ckpts / "best-epoch000-step0000007-top1=0.4000.ckpt"
    for path in (debris, again, kept):
        path.write_bytes(b"x")
    zero.mkdir()
    (zero / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert sorted(remove_best_after(last, 7)) == sorted([debris, again, zero])
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(p.name for p in (old, copy, last, kept))
    assert remove_best_after(tmp_path / "nothing" / "last.ckpt", 0) == []
