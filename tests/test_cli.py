"""The ``autosculpt`` command: every subcommand's --help, info, evaluate, finetune.

(``validate`` and ``leaderboard`` are exercised on real rows in test_leaderboard.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import pytest

import autosculpt_env  # noqa: F401
from autosculpt_env import cli
from autosculpt_env import finetune as ft

SUBCOMMANDS = [
    [],
    ["info"],
    ["zoo"],
    ["zoo", "list"],
    ["zoo", "train"],
    ["evaluate"],
    ["finetune"],
    ["validate"],
    ["leaderboard"],
]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a) or "autosculpt")
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: autosculpt") and len(out) > 100


def test_help_as_a_program():
    proc = subprocess.run(
        [sys.executable, "-m", "autosculpt_env.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for cmd in ("info", "zoo", "evaluate", "finetune", "validate", "leaderboard"):
        assert cmd in proc.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("AutoSculpt-ResNet", "AutoSculpt-ViT", "resnet20", "level_0.5", "2:4", "band"):
        assert word in out
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["envs"]["AutoSculpt-VGG"]["model"] == "vgg11"
    assert d["envs"]["AutoSculpt-VGG"]["bn_recalibration_samples"] == 1024
    assert d["envs"]["AutoSculpt-VGG"]["reward_samples"] is None  # 2048 or the whole split
    assert "level_0.9" in d["catalogs"]["autosculpt"]["actions"]
    assert set(d["rewards"]) == {"budget", "band", "log_flops", "tradeoff"}


def test_zoo_list_still_works(capsys):
    assert cli.main(["zoo", "list"]) == 0
    assert "resnet20" in capsys.readouterr().out


@pytest.fixture(scope="module")
def record_file(tmp_path_factory):
    env = gym.make("AutoSculpt-ResNet", dataset="digits")
    base = env.unwrapped
    policy = ["level_0.5"] * base.num_layers
    path = base.episode_record(policy).save(tmp_path_factory.mktemp("rec") / "best.json")
    env.close()
    return path


def test_evaluate(record_file, tmp_path, capsys):
    assert cli.main(["evaluate", str(record_file)]) == 0
    out = capsys.readouterr().out
    assert "replay: OK" in out and "flops_reduction" in out
    d = json.loads(record_file.read_text())
    d["metrics"]["flops"] += 2.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    assert cli.main(["evaluate", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_finetune(record_file, tmp_path, capsys):
    out_dir = tmp_path / "tuned"
    argv = ["finetune", str(record_file), "--out", str(out_dir), "--epochs", "1"]
    assert cli.main([*argv, "--samples", "128", "--no-progress"]) == 0
    assert "after" in capsys.readouterr().out
    model, masks, record = ft.load(out_dir)
    assert record.extra["finetune"]["recipe"]["epochs"] == 1
    assert record.extra["finetune"]["train_samples"] == 128
    ft.check_masks(model, masks)
    # a fine-tuned folder replays like its record
    assert cli.main(["evaluate", str(out_dir)]) == 0


def test_a_closed_pipe_ends_quietly(tmp_path, monkeypatch):
    """`autosculpt zoo list | head`: the reader leaves early; no traceback, exit code 1."""
    sink = open(tmp_path / "stdout", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["zoo", "list"]) == 1
    sink.close()
