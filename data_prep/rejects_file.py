"""``OUT/rejects.jsonl``: one JSON object per input left out, naming its split; ``finalize`` writes the lines of
the splits it writes and keeps the others'. Read by ``finalize`` (which lines to keep) and by ``verify``, which
counts each split's lines against the manifest's ``rejected``: a file cut at a line boundary, or lines removed
by hand, still parses, and the reasons of the inputs left out were lost without a word.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.wording import plural

from .errors import PrepError
from .format import MANIFEST_NAME, REJECTS_NAME, WORK_DIR


def write_again(out: Path) -> str:
    """What writes the file again: finalize, from the splits' records under OUT/.work."""
    return (f"run `python -m data_prep finalize {out}`: it writes the lines of the splits planned under "
            f"{out / WORK_DIR} again")


def read_rejects(path: Path) -> list[dict]:
    """The lines of ``rejects.jsonl``, each a JSON object naming its split (finalize keeps those of the other
    splits); a PrepError naming the first line that is not, or a file that is not text: finalize cannot tell
    whose it is, so it cannot keep or replace it."""
    if not path.exists():
        return []
    again = write_again(path.parent)
    fix = f"remove that line, or the file and then {again}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrepError(f"{path}: not UTF-8 text (edited by hand?); remove it and then {again}") from None
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise PrepError(f"{path}:{lineno}: not a JSON line (edited by hand, or cut short?); {fix}") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("split"), str)):
            raise PrepError(f"{path}:{lineno}: not a JSON object with a string 'split' (edited by hand?); {fix}")
        lines.append(rec)
    return lines


def count_problems(out: Path, manifest: dict) -> list[str]:
    """One line per split of `manifest` whose ``rejected`` is not its number of lines in ``OUT/rejects.jsonl``
    (a split without ``rejected``, written before it was kept, is not counted), or the line saying why the
    file cannot be read."""
    path = out / REJECTS_NAME
    try:
        lines = read_rejects(path)
    except PrepError as exc:
        return [str(exc)]
    there = "" if path.exists() else " (the file is not there)"
    problems = []
    for split, entry in manifest["splits"].items():
        listed = sum(1 for line in lines if line["split"] == split)
        if "rejected" in entry and listed != entry["rejected"]:
            problems.append(f"{path}: {plural(listed, 'line')} of split {split!r}{there}, but {out / MANIFEST_NAME} "
                            f"says it rejected {entry['rejected']} (splits.{split}.rejected) (cut short, or edited by "
                            f"hand?); {write_again(out)}")
    return problems
