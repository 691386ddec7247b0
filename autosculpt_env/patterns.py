"""Pattern catalogs: named pruning actions, each a deterministic rule from weights to a mask.

A :class:`Catalog` is data. Each :class:`Action` names a rule ``rule(weight, kind,
scores=None) -> keep_mask`` (a bool tensor of the weight's shape, ``True`` = kept), the layer
kinds it applies to (:data:`LAYER_KINDS`), its nominal sparsity (fraction of the layer's
weights removed) and the inference engines that run the result natively. Every catalog has
one dense action (sparsity 0, valid for every kind); kinds a catalog does not handle get
only that action.

Conventions shared by all rules:

* **Ranking.** Output channels (filters, neurons) are ranked by ``scores`` when given (one
  importance value per output channel, e.g. the summed L2 norms of a coupling group, so
  coupled layers drop nested subsets of the same channels), else by the L2 norm of the
  channel's weights. Lower ranks are pruned first; ties go to the lower index first (a
  stable sort), so every mask is a deterministic function of the weights.
* **Counts** are rounded half up: level ``r`` on ``n`` units removes ``floor(r * n + 0.5)``
  of them, so the realised sparsity is within half a unit of the nominal one.
* **Vectorised**: no Python loop over filters or kernels; at most a loop over the handful
  of patterns of a library.

Catalogs (:data:`CATALOGS`, picked with :func:`get_catalog`):

* ``autosculpt`` (default): ``level_0.0 ... level_0.9``. A 3x3 filter (``conv3x3``,
  ``depthwise``) takes one of the paper's six row/column keep-masks
  (:data:`AUTOSCULPT_PATTERNS`) on all its input kernels; the level fixes how much is
  removed and :func:`autosculpt_assignment` chooses which filter gets which pattern. Other
  kinds lose their lowest-ranked output rows.
* ``patdnn``: PatDNN's 4-entry kernel patterns from a per-layer library of 8, whole-kernel
  connectivity pruning, and both combined.
* ``nm``: ``2:4``, ``1:4``, ``4:8`` fine-grained structured sparsity along the input
  dimension of linear, attention-projection and 1x1 layers.
* ``structured``: ``level_0.0 ... level_0.9`` of whole output channels; attention heads for
  attention projections.

A new catalog is one :func:`register_catalog` call: envs, records, ``autosculpt info`` and
the README's catalog table read it from :data:`CATALOGS`.

Attention head pruning needs the module's head structure, which the weight does not carry:
:meth:`Catalog.mask` and :meth:`Catalog.valid_for` take ``num_heads``, ``head_axis`` (0: the
heads are blocks of output rows, as in ``q``, ``k``, ``v``; 1: blocks of input columns, as in
the output projection) and ``head_parts`` (3 for a fused ``qkv`` projection, whose q, k and v
row blocks lose the same heads). ``NetGraph.heads(layer)`` gives all three as :class:`Heads`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

LAYER_KINDS: tuple[str, ...] = ("conv3x3", "conv", "pointwise", "depthwise", "linear", "attention")
LEVELS: tuple[float, ...] = tuple(i / 10 for i in range(10))
ATTENTION_ROLES: dict[str, str] = {
    "q": "q",
    "k": "k",
    "v": "v",
    "proj": "out",
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "out_proj": "out",
    "qkv": "qkv",
}
"""``Linear`` children of an attention module (one with ``num_heads`` and ``head_dim``
attributes) by name, and their role: ``q``, ``k``, ``v`` (each head a block of output rows),
``qkv`` (a fused projection: the rows are ``[q; k; v]``, each split into heads, the timm
style) and ``out`` (each head a block of input columns). The names cover our ViT
(``q``/``k``/``v``/``proj``), timm (``qkv``/``proj``), Hugging Face and
:class:`autosculpt_env.traceable.MultiheadAttention` (``q_proj``/``k_proj``/``v_proj``/
``out_proj``)."""


class Heads(NamedTuple):
    """The head structure of an attention projection's weight (``NetGraph.heads``).

    Attributes:
        num_heads: heads of the attention module.
        axis: the weight axis split into heads: 0 (output rows: q, k, v, qkv) or 1 (input
            columns: the output projection).
        parts: blocks along ``axis`` that are each split into the same heads: 3 for a fused
            qkv projection, else 1.
    """

    num_heads: int
    axis: int
    parts: int = 1

    def mask_kwargs(self) -> dict:
        """Keyword arguments of :meth:`Catalog.mask` and :meth:`Catalog.valid_for`."""
        kw = {"num_heads": self.num_heads, "head_axis": self.axis}
        return kw if self.parts == 1 else {**kw, "head_parts": self.parts}


def attention_role(name: str, parent: nn.Module | None) -> str | None:
    """The :data:`ATTENTION_ROLES` role of the layer ``name`` held by ``parent``, or ``None``
    (not an attention projection)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in ATTENTION_ROLES or parent is None:
        return None
    if not (hasattr(parent, "num_heads") and hasattr(parent, "head_dim")):
        return None
    return ATTENTION_ROLES[leaf]


