"""A Python that has imported torch and Lightning once and forks each ``python -m pipeline ...`` the tests run.

Every training process of the suite spent ~8 s of CPU importing torch, Lightning and what Lightning imports
(torchmetrics, torchvision, torch._dynamo, scipy.signal) before its first line of this project ran: half of
`make test`'s time. This server imports them (never this project's code), then forks a child per request that
becomes ``python -m MODULE ARGS`` as the interpreter would start it: its own pid (signals reach it), the
caller's stdin/stdout/stderr file descriptors, environment, working directory and ``sys.path``, a fresh
``__main__``, its own ``random`` and NumPy seeds, the exit status of a real process (``-N`` for a signal), the
capabilities a ``setpriv`` in front of the command would drop (the child drops them itself), and its command
line in ``/proc/PID/cmdline`` (written over the server's: Lightning's other ranks check that their parent runs
their command, ``pipeline.parent_death``). Rails' Spring preloader and Android's zygote work the same
way (tests/test_preloaded_python.py compares a child with a real process). Left as the server's: the ``str``
hash seed, and the imports' objects frozen out of the cyclic garbage collector's sight (``gc.freeze``: they live
as long as the child, as in a real process; without it each child's collections and exit went through all of
them again, 1.5 s of CPU a command). A run of several ranks forks rank 0, whose launcher starts the others as
real processes.

What a fork cannot give is what the interpreter reads at start-up, so the client (``run``) starts a real
process instead whenever a command depends on it: another value of a variable read while importing (the
OpenMP, torch, CUDA, Python variables). ``RP_PRELOADED=0`` turns it off for a run of the suite,
``RP_PRELOADED_LOG=FILE`` lists each command, forked or started anew; tests of start-up itself (a signal during
the imports) start their processes themselves.
"""

from __future__ import annotations

import array
import atexit
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = ("torch", "torchvision", "torchmetrics", "lightning_fabric", "pytorch_lightning", "pytorch_lightning.cli",
           "jsonargparse")
# Variables read while those modules import (or by the interpreter's start-up): a command whose environment gives
# one of them another value than the server's runs as a real process.
READ_AT_START = re.compile(r"^(PYTHON(?!PATH$)|OMP_|MKL_|KMP_|GOMP_|TORCH|PYTORCH|CUDA|NVIDIA|LD_|PL_|LIGHTNING|TF_)")
FORKED_PACKAGES = ("pipeline",)  # the commands forked: this project's trainer and its tools
COMMAND_LINE_ROOM = 65536  # bytes a child's command line may take (the server starts with an argument this long)


def _serve(path: str) -> dict:
    """Import PRELOAD, listen on the Unix socket ``path`` and fork a child per request. Returns only in a child,
    with its request; the server itself exits when its parent (the pytest worker) is gone."""
    before = dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    # what the imports set (torch: TORCHINDUCTOR_CACHE_DIR; Lightning: PYTORCH_NVML_BASED_CUDA_CHECK), which a
    # child sets again where its environment lacks them
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    # the imports' objects (400,000 and more) out of the cyclic GC's sight: every child's collections traversed
    # them (copying the server's pages they lie on) and its exit went through them again, 1.5 s of CPU and more
    # a command, most of a short one's time. They live as long as the child, as in a real process; what the
    # child allocates is collected as there.
    gc.collect()
    gc.freeze()
    Path(path + ".env").write_text(json.dumps({"env": dict(os.environ), "set_by_imports": set_by_imports}))
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the client connects once the imports are done
    listener.listen(16)
    listener.settimeout(0.05)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        while children:  # report the children that ended
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with conn:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        request, fds = _receive(conn)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            request["env"] = {**set_by_imports, **request["env"]}
            return request
        for fd in fds:
            os.close(fd)
        children[pid] = conn
        _send(conn, {"pid": pid})
    sys.exit(0)


def _interpreter_path() -> list[str]:
    """This interpreter's ``sys.path`` without its script's folder and its PYTHONPATH entries: the standard
    library and site-packages (with their .pth entries) that every ``python -m`` starts with."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    extra += [os.path.abspath(p) for p in extra]
    return [p for p in sys.path[1:] if p not in extra]


def _become(request: dict, base_path: list[str]) -> None:
    """Turn this forked child into ``python -m MODULE ARGS`` started with the request's environment and
    working directory, then run it as the interpreter's ``-m`` does."""
    import builtins
    import random
    import runpy
    import types

    import numpy

    if request["drop_capabilities"]:
        _drop_capabilities(request["drop_capabilities"])
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *pythonpath, *base_path]
    random.seed()  # a new process's own seeds, not the server's state
    numpy.random.seed()
    sys.argv[:] = ["-m", *request["args"]]
    _show_command_line([sys.executable, "-m", request["module"], *request["args"]])
    main = types.ModuleType("__main__")  # as the interpreter makes it at start-up
    main.__annotations__, main.__builtins__ = {}, builtins
    sys.modules["__main__"] = main
    runpy._run_module_as_main(request["module"], alter_argv=True)


