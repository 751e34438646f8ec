"""``python -m tests.preloaded_probe [exit N | raise | kill | read FILE | sleep S | rank]``: prints what a started
interpreter holds (its command line, paths, environment, ``__main__``, a fresh random number, its garbage
collection and capabilities) as JSON, for test_preloaded_python to compare a forked child with a real process."""

import gc
import json
import os
import random
import signal
import sys
import time

def _collects_its_own_cycles() -> bool:
    """Whether the cyclic GC frees a cycle made here and runs its finalizer (the server's own objects are frozen
    out of its sight, not this process's)."""
    freed = []

    class Node:
        def __del__(self) -> None:
            freed.append(True)

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    gc.collect()
    return freed == [True, True]


if __name__ == "__main__":
    main = sys.modules["__main__"]
    print(json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "path": sys.path, "probe": os.environ.get("PROBE"),
        "main": [main.__name__, main.__spec__.name, main.__file__], "main_names": sorted(vars(main))[:40],
        "random": random.random(), "pid": os.getpid(), "pgid": os.getpgid(0), "pipeline_imported":
        "pipeline.cli" in sys.modules, "stdin_is": os.path.realpath("/proc/self/fd/0"),
        "cmdline": open("/proc/self/cmdline", "rb").read().decode().split("\0"),
        "gc": [gc.isenabled(), _collects_its_own_cycles()],
        "capabilities": [line for line in open("/proc/self/status").read().splitlines() if line.startswith("Cap")],
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "raise":
        raise ValueError("the probe failed")
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "read":
        try:
            open(sys.argv[2]).read()
            print("read: ok", flush=True)
        except OSError as e:
            print(f"read: {type(e).__name__}", flush=True)
    if what == "sleep":
        time.sleep(float(sys.argv[2]))
    if what == "rank" and os.environ.get("LOCAL_RANK") == "1":  # the other rank: what it sees of its parent
        from pipeline.parent_death import lightning_rank_zero

        print(json.dumps({"rank_zero": lightning_rank_zero(), "parent": os.getppid()}), flush=True)
    elif what == "rank":  # as Lightning's launcher starts another local rank: this command again, LOCAL_RANK set
        import subprocess

        from lightning_fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd

        rank = subprocess.run(_basic_subprocess_cmd(), env={**os.environ, "LOCAL_RANK": "1"}, capture_output=True,
                              text=True, check=True)
        print(rank.stdout.splitlines()[-1], flush=True)
