"""Counts with their nouns on the console: "1 shard", "2 shards", never "1 shards" or "shard(s)"."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_prep.errors import PrepError
from data_prep.sources import list_source
from pipeline.errors import ConfigError
from pipeline.optim import schedule_against_run
from pipeline.wording import plural

REPO = Path(__file__).resolve().parents[1]


def test_plural() -> None:
    assert plural(1, "shard") == "1 shard"
    assert [plural(n, "shard") for n in (0, 2, 12)] == ["0 shards", "2 shards", "12 shards"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
    assert plural(1, "micro-batch", "micro-batches") == "1 micro-batch"
    assert plural(12_000, "sample", grouped=True) == "12,000 samples" and plural(1, "sample", grouped=True) == "1 sample"


def test_the_helper_imports_nothing_heavy() -> None:
    """data_prep and launch import it on login nodes."""
    code = "import sys, pipeline.wording; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("files, said", [(1, "after 1 file: "), (2, "after 2 files: ")])
def test_a_cut_archive_counts_the_files_before_the_cut(tmp_path: Path, files: int, said: str) -> None:
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(files):
            (tmp_path / f"{i}.jpg").write_bytes(b"x" * 100)
            tf.add(tmp_path / f"{i}.jpg", arcname=f"a/{i}.jpg")
    with tarfile.open(src) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + 512  # the last member's data, one block: no end-of-archive marker after it
    for extra, where in ((0, "the archive ends there"), (1, "the archive ends 1 byte later"),
                         (2, "the archive ends 2 bytes later")):
        src.write_bytes(src.read_bytes()[:end] + bytes(extra) if extra else src.read_bytes()[:end])
        with pytest.raises(PrepError) as e:
            list_source(src)
        assert f"{said}{where} without its end-of-archive marker" in str(e.value), str(e.value)


@pytest.mark.parametrize("total, said", [(1, "(1 step)"), (2, "(2 steps)")])
def test_the_schedule_counts_the_runs_steps(total: int, said: str) -> None:
    warned = schedule_against_run(total, total, [total], "step", 0, 10)
    assert warned[0].startswith(f"the warm-up ({plural(total, 'optimizer step')}) is not shorter than the run {said}:")
    assert f"come at or after the run's end {said}: never reached" in warned[1]
    assert "(1 optimizer step)" in schedule_against_run(1, 1, [], "cosine", 0, 10)[0]


@pytest.mark.parametrize("world, said", [(1, "(1 rank x data.batch_size 2048"), (2, "(2 ranks x data.batch_size 2048")])
def test_a_split_smaller_than_one_global_batch_counts_the_ranks(digits_shards, world: int, said: str) -> None:
    from pipeline.datamodule import ShardDataModule

    dm = ShardDataModule(str(digits_shards), backend="cpu", batch_size=2048, num_workers=0)
    with pytest.raises(ConfigError) as e:
        dm.check_one_global_batch(world, 1)
    assert f"has 1434 samples, fewer than one global batch {said}" in str(e.value), str(e.value)
