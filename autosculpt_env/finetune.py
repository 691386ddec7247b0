"""Fine-tuning a pruned network with its pruning held exactly, and storing the result.

:func:`finetune` starts from the network the env scored (:meth:`AutoSculptEnv.pruned_model`:
masks applied, removed channels zeroed, batch norms recalibrated) and trains it on the
``train`` split. The pruning is *held*, not approximately kept:

* every held parameter has a keep-mask (:meth:`PruningProblem.held_masks`, the same masks
  the env applied to score the policy): the prunable layers' weights
  (the pattern assignment), and, for every fully removed output channel, the layer's bias
  and the scale and shift of the batch norms after it (which is what makes the channel
  exactly zero, and its consumers' multiply-adds dead, in the cost model);
* gradients of held-at-zero entries are zeroed after ``backward`` (``grad_hook``), so
  momentum buffers and Adam moments never pick them up, and the masks are re-applied
  *after* every optimizer step (``after_step``); re-applying them before the step, as the
  AutoSculpt authors' code does, lets momentum and weight decay move pruned weights again;
* the FLOPs and parameter counts of the fine-tuned network are therefore exactly those of
  the record that found the policy.

:func:`save` writes the fine-tuned weights and the masks as safetensors (masks as
``uint8``, 1 = kept) beside the episode record, so the pattern assignment always travels
with the weights; :func:`load` rebuilds the architecture from the record (zoo models) and
checks the weights against the masks.

Files of a saved directory::

    model.safetensors   the network's state_dict (weights and batch-norm statistics)
    masks.safetensors   {parameter name: uint8 keep-mask}, e.g. "layer1.0.conv1.weight"
    record.json         the EpisodeRecord (env id and kwargs, actions, metrics; the
                        fine-tuning recipe and seed under extra["finetune"])
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import data as data_mod
from .records import EpisodeRecord, default_file_mode, make_env
from .traceable import make_traceable
from .training import Recipe, train

FINETUNE_RECIPE = Recipe(
    epochs=1,
    optimizer="sgd",
    lr=0.01,
    weight_decay=5e-4,
    batch_size=128,
    crop_padding=2,
    hflip=True,
)
"""The leaderboard's fine-tuning recipe for 28x28 / 32x32 datasets: one epoch of SGD
(Nesterov, lr 0.01 with a quarter-epoch warm-up and cosine decay), the zoo's augmentation.
About a minute per model on one CPU core for Fashion-MNIST's 55,000 training images."""

DIGITS_FINETUNE_RECIPE = Recipe(
    epochs=10, optimizer="sgd", lr=0.02, batch_size=64, crop_padding=1, hflip=False
)
"""Fine-tuning recipe of the digits twins (1,317 training images, about 2 s on one core;
no flips for digits)."""

FINETUNE_RECIPES: dict[str, Recipe] = {
    "fashion-mnist": FINETUNE_RECIPE,
    "digits": DIGITS_FINETUNE_RECIPE,
    "cifar10": FINETUNE_RECIPE,
    "cifar100": FINETUNE_RECIPE,
}

WEIGHTS_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
RECORD_FILE = "record.json"


def default_recipe(dataset: str) -> Recipe:
    """The fine-tuning recipe of a dataset (:data:`FINETUNE_RECIPES`)."""
    data_mod.info(dataset)
    return FINETUNE_RECIPES.get(dataset, FINETUNE_RECIPE)


def _as_env(env_or_record):
    """``(env, record or None, owned)``: an env built from a record is closed by the caller."""
    if isinstance(env_or_record, EpisodeRecord):
        return make_env(env_or_record), env_or_record, True
    if isinstance(env_or_record, (str, os.PathLike)):
        record = EpisodeRecord.load(env_or_record)
        return make_env(record), record, True
    return env_or_record, None, False


