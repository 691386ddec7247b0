# Uniform pruning: one pruning ratio for the whole network, the one that meets the FLOPs target.
# Docs: README.md#agents. The classic baseline of the pruning literature. A uniform policy gives
# one catalog level to every layer (where a layer cannot take it, its valid level nearest in
# sparsity). Results are compared at equal FLOPs, so under a reward with a FLOPs target the
# ratio that lands on the target is realised by mixing the two adjacent levels around it: from
# the lower level, layers are raised to the upper one, those saving the most FLOPs first, until
# the target is met (the last raise chosen to stay inside the FLOPs band, target to target +
# the env's band_tolerance). That policy, and any pure level already inside the band, are
# scored with `evaluate_policy`; levels that miss the target or overshoot the band cost no
# evaluation (they can never be the answer). Under the other rewards every level is scored and
# ranked by its reward, which already prices FLOPs.
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
from autosculpt_env.band import BANDED_REWARDS, env_within_band
from autosculpt_env.evaluation_limit import limit_reward_evaluations
from autosculpt_env.tracking import BestEpisode, check_args, finish_run, start_run
from autosculpt_env.wrappers import nearest_valid


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
    """folder of the run folders (TensorBoard logs, best.json)"""
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


def env_overrides(args: Args) -> dict:
    keys = ("dataset", "evaluation", "target_flops_reduction", "catalog", "reward")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def reduction(base, policy: list[int]) -> float:
    """The exact FLOPs reduction of a policy (no reward evaluation)."""
    return 1.0 - base.problem.policy_flops(policy) / base.dense_flops


def mix_levels(base, lower: list[int], upper: list[int]) -> list[int] | None:
    """From ``lower``, raise layers to ``upper`` (largest FLOPs saving first) until the target
    is met; the last raise is the one that stays inside the FLOPs band if any does (else the
    one overshooting least). ``None`` when even ``upper`` misses the target."""
    flops = base.problem.cost.flops
    order = sorted(
        (i for i in range(len(lower)) if lower[i] != upper[i]),
        key=lambda i: flops[i, upper[i]] - flops[i, lower[i]],
    )  # most negative FLOPs change (largest saving) first
    policy = list(lower)
    while reduction(base, policy) < base.target and order:
        raised = [policy[:i] + [upper[i]] + policy[i + 1 :] for i in order]
        finishing = [k for k, p in enumerate(raised) if reduction(base, p) >= base.target]
        if not finishing:
            policy = raised[0]
            order.pop(0)
            continue
        in_band = [k for k in finishing if env_within_band(base, reduction(base, raised[k]))]
        k = in_band[0] if in_band else min(finishing, key=lambda k: reduction(base, raised[k]))
        policy = raised[k]
    return policy if reduction(base, policy) >= base.target else None


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
    best = BestEpisode(env, run_dir, extra={"agent": args.exp_name, "seed": args.seed})
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)  # the env keeps the count

    # ALGO LOGIC: one uniform policy per catalog action, in order of nominal sparsity
    sparsity = np.asarray([a.sparsity for a in problem.catalog.actions], dtype=np.float64)
    levels: list[tuple[str, list[int]]] = []
    for a in np.argsort(sparsity, kind="stable"):
        policy = [nearest_valid(problem.valid[i], sparsity, int(a)) for i in range(base.num_layers)]
        if all(policy != p for _, p in levels):  # not the same policy as a level listed
            levels.append((base.action_names[a], policy))
    if base.reward_name in BANDED_REWARDS:
        # ALGO LOGIC: at equal FLOPs: the pure levels inside the band, and the mix of the two
        # adjacent levels around the target
        candidates = [(n, p) for n, p in levels if env_within_band(base, reduction(base, p))]
        for (low, lower), (high, upper) in zip(levels, levels[1:]):
            if reduction(base, lower) < base.target <= reduction(base, upper):
                mixed = mix_levels(base, lower, upper)
                if mixed is not None and all(mixed != p for _, p in candidates):
                    candidates.append((f"{low}+{high}", mixed))
        if base.reward_name == "budget":  # the action wall refuses what it cannot play
            candidates = [(n, p) for n, p in candidates if base.playable(p)]
        print(
            "candidates inside the FLOPs band: "
            + (" ".join(n for n, _ in candidates) or "none (no level mix meets the target)")
        )
    else:
        candidates = levels

    global_step = 0
    start_time = time.time()
    total = min(
        len(candidates), evaluations.remaining if evaluations.limit is not None else len(candidates)
    )
    bar = tqdm(total=total, disable=not args.progress, unit="eval", dynamic_ncols=True)
    rows = []
    for name, policy in candidates:
        if evaluations.limit_reached:
            break
        m = base.evaluate_policy(policy)
        # one evaluate_policy call is one reward evaluation, worth an episode of env steps
        global_step += base.num_layers
        bar.update(1)
        ok = m["meets_target"] or base.reward_name != "budget"
        rows.append((name, m, ok))
        improved = ok and best.update(m, m["reward"], global_step)

        # TRY NOT TO MODIFY: record the evaluation
        writer.add_scalar("charts/episodic_return", m["reward"], global_step)
        writer.add_scalar("charts/accuracy", m["accuracy"], global_step)
        writer.add_scalar("charts/flops_reduction", m["flops_reduction"], global_step)
        writer.add_scalar("charts/best_reward", best.reward, global_step)
        writer.add_scalar("charts/reward_evaluations", m["reward_evaluations"], global_step)
        if improved:
            bar.set_postfix(best=f"{best.reward:.4f}", level=name)

    bar.close()
    env.close()
    finish_run(writer, args.track)
    for name, m, ok in rows:
        print(
            f"  {name:>12}: reward {m['reward']:.4f}, accuracy {100 * m['accuracy']:.2f}%, "
            f"FLOPs -{100 * m['flops_reduction']:.1f}%{'' if ok else ' (misses the target)'}"
        )
    print(
        f"{args.env_id}: {global_step} env steps, {evaluations.used} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status())
