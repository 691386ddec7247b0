"""Reward evaluation: how accurate is the network under a pruning policy?

The evaluators answer ``accuracy(policy)``, one per ``evaluation=`` mode of the env
(:data:`EVALUATIONS`). Each estimates the same thing, the leaderboard score (test accuracy
after the fixed fine-tuning, :mod:`autosculpt_env.scoring`), at a different cost; how well
each one ranks policies like that score is measured by ``benchmarks/reward_fidelity.py``
(:mod:`autosculpt_env.fidelity`) and published in the README.

* :class:`AccuracyEvaluator` (``evaluation="accuracy"``): writes the policy's masks into a
  private copy of the network (parameters are overwritten in place; no deep copy per call,
  and layers whose action did not change since the last call are not rewritten),
  recalibrates batch-norm statistics on ``bn_recalibration_samples`` training images (a
  pruned network's activations no longer match the stored statistics; without this
  almost every pruned policy scores near chance), then measures top-1 accuracy on the
  first ``reward_samples`` images of the ``reward`` split. Results are memoised by policy.
* ``evaluation="reconstruction"`` (:class:`ReconstructionEvaluator`): the same, but each
  layer's kept weights are refitted by least squares to reproduce the dense layer's output
  on calibration activations, and removed channels are compensated in their consumers
  (:mod:`autosculpt_env.reconstruction`). Refits are computed once per (layer, action) and
  cached, so an evaluation still costs one forward pass.
* ``evaluation="recovery"`` (:class:`RecoveryEvaluator`): a short masked fine-tuning
  before scoring: one pass of the leaderboard's fine-tuning recipe over a fixed subset of
  ``recovery_samples`` training images, masks held exactly as :func:`finetune.finetune`
  holds them, then recalibration and scoring. ``evaluation="reconstruction+recovery"``
  starts that fine-tuning from the refitted weights.
* :class:`ProxyEvaluator` (``evaluation="proxy"``): a surrogate of another mode (the
  registered ids' default, :func:`autosculpt_env.surrogate.proxied_mode`), fitted on
  policies that mode scored: per-layer action, removed-energy and graph-pair interaction
  features, a model chosen by leave-one-sampler-out Spearman (:mod:`autosculpt_env.surrogate`,
  :mod:`autosculpt_env.policy_collection`). Shipped for the registered tasks, otherwise
  collected and fitted on first use and cached. It answers in microseconds; its held-out
  agreement is in ``benchmarks/PROXY_FIDELITY.md``.

Every mode but the proxy reads the scored network out on the reward images in one of
:data:`READOUTS` (``reward_readout=``): top-1 accuracy (the default), or the mean probability
the network gives the true class (its expected accuracy under its own predictive
distribution: smooth where accuracy moves in steps of one image).

No evaluator ever reads the ``test`` split; all of them are deterministic.
"""

from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from . import data as data_mod
from .finetune import default_recipe, train_held, train_subset
from .problem import PruningProblem
from .reconstruction import Reconstruction

EVAL_BATCH = 1024
RECAL_BATCH = 256

EVALUATIONS: tuple[str, ...] = (
    "accuracy",
    "reconstruction",
    "recovery",
    "reconstruction+recovery",
    "proxy",
)
"""The ``evaluation=`` modes of the env (see the module docstring)."""

MODE_SETTINGS: dict[str, tuple[str, ...]] = {
    "reconstruction": ("calibration_samples",),
    "recovery": ("recovery_samples", "recovery_batch_size"),
}
"""The env settings only some modes read: a mode reads those of the parts it names
(``reconstruction+recovery`` reads both)."""


READOUTS: tuple[str, ...] = ("accuracy", "probability")
"""How an evaluation reads the scored network out on the reward images (``reward_readout=``):
``accuracy``, the fraction of images whose top-1 class is right; ``probability``, the mean
softmax probability of the true class. Both lie in [0, 1] and equal 1 for a network that is
always right with certainty."""

DEFAULT_READOUT: str = READOUTS[0]
"""The readout every mode uses unless ``reward_readout=`` names another. An env at it writes
no ``reward_readout`` into its records and no readout into a surrogate's key, so records and
surrogates from before the readout existed still match."""


def check_readout(readout) -> str:
    """``readout`` if it is one of :data:`READOUTS`, else a ValueError naming them."""
    if readout not in READOUTS:
        raise ValueError(
            f"reward_readout must be one of {', '.join(map(repr, READOUTS))}, got {readout!r}"
        )
    return readout


