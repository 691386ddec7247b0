"""Reward evaluation: how accurate is the network under a pruning policy?

Two evaluators answer ``accuracy(policy)``:

* :class:`AccuracyEvaluator` (``evaluation="accuracy"``): writes the policy's masks into a
  private copy of the network (parameters are overwritten in place; no deep copy per call,
  and layers whose action did not change since the last call are not rewritten),
  recalibrates batch-norm statistics on ``bn_recalibration_samples`` training images (a
  pruned network's activations no longer match the stored statistics; without this
  almost every pruned policy scores near chance), then measures top-1 accuracy on the
  first ``reward_samples`` images of the ``reward`` split. Results are memoised by policy.
* :class:`ProxyEvaluator` (``evaluation="proxy"``): a per-(layer, action) sensitivity
  table, measured once with the accuracy evaluator (each layer pruned alone, the others
  dense) and cached on disk. A policy's proxy accuracy is::

      proxy(policy) = clip(dense_acc - sum_l drop[l, a_l], 1 / num_classes, 1)
      drop[l, a]    = dense_acc - acc(layer l at action a, every other layer dense)

  i.e. per-layer accuracy drops are assumed additive, the usual first-order sensitivity
  model (AMC's and many pruning papers' layer-wise sensitivity analysis). It answers in
  microseconds; its rank agreement with true accuracy is reported in the README.

Neither evaluator ever reads the ``test`` split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from . import zoo
from .problem import PruningProblem

EVAL_BATCH = 1024
RECAL_BATCH = 256


class AccuracyEvaluator:
    """Top-1 accuracy on the reward split under a policy, memoised.

    Args:
        problem: the :class:`PruningProblem`.
        dataset: dataset name.
        data_dir: dataset folder.
        reward_samples: reward-split images scored (the first ones of the fixed split).
        bn_recalibration_samples: training images used to re-estimate batch-norm
            statistics before scoring (0 turns recalibration off).
    """

    def __init__(
        self,
        problem: PruningProblem,
        dataset: str,
        data_dir=None,
        reward_samples: int = 2048,
        bn_recalibration_samples: int = 1024,
    ):
        self.problem = problem
        reward = data_mod.load(dataset, "reward", data_dir)
        n = min(reward_samples, len(reward))
        self.images, self.labels = reward.images[:n], reward.labels[:n]
        self.norms = [
            m for m in problem.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.recal_images = None
        if bn_recalibration_samples > 0 and self.norms:
            train = data_mod.load(dataset, "train", data_dir)
            g = torch.Generator().manual_seed(data_mod.SPLIT_SEED)
            idx = torch.randperm(len(train), generator=g)[
                : min(bn_recalibration_samples, len(train))
            ]
            self.recal_images = train.images[idx.sort().values]
        self.net = copy.deepcopy(problem.model).eval()
        self._net_norms = [
            m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._applied: list[int] | None = None
        self.cache: dict[tuple[int, ...], float] = {}
        self.num_forward = 0  # policies actually scored (cache misses)
        self.dense_accuracy = self(tuple([problem.dense_action] * problem.num_layers))

    def __call__(self, policy: Sequence[int]) -> float:
        key = tuple(int(a) for a in policy)
        if key not in self.cache:
            self.cache[key] = self._score(key)
        return self.cache[key]

    def _score(self, policy: tuple[int, ...]) -> float:
        self._apply(policy)
        with torch.no_grad():
            if self.recal_images is not None:
                self._recalibrate()
            correct = 0
            for i in range(0, len(self.labels), EVAL_BATCH):
                out = self.net(self.images[i : i + EVAL_BATCH])
                correct += (out.argmax(1) == self.labels[i : i + EVAL_BATCH]).sum().item()
        self.num_forward += 1
        return correct / len(self.labels)

    def _apply(self, policy: tuple[int, ...]) -> None:
        p = self.problem
        if self._applied is None:
            changed = list(range(p.num_layers))
        else:
            changed = [i for i, (a, b) in enumerate(zip(policy, self._applied)) if a != b]
        if changed:
            p.apply_policy(self.net, policy, layers=changed)
        self._applied = list(policy)

    def _recalibrate(self) -> None:
        for bn in self._net_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the recalibration batches
        self.net.train()
        for i in range(0, len(self.recal_images), RECAL_BATCH):
            self.net(self.recal_images[i : i + RECAL_BATCH])
        self.net.eval()

    def calibrated_model(self, policy: Sequence[int]) -> nn.Module:
        """A fresh copy of the network with the policy applied and batch norms recalibrated."""
        self._score(tuple(int(a) for a in policy))
        return copy.deepcopy(self.net).eval()


def _proxy_key(problem: PruningProblem, dataset: str, evaluator: AccuracyEvaluator) -> str:
    h = hashlib.sha256()
    for k, v in sorted(problem.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    meta = {
        "catalog": problem.catalog.name,
        "actions": problem.catalog.action_names,
        "dataset": dataset,
        "split": "reward",
        "reward_samples": len(evaluator.labels),
        "recal": 0 if evaluator.recal_images is None else len(evaluator.recal_images),
        "layers": [layer.name for layer in problem.layers],
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:20]


class ProxyEvaluator:
    """Additive per-layer sensitivity model of accuracy (see the module docstring).

    The table is measured once per (weights, catalog, dataset, reward subset) and stored in
    ``$AUTOSCULPT_CACHE/proxy/<key>.npz``.
    """

    def __init__(self, evaluator: AccuracyEvaluator, dataset: str, progress: bool = True):
        p = evaluator.problem
        self.problem = p
        self.dense_accuracy = evaluator.dense_accuracy
        self.floor = 1.0 / p.dataset_info.num_classes
        key = _proxy_key(p, dataset, evaluator)
        self.path = zoo.cache_dir() / "proxy" / f"{key}.npz"
        if self.path.exists():
            self.drop = np.load(self.path)["drop"]
        else:
            self.drop = self._measure(evaluator, progress and sys.stderr.isatty())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, drop=self.drop)
            Path(tmp).replace(self.path)
        self._rows = np.arange(p.num_layers)
        self.cache: dict[tuple[int, ...], float] = {}

    def _measure(self, evaluator: AccuracyEvaluator, progress: bool) -> np.ndarray:
        p = self.problem
        drop = np.full((p.num_layers, p.num_actions), np.nan)
        dense = [p.dense_action] * p.num_layers
        todo = [(i, a) for i in range(p.num_layers) for a in range(p.num_actions) if p.valid[i, a]]
        for i, a in tqdm(todo, desc="proxy sensitivity table", disable=not progress, leave=False):
            policy = list(dense)
            policy[i] = a
            drop[i, a] = self.dense_accuracy - evaluator(policy)
        return drop

    def __call__(self, policy: Sequence[int]) -> float:
        acc = self.dense_accuracy - float(
            self.drop[self._rows, np.asarray(policy, dtype=np.int64)].sum()
        )
        return float(min(1.0, max(self.floor, acc)))
