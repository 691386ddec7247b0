"""Statistics of a leaderboard, the way RL results are reported since Agarwal et al. (2021),
"Deep Reinforcement Learning at the Edge of the Statistical Precipice" (NeurIPS).

* per task: the mean score over seeds with a 95 % percentile-bootstrap interval;
* across tasks: scores normalised per task between the uniform baseline (0) and the dense
  network (1), aggregated by the interquartile mean (IQM: the mean of the middle 50 % of all
  runs), with a 95 % *stratified* bootstrap interval (runs resampled within each task);
* the probability of improvement ``P(X > Y)``: the chance that a run of agent X on a task
  scores above a run of agent Y on it (ties count a half), averaged over tasks, with a
  stratified-bootstrap interval;
* performance profiles: the fraction of runs whose normalised score exceeds ``tau``, for
  every ``tau``, with stratified-bootstrap bands.

The bootstrap is :func:`scipy.stats.bootstrap` (several samples resampled independently is
exactly the stratified bootstrap); the statistics are a few lines of numpy on top. rliable,
the paper's own library, is not used: the versions pip resolves beside our pins (rliable
1.2, arch 7.2, pandas 3.1) fail on ``import arch`` (a pandas API arch 7.2 still calls).

Every function takes ``scores``: one 1-D array of runs (seeds) per task, tasks in a fixed
order. A task with a single run enters every resample unchanged (nothing to resample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def _stratified_ci(
    scores: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    reps: int,
    seed: int,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(*tasks)`` under the stratified bootstrap.

    ``statistic(*tasks, axis=-1)`` gets one array per task with the runs on the last axis
    (and resamples on the leading ones) and returns one value per resample.
    """
    arrays = [np.asarray(s, dtype=float) for s in scores]
    varying = [i for i, a in enumerate(arrays) if a.size >= 2]
    point = float(statistic(*arrays, axis=-1))
    if not varying:
        return point, point

    def resampled(*drawn, axis=-1):
        full, it = [], iter(drawn)
        batch = drawn[0].shape[:-1]
        for i, a in enumerate(arrays):
            full.append(next(it) if i in varying else np.broadcast_to(a, (*batch, a.size)))
        return statistic(*full, axis=axis)

    res = stats.bootstrap(
        [arrays[i] for i in varying],
        resampled,
        n_resamples=reps,
        confidence_level=CONFIDENCE,
        method="percentile",
        paired=False,
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def mean_ci(values, reps: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over runs and its 95 % percentile-bootstrap interval
    (a single run: the interval is the run itself).

    >>> m, lo, hi = mean_ci([0.5, 0.5, 0.5])
    >>> (m, lo, hi)
    (0.5, 0.5, 0.5)
    """
    values = np.asarray(values, dtype=float)
    lo, hi = _stratified_ci([values], lambda x, axis=-1: x.mean(axis=axis), reps, seed)
    return float(values.mean()), lo, hi


def iqm(values, axis=None) -> np.ndarray | float:
    """The interquartile mean: the mean of the middle 50 % (``trim_mean(x, 0.25)``).

    >>> float(iqm(np.arange(1, 9)))  # 3, 4, 5, 6
    4.5
    """
    return stats.trim_mean(values, 0.25, axis=axis)


def _pooled_iqm(*tasks, axis=-1):
    return iqm(np.concatenate(tasks, axis=axis), axis=axis)


def aggregate_iqm(
    scores: Sequence, reps: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(IQM, low, high)`` of every run of every task, with the stratified-bootstrap interval."""
    arrays = [np.asarray(s, dtype=float) for s in scores]
    point = float(iqm(np.concatenate(arrays)))
    lo, hi = _stratified_ci(arrays, _pooled_iqm, reps, seed)
    return point, lo, hi


def _p_greater(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 between the runs on the last axes (Mann-Whitney's U / (n m))."""
    diff = x[..., :, None] - y[..., None, :]
    return (diff > 0).mean(axis=(-2, -1)) + 0.5 * (diff == 0).mean(axis=(-2, -1))


def probability_of_improvement(
    x: Sequence, y: Sequence, reps: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(P(X > Y), low, high)``: averaged over tasks, stratified-bootstrap interval.

    ``x`` and ``y`` hold the runs of two agents, one array per task, same task order.
    """
    if len(x) != len(y) or not x:
        raise ValueError("x and y need the runs of the same tasks (one array per task each)")
    n = len(x)
    arrays = [np.asarray(a, dtype=float) for a in (*x, *y)]

    def statistic(*tasks, axis=-1):
        return np.mean([_p_greater(tasks[i], tasks[n + i]) for i in range(n)], axis=0)

    point = float(statistic(*arrays))
    lo, hi = _stratified_ci(arrays, statistic, reps, seed)
    return point, lo, hi


def performance_profile(
    scores: Sequence, taus: np.ndarray, reps: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(profile, low, high)`` at every ``tau``: the fraction of runs scoring above ``tau``
    (each task weighted equally), with pointwise stratified-bootstrap bands."""
    arrays = [np.asarray(s, dtype=float) for s in scores]
    taus = np.asarray(taus, dtype=float)

    def at(tau):
        def statistic(*tasks, axis=-1):
            return np.mean([(t > tau).mean(axis=axis) for t in tasks], axis=0)

        return statistic

    profile = np.array([float(at(t)(*arrays)) for t in taus])
    bands = np.array([_stratified_ci(arrays, at(t), reps, seed) for t in taus])
    return profile, bands[:, 0], bands[:, 1]


def normalise(score: float, low: float, high: float) -> float:
    """``(score - low) / (high - low)``: 0 at ``low`` (the uniform baseline), 1 at ``high``
    (the dense network). ``nan`` when the two coincide.

    >>> normalise(0.9, 0.8, 1.0)
    0.5
    """
    span = high - low
    return float("nan") if abs(span) < 1e-12 else (score - low) / span
