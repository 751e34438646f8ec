"""When a process started: with its pid, it names one process (a pid is reused once its process is gone).
No torch here: the export's temporary names and the torchrun agent's stop guard use it."""

from __future__ import annotations

from pathlib import Path


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``'s field 22); None when there
    is no such process or no ``/proc``."""
    try:  # the fields after the command name (in parentheses) start at field 3
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
