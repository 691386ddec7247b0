"""FLOPs and parameters of pruned networks: a per-(layer, action) table, exact for any policy.

Conventions (FLOPs are per image, batch 1):

* **FLOPs = 2 x MACs.** Dense counts are the graph's, i.e. what
  ``torch.utils.flop_counter.FlopCounterMode`` counts: convolutions, ``mm``/``addmm``
  (linear layers) and ``bmm``/matmul; bias adds, norms, activations and pools are free.
* **A pruned layer** costs ``2 x (kept weights) x (uses per weight)``: a convolution uses
  each weight once per output position, a linear layer once per token (the product of the
  input's non-feature dimensions). Bias adds stay uncounted, as in ``FlopCounterMode``.
* **Removed channels.** An output channel whose every weight is masked is *removed*: the
  pruned model zeroes its bias and the scale and shift of the batch norms that follow it
  (``NetGraph.batch_norms``), so the channel is exactly zero. The multiply-adds that the
  layer's consumers (``NetGraph.consumers``: layers reached through zero-preserving,
  channel-preserving operators only) perform on that input channel are then dead and an
  engine skips them; they are subtracted. Nothing is subtracted across an add, a concat or
  a matmul (another branch may keep the channel alive), and deadness does not cascade: a
  consumer whose inputs are dead but whose own filter is not fully masked still outputs
  its batch-norm shift, so its channel stays alive.
* **Attention matmuls** (``q @ k^T``, ``attn @ v``) and everything else outside prunable
  layers stay dense: they are ``fixed_flops``.
* **Parameters** are those the pruned network needs: every parameter that is neither held
  at zero nor *dead* (:mod:`autosculpt_env.liveness`). Held at zero: masked weights, the
  biases of removed channels and the scale and shift of their batch norms. Dead: weights
  that only ever read an exactly-zero channel (consumers' weights on removed channels, also
  across a residual add all of whose operands remove the channel, and non-prunable layers'
  such as the classifier's), and the ``q``/``k`` rows and output-projection columns of
  attention heads whose ``v`` rows are all removed. This is what the materialised network
  stores (:func:`autosculpt_env.materialize.materialize`). The table's ``params`` entries are
  a layer's kept weights plus one bias per output channel that is not removed, and
  ``fixed_params`` everything else at its dense size; :meth:`CostTable.policy_params`
  subtracts the policy's held-zero and dead parameters from their sum
  (:meth:`CostTable.stored_params` is that sum, the count of records made before dead
  parameters were subtracted).

A consumer reads a layer's output through single-input operators, so it has exactly one
producer: producer-consumer pairs form a forest, which makes the exact cost of a policy a
sum of per-layer terms and per-pair corrections (:attr:`CostTable.dead`), and the cheapest
completion of a partial policy a small tree dynamic program
(:meth:`CostTable.min_flops_from`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .graph import NetGraph
from .liveness import Liveness, dead_params, kept_matrix
from .patterns import Catalog


class LiveParams:
    """The held-zero and dead parameters of a policy (:mod:`autosculpt_env.liveness`), from
    each (layer, action)'s kept weights per (row, input column), tabulated on first use.

    Args:
        graph: the network's graph.
        masks: ``masks(i, a)``, layer ``i``'s keep-mask under action ``a``.
    """

    def __init__(self, graph: NetGraph, masks: Callable[[int, int], torch.Tensor | None]):
        self.liveness = Liveness(graph)
        self.layers = list(graph.layers)
        self._masks = masks
        self._kept: dict[tuple[int, int], np.ndarray] = {}
        self._memo: dict[tuple[int, ...], int] = {}

    def dead_params(self, actions: Sequence[int]) -> int:
        key = tuple(int(a) for a in actions)
        if key not in self._memo:
            if len(self._memo) > 4096:
                self._memo.clear()
            kept = {}
            for i, (name, a) in enumerate(zip(self.layers, key)):
                if (i, a) not in self._kept:
                    self._kept[i, a] = kept_matrix(self._masks(i, a))
                kept[name] = self._kept[i, a]
            self._memo[key] = self.liveness.count(self.liveness.run(kept), kept)
        return self._memo[key]


@dataclass
class CostTable:
    """FLOPs and parameters of every (layer, action), with the dead-channel corrections.

    Attributes:
        layers: prunable layer names (the graph's order).
        action_names: catalog action names.
        flops: float64 ``(L, P)``: FLOPs of layer ``i``'s own kept weights under action
            ``a``; NaN where the action is invalid.
        params: float64 ``(L, P)``: kept weights plus biases of non-removed output channels;
            NaN where invalid.
        dead: ``(producer i, consumer m) -> (P, P)``: FLOPs of consumer ``m`` made dead when
            ``i`` takes action ``a`` (rows) and ``m`` takes action ``b`` (columns).
        dense_flops: FLOPs of the dense model (prunable layers, matmuls, everything).
        dense_params: parameters of the dense model.
        fixed_flops: FLOPs outside prunable layers.
        fixed_params: parameters outside prunable layers' weights and biases.
        liveness: the graph's zero propagation and the masks, for the dead parameters of
            a policy (``None``: nothing is subtracted).
    """

    layers: list[str]
    action_names: list[str]
    flops: np.ndarray
    params: np.ndarray
    dead: dict[tuple[int, int], np.ndarray]
    dense_flops: int
    dense_params: int
    fixed_flops: float
    fixed_params: float
    liveness: LiveParams | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n_layers = len(self.layers)
        parent = [-1] * n_layers
        self._children: list[list[int]] = [[] for _ in range(n_layers)]
        for i, m in sorted(self.dead):
            if parent[m] not in (-1, i) or m <= i:
                raise ValueError(
                    f"layer {self.layers[m]} has dead-channel corrections from two producers "
                    "or from a later layer; producer-consumer pairs must form a forest"
                )
            parent[m] = i
            self._children[i].append(m)
        self._roots = [i for i in range(n_layers) if parent[i] == -1]
        self._f = np.where(np.isnan(self.flops), np.inf, self.flops)
        self._d = {k: np.nan_to_num(v, nan=0.0) for k, v in self.dead.items()}
        # Cheapest cost of each layer's subtree of consumers for each of its own actions,
        # with all of them free: consumers come later in topological order, so a reverse
        # sweep sees every child before its parent.
        self._free: list[np.ndarray] = [np.empty(0)] * n_layers
        for i in reversed(range(n_layers)):
            value = self._f[i].copy()
            for m in self._children[i]:
                value = value + np.min(self._free[m][None, :] - self._d[(i, m)], axis=1)
            self._free[i] = value
        # _root_suffix[k] = sum of the cheapest subtree costs of the roots at index >= k.
        self._valid = ~np.isnan(self.flops)
        root_min = np.zeros(n_layers + 1)
        for r in self._roots:
            root_min[r] = float(np.min(self._free[r]))
        self._root_suffix = np.cumsum(root_min[::-1])[::-1]

    def _check(self, actions: Sequence[int], full: bool) -> list[int]:
        acts = [int(a) for a in actions]
        n_layers, n_actions = self.flops.shape
        if (len(acts) != n_layers) if full else (len(acts) > n_layers):
            raise ValueError(
                f"expected {'one action per layer' if full else 'at most one action per layer'} "
                f"({n_layers} layers), got {len(acts)}"
            )
        arr = np.asarray(acts, dtype=np.int64)
        if arr.size == 0 or (
            arr.min() >= 0 and arr.max() < n_actions and self._valid[np.arange(arr.size), arr].all()
        ):
            return acts
        for i, a in enumerate(acts):  # slow path only to name the offending layer
            if not 0 <= a < n_actions or np.isnan(self.flops[i, a]):
                valid = [self.action_names[j] for j in np.flatnonzero(~np.isnan(self.flops[i]))]
                raise ValueError(
                    f"action {a} is not valid for layer {self.layers[i]}; valid: {valid}"
                )
        return acts

    def policy_flops(self, actions: Sequence[int]) -> float:
        """Exact FLOPs of a full policy: fixed + per-layer costs - dead-channel corrections."""
        acts = self._check(actions, full=True)
        total = self.fixed_flops + sum(float(self.flops[i, a]) for i, a in enumerate(acts))
        total -= sum(float(d[acts[i], acts[m]]) for (i, m), d in self.dead.items())
        return total

    def policy_params(self, actions: Sequence[int]) -> float:
        """Exact parameters a full policy's pruned network needs (see the module conventions):
        :meth:`stored_params` less the held-zero and dead parameters."""
        stored = self.stored_params(actions)
        if self.liveness is None:
            return stored
        return stored - float(self.liveness.dead_params([int(a) for a in actions]))

    def stored_params(self, actions: Sequence[int]) -> float:
        """Kept weights, biases of channels not removed, and every other parameter at its
        dense size (the ``params`` of records made before dead parameters were subtracted)."""
        acts = self._check(actions, full=True)
        return self.fixed_params + sum(float(self.params[i, a]) for i, a in enumerate(acts))

    def flops_varying(self, actions: Sequence[int], k: int, cand: np.ndarray) -> np.ndarray:
        """:meth:`policy_flops` of a full, valid policy with layer ``k``'s action replaced by
        each of ``cand`` (valid actions of that layer), as one vector."""
        acts = np.asarray(actions, dtype=np.int64)
        rows = np.flatnonzero(np.arange(len(self.layers)) != k)
        total = self.fixed_flops + self.flops[rows, acts[rows]].sum() + self.flops[k, cand]
        for (i, m), dead in self._d.items():
            if i == k:
                total = total - dead[cand, acts[m]]
            elif m == k:
                total = total - dead[acts[i], cand]
            else:
                total = total - dead[acts[i], acts[m]]
        return total

    def min_flops_from(self, decided: Sequence[int]) -> float:
        """The fewest FLOPs any completion of a partial policy can reach (exact).

        The first ``len(decided)`` layers take the given actions; every other layer may take
        any valid action. Dead-channel corrections are included exactly, by dynamic
        programming over the producer-consumer forest: a layer's subtree cost for each of
        its actions is its own FLOPs plus, per consumer, the cheapest consumer subtree cost
        minus the FLOPs that action makes dead. Undecided subtrees are precomputed, so a
        call costs O(len(decided)) small vector operations.

        Args:
            decided: actions of the first layers, in layer order.

        Returns:
            The minimum FLOPs; equals :meth:`policy_flops` for a full policy.
        """
        return self._min_flops_from(self._check(decided, full=False))

    def _min_flops_from(self, acts: list[int]) -> float:
        k = len(acts)
        total = self.fixed_flops + float(self._root_suffix[k])
        subtree: dict[int, float] = {}
        parent_free = set(self._roots)
        for i in reversed(range(k)):
            a = acts[i]
            value = float(self._f[i, a])
            for m in self._children[i]:
                if m < k:
                    value += subtree[m] - float(self._d[(i, m)][a, acts[m]])
                else:
                    value += float(np.min(self._free[m] - self._d[(i, m)][a]))
            subtree[i] = value
            if i in parent_free:
                total += value
        return total

    def min_flops_next(self, decided: Sequence[int]) -> np.ndarray:
        """:meth:`min_flops_from` for every action of the next layer (``inf`` where invalid)."""
        k = len(decided)
        out = np.full(self.flops.shape[1], np.inf)
        if k >= len(self.layers):
            raise ValueError("every layer is decided already")
        acts = self._check(decided, full=False)
        cand = np.flatnonzero(self._valid[k])
        out[cand] = self._min_flops_next(acts, cand)
        return out

    def _min_flops_next(self, acts: list[int], cand: np.ndarray) -> np.ndarray:
        """The dynamic program of :meth:`_min_flops_from` run once for every candidate action
        of layer ``len(acts)`` at the same time (only that layer's action varies, so values
        on its path to the root are vectors over ``cand``, all others scalars)."""
        last = len(acts)
        k = last + 1
        total = self.fixed_flops + float(self._root_suffix[k])
        subtree: dict[int, np.ndarray | float] = {}
        roots = set(self._roots)
        for i in reversed(range(k)):
            a = cand if i == last else acts[i]
            value = self._f[i, a]
            for m in self._children[i]:
                if m < k:
                    am = cand if m == last else acts[m]
                    value = value + subtree[m] - self._d[(i, m)][a, am]
                else:
                    value = value + np.min(self._free[m] - self._d[(i, m)][a], axis=-1)
            subtree[i] = value
            if i in roots:
                total = total + value
        return np.broadcast_to(np.asarray(total, dtype=np.float64), cand.shape)


def _uses_per_weight(graph: NetGraph, layer: str) -> int:
    """How many multiply-adds each weight takes part in (output positions or tokens)."""
    node = graph.node(layer)
    numel = graph.module(layer).weight.numel()
    uses, rest = divmod(node.flops, 2 * numel)
    if rest:
        raise ValueError(
            f"layer {layer}: {node.flops} FLOPs is not 2 x {numel} weights x a whole number "
            "of positions"
        )
    return uses


def _in_channel_counts(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Kept weights per input channel of a layer, float64 ``(in_channels,)``."""
    m = mask.to(torch.float64)
    if isinstance(module, nn.Conv2d):
        groups = module.groups
        out_c, in_per_group = m.shape[:2]
        per = m.reshape(groups, out_c // groups, in_per_group, -1).sum(dim=(1, 3))
        return per.reshape(-1)
    return m.reshape(m.shape[0], -1).sum(0)


def _removed_channels(mask: torch.Tensor) -> torch.Tensor:
    return ~mask.reshape(mask.shape[0], -1).any(1)


def _layer_params(module: nn.Module, mask: torch.Tensor) -> float:
    kept = float(mask.sum())
    if getattr(module, "bias", None) is not None:
        kept += float((~_removed_channels(mask)).sum())
    return kept


def _owned_params(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return module.weight.numel() + (bias.numel() if bias is not None else 0)


def build_cost_table(
    graph: NetGraph,
    catalog: Catalog,
    masks: Callable[[int, int], torch.Tensor | None],
) -> CostTable:
    """Tabulate FLOPs and parameters of every (layer, action) of a catalog.

    Args:
        graph: the network's graph.
        catalog: the pattern catalog (its actions are the table's columns).
        masks: ``masks(i, a)`` returns layer ``i``'s bool keep-mask under action ``a``, or
            ``None`` where the action is invalid for the layer.

    Returns:
        The table.
    """
    n_layers, n_actions = len(graph.layers), len(catalog)
    flops = np.full((n_layers, n_actions), np.nan)
    params = np.full((n_layers, n_actions), np.nan)
    removed = [np.full((n_actions, 0), np.nan)] * n_layers  # (P, out_channels)
    per_in = [np.full((n_actions, 0), np.nan)] * n_layers  # (P, in_channels)
    uses = [_uses_per_weight(graph, name) for name in graph.layers]
    for i, name in enumerate(graph.layers):
        module = graph.module(name)
        weight = module.weight
        rem = np.full((n_actions, weight.shape[0]), np.nan)
        cnt = None
        for a in range(n_actions):
            mask = masks(i, a)
            if mask is None:
                continue
            if mask.shape != weight.shape:
                raise ValueError(
                    f"mask of layer {name} under {catalog.action_names[a]} has shape "
                    f"{tuple(mask.shape)}, the weight {tuple(weight.shape)}"
                )
            mask = mask.detach().to("cpu", torch.bool)
            flops[i, a] = 2.0 * float(mask.sum()) * uses[i]
            params[i, a] = _layer_params(module, mask)
            rem[a] = _removed_channels(mask).numpy()
            counts = _in_channel_counts(module, mask).numpy()
            if cnt is None:
                cnt = np.full((n_actions, counts.shape[0]), np.nan)
            cnt[a] = counts
        removed[i] = rem
        per_in[i] = cnt if cnt is not None else np.full((n_actions, 0), np.nan)

    dead: dict[tuple[int, int], np.ndarray] = {}
    index = {name: i for i, name in enumerate(graph.layers)}
    for i, name in enumerate(graph.layers):
        for consumer in graph.consumers(name):
            m = index[consumer]
            if removed[i].shape[1] != per_in[m].shape[1]:
                raise ValueError(
                    f"{name} has {removed[i].shape[1]} output channels but its consumer "
                    f"{consumer} reads {per_in[m].shape[1]}"
                )
            dead[(i, m)] = 2.0 * uses[m] * (removed[i] @ per_in[m].T)

    prunable_flops = sum(graph.node(name).flops for name in graph.layers)
    prunable_params = sum(_owned_params(graph.module(name)) for name in graph.layers)
    return CostTable(
        layers=list(graph.layers),
        action_names=catalog.action_names,
        flops=flops,
        params=params,
        dead=dead,
        dense_flops=graph.dense_flops,
        dense_params=graph.dense_params,
        fixed_flops=float(graph.dense_flops - prunable_flops),
        fixed_params=float(graph.dense_params - prunable_params),
        liveness=LiveParams(graph, masks),
    )


def masked_flops(graph: NetGraph, masks: dict[str, torch.Tensor]) -> float:
    """FLOPs of the network with the given masks, counted directly from the masks.

    The reference for :meth:`CostTable.policy_flops`: kept multiply-adds of every layer,
    minus the multiply-adds of consumers on removed channels. Layers missing from ``masks``
    are dense.
    """
    total = float(graph.dense_flops - sum(graph.node(name).flops for name in graph.layers))
    full = {
        name: masks.get(name, torch.ones_like(graph.module(name).weight, dtype=torch.bool))
        .detach()
        .to("cpu", torch.bool)
        for name in graph.layers
    }
    for name in graph.layers:
        mask = full[name]
        total += 2.0 * float(mask.sum()) * _uses_per_weight(graph, name)
        gone = _removed_channels(mask)
        for consumer in graph.consumers(name):
            counts = _in_channel_counts(graph.module(consumer), full[consumer])
            total -= 2.0 * _uses_per_weight(graph, consumer) * float(counts[gone].sum())
    return total


def masked_params(graph: NetGraph, masks: dict[str, torch.Tensor], live: bool = True) -> float:
    """Parameters of the network with the given masks (see the module conventions; without
    ``live``, the stored count, dead and held-zero parameters included)."""
    total = float(graph.dense_params)
    for name in graph.layers:
        module = graph.module(name)
        total -= _owned_params(module)
        mask = masks.get(name)
        mask = (
            torch.ones_like(module.weight, dtype=torch.bool)
            if mask is None
            else mask.detach().to("cpu", torch.bool)
        )
        total += _layer_params(module, mask)
    if live:
        full = {
            name: masks.get(name, torch.ones_like(graph.module(name).weight, dtype=torch.bool))
            for name in graph.layers
        }
        total -= dead_params(graph, full)
    return total
