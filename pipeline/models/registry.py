"""Name -> constructor registry, so configs can say ``model.arch: resnet50`` or ``plain_cifar_resnet20``.

``plain_<name>`` is ``<name>`` with ``plain=True`` (the paper's plain baselines).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from pipeline.models import cifar_resnet, resnet
from pipeline.models.resnet import ModelConfigError

__all__ = ["UnknownModelError", "available", "build", "computation", "options", "typed_options", "PLAIN_PREFIX"]

PLAIN_PREFIX = "plain_"

_BASE: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "cifar_resnet8": cifar_resnet.cifar_resnet8,
    "cifar_resnet20": cifar_resnet.cifar_resnet20,
    "cifar_resnet32": cifar_resnet.cifar_resnet32,
    "cifar_resnet44": cifar_resnet.cifar_resnet44,
    "cifar_resnet56": cifar_resnet.cifar_resnet56,
    "cifar_resnet110": cifar_resnet.cifar_resnet110,
    "cifar_resnet1202": cifar_resnet.cifar_resnet1202,
}


class UnknownModelError(ModelConfigError):
    """``build`` was given a model name that is not registered."""


def available() -> list[str]:
    """All buildable names: the residual nets, then their ``plain_`` counterparts."""
    return list(_BASE) + [PLAIN_PREFIX + name for name in _BASE]


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with constructor keyword arguments ``kwargs``.

    Raises ``UnknownModelError`` (a ``ValueError``) for an unknown name and
    ``ModelConfigError`` for a keyword the model does not take or a bad option value.
    """
    base = _base_name(name)
    plain = base != name
    if not isinstance(name, str) or base not in _BASE:
        raise UnknownModelError(
            f"unknown model name {name!r}; available: {', '.join(available())}"
        )
    fn = _BASE[base]
    accepted = inspect.signature(fn).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ModelConfigError(
            f"model {name!r} does not take {unknown}; it accepts {sorted(accepted)}"
        )
    for key, value in kwargs.items():  # "false" is a true value: a plain net built for shortcut=..., plain="false"
        if isinstance(accepted[key].default, bool) and not isinstance(value, bool):
            raise ModelConfigError(f"option {key} of model {name!r} is true or false, not {value!r}")
    if plain:
        if kwargs.get("plain", True) is not True:
            raise ModelConfigError(
                f"model {name!r} is a plain net but was given plain={kwargs['plain']!r}; "
                f"use {base!r} for the residual version"
            )
        kwargs["plain"] = True
    return fn(**kwargs)


def _base_name(name: str) -> str:
    """``resnet18`` of ``plain_resnet18``; other names as given."""
    return name[len(PLAIN_PREFIX):] if isinstance(name, str) and name.startswith(PLAIN_PREFIX) else name


def option_names(name: str) -> list[str]:
    """The options of model ``name`` a config sets (``model.arch_kwargs``): its keywords but ``num_classes``,
    which the data gives. Empty for an unknown name (``build`` names it)."""
    base = _base_name(name) if isinstance(name, str) else None
    if base not in _BASE:
        return []
    return sorted(k for k in inspect.signature(_BASE[base]).parameters if k != "num_classes")


def typed_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the words ``true``/``false`` of an on/off option made booleans: a dotted command-line
    key (``--model.arch_kwargs.plain false``) reaches the free-form dict as the string, which Python takes
    for true. Unknown names and keys are left to ``build``."""
    base = _base_name(name)
    if base not in _BASE:
        return dict(kwargs)
    params = inspect.signature(_BASE[base]).parameters
    words = {"true": True, "false": False}
    return {k: words[v.lower()] if k in params and isinstance(params[k].default, bool) and isinstance(v, str)
            and v.lower() in words else v for k, v in kwargs.items()}


def options(name: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Every option ``build(name, **kwargs)`` builds with: those given (typed as ``typed_options``), the others
    at their defaults (``num_classes``, ``model.num_classes``, only where given), the shortcut of a plain net
    left out (it has none): one network's options written two ways (``{}`` and ``{shortcut: A}`` for a CIFAR
    net) compare equal. Unknown names and keys are left to ``build``."""
    given = typed_options(name, kwargs or {})
    base = _base_name(name)
    if base not in _BASE:
        return given
    params = inspect.signature(_BASE[base]).parameters
    out = {k: p.default for k, p in params.items() if k != "num_classes" and p.default is not inspect.Parameter.empty}
    out.update(given)
    if name.startswith(PLAIN_PREFIX):
        out["plain"] = True
    if out.get("plain") is True:
        out.pop("shortcut", None)
    return out


def computation(name: str, **kwargs: Any) -> dict[str, Any]:
    """What network ``build(name, **kwargs)`` computes beyond its tensors' names and shapes: a residual net
    with option A and its plain counterpart have the same tensors, and so have a bottleneck net with the
    stride in the 1x1 (v1) and in the 3x3 (v1.5). Options the net ignores are None (the shortcut of a
    plain net, the stride placement of basic blocks); the class count is left out (it shows in shapes)."""
    base = _base_name(name)
    params = inspect.signature(_BASE[base]).parameters

    def option(key: str) -> Any:
        return kwargs.get(key, params[key].default if key in params else None)

    plain = name.startswith(PLAIN_PREFIX) or bool(option("plain"))
    bottleneck = base in ("resnet50", "resnet101", "resnet152")
    return {"net": base, "plain": plain, "shortcut": None if plain else option("shortcut"),
            "stride_in_1x1": bool(option("stride_in_1x1")) if bottleneck else None}


def describe(computation: dict[str, Any]) -> str:
    """``computation``'s result in words: 'plain_resnet34', 'resnet50 (option B, v1.5: stride in the 3x3)'."""
    c = computation
    parts = [] if c["plain"] else [f"option {c['shortcut']}"]
    if c["stride_in_1x1"] is not None:
        parts.append("v1: stride in the 1x1" if c["stride_in_1x1"] else "v1.5: stride in the 3x3")
    name = (PLAIN_PREFIX if c["plain"] else "") + c["net"]
    return f"{name} ({', '.join(parts)})" if parts else name
