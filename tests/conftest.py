"""Shared fixtures. Tests run on small real data: digits always, Fashion-MNIST when installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autosculpt_env import data
from autosculpt_env.models.vit import Attention

ROOT = Path(__file__).resolve().parents[1]

SURROGATE_STORE = Path(__file__).parent / "data" / "surrogate_store"
"""The ``recovery`` evaluations of ``AutoSculpt-ResNet``'s digits twin at its default
settings that its first-use surrogate (``evaluation="proxy"``) is fitted on: 201 policies,
collected once. A test that points ``$AUTOSCULPT_SURROGATE_STORE`` at a copy
(:func:`surrogate_store`) fits that surrogate in seconds instead of evaluating for minutes;
a store whose key no longer matches (other weights or data) is simply not found, and the
surrogate is collected as on first use."""


def surrogate_store(folder: Path) -> Path:
    """A copy of :data:`SURROGATE_STORE` in ``folder`` (tests never write the committed one)."""
    import shutil

    return Path(shutil.copytree(SURROGATE_STORE, folder / "surrogate_store"))


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


def sweep_killed_at_first_row(
    argv: list[str], rows_dir: Path, timeout: float
) -> tuple[dict[str, str], int, str]:
    """Start ``benchmarks/leaderboard.py argv`` in its own process group and kill the group
    (the running agent with the harness) as soon as the first row appears in ``rows_dir``.

    Returns ``(rows, returncode, output)``: ``{file name: text}`` of the rows on disk after
    the kill, the harness's return code (``-SIGKILL`` when it was killed; another code when
    it ended first or ``timeout`` seconds passed with no row) and its output.
    """
    cmd = [sys.executable, str(ROOT / "benchmarks" / "leaderboard.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(rows_dir.glob("*.json")):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode(errors="replace")
    return {p.name: p.read_text() for p in rows_dir.glob("*.json")}, proc.returncode, out
