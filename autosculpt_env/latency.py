"""Measured latency as a cost: a per-(layer, action) table, measured once per machine.

FLOPs say how much work a policy removes; latency says how much time. :func:`latency_table`
times every prunable layer under every valid action *as materialised*
(:mod:`autosculpt_env.materialize`: removed output channels cut, row/column patterns as a
few dense convolutions, other sparsity kept as zeros) on an input of the layer's shape, and
the dense network end to end, in torch on the CPU with a fixed thread count
(:data:`LATENCY_THREADS`) at a fixed batch size (:data:`LATENCY_BATCH_SIZE` unless asked
otherwise), keeping the median of :data:`LATENCY_REPEATS` runs. A policy's predicted latency
is additive, like its FLOPs::

    latency(policy) = fixed + sum_l table[l, a_l] - sum_(p, c) dead[p, c][a_p, a_c]
    fixed           = dense network latency - sum_l table[l, dense]

``fixed`` holds everything outside the prunable layers (norms, activations, pools, the
classifier, attention matmuls, framework overhead). Each entry is timed with the layer's
full input; where a producer's removed output channels are cut, its consumer reads fewer
input channels and runs faster. The prediction subtracts that as the FLOPs table does
(:attr:`autosculpt_env.cost.CostTable.dead`), scaled to time: a consumer's entry times the
fraction of its FLOPs the producer's action makes dead. On narrow networks this is where
most of a policy's measured speedup comes from (a consumer of a producer cut from 8 to 1
channels runs ~4x faster), which the plain per-layer sum missed (it predicted ~no speedup
for policies measured at 1.3-1.7x on resnet20). What the table still leaves out: runtime
permutations and the cheaper norms of a cut network; how well it predicts the measured
end-to-end latency of materialised networks is reported by
``python benchmarks/latency.py --table``.

The env uses the table when asked (``AutoSculptEnv(..., target_latency_reduction=...)`` or
``latency_batch_size=...``): ``info["latency_reduction"]`` at the end of an episode, and a
latency target for the rewards (:data:`autosculpt_env.rewards.LATENCY_TARGET`).

**Cache.** The table depends on the machine, so it is measured once per machine and kept
under ``$AUTOSCULPT_CACHE/latency/<key>.json``. The key covers everything that decides the
entries: every valid (layer, action) keep-mask, the layers' shapes and hyper-parameters, the
input shape, the batch size, thread count and repeats, the torch version and the machine
(``platform.processor()``, the CPU model, architecture and core count). Files are written
atomically; a file that does not parse or does not match its key is reported with a warning
naming it and measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import zoo
from .cost import CostTable
from .materialize import (
    MaterializeError,
    _part_keys,
    _part_order,
    _pattern_conv,
    _pattern_plan,
    _removed_rows,
)

LATENCY_VERSION = 3
"""Version of the table's measurement and file layout (part of the cache key)."""
LATENCY_BATCH_SIZE = 256
"""The batch every entry is timed at unless asked otherwise: large enough that the time is
spent in the layers rather than in per-call overhead (batch 1 is overhead-bound on CPU)."""
LATENCY_THREADS = 1
"""torch CPU threads while timing: one, so that entries do not depend on what else runs on
the machine's other cores and agree between processes of a sweep."""
LATENCY_REPEATS = 10
"""Timed runs per entry; the median is kept."""
MIN_PART = 8
"""``min_part`` of the materialised pattern layers that are timed (as in
:func:`autosculpt_env.materialize.materialize`)."""


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


