"""Reward fidelity: how well each reward (``evaluation=`` mode) predicts the leaderboard score.

The logic lives in :mod:`autosculpt_env.fidelity`; this script runs its stages. Every stage
is resumable and stores each result as it is computed, so it can run in several parts::

    python benchmarks/reward_fidelity.py                       # report from stored results
    python benchmarks/reward_fidelity.py --policies            # build / extend the policy sets
    python benchmarks/reward_fidelity.py --policies --search-set holdout --search-seeds 16 17
    python benchmarks/reward_fidelity.py --ground-truth --jobs 2   # fine-tuning runs (hours)
    python benchmarks/reward_fidelity.py --rewards accuracy reconstruction recovery
    python benchmarks/reward_fidelity.py --rewards recovery --reward-seeds 1 2  # its seed noise
    python benchmarks/reward_fidelity.py --verify 4            # do stored rewards reproduce?
    python benchmarks/reward_fidelity.py --cost accuracy reconstruction   # idle machine only

The report (``benchmarks/fidelity/REWARD_FIDELITY.md``, one scatter plot per task and the
cost-fidelity frontier, ``frontier.png``, in ``benchmarks/fidelity/plots/``) is regenerated
at the end of every invocation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from autosculpt_env import fidelity
from autosculpt_env.leaderboard import TASKS, Task


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: [t.name for t in TASKS])
    """tasks (ENV_ID@TARGET), in the order they are worked on"""
    root: Path = fidelity.DEFAULT_DIR
    """the fidelity folder (policy sets, ground truth, rewards, report)"""
    policies: bool = False
    """build or extend the policy sets (committed rows, search runs, random and mutations)"""
    rows: Path = Path("benchmarks/rows")
    """leaderboard rows whose best policies join the competitive set"""
    searches: list[str] = field(default_factory=lambda: list(fidelity.SEARCH_AGENTS))
    """agents whose best policies (search runs) join the competitive set"""
    search_seeds: list[int] = field(default_factory=lambda: [11, 12, 13, 14, 15])
    """seeds of those search runs"""
    search_max_reward_evaluations: int = fidelity.SEARCH_MAX_REWARD_EVALUATIONS
    """reward evaluations per search run"""
    search_evaluation: str = fidelity.SEARCH_EVALUATION
    """the evaluation= mode the search runs optimise"""
    search_set: str = "competitive"
    """the set those search runs fill: competitive, or holdout (policies kept apart to test a
    choice made on the competitive set; use seeds the competitive searches did not)"""
    broad_random: int = 12
    """seeded random valid policies in the broad set"""
    broad_mutations: int = 12
    """mutations of competitive policies in the broad set"""
    ground_truth: bool = False
    """run the missing fine-tuning runs (the leaderboard's score under two seeds)"""
    sets: list[str] = field(default_factory=lambda: list(fidelity.SETS))
    """which policy sets get ground truth, in this order"""
    rewards: list[str] = field(default_factory=list)
    """candidate rewards (evaluation modes) to compute for every stored policy"""
    reward_seeds: list[int] = field(default_factory=lambda: [0])
    """recovery seeds the --rewards are computed under (0 is the env's reward; another seed
    measures how much a candidate's ranking depends on its training seed; recovery modes
    only)"""
    verify: int = 0
    """score this many stored policies of every stored candidate again (and of its seed
    replicates) and list those that do not reproduce; exits 1 if any (0: skip)"""
    cost: list[str] = field(default_factory=list)
    """modes whose cost per evaluation is timed (run on an otherwise idle machine)"""
    jobs: int = 2
    """parallel processes for the ground truth"""
    threads: int = 1
    """torch threads per process"""
    progress: bool = True
    """show progress bars"""
    readme: Path | None = Path("README.md")
    """README whose reward-fidelity block is regenerated (None: leave it alone)"""


def main(args: Args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    tasks = [Task.parse(t) for t in args.tasks]
    unknown = [s for s in args.sets if s not in fidelity.SETS]
    if unknown:
        raise SystemExit(
            f"--sets {' '.join(unknown)}: no such set; choose from {' '.join(fidelity.SETS)}"
        )
    if args.policies:
        for task in tasks:
            fidelity.build_policy_set(
                args.root,
                task,
                rows_dir=args.rows,
                agents=args.searches,
                seeds=args.search_seeds,
                max_reward_evaluations=args.search_max_reward_evaluations,
                evaluation=args.search_evaluation,
                broad_random=args.broad_random,
                broad_mutations=args.broad_mutations,
                progress=args.progress,
                search_set=args.search_set,
            )
    if args.ground_truth:
        fidelity.run_ground_truth(
            args.root,
            tasks,
            args.sets,
            jobs=args.jobs,
            threads=args.threads,
            progress=args.progress,
        )
    for mode in args.rewards:  # refuse a seed a candidate cannot take before any work
        for seed in args.reward_seeds:
            fidelity.check_reward_seed(mode, seed)
    for mode in args.rewards:
        for seed in args.reward_seeds:
            for task in tasks:
                fidelity.compute_rewards(
                    args.root, task, mode, threads=args.threads, progress=args.progress, seed=seed
                )
    stale = []
    if args.verify:
        for task in tasks:
            for mode in fidelity.reported_modes(args.root, [task]):
                if not fidelity.load_rewards(args.root, task, mode)["values"]:
                    continue
                for seed in [0] + fidelity.reward_seeds(args.root, task, mode):
                    bad = fidelity.verify_rewards(args.root, task, mode, args.verify, seed)
                    what = f"{task.name} {mode}" + (f" (recovery seed {seed})" if seed else "")
                    print(f"{what}: " + ("reproduces" if not bad else f"{len(bad)} differ"))
                    for key, was, now in bad:
                        print(f"  {key}: stored {was:.4f}, now {now:.4f}")
                    stale += [(what, b) for b in bad]
    for mode in args.cost:
        for task in tasks:
            cost = fidelity.measure_cost(args.root, task, mode, threads=args.threads)
            print(f"{task.name} {mode}: {cost['ratio']:.2f}x a bare forward", flush=True)
    # the report always covers every leaderboard task (and any other task worked on here)
    reported = list(TASKS) + [t for t in tasks if t.name not in {u.name for u in TASKS}]
    out = fidelity.write_report(args.root, reported, readme=args.readme)
    # the report's lists (default reward and proxy against their goals, the frontier), each
    # under its own lead sentence, on the terminal; the tables are in the report
    lines = out.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("- "):
            if not lines[i - 1].startswith("- "):
                print(f"\n{lines[i - 2]}")
            print(line)
    print(f"report: {out}")
    if stale:
        raise SystemExit(
            f"{len(stale)} stored rewards do not reproduce (listed above): delete their "
            "files' values and run --rewards again (with the thread count the file states)"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
