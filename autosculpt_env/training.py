"""Supervised training and evaluation loops shared by the zoo and fine-tuning.

One recipe object (:class:`Recipe`) names everything that decides a training run, so the
run can be written into a manifest and reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset


@dataclass(frozen=True)
class Recipe:
    """A training recipe.

    Attributes:
        epochs: passes over the training split.
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adamw"``.
        lr: peak learning rate (linear warm-up over the first epoch, then cosine to zero).
        weight_decay: decoupled for AdamW, L2 for SGD.
        batch_size: images per step.
        crop_padding: random-crop padding in pixels (0 turns it off).
        hflip: random horizontal flips.
        label_smoothing: cross-entropy label smoothing.
    """

    epochs: int = 15
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    crop_padding: int = 2
    hflip: bool = True
    label_smoothing: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def augment(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (after zero padding) and horizontal flip, per image, without a Python loop."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * padding)
        xp = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
        x = xp.gather(3, cols)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # no weight decay on norms, biases and embeddings (1-D parameters and ViT tokens)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose 'sgd' or 'adamw'")


def train(
    model: nn.Module,
    data: ImageDataset,
    recipe: Recipe,
    seed: int = 0,
    after_step: Callable[[nn.Module], None] | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place on ``data`` with ``recipe`` and return it in eval mode.

    Args:
        model: the network.
        data: the training split.
        recipe: the :class:`Recipe`.
        seed: seeds the batch order, augmentation and dropout.
        after_step: called after every optimizer step (fine-tuning re-applies masks here).
        grad_hook: called after ``backward`` and before the step (fine-tuning masks
            gradients here).
        progress: show a progress bar.
        desc: progress bar label.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, recipe)
    n = len(data)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 4)

    def lr_at(step: int) -> float:
        if step < warmup:
            return recipe.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * t))

    model.train()
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        for i in range(0, n, recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            x = augment(data.images[idx], recipe.crop_padding, recipe.hflip, gen)
            y = data.labels[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook(model)
            opt.step()
            if after_step is not None:
                after_step(model)
            running += loss.item() * len(idx)
            seen += len(idx)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module, data: ImageDataset, batch_size: int = 1024, limit: int | None = None
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on the first ``limit`` images of ``data``."""
    was_training = model.training
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    correct = 0
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        correct += (model(data.images[i:j]).argmax(1) == data.labels[i:j]).sum().item()
    model.train(was_training)
    return correct / n
