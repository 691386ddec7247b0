"""latency: the per-(layer, action) table (structure, cache, layer modules; no timing asserts)."""

from __future__ import annotations

import json
import re

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


def test_prediction_subtracts_the_time_cut_channels_save_in_consumers(
    problem, tmp_path, monkeypatch
):
    """A consumer reads fewer input channels where its producer's are cut: the prediction
    subtracts its entry times the dead fraction of its FLOPs (the FLOPs table's pairs)."""
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    table = lat.latency_table(problem, batch_size=4, repeats=1)
    cost = problem.cost
    assert set(table.dead) == set(cost.dead) and table.dead
    rng = np.random.default_rng(0)
    saw_saving = False
    for _ in range(20):
        acts = [
            int(rng.choice(np.flatnonzero(problem.valid[i]))) for i in range(problem.num_layers)
        ]
        plain = table.fixed + sum(table.latency[i, a] for i, a in enumerate(acts))
        saved = 0.0
        for (i, m), d in cost.dead.items():
            if d[acts[i], acts[m]] > 0:
                frac = d[acts[i], acts[m]] / cost.flops[m, acts[m]]
                saved += frac * table.latency[m, acts[m]]
        assert table.policy_latency(acts) == pytest.approx(plain - saved, rel=1e-9, abs=1e-12)
        assert table.min_latency_from(acts) == pytest.approx(table.policy_latency(acts))
        assert table.min_latency_from(acts[:3]) <= table.policy_latency(acts) + 1e-12
        saw_saving |= saved > 0
    assert saw_saving, "no random policy cut a producer's channels: the check saw nothing"
    # a table read back from its file predicts the same
    again = lat.LatencyTable.from_dict(table.to_dict()).with_consumers(cost)
    assert again.policy_latency(acts) == pytest.approx(table.policy_latency(acts))


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


# --------------------------------------------------------------------------- the cache


