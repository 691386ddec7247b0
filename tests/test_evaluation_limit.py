"""The reward-evaluation limit belongs to the env (autosculpt_env.evaluation_limit), on the
digits twin of AutoSculpt-ResNet: what counts, refusal past the limit, the count in every
record, one count across envs and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import autosculpt_env  # noqa: F401
from autosculpt_env import evaluation_limit
from autosculpt_env.evaluation_limit import (
    EvaluationLimit,
    EvaluationLimitReached,
    limited_reward_evaluations,
)
from autosculpt_env.records import EpisodeRecord


@pytest.fixture(scope="module")
def env():
    e = gym.make("AutoSculpt-ResNet", dataset="digits")
    yield e
    e.close()


def _episode(env, pick=lambda valid: valid[-1]):
    _, info = env.reset(seed=0)
    done, reward = False, None
    while not done:
        _, reward, done, _, info = env.step(int(pick(np.flatnonzero(info["action_mask"]))))
    return reward, info


def test_every_episode_and_evaluation_counts_one_repeats_included(env):
    base = env.unwrapped
    with limited_reward_evaluations(None) as b:
        _, info = _episode(env)
        assert info["reward_evaluations"] == 1 and b.used == 1
        _, info = _episode(env)  # the same policy again: answered by the memo, still counted
        assert info["reward_evaluations"] == 2
        m = base.evaluate_policy(info["policy"])
        assert m["reward_evaluations"] == 3 and b.used == 3
        base.playable(info["policy"])  # free: no reward
        env.reset()
        env.step(int(np.flatnonzero(base.action_masks())[0]))  # a non-terminal step is free
        assert b.used == 3


def test_past_the_limit_nothing_is_scored(env):
    base = env.unwrapped
    with limited_reward_evaluations(2) as b:
        _episode(env)
        m = base.evaluate_policy([base.problem.dense_action] * base.num_layers)
        assert m["reward_evaluations"] == 2 and b.limit_reached and b.remaining == 0
        calls = base.num_reward_evaluations
        with pytest.raises(EvaluationLimitReached, match="spent the 2 reward evaluations"):
            base.evaluate_policy([base.problem.dense_action] * base.num_layers)
        with pytest.raises(EvaluationLimitReached):
            _episode(env)
        assert b.used == 2 and base.num_reward_evaluations == calls  # refused before scoring


def test_records_carry_the_envs_count(env, tmp_path):
    base = env.unwrapped
    with limited_reward_evaluations(5):
        _episode(env)
        reward, info = _episode(env, pick=lambda valid: valid[0])
        record = base.episode_record()
        assert record.reward_evaluations == {"used": 2, "limit": 5}
        # what an agent builds from the terminal info carries the same stamp
        assert base.record_from_info(info).reward_evaluations == {"used": 2, "limit": 5}
        record.save(tmp_path / "r.json")
        assert EpisodeRecord.load(tmp_path / "r.json").reward_evaluations["used"] == 2
    # a forged stamp past its own limit is refused like any malformed record field
    d = json.loads(record.to_json())
    d["reward_evaluations"] = {"used": 6, "limit": 5}
    with pytest.raises(ValueError, match="exceeds the limit"):
        EpisodeRecord.from_dict(d)
    # records made before the env kept the count still load, and round-trip unchanged
    del d["reward_evaluations"]
    old = EpisodeRecord.from_dict(d)
    assert old.reward_evaluations is None and "reward_evaluations" not in old.to_json()


def test_vector_copies_share_one_count():
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("AutoSculpt-ResNet", dataset="digits") for _ in range(3)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    with limited_reward_evaluations(4) as b:
        _, infos = envs.reset(seed=0)
        for _ in range(envs.envs[0].unwrapped.num_layers):  # the three finish together
            actions = [int(np.flatnonzero(m)[-1]) for m in infos["action_mask"]]
            _, _, done, _, infos = envs.step(actions)
        assert done.all() and b.used == 3
        assert sorted(infos["final_info"]["reward_evaluations"]) == [1, 2, 3]
    envs.close()


def test_harness_limit_holds_across_processes(tmp_path):
    """Two processes charging one ledger as fast as they can: exactly the limit is spent."""
    ledger = tmp_path / "ledger.json"
    code = (
        "from autosculpt_env.evaluation_limit import current, EvaluationLimitReached\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(60):\n"
        "        current().charge(); n += 1\n"
        "except EvaluationLimitReached:\n"
        "    pass\n"
        "print(n)\n"
    )
    env = {**os.environ, evaluation_limit.MAX_ENV: "70", evaluation_limit.LEDGER_ENV: str(ledger)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    done = [int(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sum(done) == 70 and min(done) >= 10  # two processes, one limit, none lost
    state = evaluation_limit.read_ledger(ledger)
    assert state["used"] == 70 and state["limit"] == 70


def test_an_agent_cannot_change_the_harness_limit(tmp_path, monkeypatch):
    monkeypatch.setenv(evaluation_limit.MAX_ENV, "7")
    monkeypatch.setenv(evaluation_limit.LEDGER_ENV, str(tmp_path / "ledger.json"))
    previous = evaluation_limit._PROCESS
    try:
        with pytest.raises(ValueError, match="differs from the 7 the harness set"):
            evaluation_limit.limit_reward_evaluations(8)
        assert evaluation_limit.limit_reward_evaluations(None).limit == 7  # the harness's stays
        assert evaluation_limit.limit_reward_evaluations(7).ledger == tmp_path / "ledger.json"
    finally:
        evaluation_limit._PROCESS = previous


def test_progress_curve_keeps_best_in_band_rewards(tmp_path):
    b = EvaluationLimit(10, tmp_path / "ledger.json")
    for reward, in_band in [(0.3, True), (0.9, False), (0.2, True), (0.5, True), (0.5, True)]:
        b.report(b.charge(), reward, in_band)
    assert b.progress == [[1, 0.3], [4, 0.5]] and b.used == 5
    assert evaluation_limit.read_ledger(tmp_path / "ledger.json")["progress"] == [
        [1, 0.3],
        [4, 0.5],
    ]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "7"])
def test_limits_are_checked(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        EvaluationLimit(bad)
