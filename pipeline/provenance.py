"""Provenance: what code and software trained a checkpoint.

A checkpoint and the loggers keep the resolved config, which says *what* was asked for, not *which code* ran
it: this project's git commit (and whether its tree had uncommitted changes), the versions of torch,
Lightning, DALI, DeepSpeed, webdataset and Python, CUDA / cuDNN and the GPU, the world size, rank 0's host
and the Slurm job and restart. A run resumed across many preemptions may change any of them between two
starts, and a result (a regression, a bit-exact resume that is not) is explained only by knowing which.

``collect`` returns that record, once per start, on global rank 0, as a flat dict of strings and numbers (it
loads with ``torch.load(weights_only=True)`` and goes into W&B's config as it is). Git is asked once, with a
short timeout, and never fails the run: no git, no checkout (an installed copy), a checkout git refuses
(another user's: "dubious ownership") or a slow file system each give ``git_commit: unknown`` with the reason
in ``git_note``. ``pipeline/provenance_callback.py`` puts one record per start into every checkpoint (the
list carried over from the checkpoint it resumed, ``checkpoint["provenance"]``) and into the loggers;
``describe`` says it in words for ``launch status`` and ``export``. No torch or Lightning import here at
load time (``launch status`` runs on login nodes).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _metadata
import os
import platform
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

KEY = "provenance"  # the checkpoint's key: a list, one record per start that saved into its history
MAX_STARTS = 100  # records kept: the first start's and the newest; each record's ``start`` numbers them
GIT_TIMEOUT_S = 5.0  # per git call: a checkout on a slow NFS must not hold up the start
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"
CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding pipeline/, data_prep/, launch/
PACKAGE = "resnet-pipeline"  # this project's distribution name (pyproject.toml)

# variables that would make git describe another repository than the one the code is in
_GIT_LOCATION_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                     "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_NAMESPACE", "GIT_PREFIX")
_MAX_CHANGED_NAMED = 10  # the uncommitted files a record names (the count is always there)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``git -C root ARGS``; past ``GIT_TIMEOUT_S`` its whole process group is killed (a child holding the
    output pipe kept ``subprocess.run``'s timeout waiting) and ``TimeoutExpired`` raised."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_ENV}
    env.update(LC_ALL="C", GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0")  # no index.lock: other jobs share it
    cmd = ["git", "-C", str(root), *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                          env=env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=GIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _git_refusal(stderr: str) -> str:
    """Git's reason, in a few words: its first ``fatal:`` line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith("fatal:")), lines[0] if lines else "no message")
    if "dubious ownership" in first:
        return (f"git refuses the checkout (dubious ownership: another user owns it; `git config --global --add "
                f"safe.directory {first.split(' at ', 1)[-1].strip(chr(39))}` trusts it)")
    if "not a git repository" in first:
        return "not a git checkout"
    return f"git: {first.removeprefix('fatal: ')}"


def git_state(root: str | Path = CODE_ROOT) -> dict[str, str]:
    """``git_commit`` (the full hash), ``git_branch``, ``git_dirty`` (``yes``: files differ from the commit,
    or files git does not ignore are not in it -- a new module counts, ``runs/`` and ``data/`` do not; ``no``;
    or ``unknown``), ``git_changed`` (how many, and the first few of them) and ``git_note`` (why the commit or
    the changes are unknown, else empty) of the checkout ``root`` is in. A ``root`` inside another repository
    (an installed copy in a virtual environment that lives in some project's checkout) is not a checkout of
    this code."""
    root = Path(root).resolve()
    state = {"git_commit": UNKNOWN, "git_branch": UNKNOWN, "git_dirty": UNKNOWN, "git_changed": "", "git_note": ""}
    try:
        head = _git(root, "rev-parse", "--show-toplevel", "HEAD", "--abbrev-ref", "HEAD")
    except FileNotFoundError:
        return {**state, "git_note": "git is not installed here"}
    except subprocess.TimeoutExpired:
        return {**state, "git_note": f"git did not answer within {GIT_TIMEOUT_S:g} s"}
    except OSError as e:
        return {**state, "git_note": f"git could not run: {e.strerror or e}"}
    out = head.stdout.split()
    if head.returncode != 0 or len(out) != 3:
        return {**state, "git_note": _git_refusal(head.stderr)}
    top, commit, branch = out
    if Path(top).resolve() != root:
        return {**state, "git_note": f"not a git checkout ({root} is inside the repository {top})"}
    state.update(git_commit=commit, git_branch="detached" if branch == "HEAD" else branch)
    try:
        status = _git(root, "status", "--porcelain")
    except (subprocess.TimeoutExpired, OSError) as e:
        why = f"did not answer within {GIT_TIMEOUT_S:g} s" if isinstance(e, subprocess.TimeoutExpired) else str(e)
        return {**state, "git_note": f"uncommitted changes unknown: git status {why}"}
    if status.returncode != 0:
        return {**state, "git_note": f"uncommitted changes unknown: {_git_refusal(status.stderr)}"}
    changed = [line[3:] + (" (untracked)" if line.startswith("??") else "")
               for line in status.stdout.splitlines() if len(line) > 3]
    named = ", ".join(changed[:_MAX_CHANGED_NAMED]) + (", ..." if len(changed) > _MAX_CHANGED_NAMED else "")
    state.update(git_dirty="yes" if changed else "no", git_changed=f"{len(changed)}: {named}" if changed else "0")
    return state


