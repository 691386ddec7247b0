"""Terminal rewards of the environment (choose with ``reward=``).

All rewards are deterministic, computed once at the end of an episode from the accuracy
on the ``reward`` split (``acc`` in [0, 1]) and the FLOPs reduction
``r = 1 - FLOPs(pruned) / FLOPs(dense)`` in [0, 1]. Every earlier step returns 0.

{TABLE}

:data:`REWARDS` is the one statement of each formula: the env's docstring, ``autosculpt
info`` and the README's ``rewards`` block are generated from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Reward:
    """One terminal reward: its formula and range for humans (:func:`terminal_reward` is the
    code)."""

    name: str
    formula: str
    range: str


REWARDS: dict[str, Reward] = {
    r.name: r
    for r in (
        Reward(
            "budget",
            "acc; actions that would make the FLOPs target unreachable are masked (AMC's action "
            "wall, exact: dead-channel savings included), so every episode meets r >= target",
            "[0, 1]",
        ),
        Reward(
            "band",
            "acc if |r - target| <= band_tolerance else acc - 1 (the AutoSculpt paper's reward, "
            "on a 0-1 scale instead of 100 acc)",
            "[-1, 1]",
        ),
        Reward("log_flops", "-(1 - acc) * log(FLOPs(pruned)) (AMC)", "(-inf, 0]"),
        Reward("tradeoff", "acc + tradeoff_lambda * r", "[0, 1 + tradeoff_lambda]"),
    )
}
"""The rewards by name, in documentation order (``"budget"`` is the default)."""


def reward_table(markdown: bool = False) -> str:
    """:data:`REWARDS` as a table: reStructuredText-style text, or markdown."""
    if markdown:
        rows = ["| name | formula | range |", "|---|---|---|"]
        rows += [
            f"| `{r.name}` | {r.formula.replace('|', chr(92) + '|')} | {r.range} |"
            for r in REWARDS.values()
        ]
        return "\n".join(rows)
    return "\n".join(f"* ``{r.name}``: ``{r.range}``; {r.formula}." for r in REWARDS.values())


__doc__ = __doc__.replace("{TABLE}", reward_table())


def check_reward(name: str) -> str:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return name


def terminal_reward(
    name: str,
    accuracy: float,
    flops_reduction: float,
    pruned_flops: float,
    target: float,
    tolerance: float = 0.05,
    tradeoff_lambda: float = 1.0,
) -> float:
    """The terminal reward of ``name`` (formulas in :data:`REWARDS`)."""
    if name == "budget":
        return accuracy
    if name == "band":
        return accuracy if abs(flops_reduction - target) <= tolerance else accuracy - 1.0
    if name == "log_flops":
        return -(1.0 - accuracy) * math.log(max(pruned_flops, 1.0))
    if name == "tradeoff":
        return accuracy + tradeoff_lambda * flops_reduction
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
