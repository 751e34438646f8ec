"""The files of a DeepSpeed checkpoint directory, by name: one home for the layout that the resume's checks,
``export`` and the launcher's ``status`` read. No torch here (the launcher imports it on login nodes).

A save is a directory (Lightning names it like a file, ``last.ckpt``) holding ``latest``, a text file naming
the tag of the save, and the tag's folder (Lightning's tag: ``checkpoint``) with rank 0's model states
(``mp_rank_00_model_states.pt``; under ZeRO-3 ``zero_pp_rank_0_mp_rank_00_model_states.pt``) and one
optimizer shard per data-parallel rank that saved it (``zero_pp_rank_R_mp_rank_00_optim_states.pt``, with a
prefix such as ``bf16_`` for some optimizers).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.run_layout import LAST_CHECKPOINT, checkpoint_dir

LATEST = "latest"  # names the tag of the save DeepSpeed loads
LIGHTNING_TAG = "checkpoint"  # the tag Lightning's DeepSpeed strategy saves under
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # rank 0's model states under ZeRO-3


def saved_tag(ckpt_dir: Path) -> str | None:
    """The tag its ``latest`` file names (stripped, possibly empty); None when it has no ``latest`` file."""
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def model_states_file(ckpt_dir: Path) -> Path:
    """Rank 0's model states under the tag ``latest`` names (Lightning's without one): the ZeRO-3 file where
    only that one exists. The path need not exist."""
    tag = saved_tag(ckpt_dir)
    folder = ckpt_dir / (LIGHTNING_TAG if tag is None else tag)
    states, zero3 = folder / MODEL_STATES, folder / ZERO3_MODEL_STATES
    return zero3 if not states.exists() and zero3.exists() else states


def find_model_states(ckpt_dir: Path) -> Path | None:
    """The first model-states file in a tag's folder of the directory, ``latest`` or not: Lightning's tag
    first, then any tag's, then any ZeRO-3 rank 0's; None when there is none. (Not deeper: a folder holding run
    directories was taken for the ZeRO save found in one of them.)"""
    for cand in (ckpt_dir / LIGHTNING_TAG / MODEL_STATES,
                 *sorted(ckpt_dir.glob(f"*/{MODEL_STATES}")),
                 *sorted(ckpt_dir.glob(f"*/{ZERO3_MODEL_STATES}"))):
        if cand.is_file():
            return cand
    return None


def optim_states_name(rank: int) -> str:
    """The usual name of ``rank``'s optimizer shard (for messages; ``optim_states_files`` finds any prefix)."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def optim_states_files(tag_dir: Path, rank: int) -> list[Path]:
    """``rank``'s optimizer shard files in a tag's folder, sorted (none when it is missing)."""
    return sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))


def refuse_folder_of_checkpoints(p: Path) -> None:
    """A run directory, or its ``checkpoints/`` folder, where one checkpoint is meant: a ``ConfigError`` naming
    one of its checkpoints. (DeepSpeed's model states were found in a ZeRO save inside it, and the run failed in
    DeepSpeed's traceback; export said "Unable to find 'latest' file".) Here, without torch: `launch submit
    train --branch-from` checks it too."""
    if (p / LATEST).is_file() or any(p.glob(f"*/{MODEL_STATES}")) or any(p.glob(f"*/{ZERO3_MODEL_STATES}")):
        return  # a DeepSpeed checkpoint directory itself
    for folder, what in ((p, "a folder of checkpoints, not one: name one of them"),
                         (checkpoint_dir(p), "a run directory, not a checkpoint: name one of its checkpoints")):
        if files := sorted(folder.glob("*.ckpt")):
            mine = next((f for f in files if f.name == LAST_CHECKPOINT), files[0])
            raise ConfigError(f"{p} is {what}, e.g. {mine}")