def _version(module: str | None, *distributions: str, prefix: str | None = None) -> str:
    """The version of an imported ``module`` (its ``__version__``: torch's says its CUDA build), else of the
    first installed distribution named (or, with ``prefix``, whose name starts so: DALI's wheel is named
    after its CUDA, ``nvidia-dali-cuda130``), else "not installed". Nothing is imported here."""
    loaded = sys.modules.get(module) if module else None
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return str(loaded.__version__)  # (torch's is a TorchVersion, which weights_only loading refuses)
    for name in distributions:
        try:
            return _metadata.version(name)
        except _metadata.PackageNotFoundError:
            continue
    if prefix is not None:
        for dist in _metadata.distributions():
            name = (dist.metadata["Name"] or "").lower()
            if name.startswith(prefix):
                return f"{dist.version} ({name})"
    return NOT_INSTALLED


def software_versions() -> dict[str, str]:
    """The versions of Python and of the packages a run's results depend on (recorded per start; compared
    across ranks by ``pipeline.rank_agreement``)."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch", "torch"),
        "pytorch_lightning": _version("pytorch_lightning", "pytorch-lightning", "lightning"),
        "nvidia_dali": _version("nvidia.dali", "nvidia-dali", prefix="nvidia-dali"),
        "deepspeed": _version("deepspeed", "deepspeed"),
        "webdataset": _version("webdataset", "webdataset"),
    }


def _cuda(device: Any) -> dict[str, str | int]:
    import torch

    cuda = torch.version.cuda or "none (a CPU build of torch)"
    try:
        cudnn = str(torch.backends.cudnn.version() or "none") if torch.backends.cudnn.is_available() else "none"
    except Exception:  # noqa: BLE001 (a broken cuDNN install is told elsewhere; here it is only unknown)
        cudnn = UNKNOWN
    gpu, count = "none", 0
    if getattr(device, "type", None) == "cuda":
        try:
            gpu, count = torch.cuda.get_device_name(device), torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            gpu = UNKNOWN
    return {"cuda": cuda, "cudnn": cudnn, "gpu": gpu, "gpus_on_host": count}


def collect(world_size: int = 1, num_nodes: int = 1, device: Any = None, run_dir: str | Path | None = None,
            root: str | Path = CODE_ROOT) -> dict[str, str | int]:
    """This start's record (global rank 0 calls it; ``device`` is its device). Never raises: what cannot be
    found out is ``unknown``, and a record that cannot be made at all says why in ``git_note``."""
    record: dict[str, str | int] = {
        "started_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **({"run_dir": str(Path(run_dir).absolute())} if run_dir is not None else {}),
    }
    try:
        record.update(git_state(root))
        record.update({
            "code_path": str(Path(root).resolve()),
            "package_version": _version(None, PACKAGE),
            **software_versions(),
            **_cuda(device),
            "world_size": int(world_size),
            "num_nodes": int(num_nodes),
            "hostname": socket.gethostname(),
        })
        if os.environ.get("SLURM_JOB_ID"):
            restarts = os.environ.get("SLURM_RESTART_COUNT") or "0"
            record.update({
                "slurm_job_id": os.environ["SLURM_JOB_ID"],
                "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", ""),
                "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
                "slurm_restart_count": int(restarts) if restarts.isdigit() else restarts,
            })
    except Exception as e:  # noqa: BLE001 (a record is worth less than the run: never fail it)
        record.setdefault("git_commit", UNKNOWN)
        record["git_note"] = f"provenance incomplete: {type(e).__name__}: {e}"
    # plain str and int only: a checkpoint loads with torch.load(weights_only=True), W&B's config takes them
    return {k: v if type(v) is int else str(v) for k, v in record.items()}


def records(checkpoint: Any) -> list[dict]:
    """The records of a checkpoint dict (none in one saved before they were kept, or foreign)."""
    kept = checkpoint.get(KEY) if isinstance(checkpoint, dict) else None
    return [r for r in kept if isinstance(r, dict)] if isinstance(kept, list) else []


def with_start(earlier: list[dict], record: dict) -> list[dict]:
    """``earlier`` (the resumed checkpoint's records) with this start's ``record`` appended, numbered
    (``start``: 1 for a run's first); past ``MAX_STARTS`` the first start's and the newest are kept."""
    last = earlier[-1].get("start") if earlier else 0
    number = last + 1 if isinstance(last, int) and not isinstance(last, bool) else len(earlier) + 1
    kept = [*earlier, {"start": number, **record}]
    return kept if len(kept) <= MAX_STARTS else [kept[0], *kept[-(MAX_STARTS - 1):]]


def code(record: dict) -> str:
    """Which code, in words: ``git 1a2b3c4d5e6f`` (with uncommitted changes), or unknown and why."""
    commit = record.get("git_commit")
    if isinstance(commit, str) and commit and commit != UNKNOWN:
        dirty = record.get("git_dirty")
        return f"git {commit[:12]}" + {"yes": " with uncommitted changes", "no": ""}.get(
            dirty, " (uncommitted changes unknown)")
    why = record.get("git_note") or "no record"
    version = record.get("package_version")
    installed = f"{PACKAGE} {version}, " if isinstance(version, str) and version != NOT_INSTALLED else ""
    return f"{installed}commit unknown ({why})"


def short_code(kept: list[dict]) -> str:
    """The newest start's code in a table cell: ``1a2b3c4d`` (``+`` with uncommitted changes, ``?`` when
    that is unknown), ``unknown`` without a commit, ``-`` without records; `` changed`` when the starts
    trained with different code (``describe`` says which)."""
    if not kept:
        return "-"
    commit = kept[-1].get("git_commit")
    if isinstance(commit, str) and commit and commit != UNKNOWN:
        cell = commit[:8] + {"yes": "+", "no": ""}.get(kept[-1].get("git_dirty"), "?")
    else:
        cell = "unknown"
    return cell + (" changed" if len({code(r) for r in kept}) > 1 else "")


def _software(record: dict) -> str:
    parts = [f"{name} {record[key]}" for key, name in (("torch", "torch"), ("pytorch_lightning", "lightning"),
                                                       ("python", "python")) if record.get(key)]
    if record.get("gpu") not in (None, "", "none"):
        parts.append(f"{record['gpu']}, CUDA {record.get('cuda')}, cuDNN {record.get('cudnn')}")
    return ", ".join(parts)


def _where(record: dict) -> str:
    ranks = record.get("world_size")
    what = f"{ranks} rank{'s' if ranks != 1 else ''}" if isinstance(ranks, int) else ""
    if record.get("hostname"):
        what += f"{' ' if what else ''}(rank 0 on {record['hostname']})"
    if record.get("slurm_job_id"):
        array = record.get("slurm_array_job_id")
        task = f" (array {array}_{record.get('slurm_array_task_id')})" if array else ""
        what += f", Slurm job {record['slurm_job_id']}{task} restart {record.get('slurm_restart_count', 0)}"
    return what


def describe(kept: list[dict]) -> list[str]:
    """The records of a checkpoint in words: the newest start's code, software and ranks, and -- when its
    starts ran different code -- which steps each code trained. Empty without records."""
    if not kept:
        return []
    newest = kept[-1]
    step = newest.get("start_step")
    at = f", from step {step:,}" if isinstance(step, int) and step else ""
    lines = [f"{code(newest)} (start {newest.get('start', len(kept))}{at}): {_software(newest)}; {_where(newest)}"]
    runs: list[tuple[str, list[dict]]] = []  # consecutive starts of the same code
    for r in kept:
        if runs and runs[-1][0] == code(r):
            runs[-1][1].append(r)
        else:
            runs.append((code(r), [r]))
    if len(runs) > 1:
        parts = []
        for what, starts in runs:
            first, last = starts[0].get("start"), starts[-1].get("start")
            numbers = f"start {first}" if first == last else f"starts {first}-{last}"
            from_step = starts[0].get("start_step")
            parts.append(f"{numbers}{f' (from step {from_step:,})' if isinstance(from_step, int) else ''}: {what}")
        lines.append("code changed between starts: " + "; ".join(parts))
    first_step = kept[0].get("start_step")
    if isinstance(first_step, int) and first_step > 0 and kept[0].get("start") == 1:
        lines.append(f"steps before {first_step:,}: no record (trained before provenance was recorded)")
    return lines
