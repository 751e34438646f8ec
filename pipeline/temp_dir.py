"""The temporary directory a run writes to, checked at the start.

W&B stages media and its offline run's files there, the DALI loader its epoch plans, torch.compile its
caches. Python's ``tempfile`` tries TMPDIR, TEMP, TMP, /tmp, /var/tmp, /usr/tmp and the working directory,
skipping one that is missing, full or read-only, and when none is left the run failed in W&B's
``FileNotFoundError: No usable temporary directory`` traceback as its loggers started. Here it is one
``ConfigError`` line naming TMPDIR and the way out, before anything starts: ``python -m pipeline`` checks before
it imports the trainer, since importing torch._dynamo (Lightning imports torchvision, which imports it) makes
its cache folder there.
"""

from __future__ import annotations

import os
import sys
import tempfile

from pipeline.errors import ConfigError


def temp_folder(prefix: str, purpose: str) -> str:
    """A fresh folder in the temporary directory (the caller removes it), or a ``ConfigError`` saying that
    ``purpose`` needs one and how to give it."""
    try:
        return tempfile.mkdtemp(prefix=prefix)
    except OSError as e:
        tmp = os.environ.get("TMPDIR")
        raise ConfigError(
            f"no temporary directory this user can write ({'TMPDIR ' + repr(tmp) if tmp else 'TMPDIR unset'}: "
            f"{e.strerror or e}; one that is missing, full or read-only is skipped), which {purpose}: set TMPDIR "
            f"to a folder this user can write, e.g. a node-local disk") from e


def check_temp_dir() -> None:
    """Refuse a start with no usable temporary directory (what the loggers, the DALI loader and torch.compile
    write to)."""
    os.rmdir(temp_folder("resnet-pipeline-check-", "W&B, the DALI loader and torch.compile need"))


def start_refused_without_temp_dir() -> int:
    """``check_temp_dir`` before the trainer's imports, said as the CLI says a ``ConfigError``: one ``error:``
    line and status 2 (0: there is one), which ``python -m pipeline`` ends with as it ends with the CLI's (a
    rank under torchrun stops its agent). With no usable temporary directory the start was the traceback of
    the import of torch._dynamo, whose cache folder goes there, before the CLI's own check could run."""
    try:
        check_temp_dir()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def stop_a_check_without_temp_dir() -> None:
    """What ``python -m pipeline.config_check`` does instead, before the same imports: exit 1, "cannot check
    here", not a refusal (exit 2). The job runs on other machines, whose temporary directories its start checks:
    ``launch submit train`` then submits with a warning naming this machine's, where a refusal would have
    stopped it."""
    try:
        check_temp_dir()
    except ConfigError as e:
        print(f"config_check: cannot check on this machine: {e}", file=sys.stderr)
        sys.exit(1)
