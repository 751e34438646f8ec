"""Reading one of data_prep's JSON work records under ``OUT/.work`` (a shard's done-record, a split's plan): a
missing file is no record (never written), and one that is there but unusable (unreadable, not JSON or not
UTF-8, or of the wrong shape by the record's own checker) is one problem, said the same way for each, that the
record's reader turns into its error (naming the file, and what writes it again).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def read_json_record(path: Path, shape_problem: Callable[[Any], str | None], broken: Callable[[str], Exception],
                     not_json_cause: str = "edited by hand?") -> Any:
    """The parsed record at `path`, or None when there is no file. When it is there but unusable, raises
    ``broken(problem)``; `problem` says what is wrong (``shape_problem`` of the parsed value for a record of the
    wrong shape), with its likely cause: `not_json_cause` for text that does not parse."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem: str | None = f"cannot be read ({exc.strerror or exc})"
    except ValueError:  # also a UnicodeDecodeError
        problem = f"is not valid JSON ({not_json_cause})"
    else:
        problem = shape_problem(record)
        if problem is not None:
            problem += " (edited by hand?)"
    if problem is not None:
        raise broken(problem)
    return record
