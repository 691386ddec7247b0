"""The env's reward evaluation modes (``evaluation=``): each runs, is deterministic across
processes, never reads the test split; recovery holds masks exactly; reconstruction refits
reproduce the dense output for the dense action and lower every layer's output error."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import Mixed, surrogate_store

import autosculpt_env  # noqa: F401
from autosculpt_env import data
from autosculpt_env.evaluation import EVALUATIONS, RecoveryEvaluator
from autosculpt_env.finetune import check_masks, train_subset
from autosculpt_env.problem import PruningProblem
from autosculpt_env.reconstruction import Reconstruction

SCRIPT = """
import json, random, torch
import gymnasium as gym, autosculpt_env
from autosculpt_env.evaluation import EVALUATIONS
from autosculpt_env.fidelity import random_valid_policy
out = {}
for mode in EVALUATIONS:
    # the proxy at the twin's default settings: its surrogate fits from the stored evaluations
    small = {} if mode == "proxy" else dict(reward_samples=60, recovery_samples=256)
    env = gym.make("AutoSculpt-ResNet", dataset="digits", evaluation=mode, **small)
    rng = random.Random(0)
    out[mode] = [env.unwrapped.evaluate_policy(random_valid_policy(env, rng))["accuracy"]
                 for _ in range(2)]
env = gym.make("AutoSculpt-ResNet", dataset="digits", evaluation="recovery",
               reward_samples=60, recovery_samples=256, reward_readout="probability")
rng = random.Random(0)
out["recovery/probability"] = [
    env.unwrapped.evaluate_policy(random_valid_policy(env, rng))["accuracy"] for _ in range(2)]
