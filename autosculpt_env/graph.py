"""The network as a typed operator graph: what the agent observes and what the cost model reads.

:func:`build_graph` traces a model with ``torch.fx``, runs it once on an example input
(batch 1) and returns a :class:`NetGraph`:

* **Nodes** are the fx operators whose output is a tensor, in the fx (topological) order,
  each with an operator type from :data:`OP_TYPES`, its input/output shapes (batch 1) and
  its dense FLOPs. Nodes whose output holds no tensor (``x.size(0)``) are dropped; nodes
  whose output is a tuple of tensors (``torch.chunk``) are dropped too, and their consumers
  are linked straight to the tuple's producers. ``get_attr`` nodes of parameters (a ViT's
  ``cls_token``, ``pos_embed``) are ``"other"`` nodes that own those parameters.
* **FLOPs** are measured, not modelled: every node runs under
  :class:`torch.utils.flop_counter.FlopCounterMode`, so the per-node counts sum to exactly
  what ``FlopCounterMode`` reports for the whole batch-1 forward (2 x MACs of convolutions,
  ``mm``/``addmm``/``bmm``; nothing for bias adds, norms, activations or pools).
* **Edges** are data flow, typed by :data:`EDGE_TYPES`: ``forward``; ``residual`` for the
  skip operands of an ``add`` (every activation operand except the most recently computed
  one; parameter operands such as ``pos_embed`` stay ``forward``); and ``coupling`` between
  every ordered pair of prunable layers of one coupling group.
* **Prunable layers** are the ``nn.Conv2d`` and ``nn.Linear`` modules (classifier and
  attention projections included), in topological order. A module called more than once
  (shared weights) is not prunable: one mask would change several operators.
* **Coupling groups** (Torch-Pruning's dependency groups) collect the layers whose *output*
  channels must be removed together for the pruned network to stay well formed. They are
  found by propagating a "channel space" forward through the graph: each tensor remembers
  which of its axes carries which layer's output channels. Channel spaces pass through
  element-wise operators (norms, activations, dropout, pools, scalar arithmetic) and through
  data-movement operators that keep the channel axis whole (flatten of a 1x1 map, transpose,
  the token concat of a ViT); they merge where tensors meet at an ``add``/``mul`` or at a
  concat along another axis. A concat along the channel axis does not couple its inputs. A
  depthwise convolution joins the group of its input (its channels follow its input), and
  the ``q``, ``k``, ``v`` projections of one attention module form one group (heads must be
  pruned alike; a fused ``qkv`` projection is one layer). So a ResNet stage with identity shortcuts is one group, as in DepGraph.
* **Consumers** of a layer are the prunable layers that read its output channels through
  operators that keep an all-zero channel all-zero and keep the channel axis whole: batch
  norm (the pruned model zeroes the channel's scale and shift), activations ``f`` with
  ``f(0) = 0`` (ReLU, GELU, SiLU, Tanh; not Sigmoid), pools, dropout, identities and
  flatten/reshape/indexing that keep the channel axis whole (flatten of a 1x1 map). An
  ``add``, concat, matmul, layer norm or channel-splitting reshape ends the path. The cost
  model uses consumers to skip the multiply-adds on a fully removed channel.

Axis conventions: the channel axis of a ``Conv2d`` output is 1, that of a ``Linear`` output
is the last one. Shapes include the batch dimension (1).
"""

from __future__ import annotations

import operator
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .patterns import Heads, attention_heads, attention_role
from .patterns import layer_kind as _layer_kind

if TYPE_CHECKING:
    import torch_geometric

OP_TYPES: tuple[str, ...] = (
    "input",
    "output",
    "conv",
    "depthwise_conv",
    "grouped_conv",
    "linear",
    "batch_norm",
    "layer_norm",
    "activation",
    "add",
    "mul",
    "concat",
    "pool",
    "flatten",
    "reshape",
    "matmul",
    "softmax",
    "dropout",
    "other",
)
EDGE_TYPES: tuple[str, ...] = ("forward", "residual", "coupling")
FORWARD, RESIDUAL, COUPLING = (EDGE_TYPES.index(t) for t in EDGE_TYPES)
"""Indices of :data:`EDGE_TYPES` (the ``edges`` of a ``GraphInstance``)."""


