"""How fast is the environment? Every figure comes from one run, so ratios are meaningful.

    python benchmarks/env_speed.py --env-id AutoSculpt-ResNet

(a) a bare dense forward pass over the reward subset plus the batch-norm recalibration
    pass (plain PyTorch, no env): the floor any evaluation pays;
(b) a full episode with an unseen policy (every step, the masking, the evaluation);
(c) a non-terminal step;
(d) an episode whose policy is cached;
(e) proxy-mode steps per second;
and the ratio b / a. Targets: b / a <= 1.10, c <= 1 ms, e >= 10,000 steps/s.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn

import autosculpt_env  # noqa: F401


@dataclass
class Args:
    env_id: str = "AutoSculpt-ResNet"
    """environment id"""
    dataset: str | None = None
    """override the dataset (e.g. digits)"""
    repeats: int = 5
    """repetitions of each timed quantity (the median is reported)"""
    threads: int = 2
    """torch CPU threads"""


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bare_forward(env) -> None:
    """What any evaluation must do: recalibrate batch norms, then one pass over the reward subset."""
    ev = env.unwrapped.evaluator
    net = bare_forward.net
    with torch.no_grad():
        if ev.recal_images is not None:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None
            net.train()
            for i in range(0, len(ev.recal_images), 256):
                net(ev.recal_images[i : i + 256])
            net.eval()
        for i in range(0, len(ev.images), 1024):
            net(ev.images[i : i + 1024]).argmax(1)


def episode(env, policy) -> float:
    env.reset(seed=0)
    r = 0.0
    for a in policy:
        _, r, _, _, _ = env.step(a)
    return r


def random_valid_policies(env, n: int, rng) -> list[list[int]]:
    out = []
    for _ in range(n):
        _, info = env.reset(seed=0)
        pol, done = [], False
        while not done:
            a = int(rng.choice(np.flatnonzero(info["action_mask"])))
            pol.append(a)
            _, _, done, _, info = env.step(a)
        out.append(pol)
    return out


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    kw = {} if args.dataset is None else {"dataset": args.dataset}
    env = gym.make(args.env_id, **kw)
    base = env.unwrapped
    bare_forward.net = copy.deepcopy(base.problem.model).eval()
    rng = np.random.default_rng(0)
    # policies are drawn with the proxy env so drawing them costs no evaluation here
    proxy = gym.make(args.env_id, evaluation="proxy", **kw)
    policies = random_valid_policies(proxy, args.repeats + 1, rng)

    bare_forward(env)  # warm-up
    a = timed(lambda: bare_forward(env), args.repeats)
    unseen = iter(policies)
    b = timed(lambda: episode(env, next(unseen)), args.repeats)

    cached = policies[0]
    episode(env, cached)
    d = timed(lambda: episode(env, cached), args.repeats)

    # a non-terminal step: time all but the last step of an episode
    steps, n_steps = 0.0, 0
    for pol in policies[:3]:
        env.reset(seed=0)
        t = time.perf_counter()
        for act in pol[:-1]:
            env.step(act)
        steps += time.perf_counter() - t
        n_steps += len(pol) - 1
        env.step(pol[-1])
    c = steps / n_steps

    # proxy mode: steps per second over whole episodes (terminal steps included)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        for pol in policies:
            proxy.reset(seed=0)
            for act in pol:
                proxy.step(act)
            n += len(pol)
    e = n / (time.perf_counter() - t0)

    ev = base.evaluator
    recal = 0 if ev.recal_images is None else len(ev.recal_images)
    print(
        f"{args.env_id} ({base.problem.model_name}, {len(base.layer_names)} layers, {len(ev.labels)} reward images, {recal} recalibration images, {args.threads} threads)"
    )
    print(f"(a) bare forward + recalibration   {1000 * a:8.1f} ms")
    print(f"(b) episode, unseen policy         {1000 * b:8.1f} ms")
    print(f"(c) non-terminal step              {1000 * c:8.3f} ms   (target <= 1 ms)")
    print(f"(d) episode, cached policy         {1000 * d:8.3f} ms")
    print(f"(e) proxy mode                     {e:8.0f} steps/s (target >= 10,000)")
    print(f"b / a = {b / a:.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main(tyro.cli(Args))
