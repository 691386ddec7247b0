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
* A catalog with ``group_ranking`` (``structured``) ranks channels by their coupling group's
  summed filter L2 norms, so coupled layers (e.g. the convolutions meeting at a residual add)
  remove nested subsets of the same channels; other catalogs rank each layer's filters by
  their own L2 norms.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import zoo
from .cost import CostTable, build_cost_table
from .graph import NetGraph, build_graph
from .patterns import Catalog, Heads, get_catalog
from .traceable import make_traceable


@dataclass
class LayerInfo:
    """One prunable layer as the env sees it."""

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor  # the pretrained weight (a private clone)
    bias: torch.Tensor | None
    batch_norms: list[
        str
    ]  # batch norms on the layer's channel-preserving paths (zeroed with a channel)
    heads: Heads | None = None  # head structure of attention projections
    energy: float = 0.0
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def resolve_model(model: str | nn.Module, dataset: str, data_dir=None) -> tuple[nn.Module, str]:
    """Return ``(network, model_name)`` for a zoo name or a user's ``nn.Module``.

    A user's module is deep-copied once so the env never changes the caller's weights, and
    its ``torch.nn`` transformer modules are rewritten into traceable equivalents
    (:func:`autosculpt_env.traceable.make_traceable`) so their layers can be pruned.
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
        return make_traceable(copy.deepcopy(model)).eval(), type(model).__name__
    raise TypeError(f"model must be a zoo name or an nn.Module, got {type(model).__name__}")


def action_index(action, what: str) -> int:
    """``action`` as an int (a 0-d array is unwrapped); bools and non-integers raise
    ``TypeError`` starting with ``what``."""
    if isinstance(action, np.ndarray) and action.ndim == 0:
        action = action.item()
    if isinstance(action, bool | np.bool_) or not isinstance(action, numbers.Integral):
        raise TypeError(f"{what}, got {type(action).__name__} {action!r}")
    return int(action)


def output_layers(graph: NetGraph) -> list[str]:
    """Prunable layers that feed the network's output with no other prunable layer between
    (the classifier). Pruning their output rows would delete classes or logits."""
    layer_at = dict(zip(graph.layer_nodes, graph.layers))
    into = graph.data_flow(reverse=True)
    out, stack, seen = [], [len(graph.nodes) - 1], set()
    while stack:
        n = stack.pop()
        for src in into.get(n, []):
            if src in seen:
                continue
            seen.add(src)
            if src in layer_at:
                out.append(layer_at[src])
            else:
                stack.append(src)
    return sorted(out, key=graph.layers.index)


def check_model_tensors(model: nn.Module, name: str) -> None:
    """Refuse a network the env cannot run as given, naming the dtype or device.

    The env feeds float32 images on the CPU; a half, float64, GPU or meta-device network
    would otherwise fail in its first forward pass with advice about the input shape.
    """
    for pname, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise ValueError(
                f"model {name} has tensors on the meta device ({pname}): it holds no weights; "
                "materialize and load them first (model.to_empty(device='cpu') and "
                "load_state_dict)"
            )
        if t.device.type != "cpu":
            raise ValueError(
                f"model {name} has tensors on {t.device} ({pname}); the env runs on the CPU: "
                "pass model.cpu()"
            )
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"model {name} has {t.dtype} tensors ({pname}); the env feeds float32 "
                "images: pass model.float()"
            )


def check_tied_weights(model: nn.Module, layers: Sequence[str], ignored: Sequence[str]) -> None:
    """Refuse prunable layers whose weight or bias is shared with another module.

    Pruning a tied weight prunes every module that uses it, while the env scores one
    decision per layer: the same policy would score differently depending on which layer
    was written last. Tied layers must be untied or all kept out of the episode.
    """
    owners: dict[object, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        key = p.untyped_storage().data_ptr() or id(p)
        owners.setdefault(key, []).append(pname)
    for layer in layers:
        for pname in (f"{layer}.weight", f"{layer}.bias"):
            names = next((v for v in owners.values() if pname in v), [])
            if len(names) > 1:
                modules = sorted({n.rsplit(".", 1)[0] for n in names})
                prunable = [m for m in modules if m not in ignored]
                raise ValueError(
                    f"layers {', '.join(modules)} share one tensor ({' is '.join(names)}): "
                    "pruning it would prune all of them, but the env decides each layer "
                    "separately. Untie them (give each its own nn.Parameter) or keep them "
                    f"dense with ignored_layers=[..., {', '.join(map(repr, prunable))}]"
                )


class PruningProblem:
    """Graph, masks and cost table of one network under one pattern catalog.

    Args:
        model: a zoo name (``"resnet20"`` ...) or an ``nn.Module`` with pretrained weights.
        dataset: dataset the network was trained on (decides the input shape and classes).
        catalog: a catalog name or :class:`~autosculpt_env.patterns.Catalog`.
        data_dir: dataset folder (passed to :func:`autosculpt_env.data.load`).
        ignored_layers: ``Conv2d``/``Linear`` module names kept dense and out of the episode
            (Torch-Pruning's ``ignored_layers``). ``None`` (default) ignores the output
            layers (the classifier: removing its rows would delete classes).
    """

    def __init__(
        self,
        model: str | nn.Module,
        dataset: str,
        catalog: str | Catalog = "autosculpt",
        data_dir=None,
        ignored_layers: Sequence[str] | None = None,
    ):
        self.dataset_info = data_mod.info(dataset)
        self.catalog = get_catalog(catalog)
        self.model, self.model_name = resolve_model(model, dataset, data_dir)
        check_model_tensors(self.model, self.model_name)
        info = self.dataset_info
        self.example_inputs = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        try:
            with torch.no_grad():
                n_out = self.model(self.example_inputs).shape[-1]
        except Exception as e:
            raise ValueError(
                f"model {self.model_name} fails on a {dataset} input of shape "
                f"{tuple(self.example_inputs.shape)} ({type(e).__name__}: {e}); build it with "
                f"in_channels={info.in_channels}, image_size={info.image_size}"
            ) from e
        if n_out != info.num_classes:
            raise ValueError(
                f"model {self.model_name} has {n_out} outputs but dataset {dataset!r} has "
                f"{info.num_classes} classes; build the model with num_classes={info.num_classes}"
            )
        graph = build_graph(self.model, self.example_inputs)
        if ignored_layers is None:
            ignored_layers = output_layers(graph)
        unknown = set(ignored_layers) - set(graph.layers)
        if unknown:
            raise ValueError(
                f"ignored_layers {sorted(unknown)} are not prunable layers; layers: {graph.layers}"
            )
        self.ignored_layers = list(ignored_layers)
        if self.ignored_layers:
            with warnings.catch_warnings():  # the first build has warned already
                warnings.simplefilter("ignore")
                graph = build_graph(
                    self.model, self.example_inputs, ignored_layers=self.ignored_layers
                )
        if not graph.layers:
            raise ValueError(
                f"model {self.model_name} has no prunable layer left (ignored: {self.ignored_layers})"
            )
        self.graph: NetGraph = graph
        modules = dict(self.model.named_modules())
        self.layers: list[LayerInfo] = []
        for name in self.graph.layers:
            mod = modules[name]
            heads = self.graph.heads(name)
            w = mod.weight.detach().clone()
            layer = LayerInfo(
                name=name,
                module=mod,
                kind=self.graph.layer_kind(name),
                weight=w,
                bias=None if mod.bias is None else mod.bias.detach().clone(),
                batch_norms=self.graph.batch_norms(name),
                heads=heads,
                energy=float(w.pow(2).sum()),
            )
            layer.valid = np.asarray(
                self.catalog.valid_for(tuple(w.shape), layer.kind, **self._head_kwargs(heads)),
                dtype=bool,
            )
            self.layers.append(layer)
        check_tied_weights(self.model, self.graph.layers, self.ignored_layers)
        # pretrained values of every parameter a policy may hold at zero (held_masks)
        params = dict(self.model.named_parameters())
        self._pretrained: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            self._pretrained[f"{layer.name}.weight"] = layer.weight
            if layer.bias is not None:
                self._pretrained[f"{layer.name}.bias"] = layer.bias
            for name in (f"{bn}.{p}" for bn in layer.batch_norms for p in ("weight", "bias")):
                if name in params:
                    self._pretrained[name] = params[name].detach().clone()
        self.num_layers = len(self.layers)
        self.num_actions = len(self.catalog)
        self.valid = np.stack([layer.valid for layer in self.layers])  # (L, P)
        self._scores = self._ranking_scores()
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._kept: dict[tuple[int, int], int] = {}  # kept weights per (layer, action)
        self.cost: CostTable = build_cost_table(self.graph, self.catalog, self.mask)
        self.dense_action = self.catalog.dense_action()
        self.total_prunable_weights = sum(layer.weight.numel() for layer in self.layers)

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _head_kwargs(heads: Heads | None) -> dict:
        return {} if heads is None else heads.mask_kwargs()

    def _ranking_scores(self) -> list[torch.Tensor | None]:
        """Group scores for catalogs with ``group_ranking``: coupled layers rank channels alike.

        A layer's per-channel score is the summed L2 norm of that channel's filters over its
        coupling group. An attention output projection takes the scores of its module's
        q/k/v group along its input (head) axis (for a fused qkv projection, the summed norms
        of its q, k and v rows), so it drops the heads q, k and v drop.
        """
        if not self.catalog.group_ranking:
            return [None] * self.num_layers
        l2 = {}
        for layer in self.layers:
            axis = layer.heads.axis if layer.heads else 0
            l2[layer.name] = layer.weight.transpose(0, axis).flatten(1).norm(dim=1)
        scores: list[torch.Tensor | None] = []
        for layer in self.layers:
            name = layer.name
            if self.graph.attention_role(name) == "out":  # follow its module's v (or qkv)
                parent = name.rpartition(".")[0]
                siblings = {
                    self.graph.attention_role(n): n
                    for n in self.graph.layers
                    if n.rpartition(".")[0] == parent
                }
                if "qkv" in siblings:
                    fused = l2[siblings["qkv"]]
                    scores.append(fused.reshape(3, -1).sum(0))
                    continue
                name = siblings.get("v", name)
            group = [g for g in self.graph.group_of(name) if l2[g].shape == l2[name].shape]
            scores.append(torch.stack([l2[g] for g in group]).sum(0) if len(group) > 1 else None)
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
                action,
                info.weight,
                info.kind,
                scores=self._scores[layer],
                **self._head_kwargs(info.heads),
            )
        return self._masks[key]

    def policy_masks(self, policy: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{layer name: keep-mask}`` for a full policy."""
        self.check_policy(policy)
        return {
            layer.name: self.mask(i, int(a))
            for i, (layer, a) in enumerate(zip(self.layers, policy))
        }

    def check_length(self, policy: Sequence) -> None:
        """Raise ``ValueError`` unless ``policy`` has one action per layer."""
        if len(policy) != self.num_layers:
            raise ValueError(
                f"a policy needs {self.num_layers} actions (one per layer), got {len(policy)}"
            )

    def check_policy(self, policy: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the first layer whose action is out of range or invalid."""
        self.check_length(policy)
        for i, a in enumerate(policy):
            if not (0 <= int(a) < self.num_actions) or not self.valid[i, int(a)]:
                names = [self.catalog.action_names[j] for j in np.flatnonzero(self.valid[i])]
                raise ValueError(
                    f"action {a!r} is not valid for layer {self.layers[i].name} "
                    f"({self.layers[i].kind}); valid actions: {names}"
                )

    def policy_indices(self, policy: Sequence[int] | Sequence[str]) -> list[int]:
        """Action indices from a policy of action names or of indices (not a mix).

        Raises:
            ValueError: names and indices are mixed, or a name is unknown.
            TypeError: an entry is neither a name nor an integer.
        """
        policy = list(policy)
        names = [isinstance(a, str) for a in policy]
        if any(names) and not all(names):
            i = names.index(False) if names[0] else names.index(True)
            raise ValueError(
                f"a policy is all action names or all action indices, not a mix: entry {i} "
                f"is {policy[i]!r} but entry 0 is {policy[0]!r}"
            )
        if policy and all(names):
            return self.actions_from_names(policy)
        return [
            action_index(a, f"policy entry {i} must be an action index (int) or name (str)")
            for i, a in enumerate(policy)
        ]

    def actions_from_names(self, names: Sequence[str]) -> list[int]:
        """Map action names (as in an episode record) to indices, with a clear error."""
        lookup = {n: i for i, n in enumerate(self.catalog.action_names)}
        try:
            return [lookup[n] for n in names]
        except KeyError as e:
            raise ValueError(
                f"unknown action name {e.args[0]!r}; catalog {self.catalog.name} has {list(lookup)}"
            ) from None

    def held_masks(
        self, policy: Sequence[int], layers: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{parameter name: bool keep-mask}`` of every parameter a policy holds at zero.

        Each prunable layer's weight gets its action's mask; where an output channel is
        fully removed, the layer's bias and the affine ``weight``/``bias`` of the batch norms
        after it (:meth:`NetGraph.batch_norms`) are held at zero on that channel, which is
        what makes the channel exactly zero. The one definition used by
        :meth:`apply_policy` (the network the env scores) and by fine-tuning
        (:func:`autosculpt_env.finetune.finetune`, which holds these entries at zero).

        Args:
            policy: one action index per layer.
            layers: only these layer indices (default: all).
        """
        masks: dict[str, torch.Tensor] = {}
        for i in range(self.num_layers) if layers is None else layers:
            layer, m = self.layers[i], self.mask(i, int(policy[i]))
            masks[f"{layer.name}.weight"] = m.clone()
            alive = m.flatten(1).any(dim=1)  # output channels not wholly removed
            names = [f"{layer.name}.bias"] if layer.bias is not None else []
            names += [f"{bn}.{p}" for bn in layer.batch_norms for p in ("weight", "bias")]
            for name in names:
                if name in self._pretrained:  # a batch norm without affine terms has none
                    masks[name] = alive.clone()
        return masks

    def apply_policy(
        self, model: nn.Module, policy: Sequence[int], layers: Sequence[int] | None = None
    ) -> None:
        """Write the policy's masked parameters into ``model`` (a structural copy of the network).

        Every parameter of :meth:`held_masks` gets its pretrained value times its mask, so
        fully removed filters also lose their bias and batch-norm scale and shift (and the
        other channels get their pretrained values back).

        Args:
            model: the network to write into (never the problem's own ``self.model``).
            policy: one action per layer.
            layers: only rewrite these layer indices (default: all).
        """
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in self.held_masks(policy, layers).items():
                params[name].copy_(self._pretrained[name] * keep)

    # ----------------------------------------------------------------------- cost
    def policy_flops(self, policy: Sequence[int]) -> float:
        return self.cost.policy_flops([int(a) for a in policy])

    def policy_params(self, policy: Sequence[int]) -> float:
        return self.cost.policy_params([int(a) for a in policy])

    def pruning_rate(self, policy: Sequence[int]) -> float:
        """Fraction of the prunable layers' weights that the policy masks."""
        kept = 0
        for i, a in enumerate(policy):
            key = (i, int(a))
            if key not in self._kept:
                self._kept[key] = int(self.mask(i, int(a)).sum())
            kept += self._kept[key]
        return 1.0 - kept / self.total_prunable_weights

    def kept_energy(self, layer: int, action: int) -> float:
        """Fraction of the layer's weight energy (sum of squares) the action keeps."""
        m = self.mask(layer, action)
        if m is None:
            return 0.0
        w = self.layers[layer].weight
        return float((w * m).pow(2).sum()) / max(self.layers[layer].energy, 1e-12)