def attention_heads(name: str, parent: nn.Module | None) -> Heads | None:
    """The :class:`Heads` of an attention projection, or ``None``."""
    role = attention_role(name, parent)
    if role is None:
        return None
    return Heads(int(parent.num_heads), 1 if role == "out" else 0, 3 if role == "qkv" else 1)


def layer_kind(module: nn.Module, name: str = "", parent: nn.Module | None = None) -> str:
    """The kind of a prunable layer, which decides the actions that apply to it.

    ``Conv2d``: 1x1 with ``groups == 1`` is ``"pointwise"``; 3x3 with ``groups == 1`` is
    ``"conv3x3"``; 3x3 with ``groups == in_channels == out_channels`` is ``"depthwise"``;
    anything else (a ViT patch embedding, grouped convolutions, 5x5 kernels) is ``"conv"``.
    ``Linear``: ``"attention"`` for the projections of an attention module
    (:func:`attention_role`), else ``"linear"``.

    Args:
        module: the layer.
        name: its qualified name (the last component decides attention projections).
        parent: the module holding it; without it a ``Linear`` is ``"linear"``.

    Raises:
        TypeError: ``module`` is neither ``Conv2d`` nor ``Linear``.
    """
    if isinstance(module, nn.Conv2d):
        kernel = tuple(module.kernel_size)
        if module.groups == 1:
            if kernel == (1, 1):
                return "pointwise"
            if kernel == (3, 3):
                return "conv3x3"
        elif module.groups == module.in_channels == module.out_channels and kernel == (3, 3):
            return "depthwise"
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear" if attention_role(name, parent) is None else "attention"
    raise TypeError(f"{name or type(module).__name__} is not a Conv2d or Linear layer")


Rule = Callable[..., torch.Tensor]
Fits = Callable[[tuple[int, ...], str, "int | None", int], bool]


@dataclass(frozen=True)
class Action:
    """One pruning action of a catalog.

    Attributes:
        name: e.g. ``"level_0.3"``, ``"pattern+conn_0.2"``, ``"2:4"``.
        applies_to: the layer kinds it is defined for.
        sparsity: nominal fraction of the layer's weights removed.
        engines: inference engines that run the pruned layer natively.
        rule: ``rule(weight, kind, scores=None) -> bool keep-mask``; rules for attention
            layers also receive ``num_heads`` and ``head_axis`` keywords.
        description: one line for humans.
        fits: optional ``fits(weight_shape, kind, num_heads, head_axis) -> bool`` that
            refines ``applies_to`` by shape (e.g. N:M needs the input size divisible by M).
    """

    name: str
    applies_to: frozenset[str]
    sparsity: float
    engines: tuple[str, ...]
    rule: Rule
    description: str = ""
    fits: Fits | None = None