# the capabilities a command run as root through ``setpriv`` may drop here (linux/capability.h's numbers)
CAPABILITIES = {"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4}


def _split_setpriv(cmd: list[str]) -> tuple[list[int], list[str]]:
    """``setpriv --inh-caps=-A,-B --bounding-set=-A,-B PYTHON ...`` (how tests run a command as root without
    root's way past file permissions) -> the numbers of A and B and ``PYTHON ...``; any other command -> no
    numbers and the command itself."""
    if len(cmd) < 4 or cmd[0] != "setpriv" or not cmd[1].startswith("--inh-caps=") or \
            cmd[2] != "--bounding-set=" + cmd[1].split("=", 1)[1]:
        return [], cmd
    names = cmd[1].split("=", 1)[1].split(",")
    if not all(n.startswith("-") and n[1:] in CAPABILITIES for n in names):
        return [], cmd
    return [CAPABILITIES[n[1:]] for n in names], cmd[3:]


def _drop_capabilities(numbers: list[int]) -> None:
    """What ``setpriv --inh-caps=-X --bounding-set=-X`` and its exec give a root process: X gone from the
    bounding, inheritable, permitted and effective sets (so from every process it starts, too)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    for n in numbers:
        if libc.prctl(24, n, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {n})")
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for n in numbers:
        word, bit = data[n // 32], ~(1 << (n % 32)) & 0xFFFFFFFF
        word.effective, word.permitted, word.inheritable = word.effective & bit, word.permitted & bit, \
            word.inheritable & bit
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _command_line_area() -> tuple[int, int]:
    """Where this process's command line lies in its memory: ``/proc/self/stat``'s ``arg_start`` and
    ``arg_end`` (Linux >= 3.5), what ``/proc/PID/cmdline`` reads."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # after the command's name, which may hold spaces
    return int(fields[45]), int(fields[46])  # fields 48 and 49, counted from 1 with pid and (comm)


def command_line_fits(cmd: list[str]) -> bool:
    """Whether a child can show ``cmd`` as its command line (``_show_command_line``)."""
    return len(_command_line_bytes(cmd, 0)) <= COMMAND_LINE_ROOM


def _command_line_bytes(cmd: list[str], room: int) -> bytes:
    """``cmd`` as the kernel holds a command line, padded to ``room`` bytes by slashes in front of the
    interpreter's path (``//.../python`` is the same file: every argument stays what it was)."""
    tail = b"".join(os.fsencode(a) + b"\0" for a in cmd[1:])
    head = os.fsencode(cmd[0]) + b"\0"
    return b"/" * max(0, room - len(head) - len(tail)) + head + tail


def _show_command_line(cmd: list[str]) -> None:
    """Write ``cmd`` over the server's command line, so that ``/proc/PID/cmdline`` (``ps``, and the check of
    Lightning's other ranks that their parent runs their command: ``pipeline.parent_death``) shows the
    command this child runs. The server was started with ``COMMAND_LINE_ROOM`` bytes of room; ending in a
    NUL byte, the area is read back as it is written."""
    import ctypes

    start, end = _command_line_area()
    data = _command_line_bytes(cmd, end - start)
    if len(data) != end - start:  # the client checked the length (command_line_fits): not reached
        raise RuntimeError(f"a command line of {len(data)} bytes does not fit in {end - start}")
    ctypes.memmove(start, data, len(data))


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
        if not chunk:
            raise ConnectionError("the client went away")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        data += chunk
    return json.loads(data), fds


def forkable(module: str) -> bool:
    """Whether ``python -m module ...`` could come from the server: this project's ``pipeline`` commands, unless
    ``RP_PRELOADED=0``. With several ranks the forked child is rank 0; Lightning's launcher starts the others
    as real processes of the command line it shows (``_show_command_line``)."""
    return module.split(".")[0] in FORKED_PACKAGES and os.environ.get("RP_PRELOADED") != "0"


class PreloadedServer:
    """The client side: the server (one per pytest process, started on first use) and its environment."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="preloaded-python-")
        self.path = os.path.join(self._dir, "socket")
        room = "." * COMMAND_LINE_ROOM  # what its children write their command lines over
        self.proc = subprocess.Popen([sys.executable, __file__, self.path, room], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL)
        self.env: dict[str, str] | None = None  # the server's, after its imports
        self.set_by_imports: dict[str, str] = {}
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the preloaded Python exited {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise TimeoutError("the preloaded Python did not start listening")
            time.sleep(0.05)
        if self.env is None:
            written = json.loads(Path(self.path + ".env").read_text())
            self.env, self.set_by_imports = written["env"], written["set_by_imports"]

    def differences(self, env: dict[str, str]) -> list[str]:
        """The start-up variables of ``env`` whose values are not the server's: none, and a child started with
        ``env`` imports as the server did."""
        self.ready()
        env = {**self.set_by_imports, **env}  # as the child's will be
        return sorted(k for k in set(env) | set(self.env) if READ_AT_START.match(k) and env.get(k) != self.env.get(k))

    def connect(self) -> socket.socket:
        self.ready()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        return conn


class ForkedProcess:
    """A child of the preloaded server: a ``subprocess.Popen``'s pid, poll, wait and signals."""

    def __init__(self, server: PreloadedServer, module: str, args: list[str], env: dict[str, str], cwd: str,
                 stdin: int, stdout: int, stderr: int, new_session: bool = False,
                 drop_capabilities: list[int] | None = None) -> None:
        self.args = [sys.executable, "-m", module, *args]
        self.returncode: int | None = None
        self._conn = server.connect()
        request = {"module": module, "args": list(args), "env": env, "cwd": str(cwd), "new_session": new_session,
                   "drop_capabilities": drop_capabilities or []}
        socket.send_fds(self._conn, [json.dumps(request).encode() + b"\n"], [stdin, stdout, stderr])
        self._buffer = b""
        self.pid = self._next()["pid"]

    def _next(self, timeout: float | None = None) -> dict:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the preloaded Python went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self._next(timeout)["returncode"]
            except socket.timeout:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0.001)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_server: PreloadedServer | None = None


