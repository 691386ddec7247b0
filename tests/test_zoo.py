import json
from dataclasses import replace

import pytest
import torch
from conftest import needs_fashion_mnist
from safetensors.torch import load_file

from autosculpt_env import data, zoo
from autosculpt_env.cli import main as cli_main
from autosculpt_env.training import accuracy


def test_available_lists_every_entry():
    rows = zoo.available()
    pairs = {(r["model"], r["dataset"]) for r in rows}
    assert {(m, "fashion-mnist") for m in zoo.MODELS} <= pairs
    assert {(m, "digits") for m in zoo.MODELS} <= pairs


@pytest.mark.parametrize("model", zoo.MODELS)
def test_shipped_weights_exist_with_manifest(model):
    path = zoo.SHIPPED_DIR / f"{model}-fashion-mnist.safetensors"
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert zoo.sha256(path) == manifest["sha256"]
    for field in (
        "config",
        "dataset",
        "splits",
        "seed",
        "epochs",
        "command",
        "test_accuracy",
        "sha256",
    ):
        assert field in manifest
    assert manifest["splits"]["trained_on"] == "train"
    assert manifest["command"].startswith("autosculpt zoo train")


@needs_fashion_mnist
@pytest.mark.parametrize("model", zoo.MODELS)
def test_shipped_weights_score_their_manifest_accuracy(model):
    net = zoo.load(model, "fashion-mnist")
    assert not net.training
    manifest = zoo.find(model, "fashion-mnist")[1]
    test = data.load("fashion-mnist", "test")
    acc = accuracy(net, test, limit=1000)
    assert abs(acc - manifest["test_accuracy"]) <= 0.02, (acc, manifest["test_accuracy"])


def test_digits_entry_trains_on_first_use_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    net = zoo.load("resnet20", "digits")
    path = tmp_path / "zoo" / "resnet20-digits.safetensors"
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["test_accuracy"] > 0.85 and manifest["splits"]["trained_on"] == "train"
    assert accuracy(net, data.load("digits", "test")) == pytest.approx(
        manifest["test_accuracy"],
        abs=5e-5,  # the manifest rounds to 4 places
    )
    again = zoo.load("resnet20", "digits")  # from the cache, no retraining
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values())
    )


def test_corrupt_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    zoo.train_entry("vgg11", "digits", out_dir=tmp_path / "zoo", epochs=1, progress=False)
    path = tmp_path / "zoo" / "vgg11-digits.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(zoo.ZooError, match="sha256"):
        zoo.load("vgg11", "digits")


def test_stale_cache_is_retrained_not_misloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    monkeypatch.delenv("AUTOSCULPT_ZOO_DIR", raising=False)
    entry = zoo.entry("vgg11", "digits")
    # one epoch keeps the retraining short; the entry's config is what must come back
    monkeypatch.setitem(
        zoo.ENTRIES, ("vgg11", "digits"), replace(entry, recipe={**entry.recipe, "epochs": 1})
    )
    zoo.train_entry("vgg11", "digits", out_dir=tmp_path / "zoo", progress=False)
    man = tmp_path / "zoo" / "vgg11-digits.json"
    weights = man.with_suffix(".safetensors")
    m = json.loads(man.read_text())
    m["config"] = {"width_mult": 1.0}  # an older version of the entry
    man.write_text(json.dumps(m))
    assert zoo.find("vgg11", "digits") is None  # passed over, not misloaded

    net = zoo.load("vgg11", "digits")  # retrains into the cache
    fresh = json.loads(man.read_text())
    assert fresh["config"] == entry.config and fresh["epochs"] == 1
    assert fresh["sha256"] == zoo.sha256(weights)
    assert zoo.find("vgg11", "digits") == (weights, fresh)
    stored = load_file(str(weights))
    assert stored.keys() == net.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())


def test_unknown_entry_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no zoo entry for model 'resnet99'"):
        zoo.load("resnet99", "digits")
    monkeypatch.setattr(zoo, "SHIPPED_DIR", tmp_path / "empty")
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path))
    with pytest.raises(
        zoo.ZooError, match="autosculpt zoo train --model vit --dataset fashion-mnist"
    ):
        zoo.load("vit", "fashion-mnist")


def test_cli_zoo_list(capsys):
    assert cli_main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "fashion-mnist" in out


def test_safetensors_file_is_not_a_pickle():
    path = zoo.SHIPPED_DIR / "resnet20-fashion-mnist.safetensors"
    head = path.read_bytes()[:2]
    assert head != b"\x80\x04" and head != b"PK"  # neither a pickle stream nor a torch zip