@dataclass(frozen=True)
class Catalog:
    """A named list of actions; the action index is the environment's discrete action.

    Attributes:
        name: catalog name; its identity in episode records (see :func:`register_catalog`).
        actions: the actions, in action-index order.
        description: one paragraph for humans.
        group_ranking: rank a layer's output channels by the summed L2 norms of its coupling
            group (Torch-Pruning's group importance) instead of its own, so coupled layers
            (the convolutions meeting at a residual add, q/k/v of one attention module)
            remove nested subsets of the same channels or heads. Useful where actions
            remove whole channels.
    """

    name: str
    actions: tuple[Action, ...]
    description: str = ""
    group_ranking: bool = False

    def __post_init__(self) -> None:
        names = [a.name for a in self.actions]
        if len(set(names)) != len(names):
            raise ValueError(f"catalog {self.name!r} has duplicate action names: {names}")
        if not any(a.sparsity == 0.0 for a in self.actions):
            raise ValueError(f"catalog {self.name!r} needs a dense action (sparsity 0.0)")

    @property
    def action_names(self) -> list[str]:
        """Action names in index order."""
        return [a.name for a in self.actions]

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def layer_kinds(self) -> list[str]:
        """The layer kinds some non-dense action applies to, in :data:`LAYER_KINDS` order."""
        dense = self.dense_action()
        used = {k for i, a in enumerate(self.actions) if i != dense for k in a.applies_to}
        return [k for k in LAYER_KINDS if k in used]

    @property
    def engines(self) -> list[str]:
        """Inference engines that run some non-dense action natively, first seen first."""
        dense = self.dense_action()
        found = [e for i, a in enumerate(self.actions) if i != dense for e in a.engines]
        return list(dict.fromkeys(found))

    def signature(self) -> tuple:
        """What identifies the catalog's content in a record: name, and per action its name,
        sparsity and layer kinds (rules are code and are not compared)."""
        return (
            self.name,
            tuple((a.name, a.sparsity, tuple(sorted(a.applies_to))) for a in self.actions),
            self.group_ranking,
        )

    def dense_action(self) -> int:
        """Index of the action that keeps every weight (the first with sparsity 0)."""
        return next(i for i, a in enumerate(self.actions) if a.sparsity == 0.0)

    def valid(self, kind: str) -> np.ndarray:
        """Bool ``(P,)``: the actions defined for a layer kind (the dense one always)."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; known: {', '.join(LAYER_KINDS)}")
        ok = np.array([kind in a.applies_to for a in self.actions], dtype=bool)
        ok[self.dense_action()] = True
        return ok

    def valid_for(
        self,
        weight_shape: tuple[int, ...] | torch.Size,
        kind: str,
        num_heads: int | None = None,
        head_axis: int = 0,
        head_parts: int = 1,
    ) -> np.ndarray:
        """Bool ``(P,)``: :meth:`valid` refined by the weight's shape (and head structure)."""
        ok = self.valid(kind)
        shape = tuple(int(s) for s in weight_shape)
        for i, a in enumerate(self.actions):
            if ok[i] and a.fits is not None and i != self.dense_action():
                parts = _head_parts_kwarg(a.fits, head_parts)
                ok[i] = bool(a.fits(shape, kind, num_heads, head_axis, **parts))
        return ok

    def mask(
        self,
        action: int,
        weight: torch.Tensor,
        kind: str,
        scores: torch.Tensor | None = None,
        num_heads: int | None = None,
        head_axis: int = 0,
        head_parts: int = 1,
    ) -> torch.Tensor:
        """The keep-mask of ``action`` on a layer's weight.

        Args:
            action: action index.
            weight: the layer's weight.
            kind: the layer's kind (:func:`layer_kind`).
            scores: optional per-output-channel importance (length ``weight.shape[0]``)
                that replaces the weight's own channel norms for ranking; for head pruning,
                one value per head or per channel along ``head_axis``.
            num_heads: attention heads of the layer (head pruning only).
            head_axis: weight axis split into heads (0 for q/k/v, 1 for the output
                projection).
            head_parts: blocks along ``head_axis`` each split into the same heads (3 for a
                fused qkv projection; passed, when not 1, to rules that take it).
                :class:`Heads` gives all three.

        Returns:
            Bool tensor of ``weight.shape``, on ``weight.device``; ``True`` = kept.

        Raises:
            ValueError: the action index is out of range, or the action is not valid for
                this kind and shape.
        """
        if not 0 <= int(action) < len(self.actions):
            raise ValueError(
                f"action {action} is out of range for catalog {self.name!r} "
                f"({len(self.actions)} actions)"
            )
        act = self.actions[int(action)]
        if int(action) == self.dense_action():
            return torch.ones_like(weight, dtype=torch.bool)
        fits = self.valid_for(weight.shape, kind, num_heads, head_axis, head_parts)
        if not fits[int(action)]:
            valid = [n for n, ok in zip(self.action_names, fits) if ok]
            raise ValueError(
                f"action {act.name!r} of catalog {self.name!r} is not valid for a {kind} layer "
                f"with weight shape {tuple(weight.shape)}"
                + (f" and {num_heads} heads" if num_heads is not None else "")
                + f"; valid: {valid}"
            )
        extra = {} if num_heads is None else {"num_heads": num_heads, "head_axis": head_axis}
        extra.update(_head_parts_kwarg(act.rule, head_parts))
        with torch.no_grad():
            keep = act.rule(weight.detach(), kind, scores=scores, **extra)
        where = f"the rule of action {act.name!r} (catalog {self.name!r})"
        if not isinstance(keep, torch.Tensor):
            raise ValueError(
                f"{where} returned {type(keep).__name__}; a rule must return a torch.bool "
                f"keep-mask of the weight's shape {tuple(weight.shape)}"
            )
        if keep.dtype != torch.bool:
            # a float 0.5 would cast to True: an action that declares sparsity and prunes nothing
            raise ValueError(
                f"{where} returned a {keep.dtype} tensor; a rule must return a torch.bool "
                "keep-mask (True = kept), e.g. `scores > threshold`"
            )
        if keep.shape != weight.shape:
            raise ValueError(
                f"{where} returned shape {tuple(keep.shape)}; the weight's shape is "
                f"{tuple(weight.shape)}"
            )
        return keep.to(device=weight.device)


