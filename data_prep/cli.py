"""Command line: imagefolder, imagenet, finalize, verify. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import errno
import os
import re
import shlex
import sys
from pathlib import Path

from pipeline.wording import plural

from .done_records import READ_FAILURE
from .errors import PrepError
from .format import MANIFEST_NAME, REJECTS_NAME, SPLIT_NAME, WORK_DIR, ManifestError

_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512*2**20, '300KB' -> 300000; PrepError on anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise PrepError(f"--shard-size {text!r}: expected a number with a unit: B, KB, MB, GB, TB (powers of 1000) "
                        f"or KiB, MiB, GiB, TiB (of 1024), e.g. 1GB, 500MiB; a bare number is not taken for bytes")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise PrepError(f"--shard-size {text!r}: must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # no prefixes of options: `--worker 1` is not `--workers 1`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        raise PrepError(f"environment variable {name}={v!r} is not an integer") from None


def default_workers() -> int:
    """All cores this process may use (respects Slurm/cgroup CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", default="1GB", help="target shard size (KB/MB/GB), default 1GB")
    p.add_argument("--samples-per-shard", type=int, default=None, help="fixed samples per shard (overrides --shard-size)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode every image with its longer side at most PX (default: passthrough)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality for re-encoded images (default 90)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores this process may use: its CPU affinity, as Slurm "
                        "sets it)")
    p.add_argument("--task-index", type=int, default=None, help="this task's position in the array, from 0 (default: from $SLURM_ARRAY_TASK_ID, "
                        "$SLURM_ARRAY_TASK_MIN and $SLURM_ARRAY_TASK_STEP)")
    p.add_argument("--num-tasks", type=int, default=None, help="array size (default $SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--finalize-queued", action="store_true",
                   help="a finalize job is queued after the array (`launch submit prep` does that): an array task "
                        "ends by saying so instead of asking for `data_prep finalize`")


def _add_holdout(p: argparse.ArgumentParser, of: str, example: str = "val") -> None:
    p.add_argument("--holdout", default=None, metavar="N",
                   help=f"hold out N images of {of} (a count, or a fraction such as 0.1), stratified per class and "
                        f"drawn with --seed, into the split --holdout-split; the rest stay in {of}")
    p.add_argument("--holdout-split", default=None, metavar="NAME",
                   help=f"the split that receives the held-out images (required with --holdout), e.g. {example}")


OUT_HELP = ("output folder: the shards, manifest.json and rejects.jsonl; a rerun into it resumes, another "
            "--split adds that split")
IMAGENET_OUT_HELP = ("output folder: the shards, manifest.json and rejects.jsonl; a rerun into it resumes, a "
                     "split not yet there (--splits val) is added")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for all subcommands."""
    ap = _Parser(prog="python -m data_prep", description="Shard image datasets into WebDataset tars.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("imagefolder", help="<class>/<image> folder or .tar -> shards")
    p.add_argument("src", type=Path, help="the dataset: a <class>/<image> folder, or a .tar of one (one wrapper "
                                          "folder, or split folders train/ val/ ... picked by --split, are read too)")
    p.add_argument("out", type=Path, help=OUT_HELP)
    p.add_argument("--split", required=True, help="split name, e.g. train or val")
    _add_common(p)
    _add_holdout(p, "--split")
    p = sub.add_parser("imagenet", help="ILSVRC2012 (archives or extracted) -> shards")
    p.add_argument("src", type=Path, help="the folder with ILSVRC2012_img_{train,val}.tar, or with the extracted "
                                          "train/ and val/ (also Kaggle's layout)")
    p.add_argument("out", type=Path, help=IMAGENET_OUT_HELP)
    p.add_argument("--splits", default="train,val", help="comma list of train,val (default both)")
    p.add_argument("--devkit", type=Path, default=None, help="ILSVRC2012_devkit_t12.tar.gz (default: look in SRC)")
    p.add_argument("--val-csv", type=Path, default=None, help="Kaggle LOC_val_solution.csv (default: look in SRC)")
    _add_common(p)
    _add_holdout(p, "train", example="minival")
    p = sub.add_parser("finalize", help="merge array-task results into manifest.json")
    p.add_argument("out", type=Path, help="the OUT the array tasks wrote into")
    p.add_argument("--splits", default=None, help="comma list (default: all prepared splits)")
    p = sub.add_parser("verify", help="re-check sizes, sha256, counts and decode samples")
    p.add_argument("out", type=Path, help="a prepared OUT (with its manifest.json)")
    p.add_argument("--decode", type=int, default=4, help="samples to fully decode per shard (default 4)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores this process may use: its CPU affinity, as Slurm "
                        "sets it)")
    return ap


def _run_dir_marks(out: Path) -> list[str]:
    """What makes ``out`` a training run directory (pipeline/run_layout.py's names), if it is one: shards and a
    manifest there would mix with the run's checkpoints and logs, and a run directory is no dataset's home."""
    from pipeline.run_layout import CHECKPOINTS_DIR, RUN_ID_FILE, TRAIN_SCRIPT

    # not jobs.jsonl: `launch submit prep --run-dir OUT` keeps its own record of the prep jobs there
    names = [f"{CHECKPOINTS_DIR}/", RUN_ID_FILE, TRAIN_SCRIPT]
    return [name for name in names if (out / name.rstrip("/")).exists()] if out.is_dir() else []


def _foreign_shards(out: Path) -> list[str]:
    """Files in ``out`` named like shards or indexes (``SPLIT-NNNNNN.tar``/``.idx``) where this tool has not
    been (no manifest, no ``.work/``): a WebDataset ShardWriter's output, another dataset's. A prep into that
    folder overwrote the ones its plan named and deleted the rest as stale, exit 0, without a word."""
    if not out.is_dir() or any((out / mine).exists() for mine in (MANIFEST_NAME, WORK_DIR, REJECTS_NAME)):
        return []
    if any(p.name.endswith(".columns.npy") for p in out.iterdir()):  # (a manifest moved aside, as advised)
        return []
    named = re.compile(r"[A-Za-z0-9_-]+-\d{6}\.(tar|idx)")
    return sorted(p.name for p in out.iterdir() if named.fullmatch(p.name))


def _run_dir_above(out: Path) -> Path | None:
    """The training run directory ``out`` lies in, if any: a folder above it with this project's own run files
    (``wandb_run_id``, ``train.sbatch`` or ``checkpoints/last.ckpt``; a mere ``checkpoints/`` folder beside a
    dataset is someone else's)."""
    from pipeline.run_layout import RUN_ID_FILE, TRAIN_SCRIPT, last_checkpoint

    for folder in Path(os.path.abspath(out)).parents:
        if any(p.exists() for p in (folder / RUN_ID_FILE, folder / TRAIN_SCRIPT, last_checkpoint(folder))):
            return folder
    return None


def _check_common(args) -> tuple:
    from .validate import EncodeOptions

    shard_bytes = None
    if args.samples_per_shard is not None:
        if args.samples_per_shard <= 0:
            raise PrepError(f"--samples-per-shard {args.samples_per_shard}: must be positive")
    else:
        shard_bytes = parse_size(args.shard_size)
    if args.max_side is not None and args.max_side < 16:
        raise PrepError(f"--max-side {args.max_side}: must be at least 16")
    if not 1 <= args.quality <= 100:
        raise PrepError(f"--quality {args.quality}: must be in 1..100")
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise PrepError(f"--workers {workers}: must be at least 1")
    num_tasks = args.num_tasks if args.num_tasks is not None else _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if args.task_index is not None:
        task_index = args.task_index
    else:
        # --array=0-30:2 gives IDs 0, 2, ..., 30 and a count of 16: the index is the position in that list
        offset = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        step = max(_env_int("SLURM_ARRAY_TASK_STEP", 1), 1)
        if offset % step:
            raise PrepError(f"SLURM_ARRAY_TASK_ID {offset} above SLURM_ARRAY_TASK_MIN is not a multiple of "
                            f"SLURM_ARRAY_TASK_STEP {step}; pass --task-index and --num-tasks explicitly")
        task_index = offset // step
    if num_tasks < 1:
        raise PrepError(f"--num-tasks {num_tasks}: must be at least 1")
    if not 0 <= task_index < num_tasks and args.task_index is None:  # (said in the variables it came from)
        raise PrepError(
            f"SLURM_ARRAY_TASK_ID {_env_int('SLURM_ARRAY_TASK_ID', 0)} (SLURM_ARRAY_TASK_MIN "
            f"{_env_int('SLURM_ARRAY_TASK_MIN', 0)}, SLURM_ARRAY_TASK_STEP {_env_int('SLURM_ARRAY_TASK_STEP', 1)}) is "
            f"task {task_index} of the {num_tasks} of "
            f"{'SLURM_ARRAY_TASK_COUNT' if args.num_tasks is None else '--num-tasks'}, outside 0..{num_tasks - 1}: an array of ids that are no range (--array=2,5)? Submit a range "
            f"(--array=0-{num_tasks - 1}, or with a step), or pass --task-index and --num-tasks explicitly")
    if not 0 <= task_index < num_tasks:
        raise PrepError(f"--task-index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    if not args.src.exists():
        raise PrepError(f"{args.src}: source does not exist")
    # inputs are named (and their shards' plans hashed) by their paths under SRC: `data` typed in one run and
    # `/home/me/data` in its rerun (or an array task started in another folder) must plan the same shards.
    # abspath, not resolve: per-node copies reached through one symlinked path stay one plan
    args.src = Path(os.path.abspath(args.src))
    if args.out.exists() and not args.out.is_dir():
        raise PrepError(f"{args.out}: output exists and is not a folder")
    if marks := _run_dir_marks(args.out):
        raise PrepError(f"{args.out}: output folder is a training run directory (it holds {', '.join(marks)}); "
                        "prepare the shards into a folder of their own (e.g. data/NAME) and point the run's "
                        "--data.root at it")
    if foreign := _foreign_shards(args.out):
        raise PrepError(f"{args.out}: output folder holds {plural(len(foreign), 'shard-named file')} ({foreign[0]}"
                        f"{', ...' if len(foreign) > 1 else ''}) but no {MANIFEST_NAME} or {WORK_DIR}/: not shards this "
                        "tool wrote, which it would overwrite or delete as stale; move them, or prepare into another "
                        "folder")
    if run := _run_dir_above(args.out):  # e.g. RUN/checkpoints: shards among the checkpoints
        raise PrepError(f"{args.out}: output folder is inside the training run directory {run}; prepare the shards "
                        "into a folder of their own (e.g. data/NAME) and point the run's --data.root at it")
    opts = EncodeOptions(max_side=args.max_side, quality=args.quality)
    return opts, shard_bytes, workers, task_index, num_tasks


def _split_ok(split: str) -> str:
    if not SPLIT_NAME.fullmatch(split):
        raise PrepError(f"--split {split!r}: use letters, digits, '_' or '-' only, at most 64 characters")
    return split


def _holdout(args, split: str, splits: list[str] | None = None):
    """The ``--holdout`` settings (a ``holdout.Holdout``) or None; for imagenet (`splits` given) carved out of
    train, which must be prepared, and never named like ImageNet's own splits."""
    from .holdout import Holdout, check_names, parse_holdout

    if args.holdout is None:
        if args.holdout_split is not None:
            raise PrepError(f"--holdout-split {args.holdout_split}: needs --holdout N (how many images to hold out)")
        return None
    size = parse_holdout(args.holdout)
    reserved = None
    if splits is not None:
        if "train" not in splits:
            raise PrepError(f"--holdout {args.holdout}: the hold-out is carved out of train, which --splits "
                            f"{','.join(splits)} does not prepare; add train to --splits")
        reserved = {"val": "is ImageNet's own val split (the official validation images); name the hold-out "
                           "otherwise, e.g. minival"}
    return Holdout(size, split, check_names(split, args.holdout_split, reserved), args.seed)


def _summary(manifest: dict | None, splits: list[str], out: Path, finalize_queued: bool = False) -> int:
    """The manifest's count per split; an array task (no manifest yet) says what merges its shards. The exit
    status: 1 where a split has no sample because every input was rejected (a folder of HEIC photos), so a
    Slurm job of it ends FAILED, not COMPLETED with nothing to train on; the manifest still lists it. 1 also
    where finalize left a split out (its labels count a shorter class list: its warning says so)."""
    if manifest is None:
        if finalize_queued:
            print("the queued finalize job writes the manifest once every array task succeeded", file=sys.stderr)
        else:
            print(f"after all tasks finish, run `python -m data_prep finalize {shlex.quote(str(out))} --splits "
                  f"{','.join(splits)}`", file=sys.stderr)
        return 0
    left_out = [s for s in splits if s not in manifest["splits"]]
    splits = [s for s in splits if s in manifest["splits"]]
    for s in splits:
        e = manifest["splits"][s]
        where = f" (why: {out / REJECTS_NAME})" if e["rejected"] else ""
        print(f"{s}: {plural(e['samples'], 'sample')} in {plural(len(e['shards']), 'shard')}, {e['rejected']} rejected"
              f"{where}")
    _said_read_failures(out, splits)
    empty = [s for s in splits if manifest["splits"][s]["samples"] == 0 and manifest["splits"][s]["rejected"]]
    for s in empty:
        n = manifest["splits"][s]["rejected"]
        inputs = "its one input was" if n == 1 else f"all {n} of its inputs were"
        print(f"python -m data_prep: error: split {s!r} has no sample: {inputs} rejected ({out / REJECTS_NAME} "
              f"says why); the manifest lists it with 0 samples, which training refuses", file=sys.stderr)
    return 1 if empty or left_out else 0


def _said_read_failures(out: Path, splits: list[str]) -> None:
    """A warning per split with inputs that could not be read (permissions, an I/O error): a reject that
    is not the image's fault, which a rerun reads again (``done_records.read_failures``)."""
    unread: dict[str, list[dict]] = {}
    try:
        with open(out / REJECTS_NAME, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    if isinstance(r, dict) and r.get("split") in splits and \
                            str(r.get("reason", "")).startswith(READ_FAILURE):
                        unread.setdefault(r["split"], []).append(r)
    except OSError:
        return
    for split, rejects in unread.items():
        print(f"data_prep: warning: {split}: {plural(len(rejects), 'input')} could not be read and "
              f"{'is' if len(rejects) == 1 else 'are'} not in the shards "
              f"(first: {rejects[0].get('path')}: {rejects[0]['reason'][len(READ_FAILURE):]}); make them readable "
              f"and run the prep command again: it reads them again and rebuilds their shards", file=sys.stderr)


def _said_holdout(record: dict) -> None:
    """One stderr line on what the hold-out took, so a log shows it without opening the manifest."""
    print(f"{record['split']}: holding out {record['count']} of its {plural(record['of'], 'image')} (stratified per "
          f"class, --seed {record['seed']}) as split {record['holdout_split']!r}", file=sys.stderr)


def _imagenet_splits(text: str) -> list[str]:
    splits = [_split_ok(s.strip()) for s in text.split(",") if s.strip()]
    if not splits or any(s not in ("train", "val") for s in splits):
        raise PrepError(f"--splits {text!r}: choose from train,val")
    return splits


def check_arguments(argv: list[str]) -> None:
    """Refuse, as ``PrepError``, what ``run(argv)`` would refuse before reading any input: an unknown or
    malformed option, a value out of range, a bad split name. The launcher asks at submit time: its array
    tasks failed on these only after the queue wait."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise PrepError(lines[-1].split(": error: ", 1)[-1] if lines else f"cannot parse {argv}") from None
    if args.cmd == "imagefolder":
        _holdout(args, _split_ok(args.split))
    elif args.cmd == "imagenet":
        _holdout(args, "train", _imagenet_splits(args.splits))
    if args.cmd in ("imagefolder", "imagenet"):
        _check_common(args)


def run(argv: list[str] | None = None) -> int:
    """Parse and execute; raises PrepError/ManifestError for user errors."""
    args = build_parser().parse_args(argv)
    if args.cmd == "imagefolder":
        from .holdout import check_rerun, split_scan
        from .imagefolder import scan_imagefolder
        from .prepare import SplitPart, prepare_splits

        split = _split_ok(args.split)
        holdout = _holdout(args, split)
        opts, shard_bytes, workers, ti, nt = _check_common(args)
        if args.src.is_dir() and args.out.resolve().is_relative_to(args.src.resolve()):
            raise PrepError(f"{args.out}: output folder is inside SRC {args.src}, so a rerun would list the "
                            "shards as inputs (a class folder of its own); use a folder outside SRC")
        # before the scan (prepare_splits checks again): a refused hold-out should not wait for a big listing
        check_rerun(args.out, {split: None} if holdout is None else
                    {split: holdout.settings(), holdout.holdout_split: holdout.settings()})
        scan = scan_imagefolder(args.src, split)
        if holdout is None:
            parts = [SplitPart(split, scan)]
        else:
            rest, held, record = split_scan(scan, holdout)
            _said_holdout(record)
            parts = [SplitPart(split, rest, record), SplitPart(holdout.holdout_split, held, record)]
        m = prepare_splits(args.out, parts, str(args.src.resolve()), opts, args.seed, shard_bytes,
                           args.samples_per_shard, workers, ti, nt, show_progress=not args.no_progress)
        return _summary(m, [p.split for p in parts], args.out, args.finalize_queued)
    if args.cmd == "imagenet":
        from .imagenet import prepare_imagenet

        splits = _imagenet_splits(args.splits)
        holdout = _holdout(args, "train", splits)
        opts, shard_bytes, workers, ti, nt = _check_common(args)
        m = prepare_imagenet(args.src, args.out, splits, opts, args.seed, shard_bytes, args.samples_per_shard,
                             workers, ti, nt, devkit=args.devkit, val_csv=args.val_csv,
                             show_progress=not args.no_progress, holdout=holdout, on_holdout=_said_holdout)
        written = splits if holdout is None else [*splits, holdout.holdout_split]
        return _summary(m, written, args.out, args.finalize_queued)
    if args.cmd == "finalize":
        from .holdout import with_partners
        from .manifest import finalize, planned_splits

        if not args.out.is_dir():
            raise PrepError(f"{args.out}: output folder does not exist")
        splits = [_split_ok(s.strip()) for s in args.splits.split(",") if s.strip()] if args.splits else None
        if splits == []:
            raise PrepError(f"--splits {args.splits!r}: name the splits to finalize (e.g. train,val)")
        splits = with_partners(args.out, splits) if splits is not None else None  # a hold-out's other side too
        m = finalize(args.out, splits)
        return _summary(m, sorted(set(m["splits"]) | set(planned_splits(args.out))) if splits is None else splits,
                        args.out)
    if args.cmd == "verify":
        from .verify import verify

        if args.decode < 0:
            raise PrepError(f"--decode {args.decode}: must be at least 0 (samples decoded per shard)")
        if args.workers is not None and args.workers < 1:
            raise PrepError(f"--workers {args.workers}: must be at least 1")
        problems = verify(args.out, decode=args.decode, workers=args.workers or default_workers())
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"verify: {plural(len(problems), 'problem')} in {args.out}", file=sys.stderr)
            return 1
        print(f"verify: {args.out} OK")
        return 0
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become `python -m data_prep: error: ...` and exit 2."""
    try:
        return run(argv)
    except (PrepError, ManifestError) as exc:
        print(f"python -m data_prep: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # output not writable, disk full...: the message names the path, no traceback
        print(f"python -m data_prep: error: {exc}{_in_shared_memory(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m data_prep: interrupted (finished shards are kept; rerun to resume)", file=sys.stderr)
        return 130


def _in_shared_memory(exc: OSError) -> str:
    """Where a write error that names no file came from a multiprocessing lock (a file in /dev/shm: the
    progress counter and the workers' queues), says so: the output's disk may have room. Only for a full one
    (ENOSPC): a /dev/shm missing or not writable is another matter."""
    if exc.errno != errno.ENOSPC:
        return ""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "synchronize.py")):
            try:
                st = os.statvfs("/dev/shm")
                room = f" ({st.f_bavail * st.f_frsize >> 10} KiB free)"
            except OSError:
                room = ""
            return (f" in /dev/shm{room}, not in OUT: the progress counter and the worker processes need a few "
                    f"KiB of shared memory there; free some, or give the container more (docker run --shm-size)")
        tb = tb.tb_next
    return ""
