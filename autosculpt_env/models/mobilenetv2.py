"""MobileNetV2 (Sandler et al., 2018) with small-image strides."""

from __future__ import annotations

import torch
from torch import nn

# expansion t, channels c, repeats n, stride s (ImageNet strides)
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1); residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(c_in, hidden, 1))
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier.

    For images of 32 pixels or fewer the stem keeps stride 1, so a 28x28 input ends at
    2x2 instead of 1x1 (set ``small_stage_stride1=True`` to also keep the second stage at
    stride 1, the heavier CIFAR adaptation).

    Args:
        width_mult: multiplies every layer's channel count.
        in_channels: image channels.
        num_classes: classifier outputs.
        image_size: input height and width; decides the strides.
        last_channel: channels of the final 1x1 conv before pooling (scaled by width_mult
            when above 1).
        small_stage_stride1: on small images, also run the second stage at stride 1.
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        last_channel: int = 1280,
        dropout: float = 0.0,
        small_stage_stride1: bool = False,
    ):
        super().__init__()
        small = image_size <= 32
        c = _divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNReLU(in_channels, c, 3, 1 if small else 2)]
        for stage, (t, ch, n, s) in enumerate(SETTINGS):
            if small and small_stage_stride1 and stage == 1:
                s = 1
            c_out = _divisible(ch * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        last = _divisible(last_channel * max(1.0, width_mult))
        layers.append(ConvBNReLU(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.classifier(self.dropout(x))


ARCHITECTURES = {"mobilenetv2": MobileNetV2}
