"""Does PPO-GNN learn? On the digits twin of AutoSculpt-ResNet with the plain accuracy reward
(milliseconds per evaluation there), its best reward after a small fixed number of reward
evaluations beats random search's after as many, on average over 3 seeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_REWARD_EVALUATIONS = 200
SEEDS = (1, 2, 3)


def _command(agent: str, seed: int, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "agents" / f"{agent}.py"),
        "--env-id", "AutoSculpt-ResNet",
        "--dataset", "digits",
        "--evaluation", "accuracy",
        "--max-reward-evaluations", str(MAX_REWARD_EVALUATIONS),
        "--seed", str(seed),
        "--threads", "1",
        "--no-progress",
        "--output-dir", str(out),
        "--run-name", f"{agent}-{seed}",
    ]  # fmt: skip


def test_ppo_gnn_beats_random_search_at_equal_reward_evaluations(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [(a, s) for s in SEEDS for a in ("ppo_gnn", "random_search")]
    results: dict[str, list[float]] = {"ppo_gnn": [], "random_search": []}
    for i in range(0, len(jobs), 2):  # two at a time: one per core
        procs = [
            (
                a,
                subprocess.Popen(
                    _command(a, s, tmp_path),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                ),
            )
            for a, s in jobs[i : i + 2]
        ]
        for agent, p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out
            evals = int(re.search(r"(\d+) reward evaluations", out).group(1))
            assert evals <= MAX_REWARD_EVALUATIONS
            results[agent].append(float(re.search(r"best reward ([0-9.]+)", out).group(1)))
    ppo, rnd = np.mean(results["ppo_gnn"]), np.mean(results["random_search"])
    assert ppo > rnd, results
