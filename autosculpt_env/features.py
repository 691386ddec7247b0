"""Node features of the environment's graph observation.

Every node of the :class:`~autosculpt_env.graph.NetGraph` gets one ``float32`` vector. Its
columns are named once, here, by :class:`FeatureLayout`; the env, the wrappers and the agents
read columns by name (``layout.column("current")``, ``layout.block("chosen")``), never by
offset arithmetic. Its length depends on the catalog (P actions), never on the model, so a
policy trained on one network runs on another. The layout (``P`` = catalog actions, ``a`` =
an action name)::

{LAYOUT}

No feature is random. Static columns are computed once per problem; a step rewrites only
the episode-state columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .graph import OP_TYPES

if TYPE_CHECKING:
    from .problem import PruningProblem

OP_TYPE_DESCRIPTION = "one-hot operator type (graph.OP_TYPES)"
STATIC_FEATURES: tuple[tuple[str, str], ...] = (
    ("log_in_channels", "log1p(input channels / features)"),
    ("log_out_channels", "log1p(output channels / features)"),
    ("log_positions", "log1p(output positions: H*W of a feature map, tokens of a sequence)"),
    ("log_kernel_area", "log1p(kernel area) (convolutions only)"),
    ("flops_share", "node FLOPs / model FLOPs"),
    ("params_share", "node params / model params"),
    ("weight_abs_mean", "mean |w| of the layer's weight (prunable layers)"),
    ("weight_std", "std of the layer's weight (prunable layers)"),
    ("log_weight_l2", "log1p(L2 norm of the layer's weight) (prunable layers)"),
)
"""Static scalar columns after the operator one-hot: (name, meaning)."""
ACTION_BLOCKS: tuple[tuple[str, str], ...] = (
    ("kept_energy", "fraction of the layer's weight energy action a keeps (0 where invalid)"),
    ("flops_left", "fraction of the layer's FLOPs action a leaves (0 where invalid)"),
    ("chosen", "one-hot of the action chosen for this layer (episode state)"),
)
"""Blocks of one column per catalog action, named ``NAME[a]``: (name, meaning)."""
STATE_FEATURES: tuple[tuple[str, str], ...] = (
    ("prunable", "1 for the layers an episode decides"),
    ("current", "1 for the layer the next action decides"),
    ("decided", "1 for the layers decided so far"),
    ("chosen_sparsity", "nominal sparsity of the chosen action (0 until decided)"),
    ("flops_reduction", "FLOPs reduction so far (undecided layers dense), on every node"),
    ("flops_to_target", "FLOPs still to remove to reach the target / model FLOPs, every node"),
    ("progress", "decided layers / prunable layers, on every node"),
)
"""Episode-state columns, last: (name, meaning)."""
GLOBAL_STATE: tuple[str, ...] = ("flops_reduction", "flops_to_target", "progress")
"""State columns that hold the same value on every node (the episode's global state)."""


@dataclass(frozen=True)
class FeatureLayout:
    """The column layout of the node feature vector for one catalog.

    Args:
        action_names: the catalog's action names, in action-index order.

    Example:
        >>> layout = FeatureLayout(("dense", "half"))
        >>> layout.size == len(layout.names) == len(OP_TYPES) + 9 + 3 * 2 + 7
        True
        >>> layout.names[layout.column("current")], layout.names[layout.block("chosen")][1]
        ('current', 'chosen[half]')
    """

    action_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "action_names", tuple(self.action_names))

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The name of every column, in order."""
        names = [f"op_{t}" for t in OP_TYPES]
        names += [name for name, _ in STATIC_FEATURES]
        for block, _ in ACTION_BLOCKS:
            names += [f"{block}[{a}]" for a in self.action_names]
        return tuple(names + [name for name, _ in STATE_FEATURES])

    @property
    def size(self) -> int:
        """Columns per node."""
        return len(self.names)

    @cached_property
    def _columns(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def column(self, name: str) -> int:
        """The index of a scalar column (``"current"``, ``"op_conv"``, ``"chosen[level_0.3]"``).

        Raises:
            KeyError: no such column; the message lists the scalar and block names.
        """
        if name not in self._columns:
            scalars = [n for n, _ in STATIC_FEATURES + STATE_FEATURES]
            blocks = [n for n, _ in ACTION_BLOCKS]
            raise KeyError(
                f"no feature column {name!r}; columns: {scalars}, op_<type> for graph.OP_TYPES, "
                f"and NAME[action] for the blocks {blocks}"
            )
        return self._columns[name]

    def block(self, name: str) -> slice:
        """The columns of a per-action block (``"kept_energy"``, ``"flops_left"``, ``"chosen"``),
        one per action in index order."""
        blocks = [n for n, _ in ACTION_BLOCKS]
        if name not in blocks:
            raise KeyError(f"no per-action feature block {name!r}; blocks: {blocks}")
        start = len(OP_TYPES) + len(STATIC_FEATURES) + blocks.index(name) * self.num_actions
        return slice(start, start + self.num_actions)

    @property
    def op_type(self) -> slice:
        """The operator one-hot columns (in :data:`~autosculpt_env.graph.OP_TYPES` order)."""
        return slice(0, len(OP_TYPES))

    @property
    def static(self) -> slice:
        """Every column computed once per problem (all but the episode state)."""
        return slice(0, self.state.start)

    @property
    def state(self) -> slice:
        """The episode-state columns (:data:`STATE_FEATURES`)."""
        return slice(self.size - len(STATE_FEATURES), self.size)

    @property
    def global_state(self) -> slice:
        """The state columns that are the same on every node (:data:`GLOBAL_STATE`)."""
        start = self.column(GLOBAL_STATE[0])
        return slice(start, start + len(GLOBAL_STATE))


def layout_rows() -> tuple[list[tuple[str, str, str]], str]:
    """``([(columns, name, meaning) ...], length)`` with positions in terms of ``P``."""
    rows: list[tuple[str, str, str]] = []
    const, blocks = len(OP_TYPES), 0

    def at(c: int, p: int) -> str:
        return str(c) if p == 0 else f"{c} + {p if p > 1 else ''}P"

    rows.append((f"[0, {const})", "op_<type>", OP_TYPE_DESCRIPTION))
    for name, what in STATIC_FEATURES:
        rows.append((str(const), name, what))
        const += 1
    for name, what in ACTION_BLOCKS:
        rows.append((f"[{at(const, blocks)}, {at(const, blocks + 1)})", f"{name}[a]", what))
        blocks += 1
    for name, what in STATE_FEATURES:
        rows.append((at(const, blocks), name, what))
        const += 1
    return rows, at(const, blocks)


def describe_layout() -> str:
    """The layout as an indented text table (the module docstring's)."""
    rows, length = layout_rows()
    width = max(len(pos) for pos, _, _ in rows) + 2
    lines = [f"    {pos:<{width}}{name}: {what}" for pos, name, what in rows]
    return "\n".join([*lines, f"    length: {length}"])


def describe_layout_markdown() -> str:
    """The layout as a markdown table (the README's ``observation`` block)."""
    rows, length = layout_rows()
    lines = ["| columns | feature | meaning |", "|---|---|---|"]
    lines += [f"| `{p}` | `{n}` | {w.replace('|', chr(92) + '|')} |" for p, n, w in rows]
    lines.append(
        f"\nLength `{length}` for a catalog of P actions ({len(OP_TYPES)} operator types), "
        "whatever the model; generated from `autosculpt_env.features.FeatureLayout`."
    )
    return "\n".join(lines)


__doc__ = __doc__.replace("{LAYOUT}", describe_layout())


def _channels_positions(shape: tuple[int, ...] | None) -> tuple[int, int]:
    if not shape or len(shape) < 2:
        return 0, 0
    if len(shape) == 4:  # N, C, H, W
        return shape[1], shape[2] * shape[3]
    if len(shape) == 3:  # N, tokens, features
        return shape[2], shape[1]
    return shape[-1], 1


def static_features(problem: PruningProblem, layout: FeatureLayout | None = None) -> np.ndarray:
    """The (num_nodes, F) matrix with every state column zero except ``prunable``."""
    g = problem.graph
    layout = layout or FeatureLayout(tuple(problem.catalog.action_names))
    col = layout.column
    x = np.zeros((len(g.nodes), layout.size), dtype=np.float32)
    dense_flops = max(g.dense_flops, 1)
    dense_params = max(g.dense_params, 1)
    for node in g.nodes:
        r = node.index
        x[r, col(f"op_{node.op_type}")] = 1.0
        c_in, _ = _channels_positions(node.in_shape)
        c_out, pos = _channels_positions(node.out_shape)
        x[r, col("log_in_channels")] = math.log1p(c_in)
        x[r, col("log_out_channels")] = math.log1p(c_out)
        x[r, col("log_positions")] = math.log1p(pos)
        ks = getattr(node.module, "kernel_size", None)
        if ks is not None:
            x[r, col("log_kernel_area")] = math.log1p(int(np.prod(ks)))
        x[r, col("flops_share")] = node.flops / dense_flops
        x[r, col("params_share")] = node.params / dense_params
    kept, left = layout.block("kept_energy"), layout.block("flops_left")
    cost = problem.cost
    for li, layer in enumerate(problem.layers):
        r = g.layer_nodes[li]
        w = layer.weight
        x[r, col("weight_abs_mean")] = float(w.abs().mean())
        x[r, col("weight_std")] = float(w.std()) if w.numel() > 1 else 0.0
        x[r, col("log_weight_l2")] = math.log1p(float(w.norm()))
        dense_layer_flops = cost.flops[li, problem.dense_action]
        for a in np.flatnonzero(layer.valid):
            x[r, kept.start + a] = problem.kept_energy(li, int(a))
            if dense_layer_flops > 0:
                x[r, left.start + a] = cost.flops[li, a] / dense_layer_flops
        x[r, col("prunable")] = 1.0
    return x
