"""Environment classes."""

from .autosculpt import AutoSculptEnv

__all__ = ["AutoSculptEnv"]
