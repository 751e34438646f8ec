"""The ResNet family of He et al. 2016: ImageNet (resnet18..152) and CIFAR (cifar_resnet8..1202)
nets, each with the paper's shortcut options A/B/C and plain variants. Use ``build(name, **kw)``."""

from pipeline.models.cifar_resnet import (
    CifarResNet,
    cifar_resnet8,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    cifar_resnet1202,
)
from pipeline.models.registry import PLAIN_PREFIX, UnknownModelError, available, build
from pipeline.models.resnet import (
    SHORTCUT_OPTIONS,
    BasicBlock,
    Bottleneck,
    ModelConfigError,
    PadShortcut,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "SHORTCUT_OPTIONS",
    "PLAIN_PREFIX",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ModelConfigError",
    "PadShortcut",
    "ResNet",
    "UnknownModelError",
    "available",
    "build",
    "cifar_resnet8",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]
