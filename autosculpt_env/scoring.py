"""The leaderboard score of a policy: test accuracy after the fixed fine-tuning.

This is the one place where the ``test`` split is read. The leaderboard
(:mod:`autosculpt_env.leaderboard`) scores every row with :func:`score_policy`, and the
reward-fidelity benchmark (:mod:`autosculpt_env.fidelity`) uses the same function as its
ground truth, so "the score a reward stands for" is one definition.

The fine-tuning always starts from the network that the plain ``accuracy`` evaluation
scores (masks applied, removed channels zeroed, batch norms recalibrated), whatever
``evaluation=`` the env was built with: the score of a policy does not depend on which
reward was used to find it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import data as data_mod
from .finetune import default_recipe, finetune
from .training import Recipe, accuracy


@dataclass
class Score:
    """One fine-tuning run and its test accuracy."""

    test_accuracy: float
    model: nn.Module
    masks: dict[str, torch.Tensor]
    recipe: Recipe
    seed: int
    seconds: float


def score_policy(
    env,
    policy: Sequence[int] | Sequence[str],
    recipe: Recipe | None = None,
    seed: int = 0,
    train_samples: int | None = None,
    progress: bool = False,
) -> Score:
    """Fine-tune ``policy``'s pruned network (masks held exactly) and measure test accuracy.

    Args:
        env: an AutoSculpt env (wrapped or not).
        policy: one action index or name per layer.
        recipe: fine-tuning recipe; default :func:`~autosculpt_env.finetune.default_recipe`.
        seed: seeds the fine-tuning's batch order and augmentation.
        train_samples: fine-tune on a fixed subset of the ``train`` split (default: all).
        progress: show a progress bar.
    """
    base = env.unwrapped
    kwargs = base.env_kwargs
    recipe = default_recipe(kwargs["dataset"]) if recipe is None else recipe
    t0 = time.perf_counter()
    model, masks = finetune(
        env, policy, recipe, seed=seed, progress=progress, train_samples=train_samples
    )
    seconds = time.perf_counter() - t0
    test = data_mod.load(kwargs["dataset"], "test", kwargs.get("data_dir"))
    return Score(accuracy(model, test), model, masks, recipe, seed, seconds)


def test_accuracy(model: nn.Module, env) -> float:
    """Test accuracy of ``model`` (e.g. a pruned network before fine-tuning) on ``env``'s dataset."""
    kwargs = env.unwrapped.env_kwargs
    return accuracy(model, data_mod.load(kwargs["dataset"], "test", kwargs.get("data_dir")))