def unused_settings(mode: str) -> set[str]:
    """The env settings that do not change what ``mode`` answers."""
    parts = set(mode.split("+"))
    return {name for part, names in MODE_SETTINGS.items() if part not in parts for name in names}


REWARD_SAMPLES = 2048
"""Reward-split images an evaluation scores unless told otherwise (the whole split when it
holds fewer: the digits twins' holds 120)."""

RECOVERY_SAMPLES = 1024
"""Training images of the ``recovery`` modes' short fine-tuning (one pass) unless told
otherwise (a zoo model may set its own: ``zoo.ZooModel.env_defaults``); the whole split when it
holds fewer. Chosen on the fidelity benchmark's competitive policies: on the CNN tasks
1,024 images at batch 16 rank like the fine-tuned score about as well as 2,048 or better at
about two thirds of the cost (MobileNet is the exception, within the intervals and at a cost
past the 5x bound; the figures are in the reward-fidelity report, README "Reward fidelity").
The ViT needs more (see :data:`RECOVERY_BATCH_SIZE`)."""

BN_RECALIBRATION_SAMPLES = 1024
"""Training images whose statistics the batch norms are re-estimated on before scoring
unless told otherwise (0 turns recalibration off)."""

CALIBRATION_SAMPLES = 256
"""Training images whose dense activations define the ``reconstruction`` refits unless told
otherwise."""

SAMPLE_SETTINGS: dict[str, tuple[str, int, int]] = {
    "reward_samples": ("reward", REWARD_SAMPLES, 1),
    "bn_recalibration_samples": ("train", BN_RECALIBRATION_SAMPLES, 0),
    "recovery_samples": ("train", RECOVERY_SAMPLES, 1),
    "calibration_samples": ("train", CALIBRATION_SAMPLES, 1),
}
"""``{setting: (split it draws from, default, smallest value)}`` for the env's image counts."""


def sample_settings(dataset: str, data_dir=None, defaults=None, **given) -> dict[str, int]:
    """The number of images each of :data:`SAMPLE_SETTINGS` uses, as an env records them.

    A setting given as ``None`` (or not given) takes its default (``defaults[name]``, a zoo
    model's own, else :data:`SAMPLE_SETTINGS`'), or the whole split when the split holds
    fewer images; a number is used as given, and refused when the split holds fewer (it is
    never cut silently, so a record states the number actually used).

    Raises:
        ValueError: a value that is not an integer, is below its minimum, or asks for more
            images than its split holds (the message names the value, the split's size and
            the fix).
    """
    unknown = set(given) - set(SAMPLE_SETTINGS)
    if unknown:
        raise TypeError(f"unknown sample settings {sorted(unknown)}")
    out = {}
    for name, (split, default, low) in SAMPLE_SETTINGS.items():
        default = (defaults or {}).get(name, default)
        value = given.get(name)
        if value is None:
            out[name] = min(default, data_mod.split_size(dataset, split, data_dir))
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(
                f"{name} must be an integer >= {low}, or None for {default} (the whole "
                f"{split} split when it holds fewer), got {value!r}"
            )
        else:
            out[name] = data_mod.check_samples(name, int(value), dataset, split, data_dir)
    return out


