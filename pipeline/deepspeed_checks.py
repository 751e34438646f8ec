"""What a DeepSpeed run would get wrong silently, or refuse in a traceback once its engine is up, checked
before it starts (one ``ConfigError`` line naming the setting or file)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from pytorch_lightning.strategies import DeepSpeedStrategy, Strategy

from pipeline.checkpoint_read import read_checkpoint
from pipeline.deepspeed_layout import optim_states_files, optim_states_name, saved_tag
from pipeline.errors import ConfigError
from pipeline.run_layout import BEST_GLOB
from pipeline.wording import plural


def saved_zero_stage(path: Path) -> int | None:
    """The ZeRO stage that wrote a checkpoint directory (its ``ds_config``), else None."""
    config = read_checkpoint(path).get("ds_config")
    stage = (config.get("zero_optimization") or {}).get("stage") if isinstance(config, dict) else None
    return int(stage) if isinstance(stage, int) else None


def zero_world_size(path: str | Path) -> int | None:
    """The number of ranks that wrote a DeepSpeed ZeRO checkpoint directory (its optimizer state is sharded
    over them: one ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank); None for a checkpoint file."""
    p = Path(path)
    if not p.is_dir():
        return None
    saved = read_checkpoint(p).get("dp_world_size")  # written by every DeepSpeed save; compared on its load
    return int(saved) if saved else None


def check_zero_world_size(path: str | Path, world_size: int) -> None:
    """Refuse, before anything starts, to resume a ZeRO checkpoint with another world size. DeepSpeed
    (0.19) cannot re-partition ZeRO-1/2/3 optimizer state for another data-parallel size: its
    ``load_checkpoint`` raises after the engine is built (``elastic_checkpoint`` does not change that), and
    its universal-checkpoint converter only knows Adam's state, not SGD's momentum."""
    saved = zero_world_size(path)
    if saved is not None and saved != world_size:
        ranks = plural(saved, "rank")
        raise ConfigError(
            f"cannot resume the DeepSpeed ZeRO checkpoint {path} with another world size: it was saved by"
            f" {ranks}, this run has {world_size}, and DeepSpeed cannot re-partition its sharded optimizer state"
            f" (momentum); resume with {ranks} (trainer.num_nodes x trainer.devices), or start a new run (another"
            f" trainer.default_root_dir) from its weights alone with --model.init_weights {path}"
        )


def check_accumulation(strategy: Strategy, accumulate: int, adapted_from: str | None = None) -> None:
    """Refuse gradient accumulation under DeepSpeed: Lightning's closure divides the loss by
    ``accumulate_grad_batches`` and DeepSpeed's ``engine.backward`` divides it again (Lightning 2.6,
    DeepSpeed 0.19), so every update would be ``accumulate`` times too small, silently.
    ``adapted_from``: the resume's geometry chose the accumulation to keep the checkpoint's global batch."""
    if not isinstance(strategy, DeepSpeedStrategy) or accumulate <= 1:
        return
    refuse_accumulation(accumulate, adapted_from)


def configured_deepspeed(setting: object) -> bool:
    """Whether ``trainer.strategy`` as configured (a registered name such as ``deepspeed_stage_2``, its
    ``_cpu`` variant, a ``class_path`` or an instance) is DeepSpeed: what ``config_check`` reads, with no
    trainer built."""
    if isinstance(setting, DeepSpeedStrategy):
        return True
    if isinstance(setting, str):
        return setting.lower().startswith("deepspeed")
    path = setting.get("class_path") if isinstance(setting, dict) else getattr(setting, "class_path", None)
    return isinstance(path, str) and path.rsplit(".", 1)[-1].endswith("DeepSpeedStrategy")


def refuse_accumulation(accumulate: int, adapted_from: str | None = None) -> None:
    """``check_accumulation``'s error (``accumulate`` > 1 under DeepSpeed)."""
    why = (f" (chosen on resume to keep the checkpoint's global batch: {adapted_from})" if adapted_from else "")
    raise ConfigError(
        f"trainer.accumulate_grad_batches {accumulate}{why}: under DeepSpeed Lightning and DeepSpeed both divide the "
        f"loss by it, so each update would be {accumulate}x too small; a DeepSpeed run takes its global batch as "
        f"ranks x data.batch_size (set data.batch_size to that global batch / ranks)")


