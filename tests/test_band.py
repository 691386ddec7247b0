"""The FLOPs band (autosculpt_env.band) as the env applies it, on the digits twin of
AutoSculpt-ResNet: the budget reward has a band, a reward without a FLOPs target has none."""

from __future__ import annotations

import gymnasium as gym

import autosculpt_env  # noqa: F401
from autosculpt_env import band


def test_flops_band():
    base = gym.make("AutoSculpt-ResNet", dataset="digits").unwrapped
    assert band.flops_band(0.5, 0.05) == (0.5, 0.55)
    assert band.env_within_band(base, 0.5) and band.env_within_band(base, 0.55)
    assert not band.env_within_band(base, 0.56) and not band.env_within_band(base, 0.49)
    tradeoff = gym.make("AutoSculpt-ResNet", dataset="digits", reward="tradeoff").unwrapped
    assert band.env_within_band(tradeoff, 0.9)  # no FLOPs target, no band
