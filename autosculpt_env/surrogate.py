"""A surrogate of the reward: ``policy -> predicted accuracy``, fitted on evaluated policies.

``evaluation="proxy"`` answers with a model fitted on policies scored by the reward mode it
stands for (the registered ids' default ``evaluation=``, :func:`proxied_mode`), so an
episode costs microseconds instead of a forward pass. This module holds the model: how a
policy becomes features, which models compete, how one is chosen, and where fitted
surrogates are stored. The policies come from :mod:`autosculpt_env.policy_collection`.

**Features** (:class:`Features`; per-(layer, action) tables built once from the masks, so a
policy's features are array lookups):

* ``action``: one-hot of each layer's action (one column per valid (layer, action));
* ``removed_energy``: per layer, the fraction of weight energy (sum of squares) removed;
* ``removed_weights``: per layer, the fraction of weights removed;
* ``removed_channels``: per layer, the fraction of output channels (weight rows) removed
  whole, which also silences them downstream;
* ``pairs``: products of ``removed_energy`` over pairs of layers the graph links: a
  producer and the consumer reading its channels, layers of one coupling group (they meet
  at a residual add), and neighbours in topological order;
* ``totals``: FLOPs and parameters left (per-layer sums, without dead-channel corrections),
  mean and max removed energy, mean removed weights and channels, mean log kept energy.

**Models** (:data:`CANDIDATES`; every one predicts in NumPy, no scikit-learn call per
policy): ``additive`` (ridge on ``action`` + ``totals``: a fitted per-(layer, action)
sensitivity table), ``pairwise`` (ridge adding ``removed_energy``, ``removed_channels`` and
the ``pairs`` interactions), ``mlp`` (one hidden layer of 16 ReLUs, L2 penalty 10, L-BFGS)
and ``trees`` (gradient-boosted trees, 300 of depth 3, compiled to arrays), the last two on
the continuous blocks. Every model is fitted on the log-odds of accuracy (:func:`logit`).

**Choice by measurement.** Leave one sampler out (NAS-Bench-301): for each sampler, fit on
the others' policies (any policy the held-out sampler also drew is left out of training)
and take the Spearman correlation of prediction and accuracy on the held-out sampler. The
candidate with the highest minimum over samplers wins (ties: the highest mean), and is
refitted on everything. Its held-out figures are stored with it. (They are the winner's of
four candidates on the same folds, so slightly optimistic.) A design may also draw at a
configuration's other FLOPs targets (:attr:`~autosculpt_env.policy_collection.Design.also_targets`):
those policies only train (every fold but their own sampler's); the held-out figures rank
the fit target's own policies.

**Where surrogates live.** A surrogate is keyed by :func:`config_key` (weights, masks,
reward data, mode and its settings) plus the FLOPs target its constrained samplers met
(the target shapes which policies are drawn, not the accuracy, so one surrogate is fitted
per (configuration, target)). :func:`load_or_build` looks in the shipped folder
(``autosculpt_env/surrogates``: an ``.npz`` per registered task and ``manifest.json`` with
their sha256 and keys), then the cache (``$AUTOSCULPT_CACHE/surrogate/fits``, one file per
configuration, target and design), and otherwise collects :data:`FIRST_USE_DESIGN`
(evaluations memoised in ``$AUTOSCULPT_CACHE/surrogate/evaluations``, shared by every
target and design of a configuration, and seeded with what shipped surrogates of the
configuration hold: :func:`import_shipped`) and fits. A surrogate refuses a key or target
it was not fitted for (:class:`SurrogateMismatch`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from . import zoo
from .evaluation import DEFAULT_READOUT, EVALUATIONS
from .policy_collection import Collection, Design, EvaluationStore, collect
from .problem import PruningProblem
from .records import default_file_mode

KEY_FORMAT = 1
"""Version of :func:`config_key` (what decides a stored accuracy); bumped when it changes."""

FORMAT = 2
"""Version of the features, models and fit file layout; bumped when any of them changes."""

SHIPPED_DIR = Path(__file__).parent / "surrogates"
MANIFEST = "manifest.json"

FIRST_USE_DESIGN = Design(per_sampler=40)
"""Collected on first use where nothing is shipped or cached: 5 x 40 policies + the dense
one, about the evaluations a per-(layer, action) sensitivity table of ResNet-20 takes."""

FULL_DESIGN = Design(per_sampler=220)
"""What ``benchmarks/proxy_fidelity.py`` collects for the registered tasks (1,101 policies)."""

BLOCKS: tuple[str, ...] = (
    "action",
    "removed_energy",
    "removed_weights",
    "removed_channels",
    "pairs",
    "totals",
)
TOTALS: tuple[str, ...] = (
    "flops_left",
    "params_left",
    "mean_removed_energy",
    "max_removed_energy",
    "mean_removed_weights",
    "mean_removed_channels",
    "mean_log_kept_energy",
)

CANDIDATES: dict[str, tuple[str, ...]] = {
    "additive": ("action", "totals"),
    "pairwise": ("action", "removed_energy", "removed_channels", "pairs", "totals"),
    "mlp": ("removed_energy", "removed_weights", "removed_channels", "pairs", "totals"),
    "trees": ("removed_energy", "removed_weights", "removed_channels", "pairs", "totals"),
}
"""Candidate models and the feature blocks each reads."""


class SurrogateError(RuntimeError):
    """A surrogate file is damaged or does not match its manifest."""


class SurrogateMismatch(ValueError):
    """A surrogate was asked to serve a configuration or target it was not fitted for."""


# --------------------------------------------------------------------------------- keys
def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _tensor_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def config_key(
    problem: PruningProblem,
    plain,
    dataset: str,
    mode: str,
    settings: tuple[int, int, int, int, int],
    readout: str = DEFAULT_READOUT,
) -> dict:
    """Everything that decides the accuracy a reward mode gives a policy.

    Args:
        problem: the pruning problem (weights, layers, catalog masks).
        plain: the env's :class:`~autosculpt_env.evaluation.AccuracyEvaluator` (its reward
            and recalibration images are hashed).
        dataset: dataset name.
        mode: the ``evaluation=`` mode the surrogate stands for.
        settings: ``(reward_samples, bn_recalibration_samples, recovery_samples,
            calibration_samples, recovery_batch_size)``, as the env holds them.
        readout: the mode's readout (``reward_readout=``); the default leaves the key as it
            was before readouts existed, so the shipped surrogates keep theirs.

    Returns:
        A JSON-able dict; two configurations with equal dicts score every policy alike.
    """
    from .evaluation import recovery_recipe

    h = hashlib.sha256()
    for k, v in sorted(problem.model.state_dict().items()):
        h.update(k.encode())
        h.update(_tensor_bytes(v))
    weights = h.hexdigest()
    h = hashlib.sha256()  # the catalog's actual masks, not its names (two catalogs may share them)
    for i in range(problem.num_layers):
        for a in range(problem.num_actions):
            m = problem.mask(i, a)
            h.update(f"{i},{a},{None if m is None else tuple(m.shape)};".encode())
            if m is not None:
                h.update(np.packbits(m.detach().cpu().numpy().astype(bool)).tobytes())
    masks = h.hexdigest()
    mode_settings: dict = {}
    if "reconstruction" in mode:
        mode_settings["calibration_samples"] = int(settings[3])
    if "recovery" in mode:
        mode_settings["recovery_samples"] = int(settings[2])
        mode_settings["recipe"] = recovery_recipe(dataset, settings[4]).to_dict()
    recal = plain.recal_images
    key = {
        "format": KEY_FORMAT,
        "model": problem.model_name,
        "weights": weights,
        "catalog": problem.catalog.name,
        "actions": list(problem.catalog.action_names),
        "masks": masks,
        "layers": [layer.name for layer in problem.layers],
        "dataset": dataset,
        "reward_data": _sha(_tensor_bytes(plain.images), _tensor_bytes(plain.labels)),
        "recalibration_data": None if recal is None else _sha(_tensor_bytes(recal)),
        "mode": mode,
        "mode_settings": mode_settings,
    }
    if readout != DEFAULT_READOUT:
        key["readout"] = readout
    return json.loads(json.dumps(key))  # as a file stores it (tuples become lists)


def env_key(env, mode: str | None = None) -> tuple[dict, str]:
    """``(config_key, mode)`` of the surrogate that stands in for an env's proxied mode.

    ``env`` is any AutoSculpt env (its ``evaluation=`` does not matter); the key is the one
    ``evaluation="proxy"`` on the same keywords computes. Another ``mode`` gives the key of
    a surrogate of that reward on the same settings (one ``evaluation="proxy"`` does not
    serve: a candidate default's proxy, measured before a switch).
    """
    base = env.unwrapped
    if mode is None:
        mode = proxied_mode(base.problem.model_name, base.problem.catalog.name)
    check_proxiable(mode)
    key = config_key(
        base.problem,
        base.evaluator,
        base.env_kwargs["dataset"],
        mode,
        base.reward_settings,
        base.env_kwargs.get("reward_readout", DEFAULT_READOUT),
    )
    return key, mode


def check_proxiable(mode: str) -> str:
    """``mode`` if a surrogate can stand for it: any ``evaluation=`` mode but ``proxy``.

    Raises:
        ValueError: naming the modes it can stand for.
    """
    if mode not in EVALUATIONS or mode == "proxy":
        choices = ", ".join(m for m in EVALUATIONS if m != "proxy")
        raise ValueError(f"a surrogate stands for one of {choices}, not {mode!r}")
    return mode


def seeded_key(key: dict, seed: int) -> dict:
    """The key of the same reward with its recovery pass trained under ``seed`` (seed 0's key
    is ``key`` itself: the env's reward)."""
    if "recovery" not in key["mode"]:
        raise ValueError(f"mode {key['mode']!r} trains nothing, so it has no seed")
    if int(seed) == 0:
        return key
    return {**key, "mode_settings": {**key["mode_settings"], "recovery_seed": int(seed)}}


def _digest(obj) -> str:
    return _sha(json.dumps(obj, sort_keys=True).encode())[:24]


def _env_defaults() -> dict:
    from .envs.autosculpt import AutoSculptEnv

    return {
        k: p.default
        for k, p in inspect.signature(AutoSculptEnv.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def proxied_mode(model: str, catalog: str) -> str:
    """The ``evaluation=`` mode ``evaluation="proxy"`` stands for, read from the registry.

    The mode of the registered id whose config names this zoo model and catalog (a digits
    twin takes its Fashion-MNIST id's), else the env's own default ``evaluation=``.
    """
    from . import REGISTERED_CONFIGS

    defaults = _env_defaults()
    modes = {
        cfg.get("evaluation", defaults["evaluation"])
        for cfg in REGISTERED_CONFIGS.values()
        if cfg.get("model") == model and cfg.get("catalog", defaults["catalog"]) == catalog
    }
    mode = modes.pop() if len(modes) == 1 else defaults["evaluation"]
    if mode == "proxy":
        raise ValueError("the proxy cannot stand for itself: a registered id's default is 'proxy'")
    return mode


# ----------------------------------------------------------------------------- features
def graph_pairs(problem: PruningProblem) -> list[tuple[int, int]]:
    """Layer pairs whose joint pruning interacts: producer -> consumer, coupled, adjacent."""
    g = problem.graph
    index = {layer.name: i for i, layer in enumerate(problem.layers)}
    pairs: set[tuple[int, int]] = set()
    for i, layer in enumerate(problem.layers):
        for c in g.consumers(layer.name):
            if c in index:
                pairs.add((min(i, index[c]), max(i, index[c])))
    for group in g.groups:
        members = sorted(index[n] for n in group if n in index)
        pairs |= {(a, b) for k, a in enumerate(members) for b in members[k + 1 :]}
    pairs |= {(i, i + 1) for i in range(problem.num_layers - 1)}
    return sorted(pairs)


class Features:
    """Policies to feature rows (blocks in :data:`BLOCKS`; see the module docstring).

    Every feature but the pair products and the max is a sum of per-(layer, action) terms,
    so they are tabulated once (``table[l, a]`` is layer ``l``'s contribution under action
    ``a``): one policy's row is a gather and a sum, a batch's is a matrix product.
    """

    def __init__(self, problem: PruningProblem):
        L, P = problem.num_layers, problem.num_actions
        self.num_layers, self.num_actions = L, P
        energy, weights, channels = np.zeros((L, P)), np.zeros((L, P)), np.zeros((L, P))
        for i, a in zip(*np.nonzero(problem.valid)):
            mask = problem.mask(int(i), int(a))
            energy[i, a] = 1.0 - problem.kept_energy(int(i), int(a))
            weights[i, a] = 1.0 - float(mask.float().mean())
            channels[i, a] = float((~mask.flatten(1).any(1)).float().mean())
        self.energy = energy
        pairs = np.asarray(graph_pairs(problem), dtype=np.int64).reshape(-1, 2)
        self.pair_a, self.pair_b = pairs[:, 0], pairs[:, 1]
        sizes = {
            "action": int(problem.valid.sum()),
            "removed_energy": L,
            "removed_weights": L,
            "removed_channels": L,
            "pairs": len(pairs),
            "totals": len(TOTALS),
        }
        self.slices, start = {}, 0
        for name in BLOCKS:
            self.slices[name] = slice(start, start + sizes[name])
            start += sizes[name]
        self.dim = start
        self.rows = np.arange(L)

        cost = problem.cost
        total = {name: self.slices["totals"].start + k for k, name in enumerate(TOTALS)}
        table = np.zeros((L, P, self.dim))
        for col, (i, a) in enumerate(zip(*np.nonzero(problem.valid))):
            t = table[i, a]
            t[self.slices["action"].start + col] = 1.0
            t[self.slices["removed_energy"].start + i] = energy[i, a]
            t[self.slices["removed_weights"].start + i] = weights[i, a]
            t[self.slices["removed_channels"].start + i] = channels[i, a]
            t[total["flops_left"]] = cost.flops[i, a] / float(cost.dense_flops)
            t[total["params_left"]] = cost.params[i, a] / float(cost.dense_params)
            t[total["mean_removed_energy"]] = energy[i, a] / L
            t[total["mean_removed_weights"]] = weights[i, a] / L
            t[total["mean_removed_channels"]] = channels[i, a] / L
            t[total["mean_log_kept_energy"]] = np.log(max(1.0 - energy[i, a], 1e-3)) / L
        self.table = table
        self.offset = np.zeros(self.dim)
        self.offset[total["flops_left"]] = cost.fixed_flops / float(cost.dense_flops)
        self.offset[total["params_left"]] = cost.fixed_params / float(cost.dense_params)
        self._max = total["max_removed_energy"]

    def layout(self) -> dict[str, int]:
        """Block sizes (stored with a fitted model and checked when it is loaded)."""
        return {k: s.stop - s.start for k, s in self.slices.items()}

    def columns(self, blocks: Sequence[str]) -> np.ndarray:
        return np.concatenate(
            [np.arange(self.slices[b].start, self.slices[b].stop) for b in blocks]
        )

    def one(self, policy: np.ndarray) -> np.ndarray:
        """The ``(1, D)`` feature row of one policy (int array of length L)."""
        x = self.table[self.rows, policy].sum(0) + self.offset
        r = self.energy[self.rows, policy]
        x[self.slices["pairs"]] = r[self.pair_a] * r[self.pair_b]
        x[self._max] = r.max()
        return x[None, :]

    def __call__(self, policies: np.ndarray) -> np.ndarray:
        """Feature rows of an ``(N, L)`` int array of policies."""
        pol = np.asarray(policies, dtype=np.int64).reshape(-1, self.num_layers)
        n, L, P = len(pol), self.num_layers, self.num_actions
        onehot = np.zeros((n, L * P))
        onehot[np.arange(n)[:, None], self.rows * P + pol] = 1.0
        x = onehot @ self.table.reshape(L * P, self.dim) + self.offset
        r = self.energy[self.rows, pol]
        x[:, self.slices["pairs"]] = r[:, self.pair_a] * r[:, self.pair_b]
        x[:, self._max] = r.max(1)
        return x


# ------------------------------------------------------------------------------- models
class Model:
    """A fitted candidate: NumPy arrays and a prediction that uses only them."""

    kind = ""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        for k, v in arrays.items():
            setattr(self, k, v)

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LinearModel(Model):
    kind = "linear"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x[:, self.columns] @ self.w + self.b


class MLPModel(Model):
    kind = "mlp"

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (x[:, self.columns] - self.mean) / self.scale
        h = np.maximum(z @ self.w1 + self.b1, 0.0)
        return (h @ self.w2 + self.b2)[:, 0] * self.y_scale + self.y_mean


class TreesModel(Model):
    """Gradient-boosted regression trees, each padded to a complete binary tree of the
    ensemble's depth (heap order; a leaf above the last level becomes a chain of nodes
    that always go left, every leaf below it holding its value) and walked level by level
    for all trees at once."""

    kind = "trees"

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__(arrays)
        n_trees, n_inner = self.feature.shape
        self._base = np.arange(n_trees) * n_inner
        self._leaf_base = np.arange(n_trees) * (n_inner + 1) - n_inner
        self._feature, self._threshold = self.feature.ravel(), self.threshold.ravel()
        self._leaf = self.leaf.ravel()

    def predict(self, x: np.ndarray) -> np.ndarray:
        xs = x[:, self.columns]
        if len(xs) == 1:  # one policy (an env step): 1-D gathers, half the time
            row, heap = xs[0], np.zeros(len(self._base), dtype=np.int64)
            for _ in range(int(self.depth)):
                k = self._base + heap
                heap = 2 * heap + 1 + (row[self._feature[k]] > self._threshold[k])
            return self.init + self._leaf[self._leaf_base + heap].sum(keepdims=True)
        flat, row_start = xs.ravel(), (np.arange(len(xs)) * xs.shape[1])[:, None]
        heap = np.zeros((len(xs), len(self._base)), dtype=np.int64)
        for _ in range(int(self.depth)):
            k = self._base + heap
            heap = 2 * heap + 1 + (flat[row_start + self._feature[k]] > self._threshold[k])
        return self.init + self._leaf[self._leaf_base + heap].sum(1)


def _complete_tree(tree, depth: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(feature, threshold, leaf)`` of a scikit-learn regression tree as a complete tree."""
    n_inner = 2**depth - 1
    feature = np.zeros(n_inner, dtype=np.int64)
    threshold = np.full(n_inner, np.inf)
    leaf = np.zeros(n_inner + 1)
    stack = [(0, 0, 0)]  # (sklearn node, heap index, level)
    while stack:
        node, heap, level = stack.pop()
        left, right = tree.children_left[node], tree.children_right[node]
        if left == -1:
            k = depth - level
            first = (2**k) * heap + 2**k - 1 - n_inner
            leaf[first : first + 2**k] = rate * tree.value[node, 0, 0]
            continue
        feature[heap], threshold[heap] = tree.feature[node], tree.threshold[node]
        stack += [(left, 2 * heap + 1, level + 1), (right, 2 * heap + 2, level + 1)]
    return feature, threshold, leaf


MODEL_KINDS = {m.kind: m for m in (LinearModel, MLPModel, TreesModel)}


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = x.mean(0), x.std(0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def logit(accuracy: np.ndarray) -> np.ndarray:
    """The scale models are fitted on: accuracy is a probability, and layers' damage adds
    up more nearly in log-odds (an accuracy near chance or near 1 moves little)."""
    a = np.clip(accuracy, 1e-3, 1 - 1e-3)
    return np.log(a / (1 - a))


def fit_candidate(name: str, x: np.ndarray, y: np.ndarray, features: Features) -> Model:
    """Fit one of :data:`CANDIDATES` on feature rows ``x`` and accuracies ``y``.

    The model predicts :func:`logit` accuracy (a monotone map: rankings are unchanged).

    BLAS runs on one thread: small solves gain nothing from more, and a fixed thread count
    keeps the fit bit-for-bit reproducible.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_candidate(name, x, logit(np.asarray(y, dtype=np.float64)), features)


def _fit_candidate(name: str, x: np.ndarray, y: np.ndarray, features: Features) -> Model:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor

    cols = features.columns(CANDIDATES[name])
    xs = x[:, cols]
    mean, scale = _standardise(xs)
    z = (xs - mean) / scale
    if name in ("additive", "pairwise"):
        ridge = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(z, y)
        w = ridge.coef_ / scale
        return LinearModel({"columns": cols, "w": w, "b": np.float64(ridge.intercept_ - w @ mean)})
    if name == "mlp":
        y_mean, y_scale = float(y.mean()), float(y.std()) or 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp = MLPRegressor(
                hidden_layer_sizes=(16,), solver="lbfgs", alpha=10.0, max_iter=200, random_state=0
            ).fit(z, (y - y_mean) / y_scale)
        return MLPModel(
            {
                "columns": cols,
                "mean": mean,
                "scale": scale,
                "w1": mlp.coefs_[0],
                "b1": mlp.intercepts_[0],
                "w2": mlp.coefs_[1],
                "b2": mlp.intercepts_[1],
                "y_mean": np.float64(y_mean),
                "y_scale": np.float64(y_scale),
            }
        )
    if name == "trees":
        gbr = GradientBoostingRegressor(
            n_estimators=300, learning_rate=0.05, max_depth=3, min_samples_leaf=5, random_state=0
        ).fit(xs, y)
        trees = [est.tree_ for est in gbr.estimators_[:, 0]]
        depth = max(1, max(t.max_depth for t in trees))
        parts = [_complete_tree(t, depth, gbr.learning_rate) for t in trees]
        model = TreesModel(
            {
                "columns": cols,
                "feature": np.stack([p[0] for p in parts]),
                "threshold": np.stack([p[1] for p in parts]),
                "leaf": np.stack([p[2] for p in parts]),
                "depth": np.int64(depth),
                "init": np.float64(gbr.init_.constant_.ravel()[0]),
            }
        )
        err = np.abs(model.predict(x) - gbr.predict(xs)).max()
        if err > 1e-9:  # the array walk must be the fitted ensemble, exactly
            raise RuntimeError(f"compiled trees differ from scikit-learn's by {err:g}")
        return model
    raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")


# ---------------------------------------------------------------- leave one sampler out
def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, ``None`` where it is undefined (fewer than 3 points, or a constant)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


@dataclass
class Heldout:
    """Leave-one-sampler-out result of one candidate.

    Attributes:
        per_sampler: held-out Spearman per sampler (``None`` where undefined).
        overall: Spearman over every policy's out-of-fold prediction.
        minimum: the lowest defined per-sampler figure.
    """

    per_sampler: dict[str, float | None]
    overall: float | None

    @property
    def minimum(self) -> float | None:
        vals = [v for v in self.per_sampler.values() if v is not None]
        return min(vals) if vals else None

    @property
    def mean(self) -> float | None:
        vals = [v for v in self.per_sampler.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    def to_dict(self) -> dict:
        return {"per_sampler": self.per_sampler, "overall": self.overall, "min": self.minimum}


def leave_one_sampler_out(
    name: str, collection: Collection, x: np.ndarray, features: Features
) -> Heldout:
    """Fit ``name`` on all samplers but one and rank the held-out one, for each sampler.

    Only the fit target's own policies are held out and ranked; the ``training_only`` ones
    (drawn at other targets) train every fold but those of their own sampler."""
    y, lab = collection.accuracy, collection.sampler
    own = ~collection.training_only
    keys = [p.tobytes() for p in collection.policies]
    oof = np.full(len(y), np.nan)
    per: dict[str, float | None] = {}
    for j, sampler in enumerate(collection.samplers):
        test = (lab == j) & own
        held = {k for k, t in zip(keys, test) if t}
        train = np.asarray([lj != j and k not in held for k, lj in zip(keys, lab)])
        if test.sum() < 3 or train.sum() < 5:
            per[sampler] = None
            continue
        model = fit_candidate(name, x[train], y[train], features)
        oof[test] = model.predict(x[test])
        per[sampler] = spearman(oof[test], y[test])
    done = ~np.isnan(oof)
    return Heldout(per, spearman(oof[done], y[done]) if done.any() else None)


# ---------------------------------------------------------------------------- surrogate
class Surrogate:
    """A fitted model with the key, target and collection it was fitted on.

    Call it with a policy (action indices) for the predicted accuracy (in (0, 1): the
    model's log-odds through a sigmoid); the dense policy gets the measured dense accuracy.
    """

    def __init__(
        self,
        problem: PruningProblem,
        key: dict,
        target: float,
        design: Design,
        collection: Collection,
        model_name: str,
        model: Model,
        heldout: dict[str, Heldout],
        predict_us: float | None = None,
        features: Features | None = None,
    ):
        self.key, self.target, self.design = key, float(target), design
        self.collection, self.model_name, self.model = collection, model_name, model
        self.heldout = heldout
        self.features = Features(problem) if features is None else features
        self.dense_accuracy = float(collection.dense_accuracy)
        self._dense = np.full(problem.num_layers, problem.dense_action, dtype=np.int64)
        self.predict_us = predict_us if predict_us is not None else self.time_predict()
        self.sha256: str | None = None  # of the file it was loaded from
        self.path: Path | None = None

    def check(self, key: dict, target: float) -> None:
        """Refuse to serve a configuration or target this surrogate was not fitted for."""
        if key != self.key:
            diff = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
            raise SurrogateMismatch(
                f"surrogate{'' if self.path is None else ' ' + str(self.path)} was fitted for "
                f"another configuration (differs in {', '.join(diff)}: e.g. mode "
                f"{self.key.get('mode')!r} vs {key.get('mode')!r}); it cannot serve this one"
            )
        if abs(float(target) - self.target) > 1e-9:
            raise SurrogateMismatch(
                f"surrogate{'' if self.path is None else ' ' + str(self.path)} was fitted at "
                f"FLOPs target {self.target}, not {target}"
            )

    def predict(self, policies: np.ndarray) -> np.ndarray:
        """Predicted accuracies of an ``(N, L)`` array of policies."""
        pol = np.asarray(policies, dtype=np.int64).reshape(-1, len(self._dense))
        out = 1.0 / (1.0 + np.exp(-self.model.predict(self.features(pol))))
        out[(pol == self._dense).all(1)] = self.dense_accuracy
        return out

    def __call__(self, policy: Sequence[int]) -> float:
        pol = np.asarray(policy, dtype=np.int64)
        if (pol == self._dense).all():
            return self.dense_accuracy
        return float(1.0 / (1.0 + math.exp(-self.model.predict(self.features.one(pol))[0])))

    def time_predict(self, calls: int = 300) -> float:
        """Median microseconds of one call on a stored policy (measured here, now)."""
        pols = self.collection.policies
        if not len(pols):
            return float("nan")
        times = []
        for k in range(calls):
            p = pols[k % len(pols)]
            t = time.perf_counter()
            self(p)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)

    # ------------------------------------------------------------------------- files
    def meta(self) -> dict:
        chosen = self.heldout.get(self.model_name)
        return {
            "format": FORMAT,
            "key": self.key,
            "target": self.target,
            "mode": self.key["mode"],
            "design": self.design.to_dict(),
            "samplers": list(self.collection.samplers),
            "counts": self.collection.counts,
            "policies": int(len(self.collection.policies)),
            **self._training_only_count(),
            "dense_accuracy": self.dense_accuracy,
            "model": self.model_name,
            "model_kind": self.model.kind,
            "layout": self.features.layout(),
            "heldout": {k: h.to_dict() for k, h in self.heldout.items()},
            "heldout_min": None if chosen is None else chosen.minimum,
            "heldout_overall": None if chosen is None else chosen.overall,
            "predict_us": self.predict_us,
        }

    def _training_only_count(self) -> dict:
        # absent when none: a surrogate without them keeps the file it had
        n = int(self.collection.training_only.sum())
        return {"training_only": n} if n else {}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the surrogate and its collection to one ``.npz`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        c = self.collection
        arrays = {
            "meta": np.array(json.dumps(self.meta(), sort_keys=True)),
            "policies": c.policies.astype(np.int16),
            "accuracy": c.accuracy,
            "sampler": c.sampler.astype(np.int8),
        }
        if c.training_only.any():
            arrays["training_only"] = c.training_only
        arrays.update({f"model.{k}": np.asarray(v) for k, v in self.model.arrays.items()})
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, problem: PruningProblem) -> Surrogate:
        """Read a surrogate written by :meth:`save`.

        Raises:
            SurrogateError: the file is unreadable, truncated or not a surrogate of this
                problem's layout (the message names the file).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this version reads {FORMAT}")
            n = int(meta["policies"])
            samplers = tuple(meta["samplers"])
            collection = Collection(
                policies=arrays["policies"].astype(np.int64).reshape(n, problem.num_layers),
                accuracy=arrays["accuracy"].astype(np.float64).reshape(n),
                sampler=arrays["sampler"].astype(np.int64).reshape(n),
                samplers=samplers,
                dense_accuracy=float(meta["dense_accuracy"]),
                training_only=arrays.get("training_only", np.zeros(n, dtype=bool)).reshape(n),
            )
            if int(collection.training_only.sum()) != int(meta.get("training_only", 0)):
                raise ValueError("its training-only policies do not match its metadata")
            kind = MODEL_KINDS[meta["model_kind"]]
            model = kind({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
            heldout = {
                k: Heldout(dict(h["per_sampler"]), h["overall"]) for k, h in meta["heldout"].items()
            }
            s = cls(
                problem,
                meta["key"],
                meta["target"],
                Design.from_dict(meta["design"]),
                collection,
                meta["model"],
                model,
                heldout,
                predict_us=meta.get("predict_us"),
            )
            if s.features.layout() != meta["layout"]:
                raise ValueError(
                    f"feature layout {meta['layout']} is not this problem's {s.features.layout()}"
                )
            s(collection.policies[0] if n else s._dense)  # the arrays fit the model
        except (OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise SurrogateError(
                f"surrogate file {path} cannot be read ({type(e).__name__}: {e})"
            ) from None
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise SurrogateError(
                f"surrogate file {path} is damaged or not a surrogate of this problem "
                f"({type(e).__name__}: {e})"
            ) from None
        s.path = path
        return s


def fit(
    problem: PruningProblem,
    key: dict,
    target: float,
    design: Design,
    collection: Collection,
    candidates: Sequence[str] = tuple(CANDIDATES),
) -> Surrogate:
    """Choose a model by leave-one-sampler-out Spearman and refit it on every policy."""
    features = Features(problem)
    x = features(collection.policies)
    heldout = {}
    if len(collection.samplers) > 1:
        heldout = {c: leave_one_sampler_out(c, collection, x, features) for c in candidates}

    def score(c: str) -> tuple[float, float]:
        h = heldout.get(c)
        if h is None or h.minimum is None:
            return (-np.inf, -np.inf)
        return (h.minimum, h.mean)

    best = max(candidates, key=score)  # max keeps the first of equals: deterministic
    model = fit_candidate(best, x, collection.accuracy, features)
    return Surrogate(
        problem, key, target, design, collection, best, model, heldout, features=features
    )


# ------------------------------------------------------------------------- the store
def _fits_dir() -> Path:
    return zoo.cache_dir() / "surrogate" / "fits"


STORE_ENV = "AUTOSCULPT_SURROGATE_STORE"
"""Environment variable naming another folder for the evaluation stores than the cache's
(``benchmarks/proxy_fidelity.py --store``: e.g. a committed folder, so that a collection
longer than one machine's lifetime continues where it stopped on the next)."""


def evaluations_path(key: dict) -> Path:
    """Where a configuration's evaluations are memoised (shared by all its targets):
    ``$AUTOSCULPT_SURROGATE_STORE`` if set, else ``$AUTOSCULPT_CACHE/surrogate/evaluations``."""
    folder = os.environ.get(STORE_ENV)
    base = Path(folder) if folder else zoo.cache_dir() / "surrogate" / "evaluations"
    return base / f"{_digest(key)}.jsonl"


def fit_path(key: dict, target: float, design: Design) -> Path:
    """Where the fit of a configuration, target and design is cached."""
    digest = _digest([key, round(float(target), 9), design.to_dict(), FORMAT])
    return _fits_dir() / f"{digest}.npz"


def read_manifest(folder: Path = SHIPPED_DIR) -> dict:
    """The shipped manifest (``{"format": .., "surrogates": {name: entry}}``)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "surrogates": {}}
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or not isinstance(d.get("surrogates"), dict):
            raise ValueError("no 'surrogates' table")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SurrogateError(
            f"surrogate manifest {path} cannot be read ({e}); reinstall the package or restore "
            "the file"
        ) from None
    return d


def verify_shipped(name: str, folder: Path = SHIPPED_DIR) -> Path:
    """The path of a shipped surrogate whose sha256 matches the manifest, or an error naming it."""
    entry = read_manifest(folder)["surrogates"].get(name)
    if entry is None:
        raise SurrogateError(f"no shipped surrogate {name!r} in {Path(folder) / MANIFEST}")
    path = Path(folder) / entry["file"]
    if not path.exists():
        raise SurrogateError(
            f"shipped surrogate {path} is missing (listed in {MANIFEST}); reinstall the package"
        )
    digest = zoo.sha256(path)
    if digest != entry["sha256"]:
        raise SurrogateError(
            f"shipped surrogate {path} has sha256 {digest} but {MANIFEST} says "
            f"{entry['sha256']}: the file is corrupt or was replaced; reinstall the package or "
            "restore the file"
        )
    return path


def ship(
    surrogate: Surrogate, env_id: str, name: str | None = None, folder: Path = SHIPPED_DIR
) -> dict:
    """Write a surrogate into the shipped folder as ``<name>.npz`` (default: the task name,
    ``ENV_ID@TARGET``) and record it in the manifest with its sha256. Returns the entry."""
    folder = Path(folder)
    name = name or f"{env_id}@{surrogate.target:g}"
    path = surrogate.save(folder / f"{name}.npz")
    manifest = read_manifest(folder)
    meta = surrogate.meta()
    entry = {
        "file": path.name,
        "sha256": zoo.sha256(path),
        "env_id": env_id,
        **{k: meta[k] for k in meta if k not in ("layout", "format")},
    }
    manifest["format"] = FORMAT
    manifest["surrogates"][name] = entry
    manifest["surrogates"] = dict(sorted(manifest["surrogates"].items()))
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, folder / MANIFEST)
    return entry


def find_shipped(key: dict, target: float, folder: Path = SHIPPED_DIR) -> str | None:
    """The name of the shipped surrogate fitted for this key and target, if any."""
    for name, entry in read_manifest(folder)["surrogates"].items():
        if entry.get("key") == key and abs(float(entry.get("target", -1)) - target) < 1e-9:
            return name
    return None


@contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def import_shipped(
    problem: PruningProblem, store: EvaluationStore, folder: Path = SHIPPED_DIR
) -> int:
    """Add to ``store`` the evaluations that shipped surrogates of its key hold and it lacks
    (their policies, accuracies and dense accuracy; each file checked against the manifest
    first), so that a fresh machine refits or enlarges a registered task's design, or
    draws at another target, without scoring those policies again. Returns how many."""
    names = [n for n, e in read_manifest(folder)["surrogates"].items() if e.get("key") == store.key]
    if not names:
        return 0
    added = 0
    with store.locked():
        for name in names:
            path = verify_shipped(name, folder)
            s = Surrogate.load(path, problem)
            c = s.collection
            pairs = [(tuple(p.tolist()), float(a)) for p, a in zip(c.policies, c.accuracy)]
            pairs.append(((problem.dense_action,) * problem.num_layers, s.dense_accuracy))
            for policy, acc in pairs:
                if store.get(policy) is None:
                    store.add(policy, acc)
                    added += 1
    return added


def build(
    problem: PruningProblem,
    key: dict,
    target: float,
    evaluator: Callable[[], Callable[[Sequence[int]], float]],
    design: Design | None = None,
    progress: bool = True,
    candidates: Sequence[str] = tuple(CANDIDATES),
    shipped: Path | None = None,
) -> Surrogate:
    """Collect (resuming from the evaluation store, and from the evaluations shipped
    surrogates of the key hold: :func:`import_shipped`), fit, and cache a surrogate
    (replacing any cached fit of the same key and target)."""
    design = FIRST_USE_DESIGN if design is None else design
    store = EvaluationStore(evaluations_path(key), key)
    import_shipped(problem, store, SHIPPED_DIR if shipped is None else Path(shipped))
    collection = collect(
        problem,
        store,
        evaluator,
        target,
        design,
        progress=progress,
        desc=f"proxy: {key['mode']} of {problem.model_name} at target {target:g}",
    )
    s = fit(problem, key, target, design, collection, candidates)
    s.path = s.save(fit_path(key, target, design))
    return s


def load_or_build(
    problem: PruningProblem,
    key: dict,
    target: float,
    evaluator: Callable[[], Callable[[Sequence[int]], float]],
    design: Design | None = None,
    progress: bool = True,
    shipped: Path | None = None,
) -> Surrogate:
    """The surrogate for a configuration and target: shipped, else cached, else built.

    Only the shipped surrogate or the one of ``design`` is served, so what the proxy
    answers depends on the configuration alone, not on which benchmarks ran on this
    machine (``benchmarks/proxy_fidelity.py`` caches its larger designs beside it).

    Args:
        problem: the pruning problem.
        key: :func:`config_key` of the configuration.
        target: FLOPs target of the constrained samplers.
        evaluator: returns the reward-mode evaluator; called only if policies must be scored.
        design: what to collect when nothing is stored (default :data:`FIRST_USE_DESIGN`).
        progress: progress bars while collecting.
        shipped: the shipped folder (default :data:`SHIPPED_DIR`).

    Raises:
        SurrogateError: a shipped file does not match its manifest or cannot be read (a
            damaged cached fit is refitted from the stored evaluations instead, with a
            warning; a damaged evaluation store raises
            :class:`~autosculpt_env.policy_collection.StoreError` naming the file).
    """
    design = FIRST_USE_DESIGN if design is None else design
    shipped = SHIPPED_DIR if shipped is None else Path(shipped)
    name = find_shipped(key, target, shipped)
    if name is not None:
        path = verify_shipped(name, shipped)
        s = Surrogate.load(path, problem)
        s.check(key, target)
        s.sha256 = read_manifest(shipped)["surrogates"][name]["sha256"]
        return s
    path = fit_path(key, target, design)
    with _lock(path.with_name(path.name + ".lock")):
        if path.exists():
            try:
                s = Surrogate.load(path, problem)
                s.check(key, target)
                s.sha256 = zoo.sha256(path)
                return s
            except (SurrogateError, SurrogateMismatch) as e:
                warnings.warn(f"{e}; refitting it from the stored evaluations", stacklevel=2)
        s = build(problem, key, target, evaluator, design, progress, shipped=shipped)
        s.sha256 = zoo.sha256(s.path)
        return s


def proxied_mode_of(env_id: str) -> str:
    """:func:`proxied_mode` of a registered id's configuration."""
    from . import REGISTERED_CONFIGS

    if env_id not in REGISTERED_CONFIGS:
        raise ValueError(f"unknown env id {env_id!r}; registered: {', '.join(REGISTERED_CONFIGS)}")
    cfg = {**_env_defaults(), **REGISTERED_CONFIGS[env_id]}
    return proxied_mode(cfg["model"], cfg["catalog"])


def heldout_agreement(env_id: str, target: float, folder: Path = SHIPPED_DIR) -> float | None:
    """The shipped surrogate's lowest held-out Spearman for a task (env id, FLOPs target).

    ``None`` when none ships for it, or when it was fitted for another mode than the one
    ``evaluation="proxy"`` stands for today (the registered default changed since).
    """
    from . import REGISTERED_CONFIGS

    if env_id not in REGISTERED_CONFIGS:
        return None
    for entry in read_manifest(folder)["surrogates"].values():
        if entry.get("env_id") == env_id and abs(float(entry.get("target", -1)) - target) < 1e-9:
            if entry.get("mode") != proxied_mode_of(env_id):
                return None
            return entry.get("heldout_min")
    return None
