"""What a run directory says about training progress: newest checkpoint, its global step, recent
throughput from a CSV metrics log."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from launch.errors import LaunchError
from pipeline import provenance
from pipeline.deepspeed_layout import model_states_file
from pipeline.run_layout import BEST_GLOB, METRICS_CSV, best_name, checkpoint_dir


@dataclass
class CheckpointInfo:
    path: Path
    global_step: int | None
    epoch: int | None
    # the optimizer steps of the whole run (pipeline.module.ImageClassifier.planned_steps)
    planned_steps: int | None = None
    global_batch: int | None = None  # images per optimizer step
    provenance: list[dict] = field(default_factory=list)  # one record per start (pipeline/provenance.py)
    # the run has no step or epoch limit (``progress.planned_steps`` recorded as null); False also for a checkpoint
    # saved before checkpoints recorded a plan
    no_planned_end: bool = False


def payload(path: Path) -> Path:
    """The file that holds a checkpoint's step: the file itself, or for a DeepSpeed checkpoint (a directory
    named like a file) rank 0's model states under the tag its ``latest`` file names (Lightning: ``checkpoint``)."""
    return model_states_file(path) if path.is_dir() else path


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first: RUN_DIR/checkpoints/**.ckpt (last.ckpt, saved periodically and on
    preemption, and the best-k; files, or directories under DeepSpeed). The trainer writes nothing else, so
    nothing else is considered."""
    dated = []
    for p in checkpoint_dir(run_dir).rglob("*.ckpt"):
        try:
            dated.append((payload(p).stat().st_mtime, p))
        except FileNotFoundError:  # a best-k checkpoint the running trainer just replaced (or not one at all)
            continue
    return [p for _, p in sorted(dated, key=lambda t: t[0], reverse=True)]


def read_checkpoint(path: Path) -> CheckpointInfo:
    """global_step/epoch from a Lightning checkpoint (file or DeepSpeed directory); mmap keeps this cheap."""
    import torch

    try:
        ckpt = torch.load(payload(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a half-written or foreign file: say which
        raise LaunchError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise LaunchError(f"checkpoint {path}: not a Lightning checkpoint (top level is {type(ckpt).__name__})")
    step, epoch = ckpt.get("global_step"), ckpt.get("epoch")
    progress = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    planned, batch = progress.get("planned_steps"), progress.get("global_batch")
    return CheckpointInfo(path, int(step) if step is not None else None, int(epoch) if epoch is not None else None,
                          int(planned) if planned else None, int(batch) if batch else None,
                          provenance.records(ckpt), "planned_steps" in progress and planned is None)


@dataclass
class BestCheckpoint:
    path: Path
    epoch: int
    step: int
    top1: float


def best_checkpoint(run_dir: Path) -> BestCheckpoint | None:
    """The kept checkpoint of the highest val top-1, read from the names the trainer gives them
    (``best-epochE-stepS-top1=T.ckpt``, pipeline/run_layout.py): no checkpoint is opened."""
    best = None
    for p in checkpoint_dir(run_dir).glob(BEST_GLOB):
        read = best_name(p.name)  # the whole name, as the trainer gives it: no -vN (run_layout.BEST_NAME)
        if read and (best is None or read.top1 > best.top1):
            best = BestCheckpoint(p, read.epoch, read.step, read.top1)
    return best


def latest_checkpoint(run_dir: Path, unreadable: list[str] | None = None) -> CheckpointInfo | None:
    """The newest checkpoint that still exists when it is read: while a job runs, ModelCheckpoint deletes
    a best-k file as soon as a better one is saved, so a listed file may be gone a moment later. A file
    that exists but cannot be read is an error (LaunchError naming it); given ``unreadable``, its message
    goes there instead and the next newest is read."""
    for path in checkpoint_files(run_dir):
        if not path.exists():
            continue
        try:
            return read_checkpoint(path)
        except LaunchError as e:
            if not path.exists():
                continue
            if unreadable is None:
                raise
            unreadable.append(str(e))
    return None


_THROUGHPUT = re.compile(r"(img|image|sample)s?(/|_per_|_)s(ec)?", re.IGNORECASE)


@dataclass
class ThroughputReading:
    """The newest images/s a run logged (the column, its value and step, the file): a reading for `status`,
    not the trainer's ``pipeline.throughput.Throughput`` callback."""

    column: str
    value: float
    step: int | None
    source: Path


def recent_throughput(run_dir: Path) -> ThroughputReading | None:
    """Last logged images/s from the newest metrics.csv under the run directory (Lightning CSVLogger)."""
    csvs = sorted(run_dir.rglob(METRICS_CSV), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in csvs:
        with open(path, newline="", errors="replace") as f:
            reader = csv.DictReader(f)
            cols = [c for c in (reader.fieldnames or []) if _THROUGHPUT.search(c)]
            if not cols:
                continue
            last: ThroughputReading | None = None
            for row in reader:
                for c in cols:
                    value, step = _number(row.get(c)), _number(row.get("step"))
                    if value is not None:
                        last = ThroughputReading(c, value, int(step) if step is not None else None, path)
            if last is not None:
                return last
    return None


def _number(text: str | None) -> float | None:
    """A CSV cell as a number, None when empty or not one: a run killed while the logger wrote leaves its last
    row cut short (``1e``, NUL bytes), and status reads the log of exactly such runs."""
    try:
        return float(text) if text else None
    except ValueError:
        return None
