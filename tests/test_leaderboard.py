"""The leaderboard harness end to end on the digits twin of AutoSculpt-ResNet.

Two agents (random search, uniform) x two seeds, a limit of 5 reward evaluations and a
one-epoch fine-tune on 256 images (the full track's protocol, made small). The harness is
started as a program, killed as soon as its first row is written, and resumed: no row may be
lost, redone or duplicated, and every row must validate by replay. The committed rows of the
first leaderboard (schema 1) must keep passing the row checks and render.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import sweep_killed_at_first_row

from autosculpt_env import cli
from autosculpt_env import leaderboard as lb

ROOT = Path(__file__).resolve().parents[1]
TASK = "AutoSculpt-ResNet@0.5"
AGENTS = ["random_search", "uniform"]
SEEDS = [1, 2]
OPTIONS = dict(
    tasks=[TASK],
    agents=AGENTS,
    seeds=SEEDS,
    max_reward_evaluations=5,
    dataset="digits",
    finetune_epochs=1,
    finetune_samples=256,
)


def _argv(opts: dict, paths: dict) -> list[str]:
    argv = ["--tasks", *opts["tasks"], "--agents", *opts["agents"]]
    argv += ["--seeds", *map(str, opts["seeds"])]
    argv += ["--max-reward-evaluations", str(opts["max_reward_evaluations"])]
    argv += ["--dataset", opts["dataset"], "--finetune-epochs", str(opts["finetune_epochs"])]
    argv += ["--finetune-samples", str(opts["finetune_samples"]), "--no-progress"]
    for key in ("rows_dir", "work_dir", "output", "plots_dir"):
        argv += [f"--{key.replace('_', '-')}", str(paths[key])]
    return argv


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("leaderboard")
    paths = {
        "rows_dir": root / "rows",
        "work_dir": root / "runs",
        "output": root / "LEADERBOARD.md",
        "plots_dir": root / "plots",
    }
    rows_after_kill, code, out = sweep_killed_at_first_row(
        _argv(OPTIONS, paths), paths["rows_dir"], 240
    )
    assert rows_after_kill, f"no row appeared before the harness ended (rc {code}):\n{out[-3000:]}"
    killed_early = code == -signal.SIGKILL

    protocol = lb.make_protocol(
        OPTIONS["max_reward_evaluations"],
        SEEDS,
        OPTIONS["dataset"],
        finetune_epochs=OPTIONS["finetune_epochs"],
        finetune_samples=OPTIONS["finetune_samples"],
    )
    resumed = lb.run_all(
        protocol,
        [lb.Task.parse(TASK)],
        AGENTS,
        paths["rows_dir"],
        paths["work_dir"],
        progress=False,
    )
    yield {
        "paths": paths,
        "protocol": protocol,
        "rows_after_kill": rows_after_kill,
        "killed_early": killed_early,
        "resumed": resumed,
        "rows": lb.load_rows(paths["rows_dir"]),
    }
    torch.set_num_threads(threads)


def test_kill_and_resume_loses_and_duplicates_nothing(board):
    assert board["killed_early"], "the harness finished before it could be killed"
    rows_dir = board["paths"]["rows_dir"]
    expected = {lb.row_id(lb.Task.parse(TASK), a, s) for a in AGENTS for s in SEEDS}
    assert not board["resumed"]["failed"], board["resumed"]["failed"]
    # the rows written before the kill were skipped, not redone, and are unchanged
    assert set(board["resumed"]["skipped"]) == {n[:-5] for n in board["rows_after_kill"]}
    assert set(board["resumed"]["done"]).isdisjoint(board["resumed"]["skipped"])
    for name, text in board["rows_after_kill"].items():
        assert (rows_dir / name).read_text() == text
    rows = board["rows"]
    assert sorted(r["row_id"] for r in rows) == sorted(expected)
    assert len({(r["task"], r["agent"], r["seed"]) for r in rows}) == len(expected)
    assert sorted(p.name for p in rows_dir.iterdir()) == sorted(f"{e}.json" for e in expected)
    # resuming a complete table runs nothing
    again = lb.run_all(
        board["protocol"],
        [lb.Task.parse(TASK)],
        AGENTS,
        rows_dir,
        board["paths"]["work_dir"],
        progress=False,
    )
    assert again["done"] == [] and len(again["skipped"]) == len(expected)


def test_rows_hold_the_protocols_facts(board):
    for r in board["rows"]:
        assert r["schema"] == lb.ROW_SCHEMA == 2 and r["track"] == "custom"
        assert r["max_reward_evaluations"] == 5 and 0 < r["reward_evaluations"] <= 5
        # the env's count, written by the env into the record, not the agent's word
        assert r["record"]["reward_evaluations"] == {"used": r["found_at_evaluation"], "limit": 5}
        assert r["dataset"] == "digits" and r["target"] == 0.5
        assert 0.5 <= r["flops_reduction"] <= 0.55  # inside the FLOPs band
        assert r["score"] == r["test_accuracy"] and r["dense_score"] == r["dense_test_accuracy"]
        assert len(r["policy"]) == len(r["record"]["layers"]) == 21
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["dense_test_accuracy"] > 0.9
        assert r["reward_accuracy"] == r["record"]["metrics"]["accuracy"]
        assert r["reward_accuracy_measured"] == pytest.approx(r["reward_accuracy"], abs=1e-3)
        assert r["search_seconds"] > 0 and r["score_seconds"] > 0
        assert r["version"] and r["protocol_key"] == board["protocol"].key()
        assert r["finetune_samples"] == 256 and r["finetune_recipe"]["epochs"] == 1
        assert r["progress"] and r["progress"][-1][0] <= r["reward_evaluations"]
        assert r["progress"][-1][1] == pytest.approx(r["reward"], abs=1e-6)
        model_dir = board["paths"]["work_dir"] / "models" / r["row_id"]
        assert (model_dir / "masks.safetensors").exists()


def test_all_rows_validate_by_replay(board):
    results = lb.validate(board["rows"])
    assert all(v["ok"] for v in results), results


def test_validate_replays_each_row_with_its_own_threads(board, monkeypatch):
    """A row is replayed with its protocol's threads (a replay with others can fail a
    correct row), unless the caller overrides them; the caller's threads come back."""
    from autosculpt_env.leaderboard import rows as rows_module

    seen, reported = [], []

    def spy(record, **kw):
        seen.append((torch.get_num_threads(), len(reported)))
        return real(record, **kw)

    real = rows_module.replay
    monkeypatch.setattr(rows_module, "replay", spy)
    one = next(r for r in board["rows"] if r["agent"] == "uniform")
    two = json.loads(json.dumps(one))
    two["protocol"]["threads"] = 2  # not in the protocol key: still the same protocol
    before = torch.get_num_threads()
    results = lb.validate([one, two], on_row=reported.append)
    # each row's result is reported before the next row is replayed
    assert seen == [(1, 0), (2, 1)] and reported == results
    assert [v["errors"] for v in results] == [[], []]
    assert lb.validate([two], threads=1)[0]["ok"] and seen[2][0] == 1
    assert torch.get_num_threads() == before


