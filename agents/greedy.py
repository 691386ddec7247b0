# Greedy sensitivity-based allocation: measure how much accuracy each layer loses at each
# pruning level with every other layer dense, then, starting from the dense network,
# repeatedly raise the level of the layer that loses the least accuracy per FLOP saved until
# the FLOPs target is met. Docs: README.md#agents. The layer-wise sensitivity analysis of the
# pruning literature (e.g. Li et al. 2017, "Pruning Filters for Efficient ConvNets"; AMC's
# "handcrafted" baselines), with a greedy knapsack on top.
#
# Cost: the full table costs one reward evaluation per (layer, non-dense valid level). When
# --max-reward-evaluations leaves less than that (plus one for the final policy), each layer
# is measured at k levels evenly spaced in its sparsity-ordered levels (k = 1: the middle one),
# and the drop at the other levels is interpolated linearly in nominal sparsity between the
# dense level (drop 0) and the measured ones (extrapolated with the last segment's slope).
# When not even one level per layer fits, no evaluation is spent on the table: the drop is
# estimated by the weight energy a level removes (1 - kept energy, free to compute). What is
# left after the final policy goes to a local search: neighbours of the best policy (one layer
# lowered by one level, the others greedily raised again to meet the target), best predicted
# first, moving to a neighbour whenever it scores better. Results are compared at equal FLOPs:
# the raise that meets the target is chosen to stay inside the FLOPs band (target to target +
# the env's band_tolerance), and only policies inside it are candidates.
import json
import os
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

