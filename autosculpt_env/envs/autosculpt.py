"""The AutoSculpt pruning environment."""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from torch import nn

from .. import data as data_mod
from .. import evaluation_limit
from ..band import env_within_band, max_kept
from ..evaluation import (
    BN_RECALIBRATION_SAMPLES,
    CALIBRATION_SAMPLES,
    DEFAULT_READOUT,
    EVALUATIONS,
    RECOVERY_BATCH_SIZE,
    RECOVERY_SAMPLES,
    REWARD_SAMPLES,
    AccuracyEvaluator,
    ProxyEvaluator,
    ReconstructionEvaluator,
    RecoveryEvaluator,
    env_settings,
)
from ..features import FeatureLayout, static_features
from ..graph import EDGE_TYPES
from ..patterns import Catalog, get_catalog, register_catalog
from ..problem import PruningProblem, action_index
from ..records import METRICS, OPTIONAL_METRICS, EpisodeRecord
from ..rewards import check_reward, terminal_reward
from ..surrogate import proxied_mode

_SHARED: dict[tuple, tuple] = {}


def _reward_evaluator(
    evaluation, problem, plain, dataset, data_dir, settings, seed=0, readout=DEFAULT_READOUT
):
    """The evaluator of an ``evaluation=`` mode (the plain one serves ``accuracy`` read out
    as accuracy); ``seed`` is the recovery pass's, ``readout`` the ``reward_readout=``."""
    reward_samples, recal, recovery_samples, calibration_samples, recovery_batch_size = settings
    if evaluation == "accuracy":
        if readout == plain.readout:
            return plain
        return AccuracyEvaluator(problem, dataset, data_dir, reward_samples, recal, readout)
    if evaluation == "reconstruction":
        return ReconstructionEvaluator(
            problem, dataset, data_dir, reward_samples, recal, calibration_samples, readout
        )
    return RecoveryEvaluator(
        problem,
        dataset,
        data_dir,
        reward_samples,
        recal,
        recovery_samples,
        reconstruction=evaluation == "reconstruction+recovery",
        calibration_samples=calibration_samples,
        recovery_batch_size=recovery_batch_size,
        seed=seed,
        readout=readout,
    )


def seeded_reward_evaluator(env, seed: int) -> RecoveryEvaluator:
    """A new evaluator of ``env``'s ``recovery`` reward that trains with ``seed`` instead of
    the env's 0, sharing no network or memo with the env's (``benchmarks/proxy_fidelity.py``
    measures with it how much the reward depends on its seed)."""
    base = env.unwrapped
    kw = base.env_kwargs
    if "recovery" not in kw["evaluation"]:
        raise ValueError(
            f"evaluation={kw['evaluation']!r} trains nothing, so it has no seed; "
            "only the recovery modes do"
        )
    return _reward_evaluator(
        kw["evaluation"],
        base.problem,
        base.evaluator,
        kw["dataset"],
        kw["data_dir"],
        base.reward_settings,
        seed=int(seed),
        readout=kw.get("reward_readout", DEFAULT_READOUT),
    )


def _shared_problem(
    model,
    dataset,
    data_dir,
    catalog,
    settings,
    evaluation,
    ignored,
    target,
    readout=DEFAULT_READOUT,
):
    """Build (or reuse, for zoo models in this process) the problem and its evaluators.

    Envs of the same configuration (e.g. the copies inside a ``SyncVectorEnv``) share the
    graph, masks, cost table and the policy memos; they are deterministic, so sharing is
    safe. ``settings`` is ``(reward_samples, bn_recalibration_samples, recovery_samples,
    calibration_samples, recovery_batch_size)``. The proxy is shared per FLOPs target (its surrogate is fitted on
    the policies episodes at that target play).
    """
    key = None
    if isinstance(model, str) and isinstance(catalog, str):
        # the catalog object, not its name: a name registered again with other rules
        # must not be answered with the masks of the first
        key = (model, dataset, str(data_dir), get_catalog(catalog), settings, ignored)
    if key is not None and key in _SHARED:
        problem, plain, static, rewards = _SHARED[key]
    else:
        problem = PruningProblem(model, dataset, catalog, data_dir, ignored_layers=ignored)
        plain = AccuracyEvaluator(problem, dataset, data_dir, settings[0], settings[1])
        static = static_features(problem)
        rewards = {}

    def evaluator_of(mode: str):
        if (mode, readout) not in rewards:
            rewards[mode, readout] = _reward_evaluator(
                mode, problem, plain, dataset, data_dir, settings, readout=readout
            )
        return rewards[mode, readout]

    if evaluation == "proxy":
        mode = proxied_mode(problem.model_name, problem.catalog.name)
        if ("proxy", target, readout) not in rewards:
            rewards["proxy", target, readout] = ProxyEvaluator(
                problem,
                plain,
                dataset,
                mode,
                settings,
                target,
                lambda: evaluator_of(mode),
                readout=readout,
            )
        reward = rewards["proxy", target, readout]
    else:
        reward = evaluator_of(evaluation)
    if key is not None:
        _SHARED[key] = (problem, plain, static, rewards)
    return problem, plain, static, reward