def check_checkpoint_kind(strategy: Strategy, ckpt_path: str | Path | None, subcommand: str) -> None:
    """A DeepSpeed checkpoint directory is read only by DeepSpeed of the same stage family (ZeRO-3 shards
    parameters, 1 and 2 do not), a checkpoint file only by the other strategies: the other pairings ended in
    Lightning's ``IsADirectoryError``, DeepSpeed's "not a valid DeepSpeed checkpoint" or its bare
    ``AssertionError``, after the run had started."""
    if ckpt_path is None or "://" in str(ckpt_path) or not Path(ckpt_path).exists():
        return
    path = Path(ckpt_path)
    deepspeed = isinstance(strategy, DeepSpeedStrategy)
    weights = f"--model.init_weights {path}"
    elsewhere = (f"start a new run (another trainer.default_root_dir) from its weights with {weights}" if subcommand == "fit"
                 else f"score its weights alone with --ckpt_path null {weights}")
    if path.is_dir() and not deepspeed:
        stage = saved_zero_stage(path)
        named = f"deepspeed_stage_{stage}" if stage else "deepspeed_stage_N"
        raise ConfigError(f"ckpt_path: {path} is a DeepSpeed checkpoint directory and trainer.strategy is "
                          f"{type(strategy).__name__}, which reads checkpoint files: use trainer.strategy {named} "
                          f"(or {named}_cpu on CPUs), as it was saved, or {elsewhere}")
    if not path.is_dir() and deepspeed:
        raise ConfigError(f"ckpt_path: {path} is a checkpoint file (DDP or one device) and trainer.strategy is "
                          f"DeepSpeed, which reads only its own checkpoint directories: use the strategy that saved "
                          f"it, or {elsewhere}")
    if path.is_dir() and deepspeed:
        if saved_tag(path) is None:  # (fit: check_zero_shards said it first) DeepSpeed's refusal named no file
            raise ConfigError(f"ckpt_path: {path} has no `latest` file (the tag of the save DeepSpeed loads): not a "
                              f"whole DeepSpeed checkpoint; {elsewhere}")
        stage = saved_zero_stage(path)
        now = 3 if getattr(strategy, "zero_stage_3", False) else (strategy.config or {}).get(
            "zero_optimization", {}).get("stage")
        if stage is not None and now is not None and (stage == 3) != (now == 3):
            raise ConfigError(f"ckpt_path: {path} was saved by ZeRO stage {stage} and this run is stage {now}: "
                              f"DeepSpeed cannot load stage-3 shards into stages 1-2 or the other way; use "
                              f"{'deepspeed_stage_3' if stage == 3 else 'deepspeed_stage_1 or deepspeed_stage_2'}, or {elsewhere}")
        if stage == 3 and subcommand in ("validate", "test"):  # DeepSpeed 0.19's engine without an optimizer
            raise ConfigError(f"ckpt_path: {path} is a ZeRO-3 checkpoint, which DeepSpeed (0.19) cannot load for "
                              f"{subcommand} (its evaluation engine fails in load_checkpoint: 'DeepSpeedZeRoOffload' "
                              f"object has no attribute '_restore_from_bit16_weights'); {elsewhere}")


def check_zero_shards(path: str | Path, world_size: int) -> None:
    """Before a resume: the directory's ``latest`` (the save's tag) and one whole optimizer shard per rank
    that saved it. A missing or torn shard failed on its own rank only, after rank 0 had restored the rest,
    and the run died in two tracebacks (gloo: "Connection closed by peer")."""
    p = Path(path)
    if not p.is_dir():
        return
    tag = saved_tag(p)
    if tag is None:
        raise ConfigError(f"ckpt_path: {p} has no `latest` file (the tag of the save DeepSpeed loads): not a whole "
                          f"DeepSpeed checkpoint; resume from another, or start from its weights with "
                          f"--model.init_weights {p}")
    tag_dir = p / tag
    for rank in range(world_size):
        found = optim_states_files(tag_dir, rank)
        if not found:
            raise ConfigError(f"ckpt_path: {tag_dir} lacks rank {rank}'s optimizer shard "
                              f"({optim_states_name(rank)}) of the {world_size} that saved it: "
                              f"resume from another checkpoint (a {BEST_GLOB} beside it)")
        for shard in found:
            if not zipfile.is_zipfile(shard):
                raise ConfigError(f"ckpt_path: {shard} is torn (not a whole torch file: a copy cut short?): resume from "
                                  f"another checkpoint (a {BEST_GLOB} beside it)")
