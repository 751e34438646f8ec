"""The loaders' batches in shared memory (``/dev/shm``), and what to say when there is not enough.

A DataLoader worker hands each batch to the trainer through shared memory. Left to torch, the batch is
copied there by the worker's queue feeder thread; when ``/dev/shm`` is full (Docker gives a container
64 MB unless told otherwise) that thread prints a traceback and drops the batch, and the trainer waits
for it forever. So a worker allocates its batch in shared memory itself (``shared_empty``): a full
``/dev/shm`` raises there, and the trainer stops with one line saying what to change.

DALI's source workers (``data.dali_source_workers``) write every batch's samples into shared memory chunks
that DALI maps when the pipeline starts; on a full ``/dev/shm`` the write is a SIGBUS, which killed the
worker (a one-line message from the watchdog) or the training process itself, with no word at all
(exit 135). So the DALI loader refuses to start its workers where ``/dev/shm`` lacks the room they will
fill (``dali_shortage``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.data.open_files import out_of_file_descriptors
from pipeline.wording import plural

SHM = "/dev/shm"


class SharedMemoryError(RuntimeError):
    """A loader worker could not allocate a batch in shared memory; the message says how much there is and
    what to change."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def shm_space(path: str = SHM) -> tuple[int, int] | None:
    """(size, free) of ``path`` in bytes, or None where it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


# what to change, said by every message here: the container's /dev/shm, or what the backend keeps in it
MORE_SHM = "give the container more (docker run --shm-size=16g, or --ipc=host)"
BATCH = "the batch size (data.batch_size, data.val_batch_size)"
LOWER = {"cpu": f"lower data.num_workers or {BATCH}",
         "dali": f"lower data.dali_source_workers (0: the samples are read in the training process) or {BATCH}"}


def advice(path: str = SHM, backend: str = "cpu") -> str:
    """What to change, for the loader ``backend`` (``data.backend``) that ran out of ``path``."""
    space = shm_space(path)
    where = f"{path}: {_mib(space[0])}, {_mib(space[1])} free" if space else path
    who = "DALI's source workers" if backend in ("dali", "dali-cpu") else "the cpu loader's workers"
    return (f"{who} pass their batches through shared memory ({where}); {MORE_SHM}, or "
            f"{LOWER['dali' if backend in ('dali', 'dali-cpu') else 'cpu']}")


def _lacking(need: int, path: str) -> tuple[int, int] | None:
    """(size, free) of ``path`` when it has less than ``need`` bytes free; None when it has room (or cannot
    be read)."""
    space = shm_space(path)
    return space if space is not None and space[1] < need else None


def dali_shortage(batches: int, batch: int, sample_bytes: float, workers: int, ranks_here: int,
                  path: str = SHM, held: int = 0, held_by: str = "") -> str | None:
    """The error when ``path`` has less room than DALI's source workers will fill: ``batches`` chunks in
    flight per rank (the pipeline's prefetch queue and the source's), each written with a batch of ``batch``
    samples of ``sample_bytes`` on average, for each of the ``ranks_here`` ranks on this machine; None when
    it has room (or cannot be read). What DALI maps is larger (it sizes a chunk for 1.5x the mean sample,
    and at least 1 MiB), but a page of tmpfs is taken when written: the written bytes are what must fit.
    This rank's share is checked against what is free, all ranks' against the size: the other ranks' chunks
    may be written already (a rank that starts later, a pipeline rebuilt after a corrupt sample), and taken
    off the free space they were counted twice, which refused a node whose /dev/shm holds them all.
    ``held``: the bytes of this rank's other live DALI loader (``held_by``: training and validation run side by
    side, each with its own workers), counted in the size with this one's; its written chunks are off the free
    space already."""
    own = int(batches * batch * sample_bytes)
    need = (own + held) * ranks_here
    space = shm_space(path)
    if space is None or (space[1] >= own and space[0] >= need):
        return None
    mine = f"{batches} batches in flight x {batch} samples of {sample_bytes / 1024:.1f} KiB"
    if held:
        mine = f"({mine}) + {_mib(held)} of the {held_by or 'other'} loader's"
    return (f"out of shared memory: DALI's {plural(workers, 'source worker')} per rank (data.dali_source_workers) "
            f"fill about {_mib(need)} of {path} ({plural(ranks_here, 'rank')} x {mine}), which has {_mib(space[1])} free of "
            f"{_mib(space[0])}, and a write to a full {path} kills the process (SIGBUS); {MORE_SHM}, or "
            f"{LOWER['dali']}")


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype, **kwargs: Any) -> torch.Tensor:
    """``torch.empty`` in shared memory (what a worker's queue would copy it into anyway). Raises
    ``SharedMemoryError`` when there is no room."""
    try:
        return torch.empty(shape, dtype=dtype, **kwargs).share_memory_()
    except RuntimeError as e:
        if out_of_file_descriptors(e) or ("shared memory" not in str(e) and "shm" not in str(e)):
            raise  # the limit of open files is said by the CLI (open_files_advice)
        raise SharedMemoryError(f"out of shared memory: {str(e).strip()}; {advice()}") from None


def semaphore_error(error: OSError) -> bool:
    """Whether ``error`` came from creating a multiprocessing lock or queue (a file in ``/dev/shm``): its
    ``No space left on device`` names no file, and the disk it means is ``/dev/shm``, not the run's."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "synchronize.py")):
            return True
        tb = tb.tb_next
    return False


def batch_bytes(batch: int, size: int) -> int:
    """Shared memory of one cpu-loader batch: uint8 images, int64 labels, bool mask, each in whole pages."""
    page = 4096
    return sum(-(-n // page) * page for n in (batch * 3 * size * size, batch * 8, batch))


def shortage(batch: int, size: int, workers: int, ranks_here: int, prefetch: int = 2,
             path: str = SHM) -> str | None:
    """A warning when ``path`` has less room than the loader's workers may fill: ``prefetch`` batches per
    worker (the DataLoader's prefetch_factor) and the one in use, for each rank on this machine; None when
    it has room (or cannot be read)."""
    need = (prefetch * workers + 1) * batch_bytes(batch, size) * ranks_here
    if (space := _lacking(need, path)) is None:
        return None
    return (f"warning: {path} has {_mib(space[1])} free of {_mib(space[0])}, and the cpu loader may hold "
            f"{_mib(need)} of batches there ({plural(ranks_here, 'rank')} x {plural(workers, 'worker')} x "
            f"{prefetch} prefetched + 1, batches "
            f"of {batch} at {size} px): a full {path} stops the run; {MORE_SHM}, or {LOWER['cpu']}")
