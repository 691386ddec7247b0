"""The reward-fidelity benchmark's logic (autosculpt_env.fidelity) on a digits twin: candidate
names, stored results that resume and refuse what they were not computed with, agreement,
and the generated report."""

from __future__ import annotations

import json
import os
import random

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import register

from autosculpt_env import ENTRY_POINT, fidelity
from autosculpt_env.evaluation import unused_settings
from autosculpt_env.leaderboard import Task
from autosculpt_env.readme_blocks import end_marker

TWIN = "AutoSculptFidelityTest-ResNetDigits"
if TWIN not in gym.registry:
    register(
        id=TWIN,
        entry_point=ENTRY_POINT,
        kwargs={"model": "resnet20", "dataset": "digits", "evaluation": "recovery"},
        order_enforce=False,
    )
TASK = Task(TWIN, 0.5)


@pytest.fixture
def root(tmp_path, one_thread):
    """A fidelity folder holding four random valid policies of the twin (competitive)."""
    env = fidelity.make_task_env(TASK, evaluation="accuracy")
    rng = random.Random(0)
    ps = fidelity.PolicySet(TASK, [])
    names = env.unwrapped.action_names
    while len(ps.policies) < 4:
        actions = [names[a] for a in fidelity.random_valid_policy(env, rng)]
        ps.add(actions, "competitive", "test")
    ps.save(tmp_path)
    env.close()
    return tmp_path


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("recovery", ("recovery", {})),
        (
            "recovery[recovery_batch_size=128,recovery_samples=2048]",
            ("recovery", {"recovery_batch_size": 128, "recovery_samples": 2048}),
        ),
        (
            "reconstruction+recovery[recovery_samples=512]",
            ("reconstruction+recovery", {"recovery_samples": 512}),
        ),
    ],
)
def test_candidates_spell_their_settings(spec, expected):
    assert fidelity.parse_candidate(spec) == expected


TWIN_OWN = "AutoSculptFidelityTest-ResNetDigitsOwnRecovery"
if TWIN_OWN not in gym.registry:
    register(
        id=TWIN_OWN,
        entry_point=ENTRY_POINT,
        kwargs={
            "model": "resnet20",
            "dataset": "digits",
            "evaluation": "recovery",
            "recovery_samples": 64,
            "recovery_batch_size": 8,
        },
        order_enforce=False,
    )


def test_a_candidate_means_one_reward_on_every_task_and_the_default_names_its_settings():
    """An id with its own recovery settings (as AutoSculpt-ViT has) reports its default by
    them, and the candidate ``recovery`` still means the env's own defaults there."""
    from autosculpt_env.evaluation import RECOVERY_BATCH_SIZE, RECOVERY_SAMPLES

    own = Task(TWIN_OWN, 0.5)
    assert fidelity.default_mode(TASK) == "recovery"
    assert fidelity.default_mode(own) == "recovery[recovery_batch_size=8,recovery_samples=64]"
    assert fidelity.candidate_kwargs("recovery") == {
        "evaluation": "recovery",
        "recovery_samples": RECOVERY_SAMPLES,
        "recovery_batch_size": RECOVERY_BATCH_SIZE,
        "reward_readout": "accuracy",
    }
    assert fidelity.candidate_kwargs(fidelity.default_mode(own))["recovery_samples"] == 64
    # spelled with the defaults' values, a candidate is the plain mode
    assert fidelity.candidate_spec("recovery", {"recovery_batch_size": 16}) == "recovery"
    assert fidelity.candidate_spec("recovery", {"recovery_samples": None}) == "recovery"
    assert fidelity.candidate_spec("recovery", {"recovery_samples": 64}) == (
        "recovery[recovery_samples=64]"
    )
    env = fidelity.make_candidate_env(own, "recovery")
    assert env.unwrapped.env_kwargs["recovery_batch_size"] == RECOVERY_BATCH_SIZE
    env.close()


@pytest.mark.parametrize("spec", ["recovery[recovery_samples=1024", "recovery[recovery_samples]"])
def test_malformed_candidates_are_refused(spec):
    with pytest.raises(ValueError, match="candidate"):
        fidelity.parse_candidate(spec)


