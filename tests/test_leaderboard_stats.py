"""The leaderboard's statistics on synthetic scores and rows with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from autosculpt_env.leaderboard import report, stats


def test_iqm_is_the_mean_of_the_middle_half():
    assert stats.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    x = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 100.0, -100.0])
    assert stats.iqm(x) == pytest.approx(np.mean([0.0, 1.0, 1.0, 1.0]))  # outliers trimmed


def test_mean_interval_covers_the_mean_and_shrinks_with_more_runs():
    rng = np.random.default_rng(0)
    few = rng.normal(0.8, 0.05, 5)
    many = rng.normal(0.8, 0.05, 200)
    m, lo, hi = stats.mean_ci(few)
    assert lo < m < hi and m == pytest.approx(few.mean())
    m2, lo2, hi2 = stats.mean_ci(many)
    assert lo2 < 0.8 < hi2 and hi2 - lo2 < hi - lo
    assert stats.mean_ci([0.7]) == (0.7, 0.7, 0.7)  # one run: nothing to resample


def test_stratified_iqm_interval():
    # every task's runs identical: the interval collapses onto the IQM
    scores = [np.full(4, 0.2), np.full(4, 0.4), np.full(4, 0.6)]  # 3 of 12 trimmed each side
    assert stats.aggregate_iqm(scores) == pytest.approx((0.4, 0.4, 0.4))
    # 13 runs: 3 trimmed each side, leaving 0.2, 0.2 and five 0.4
    uneven = [np.full(5, 0.2), np.full(5, 0.4), np.full(3, 0.6)]
    assert stats.aggregate_iqm(uneven)[0] == pytest.approx((2 * 0.2 + 5 * 0.4) / 7)
    # runs resampled within their task: a task with one run enters every resample as is
    rng = np.random.default_rng(1)
    noisy = [rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 10), np.array([0.5])]
    iqm, lo, hi = stats.aggregate_iqm(noisy)
    assert lo < iqm < hi and lo < 0.5 < hi


def test_probability_of_improvement():
    low = [np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.5])]
    high = [np.array([0.6, 0.7, 0.8]), np.array([0.9, 0.95])]
    assert stats.probability_of_improvement(high, low) == pytest.approx((1.0, 1.0, 1.0))
    assert stats.probability_of_improvement(low, high) == pytest.approx((0.0, 0.0, 0.0))
    # ties count a half: an agent against itself is 0.5
    p, lo, hi = stats.probability_of_improvement(low, low)
    assert p == pytest.approx(0.5) and lo <= 0.5 <= hi
    # one task: P(X > Y) by hand, 2 of 4 pairs above, 1 tie
    p, _, _ = stats.probability_of_improvement([np.array([1.0, 3.0])], [np.array([1.0, 2.0])])
    assert p == pytest.approx((2 + 0.5) / 4)
    with pytest.raises(ValueError, match="same tasks"):
        stats.probability_of_improvement(low, high[:1])


def test_performance_profile():
    scores = [np.array([0.0, 0.5, 1.0, 1.5]), np.array([0.25, 0.75])]
    taus = np.array([-1.0, 0.4, 0.9, 2.0])
    prof, lo, hi = stats.performance_profile(scores, taus, reps=200)
    # each task weighs the same: task 1 fractions 1, .75, .5, 0; task 2: 1, .5, 0, 0
    assert prof == pytest.approx([1.0, 0.625, 0.25, 0.0])
    assert np.all(lo <= prof + 1e-12) and np.all(prof <= hi + 1e-12)
    assert lo[0] == hi[0] == 1.0 and lo[-1] == hi[-1] == 0.0


def test_normalise():
    assert stats.normalise(0.8, 0.8, 1.0) == 0.0
    assert stats.normalise(1.0, 0.8, 1.0) == 1.0
    assert np.isnan(stats.normalise(0.9, 0.9, 0.9))


def _rows(scores: dict[tuple[str, str], list[float]], dense: dict[str, float]) -> list[dict]:
    """Synthetic schema-2 rows: just the fields the report reads."""
    rows = []
    for (task, agent), values in scores.items():
        for seed, v in enumerate(values, 1):
            rows.append(
                {
                    "schema": 2,
                    "track": "fast",
                    "protocol_key": "k",
                    "protocol": {"max_reward_evaluations": 10, "seeds": [1, 2, 3, 4]},
                    "row_id": f"{task}__{agent}__seed{seed}",
                    "task": task,
                    "agent": agent,
                    "seed": seed,
                    "score": v,
                    "dense_score": dense[task],
                    "flops_reduction": 0.5,
                    "reward_accuracy": v,
                    "found_at_evaluation": 5,
                    "reward_evaluations": 10,
                    "max_reward_evaluations": 10,
                    "search_seconds": 1.0,
                    "model": "m",
                    "dataset": "d",
                    "progress": [[1, v]],
                }
            )
    return rows


def test_aggregate_normalises_between_uniform_and_dense():
    dense = {"A@0.5": 1.0, "B@0.5": 0.5}
    rows = _rows(
        {
            ("A@0.5", "uniform"): [0.6, 0.6, 0.6],
            ("B@0.5", "uniform"): [0.3, 0.3, 0.3],
            ("A@0.5", "random_search"): [0.8, 0.8, 0.8],  # half way: 0.5
            ("B@0.5", "random_search"): [0.4, 0.4, 0.4],  # half way: 0.5
            ("A@0.5", "ppo_gnn"): [1.0, 1.0, 1.0, 1.0],  # the dense network: 1
            ("B@0.5", "ppo_gnn"): [0.5, 0.5, 0.5],
        },
        dense,
    )
    scores, tasks = report.normalised_scores(rows)
    assert tasks == ["A@0.5", "B@0.5"]
    assert np.concatenate(scores["random_search"]) == pytest.approx(0.5)
    agg = {e["agent"]: e for e in report.aggregate(rows)}
    assert [e["agent"] for e in report.aggregate(rows)] == ["ppo_gnn", "random_search", "uniform"]
    assert agg["ppo_gnn"]["iqm"] == pytest.approx((1.0, 1.0, 1.0)) and agg["ppo_gnn"]["runs"] == 7
    assert agg["random_search"]["iqm"] == pytest.approx((0.5, 0.5, 0.5))
    assert agg["uniform"]["iqm"] == pytest.approx((0.0, 0.0, 0.0))
    assert agg["ppo_gnn"]["p_improvement"] == pytest.approx((1.0, 1.0, 1.0))
    assert agg["uniform"]["p_improvement"] == pytest.approx((0.0, 0.0, 0.0))
    assert agg["random_search"]["p_improvement"] is None
    # an agent missing a task is left out of the aggregate, not compared on fewer tasks
    partial = rows + _rows({("A@0.5", "greedy"): [0.9]}, dense)
    assert "greedy" not in {e["agent"] for e in report.aggregate(partial)}
    md = report.render(partial)
    assert "| ppo_gnn | 1.00 [1.00, 1.00] | 1.00 | 1.00 [1.00, 1.00] | 7 |" in md
    assert "| 1 | ppo_gnn | 100.00 [100.00, 100.00] |" in md
    assert "| greedy |" in md.split("### A@0.5")[1]  # still in its task's table


def test_protocols_never_share_a_table():
    dense = {"A@0.5": 1.0}
    a = _rows({("A@0.5", "uniform"): [0.5, 0.5]}, dense)
    b = [dict(r, protocol_key="other", track="full") for r in a]
    groups = report.groups(a + b)
    assert [g.key for g in groups] == ["k", "other"]
    assert all(len(g.rows) == 2 for g in groups)


def test_a_partial_track_says_how_much_of_it_is_in():
    from autosculpt_env.leaderboard import AGENTS, TASKS

    dense = {t.name: 0.9 for t in TASKS}
    whole = _rows(
        {(t.name, a): [0.5 + 0.01 * i, 0.52] for t in TASKS for i, a in enumerate(AGENTS)}, dense
    )
    for r in whole:
        r["protocol"] = dict(r["protocol"], seeds=[1, 2])
    [g] = report.groups(whole)
    assert g.missing() == [] and g.completeness() == ""
    assert "Partial" not in report.render(whole) and "Partial" not in report.readme_block(whole)

    gone = f"{TASKS[2].name}__{AGENTS[0]}__seed2"
    rows = [r for r in whole if r["row_id"] != gone]
    [g] = report.groups(rows)
    assert g.missing() == [gone]
    total = len(TASKS) * len(AGENTS) * 2
    said = f"**Partial:** {total - 1} of the track's {total} rows"
    assert said in g.completeness() and f"`{TASKS[2].name}`" not in g.completeness()
    assert f"`{TASKS[0].name}`" in g.completeness()
    assert said in report.render(rows) and said in report.readme_block(rows)
    # a custom protocol's extent is its runner's: nothing is said missing
    custom = [dict(r, track="custom") for r in rows]
    assert report.groups(custom)[0].missing() == []


def test_the_main_agents_standing_names_the_agents_it_is_not_told_apart_from():
    def entry(agent, iqm, p=None):
        return {"agent": agent, "iqm": iqm, "p_improvement": p}

    agg = [
        entry("ppo_gnn", (0.47, 0.40, 0.51), (0.78, 0.55, 0.95)),
        entry("ddpg_amc", (0.43, 0.37, 0.46), (0.64, 0.37, 0.88)),
        entry("random_search", (0.30, 0.20, 0.39)),
        entry("uniform", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ]
    text = report.standing(agg)
    assert text.startswith("`ppo_gnn` ranks 1 of 4 by IQM (0.47 [0.40, 0.51])")
    assert "overlaps those of `ddpg_amc`, so it is not told apart from it" in text
    assert "`random_search`" not in text.split(";")[1]  # 0.39 < 0.40: told apart
    assert text.endswith(
        "P(a run beats `random_search`) 0.78 [0.55, 0.95], above one half with 95 % confidence."
    )
    # second place, overlapping two, and a probability interval across one half
    agg2 = [
        agg[1],
        dict(agg[0], p_improvement=(0.6, 0.45, 0.8)),
        dict(agg[2], iqm=(0.42, 0.38, 0.45)),
    ]
    text = report.standing(agg2)
    assert text.startswith("`ppo_gnn` ranks 2 of 3") and "so it is not told apart from them" in text
    assert text.endswith("not distinguishable from one half.")
    # the words follow the printed figures: a lower edge printed as 0.50 is not "above"
    edge = report.standing([dict(agg[0], p_improvement=(0.67, 0.5004, 0.82))])
    assert edge.endswith("0.67 [0.50, 0.82], not distinguishable from one half.")
    assert report.standing(agg[1:]) == ""  # not in the aggregate: nothing to say
    # the README block and the page say it
    rows = _rows(
        {("A@0.5", "uniform"): [0.6, 0.6], ("A@0.5", "ppo_gnn"): [0.7, 0.8]}, {"A@0.5": 1.0}
    )
    said = report.standing(report.aggregate(rows))
    assert said and said in report.readme_block(rows) and said in report.render(rows)
