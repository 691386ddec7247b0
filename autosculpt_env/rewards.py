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


LATENCY_TARGET = (
    "With ``target_latency_reduction`` (``t_lat``; ``lat`` = the predicted latency reduction, "
    "``1 - latency(pruned) / latency(dense)`` from the measured per-(layer, action) table, "
    ":mod:`autosculpt_env.latency`) the latency is budgeted next to the FLOPs: under "
    "``budget`` an action is valid only when one of a few fixed completions of the policy "
    "(every later layer its fastest action, its fewest-FLOPs action, or a blend of the two) "
    "meets both targets, so every episode meets r >= target and lat >= t_lat and no step is "
    "left without a valid action (a sufficient check: it may mask an action that some other "
    "completion would allow); under ``band`` the reward is acc only when lat is also within "
    "``band_tolerance`` of t_lat. ``log_flops`` and ``tradeoff`` do not use it."
)
"""How a latency target enters the rewards (the env's docstring shows it)."""


def terminal_reward(
    name: str,
    accuracy: float,
    flops_reduction: float,
    pruned_flops: float,
    target: float,
    tolerance: float = 0.05,
    tradeoff_lambda: float = 1.0,
    latency_reduction: float | None = None,
    latency_target: float | None = None,
) -> float:
    """The terminal reward of ``name`` (formulas in :data:`REWARDS`; a latency target as in
    :data:`LATENCY_TARGET`)."""
    if name == "budget":
        return accuracy
    if name == "band":
        inside = abs(flops_reduction - target) <= tolerance
        if latency_target is not None:
            if latency_reduction is None:
                raise ValueError("a latency target needs the policy's latency_reduction")
            inside = inside and abs(latency_reduction - latency_target) <= tolerance
        return accuracy if inside else accuracy - 1.0
    if name == "log_flops":
        return -(1.0 - accuracy) * math.log(max(pruned_flops, 1.0))
    if name == "tradeoff":
        return accuracy + tradeoff_lambda * flops_reduction
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
