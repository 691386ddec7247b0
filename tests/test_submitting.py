"""docs/SUBMITTING.md, tested: an agent that is not one of ours (examples/my_agent.py) runs
through the harness on the digits twin, on both tracks' protocols made small, and its rows
validate; agents are found by path, search path or entry point, or refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import surrogate_store

from autosculpt_env import leaderboard as lb
from autosculpt_env.leaderboard import agents as agents_mod

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_agent.py"
TASK = lb.Task("AutoSculpt-ResNet", 0.5)


@pytest.mark.parametrize(
    "track, options",
    [
        ("full", dict(max_reward_evaluations=6, finetune_epochs=1, finetune_samples=64)),
        ("fast", dict(max_reward_evaluations=30)),
    ],
)
def test_example_agent_on_both_tracks(track, options, tmp_path, monkeypatch):
    from autosculpt_env import surrogate

    # the digits twin's surrogate fits from stored evaluations; the agents inherit the variable
    monkeypatch.setenv(surrogate.STORE_ENV, str(surrogate_store(tmp_path)))
    protocol = lb.make_protocol(track=track, seeds=[1], dataset="digits", **options)
    result = lb.run_all(
        protocol, [TASK], [str(EXAMPLE)], tmp_path / "rows", tmp_path / "runs", progress=False
    )
    assert not result["failed"], result["failed"]
    [row] = lb.load_rows(tmp_path / "rows")
    assert row["agent"] == "my_agent" and row["track"] == "custom"
    assert (
        row["reward_evaluations"] == options["max_reward_evaluations"]
    )  # the env's count, from its ledger
    assert 0.5 <= row["flops_reduction"] <= 0.55
    if track == "fast":  # scored by the high-fidelity reward: no fine-tuning, no test split
        assert row["record"]["env_kwargs"]["evaluation"] == lb.FAST.evaluation
        assert row["test_accuracy"] is None and row["finetune_recipe"] is None
        assert len(row["search_reward"]["sha256"]) == 64  # the surrogate the search saw
        # the dense reference is the one that surrogate stores (the same on every machine),
        # and a row claiming another is refused
        assert row["dense_score"] == row["dense_reward_accuracy"]
        forged = dict(row, dense_score=row["dense_score"] - 0.01)
        assert any(e.startswith("dense_score") for e in lb.validate([forged])[0]["errors"])
    else:
        assert row["score"] == row["test_accuracy"] and row["search_reward"] is None
    assert [v["errors"] for v in lb.validate([row])] == [[]]
    assert "### AutoSculpt-ResNet@0.5" in lb.render([row])
    if track == "fast":  # rows searched on another surrogate never share the folder
        path = Path(row.pop("_path"))
        path.write_text(
            json.dumps(dict(row, search_reward={**row["search_reward"], "sha256": "0" * 64}))
        )
        with pytest.raises(ValueError, match="another surrogate"):
            lb.run_all(protocol, [TASK], [str(EXAMPLE)], tmp_path / "rows", tmp_path / "runs")


def test_agents_are_found_by_search_path(tmp_path, monkeypatch):
    folder = tmp_path / "more_agents"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_agent.py")
    with pytest.raises(FileNotFoundError, match="no agent 'my_agent'"):
        lb.find_agent("my_agent")
    assert lb.find_agent("my_agent", [folder]).argv == (str(folder / "my_agent.py"),)
    monkeypatch.setenv(agents_mod.AGENTS_PATH_ENV, str(folder))
    assert lb.agent_script("my_agent") == folder / "my_agent.py"
    # a path to a script works from anywhere
    assert lb.find_agent(str(EXAMPLE)).name == "my_agent"


def test_agents_are_found_by_entry_point(monkeypatch):
    class EntryPoint:
        name, value = "climber", "my_package.climber:main"

    monkeypatch.setattr(
        "importlib.metadata.entry_points",
        lambda group: [EntryPoint()] if group == lb.ENTRY_POINT_GROUP else [],
    )
    program = lb.find_agent("climber")
    assert program.argv == ("-m", "my_package.climber") and program.script is None


def test_an_installed_package_is_told_where_the_agents_are(monkeypatch):
    monkeypatch.setattr(agents_mod, "checkout_root", lambda: None)  # no source checkout
    monkeypatch.delenv(agents_mod.AGENTS_PATH_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        lb.find_agent("ppo_gnn")
    message = str(e.value)
    assert "--agents-dir" in message and agents_mod.AGENTS_PATH_ENV in message
    assert lb.find_agent("ppo_gnn", [ROOT / "agents"]).script == ROOT / "agents" / "ppo_gnn.py"


def test_an_agent_that_changes_its_env_is_refused(tmp_path):
    """An agent that builds its env with another keyword (here a wider FLOPs band) gets no row."""
    cheat = tmp_path / "wide_band.py"
    cheat.write_text(
        "import functools, runpy, gymnasium as gym\n"
        "gym.make = functools.partial(gym.make, band_tolerance=0.3)\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    protocol = lb.make_protocol(
        seeds=[1], dataset="digits", max_reward_evaluations=4, finetune_samples=64
    )
    result = lb.run_all(
        protocol, [TASK], [str(cheat)], tmp_path / "rows", tmp_path / "runs", progress=False
    )
    [error] = result["failed"].values()
    assert "env keyword band_tolerance=0.3, the task's is 0.05" in error
    assert not list((tmp_path / "rows").glob("*.json"))
