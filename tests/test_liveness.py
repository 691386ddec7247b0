"""liveness: exact zeros and dead parameters; the env's params equal the materialised
network's; records that counted params the stored way still check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from torch import nn

import autosculpt_env  # noqa: F401  (registers the ids)
from autosculpt_env import data
from autosculpt_env import materialize as mat
from autosculpt_env.cost import masked_params
from autosculpt_env.graph import build_graph
from autosculpt_env.liveness import Liveness, kept_matrix
from autosculpt_env.records import EpisodeRecord, check_fits, load_record, make_env, replay

ROOT = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    """Two branches meeting at an add, a layer without bias, a classifier."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = self.bn(self.a(x)) + self.b(x)
        z = torch.relu(self.c(torch.relu(y)))
        return self.fc(z.mean((2, 3)))


def _toy():
    torch.manual_seed(0)
    net = Toy().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    net.bn.weight.data.uniform_(0.5, 1.5)
    net.bn.bias.data.uniform_(-0.2, 0.2)
    masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in net.named_children()}
    del masks["bn"]
    masks["a"][[0, 1]] = False  # a removes channels 0 and 1
    masks["b"][0] = False  # b removes channel 0: the add is zero on channel 0 only
    masks["c"][0, 1:] = False  # c's first filter reads channel 0 alone
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for name, m in masks.items():
            module = masked.get_submodule(name)
            module.weight.mul_(m)
            removed = ~m.reshape(m.shape[0], -1).any(1)
            if module.bias is not None:
                module.bias[removed] = 0.0
        masked.bn.weight[[0, 1]] = 0.0  # held at zero with a's removed channels
        masked.bn.bias[[0, 1]] = 0.0
    return net, masked, masks


def test_dead_parameters_counted_by_hand():
    net, masked, masks = _toy()
    x = torch.randn(2, 1, 6, 6)
    graph = build_graph(net, x)
    liveness = Liveness(graph)
    kept = {n: kept_matrix(m) for n, m in masks.items()}
    dead = liveness.run(kept)
    # channel 0 is zero after the add (both operands remove it), channel 1 is not (b keeps
    # it); c's first filter reads only channel 0 and has no bias, so its output is zero too
    np.testing.assert_array_equal(dead.inputs["c"], [True, False, False, False])
    np.testing.assert_array_equal(dead.inputs["fc"], [True, False, False])
    np.testing.assert_array_equal(dead.batch_norms["bn"], [True, True, False, False])
    # c: 3 kept weights read channel 0; fc: 2 weights read c's zero channel; bn: scale and
    # shift held at zero on 2 channels
    assert liveness.count(dead, kept) == 3 + 2 + 2 * 2
    assert masked_params(graph, masks, live=False) - masked_params(graph, masks) == 9
    m = mat.materialize(masked, masks, x, check_inputs=torch.randn(16, 1, 6, 6))
    assert m.max_abs_diff_float64 <= 1e-9
    assert m.params == masked_params(graph, masks)
    assert m.params + m.dead_params == masked_params(graph, masks, live=False)


@pytest.mark.parametrize("env_id", ["AutoSculpt-ResNet", "AutoSculpt-MobileNet"])
def test_env_params_equal_materialised_params_for_random_policies(env_id):
    env = gym.make(env_id, dataset="digits", evaluation="accuracy", target_flops_reduction=0.01)
    base = env.unwrapped
    p = base.problem
    images = data.load("digits", "reward").images[:64]
    rng = np.random.default_rng(0)
    for _ in range(3):
        policy = [int(rng.choice(np.flatnonzero(p.valid[i]))) for i in range(p.num_layers)]
        m = mat.materialize_policy(env, policy, check_inputs=images)
        assert m.max_abs_diff_float64 <= 1e-9  # zeroing dead weights changed nothing
        assert m.params == p.policy_params(policy) < p.cost.stored_params(policy)
    dense = [p.dense_action] * p.num_layers
    assert p.policy_params(dense) == p.cost.stored_params(dense) == p.graph.dense_params
    env.close()


def test_records_with_stored_params_still_check_and_replay():
    env = gym.make("AutoSculpt-ResNet", dataset="digits", evaluation="accuracy")
    base = env.unwrapped
    p = base.problem
    policy = [6 if p.valid[i, 6] else p.dense_action for i in range(p.num_layers)]
    record = base.episode_record(policy)
    stored = p.cost.stored_params(policy)
    assert record.metrics["params"] == p.policy_params(policy) < stored
    old = EpisodeRecord.from_json(record.to_json())
    old.metrics["params"] = stored
    old.metrics["params_reduction"] = 1.0 - stored / base.dense_params
    check_fits(old, env)
    replay(old)
    # only a record that is wholly one way or the other: the stored count with the new
    # reduction, or any other count, is refused
    mixed = EpisodeRecord.from_json(old.to_json())
    mixed.metrics["params_reduction"] = record.metrics["params_reduction"]
    forged = EpisodeRecord.from_json(old.to_json())
    forged.metrics["params"] = stored + 1
    for bad in (mixed, forged):
        with pytest.raises(ValueError, match="params"):
            check_fits(bad, env)
    env.close()


@needs_fashion_mnist
def test_committed_rows_records_still_fit_their_env():
    """The first leaderboard's records counted params the stored way; they still fit."""
    row = json.loads(
        sorted((ROOT / "benchmarks" / "rows").glob("AutoSculpt-ResNet@0.5__*"))[0].read_text()
    )
    record = load_record(ROOT / "benchmarks" / "rows" / f"{row['row_id']}.json")
    env = make_env(record)  # checks the cost metrics, params included
    base = env.unwrapped
    actions = base.problem.actions_from_names(record.actions)
    assert record.metrics["params"] == base.problem.cost.stored_params(actions)
    assert base.problem.policy_params(actions) <= record.metrics["params"]
    env.close()