def test_each_mode_ignores_only_the_settings_it_does_not_read():
    assert unused_settings("accuracy") == {
        "calibration_samples",
        "recovery_samples",
        "recovery_batch_size",
    }
    assert unused_settings("recovery") == {"calibration_samples"}
    assert unused_settings("reconstruction") == {"recovery_samples", "recovery_batch_size"}
    assert unused_settings("reconstruction+recovery") == set()


def test_rewards_resume_and_refuse_other_settings(root):
    from autosculpt_env.records import default_file_mode

    d = fidelity.compute_rewards(root, TASK, "accuracy", progress=False)
    path = fidelity.rewards_path(root, TASK, "accuracy")
    assert path.stat().st_mode & 0o777 == default_file_mode()  # the usual mode, not 0600
    assert len(d["values"]) == 4 and all(0.0 <= v <= 1.0 for v in d["values"].values())
    stamp = path.stat().st_mtime_ns
    assert fidelity.compute_rewards(root, TASK, "accuracy", progress=False)["values"] == d["values"]
    assert path.stat().st_mtime_ns == stamp  # nothing recomputed, nothing rewritten

    # a setting accuracy does not read may differ: the stored values still hold
    stored = json.loads(path.read_text())
    stored["env_kwargs"]["recovery_samples"] = 7
    stored["values"].pop(next(iter(stored["values"])))
    path.write_text(json.dumps(stored))
    assert len(fidelity.compute_rewards(root, TASK, "accuracy", progress=False)["values"]) == 4

    # one it reads may not: the file is refused with the candidate name that would fit it
    stored = json.loads(path.read_text())
    stored["env_kwargs"]["bn_recalibration_samples"] = 7
    stored["values"].pop(next(iter(stored["values"])))
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"accuracy\[bn_recalibration_samples=7\]"):
        fidelity.compute_rewards(root, TASK, "accuracy", progress=False)


def test_proxy_rewards_name_their_surrogate_and_refuse_another(root, tmp_path, monkeypatch):
    from conftest import surrogate_store

    from autosculpt_env import surrogate

    monkeypatch.setenv(surrogate.STORE_ENV, str(surrogate_store(tmp_path)))
    d = fidelity.compute_rewards(root, TASK, "proxy", progress=False)
    assert len(d["values"]) == 4 and d["surrogate"]["mode"] == "recovery"
    sha = d["surrogate"]["sha256"]
    assert len(sha) == 64
    path = fidelity.rewards_path(root, TASK, "proxy")
    assert fidelity.compute_rewards(root, TASK, "proxy", progress=False)["values"] == d["values"]

    # values from another surrogate (or from before surrogates were recorded) are refused,
    # even when no policy is missing
    stored = json.loads(path.read_text())
    stored["surrogate"]["sha256"] = "0" * 64
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=f"another surrogate.*{'0' * 64} there, {sha} now"):
        fidelity.compute_rewards(root, TASK, "proxy", progress=False)
    del stored["surrogate"]
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="not recorded there"):
        fidelity.compute_rewards(root, TASK, "proxy", progress=False)


def test_agreement_of_a_perfect_and_a_reversed_ranking():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    a = fidelity.agreement(x, [2 * v for v in x], resamples=200)
    assert a.spearman == pytest.approx(1.0) and a.kendall == pytest.approx(1.0)
    b = fidelity.agreement(x, [-v for v in x], resamples=200)
    assert b.spearman == pytest.approx(-1.0) and b.kendall == pytest.approx(-1.0)


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_agreement_is_scipys_spearman_and_kendall_with_ties_and_constants():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(3, 12)), 0)  # ties on both sides
    y = np.round(x[0] + rng.normal(size=(3, 12)), 1)
    for a, b in [(x[0], y[0]), (x[1], y[1]), (np.ones(12), y[2])]:
        got = fidelity.agreement(a, b, resamples=50)
        rho, tau = stats.spearmanr(a, b)[0], stats.kendalltau(a, b)[0]
        assert got.spearman == pytest.approx(0.0 if np.isnan(rho) else rho, abs=1e-12)
        assert got.kendall == pytest.approx(0.0 if np.isnan(tau) else tau, abs=1e-12)
    # the bootstrap evaluates the statistics on a stack of resamples at once
    assert fidelity._spearman(x, y) == pytest.approx(
        [stats.spearmanr(a, b)[0] for a, b in zip(x, y)]
    )
    assert fidelity._kendall(x.T, y.T, axis=0) == pytest.approx(
        [stats.kendalltau(a, b)[0] for a, b in zip(x, y)]
    )


