"""Shared fixtures. Tests run on small real data: digits always, Fashion-MNIST when installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autosculpt_env import data
from autosculpt_env.models.vit import Attention

# one thread: tests run beside other processes (subprocess agents, CI), and torch threads
# oversubscribing 2 cores slow everything by orders of magnitude (training ~100x)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts and ends with one torch thread (an agent run in-process or a
    command's --threads may have changed it)."""
    torch.set_num_threads(1)
    yield
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


class Mixed(nn.Module):
    """Depthwise and grouped convs, a concat, an SE-style gate and an attention block."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.branch = nn.Conv2d(16, 8, 1)
        self.se = nn.Linear(24, 24)
        self.attn = Attention(24, 4)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        a = torch.sigmoid(self.dw(x))
        y = torch.cat([a + self.grouped(x), self.branch(x)], dim=1)
        y = y * torch.sigmoid(self.se(y.mean((2, 3))))[:, :, None, None]
        t = y.flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.head(t.mean(1))
