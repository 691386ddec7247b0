"""Models written the ways people write them: PyTorch's own transformer layers, fused qkv
projections, nn.MultiheadAttention, and squeeze-and-excitation gates, on digits."""

from __future__ import annotations

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from user_models import MHAViT, MobileNetSE, TimmViT, TorchEncoderViT

import autosculpt_env  # noqa: F401
from autosculpt_env import data
from autosculpt_env.cost import masked_flops, masked_params
from autosculpt_env.graph import build_graph
from autosculpt_env.materialize import materialize_policy
from autosculpt_env.records import replay
from autosculpt_env.traceable import MultiheadAttention, make_traceable
from autosculpt_env.training import Recipe, train

MODELS = {
    "torch-encoder": TorchEncoderViT,
    "torch-encoder-seq-first": lambda: TorchEncoderViT(batch_first=False),
    "timm-fused-qkv": TimmViT,
    "multihead-attention": MHAViT,
    "mobilenet-se": MobileNetSE,
}
FAST = {"dataset": "digits", "reward_samples": 120, "bn_recalibration_samples": 64}


@pytest.fixture(scope="module")
def trained():
    """Each model trained briefly on digits (pretrained weights, as a user brings them)."""
    ds = data.load("digits", "train")
    nets = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        net = build()
        recipe = Recipe(epochs=2, optimizer="adamw", lr=3e-3, batch_size=64, crop_padding=1)
        nets[name] = train(net, ds, recipe, seed=0).eval()
    return nets


def make(net, **kw):
    return gym.make("AutoSculpt-v0", model=net, **{**FAST, **kw})


# --------------------------------------------------------------------- traceable rewrites
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_traceable_multihead_attention_computes_the_same(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    new = make_traceable(copy.deepcopy(mha)).eval()
    assert isinstance(new, MultiheadAttention)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in mha.parameters())
    n, tgt, src = 3, 5, 4

    def seq(length, dim):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    q, k, v = seq(tgt, 8), seq(src, kdim or 8), seq(src, kdim or 8)
    padding = torch.zeros(n, src, dtype=torch.bool)
    padding[0, -1] = True
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    for kw in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal},
        {"attn_mask": torch.randn(n * 2, tgt, src), "key_padding_mask": padding},
        {"need_weights": False},
        {"average_attn_weights": False},
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about mixed mask types
            want, want_w = mha(q, k, v, **kw)
        got, got_w = new(q, k, v, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        if want_w is None:
            assert got_w is None
        else:
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_traceable_encoder_computes_the_same(norm_first, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, 16, batch_first=batch_first, norm_first=norm_first, activation="gelu"
    )
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False).eval()
    new = make_traceable(copy.deepcopy(enc)).eval()
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3 if batch_first else 5, 5 if batch_first else 3, dtype=torch.bool)
    padding[1, -2:] = True
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1 if batch_first else 0])
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": padding}, {"mask": mask, "is_causal": True}):
            torch.testing.assert_close(new(x, **kw), enc(x, **kw), atol=1e-5, rtol=0)


def test_unsupported_attention_is_a_clear_error():
    with pytest.raises(TypeError, match="add_bias_kv or add_zero_attn"):
        make_traceable(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_hidden_layers_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"does not trace into 'encoder' \(TransformerEncoder"):
        graph = build_graph(TorchEncoderViT().eval(), torch.zeros(1, 1, 8, 8))
    assert graph.layers == ["embed", "head"]  # what the env saw before the rewrite


