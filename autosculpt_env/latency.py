"""Measured latency as a cost: a per-(layer, action) table, measured once per machine.

FLOPs say how much work a policy removes; latency says how much time. :func:`latency_table`
times every prunable layer under every valid action *as materialised*
(:mod:`autosculpt_env.materialize`: removed output channels cut, row/column patterns as a
few dense convolutions, other sparsity kept as zeros) on an input of the layer's shape, and
the dense network end to end. A policy's predicted latency is additive, like its FLOPs::

    latency(policy) = fixed + sum_l table[l, a_l]
    fixed           = dense network latency - sum_l table[l, dense]

``fixed`` holds everything outside the prunable layers (norms, activations, pools, the
classifier, attention matmuls, framework overhead). What the table leaves out: the input
channels a layer loses when its producer's channels are cut (the FLOPs table's dead-channel
corrections), runtime permutations and the cheaper norms of a cut network; how well the sum
predicts the measured end-to-end latency of materialised networks is reported by
``benchmarks/latency.py``.

The table depends on the machine, torch version, thread count and batch size; it is cached
under ``$AUTOSCULPT_CACHE/latency/<key>.json`` with a key over all of them and the weights
(masks depend on the weights), like the proxy sensitivity table.

Wiring into the env (not done here): ``AutoSculptEnv(..., target_latency_reduction=None,
latency_batch_size=256)`` would build ``self.latency = latency_table(self.problem,
batch_size=latency_batch_size)`` when either latency option is set, add
``info["latency_reduction"] = self.latency.latency_reduction(policy)`` (and ``latency_s``) to
the terminal info, and with ``target_latency_reduction`` mask actions whose cheapest
completion misses the latency target, using :meth:`LatencyTable.min_latency_from` the way
the FLOPs target's action wall uses ``CostTable.min_flops_from``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import zoo
from .materialize import (
    MaterializeError,
    _part_keys,
    _part_order,
    _pattern_conv,
    _pattern_plan,
    _removed_rows,
)

LATENCY_VERSION = 1


def median_latency(
    fn: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median wall time of ``fn(x)`` in seconds over ``repeats`` runs (no gradients)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    """What decides a latency measurement besides the network."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


@dataclass
class LatencyTable:
    """Measured latency of every (layer, action), in seconds per batch.

    Attributes:
        layers: prunable layer names.
        action_names: catalog action names.
        latency: float64 ``(L, P)``; NaN where the action is invalid.
        dense_latency: the dense network end to end.
        fixed: ``dense_latency`` minus the layers' dense entries.
        batch_size: the batch the entries were timed at.
        machine: :func:`machine` at measurement time.
    """

    layers: list[str]
    action_names: list[str]
    latency: np.ndarray
    dense_latency: float
    fixed: float
    batch_size: int
    machine: dict

    def policy_latency(self, actions: Sequence[int]) -> float:
        """Predicted latency of a full policy (seconds per batch)."""
        acts = np.asarray([int(a) for a in actions], dtype=np.int64)
        if len(acts) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} actions, got {len(acts)}")
        values = self.latency[np.arange(len(acts)), acts]
        if np.isnan(values).any():
            bad = int(np.flatnonzero(np.isnan(values))[0])
            raise ValueError(f"action {int(acts[bad])} is not valid for layer {self.layers[bad]}")
        return float(self.fixed + values.sum())

    def latency_reduction(self, actions: Sequence[int]) -> float:
        """``1 - policy_latency / dense_latency`` (negative where the policy is slower)."""
        return 1.0 - self.policy_latency(actions) / self.dense_latency

    def min_latency_from(self, decided: Sequence[int]) -> float:
        """The lowest predicted latency any completion of a partial policy reaches."""
        k = len(decided)
        done = sum(float(self.latency[i, int(a)]) for i, a in enumerate(decided))
        rest = np.nanmin(self.latency[k:], axis=1).sum() if k < len(self.layers) else 0.0
        return float(self.fixed + done + rest)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = [[None if np.isnan(v) else float(v) for v in row] for row in self.latency]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        d = dict(d)
        d["latency"] = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in d["latency"]],
            dtype=np.float64,
        )
        table = cls(**d)
        if table.latency.shape != (len(table.layers), len(table.action_names)):
            raise ValueError("latency table shape does not match its layers and actions")
        return table


