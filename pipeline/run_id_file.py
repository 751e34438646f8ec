"""``RUN/wandb_run_id``: a run directory's W&B run id, made once and read by every start, so W&B continues
one run across requeues and resumes. The launcher reads it (and exports it as WANDB_RUN_ID), ``fit`` reads it
where no launcher did: one reader and one writer for both, and no Lightning here (the launcher imports it).
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from pipeline.run_layout import RUN_ID_FILE

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what W&B takes as a run id


class BadRunIdFile(ValueError):
    """The file holds no run id (empty: a write cut short by an older version; edited by hand; not text).
    Used, an empty id would start a new W&B run at every start of the job."""

    def __init__(self, path: Path, text: str) -> None:
        super().__init__(f"{path}: {text[:40]!r} is not a W&B run id (1-64 letters, digits, _ . -)")
        self.path, self.text = path, text


def read_run_id(run_dir: str | Path) -> str | None:
    """The run directory's id; None when it has no id file yet; ``BadRunIdFile`` for a file without an id."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists() and not path.is_file():  # a directory of that name: never an id, nor replaceable by one
        raise BadRunIdFile(path, f"<a {'directory' if path.is_dir() else 'non-regular file'}>")
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip()
    if not RUN_ID_PATTERN.match(text):
        raise BadRunIdFile(path, text)
    return text


def create_run_id(run_dir: str | Path, run_id: str) -> str:
    """Keep `run_id` as the run directory's id unless it has one already; returns the id it has then. The
    file appears whole (written aside, then hard-linked into place, so the first of concurrent writers wins):
    created empty and written after, a kill in between left an empty id."""
    path = Path(run_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        with open(tmp, "w") as f:
            f.write(run_id + "\n")
            f.flush()
            os.fsync(f.fileno())  # on the disk before its name: a node that crashes leaves it whole or absent
        try:
            os.link(tmp, path)
        except FileExistsError:  # another rank's, or another start's
            pass
        except OSError:  # a file system without hard links: whole still, but not first-wins
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    made = read_run_id(run_dir)
    assert made is not None
    return made
