"""Optimizer and learning-rate schedule of the recipes: SGD, linear warmup, cosine or step decay per step."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.wording import plural


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: weights of convs/linears, and BN parameters and biases (all 1-D tensors). The second
    decays only with ``decay_norm_and_bias`` (the paper names no exception, and fb.resnet.torch, Facebook's
    Torch reproduction of its results, decays every parameter; ImageNet recipes since Goyal et al. 2017 do
    not). Always two, so a resume may switch it."""
    decay, norm_and_bias = [], []
    for p in model.parameters():
        if p.requires_grad:
            (norm_and_bias if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": norm_and_bias, "weight_decay": weight_decay if decay_norm_and_bias else 0.0}]


def epoch_to_step(epochs: float, steps_per_epoch: int) -> int:
    """The optimizer step at ``epochs`` (a milestone, a warm-up's length; fractions allowed): the nearest, a
    half up. Python's ``round`` rounds halves to even: milestones 0.5 and 1.5 of 15-step epochs fell at steps 8
    and 22, one after its half-step and one before."""
    return int(math.floor(epochs * steps_per_epoch + 0.5))


def lr_factor(
    step: int, total_steps: int | None, warmup_steps: int, schedule: str, milestones: list[int], gamma: float,
    warmup_factor: float | None = None,
) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based). The warm-up is linear, or with
    ``warmup_factor`` constant at that fraction of the peak (the paper's ResNet-110: 0.01 = 0.1 x 0.1).
    ``total_steps`` None: a run with no step or epoch limit, which the step and constant schedules allow
    (``ImageClassifier.check_run_length`` refuses a cosine one)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor if warmup_factor is not None else (step + 1) / warmup_steps
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs the run's length (trainer.max_steps or trainer.max_epochs)")
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"model.schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")


def make_sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float,
             decay_norm_and_bias: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, weight_decay, decay_norm_and_bias), lr=lr, momentum=momentum,
                           nesterov=nesterov)


def ignored_schedule_settings(model: dict) -> list[str]:
    """Schedule settings of the ``model`` config section that would do nothing, each said in one line (a
    cosine run given the step schedule's milestones, a warm-up factor without a warm-up)."""
    said = []
    schedule = model.get("schedule")
    for key in ("milestones", "milestone_steps"):
        if schedule != "step" and model.get(key):
            said.append(f"model.{key} {model.get(key)} is ignored: model.schedule is {schedule} (milestones and "
                        f"model.gamma belong to the step schedule)")
    if model.get("warmup_factor") is not None and not model.get("warmup_epochs") and not model.get("warmup_steps"):
        said.append(f"model.warmup_factor {model.get('warmup_factor')} is ignored: there is no warm-up "
                    f"(model.warmup_epochs 0, model.warmup_steps null)")
    return said


def schedule_against_run(total: int | None, warmup: int, milestones: list[int], schedule: str, warmup_epochs: float,
                         steps_per_epoch: int, warmup_factor: float | None = None) -> list[str]:
    """What the run's length does to the schedule, once it is known (at the fit's start): a warm-up that
    rounds to no step, one as long as the run (the schedule after it never starts), milestones after the end.
    ``total`` None: the run has no step or epoch limit (-1, or ``trainer.max_time`` alone), nothing ends it
    before a warm-up or a milestone; only the warm-up's rounding is said."""
    said = []
    if warmup_epochs and warmup == 0:
        said.append(f"model.warmup_epochs {warmup_epochs} is 0 optimizer steps at {plural(steps_per_epoch, 'step')} an "
                    f"epoch: no warm-up (model.warmup_steps sets it in steps)")
    ends = total is not None and total > 0
    if ends and warmup >= total:
        said.append(f"the warm-up ({plural(warmup, 'optimizer step')}) is not shorter than the run "
                    f"({plural(total, 'step')}): {_peak_in_warmup(total, warmup, warmup_factor)} and the {schedule} "
                    f"schedule never starts")
    late = sorted(m for m in milestones if m >= total) if schedule == "step" and ends else []
    if late:
        said.append(f"lr milestones at steps {late} come at or after the run's end ({plural(total, 'step')}): never "
                    f"reached")
    return said


def _peak_in_warmup(total: int, warmup: int, warmup_factor: float | None) -> str:
    """Whether a run of ``total`` steps all in a warm-up of ``warmup`` >= total steps reaches the peak lr, by
    ``lr_factor``: the linear warm-up's factor is (k+1)/warmup at step k, 1 at its last step (warmup - 1), which
    the run takes when warmup == total; the constant one stays at warmup_factor."""
    if warmup_factor is None:
        return ("the lr reaches model.lr's peak only at the run's last step" if warmup == total else
                "the lr never reaches model.lr's peak")
    if warmup_factor >= 1:
        return "the lr stays at model.lr's peak (model.warmup_factor 1)"
    return "the lr never reaches model.lr's peak"
