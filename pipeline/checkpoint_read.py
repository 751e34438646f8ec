"""Reading a checkpoint for its settings and trainer state before the trainer exists: a file, or rank 0's
model states in a DeepSpeed checkpoint directory, memory-mapped; a missing, torn or foreign one is a
``ConfigError`` naming the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.deepspeed_layout import find_model_states, refuse_folder_of_checkpoints
from pipeline.errors import ConfigError


def checkpoint_file(path: str | Path) -> Path:
    """The file holding the trainer state: the path itself, or inside a DeepSpeed checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        refuse_folder_of_checkpoints(p)
        states = find_model_states(p)
        if states is None:
            raise ConfigError(f"checkpoint directory {p} holds no DeepSpeed model states")
        return states
    return p


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, memory-mapped (cheap even for large checkpoints; tensors load lazily)."""
    f = checkpoint_file(path)
    try:
        return torch.load(f, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torn or foreign file
        raise ConfigError(f"cannot read checkpoint {f}: {unreadable(f, e)}") from None


def verify_checkpoint(path: str | Path) -> None:
    """Check every record of the checkpoint (a file, or each file of a DeepSpeed directory: for one process,
    as ``export``; a rank gives its ``checkpoint_file``) against the CRC-32
    torch wrote with it: torch reads none of them, so a bit flipped on disk or in a copy loaded without a word
    and trained or scored other weights (a val top-1 of 0.25 from a network at 0.54). Reads the whole file
    once (0.15 s for 256 MB here; the page cache serves the load after it). ConfigError naming the file and
    record."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if not zipfile.is_zipfile(f):  # a legacy torch file, a DeepSpeed JSON: no CRCs to check
            continue
        name = ""
        try:
            with zipfile.ZipFile(f) as z:
                for info in z.infolist():
                    name = info.filename
                    if info.CRC == 0:  # written with torch's CRC-32 off (or an empty record): nothing to compare
                        continue
                    with z.open(info) as record:
                        while record.read(1 << 22):
                            pass
        except (zipfile.BadZipFile, EOFError) as e:  # EOFError: a record cut short under a whole directory
            what = (f"its record {name} does not match the CRC-32 written with it" if "CRC" in str(e) else
                    f"its record {name} is cut short" if isinstance(e, EOFError) else str(e))
            raise ConfigError(f"checkpoint {f} is damaged: {what} (a bit flipped on disk or in a copy); use another "
                              "checkpoint, or copy this one again from where it came from") from None
        except OSError as e:
            raise ConfigError(f"cannot read checkpoint {f}: {e.strerror or e}") from None


def unreadable(f: str | Path, error: BaseException) -> str:
    """Why torch could not load the file ``f``, in words: torch and pickle say "Ran out of input", "Memo value
    not found at index 101", "[Errno 22] Invalid argument" or a paragraph about miniz for an empty, foreign or
    cut-short file."""
    if Path(f).is_file() and Path(f).stat().st_size == 0:
        return "an empty file"
    torn = isinstance(error, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile)) or \
        any(w in str(error) for w in ("zipfile", "mmap", "Invalid argument", "PytorchStreamReader"))  # EINVAL: mmap
    return "not a torch checkpoint, or torn (a copy cut short?)" if torn else str(error).splitlines()[0]
