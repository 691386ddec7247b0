"""The cost table: exact against masked counts, masked counts exact against a forward pass."""

from __future__ import annotations

import copy
import itertools
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Mixed
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from autosculpt_env import zoo
from autosculpt_env.cost import build_cost_table, masked_flops, masked_params
from autosculpt_env.graph import NetGraph, build_graph
from autosculpt_env.patterns import CATALOGS, Catalog, get_catalog

MODELS = ("resnet20", "vgg11", "mobilenetv2", "vit")


class Problem:
    """Graph + cached masks, the way the environment wires them (group-summed scores)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, catalog: str, group_scores: bool):
        self.model = model
        self.graph = build_graph(model, x)
        self.catalog: Catalog = get_catalog(catalog)
        self.cache: dict[tuple[int, int], torch.Tensor | None] = {}
        self.scores: dict[str, torch.Tensor | None] = {}
        for name in self.graph.layers:
            group = self.graph.group_of(name)
            rows = self.graph.module(name).weight.shape[0]
            same = [g for g in group if self.graph.module(g).weight.shape[0] == rows]
            self.scores[name] = (
                torch.stack(
                    [self.graph.module(g).weight.detach().flatten(1).norm(dim=1) for g in same]
                ).sum(0)
                if group_scores and len(same) > 1 and self.graph.layer_kind(name) != "attention"
                else None
            )
        self.table = build_cost_table(self.graph, self.catalog, self.mask)

    def _extra(self, name: str) -> dict:
        heads = self.graph.heads(name)
        return {} if heads is None else heads.mask_kwargs()

    def mask(self, layer: int, action: int) -> torch.Tensor | None:
        if (layer, action) not in self.cache:
            name = self.graph.layers[layer]
            weight, kind = self.graph.module(name).weight, self.graph.layer_kind(name)
            extra = self._extra(name)
            ok = self.catalog.valid_for(weight.shape, kind, **extra)[action]
            self.cache[layer, action] = (
                self.catalog.mask(action, weight, kind, scores=self.scores[name], **extra)
                if ok
                else None
            )
        return self.cache[layer, action]

    def random_policy(self, rng: np.random.Generator) -> list[int]:
        return [int(rng.choice(np.flatnonzero(~np.isnan(row)))) for row in self.table.flops]

    def masks(self, policy: list[int]) -> dict[str, torch.Tensor]:
        return {name: self.mask(i, a) for i, (name, a) in enumerate(zip(self.graph.layers, policy))}


def digits_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.entry(name, "digits").build()


@pytest.mark.parametrize("catalog", sorted(CATALOGS))
@pytest.mark.parametrize("model", MODELS)
def test_table_equals_masked_counts_for_random_policies(model, catalog):
    problem = Problem(digits_model(model), torch.randn(1, 1, 8, 8), catalog, group_scores=True)
    table, graph = problem.table, problem.graph
    dense = [problem.catalog.dense_action()] * len(graph.layers)
    assert table.policy_flops(dense) == graph.dense_flops == table.dense_flops
    assert table.policy_params(dense) == graph.dense_params == table.dense_params
    assert table.flops.shape == (len(graph.layers), len(problem.catalog))
    rng = np.random.default_rng(0)
    for _ in range(6):
        policy = problem.random_policy(rng)
        masks = problem.masks(policy)
        assert table.policy_flops(policy) == masked_flops(graph, masks)
        assert table.policy_params(policy) == masked_params(graph, masks)
        assert table.min_flops_from(policy) == table.policy_flops(policy)
        for k in (0, len(policy) // 2):
            assert table.min_flops_from(policy[:k]) <= table.policy_flops(policy)


def test_vit_attention_matmuls_are_fixed_cost():
    problem = Problem(
        digits_model("vit"), torch.randn(1, 1, 8, 8), "structured", group_scores=False
    )
    matmuls = sum(n.flops for n in problem.graph.nodes if n.op_type == "matmul")
    assert problem.table.fixed_flops == matmuls > 0
    layers = sum(
        problem.graph.module(n).weight.numel() + problem.graph.module(n).bias.numel()
        for n in problem.graph.layers
    )
    assert problem.table.fixed_params == problem.graph.dense_params - layers


def test_removed_filter_kills_consumer_columns():
    problem = Problem(
        digits_model("vgg11"), torch.randn(1, 1, 8, 8), "structured", group_scores=False
    )
    graph = problem.graph
    last, classifier = "features.24", "classifier"
    assert graph.consumers(last) == [classifier]
    masks = {last: torch.ones_like(graph.module(last).weight, dtype=torch.bool)}
    masks[last][[0, 5]] = False  # two filters removed: two classifier columns dead
    weights = graph.module(last).weight.numel()
    uses = graph.node(last).flops // (2 * weights)
    expected = graph.dense_flops - 2 * uses * 2 * graph.module(last).weight[0].numel() - 2 * 2 * 10
    assert masked_flops(graph, masks) == expected
    stored = graph.dense_params - 2 * graph.module(last).weight[0].numel()
    assert masked_params(graph, masks, live=False) == stored
    # what the pruned network needs: also not the two dead classifier columns (10 weights
    # each) nor the scale and shift the batch norm holds at zero on the two channels
    assert masked_params(graph, masks) == stored - 2 * 10 - 2 * 2
    pair = graph.layers.index(last), graph.layers.index(classifier)
    dead = problem.table.dead[pair]
    assert dead.shape == (10, 10) and dead[0].max() == 0 and (dead[9] > 0).all()


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5)
        self.c2, self.b2 = nn.Conv2d(5, 5, 3), nn.BatchNorm2d(5)
        self.c3 = nn.Conv2d(5, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c3(x)), 1).flatten(1))


def test_min_flops_from_is_the_exact_minimum_over_completions():
    torch.manual_seed(0)
    problem = Problem(Chain(), torch.randn(1, 1, 7, 7), "structured", group_scores=False)
    table = problem.table
    assert sorted(table.dead) == [(0, 1), (1, 2), (2, 3)]
    valid = [np.flatnonzero(~np.isnan(row)) for row in table.flops]
    every = {p: table.policy_flops(p) for p in itertools.product(*valid)}
    for k in range(len(valid) + 1):
        for prefix in itertools.product(*valid[:k]):
            best = min(v for p, v in every.items() if p[:k] == prefix)
            assert table.min_flops_from(prefix) == best
    for prefix in ([], [3], [3, 9]):
        options = table.min_flops_next(prefix)
        assert options.shape == (10,)
        assert list(options) == [table.min_flops_from([*prefix, a]) for a in range(10)]
    with pytest.raises(ValueError, match="action 11 is not valid for layer c1"):
        table.policy_flops([11, 0, 0, 0])
    with pytest.raises(ValueError, match="one action per layer"):
        table.policy_flops([0, 0])


# -------------------------------------------------------------------------------------
# Brute force: run the pruned network and count the multiply-adds it really needs.


def _revive(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t == 0, torch.ones_like(t), t)


fx.wrap("_revive")

_MERGES = (operator.add, operator.iadd, torch.add, torch.matmul, torch.cat)


def forward_pass_flops(
    model: nn.Module, graph: NetGraph, masks: dict[str, torch.Tensor], x
) -> float:
    """FLOPs of the pruned network measured on a forward pass, independently of the graph.

    Kept weights are made positive and inputs positive, so an activation channel is exactly
    zero only when pruning made it so. A removed filter has its bias and following batch
    norm zeroed, as a pruned model does. A prunable layer then pays for each kept weight
    whose input channel is not all-zero, once per output position. Outputs of adds, matmuls
    and concats are made nonzero, because the cost convention does not follow removed
    channels through them.
    """
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1), m.weight.fill_(1), m.bias.fill_(0.1)
        for name in graph.layers:
            mod, mask = modules[name], masks[name]
            mod.weight.copy_((mod.weight.abs() + 0.01) * mask)
            removed = ~mask.flatten(1).any(1)
            if mod.bias is not None:
                mod.bias.copy_((mod.bias.abs() + 0.01).masked_fill(removed, 0))
            node = next(n for n in traced.graph.nodes if n.op == "call_module" and n.target == name)
            for user in node.users:
                bn = modules.get(str(user.target)) if user.op == "call_module" else None
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight.masked_fill_(removed, 0), bn.bias.masked_fill_(removed, 0)
    for node in list(traced.graph.nodes):
        if node.op == "call_function" and node.target in _MERGES:
            with traced.graph.inserting_after(node):
                revived = traced.graph.call_function(_revive, (node,))
            node.replace_all_uses_with(
                revived, delete_user_cb=lambda user, new=revived: user is not new
            )
    traced.recompile()

    total, dense_layers = 0.0, 0.0

    def count(name: str):
        def hook(module, args, out):
            nonlocal total, dense_layers
            inp, mask = args[0], masks[name].float()
            if isinstance(module, nn.Conv2d):
                alive = (inp.abs().amax(dim=(0, 2, 3)) > 0).float()
                probe = alive.view(1, -1, 1, 1).expand(1, -1, *mask.shape[2:])
                kept = F.conv2d(probe, mask, groups=module.groups).sum()
                positions = out.shape[2] * out.shape[3]
            else:
                alive = (inp.abs().flatten(0, -2).amax(0) > 0).float()
                kept = (mask @ alive).sum()
                positions = out.numel() // (out.shape[0] * out.shape[-1])
            total += 2 * float(kept) * positions
            dense_layers += 2 * mask.numel() * positions

        return hook

    traced_modules = dict(traced.named_modules())
    handles = [traced_modules[name].register_forward_hook(count(name)) for name in graph.layers]
    with torch.no_grad():
        traced(x[:1])
    for h in handles:
        h.remove()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    return counter.get_total_flops() - dense_layers + total


@pytest.mark.parametrize("catalog", ["autosculpt", "structured", "patdnn"])
@pytest.mark.parametrize("model", [*MODELS, "mixed"])
def test_masked_flops_equal_a_forward_pass_count(model, catalog):
    net = Mixed() if model == "mixed" else digits_model(model)
    x = torch.rand(1, 3, 6, 6) + 0.1 if model == "mixed" else torch.rand(1, 1, 8, 8) + 0.1
    problem = Problem(net, x, catalog, group_scores=True)
    rng = np.random.default_rng(1)
    policies = [problem.random_policy(rng) for _ in range(3)]
    # The most aggressive valid action everywhere removes whole channels in many layers.
    policies.append([int(np.flatnonzero(~np.isnan(row))[-1]) for row in problem.table.flops])
    dead_seen = False
    for policy in policies:
        masks = problem.masks(policy)
        flops = masked_flops(problem.graph, masks)
        assert flops == forward_pass_flops(net, problem.graph, masks, x)
        assert flops == problem.table.policy_flops(policy)
        own = sum(float(problem.table.flops[i, a]) for i, a in enumerate(policy))
        dead_seen |= problem.table.fixed_flops + own > flops
    if catalog == "structured" or model in ("mixed", "vgg11"):
        assert dead_seen  # the test exercises the dead-channel correction


def test_min_flops_next_matches_min_flops_from_for_every_action():
    """The vectorised wall query agrees with the scalar dynamic program at every prefix."""
    from autosculpt_env.cost import build_cost_table
    from autosculpt_env.graph import build_graph
    from autosculpt_env.patterns import get_catalog

    rng = np.random.default_rng(0)
    for arch in ("resnet20", "mobilenetv2", "vit"):
        net = zoo.entry(arch, "digits").build().eval()
        graph = build_graph(net, torch.zeros(1, 1, 8, 8))
        for cat_name in ("autosculpt", "structured"):
            catalog = get_catalog(cat_name)
            modules = dict(net.named_modules())
            masks = {}

            def mask(li, a, graph=graph, catalog=catalog, modules=modules, masks=masks):
                name = graph.layers[li]
                kind = graph.layer_kind(name)
                heads = graph.heads(name)
                kw = {} if heads is None else heads.mask_kwargs()
                w = modules[name].weight.detach()
                if not catalog.valid_for(tuple(w.shape), kind, **kw)[a]:
                    return None
                if (li, a) not in masks:
                    masks[(li, a)] = catalog.mask(a, w, kind, **kw)
                return masks[(li, a)]

            table = build_cost_table(graph, catalog, mask)
            prefix: list[int] = []
            for k in range(len(graph.layers)):
                got = table.min_flops_next(prefix)
                for a in range(len(catalog)):
                    want = table.min_flops_from([*prefix, a]) if table._valid[k, a] else np.inf
                    assert got[a] == pytest.approx(want, rel=1e-12, abs=1e-6)
                prefix.append(int(rng.choice(np.flatnonzero(table._valid[k]))))
            # the completion wall's query: one layer varied in a full policy
            for k in range(len(graph.layers)):
                cand = np.flatnonzero(table._valid[k])
                got = table.flops_varying(prefix, k, cand)
                for j, a in enumerate(cand):
                    want = table.policy_flops([*prefix[:k], int(a), *prefix[k + 1 :]])
                    assert got[j] == pytest.approx(want, rel=1e-12, abs=1e-6)
