"""At the start of a multi-rank fit, validate or test, every rank must read the same data, with the same
settings, code and software: a one-line error naming what differs, on every rank, before the first batch.

Ranks that disagree do not fail by themselves. A node whose shard copy (``--data.root /local/...``) is
partial, stale or from another data_prep run plans another epoch: another batch count per rank hangs DDP at
the epoch's end, the same count repeats and skips samples unseen. A node-local virtual environment with
another torch or Lightning, another checkout of this code, a config file edited while the ranks started:
each trains on without a word. Rank 0's provenance record (``pipeline/provenance.py``) describes rank 0 only.

``RankAgreement.setup`` (after the process group exists, before the checkpoint is restored and the first
batch) has each rank make a fingerprint: a digest of the dataset its splits plan from (shard names, sample
counts, the shards' recorded sha256, classes: the manifest it loaded; the tar files are not read), of the
settings that shape the training (not the per-node ones: the data root's path, devices, loader workers, the
run directory's path), of this
package's source files (no git on every rank: the files' contents, which also see uncommitted changes), and
the versions of Python, torch, Lightning, DALI, DeepSpeed and webdataset. One ``all_gather_object`` of these
few hundred bytes; when they differ, a second one of the details (~5 KB), and every rank raises the same
``ConfigError`` from the same gathered data (none waits for a peer that stopped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from pipeline.errors import ConfigError
from pipeline.provenance import CODE_ROOT, PACKAGE, _version, software_versions
from pipeline.wording import plural

log = logging.getLogger(__name__)

# settings that may differ from node to node without changing what is trained: where the shards are (the
# shards themselves are compared), how many devices and loader processes a node has, where the run directory
# is mounted, and the config files' paths (their values are compared)
PER_NODE_SETTINGS = frozenset({
    "config", "data.root", "data.num_workers", "data.worker_start_method", "data.dali_hw_decoder_load",
    "data.dali_source_workers", "data.prefetch_batches", "trainer.devices", "trainer.default_root_dir",
})
CODE_PACKAGES = ("pipeline", "data_prep")  # the code a training process runs
FIELDS = ("software", "code", "settings", "dataset")  # compared in this order; the first that differs is named
_SHOWN_SETTINGS = 3  # differing settings named in the line


def flat_settings(config: dict, run_dir: str | None) -> dict[str, str]:
    """``config`` (the parsed subcommand config, as a dict) flattened to ``key.sub: json value``, less
    ``PER_NODE_SETTINGS``; a ``ckpt_path`` inside the run directory is written relative to it (``RUN/...``),
    so a run directory mounted at two paths compares equal and a rank that resumes and one that does not
    differ."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif prefix not in PER_NODE_SETTINGS and not prefix.endswith("__path__"):
            flat[prefix] = json.dumps(value, sort_keys=True, default=str)

    walk("", config)
    ckpt = config.get("ckpt_path")
    if isinstance(ckpt, str) and run_dir:
        root = str(Path(run_dir).absolute()).rstrip("/") + "/"
        path = str(Path(ckpt).absolute())
        if path.startswith(root):
            flat["ckpt_path"] = json.dumps("RUN/" + path[len(root):])
    return flat


def code_files(root: Path = CODE_ROOT) -> dict[str, str]:
    """The source files of ``CODE_PACKAGES`` under ``root``: path (relative to it) -> sha256 of the contents (16
    hex digits; ``unreadable: why`` for a file that cannot be read, compared as such). The code each rank runs,
    checkout or installed copy, committed or not; a few hundred KB, read in milliseconds."""
    files = {}
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            try:
                files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            except OSError as e:
                files[str(path.relative_to(root))] = f"unreadable: {e.strerror}"
    return files


def code_digest(files: dict[str, str]) -> str:
    """One sha256 of ``code_files``' paths and digests."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def software() -> dict[str, str]:
    """The versions that must match across ranks: those each start's provenance record keeps."""
    return software_versions()