def test_validate_command_warns_when_threads_override_the_rows(board, capsys):
    path = board["paths"]["rows_dir"] / f"{TASK}__uniform__seed1.json"
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    assert out.out.splitlines() == [f"OK   {TASK}__uniform__seed1", "1/1 rows validate"]
    assert cli.main(["validate", "--threads", "2", str(path)]) == 0  # digits: still within
    err = capsys.readouterr().err
    assert "--threads 2" in err and "made with [1] thread(s)" in err


def test_render_and_plot(board, tmp_path):
    md = lb.render(board["rows"])
    assert f"### {TASK}" in md and "## Track `custom`" in md
    for agent in AGENTS:
        assert f"| {agent} |" in md
    # uniform's mean is the 0 of the normalised scale (its seeds fine-tune differently, so
    # its runs spread around it); random search has no probability of beating itself
    assert "| uniform | 0.00 [" in md and "| 0.00 |" in md
    assert "P(beats random_search)" in md and "| random_search |" in md.split("| agent |")[1]
    paths = lb.plot(board["rows"], tmp_path)
    assert [p.name for p in paths] == ["profile.png", "pareto.png", "progress.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # the killed harness never rendered; --only-render writes both from the rows alone
    out = tmp_path / "LB.md"
    code = cli.main(
        ["leaderboard", "--only-render", "--rows-dir", str(board["paths"]["rows_dir"])]
        + ["--output", str(out), "--plots-dir", str(tmp_path / "plots")]
    )
    assert code == 0
    assert out.read_text().strip() == lb.render(board["rows"], tmp_path / "plots", out).strip()
    folder = f"custom-{board['protocol'].key()}"  # a custom protocol's plots, by its key
    assert (tmp_path / "plots" / folder / "pareto.png").exists()
    assert f"](plots/{folder}/profile.png)" in out.read_text()


def test_file_options_take_none_and_a_missing_readme_is_refused_first(board, tmp_path, capsys):
    rows_dir = str(board["paths"]["rows_dir"])
    # None (any case) writes no table, no plots and no README block
    argv = ["leaderboard", "--only-render", "--rows-dir", rows_dir]
    code = cli.main(argv + ["--output", "None", "--plots-dir", "none", "--readme", "None"])
    assert code == 0
    assert "wrote" not in capsys.readouterr().out
    assert not any(Path(p).exists() for p in ("None", "none"))
    # a README that does not exist is named before anything is written
    out = tmp_path / "LB.md"
    missing = tmp_path / "READMY.md"
    code = cli.main(argv + ["--output", str(out), "--plots-dir", "None", "--readme", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--readme {missing}: no such file" in err and "None for no README" in err
    assert not out.exists()
    # an existing file gets the standings block
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- leaderboard:start (generated by test) -->\nold\n<!-- leaderboard:end -->\n"
    )
    code = cli.main(argv + ["--output", str(out), "--plots-dir", "None", "--readme", str(readme)])
    assert code == 0 and out.exists()
    assert "old" not in readme.read_text() and readme.read_text().startswith("intro\n")


def test_committed_first_leaderboard_rows_still_check_and_render():
    rows = lb.load_rows(ROOT / "benchmarks" / "rows")
    assert len(rows) >= 90 and {r["schema"] for r in rows} == {1}
    assert all(lb.check_row(r)[0] == [] for r in rows)
    md = lb.render(rows)
    assert "## First leaderboard (schema-1 rows" in md and "### Across tasks" in md
    # five tasks, six agents: every agent aggregated over all five tasks
    agg = lb.aggregate(rows)
    assert len(agg) == 6 and all(e["tasks"] == 5 and e["runs"] == 15 for e in agg)
    # normalised against its own mean per task, uniform's mean normalised score is 0
    assert abs(next(e for e in agg if e["agent"] == "uniform")["mean"]) < 1e-9


def test_rows_of_two_protocols_share_ids_but_one_protocol_stores_a_row_once(board, tmp_path):
    # the first leaderboard's ResNet DDPG-AMC seed 1 and a custom protocol's row of the same
    # (task, agent, seed) are two rows; both load and render, each in its own table
    first = ROOT / "benchmarks" / "rows" / "AutoSculpt-ResNet@0.5__ddpg_amc__seed1.json"
    row = dict(board["rows"][0])
    row.pop("_path")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "a.json").write_text(
        json.dumps(dict(row, row_id=json.loads(first.read_text())["row_id"]))
    )
    both = lb.load_rows([first, twin])
    assert len(both) == 2 and len({r["protocol_key"] for r in both}) == 2
    md = lb.render(both)
    assert "## First leaderboard" in md and board["protocol"].key() in md
    # the same row of the same protocol twice is refused, naming both files
    (twin / "b.json").write_text(json.dumps(dict(row, row_id=both[1]["row_id"])))
    with pytest.raises(ValueError, match=r"stored twice: .*a\.json and .*b\.json"):
        lb.load_rows(twin)


def test_validate_command_fails_on_a_tampered_row(board, tmp_path, capsys):
    row = dict(board["rows"][0])
    row.pop("_path")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(row))
    assert cli.main(["validate", str(good)]) == 0

    bad = dict(row, test_accuracy=row["test_accuracy"], flops_reduction=0.99)
    (tmp_path / "summary.json").write_text(json.dumps(bad))
    assert cli.main(["validate", str(tmp_path / "summary.json")]) == 1

    # a consistent forgery (row and record agree) is caught by the replay
    record = json.loads(json.dumps(row["record"]))
    record["metrics"]["accuracy"] += 0.05
    forged = dict(row, record=record, reward_accuracy=record["metrics"]["accuracy"])
    forged["reward"] = record["metrics"]["reward"] = record["metrics"]["accuracy"]
    forged["progress"] = [list(p) for p in row["progress"]]
    forged["progress"][-1][1] = round(forged["reward"], 6)  # the curve agrees too
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert cli.main(["validate", str(tmp_path / "forged.json")]) == 1
    assert "accuracy: recorded" in capsys.readouterr().out  # caught by the replay