def _store_ground_truth(root, ps, scores):
    """Ground truth as ground_truth_one stores it, without the fine-tuning."""
    for p, score in zip(ps.policies, scores):
        for seed, delta in zip(fidelity.GROUND_TRUTH_SEEDS, (0.0, 0.001)):
            path = fidelity.ground_truth_path(root, TASK, p.key, seed)
            fidelity.atomic_write_json(
                path,
                {
                    "task": TASK.name,
                    "key": p.key,
                    "actions": p.actions,
                    "seed": seed,
                    "test_accuracy": score + delta,
                },
            )


def test_report_marks_the_default_and_states_the_goal(root):
    ps = fidelity.PolicySet.load(root, TASK)
    assert fidelity.default_mode(TASK) == "recovery"
    # recovery ranks like the score, a spelled-out candidate ranks against it
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8])
    for mode, values in (
        ("recovery", [0.1, 0.2, 0.3, 0.4]),
        ("recovery[recovery_samples=9]", [0.4, 0.3, 0.2, 0.1]),
    ):
        fidelity.atomic_write_json(
            fidelity.rewards_path(root, TASK, mode),
            {
                "mode": mode,
                "task": TASK.name,
                "cost": None,
                "values": {p.key: v for p, v in zip(ps.policies, values)},
            },
        )
    modes = fidelity.reported_modes(root, [TASK])
    assert modes[: len(fidelity.MODES_REPORTED)] == list(fidelity.MODES_REPORTED)
    assert modes[-1] == "recovery[recovery_samples=9]"
    text = fidelity.write_report(root, [TASK]).read_text()
    assert "| **recovery** (default) | 1.00" in text
    assert "| recovery[recovery_samples=9] | -1.00" in text
    # a reported mode with nothing stored for this task gets no row of dashes
    assert "| accuracy |" not in text
    assert f"- {TASK.name}: ρ 1.00 against a goal of 0.80 (met); cost not measured" in text
    assert (root / "plots" / f"{fidelity.task_dir_name(TASK)}.png").exists()


def test_the_frontier_keeps_timed_candidates_no_other_beats_and_the_readme_links_its_plot(
    root, tmp_path
):
    ps = fidelity.PolicySet.load(root, TASK)
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8])
    up, down, mixed = [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]
    candidates = {  # mode: (values, cost ratio or None)
        "accuracy": (down, 1.0),  # cheapest: on the frontier however badly it ranks
        "reconstruction": (down, 2.0),  # dearer and no better: off
        "recovery": (mixed, 3.0),
        "recovery[recovery_samples=9]": (up, 6.0),  # best, past the 5x bound
        "recovery[recovery_samples=7]": (up, None),  # untimed: left out
    }
    for mode, (values, ratio) in candidates.items():
        fidelity.atomic_write_json(
            fidelity.rewards_path(root, TASK, mode),
            {
                "mode": mode,
                "task": TASK.name,
                "cost": None if ratio is None else {"ratio": ratio},
                "values": {p.key: v for p, v in zip(ps.policies, values)},
            },
        )
    table = fidelity.task_table(root, TASK, list(candidates))
    points = fidelity.frontier(table)
    assert [(m, r) for m, r, _ in points] == [
        ("accuracy", 1.0),
        ("recovery", 3.0),
        ("recovery[recovery_samples=9]", 6.0),
    ]
    assert [a.spearman for _, _, a in points] == pytest.approx([-1.0, 0.8, 1.0])
    line = fidelity.frontier_line(table)
    assert line.startswith(f"{TASK.name}: `accuracy` 1.0× ρ -1.00 → `recovery` 3.0× ρ 0.80")
    assert line.endswith("best within 5×: `recovery`")
    # a microsecond proxy's cost does not print as 0.0×
    assert [fidelity._fmt_cost(r) for r in (0.00042, 0.3, 3.44)] == ["0.0004×", "0.3×", "3.4×"]
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(
        f"# x\n<!-- {fidelity.README_BLOCK}:start -->\nold\n{end_marker(fidelity.README_BLOCK)}\n"
    )
    text = fidelity.write_report(root, [TASK], list(candidates), readme=readme).read_text()
    assert f"- {line}" in text and f"]({fidelity.FRONTIER_PLOT})" in text
    assert (root / fidelity.FRONTIER_PLOT).stat().st_size > 0
    rel = os.path.relpath(root, readme.parent)
    assert f"]({rel}/{fidelity.FRONTIER_PLOT})" in readme.read_text()