def dataset(datamodule: Any, stage: str) -> dict[str, Any]:
    """What the ranks' epoch plans are made of: for each split ``stage`` reads, its shards' names, sample
    counts and the sha256 data_prep recorded for each (as the data module loaded them from the manifest: same
    counts from another data_prep run differ too), and the classes. ``{}`` for a data module of another
    kind."""
    from pipeline.datamodule import SHARDS_OF

    read = getattr(datamodule, "splits_read", None)
    if read is None:
        return {}
    trainer = getattr(datamodule, "trainer", None)
    splits = read(stage, validating=trainer is None or trainer.limit_val_batches != 0)
    out: dict[str, Any] = {"root": str(getattr(datamodule, "root", "")), "splits": []}
    for key in splits:
        name = getattr(datamodule, key, None)
        try:
            held = getattr(datamodule, SHARDS_OF[key])
        except AttributeError:
            return {}
        sizes = [int(n) for n in held.shard_sizes]
        entries = held.manifest.get("splits", {}).get(held.split, {}).get("shards", [])
        recorded = [s.get("sha256") for s in entries]  # the tars' digests data_prep wrote (not computed here)
        digest = hashlib.sha256(json.dumps([list(held.shard_names), sizes, recorded]).encode()).hexdigest()
        out["splits"].append({"split": name, "samples": sum(sizes), "shards": len(sizes), "sha256": digest})
        out["classes"] = hashlib.sha256(json.dumps(list(held.classes)).encode()).hexdigest()
    return out


def details(datamodule: Any, stage: str, settings: dict[str, str]) -> dict[str, Any]:
    """This rank's fingerprint in full: what the error line quotes."""
    return {
        "software": software(),
        "code": {"root": str(CODE_ROOT), "sha256": code_digest(files := code_files()), "files": files,
                 "version": _version(None, PACKAGE)},
        "settings": settings,
        "dataset": dataset(datamodule, stage),
    }


def digests(full: dict[str, Any]) -> dict[str, str]:
    """One short digest per field of ``details``: what every start gathers."""
    out = {}
    for field in FIELDS:
        value = full[field]
        if field == "dataset":  # its root is a per-node path: the shards it holds are compared
            value = {k: v for k, v in value.items() if k != "root"}
        if field == "code":
            value = value["sha256"]
        out[field] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
    return out


def ranks_text(ranks: list[int], hosts: list[str]) -> str:
    """``rank 3 (node2)``, ``ranks 0-7 (node1)``, ``ranks 0-3, 8-11 (node1, node3)``."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {shown} ({_some(list(dict.fromkeys(hosts)))})"


def _verb(who: str, one: str, many: str) -> str:
    """``who`` (``rank 3 (node2)``, ``ranks 0-7 (node1)``) with its verb in agreement."""
    return f"{who} {one if who.startswith('rank ') else many}"


def _joined(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _split_text(split: dict) -> str:
    noun = f"{split['split']} sample"
    return f"{plural(split['samples'], noun)} in {plural(split['shards'], 'shard')}"


def _dataset_line(a: dict, b: dict, who_a: str, who_b: str, hosts_b: list[str]) -> str:
    if not a or not b:
        other = "another data module"
        return f"{who_a} read {a.get('root') or other}, {who_b} {b.get('root') or other}"
    for sa, sb in zip(a["splits"], b["splits"]):
        if sa != sb:
            same_counts = (sa["samples"], sa["shards"]) == (sb["samples"], sb["shards"])
            theirs = ("the same counts in other shards" if same_counts else
                      f"{sb['samples']} in {plural(sb['shards'], 'shard')}")
            host = hosts_b[0] if len(set(hosts_b)) == 1 else "those nodes"
            return (f"{who_a} read {a['root']} with {_split_text(sa)}, {who_b} read {b['root']} with {theirs}: "
                    f"every rank must read the same shards (a partial or stale copy on {host}, or another "
                    f"data_prep run?)")
    return (f"{who_a} read {a['root']}, {who_b} read {b['root']}: the same shards, other classes (another "
            f"data_prep run?); every rank must read the same dataset")


def _settings_line(a: dict[str, str], b: dict[str, str], who_a: str, who_b: str) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    unset = "(not set)"
    shown = keys[:_SHOWN_SETTINGS]
    more = f" (and {plural(len(keys) - len(shown), 'other setting')})" if len(keys) > len(shown) else ""
    mine = _joined([f"{k} {a.get(k, unset)}" for k in shown])
    theirs = _joined([f"{k} {b.get(k, unset)}" for k in shown])
    if "ckpt_path" in keys:  # not given: each rank looked for RUN/checkpoints/last.ckpt (--ckpt_path last)
        why = ("every rank must start from the same checkpoint (the run directory's checkpoint found on one node "
               "and not on another: another run directory there, or a shared file system that shows it late?)")
    else:
        why = ("every rank must start with the same settings (another command line or config file on one node, or a "
               "config file edited while the ranks started?)")
    return f"{_verb(who_a, 'has', 'have')} {mine}, {who_b} {theirs}{more}: {why}"


def _software_line(a: dict[str, str], b: dict[str, str], who_a: str, who_b: str) -> str:
    keys = [k for k in a if a.get(k) != b.get(k)]
    mine = _joined([f"{k} {a.get(k)}" for k in keys])
    theirs = _joined([f"{k} {b.get(k)}" for k in keys])
    return (f"{_verb(who_a, 'runs', 'run')} {mine}, {who_b} {theirs}: every rank must run the same software (a "
            f"node-local virtual environment or container of another version?)")


def _code_line(a: dict, b: dict, who_a: str, who_b: str) -> str:
    def say(c: dict) -> str:
        return f"the code in {c['root']} (source files sha256 {c['sha256'][:12]})"

    fa, fb = a.get("files", {}), b.get("files", {})
    changed = sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k])
    only_a, only_b = sorted(fa.keys() - fb.keys()), sorted(fb.keys() - fa.keys())
    parts = ([f"{_some(changed)} differ{'s' if len(changed) == 1 else ''}"] if changed else []) + \
            ([f"{_some(only_a)} only on {who_a.split(' (')[0]}"] if only_a else []) + \
            ([f"{_some(only_b)} only on {who_b.split(' (')[0]}"] if only_b else [])
    which = f" ({'; '.join(parts)})" if parts else ""
    return (f"{_verb(who_a, 'runs', 'run')} {say(a)}, {who_b} {say(b)}{which}: every rank must run the same code "
            f"(another checkout or installed copy on one node, or files changed while the ranks started?)")


def _some(names: list[str]) -> str:
    """The first three of ``names``, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


