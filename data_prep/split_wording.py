"""How data_prep's messages name splits, and the command that relabels them; torch- and numpy-free, so that
``launch status`` (``output_status``) can say it too."""
from __future__ import annotations


def splits_named(names: list[str]) -> str:
    """``split 'val'``, or ``splits ['calib', 'val']``."""
    return f"split {names[0]!r}" if len(names) == 1 else f"splits {names}"


def rerun_of(names: list[str]) -> str:
    """What relabels `names`: the commands that wrote them, run again (a hold-out's two sides are one)."""
    if len(names) == 1:
        return f"run the data_prep command of split {names[0]!r} again"
    return f"run the data_prep commands of splits {names} again (a hold-out's two sides: the one that carved them)"