class AccuracyEvaluator:
    """Top-1 accuracy on the reward split under a policy, memoised.

    Args:
        problem: the :class:`PruningProblem`.
        dataset: dataset name.
        data_dir: dataset folder.
        reward_samples: reward-split images scored (the first ones of the fixed split).
        bn_recalibration_samples: training images used to re-estimate batch-norm
            statistics before scoring (0 turns recalibration off).
        readout: how the scored network is read out (:data:`READOUTS`).
    """

    def __init__(
        self,
        problem: PruningProblem,
        dataset: str,
        data_dir=None,
        reward_samples: int = REWARD_SAMPLES,
        bn_recalibration_samples: int = BN_RECALIBRATION_SAMPLES,
        readout: str = DEFAULT_READOUT,
    ):
        self.problem = problem
        self.readout = check_readout(readout)
        reward = data_mod.load(dataset, "reward", data_dir)
        n = data_mod.check_samples("reward_samples", reward_samples, dataset, "reward", data_dir)
        self.images, self.labels = reward.images[:n], reward.labels[:n]
        self.batch_norms = [
            m for m in problem.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.recal_images = None
        if bn_recalibration_samples > 0 and self.batch_norms:
            self.recal_images = train_subset(
                dataset, bn_recalibration_samples, data_dir, "bn_recalibration_samples"
            ).images
        self.net = copy.deepcopy(problem.model).eval()
        self._net_batch_norms = [
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
            total = 0.0
            for i in range(0, len(self.labels), EVAL_BATCH):
                out = self.net(self.images[i : i + EVAL_BATCH])
                y = self.labels[i : i + EVAL_BATCH]
                if self.readout == "accuracy":
                    total += (out.argmax(1) == y).sum().item()
                else:
                    prob = out.double().softmax(1).gather(1, y[:, None])
                    total += prob.sum().item()
        self.num_forward += 1
        return min(1.0, total / len(self.labels))  # a sum of probabilities may round past 1

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
        for bn in self._net_batch_norms:
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


class ReconstructionEvaluator(AccuracyEvaluator):
    """``evaluation="reconstruction"``: refitted kept weights instead of masked ones.

    Args:
        calibration_samples: training images whose dense activations define the refits.
        (the others as :class:`AccuracyEvaluator`)
    """

    def __init__(
        self,
        problem: PruningProblem,
        dataset: str,
        data_dir=None,
        reward_samples: int = REWARD_SAMPLES,
        bn_recalibration_samples: int = BN_RECALIBRATION_SAMPLES,
        calibration_samples: int = CALIBRATION_SAMPLES,
        readout: str = DEFAULT_READOUT,
    ):
        calib = train_subset(dataset, calibration_samples, data_dir, "calibration_samples").images
        self.reconstruction = Reconstruction(problem, calib)
        super().__init__(
            problem, dataset, data_dir, reward_samples, bn_recalibration_samples, readout
        )

    def _apply(self, policy: tuple[int, ...]) -> None:
        p, rec = self.problem, self.reconstruction
        old = self._applied
        changed = [
            i
            for i in range(p.num_layers)
            if old is None
            or policy[i] != old[i]
            or (i in rec.producer and policy[rec.producer[i]] != old[rec.producer[i]])
        ]
        if changed:
            # masks, removed channels' biases and batch norms as in plain evaluation ...
            p.apply_policy(self.net, policy, layers=changed)
            modules = dict(self.net.named_modules())
            with torch.no_grad():  # ... then the refitted kept weights
                for i in changed:
                    producer = rec.producer.get(i)
                    w = rec.weight(i, policy[i], None if producer is None else policy[producer])
                    modules[p.layers[i].name].weight.copy_(w)
        self._applied = list(policy)


RECOVERY_BATCH_SIZE = 16
"""Batch size of the ``recovery`` modes' short fine-tuning unless told otherwise. Smaller
batches mean more SGD steps over the same images; on the fidelity benchmark's 34 ViT@0.5
competitive policies, one pass over 2,048 images ranked like the fine-tuned score with
Spearman 0.13 at batch 128, 0.73 at 16 and 0.84 at 8 (within the 5x cost budget), so the ViT's
own defaults are batch 8 over 2,048 images (``zoo.ZooModel.env_defaults``; the
reward-fidelity report has every task's figures and costs)."""


def env_settings(
    model, dataset: str, data_dir=None, recovery_batch_size=None, reward_readout=None, **counts
) -> dict:
    """The image counts (:data:`SAMPLE_SETTINGS`), ``recovery_batch_size`` and
    ``reward_readout`` an env of ``model`` on ``dataset`` uses, as its record states them: a
    value given is used as given (a count refused past its split), one left at ``None`` takes
    the zoo model's own default (``zoo.ZooModel.env_defaults``) or the env's, a count cut to
    its split when it holds fewer (:func:`sample_settings`).

    Raises:
        ValueError: a batch size that is not an integer >= 1, a readout not in
            :data:`READOUTS`, or a count :func:`sample_settings` refuses.
    """
    from . import zoo

    own = zoo.env_defaults(model)
    if recovery_batch_size is None:
        recovery_batch_size = own.get("recovery_batch_size", RECOVERY_BATCH_SIZE)
    if (
        isinstance(recovery_batch_size, bool)
        or not isinstance(recovery_batch_size, numbers.Integral)
        or recovery_batch_size < 1
    ):
        raise ValueError(
            f"recovery_batch_size must be an integer >= 1, got {recovery_batch_size!r}"
        )
    if reward_readout is None:
        reward_readout = own.get("reward_readout", DEFAULT_READOUT)
    out = sample_settings(dataset, data_dir, own, **counts)
    out["recovery_batch_size"] = int(recovery_batch_size)
    out["reward_readout"] = check_readout(reward_readout)
    return out


def recovery_recipe(dataset: str, batch_size: int = RECOVERY_BATCH_SIZE):
    """The recipe of the ``recovery`` modes: one epoch of the dataset's fine-tuning recipe
    (:func:`finetune.default_recipe`) at ``batch_size``."""
    return replace(default_recipe(dataset), epochs=1, batch_size=int(batch_size))


class RecoveryEvaluator(AccuracyEvaluator):
    """``evaluation="recovery"``: a short masked fine-tuning before recalibration and scoring.

    One pass of the dataset's fine-tuning recipe at batch ``recovery_batch_size``
    (:func:`recovery_recipe`) over the first ``recovery_samples`` images of a fixed seeded subset of the
    ``train`` split, seed ``seed`` (0 in the env), masks held exactly
    (:func:`finetune.train_held`). With ``reconstruction=True`` the fine-tuning starts from the
    refitted weights. Another ``seed`` measures how much the reward depends on it
    (:func:`autosculpt_env.envs.autosculpt.seeded_reward_evaluator`).
    """

    def __init__(
        self,
        problem: PruningProblem,
        dataset: str,
        data_dir=None,
        reward_samples: int = REWARD_SAMPLES,
        bn_recalibration_samples: int = BN_RECALIBRATION_SAMPLES,
        recovery_samples: int = RECOVERY_SAMPLES,
        reconstruction: bool = False,
        calibration_samples: int = CALIBRATION_SAMPLES,
        recovery_batch_size: int = RECOVERY_BATCH_SIZE,
        seed: int = 0,
        readout: str = DEFAULT_READOUT,
    ):
        self.seed = int(seed)
        self.recovery_data = train_subset(dataset, recovery_samples, data_dir, "recovery_samples")
        self.recipe = recovery_recipe(dataset, recovery_batch_size)
        self._dense_state = {k: v.clone() for k, v in problem.model.state_dict().items()}
        self._base = (
            ReconstructionEvaluator(
                problem, dataset, data_dir, 1, 0, calibration_samples=calibration_samples
            )
            if reconstruction
            else None
        )
        super().__init__(
            problem, dataset, data_dir, reward_samples, bn_recalibration_samples, readout
        )

    def _apply(self, policy: tuple[int, ...]) -> None:
        # training moves every weight: start each evaluation from the pretrained network
        self.net.load_state_dict(self._dense_state)
        if self._base is None:
            self.problem.apply_policy(self.net, policy)
        else:
            self._base._apply(policy)
            self.net.load_state_dict(self._base.net.state_dict())
        masks = self.problem.held_masks(policy)
        with torch.random.fork_rng(devices=[]):  # leave the caller's (an agent's) RNG alone
            train_held(
                self.net, masks, self.recovery_data, self.recipe, seed=self.seed, desc="recovery"
            )
        self._applied = None


class ProxyEvaluator:
    """``evaluation="proxy"``: the accuracy another mode would give, as a fitted surrogate.

    Args:
        problem: the :class:`PruningProblem`.
        plain: the env's :class:`AccuracyEvaluator` (its data enter the surrogate's key).
        dataset: dataset name.
        mode: the ``evaluation=`` mode the proxy stands for.
        settings: ``(reward_samples, bn_recalibration_samples, recovery_samples,
            calibration_samples, recovery_batch_size)``.
        target: FLOPs target of the episodes the surrogate is fitted for.
        evaluator: returns ``mode``'s evaluator; called only if policies must be scored
            (nothing shipped or cached).
        progress: progress bar while collecting (when stderr is a terminal).
        readout: the readout of the mode it stands for (:data:`READOUTS`).
    """

    def __init__(
        self,
        problem: PruningProblem,
        plain: AccuracyEvaluator,
        dataset: str,
        mode: str,
        settings: tuple[int, int, int, int, int],
        target: float,
        evaluator,
        progress: bool = True,
        readout: str = DEFAULT_READOUT,
    ):
        from . import surrogate

        self.problem, self.mode = problem, mode
        self.key = surrogate.config_key(problem, plain, dataset, mode, settings, readout)
        self.surrogate = surrogate.load_or_build(
            problem, self.key, target, evaluator, progress=progress and sys.stderr.isatty()
        )
        self.dense_accuracy = self.surrogate.dense_accuracy

    @property
    def identity(self) -> dict:
        """What decides the proxy's answers: the mode it stands for and the sha256 of the
        surrogate file (a protocol that runs on the proxy should record it)."""
        return {
            "mode": self.mode,
            "sha256": self.surrogate.sha256,
            "file": str(self.surrogate.path),
        }

    def __call__(self, policy: Sequence[int]) -> float:
        return self.surrogate(policy)
