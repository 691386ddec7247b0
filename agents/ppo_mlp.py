# PPO with an MLP policy over the AMC-style flat observation (FlatObservation): the ablation
# of ppo_gnn.py that shows what the graph adds. Docs: README.md#agents. CleanRL's ppo.py with
# MicroRTS-Py's masked categorical (the mask is stored with the rollout, reused at update time).
import math
import os
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from tqdm.auto import tqdm

import autosculpt_env  # noqa: F401  (registers the env ids)
from autosculpt_env.evaluation_limit import limit_reward_evaluations
from autosculpt_env.tracking import BestEpisode, check_args, finish_run, start_run
from autosculpt_env.wrappers import FlatObservation


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    threads: int = 2
    """torch CPU threads"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (offline without a key)"""
    wandb_project_name: str = "autosculpt-env"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs"
    """folder of the run folders (TensorBoard logs, best.json, policy weights)"""
    run_name: str | None = None
    """run folder name (default: env__exp__seed__time)"""
    save_model: bool = True
    """whether to save the policy weights into the run folder"""
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
    total_timesteps: int = 12600
    """total env steps (one step = one layer decision)"""
    max_reward_evaluations: int | None = None
    """the most reward evaluations (finished episodes) to spend, counted and enforced by the
    env; when given, it is the run's length (total_timesteps is ignored). Never exceeded: a
    step that would finish more episodes than remain is not taken"""
    learning_rate: float = 2e-3
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments"""
    num_steps: int = 42
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 1.0
    """the discount factor gamma (episodic, terminal reward)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold"""
    hidden_dim: int = 64
    """width of the hidden layers of the actor and the critic"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def env_overrides(args: Args) -> dict:
    keys = ("dataset", "evaluation", "target_flops_reduction", "catalog", "reward")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def make_env(env_id: str, overrides: dict):
    def thunk():
        return FlatObservation(gym.make(env_id, **overrides))

    return thunk


def layer_init(layer, std=2**0.5, bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, num_features: int, num_actions: int, args: Args):
        super().__init__()
        h = args.hidden_dim
        self.critic = nn.Sequential(
            layer_init(nn.Linear(num_features, h)),
            nn.Tanh(),
            layer_init(nn.Linear(h, h)),
            nn.Tanh(),
            layer_init(nn.Linear(h, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(num_features, h)),
            nn.Tanh(),
            layer_init(nn.Linear(h, h)),
            nn.Tanh(),
            layer_init(nn.Linear(h, num_actions), std=0.01),
        )

    def get_value(self, x: torch.Tensor):
        return self.critic(x)

    def get_action_and_value(self, x: torch.Tensor, mask: torch.Tensor, action=None):
        logits = self.actor(x)
        logits = torch.where(mask, logits, torch.tensor(-1e8))  # CategoricalMasked
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        entropy = -(probs.probs * torch.where(mask, probs.logits, 0.0)).sum(-1)
        return action, probs.log_prob(action), entropy, self.critic(x)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, writer = start_run(
        args, run_name, args.output_dir, args.track, args.wandb_project_name, args.wandb_entity
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    # env setup
    overrides = env_overrides(args)
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, overrides) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), (
        "only discrete action space is supported"
    )
    base = envs.envs[0].unwrapped
    num_actions = envs.single_action_space.n
    num_features = envs.single_observation_space.shape[0]
    best = BestEpisode(envs.envs[0], run_dir, extra={"agent": args.exp_name, "seed": args.seed})
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)  # the env keeps the count
    if evaluations.limit is not None:  # the limit is the run's length (and the LR schedule's)
        args.num_iterations = math.ceil(evaluations.limit * base.num_layers / args.batch_size) + 1

    agent = Agent(num_features, num_actions, args).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs, num_features))
    masks = torch.zeros((args.num_steps, args.num_envs, num_actions), dtype=torch.bool)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long)
    logprobs = torch.zeros((args.num_steps, args.num_envs))
    rewards = torch.zeros((args.num_steps, args.num_envs))
    dones = torch.zeros((args.num_steps, args.num_envs))
    values = torch.zeros((args.num_steps, args.num_envs))

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs, infos = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
    next_mask = torch.as_tensor(infos["action_mask"], dtype=torch.bool)
    next_done = torch.zeros(args.num_envs)
    episode_len = np.zeros(args.num_envs, dtype=np.int64)
    total = evaluations.limit or args.total_timesteps
    bar = tqdm(
        total=total,
        disable=not args.progress,
        unit="eval" if evaluations.limit else "step",
        dynamic_ncols=True,
    )

    # set when the limit leaves too few evaluations for the episodes the next step would finish
    spent = False
    for iteration in range(1, args.num_iterations + 1):
        if spent:
            break
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done
            masks[step] = next_mask

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs, next_mask)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            raw_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = torch.as_tensor(
                np.logical_or(terminations, truncations), dtype=torch.float32
            )
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            next_obs = torch.as_tensor(raw_obs, dtype=torch.float32)
            next_mask = torch.as_tensor(infos["action_mask"], dtype=torch.bool)
            bar.update(0 if evaluations.limit else args.num_envs)

            if "final_info" in infos:
                final = infos["final_info"]
                for i in np.flatnonzero(infos["_final_info"]):
                    info_i = {k: v[i] for k, v in final.items() if not k.startswith("_")}
                    if evaluations.limit:
                        bar.update(1)
                    improved = best.update(info_i, float(info_i["reward"]), global_step)
                    writer.add_scalar("charts/episodic_return", info_i["reward"], global_step)
                    writer.add_scalar("charts/episodic_length", base.num_layers, global_step)
                    writer.add_scalar("charts/accuracy", info_i["accuracy"], global_step)
                    writer.add_scalar(
                        "charts/flops_reduction", info_i["flops_reduction"], global_step
                    )
                    writer.add_scalar("charts/best_reward", best.reward, global_step)
                    writer.add_scalar(
                        "charts/reward_evaluations", info_i["reward_evaluations"], global_step
                    )
                    if improved:
                        bar.set_postfix(
                            best=f"{best.reward:.4f}",
                            acc=f"{info_i['accuracy']:.4f}",
                            flops=f"-{info_i['flops_reduction']:.2f}",
                        )
            # every episode the next step finishes costs a reward evaluation: stop before one
            # that would finish more episodes than the limit has left (the env would refuse)
            episode_len = np.where(next_done.numpy() > 0, 0, episode_len + 1)
            if evaluations.limit_reached or (
                evaluations.remaining is not None
                and int((episode_len + 1 >= base.num_layers).sum()) > evaluations.remaining
            ):
                spent = True
                break
        if spent and step < args.num_steps - 1:
            break  # a partial rollout is not used for an update

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = (
                    delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                )
            returns = advantages + values

        # flatten the batch
        b_obs = obs.reshape(-1, num_features)
        b_masks = masks.reshape(-1, num_actions)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for _epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                    b_obs[mb_inds], b_masks[mb_inds], b_actions[mb_inds]
                )
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (
                        mb_advantages.std() + 1e-8
                    )

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(
                    ratio, 1 - args.clip_coef, 1 + args.clip_coef
                )
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

    bar.close()
    if args.save_model:
        torch.save(agent.state_dict(), run_dir / f"{args.exp_name}.pt")
    envs.close()
    finish_run(writer, args.track)
    print(
        f"{args.env_id}: {global_step} env steps, {evaluations.used} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status())
