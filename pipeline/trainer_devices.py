"""``trainer.devices`` read as a number: one reading for the settings check, the resume's world size and
``config_check``. No torch or Lightning here (the launcher can import it on login nodes); where the machine
decides (``auto``, ``-1``), the caller asks it."""

from __future__ import annotations

import re
from typing import Any


def devices_as_int(devices: Any) -> Any:
    """A string of digits (``"2"``, ``"-1"``) as its int, any other value as given: the command line gives a
    string where a config file gives a number."""
    if isinstance(devices, str) and re.fullmatch(r"-?[0-9]+", devices.strip()):
        return int(devices)
    return devices  # "--3" too: int() refused it, a traceback


def devices_per_node(devices: Any) -> int | None:
    """How many devices a ``trainer.devices`` value names: a number >= 1, a list of indices, or indices in a
    string (``"0,1"``); None where this machine's count decides (``auto``, ``-1``, ``0``, anything else)."""
    devices = devices_as_int(devices)
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return None