class TraceError(TypeError):
    """``torch.fx`` could not trace the model; the message names the module, the line and the fix."""


@dataclass
class Node:
    """One operator of the traced network.

    Attributes:
        index: position in :attr:`NetGraph.nodes` (topological order).
        name: the fx node name.
        op_type: one of :data:`OP_TYPES`.
        target: qualified module name for modules (``"layer1.0.conv1"``), else the
            function, method or attribute name.
        module: the module for module calls, else ``None``.
        in_shape: shape of the first tensor input (batch 1), ``None`` for inputs and
            parameters.
        out_shape: output shape (batch 1).
        flops: dense FLOPs of one image (2 x MACs) as ``FlopCounterMode`` counts them.
        params: parameters owned by the node's module (or the parameter a ``get_attr``
            node reads); 0 for functions.
        inputs: the nodes of its tensor operands, in argument order; ``-1`` for an operand
            that is no node (a tuple's element: ``torch.chunk``).
        axis_map: input axis -> output axis, for the axes of its first tensor operand that
            land whole in its output.
        zero_ok: whether it maps an all-zero first operand to an all-zero output (tested on
            the example; ``False`` where not tested: layers, norms, matmuls, concat).
    """

    index: int
    name: str
    op_type: str
    target: str
    module: nn.Module | None
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...]
    flops: int
    params: int
    inputs: tuple[int, ...] = ()
    axis_map: dict[int, int] = field(default_factory=dict)
    zero_ok: bool = False


