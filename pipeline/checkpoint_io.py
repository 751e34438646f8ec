"""Atomic checkpoint files: a kill or an error during a save leaves the previous checkpoint intact.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the
system temp directory; on commit it is *moved*, which is a copy (not atomic) when the run directory is on
another file system (the usual case on a cluster: /tmp is local, runs are on a shared FS), and nothing is
fsynced. Here the bytes go to a temporary file next to the target, are fsynced, then ``os.replace``d over
the target (atomic on POSIX), and the directory entry is fsynced.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

TMP_PREFIX = ".tmp-"


def atomic_write_bytes(data: bytes | memoryview, path: str | Path) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, then an atomic replace of the checkpoint file (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # a failure here never touches the file system
        atomic_write_bytes(buffer.getbuffer(), path)
