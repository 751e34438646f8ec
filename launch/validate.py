"""Checks on settings before they reach an sbatch script, each failing with a message naming the setting.

Values that end up in shell commands are always shlex-quoted by the renderer; values that end up in
``#SBATCH`` lines cannot be quoted reliably (sbatch parses those lines itself), so they must match a
strict character set instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from launch.errors import LaunchError
from pipeline.parsed_config import SECTIONS
from pipeline.run_layout import CHECKPOINTS_DIR, LAST_CHECKPOINT

# Slurm's time limit forms (sbatch(1) --time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS. No field has
# an upper bound (Slurm's time_str2secs: 1:60:00 is two hours). ASCII: sbatch reads no other digits; fullmatch:
# a value that ends in a newline would end the #SBATCH line and start a command.
_TIME_FORMS = (
    (re.compile(r"(\d+)", re.ASCII), ("minutes",)),
    (re.compile(r"(\d+):(\d+)", re.ASCII), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)", re.ASCII), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)", re.ASCII), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)", re.ASCII), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)", re.ASCII), ("days", "hours", "minutes", "seconds")),
)
_UNIT_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,+-]+$")
_SBATCH_PATH = re.compile(r"^[A-Za-z0-9_./+,=@:-]+$")


def _parse_time(value: str) -> int | None:
    """Seconds in a time limit written in one of Slurm's forms, else None."""
    for pattern, units in _TIME_FORMS:
        m = pattern.fullmatch(value or "")
        if m:
            return sum(int(g) * _UNIT_SECONDS[u] for g, u in zip(m.groups(), units))
    return None


TRAIN_TIME_REASON = "a job's checkpoint-and-requeue signal is timed from it"


def slurm_time(value: str, setting: str = "--time", reason: str = TRAIN_TIME_REASON) -> str:
    """Validate a Slurm time limit in any of sbatch's forms (90 is 90 minutes, as sbatch reads it). A limit
    is required and finite: the trainer's USR1 save is timed from it (``reason`` says why for other jobs)."""
    seconds = _parse_time(value)
    if seconds == 0 or (value or "").lower() in ("-1", "unlimited", "infinite"):
        raise LaunchError(f"{setting}: {value!r} means no time limit to Slurm; give a finite one (the partition's "
                          f"limit, for instance): {reason}")
    if seconds is None:
        raise LaunchError(f"{setting}: {value!r} is not a time limit; use one of Slurm's forms: MINUTES, MM:SS, "
                          f"HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 90, 04:00:00, 2-00:00:00)")
    if seconds < 60:
        raise LaunchError(f"{setting}: {value!r} is shorter than one minute, Slurm's smallest time limit")
    return value


def time_seconds(value: str) -> int:
    """Seconds in a validated time limit."""
    seconds = _parse_time(value)
    assert seconds is not None
    return seconds


def positive_int(value: int, setting: str, minimum: int = 1) -> int:
    """An integer setting with a lower bound (nodes >= 1, tasks >= 1, ...)."""
    if value < minimum:
        raise LaunchError(f"{setting}: must be at least {minimum}, got {value}")
    return value


def slurm_name(value: str | None, setting: str) -> str | None:
    """Partition/account/QoS names go into #SBATCH lines verbatim: allow only plain name characters."""
    if value is None:
        return None
    if not _SLURM_NAME.match(value):
        raise LaunchError(f"{setting}: {value!r} may only contain letters, digits and _ . , + -")
    return value


def sbatch_path(path: Path, setting: str) -> Path:
    """A path that appears in an #SBATCH line (log file): no spaces, quotes, '%' or shell characters."""
    text = str(path)
    if not _SBATCH_PATH.match(text):
        bad = sorted({c for c in text if not re.match(r"[A-Za-z0-9_./+,=@:-]", c)})
        raise LaunchError(
            f"{setting}: {text!r} contains {''.join(bad)!r}; Slurm's #SBATCH parser cannot carry such a path "
            "safely, choose a directory name made of letters, digits and _ . / + , = @ : -"
        )
    return path


def writable_dir(path: Path, setting: str) -> Path:
    """A directory the launcher or the job will create and write (run directory, OUT): checked before anything
    is written, and by --dry-run too, so a file in its place or a folder without write permission is one
    error line now rather than a traceback on submit or a job that fails after its wait in the queue."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {str(existing)!r} is a file"
        raise LaunchError(f"{setting}: {str(path)!r} {where}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be made in {str(existing)!r})"
        raise LaunchError(f"{setting}: {str(path)!r} is not writable here{where}")
    return path


def existing_file(path: Path, setting: str) -> Path:
    """A file the job will read (config): must exist now, resolved to an absolute path."""
    if path.is_dir():
        raise LaunchError(f"{setting}: {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise LaunchError(f"{setting}: file {str(path)!r} does not exist")
    return path.resolve()


def yaml_config(path: Path, setting: str) -> Path:
    """The trainer's config: an existing YAML mapping. Checked at submit time, not after the queue wait
    (a job that fails at its first line may have waited hours for its nodes)."""
    path = existing_file(path, setting)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"{setting}: cannot read {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        detail = f"{getattr(e, 'problem', None) or e}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
        raise LaunchError(f"{setting}: {str(path)!r} is not valid YAML: {detail}") from None
    if doc is not None and not isinstance(doc, dict):
        raise LaunchError(f"{setting}: {str(path)!r} is not a config (a YAML mapping such as `trainer: ...`), "
                          f"it holds a {type(doc).__name__}")
    for section, value in (doc or {}).items():  # the trainer refuses these at its start, after the queue wait
        if section in SECTIONS and value is not None and not isinstance(value, (dict, str)):
            raise LaunchError(f"{setting}: {str(path)!r} sets {section} to {value!r}; a section is a mapping of "
                              f"settings ({section}.KEY: VALUE)")
    return path


def launcher_fit_args(nodes: str, devices: str) -> dict[str, str]:
    """The `pipeline fit` arguments a launcher passes itself (``no_launcher_args``'s ``owned``), and what sets
    each: ``nodes`` and ``devices`` are the launcher's options for the node and device counts."""
    return {
        "--trainer.num_nodes": f"from {nodes}",
        "--trainer.devices": f"from {devices}",
        "--trainer.default_root_dir": "the run directory: use --run-dir",
        "--ckpt_path": f"always `last`: every start resumes from the run directory's {CHECKPOINTS_DIR}/"
                       f"{LAST_CHECKPOINT}; to start from another run's checkpoint use --branch-from",
    }


def no_launcher_args(args: list[str], owned: dict[str, str]) -> list[str]:
    """Trainer arguments after ``--`` must not override those the launcher sets: a second --trainer.devices
    wins over the first and no longer matches the tasks Slurm starts, a --trainer.default_root_dir moves the
    checkpoints out of the run directory, a --ckpt_path would be reloaded at every requeue."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in owned:
            raise LaunchError(f"arguments after --: {name} is set by the launcher ({owned[name]})")
    return args
