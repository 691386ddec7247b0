"""Model families of the zoo. Every constructor takes ``in_channels``, ``num_classes`` and
``image_size`` and every model traces with ``torch.fx``.

:func:`build` makes a model from a registered architecture name (``"resnet20"``,
``"vgg11"``, ``"mobilenetv2"``, ``"vit"`` ...) and keyword overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .mobilenetv2 import MobileNetV2
from .resnet import ResNet
from .vgg import VGG
from .vit import ViT

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(ResNet, depth=20),
    "resnet32": partial(ResNet, depth=32),
    "resnet56": partial(ResNet, depth=56),
    "vgg11": partial(VGG, depth=11),
    "vgg16": partial(VGG, depth=16),
    "mobilenetv2": MobileNetV2,
    "vit": ViT,
}


def build(arch: str, **kwargs) -> nn.Module:
    """Build an architecture by name.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        **kwargs: constructor arguments (``in_channels``, ``num_classes``, ``image_size``,
            width settings ...).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


__all__ = ["ARCHITECTURES", "MobileNetV2", "ResNet", "VGG", "ViT", "build"]