@dataclass
class NetGraph:
    """A traced network: typed operator nodes, typed edges, prunable layers, coupling groups.

    Attributes:
        nodes: operators in topological order.
        edges: ``(src, dst, edge_type)`` with node indices and an index into
            :data:`EDGE_TYPES`.
        layers: prunable layer names (``Conv2d`` and ``Linear`` modules), topological order.
        layer_nodes: node index of each prunable layer, same order.
        groups: coupling groups (lists of layer names, topological order); every layer is
            in exactly one group.
        dense_flops: FLOPs of one dense forward (sum of node FLOPs).
        dense_params: all model parameters.
        model: the traced model (its modules are shared, not copied).
    """

    nodes: list[Node]
    edges: list[tuple[int, int, int]]
    layers: list[str]
    layer_nodes: list[int]
    groups: list[list[str]]
    dense_flops: int
    dense_params: int
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    _consumers: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _batch_norms: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._layer_pos = {name: i for i, name in enumerate(self.layers)}
        self._group_of = {name: g for g in self.groups for name in g}

    def node(self, layer: str) -> Node:
        """The graph node of a prunable layer."""
        return self.nodes[self.layer_nodes[self._pos(layer)]]

    def module(self, layer: str) -> nn.Module:
        """The module of a prunable layer."""
        module = self.node(layer).module
        assert module is not None
        return module

    def layer_kind(self, layer: str) -> str:
        """The layer's kind in :data:`autosculpt_env.patterns.LAYER_KINDS`."""
        return _layer_kind(self.module(layer), layer, parent=self._parent(layer))

    def heads(self, layer: str) -> Heads | None:
        """The :class:`~autosculpt_env.patterns.Heads` of an attention projection, else
        ``None``: head count, the weight axis split into heads (0, output rows, for q, k, v
        and a fused qkv; 1, input columns, for the output projection) and the blocks along it
        (3 for a fused qkv). ``Heads.mask_kwargs()`` passes them to
        :meth:`autosculpt_env.patterns.Catalog.mask` for head pruning.
        """
        self._pos(layer)
        return attention_heads(layer, self._parent(layer))

    def attention_role(self, layer: str) -> str | None:
        """The layer's role in its attention module (:data:`~autosculpt_env.patterns.ATTENTION_ROLES`:
        ``q``, ``k``, ``v``, ``qkv``, ``out``), else ``None``."""
        self._pos(layer)
        return attention_role(layer, self._parent(layer))

    def group_of(self, layer: str) -> list[str]:
        """The coupling group holding ``layer``."""
        self._pos(layer)
        return self._group_of[layer]

    def consumers(self, layer: str) -> list[str]:
        """Prunable layers that read ``layer``'s output channels directly.

        The path may pass only operators that keep a zeroed channel zero and keep the channel
        axis whole (see the module docstring); a path through an add, concat, matmul, layer
        norm or channel-splitting reshape gives no consumer.
        """
        self._pos(layer)
        return list(self._consumers.get(layer, []))

    def batch_norms(self, layer: str) -> list[str]:
        """Names of the batch-norm modules that normalise ``layer``'s output channels directly.

        These sit on the channel-preserving paths from the layer (before any add); a pruned
        model zeroes their scale and shift on a fully removed channel, which is what makes
        the channel exactly zero for :meth:`consumers`.
        """
        self._pos(layer)
        return list(self._batch_norms.get(layer, []))

    def to_graph_instance(self, node_features: np.ndarray) -> gymnasium.spaces.GraphInstance:
        """Package node features with this graph's typed edges for a ``spaces.Graph``.

        Args:
            node_features: ``[N, F]`` array, one row per node (copied).

        Returns:
            ``GraphInstance`` with ``nodes`` float32 ``[N, F]``, ``edges`` int64 ``[E]``
            (indices of :data:`EDGE_TYPES`) and ``edge_links`` int64 ``[E, 2]``.
        """
        x = np.array(node_features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(self.nodes):
            raise ValueError(
                f"node_features must have shape [{len(self.nodes)}, F], got {tuple(x.shape)}"
            )
        types, links = self._edge_arrays
        return gymnasium.spaces.GraphInstance(nodes=x, edges=types.copy(), edge_links=links.copy())

    def data_flow(self, reverse: bool = False) -> dict[int, list[int]]:
        """Node index -> the nodes its output flows into (``reverse``: the nodes feeding it),
        over ``forward`` and ``residual`` edges (``coupling`` edges carry no data)."""
        return self._flow[1 if reverse else 0]

    @cached_property
    def _flow(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        succ: dict[int, list[int]] = {}
        pred: dict[int, list[int]] = {}
        for s, d, t in self.edges:
            if t != COUPLING:
                succ.setdefault(s, []).append(d)
                pred.setdefault(d, []).append(s)
        return succ, pred

    @cached_property
    def _edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        links = np.array([(s, d) for s, d, _ in self.edges], dtype=np.int64).reshape(-1, 2)
        return np.array([t for _, _, t in self.edges], dtype=np.int64), links

    def _pos(self, layer: str) -> int:
        if layer not in self._layer_pos:
            raise KeyError(f"{layer!r} is not a prunable layer of this graph")
        return self._layer_pos[layer]

    def _parent(self, layer: str) -> nn.Module | None:
        if self.model is None:
            return None
        return self.model.get_submodule(layer.rpartition(".")[0])


def to_pyg(observation: gymnasium.spaces.GraphInstance) -> torch_geometric.data.Data:
    """A graph observation as a ``torch_geometric.data.Data`` (for GNN policies).

    Returns:
        ``Data`` with ``x`` float32 ``[N, F]``, ``edge_index`` long ``[2, E]`` and
        ``edge_type`` long ``[E]`` (indices of :data:`EDGE_TYPES`). Batch a list of them
        with ``torch_geometric.data.Batch.from_data_list``.
    """
    from torch_geometric.data import Data

    return Data(
        x=torch.as_tensor(observation.nodes, dtype=torch.float32),
        edge_index=torch.as_tensor(observation.edge_links, dtype=torch.long)
        .reshape(-1, 2)
        .t()
        .contiguous(),
        edge_type=torch.as_tensor(observation.edges, dtype=torch.long),
    )


# ---------------------------------------------------------------------------------------
# Operator classification

_ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.PReLU,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool2d,
)
_FUNCTIONS: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "add",
    operator.isub: "add",
    torch.add: "add",
    torch.sub: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "mul",
    torch.mul: "mul",
    torch.cat: "concat",
    torch.concat: "concat",
    torch.stack: "concat",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.mm: "matmul",
    torch.einsum: "matmul",
    F.scaled_dot_product_attention: "matmul",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    F.log_softmax: "softmax",
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.transpose: "reshape",
    torch.permute: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    torch.t: "reshape",
    F.batch_norm: "batch_norm",
    F.layer_norm: "layer_norm",
    F.group_norm: "layer_norm",
    F.dropout: "dropout",
    F.max_pool1d: "pool",
    F.max_pool2d: "pool",
    F.avg_pool1d: "pool",
    F.avg_pool2d: "pool",
    F.adaptive_avg_pool1d: "pool",
    F.adaptive_avg_pool2d: "pool",
    F.adaptive_max_pool1d: "pool",
    F.adaptive_max_pool2d: "pool",
    torch.mean: "pool",
    torch.amax: "pool",
    F.conv1d: "conv",
    F.conv2d: "conv",
    F.linear: "linear",
}
for _f in (
    torch.relu,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.leaky_relu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.elu,
    F.selu,
    F.mish,
    F.softplus,
):
    _FUNCTIONS[_f] = "activation"
