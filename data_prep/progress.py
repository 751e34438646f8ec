"""Progress line on stderr (images, img/s, MB/s, ETA) fed by counters shared with worker processes."""
from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized


class Progress:
    """Poll shared counters from a background thread and print a status line."""

    def __init__(self, total: int, images: Synchronized[int], nbytes: Synchronized[int], label: str,
                 enabled: bool = True, kept: Synchronized[int] | None = None) -> None:
        self.total = total
        self.images = images
        self.nbytes = nbytes
        self.kept = kept  # images of shards an earlier run finished: done, but not in the rate
        self.label = label
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._print(final=True)

    def line(self) -> str:
        """The current status text."""
        dt = max(time.monotonic() - self.t0, 1e-6)
        n = self.images.value
        kept = self.kept.value if self.kept is not None else 0
        mb = self.nbytes.value / 1e6
        pct = 100.0 * n / self.total if self.total else 100.0
        if kept and n == kept:  # nothing built yet (or at all: a rerun that keeps every shard)
            return f"{self.label}: {n}/{self.total} ({pct:5.1f}%) kept from an earlier run"
        rate = (n - kept) / dt
        eta = (self.total - n) / rate if rate > 0 else float("inf")
        eta_s = "--:--" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (f"{self.label}: {n}/{self.total} ({pct:5.1f}%) {rate:8.1f} img/s "
                f"{mb / dt:7.1f} MB/s ETA {eta_s}")

    def _print(self, final: bool = False) -> None:
        if self._tty:
            sys.stderr.write("\r" + self.line() + ("\n" if final else ""))
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()

    def _loop(self) -> None:
        period = 0.5 if self._tty else 10.0
        while not self._stop.wait(period):
            self._print()
