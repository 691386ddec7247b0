"""How fast is the environment? Every figure comes from one run, so ratios are meaningful.

    python benchmarks/env_speed.py --env-id AutoSculpt-ResNet

(a) a bare dense forward pass over the reward subset (plain PyTorch, no env): the unit the
    reward-fidelity benchmark states costs in;
(b) a full episode with an unseen policy under the env's reward (its default ``evaluation=``
    unless ``--evaluation`` says otherwise: every step, the masking, the evaluation);
(c) a non-terminal step;
(d) an episode whose policy is cached;
(e) proxy-mode steps per second (only where a surrogate is shipped or cached: building one
    means scoring hundreds of policies);
and the ratio b / a. Targets: b / a <= 5 (the default reward's cost goal), c <= 1 ms,
e >= 10,000 steps/s.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass

import gymnasium as gym
import torch
import tyro

import autosculpt_env  # noqa: F401
from autosculpt_env.fidelity import random_valid_policy


@dataclass
class Args:
    env_id: str = "AutoSculpt-ResNet"
    """environment id"""
    dataset: str | None = None
    """override the dataset (e.g. digits)"""
    evaluation: str | None = None
    """override the env's reward (``evaluation=`` mode; default: the env id's)"""
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
    """A plain dense forward over the reward subset: the unit of the cost ratio."""
    images = env.unwrapped.evaluator.images
    with torch.no_grad():
        for i in range(0, len(images), 1024):
            bare_forward.net(images[i : i + 1024]).argmax(1)


def episode(env, policy) -> float:
    env.reset(seed=0)
    r = 0.0
    for a in policy:
        _, r, _, _, _ = env.step(a)
    return r


def shipped_or_cached_proxy(env, env_id: str, kw: dict):
    """A proxy-mode env if the surrogate for ``env``'s configuration is shipped or cached,
    else ``None`` (never builds one)."""
    from autosculpt_env import surrogate

    key, _ = surrogate.env_key(env)  # any evaluation= mode gives the proxy's key
    target = env.unwrapped.target
    cached = surrogate.fit_path(key, target, surrogate.FIRST_USE_DESIGN).exists()
    if surrogate.find_shipped(key, target) is None and not cached:
        return None
    return gym.make(env_id, evaluation="proxy", **kw)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    kw = {} if args.dataset is None else {"dataset": args.dataset}
    env = gym.make(
        args.env_id, **kw, **({} if args.evaluation is None else {"evaluation": args.evaluation})
    )
    base = env.unwrapped
    bare_forward.net = copy.deepcopy(base.problem.model).eval()
    rng = random.Random(0)  # drawn from the action masks, none of them scored
    policies = [random_valid_policy(env, rng) for _ in range(args.repeats + 1)]

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
    proxy = shipped_or_cached_proxy(env, args.env_id, kw)
    e = None
    if proxy is not None:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            for pol in policies:
                proxy.reset(seed=0)
                for act in pol:
                    proxy.step(act)
                n += len(pol)
        e = n / (time.perf_counter() - t0)

    ev = base.evaluator
    print(
        f"{args.env_id} ({base.problem.model_name}, {len(base.layer_names)} layers, "
        f"evaluation={base.evaluation!r}, {len(ev.labels)} reward images, {args.threads} threads)"
    )
    print(f"(a) bare forward                   {1000 * a:8.1f} ms")
    print(f"(b) episode, unseen policy         {1000 * b:8.1f} ms")
    print(f"(c) non-terminal step              {1000 * c:8.3f} ms   (target <= 1 ms)")
    print(f"(d) episode, cached policy         {1000 * d:8.3f} ms")
    if e is None:
        print(
            "(e) proxy mode                     no surrogate shipped or cached for this configuration"
        )
    else:
        print(f"(e) proxy mode                     {e:8.0f} steps/s (target >= 10,000)")
    print(f"b / a = {b / a:.2f}   (target <= 5)")


if __name__ == "__main__":
    main(tyro.cli(Args))