# ---------------------------------------------------------------- the env on these models
def expected_layers(net: nn.Module) -> list[str]:
    """Every Conv2d / Linear of the network (after the rewrite) but the classifier."""
    rewritten = make_traceable(copy.deepcopy(net))
    names = [n for n, m in rewritten.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return [n for n in names if n not in ("head", "head.2")]


@pytest.mark.parametrize("name", MODELS)
def test_every_prunable_layer_is_exposed(trained, name):
    net = trained[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer hidden from the tracer
        env = make(net)
    base = env.unwrapped
    assert sorted(base.layer_names) == sorted(expected_layers(net))
    graph = base.problem.graph
    roles = {n: graph.attention_role(n) for n in base.layer_names if graph.attention_role(n)}
    if name.startswith("torch-encoder"):
        assert len(roles) == 8 and set(roles.values()) == {"q", "k", "v", "out"}
        assert graph.heads("encoder.layers.0.self_attn.out_proj") == (4, 1, 1)
    elif name == "timm-fused-qkv":
        assert set(roles.values()) == {"qkv", "out"}
        assert graph.heads("blocks.0.attn.qkv") == (4, 0, 3)
    elif name == "multihead-attention":
        assert roles == {
            "attn.q_proj": "q",
            "attn.k_proj": "k",
            "attn.v_proj": "v",
            "attn.out_proj": "out",
        }
        assert ["attn.q_proj", "attn.k_proj", "attn.v_proj"] in graph.groups
    else:
        assert not roles
        gated = graph.group_of("blocks.0.se.fc2")  # the gate multiplies the block's channels
        assert {"blocks.0.expand.0", "blocks.0.dw.0", "blocks.0.se.fc2"} <= set(gated)
    # the graph's FLOPs are what torch counts for the network the env holds
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base.problem.model(base.problem.example_inputs)
    assert graph.dense_flops == counter.get_total_flops()


@pytest.mark.parametrize("name", MODELS)
def test_the_env_checks_pass(trained, name):
    net = trained[name]
    check_env(make(net, reward="band").unwrapped)  # every action valid: no action wall
    env = make(net)
    rng = np.random.default_rng(0)
    _, info = env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
    assert info["flops_reduction"] >= 0.5 - 1e-12
    record = env.unwrapped.episode_record()
    again = replay(record, model=net)  # the same rewrite, the same layers and numbers
    assert again["accuracy"] == info["accuracy"] and again["flops"] == info["flops"]


@pytest.mark.parametrize("catalog", ["autosculpt", "structured", "nm"])
@pytest.mark.parametrize("name", MODELS)
def test_cost_table_agrees_with_the_masks(trained, name, catalog):
    problem = make(trained[name], catalog=catalog).unwrapped.problem
    rng = np.random.default_rng(1)
    for _ in range(5):
        policy = [int(rng.choice(np.flatnonzero(v))) for v in problem.valid]
        masks = problem.policy_masks(policy)
        assert problem.policy_flops(policy) == pytest.approx(masked_flops(problem.graph, masks))
        assert problem.policy_params(policy) == pytest.approx(masked_params(problem.graph, masks))


def removed_heads(mask: torch.Tensor, heads, part: int = 0) -> set[int]:
    """Heads whose rows (or columns) are all removed, in block ``part`` of the head axis."""
    kept = mask.any(dim=1 - heads.axis)
    block = kept.reshape(heads.parts, heads.num_heads, -1)[part]
    return set(torch.nonzero(~block.any(1)).flatten().tolist())


@pytest.mark.parametrize("name", ["torch-encoder", "timm-fused-qkv", "multihead-attention"])
def test_heads_are_removed_alike_in_q_k_v_and_the_output_projection(trained, name):
    problem = make(trained[name], catalog="structured").unwrapped.problem
    level = problem.catalog.action_names.index("level_0.5")
    graph = problem.graph
    by_module: dict[str, dict[str, set[int]]] = {}
    for i, layer in enumerate(problem.layers):
        heads = graph.heads(layer.name)
        if heads is None:
            continue
        mask = problem.mask(i, level)
        module = layer.name.rpartition(".")[0]
        for part in range(heads.parts):
            role = "qkv"[part] if heads.parts == 3 else graph.attention_role(layer.name)
            by_module.setdefault(module, {})[role] = removed_heads(mask, heads, part)
    assert by_module
    for roles in by_module.values():
        assert set(roles) == {"q", "k", "v", "out"}
        assert len({frozenset(r) for r in roles.values()}) == 1  # the same heads everywhere
        assert len(roles["v"]) == 2  # level 0.5 of 4 heads


@pytest.mark.parametrize("name", MODELS)
def test_materialised_network_computes_the_masked_one(trained, name):
    env = make(trained[name], catalog="structured")
    problem = env.unwrapped.problem
    level = problem.catalog.action_names.index("level_0.5")
    m = materialize_policy(env, [level] * problem.num_layers)
    assert m.max_abs_diff_float64 <= 1e-9
    if name in ("torch-encoder", "torch-encoder-seq-first", "multihead-attention"):
        assert any(what.startswith("heads 4 -> 2") for what in m.layers.values())
    if name == "timm-fused-qkv":
        assert "fused qkv" in m.masked_layers["blocks.0.attn.qkv"]
    assert m.params < sum(p.numel() for p in problem.model.parameters())
