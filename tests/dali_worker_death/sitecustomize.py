"""Imported by every Python process whose path holds this folder (tests/test_worker_signals.py puts it
there): in DALI's spawned source workers, with DIE_IN_QUEUE=put|get, one worker SIGKILLs itself while it
holds the lock of DALI's result (put) or task (get) queue, as the OOM killer can kill it. DIE_FLAG (a
path) makes it happen once per run; DIE_AFTER: at that call of the queue method."""
import os
import signal
import sys

if os.environ.get("DIE_IN_QUEUE") and "--multiprocessing-fork" in sys.argv:
    from nvidia.dali._multiproc import shared_queue

    _which = os.environ["DIE_IN_QUEUE"]
    _original = getattr(shared_queue.ShmQueue, _which)
    _calls = [0]

    def _dying(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ.get("DIE_AFTER", "6")):
            try:
                os.close(os.open(os.environ["DIE_FLAG"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:  # another worker died already
                return _original(self, *args, **kwargs)
            self.lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        return _original(self, *args, **kwargs)

    setattr(shared_queue.ShmQueue, _which, _dying)
