"""``python -m tests.preloaded_probe [exit N | raise | kill | sleep S]``: prints what a started interpreter holds
(its command line, paths, environment, ``__main__``, a fresh random number) as JSON, for test_preloaded_python
to compare a forked child with a real process."""

import json
import os
import random
import signal
import sys
import time

if __name__ == "__main__":
    main = sys.modules["__main__"]
    print(json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "path": sys.path, "probe": os.environ.get("PROBE"),
        "main": [main.__name__, main.__spec__.name, main.__file__], "main_names": sorted(vars(main))[:40],
        "random": random.random(), "pid": os.getpid(), "pgid": os.getpgid(0), "pipeline_imported":
        "pipeline.cli" in sys.modules, "stdin_is": os.path.realpath("/proc/self/fd/0"),
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "raise":
        raise ValueError("the probe failed")
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "sleep":
        time.sleep(float(sys.argv[2]))
