"""Pattern catalogs: the paper's masks, realised sparsity, determinism, optimality, API errors."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autosculpt_env.models.vit import Attention
from autosculpt_env.patterns import (
    AUTOSCULPT_PATTERNS,
    AUTOSCULPT_THIRDS_REMOVED,
    CATALOGS,
    LAYER_KINDS,
    PATDNN_CANDIDATES,
    Action,
    Catalog,
    autosculpt_assignment,
    get_catalog,
    layer_kind,
    patdnn_library,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def half_up(numerator: int, denominator: int) -> int:
    """round(numerator / denominator), halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def random_weight(shape: tuple[int, ...], seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many equal norms and magnitudes
        return torch.randint(-1, 2, shape, generator=g).float()
    return torch.randn(shape, generator=g)


@st.composite
def layers(draw):
    """(kind, weight shape, num_heads, head_axis) of a random layer."""
    kind = draw(st.sampled_from(LAYER_KINDS))
    out = draw(st.integers(1, 24))
    if kind == "conv3x3":
        return kind, (out, draw(st.integers(1, 5)), 3, 3), None, 0
    if kind == "depthwise":
        return kind, (out, 1, 3, 3), None, 0
    if kind == "pointwise":
        return (
            kind,
            (out, 4 * draw(st.integers(1, 6)) + draw(st.sampled_from([0, 0, 2])), 1, 1),
            None,
            0,
        )
    if kind == "conv":
        k = draw(st.sampled_from([2, 4, 5]))
        return kind, (out, draw(st.integers(1, 4)), k, k), None, 0
    if kind == "linear":
        return kind, (out, draw(st.sampled_from([3, 4, 8, 16, 24]))), None, 0
    heads, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    dim = heads * head_dim
    return kind, (dim, dim), heads, draw(st.sampled_from([0, 1]))


def granularity(catalog: str, action: Action, kind: str, shape, heads: int | None) -> float:
    """The fraction of the layer one unit of the action's rounding stands for."""
    if action.sparsity == 0.0 or catalog == "nm" or action.name == "pattern":
        return 0.0
    kernels = shape[0] * shape[1] if len(shape) == 4 else 0
    if catalog == "patdnn":
        return (4 / 9 if action.name.startswith("pattern") else 1.0) / kernels
    if catalog == "autosculpt" and kind in ("conv3x3", "depthwise"):
        return 1 / (3 * shape[0])
    if catalog == "structured" and kind == "attention":
        return 1 / heads
    return 1 / shape[0]


@pytest.mark.parametrize("catalog", sorted(CATALOGS))
@SETTINGS
@given(layer=layers(), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_every_action_reaches_its_sparsity_deterministically(catalog, layer, seed, ties):
    kind, shape, heads, head_axis = layer
    cat = get_catalog(catalog)
    weight = random_weight(shape, seed, ties)
    valid = cat.valid_for(shape, kind, num_heads=heads, head_axis=head_axis)
    assert valid[cat.dense_action()] and (valid <= cat.valid(kind)).all()
    for a in np.flatnonzero(valid):
        action = cat.actions[a]
        mask = cat.mask(int(a), weight, kind, num_heads=heads, head_axis=head_axis)
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        again = cat.mask(int(a), weight.clone(), kind, num_heads=heads, head_axis=head_axis)
        assert torch.equal(mask, again)
        realised = 1 - int(mask.sum()) / mask.numel()
        tol = granularity(catalog, action, kind, shape, heads) / 2
        assert abs(realised - action.sparsity) <= tol + 1e-9, (action.name, realised)


def test_autosculpt_patterns_are_the_papers_six():
    expected = [
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # remove all
        [[0, 0, 1], [0, 0, 1], [0, 0, 1]],  # keep right column
        [[0, 0, 0], [0, 0, 0], [1, 1, 1]],  # keep bottom row
        [[0, 1, 1], [0, 1, 1], [0, 1, 1]],  # keep right two columns
        [[0, 0, 0], [1, 1, 1], [1, 1, 1]],  # keep bottom two rows
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],  # keep all
    ]
    assert torch.equal(AUTOSCULPT_PATTERNS, torch.tensor(expected, dtype=torch.bool))
    removed = 3 - AUTOSCULPT_PATTERNS.flatten(1).sum(1) // 3
    assert removed.tolist() == list(AUTOSCULPT_THIRDS_REMOVED)


@SETTINGS
@given(
    filters=st.integers(1, 30),
    channels=st.integers(1, 4),
    level=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_autosculpt_masks_are_one_pattern_per_filter(filters, channels, level, seed):
    cat = get_catalog("autosculpt")
    weight = torch.randn(filters, channels, 3, 3, generator=torch.Generator().manual_seed(seed))
    mask = cat.mask(level, weight, "conv3x3")
    pattern = autosculpt_assignment(weight, level / 10)
    assert torch.equal(mask, AUTOSCULPT_PATTERNS[pattern][:, None].expand_as(mask))
    thirds = torch.tensor(AUTOSCULPT_THIRDS_REMOVED)[pattern]
    assert int(thirds.sum()) == half_up(3 * level * filters, 10)
    # Monotone: a weaker filter never keeps more than a stronger one.
    norms = weight.flatten(1).norm(dim=1)
    order = torch.argsort(norms)
    assert (thirds[order].diff() <= 0).all()
    # Orientation: the kept rows/columns hold at least as much energy as the alternative.
    energy = torch.einsum("fchw,phw->fp", weight.double() ** 2, AUTOSCULPT_PATTERNS.double())
    partner = torch.tensor([0, 2, 1, 4, 3, 5])[pattern]
    rows = torch.arange(filters)
    assert (energy[rows, pattern] >= energy[rows, partner]).all()


@SETTINGS
@given(
    tens=st.integers(1, 3),
    channels=st.integers(1, 4),
    level=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_autosculpt_keeps_at_least_the_energy_of_filter_pruning(tens, channels, level, seed):
    filters = 10 * tens  # so level * filters whole filters is the same sparsity
    weight = torch.randn(filters, channels, 3, 3, generator=torch.Generator().manual_seed(seed))
    mask = get_catalog("autosculpt").mask(level, weight, "conv3x3")
    kept = float((weight.double() ** 2 * mask).sum())
    norms = weight.flatten(1).norm(dim=1)
    dropped = torch.argsort(norms)[: level * tens]
    filter_mask = torch.ones_like(mask)
    filter_mask[dropped] = False
    assert mask.sum() == filter_mask.sum()
    assert kept >= float((weight.double() ** 2 * filter_mask).sum()) - 1e-9


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    filters=st.integers(1, 5),
    level=st.integers(0, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_autosculpt_assignment_is_the_best_monotone_one(filters, level, seed):
    """Exhaustive check: no monotone assignment with the same thirds keeps more energy."""
    weight = torch.randn(filters, 2, 3, 3, generator=torch.Generator().manual_seed(seed))
    energy = torch.einsum("fchw,phw->fp", weight.double() ** 2, AUTOSCULPT_PATTERNS.double())
    by_thirds = torch.stack(
        [
            energy[:, 5],
            energy[:, 3:5].max(1).values,
            energy[:, 1:3].max(1).values,
            energy[:, 0],
        ],
        1,
    )
    target = half_up(3 * level * filters, 10)
    rank = torch.argsort(weight.flatten(1).norm(dim=1))  # weakest first
    best = -1.0
    for thirds in itertools.product(range(4), repeat=filters):
        ranked = [thirds[int(i)] for i in rank]
        if sum(thirds) != target or any(a < b for a, b in zip(ranked, ranked[1:])):
            continue
        best = max(best, float(sum(by_thirds[f, t] for f, t in enumerate(thirds))))
    pattern = autosculpt_assignment(weight, level / 10)
    assert float(energy[torch.arange(filters), pattern].sum()) == pytest.approx(best, rel=1e-12)


def test_scores_replace_norms_so_coupled_layers_drop_the_same_channels():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
    scores = torch.rand(12, generator=g)
    for name in ("autosculpt", "structured"):
        cat = get_catalog(name)
        previous = torch.ones(12, dtype=torch.bool)
        for level in range(10):
            kept_a = cat.mask(level, a, "linear", scores=scores).any(1)
            kept_b = cat.mask(level, b, "linear", scores=scores).any(1)
            assert torch.equal(kept_a, kept_b)
            assert torch.equal(kept_a, scores >= torch.sort(scores).values[round(level * 1.2)])
            assert not (kept_a & ~previous).any()  # nested as the level grows
            previous = kept_a
    conv = torch.randn(10, 3, 3, 3, generator=g)
    pattern = autosculpt_assignment(conv, 0.5, scores=scores[:10])
    thirds = torch.tensor(AUTOSCULPT_THIRDS_REMOVED)[pattern]
    assert (thirds[torch.argsort(scores[:10])].diff() <= 0).all()
    with pytest.raises(ValueError, match="one value per output channel"):
        get_catalog("structured").mask(3, a, "linear", scores=scores[:5])


def test_ties_break_towards_lower_indices():
    weight = torch.ones(6, 4)
    keep = get_catalog("structured").mask(5, weight, "linear")  # level 0.5: 3 rows
    assert keep.any(1).tolist() == [False, False, False, True, True, True]


def reference_patdnn(weight: torch.Tensor) -> torch.Tensor:
    """PatDNN's extraction with plain loops, for comparison."""
    kernels = weight.reshape(-1, 9).double() ** 2
    cands = PATDNN_CANDIDATES.double()
    best = []
    for k in kernels:
        scores = [float((k * c).sum()) for c in cands]
        best.append(max(range(len(cands)), key=lambda i: (scores[i], -i)))
    counts = [best.count(i) for i in range(len(cands))]
    library = sorted(range(len(cands)), key=lambda i: (-counts[i], i))[:8]
    chosen = []
    for k in kernels:
        scores = [float((k * cands[i]).sum()) for i in library]
        chosen.append(library[max(range(8), key=lambda j: (scores[j], -j))])
    return PATDNN_CANDIDATES[chosen].reshape(weight.shape)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(out=st.integers(1, 12), inp=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_patdnn_patterns_match_a_loop_reference(out, inp, seed):
    weight = torch.randn(out, inp, 3, 3, generator=torch.Generator().manual_seed(seed))
    cat = get_catalog("patdnn")
    mask = cat.mask(cat.action_names.index("pattern"), weight, "conv3x3")
    assert torch.equal(mask, reference_patdnn(weight))
    kernels = mask.reshape(-1, 9)
    assert (kernels.sum(1) == 4).all() and kernels[:, 4].all()
    assert len({tuple(k.tolist()) for k in kernels}) <= 8
    library = set(patdnn_library(weight).tolist())
    assert {int((PATDNN_CANDIDATES == k).all(1).nonzero()) for k in kernels} <= library


def test_patdnn_connectivity_removes_weakest_kernels_after_patterns():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 5, 3, 3, generator=g)
    cat = get_catalog("patdnn")
    conn = cat.mask(cat.action_names.index("connectivity_0.4"), weight, "conv3x3")
    kernel_kept = conn.flatten(2).any(2)
    assert int((~kernel_kept).sum()) == 8
    norms = weight.flatten(2).norm(dim=2)
    assert norms[~kernel_kept].max() <= norms[kernel_kept].min()
    both = cat.mask(cat.action_names.index("pattern+conn_0.4"), weight, "conv3x3")
    pattern = cat.mask(cat.action_names.index("pattern"), weight, "conv3x3")
    assert not (both & ~pattern).any() and int((~both.flatten(2).any(2)).sum()) == 8
    # Connectivity applies to spatial convs but not to 1x1 or linear layers.
    assert cat.valid("conv")[cat.action_names.index("connectivity_0.2")]
    assert not cat.valid("conv")[cat.action_names.index("pattern")]
    assert cat.valid("pointwise").tolist() == [True] + [False] * 7
    assert cat.valid("linear").tolist() == [True] + [False] * 7


@settings(max_examples=20, deadline=None, derandomize=True)
@given(out=st.integers(1, 8), groups=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_nm_keeps_the_largest_n_of_every_m(out, groups, seed):
    cat = get_catalog("nm")
    weight = torch.randn(out, 8 * groups, generator=torch.Generator().manual_seed(seed))
    for name, n, m in (("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)):
        mask = cat.mask(cat.action_names.index(name), weight, "linear")
        blocks, kept = weight.abs().reshape(out, -1, m), mask.reshape(out, -1, m)
        assert (kept.sum(-1) == n).all()
        smallest_kept = torch.where(kept, blocks, torch.inf).min(-1).values
        largest_dropped = torch.where(kept, -torch.inf, blocks).max(-1).values
        assert (smallest_kept >= largest_dropped).all()
    pointwise = weight.reshape(out, 8 * groups, 1, 1)
    assert torch.equal(
        cat.mask(1, pointwise, "pointwise").reshape(out, -1), cat.mask(1, weight, "linear")
    )


def test_nm_validity_depends_on_the_input_size():
    cat = get_catalog("nm")
    assert cat.valid_for((10, 12), "linear").tolist() == [True, True, True, False]
    assert cat.valid_for((10, 6), "linear").tolist() == [True, False, False, False]
    assert cat.valid_for((10, 16, 3, 3), "conv3x3").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="'2:4'.*linear.*\\(10, 6\\).*valid: \\['dense'\\]"):
        cat.mask(1, torch.randn(10, 6), "linear")


def test_structured_removes_whole_heads():
    cat = get_catalog("structured")
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 12, generator=g)
    head_norm = weight.norm(dim=1).reshape(4, 3).sum(1)
    for axis in (0, 1):
        mask = cat.mask(5, weight, "attention", num_heads=4, head_axis=axis)  # 2 of 4 heads
        per_head = (mask if axis == 0 else mask.T).reshape(4, 3, 12)
        alive = per_head.all(2).all(1)
        assert (per_head.all(2).all(1) | ~per_head.any(2).any(1)).all()  # whole heads only
        assert int(alive.sum()) == 2
    kept_rows = cat.mask(5, weight, "attention", num_heads=4).reshape(4, 3, 12).any(2).any(1)
    assert kept_rows.tolist() == (head_norm >= torch.sort(head_norm).values[2]).tolist()
    # Without a head count only the dense action is valid for attention projections.
    assert cat.valid_for((12, 12), "attention").tolist() == [True] + [False] * 9
    assert cat.valid_for((12, 12), "attention", num_heads=5).tolist() == [True] + [False] * 9
    per_head_scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    mask = cat.mask(5, weight, "attention", scores=per_head_scores, num_heads=4)
    assert mask.reshape(4, 3, 12).any(2).any(1).tolist() == [True, False, True, False]


def test_layer_kinds():
    assert layer_kind(nn.Conv2d(4, 8, 3)) == "conv3x3"
    assert layer_kind(nn.Conv2d(4, 8, 1)) == "pointwise"
    assert layer_kind(nn.Conv2d(8, 8, 3, groups=8)) == "depthwise"
    assert layer_kind(nn.Conv2d(8, 8, 3, groups=2)) == "conv"
    assert layer_kind(nn.Conv2d(8, 8, 5, groups=8)) == "conv"
    assert layer_kind(nn.Conv2d(1, 64, 4, 4)) == "conv"
    attn = Attention(16, 4)
    assert layer_kind(attn.q, "blocks.0.attn.q", parent=attn) == "attention"
    assert layer_kind(attn.proj, "blocks.0.attn.proj", parent=attn) == "attention"
    assert layer_kind(attn.q, "blocks.0.attn.q") == "linear"  # parent unknown
    assert layer_kind(nn.Linear(4, 4), "mlp.fc1", parent=attn) == "linear"
    with pytest.raises(TypeError):
        layer_kind(nn.ReLU())


def test_catalog_api():
    assert sorted(CATALOGS) == ["autosculpt", "nm", "patdnn", "structured"]
    cat = get_catalog("autosculpt")
    assert cat.action_names == [f"level_0.{i}" for i in range(10)] and len(cat) == 10
    assert cat.dense_action() == 0 and get_catalog(cat) is cat
    assert get_catalog("patdnn").action_names == [
        "dense",
        "pattern",
        "connectivity_0.2",
        "connectivity_0.4",
        "connectivity_0.6",
        "pattern+conn_0.2",
        "pattern+conn_0.4",
        "pattern+conn_0.6",
    ]
    assert get_catalog("nm").action_names == ["dense", "2:4", "1:4", "4:8"]
    weight = torch.randn(8, 4, 3, 3)
    for name in CATALOGS:
        c = get_catalog(name)
        for kind in LAYER_KINDS:
            assert c.valid(kind)[c.dense_action()]
        assert all(a.engines for a in c.actions)
        # Catalogs are data: they pickle (e.g. into vector-env workers) and still work.
        copy = pickle.loads(pickle.dumps(c))
        for a in np.flatnonzero(c.valid_for(weight.shape, "conv3x3")):
            assert torch.equal(
                copy.mask(int(a), weight, "conv3x3"), c.mask(int(a), weight, "conv3x3")
            )
    with pytest.raises(ValueError, match="known: autosculpt, patdnn, nm, structured"):
        get_catalog("magic")
    with pytest.raises(ValueError, match="unknown layer kind"):
        cat.valid("conv7x7")
    with pytest.raises(ValueError, match="out of range"):
        cat.mask(10, torch.randn(4, 4), "linear")
    patdnn = get_catalog("patdnn")
    with pytest.raises(ValueError, match="'pattern' of catalog 'patdnn' is not valid for a linear"):
        patdnn.mask(1, torch.randn(4, 4), "linear")
    assert patdnn.mask(0, torch.randn(4, 4), "linear").all()


def test_user_catalogs_pass_through_and_need_a_dense_action():
    keep_first = Action(
        "first_half",
        frozenset({"linear"}),
        0.5,
        ("PyTorch",),
        lambda w, kind, scores=None: (
            torch.arange(w.shape[0])[:, None].expand_as(w) < w.shape[0] // 2
        ),
    )
    dense = Action(
        "dense", frozenset(LAYER_KINDS), 0.0, ("PyTorch",), lambda w, k, scores=None: w == w
    )
    custom = Catalog("mine", (dense, keep_first))
    assert get_catalog(custom) is custom
    assert custom.valid("conv3x3").tolist() == [True, False]
    assert custom.mask(1, torch.randn(4, 3), "linear").sum() == 6
    with pytest.raises(ValueError, match="needs a dense action"):
        Catalog("bad", (keep_first,))
