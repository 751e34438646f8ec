"""One small real-photo split, prepared once uninterrupted: what the tests of concurrent and killed data_prep
writers compare OUT with (tests/test_prep_concurrent_writers.py, tests/test_data_prep_stale_temporaries.py)."""
from __future__ import annotations

from pathlib import Path

from data_prep.cli import main
from tests.fixtures_images import write_imagefolder

SPLIT = "val"
ARGS = ["--split", SPLIT, "--workers", "1", "--samples-per-shard", "3", "--max-side", "24", "--no-progress"]
SHARDS = 6  # 18 images, 3 per shard


def outputs(out: Path) -> dict[str, bytes]:
    """Every visible file of OUT (shards, indexes, columns, manifest, rejects) by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


def photo_folder(tmp_path_factory) -> Path:
    """Three classes of six real photos (scikit-learn's sample images): 18 images, SHARDS shards."""
    root = tmp_path_factory.mktemp("src")
    write_imagefolder(root, ["ant", "bee", "cat"], per_class=6)
    return root


def clean_outputs(src: Path, tmp_path_factory) -> dict[str, bytes]:
    """The outputs of one uninterrupted run, alone; it leaves no temporary file."""
    out = tmp_path_factory.mktemp("clean") / "o"
    assert main(["imagefolder", str(src), str(out), *ARGS]) == 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    return outputs(out)
