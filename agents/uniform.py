# Uniform pruning: the best single level for every layer that meets the FLOPs budget.
# Docs: README.md#agents. The classic baseline of the pruning literature (one pruning ratio
# for the whole network): for each catalog action, in order of nominal sparsity, the policy
# that gives it to every layer (where a layer cannot take it, the layer's valid action
# nearest in sparsity) is scored with `evaluate_policy`; the best reward among the policies
# that meet the FLOPs target is kept. Under the budget reward, policies the env's action wall
# would refuse are skipped without an evaluation (they can never be the answer); a uniform
# policy may remove more FLOPs than the target asks, which the budget reward allows. Under the
# other rewards every level is scored and ranked by its reward, which already prices FLOPs.
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
from autosculpt_env.tracking import BestEpisode, Budget, check_args, finish_run, start_run
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
    """stop after this many reward evaluations (policies scored); the leaderboard's budget"""


def env_overrides(args: Args) -> dict:
    keys = ("dataset", "evaluation", "target_flops_reduction", "catalog", "reward")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


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
    budget = Budget(args.max_reward_evaluations)

    # ALGO LOGIC: one candidate policy per catalog action, in order of nominal sparsity
    sparsity = np.asarray([a.sparsity for a in problem.catalog.actions], dtype=np.float64)
    candidates: list[tuple[str, list[int]]] = []
    skipped: list[str] = []
    for a in np.argsort(sparsity, kind="stable"):
        policy = [nearest_valid(problem.valid[i], sparsity, int(a)) for i in range(base.num_layers)]
        if any(policy == p for _, p in candidates):
            continue  # the same policy as a level already listed
        if base.reward_name == "budget" and not base.playable(policy):
            skipped.append(base.action_names[a])
            continue
        candidates.append((base.action_names[a], policy))
    if skipped:
        print(f"levels that cannot meet the FLOPs target (not scored): {' '.join(skipped)}")

    global_step = 0
    start_time = time.time()
    total = min(len(candidates), args.max_reward_evaluations or len(candidates))
    bar = tqdm(total=total, disable=not args.progress, unit="eval", dynamic_ncols=True)
    rows = []
    for name, policy in candidates:
        if budget.exhausted:
            break
        m = base.evaluate_policy(policy)
        # one evaluate_policy call is one reward evaluation, worth an episode of env steps
        global_step += base.num_layers
        budget.add(steps=base.num_layers, evaluations=1)
        bar.update(1)
        ok = m["meets_target"] or base.reward_name != "budget"
        rows.append((name, m, ok))
        improved = ok and best.update(m, m["reward"], budget.reward_evaluations, global_step)

        # TRY NOT TO MODIFY: record the evaluation
        writer.add_scalar("charts/episodic_return", m["reward"], global_step)
        writer.add_scalar("charts/accuracy", m["accuracy"], global_step)
        writer.add_scalar("charts/flops_reduction", m["flops_reduction"], global_step)
        writer.add_scalar("charts/best_reward", best.reward, global_step)
        writer.add_scalar("charts/reward_evaluations", budget.reward_evaluations, global_step)
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
        f"{args.env_id}: {global_step} env steps, {budget.reward_evaluations} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status(budget))