_METHODS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "sub": "add",
    "mul": "mul",
    "mul_": "mul",
    "div": "mul",
    "matmul": "matmul",
    "bmm": "matmul",
    "mm": "matmul",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "flatten": "flatten",
    "view": "reshape",
    "reshape": "reshape",
    "transpose": "reshape",
    "permute": "reshape",
    "expand": "reshape",
    "expand_as": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "unflatten": "reshape",
    "view_as": "reshape",
    "reshape_as": "reshape",
    "t": "reshape",
    "mean": "pool",
    "amax": "pool",
    "relu": "activation",
    "relu_": "activation",
    "sigmoid": "activation",
    "tanh": "activation",
}
# Operators that return their input unchanged (up to dtype/device/memory layout).
_IDENTITY_METHODS = {"contiguous", "clone", "detach", "to", "float", "type_as", "cpu", "cuda"}
# Operators whose output may be mapped onto the input axis by axis with a coordinate probe.
_PROBED = {"pool", "flatten", "reshape"}
# Element-wise operators: the output axes are the (right-aligned) input axes.
_ELEMENTWISE = {"batch_norm", "layer_norm", "activation", "dropout", "add", "mul"}
# Operators never on a dead-channel path (batch norm passes by convention): no zero test.
_NOT_ZERO_TESTED = {
    "conv",
    "depthwise_conv",
    "grouped_conv",
    "linear",
    "matmul",
    "batch_norm",
    "layer_norm",
    "softmax",
    "concat",
}


def _op_type(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = module
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.groups == 1:
                return "conv"
            if m.groups == m.in_channels == m.out_channels:
                return "depthwise_conv"
            return "grouped_conv"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch_norm"
        if isinstance(m, nn.LayerNorm | nn.GroupNorm):
            return "layer_norm"
        if isinstance(m, _ACTIVATION_MODULES):
            return "activation"
        if isinstance(m, nn.Softmax | nn.LogSoftmax):
            return "softmax"
        if isinstance(m, _POOL_MODULES):
            return "pool"
        if isinstance(m, nn.Flatten):
            return "flatten"
        if isinstance(m, nn.Unflatten):
            return "reshape"
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return "dropout"
        return "other"
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target, "other")
    if node.op == "call_method":
        return _METHODS.get(str(node.target), "other")
    return "other"


def _is_identity(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, nn.Identity)
    if node.op == "call_method":
        return node.target in _IDENTITY_METHODS
    return node.op == "call_function" and node.target is torch.clone