FIELD_WORDS = {"software": "the software", "code": "the code", "settings": "the settings",
               "dataset": "the dataset"}


def disagreement(gathered: list[dict[str, str]], full: list[dict[str, Any]], hosts: list[str]) -> str | None:
    """The line for ranks whose fingerprints (``gathered``: each rank's ``digests``; ``full``: its ``details``)
    differ, else None: the first field of ``FIELDS`` that differs, rank 0's side against the first other."""
    for field in FIELDS:
        groups: dict[str, list[int]] = {}
        for rank, fp in enumerate(gathered):
            groups.setdefault(fp[field], []).append(rank)
        if len(groups) < 2:
            continue
        (ra, rb), others = list(groups.values())[:2], len(groups) - 2
        who_a, who_b = (ranks_text(r, [hosts[i] for i in r]) for r in (ra, rb))
        a, b = full[ra[0]][field], full[rb[0]][field]
        line = {"dataset": lambda: _dataset_line(a, b, who_a, who_b, [hosts[i] for i in rb]),
                "settings": lambda: _settings_line(a, b, who_a, who_b),
                "software": lambda: _software_line(a, b, who_a, who_b),
                "code": lambda: _code_line(a, b, who_a, who_b)}[field]()
        also = [FIELD_WORDS[f] for f in FIELDS[FIELDS.index(field) + 1:]
                if len({fp[f] for fp in gathered}) > 1]
        tail = (f" ({plural(others, 'more group')} of ranks differ{'s' if others == 1 else ''} too)" if others else "")
        tail += f" (they differ on {' and '.join(also)} too)" if also else ""
        return f"ranks disagree on {FIELD_WORDS[field]}: {line}{tail}"
    return None


class RankAgreement(Callback):
    """Stops every rank of a start whose ranks disagree (see the module's docstring). ``settings``: the
    parsed config of the subcommand (``flat_settings``)."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.settings = settings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or not dist.is_available() or not dist.is_initialized():
            return
        stage = str(getattr(stage, "value", stage))
        full = details(trainer.datamodule, stage, self.settings)
        mine = {**digests(full), "host": socket.gethostname()}
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, mine)
        hosts = [str(g.pop("host")) for g in gathered]
        if all(g == gathered[0] for g in gathered):
            if trainer.is_global_zero:
                log.info("rank agreement: %s read the same data with the same settings, code and software",
                         plural(trainer.world_size, "rank"))
            return
        everyone: list[Any] = [None] * trainer.world_size  # every rank is here: they all saw the same digests
        dist.all_gather_object(everyone, full)
        line = disagreement(gathered, everyone, hosts)
        _end_process_group()
        raise ConfigError(line)


def _end_process_group() -> None:
    """Every rank stops here, together: the process group ends as at the end of a run (``pipeline.cli``'s
    teardown, which an error skips), or a rank whose peer already exited may abort at exit."""
    try:
        dist.barrier()
        dist.destroy_process_group()
    except (RuntimeError, ValueError):  # a peer gone already: its line is the same as this one
        pass