def test_a_reward_averaged_over_its_recovery_seeds_is_reported_beside_them(root):
    # five policies; seed 0 and seed 1 each misorder two pairs, their mean ranks like the score
    env = fidelity.make_task_env(TASK, evaluation="accuracy")
    names, rng = env.unwrapped.action_names, random.Random(5)
    ps = fidelity.PolicySet.load(root, TASK)
    while len(ps.policies) < 5:
        ps.add([names[a] for a in fidelity.random_valid_policy(env, rng)], "competitive", "test")
    env.close()
    ps.save(root)
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8, 0.9])
    for seed, values in (
        (0, [0.52, 0.50, 0.72, 0.70, 0.95]),
        (1, [0.48, 0.70, 0.68, 0.90, 0.85]),
    ):
        fidelity.atomic_write_json(
            fidelity.rewards_path(root, TASK, "recovery", seed),
            {
                "mode": "recovery",
                "task": TASK.name,
                "cost": None,
                "values": {p.key: v for p, v in zip(ps.policies, values)},
                **({"recovery_seed": seed} if seed else {}),
            },
        )
    table = fidelity.task_table(root, TASK, ["recovery"])
    entry = table["modes"]["recovery"]
    assert entry["competitive"].spearman == pytest.approx(0.8)
    assert [(r.seed, r.spearman) for r in entry["seeds"]] == [(1, pytest.approx(0.8))]
    assert entry["seed_mean"].seeds == (0, 1)
    assert entry["seed_mean"].agreement.spearman == pytest.approx(1.0)
    line = fidelity.verdict(table)
    assert "under recovery seeds 0, 1: ρ 0.80, 0.80 (mean 0.80)" in line
    assert "the reward averaged over those 2 recovery passes (at 2× its cost): ρ 1.00" in line
    text = fidelity.write_report(root, [TASK]).read_text()
    assert "| 1: 0.80 (0.30); averaged over 0 and 1: 1.00 |" in text
    # seed 1 missing a policy: its average ranks fewer policies, so it is not shown as a peer
    path = fidelity.rewards_path(root, TASK, "recovery", 1)
    stored = json.loads(path.read_text())
    stored["values"].pop(ps.policies[0].key)
    fidelity.atomic_write_json(path, stored)
    table = fidelity.task_table(root, TASK, ["recovery"])
    assert table["modes"]["recovery"]["seed_mean"].agreement.n == 4
    assert "averaged" not in fidelity.verdict(table)
    assert "averaged" not in fidelity.write_report(root, [TASK]).read_text()


def test_verdict_reports_the_default_on_search_policies_alone(root):
    # four more policies that search runs found; the default ranks them against the score,
    # while it ranks the fixture's four (not from searches) with it
    env = fidelity.make_task_env(TASK, evaluation="accuracy")
    names, rng = env.unwrapped.action_names, random.Random(1)
    ps = fidelity.PolicySet.load(root, TASK)
    first = list(ps.policies)
    while len(ps.policies) < 8:
        actions = [names[a] for a in fidelity.random_valid_policy(env, rng)]
        ps.add(actions, "competitive", f"search:random_search:seed{len(ps.policies)}:accuracy5")
    env.close()
    ps.save(root)
    searched = ps.policies[4:]
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.4])
    values = dict(zip([p.key for p in first + searched], [0.5, 0.6, 0.7, 0.8, 0.4, 0.3, 0.2, 0.1]))
    fidelity.atomic_write_json(
        fidelity.rewards_path(root, TASK, "recovery"),
        {"mode": "recovery", "task": TASK.name, "cost": None, "values": values},
    )
    line = fidelity.verdict(fidelity.task_table(root, TASK, ["recovery"]))
    assert "on the 4 search-run policies alone: ρ -1.00" in line


