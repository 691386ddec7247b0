"""Smoke runs of the reference agents (CleanRL style: each agent is run as a program with a
tiny limit of reward evaluations on the digits twin of AutoSculpt-ResNet).

Each run is made once (module-scoped fixture) and checked twice: the best episode it writes
replays and lands in the FLOPs band, and the limit of reward evaluations is never exceeded.
The limit is set as the leaderboard sets it (in the agent's environment) and read back from
the env's ledger and the record's stamp, never from the agent's printout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from autosculpt_env.band import within_band
from autosculpt_env.evaluation_limit import LEDGER_ENV, MAX_ENV
from autosculpt_env.records import EpisodeRecord, replay

ROOT = Path(__file__).resolve().parents[1]
# the plain accuracy reward keeps these runs fast (the loop and the limit are what is
# tested); one run below keeps the id's own default reward (recovery)
COMMON = ["--env-id", "AutoSculpt-ResNet", "--dataset", "digits", "--no-progress", "--threads", "1"]
FAST = ["--evaluation", "accuracy"]

# (run id, agent file, extra arguments, limit, whether the agent must spend all of it)
RUNS = [
    ("ppo_mlp", "ppo_mlp", [], 8, True),  # 4 envs finish together: a multiple of 4 is spent
    ("ppo_mlp-partial", "ppo_mlp", [], 6, False),  # stops at 4 rather than overshoot to 8
    ("ddpg_amc", "ddpg_amc", ["--warmup-episodes", "3", "--batch-size", "16"], 6, True),
    ("random_search", "random_search", [], 6, True),
    ("uniform", "uniform", [], 6, False),  # the level mix, and pure levels inside the band
    ("greedy", "greedy", [], 6, True),  # too small for the table: weight-energy estimate
    ("greedy-table", "greedy", [], 25, False),  # one measured level per layer (ResNet-20 has ~21)
]
# every agent file is run: one not listed above runs with the common arguments, so a new
# agent is tested without an edit here
AGENTS = sorted(p.stem for p in (ROOT / "agents").glob("*.py"))
RUNS += [(name, name, [], 8, False) for name in AGENTS if name not in {r[1] for r in RUNS}]
DEFAULT_REWARD_RUN = ("random_search-default-reward", "random_search", [], 3, True)
RUNS = [(i, a, FAST + extra, b, s) for i, a, extra, b, s in RUNS] + [DEFAULT_REWARD_RUN]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")

    def run(spec):
        run_id, agent, extra, limit, _ = spec
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        env.update({MAX_ENV: str(limit), LEDGER_ENV: str(out / f"{run_id}.ledger.json")})
        cmd = [sys.executable, str(ROOT / "agents" / f"{agent}.py"), *COMMON, *extra]
        cmd += ["--max-reward-evaluations", str(limit), "--output-dir", str(out)]
        cmd += ["--run-name", run_id]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return run_id, (proc, out / run_id)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two single-threaded agents at a time
        return dict(pool.map(run, RUNS))


@pytest.mark.parametrize("run_id", [r[0] for r in RUNS])
def test_agent_writes_a_replayable_best_episode(runs, run_id):
    proc, run_dir = runs[run_id]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "best reward" in proc.stdout
    record = EpisodeRecord.load(run_dir / "best.json")
    info = replay(record)
    target = record.env_kwargs["target_flops_reduction"]
    assert record.env_kwargs["reward"] == "budget"
    expected = "recovery" if run_id == DEFAULT_REWARD_RUN[0] else "accuracy"
    assert record.env_kwargs["evaluation"] == expected
    assert record.metrics["flops_reduction"] >= target - 1e-12
    assert info["flops_reduction"] >= target - 1e-12
    tolerance = record.env_kwargs["band_tolerance"]
    assert within_band(record.metrics["flops_reduction"], target, tolerance)  # equal FLOPs
    assert list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("run_id", [r[0] for r in RUNS])
def test_agent_respects_the_evaluation_limit(runs, run_id):
    proc, run_dir = runs[run_id]
    _, _, _, limit, spends_all = next(r for r in RUNS if r[0] == run_id)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ledger = json.loads((run_dir.parent / f"{run_id}.ledger.json").read_text())
    used = ledger["used"]
    assert ledger["limit"] == limit and 0 < used <= limit
    if spends_all:
        assert used == limit
    record = EpisodeRecord.load(run_dir / "best.json")
    assert record.reward_evaluations["limit"] == limit
    assert 0 < record.reward_evaluations["used"] <= used
    # the env's progress curve ends at the best in-band reward, which the agent reported
    assert ledger["progress"][-1][1] == round(record.metrics["reward"], 6)
