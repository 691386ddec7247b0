"""Shared fixtures. Tests run on small real data: digits always, Fashion-MNIST when installed."""

from __future__ import annotations

import pytest
import torch

from autosculpt_env import data

# one thread: tests run beside other processes (subprocess agents, CI), and torch threads
# oversubscribing 2 cores slow everything by orders of magnitude
torch.set_num_threads(1)


def fashion_mnist_available() -> bool:
    try:
        data._resolve_dir("fashion-mnist", None)
        return (data._resolve_dir("fashion-mnist", None) / "t10k-images-idx3-ubyte.gz").exists()
    except Exception:
        return False


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or AUTOSCULPT_DATA_DIR)",
)