class AutoSculptEnv(gym.Env):
    """
    ## Description

    Pattern-based pruning of a pretrained DNN as a sequential decision problem, after
    AutoSculpt (Jing et al., arXiv 2412.18091). The network is a graph of operators
    (``torch.fx``); an episode visits its prunable layers (convolutions and linear
    layers) in topological order and, at each step, chooses one action of a pattern
    catalog for the current layer (for the default ``autosculpt`` catalog: a pruning level
    realised with the paper's six 3x3 row/column patterns, assigned to filters so as to
    keep the most weight energy). After the last layer the pruned network is scored on the
    held-out ``reward`` split.

    ## Action Space

    ``Discrete(P)``, P = number of catalog actions (10 for ``autosculpt``: ``level_0.0``
    ... ``level_0.9``). Actions that do not apply to the current layer, or (with the
    ``budget`` reward) that would make the FLOPs target unreachable, are invalid: they are
    ``False`` in ``info["action_mask"]`` and in ``action_masks()``. Stepping an invalid,
    out-of-range or non-integer action raises ``ValueError`` / ``TypeError`` naming the
    layer and the valid actions.

    ## Observation Space

    ``Graph(node_space=Box(-inf, inf, (F,)), edge_space=Discrete(3))``: one node per
    operator (conv, linear, norm, activation, add, concat, pool, matmul, softmax, input,
    output ...), directed edges for data flow typed ``forward`` (0), ``residual`` (1) and
    ``coupling`` (2, between layers whose channels must be pruned together). The node
    features have a fixed layout whose length depends only on the catalog
    (``F = {FEATURES}``), named column by column by ``env.unwrapped.feature_layout``
    (:class:`autosculpt_env.features.FeatureLayout`): operator type, log-scaled shapes,
    FLOPs and params shares, weight statistics, per action the weight energy kept and FLOPs
    left, and the episode state (prunable, current, decided, chosen action, FLOPs reduction
    so far, FLOPs still to remove to reach the target, progress).

    ## Rewards

    0 on every step but the last. The terminal reward is chosen with ``reward=``
    (:data:`autosculpt_env.rewards.REWARDS`; ``acc`` = accuracy, ``r`` = FLOPs reduction):

    {REWARDS}

    {LATENCY_TARGET}

    Accuracy is top-1 on the first ``reward_samples`` images of the ``reward`` split after
    batch-norm recalibration (``evaluation="accuracy"``), after a least-squares refit of the
    kept weights (``"reconstruction"``), after a short masked fine-tuning (``"recovery"``,
    ``"reconstruction+recovery"``), or the proxy model's estimate (``"proxy"``); see
    :mod:`autosculpt_env.evaluation`. How well each ranks policies like the leaderboard
    score is measured by ``benchmarks/reward_fidelity.py`` (README, "Reward fidelity").
    The test split is never touched.

    ## Starting State

    The dense pretrained network; the first prunable layer is current. The env is
    deterministic: ``seed`` has no effect on dynamics or rewards.

    ## Episode End

    ``terminated=True`` after the last prunable layer is decided. There is no truncation.
    The terminal ``info`` adds ``accuracy``, ``dense_accuracy``, ``flops_reduction``,
    ``params_reduction``, ``pruning_rate``, ``flops``, ``params`` and ``policy`` (the
    action name per layer) and ``reward_evaluations`` (the process's count of reward
    evaluations at which this episode was scored, :mod:`autosculpt_env.evaluation_limit`:
    every finished episode and ``evaluate_policy`` call counts one, and one past the
    limit raises ``EvaluationLimitReached`` before anything is scored);
    ``env.unwrapped.episode_record()`` returns a replayable
    :class:`~autosculpt_env.records.EpisodeRecord`, stamped with that count. ``params``
    counts the parameters the pruned network needs: not those held at zero nor those that
    only ever multiply an exactly-zero channel (:mod:`autosculpt_env.cost`), i.e. what
    :func:`~autosculpt_env.materialize.materialize` stores. With a latency table
    (``target_latency_reduction`` or ``latency_batch_size`` given) the terminal ``info``
    also adds ``latency_reduction``, ``1 - latency(pruned) / latency(dense)`` predicted by the
    table (:mod:`autosculpt_env.latency`): deterministic given the table, but the table is
    measured on this machine, so the value is platform dependent (the record names the
    table it came from, and replays compare it only against the same table).

    ## Arguments

    * ``model``: zoo name ({MODELS}) or an ``nn.Module`` with pretrained weights for
      ``dataset`` (``torch.nn`` transformer layers are rewritten into traceable equivalents
      first, :mod:`autosculpt_env.traceable`).
    * ``dataset``: ``fashion-mnist`` (default), ``digits``, ``cifar10``, ``cifar100``.
    * ``data_dir``: dataset folder (default: ``$AUTOSCULPT_DATA_DIR`` or the standard one).
    * ``catalog``: a registered catalog ({CATALOGS}; default ``autosculpt``) or a
      :class:`~autosculpt_env.patterns.Catalog` (registered by its name, so records replay).
    * ``reward``: {REWARD_NAMES} (default ``budget``).
    * ``target_flops_reduction``: in (0, 1), default 0.5.
    * ``reward_samples``: reward-split images scored, default ``None``: {REWARD_SAMPLES},
      or the whole split when it holds fewer (the digits twins' holds 120). Every image
      count (this one and the three below) must fit its split, or the env refuses it; the
      record states the counts used.
    * ``bn_recalibration_samples``: training images for batch-norm recalibration, default
      {BN_RECALIBRATION_SAMPLES}; 0 turns it off.
    * ``evaluation``: ``accuracy`` (the generic env's default), ``reconstruction``,
      ``recovery`` (the zoo ids' default), ``reconstruction+recovery`` or ``proxy``
      (:data:`autosculpt_env.evaluation.EVALUATIONS`).
    * ``reward_readout``: how the scored network is read out on the reward images,
      ``accuracy`` (top-1 accuracy) or ``probability`` (the mean probability it gives the
      true class; :data:`autosculpt_env.evaluation.READOUTS`); default ``None``:
      ``accuracy`` (or the zoo model's own default). The reward and the
      ``accuracy`` of the terminal info are that value; the proxy stands for the proxied
      mode under the same readout.
    * ``recovery_samples``: training images of the ``recovery`` modes' short fine-tuning,
      default ``None``: {RECOVERY_SAMPLES} (or the zoo model's own default), or the whole
      split when it holds fewer.
    * ``recovery_batch_size``: batch size of that fine-tuning (one pass, so
      ``recovery_samples / recovery_batch_size`` SGD steps), default ``None``:
      {RECOVERY_BATCH_SIZE} (or the zoo model's own default).
    * ``calibration_samples``: training images whose dense activations define the
      ``reconstruction`` refits, default {CALIBRATION_SAMPLES}.
    * ``band_tolerance``: half-width of the ``band`` reward's target band, default 0.05.
    * ``tradeoff_lambda``: weight of the FLOPs reduction in ``tradeoff``, default 1.0.
    * ``ignored_layers``: layer names kept dense and out of the episode (Torch-Pruning's
      ``ignored_layers``); default ``None`` ignores the classifier (the layers feeding the
      output), whose pruned rows would delete classes.
    * ``target_latency_reduction``: a latency target in (0, 1) for the rewards (see
      Rewards), default ``None`` (no latency target).
    * ``latency_batch_size``: the batch at which the per-(layer, action) latency table is
      timed (torch, {LATENCY_THREADS} CPU thread, materialised layers; measured once per
      machine and cached under ``$AUTOSCULPT_CACHE/latency``), default ``None``: no table
      unless a latency target is given, then {LATENCY_BATCH_SIZE}. Giving it alone adds
      ``latency_reduction`` to the terminal info without budgeting it.

    ## Registered Configurations

    * ``AutoSculpt-v0``: the generic env (defaults above, model ``resnet20``).
    {REGISTERED}

    Each zoo id fixes {ENV_DEFAULTS}. A zoo model may have its own defaults for settings
    left at ``None`` ({MODEL_DEFAULTS}). Every keyword can be overridden:
    ``gym.make("AutoSculpt-ResNet", dataset="digits")`` is a fast twin.

    ## Version History

    * v0: initial release.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model: str | nn.Module = "resnet20",
        dataset: str = "fashion-mnist",
        data_dir: str | None = None,
        catalog: str | Catalog = "autosculpt",
        reward: str = "budget",
        target_flops_reduction: float = 0.5,
        reward_samples: int | None = None,
        bn_recalibration_samples: int = BN_RECALIBRATION_SAMPLES,
        evaluation: str = "accuracy",
        band_tolerance: float = 0.05,
        tradeoff_lambda: float = 1.0,
        ignored_layers: list[str] | None = None,
        recovery_samples: int | None = None,
        calibration_samples: int = CALIBRATION_SAMPLES,
        recovery_batch_size: int | None = None,
        target_latency_reduction: float | None = None,
        latency_batch_size: int | None = None,
        reward_readout: str | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None:
            raise ValueError(
                f"render_mode {render_mode!r} is not supported; this env has no renderer"
            )
        data_mod.info(dataset)
        if isinstance(catalog, Catalog):
            register_catalog(catalog)  # its name goes into the records, which replay by name
        get_catalog(catalog)
        self.reward_name = check_reward(reward)
        if isinstance(target_flops_reduction, bool) or not isinstance(
            target_flops_reduction, numbers.Real
        ):
            raise TypeError(
                f"target_flops_reduction must be a float in (0, 1), got {target_flops_reduction!r}"
            )
        if not 0.0 < float(target_flops_reduction) < 1.0:
            raise ValueError(
                f"target_flops_reduction must be in (0, 1), got {target_flops_reduction}"
            )
        # image counts as used (never cut to a split's size behind the record's back, save
        # a default), the recovery batch size and the readout; None takes the zoo model's
        # own default
        samples = env_settings(
            model,
            dataset,
            data_dir,
            recovery_batch_size=recovery_batch_size,
            reward_samples=reward_samples,
            bn_recalibration_samples=bn_recalibration_samples,
            recovery_samples=recovery_samples,
            calibration_samples=calibration_samples,
            reward_readout=reward_readout,
        )
        recovery_batch_size = samples["recovery_batch_size"]
        reward_readout = samples["reward_readout"]
        if evaluation not in EVALUATIONS:
            raise ValueError(
                f"unknown evaluation {evaluation!r}; choose one of {', '.join(EVALUATIONS)}"
            )
        if target_latency_reduction is not None and (
            isinstance(target_latency_reduction, bool)
            or not isinstance(target_latency_reduction, numbers.Real)
            or not 0.0 < float(target_latency_reduction) < 1.0
        ):
            raise ValueError(
                "target_latency_reduction must be None (no latency target) or a float in "
                f"(0, 1), got {target_latency_reduction!r}"
            )
        if latency_batch_size is not None and (
            isinstance(latency_batch_size, bool)
            or not isinstance(latency_batch_size, numbers.Integral)
            or latency_batch_size < 1
        ):
            raise ValueError(
                "latency_batch_size must be None (no latency table unless a latency target is "
                f"given) or an integer >= 1, got {latency_batch_size!r}"
            )
        self.target = float(target_flops_reduction)
        for name, value in (
            ("band_tolerance", band_tolerance),
            ("tradeoff_lambda", tradeoff_lambda),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if ignored_layers is not None and (
            isinstance(ignored_layers, str) or not all(isinstance(n, str) for n in ignored_layers)
        ):
            raise TypeError(
                "ignored_layers must be a list of layer names, e.g. ['conv1'], got "
                f"{ignored_layers!r}"
            )
        self.band_tolerance = float(band_tolerance)
        self.tradeoff_lambda = float(tradeoff_lambda)
        self.evaluation = evaluation
        self._init_kwargs = {
            "model": model if isinstance(model, str) else f"<{type(model).__name__}>",
            "dataset": dataset,
            "data_dir": None if data_dir is None else str(data_dir),
            "catalog": catalog if isinstance(catalog, str) else catalog.name,
            "reward": reward,
            "target_flops_reduction": self.target,
            "reward_samples": samples["reward_samples"],
            "bn_recalibration_samples": samples["bn_recalibration_samples"],
            "evaluation": evaluation,
            "band_tolerance": self.band_tolerance,
            "tradeoff_lambda": self.tradeoff_lambda,
            "ignored_layers": None if ignored_layers is None else list(ignored_layers),
            "recovery_samples": samples["recovery_samples"],
            "calibration_samples": samples["calibration_samples"],
            "recovery_batch_size": int(recovery_batch_size),
        }
        # the latency keywords are written only when given, so records of envs without them
        # stay as they were
        if target_latency_reduction is not None:
            self._init_kwargs["target_latency_reduction"] = float(target_latency_reduction)
        if latency_batch_size is not None:
            self._init_kwargs["latency_batch_size"] = int(latency_batch_size)
        if reward_readout != DEFAULT_READOUT:  # likewise: written only when not the default
            self._init_kwargs["reward_readout"] = reward_readout

        # what every reward evaluator is built with: (reward_samples, bn_recalibration_samples,
        # recovery_samples, calibration_samples, recovery_batch_size)
        self.reward_settings = (
            samples["reward_samples"],
            samples["bn_recalibration_samples"],
            samples["recovery_samples"],
            samples["calibration_samples"],
            int(recovery_batch_size),
        )
        self.problem, self.evaluator, self._static, self._reward_evaluator = _shared_problem(
            model,
            dataset,
            data_dir,
            catalog,
            self.reward_settings,
            evaluation,
            None if ignored_layers is None else tuple(ignored_layers),
            self.target,
            reward_readout,
        )
        p = self.problem
        self.num_layers, self.num_actions = p.num_layers, p.num_actions
        self.action_space = spaces.Discrete(self.num_actions)
        self.feature_layout = FeatureLayout(tuple(p.catalog.action_names))
        self.observation_space = spaces.Graph(
            node_space=spaces.Box(-np.inf, np.inf, (self.feature_layout.size,), np.float32),
            edge_space=spaces.Discrete(len(EDGE_TYPES)),
        )
        self._layer_rows = np.asarray(p.graph.layer_nodes, dtype=np.int64)

        cost = p.cost
        self.dense_flops = float(cost.dense_flops)
        self.dense_params = float(cost.dense_params)
        # AMC's action wall, exact: an action is valid when some completion of the policy
        # still meets the target (dead-channel savings included), so every policy with
        # FLOPs within the budget can be played, and every played policy meets it.
        self._max_flops = max_kept(self.dense_flops, self.target)
        if self.reward_name == "budget":
            least = cost.min_flops_from([])
            if least > self._max_flops:
                raise ValueError(
                    f"target_flops_reduction={self.target} cannot be reached on {p.model_name} "
                    f"with catalog {p.catalog.name!r}: at most {1.0 - least / self.dense_flops:.3f} "
                    "of the FLOPs can be removed"
                )
        self.target_latency: float | None = (
            None if target_latency_reduction is None else float(target_latency_reduction)
        )
        self.latency = None
        if self.target_latency is not None or latency_batch_size is not None:
            self._setup_latency(latency_batch_size)
        self._action_names = tuple(p.catalog.action_names)
        self._sparsity = np.asarray([a.sparsity for a in p.catalog.actions], dtype=np.float32)
        self.num_reward_evaluations = 0
        self._t: int | None = None
        self._policy: list[int] = []
        self._last_record: EpisodeRecord | None = None

    # ------------------------------------------------------------------ properties
    @property
    def reward_evaluator(self):
        """The evaluator behind the reward (its ``evaluation=`` mode): ``policy -> accuracy``,
        memoised. ``evaluator`` is always the plain masked-accuracy one."""
        return self._reward_evaluator

    @property
    def action_names(self) -> list[str]:
        """Names of the catalog's actions (index = action)."""
        return list(self._action_names)

    @property
    def env_kwargs(self) -> dict:
        """The keyword arguments that rebuild this env with ``gym.make`` (JSON values)."""
        return dict(self._init_kwargs)

    @property
    def layer_names(self) -> list[str]:
        """Prunable layers in the order the episode decides them."""
        return [layer.name for layer in self.problem.layers]

    # ------------------------------------------------------------------- internals
    def _mask_after(self, decided: Sequence[int]) -> np.ndarray:
        """The action mask of the layer after the ``decided`` ones."""
        valid = self.problem.valid[len(decided)].copy()
        if self.reward_name == "budget":
            if self.target_latency is None:
                valid &= self.problem.cost.min_flops_next(decided) <= self._max_flops
            else:
                valid &= self._completion_wall(decided)
        return valid

    def _setup_latency(self, batch_size: int | None) -> None:
        """The latency table, and with a latency target its completions (the action wall of
        :data:`autosculpt_env.rewards.LATENCY_TARGET`)."""
        from ..latency import LATENCY_BATCH_SIZE, latency_table

        p = self.problem
        self.latency = latency_table(
            p, batch_size=LATENCY_BATCH_SIZE if batch_size is None else int(batch_size)
        )
        if self.target_latency is None:
            return
        table = self.latency
        self._max_latency = max_kept(table.dense_latency, self.target_latency)
        flops = p.cost.flops / self.dense_flops
        lat = table.latency / table.dense_latency
        # fixed per-layer completions: a policy that one of them completes within both
        # targets keeps a valid action at every later step (the completion's own)
        rules = [
            np.argmin(np.where(p.valid, w * flops + (1.0 - w) * lat, np.inf), axis=1)
            for w in (0.0, 0.25, 0.5, 0.75, 1.0)
        ]
        self._completions = np.unique(np.stack(rules), axis=0)
        if self.reward_name == "budget" and not self._completion_wall([]).any():
            fastest = table.latency_reduction(rules[0])
            raise ValueError(
                f"target_latency_reduction={self.target_latency} together with "
                f"target_flops_reduction={self.target} cannot be reached on {p.model_name} "
                f"(batch {table.batch_size}): the fastest policy's predicted latency reduction "
                f"is {fastest:.3f}; lower either target"
            )

    def _completion_wall(self, decided: Sequence[int]) -> np.ndarray:
        """Actions of the next layer that some fixed completion takes within both targets."""
        p, cost, table = self.problem, self.problem.cost, self.latency
        k = len(decided)
        cand = np.flatnonzero(p.valid[k])
        ok = np.zeros(self.num_actions, dtype=bool)
        for rule in self._completions:
            acts = np.concatenate([np.asarray(decided, dtype=np.int64), rule[k:]])
            flops = cost.flops_varying(acts, k, cand)
            lat = table.prediction.flops_varying(acts, k, cand)
            ok[cand] |= (flops <= self._max_flops) & (lat <= self._max_latency)
        return ok

    def _current_flops(self) -> float:
        dense = self.problem.dense_action
        return self.problem.policy_flops(
            self._policy + [dense] * (self.num_layers - len(self._policy))
        )

    def _obs(self) -> spaces.GraphInstance:
        return self.problem.graph.to_graph_instance(self._x)

    def _write_state(self, flops: float) -> None:
        col, x = self.feature_layout.column, self._x
        x[:, col("flops_reduction")] = 1.0 - flops / self.dense_flops
        x[:, col("flops_to_target")] = max(0.0, flops / self.dense_flops - (1.0 - self.target))
        x[:, col("progress")] = len(self._policy) / self.num_layers
        x[:, col("current")] = 0.0
        if self._t is not None and self._t < self.num_layers:
            x[self._layer_rows[self._t], col("current")] = 1.0

    def _check_action(self, action) -> int:
        a = action_index(
            action, f"action must be an integer index into the catalog (0..{self.num_actions - 1})"
        )
        layer = self.problem.layers[self._t]
        valid_names = [self.action_names[i] for i in np.flatnonzero(self._mask)]
        if not 0 <= a < self.num_actions:
            raise ValueError(
                f"action {a} is out of range for Discrete({self.num_actions}) at layer "
                f"{layer.name}; valid actions: {valid_names}"
            )
        if not self._mask[a]:
            why = (
                "does not apply to"
                if not self.problem.valid[self._t, a]
                else "would make the FLOPs target unreachable at"
                if self.target_latency is None
                else "would leave no completion within the FLOPs and latency targets at"
            )
            raise ValueError(
                f"action {a} ({self.action_names[a]}) {why} layer {layer.name} ({layer.kind}); "
                f"valid actions: {valid_names}"
            )
        return a

    # ------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._policy = []
        self._x = self._static.copy()
        self._mask = self._mask_after([])
        self._write_state(self._current_flops())
        info = {
            "action_mask": self._mask.copy(),
            "layer": self.layer_names[0],
            "flops_reduction": 0.0,
        }
        return self._obs(), info

    def step(self, action):
        if self._t is None:
            raise ValueError("call reset() before step()")
        if self._t >= self.num_layers:
            raise ValueError("the episode has ended (every layer is decided); call reset()")
        a = self._check_action(action)
        col, row = self.feature_layout.column, self._layer_rows[self._t]
        self._x[row, col("decided")] = 1.0
        self._x[row, col("chosen_sparsity")] = self._sparsity[a]
        self._x[row, self.feature_layout.block("chosen").start + a] = 1.0
        self._policy.append(a)
        self._t += 1
        flops = self._current_flops()
        self._write_state(flops)
        reduction = 1.0 - flops / self.dense_flops
        if self._t < self.num_layers:
            self._mask = self._mask_after(self._policy)
            info = {
                "action_mask": self._mask.copy(),
                "layer": self.layer_names[self._t],
                "flops_reduction": reduction,
            }
            return self._obs(), 0.0, False, False, info
        metrics = self._metrics(self._policy)
        # no decision is pending: every action is marked valid so masked samplers stay
        # well-defined for the autoreset step that follows in a vector env
        self._mask = np.ones(self.num_actions, dtype=bool)
        info = {"action_mask": self._mask.copy(), "layer": None, **metrics}
        self._last_record = self._record(metrics)
        return self._obs(), float(metrics["reward"]), True, False, info

    # ------------------------------------------------------------- beyond the loop
    def action_masks(self) -> np.ndarray:
        """Valid actions for the current layer (the sb3-contrib ``MaskablePPO`` convention)."""
        if self._t is None:
            raise ValueError("call reset() before action_masks()")
        return self._mask.copy()

    def _metrics(self, policy: list[int]) -> dict:
        p = self.problem
        # charged before anything is scored: never past the limit
        count = evaluation_limit.current().charge()
        self.num_reward_evaluations += 1
        acc = self._reward_evaluator(policy)
        flops = p.policy_flops(policy)
        params = p.policy_params(policy)
        reduction = 1.0 - flops / self.dense_flops
        latency = None if self.latency is None else self.latency.latency_reduction(policy)
        reward = terminal_reward(
            self.reward_name,
            acc,
            reduction,
            flops,
            self.target,
            self.band_tolerance,
            self.tradeoff_lambda,
            latency,
            self.target_latency,
        )
        dense_acc = self._reward_evaluator.dense_accuracy
        evaluation_limit.current().report(count, float(reward), env_within_band(self, reduction))
        extra = {} if latency is None else {"latency_reduction": float(latency)}
        return {
            "accuracy": float(acc),
            "dense_accuracy": float(dense_acc),
            "flops_reduction": float(reduction),
            "params_reduction": float(1.0 - params / self.dense_params),
            "pruning_rate": float(p.pruning_rate(policy)),
            "flops": float(flops),
            "params": float(params),
            "reward": float(reward),
            "policy": [self._action_names[a] for a in policy],
            "reward_evaluations": count,
            **extra,
        }

    def playable(self, policy: Sequence[int] | Sequence[str]) -> bool:
        """Whether an episode may play ``policy``: every action passes the action mask of its
        step (with the ``budget`` reward, AMC's action wall). Costs no reward evaluation and
        leaves the episode in progress alone.

        Raises:
            ValueError: the policy does not have one action per layer.
        """
        idx = self.problem.policy_indices(policy)
        self.problem.check_length(idx)
        for t, a in enumerate(idx):
            if not 0 <= a < self.num_actions or not self._mask_after(idx[:t])[a]:
                return False
        return True

    def evaluate_policy(self, policy: Sequence[int] | Sequence[str]) -> dict:
        """Score a whole policy (one action index or name per layer) in one reward evaluation.

        Returns the terminal metrics of an episode that played it, plus ``meets_target``.
        Under the ``budget`` reward a policy that misses the FLOPs target is still scored
        (``meets_target=False``) so search baselines can see how far off it is.
        """
        idx = self.problem.policy_indices(policy)
        self.problem.check_policy(idx)
        m = self._metrics(idx)
        m["meets_target"] = bool(m["flops_reduction"] >= self.target - 1e-12) and (
            self.target_latency is None or m["latency_reduction"] >= self.target_latency - 1e-12
        )
        return m

    def pruned_model(self, policy: Sequence[int] | Sequence[str]) -> nn.Module:
        """A new ``nn.Module``: the network the reward scored. The policy's masks applied,
        removed channels zeroed, for the ``recovery`` modes the short masked fine-tuning (for
        ``reconstruction`` the refitted weights), and batch-norm statistics recalibrated. In
        ``proxy`` mode, which scores no network, the masked and recalibrated one."""
        idx = self.problem.policy_indices(policy)
        self.problem.check_policy(idx)
        scorer = self.reward_evaluator
        if not hasattr(scorer, "calibrated_model"):  # the proxy
            scorer = self.evaluator
        return scorer.calibrated_model(idx)

    def _record(self, metrics: dict) -> EpisodeRecord:
        env_id = self.spec.id if self.spec is not None else "AutoSculpt-v0"
        return EpisodeRecord(
            env_id=env_id,
            env_kwargs=self.env_kwargs,
            layers=self.layer_names,
            actions=list(metrics["policy"]),
            metrics={k: metrics[k] for k in METRICS + OPTIONAL_METRICS if k in metrics},
            latency_table=None if self.latency is None else self.latency.key,
            reward_evaluations=(
                evaluation_limit.current().stamp(metrics["reward_evaluations"])
                if metrics.get("reward_evaluations") is not None
                else None
            ),
        )

    def record_from_info(self, info: dict, extra: dict | None = None) -> EpisodeRecord:
        """Build the record of a finished episode from its terminal ``info`` (as an agent
        sees it, e.g. one env's slice of a vector env's ``final_info``), with no evaluation."""
        count = info.get("reward_evaluations")
        record = self._record(
            {
                **{k: float(info[k]) for k in METRICS + OPTIONAL_METRICS if k in info},
                "policy": [str(a) for a in info["policy"]],
                "reward_evaluations": None if count is None else int(count),
            }
        )
        record.extra = dict(extra or {})
        return record

    def episode_record(self, policy: Sequence[int] | Sequence[str] | None = None) -> EpisodeRecord:
        """The replayable record of the last finished episode, or of ``policy`` if given."""
        if policy is not None:
            idx = self.problem.policy_indices(policy)
            self.problem.check_policy(idx)
            return self._record(self._metrics(idx))
        if self._last_record is None:
            raise ValueError("no episode has finished yet; pass a policy or finish an episode")
        return self._last_record


