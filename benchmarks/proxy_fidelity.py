"""How well does proxy evaluation rank policies? Spearman correlation with true accuracy.

    python benchmarks/proxy_fidelity.py --env-id AutoSculpt-ResNet --policies 50

Draws random valid policies (uniform over the valid actions at every step, seeded), scores
each with the proxy model and with true accuracy on the reward split, and prints the rank
correlation. The first run also measures the proxy table (cached on disk afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import autosculpt_env  # noqa: F401


@dataclass
class Args:
    env_id: str = "AutoSculpt-ResNet"
    """environment id"""
    dataset: str | None = None
    """override the dataset (e.g. digits)"""
    policies: int = 50
    """number of random policies"""
    seed: int = 0
    """seed of the random policies"""
    threads: int = 2
    """torch CPU threads"""


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    kw = {} if args.dataset is None else {"dataset": args.dataset}
    proxy = gym.make(args.env_id, evaluation="proxy", **kw)
    exact = gym.make(args.env_id, **kw).unwrapped
    rng = np.random.default_rng(args.seed)
    pairs = []
    for _ in tqdm(range(args.policies), desc="policies"):
        _, info = proxy.reset(seed=0)
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(info["action_mask"])))
            _, _, done, _, info = proxy.step(a)
        pairs.append((info["accuracy"], exact.evaluate_policy(info["policy"])["accuracy"]))
    p, t = np.array(pairs).T
    rho = spearmanr(p, t).statistic
    print(
        f"{args.env_id}{' ' + str(kw) if kw else ''}: {args.policies} random policies (seed {args.seed})"
    )
    print(f"true accuracy  mean {t.mean():.4f}  min {t.min():.4f}  max {t.max():.4f}")
    print(f"proxy accuracy mean {p.mean():.4f}  min {p.min():.4f}  max {p.max():.4f}")
    print(f"Spearman rank correlation (proxy vs true): {rho:.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
