# AMC: DDPG choosing one pruning level per layer (He et al., "AMC: AutoML for Model Compression
# and Acceleration on Mobile Devices", ECCV 2018). Docs: README.md#agents.
# CleanRL's ddpg_continuous_action.py with AMC's episodic changes: a single env with the flat
# layer-embedding observation (FlatObservation, its layer features scaled to [0, 1] over the
# layers as AMC does) and a continuous action in [0, 1] mapped onto the catalog's levels
# (ContinuousAction; the budget reward's mask is AMC's action wall, and the replay buffer keeps
# the actor's action, not the walled one, as AMC does), warm-up episodes of uniform random
# actions, truncated-normal exploration whose width decays once per episode, the episode's
# terminal reward minus a moving-average baseline given to every transition of the episode,
# gamma = 1, soft target updates.
import os
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from scipy.stats import truncnorm
from tqdm.auto import tqdm

import autosculpt_env  # noqa: F401  (registers the env ids)
from autosculpt_env.evaluation_limit import limit_reward_evaluations
from autosculpt_env.tracking import BestEpisode, check_args, finish_run, start_run
from autosculpt_env.wrappers import ContinuousAction, FlatObservation


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
    """whether to save the actor's weights into the run folder"""
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
    total_timesteps: int = 9600
    """total env steps (one step = one layer decision); only whole episodes are played"""
    max_reward_evaluations: int | None = None
    """the most reward evaluations (finished episodes) to spend, counted and enforced by the
    env; when given, it is the run's length (total_timesteps is ignored)"""
    actor_learning_rate: float = 1e-4
    """the learning rate of the actor's optimizer (AMC: 1e-4)"""
    critic_learning_rate: float = 1e-3
    """the learning rate of the critic's optimizer (AMC: 1e-3)"""
    hidden_dim: int = 300
    """width of the two hidden layers of the actor and the critic (AMC: 300)"""
    buffer_size: int = 2000
    """the replay memory buffer size (transitions)"""
    gamma: float = 1.0
    """the discount factor gamma (AMC: 1)"""
    tau: float = 0.01
    """target smoothing coefficient (AMC: 0.01)"""
    batch_size: int = 64
    """the batch size of sample from the replay memory (AMC: 64)"""
    warmup_episodes: int = 50
    """episodes of uniform random actions before learning starts (AMC: 100 of 800)"""
    exploration_sigma: float = 0.5
    """initial width of the truncated-normal exploration noise (AMC: 0.5)"""
    sigma_decay: float = 0.95
    """the noise width is multiplied by this after every episode past the warm-up (AMC: 0.95)"""
    baseline_alpha: float = 0.5
    """step size of the moving-average reward baseline (AMC: 0.5)"""


def env_overrides(args: Args) -> dict:
    keys = ("dataset", "evaluation", "target_flops_reduction", "catalog", "reward")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def layer_feature_scaling(env: FlatObservation) -> tuple[np.ndarray, np.ndarray]:
    """Offset and scale that map each layer feature onto [0, 1] over the network's layers
    (AMC's normalised layer embedding). The episode-state features are already in [0, 1] and
    stay as they are. Walks the layers without finishing the episode: no reward evaluation."""
    obs, info = env.reset()
    rows = [obs]
    for _ in range(env.unwrapped.num_layers - 1):
        obs, _, _, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
        rows.append(obs)
    rows = np.stack(rows)
    lo, hi = rows.min(0), rows.max(0)
    static = np.zeros(rows.shape[1], dtype=bool)
    static[: env.layout.block("chosen").start] = True  # before the chosen-action one-hot
    lo, hi = np.where(static, lo, 0.0), np.where(static, hi, 1.0)
    return lo.astype(np.float32), np.where(hi - lo > 1e-8, hi - lo, 1.0).astype(np.float32)


def make_env(env_id: str, overrides: dict):
    def thunk():
        env = FlatObservation(gym.make(env_id, **overrides))
        lo, scale = layer_feature_scaling(env)
        env = gym.wrappers.TransformObservation(
            env, lambda o: (o - lo) / scale, env.observation_space
        )
        return ContinuousAction(env)

    return thunk


