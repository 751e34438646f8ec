"""CIFAR-10 ResNets of He et al. 2016, section 4.2 (ResNet-20/32/44/56/110/1202), and ResNet-8.

Architecture (6n+2 weighted layers): 3x3 conv with 16 filters, then three stages of ``n``
BasicBlocks with 16/32/64 filters on 32x32/16x16/8x8 maps (the first block of stages 2 and 3
downsamples with stride 2), global average pooling and a ``num_classes``-way fc. The paper uses
shortcut option A (zero-padding identity) here, so that is the default; with it the parameter
counts are the paper's 0.27M/0.46M/0.66M/0.85M/1.7M/19.4M. ResNet-8 (n=1) is not in the paper: it is the
family's smallest member, for smoke runs and the tests of training mechanics (a third of ResNet-20's step).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from pipeline.models.resnet import (
    BasicBlock,
    ModelConfigError,
    check_shortcut,
    conv3x3,
    init_weights,
    make_shortcut,
)

__all__ = [
    "CifarResNet",
    "cifar_resnet8",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
]


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``n`` BasicBlocks per stage."""

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        shortcut: str = "A",
        plain: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ModelConfigError(f"blocks per stage n must be >= 1, got {n}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ModelConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        num_classes = int(num_classes)  # (a numpy integer too)
        self.shortcut = check_shortcut(shortcut)
        self.plain = plain
        self.depth = 6 * n + 2
        self.inplanes = 16

        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        init_weights(self, zero_init_residual, plain)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage of ``blocks`` BasicBlocks, the first one changing stride/width."""
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = make_shortcut(self.shortcut, self.inplanes, planes, s, self.plain)
            layers.append(BasicBlock(self.inplanes, planes, s, downsample, self.plain))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def cifar_resnet8(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-8 (n=1), 75K params with option A: not in the paper; the smallest net of the family."""
    return CifarResNet(1, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet20(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-20 (n=3), 0.27M params with option A."""
    return CifarResNet(3, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet32(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-32 (n=5), 0.46M params with option A."""
    return CifarResNet(5, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet44(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-44 (n=7), 0.66M params with option A."""
    return CifarResNet(7, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet56(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-56 (n=9), 0.85M params with option A."""
    return CifarResNet(9, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet110(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-110 (n=18), 1.7M params with option A."""
    return CifarResNet(18, num_classes, shortcut, plain, zero_init_residual)


def cifar_resnet1202(
    num_classes: int = 10, shortcut: str = "A", plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-1202 (n=200), 19.4M params with option A: the paper's over-deep net (Table 6, 7.93%)."""
    return CifarResNet(200, num_classes, shortcut, plain, zero_init_residual)