def _server_for(cmd: list[str], env: dict[str, str]) -> PreloadedServer | None:
    """The server that can fork ``cmd`` (``[sys.executable, "-m", MODULE, *ARGS]``) with ``env``, or None."""
    global _server
    if len(cmd) < 3 or cmd[0] != sys.executable or cmd[1] != "-m" or not forkable(cmd[2]):
        _log("started", cmd)
        return None
    if not command_line_fits(cmd):
        _log("started", cmd, f"a command line over {COMMAND_LINE_ROOM} bytes")
        return None
    if _server is None:
        _server = PreloadedServer()
    differences = _server.differences(env)
    if differences:
        _log("started", cmd, f"{', '.join(differences)} not the server's")
        return None
    _log("forked", cmd)
    return _server


def _log(how: str, cmd: list[str], why: str = "") -> None:
    """``RP_PRELOADED_LOG=FILE``: a line per command, forked or started anew (and why, when the environment
    was the reason), and the test that ran it."""
    if os.environ.get("RP_PRELOADED_LOG"):
        fields = [how, os.environ.get("PYTEST_CURRENT_TEST", ""), " ".join(map(str, cmd))[:300]]
        fields += [why] if why else []
        with open(os.environ["RP_PRELOADED_LOG"], "a") as f:
            f.write("\t".join(fields) + "\n")


def _fd(target, default: int, null) -> int:
    """The file descriptor a child gets for ``target`` (None: this process's ``default``; DEVNULL; a file)."""
    if target is None:
        try:
            os.fstat(default)
            return default
        except OSError:
            return null.fileno()
    if target == subprocess.DEVNULL:
        return null.fileno()
    return target if isinstance(target, int) else target.fileno()


def popen(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None, stdout=None,
          stderr=None, start_new_session: bool = False) -> ForkedProcess | subprocess.Popen:
    """``subprocess.Popen(cmd, ...)`` (no pipes), forked from the preloaded server where that starts the same
    process."""
    env = dict(os.environ) if env is None else env
    dropped, python = _split_setpriv(cmd)
    server = _server_for(python, env)
    if server is None:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr,
                                start_new_session=start_new_session)
    return _fork(server, python, env, cwd, stdout, stderr, start_new_session, dropped)


def _fork(server: PreloadedServer, cmd: list[str], env: dict[str, str], cwd: str | Path | None, stdout, stderr,
          new_session: bool, dropped: list[int]) -> ForkedProcess:
    with open(os.devnull, "r+b") as null:  # the server holds its own copies of the descriptors once sent
        out = _fd(stdout, 1, null)
        err = out if stderr == subprocess.STDOUT else _fd(stderr, 2, null)
        return ForkedProcess(server, cmd[2], cmd[3:], env, str(cwd or os.getcwd()), _fd(None, 0, null), out, err,
                             new_session=new_session, drop_capabilities=dropped)


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None, stdout=None,
        stderr=None, capture_output: bool = False, text: bool = False, timeout: float | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, ...)``, forked from the preloaded server where that starts the same process (also
    behind ``setpriv`` dropping capabilities: the child drops them)."""
    env = dict(os.environ) if env is None else env
    dropped, python = _split_setpriv(cmd)
    server = _server_for(python, env)
    if server is None:
        return subprocess.run(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, capture_output=capture_output,
                              text=text, timeout=timeout, check=check)
    if capture_output:
        stdout = stderr = subprocess.PIPE
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = _fork(server, python, env, cwd, out if stdout == subprocess.PIPE else stdout,
                     err if stderr == subprocess.PIPE else stderr, False, dropped)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        captured = []
        for target, file in ((stdout, out), (stderr, err)):
            file.seek(0)
            data = file.read() if target == subprocess.PIPE else None
            captured.append(data.decode(errors="replace") if text and data is not None else data)
    if check and code:
        raise subprocess.CalledProcessError(code, cmd, *captured)
    return subprocess.CompletedProcess(cmd, code, *captured)


if __name__ == "__main__":
    _base_path = _interpreter_path()
    _request = _serve(sys.argv[1])
    _become(_request, _base_path)
