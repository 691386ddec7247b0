"""Run the leaderboard: agents x tasks x seeds, resumable, then write the table and plots.

The protocol (tasks, budget, fine-tuning, the rows format) lives in
:mod:`autosculpt_env.leaderboard`; this script is its command line (``autosculpt leaderboard``
is the same). Rows go one JSON file per (task, agent, seed) into ``--rows-dir``; a killed
run is resumed by running the same command again. ``benchmarks/LEADERBOARD.md`` and
``benchmarks/plots/*.png`` are generated from the rows alone.

    python benchmarks/leaderboard.py                          # the full table (hours on CPU)
    python benchmarks/leaderboard.py --jobs 2                 # two runs at a time, 1 thread each
    python benchmarks/leaderboard.py --dataset digits --budget 10 \\
        --rows-dir /tmp/rows --work-dir /tmp/runs --output /tmp/LB.md --plots-dir /tmp/plots
    python benchmarks/leaderboard.py --only-render --validate # table and plots from the rows
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tyro

from autosculpt_env import leaderboard as lb


@dataclass
class Args:
    tasks: tuple[str, ...] = tuple(t.name for t in lb.TASKS)
    """tasks as ENV_ID@TARGET (default: the five leaderboard tasks)"""
    agents: tuple[str, ...] = lb.AGENTS
    """agent names in agents/ or paths of agent scripts"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """agent seeds (each also seeds its fine-tuning)"""
    budget: int = lb.DEFAULT_BUDGET
    """reward evaluations per search"""
    dataset: str | None = None
    """override every task's dataset (digits: a fast twin of the table)"""
    evaluation: str = "accuracy"
    """the env's evaluation: accuracy or proxy"""
    finetune_epochs: int | None = None
    """override the fine-tuning recipe's epochs"""
    finetune_samples: int | None = None
    """fine-tune on a fixed subset of this many train images (default: all)"""
    threads: int = 1
    """torch CPU threads per run"""
    jobs: int = 1
    """runs at a time"""
    agent_timeout: float | None = None
    """seconds after which an agent run is killed and reported as failed"""
    rows_dir: str = lb.DEFAULT_ROWS_DIR
    """folder of the row files (one JSON file per task, agent and seed)"""
    work_dir: str = lb.DEFAULT_WORK_DIR
    """folder of the agents' run folders and the fine-tuned networks"""
    output: str = lb.DEFAULT_OUTPUT
    """markdown table written from the rows"""
    plots_dir: str = lb.DEFAULT_PLOTS_DIR
    """folder of pareto.png and progress.png"""
    only_render: bool = False
    """run nothing: write the table and plots from the existing rows"""
    validate: bool = False
    """replay every row before rendering (exit code 1 on a mismatch)"""
    progress: bool = True
    """show a progress bar"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    sys.exit(lb.command(**asdict(args)))
