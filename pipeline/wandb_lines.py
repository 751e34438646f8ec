"""W&B's console lines that tell this pipeline's users nothing, dropped from every run's log.

An offline run's start said where its files are, and then "W&B syncing is set to `offline` in this
directory. Run `wandb online` or set WANDB_MODE=online to enable cloud syncing." (here the run is offline
because no ``WANDB_API_KEY`` is set: ``wandb online`` changes nothing of that) and "View this run in the
terminal with `wandb leet`"; its end, after the ``wandb sync`` line, "Find logs at: ./RUN/wandb/...",
W&B's own debug logs. Kept: "Run data is saved locally in RUN/wandb/offline-run-..." at the start and
"You can sync this run to the cloud by running: wandb sync ..." at the end, the run summary, and an online
run's "View run ... at: URL". W&B prints through ``wandb.termlog`` (its printer looks it up at each call);
``drop_wandb_lines`` wraps it.
"""

from __future__ import annotations

import re

DROPPED_PREFIXES = (
    "W&B syncing is set to `offline` in this directory.",
    "View this run in the terminal with `wandb leet`",
    "View this run in the terminal with `wandb beta leet`",  # the name before wandb 0.31
    "Find logs at: ",
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kept_lines(text: str) -> str | None:
    """``text`` (one ``termlog`` call: lines joined by newlines) without the dropped lines; None when none
    is left."""
    lines = text.split("\n")
    kept = [line for line in lines if not _ANSI.sub("", line).startswith(DROPPED_PREFIXES)]
    if len(kept) == len(lines):
        return text
    return "\n".join(kept) if kept else None


def drop_wandb_lines() -> None:
    """Wrap ``wandb.termlog`` (once per process); a no-op without wandb."""
    try:
        import wandb
    except ImportError:
        return
    termlog = wandb.termlog
    if getattr(termlog, "_drops_wandb_lines", False):
        return

    def filtered(string: str = "", *args, **kwargs) -> None:
        kept = kept_lines(string) if isinstance(string, str) else string
        if kept is not None:
            termlog(kept, *args, **kwargs)

    filtered._drops_wandb_lines = True  # type: ignore[attr-defined]
    wandb.termlog = filtered