def test_a_rows_dir_holds_one_protocol(board, tmp_path):
    other = lb.make_protocol(max_reward_evaluations=7, seeds=SEEDS, dataset="digits")
    with pytest.raises(ValueError, match="another protocol"):
        lb.run_all(
            other,
            [lb.Task.parse(TASK)],
            AGENTS,
            board["paths"]["rows_dir"],
            tmp_path,
            progress=False,
        )
    # nor rows of the first leaderboard's schema, even under the same protocol key
    first = lb.load_rows(ROOT / "benchmarks" / "rows")
    old = lb.Protocol.from_dict(first[0]["protocol"])
    with pytest.raises(ValueError, match="schema 1"):
        lb.run_all(
            old,
            [lb.Task.parse(TASK)],
            AGENTS,
            ROOT / "benchmarks" / "rows",
            tmp_path,
            progress=False,
        )


def test_tasks_and_protocol():
    assert [t.name for t in lb.TASKS] == [
        "AutoSculpt-ResNet@0.5",
        "AutoSculpt-VGG@0.5",
        "AutoSculpt-MobileNet@0.5",
        "AutoSculpt-ViT@0.5",
        "AutoSculpt-ResNet@0.7",
    ]
    assert lb.Task.parse("AutoSculpt-VGG") == lb.Task("AutoSculpt-VGG", 0.5)
    with pytest.raises(ValueError):
        lb.Task.parse("AutoSculpt-VGG@1.5")
    p = lb.Protocol(max_reward_evaluations=10, seeds=(1, 2))
    assert lb.Protocol.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert (
        lb.Protocol(max_reward_evaluations=10, seeds=(3,)).key() == p.key()
    )  # seeds can be added later
    assert lb.Protocol(max_reward_evaluations=11).key() != p.key()
    assert lb.Protocol(max_reward_evaluations=10, flops_band=0.05).key() != p.key()
    # the tracks: fixed protocols with their keys, the sizes the issue asks for
    fast, full = lb.TRACKS["fast"], lb.TRACKS["full"]
    assert fast.max_reward_evaluations >= 1000 and len(fast.seeds) >= 10 and not fast.finetunes
    assert full.finetunes and len(full.seeds) >= 5 and fast.key() != full.key()
    assert lb.make_protocol(track="fast").key() == fast.key()
    assert lb.track_of(lb.make_protocol(track="full", threads=2)) == "full"  # not in the key
    assert lb.track_of(lb.make_protocol(track="full", max_reward_evaluations=7)) == "custom"
    for large in ("fast-large", "full-large"):
        assert lb.TRACKS[large].max_reward_evaluations > lb.TRACKS[large[:4]].max_reward_evaluations
    with pytest.raises(FileNotFoundError, match="no agent"):
        lb.agent_script("no_such_agent")


