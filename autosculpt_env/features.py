"""Node features of the environment's graph observation.

Every node of the :class:`~autosculpt_env.graph.NetGraph` gets one ``float32`` vector with
this fixed layout. Its length depends on the catalog (P actions), never on the model, so a
policy trained on one network runs on another::

    [0, T)            one-hot operator type, T = len(graph.OP_TYPES)
    T + 0             log1p(input channels / features)
    T + 1             log1p(output channels / features)
    T + 2             log1p(output positions: H*W for feature maps, tokens for sequences)
    T + 3             log1p(kernel area) (conv only)
    T + 4             node FLOPs / model FLOPs
    T + 5             node params / model params
    T + 6             mean |w| of the layer's weight (prunable layers)
    T + 7             std of the layer's weight
    T + 8             log1p(L2 norm of the weight)
    S = T + 9
    [S, S+P)          per action: fraction of the layer's weight energy the action keeps
                      (0 where the action is not valid for the layer)
    [S+P, S+2P)       per action: fraction of the layer's FLOPs the action leaves
    [S+2P, S+3P)      one-hot of the action chosen for this layer (episode state)
    E = S + 3P
    E + 0             prunable (1 for the layers an episode decides)
    E + 1             current (the layer the next action decides)
    E + 2             decided
    E + 3             nominal sparsity of the chosen action (0 until decided)
    E + 4             FLOPs reduction so far (whole model, undecided layers dense), every node
    E + 5             budget left: FLOPs still to remove to reach the target, / model FLOPs
    E + 6             episode progress: decided layers / prunable layers

No feature is random. Static columns are computed once per problem; a step rewrites only
the state columns.
"""

from __future__ import annotations

import math

import numpy as np

from .graph import OP_TYPES
from .problem import PruningProblem

STATIC_BASE = len(OP_TYPES) + 9
STATE_NAMES = (
    "prunable",
    "current",
    "decided",
    "chosen_sparsity",
    "flops_reduction",
    "budget_left",
    "progress",
)


def feature_names(action_names: list[str]) -> list[str]:
    """Names of every column of the node feature vector, in order."""
    names = [f"op_{t}" for t in OP_TYPES]
    names += [
        "log_in_channels",
        "log_out_channels",
        "log_positions",
        "log_kernel_area",
        "flops_share",
        "params_share",
        "weight_abs_mean",
        "weight_std",
        "log_weight_norm",
    ]
    names += [f"kept_energy[{a}]" for a in action_names]
    names += [f"flops_left[{a}]" for a in action_names]
    names += [f"chosen[{a}]" for a in action_names]
    return names + list(STATE_NAMES)


def num_features(num_actions: int) -> int:
    return STATIC_BASE + 3 * num_actions + len(STATE_NAMES)


def _channels_positions(shape: tuple[int, ...] | None) -> tuple[int, int]:
    if not shape or len(shape) < 2:
        return 0, 0
    if len(shape) == 4:  # N, C, H, W
        return shape[1], shape[2] * shape[3]
    if len(shape) == 3:  # N, tokens, features
        return shape[2], shape[1]
    return shape[-1], 1


def static_features(problem: PruningProblem) -> np.ndarray:
    """The (num_nodes, F) matrix with every state column zero except ``prunable``."""
    g, P = problem.graph, problem.num_actions
    F = num_features(P)
    x = np.zeros((len(g.nodes), F), dtype=np.float32)
    op_index = {t: i for i, t in enumerate(OP_TYPES)}
    dense_flops = max(g.dense_flops, 1)
    dense_params = max(g.dense_params, 1)
    for node in g.nodes:
        r = node.index
        x[r, op_index[node.op_type]] = 1.0
        c_in, _ = _channels_positions(node.in_shape)
        c_out, pos = _channels_positions(node.out_shape)
        x[r, len(OP_TYPES) + 0] = math.log1p(c_in)
        x[r, len(OP_TYPES) + 1] = math.log1p(c_out)
        x[r, len(OP_TYPES) + 2] = math.log1p(pos)
        ks = getattr(node.module, "kernel_size", None)
        if ks is not None:
            x[r, len(OP_TYPES) + 3] = math.log1p(int(np.prod(ks)))
        x[r, len(OP_TYPES) + 4] = node.flops / dense_flops
        x[r, len(OP_TYPES) + 5] = node.params / dense_params
    E = STATIC_BASE + 3 * P
    cost = problem.cost
    for li, layer in enumerate(problem.layers):
        r = g.layer_nodes[li]
        w = layer.weight
        x[r, len(OP_TYPES) + 6] = float(w.abs().mean())
        x[r, len(OP_TYPES) + 7] = float(w.std()) if w.numel() > 1 else 0.0
        x[r, len(OP_TYPES) + 8] = math.log1p(float(w.norm()))
        dense_layer_flops = cost.flops[li, problem.dense_action]
        for a in np.flatnonzero(layer.valid):
            x[r, STATIC_BASE + a] = problem.kept_energy(li, int(a))
            if dense_layer_flops > 0:
                x[r, STATIC_BASE + P + a] = cost.flops[li, a] / dense_layer_flops
        x[r, E + 0] = 1.0
    return x
