"""Output to a reader that went away (``launch submit ... | head -1``, ``launch status RUN | head``): the rest is
dropped and the command goes on. A submission whose first lines met a closed pipe stopped there with "file system:
Broken pipe", exit 2, after sbatch had queued its jobs (or before it had, by where the pipe closed): a script read
that as a failed submission. Python would also print a second error at exit, flushing stdout."""

from __future__ import annotations

import os
import sys
from typing import TextIO


class ClosedPipeTolerant:
    """``sys.stdout`` that, once a write meets a closed pipe, points the descriptor at /dev/null and drops the
    rest (what was written goes nowhere else either), so no write or flush raises BrokenPipeError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = False

    def _drop_the_rest(self) -> None:
        self._gone = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop_the_rest()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop_the_rest()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def tolerate_a_closed_stdout() -> None:
    """Wrap ``sys.stdout`` (once) for the rest of this process."""
    if not isinstance(sys.stdout, ClosedPipeTolerant):
        sys.stdout = ClosedPipeTolerant(sys.stdout)
