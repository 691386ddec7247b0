"""materialize: a policy as a smaller network with the masked network's outputs."""

from __future__ import annotations

import copy
import json
import warnings

import gymnasium as gym
import pytest
import torch
from torch import nn

import autosculpt_env  # noqa: F401  (registers the ids)
from autosculpt_env import data
from autosculpt_env import materialize as mat
from autosculpt_env.materialize import MaterializeError, PatternConv2d, materialize
from autosculpt_env.problem import PruningProblem

ENV_IDS = ["AutoSculpt-ResNet", "AutoSculpt-VGG", "AutoSculpt-MobileNet", "AutoSculpt-ViT"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return data.load("digits", "reward").images[:128]


def _uniform(problem, a: int) -> list[int]:
    return [a if problem.valid[i, a] else problem.dense_action for i in range(problem.num_layers)]


def _metrics(base, policy) -> dict:
    return {
        **base.evaluate_policy(policy),
        "stored_params": base.problem.cost.stored_params(policy),
    }


def _check(m, info: dict) -> None:
    # structurally the same function: float64 agrees to rounding; float32 within 1e-5 or
    # within the masked network's own float32 error (a different summation order)
    assert m.max_abs_diff_float64 <= 1e-9
    assert m.max_abs_diff <= max(1e-5, 2 * m.float32_noise)
    # the materialised network stores exactly the parameters the env counts; with those it
    # cut or zeroed (held at zero, or only ever seeing a removed channel) they make up what
    # the masked network stores
    assert m.params == round(info["params"])
    assert m.params + m.dead_params == round(info["stored_params"])


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_every_autosculpt_action_on_digits_twins(env_id, images):
    env = gym.make(env_id, dataset="digits", reward_samples=100)
    base = env.unwrapped
    p = base.problem
    smaller = 0
    for a in range(p.num_actions):
        policy = _uniform(p, a)
        m = mat.materialize_policy(env, policy, check_inputs=images)
        _check(m, _metrics(base, policy))
        n = sum(x.numel() for x in m.model.parameters())
        smaller += n < p.graph.dense_params
    assert smaller >= p.num_actions - 2  # the dense action (and maybe level_0.1) aside
    env.close()


@pytest.mark.parametrize(
    ("env_id", "catalog"),
    [
        ("AutoSculpt-ResNet", "structured"),
        ("AutoSculpt-ViT", "structured"),
        ("AutoSculpt-ResNet", "patdnn"),
        ("AutoSculpt-MobileNet", "nm"),
    ],
)
def test_other_catalogs(env_id, catalog, images):
    env = gym.make(
        env_id, dataset="digits", catalog=catalog, target_flops_reduction=0.001, reward_samples=100
    )
    base = env.unwrapped
    p = base.problem
    heads = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a in range(p.num_actions):
            policy = _uniform(p, a)
            m = mat.materialize_policy(env, policy, check_inputs=images)
            _check(m, _metrics(base, policy))
            heads += [x.num_heads for x in m.model.modules() if hasattr(x, "num_heads")]
            if catalog in ("patdnn", "nm") and a != p.dense_action:
                assert m.masked_layers  # said plainly: exported masked
                assert not any(isinstance(x, PatternConv2d) for x in m.model.modules())
    # a ViT's cls_token and pos_embed are cut as they should be, without a warning per build
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    if catalog == "structured" and "ViT" in env_id:
        assert min(heads) < 4  # removed heads are cut
    env.close()


class Branchy(nn.Module):
    """Residual add, channel concat, a grouped and a depthwise convolution."""

    def __init__(self):
        super().__init__()

        def cbr(c_in, c_out, groups=1):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, 1, 1, groups=groups, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        self.stem = cbr(1, 16)
        self.a = cbr(16, 16)
        self.dw = cbr(16, 16, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.grouped = cbr(32, 16, groups=2)
        self.res = cbr(16, 16)
        self.conv_s2 = nn.Conv2d(16, 24, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x), self.pw(self.dw(x))], 1)
        y = self.grouped(y)
        y = y + self.res(y)
        y = torch.relu(self.conv_s2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("catalog", ["autosculpt", "structured"])
def test_residual_concat_grouped_depthwise(catalog, images):
    torch.manual_seed(0)
    net = Branchy().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    p = PruningProblem(net, "digits", catalog=catalog)
    for a in range(p.num_actions):
        policy = _uniform(p, a)
        masked = copy.deepcopy(p.model)
        p.apply_policy(masked, policy)
        for split in (False, True):
            m = materialize(
                masked,
                p.policy_masks(policy),
                p.example_inputs,
                check_inputs=images,
                split_depthwise=split,
            )
            assert m.max_abs_diff_float64 <= 1e-9
            assert m.params == round(p.policy_params(policy))
            assert m.params + m.dead_params == round(p.cost.stored_params(policy))
    # at a high level the lone 3x3 convolutions really are split into dense parts
    assert catalog != "autosculpt" or any(isinstance(x, PatternConv2d) for x in m.model.modules())


def test_onnx_round_trip_and_export_command(tmp_path, images):
    env = gym.make("AutoSculpt-ResNet", dataset="digits", reward_samples=100)
    base = env.unwrapped
    policy = _uniform(base.problem, 5)
    record = base.episode_record(policy)
    env.close()
    record.save(tmp_path / "best.json")
    from autosculpt_env.cli import main

    out = tmp_path / "export"
    assert (
        main(
            [
                "export",
                str(tmp_path / "best.json"),
                "--out",
                str(out),
                "--repeats",
                "2",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    for f in ("model.safetensors", "model.onnx", "dense.onnx", "report.json", "record.json"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["max_abs_diff_float64"] <= 1e-9
    assert report["params_materialised"] == round(report["params_env"])
    # the ONNX files run in onnxruntime and agree with torch
    m = mat.materialize_policy(
        gym.make("AutoSculpt-ResNet", dataset="digits", reward_samples=100), policy
    )
    assert mat.check_onnx(out / "model.onnx", m.model, images) <= 1e-4
    assert mat.check_onnx(out / "dense.onnx", base.problem.model, images) <= 1e-4
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    m.model.load_state_dict(state)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(self.conv(x).mean((2, 3)))


def test_clear_errors(images):
    net = Untraceable().eval()
    masks = {"conv": torch.ones(8, 1, 3, 3, dtype=torch.bool)}
    with pytest.raises(MaterializeError, match="cannot materialise Untraceable"):
        materialize(net, masks, images[:1])
    env = gym.make("AutoSculpt-ResNet", dataset="digits", reward_samples=100)
    p = env.unwrapped.problem
    masks = p.policy_masks([p.dense_action] * p.num_layers)
    masks["conv1"] = masks["conv1"][:4]
    with pytest.raises(MaterializeError, match="mask of conv1 has shape"):
        materialize(p.model, masks, images[:1])
    with pytest.raises(MaterializeError, match="does not have"):
        materialize(p.model, {"nope": torch.ones(1, dtype=torch.bool)}, images[:1])
    env.close()