def layer_module(module: nn.Module, mask: torch.Tensor) -> tuple[nn.Module | None, int]:
    """One layer as :func:`~autosculpt_env.materialize.materialize` would build it, with its
    removed output channels cut (as if its group allowed it).

    Returns:
        The module (``None`` when every output channel is removed; a pattern layer emits its
        filters in part order, as when its order is folded) and the input channels it reads
        (a depthwise layer reads only its kept channels).
    """
    keep = ~_removed_rows(mask)
    if not bool(keep.any()):
        return None, 0
    w = (module.weight.detach() * mask)[keep]
    bias = None if module.bias is None else module.bias.detach()[keep]
    m = mask[keep]
    n = int(keep.sum())
    if isinstance(module, nn.Linear):
        out = nn.Linear(module.in_features, n, bias=bias is not None)
        in_ch = module.in_features
    elif isinstance(module, nn.Conv2d):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if module.groups > 1 and not depthwise:
            raise MaterializeError(f"grouped convolution {module} has no latency model")
        in_ch = n if depthwise else module.in_channels
        out = nn.Conv2d(
            in_ch,
            n,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            groups=n if depthwise else 1,
            bias=bias is not None,
        )
    else:
        raise MaterializeError(f"{type(module).__name__} is not a Conv2d or Linear layer")
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
    if isinstance(out, nn.Conv2d) and out.groups == 1:
        blocks = _pattern_plan(out, m)
        if blocks is not None and any(b not in (None, (0, 0, 3, 3)) for b in blocks):
            keys = _part_keys(blocks, 8)
            _, perm = _part_order(keys)
            with torch.no_grad():
                out.weight.data = out.weight.data[perm]
                if out.bias is not None:
                    out.bias.data = out.bias.data[perm]
            out, _ = _pattern_conv(out, [keys[i] for i in perm.tolist()], m[perm], fold=True)
    return out.eval(), in_ch


def _key(problem, batch_size: int, info: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(problem.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    meta = {
        "version": LATENCY_VERSION,
        "catalog": problem.catalog.name,
        "actions": problem.catalog.action_names,
        "layers": [layer.name for layer in problem.layers],
        "input": list(problem.example_inputs.shape[1:]),
        "batch_size": batch_size,
        "machine": info,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:20]


def latency_table(
    problem,
    batch_size: int = 256,
    repeats: int = 10,
    cache: bool = True,
) -> LatencyTable:
    """Measure (or load from the cache) the latency table of a pruning problem.

    Timing uses the current ``torch.get_num_threads()``; fix it before calling.

    Args:
        problem: a :class:`~autosculpt_env.problem.PruningProblem` (``env.unwrapped.problem``).
        batch_size: the batch every entry is timed at.
        repeats: timed runs per entry (the median is kept).
        cache: read and write ``$AUTOSCULPT_CACHE/latency/<key>.json``.
    """
    info = machine()
    path = zoo.cache_dir() / "latency" / f"{_key(problem, batch_size, info)}.json"
    if cache and path.exists():
        return LatencyTable.from_dict(json.loads(path.read_text()))
    graph = problem.graph
    shape = problem.example_inputs.shape[1:]
    dense = median_latency(problem.model, torch.randn(batch_size, *shape), repeats)
    table = np.full((problem.num_layers, problem.num_actions), np.nan)
    for i, layer in enumerate(problem.layers):
        in_shape = graph.node(layer.name).in_shape
        assert in_shape is not None
        for a in np.flatnonzero(problem.valid[i]):
            mod, in_ch = layer_module(layer.module, problem.mask(i, int(a)))
            if mod is None:
                table[i, a] = 0.0
                continue
            s = list(in_shape[1:])
            if isinstance(mod, nn.Linear):
                s[-1] = in_ch
            else:
                s[0] = in_ch
            table[i, a] = median_latency(mod, torch.randn(batch_size, *s), repeats)
    fixed = dense - float(table[:, problem.dense_action].sum())
    result = LatencyTable(
        layers=[layer.name for layer in problem.layers],
        action_names=problem.catalog.action_names,
        latency=table,
        dense_latency=dense,
        fixed=fixed,
        batch_size=batch_size,
        machine=info,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict()) + "\n")
        tmp.replace(path)
    return result