def _target_name(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr", "call_method"):
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.name


# ---------------------------------------------------------------------------------------
# Tracing


class _PathTracer(fx.Tracer):
    """An fx tracer that remembers which module it is inside, for the error message."""

    def __init__(self, leaf_modules: Sequence[str | type] = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        # Popped only on success: after a failure the stack ends at the failing module.
        self.stack.pop()
        return out


def _trace(model: nn.Module, leaf_modules: Sequence[str | type]) -> fx.GraphModule:
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        name, cls = tracer.stack[-1] if tracer.stack else ("", type(model).__name__)
        torch_dir = os.path.dirname(torch.__file__)
        frames = [
            f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(torch_dir)
        ]
        where = (
            f" at {frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
        )
        what = f"module '{name}' ({cls})" if name else f"the forward of {cls}"
        if name:
            fix = (
                f"keep '{name}' opaque to the tracer: build_graph(model, x, "
                f"leaf_modules=['{name}']) (the same as a custom torch.fx.Tracer whose "
                "is_leaf_module returns True for it; its layers are then not pruned), or move "
                "the data-dependent code into a free function registered with torch.fx.wrap"
            )
        else:
            fix = (
                "move the data-dependent code into a submodule and pass it in leaf_modules "
                "(a custom torch.fx.Tracer's is_leaf_module), or into a free function "
                "registered with torch.fx.wrap"
            )
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: the failure is in {what}{where}: "
            f"{type(e).__name__}: {e}. Fix: {fix}."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_aggregate(obj, lambda v: out.append(v) if isinstance(v, torch.Tensor) else v)
    return out


def _replace_first_tensor(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    done = False

    def swap(v: Any) -> Any:
        nonlocal done
        if not done and isinstance(v, torch.Tensor):
            done = True
            return new
        return v

    args = fx.node.map_aggregate(args, swap)
    kwargs = fx.node.map_aggregate(kwargs, swap)
    return args, kwargs


class _Profiler(fx.Interpreter):
    """Runs the traced model once, recording per node: shapes, FLOPs, axis maps, f(0) == 0."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.info: dict[fx.Node, dict[str, Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        info: dict[str, Any] = {"flops": int(counter.get_total_flops())}
        outs = _tensors(result)
        info["tensor"] = isinstance(result, torch.Tensor)
        info["carries"] = bool(outs)
        info["out_shape"] = tuple(outs[0].shape) if outs else None
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            ins = _tensors((args, kwargs))
            info["in_shape"] = tuple(ins[0].shape) if ins else None
            if ins and isinstance(result, torch.Tensor):
                module = self.module.get_submodule(n.target) if n.op == "call_module" else None
                kind = _op_type(n, module)
                info["axis_map"] = self._axis_map(n, module, kind, args, kwargs, ins[0], result)
                if kind not in _NOT_ZERO_TESTED:
                    info["zero_ok"] = self._zero_preserving(n, args, kwargs, ins[0])
        self.info[n] = info
        return result

    def _call(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        return getattr(self, n.op)(n.target, args, kwargs)

    def _axis_map(
        self, n, module, kind, args, kwargs, x: torch.Tensor, out: torch.Tensor
    ) -> dict[int, int]:
        """Where each input axis lands in the output, for the axes that land whole."""
        if (
            kind in _ELEMENTWISE
            or _is_identity(n, module)
            or (kind == "pool" and out.dim() == x.dim())
        ):
            # Right-aligned like broadcasting; an axis whose size changes (a pooled
            # spatial axis, a reduced keepdim axis) does not land whole.
            shift = out.dim() - x.dim()
            return {
                a: a + shift
                for a in range(x.dim())
                if a + shift >= 0 and out.shape[a + shift] == x.shape[a]
            }
        if kind == "concat" and n.target is not torch.stack:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            dim = dim % x.dim()
            return {a: a for a in range(x.dim()) if a != dim}
        if kind not in _PROBED and not (n.op == "call_function" and n.target is operator.getitem):
            return {}
        # Coordinate probe: feed a tensor whose values are the coordinates along axis a; the
        # axis survives whole iff some output axis carries exactly those coordinates.
        found = {}
        with torch.no_grad():
            for a, size in enumerate(x.shape):
                if size < 2:
                    continue
                view = [1] * x.dim()
                view[a] = size
                probe = torch.arange(size, dtype=torch.float64).reshape(view).expand(x.shape)
                p_args, p_kwargs = _replace_first_tensor(args, kwargs, probe.clone())
                try:
                    y = self._call(n, p_args, p_kwargs)
                except Exception:
                    return {}
                if not isinstance(y, torch.Tensor) or y.shape != out.shape:
                    return {}
                for j, osize in enumerate(y.shape):
                    if osize != size:
                        continue
                    oview = [1] * y.dim()
                    oview[j] = size
                    expect = torch.arange(size, dtype=torch.float64).reshape(oview)
                    if torch.equal(y, expect.expand(y.shape)):
                        found[a] = j
                        break
        return found

    def _zero_preserving(self, n, args, kwargs, x: torch.Tensor) -> bool:
        """Whether the operator maps an all-zero input to an all-zero output."""
        if not x.is_floating_point():
            return False
        zeros = torch.zeros_like(x)
        z_args, z_kwargs = _replace_first_tensor(args, kwargs, zeros)
        try:
            with torch.no_grad():
                y = self._call(n, z_args, z_kwargs)
        except Exception:
            return False
        return isinstance(y, torch.Tensor) and bool((y == 0).all())


# ---------------------------------------------------------------------------------------
# Graph construction


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Keep the earlier node as the representative, so groups list deterministically.
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def build_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[str | type] = (),
    ignored_layers: Iterable[str] = (),
) -> NetGraph:
    """Trace ``model`` into a :class:`NetGraph`.

    The model is run once, in eval mode and without gradients, on the first example of
    ``example_inputs`` (the train/eval flags of all modules are restored afterwards, so
    batch-norm statistics are not touched).

    Args:
        model: the network. It must be traceable by ``torch.fx``.
        example_inputs: one input tensor (or a sequence of the forward's tensor arguments)
            with a batch dimension; only the first example is used.
        leaf_modules: module names or classes that the tracer must not enter (for modules
            with data-dependent control flow). Their FLOPs are still counted; layers inside
            them are not prunable.
        ignored_layers: names of ``Conv2d``/``Linear`` modules to keep out of the prunable
            layers (Torch-Pruning's ``ignored_layers``; e.g. the classifier). Their FLOPs are
            fixed.

    Returns:
        The graph.

    Raises:
        TraceError: ``torch.fx`` cannot trace the model; the message names the failing
            module and source line, the original error and the fix.
        ValueError: the traced model fails on ``example_inputs`` (wrong shape).
    """
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    # A copy, so that in-place operators cannot touch the caller's tensor.
    inputs = tuple(x[:1].clone() for x in inputs)
    gm = _trace(model, tuple(leaf_modules))
    modes = {m: m.training for m in model.modules()}
    profiler = _Profiler(gm)
    try:
        model.eval()
        with torch.no_grad():
            profiler.run(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ValueError(
            f"{type(model).__name__} traced, but running it on example inputs of shape {shapes} "
            f"failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        for m, mode in modes.items():
            m.training = mode
    info = profiler.info
    named_params = dict(model.named_parameters())

    # Nodes: every fx node with a tensor output, plus the output node.
    fx_nodes = list(gm.graph.nodes)
    kept: dict[fx.Node, int] = {}
    nodes: list[Node] = []
    for n in fx_nodes:
        i = info.get(n, {})
        if n.op != "output" and not i.get("tensor"):
            continue
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        op_type = _op_type(n, module)
        params = sum(p.numel() for p in module.parameters()) if module is not None else 0
        if n.op == "get_attr" and n.target in named_params:
            params = named_params[n.target].numel()
        kept[n] = len(nodes)
        nodes.append(
            Node(
                index=len(nodes),
                name=n.name,
                op_type=op_type,
                target=_target_name(n),
                module=module,
                in_shape=i.get("in_shape"),
                out_shape=i.get("out_shape") or (),
                flops=i.get("flops", 0),
                params=params,
            )
        )

    def producers(n: fx.Node) -> list[int]:
        """Kept nodes feeding ``n``, looking through dropped tensor-carrying nodes."""
        out: list[int] = []
        for p in n.all_input_nodes:
            if p in kept:
                out.append(kept[p])
            elif info.get(p, {}).get("carries"):
                out.extend(producers(p))
        return list(dict.fromkeys(out))

    for n, idx in kept.items():
        i = info.get(n, {})
        nodes[idx].axis_map = dict(i.get("axis_map", {}))
        nodes[idx].zero_ok = bool(i.get("zero_ok", False))
        operands = [p for p in n.all_input_nodes if info.get(p, {}).get("carries")]
        nodes[idx].inputs = tuple(kept.get(p, -1) for p in operands)

    # Data-flow edges. The skip operands of an add are all its activation operands but the
    # deepest one (longest path from the input; the main branch, ties to the most recently
    # computed); parameters (pos_embed) are no skips.
    fx_of = list(kept)
    edges: list[tuple[int, int, int]] = []
    depth: dict[int, int] = {}
    for n, dst in kept.items():
        srcs = producers(n)
        depth[dst] = 1 + max((depth[s] for s in srcs), default=-1)
        skips: set[int] = set()
        if nodes[dst].op_type == "add":
            activations = [s for s in srcs if fx_of[s].op != "get_attr"]
            main = max(activations, key=lambda s: (depth[s], s), default=None)
            skips = {s for s in activations if s != main}
        edges.extend((s, dst, RESIDUAL if s in skips else FORWARD) for s in srcs)

    # Prunable layers: Conv2d / Linear modules called exactly once, unless ignored.
    ignored = set(ignored_layers)
    calls: dict[str, int] = {}
    for n in kept:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    layer_of_node = {
        kept[n]: str(n.target)
        for n in kept
        if n.op == "call_module"
        and isinstance(nodes[kept[n]].module, nn.Conv2d | nn.Linear)
        and calls[str(n.target)] == 1
        and str(n.target) not in ignored
    }
    reused = sorted(
        {
            str(n.target)
            for n in kept
            if n.op == "call_module"
            and isinstance(nodes[kept[n]].module, nn.Conv2d | nn.Linear)
            and calls[str(n.target)] > 1
            and str(n.target) not in ignored
        }
    )
    if reused:
        warnings.warn(
            f"{type(model).__name__}: {', '.join(f'{m} ({calls[m]} calls)' for m in reused)} "
            "called more than once in forward; such a layer is left out of the episode (kept "
            "dense, its FLOPs fixed). Give each call its own module to make it prunable.",
            stacklevel=2,
        )
    _warn_opaque(model, gm, tuple(leaf_modules))
    layer_nodes = list(layer_of_node)
    layers = list(layer_of_node.values())

    groups = _coupling_groups(model, kept, info, nodes, layer_of_node)
    consumers, batch_norms = _consumers(kept, info, nodes, layer_of_node)
    node_of_layer = dict(zip(layers, layer_nodes))
    for g in groups:
        edges.extend((node_of_layer[a], node_of_layer[b], COUPLING) for a in g for b in g if a != b)

    return NetGraph(
        nodes=nodes,
        edges=edges,
        layers=layers,
        layer_nodes=layer_nodes,
        groups=groups,
        dense_flops=sum(n.flops for n in nodes),
        dense_params=sum(p.numel() for p in model.parameters()),
        model=model,
        _consumers=consumers,
        _batch_norms=batch_norms,
    )


def _warn_opaque(model: nn.Module, gm: fx.GraphModule, asked: tuple) -> None:
    """Warn about leaf modules that hide Conv2d/Linear layers (unless asked for as leaves)."""
    asked_types = tuple(t for t in asked if isinstance(t, type))
    hidden = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        module = gm.get_submodule(n.target)
        if isinstance(module, nn.Conv2d | nn.Linear) or str(n.target) in asked:
            continue
        if asked_types and isinstance(module, asked_types):
            continue
        inner = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        if inner:
            hidden.append(f"'{n.target}' ({type(module).__name__}, {len(inner)} layers)")
    if hidden:
        warnings.warn(
            f"{type(model).__name__}: torch.fx does not trace into {', '.join(hidden)}; their "
            "Conv2d/Linear layers are not prunable (kept dense, FLOPs counted). "
            "autosculpt_env.traceable.make_traceable rewrites nn.MultiheadAttention and "
            "nn.TransformerEncoder(Layer) into traceable equivalents (the env applies it); "
            "write other modules in plain torch code to expose their layers.",
            stacklevel=3,
        )


def _tensor_inputs(n: fx.Node, info: dict) -> list[fx.Node]:
    return [p for p in n.all_input_nodes if info.get(p, {}).get("tensor")]


def _channel_axis(node: Node) -> int:
    return 1 if isinstance(node.module, nn.Conv2d) else len(node.out_shape) - 1


def _coupling_groups(
    model: nn.Module,
    kept: dict[fx.Node, int],
    info: dict,
    nodes: list[Node],
    layer_of_node: dict[int, str],
) -> list[list[str]]:
    """Union-find over channel spaces, propagated forward in topological order."""
    uf = _UnionFind()
    # space[n] = (key, axis): axis `axis` of n's output carries the channels of channel
    # space `key` (a node index: a layer, or a node where channel spaces merge).
    space: dict[fx.Node, tuple[int, int]] = {}
    for n, idx in kept.items():
        node, i = nodes[idx], info.get(n, {})
        ins = _tensor_inputs(n, info)
        if idx in layer_of_node:
            uf.find(idx)
            src = space.get(ins[0]) if ins else None
            if node.op_type == "depthwise_conv" and src is not None and src[1] == 1:
                uf.union(idx, src[0])
            space[n] = (idx, _channel_axis(node))
            continue
        axis_map: dict[int, int] = i.get("axis_map", {})
        merging = node.op_type in ("add", "mul") or (
            node.op_type == "concat" and n.target is not torch.stack
        )
        if merging and len(ins) > 1:
            found: list[tuple[int, int]] = []
            for p in ins:
                if p not in space:
                    continue
                key, a = space[p]
                p_shape = info[p]["out_shape"]
                if node.op_type == "concat":
                    j = axis_map.get(a)
                else:
                    j = a + len(node.out_shape) - len(p_shape)
                # A broadcast operand (size 1 on the channel axis) does not couple.
                if j is not None and p_shape[a] == node.out_shape[j]:
                    found.append((key, j))
            if found:
                j0 = found[0][1]
                for key, j in found:
                    if j == j0:
                        uf.union(idx, key)
                space[n] = (idx, j0)
            continue
        if len(ins) >= 1 and ins[0] in space and space[ins[0]][1] in axis_map:
            key, a = space[ins[0]]
            space[n] = (key, axis_map[a])

    # Heads must be pruned alike in q, k and v of one attention module.
    by_parent: dict[str, list[int]] = {}
    for idx, name in layer_of_node.items():
        parent_name = name.rpartition(".")[0]
        if attention_role(name, model.get_submodule(parent_name)) in ("q", "k", "v"):
            by_parent.setdefault(parent_name, []).append(idx)
    for members in by_parent.values():
        for idx in members[1:]:
            uf.union(members[0], idx)

    components: dict[int, list[str]] = {}
    for idx, name in layer_of_node.items():
        components.setdefault(uf.find(idx), []).append(name)
    return list(components.values())


def _consumers(
    kept: dict[fx.Node, int],
    info: dict,
    nodes: list[Node],
    layer_of_node: dict[int, str],
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Forward walk from each layer through dead-channel-preserving operators."""
    consumers: dict[str, list[str]] = {}
    batch_norms: dict[str, list[str]] = {}
    for idx, name in layer_of_node.items():
        start = next(n for n, i in kept.items() if i == idx)
        found: list[int] = []
        bns: list[str] = []
        stack = [(start, _channel_axis(nodes[idx]))]
        seen = set(stack)
        while stack:
            n, axis = stack.pop()
            for u in n.users:
                if u not in kept:
                    continue
                ins = _tensor_inputs(u, info)
                # The channel must enter as the operator's only (or, for a layer, first)
                # tensor input.
                if not ins or ins[0] is not n:
                    continue
                uidx, unode, uinfo = kept[u], nodes[kept[u]], info[u]
                if uidx in layer_of_node:
                    if axis == _channel_axis_in(unode):
                        found.append(uidx)
                    continue
                if len(ins) != 1 or unode.op_type == "layer_norm":
                    continue
                if unode.op_type != "batch_norm" and not uinfo.get("zero_ok"):
                    continue
                axis_map = uinfo.get("axis_map", {})
                if axis not in axis_map:
                    continue
                if unode.op_type == "batch_norm":
                    bns.append(unode.target)
                nxt = (u, axis_map[axis])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        consumers[name] = [layer_of_node[i] for i in sorted(set(found))]
        batch_norms[name] = list(dict.fromkeys(bns))
    return consumers, batch_norms


def _channel_axis_in(node: Node) -> int:
    """The input axis a layer reduces over: 1 for a convolution, the last for a linear."""
    assert node.in_shape is not None
    return 1 if isinstance(node.module, nn.Conv2d) else len(node.in_shape) - 1