def test_holdout_searches_fill_a_set_reported_apart(root, monkeypatch):
    """Search runs sent to the holdout set are scored there and not in the competitive
    figures; a policy a competitive search also found is not held out."""
    env = fidelity.make_task_env(TASK, evaluation="accuracy")
    names, rng = env.unwrapped.action_names, random.Random(2)
    ps = fidelity.PolicySet.load(root, TASK)
    known = {p.key for p in ps.policies}
    fresh = []
    while len(fresh) < 4:
        actions = [names[a] for a in fidelity.random_valid_policy(env, rng)]
        if fidelity.policy_key(actions) not in known | {fidelity.policy_key(f) for f in fresh}:
            fresh.append(actions)
    env.close()
    found = {11: ps.policies[0].actions, 16: fresh[0], 17: fresh[1], 18: fresh[2], 19: fresh[3]}
    monkeypatch.setattr(fidelity, "search_best_policy", lambda task, agent, seed, *a: found[seed])
    with pytest.raises(ValueError, match="competitive or holdout set, not 'broad'"):
        fidelity.build_policy_set(root, TASK, None, ["random_search"], [16], search_set="broad")
    fidelity.build_policy_set(
        root, TASK, None, ["random_search"], [11, 16, 17, 18, 19], broad_random=0,
        broad_mutations=0, progress=False, search_set="holdout",
    )  # fmt: skip
    ps = fidelity.PolicySet.load(root, TASK)
    assert [p.actions for p in ps.of("holdout")] == fresh
    assert len(ps.of("competitive")) == 4  # seed 11's policy was competitive already
    assert "search:random_search:seed11:accuracy50" in ps.policies[0].sources
    assert len(fidelity.ground_truth_jobs(root, [TASK], ["holdout"], (1,))) == 4
    # a competitive search that finds a held-out policy takes it out of the holdout set
    again = fidelity.PolicySet.load(root, TASK)
    again.add(fresh[3], "competitive", "search:ppo_gnn:seed12:accuracy50")
    assert [p.actions for p in again.of("holdout")] == fresh[:3]
    with pytest.raises(ValueError, match="unknown policy set 'validation'"):
        again.add(fresh[0], "validation", "test")
    # the default ranks the competitive policies with the score and the held-out ones
    # against it: each figure sees only its own set
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.4])
    values = dict(zip([p.key for p in ps.policies], [0.5, 0.6, 0.7, 0.8, 0.4, 0.3, 0.2, 0.1]))
    fidelity.atomic_write_json(
        fidelity.rewards_path(root, TASK, "recovery"),
        {"mode": "recovery", "task": TASK.name, "cost": None, "values": values},
    )
    # under recovery seed 1 the reward ranks the held-out policies with the score
    seed1 = {
        k: (0.5 - v if k in {p.key for p in ps.of("holdout")} else v) for k, v in values.items()
    }
    fidelity.atomic_write_json(
        fidelity.rewards_path(root, TASK, "recovery", 1),
        {"mode": "recovery", "task": TASK.name, "cost": None, "values": seed1, "recovery_seed": 1},
    )
    table = fidelity.task_table(root, TASK, ["recovery"])
    assert table["modes"]["recovery"]["competitive"].spearman == pytest.approx(1.0)
    assert table["modes"]["recovery"]["holdout"].spearman == pytest.approx(-1.0)
    assert [(r.seed, r.spearman) for r in table["modes"]["recovery"]["holdout_seeds"]] == [
        (1, pytest.approx(1.0))
    ]
    assert "on the 4 holdout policies: ρ -1.00 [" in fidelity.verdict(table)
    assert " (seeds 1: 1.00; averaged over 0 and 1: 0.00)" in fidelity.verdict(table)
    text = fidelity.write_report(root, [TASK]).read_text()
    assert "| **recovery** (default) | 1.00" in text
    assert (
        f"Holdout set per task: policies with ground truth, and the ceiling there: {TASK.name} 4/4"
        in text
    )


