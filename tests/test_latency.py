"""latency: the per-(layer, action) table (structure, cache, layer modules; no timing asserts)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import autosculpt_env  # noqa: F401  (registers the ids)
from autosculpt_env import latency as lat


@pytest.fixture(scope="module")
def problem():
    env = gym.make("AutoSculpt-ResNet", dataset="digits", reward_samples=100)
    yield env.unwrapped.problem
    env.close()


def test_table_shape_cache_and_prediction(problem, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    table = lat.latency_table(problem, batch_size=4, repeats=1)
    assert table.latency.shape == (problem.num_layers, problem.num_actions)
    assert np.array_equal(np.isnan(table.latency), ~problem.valid)
    assert (table.latency[problem.valid] >= 0).all()
    dense = [problem.dense_action] * problem.num_layers
    assert table.policy_latency(dense) == pytest.approx(table.dense_latency)
    assert table.latency_reduction(dense) == pytest.approx(0.0, abs=1e-12)
    some = [5] * problem.num_layers
    assert table.min_latency_from([]) <= table.policy_latency(some) + 1e-12
    assert table.min_latency_from(some) == pytest.approx(table.policy_latency(some))
    with pytest.raises(ValueError, match="expected"):
        table.policy_latency([0])
    # cached: a second call reads the file instead of timing again
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1
    again = lat.latency_table(problem, batch_size=4, repeats=1)
    np.testing.assert_array_equal(again.latency, table.latency)
    # another batch size is another key
    lat.latency_table(problem, batch_size=2, repeats=1)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2
    assert lat.LatencyTable.from_dict(table.to_dict()).fixed == table.fixed


def test_layer_module_computes_the_masked_layer(problem):
    """A table entry times the right computation: the materialised layer's outputs are the
    masked layer's kept channels (in part order for pattern layers)."""
    torch.manual_seed(0)
    for i, layer in enumerate(problem.layers):
        for a in np.flatnonzero(problem.valid[i]):
            mask = problem.mask(i, int(a))
            mod, in_ch = lat.layer_module(layer.module, mask)
            keep = mask.reshape(mask.shape[0], -1).any(1)
            if mod is None:
                assert not keep.any()
                continue
            in_shape = problem.graph.node(layer.name).in_shape
            x = torch.randn(2, *in_shape[1:])
            w = layer.module.weight * mask
            with torch.no_grad():
                want = (
                    torch.nn.functional.conv2d(
                        x, w, None, layer.module.stride, layer.module.padding
                    )
                    if isinstance(layer.module, torch.nn.Conv2d)
                    else x @ w.T
                )
                got = mod(x)
            want = want[:, keep]
            if got.dim() == 4:  # pattern layers emit their filters in part order
                dims = (0, 2, 3)
                got = got[:, got.sum(dims).argsort()]
                want = want[:, want.sum(dims).argsort()]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