def test_one_argument_definition_for_both_front_ends():
    """`autosculpt leaderboard` and `benchmarks/leaderboard.py` take the same options."""
    import argparse
    import runpy

    def options(parser):
        return sorted(s for a in parser._actions for s in a.option_strings)

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    script = runpy.run_path(str(ROOT / "benchmarks" / "leaderboard.py"))["main"]
    with pytest.raises(SystemExit) as e:
        script(["--help"])
    assert e.value.code == 0
    standalone = argparse.ArgumentParser()
    lb.add_arguments(standalone)
    assert options(sub.choices["leaderboard"]) == options(standalone)
    assert {"--track", "--backend", "--address", "--agents-dir"} <= set(options(standalone))


def test_a_sweep_never_writes_a_row_twice(tmp_path):
    """A row file appears whole or not at all, and the first one written is kept."""
    assert lb.write_row(tmp_path, {"row_id": "r", "v": 1}, exclusive=True) == tmp_path / "r.json"
    assert lb.write_row(tmp_path, {"row_id": "r", "v": 2}, exclusive=True) is None
    assert json.loads((tmp_path / "r.json").read_text())["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_rows_carry_the_measured_speedup_as_a_column(board):
    """Each row has its materialised network's measured speedup (not part of the score),
    checked for consistency; older rows without it still check and render with '–'."""
    import re

    from autosculpt_env.latency import SPEEDUP_FIELDS

    for r in board["rows"]:
        s = r["speedup"]
        assert set(s) == set(SPEEDUP_FIELDS)
        assert (s["batch_size"], s["threads"]) == (256, 1) and s["speedup"] > 0
        assert s["speedup"] == pytest.approx(s["dense_s"] / s["materialised_s"])
    md = lb.render(board["rows"])
    assert "| FLOPs reduction (%) | measured speedup |" in md
    ranked = [line for line in md.splitlines() if re.match(r"\| [12] \| ", line)]
    assert len(ranked) == 2 and all(re.search(r"\| \d+\.\d\dx \|", line) for line in ranked)

    row = {k: v for k, v in board["rows"][0].items() if k != "_path"}
    assert lb.check_row(row)[0] == []
    assert lb.check_row({**row, "speedup": None})[0] == []  # could not be materialised
    old = {k: v for k, v in row.items() if k != "speedup"}  # a row from before the column
    assert lb.check_row(old)[0] == []
    assert "| – |" in lb.render([old])
    for bad, match in (
        ({**row["speedup"], "speedup": 2 * row["speedup"]["speedup"]}, "dense_s / materialised_s"),
        ({**row["speedup"], "dense_s": -1.0}, "positive number"),
        ({**row["speedup"], "threads": 0}, "integer >= 1"),
        ({k: v for k, v in row["speedup"].items() if k != "machine"}, "an object with"),
        ("fast", "speedup must be object or null"),
    ):
        errors = lb.check_row({**row, "speedup": bad})[0]
        assert any(match in e for e in errors), (bad, errors)
