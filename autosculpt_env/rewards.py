"""Terminal rewards of the environment (choose with ``reward=``).

All rewards are deterministic, computed once at the end of an episode from the accuracy
on the ``reward`` split (``acc`` in [0, 1]) and the FLOPs reduction
``r = 1 - FLOPs(pruned) / FLOPs(dense)`` in [0, 1]. Every earlier step returns 0.

=============  ==================================================  ==================
name           formula                                             range
=============  ==================================================  ==================
``budget``     ``acc``; actions that would make the FLOPs target   [0, 1]
               unreachable are masked (AMC's action wall), so
               every episode meets ``r >= target``
``band``       ``acc`` if ``|r - target| <= tolerance`` else       [-1, 1]
               ``acc - 1`` (the AutoSculpt paper's reward, on a
               0-1 scale instead of 100·acc)
``log_flops``  ``-(1 - acc) * log(FLOPs(pruned))`` (AMC)           (-inf, 0]
``tradeoff``   ``acc + lambda * r``                                [0, 1 + lambda]
=============  ==================================================  ==================
"""

from __future__ import annotations

import math

REWARDS = ("budget", "band", "log_flops", "tradeoff")


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
    """The terminal reward of ``name`` (see the module table)."""
    if name == "budget":
        return accuracy
    if name == "band":
        return accuracy if abs(flops_reduction - target) <= tolerance else accuracy - 1.0
    if name == "log_flops":
        return -(1.0 - accuracy) * math.log(max(pruned_flops, 1.0))
    if name == "tradeoff":
        return accuracy + tradeoff_lambda * flops_reduction
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