# ---------------------------------------------------------------------------------------
# Shared helpers


def _head_parts_kwarg(fn: Callable, head_parts: int) -> dict:
    """``{"head_parts": n}`` for a rule or ``fits`` that takes it (by name or ``**kwargs``),
    when ``n != 1``; rules written without it see a fused projection as plain heads."""
    if head_parts == 1:
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    takes = any(p.name == "head_parts" or p.kind is p.VAR_KEYWORD for p in params)
    return {"head_parts": head_parts} if takes else {}


def _round(x: float) -> int:
    """Round half up (the epsilon absorbs float noise such as 0.7 * 5 = 3.4999...)."""
    return math.floor(x + 0.5 + 1e-9)


def channel_l2_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's weights, float64 ``(O,)``."""
    return weight.detach().double().flatten(1).norm(dim=1)


def _scores(weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    if scores is None:
        return channel_l2_norms(weight)
    s = torch.as_tensor(scores, device=weight.device).detach().double().flatten()
    if s.numel() != weight.shape[0]:
        raise ValueError(
            f"scores must hold one value per output channel ({weight.shape[0]}), got {s.numel()}"
        )
    return s


def _lowest_first(values: torch.Tensor) -> torch.Tensor:
    """Indices ordering ``values`` ascending; ties keep index order."""
    return torch.sort(values, stable=True).indices


def _remove_rows(weight: torch.Tensor, level: float, scores: torch.Tensor | None) -> torch.Tensor:
    """Remove the lowest-ranked ``round(level * O)`` output channels."""
    rows = weight.shape[0]
    removed = _lowest_first(_scores(weight, scores))[: _round(level * rows)]
    keep_rows = torch.ones(rows, dtype=torch.bool, device=weight.device)
    keep_rows[removed] = False
    return keep_rows.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


def _expect_3x3(weight: torch.Tensor, kind: str) -> None:
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"a {kind} rule needs a [O, I, 3, 3] weight, got {tuple(weight.shape)}")


def _is_3x3(shape: tuple[int, ...], kind: str, num_heads: int | None, head_axis: int) -> bool:
    return len(shape) == 4 and shape[2:] == (3, 3)


# ---------------------------------------------------------------------------------------
# AutoSculpt row/column patterns


def _autosculpt_patterns() -> torch.Tensor:
    p = torch.zeros(6, 3, 3, dtype=torch.bool)
    p[1, :, 2] = True  # keep right column
    p[2, 2, :] = True  # keep bottom row
    p[3, :, 1:] = True  # keep right two columns
    p[4, 1:, :] = True  # keep bottom two rows
    p[5] = True  # keep all
    return p


AUTOSCULPT_PATTERNS: torch.Tensor = _autosculpt_patterns()
"""Bool ``(6, 3, 3)``: remove all, keep right column, keep bottom row, keep right two columns,
keep bottom two rows, keep all."""
AUTOSCULPT_THIRDS_REMOVED: tuple[int, ...] = (3, 2, 2, 1, 1, 0)
"""Thirds of a 3x3 kernel each pattern removes."""

# Largest (n3 x n2) block of candidate assignments scored at once (bounds memory).
_GRID_CHUNK = 1 << 22


