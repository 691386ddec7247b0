"""Fine-tuning holds the pruning exactly, recovers accuracy, and round-trips through disk.

All on the digits twin of AutoSculpt-ResNet (ResNet-20, 8x8 images): a fine-tune is ~2 s.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from safetensors.torch import load_file, save_file

import autosculpt_env  # noqa: F401
from autosculpt_env import data
from autosculpt_env import finetune as ft
from autosculpt_env.training import Recipe, accuracy


@pytest.fixture(scope="module")
def env():
    e = gym.make("AutoSculpt-ResNet", dataset="digits")
    yield e
    e.close()


def heavy_policy(base, level: str = "level_0.8") -> list[str]:
    """``level`` for every layer that takes it (the dense action elsewhere)."""
    a = base.action_names.index(level)
    dense = base.action_names[base.problem.dense_action]
    return [level if base.problem.valid[i, a] else dense for i in range(base.num_layers)]


@pytest.fixture(scope="module")
def tuned(env):
    """A heavily pruned ResNet-20 fine-tuned with an aggressive recipe (high lr, momentum,
    weight decay): the setting in which masks re-applied before the step would drift."""
    base = env.unwrapped
    policy = heavy_policy(base)
    before = base.pruned_model(policy)
    recipe = Recipe(epochs=3, lr=0.1, weight_decay=5e-3, batch_size=64, crop_padding=1, hflip=False)
    model, masks = ft.finetune(env, policy, recipe, seed=0, progress=False)
    return policy, before, model, masks


def test_masks_are_the_policys_pattern_assignment(env, tuned):
    base = env.unwrapped
    policy, _, _, masks = tuned
    idx = base.problem.actions_from_names(policy)
    for name, m in base.problem.policy_masks(idx).items():
        assert torch.equal(masks[f"{name}.weight"], m)
    # removed channels hold their batch-norm affine parameters too
    assert any(k.endswith("bn1.weight") and not v.all() for k, v in masks.items())


def test_masked_entries_stay_exactly_zero(tuned):
    _, before, model, masks = tuned
    params_before = dict(before.named_parameters())
    params_after = dict(model.named_parameters())
    moved = 0
    for name, keep in masks.items():
        w0, w1 = params_before[name].detach(), params_after[name].detach()
        assert (w1[~keep] == 0).all(), name
        assert int((w1 != 0).sum()) == int((w0 != 0).sum()), name  # nonzero count unchanged
        moved += int((w1[keep] != w0[keep]).sum())
    assert moved > 0  # the kept weights did train


def test_finetuning_recovers_accuracy(env):
    base = env.unwrapped
    policy = heavy_policy(base, "level_0.7")
    test = data.load("digits", "test")
    # fine-tuning starts from the masked network; the id's reward network (pruned_model)
    # has had the reward's short recovery already, so compare with the masked one
    masked = base.evaluator.calibrated_model(base.problem.policy_indices(policy))
    before = accuracy(masked, test)
    model, _ = ft.finetune(env, policy, seed=0, progress=False)  # the digits recipe
    after = accuracy(model, test)
    assert after >= before
    assert after > before + 0.2  # about 0.12 -> 0.96 on this policy


def test_save_load_round_trip(env, tuned, tmp_path):
    base = env.unwrapped
    policy, _, model, masks = tuned
    record = base.episode_record(policy)
    ft.save(tmp_path, model, masks, record)
    assert {p.name for p in tmp_path.iterdir()} == {
        ft.WEIGHTS_FILE,
        ft.MASKS_FILE,
        ft.RECORD_FILE,
    }
    stored = load_file(str(tmp_path / ft.MASKS_FILE))
    assert all(v.dtype == torch.uint8 for v in stored.values())

    loaded, loaded_masks, loaded_record = ft.load(tmp_path)
    assert loaded_record == record
    assert loaded_masks.keys() == masks.keys()
    assert all(torch.equal(loaded_masks[k], masks[k]) for k in masks)
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x = data.load("digits", "test").images[:64]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_refuses_weights_that_break_their_masks(env, tuned, tmp_path):
    policy, _, model, masks = tuned
    ft.save(tmp_path, model, masks, env.unwrapped.episode_record(policy))
    state = load_file(str(tmp_path / ft.WEIGHTS_FILE))
    name = next(k for k, v in masks.items() if not v.all() and k.endswith(".weight"))
    state[name][~masks[name]] = 1.0
    save_file(state, str(tmp_path / ft.WEIGHTS_FILE))
    with pytest.raises(ValueError, match="nonzero where the mask removes them"):
        ft.load(tmp_path)


def test_finetune_from_a_record_file(env, tmp_path):
    base = env.unwrapped
    record = base.episode_record(heavy_policy(base, "level_0.5"))
    path = record.save(tmp_path / "best.json")
    recipe = Recipe(epochs=1, lr=0.02, batch_size=64, crop_padding=1, hflip=False)
    model, masks = ft.finetune(path, recipe=recipe, seed=1, progress=False, train_samples=128)
    ft.check_masks(model, masks)
    assert len(ft.train_subset("digits", 128)) == 128


def test_finetune_never_reads_the_test_split(env, monkeypatch):
    splits = []
    load = data.load

    def spy(name, split, data_dir=None):
        splits.append(split)
        return load(name, split, data_dir)

    monkeypatch.setattr(data, "load", spy)
    recipe = Recipe(epochs=1, lr=0.02, batch_size=64, crop_padding=1, hflip=False)
    ft.finetune(env, heavy_policy(env.unwrapped), recipe, progress=False, train_samples=64)
    assert splits == ["train"]
