"""The steps the tests of a broken work record (a split's plan, a shard's done-record) share: two array tasks of a
split beside a single run of it (what the repaired output must equal), and finalize's one-line error for each way
the record is broken. The tests keep what differs: what the line says and how a rerun repairs the record."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from data_prep.cli import main

COMMON = ["--split", "train", "--samples-per-shard", "8", "--workers", "1", "--no-progress"]
PREFIX = "python -m data_prep: error: "


def array_and_single(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(OUT of array tasks 0 and 1 of 2 of split train, not finalized; OUT of a single run of it)."""
    out, single = tmp_path / "array", tmp_path / "single"
    assert main(["imagefolder", str(tree), str(single), *COMMON]) == 0
    for i in (0, 1):
        assert main(["imagefolder", str(tree), str(out), *COMMON, "--task-index", str(i), "--num-tasks", "2"]) == 0
    return out, single


def finalize_errors(out: Path, record: Path, what: str, cases: list[tuple[str, str]], fix: str,
                    capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[str, str]]:
    """For each (what the error says, a text) of `cases`, with `record` holding that text: finalize of `out`
    ends with exit 2 and one error line, ``RECORD: WHAT SAYS...; FIX``, writing no manifest; yields (what it
    says, the line without its prefix) for the caller's further checks."""
    capsys.readouterr()
    for says, text in cases:
        record.write_text(text)
        assert main(["finalize", str(out)]) == 2, says
        err = capsys.readouterr().err
        assert err.startswith(f"{PREFIX}{record}: {what} {says}") and err.endswith(f"; {fix}\n"), err
        assert err.count("\n") == 1 and not (out / "manifest.json").exists(), err
        yield says, err[len(PREFIX):-1]


def rerun_task_1(tree: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Rerun array task 1 of 2 into `out` (the repair the tests check); its stderr."""
    capsys.readouterr()
    assert main(["imagefolder", str(tree), str(out), *COMMON, "--task-index", "1", "--num-tasks", "2"]) == 0
    return capsys.readouterr().err