# ALGO LOGIC: initialize agent here:
class QNetwork(nn.Module):
    def __init__(self, num_features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(num_features + 1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Actor(nn.Module):
    def __init__(self, num_features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mu = nn.Linear(hidden, 1)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return torch.sigmoid(self.fc_mu(x))  # the action space is Box(0, 1)


class ReplayBuffer:
    """A ring buffer of (obs, action, reward, next_obs, done) transitions."""

    def __init__(self, size: int, num_features: int):
        self.obs = np.zeros((size, num_features), dtype=np.float32)
        self.next_obs = np.zeros((size, num_features), dtype=np.float32)
        self.actions = np.zeros((size, 1), dtype=np.float32)
        self.rewards = np.zeros((size, 1), dtype=np.float32)
        self.dones = np.zeros((size, 1), dtype=np.float32)
        self.size, self.pos, self.full = size, 0, False

    def add(self, obs, next_obs, action, reward, done) -> None:
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.dones[i] = reward, done
        self.pos = (self.pos + 1) % self.size
        self.full = self.full or self.pos == 0

    def __len__(self) -> int:
        return self.size if self.full else self.pos

    def sample(self, batch_size: int, rng: np.random.Generator):
        idx = rng.integers(0, len(self), size=batch_size)
        return tuple(
            torch.as_tensor(a[idx])
            for a in (self.obs, self.actions, self.rewards, self.next_obs, self.dones)
        )


def truncated_normal(mu: float, sigma: float, rng: np.random.Generator) -> float:
    """A sample of N(mu, sigma) truncated to [0, 1] (AMC's exploration)."""
    a, b = (0.0 - mu) / sigma, (1.0 - mu) / sigma
    return float(truncnorm.rvs(a, b, loc=mu, scale=sigma, random_state=rng))


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
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cpu")

    # env setup
    env = make_env(args.env_id, env_overrides(args))()
    assert isinstance(env.action_space, gym.spaces.Box), "only continuous action space is supported"
    base = env.unwrapped
    num_features = env.observation_space.shape[0]
    best = BestEpisode(env, run_dir, extra={"agent": args.exp_name, "seed": args.seed})
    evaluations = limit_reward_evaluations(args.max_reward_evaluations)  # the env keeps the count

    actor = Actor(num_features, args.hidden_dim).to(device)
    qf1 = QNetwork(num_features, args.hidden_dim).to(device)
    qf1_target = QNetwork(num_features, args.hidden_dim).to(device)
    target_actor = Actor(num_features, args.hidden_dim).to(device)
    target_actor.load_state_dict(actor.state_dict())
    qf1_target.load_state_dict(qf1.state_dict())
    q_optimizer = optim.Adam(qf1.parameters(), lr=args.critic_learning_rate)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.actor_learning_rate)
    rb = ReplayBuffer(args.buffer_size, num_features)

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    # the limit, when given, is the run's length (one reward evaluation per episode)
    num_episodes = evaluations.limit or args.total_timesteps // base.num_layers
    total = num_episodes
    bar = tqdm(total=total, disable=not args.progress, unit="eval", dynamic_ncols=True)
    obs, _ = env.reset(seed=args.seed)
    baseline = None
    for episode in range(num_episodes):
        if evaluations.limit_reached:
            break
        # ALGO LOGIC: exploration noise, constant during the warm-up, then decaying per episode
        warmup = episode < args.warmup_episodes
        sigma = args.exploration_sigma * args.sigma_decay ** max(0, episode - args.warmup_episodes)
        trajectory = []
        terminated = False
        while not terminated:
            global_step += 1
            if warmup:
                action = float(rng.uniform(0.0, 1.0))
            else:
                with torch.no_grad():
                    mu = float(actor(torch.as_tensor(obs[None], dtype=torch.float32))[0, 0])
                action = truncated_normal(mu, sigma, rng)

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminated, truncated, info = env.step(np.array([action], np.float32))
            trajectory.append((obs, next_obs, action, terminated))
            obs = next_obs
        bar.update(1)
        improved = best.update(info, float(reward), global_step)
        writer.add_scalar("charts/episodic_return", reward, global_step)
        writer.add_scalar("charts/episodic_length", base.num_layers, global_step)
        writer.add_scalar("charts/accuracy", info["accuracy"], global_step)
        writer.add_scalar("charts/flops_reduction", info["flops_reduction"], global_step)
        writer.add_scalar("charts/best_reward", best.reward, global_step)
        writer.add_scalar("charts/reward_evaluations", info["reward_evaluations"], global_step)
        if not warmup:
            writer.add_scalar("charts/exploration_sigma", sigma, global_step)
        if improved:
            bar.set_postfix(
                best=f"{best.reward:.4f}",
                acc=f"{info['accuracy']:.4f}",
                flops=f"-{info['flops_reduction']:.2f}",
            )
        obs, _ = env.reset()

        # ALGO LOGIC: every transition of the episode gets its terminal reward minus the moving
        # average of past terminal rewards (AMC's variance-reducing baseline)
        baseline = float(reward) if baseline is None else baseline
        for o, no, a, d in trajectory:
            rb.add(o, no, a, float(reward) - baseline, float(d))
        baseline += args.baseline_alpha * (float(reward) - baseline)
        writer.add_scalar("charts/reward_baseline", baseline, global_step)

        # ALGO LOGIC: training, one update per transition once the warm-up is over
        if warmup or len(rb) < args.batch_size:
            continue
        for _ in trajectory:
            b_obs, b_actions, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size, rng)
            with torch.no_grad():
                next_state_actions = target_actor(b_next_obs)
                qf1_next_target = qf1_target(b_next_obs, next_state_actions)
                next_q_value = b_rewards + (1 - b_dones) * args.gamma * qf1_next_target

            qf1_a_values = qf1(b_obs, b_actions)
            qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
            q_optimizer.zero_grad()
            qf1_loss.backward()
            q_optimizer.step()

            actor_loss = -qf1(b_obs, actor(b_obs)).mean()
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()

            # update the target networks
            for param, target_param in zip(actor.parameters(), target_actor.parameters()):
                target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)
            for param, target_param in zip(qf1.parameters(), qf1_target.parameters()):
                target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)

        writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
        writer.add_scalar("losses/critic_loss", qf1_loss.item(), global_step)
        writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

    bar.close()
    if args.save_model:
        torch.save(actor.state_dict(), run_dir / f"{args.exp_name}.pt")
    env.close()
    finish_run(writer, args.track)
    print(
        f"{args.env_id}: {global_step} env steps, {evaluations.used} reward evaluations, {time.time() - start_time:.0f}s"
    )
    print(best.summary())
    raise SystemExit(best.exit_status())