print(json.dumps(out))
"""


def test_every_mode_is_deterministic_across_processes(tmp_path):
    import os

    from autosculpt_env.surrogate import STORE_ENV

    env = {
        "AUTOSCULPT_CACHE": str(tmp_path),
        STORE_ENV: str(surrogate_store(tmp_path)),
        "OMP_NUM_THREADS": "1",
        "PATH": "",
    }

    env = {**os.environ, **env}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert set(runs[0]) == set(EVALUATIONS) | {"recovery/probability"}
    assert runs[0] == runs[1]
    assert runs[0]["recovery/probability"] != runs[0]["recovery"]  # the same nets, read out apart
    for mode, values in runs[0].items():
        assert all(0.0 <= v <= 1.0 for v in values), mode


@pytest.mark.parametrize("mode", [m for m in EVALUATIONS if m != "proxy"])
def test_modes_never_read_the_test_split(mode, monkeypatch):
    from autosculpt_env.envs import autosculpt as envmod

    real_load = data.load

    def guarded(name, split, data_dir=None):
        assert split != "test", "the env touched the test split"
        return real_load(name, split, data_dir)

    monkeypatch.setattr(data, "load", guarded)
    monkeypatch.setattr(envmod, "_SHARED", {})  # build every evaluator under the guard
    env = gym.make(
        "AutoSculpt-VGG", dataset="digits", evaluation=mode, reward_samples=60, recovery_samples=128
    )
    base = env.unwrapped
    policy = [int(np.flatnonzero(base.problem.valid[i])[-1]) for i in range(base.num_layers)]
    m = base.evaluate_policy(policy)
    assert 0.0 <= m["accuracy"] <= 1.0
    assert base.env_kwargs["evaluation"] == mode


def test_recovery_holds_masks_exactly_and_starts_fresh_each_time():
    problem = PruningProblem("resnet20", "digits")
    ev = RecoveryEvaluator(problem, "digits", reward_samples=60, recovery_samples=256)
    rng = np.random.default_rng(0)
    policies = [
        tuple(int(rng.choice(np.flatnonzero(problem.valid[i]))) for i in range(problem.num_layers))
        for _ in range(2)
    ]
    first = ev(policies[0])
    check_masks(ev.net, problem.held_masks(policies[0]))
    ev(policies[1])
    check_masks(ev.net, problem.held_masks(policies[1]))
    ev.cache.clear()  # scoring again after another policy gives the same value
    assert ev(policies[0]) == first
    # the recovery changed weights that plain masking leaves at their pretrained values
    masked = problem.layers[0].weight * problem.mask(0, policies[0][0])
    assert not torch.equal(dict(ev.net.named_modules())[problem.layers[0].name].weight, masked)


def test_recovery_leaves_the_callers_rng_alone():
    env = gym.make("AutoSculpt-ResNet", dataset="digits", evaluation="recovery", reward_samples=30)
    base = env.unwrapped
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    base.evaluate_policy([base.problem.dense_action] * base.num_layers)
    base.evaluator.cache.clear()
    assert torch.equal(torch.rand(3), expected)


def _problems():
    torch.manual_seed(0)
    mixed = Mixed(in_channels=1, num_classes=10).eval()
    return {
        "resnet20": PruningProblem("resnet20", "digits"),
        "mobilenetv2": PruningProblem("mobilenetv2", "digits"),
        "mixed": PruningProblem(mixed, "digits"),
        "mixed-patdnn": PruningProblem(mixed, "digits", catalog="patdnn"),
    }


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "mixed", "mixed-patdnn"])
def test_reconstruction_reproduces_dense_and_lowers_output_error(name):
    problem = _problems()[name]
    calib = train_subset("digits", 128).images
    rec = Reconstruction(problem, calib)
    groups = {getattr(layer.module, "groups", 1) for layer in problem.layers}
    if name.startswith("mixed"):  # depthwise (16 groups) and grouped (4) convolutions
        assert {16, 4} <= groups
    refitted = strictly = 0
    for i, layer in enumerate(problem.layers):
        if rec.gram[i] is None:
            continue
        producer = rec.producer.get(i)
        dense = problem.dense_action
        assert torch.equal(
            rec.weight(i, dense, dense if producer is not None else None), layer.weight
        )
        producer_actions = (
            [None]
            if producer is None
            else [problem.dense_action, int(np.flatnonzero(problem.valid[producer])[-1])]
        )
        for a in np.flatnonzero(problem.valid[i]):
            for b in producer_actions:
                w = rec.weight(i, int(a), None if b is None else int(b))
                keep = problem.mask(i, int(a)).clone()
                if b is not None:  # inputs from removed channels arrive as zeros
                    alive = problem.mask(producer, int(b)).flatten(1).any(dim=1)
                    shape = [1, -1] + [1] * (keep.dim() - 2)
                    groups = getattr(layer.module, "groups", 1)
                    per_group = alive.numel() // groups
                    rows = keep.shape[0] // groups
                    for g in range(groups):
                        keep[g * rows : (g + 1) * rows] &= alive[
                            g * per_group : (g + 1) * per_group
                        ].view(shape)
                assert torch.all(w[~keep] == 0), (layer.name, a, b)
                plain = rec.output_error(i, layer.weight * keep)
                refit = rec.output_error(i, w)
                assert refit <= plain * (1 + 1e-6) + 1e-9, (layer.name, a, b, refit, plain)
                refitted += 1
                partial = keep.flatten(1).any(1) & ~keep.flatten(1).all(1)
                if partial.any() and plain > 1e-6:
                    strictly += refit < plain * (1 - 1e-3)
    assert refitted > 0 and strictly > 0


def test_reconstruction_mode_through_the_env_on_a_mixed_model():
    torch.manual_seed(0)
    env = gym.make(
        "AutoSculpt-v0",
        model=Mixed(in_channels=1, num_classes=10).eval(),
        dataset="digits",
        evaluation="reconstruction",
        reward_samples=60,
        target_flops_reduction=0.3,
    )
    base = env.unwrapped
    dense = base.evaluate_policy([base.problem.dense_action] * base.num_layers)
    assert dense["accuracy"] == pytest.approx(base.evaluator.dense_accuracy)
    policy = [int(np.flatnonzero(base.problem.valid[i])[-1]) for i in range(base.num_layers)]
    assert 0.0 <= base.evaluate_policy(policy)["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"tradeoff_lambda": float("nan")}, "tradeoff_lambda"),
        ({"band_tolerance": float("nan")}, "band_tolerance"),
        ({"band_tolerance": -0.1}, "band_tolerance"),
        ({"ignored_layers": "conv1"}, "list of layer names"),
        ({"reward_readout": "loss"}, "reward_readout must be one of 'accuracy', 'probability'"),
    ],
)
def test_bad_settings_are_refused(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        gym.make("AutoSculpt-ResNet", dataset="digits", **kwargs)


@pytest.mark.parametrize("bad", [[0.7], [True], [None]])
def test_evaluate_policy_takes_only_indices_or_names(bad):
    env = gym.make("AutoSculpt-ResNet", dataset="digits")
    base = env.unwrapped
    with pytest.raises(TypeError, match="policy entry 0"):
        base.evaluate_policy(bad * base.num_layers)
    names = base.action_names
    with pytest.raises(ValueError, match="not a mix"):
        base.evaluate_policy([names[-1]] + [base.problem.dense_action] * (base.num_layers - 1))


def test_probability_readout_is_the_true_class_probability_of_the_scored_network(tmp_path):
    from autosculpt_env import surrogate as sg
    from autosculpt_env.records import EpisodeRecord, make_env

    kw = dict(dataset="digits", evaluation="reconstruction", reward_samples=60)
    plain = gym.make("AutoSculpt-ResNet", **kw).unwrapped
    soft = gym.make("AutoSculpt-ResNet", reward_readout="probability", **kw).unwrapped
    policy = [int(np.flatnonzero(soft.problem.valid[i])[-1]) for i in range(soft.num_layers)]
    net = soft.pruned_model(policy)
    with torch.no_grad():
        p = net(soft.evaluator.images).softmax(1)
    expected = p[torch.arange(len(p)), soft.evaluator.labels].mean().item()
    got = soft.evaluate_policy(policy)["accuracy"]
    assert got == pytest.approx(expected, abs=1e-6)
    top1 = (p.argmax(1) == soft.evaluator.labels).float().mean().item()
    assert plain.evaluate_policy(policy)["accuracy"] == pytest.approx(top1)
    assert got != pytest.approx(top1)

    # the readout is part of what a record replays and of the surrogate's key; an env at the
    # default readout keeps the records and keys it had before readouts existed
    assert soft.env_kwargs["reward_readout"] == "probability"
    assert "reward_readout" not in plain.env_kwargs
    soft.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = soft.step(int(np.flatnonzero(soft.action_masks())[-1]))
    rec = EpisodeRecord.from_json(soft.episode_record().to_json())
    assert rec.env_kwargs["reward_readout"] == "probability"
    again = make_env(rec).unwrapped
    assert again.evaluate_policy(rec.actions)["accuracy"] == pytest.approx(
        soft.evaluate_policy(rec.actions)["accuracy"]
    )
    key_soft, _ = sg.env_key(soft)
    key_plain, _ = sg.env_key(plain)
    assert key_soft["readout"] == "probability" and "readout" not in key_plain
    assert {k: v for k, v in key_soft.items() if k != "readout"} == key_plain


def test_a_zoo_models_own_readout_applies_is_recorded_and_names_the_default(monkeypatch):
    """A zoo model may default to another readout (``zoo.ZooModel.env_defaults``): an env
    that leaves ``reward_readout`` at None uses it and writes it into its record (so the
    record replays under any defaults), a value given wins, and the fidelity benchmark's
    default candidate for the model's tasks spells it."""
    import dataclasses

    from autosculpt_env import fidelity, zoo
    from autosculpt_env.leaderboard import Task
    from autosculpt_env.leaderboard.protocol import Protocol, env_kwargs_problems, task_env_kwargs
    from autosculpt_env.records import make_env

    own = dataclasses.replace(zoo.ZOO["resnet20"], env_defaults={"reward_readout": "probability"})
    monkeypatch.setitem(zoo.ZOO, "resnet20", own)
    kw = dict(dataset="digits", evaluation="reconstruction", reward_samples=60)
    soft = gym.make("AutoSculpt-ResNet", **kw).unwrapped
    assert soft.env_kwargs["reward_readout"] == "probability"
    given = gym.make("AutoSculpt-ResNet", reward_readout="accuracy", **kw).unwrapped
    assert "reward_readout" not in given.env_kwargs
    policy = [int(np.flatnonzero(soft.problem.valid[i])[-1]) for i in range(soft.num_layers)]
    assert soft.evaluate_policy(policy)["accuracy"] != given.evaluate_policy(policy)["accuracy"]
    # the leaderboard expects of a task's records what the env writes
    expected = task_env_kwargs(Task("AutoSculpt-ResNet", 0.5), Protocol(dataset="digits"))
    assert expected["reward_readout"] == "probability"
    assert not [p for p in env_kwargs_problems(soft.env_kwargs, expected) if "readout" in p]
    assert [
        p
        for p in env_kwargs_problems(given.env_kwargs | {"reward_readout": "accuracy"}, expected)
        if "readout" in p
    ]
    assert fidelity.default_mode(Task("AutoSculpt-ResNet", 0.5)) == (
        "recovery[reward_readout=probability]"
    )
    # a candidate's name means one reward whatever the model's own defaults: plain
    # "recovery" gives the readout explicitly
    assert fidelity.candidate_kwargs("recovery")["reward_readout"] == "accuracy"
    soft.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = soft.step(int(np.flatnonzero(soft.action_masks())[-1]))
    record = soft.episode_record()
    monkeypatch.setitem(zoo.ZOO, "resnet20", dataclasses.replace(own, env_defaults={}))
    again = make_env(record).unwrapped
    assert again.env_kwargs["reward_readout"] == "probability"
