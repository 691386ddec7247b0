"""Model families of the zoo. Every constructor takes ``in_channels``, ``num_classes`` and
``image_size`` and every model traces with ``torch.fx``.

Each module of this package declares the architectures it defines in a module-level
``ARCHITECTURES`` dict (name -> constructor); this package collects them all, so a new
architecture is one new module. :func:`build` makes a model from a name (``"resnet20"``,
``"vgg11"``, ``"mobilenetv2"``, ``"vit"`` ...) and keyword overrides.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from torch import nn

from .mobilenetv2 import MobileNetV2
from .resnet import ResNet
from .vgg import VGG
from .vit import ViT

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
"""Every architecture of every module of this package, by name."""
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name, _constructor in getattr(_module, "ARCHITECTURES", {}).items():
        if _name in ARCHITECTURES:
            raise ValueError(f"architecture {_name!r} is declared twice ({_module.__name__})")
        ARCHITECTURES[_name] = _constructor


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
