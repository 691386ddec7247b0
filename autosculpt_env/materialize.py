"""A pruning policy as a physically smaller network.

The env scores a policy on the *masked* network: the dense network with the masked weights
set to zero (removed channels' biases and batch-norm affine terms zeroed, batch norms
recalibrated). :func:`materialize` turns that network into one whose layers are smaller and
whose outputs are the same (up to float32 rounding):

* **Removed channels** (filters, neurons) are cut out of the network with Torch-Pruning's
  ``DependencyGraph``: the producing layer loses the rows, and everything reading the
  channel (batch norms, consumers' input channels, the other operands of a residual add,
  concatenations) loses it too. A channel is cut only where that is exact: every layer in
  Torch-Pruning's group that produces it has it removed (zero rows, zero bias), every batch
  norm on it has zero scale and shift, and it passes only through operators that map zero
  to zero (ReLU, ReLU6, GELU, add, pools ...). Groups that fail the check (a layer norm, a
  learned position embedding, a channel kept alive by another branch) keep their zeros.
* **Attention heads** whose ``v`` rows are all removed are cut from ``q``, ``k``, ``v`` and
  the output projection's input, and the module's ``num_heads`` drops (its output for such
  a head is exactly zero whatever ``q`` and ``k`` hold). Projections are found by their role
  (:func:`autosculpt_env.patterns.attention_role`: our ViT's, timm's and Hugging Face's
  names, and :class:`autosculpt_env.traceable.MultiheadAttention` for ``torch.nn``
  attention). A fused ``qkv`` projection keeps its removed heads as zeros: its module's
  forward reshapes by a head count the exporter cannot change, and the report says so.
* **Row/column patterns** (the ``autosculpt`` catalog): a 3x3 filter that keeps a
  rectangular block of its kernel on every input channel is a smaller dense kernel (3x1,
  1x3, 3x2, 2x3) applied to a shifted slice of the padded input. A layer's filters are
  grouped by block into a few dense convolutions (:class:`PatternConv2d`) whose outputs are
  concatenated. The concatenation's channel order is folded into the layer's batch norms and
  its consumers' input channels where the layer's output reaches only those (a lone layer,
  or a depthwise convolution together with its producer); elsewhere (a residual stage) the
  order is restored by a runtime ``index_select``, listed in
  :attr:`Materialized.runtime_permutations`.
* **Everything else stays masked**: PatDNN kernel patterns, connectivity pruning and N:M
  sparsity have no dense-engine speedup on CPU (they need the PatDNN compiler or sparse
  tensor cores), so such layers are exported as dense layers with zeros, and
  :attr:`Materialized.masked_layers` says so.
* **Dead parameters** (:mod:`autosculpt_env.liveness`: weights that only ever multiply an
  exactly-zero channel, ``q``/``k`` rows of heads whose ``v`` rows are removed) are zeroed
  and masked first, so they are cut with their channel where it can be cut and stored as
  zeros where not. The network then needs exactly the parameters the env's ``params``
  counts (:attr:`Materialized.params`).

A materialised network is a plain ``nn.Module`` (the original classes with smaller layers,
plus :class:`PatternConv2d`); it exports to ONNX with :func:`export_onnx`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .graph import NetGraph, build_graph
from .liveness import Liveness, kept_matrix
from .patterns import attention_role


class MaterializeError(ValueError):
    """The network cannot be materialised; the message names the layer and the reason."""


# ---------------------------------------------------------------------------------------
# The pattern convolution


class PatternConv2d(nn.Module):
    """A 3x3, padding-1 convolution whose filters each keep one rectangular kernel block.

    Filters sharing a block ``(r0, c0, kh, kw)`` form one dense ``kh x kw`` convolution
    applied to ``pad(x)[:, :, r0:, c0:]`` (padding 0, the layer's stride); the full block
    ``(0, 0, 3, 3)`` runs on ``x`` with padding 1. Every block ends at the kernel's last row
    and column (``r0 + kh == c0 + kw == 3``), so all parts have the layer's output size.

    Args:
        parts: one convolution per block, in output order.
        offsets: ``(r0, c0)`` of each part's block.
        in_ranges: for depthwise parts, the ``(start, stop)`` input channels each part reads
            (contiguous after folding); ``None`` for ordinary convolutions (all inputs).
        in_index: for depthwise parts that could not be folded, the input channels each part
            gathers.
        out_index: where each output channel sits in the concatenation (a runtime
            ``index_select``); ``None`` when the order was folded away.
    """

    def __init__(
        self,
        parts: Sequence[nn.Conv2d],
        offsets: Sequence[tuple[int, int]],
        in_ranges: Sequence[tuple[int, int]] | None = None,
        in_index: Sequence[torch.Tensor] | None = None,
        out_index: torch.Tensor | None = None,
    ):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.offsets = [tuple(int(v) for v in o) for o in offsets]
        self.in_ranges = None if in_ranges is None else [tuple(r) for r in in_ranges]
        self.has_in_index = in_index is not None
        if in_index is not None:
            for k, idx in enumerate(in_index):
                self.register_buffer(f"in_index_{k}", idx.long())
        self.has_out_index = out_index is not None
        if out_index is not None:
            self.register_buffer("out_index", out_index.long())
        self.padded = any(o != (0, 0) or p.kernel_size != (3, 3) for o, p in zip(offsets, parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, (1, 1, 1, 1)) if self.padded else x
        outs = []
        for k, (conv, (r0, c0)) in enumerate(zip(self.parts, self.offsets)):
            full = conv.kernel_size == (3, 3)
            src = x if full else xp
            if self.in_ranges is not None:
                a, b = self.in_ranges[k]
                src = src[:, a:b]
            elif self.has_in_index:
                src = src.index_select(1, getattr(self, f"in_index_{k}"))
            if not full:
                src = src[:, :, r0:, c0:]
            outs.append(conv(src))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        if self.has_out_index:
            y = y.index_select(1, self.out_index)
        return y

    def extra_repr(self) -> str:
        blocks = ", ".join(
            f"{p.out_channels}x{p.kernel_size[0]}x{p.kernel_size[1]}@{o}"
            for p, o in zip(self.parts, self.offsets)
        )
        return f"parts=[{blocks}], runtime_permutation={self.has_out_index or self.has_in_index}"


# ---------------------------------------------------------------------------------------
# Result


@dataclass
class Materialized:
    """A materialised network and what was done to each layer.

    Attributes:
        model: the smaller network (eval mode).
        layers: per prunable layer, one line saying what became of it.
        masked_layers: layers exported as dense layers holding zeros, with the reason.
        runtime_permutations: pattern layers whose channel order is restored at run time.
        kept_groups: Torch-Pruning groups whose removed channels had to stay (and why).
        stored_zeros: parameters the network stores as zeros: masked weights, zero rows and
            held-at-zero batch-norm entries that could not be cut, and dead weights that
            could not be cut (zeroed: they only ever multiply an exact zero).
        dead_params: parameters the masked network stores, unmasked, that the materialised
            one does not need: held at zero (removed channels' batch-norm scale and shift) or
            dead (:mod:`autosculpt_env.liveness`: consumers' weights on exactly-zero
            channels, ``q``/``k`` rows of removed heads ...); cut, or stored as zeros.
            ``params + dead_params`` is the masked network's stored count
            (:meth:`autosculpt_env.cost.CostTable.stored_params`).
        max_abs_diff: largest ``|materialised - masked|`` output difference on the check
            inputs, both in float32.
        max_abs_diff_float64: the same with both networks in float64 (rounding aside, the
            two compute the same function, so this is ~1e-13).
        float32_noise: largest ``|masked float32 - masked float64|``: the masked network's
            own float32 rounding error, the floor for :attr:`max_abs_diff`.
    """

    model: nn.Module
    layers: dict[str, str] = field(default_factory=dict)
    masked_layers: dict[str, str] = field(default_factory=dict)
    runtime_permutations: list[str] = field(default_factory=list)
    kept_groups: dict[str, str] = field(default_factory=dict)
    stored_zeros: int = 0
    dead_params: int = 0
    max_abs_diff: float = float("nan")
    max_abs_diff_float64: float = float("nan")
    float32_noise: float = float("nan")

    @property
    def params(self) -> int:
        """Parameters the materialised network needs: stored ones minus stored zeros. Equal
        to the env's ``params`` of the policy (:mod:`autosculpt_env.cost`)."""
        return sum(p.numel() for p in self.model.parameters()) - self.stored_zeros

    def summary(self) -> str:
        """A few lines for humans."""
        lines = [f"{name}: {what}" for name, what in self.layers.items()]
        if self.runtime_permutations:
            lines.append("runtime permutations: " + ", ".join(self.runtime_permutations))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Helpers on masks and the graph

_ZERO_PRESERVING = (
    "Relu",
    "Hardtanh",  # ReLU6
    "Gelu",
    "Silu",
    "Tanh",
    "LeakyRelu",
    "Elu",
    "Hardswish",
    "Mish",
    "Add",
    "Sub",
    "Mul",
    "Mean",
    "AdaptiveAvgPool",
    "AvgPool",
    "MaxPool",
    "Clone",
    "Dropout",
    "Permute",
    "Transpose",
    "View",
    "Unsafe",
    "Flatten",
    "TBackward",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
)
_PASS_OPS = {"batch_norm", "activation", "dropout", "pool", "flatten", "reshape"}


def _env_counted(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Parameters the masked network stores less masked weights and removed channels'
    biases (:meth:`autosculpt_env.cost.CostTable.stored_params`)."""
    total = sum(p.numel() for p in model.parameters())
    for name, mask in masks.items():
        module = model.get_submodule(name)
        total += int(mask.sum()) - module.weight.numel()
        if getattr(module, "bias", None) is not None:
            total -= int(_removed_rows(mask).sum())
    return total


def _zero_dead(model: nn.Module, masks: dict[str, torch.Tensor], graph: NetGraph) -> None:
    """Zero the dead weights and dead-head biases (:mod:`autosculpt_env.liveness`) of the
    network and mask them: they multiply exact zeros, so the outputs stay the same, and what
    cannot be cut below is stored as zeros."""
    liveness = Liveness(graph)
    dead = liveness.run({name: kept_matrix(m) for name, m in masks.items()})
    with torch.no_grad():
        for name in dead.inputs.keys() | dead.rows.keys():
            d = liveness.dead_weights(dead, name)
            module = model.get_submodule(name)
            module.weight[d] = 0.0
            masks[name] = masks[name] & ~d
            rows = dead.rows.get(name)
            if rows is not None and module.bias is not None:
                module.bias[torch.as_tensor(rows)] = 0.0


def _held_norms(model: nn.Module, graph: NetGraph, layer: str, mask: torch.Tensor) -> int:
    """Scale and shift entries held at zero in the batch norms of ``layer``'s removed
    channels that were not cut."""
    removed = _removed_rows(mask)
    count = 0
    for bn in graph.batch_norms(layer):
        m = model.get_submodule(bn)
        if getattr(m, "affine", False) and m.weight.shape[0] == removed.shape[0]:
            held = (m.weight.detach() == 0) & (m.bias.detach() == 0)
            count += 2 * int((held & removed).sum())
    return count


def _removed_rows(mask: torch.Tensor) -> torch.Tensor:
    return ~mask.reshape(mask.shape[0], -1).any(1)


def _block(kernel: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(r0, c0, kh, kw)`` of a 3x3 bool kernel that is one rectangle ending at the last
    row and column, else ``None``."""
    rows = kernel.any(1).nonzero().flatten()
    cols = kernel.any(0).nonzero().flatten()
    if len(rows) == 0:
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if r1 != 2 or c1 != 2 or not bool(kernel[r0:, c0:].all()):
        return None
    return r0, c0, 3 - r0, 3 - c0


def _reaches_only(graph: NetGraph, layer: str, allowed: set[str]) -> bool:
    """Whether every path from ``layer``'s output passes only per-channel operators (its
    own batch norms, activations, pools, flatten) and ends at layers in ``allowed``."""
    layer_at = dict(zip(graph.layer_nodes, graph.layers))
    norms = set(graph.batch_norms(layer))
    succ = graph.data_flow()
    stack, seen = [graph.layer_nodes[graph.layers.index(layer)]], set()
    while stack:
        n = stack.pop()
        for m in succ.get(n, []):
            if m in seen:
                continue
            seen.add(m)
            if m in layer_at:
                if layer_at[m] not in allowed:
                    return False
                continue
            node = graph.nodes[m]
            if node.op_type not in _PASS_OPS:
                return False
            if node.op_type == "batch_norm" and node.target not in norms:
                return False
            stack.append(m)
    return True


def _foldable_consumers(graph: NetGraph, model: nn.Module, layer: str) -> list[str] | None:
    """The consumers whose input channels can absorb a permutation of ``layer``'s outputs,
    or ``None`` where the output order cannot be folded."""
    consumers = graph.consumers(layer)
    if not _reaches_only(graph, layer, set(consumers)):
        return None
    for c in consumers:
        mod = model.get_submodule(c)
        if not (isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)):
            return None
    return consumers


def _permute_rows(module: nn.Module, perm: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.data = module.weight.data[perm].contiguous()
        if getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data[perm].contiguous()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.data = module.running_mean.data[perm].contiguous()
            module.running_var.data = module.running_var.data[perm].contiguous()


def _permute_cols(module: nn.Module, perm: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.data = module.weight.data[:, perm].contiguous()


# ---------------------------------------------------------------------------------------
# Channel removal (Torch-Pruning)


def _tp_handlers(module: nn.Module):
    import torch_pruning as tp

    return (
        tp.prune_conv_out_channels
        if isinstance(module, nn.Conv2d)
        else tp.prune_linear_out_channels
    )


def _exact_group(group, idxs: list[int]) -> str | None:
    """Why cutting the channels of a Torch-Pruning group would change outputs, or ``None``."""
    import torch_pruning as tp

    for dep, dep_idxs in group.items if hasattr(group, "items") else group:
        mod = dep.target.module
        handler = getattr(dep.handler, "__name__", str(dep.handler))
        out = handler == "prune_out_channels"
        ix = torch.as_tensor(list(dep_idxs), dtype=torch.long)
        name = getattr(dep.target, "name", str(mod))
        if isinstance(mod, nn.Conv2d | nn.Linear):
            w = mod.weight.detach()
            if isinstance(mod, nn.Conv2d) and mod.groups > 1 and w.shape[1] != 1:
                # Torch-Pruning's channel indices for grouped convolutions do not keep the
                # groups even; leave such channels alone
                return f"{name} is a grouped convolution"
            if out:
                if w[ix].any() or (mod.bias is not None and mod.bias.detach()[ix].any()):
                    return f"{name} still produces channels {ix.tolist()[:8]}"
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if not mod.affine or mod.weight.detach()[ix].any() or mod.bias.detach()[ix].any():
                return f"batch norm {name} does not zero the channels"
        elif isinstance(mod, tp.ops._ElementWiseOp):
            op = str(mod._grad_fn)
            if not any(op.startswith(k) for k in _ZERO_PRESERVING):
                return f"operator {op} may not map zero to zero"
        elif isinstance(mod, tp.ops._ConcatOp | tp.ops._SplitOp | tp.ops._ReshapeOp):
            continue
        else:
            return f"{type(mod).__name__} {name} is in the group"
    return None


def _cut_channels(
    model: nn.Module,
    graph: NetGraph,
    masks: dict[str, torch.Tensor],
    example: torch.Tensor,
    kept_groups: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Cut every removed channel that can be cut exactly; returns the masks cut alike."""
    import torch_pruning as tp

    mask_model = copy.deepcopy(model)
    for name, m in masks.items():
        mask_model.get_submodule(name).weight.data = m.to(torch.float32)
    with warnings.catch_warnings():
        # a ViT's cls_token and pos_embed belong to no layer; Torch-Pruning then cuts their
        # last dimension (the embedding's), which is what a cut of the residual stream needs,
        # and says so at every build: keep its other warnings (unknown operations), not this
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        dg_mask = tp.DependencyGraph().build_dependency(mask_model, example_inputs=example)
    for members in graph.groups:
        if any(graph.layer_kind(n) == "attention" for n in members):
            continue
        removed = None
        for n in members:
            r = _removed_rows(masks[n])
            if removed is not None and r.shape != removed.shape:
                removed = None
                break
            removed = r if removed is None else removed & r
        if removed is None or not bool(removed.any()):
            continue
        idxs = removed.nonzero().flatten().tolist()
        root = model.get_submodule(members[0])
        if len(idxs) == root.weight.shape[0]:
            kept_groups[members[0]] = "every channel of the group is removed; one is kept"
            idxs = idxs[1:]
            if not idxs:
                continue
        group = dg.get_pruning_group(root, _tp_handlers(root), idxs=idxs)
        why = _exact_group(group, idxs)
        if why is not None:
            kept_groups[members[0]] = why
            continue
        mroot = mask_model.get_submodule(members[0])
        mgroup = dg_mask.get_pruning_group(mroot, _tp_handlers(mroot), idxs=idxs)
        group.prune()
        mgroup.prune()
        for n in masks:
            masks[n] = mask_model.get_submodule(n).weight.detach() != 0
    return masks


def _cut_heads(model: nn.Module, masks: dict[str, torch.Tensor], layers: dict[str, str]) -> dict:
    """Remove attention heads whose ``v`` rows are all removed (see the module docstring).

    Returns:
        ``{layer: why}`` for the projections whose removed heads stay as zeros: those of a
        fused qkv projection, whose module's forward fixes the head count.
    """
    kept: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        roles: dict[str, tuple[str, nn.Linear]] = {}
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            role = attention_role(full, parent)
            if role is not None and isinstance(child, nn.Linear):
                roles[role] = (full, child)
        if "qkv" in roles:
            for name, _ in roles.values():
                kept[name] = (
                    "heads of a fused qkv projection kept as zeros (its module's forward fixes "
                    "the head count)"
                )
            continue
        if not {"q", "k", "v", "out"} <= roles.keys() or roles["v"][0] not in masks:
            continue
        h, d = int(parent.num_heads), int(parent.head_dim)
        v = roles["v"][1]
        zero = _removed_rows(masks[roles["v"][0]])
        if v.bias is not None:
            zero = zero & (v.bias.detach() == 0)
        dead = zero.reshape(h, d).all(1)
        if not bool(dead.any()) or bool(dead.all()):
            continue
        keep = (~dead).repeat_interleave(d)
        with torch.no_grad():
            for role in ("q", "k", "v"):
                name, lin = roles[role]
                lin.weight.data = lin.weight.data[keep].contiguous()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data[keep].contiguous()
                lin.out_features = int(keep.sum())
                if name in masks:
                    masks[name] = masks[name][keep]
            name, out = roles["out"]
            out.weight.data = out.weight.data[:, keep].contiguous()
            out.in_features = int(keep.sum())
            if name in masks:
                masks[name] = masks[name][:, keep]
        parent.num_heads = h - int(dead.sum())
        layers[parent_name] = f"heads {h} -> {parent.num_heads}"
    return kept


# ---------------------------------------------------------------------------------------
# Patterns


def _pattern_plan(module: nn.Module, mask: torch.Tensor) -> list[tuple] | None:
    """Per-filter blocks of a 3x3 layer, or ``None`` where the layer is not a block-pattern
    layer (not 3x3 with padding 1, a kernel differs across input channels, not a block)."""
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (3, 3):
        return None
    depthwise = module.groups == module.in_channels == module.out_channels
    if not (module.groups == 1 or depthwise):
        return None
    if (
        tuple(module.padding) != (1, 1)
        or tuple(module.dilation) != (1, 1)
        or module.padding_mode != "zeros"
    ):
        return None
    # input channels no filter reads (dead ones, masked everywhere) do not decide the pattern
    live = mask.any(dim=(0, 2, 3))
    sub = mask[:, live] if bool(live.any()) else mask[:, :1]
    first = sub[:, :1]
    if not bool((sub == first).all()):
        return None
    blocks = []
    for kernel in first[:, 0]:
        if not bool(kernel.any()):
            blocks.append(None)  # a zero row that could not be cut
            continue
        b = _block(kernel)
        if b is None:
            return None
        blocks.append(b)
    return blocks


def _part_keys(blocks: Sequence[tuple | None], min_part: int) -> list[tuple]:
    """The block each filter is computed with, after merging small parts.

    Every block ends at the kernel's last row and column, so block ``a`` fits inside block
    ``b`` when ``a`` starts no earlier in both directions. A part with fewer than
    ``min_part`` filters joins the smallest other part whose block holds its own (or, if
    none does, grows to the smallest block holding both it and the next smallest part): a
    convolution call costs a fixed overhead that a few filters do not repay. Zero filters
    (removed but not cut) ride along with the smallest part; their weights stay zero.
    """

    def area(k: tuple) -> int:
        return k[2] * k[3]

    def holds(big: tuple, small: tuple) -> bool:
        return big[0] <= small[0] and big[1] <= small[1]

    keys = list(blocks)
    live = [k for k in keys if k is not None]
    if not live:
        raise MaterializeError("a pattern layer needs at least one kept filter")
    while True:
        counts: dict[tuple, int] = {}
        for k in keys:
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
        small = [k for k in counts if counts[k] < min_part]
        if len(counts) == 1 or not small:
            break
        k = min(small, key=lambda b: (counts[b], area(b), b))
        hosts = [b for b in counts if b != k and holds(b, k)]
        if hosts:
            target = min(hosts, key=lambda b: (area(b), b))
        else:
            other = min((b for b in counts if b != k), key=lambda b: (area(b), b))
            r0, c0 = min(k[0], other[0]), min(k[1], other[1])
            target = (r0, c0, 3 - r0, 3 - c0)
            keys = [target if b == other else b for b in keys]
        keys = [target if b == k else b for b in keys]
    smallest = min({k for k in keys if k is not None}, key=lambda b: (area(b), b))
    return [smallest if k is None else k for k in keys]


def _part_order(keys: Sequence[tuple]) -> tuple[list[tuple], torch.Tensor]:
    """Parts in output order (largest block first) and the permutation of the filters."""
    order = sorted(set(keys), key=lambda k: (-k[2] * k[3], k))
    perm = [i for k in order for i, key in enumerate(keys) if key == k]
    return order, torch.tensor(perm, dtype=torch.long)


def _pattern_conv(
    module: nn.Conv2d, keys: Sequence[tuple], mask: torch.Tensor, fold: bool
) -> tuple[PatternConv2d, int]:
    """Build the :class:`PatternConv2d` of a layer whose filter ``i`` uses block
    ``keys[i]``.

    Returns:
        The module (restoring the filter order at run time unless ``fold``: then the
        filters must already be in part order) and the number of zero parameters it stores.
    """
    depthwise = module.groups > 1
    order, perm = _part_order(keys)
    w = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    parts, offsets, ranges, gathers = [], [], [], []
    stored, start = 0, 0
    for k in order:
        rows = torch.tensor([i for i, key in enumerate(keys) if key == k], dtype=torch.long)
        r0, c0, kh, kw = k
        n = len(rows)
        conv = nn.Conv2d(
            n if depthwise else module.in_channels,
            n,
            (kh, kw),
            stride=module.stride,
            padding=1 if (kh, kw) == (3, 3) else 0,
            groups=n if depthwise else 1,
            bias=bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(w[rows][:, :, r0:, c0:])
            if bias is not None:
                conv.bias.copy_(bias[rows])
        stored += conv.weight.numel()
        parts.append(conv)
        offsets.append((r0, c0))
        ranges.append((start, start + n))
        gathers.append(rows)
        start += n
    zeros = stored - int(mask.sum())
    if bias is not None:
        zeros += int(_removed_rows(mask).sum())
    out_index = None if fold else torch.argsort(perm)
    if depthwise:
        in_ranges, in_index = (ranges, None) if fold else (None, gathers)
    else:
        in_ranges, in_index = None, None
    return PatternConv2d(parts, offsets, in_ranges, in_index, out_index), zeros


def _fold(
    model: nn.Module,
    graph: NetGraph,
    masks: dict[str, torch.Tensor],
    layer: str,
    perm: torch.Tensor,
    rows_of: list[str],
    consumers: list[str],
) -> None:
    """Reorder the output channels of ``rows_of`` layers (and their batch norms) by ``perm``
    and the input channels of ``consumers`` alike."""
    for name in rows_of:
        _permute_rows(model.get_submodule(name), perm)
        masks[name] = masks[name][perm]
        for bn in graph.batch_norms(name):
            _permute_rows(model.get_submodule(bn), perm)
    for c in consumers:
        _permute_cols(model.get_submodule(c), perm)
        masks[c] = masks[c][:, perm]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# ---------------------------------------------------------------------------------------
# Entry points


def materialize(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    example_inputs: torch.Tensor,
    *,
    check_inputs: torch.Tensor | None = None,
    atol: float = 1e-9,
    min_part: int = 8,
    split_depthwise: bool = False,
) -> Materialized:
    """Turn a masked network into a physically smaller one with the same outputs.

    Args:
        model: the masked network (masked weights zero, removed channels' biases and batch
            norms zeroed), e.g. ``env.unwrapped.pruned_model(policy)``. Not modified.
        masks: ``{layer name: bool keep-mask}`` of the pruned ``Conv2d``/``Linear`` layers
            (``problem.policy_masks(policy)``); other layers count as dense.
        example_inputs: an input batch for tracing (the first image is used).
        check_inputs: inputs on which the outputs are compared (default:
            ``example_inputs``); use real images.
        atol: largest allowed ``|materialised - masked|`` output difference, both run in
            float64 (the structural check; float32 differences are reported in
            :attr:`Materialized.max_abs_diff` next to the masked network's own float32
            rounding error, :attr:`Materialized.float32_noise`).
        min_part: a pattern part with fewer filters joins a larger block (zero-filled):
            each convolution call has a fixed cost that a few filters do not repay.
        split_depthwise: also split depthwise 3x3 layers by pattern. Off by default: a
            depthwise convolution is bound by memory traffic, not multiply-adds, so on CPU
            the split only adds calls (measured in ``benchmarks/latency.py``); such layers
            are kept whole with their zeros.

    Returns:
        The :class:`Materialized` network and its report.

    Raises:
        MaterializeError: the model cannot be traced, a mask does not fit its layer, or the
            outputs differ by more than ``atol`` (an operator the exporter does not know).
    """
    model = copy.deepcopy(model).eval()
    example = example_inputs[:1]
    check = example_inputs if check_inputs is None else check_inputs
    with torch.no_grad():
        reference = model(check)
    masked64 = copy.deepcopy(model).double()
    try:
        graph = build_graph(model, example)
    except (TypeError, ValueError) as e:
        raise MaterializeError(f"cannot materialise {type(model).__name__}: {e}") from e
    full: dict[str, torch.Tensor] = {}
    for name in graph.layers:
        w = graph.module(name).weight
        m = masks.get(name)
        if m is None:
            m = torch.ones_like(w, dtype=torch.bool)
        if tuple(m.shape) != tuple(w.shape):
            raise MaterializeError(
                f"mask of {name} has shape {tuple(m.shape)}, its weight {tuple(w.shape)}"
            )
        full[name] = m.detach().to("cpu", torch.bool).clone()
    unknown = set(masks) - set(full)
    if unknown:
        raise MaterializeError(f"masks name layers the network does not have: {sorted(unknown)}")
    widths = {n: graph.module(n).weight.shape[0] for n in graph.layers}
    result = Materialized(model=model)

    counted = _env_counted(model, full)
    _zero_dead(model, full, graph)
    full = _cut_channels(model, graph, full, example, result.kept_groups)
    heads_kept = _cut_heads(model, full, result.layers)

    # Patterns, in topological order (a layer's consumers come later, so folding into their
    # input channels happens before they are themselves rebuilt).
    zeros = 0
    for name in graph.layers:
        module = model.get_submodule(name)
        mask = full[name]
        zeros += _held_norms(model, graph, name, mask)
        note = f"{widths[name]} -> {module.weight.shape[0]} outputs"
        blocks = _pattern_plan(module, mask)
        patterned = blocks is not None and any(b not in (None, (0, 0, 3, 3)) for b in blocks)
        depthwise_kept = patterned and module.groups > 1 and not split_depthwise
        if depthwise_kept:
            patterned = False
        if patterned:
            keys = _part_keys(blocks, min_part)
            patterned = set(keys) != {(0, 0, 3, 3)}  # merged back into one full kernel
        if patterned:
            depthwise = module.groups > 1
            fold_rows, consumers = [name], _foldable_consumers(graph, model, name)
            if depthwise:
                producers = [p for p in graph.layers if name in graph.consumers(p)]
                ok = (
                    consumers is not None
                    and len(producers) == 1
                    and sorted(graph.group_of(name)) == sorted([producers[0], name])
                    and isinstance(model.get_submodule(producers[0]), nn.Conv2d | nn.Linear)
                    and _reaches_only(graph, producers[0], {name})
                )
                if ok:
                    fold_rows = [producers[0], name]
                else:
                    consumers = None
            elif graph.group_of(name) != [name]:
                consumers = None
            if len(set(keys)) == 1:  # one part: the filter order does not change
                consumers, fold_rows = [], []
            _, perm = _part_order(keys)
            fold = consumers is not None
            if fold:
                _fold(model, graph, full, name, perm, fold_rows, consumers)
                module = model.get_submodule(name)
                mask = full[name]
                blocks = [blocks[i] for i in perm.tolist()]
                keys = [keys[i] for i in perm.tolist()]
            pc, z = _pattern_conv(module, keys, mask, fold)
            zeros += z
            _set_module(model, name, pc)
            counts: dict[str, int] = {}
            for k in keys:
                counts[f"{k[2]}x{k[3]}"] = counts.get(f"{k[2]}x{k[3]}", 0) + 1
            parts = " ".join(f"{k}:{v}" for k, v in counts.items())
            how = "order folded" if fold else "runtime permutation"
            note += f"; dense parts {parts} ({how})"
            if not fold:
                result.runtime_permutations.append(name)
        else:
            stored = int((~mask).sum())
            if module.bias is not None:
                stored += int(_removed_rows(mask).sum())
            if stored:
                zeros += stored
                if name in heads_kept:
                    why = heads_kept[name]
                elif bool(_removed_rows(mask).any()) and bool(mask[~_removed_rows(mask)].all()):
                    why = (
                        "removed channels kept as zeros ("
                        + result.kept_groups.get(graph.group_of(name)[0], "coupled")
                        + ")"
                    )
                elif blocks is not None and not depthwise_kept and module.groups == 1:
                    why = f"row/column parts under min_part={min_part} filters, kept as zeros"
                elif depthwise_kept:
                    why = "depthwise row/column patterns kept as zeros (split_depthwise=False)"
                else:
                    why = "masked: no dense-engine speedup for this sparsity on CPU"
                result.masked_layers[name] = why
                note += f"; {why}"
        result.layers[name] = result.layers.get(name, "") + note if name in result.layers else note
    result.stored_zeros = zeros
    result.dead_params = counted - result.params

    model.eval()
    with torch.no_grad():
        out = model(check)
        if out.shape != reference.shape:
            raise MaterializeError(
                f"materialised output shape {tuple(out.shape)} != masked {tuple(reference.shape)}"
            )
        result.max_abs_diff = float((out - reference).abs().max())
        # float64 copies separate a structural error from float32 rounding (a different
        # summation order alone moves logits by the masked network's own float32 error)
        ref64 = masked64(check.double())
        out64 = copy.deepcopy(model).double()(check.double())
        result.max_abs_diff_float64 = float((out64 - ref64).abs().max())
        result.float32_noise = float((reference.double() - ref64).abs().max())
    if not result.max_abs_diff_float64 <= atol:
        raise MaterializeError(
            f"materialised outputs differ from the masked network's by "
            f"{result.max_abs_diff_float64:.3g} in float64 (> {atol}); an operator on a removed "
            "channel does not keep it zero"
        )
    return result


def materialize_policy(
    env, policy: Sequence[int] | Sequence[str], check_inputs: torch.Tensor | None = None
) -> Materialized:
    """:func:`materialize` the network an AutoSculpt env scores for ``policy``.

    Args:
        env: a ``gym.make("AutoSculpt-...")`` env (wrapped or not).
        policy: action indices or names, one per layer.
        check_inputs: images for the output check (default: 256 images of the reward split).
    """
    from . import data as data_mod

    base = env.unwrapped
    problem = base.problem
    actions = problem.policy_indices(policy)
    masked = base.pruned_model(actions)
    masks = problem.policy_masks(actions)
    if check_inputs is None:
        kw = base.env_kwargs
        check_inputs = data_mod.load(kw["dataset"], "reward", kw.get("data_dir")).images[:256]
    return materialize(masked, masks, problem.example_inputs, check_inputs=check_inputs)


def export_onnx(
    model: nn.Module,
    path,
    example_inputs: torch.Tensor,
    *,
    dynamo: bool = True,
) -> str:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``x``, output ``logits``).

    Uses ``torch.onnx.export`` (the ``torch.export``-based exporter and its default opset
    unless ``dynamo=False``).

    Returns:
        The path written.
    """
    import warnings

    path = str(path)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(
                model,
                (example_inputs,),
                dynamic_shapes={"x": {0: batch}},
                input_names=["x"],
                output_names=["logits"],
                dynamo=True,
                verbose=False,
            )
            prog.save(path, external_data=False)
        else:
            torch.onnx.export(
                model,
                (example_inputs,),
                path,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
    return path


def onnx_session(path, threads: int = 1):
    """An onnxruntime CPU session with a fixed thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(path, model: nn.Module, inputs: torch.Tensor, atol: float = 1e-4) -> float:
    """Run the ONNX file with onnxruntime and compare with ``model``'s torch outputs.

    Returns:
        The largest absolute difference.

    Raises:
        MaterializeError: the difference exceeds ``atol``.
    """
    sess = onnx_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        want = model(inputs).numpy()
    diff = float(abs(got - want).max())
    if not diff <= atol:
        raise MaterializeError(f"{path}: onnxruntime differs from torch by {diff:.3g} (> {atol})")
    return diff
