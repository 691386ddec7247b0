"""A minimal leaderboard agent that is not one of the reference agents: a (1+1) hill climber.

It starts from one random episode (walked into the FLOPs band when it ends past it, which
costs no reward evaluation), then repeatedly moves one layer one pruning level up or down
and keeps the move when the reward improves, until the evaluation limit is spent. It shows the
whole contract of docs/SUBMITTING.md and nothing else:

* it accepts the harness's options (``--env-id``, ``--dataset``, ``--evaluation``,
  ``--target-flops-reduction``, ``--seed``, ``--max-reward-evaluations``, ``--threads``,
  ``--output-dir``, ``--run-name``, ``--no-progress``);
* it asks the env for rewards only (episodes or ``evaluate_policy``); the env counts them
  and refuses past the limit, so the agent only has to stop when ``evaluations.limit_reached``;
* it keeps the best policy whose FLOPs reduction lies in the band and writes it, as the
  env's own episode record, to ``OUTPUT_DIR/RUN_NAME/best.json``;
* it exits with a non-zero status when it has no answer.

Run it alone with ``python examples/my_agent.py --dataset digits --max-reward-evaluations 30``
or on the leaderboard with ``autosculpt leaderboard --agents examples/my_agent.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import autosculpt_env  # noqa: F401  (registers the env ids)
from autosculpt_env.band import env_within_band, flops_band
from autosculpt_env.evaluation_limit import limit_reward_evaluations


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env-id", default="AutoSculpt-ResNet")
    p.add_argument("--dataset", default=None)
    p.add_argument("--evaluation", default=None)
    p.add_argument("--target-flops-reduction", type=float, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-reward-evaluations", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--run-name", default="my_agent")
    p.add_argument("--no-progress", action="store_true")  # this agent prints no progress bar
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)
    overrides = {
        k: v
        for k, v in (
            ("dataset", args.dataset),
            ("evaluation", args.evaluation),
            ("target_flops_reduction", args.target_flops_reduction),
        )
        if v is not None
    }
    env = gym.make(args.env_id, **overrides)
    base = env.unwrapped
    problem = base.problem
    sparsity = np.array([a.sparsity for a in problem.catalog.actions])
    best_path = Path(args.output_dir) / args.run_name / "best.json"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best = None  # the terminal info (metrics) of the best policy in the band

    def offer(metrics: dict) -> None:
        nonlocal best
        if not env_within_band(base, metrics["flops_reduction"]):
            return
        if best is None or metrics["reward"] > best["reward"]:
            best = metrics
            extra = {"agent": "my_agent", "seed": args.seed}
            base.record_from_info(metrics, extra=extra).save(best_path)

    def reduction(policy: list[int]) -> float:
        return 1.0 - problem.policy_flops(policy) / base.dense_flops

    def neighbour(policy: list[int]) -> list[int] | None:
        """One layer one pruning level up or down (None where that leaves the levels)."""
        i = int(rng.integers(base.num_layers))
        levels = [a for a in np.argsort(sparsity) if problem.valid[i, a]]
        pos = levels.index(policy[i]) + int(rng.choice([-1, 1]))
        if not 0 <= pos < len(levels):
            return None
        return policy[:i] + [int(levels[pos])] + policy[i + 1 :]

    # one random episode (its last step is one reward evaluation)
    _, info = env.reset(seed=args.seed)
    done = False
    while not done:
        action = int(rng.choice(np.flatnonzero(info["action_mask"])))
        _, _, done, _, info = env.step(action)
    offer(info)
    current = problem.policy_indices(info["policy"])
    current_reward = info["reward"]

    # the action wall keeps it at the target or past it, not always inside the band: walk
    # towards the band one move at a time (FLOPs cost no reward evaluation), then score it
    lo, hi = flops_band(base.target, base.band_tolerance)

    def gap(policy: list[int]) -> float:
        """How far the policy's FLOPs reduction lies outside the band (0 inside)."""
        r = reduction(policy)
        return 0.0 if env_within_band(base, r) else max(lo - r, r - hi)

    walked, current_gap = False, gap(current)
    for _ in range(10_000):
        if current_gap == 0.0:
            break
        move = neighbour(current)
        if move is not None and base.playable(move) and (g := gap(move)) < current_gap:
            current, current_gap, walked = move, g, True
    if walked and not evaluations.limit_reached:
        metrics = base.evaluate_policy(current)
        offer(metrics)
        current_reward = metrics["reward"]

    # hill climbing: one layer one level up or down, kept when the reward improves
    while not evaluations.limit_reached:
        for _ in range(100):  # find a move the action wall allows, inside the band
            move = neighbour(current)
            if move is not None and base.playable(move) and env_within_band(base, reduction(move)):
                break
        else:
            break  # no move left
        metrics = base.evaluate_policy(move)
        offer(metrics)
        if metrics["reward"] > current_reward:
            current, current_reward = move, metrics["reward"]

    env.close()
    print(f"{evaluations.used} reward evaluations; best reward {best and best['reward']}")
    if best is None:
        print("error: no policy inside the FLOPs band was found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
