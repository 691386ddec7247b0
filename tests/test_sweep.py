"""A sweep run in parts on the digits twin: with a time budget no row starts once it is spent,
the rows running then finish and are written, and the same sweep without a budget continues
with no row lost or run twice; a row names the checkout its agent ran from."""

from __future__ import annotations

import argparse

import pytest

from autosculpt_env import leaderboard as lb
from autosculpt_env.leaderboard import run as run_module
from autosculpt_env.leaderboard.sweep import parse_duration

TASK = lb.Task("AutoSculpt-ResNet", 0.5)
OPTIONS = dict(max_reward_evaluations=2, dataset="digits", finetune_epochs=1, finetune_samples=64)


def _ids(seeds):
    return [lb.row_id(TASK, "uniform", s) for s in seeds]


def test_one_job_starts_no_row_past_the_budget_and_rows_name_their_checkout(tmp_path, monkeypatch):
    runs = tmp_path / "runs"

    def checkout(root=None):  # what `git` would say before and after an agent ran
        searched = any((runs / "search").glob("*/best.json"))
        return ("after-a-search", True) if searched else ("at-start", False)

    monkeypatch.setattr(run_module, "git_commit", checkout)
    protocol = lb.make_protocol(seeds=[1, 2], **OPTIONS)
    # a row takes seconds; the budget is spent once the first one is done
    result = lb.run_all(
        protocol, [TASK], ["uniform"], tmp_path / "rows", runs, progress=False, time_budget=0.5
    )
    assert result["done"] == _ids([1]) and result["left"] == _ids([2]), result
    [row] = lb.load_rows(tmp_path / "rows")
    # the commit the agent started from, not what the checkout became while it ran
    assert (row["git_commit"], row["git_dirty"]) == ("at-start", False)


def test_parallel_sweep_stops_in_parts_and_resumes(tmp_path):
    protocol = lb.make_protocol(seeds=[1, 2, 3], **OPTIONS)
    paths = (tmp_path / "rows", tmp_path / "runs")
    first = lb.run_all(
        protocol, [TASK], ["uniform"], *paths, jobs=2, progress=False, time_budget=0.5
    )
    # two rows start at once; both finish; the third is not started
    assert sorted(first["done"]) == _ids([1, 2]) and first["left"] == _ids([3]), first
    assert not first["failed"]
    rest = lb.run_all(protocol, [TASK], ["uniform"], *paths, jobs=2, progress=False)
    assert rest["done"] == _ids([3]) and sorted(rest["skipped"]) == _ids([1, 2])
    assert rest["left"] == [] and not rest["failed"]
    assert sorted(r["row_id"] for r in lb.load_rows(paths[0])) == _ids([1, 2, 3])


def test_durations(tmp_path):
    assert [parse_duration(t) for t in ("90", "90s", "45m", "2h", "0.5h")] == [
        90,
        90,
        2700,
        7200,
        1800,
    ]
    for bad in ("0", "-1h", "2x", "h", "", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="duration"):
            parse_duration(bad)
    rows = tmp_path / "rows"
    with pytest.raises(ValueError, match="positive"):
        lb.run_all(lb.make_protocol(seeds=[1], **OPTIONS), [TASK], ["uniform"], rows, time_budget=0)
    assert not rows.exists()  # refused before anything was made