def _targets(
    model: nn.Module, masks: dict[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    out = []
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of {type(model).__name__}")
        p = params[name]
        if tuple(keep.shape) != tuple(p.shape):
            raise ValueError(
                f"mask {name!r} has shape {tuple(keep.shape)}, parameter has {tuple(p.shape)}"
            )
        out.append((p, ~keep.to(device=p.device, dtype=torch.bool)))
    return out


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first parameter with a nonzero entry where its mask is 0."""
    for (name, _), (p, drop) in zip(masks.items(), _targets(model, masks)):
        bad = int((p.detach()[drop] != 0).sum())
        if bad:
            raise ValueError(f"{name}: {bad} entries are nonzero where the mask removes them")


def train_subset(
    dataset: str, samples: int | None, data_dir=None, setting: str = "train_samples"
) -> data_mod.ImageDataset:
    """The ``train`` split, or a fixed seeded subset of ``samples`` images of it.

    Raises:
        ValueError: ``samples`` is more than the split holds (named as ``setting``); it is
            refused, not cut, so that what a record states is what was used.
    """
    train_ds = data_mod.load(dataset, "train", data_dir)
    if samples is not None:
        data_mod.check_samples(setting, samples, dataset, "train", data_dir)
    if samples is None or samples == len(train_ds):
        return train_ds
    g = torch.Generator().manual_seed(data_mod.SPLIT_SEED)
    idx = torch.randperm(len(train_ds), generator=g)[:samples].sort().values
    return data_mod.ImageDataset(
        train_ds.images[idx].contiguous(), train_ds.labels[idx], train_ds.info, "train"
    )


def train_held(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    data: data_mod.ImageDataset,
    recipe: Recipe,
    seed: int = 0,
    progress: bool = False,
    desc: str = "fine-tune",
) -> nn.Module:
    """Train ``model`` in place with every masked entry held at exactly zero.

    Gradients of masked entries are zeroed after ``backward`` and the masks are re-applied
    after every optimizer step (see the module docstring for why in that order). Batch norms
    left with a cumulative average (``momentum=None``, as the env's recalibration leaves
    them) go back to the usual running average, so their statistics follow the new weights.
    The fine-tuning of the leaderboard and the ``recovery`` reward both train this way.

    Returns:
        ``model`` in eval mode.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            m.momentum = 0.1
    targets = _targets(model, masks)

    def mask_gradients(net: nn.Module) -> None:
        for p, drop in targets:
            if p.grad is not None:
                p.grad.masked_fill_(drop, 0.0)

    def hold_masks(net: nn.Module) -> None:
        with torch.no_grad():
            for p, drop in targets:
                p.masked_fill_(drop, 0.0)

    train(
        model,
        data,
        recipe,
        seed=seed,
        after_step=hold_masks,
        grad_hook=mask_gradients,
        progress=progress,
        desc=desc,
    )
    return model.eval()


def finetune(
    env_or_record,
    policy: Sequence[int] | Sequence[str] | None = None,
    recipe: Recipe | None = None,
    seed: int = 0,
    progress: bool = True,
    train_samples: int | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Fine-tune the pruned network of ``policy`` with its masks held exactly.

    Args:
        env_or_record: an AutoSculpt env (``gym.make`` result or unwrapped), an
            :class:`EpisodeRecord`, or the path of a record JSON file.
        policy: one action (index or name) per layer; defaults to the record's actions.
        recipe: the training recipe; default :func:`default_recipe` of the env's dataset.
        seed: seeds batch order and augmentation.
        progress: show a progress bar.
        train_samples: fine-tune on a fixed subset of this many ``train`` images (default:
            the whole split).

    Returns:
        ``(model, masks)``: the fine-tuned network in eval mode, and ``{parameter name:
        bool keep-mask}`` (:meth:`PruningProblem.held_masks`); every masked entry of ``model`` is exactly 0.
    """
    env, record, owned = _as_env(env_or_record)
    try:
        base = env.unwrapped
        if policy is None:
            if record is None:
                raise ValueError("pass a policy, or a record whose actions are fine-tuned")
            policy = record.actions
        problem = base.problem
        idx = problem.policy_indices(policy)
        problem.check_policy(idx)
        kwargs = base.env_kwargs
        dataset = kwargs["dataset"]
        recipe = default_recipe(dataset) if recipe is None else recipe
        model = base.pruned_model(idx)
        masks = problem.held_masks(idx)
        check_masks(model, masks)
        data = train_subset(dataset, train_samples, kwargs.get("data_dir"))
        train_held(model, masks, data, recipe, seed=seed, progress=progress, desc="fine-tune")
        check_masks(model, masks)
        return model.eval(), masks
    finally:
        if owned:
            env.close()


# --------------------------------------------------------------------------- storage
def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would keep the weights private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(
    path_dir: str | os.PathLike,
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    record: EpisodeRecord,
) -> Path:
    """Write ``model.safetensors``, ``masks.safetensors`` and ``record.json`` into ``path_dir``.

    Each file is written under a temporary name and renamed into place.
    """
    check_masks(model, masks)
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"env_id": record.env_id, "record": RECORD_FILE, "masks": MASKS_FILE}
    _atomic_save_file(state, out / WEIGHTS_FILE, meta)
    packed = {k: v.detach().to(torch.uint8).contiguous() for k, v in masks.items()}
    _atomic_save_file(
        packed,
        out / MASKS_FILE,
        {
            "format": "uint8 keep-mask per parameter, 1 = kept",
            "actions": json.dumps(record.actions),
        },
    )
    record.save(out / RECORD_FILE)
    return out


def load(
    path_dir: str | os.PathLike, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor], EpisodeRecord]:
    """Reload a directory written by :func:`save`: ``(model, masks, record)``.

    Args:
        path_dir: the directory.
        model: an untrained instance of the architecture, for networks outside the zoo (its
            ``torch.nn`` transformer modules are made traceable first, as the env did); by
            default the zoo entry named by the record's ``model`` and ``dataset`` is built.

    Raises:
        ValueError: the weights do not fit the architecture, or a masked entry is nonzero.
    """
    from . import zoo

    src = Path(path_dir)
    record = EpisodeRecord.load(src / RECORD_FILE)
    if model is not None:
        model = make_traceable(model)
    else:
        name = record.env_kwargs.get("model", "resnet20")
        if not isinstance(name, str) or name.startswith("<"):
            raise ValueError(
                f"the record's model {name!r} is not a zoo model; pass model= (an instance of "
                "the architecture) to load()"
            )
        model = zoo.entry(name, record.env_kwargs.get("dataset", "fashion-mnist")).build()
    state = load_file(str(src / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{src / WEIGHTS_FILE} does not fit {type(model).__name__}: {e}") from e
    masks = {k: v.bool() for k, v in load_file(str(src / MASKS_FILE)).items()}
    check_masks(model, masks)
    return model.eval(), masks, record
