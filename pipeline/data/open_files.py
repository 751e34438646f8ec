"""The process's limit of open files: raised at start to what the system allows, and what to say when a run
reaches it anyway.

The cpu loader's workers pass each batch as file descriptors and keep their shards open, so a run holds
hundreds. Many clusters and containers start processes with a soft limit of 1,024 under a hard limit of
a million; any process may raise its own soft limit up to the hard one, as torch's and webdataset's users
are told to do by hand. A run does it itself (``raise_open_files_limit``, before any worker starts, so the
workers inherit it); only a hard limit that is too low is left for the user.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

WANTED = 65536  # far above what a run holds; not "unlimited", which slows programs that close every descriptor


def raise_open_files_limit(wanted: int = WANTED) -> tuple[int, int] | None:
    """Raise the soft limit of open files towards ``wanted``, at most to the hard limit. Returns (before,
    after) when it changed, None when it was high enough or could not be changed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:  # a sandbox that refuses: the run goes on with the limit it has
        log.debug("cannot raise the limit of open files from %d to %d: %s", soft, target, e)
        return None
    return soft, target


def out_of_file_descriptors(error: BaseException) -> bool:
    """Whether ``error`` is a process's limit of open files: torch's own (each batch a worker passes holds
    descriptors in the trainer), or a worker's ``[Errno 24]`` re-raised by the DataLoader."""
    text = str(error)  # not the machine's limit, ENFILE's "Too many open files in system": no ulimit raises it
    return isinstance(error, (RuntimeError, OSError)) and "Too many open files" in text and \
        "Too many open files in system" not in text


def open_files_advice() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = f"ulimit -n: {soft}" + (f", at most {hard}" if hard != soft else "")
    return (f"too many open files ({limit}): the cpu loader's workers pass each batch as file descriptors and "
            f"keep their shards open; raise the limit (ulimit -n 65536 in the job script, docker run --ulimit "
            f"nofile=65536:65536) or lower data.num_workers")
