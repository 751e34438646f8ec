"""Ranks that disagree at start (another copy of the shards, another setting, another software version on one
node) stop at once, every one of them, with one line naming what differs; two copies of the same shards at
two paths train. Two ranks as two one-rank "nodes" on this machine (gloo), each with its own command line and
environment, as srun or two torchrun agents start them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.rank_agreement import digests, disagreement, flat_settings, ranks_text
from tests.conftest import run_module
from tests.two_nodes import demo_args, fit_as_two_nodes

TIMEOUT_S = 240  # a hang (ranks planning different epochs) ends here, as a failure


def _two_ranks(run_dir: Path, roots: tuple[Path, Path], extra: tuple[list[str], list[str]] = ([], []),
               env: tuple[dict, dict] = ({}, {})) -> list[subprocess.CompletedProcess]:
    """``fit`` as ranks 0 and 1 of two one-rank nodes, rank i reading ``roots[i]`` with ``extra[i]`` added to
    its command line and ``env[i]`` to its environment."""
    args = tuple(demo_args(roots[rank], run_dir, "--trainer.max_steps", "2", *extra[rank]) for rank in (0, 1))
    return fit_as_two_nodes(args, env, TIMEOUT_S)


def _one_line_each(runs: list[subprocess.CompletedProcess], start: str) -> str:
    """Both ranks exit 2 with the same one ``error:`` line starting with ``start`` and no traceback; the line."""
    lines = []
    both = "\n".join(f"rank {rank} (exit {r.returncode}):\n{r.stderr[-3000:]}" for rank, r in enumerate(runs))
    for r in runs:
        assert r.returncode == 2, both
        assert "Traceback" not in r.stderr, both
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(start), both
        lines.append(errors[0])
    assert lines[0] == lines[1]
    return lines[0]


@pytest.fixture(scope="module")
def copies(digits_shards: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The digits shards copied to another path, and shards of another data_prep run over nine in ten of the
    training images (a stale or partial copy: fewer samples, each shard whole)."""
    base = tmp_path_factory.mktemp("copies")
    same = base / "same"
    shutil.copytree(digits_shards, same)
    from pipeline.demo_data import write_digits

    images = base / "images"
    write_digits(images)
    for i, path in enumerate(sorted(p for p in (images / "train").rglob("*") if p.is_file())):
        if i % 10 == 9:
            path.unlink()
    other = base / "other"
    for split in ("train", "val"):
        run_module("data_prep", "imagefolder", str(images / split), str(other), "--split", split,
                   "--samples-per-shard", "500", "--workers", "1")
    return same, other


def test_ranks_reading_other_shards_stop_at_once_with_one_line(digits_shards, copies, tmp_path) -> None:
    runs = _two_ranks(tmp_path / "run", (digits_shards, copies[1]))
    line = _one_line_each(runs, "error: ranks disagree on the dataset: rank 0 (")
    assert f"read {digits_shards} with 1434 train samples in 3 shards, rank 1 (" in line, line
    assert f"read {copies[1]} with 1291 in 3 shards: every rank must read the same shards" in line, line
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_two_copies_of_the_same_shards_train(digits_shards, copies, tmp_path) -> None:
    runs = _two_ranks(tmp_path / "run", (digits_shards, copies[0]))
    for rank, r in enumerate(runs):
        assert r.returncode == 0, f"rank {rank}:\n{r.stderr[-4000:]}"
    assert "rank agreement: 2 ranks read the same data with the same settings, code and software" in runs[0].stderr
    assert "weight parity: identical on 2 ranks" in runs[0].stderr, runs[0].stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_setting_given_to_one_rank_stops_both(digits_shards, tmp_path) -> None:
    runs = _two_ranks(tmp_path / "run", (digits_shards, digits_shards), extra=([], ["--model.lr", "0.2"]))
    line = _one_line_each(runs, "error: ranks disagree on the settings: rank 0 (")
    assert "has model.lr 0.1, rank 1 (" in line and ") model.lr 0.2: every rank must start with the same" in line, line


