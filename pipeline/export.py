"""``python -m pipeline export CKPT OUT.pt``: any checkpoint -> a plain fp32 ``state_dict`` of the network.

CKPT is a Lightning checkpoint file (DDP / single device) or a DeepSpeed ZeRO checkpoint directory
(shards of every rank, consolidated here). OUT holds only the network's tensors, in fp32, with the
model's own key names, so for resnet18..152 with the default options (shortcut B, not plain, v1.5: the
networks torchvision builds) ``torchvision.models.resnet50(num_classes=N).load_state_dict(torch.load(OUT))``
works. The file keeps no record of the network (option A and plain nets, v1 and v1.5, have the same
tensors); the checkpoint's ``hyper_parameters`` do. Nor of the code that trained it: export names that on stderr
(the commit of the checkpoint's provenance, ``pipeline/provenance.py``). What each output means goes beside it,
in ``OUT.classes.json`` (``class_list``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline import provenance
from pipeline.checkpoint_io import atomic_write_bytes
from pipeline.checkpoint_read import read_checkpoint, unreadable, verify_checkpoint
from pipeline.deepspeed_layout import LIGHTNING_TAG, refuse_folder_of_checkpoints, saved_tag
from pipeline.errors import ConfigError
from pipeline.export_temp_files import describe, remove_killed, temp_path

log = logging.getLogger(__name__)
PREFIX = "model."
CLASSES_SUFFIX = ".classes.json"


def _network_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the network's tensors (``model.*``), drop the prefix and metrics, cast floats to fp32."""
    out = {}
    for k, v in sd.items():
        if k.startswith("_forward_module."):  # a DeepSpeed / DDP wrapper's prefix
            k = k[len("_forward_module."):]
        if k.startswith("module."):
            k = k[len("module."):]
        if not k.startswith(PREFIX):
            continue
        k = k[len(PREFIX):]
        if k.startswith("_orig_mod."):  # torch.compile wrapper
            k = k[len("_orig_mod."):]
        out[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
        out[k] = out[k].contiguous()
    if not out:
        raise ConfigError("the checkpoint holds no network weights (no 'model.*' keys)")
    return out


def _zero_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    tag = saved_tag(ckpt_dir)
    if tag is None and (ckpt_dir / LIGHTNING_TAG).is_dir():
        tag = LIGHTNING_TAG
    with _deepspeed_says_on_stderr():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@contextlib.contextmanager
def _deepspeed_says_on_stderr() -> Iterator[None]:
    """DeepSpeed's import and conversion print their progress ("Processing zero checkpoint ...", its
    accelerator warning) on stdout, where export says what it wrote (a script reading that line got theirs
    too): they go to stderr, where they still show, warnings and errors included. DeepSpeed's logger writes to
    the stdout of its import (a handler made then: made here, it writes to stderr for good)."""
    stdout = sys.stdout
    logger = logging.getLogger("DeepSpeed")
    moved = {h: h.stream for h in logger.handlers if isinstance(h, logging.StreamHandler)
             and h.stream in (stdout, sys.__stdout__) and h.stream is not sys.stderr}
    with contextlib.redirect_stdout(sys.stderr):
        for h in moved:
            h.setStream(sys.stderr)
        try:
            yield
        finally:
            for h, stream in moved.items():
                h.setStream(stream)


def state_dict_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The network's fp32 state_dict from a checkpoint file or a ZeRO checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        refuse_folder_of_checkpoints(p)
        verify_checkpoint(p)
        try:
            return _network_only(_zero_state_dict(p))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{p}: not a readable DeepSpeed checkpoint directory: {e}") from None
        except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:  # a torn shard
            torn = next((f for f in sorted(p.rglob("*.pt")) if not zipfile.is_zipfile(f)), None)
            where = f"{torn} is torn (not a whole torch file: a copy cut short?)" if torn else str(e).splitlines()[0]
            raise ConfigError(f"{p}: not a readable DeepSpeed checkpoint directory: {where}") from None
    if not p.is_file():
        raise ConfigError(f"checkpoint {p} does not exist")
    verify_checkpoint(p)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ConfigError(f"cannot read checkpoint {p}: {unreadable(p, e)}") from None
        ckpt = _load_legacy(p)  # written by torch.save(_use_new_zipfile_serialization=False)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {p}: {unreadable(p, e)}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # torchvision's references: {"model": ...}
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ConfigError(f"{p} holds no state_dict")
    if not any(k.startswith(PREFIX) for k in sd):  # already a plain network state_dict (maybe DDP's "module.")
        sd = {PREFIX + k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return _network_only(sd)


def _load_legacy(p: Path):
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {p}: {unreadable(p, e)}") from None


def export(ckpt: str | Path, out: str | Path) -> dict[str, torch.Tensor]:
    """Write the network's weights of ``ckpt`` to ``out``, whole or not at all; ``out`` may replace only a
    weights file. Beside it, ``classes_path(out)``: what each output of the network means, where the checkpoint
    recorded it (see ``class_list``)."""
    _refuse_empty(ckpt, "checkpoint", "a checkpoint file or a DeepSpeed checkpoint directory")
    _refuse_empty(out, "out", "the output file (e.g. weights.pt)")
    _check_out(ckpt, out)
    folder = Path(out).parent
    if removed := remove_killed(folder):
        print(describe(folder, removed), file=sys.stderr, flush=True)
    sd = state_dict_from_checkpoint(ckpt)
    classes = class_list(ckpt)
    buf = io.BytesIO()
    torch.save(sd, buf)
    listed = classes_path(out)
    # an earlier export's list goes first: a failed or killed write then leaves weights without a list, never
    # weights beside another checkpoint's classes
    try:
        listed.unlink(missing_ok=True)
        atomic_write_bytes(buf.getbuffer(), out, tmp=temp_path(out), hold_lock=True)
    except OSError as e:
        raise ConfigError(f"out: cannot write {out}: {e.strerror or e}") from None
    if classes is not None:
        try:
            atomic_write_bytes((json.dumps(classes, indent=1, ensure_ascii=False) + "\n").encode(), listed)
        except OSError as e:
            raise ConfigError(f"out: wrote {out}, but cannot write its class list {listed}: "
                              f"{e.strerror or e}") from None
    return sd


def classes_path(out: str | Path) -> Path:
    """``net.pt`` -> ``net.pt.classes.json``: the class list written beside the weights (the whole name: ``net.pt``
    and ``net.pth`` have lists of their own)."""
    return Path(f"{out}{CLASSES_SUFFIX}")


def class_list(ckpt: str | Path) -> dict[str, list[str]] | None:
    """The class list the checkpoint's training recorded (``ShardDataModule.dataset_record``): ``classes``, the
    dataset's class ids (ImageNet's WordNet ids, an ImageFolder's folder names), and ``class_names`` where the
    manifest has them, both in label order (output ``i`` of the network is ``classes[i]``). The weights alone
    said nothing of it: shipped without the training's ``manifest.json``, an output index meant nothing. None
    for a checkpoint saved before checkpoints recorded it."""
    try:
        saved = read_checkpoint(ckpt)
    except ConfigError:
        return None
    for state in (saved.values() if isinstance(saved, dict) else ()):
        if isinstance(state, dict) and "classes_sha256" in state and isinstance(state.get("classes"), list):
            return {k: [str(c) for c in state[k]] for k in ("classes", "class_names")
                    if isinstance(state.get(k), list)}
    return None


def _refuse_empty(path: str | Path, name: str, what: str) -> None:
    """An empty argument (an unset shell variable) is no path: as ``Path("")`` it meant the current directory,
    taken for a folder of checkpoints or a directory to write into."""
    if str(path) == "":
        raise ConfigError(f"{name}: an empty path (an unset shell variable?); name {what}")


def _check_out(ckpt: str | Path, out: str | Path) -> None:
    """An existing ``out`` is replaced only when it holds weights (an earlier export) or nothing: the
    checkpoint itself or another training checkpoint lost its optimizer and loop state for good, and any
    other file (the run's ``config.yaml``, a shard: a slip of the shell's completion) its contents."""
    o = Path(out)
    if o.is_dir():
        raise ConfigError(f"out: {out} is a directory; name the output file (e.g. {o / 'weights.pt'})")
    listed = classes_path(o)
    if listed.is_dir() or (listed.exists() and not _is_class_list(listed)):
        raise ConfigError(f"out: {listed}, where export writes the class list of {out}, exists and is not one "
                          f"(an earlier export's); name another output file, or move it first")
    if not o.exists() or o.stat().st_size == 0:
        return
    if o.resolve() == Path(ckpt).resolve():
        raise ConfigError(f"out: {out} is the checkpoint being exported; name another output file (an existing "
                          f"weights file may be overwritten)")
    saved = _load_quietly(o)
    if isinstance(saved, dict) and "pytorch-lightning_version" in saved:
        raise ConfigError(f"out: {out} is a training checkpoint; name another output file (an existing weights "
                          f"file may be overwritten)")
    if not (isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values())):
        raise ConfigError(f"out: {out} exists and is not a weights file (a state_dict of tensors, as export "
                          f"writes); name another output file, or remove it first")


def _training_checkpoint(ckpt: str | Path) -> bool:
    try:
        saved = read_checkpoint(ckpt)
    except ConfigError:
        return False
    return isinstance(saved, dict) and "pytorch-lightning_version" in saved


def _is_class_list(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("classes"), list)


def _load_quietly(path: Path):
    """The file's contents with torch's safe loader (a training checkpoint loads so too); None when it is no
    torch file that loads so."""
    for mmap in (True, False):  # (a legacy, non-zip weights file cannot be memory-mapped)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # noqa: BLE001 (not a torch file, or one holding more than tensors)
            continue
    return None


def trained_by(ckpt: str | Path) -> list[str]:
    """What code and software trained the checkpoint (its provenance records, ``pipeline/provenance.py``), for
    stderr: OUT keeps tensors alone. Nothing for weights alone, or a checkpoint saved before runs recorded it."""
    try:
        said = provenance.describe(provenance.records(read_checkpoint(ckpt)))
    except ConfigError:  # (a legacy file that cannot be memory-mapped: exported all the same)
        return []
    return [f"{ckpt} was trained by {said[0]}", *said[1:]] if said else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="Lightning checkpoint file or DeepSpeed checkpoint directory")
    parser.add_argument("out", help="output .pt file (plain fp32 state_dict)")
    args = parser.parse_args(argv)
    try:
        sd = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in trained_by(args.checkpoint):
        print(line, file=sys.stderr)
    listed = classes_path(args.out)
    if not listed.exists() and _training_checkpoint(args.checkpoint):  # (weights alone never had a class list)
        print(f"note: {args.checkpoint} records no class list (saved before checkpoints kept one): output i of the "
              f"network is classes[i] of the manifest.json of the shards it trained on", file=sys.stderr)
    floats = sum(v.numel() for v in sd.values() if v.is_floating_point())
    counters = sum(1 for v in sd.values() if not v.is_floating_point())  # BatchNorm's num_batches_tracked (int64)
    print(f"wrote {args.out}: {len(sd)} tensors, {floats:,} fp32 values"
          + (f" (and {counters} integer BatchNorm batch counts)" if counters else "")
          + (f"; and {listed}: what each output means" if listed.exists() else ""))
    return 0
