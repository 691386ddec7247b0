"""A pruning problem: one pretrained network, one catalog, one dataset.

:class:`PruningProblem` holds everything an episode needs that does not change from one
episode to the next, built once:

* the network's :class:`~autosculpt_env.graph.NetGraph` (``torch.fx``),
* the (layer, action) keep-masks, computed once and cached,
* the (layer, action) cost table (a policy's FLOPs is a sum of table entries),
* the reward evaluator (accuracy on the ``reward`` split, memoised by policy).

Conventions:

* A *policy* is one action index per prunable layer, in the graph's topological order.
* A filter (output channel) whose weights are all masked removes the channel: its bias and
  the affine parameters of the batch norm right after it are zeroed too, so the channel is
  exactly zero and consumers' multiply-adds on it are dead (see :mod:`autosculpt_env.cost`).
* The ``structured`` catalog ranks channels by their coupling group's summed filter norms,
  so coupled layers (e.g. the convolutions meeting at a residual add) remove nested subsets
  of the same channels; other catalogs rank each layer's filters by their own norms.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import zoo
from .cost import CostTable, build_cost_table
from .graph import NetGraph, build_graph
from .patterns import Catalog, get_catalog


@dataclass
class LayerInfo:
    """One prunable layer as the env sees it."""

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor  # the pretrained weight (a private clone)
    bias: torch.Tensor | None
    norm: str | None  # name of the batch norm that directly follows, if any
    num_heads: int | None = None
    energy: float = 0.0
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def resolve_model(model: str | nn.Module, dataset: str, data_dir=None) -> tuple[nn.Module, str]:
    """Return ``(network, model_name)`` for a zoo name or a user's ``nn.Module``.

    A user's module is deep-copied once so the env never changes the caller's weights.
    """
    if isinstance(model, str):
        zoo_models = sorted({m for m, _ in zoo.ENTRIES})
        if model not in zoo_models:
            raise ValueError(
                f"unknown model {model!r}: pass a zoo name ({', '.join(zoo_models)}) or an "
                "nn.Module with pretrained weights"
            )
        return zoo.load(model, dataset, data_dir=data_dir), model
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).eval(), type(model).__name__
    raise TypeError(f"model must be a zoo name or an nn.Module, got {type(model).__name__}")


class PruningProblem:
    """Graph, masks and cost table of one network under one pattern catalog.

    Args:
        model: a zoo name (``"resnet20"`` ...) or an ``nn.Module`` with pretrained weights.
        dataset: dataset the network was trained on (decides the input shape and classes).
        catalog: a catalog name or :class:`~autosculpt_env.patterns.Catalog`.
        data_dir: dataset folder (passed to :func:`autosculpt_env.data.load`).
    """

    def __init__(
        self,
        model: str | nn.Module,
        dataset: str,
        catalog: str | Catalog = "autosculpt",
        data_dir=None,
    ):
        self.dataset_info = data_mod.info(dataset)
        self.catalog = get_catalog(catalog)
        self.model, self.model_name = resolve_model(model, dataset, data_dir)
        info = self.dataset_info
        self.example_inputs = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        self.graph: NetGraph = build_graph(self.model, self.example_inputs)
        with torch.no_grad():
            n_out = self.model(self.example_inputs).shape[-1]
        if n_out != info.num_classes:
            raise ValueError(
                f"model {self.model_name} has {n_out} outputs but dataset {dataset!r} has "
                f"{info.num_classes} classes; build the model with num_classes={info.num_classes}"
            )
        modules = dict(self.model.named_modules())
        self._modules = modules
        self.layers: list[LayerInfo] = []
        for name in self.graph.layers:
            mod = modules[name]
            parent = modules[name.rsplit(".", 1)[0]] if "." in name else self.model
            heads = getattr(parent, "num_heads", None)
            w = mod.weight.detach().clone()
            layer = LayerInfo(
                name=name,
                module=mod,
                kind=self.graph.layer_kind(name),
                weight=w,
                bias=None if mod.bias is None else mod.bias.detach().clone(),
                norm=self._following_norm(name),
                num_heads=heads,
                energy=float(w.pow(2).sum()),
            )
            layer.valid = np.asarray(
                self.catalog.valid_for(tuple(w.shape), layer.kind, num_heads=heads), dtype=bool
            )
            self.layers.append(layer)
        self.num_layers = len(self.layers)
        self.num_actions = len(self.catalog)
        self.valid = np.stack([layer.valid for layer in self.layers])  # (L, P)
        self._scores = self._ranking_scores()
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self.cost: CostTable = build_cost_table(self.graph, self.catalog, self.mask)
        self.dense_action = self.catalog.dense_action()
        self.total_prunable_weights = sum(layer.weight.numel() for layer in self.layers)

    # ------------------------------------------------------------------ structure
    def _following_norm(self, layer: str) -> str | None:
        idx = self.graph.layer_nodes[self.graph.layers.index(layer)]
        outs = [d for s, d, _ in self.graph.edges if s == idx]
        for d in outs:
            node = self.graph.nodes[d]
            if node.op_type == "batch_norm" and len(outs) == 1:
                return node.target
        return None

    def _ranking_scores(self) -> list[torch.Tensor | None]:
        if self.catalog.name != "structured":
            return [None] * self.num_layers
        norms = {
            layer.name: layer.weight.flatten(1).norm(dim=1) for layer in self.layers
        }
        scores: list[torch.Tensor | None] = []
        for layer in self.layers:
            group = [g for g in self.graph.group_of(layer.name) if norms[g].shape == norms[layer.name].shape]
            scores.append(torch.stack([norms[g] for g in group]).sum(0) if len(group) > 1 else None)
        return scores

    # ---------------------------------------------------------------------- masks
    def mask(self, layer: int, action: int) -> torch.Tensor | None:
        """The bool keep-mask of ``layer`` under ``action`` (cached); ``None`` if invalid."""
        key = (layer, action)
        if key not in self._masks:
            info = self.layers[layer]
            if not info.valid[action]:
                return None
            self._masks[key] = self.catalog.mask(
                action, info.weight, info.kind, scores=self._scores[layer], num_heads=info.num_heads
            )
        return self._masks[key]

    def policy_masks(self, policy: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{layer name: keep-mask}`` for a full policy."""
        self.check_policy(policy)
        return {layer.name: self.mask(i, int(a)) for i, (layer, a) in enumerate(zip(self.layers, policy))}

    def check_policy(self, policy: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the first layer whose action is out of range or invalid."""
        if len(policy) != self.num_layers:
            raise ValueError(f"a policy needs {self.num_layers} actions (one per layer), got {len(policy)}")
        for i, a in enumerate(policy):
            if not (0 <= int(a) < self.num_actions) or not self.valid[i, int(a)]:
                names = [self.catalog.action_names[j] for j in np.flatnonzero(self.valid[i])]
                raise ValueError(
                    f"action {a!r} is not valid for layer {self.layers[i].name} "
                    f"({self.layers[i].kind}); valid actions: {names}"
                )

    def actions_from_names(self, names: Sequence[str]) -> list[int]:
        """Map action names (as in an episode record) to indices, with a clear error."""
        lookup = {n: i for i, n in enumerate(self.catalog.action_names)}
        try:
            return [lookup[n] for n in names]
        except KeyError as e:
            raise ValueError(f"unknown action name {e.args[0]!r}; catalog {self.catalog.name} has {list(lookup)}") from None

    def apply_policy(
        self, model: nn.Module, policy: Sequence[int], layers: Sequence[int] | None = None
    ) -> None:
        """Write the policy's masked weights into ``model`` (a structural copy of the network).

        Also zeroes the bias and the following batch-norm channel of every fully removed
        filter (restoring the pretrained values of the others).

        Args:
            model: the network to write into (never the problem's own ``self.model``).
            policy: one action per layer.
            layers: only rewrite these layer indices (default: all).
        """
        modules = dict(model.named_modules())
        src_modules = self._modules
        with torch.no_grad():
            for i in range(self.num_layers) if layers is None else layers:
                layer, m = self.layers[i], self.mask(i, int(policy[i]))
                mod = modules[layer.name]
                mod.weight.copy_(layer.weight * m)
                removed = ~m.flatten(1).any(dim=1)  # whole output channels removed
                if layer.bias is not None:
                    mod.bias.copy_(layer.bias.masked_fill(removed, 0.0))
                if layer.norm is not None:
                    bn, src = modules[layer.norm], src_modules[layer.norm]
                    bn.weight.copy_(src.weight.masked_fill(removed, 0.0))
                    bn.bias.copy_(src.bias.masked_fill(removed, 0.0))

    # ----------------------------------------------------------------------- cost
    def policy_flops(self, policy: Sequence[int]) -> float:
        return self.cost.policy_flops([int(a) for a in policy])

    def policy_params(self, policy: Sequence[int]) -> float:
        return self.cost.policy_params([int(a) for a in policy])

    def pruning_rate(self, policy: Sequence[int]) -> float:
        """Fraction of the prunable layers' weights that the policy masks."""
        kept = sum(int(self.mask(i, int(a)).sum()) for i, a in enumerate(policy))
        return 1.0 - kept / self.total_prunable_weights

    def kept_energy(self, layer: int, action: int) -> float:
        """Fraction of the layer's weight energy (sum of squares) the action keeps."""
        m = self.mask(layer, action)
        if m is None:
            return 0.0
        w = self.layers[layer].weight
        return float((w * m).pow(2).sum()) / max(self.layers[layer].energy, 1e-12)