def test_ground_truth_runs_once_and_is_validated(root):
    ps = fidelity.PolicySet.load(root, TASK)
    p = ps.policies[0]
    assert fidelity.ground_truth_one(root, TASK, p.actions, 1) == "done"
    assert fidelity.ground_truth_one(root, TASK, p.actions, 1) == "stored"
    gt = fidelity.load_ground_truth(root, TASK)
    assert set(gt) == {p.key} and 0.0 <= gt[p.key][1] <= 1.0
    path = fidelity.ground_truth_path(root, TASK, p.key, 1)
    d = json.loads(path.read_text())
    d["test_accuracy"] = 1.7
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a valid ground-truth run"):
        fidelity.load_ground_truth(root, TASK)


def test_recovery_seed_replicates_are_stored_apart_and_reported(root):
    from autosculpt_env.envs.autosculpt import seeded_reward_evaluator

    ps = fidelity.PolicySet.load(root, TASK)
    d = fidelity.compute_rewards(root, TASK, "recovery", progress=False, seed=1)
    path = fidelity.rewards_path(root, TASK, "recovery", 1)
    assert (
        path == root / fidelity.task_dir_name(TASK) / "rewards" / "recovery_seed1" / "recovery.json"
    )
    assert path.exists() and not fidelity.rewards_path(root, TASK, "recovery").exists()
    assert json.loads(path.read_text())["recovery_seed"] == 1 and len(d["values"]) == 4
    assert fidelity.reward_seeds(root, TASK, "recovery") == [1]
    assert "recovery_seed1" not in " ".join(fidelity.reported_modes(root, [TASK]))

    # the values are the seed-1 reward's, not the env's (seed 0)
    env = fidelity.make_candidate_env(TASK, "recovery")
    problem = env.unwrapped.problem
    seeded = seeded_reward_evaluator(env, 1)
    for p in ps.policies[:2]:
        assert d["values"][p.key] == seeded(problem.policy_indices(p.actions))
    seed0 = fidelity.compute_rewards(root, TASK, "recovery", progress=False)["values"]
    assert seed0 != d["values"]
    env.close()

    # a recovery reward moves with the thread count: a file states its own and is extended
    # only with it (a mode that trains nothing is not held to it)
    path0 = fidelity.rewards_path(root, TASK, "recovery")
    stored = json.loads(path0.read_text())
    assert stored["threads"] == 1
    stored["values"].pop(next(iter(stored["values"])))
    path0.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"computed with 1 torch thread\(s\), asked for 2"):
        fidelity.compute_rewards(root, TASK, "recovery", progress=False, threads=2)
    assert len(json.loads(path0.read_text())["values"]) == 3  # nothing lost
    assert fidelity.compute_rewards(root, TASK, "recovery", progress=False)["values"] == seed0
    fidelity.compute_rewards(root, TASK, "accuracy", progress=False, threads=1)
    acc = fidelity.rewards_path(root, TASK, "accuracy")
    stored = json.loads(acc.read_text())
    stored["values"].pop(next(iter(stored["values"])))
    acc.write_text(json.dumps(stored))
    assert (
        len(fidelity.compute_rewards(root, TASK, "accuracy", progress=False, threads=2)["values"])
        == 4
    )

    # reported: the replicate's rho with the score and with the seed-0 reward
    _store_ground_truth(root, ps, [0.5, 0.6, 0.7, 0.8])
    table = fidelity.task_table(root, TASK, ["recovery"])
    (rep,) = table["modes"]["recovery"]["seeds"]
    assert rep.seed == 1 and rep.n == 4 and -1.0 <= rep.spearman <= 1.0
    assert "under recovery seeds 0, 1: ρ" in fidelity.verdict(table)
    text = fidelity.write_report(root, [TASK], modes=["recovery"]).read_text()
    assert (
        f"| 1: {rep.spearman:.2f} ({rep.agreement_with_seed0:.2f}); averaged over 0 and 1: " in text
    )

    # a file whose seed is not the one asked for is refused, not read as it
    stored = json.loads(path.read_text())
    stored["recovery_seed"] = 2
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="under recovery seed 1; delete it"):
        fidelity.load_rewards(root, TASK, "recovery", 1)


