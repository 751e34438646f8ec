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


def temp_dir_problem() -> str | None:
    """``check_temp_dir``'s refusal as text, or None: for the callers that must run it before the trainer's
    imports, whose import of torch._dynamo makes its cache folder there (with none usable the start was that
    import's traceback). ``python -m pipeline fit|validate|test`` refuses the start with it (``error:``, exit 2,
    as the CLI's refusals end: a rank under torchrun stops its agent); ``python -m pipeline.config_check`` says
    it cannot check on this machine (exit 1, not a refusal: the job's nodes have temporary directories of their
    own, and ``launch submit train`` submits with a warning)."""
    try:
        check_temp_dir()
    except ConfigError as e:
        return str(e)
    return None