def test_another_library_version_on_one_rank_stops_both(digits_shards, tmp_path) -> None:
    """Rank 1's Python sees another webdataset (a node-local environment), through a sitecustomize that its
    PYTHONPATH alone holds."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n"
        "_real = m.version\n"
        "m.version = lambda name: '0.1.0' if name == 'webdataset' else _real(name)\n")
    runs = _two_ranks(tmp_path / "run", (digits_shards, digits_shards), env=({}, {"PYTHONPATH": str(site)}))
    line = _one_line_each(runs, "error: ranks disagree on the software: rank 0 (")
    assert ") webdataset 0.1.0: every rank must run the same software" in line, line
    assert "runs webdataset " in line and "webdataset 0.1.0" not in line.split("rank 1")[0], line


# ---- the line, without processes ----------------------------------------------------------------------------

def _full(samples: int, shards: int, root: str, lr: float = 0.1) -> dict:
    return {"software": {"torch": "2.14.1"}, "code": {"root": "/code", "sha256": "ab" * 32, "version": "0.1"},
            "settings": {"model.lr": str(lr)},
            "dataset": {"root": root, "classes": "c", "splits": [
                {"split": "train", "samples": samples, "shards": shards, "sha256": f"{samples}-{shards}"}]}}


def test_the_line_groups_ranks_by_node() -> None:
    full = [_full(1281167, 1024, "data/imagenet")] * 8 + [_full(1281000, 1023, "/local/imagenet")] * 8
    hosts = ["node1"] * 8 + ["node2"] * 8
    line = disagreement([digests(f) for f in full], full, hosts)
    assert line == ("ranks disagree on the dataset: ranks 0-7 (node1) read data/imagenet with 1281167 train samples "
                    "in 1024 shards, ranks 8-15 (node2) read /local/imagenet with 1281000 in 1023 shards: every "
                    "rank must read the same shards (a partial or stale copy on node2, or another data_prep run?)")


def test_the_same_shards_at_other_paths_agree_and_settings_name_the_first_difference() -> None:
    full = [_full(10, 1, "/a"), _full(10, 1, "/b")]
    assert disagreement([digests(f) for f in full], full, ["h1", "h2"]) is None
    full = [_full(10, 1, "/a"), _full(10, 1, "/a", lr=0.2), _full(10, 1, "/a")]
    line = disagreement([digests(f) for f in full], full, ["h1", "h2", "h1"])
    assert line.startswith("ranks disagree on the settings: ranks 0, 2 (h1) have model.lr 0.1, rank 1 (h2) "
                           "model.lr 0.2: "), line


def test_ranks_text() -> None:
    assert ranks_text([3], ["n2"]) == "rank 3 (n2)"
    assert ranks_text([0, 1, 2, 3, 8, 9], ["a"] * 4 + ["c"] * 2) == "ranks 0-3, 8-9 (a, c)"


def test_per_node_settings_are_left_out() -> None:
    config = {"config": ["/x/a.yaml"], "data": {"root": "/local/x", "num_workers": 8, "seed": 1},
              "trainer": {"devices": 4, "default_root_dir": "/mnt/run", "max_steps": 10},
              "ckpt_path": "/mnt/run/checkpoints/last.ckpt"}
    flat = flat_settings(config, "/mnt/run")
    assert flat == {"data.seed": "1", "trainer.max_steps": "10", "ckpt_path": '"RUN/checkpoints/last.ckpt"'}


def test_the_same_counts_from_another_data_prep_run_differ(digits_shards, tmp_path) -> None:
    """Shards of the same names and counts whose recorded sha256 differ (another data_prep run, another seed):
    another dataset, from the manifest alone (the tars are not read)."""
    import json

    from pipeline.datamodule import ShardDataModule
    from pipeline.rank_agreement import dataset

    other = tmp_path / "other"
    shutil.copytree(digits_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    sets = [dataset(ShardDataModule(root=str(root), backend="cpu"), "fit") for root in (digits_shards, other)]
    full = [{**_full(1, 1, "/x"), "dataset": d} for d in sets]
    line = disagreement([digests(f) for f in full], full, ["h1", "h2"])
    assert line == (f"ranks disagree on the dataset: rank 0 (h1) read {digits_shards} with 1434 train samples in 3 "
                    f"shards, rank 1 (h2) read {other} with the same counts in other shards: every rank must read the "
                    f"same shards (a partial or stale copy on h2, or another data_prep run?)"), line


def test_a_rank_that_resumes_and_one_that_starts_anew_are_told_so() -> None:
    """``--ckpt_path last`` (every launch passes it) is the run directory's checkpoint where a rank finds one,
    else none: a node that does not see it starts the run anew. Not another command line or config file."""
    settings = [flat_settings({"model": {"lr": 0.1}, "ckpt_path": ckpt}, "/mnt/run")
                for ckpt in ("/mnt/run/checkpoints/last.ckpt", None)]
    full = [{**_full(10, 1, "/a"), "settings": s} for s in settings]
    line = disagreement([digests(f) for f in full], full, ["node1", "node2"])
    assert line == ('ranks disagree on the settings: rank 0 (node1) has ckpt_path "RUN/checkpoints/last.ckpt", '
                    "rank 1 (node2) ckpt_path null: every rank must start from the same checkpoint (the run "
                    "directory's checkpoint found on one node and not on another: another run directory there, or "
                    "a shared file system that shows it late?)"), line


def test_another_checkout_names_the_files_that_differ(tmp_path) -> None:
    """The code line names the source files that differ, or that one side alone has (another checkout: which
    file to look at), not only two digests."""
    from pipeline.rank_agreement import code_digest, code_files

    codes = []
    for side, extra in (("a", "x = 1\n"), ("b", "x = 2\n")):
        root = tmp_path / side
        for package in ("pipeline", "data_prep"):
            (root / package).mkdir(parents=True)
            (root / package / "__init__.py").write_text("")
        (root / "pipeline" / "cli.py").write_text(extra)
        if side == "b":
            (root / "pipeline" / "scratch.py").write_text("")
        files = code_files(root)
        codes.append({"root": str(root), "sha256": code_digest(files), "files": files, "version": "0.1"})
    assert codes[0]["files"]["pipeline/__init__.py"] == codes[1]["files"]["pipeline/__init__.py"]
    full = [{**_full(10, 1, "/a"), "code": c} for c in codes]
    line = disagreement([digests(f) for f in full], full, ["node1", "node2"])
    assert line.startswith(f"ranks disagree on the code: rank 0 (node1) runs the code in {codes[0]['root']} "), line
    assert (" (pipeline/cli.py differs; pipeline/scratch.py only on rank 1): every rank must run the same code"
            in line), line