@pytest.mark.parametrize(
    "mode, seed, message",
    [
        ("accuracy", 1, "trains nothing"),
        ("reconstruction[calibration_samples=64]", 2, "trains nothing"),
        ("proxy", 1, "trains nothing"),
        ("recovery", -1, "integer >= 0"),
        ("recovery", True, "integer >= 0"),
        ("recovery", 1.5, "integer >= 0"),
    ],
)
def test_a_recovery_seed_needs_a_candidate_that_trains(root, mode, seed, message):
    with pytest.raises(ValueError, match=message):
        fidelity.compute_rewards(root, TASK, mode, progress=False, seed=seed)
    assert not (root / fidelity.task_dir_name(TASK) / "rewards").exists()  # nothing written
    assert fidelity.check_reward_seed("reconstruction+recovery", 3) == 3


def test_verify_finds_a_stored_reward_that_does_not_reproduce(root):
    d = fidelity.compute_rewards(root, TASK, "accuracy", progress=False)
    assert fidelity.verify_rewards(root, TASK, "accuracy", policies=4) == []
    path = fidelity.rewards_path(root, TASK, "accuracy")
    stored = json.loads(path.read_text())
    key = next(iter(stored["values"]))
    stored["values"][key] = 0.0 if d["values"][key] > 0 else 1.0
    path.write_text(json.dumps(stored))
    (bad,) = fidelity.verify_rewards(root, TASK, "accuracy", policies=4)
    assert bad == (key, stored["values"][key], d["values"][key])


def test_the_benchmark_script_verifies_and_exits_nonzero_on_a_stale_reward(
    root, capsys, monkeypatch
):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_fidelity.py"
    spec = importlib.util.spec_from_file_location("reward_fidelity_script", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclass looks itself up there
    spec.loader.exec_module(script)
    args = script.Args(
        tasks=[TASK.name], root=root, rewards=["accuracy"], readme=None, progress=False
    )
    script.main(args)  # computes, then reports
    out = capsys.readouterr().out.splitlines()
    lead = [i for i, line in enumerate(out) if line.startswith("The registered ids' default")]
    assert len(lead) == 1 and out[lead[0] + 1].startswith("- ")  # each list under its lead
    assert f"- {TASK.name}: no measurement of the default `recovery` yet" in out
    args = script.Args(tasks=[TASK.name], root=root, verify=2, readme=None, progress=False)
    script.main(args)
    assert f"{TASK.name} accuracy: reproduces" in capsys.readouterr().out
    stored_path = fidelity.rewards_path(root, TASK, "accuracy")
    stored = json.loads(stored_path.read_text())
    stored["values"] = {k: (0.0 if v > 0 else 1.0) for k, v in stored["values"].items()}
    stored_path.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="do not reproduce"):
        script.main(args)
    assert "2 differ" in capsys.readouterr().out


def test_proxy_verdict_reads_the_shipped_surrogates_heldout_agreement(monkeypatch):
    from autosculpt_env import surrogate

    rho = surrogate.heldout_agreement("AutoSculpt-MobileNet", 0.5)
    assert rho is not None and rho < fidelity.GOAL_SPEARMAN
    line = fidelity.proxy_verdict({"task": "AutoSculpt-MobileNet@0.5", "default": "recovery"})
    assert line == (
        f"AutoSculpt-MobileNet@0.5: the proxy's lowest held-out ρ {rho:.2f} "
        f"(short by {fidelity.GOAL_SPEARMAN - rho:.2f})"
    )
    # no surrogate ships for a configuration outside the registry
    assert fidelity.proxy_verdict({"task": TASK.name, "default": "recovery"}) == (
        f"{TASK.name}: no surrogate of `recovery` ships yet"
    )
    # a figure just under the goal keeps three decimals, so it does not read as met
    monkeypatch.setattr(surrogate, "heldout_agreement", lambda env_id, target: 0.797)
    line = fidelity.proxy_verdict({"task": "AutoSculpt-ViT@0.5", "default": "recovery"})
    assert line.endswith("lowest held-out ρ 0.797 (short by 0.003)")
    monkeypatch.setattr(surrogate, "heldout_agreement", lambda env_id, target: 0.85)
    line = fidelity.proxy_verdict({"task": "AutoSculpt-ViT@0.5", "default": "recovery"})
    assert line.endswith("lowest held-out ρ 0.85 (met)")