def machine(threads: int | None = None) -> dict:
    """What decides a latency measurement besides the network: the processor
    (``platform.processor()`` and the CPU model from ``/proc/cpuinfo``), architecture, core
    count, torch version and the thread count (default: torch's current one)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "processor": platform.processor(),
        "cpu": cpu or platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else int(threads),
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
        key: the cache key (what the table was measured for; records name it).

    Derived, not stored (:meth:`with_consumers`): ``dead``, the time a producer's cut
    channels save in each consumer, and ``prediction``, the whole prediction as a
    :class:`~autosculpt_env.cost.CostTable` of seconds.
    """

    layers: list[str]
    action_names: list[str]
    latency: np.ndarray
    dense_latency: float
    fixed: float
    batch_size: int
    machine: dict
    key: str = ""

    def __post_init__(self) -> None:
        self.dead: dict[tuple[int, int], np.ndarray] = {}
        self.prediction = self._as_cost_table()

    def with_consumers(self, cost: CostTable) -> LatencyTable:
        """Attach the time a producer's cut channels save in its consumers (derived from the
        FLOPs table's dead-channel corrections, not stored: the entries decide it):
        ``dead[(p, c)][a, b] = latency[c, b] * cost.dead[(p, c)][a, b] / cost.flops[c, b]``.
        Returns the table itself."""
        dead = {}
        for (i, m), d in cost.dead.items():
            flops = cost.flops[m][None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(flops > 0, d / flops, 0.0)
            dead[(i, m)] = np.clip(frac, 0.0, 1.0) * self.latency[m][None, :]
        self.dead = dead
        self.prediction = self._as_cost_table()
        return self

    def _as_cost_table(self) -> CostTable:
        """The prediction has the FLOPs table's form (per-layer entries less per-pair
        corrections over the producer-consumer forest), so ``prediction`` is one: its exact
        sums and its dynamic program for the cheapest completion serve latency too."""
        return CostTable(
            layers=list(self.layers),
            action_names=list(self.action_names),
            flops=self.latency,
            params=np.where(np.isnan(self.latency), np.nan, 0.0),
            dead=self.dead,
            dense_flops=self.dense_latency,
            dense_params=0,
            fixed_flops=self.fixed,
            fixed_params=0.0,
        )

    def policy_latency(self, actions: Sequence[int]) -> float:
        """Predicted latency of a full policy (seconds per batch)."""
        return self.prediction.policy_flops(actions)

    def latency_reduction(self, actions: Sequence[int]) -> float:
        """``1 - policy_latency / dense_latency`` (negative where the policy is slower)."""
        return 1.0 - self.policy_latency(actions) / self.dense_latency

    def min_latency_from(self, decided: Sequence[int]) -> float:
        """The lowest predicted latency any completion of a partial policy reaches (exact,
        corrections included)."""
        return self.prediction.min_flops_from(decided)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["latency"] = [[None if np.isnan(v) else float(v) for v in row] for row in self.latency]
        return d

    @classmethod
    def from_dict(cls, d) -> LatencyTable:
        """A table from its JSON object, every field's type and the table's shape checked.

        Raises:
            ValueError: naming the first field that is missing, unknown or malformed.
        """
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict):
            raise ValueError(f"a JSON object expected, got {type(d).__name__}")
        if set(d) != set(names):
            raise ValueError(f"fields {sorted(d)}, expected {sorted(names)}")
        for key in ("layers", "action_names"):
            if not isinstance(d[key], list) or not all(isinstance(x, str) for x in d[key]):
                raise ValueError(f"{key} must be a list of names")
        rows = d["latency"]
        if not isinstance(rows, list) or not all(
            isinstance(row, list)
            and len(row) == len(d["action_names"])
            and all(v is None or _finite(v) for v in row)
            for row in rows
        ):
            raise ValueError("latency must be rows of numbers or null, one per action")
        for key in ("dense_latency", "fixed"):
            if not _finite(d[key]):
                raise ValueError(f"{key} must be a finite number, got {d[key]!r}")
        if isinstance(d["batch_size"], bool) or not isinstance(d["batch_size"], int):
            raise ValueError(f"batch_size must be an integer, got {d['batch_size']!r}")
        if not isinstance(d["machine"], dict) or not isinstance(d["key"], str):
            raise ValueError("machine must be an object and key a string")
        latency = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64
        ).reshape(len(rows), len(d["action_names"]))
        table = cls(**{**d, "latency": latency})
        if table.latency.shape != (len(table.layers), len(table.action_names)):
            raise ValueError("latency table shape does not match its layers and actions")
        return table


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
            keys = _part_keys(blocks, MIN_PART)
            _, perm = _part_order(keys)
            with torch.no_grad():
                out.weight.data = out.weight.data[perm]
                if out.bias is not None:
                    out.bias.data = out.bias.data[perm]
            out, _ = _pattern_conv(out, [keys[i] for i in perm.tolist()], m[perm], fold=True)
    return out.eval(), in_ch


