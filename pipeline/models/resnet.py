"""ImageNet ResNets of He et al. 2016, "Deep residual learning for image recognition".

Modelled on torchvision's ``models/resnet.py`` and kept ``state_dict``-compatible with it
(``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``; blocks hold ``conv1``/``bn1``/``conv2``/``bn2``
(/``conv3``/``bn3``) and, for projection shortcuts, ``downsample.0``/``downsample.1``), so
``resnet50().load_state_dict(torchvision.models.resnet50().state_dict())`` works with strict=True.

On top of torchvision this module implements the paper's knobs:

* ``shortcut`` - the three shortcut options of section 4.1 (Table 3):
  "A" zero-padding identity (parameter-free), "B" projection only where the shape changes
  (torchvision's choice, default), "C" projection on every block.
* ``plain`` - the paper's plain baselines: the same stacks without any shortcut.
* ``stride_in_1x1`` - where a bottleneck downsamples: False (default) puts the stride on the 3x3
  conv like torchvision ("ResNet v1.5"); True puts it on the first 1x1 conv as in the paper ("v1").
* ``zero_init_residual`` - zero-init the last BN gamma of every residual branch (Goyal et al. 2017),
  so each block starts as ``relu(shortcut(x))``.

The basic/bottleneck blocks and the shortcut factory are shared with the CIFAR family
(``cifar_resnet.py``).
"""

from __future__ import annotations

import numbers

from typing import Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError

__all__ = [
    "SHORTCUT_OPTIONS",
    "ModelConfigError",
    "PadShortcut",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "make_shortcut",
    "init_weights",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

#: The paper's shortcut options (section 4.1): A = zero-pad identity, B = project where the shape
#: changes, C = project everywhere.
SHORTCUT_OPTIONS: tuple[str, ...] = ("A", "B", "C")


class ModelConfigError(ConfigError):
    """A model was asked for with a setting it does not support (name, option or combination).

    A ``ConfigError`` (hence a ``ValueError``), so the CLI prints it without a traceback."""


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BN follows every conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (BN follows every conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A shortcut: identity with spatial subsampling and zero-padded extra channels.

    Parameter-free, so it adds no ``state_dict`` keys. Subsampling is a strided view
    (``x[:, :, ::s, ::s]``) and the padding a single ``F.pad`` on the channel dimension, which
    keeps it cheap, traceable by ``torch.compile`` and valid for channels_last tensors.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ModelConfigError(
                f"shortcut 'A' can only add channels, got {in_planes} -> {out_planes}"
            )
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # F.pad pads from the last dim backwards: (W_l, W_r, H_t, H_b, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


def check_shortcut(shortcut: str) -> str:
    """Return ``shortcut`` if it is one of the paper's options, else raise naming it."""
    if shortcut not in SHORTCUT_OPTIONS:
        raise ModelConfigError(
            f"unknown shortcut option {shortcut!r}; expected one of {list(SHORTCUT_OPTIONS)} "
            "(A = zero-pad identity, B = projection where shape changes, C = projection everywhere)"
        )
    return shortcut


def make_shortcut(
    shortcut: str, in_planes: int, out_planes: int, stride: int, plain: bool = False
) -> nn.Module | None:
    """Build a block's shortcut module (``None`` means plain identity or, for plain nets, none).

    Option B returns ``Sequential(conv1x1, BN)`` so its keys are torchvision's
    ``downsample.0``/``downsample.1``.
    """
    check_shortcut(shortcut)
    if plain:
        return None
    changes_shape = stride != 1 or in_planes != out_planes
    if shortcut == "C" or (shortcut == "B" and changes_shape):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if shortcut == "A" and changes_shape:
        return PadShortcut(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets); ``relu(F(x) + shortcut(x))``."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        plain: bool = False,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        del stride_in_1x1  # only meaningful for bottlenecks; accepted for a uniform signature
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.plain = plain

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if not self.plain:
            if self.downsample is not None:
                identity = self.downsample(x)
            out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152); ``relu(F(x) + shortcut(x))``.

    ``stride_in_1x1=False`` strides the 3x3 conv (torchvision, "v1.5"); True strides the first
    1x1 conv as in the paper ("v1"). Both have identical parameter shapes.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        plain: bool = False,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = planes
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.plain = plain

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if not self.plain:
            if self.downsample is not None:
                identity = self.downsample(x)
            out = out + identity
        return self.relu(out)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def init_weights(model: nn.Module, zero_init_residual: bool, plain: bool) -> None:
    """He (Kaiming) init for convs as in the paper (and torchvision); BN to gamma=1, beta=0.

    With ``zero_init_residual`` the last BN gamma of every residual branch is zeroed. Plain nets
    have no residual branch: zeroing there would make every block output a constant zero and
    stop all gradients, so the combination is rejected rather than silently ignored.
    """
    if zero_init_residual and plain:
        raise ModelConfigError(
            "zero_init_residual=True needs residual branches, but plain=True has none "
            "(every block would output zeros); use zero_init_residual=False for plain nets"
        )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.constant_(m.last_bn().weight, 0)


class ResNet(nn.Module):
    """The paper's ImageNet ResNet (Table 1): 7x7/2 conv, 3x3/2 max-pool, 4 stages, avg-pool, fc."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        shortcut: str = "B",
        plain: bool = False,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ModelConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        num_classes = int(num_classes)  # (a numpy integer too)
        self.shortcut = check_shortcut(shortcut)
        self.plain = plain
        self.stride_in_1x1 = stride_in_1x1
        self.inplanes = 64

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_weights(self, zero_init_residual, plain)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` blocks, the first one changing stride/width."""
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            out_planes = planes * block.expansion
            downsample = make_shortcut(self.shortcut, self.inplanes, out_planes, s, self.plain)
            layers.append(
                block(self.inplanes, planes, s, downsample, self.plain, self.stride_in_1x1)
            )
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(
    block: Block,
    layers: Sequence[int],
    num_classes: int,
    shortcut: str,
    plain: bool,
    stride_in_1x1: bool,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(block, layers, num_classes, shortcut, plain, stride_in_1x1, zero_init_residual)


def resnet18(
    num_classes: int = 1000,
    shortcut: str = "B",
    plain: bool = False,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (paper Table 1): BasicBlock x [2, 2, 2, 2]."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, shortcut, plain, stride_in_1x1,
                   zero_init_residual)


def resnet34(
    num_classes: int = 1000,
    shortcut: str = "B",
    plain: bool = False,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34 (paper Table 1): BasicBlock x [3, 4, 6, 3]."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, shortcut, plain, stride_in_1x1,
                   zero_init_residual)


def resnet50(
    num_classes: int = 1000,
    shortcut: str = "B",
    plain: bool = False,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 (paper Table 1): Bottleneck x [3, 4, 6, 3]."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, shortcut, plain, stride_in_1x1,
                   zero_init_residual)


def resnet101(
    num_classes: int = 1000,
    shortcut: str = "B",
    plain: bool = False,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-101 (paper Table 1): Bottleneck x [3, 4, 23, 3]."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, shortcut, plain, stride_in_1x1,
                   zero_init_residual)


def resnet152(
    num_classes: int = 1000,
    shortcut: str = "B",
    plain: bool = False,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-152 (paper Table 1): Bottleneck x [3, 8, 36, 3]."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, shortcut, plain, stride_in_1x1,
                   zero_init_residual)
