"""Adding things takes one place: a zoo model, a catalog; the package and its generated docs
follow from the registries."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import pytest
import torch
from gymnasium.envs.registration import registry
from torch import nn

import autosculpt_env
from autosculpt_env import docs, models, zoo
from autosculpt_env.cli import info_dict
from autosculpt_env.patterns import CATALOGS, Catalog, get_catalog, register_catalog
from autosculpt_env.records import replay


class TinyNet(nn.Module):
    """A new architecture, as a module of autosculpt_env.models would declare it."""

    def __init__(self, in_channels=1, num_classes=10, image_size=8, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    monkeypatch.setitem(models.ARCHITECTURES, "tinynet", TinyNet)
    entry = zoo.ZooEntry("tinynet", "digits", "tinynet", {"width": 8}, {"epochs": 2, "lr": 0.05})
    model = zoo.ZooModel("tinynet", "AutoSculpt-TinyNet", "TinyNet", (entry,))
    yield zoo.register_model(model)
    del zoo.ZOO["tinynet"], zoo.ENTRIES[("tinynet", "digits")]
    del autosculpt_env.REGISTERED_CONFIGS["AutoSculpt-TinyNet"]
    registry.pop("AutoSculpt-TinyNet")


def test_a_new_zoo_model_is_one_registration(tiny_model):
    assert "AutoSculpt-TinyNet" in registry
    assert autosculpt_env.registered_configs()["AutoSculpt-TinyNet"]["model"] == "tinynet"
    info = info_dict()
    assert info["envs"]["AutoSculpt-TinyNet"]["model"] == "tinynet"
    assert any(m["model"] == "tinynet" for m in info["zoo"])
    assert "`AutoSculpt-TinyNet`" in docs.envs_block()
    env = gym.make("AutoSculpt-TinyNet", dataset="digits")  # trains on first use
    assert env.unwrapped.layer_names == ["conv", "fc1"]  # the classifier fc2 stays dense
    obs, info = env.reset(seed=0)
    done = False
    while not done:
        assert env.observation_space.contains(obs)
        obs, _, done, _, info = env.step(int(info["action_mask"].nonzero()[0][-1]))
    assert info["flops_reduction"] >= 0.5 and 0 <= info["accuracy"] <= 1
    with pytest.raises(ValueError, match="taken"):
        zoo.register_model(zoo.ZooModel("other", "AutoSculpt-TinyNet", "Other", ()))


def _halves() -> Catalog:
    dense = get_catalog("structured").actions[0]
    half = get_catalog("structured").actions[5]
    return Catalog("halves", (dense, half), "dense, or half of the output channels")


@pytest.fixture
def no_halves():
    yield
    CATALOGS.pop("halves", None)


def test_a_new_catalog_is_one_registration(no_halves):
    register_catalog(_halves())
    env = gym.make("AutoSculpt-ResNet", dataset="digits", catalog="halves")
    assert env.action_space.n == 2 and env.unwrapped.action_names == ["level_0.0", "level_0.5"]
    assert info_dict()["catalogs"]["halves"]["actions"] == ["level_0.0", "level_0.5"]
    assert "`halves`" in docs.catalogs_block()
    with pytest.raises(ValueError, match="built-in"):
        register_catalog(Catalog("structured", (get_catalog("structured").actions[0],)))


def test_a_catalog_object_survives_into_its_records(no_halves):
    env = gym.make("AutoSculpt-ResNet", dataset="digits", catalog=_halves())
    record = env.unwrapped.episode_record([1] * env.unwrapped.num_layers)
    assert record.env_kwargs["catalog"] == "halves"
    replay(record)  # the env registered it under its name
    CATALOGS.pop("halves")  # as in a new process
    with pytest.raises(ValueError, match="register_catalog"):
        replay(record)
    register_catalog(_halves())
    replay(record)


def test_a_new_agent_is_one_file(tmp_path, monkeypatch):
    from autosculpt_env.leaderboard import agents as agents_mod
    from autosculpt_env.leaderboard import cli as lb_cli

    (tmp_path / "agents").mkdir()
    for name in ("my_search.py", "ppo_gnn.py", "_shared.py", "notes.txt"):
        (tmp_path / "agents" / name).write_text("")
    monkeypatch.setattr(agents_mod, "checkout_root", lambda: tmp_path)
    assert agents_mod.reference_agents() == ("my_search", "ppo_gnn")
    monkeypatch.setattr(agents_mod, "checkout_root", lambda: None)  # an installed package
    assert agents_mod.reference_agents() == ()
    monkeypatch.setattr(lb_cli, "AGENTS", ())
    with pytest.raises(SystemExit, match="--agents: no agents named"):
        lb_cli.main(["--track", "full", "--rows-dir", str(tmp_path / "rows")])


def test_the_package_imports_light_and_loads_submodules_on_use():
    code = (
        "import sys, autosculpt_env; assert 'torch' not in sys.modules, 'torch at import'; "
        "print(tuple(autosculpt_env.data.load('digits', 'reward').images.shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(120, 1, 8, 8)"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        autosculpt_env.nothing  # noqa: B018


@pytest.mark.parametrize("path", [docs.README, docs.SUBMITTING], ids=["README", "SUBMITTING"])
def test_reference_tables_are_generated(path):
    stale = docs.stale_blocks(path)
    assert not stale, (
        f"{path.name} blocks {stale} are out of date: run python -m autosculpt_env.docs"
    )


def test_track_table_follows_the_protocols(monkeypatch):
    from dataclasses import replace

    from autosculpt_env.leaderboard import protocol

    tracks = dict(protocol.TRACKS)
    tracks["full"] = replace(tracks["full"], max_reward_evaluations=40, seeds=(1, 2, 3, 9))
    monkeypatch.setattr(protocol, "TRACKS", tracks)
    assert "| `full` | the env's default reward (`evaluation=recovery`) | 40 | 1–3, 9 |" in (
        docs.tracks_block()
    )
    assert docs.stale_blocks(docs.SUBMITTING) == ["tracks"]


def test_docs_check_command(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "".join(f"<!-- {n}:start (x) -->\nold\n<!-- {n}:end -->\n" for n in docs.BLOCKS)
    )
    assert docs.main(["--readme", str(readme), "--check"]) == 1
    assert docs.main(["--readme", str(readme)]) == 0
    assert docs.main(["--readme", str(readme), "--check"]) == 0
    assert json.dumps(docs.stale_blocks(readme)) == "[]"