def test_cache_key_covers_masks_shapes_batch_threads_and_machine(problem):
    info = lat.machine(1)
    key = lat.table_key(problem, 8, 3, info)
    assert key == lat.table_key(problem, 8, 3, dict(info))  # deterministic
    others = {
        lat.table_key(problem, 16, 3, info),
        lat.table_key(problem, 8, 5, info),
        *(
            lat.table_key(problem, 8, 3, {**info, field: "other"})
            for field in ("processor", "cpu", "machine", "cpu_count", "torch", "threads")
        ),
    }
    assert key not in others and len(others) == 8
    # another catalog on the same network: other masks, another key
    env = gym.make("AutoSculpt-ResNet", dataset="digits", catalog="structured", reward_samples=100)
    assert lat.table_key(env.unwrapped.problem, 8, 3, info) != key
    env.close()


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        '{"layers": []}',
        "TABLE_WITH_OTHER_FIXED",
        "TABLE_WITH_NEGATIVE_ENTRY",
    ],
)
def test_damaged_cache_file_is_named_and_measured_again(problem, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    monkeypatch.setattr(lat, "_MEMO", {})
    table = lat.latency_table(problem, batch_size=2, repeats=1)
    (path,) = (tmp_path / "latency").glob("*.json")
    if damage.startswith("TABLE"):
        d = table.to_dict()
        if damage == "TABLE_WITH_OTHER_FIXED":
            d["fixed"] += 1.0
        else:
            d["latency"][0][problem.dense_action] = -1.0
        damage = json.dumps(d)
    path.write_text(damage)
    monkeypatch.setattr(lat, "_MEMO", {})
    with pytest.warns(UserWarning, match=f"latency table {path} is damaged"):
        again = lat.latency_table(problem, batch_size=2, repeats=1)
    assert again.key == table.key
    # the file was replaced by a whole, valid table
    reread = lat.LatencyTable.from_dict(json.loads(path.read_text()))
    np.testing.assert_array_equal(reread.latency, again.latency)
    assert sorted(p.name for p in (tmp_path / "latency").iterdir()) == [path.name]


def test_table_arguments_are_checked(problem):
    for kwargs in ({"batch_size": 0}, {"repeats": 0}, {"threads": 1.5}, {"batch_size": True}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            lat.latency_table(problem, cache=False, **kwargs)


def test_timing_restores_the_callers_threads(problem, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    seen = []
    real = lat.median_latency

    def spy(fn, x, repeats=10, warmup=2):
        seen.append(torch.get_num_threads())
        return real(fn, x, 1, 0)

    monkeypatch.setattr(lat, "median_latency", spy)
    torch.set_num_threads(2)
    table = lat.latency_table(problem, batch_size=2, repeats=1, threads=1, cache=False)
    assert set(seen) == {1} and torch.get_num_threads() == 2
    assert table.machine["threads"] == 1


# --------------------------------------------------------------------- the env's cost


def fixed_table(problem, batch_size=256, **_):
    """A deterministic stand-in for a measured table: each entry proportional to the layer's
    FLOPs under the action, plus a per-call cost; a fixed remainder outside the layers."""
    flops = problem.cost.flops
    latency = np.where(problem.valid, 1e-9 * np.nan_to_num(flops) + 1e-5, np.nan)
    latency[np.isnan(flops) & problem.valid] = 1e-5
    dense = float(latency[:, problem.dense_action].sum()) + 2e-4
    return lat.LatencyTable(
        layers=[layer.name for layer in problem.layers],
        action_names=problem.catalog.action_names,
        latency=latency,
        dense_latency=dense,
        fixed=dense - float(latency[:, problem.dense_action].sum()),
        batch_size=batch_size,
        machine={"cpu": "test"},
        key="0123456789abcdef0123",
    )


def _episode(env, rng):
    _, info = env.reset(seed=0)
    done = False
    while not done:
        assert info["action_mask"].any()
        a = int(rng.choice(np.flatnonzero(info["action_mask"])))
        _, reward, done, _, info = env.step(a)
    return reward, info


def _make(**kwargs):
    return gym.make("AutoSculpt-ResNet", dataset="digits", evaluation="accuracy", **kwargs)


def test_latency_is_off_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    monkeypatch.setattr(lat, "latency_table", lambda *a, **k: pytest.fail("timed a table"))
    env = _make()
    base = env.unwrapped
    assert base.latency is None and base.target_latency is None
    assert not {"target_latency_reduction", "latency_batch_size"} & set(base.env_kwargs)
    _, info = _episode(env, np.random.default_rng(0))
    assert "latency_reduction" not in info
    record = base.episode_record()
    assert "latency_table" not in json.loads(record.to_json())
    assert "latency_reduction" not in record.metrics
    assert not (tmp_path / "latency").exists()
    env.close()


def test_latency_reduction_in_info_and_record_replays(monkeypatch):
    from autosculpt_env.records import EpisodeRecord, replay

    monkeypatch.setattr(lat, "latency_table", fixed_table)
    env = _make(latency_batch_size=8)
    base = env.unwrapped
    assert base.env_kwargs["latency_batch_size"] == 8 and base.latency.batch_size == 8
    reward, info = _episode(env, np.random.default_rng(1))
    actions = base.problem.actions_from_names(info["policy"])
    assert info["latency_reduction"] == base.latency.latency_reduction(actions)
    assert 0.0 < info["latency_reduction"] < 1.0
    record = EpisodeRecord.from_json(base.episode_record().to_json())
    assert record.latency_table == base.latency.key
    assert record.metrics["latency_reduction"] == info["latency_reduction"]
    assert replay(record)["latency_reduction"] == info["latency_reduction"]
    # a recorded latency that the same table does not give is caught
    forged = EpisodeRecord.from_json(record.to_json())
    forged.metrics["latency_reduction"] += 0.01
    with pytest.raises(ValueError, match="latency_reduction: recorded"):
        replay(forged)
    # another machine's table predicts other times: not compared
    forged.latency_table = "fedcba9876543210fedc"
    assert replay(forged)["latency_reduction"] == info["latency_reduction"]
    env.close()


def test_latency_target_is_an_action_wall_and_the_reward_is_deterministic(monkeypatch):
    monkeypatch.setattr(lat, "latency_table", fixed_table)
    env = _make(target_latency_reduction=0.3, target_flops_reduction=0.3)
    base = env.unwrapped
    rng = np.random.default_rng(2)
    policies = []
    for _ in range(12):
        reward, info = _episode(env, rng)
        # every played policy meets both targets, and no step was left without an action
        assert info["latency_reduction"] >= 0.3 - 1e-9
        assert info["flops_reduction"] >= 0.3 - 1e-9
        assert reward == info["accuracy"]
        policies.append((info["policy"], reward, info["latency_reduction"]))
    # a fresh env with the same table gives the same numbers for the same policies
    again = _make(target_latency_reduction=0.3, target_flops_reduction=0.3).unwrapped
    for policy, reward, latency in policies:
        m = again.evaluate_policy(policy)
        assert (m["reward"], m["latency_reduction"], m["meets_target"]) == (reward, latency, True)
    # a policy slower than the target is still scored, and said to miss it
    dense = [base.action_names[base.problem.dense_action]] * base.num_layers
    assert not base.evaluate_policy(dense)["meets_target"]
    assert not base.playable(dense)
    env.close()


def test_band_reward_with_a_latency_target(monkeypatch):
    from autosculpt_env.rewards import terminal_reward

    monkeypatch.setattr(lat, "latency_table", fixed_table)
    env = _make(reward="band", target_latency_reduction=0.3, target_flops_reduction=0.3)
    base = env.unwrapped
    p = base.problem
    for level in range(p.num_actions):
        policy = [level if p.valid[i, level] else p.dense_action for i in range(p.num_layers)]
        m = base.evaluate_policy(policy)
        inside = (
            abs(m["flops_reduction"] - 0.3) <= 0.05 and abs(m["latency_reduction"] - 0.3) <= 0.05
        )
        assert m["reward"] == (m["accuracy"] if inside else m["accuracy"] - 1.0)
    assert terminal_reward("band", 0.9, 0.3, 1.0, 0.3, 0.05, 1.0, 0.5, 0.3) == pytest.approx(-0.1)
    assert terminal_reward("band", 0.9, 0.3, 1.0, 0.3, 0.05, 1.0, 0.31, 0.3) == 0.9
    with pytest.raises(ValueError, match="latency_reduction"):
        terminal_reward("band", 0.9, 0.3, 1.0, 0.3, 0.05, 1.0, None, 0.3)
    env.close()


def test_latency_env_passes_check_env(monkeypatch):
    from gymnasium.utils.env_checker import check_env

    monkeypatch.setattr(lat, "latency_table", fixed_table)
    env = _make(target_latency_reduction=0.2, target_flops_reduction=0.2)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_latency_reduction": 0.0}, "target_latency_reduction must be None"),
        ({"target_latency_reduction": 1.5}, "target_latency_reduction must be None"),
        ({"target_latency_reduction": True}, "target_latency_reduction must be None"),
        ({"target_latency_reduction": "0.3"}, "target_latency_reduction must be None"),
        ({"latency_batch_size": 0}, "latency_batch_size must be None"),
        ({"latency_batch_size": 2.5}, "latency_batch_size must be None"),
        ({"target_latency_reduction": 0.99}, "cannot be reached"),
    ],
)
def test_latency_arguments_are_checked(monkeypatch, kwargs, match):
    monkeypatch.setattr(lat, "latency_table", fixed_table)
    with pytest.raises(ValueError, match=match):
        _make(**kwargs)


def test_records_check_the_latency_fields(monkeypatch):
    from autosculpt_env.records import EpisodeRecord

    monkeypatch.setattr(lat, "latency_table", fixed_table)
    env = _make(latency_batch_size=8)
    _episode(env, np.random.default_rng(3))
    d = json.loads(env.unwrapped.episode_record().to_json())
    env.close()
    EpisodeRecord.from_dict(d)
    for change, match in (
        ({"latency_table": "not hex!"}, "latency_table must be"),
        ({"latency_table": None}, "come together"),
        ({"metrics": {**d["metrics"], "latency_reduction": float("nan")}}, "finite"),
        ({"metrics": {**d["metrics"], "latency_ms": 1.0}}, "unknown keys"),
    ):
        with pytest.raises(ValueError, match=match):
            EpisodeRecord.from_dict({**d, **change})
    # a record without the latency fields (every record before them) still loads
    old = {k: v for k, v in d.items() if k != "latency_table"}
    old["metrics"] = {k: v for k, v in d["metrics"].items() if k != "latency_reduction"}
    old["env_kwargs"] = {k: v for k, v in d["env_kwargs"].items() if k != "latency_batch_size"}
    assert EpisodeRecord.from_dict(old).latency_table is None


def test_benchmark_table_stage_on_a_tiny_setting(tmp_path, monkeypatch, capsys):
    """``benchmarks/latency.py --table-only`` runs end to end (no timing asserted)."""
    import runpy
    from pathlib import Path

    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
    main = runpy.run_path(str(script))["main"]
    out = tmp_path / "table.json"
    argv = ["--table-only", "--dataset", "digits", "--models", "resnet20", "--levels", "0.5"]
    argv += ["--batch-sizes", "4", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert (row["model"], row["policy"], row["batch_size"]) == ("resnet20", "uniform level_0.5", 4)
    assert row["predicted"] > 0 and row["measured"] > 0
    assert row["table_error"] == pytest.approx(row["predicted"] / row["measured"] - 1.0)
    text = capsys.readouterr().out
    assert re.search(
        r"table on resnet20: median \|error\| [\d.]+ %, worst [-+][\d.]+ %, [01]/1 policies "
        r"within 10 %",
        text,
    ), text
