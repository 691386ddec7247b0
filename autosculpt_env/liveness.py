"""Exactly-zero channels of a pruned network, and the parameters that only ever see them.

A policy *removes* an output channel of a layer when it masks every weight of the channel's
filter; the pruned network then holds the channel's bias and the scale and shift of the
batch norms after it at zero (:meth:`autosculpt_env.problem.PruningProblem.held_masks`), so
the channel is exactly zero for every input. Zeros travel forward, channel by channel:

* through operators that map zero to zero and keep the channel axis whole (activations with
  ``f(0) = 0``, pools, dropout, identities, flatten of a 1x1 map, and a flatten of a
  ``C x H x W`` map, each channel becoming ``H x W`` features);
* through an ``add`` where every operand is zero on the channel, a ``mul`` where one is,
  and a concat (each operand's channels at their offset along the concat axis);
* out of a ``Conv2d``/``Linear`` layer on the channels the policy removes, and on the
  channels whose every kept weight reads a zero channel when the layer has no bias (with a
  bias, or a batch norm that is not held at zero after it, the channel carries a constant);
* not through a norm that is not held at zero, a matmul or anything else.

A ``Conv2d`` or ``Linear`` weight that reads an exactly-zero input channel is *dead*: it
never changes an output. So are the ``q`` and ``k`` rows (weights and biases) of an
attention head whose ``v`` rows are all removed (the head's output is zero whatever its
attention weights), and the output projection's columns of that head.

The parameters a pruned network needs are those neither held at zero nor dead: that is what
the env's ``params`` counts (:meth:`autosculpt_env.cost.CostTable.policy_params`), and
:func:`autosculpt_env.materialize.materialize` cuts or zeroes every dead parameter, so the
materialised network stores exactly that many non-zero parameters.

Not found (counted as needed by both): channels that are zero only for some inputs (a ReLU
that never fires), and parameters whose only use is dead other than attention heads' (a
filter whose every reader is masked), and the heads of a fused ``qkv`` projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .graph import NetGraph


def kept_matrix(mask: torch.Tensor) -> np.ndarray:
    """Kept weights of a ``Conv2d``/``Linear`` keep-mask per (output row, input column of
    its group): int ``(out, in / groups)``."""
    m = mask.detach().to("cpu", torch.bool)
    return m.reshape(m.shape[0], m.shape[1], -1).sum(-1).numpy().astype(np.int64)


@dataclass
class Dead:
    """Where a policy's exact zeros and dead parameters are.

    Attributes:
        inputs: reader (every ``Conv2d``/``Linear`` module called once in the network,
            prunable or not) -> bool over its input channels that are exactly zero (for an
            attention output projection, also the columns of dead heads).
        rows: attention ``q``/``k`` projection -> bool over its output rows of dead heads.
        batch_norms: batch norm -> bool over its channels held at zero.
        zeros: node index -> ``(axis, bool over that axis)``: the exactly-zero channels of
            the node's output.
    """

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    batch_norms: dict[str, np.ndarray] = field(default_factory=dict)
    zeros: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)


class Liveness:
    """The zero-propagation program of a network's graph (built once, run per policy).

    A policy is given as :func:`kept_matrix` of each prunable layer's keep-mask (layers not
    given are dense), so that callers may tabulate them once per (layer, action).

    Args:
        graph: the network's graph (:func:`autosculpt_env.graph.build_graph`).
    """

    def __init__(self, graph: NetGraph):
        self.graph = graph
        self._layers = set(graph.layers)
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if isinstance(node.module, nn.Conv2d | nn.Linear):
                calls[node.target] = calls.get(node.target, 0) + 1
        # a module called twice reads two inputs: none of its weights is known dead
        self.readers: dict[int, str] = {
            node.index: node.target
            for node in graph.nodes
            if isinstance(node.module, nn.Conv2d | nn.Linear) and calls[node.target] == 1
        }
        self.modules: dict[str, nn.Module] = {
            name: graph.nodes[i].module for i, name in self.readers.items()
        }
        self._dense = {
            name: np.full((m.weight.shape[0], m.weight.shape[1]), _taps(m), dtype=np.int64)
            for name, m in self.modules.items()
        }
        # a batch norm held at zero on the channels its layer removes (affine ones only)
        self._held: dict[str, list[str]] = {}
        for layer in graph.layers:
            for bn in graph.batch_norms(layer):
                if getattr(graph.model.get_submodule(bn), "affine", False):
                    self._held.setdefault(bn, []).append(layer)
        self._heads_at = {att["out"]: att for att in self._attention_modules()}

    def _attention_modules(self) -> list[dict]:
        """``{"q", "k", "v", "out", "heads", "head_dim"}`` of every attention module whose
        four projections are separate prunable layers."""
        by_parent: dict[str, dict[str, str]] = {}
        for name in self.graph.layers:
            role = self.graph.attention_role(name)
            if role is not None:
                by_parent.setdefault(name.rpartition(".")[0], {})[role] = name
        out = []
        for roles in by_parent.values():
            heads = self.graph.heads(roles["v"]) if "v" in roles else None
            if not {"q", "k", "v", "out"} <= roles.keys() or heads is None:
                continue
            if not all(roles[r] in self.modules for r in ("q", "k", "v", "out")):
                continue
            width = self.graph.module(roles["v"]).weight.shape[0]
            out.append({**roles, "heads": heads.num_heads, "head_dim": width // heads.num_heads})
        return out

    def run(self, kept: Mapping[str, np.ndarray]) -> Dead:
        """The exact zeros and dead parameters of a policy.

        Args:
            kept: prunable layer -> :func:`kept_matrix` of its keep-mask.
        """
        dead = Dead()
        removed = {n: k.sum(1) == 0 for n, k in kept.items() if n in self._layers}
        for bn, layers in self._held.items():
            zero = [removed[layer] for layer in layers if layer in removed]
            if zero and np.logical_or.reduce(zero).any():
                dead.batch_norms[bn] = np.logical_or.reduce(zero)
        out_of: dict[str, np.ndarray] = {}  # reader -> its exactly-zero output channels
        for node in self.graph.nodes:
            if node.index in self.readers:
                z = self._reader(node, self.readers[node.index], kept, removed, dead, out_of)
            else:
                z = self._node_zeros(node, dead.zeros, dead.batch_norms)
            if z is not None and z[1].any():
                dead.zeros[node.index] = z
        return dead

    def _reader(self, node, name, kept, removed, dead, out_of) -> tuple[int, np.ndarray]:
        """A ``Conv2d``/``Linear`` node: note its dead inputs, return its zero outputs."""
        module = node.module
        assert node.in_shape is not None
        in_axis = 1 if isinstance(module, nn.Conv2d) else len(node.in_shape) - 1
        zero_in = None
        if node.inputs and node.inputs[0] in dead.zeros:
            axis, z = dead.zeros[node.inputs[0]]
            if axis == in_axis and z.size == node.in_shape[in_axis]:
                zero_in = z
        att = self._heads_at.get(name)
        if att is not None and att["v"] in out_of:
            heads = out_of[att["v"]].reshape(att["heads"], att["head_dim"]).all(axis=1)
            if heads.any():
                rows = np.repeat(heads, att["head_dim"])
                dead.rows[att["q"]] = dead.rows[att["k"]] = rows
                zero_in = rows if zero_in is None else zero_in | rows
        if zero_in is not None:
            dead.inputs[name] = zero_in
        zero_out = removed[name].copy() if name in removed else np.zeros(_rows(module), bool)
        if module.bias is None and zero_in is not None:
            # no bias: a channel whose every kept weight reads a zero is zero itself
            k = kept.get(name, self._dense[name])
            live = ((k > 0) & ~self.dead_matrix(dead, name)).any(1)
            zero_out |= ~live
        out_of[name] = zero_out
        axis = 1 if isinstance(module, nn.Conv2d) else len(node.out_shape) - 1
        return axis, zero_out

    def dead_matrix(self, dead: Dead, name: str) -> np.ndarray:
        """Bool ``(out, in / groups)`` of reader ``name``: the (row, input column) pairs
        whose weights are dead."""
        module = self.modules[name]
        out, per_in = module.weight.shape[:2]
        d = np.zeros((out, per_in), dtype=bool)
        zero = dead.inputs.get(name)
        if zero is not None:
            groups = getattr(module, "groups", 1)
            d |= np.repeat(zero.reshape(groups, per_in), out // groups, axis=0)
        rows = dead.rows.get(name)
        if rows is not None:
            d |= rows[:, None]
        return d

    def count(self, dead: Dead, kept: Mapping[str, np.ndarray]) -> int:
        """Parameters a policy's pruned network holds that are neither masked nor needed:
        dead kept weights, biases of dead-head rows the policy does not remove, and the scale
        and shift of batch-norm channels held at zero."""
        total = 0
        for name in dead.inputs.keys() | dead.rows.keys():
            k = kept.get(name, self._dense[name])
            total += int(k[self.dead_matrix(dead, name)].sum())
            rows = dead.rows.get(name)
            if rows is not None and self.modules[name].bias is not None:
                total += int((rows & (k.sum(1) > 0)).sum())
        total += 2 * sum(int(z.sum()) for z in dead.batch_norms.values())
        return total

    def dead_weights(self, dead: Dead, name: str) -> torch.Tensor:
        """:meth:`dead_matrix` as a bool over the reader's weight."""
        w = self.modules[name].weight
        d = torch.as_tensor(self.dead_matrix(dead, name))
        return d.reshape(*d.shape, *([1] * (w.dim() - 2))).expand(w.shape).clone()

    def _node_zeros(self, node, zeros, held) -> tuple[int, np.ndarray] | None:
        """``(axis, bool over that axis)`` of a node's exactly-zero channels, or ``None``."""
        if node.op_type == "batch_norm":
            zero = held.get(node.target)
            return None if zero is None else (1, zero)
        ins = node.inputs
        if not ins or -1 in ins:
            return None
        if node.op_type in ("add", "mul") and len(ins) > 1:
            parts = [self._aligned(zeros.get(i), self.graph.nodes[i], node) for i in ins]
            if node.op_type == "add":  # zero where every operand is
                if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
                    return None
                return parts[0][0], np.logical_and.reduce([p[1] for p in parts])
            known = [p for p in parts if p is not None]  # mul: zero where any operand is
            if not known or len({p[0] for p in known}) != 1:
                return None
            return known[0][0], np.logical_or.reduce([p[1] for p in known])
        if node.op_type == "concat" and len(ins) > 1:
            return self._concat(node, zeros)
        z = zeros.get(ins[0])
        if z is None or len(ins) != 1 or not node.zero_ok:
            return None
        axis, zero = z
        if axis in node.axis_map:
            return node.axis_map[axis], zero
        src = self.graph.nodes[ins[0]].out_shape
        if node.op_type in ("flatten", "reshape") and axis == 1 and len(node.out_shape) == 2:
            # (N, C, H, W) -> (N, C*H*W): each channel becomes H*W consecutive features
            per = int(np.prod(src[2:])) if len(src) > 2 else 1
            if node.out_shape[1] == zero.size * per:
                return 1, np.repeat(zero, per)
        return None

    def _aligned(self, z, src, node) -> tuple[int, np.ndarray] | None:
        """An operand's zeros on the output's axes (right-aligned, as broadcasting)."""
        if z is None:
            return None
        axis, zero = z
        j = axis + len(node.out_shape) - len(src.out_shape)
        if j < 0 or node.out_shape[j] != zero.size:
            return None
        return j, zero

    def _concat(self, node, zeros) -> tuple[int, np.ndarray] | None:
        dims = [a for a in range(len(node.out_shape)) if a not in node.axis_map]
        if len(dims) != 1:
            return None
        dim = dims[0]
        srcs = [self.graph.nodes[i] for i in node.inputs]
        parts = [zeros.get(s.index) for s in srcs]
        if all(p is None for p in parts):
            return None
        if all(p is None or p[0] == dim for p in parts):
            pieces = [
                p[1] if p is not None else np.zeros(s.out_shape[dim], dtype=bool)
                for p, s in zip(parts, srcs)
            ]
            return dim, np.concatenate(pieces)
        # zeros along another axis: zero where every operand is
        if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
            return None
        return parts[0][0], np.logical_and.reduce([p[1] for p in parts])


def _taps(module: nn.Module) -> int:
    """Weights per (row, input column): the kernel's size, 1 for a linear layer."""
    return int(np.prod(module.weight.shape[2:])) if module.weight.dim() > 2 else 1


def _rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def dead_params(graph_or_liveness, masks: Mapping[str, torch.Tensor]) -> int:
    """The held-zero and dead parameters of the network with these prunable-layer masks."""
    liveness = (
        graph_or_liveness
        if isinstance(graph_or_liveness, Liveness)
        else Liveness(graph_or_liveness)
    )
    kept = {name: kept_matrix(m) for name, m in masks.items()}
    return liveness.count(liveness.run(kept), kept)