import autosculpt_env  # noqa: F401  (registers the env ids)
from autosculpt_env.band import env_within_band
from autosculpt_env.evaluation_limit import limit_reward_evaluations
from autosculpt_env.tracking import BestEpisode, check_args, finish_run, start_run


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (the search is deterministic; kept for the record)"""
    threads: int = 2
    """torch CPU threads (the env's accuracy evaluation)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (offline without a key)"""
    wandb_project_name: str = "autosculpt-env"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs"
    """folder of the run folders (TensorBoard logs, best.json, sensitivity.json)"""
    run_name: str | None = None
    """run folder name (default: env__exp__seed__time)"""
    progress: bool = True
    """show a progress bar"""

    # Environment arguments (None keeps the registered configuration's value)
    env_id: str = "AutoSculpt-ResNet"
    """the id of the environment"""
    dataset: str | None = None
    """override the env's dataset (e.g. digits for a fast twin)"""
    evaluation: str | None = None
    """override the env's evaluation mode (autosculpt_env.evaluation.EVALUATIONS)"""
    target_flops_reduction: float | None = None
    """override the env's FLOPs-reduction target"""
    catalog: str | None = None
    """override the env's pattern catalog"""
    reward: str | None = None
    """override the env's reward"""

    # Algorithm specific arguments
    max_reward_evaluations: int | None = None
    """the most reward evaluations (policies scored) to spend, counted and enforced by the env"""
    neighbours: int = 20
    """most evaluations spent on the local search after the greedy policy (0 turns it off)"""


def env_overrides(args: Args) -> dict:
    keys = ("dataset", "evaluation", "target_flops_reduction", "catalog", "reward")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def measured_levels(levels: list[int], k: int) -> list[int]:
    """k of a layer's sparsity-ordered levels, evenly spaced (k = 1: the middle one)."""
    if k >= len(levels):
        return list(levels)
    if k == 1:
        return [levels[len(levels) // 2]]
    return [levels[i] for i in np.unique(np.round(np.linspace(0, len(levels) - 1, k)).astype(int))]


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extrapolated past the end with the last slope."""
    if x <= xs[-1] or len(xs) < 2:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
    return float(ys[-1] + slope * (x - xs[-1]))


class Allocator:
    """Greedy knapsack over the estimated drop table and the env's per-(layer, action) FLOPs."""

    def __init__(self, base, drop: np.ndarray, sparsity: np.ndarray):
        problem = base.problem
        self.problem, self.base, self.drop, self.sparsity = problem, base, drop, sparsity
        self.valid = problem.valid
        self.flops = np.where(problem.valid, problem.cost.flops, np.inf)
        self.margin = 0.0  # raised a hair when float rounding at the action wall bites

    def reduction(self, policy: list[int]) -> float:
        """The exact FLOPs reduction (dead-channel savings included)."""
        return 1.0 - self.problem.policy_flops(policy) / self.base.dense_flops

    def meets(self, policy: list[int]) -> bool:
        return self.reduction(policy) >= self.base.target + self.margin

    def in_band(self, policy: list[int]) -> bool:
        """Inside the FLOPs band results are compared in (target to target + tolerance)."""
        return env_within_band(self.base, self.reduction(policy))

    def predicted_drop(self, policy: list[int]) -> float:
        return float(self.drop[np.arange(len(policy)), policy].sum())

    def complete(self, policy: list[int], frozen: frozenset = frozenset()) -> list[int] | None:
        """Raise levels (never of ``frozen`` layers) until the target is met; None if it cannot.

        Each raise is the one losing the least accuracy per FLOP saved, except the last: of
        the raises that meet the target, the cheapest one that stays inside the FLOPs band
        (results are compared at equal FLOPs), else the one that overshoots least."""
        policy = list(policy)
        while not self.meets(policy):
            options = []
            for i, cur in enumerate(policy):
                if i in frozen:
                    continue
                for b in np.flatnonzero(self.valid[i]):
                    saved = self.flops[i, cur] - self.flops[i, b]
                    if self.sparsity[b] <= self.sparsity[cur] or saved <= 0:
                        continue
                    # least accuracy lost per FLOP saved; ties go to the larger saving
                    key = ((self.drop[i, b] - self.drop[i, cur]) / saved, -saved)
                    options.append((key, policy[:i] + [int(b)] + policy[i + 1 :]))
            if not options:
                return None
            options.sort(key=lambda o: o[0])
            if not self.meets(options[0][1]):
                policy = options[0][1]  # not the last raise yet
                continue
            finishing = [p for _, p in options if self.meets(p)]
            in_band = [p for p in finishing if self.in_band(p)]
            policy = in_band[0] if in_band else min(finishing, key=self.reduction)
        return policy

    def neighbours(self, policy: list[int]) -> list[list[int]]:
        """Each layer lowered one level, the others raised again to meet the target."""
        out = []
        for i, cur in enumerate(policy):
            lower = [
                b for b in np.flatnonzero(self.valid[i]) if self.sparsity[b] < self.sparsity[cur]
            ]
            if not lower:
                continue
            start = list(policy)
            start[i] = int(max(lower, key=lambda b: self.sparsity[b]))
            done = self.complete(start, frozen=frozenset([i]))
            if done is not None and done != policy:
                out.append(done)
        return sorted(out, key=self.predicted_drop)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, writer = start_run(
        args, run_name, args.output_dir, args.track, args.wandb_project_name, args.wandb_entity
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # env setup
    env = gym.make(args.env_id, **env_overrides(args))
    assert isinstance(env.action_space, gym.spaces.Discrete), (
        "only discrete action space is supported"
    )
    env.reset(seed=args.seed)
    base = env.unwrapped
    problem = base.problem
    L, dense = base.num_layers, problem.dense_action
    best = BestEpisode(env, run_dir, extra={"agent": args.exp_name, "seed": args.seed})
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)  # the env keeps the count
    sparsity = np.asarray([a.sparsity for a in problem.catalog.actions], dtype=np.float64)

    # ALGO LOGIC: plan the sensitivity measurements the evaluation limit allows
    levels = [
        sorted(
            (int(a) for a in np.flatnonzero(problem.valid[i]) if a != dense),
            key=lambda a: sparsity[a],
        )
        for i in range(L)
    ]
    full = sum(len(lv) for lv in levels)
    # keep one evaluation for the result
    room = None if evaluations.remaining is None else evaluations.remaining - 1
    if room is None or room >= full:
        k = max((len(lv) for lv in levels), default=0)
    else:
        k = max(room, 0) // L
    plan = [(i, a) for i in range(L) for a in measured_levels(levels[i], k)] if k else []
    planned = len(plan) + 1 + args.neighbours
    total = min(planned, evaluations.remaining if evaluations.limit is not None else planned)

    global_step = 0
    start_time = time.time()
    bar = tqdm(total=total, disable=not args.progress, unit="eval", dynamic_ncols=True)
    scored: dict[tuple[int, ...], dict] = {}

    def evaluate(policy: list[int], candidate: bool) -> dict:
        """One reward evaluation; a candidate (a policy meant to meet the target) may become
        the best. One evaluate_policy call is worth an episode of env steps on the x axis."""
        global global_step
        m = base.evaluate_policy(policy)
        global_step += L
        bar.update(1)
        if candidate:
            scored[tuple(policy)] = m
            ok = m["meets_target"] or base.reward_name != "budget"
            if ok and best.update(m, m["reward"], global_step):
                bar.set_postfix(best=f"{best.reward:.4f}", flops=f"-{m['flops_reduction']:.2f}")
            writer.add_scalar("charts/episodic_return", m["reward"], global_step)
            writer.add_scalar("charts/accuracy", m["accuracy"], global_step)
            writer.add_scalar("charts/flops_reduction", m["flops_reduction"], global_step)
        else:
            writer.add_scalar("charts/sensitivity_accuracy", m["accuracy"], global_step)
        writer.add_scalar("charts/best_reward", best.reward, global_step)
        writer.add_scalar("charts/reward_evaluations", m["reward_evaluations"], global_step)
        return m

    # ALGO LOGIC: per-layer sensitivity, every other layer dense
    measured = np.full((L, base.num_actions), np.nan)
    for i, a in plan:
        policy = [dense] * L
        policy[i] = a
        m = evaluate(policy, candidate=False)
        measured[i, a] = m["dense_accuracy"] - m["accuracy"]
    drop = np.full((L, base.num_actions), np.inf)
    for i in range(L):
        drop[i, dense] = 0.0
        xs = [sparsity[dense]] + [sparsity[a] for a in levels[i] if not np.isnan(measured[i, a])]
        ys = [0.0] + [measured[i, a] for a in levels[i] if not np.isnan(measured[i, a])]
        for a in levels[i]:
            if k:
                drop[i, a] = (
                    measured[i, a]
                    if not np.isnan(measured[i, a])
                    else interpolate(xs, ys, sparsity[a])
                )
            else:
                drop[i, a] = 1.0 - problem.kept_energy(i, a)
    (run_dir / "sensitivity.json").write_text(
        json.dumps(
            {
                "layers": base.layer_names,
                "actions": base.action_names,
                "measured_drop": [
                    [None if np.isnan(v) else float(v) for v in row] for row in measured
                ],
                "estimated_drop": [
                    [None if np.isinf(v) else float(v) for v in row] for row in drop
                ],
                "estimate": "measured" if k else "weight energy removed",
            },
            indent=1,
        )
    )

    # ALGO LOGIC: greedy allocation from the dense network, then its neighbours
    allocator = Allocator(base, drop, sparsity)
    policy = allocator.complete([dense] * L)
    while policy is not None and not base.playable(policy):
        # float rounding at the wall: one more greedy raise on a slightly tighter target
        allocator.margin += 1e-6
        policy = allocator.complete(policy)
    assert policy is not None, "the FLOPs target cannot be met with this catalog"
    if not evaluations.limit_reached:
        evaluate(policy, candidate=True)
    used, current = 0, policy
    while used < args.neighbours and not evaluations.limit_reached:
        fresh = [
            p
            for p in allocator.neighbours(current)
            if tuple(p) not in scored and allocator.in_band(p) and base.playable(p)
        ]
        if not fresh:
            break
        moved = False
        for p in fresh:
            if used >= args.neighbours or evaluations.limit_reached:
                break
            used += 1
            if evaluate(p, candidate=True)["reward"] > scored[tuple(current)]["reward"]:
                current, moved = p, True
                break
        if not moved:
            break

    bar.close()
    env.close()
    finish_run(writer, args.track)
    print(
        f"sensitivity: {len(plan)} of {full} (layer, level) pairs measured"
        + ("" if k else "; drops estimated by the weight energy removed")
    )
    print(
        f"{args.env_id}: {global_step} env steps, {evaluations.used} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status())
