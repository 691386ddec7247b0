# Random search: every episode plays a uniformly random valid action for each layer and the
# best episode is kept. Docs: README.md#agents. The floor every learning agent must beat at
# the same number of reward evaluations; under the budget reward the action mask (AMC's
# action wall) keeps every random policy within the FLOPs target.
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
from autosculpt_env.evaluation_limit import limit_reward_evaluations
from autosculpt_env.tracking import BestEpisode, check_args, finish_run, start_run


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
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
    num_episodes: int | None = None
    """random episodes to play (one reward evaluation each; default: the limit, or 500)"""
    max_reward_evaluations: int | None = None
    """the most reward evaluations (finished episodes) to spend, counted and enforced by the env"""


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
    rng = np.random.default_rng(args.seed)

    # env setup
    env = gym.make(args.env_id, **env_overrides(args))
    assert isinstance(env.action_space, gym.spaces.Discrete), (
        "only discrete action space is supported"
    )
    base = env.unwrapped
    best = BestEpisode(env, run_dir, extra={"agent": args.exp_name, "seed": args.seed})
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)  # the env keeps the count
    num_episodes = args.num_episodes
    if num_episodes is None:
        num_episodes = evaluations.limit if evaluations.limit is not None else 500

    global_step = 0
    start_time = time.time()
    total = min(
        num_episodes, evaluations.remaining if evaluations.limit is not None else num_episodes
    )
    bar = tqdm(total=total, disable=not args.progress, unit="eval", dynamic_ncols=True)
    _, info = env.reset(seed=args.seed)
    for _episode in range(num_episodes):
        if evaluations.limit_reached:
            break
        # ALGO LOGIC: a uniformly random valid action for every layer
        terminated = False
        while not terminated:
            global_step += 1
            action = int(rng.choice(np.flatnonzero(info["action_mask"])))
            _, reward, terminated, truncated, info = env.step(action)

        # TRY NOT TO MODIFY: record the episode
        bar.update(1)
        improved = best.update(info, float(reward), global_step)
        writer.add_scalar("charts/episodic_return", reward, global_step)
        writer.add_scalar("charts/episodic_length", base.num_layers, global_step)
        writer.add_scalar("charts/accuracy", info["accuracy"], global_step)
        writer.add_scalar("charts/flops_reduction", info["flops_reduction"], global_step)
        writer.add_scalar("charts/best_reward", best.reward, global_step)
        writer.add_scalar("charts/reward_evaluations", info["reward_evaluations"], global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
        if improved:
            bar.set_postfix(
                best=f"{best.reward:.4f}",
                acc=f"{info['accuracy']:.4f}",
                flops=f"-{info['flops_reduction']:.2f}",
            )
        _, info = env.reset()

    bar.close()
    env.close()
    finish_run(writer, args.track)
    print(
        f"{args.env_id}: {global_step} env steps, {evaluations.used} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status())
