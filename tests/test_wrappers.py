"""The wrappers read the observation by column name (features.FeatureLayout)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import autosculpt_env  # noqa: F401
from autosculpt_env.features import GLOBAL_STATE, FeatureLayout
from autosculpt_env.wrappers import ContinuousAction, FlatObservation, nearest_valid


@pytest.fixture(scope="module")
def flat():
    return FlatObservation(gym.make("AutoSculpt-ResNet", dataset="digits"))


def test_flat_observation_columns_by_name(flat):
    base = flat.unwrapped
    names = flat.feature_names
    col = names.index
    assert names[: base.feature_layout.size] == list(base.feature_layout.names)
    assert names[-1] == "previous_sparsity" and flat.observation_space.shape == (len(names),)
    sparsity = {a.name: a.sparsity for a in base.problem.catalog.actions}

    graph_obs, info = base.reset(seed=0)
    obs = flat.observation(graph_obs)
    first = base.problem.graph.layer_nodes[0]
    np.testing.assert_array_equal(obs[: base.feature_layout.size], graph_obs.nodes[first])
    assert obs[col("current")] == 1 and obs[col("prunable")] == 1 and obs[col("decided")] == 0
    assert obs[col("progress")] == 0 and obs[col("previous_sparsity")] == 0
    assert obs[col("op_conv")] == 1 and obs[col("kept_energy[level_0.0]")] == pytest.approx(1)

    obs, info = flat.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(base.num_layers):
        a = int(rng.choice(np.flatnonzero(info["action_mask"])))
        obs, _, done, _, info = flat.step(a)
        assert obs[col("previous_sparsity")] == pytest.approx(sparsity[base.action_names[a]])
        assert obs[col("flops_reduction")] == pytest.approx(info["flops_reduction"], abs=1e-6)
        assert obs[col("progress")] == pytest.approx((t + 1) / base.num_layers)
        if not done:
            assert obs[col("current")] == 1 and obs[col("decided")] == 0
    assert done
    # after the last layer: only the global state and the previous action are left
    global_cols = [col(n) for n in GLOBAL_STATE] + [col("previous_sparsity")]
    rest = np.delete(obs, global_cols)
    assert not rest.any()
    assert obs[col("flops_to_target")] == 0.0  # the budget reward meets the target
    assert obs[col("progress")] == 1.0


def test_layout_names_every_column_once():
    layout = FeatureLayout(("dense", "2:4"))
    assert len(set(layout.names)) == layout.size
    assert layout.names[layout.block("flops_left")] == ("flops_left[dense]", "flops_left[2:4]")
    assert layout.names[layout.state][0] == "prunable"
    assert layout.names[layout.global_state] == GLOBAL_STATE
    with pytest.raises(KeyError, match="no feature column 'budget_left'"):
        layout.column("budget_left")
    with pytest.raises(KeyError, match="blocks"):
        layout.block("current")


def test_nearest_valid_prefers_the_sparser_on_a_tie():
    sparsity = np.array([0.0, 0.2, 0.4, 0.6])
    assert nearest_valid(np.array([True, False, True, True]), sparsity, 1) == 2
    assert nearest_valid(np.array([True, True, False, False]), sparsity, 3) == 1
    assert nearest_valid(np.array([True, True, True, True]), sparsity, 3) == 3


def test_continuous_action_plays_the_nearest_valid_level():
    env = ContinuousAction(gym.make("AutoSculpt-ResNet", dataset="digits"))
    _, info = env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([0.0], dtype=np.float32))
        assert info["discrete_action"] in range(env.unwrapped.num_actions)
    # level_0.0 everywhere misses the target: the action wall moved the actions up
    assert info["flops_reduction"] >= 0.5 - 1e-9
