"""Loader workers started while other threads enter Python: how many never start, by start method.

A training rank has C++ threads that call into Python now and then (the process group's, for callbacks);
each such call creates a Python thread state and deletes it. On CPython before 3.11.10 a fork at that
moment leaves the child stuck for good inside ``os.fork`` (CPython gh-112275), so its DataLoader waits for
it forever. This starts and joins worker processes through ``pipeline.data.worker_start.worker_context``
while C threads (made with ``pthread_create``, calling a Python function, as those threads do) churn,
and counts the workers that did not end within the timeout. The fork server must show none.

    python bench/fork_race.py [--starts 500] [--threads 4]
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.worker_start import worker_context  # noqa: E402

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


@_CALLBACK
def _enter_python(_arg):  # a foreign thread entering Python: a thread state made and deleted per call
    return None


def _churn(stop: threading.Event) -> None:
    libc = ctypes.CDLL(None)
    tid = ctypes.c_ulong()
    while not stop.is_set():
        if libc.pthread_create(ctypes.byref(tid), None, _enter_python, None) == 0:
            libc.pthread_join(tid, None)


def _worker() -> None:
    pass


def measure(method: str, starts: int, timeout: float) -> tuple[int, float]:
    """(workers that did not end within ``timeout``, seconds) over ``starts`` worker starts."""
    context = worker_context(method)
    hung = 0
    t0 = time.perf_counter()
    for _ in range(starts):
        proc = context.Process(target=_worker)
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            hung += 1
            proc.kill()
            proc.join()
    return hung, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=500, help="worker starts per start method")
    ap.add_argument("--threads", type=int, default=4, help="C threads entering Python meanwhile")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a worker may take to start and end")
    args = ap.parse_args()
    stop = threading.Event()
    churners = [threading.Thread(target=_churn, args=(stop,), daemon=True) for _ in range(args.threads)]
    for t in churners:
        t.start()
    rows = []
    try:
        for method in ("forkserver", "fork"):
            rows.append((method, *measure(method, args.starts, args.timeout)))
    finally:
        stop.set()
    print(f"Python {platform.python_version()}, {args.threads} C threads entering Python, {args.starts} starts each")
    print("| start method | workers started | never ended | seconds |")
    print("|---|---|---|---|")
    for method, hung, seconds in rows:
        print(f"| {method} | {args.starts} | {hung} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
