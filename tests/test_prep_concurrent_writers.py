"""Two data_prep commands building the same shards into one OUT at once (an array task run again while the
first still runs, a requeued task whose first run lives on, the same command started twice).

The one that finished first used to remove, while finalizing, every ``NAME.tar.<token>.tmp`` of the split as a
killed writer's leftover, the other's live temporary included; that writer's rename then failed
(``OUT/val-000019.tar: cannot write shard: No such file or directory``, exit 2). Each writer now holds a lock on
its temporaries (``shardwriter.remove_abandoned`` keeps a locked one), and a writer whose temporary vanished
anyway (a file system without working locks) keeps the identical shard the other put in place.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.manifest import _remove_stale_shards
from data_prep.shardwriter import ShardWriter, file_sha256
from tests.fixtures_images import jpeg_bytes, photos
from tests.prep_fixtures import ARGS, SHARDS, SPLIT, clean_outputs, outputs, photo_folder

REPO = Path(__file__).resolve().parents[1]

# `python -m data_prep ARGS...` with one pause: the commit of shard PAUSE waits (its temporary file written,
# open, not yet renamed) until the file GO exists; PAUSED is made when it starts waiting. The rest is the real
# command (runpy runs data_prep's __main__), so another command can finish the split and finalize meanwhile:
# the interleaving the race needs, every time.
PAUSING = """
import os, runpy, sys, time
from pathlib import Path
import data_prep.shardwriter as sw
pause, paused, go = sys.argv[1:4]
real = sw.ShardWriter.commit
def commit(self):
    if self.tar_path.name == pause:
        Path(paused).touch()
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(self)
sw.ShardWriter.commit = commit
sys.argv = ["data_prep", *sys.argv[4:]]
runpy.run_module("data_prep", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> dict[str, bytes]:
    return clean_outputs(src, tmp_path_factory)


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_one_run_finishing_first_keeps_the_others_live_temporary(src, clean, tmp_path):
    """The first command's commit of the last shard waits (its temporary written, open) while a second command,
    started then, reuses its shards, builds the last one itself, finalizes and exits. The second's finalize
    removed the first one's open temporary, and the first then failed (exit 2, `OUT/val-000005.tar: cannot
    write shard: No such file or directory`). Now both exit 0 and OUT is what a run alone writes."""
    out = tmp_path / "o"
    last = f"{SPLIT}-{SHARDS - 1:06d}.tar"
    paused, go = tmp_path / "paused", tmp_path / "go"
    cmd = ["imagefolder", str(src), str(out), *ARGS]
    first = subprocess.Popen([sys.executable, "-c", PAUSING, last, str(paused), str(go), *cmd], cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "data_prep", *cmd], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=120)
        live = temporaries(out)  # the first's shard being written: still there after the second finalized
    finally:
        go.touch()
        _, err1 = first.communicate(timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"{SHARDS - 1} of {SHARDS} shards were complete" in second.stderr  # it built the last one itself
    assert first.returncode == 0, err1
    assert "Traceback" not in err1 + second.stderr
    assert [n for n in live if n.startswith(last + ".")], f"the live writer's temporary was removed: {live}"
    assert outputs(out) == clean
    assert temporaries(out) == []
    assert subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO, env=_env(),
                          capture_output=True).returncode == 0


def test_two_identical_commands_at_once(src, clean, tmp_path):
    """The report as it was: the same command twice at once, nothing held back (the one to finish first used to
    remove the other's temporary of the last shard it was still writing). How the two interleave is up to the
    scheduler (this failed in some runs only, before); the test above forces the interleaving."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "data_prep", "imagefolder", str(src), str(out), *ARGS]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    assert [rc for _, rc in results] == [0, 0], results
    assert outputs(out) == clean
    assert temporaries(out) == []


def _writer(tmp_path: Path, n: int = 4) -> tuple[ShardWriter, list[bytes]]:
    jpegs = [jpeg_bytes(im) for im in photos(n)]
    writer = ShardWriter(tmp_path / f"{SPLIT}-000000.tar", tmp_path / f"{SPLIT}-000000.idx")
    for i, data in enumerate(jpegs):
        writer.add(f"{i:06d}", data, i % 2)
    return writer, jpegs


def test_cleanup_keeps_a_live_writers_temporary_and_removes_a_killed_ones(tmp_path):
    """A live writer holds its temporary; one killed with SIGKILL left it behind, removed by the next cleanup."""
    from data_prep.shardwriter import remove_abandoned

    live, _ = _writer(tmp_path)
    script = ("import sys, time; from pathlib import Path; from data_prep.shardwriter import ShardWriter\n"
              "w = ShardWriter(Path(sys.argv[1]) / 'val-000001.tar', Path(sys.argv[1]) / 'val-000001.idx')\n"
              "w.add('000000', b'x' * 100, 0); w._raw.flush(); print(w.tmp.name, flush=True); time.sleep(60)\n")
    killed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    left = killed.stdout.readline().strip()
    assert left.startswith("val-000001.tar.") and (tmp_path / left).exists()
    assert not remove_abandoned(tmp_path / left)  # alive: kept
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    (tmp_path / "val-000002.tar.tmp").write_bytes(b"\0" * 512)  # a data_prep of before the token: no lock either
    _remove_stale_shards(tmp_path, SPLIT, set())
    assert temporaries(tmp_path) == [live.tmp.name]
    nbytes, sha = live.commit()
    assert file_sha256(tmp_path / f"{SPLIT}-000000.tar") == sha and temporaries(tmp_path) == []


def test_a_writer_whose_temporary_vanished_keeps_the_same_shard_in_place(tmp_path):
    """Where the file system has no working locks, the other command's cleanup may remove a live writer's
    temporaries: the shard in place is then the same bytes (built by the other to the same plan), kept."""
    first, _ = _writer(tmp_path)
    second, _ = _writer(tmp_path)
    nbytes, sha = second.commit()
    idx = (tmp_path / f"{SPLIT}-000000.idx").read_bytes()
    first.tmp.unlink()  # the cleanup of a file system without locks
    assert first.commit() == (nbytes, sha)
    assert file_sha256(tmp_path / f"{SPLIT}-000000.tar") == sha and (tmp_path / f"{SPLIT}-000000.idx").read_bytes() == idx
    assert temporaries(tmp_path) == []


def test_a_vanished_temporary_with_other_bytes_in_place_is_still_an_error(tmp_path):
    """No other writer's identical shard in place (its temporary removed by hand, another plan's shard): the
    shard is not done, and the writer says so, as before."""
    writer, _ = _writer(tmp_path)
    (tmp_path / f"{SPLIT}-000000.tar").write_bytes(b"\0" * 10240)
    writer.tmp.unlink()
    with pytest.raises(FileNotFoundError):
        writer.commit()
    writer.abort()
    assert temporaries(tmp_path) == []


def test_without_working_locks_the_cleanup_removes_and_the_live_writer_keeps_the_same_shard(tmp_path, monkeypatch):
    """NFS without its lock daemon (ENOLCK): a live writer's temporary cannot be told from a killed one's and is
    removed as before; the writer then finds the other's identical shard in place and keeps it."""
    import errno
    import fcntl

    from data_prep.shardwriter import remove_abandoned

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live, _ = _writer(tmp_path)
    other, _ = _writer(tmp_path)
    nbytes, sha = other.commit()
    assert remove_abandoned(live.tmp) and not live.tmp.exists()
    assert live.commit() == (nbytes, sha)
    assert file_sha256(tmp_path / f"{SPLIT}-000000.tar") == sha and temporaries(tmp_path) == []
