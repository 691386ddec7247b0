"""The Ray backend of the leaderboard on the digits twin: one local Ray instance for the module
(2 CPUs), the same rows as the local backend, and a killed Ray sweep that resumes with no row
lost, redone or duplicated."""

from __future__ import annotations

import signal

import pytest
import ray
from conftest import sweep_killed_at_first_row

from autosculpt_env import leaderboard as lb

TASK = lb.Task("AutoSculpt-ResNet", 0.5)
AGENTS = ["random_search", "uniform"]
# 8 evaluations: a random episode on the digits twin ends inside the FLOPs band about half
# the time (55 % of 100 under seed 1, 57 % under seed 2), so 4 left a row without an answer
# for some seeds (seed 2's, on the twin a fresh machine trained on 2026-12-08)
OPTIONS = dict(max_reward_evaluations=8, dataset="digits", finetune_epochs=1, finetune_samples=64)
# what differs between two runs of the same row: timings (the measured speedup too), dates,
# where the runs were
VOLATILE = ("search_seconds", "score_seconds", "speedup", "created", "command", "_path")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def test_ray_backend_writes_the_rows_of_the_local_backend(cluster, tmp_path):
    protocol = lb.make_protocol(seeds=[1], **OPTIONS)
    rows = {}
    for backend in ("local", "ray"):
        result = lb.run_all(
            protocol,
            [TASK],
            AGENTS,
            tmp_path / backend / "rows",
            tmp_path / backend / "runs",
            progress=False,
            backend=backend,
        )
        assert not result["failed"] and len(result["done"]) == 2, result
        rows[backend] = {
            r["row_id"]: _comparable(r) for r in lb.load_rows(tmp_path / backend / "rows")
        }
    assert rows["ray"] == rows["local"]
    assert all(v["ok"] for v in lb.validate(lb.load_rows(tmp_path / "ray" / "rows")))


def test_killed_ray_sweep_resumes_with_no_row_lost_or_duplicated(cluster, tmp_path):
    seeds = [1, 2]
    paths = {"rows_dir": tmp_path / "rows", "work_dir": tmp_path / "runs"}
    argv = ["--tasks", TASK.name, "--agents", *AGENTS, "--seeds", *map(str, seeds)]
    argv += ["--max-reward-evaluations", str(OPTIONS["max_reward_evaluations"])]
    argv += ["--dataset", OPTIONS["dataset"]]
    argv += ["--finetune-epochs", "1", "--finetune-samples", "64", "--no-progress"]
    argv += ["--backend", "ray", "--address", cluster]
    argv += ["--rows-dir", str(paths["rows_dir"]), "--work-dir", str(paths["work_dir"])]
    argv += ["--output", str(tmp_path / "LB.md"), "--plots-dir", str(tmp_path / "plots")]
    after_kill, code, out = sweep_killed_at_first_row(argv, paths["rows_dir"], 300)
    assert code == -signal.SIGKILL, f"the sweep ended before the kill:\n{out[-3000:]}"
    assert after_kill, out[-3000:]

    protocol = lb.make_protocol(seeds=seeds, **OPTIONS)
    resumed = lb.run_all(
        protocol,
        [TASK],
        AGENTS,
        paths["rows_dir"],
        paths["work_dir"],
        progress=False,
        backend="ray",
    )
    expected = {lb.row_id(TASK, a, s) for a in AGENTS for s in seeds}
    assert not resumed["failed"], resumed["failed"]
    # a task of the killed driver may finish its row after the kill (Ray ends a dead
    # driver's tasks within seconds): it is kept, not redone; nothing else is
    assert {n[:-5] for n in after_kill} <= set(resumed["skipped"])
    assert set(resumed["done"]).isdisjoint(resumed["skipped"])
    assert set(resumed["done"]) | set(resumed["skipped"]) == expected
    for name, text in after_kill.items():  # rows written before the kill are left alone
        assert (paths["rows_dir"] / name).read_text() == text
    assert sorted(p.name for p in paths["rows_dir"].iterdir()) == sorted(
        f"{e}.json" for e in expected
    )
    rows = lb.load_rows(paths["rows_dir"])
    assert all(lb.check_row(r)[0] == [] for r in rows)


def test_ray_sweep_with_a_time_budget_starts_only_what_the_cluster_runs_at_once(cluster, tmp_path):
    protocol = lb.make_protocol(seeds=[1, 2, 3], **OPTIONS)
    result = lb.run_all(
        protocol,
        [TASK],
        ["uniform"],
        tmp_path / "rows",
        tmp_path / "runs",
        progress=False,
        backend="ray",
        time_budget=0.5,
    )
    # two CPUs, one thread a run: two rows start at once and finish; the third waits for a
    # budget already spent, and is left for the next sitting
    ids = [lb.row_id(TASK, "uniform", s) for s in (1, 2, 3)]
    assert sorted(result["done"]) == ids[:2] and result["left"] == ids[2:], result
    assert sorted(r["row_id"] for r in lb.load_rows(tmp_path / "rows")) == ids[:2]