def autosculpt_assignment(
    weight: torch.Tensor, level: float, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Assign one of :data:`AUTOSCULPT_PATTERNS` to every filter of a 3x3 layer.

    Each filter ``f`` gets a removal amount ``t_f`` in thirds of a kernel (0: keep all,
    1: keep two columns or rows, 2: keep one column or row, 3: remove the filter). The level
    asks for ``T = round(level * 3 * F)`` thirds over the ``F`` filters, reached exactly.

    Rule: lower-ranked filters (by ``scores``, else L2 norm; ties by index) take equally or
    more aggressive patterns, i.e. ``t`` is non-increasing in rank. Such an assignment is
    fixed by three counts: the ``n3`` lowest-ranked filters are removed, the next ``n2``
    keep one column or row, the next ``n1 = T - 3 n3 - 2 n2`` keep two, the rest stay
    dense. For a removal amount the orientation (columns vs rows) that keeps more energy is
    taken per filter (columns on a tie), so the energy a filter loses at each ``t`` is known
    up front, and with prefix sums over the ranked filters the loss of every ``(n3, n2)``
    is read off in O(1). All feasible ``(n3, n2)`` pairs are scored at once as a tensor and
    the one losing the least energy wins (first in ``(n3, n2)`` order on a tie, i.e. the
    fewest whole filters removed). This is the exact optimum over all monotone assignments,
    in O(F^2) vectorised work; plain filter pruning (``n2 = n1 = 0``) is one of the
    candidates, so the energy kept is never below it at the same sparsity.

    Args:
        weight: ``[F, C, 3, 3]`` weight.
        level: fraction of the layer's weights to remove, in ``[0, 1]``.
        scores: optional ``(F,)`` ranking that replaces the filters' own L2 norms.

    Returns:
        Long ``(F,)``: the pattern index of each filter.
    """
    _expect_3x3(weight, "conv3x3")
    n_filters = weight.shape[0]
    device = weight.device
    patterns = AUTOSCULPT_PATTERNS.to(device=device, dtype=torch.float64)
    energy_at = weight.detach().double().pow(2).sum(1)  # (F, 3, 3)
    kept = torch.einsum("fhw,phw->fp", energy_at, patterns)  # (F, 6) energy kept per pattern
    two_thirds_col = kept[:, 3] >= kept[:, 4]  # removing 1/3: two columns vs two rows
    one_third_col = kept[:, 1] >= kept[:, 2]  # removing 2/3: one column vs one row
    kept_by_t = torch.stack(
        [
            kept[:, 5],
            torch.maximum(kept[:, 3], kept[:, 4]),
            torch.maximum(kept[:, 1], kept[:, 2]),
            torch.zeros_like(kept[:, 0]),
        ],
        dim=1,
    )
    loss = kept[:, 5:6] - kept_by_t  # (F, 4) energy lost at t = 0..3
    order = _lowest_first(_scores(weight, scores))
    prefix = torch.cat([loss.new_zeros(1, 4), loss[order].cumsum(0)])  # (F + 1, 4)

    total = _round(level * 3 * n_filters)
    n2 = torch.arange(total // 2 + 1, device=device)
    best: tuple[float, int, int] | None = None
    rows_per_chunk = max(1, _GRID_CHUNK // len(n2))
    for start in range(0, total // 3 + 1, rows_per_chunk):
        n3 = torch.arange(start, min(total // 3 + 1, start + rows_per_chunk), device=device)
        a = n3[:, None].expand(-1, len(n2))
        n1 = total - 3 * a - 2 * n2
        b = a + n2
        c = b + n1
        feasible = (n1 >= 0) & (c <= n_filters)
        a_, b_, c_ = (x.clamp(0, n_filters) for x in (a, b, c))
        cost = prefix[a_, 3] + prefix[b_, 2] - prefix[a_, 2] + prefix[c_, 1] - prefix[b_, 1]
        cost = torch.where(feasible, cost, torch.full_like(cost, math.inf))
        flat = int(torch.argmin(cost))
        value = float(cost.flatten()[flat])
        if best is None or value < best[0]:
            best = (value, int(n3[flat // len(n2)]), int(n2[flat % len(n2)]))
    assert best is not None and math.isfinite(best[0])
    _, k3, k2 = best
    k1 = total - 3 * k3 - 2 * k2
    t_ranked = torch.zeros(n_filters, dtype=torch.long, device=device)
    t_ranked[:k3] = 3
    t_ranked[k3 : k3 + k2] = 2
    t_ranked[k3 + k2 : k3 + k2 + k1] = 1
    t = torch.empty_like(t_ranked)
    t[order] = t_ranked
    pattern = torch.full_like(t, 5)
    pattern = torch.where(t == 1, torch.where(two_thirds_col, 3, 4), pattern)
    pattern = torch.where(t == 2, torch.where(one_third_col, 1, 2), pattern)
    return torch.where(t == 3, 0, pattern)


def _autosculpt_rule(
    weight: torch.Tensor, kind: str, scores: torch.Tensor | None = None, *, level: float, **_
) -> torch.Tensor:
    if kind in ("conv3x3", "depthwise"):
        pattern = autosculpt_assignment(weight, level, scores)
        masks = AUTOSCULPT_PATTERNS.to(weight.device)[pattern]  # (F, 3, 3)
        return masks[:, None].expand_as(weight).clone()
    return _remove_rows(weight, level, scores)


def autosculpt_catalog() -> Catalog:
    """The paper's catalog: 10 pruning levels realised with row/column patterns."""
    kinds = frozenset(LAYER_KINDS)
    actions = tuple(
        Action(
            name=f"level_{r:.1f}",
            applies_to=kinds,
            sparsity=r,
            engines=("TVM", "TensorRT", "ONNX Runtime"),
            rule=partial(_autosculpt_rule, level=r),
            description=(
                f"remove {r:.0%} of the weights: 3x3 filters take row/column patterns "
                "(smaller dense kernels), other layers lose their weakest output channels"
            ),
        )
        for r in LEVELS
    )
    return Catalog(
        "autosculpt",
        actions,
        "AutoSculpt (arXiv 2412.18091): per-layer pruning level, six row/column 3x3 "
        "patterns assigned to keep the most weight energy; output-channel removal elsewhere.",
    )


# ---------------------------------------------------------------------------------------
# PatDNN kernel patterns and connectivity pruning


def _patdnn_candidates() -> torch.Tensor:
    others = [i for i in range(9) if i != 4]
    rows = []
    for combo in itertools.combinations(others, 3):
        row = torch.zeros(9, dtype=torch.bool)
        row[[4, *combo]] = True
        rows.append(row)
    return torch.stack(rows)


PATDNN_CANDIDATES: torch.Tensor = _patdnn_candidates()
"""Bool ``(56, 9)``: every 4-entry 3x3 pattern containing the centre, lexicographic order."""
PATDNN_LIBRARY_SIZE = 8


def patdnn_library(weight: torch.Tensor, size: int = PATDNN_LIBRARY_SIZE) -> torch.Tensor:
    """PatDNN's pattern extraction for one layer.

    Each kernel's best-fitting candidate is the one of :data:`PATDNN_CANDIDATES` keeping the
    most ``|w|^2`` (lowest candidate index on a tie); the library is the ``size`` most
    frequent best fits (ties by candidate index).

    Returns:
        Long ``(size,)``: candidate indices, most frequent first.
    """
    _expect_3x3(weight, "pattern")
    return _library(_candidate_energy(weight), size)


def _library(energy: torch.Tensor, size: int) -> torch.Tensor:
    counts = torch.bincount(energy.argmax(1), minlength=len(PATDNN_CANDIDATES))
    return torch.sort(counts, descending=True, stable=True).indices[:size]


def _candidate_energy(weight: torch.Tensor) -> torch.Tensor:
    squares = weight.detach().double().pow(2).reshape(-1, 9)
    return squares @ PATDNN_CANDIDATES.to(weight.device, torch.float64).T  # (N, 56)


def _patdnn_pattern(weight: torch.Tensor) -> torch.Tensor:
    """Each kernel takes its best-fitting library pattern; 4 of 9 entries kept."""
    energy = _candidate_energy(weight)
    library = _library(energy, PATDNN_LIBRARY_SIZE)
    chosen = library[energy[:, library].argmax(1)]
    return PATDNN_CANDIDATES.to(weight.device)[chosen].reshape(weight.shape)


def _remove_kernels(weight: torch.Tensor, keep: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove the ``round(ratio * O * I)`` kernels with the least kept energy."""
    energy = (weight.detach().double().pow(2) * keep).flatten(2).sum(2).flatten()
    removed = _lowest_first(energy)[: _round(ratio * energy.numel())]
    kernels = torch.ones(energy.numel(), dtype=torch.bool, device=weight.device)
    kernels[removed] = False
    return keep & kernels.reshape(weight.shape[:2] + (1, 1))


def _patdnn_rule(
    weight: torch.Tensor,
    kind: str,
    scores: torch.Tensor | None = None,
    *,
    pattern: bool,
    connectivity: float,
    **_,
) -> torch.Tensor:
    if weight.dim() != 4:
        raise ValueError(f"PatDNN rules need a conv weight, got {tuple(weight.shape)}")
    keep = torch.ones_like(weight, dtype=torch.bool)
    if pattern:
        _expect_3x3(weight, kind)
        keep = _patdnn_pattern(weight)
    if connectivity > 0:
        keep = _remove_kernels(weight, keep, connectivity)
    return keep


_ALL_ENGINES = ("PyTorch", "ONNX Runtime", "TensorRT", "TVM")


def _keep_all(weight: torch.Tensor, kind: str, scores: torch.Tensor | None = None, **_):
    return torch.ones_like(weight, dtype=torch.bool)


def _dense_action() -> Action:
    return Action(
        "dense", frozenset(LAYER_KINDS), 0.0, _ALL_ENGINES, _keep_all, "keep every weight"
    )


def patdnn_catalog() -> Catalog:
    """PatDNN (Niu et al., ASPLOS 2020): kernel patterns plus connectivity pruning.

    ``pattern`` applies to 3x3 kernels (``conv3x3``, ``depthwise``). Connectivity pruning
    removes whole kernels ``weight[o, i]`` (the lowest-energy ones across the layer) and
    applies to every convolution with a spatial kernel (``conv3x3``, ``depthwise``,
    ``conv``), not to 1x1 or linear layers, where a "kernel" is a single weight and kernel
    removal would be unstructured sparsity that PatDNN's compiler does not exploit. In
    ``pattern+conn_r`` the kernels are ranked by the energy their pattern keeps.
    """
    pattern_kinds = frozenset({"conv3x3", "depthwise"})
    conn_kinds = frozenset({"conv3x3", "depthwise", "conv"})
    engines = ("PatDNN compiler",)
    actions = [
        _dense_action(),
        Action(
            "pattern",
            pattern_kinds,
            5 / 9,
            engines,
            partial(_patdnn_rule, pattern=True, connectivity=0.0),
            "each 3x3 kernel keeps its best-fitting 4-entry pattern from the layer's library of 8",
            _is_3x3,
        ),
    ]
    for r in (0.2, 0.4, 0.6):
        actions.append(
            Action(
                f"connectivity_{r:.1f}",
                conn_kinds,
                r,
                engines,
                partial(_patdnn_rule, pattern=False, connectivity=r),
                f"remove the {r:.0%} lowest-L2 kernels of the layer",
            )
        )
    for r in (0.2, 0.4, 0.6):
        actions.append(
            Action(
                f"pattern+conn_{r:.1f}",
                pattern_kinds,
                1 - (1 - r) * 4 / 9,
                engines,
                partial(_patdnn_rule, pattern=True, connectivity=r),
                f"4-entry patterns, then remove the {r:.0%} weakest kernels",
                _is_3x3,
            )
        )
    return Catalog(
        "patdnn",
        tuple(actions),
        "PatDNN: 4-entry kernel patterns from a per-layer library of 8 most frequent best "
        "fits, whole-kernel connectivity pruning, and both.",
    )


# ---------------------------------------------------------------------------------------
# N:M sparsity

NM_KINDS = frozenset({"linear", "attention", "pointwise"})


def _in_dim(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:]))


def _nm_fits(
    shape: tuple[int, ...], kind: str, num_heads: int | None, head_axis: int, *, m: int
) -> bool:
    return _in_dim(shape) % m == 0


def _nm_rule(
    weight: torch.Tensor, kind: str, scores: torch.Tensor | None = None, *, n: int, m: int, **_
) -> torch.Tensor:
    rows, cols = weight.shape[0], _in_dim(tuple(weight.shape))
    if cols % m:
        raise ValueError(f"{n}:{m} needs an input size divisible by {m}, got {cols}")
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)


def nm_catalog() -> Catalog:
    """N:M sparsity: in every group of M consecutive input weights keep the N largest |w|."""
    actions = [_dense_action()]
    for n, m in ((2, 4), (1, 4), (4, 8)):
        actions.append(
            Action(
                f"{n}:{m}",
                NM_KINDS,
                1 - n / m,
                ("cuSPARSELt", "TensorRT"),
                partial(_nm_rule, n=n, m=m),
                f"keep the {n} largest of every {m} consecutive input weights",
                partial(_nm_fits, m=m),
            )
        )
    return Catalog(
        "nm",
        tuple(actions),
        "N:M fine-grained structured sparsity (Ampere sparse tensor cores) for linear, "
        "attention-projection and 1x1 layers.",
    )


# ---------------------------------------------------------------------------------------
# Structured (channel / head) pruning


def _heads_fit(
    shape: tuple[int, ...],
    kind: str,
    num_heads: int | None,
    head_axis: int,
    head_parts: int = 1,
) -> bool:
    if kind != "attention":
        return True
    return (
        num_heads is not None
        and num_heads > 0
        and head_axis in (0, 1)
        and len(shape) == 2
        and shape[head_axis] % (num_heads * head_parts) == 0
    )


def _remove_heads(
    weight: torch.Tensor,
    level: float,
    num_heads: int,
    head_axis: int,
    scores: torch.Tensor | None,
    parts: int = 1,
) -> torch.Tensor:
    """Remove ``round(level * H)`` heads: blocks of ``head_dim`` rows (or input columns), the
    same heads in each of the ``parts`` blocks (q, k and v of a fused projection)."""
    size = weight.shape[head_axis]
    head_dim = size // (num_heads * parts)
    if scores is None:
        per_channel = weight.detach().double().norm(dim=1 - head_axis)
    else:
        per_channel = torch.as_tensor(scores, device=weight.device).detach().double().flatten()
    n = per_channel.numel()
    if n == num_heads:
        per_head = per_channel
    elif n in (size, size // parts):
        per_head = per_channel.reshape(-1, num_heads, head_dim).sum((0, 2))
    else:
        raise ValueError(
            f"head scores must have {num_heads} (heads) or {size} (channels) values, got {n}"
        )
    removed = _lowest_first(per_head)[: _round(level * num_heads)]
    keep_heads = torch.ones(num_heads, dtype=torch.bool, device=weight.device)
    keep_heads[removed] = False
    keep = keep_heads.repeat_interleave(head_dim).repeat(parts)
    keep = keep[:, None] if head_axis == 0 else keep[None, :]
    return keep.expand_as(weight).clone()


def _structured_rule(
    weight: torch.Tensor,
    kind: str,
    scores: torch.Tensor | None = None,
    num_heads: int | None = None,
    head_axis: int = 0,
    head_parts: int = 1,
    *,
    level: float,
) -> torch.Tensor:
    if kind == "attention":
        if num_heads is None:
            raise ValueError("head pruning needs num_heads")
        return _remove_heads(weight, level, num_heads, head_axis, scores, head_parts)
    return _remove_rows(weight, level, scores)


def structured_catalog() -> Catalog:
    """Whole output channels (filters, neurons) and, for attention projections, whole heads."""
    actions = tuple(
        Action(
            f"level_{r:.1f}",
            frozenset(LAYER_KINDS),
            r,
            _ALL_ENGINES,
            partial(_structured_rule, level=r),
            f"remove the {r:.0%} weakest output channels (attention: heads)",
            _heads_fit,
        )
        for r in LEVELS
    )
    return Catalog(
        "structured",
        actions,
        "Channel pruning (filters / neurons, lowest-ranked first) and attention-head pruning.",
        group_ranking=True,
    )


CATALOGS: dict[str, Catalog] = {}
"""Registered catalogs by name (:func:`register_catalog`); ``catalog="NAME"`` picks one."""
BUILTIN_CATALOGS = ("autosculpt", "patdnn", "nm", "structured")


def register_catalog(catalog: Catalog) -> Catalog:
    """Make ``catalog`` known by its name: ``gym.make(..., catalog=NAME)``, episode records
    that name it, ``autosculpt info`` and the README's catalog table all read it from here.

    An env built with a :class:`Catalog` object registers it, so its records replay in the
    same process; in another process, register the catalog again before replaying. A later
    registration of another catalog under the same name replaces it, except for the built-in
    names, which cannot be taken.

    Returns:
        ``catalog``.

    Raises:
        ValueError: the name is a built-in catalog's and the content differs.
    """
    if not isinstance(catalog, Catalog):
        raise TypeError(f"register_catalog takes a Catalog, got {type(catalog).__name__}")
    known = CATALOGS.get(catalog.name)
    if (
        known is not None
        and catalog.name in BUILTIN_CATALOGS
        and known.signature() != catalog.signature()
    ):
        raise ValueError(
            f"catalog name {catalog.name!r} is a built-in catalog's; give yours another name"
        )
    CATALOGS[catalog.name] = catalog
    return catalog


for _factory in (autosculpt_catalog, patdnn_catalog, nm_catalog, structured_catalog):
    register_catalog(_factory())


def get_catalog(catalog: str | Catalog) -> Catalog:
    """A registered catalog by name (a :class:`Catalog` passes through).

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    if isinstance(catalog, Catalog):
        return catalog
    if catalog not in CATALOGS:
        raise ValueError(
            f"unknown pattern catalog {catalog!r}; known: {', '.join(CATALOGS)} (a custom "
            "catalog is known once autosculpt_env.patterns.register_catalog(catalog) ran in "
            "this process)"
        )
    return CATALOGS[catalog]
