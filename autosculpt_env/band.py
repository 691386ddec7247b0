"""The FLOPs band: where a search's answer must land.

Results are compared at equal FLOPs: a search's answer must remove at least the target
share of the FLOPs and at most ``band_tolerance`` more (the env's keyword, 0.05 by default,
the AutoSculpt paper's band), i.e. lie in :func:`flops_band`. The ``budget`` reward's action
wall guarantees the lower edge; the upper one is what a search must respect when it picks
its best policy. Rewards without a FLOPs target (``log_flops``, ``tradeoff``) have no band.
"""

from __future__ import annotations

#: rewards whose episodes have a FLOPs target, and so a band
BANDED_REWARDS = ("budget", "band")


def flops_band(target: float, tolerance: float) -> tuple[float, float]:
    """The FLOPs reductions a search's answer may have: ``[target, target + tolerance]``.

    >>> flops_band(0.5, 0.05)
    (0.5, 0.55)
    """
    return float(target), round(float(target) + float(tolerance), 12)


def max_kept(dense: float, target_reduction: float) -> float:
    """The most of a dense cost (FLOPs, latency) a policy may keep and still reach
    ``target_reduction``: ``(1 - target) * dense``, with 1e-12 relative slack for rounding.
    The env's action wall, the policy samplers and the benchmarks all use this one edge.

    >>> max_kept(1000.0, 0.5) - 500.0 < 1e-6
    True
    """
    return (1.0 - float(target_reduction)) * float(dense) * (1 + 1e-12)


def within_band(flops_reduction: float, target: float, tolerance: float) -> bool:
    """Whether a FLOPs reduction lies in :func:`flops_band` (1e-9 slack for rounding).

    >>> within_band(0.52, 0.5, 0.05), within_band(0.56, 0.5, 0.05), within_band(0.49, 0.5, 0.05)
    (True, False, False)
    """
    lo, hi = flops_band(target, tolerance)
    return lo - 1e-9 <= float(flops_reduction) <= hi + 1e-9


def env_within_band(base, flops_reduction: float) -> bool:
    """Whether a policy of the (unwrapped) env ``base`` with this FLOPs reduction is an
    answer to its task: inside the band for :data:`BANDED_REWARDS`, always for the others."""
    if base.reward_name not in BANDED_REWARDS:
        return True
    return within_band(flops_reduction, base.target, base.band_tolerance)
