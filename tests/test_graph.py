"""The traced operator graph: FLOPs, edge types, coupling groups, consumers, errors, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Mixed
from gymnasium.spaces import Box, Discrete, Graph
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autosculpt_env import zoo
from autosculpt_env.graph import (
    COUPLING,
    EDGE_TYPES,
    OP_TYPES,
    RESIDUAL,
    NetGraph,
    TraceError,
    build_graph,
    to_pyg,
)


def example(dataset: str, batch: int = 1) -> torch.Tensor:
    size = 8 if dataset == "digits" else 28
    return torch.randn(batch, 1, size, size)


def reference_flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    return counter.get_total_flops()


_GRAPHS: dict[str, NetGraph] = {}


def digits_graph(model: str) -> NetGraph:
    if model not in _GRAPHS:
        torch.manual_seed(0)
        _GRAPHS[model] = build_graph(zoo.entry(model, "digits").build(), example("digits"))
    return _GRAPHS[model]


@pytest.mark.parametrize("key", list(zoo.ENTRIES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_dense_flops_equal_flop_counter_on_zoo(key):
    torch.manual_seed(0)
    model = zoo.entry(*key).build()
    x = example(key[1])
    graph = build_graph(model, x)
    assert graph.dense_flops == reference_flops(model, x)
    assert graph.dense_flops == sum(n.flops for n in graph.nodes)
    assert graph.dense_params == sum(p.numel() for p in model.parameters())
    # Each prunable layer uses every weight once per output position / token.
    for name, idx in zip(graph.layers, graph.layer_nodes):
        node = graph.nodes[idx]
        assert node.target == name and node.module is dict(model.named_modules())[name]
        assert node.flops % (2 * node.module.weight.numel()) == 0 and node.flops > 0


def test_dense_flops_and_op_types_on_mixed_model():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    assert graph.dense_flops == reference_flops(model, x)
    types = {n.target: n.op_type for n in graph.nodes}
    assert types["dw"] == "depthwise_conv" and types["grouped"] == "grouped_conv"
    assert types["stem"] == "conv" and types["head"] == "linear" and types["bn"] == "batch_norm"
    ops = [n.op_type for n in graph.nodes]
    for op in ("input", "output", "concat", "matmul", "softmax", "mul", "add", "activation"):
        assert op in ops
    assert set(ops) <= set(OP_TYPES)
    matmul_flops = sum(n.flops for n in graph.nodes if n.op_type == "matmul")
    assert matmul_flops == 2 * 2 * (4 * 36 * 36 * 6)  # q @ k^T and attn @ v, 4 heads of 6
    assert all(n.out_shape[0] == 1 for n in graph.nodes if n.out_shape)
    # The depthwise conv follows its input's channels; the concat couples nothing; the SE
    # gate and the attention output meet the token stream.
    assert graph.group_of("dw") == ["stem", "dw", "grouped"]
    assert graph.group_of("branch") == ["branch"]
    assert graph.group_of("attn.proj") == ["se", "attn.proj"]
    assert graph.group_of("attn.q") == ["attn.q", "attn.k", "attn.v"]
    # Sigmoid(0) != 0, so the depthwise conv has no consumers; the stem feeds three convs.
    assert graph.consumers("stem") == ["dw", "grouped", "branch"]
    assert graph.consumers("dw") == []
    assert graph.consumers("se") == []
    assert graph.batch_norms("stem") == ["bn"]


def test_structure_is_topological_and_groups_partition_layers():
    for model in ("resnet20", "vgg11", "mobilenetv2", "vit"):
        graph = digits_graph(model)
        assert [n.index for n in graph.nodes] == list(range(len(graph.nodes)))
        assert graph.layer_nodes == sorted(graph.layer_nodes)
        assert graph.nodes[0].op_type == "input" and graph.nodes[-1].op_type == "output"
        flat = [name for g in graph.groups for name in g]
        assert sorted(flat) == sorted(graph.layers) and len(flat) == len(set(flat))
        group = {name: i for i, g in enumerate(graph.groups) for name in g}
        layer_at = dict(zip(graph.layer_nodes, graph.layers))
        pairs = set()
        for src, dst, etype in graph.edges:
            assert 0 <= etype < len(EDGE_TYPES)
            if etype == COUPLING:
                assert group[layer_at[src]] == group[layer_at[dst]] and src != dst
                pairs.add((src, dst))
            else:
                assert src < dst
        assert pairs == {(d, s) for s, d in pairs}
        n_coupling = sum(len(g) * (len(g) - 1) for g in graph.groups)
        assert len(pairs) == n_coupling


def test_resnet_residual_edges_and_stage_groups():
    graph = digits_graph("resnet20")
    adds = [n.index for n in graph.nodes if n.op_type == "add"]
    residual = [(s, d) for s, d, t in graph.edges if t == RESIDUAL]
    assert len(adds) == 9 and sorted(d for _, d in residual) == adds
    # The skip of the first block is the stem's activation, the main branch its bn2.
    first = adds[0]
    into = {graph.nodes[s].target: t for s, d, t in graph.edges if d == first}
    assert into == {"relu": RESIDUAL, "layer1.0.bn2": 0}
    assert graph.group_of("conv1") == [
        "conv1",
        "layer1.0.conv2",
        "layer1.1.conv2",
        "layer1.2.conv2",
    ]
    assert graph.group_of("layer2.0.shortcut.0") == [
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer2.1.conv2",
        "layer2.2.conv2",
    ]
    assert graph.group_of("layer1.0.conv1") == ["layer1.0.conv1"]
    assert graph.consumers("layer1.0.conv1") == ["layer1.0.conv2"]
    assert graph.consumers("conv1") == ["layer1.0.conv1"]
    assert graph.consumers("layer1.0.conv2") == []  # it meets the skip at an add
    assert graph.layer_kind("layer2.0.shortcut.0") == "pointwise"
    assert graph.layer_kind("fc") == "linear"


def test_mobilenet_depthwise_convs_join_their_expansion():
    graph = digits_graph("mobilenetv2")
    depthwise = [name for name in graph.layers if graph.layer_kind(name) == "depthwise"]
    assert len(depthwise) == 17
    for name in depthwise:
        group = graph.group_of(name)
        producer = graph.layers[graph.layers.index(name) - 1]
        assert producer in group
        assert name in graph.consumers(producer)
    assert graph.group_of("features.2.conv.1.0") == ["features.2.conv.0.0", "features.2.conv.1.0"]
    # Project convs of a stage meet at the residual adds.
    assert graph.group_of("features.5.conv.2") == [
        "features.4.conv.2",
        "features.5.conv.2",
        "features.6.conv.2",
    ]
    assert graph.consumers("features.18.0") == ["classifier"]  # pool -> flatten of a 1x1 map


def test_vit_attention_groups_and_heads():
    graph = digits_graph("vit")
    assert graph.group_of("blocks.0.attn.k") == [
        "blocks.0.attn.q",
        "blocks.0.attn.k",
        "blocks.0.attn.v",
    ]
    stream = graph.group_of("patch_embed")
    assert stream == [
        "patch_embed",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc2",
    ]
    assert graph.layer_kind("blocks.0.attn.q") == "attention"
    assert graph.layer_kind("blocks.0.mlp.fc1") == "linear"
    assert graph.layer_kind("patch_embed") == "conv"
    assert graph.heads("blocks.0.attn.v") == (4, 0, 1)
    assert graph.heads("blocks.0.attn.proj") == (4, 1, 1)
    assert graph.heads("blocks.0.mlp.fc1") is None
    assert graph.consumers("blocks.0.mlp.fc1") == ["blocks.0.mlp.fc2"]  # GELU(0) = 0
    assert graph.consumers("blocks.0.attn.v") == []  # through a matmul
    params = {n.target: n.params for n in graph.nodes if n.op_type == "other"}
    assert params["cls_token"] == 32 and params["pos_embed"] == 17 * 32
    # pos_embed is a parameter, not a skip: the first add has no residual edge.
    first_add = next(n.index for n in graph.nodes if n.op_type == "add")
    assert all(t != RESIDUAL for s, d, t in graph.edges if d == first_add)
    matmuls = [n for n in graph.nodes if n.op_type == "matmul"]
    assert len(matmuls) == 4 and all(n.flops == 2 * 4 * 17 * 17 * 8 for n in matmuls)


@pytest.mark.parametrize(
    "between,consumes",
    [
        (nn.ReLU(), True),
        (nn.GELU(), True),
        (nn.Sigmoid(), False),  # sigmoid(0) = 0.5: the channel is not dead downstream
        (nn.MaxPool2d(2), True),
        (nn.LayerNorm(4), False),  # mixes channels
        (nn.Dropout(0.5), True),
        (nn.Identity(), True),
    ],
)
def test_consumers_follow_zero_preserving_operators_only(between, consumes):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), between, nn.Conv2d(4, 2, 1))
    graph = build_graph(model, torch.randn(1, 3, 6, 6))
    assert graph.consumers("0") == (["2"] if consumes else [])


@pytest.mark.parametrize("expression,consumes", [("x * 0.5", True), ("x + 1", False)])
def test_scalar_arithmetic_on_the_path(expression, consumes):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.a(x)
            return self.b(x * 0.5 if expression == "x * 0.5" else x + 1)

    assert build_graph(Scaled(), torch.randn(1, 3)).consumers("a") == (["b"] if consumes else [])


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).flatten(1))


def test_untraceable_model_raises_trace_error_naming_module_and_fix():
    model = Branchy()
    with pytest.raises(TraceError) as info:
        build_graph(model, torch.randn(1, 1, 8, 8))
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'gate' (Gate)" in message and "if x.sum() > 0" in message
    assert "is_leaf_module" in message and "leaf_modules=['gate']" in message
    assert "torch.fx.wrap" in message
    assert "control flow" in message  # the original fx error
    # The fix works: as a leaf, the gate is one opaque node and the rest is analysed.
    x = torch.randn(1, 1, 8, 8)
    graph = build_graph(model, x, leaf_modules=["gate"])
    assert graph.layers == ["conv", "fc"]
    assert graph.dense_flops == reference_flops(model, x)
    assert [n.op_type for n in graph.nodes if n.target == "gate"] == ["other"]


def test_untraceable_root_forward_points_to_wrap():
    class Root(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x

    with pytest.raises(TraceError, match="the forward of Root.*torch.fx.wrap"):
        build_graph(Root(), torch.randn(1, 3))


def test_shared_module_is_not_prunable_and_inputs_untouched():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu_(self.a(self.a(x))))

    model = Twice()
    x = torch.randn(3, 4)
    before = x.clone()
    graph = build_graph(model, x)
    assert graph.layers == ["b"]
    assert graph.dense_flops == reference_flops(model, x) == 2 * (16 + 16 + 8)
    assert torch.equal(x, before)


def test_build_graph_leaves_training_state_and_statistics_alone():
    torch.manual_seed(0)
    model = zoo.entry("resnet20", "digits").build().train()
    stats = model.bn1.running_mean.clone()
    graph = build_graph(model, example("digits", batch=4))
    assert model.training and model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, stats)
    assert all(n.out_shape[0] == 1 for n in graph.nodes if n.op_type != "other")


def test_graph_instance_and_pyg_export():
    graph = digits_graph("mobilenetv2")
    features = np.random.default_rng(0).normal(size=(len(graph.nodes), 7))
    instance = graph.to_graph_instance(features)
    space = Graph(node_space=Box(-np.inf, np.inf, (7,), np.float32), edge_space=Discrete(3))
    assert space.contains(instance)
    assert instance.nodes.dtype == np.float32 and instance.nodes.shape == (len(graph.nodes), 7)
    assert instance.edges.dtype == np.int64 and instance.edges.shape == (len(graph.edges),)
    assert instance.edge_links.dtype == np.int64 and instance.edge_links.shape == (
        len(graph.edges),
        2,
    )
    assert set(instance.edges.tolist()) == {0, 1, 2}
    data = to_pyg(instance)
    assert data.x.dtype == torch.float32 and tuple(data.x.shape) == (len(graph.nodes), 7)
    assert data.edge_index.dtype == torch.long and tuple(data.edge_index.shape) == (
        2,
        len(graph.edges),
    )
    assert torch.equal(data.edge_index.t(), torch.from_numpy(instance.edge_links))
    assert torch.equal(data.edge_type, torch.from_numpy(instance.edges))
    with pytest.raises(ValueError, match="node_features must have shape"):
        graph.to_graph_instance(features[:-1])


def test_wrong_example_shape_is_a_value_error():
    model = zoo.entry("vgg11", "digits").build()
    with pytest.raises(ValueError, match=r"example inputs of shape \(1, 3, 8, 8\)"):
        build_graph(model, torch.randn(2, 3, 8, 8))


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(KeyError, match="not a prunable layer"):
        digits_graph("vgg11").consumers("features.1")


def test_projection_shortcut_is_the_residual_operand():
    """In a downsampling block the skip is the 1x1 shortcut branch, not the deeper bn2."""
    from autosculpt_env import zoo
    from autosculpt_env.graph import build_graph

    net = zoo.entry("resnet20", "digits").build().eval()
    graph = build_graph(net, torch.zeros(1, 1, 8, 8))
    for block in ("layer2.0", "layer3.0"):
        add = next(
            d
            for s, d, t in graph.edges
            if graph.nodes[s].target == f"{block}.bn2" and graph.nodes[d].op_type == "add"
        )
        kinds = {graph.nodes[s].target: t for s, d, t in graph.edges if d == add}
        assert kinds == {f"{block}.bn2": 0, f"{block}.shortcut.1": RESIDUAL}