def _document(doc: str) -> str:
    """Fill the docstring's generated parts from the registries (one source per fact)."""
    from .. import ENV_DEFAULTS, zoo
    from ..features import layout_rows
    from ..latency import LATENCY_BATCH_SIZE, LATENCY_THREADS
    from ..patterns import CATALOGS
    from ..rewards import LATENCY_TARGET, REWARDS, reward_table

    def names(items) -> str:
        return ", ".join(f"``{n}``" for n in items)

    parts = {
        "{FEATURES}": layout_rows()[1],
        "{REWARDS}": "\n    ".join(reward_table().splitlines()),
        "{MODELS}": names(zoo.ZOO),
        "{CATALOGS}": names(CATALOGS),
        "{REWARD_NAMES}": names(REWARDS),
        "{REGISTERED}": "\n    ".join(
            f"* ``{m.env_id}``: ``{m.name}`` ({m.title})" for m in zoo.ZOO.values()
        ),
        "{ENV_DEFAULTS}": ", ".join(f"``{k}={v!r}``" for k, v in ENV_DEFAULTS.items()),
        "{MODEL_DEFAULTS}": "; ".join(
            f"``{m.name}``: " + ", ".join(f"``{k}={v!r}``" for k, v in m.env_defaults.items())
            for m in zoo.ZOO.values()
            if m.env_defaults
        )
        or "none has",
        "{RECOVERY_BATCH_SIZE}": str(RECOVERY_BATCH_SIZE),
        "{LATENCY_TARGET}": "\n    ".join(textwrap.wrap(LATENCY_TARGET, 88)),
        "{LATENCY_BATCH_SIZE}": str(LATENCY_BATCH_SIZE),
        "{LATENCY_THREADS}": str(LATENCY_THREADS),
        "{RECOVERY_SAMPLES}": str(RECOVERY_SAMPLES),
        "{REWARD_SAMPLES}": str(REWARD_SAMPLES),
        "{BN_RECALIBRATION_SAMPLES}": str(BN_RECALIBRATION_SAMPLES),
        "{CALIBRATION_SAMPLES}": str(CALIBRATION_SAMPLES),
    }
    for key, text in parts.items():
        doc = doc.replace(key, text)
    return doc


AutoSculptEnv.__doc__ = _document(AutoSculptEnv.__doc__)