def table_key(problem, batch_size: int, repeats: int, info: dict) -> str:
    """The cache key of a problem's latency table: a hash of every valid (layer, action)
    mask, the layers' shapes and hyper-parameters, the input shape, the batch size, repeats,
    the version and :func:`machine`."""
    h = hashlib.sha256()
    layers = []
    for i, layer in enumerate(problem.layers):
        module = layer.module
        layers.append(
            {
                "name": layer.name,
                "module": repr(module),
                "weight": list(module.weight.shape),
                "in_shape": list(problem.graph.node(layer.name).in_shape or ()),
            }
        )
        for a in np.flatnonzero(problem.valid[i]):
            mask = problem.mask(i, int(a)).detach().cpu().numpy().astype(bool)
            h.update(f"{i}:{int(a)}:".encode())
            h.update(np.packbits(mask).tobytes())
    meta = {
        "version": LATENCY_VERSION,
        "actions": problem.catalog.action_names,
        "layers": layers,
        "input": list(problem.example_inputs.shape[1:]),
        "model": repr(problem.model),
        "batch_size": int(batch_size),
        "repeats": int(repeats),
        "min_part": MIN_PART,
        "machine": info,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _check_loaded(table: LatencyTable, problem, batch_size: int, info: dict, key: str) -> None:
    """Why a cached table is not the one asked for, as a ``ValueError``."""
    if table.key != key:
        raise ValueError(f"its key is {table.key!r}, the file name says {key!r}")
    if table.layers != [layer.name for layer in problem.layers]:
        raise ValueError("its layers are not the network's")
    if table.action_names != problem.catalog.action_names:
        raise ValueError("its actions are not the catalog's")
    if table.batch_size != batch_size or table.machine != info:
        raise ValueError("it was measured at another batch size or on another machine")
    if not np.array_equal(np.isnan(table.latency), ~problem.valid):
        raise ValueError("its entries are not exactly the valid (layer, action) pairs")
    if (table.latency[problem.valid] < 0).any() or not table.dense_latency > 0:
        raise ValueError("it holds negative or zero times")
    dense = float(table.latency[:, problem.dense_action].sum())
    if not math.isclose(table.fixed, table.dense_latency - dense, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError("fixed is not the dense latency minus the layers' dense entries")


_MEMO: dict[str, LatencyTable] = {}
"""Tables this process measured or read, by cache file (envs of one configuration share one)."""


def latency_table(
    problem,
    batch_size: int = LATENCY_BATCH_SIZE,
    repeats: int = LATENCY_REPEATS,
    threads: int = LATENCY_THREADS,
    cache: bool = True,
    progress: bool | None = None,
) -> LatencyTable:
    """Measure (or load from the cache) the latency table of a pruning problem.

    Timing sets torch to ``threads`` threads and restores the caller's count afterwards. A
    table measured in this process, or found in the cache, is not measured again.

    Args:
        problem: a :class:`~autosculpt_env.problem.PruningProblem` (``env.unwrapped.problem``).
        batch_size: the batch every entry is timed at.
        repeats: timed runs per entry (the median is kept).
        threads: torch CPU threads while timing.
        cache: read and write ``$AUTOSCULPT_CACHE/latency/<key>.json``.
        progress: a progress bar over the layers while timing (default: on a terminal).

    Raises:
        ValueError: ``batch_size``, ``repeats`` or ``threads`` is not a positive integer.
    """
    for name, value in (("batch_size", batch_size), ("repeats", repeats), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    info = machine(threads)
    key = table_key(problem, batch_size, repeats, info)
    path = zoo.cache_dir() / "latency" / f"{key}.json"
    if cache and str(path) in _MEMO:
        return _MEMO[str(path)]
    if cache and path.exists():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            _check_loaded(table, problem, batch_size, info, key)
            table.with_consumers(problem.cost)
            _MEMO[str(path)] = table
            return table
        except (ValueError, OSError, UnicodeDecodeError, RecursionError) as e:
            warnings.warn(
                f"latency table {path} is damaged ({' '.join(str(e).split())}); measuring it "
                "again and replacing the file",
                stacklevel=2,
            )
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        table = _measure(problem, batch_size, repeats, progress)
    finally:
        torch.set_num_threads(caller_threads)
    table.machine, table.key = info, key
    table.with_consumers(problem.cost)
    if cache:
        from .records import atomic_write_text

        atomic_write_text(path, json.dumps(table.to_dict()) + "\n")
        _MEMO[str(path)] = table
    return table


def _measure(problem, batch_size: int, repeats: int, progress: bool | None) -> LatencyTable:
    from tqdm.auto import tqdm

    graph = problem.graph
    shape = problem.example_inputs.shape[1:]
    dense = median_latency(problem.model, torch.randn(batch_size, *shape), repeats)
    table = np.full((problem.num_layers, problem.num_actions), np.nan)
    bar = tqdm(
        problem.layers,
        desc=f"latency table (batch {batch_size})",
        unit="layer",
        disable=None if progress is None else not progress,
    )
    for i, layer in enumerate(bar):
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
    return LatencyTable(
        layers=[layer.name for layer in problem.layers],
        action_names=problem.catalog.action_names,
        latency=table,
        dense_latency=dense,
        fixed=fixed,
        batch_size=batch_size,
        machine={},
    )


SPEEDUP_FIELDS = (
    "speedup",
    "dense_s",
    "materialised_s",
    "batch_size",
    "threads",
    "repeats",
    "machine",
    "load_average",
)
"""What :func:`measured_speedup` returns (a leaderboard row's ``speedup`` object)."""


def measured_speedup(
    env,
    policy: Sequence[int] | Sequence[str],
    batch_size: int = LATENCY_BATCH_SIZE,
    threads: int = LATENCY_THREADS,
    repeats: int = LATENCY_REPEATS,
) -> dict:
    """The measured speedup of a policy's materialised network over the dense network.

    Both run end to end in torch on the CPU, at ``threads`` threads (the caller's count is
    restored) and batch ``batch_size``, median of ``repeats`` runs each. A wall-clock
    measurement: it depends on the machine and on what else runs on it, so it comes with its
    conditions (:data:`SPEEDUP_FIELDS`: the machine, and the 1-minute load average when it
    was taken).

    Raises:
        MaterializeError: the network cannot be materialised.
    """
    from .materialize import materialize_policy

    base = env.unwrapped
    m = materialize_policy(env, policy)
    shape = base.problem.example_inputs.shape[1:]
    x = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0))
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = median_latency(base.problem.model, x, repeats)
        materialised = median_latency(m.model, x, repeats)
    finally:
        torch.set_num_threads(caller)
    return {
        "speedup": dense / materialised,
        "dense_s": dense,
        "materialised_s": materialised,
        "batch_size": int(batch_size),
        "threads": int(threads),
        "repeats": int(repeats),
        "machine": machine(threads),
        "load_average": round(os.getloadavg()[0], 2),
    }


def speedup_problems(value) -> list[str]:
    """What is wrong with a :func:`measured_speedup` object read from a file (empty: nothing).
    Its numbers cannot be measured again elsewhere; they must be whole and agree with each
    other."""
    if not isinstance(value, dict) or set(value) != set(SPEEDUP_FIELDS):
        return [f"speedup must be an object with {list(SPEEDUP_FIELDS)}"]
    errors = []
    for key in ("speedup", "dense_s", "materialised_s", "load_average"):
        v = value[key]
        if not _finite(v) or v < 0 or (v == 0 and key != "load_average"):
            errors.append(f"speedup.{key} must be a positive number, got {v!r}")
    for key in ("batch_size", "threads", "repeats"):
        v = value[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            errors.append(f"speedup.{key} must be an integer >= 1, got {v!r}")
    if not isinstance(value["machine"], dict):
        errors.append("speedup.machine must be an object")
    if not errors and not math.isclose(
        value["speedup"], value["dense_s"] / value["materialised_s"], rel_tol=1e-9
    ):
        errors.append(
            f"speedup.speedup {value['speedup']} != dense_s / materialised_s "
            f"{value['dense_s'] / value['materialised_s']}"
        )
    return errors
