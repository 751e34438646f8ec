"""Build the shards of a plan with worker processes; resumable and sliceable into array tasks.

Each shard is written to ``.tmp`` files and renamed into place; a done-record under
``OUT/.work/<split>/`` (written last) is what marks it complete. A rerun skips shards whose
done-record matches the plan and whose tar still has the recorded size and sha256
(``done_records.reusable_record``).
"""
from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.parent_death import signal_when_parent_ends
from pipeline.wording import plural

from .done_records import READ_FAILURE, reusable_record
from .errors import PrepError
from .format import done_record_path, index_name, shard_name
from .plan import ShardJob, sample_key
from .progress import Progress
from .shardwriter import ShardWriter, claim_temporary, file_sha256
from .sources import read_ref
from .validate import EncodeOptions, process_image


_images = None
_bytes = None
_kept = None


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temp file + os.replace so readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) via a temp file + os.replace so readers never see half a file (``write_bytes_atomic``)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` via a temp file + os.replace so readers never see half a file. The temp name is random,
    not per process id: array tasks on several nodes or containers can share a pid and write the same
    plan.json at once. Created as a plain open would (mode 0666 less the umask). A failed write (disk
    full: the error of write() names no file) is a PrepError naming ``path``; the temp file is removed. The
    temp file is fsynced before the rename: NFS and Lustre may report a failed write (the quota, an I/O error)
    only at fsync, after which a done-record or manifest whose bytes never reached the server was in place.

    The temp file (``.NAME.<16 hex>.tmp``, ``TEMP_NAME``) is held open, with an ``flock`` on it
    (``shardwriter.claim_temporary``), until it is renamed: a ``kill -9`` leaves it behind, and the finalize of
    the split removes such leftovers (``manifest._remove_abandoned_temporaries``) but none a live writer holds
    (another command writing the same done-record at once). Where the file system has no working locks such a
    cleanup may remove a live writer's temp file anyway: its rename then finds none, and it writes once more."""
    try:
        for attempt in range(2):
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    claim_temporary(f.fileno())
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    try:
                        os.replace(tmp, path)  # still open, so still locked: renamed, never removed, by a cleanup
                        return
                    except FileNotFoundError:
                        if attempt or not path.parent.is_dir():
                            raise
                        # removed by another command's cleanup that could not see the lock: written again
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise PrepError(f"{path}: cannot write: {exc.strerror or exc}") from None


TEMP_NAME = r"\.(?P<name>.+)\.[0-9a-f]{16}\.tmp"  # write_bytes_atomic's temp file of NAME (a regex, unanchored)


def _init_worker(images, nbytes, kept=None) -> None:
    global _images, _bytes, _kept
    _images, _bytes, _kept = images, nbytes, kept


def _count(images: int, nbytes: int, kept: bool = False) -> None:
    """Images done (and their input bytes); ``kept``: of a shard an earlier run finished, counted as done but
    not in the progress line's rate (a rerun that kept every shard said 251449.0 img/s)."""
    if _images is not None:
        with _images.get_lock():
            _images.value += images
        with _bytes.get_lock():
            _bytes.value += nbytes
        if kept and _kept is not None:
            with _kept.get_lock():
                _kept.value += images


def build_shard(out: Path, job: ShardJob, opts: EncodeOptions) -> tuple[dict, bool]:
    """Write one shard (or reuse a verified one) and its done-record; return the record and whether it
    was reused."""
    rec = reusable_record(out, job.split, shard_name(job.split, job.number), job.plan_hash)
    if rec is not None:
        _count(len(job), 0, kept=True)
        return rec, True
    entries = job.entries  # built once: the parent's jobs hold only indices
    name, idx = shard_name(job.split, job.number), index_name(job.split, job.number)
    try:
        writer = ShardWriter(Path(out) / name, Path(out) / idx)
    except OSError as exc:
        raise PrepError(f"{Path(out) / name}: cannot write shard: {exc.strerror or exc}") from None
    rejects = []
    sources = []
    planned: dict[int, int] = {}  # per label: the shard's inputs, and those written (finalize's per-class counts)
    written: dict[int, int] = {}
    handles: dict = {}
    pending_n = pending_b = 0
    try:
        for index, display, ref, label in entries:
            key = sample_key(job.split, index)
            planned[label] = planned.get(label, 0) + 1
            try:
                data = read_ref(ref, handles)
            except OSError as exc:
                rejects.append({"path": display, "reason": f"{READ_FAILURE}{exc}"})  # read again by a rerun
                pending_n += 1
                continue
            try:
                jpeg, reason = process_image(data, opts)
            except Exception as exc:  # a decoder bug on one odd file must not stop the run
                jpeg, reason = None, f"unexpected decoder error: {type(exc).__name__}: {exc}"
            if reason is None:
                writer.add(key, jpeg, label)
                sources.append([key, display])
                written[label] = written.get(label, 0) + 1
            else:
                rejects.append({"path": display, "reason": reason})
            pending_n += 1
            pending_b += len(data)
            if pending_n >= 64:
                _count(pending_n, pending_b)
                pending_n = pending_b = 0
        nbytes, sha = writer.commit()
    except OSError as exc:  # reading errors are rejects above: this is the output (disk full, read-only)
        writer.abort()
        raise PrepError(f"{Path(out) / name}: cannot write shard: {exc.strerror or exc}") from None
    except BaseException:
        writer.abort()
        raise
    finally:
        for f in handles.values():
            f.close()
    _count(pending_n, pending_b)
    rec = {"name": name, "index": idx, "samples": writer.samples, "bytes": nbytes, "sha256": sha,
           "index_sha256": file_sha256(Path(out) / idx),
           "plan_hash": job.plan_hash, "planned": len(entries), "rejects": rejects, "sources": sources,
           "labels": [[label, planned[label], written.get(label, 0)] for label in sorted(planned)]}
    write_json_atomic(done_record_path(out, job.split, name), rec)
    return rec, False


def _build_star(args) -> tuple[dict, bool]:
    return build_shard(*args)


def run_jobs(out: Path, jobs: list[ShardJob], opts: EncodeOptions, workers: int,
             show_progress: bool = True, label: str = "data_prep") -> list[dict]:
    """Build `jobs` with `workers` processes (in-process for 1); records come back in job order.

    Workers are spawned, not forked, so they do not inherit the parent's (dataset-sized) plan;
    each receives only its own shard's entries. A rerun says how many shards it found complete.
    """
    ctx = mp.get_context("spawn")
    images, nbytes, kept = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0)
    total = sum(len(j) for j in jobs)
    records: dict[int, dict] = {}
    reused = 0
    with Progress(total, images, nbytes, label, enabled=show_progress, kept=kept):
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(images, nbytes, kept)
            try:
                for j in jobs:
                    records[j.number], was_reused = build_shard(out, j, opts)
                    reused += was_reused
            finally:
                _init_worker(None, None)
        else:
            tasks = ((out, j, opts) for j in jobs)
            for (rec, was_reused), j in zip(map_in_processes(_build_star, tasks, min(workers, len(jobs)), ctx,
                                                             _init_worker, (images, nbytes, kept), "building shards"),
                                            jobs):
                records[j.number] = rec
                reused += was_reused
    if reused:
        print(f"{label}: {reused} of {plural(len(jobs), 'shard')} {'was' if reused == 1 else 'were'} complete from an "
              f"earlier run and kept, "
              f"{len(jobs) - reused} built", file=sys.stderr)
    return [records[j.number] for j in jobs]


def _start_worker(parent: int, initializer, initargs: tuple) -> None:
    """A worker ends with the run: after a ``kill -9`` of the parent (or the out-of-memory killer) its
    workers stayed, blocked for good writing a result to the dead parent, holding their memory."""
    if signal_when_parent_ends(getattr(signal, "SIGKILL", signal.SIGTERM), parent) is False:  # (no SIGKILL: Windows)
        os._exit(1)  # the parent ended before the request: no signal will come
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def _interrupts_for_the_parent() -> Iterator[None]:
    """SIGINT blocked while workers start: they keep the mask for good (it is inherited through exec), so a Ctrl-C
    is the parent's alone, delivered to it as the block ends (none is lost), and the parent ends the workers.
    A worker that got it while still importing printed a KeyboardInterrupt traceback above the one-line
    "interrupted" of the parent."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def map_in_processes(fn: Callable[[Any], Any], items: Iterable, workers: int, ctx, initializer=None,
                     initargs: tuple = (), doing: str = "working") -> Iterator:
    """``fn`` over ``items`` in ``workers`` processes, results in order; at most two items per worker are
    handed out (pickled) ahead. A worker that dies (the out-of-memory killer, a crash in a decoder) is a
    ``PrepError``: ``multiprocessing.Pool`` loses that worker's task and waits for it forever."""
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
    done = False
    try:
        ahead: collections.deque = collections.deque()
        for item in items:
            with _interrupts_for_the_parent():  # a submit may start a worker (one more per submit, up to workers)
                ahead.append(pool.submit(fn, item))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
        done = True
    except BrokenProcessPool:
        raise PrepError(f"a worker process ended abruptly while {doing} (killed, e.g. by the out-of-memory "
                        f"killer, or crashed); what was finished is kept: run the same command again to resume "
                        f"(with fewer --workers if memory is short)") from None
    finally:
        if not done:  # an error or Ctrl-C: do not wait for the other workers' tasks
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
