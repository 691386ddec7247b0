"""VGG with batch normalisation (Simonyan & Zisserman, 2015), sized for small images."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-{11, 16}-BN with a width multiplier and a global-average-pool classifier.

    A max-pool is skipped once the feature map is 1 pixel wide, so the same net runs on
    8x8 digits, 28x28 Fashion-MNIST and 32x32 CIFAR images.

    Args:
        depth: 11 or 16.
        width_mult: multiplies every layer's channel count.
        in_channels: image channels.
        num_classes: classifier outputs.
        image_size: input height and width; decides which pools are kept.
    """

    def __init__(
        self,
        depth: int = 16,
        width_mult: float = 1.0,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
    ):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for v in CONFIGS[depth]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            c_out = max(4, round(v * width_mult))
            layers += [
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


ARCHITECTURES = {f"vgg{d}": partial(VGG, depth=d) for d in (11, 16)}
