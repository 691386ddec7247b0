"""Environment tests, driven by the registry: every AutoSculpt id is covered automatically."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from gymnasium.utils.env_checker import check_env
from torch import nn

import autosculpt_env
from autosculpt_env import data
from autosculpt_env.records import EpisodeRecord, replay
from autosculpt_env.rewards import terminal_reward
from autosculpt_env.wrappers import ContinuousAction, FlatObservation

IDS = sorted(i for i in gym.registry if i.startswith("AutoSculpt-"))  # not the tests' twins
FAST = {"dataset": "digits"}


def random_episode(env, rng, seed=0):
    obs, info = env.reset(seed=seed)
    total, terminated = 0.0, False
    while not terminated:
        a = int(rng.choice(np.flatnonzero(info["action_mask"])))
        obs, r, terminated, truncated, info = env.step(a)
        assert not truncated
        total += r
    return total, info


def test_registry_has_the_documented_ids():
    assert (
        set(IDS)
        == set(autosculpt_env.REGISTERED_CONFIGS)
        == {
            "AutoSculpt-v0",
            "AutoSculpt-ResNet",
            "AutoSculpt-VGG",
            "AutoSculpt-MobileNet",
            "AutoSculpt-ViT",
        }
    )


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_without_warnings(env_id):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(env_id, **FAST)
        check_env(env.unwrapped)
        env.close()
    assert [str(w.message) for w in caught] == []


@needs_fashion_mnist
@pytest.mark.parametrize("env_id", IDS)
def test_make_default_config_without_warnings(env_id):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(env_id)
        obs, info = env.reset(seed=0)
    assert [str(w.message) for w in caught] == []
    assert env.observation_space.contains(obs)
    assert info["action_mask"].dtype == bool and info["action_mask"].any()


@pytest.mark.parametrize("env_id", IDS)
def test_random_episode_terminal_info(env_id):
    env = gym.make(env_id, **FAST)
    _, info = random_episode(env, np.random.default_rng(0))
    for key in (
        "accuracy",
        "dense_accuracy",
        "flops_reduction",
        "params_reduction",
        "pruning_rate",
        "policy",
    ):
        assert key in info
    assert len(info["policy"]) == len(env.unwrapped.layer_names)
    assert info["flops_reduction"] >= 0.5 - 1e-9  # the budget reward's wall
    assert 0.0 <= info["accuracy"] <= 1.0 and 0.0 < info["pruning_rate"] < 1.0


def test_prefix_works_without_prior_import():
    code = (
        "import gymnasium as gym\n"
        "env = gym.make('autosculpt_env:AutoSculpt-ResNet', dataset='digits')\n"
        "obs, info = env.reset(seed=0)\n"
        "print(len(info['action_mask']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10"


_PLAY = """
import json, sys, numpy as np, gymnasium as gym, autosculpt_env
env = gym.make(sys.argv[1], dataset="digits", reward=sys.argv[2])
obs, info = env.reset(seed=0)
out, done, t = [], False, 0
while not done:
    valid = np.flatnonzero(info["action_mask"])
    a = int(valid[(7 * t) % len(valid)])
    obs, r, done, _, info = env.step(a)
    out.append([r, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()}, obs.nodes.sum().item()])
    t += 1
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "env_id,reward", [("AutoSculpt-ResNet", "budget"), ("AutoSculpt-ViT", "band")]
)
def test_two_processes_same_actions_same_results(env_id, reward):
    runs = [
        subprocess.run(
            [sys.executable, "-c", _PLAY, env_id, reward],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and json.loads(runs[0])[-1][1]["accuracy"] > 0


@pytest.mark.parametrize("catalog", ["autosculpt", "structured", "patdnn"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_budget_reward_always_meets_target(catalog, target):
    env = gym.make(
        "AutoSculpt-ResNet", dataset="digits", catalog=catalog, target_flops_reduction=target
    )
    rng = np.random.default_rng(1)
    for _ in range(8):
        r, info = random_episode(env, rng)
        assert info["flops_reduction"] >= target - 1e-9
        assert r == info["accuracy"]


def test_band_log_flops_and_tradeoff_formulas():
    rng = np.random.default_rng(2)
    for reward in ("band", "log_flops", "tradeoff"):
        env = gym.make(
            "AutoSculpt-VGG", dataset="digits", reward=reward, target_flops_reduction=0.4
        )
        seen_in, seen_out = False, False
        for _ in range(6):
            r, info = random_episode(env, rng)
            acc, red = info["accuracy"], info["flops_reduction"]
            if reward == "band":
                inside = abs(red - 0.4) <= 0.05
                seen_in |= inside
                seen_out |= not inside
                assert r == pytest.approx(acc if inside else acc - 1.0)
            elif reward == "log_flops":
                assert r == pytest.approx(-(1 - acc) * np.log(info["flops"]))
            else:
                assert r == pytest.approx(acc + 1.0 * red)
            assert r == pytest.approx(terminal_reward(reward, acc, red, info["flops"], 0.4))
        if reward == "band":
            assert seen_out  # random policies mostly miss the band


@pytest.mark.parametrize("mode", ["accuracy", "recovery"])
def test_non_terminal_steps_do_not_run_the_model_and_policies_are_memoised(mode):
    env = gym.make(
        "AutoSculpt-ResNet",
        dataset="digits",
        bn_recalibration_samples=64,
        evaluation=mode,
        recovery_samples=32,
    )
    ev = env.unwrapped.reward_evaluator
    _, info = env.reset(seed=0)
    before = ev.num_forward
    policy = []
    for _ in range(len(env.unwrapped.layer_names) - 1):
        a = int(np.flatnonzero(info["action_mask"])[-1])
        policy.append(a)
        _, _, done, _, info = env.step(a)
        assert not done
    assert ev.num_forward == before
    a = int(np.flatnonzero(info["action_mask"])[-1])
    _, r1, done, _, _ = env.step(a)
    assert done and ev.num_forward == before + 1
    m = env.unwrapped.evaluate_policy(policy + [a])
    assert ev.num_forward == before + 1 and m["reward"] == r1


def test_evaluate_policy_pruned_model_and_record_replay(tmp_path):
    env = gym.make("AutoSculpt-ResNet", dataset="digits")
    base = env.unwrapped
    _, info = random_episode(env, np.random.default_rng(3))
    record = base.episode_record()
    assert record.actions == info["policy"] and record.env_id == "AutoSculpt-ResNet"
    path = record.save(tmp_path / "best.json")
    loaded = EpisodeRecord.load(path)
    assert loaded == record
    replayed = replay(loaded)
    assert replayed["flops"] == info["flops"] and replayed["accuracy"] == info["accuracy"]
    # evaluate_policy by names gives the same metrics
    m = base.evaluate_policy(info["policy"])
    assert m["accuracy"] == info["accuracy"] and m["meets_target"]
    # the pruned model is the network that was scored, masks included
    net = base.pruned_model(info["policy"])
    ev = base.evaluator
    with torch.no_grad():
        acc = (net(ev.images).argmax(1) == ev.labels).sum().item() / len(ev.labels)
    assert acc == pytest.approx(info["accuracy"], abs=1e-9)
    masks = base.problem.policy_masks(base.problem.actions_from_names(info["policy"]))
    modules = dict(net.named_modules())
    for name, m in masks.items():
        assert torch.all(modules[name].weight[~m] == 0)


def test_a_tampered_record_fails_replay():
    env = gym.make("AutoSculpt-ResNet", dataset="digits")
    random_episode(env, np.random.default_rng(4))
    record = env.unwrapped.episode_record()
    record.metrics["accuracy"] += 0.05
    with pytest.raises(ValueError, match="accuracy"):
        replay(record)


def test_reward_uses_only_the_reward_split(monkeypatch):
    from autosculpt_env import zoo
    from autosculpt_env.envs import autosculpt as envmod

    # outside the guard: training a digits entry on first use measures its test accuracy
    zoo.load("mobilenetv2", "digits")
    # inside it: a fresh problem and evaluators, whatever earlier tests left in the cache
    monkeypatch.setattr(envmod, "_SHARED", {})
    real_load = data.load
    calls = []

    def guarded(name, split, data_dir=None):
        assert split != "test", "the env touched the test split"
        calls.append(split)
        return real_load(name, split, data_dir)

    monkeypatch.setattr(data, "load", guarded)
    env = gym.make("AutoSculpt-MobileNet", dataset="digits", reward_samples=100)
    random_episode(env, np.random.default_rng(5))
    assert "reward" in calls  # the guard saw the env's loads


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_vector_envs(vector):
    fns = [lambda: gym.make("AutoSculpt-ResNet", dataset="digits") for _ in range(2)]
    envs = (
        gym.vector.SyncVectorEnv(fns)
        if vector == "sync"
        else gym.vector.AsyncVectorEnv(fns, shared_memory=False)
    )
    obs, infos = envs.reset(seed=0)
    assert len(obs) == 2 and infos["action_mask"].shape == (2, 10)
    finished = 0
    for _ in range(len(gym.make("AutoSculpt-ResNet", dataset="digits").unwrapped.layer_names)):
        actions = np.array([np.flatnonzero(m)[0] for m in infos["action_mask"]])
        obs, rewards, term, trunc, infos = envs.step(actions)
        finished += int(term.sum())
    assert finished == 2 and rewards.shape == (2,) and (rewards > 0).all()
    envs.close()


def test_flat_and_continuous_wrappers():
    env = FlatObservation(gym.make("AutoSculpt-ResNet", dataset="digits"))
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    done = False
    while not done:
        obs, r, done, _, info = env.step(int(np.flatnonzero(env.action_masks())[0]))
        assert env.observation_space.contains(obs)
    cont = ContinuousAction(gym.make("AutoSculpt-ResNet", dataset="digits"))
    _, info = cont.reset(seed=0)
    done = False
    while not done:
        _, r, done, _, info = cont.step(np.array([0.8], dtype=np.float32))
    assert info["flops_reduction"] >= 0.5 - 1e-9


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.fc(x)


def _digits_env(env_id: str = "AutoSculpt-ResNet", **kw):
    return gym.make(env_id, **{"dataset": "digits", **kw})


def _stepped_env():
    env = _digits_env()
    env.reset(seed=0)
    return env


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: _stepped_env().step(10), ValueError, "out of range.*layer conv1"),
        (lambda: _stepped_env().step(-1), ValueError, "out of range"),
        (lambda: _stepped_env().step(1.0), TypeError, "integer"),
        (lambda: _stepped_env().step(True), TypeError, "integer"),
        (lambda: _digits_env().step(0), ValueError, "reset"),
        (lambda: _digits_env(colour="red"), TypeError, "colour"),
        (lambda: _digits_env(target_flops_reduction=0.0), ValueError, "target_flops_reduction"),
        (lambda: _digits_env(target_flops_reduction=1.0), ValueError, "target_flops_reduction"),
        (lambda: _digits_env(catalog="nope"), ValueError, "nope"),
        (lambda: _digits_env(model="resnet999"), ValueError, "resnet999"),
        (lambda: _digits_env(dataset="mnist"), ValueError, "mnist"),
        (lambda: _digits_env(reward="speed"), ValueError, "speed"),
        (lambda: _digits_env(evaluation="guess"), ValueError, "guess"),
        (lambda: _digits_env("AutoSculpt-v0", model=_Untraceable()), TypeError, "_Untraceable|fx"),
        (
            lambda: _digits_env(
                "AutoSculpt-v0", model=nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
            ),
            ValueError,
            "7 outputs.*10 classes",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_masked_action_and_step_after_end():
    env = gym.make("AutoSculpt-ResNet", dataset="digits", target_flops_reduction=0.9 - 1e-3)
    _, info = env.reset(seed=0)
    masked = np.flatnonzero(~info["action_mask"])
    t = 0
    while masked.size == 0:  # walk until the budget wall masks something
        _, _, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
        masked = np.flatnonzero(~info["action_mask"])
        t += 1
    with pytest.raises(ValueError, match="unreachable.*valid actions"):
        env.step(int(masked[0]))
    done = False
    while not done:
        _, _, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[-1]))
    with pytest.raises(ValueError, match="episode has ended"):
        env.step(0)


def test_unreachable_target_is_refused():
    with pytest.raises(ValueError, match="cannot be reached"):
        gym.make("AutoSculpt-ResNet", dataset="digits", target_flops_reduction=0.99)


def test_user_model_with_pretrained_weights():
    from autosculpt_env import zoo

    net = zoo.load("vgg11", "digits")
    env = gym.make("AutoSculpt-v0", dataset="digits", model=net, target_flops_reduction=0.3)
    _, info = random_episode(env, np.random.default_rng(7))
    assert info["dense_accuracy"] > 0.8
    rec = env.unwrapped.episode_record()
    assert rec.env_kwargs["model"] == "<VGG>"
    replay(rec, model=net)
