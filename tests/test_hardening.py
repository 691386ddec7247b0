"""Issue 14: files and callers are untrusted input, and no work is lost.

One test per case of the issue (each fails on the code before the fix), on the digits twin
of AutoSculpt-ResNet, plus hypothesis fuzz tests over records and rows: any mutation of a
valid record or row either validates identically or fails with a one-line error.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import autosculpt_env  # noqa: F401
from autosculpt_env import cli, evaluation_limit, records, tracking, zoo
from autosculpt_env import leaderboard as lb
from autosculpt_env.patterns import Action, Catalog, get_catalog
from autosculpt_env.problem import PruningProblem

ROOT = Path(__file__).resolve().parents[1]
TASK = lb.Task("AutoSculpt-ResNet", 0.5)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env():
    e = gym.make("AutoSculpt-ResNet", dataset="digits")
    yield e
    e.close()


@pytest.fixture(scope="module")
def record(env):
    """A valid record of a pruned (not dense) policy."""
    base = env.unwrapped
    _, info = env.reset(seed=0)
    done = False
    while not done:  # the most pruning action every layer allows
        a = int(np.flatnonzero(info["action_mask"])[-1])
        _, _, done, _, info = env.step(a)
    return base.episode_record()


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    """One real leaderboard row: random search, 2 reward evaluations, fine-tuned on 64 images."""
    work = tmp_path_factory.mktemp("board")
    protocol = lb.make_protocol(
        max_reward_evaluations=2,
        seeds=[1],
        dataset="digits",
        finetune_epochs=1,
        finetune_samples=64,
    )
    r = lb.run_one(TASK, "random_search", 1, protocol, work / "runs")
    return json.loads(json.dumps(r))


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _errors(rows, **kw) -> list[str]:
    return [e for v in lb.validate(rows, **kw) for e in v["errors"]]


def _forge(row: dict, key: str, mkey: str, delta: float = 0.01) -> dict:
    """A row whose field and its record's metric are both changed: consistent, but false."""
    forged = copy.deepcopy(row)
    forged[key] = row[key] - delta
    forged["record"]["metrics"][mkey] = row[key] - delta
    return forged


# ------------------------------------------------------------ 1. forged scores validate
def test_valid_row_validates(row):
    assert _errors([row]) == []


def test_validate_full_refits_test_accuracy(row):
    forged = copy.deepcopy(row)
    forged["test_accuracy"] = min(1.0, row["test_accuracy"] + 0.05)
    forged["score"] = forged["test_accuracy"]  # the score of a fine-tuned row is its test accuracy
    forged["record"]["extra"]["finetune"]["test_accuracy"] = forged["test_accuracy"]
    assert _errors([forged]) == []  # the cheap checks cannot see it ...
    errors = _errors([forged], full=True)  # ... fine-tuning again does
    assert any("test_accuracy" in e for e in errors), errors


def test_validate_checks_params_reduction(row):
    errors = _errors([_forge(row, "params_reduction", "params_reduction")])
    assert any("params_reduction" in e for e in errors), errors


def test_validate_checks_summary_fields_against_record(row):
    forged = copy.deepcopy(row)
    forged["dense_reward_accuracy"] = 1.0
    errors = _errors([forged])
    assert any("dense_reward_accuracy" in e for e in errors), errors


@pytest.mark.parametrize("key", ["reward", "dense_accuracy", "params_reduction", "pruning_rate"])
def test_evaluate_checks_every_metric(record, tmp_path, capsys, key):
    d = json.loads(record.to_json())
    d["metrics"][key] -= 0.01
    code = cli.main(["evaluate", str(_write(tmp_path / "r.json", d))])
    out = capsys.readouterr().out
    assert code == 1 and "replay: OK" not in out and key in out


# ------------------------------------------------------ 2. a record can import any module
def test_record_cannot_import_a_module(record, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = json.loads(record.to_json())
    d["env_id"] = "evilmod:AutoSculpt-ResNet"
    code = cli.main(["evaluate", str(_write(tmp_path / "r.json", d))])
    assert code != 0 and not marker.exists()
    assert "not a registered AutoSculpt id" in capsys.readouterr().err


def test_row_cannot_import_a_module(row, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evilrow.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forged = copy.deepcopy(row)
    forged["env_id"] = forged["record"]["env_id"] = "evilrow:AutoSculpt-ResNet"
    errors = _errors([forged])
    assert errors and not marker.exists()
    assert any("not a registered AutoSculpt id" in e for e in errors), errors


def test_leaderboard_task_cannot_import_a_module(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "eviltask.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    script, ran = _fake_agent(tmp_path)
    protocol = lb.make_protocol(max_reward_evaluations=2, seeds=[1], dataset="digits")
    task = lb.Task.parse("eviltask:AutoSculpt-ResNet@0.5")
    with pytest.raises(ValueError, match="not a registered AutoSculpt id"):
        lb.run_all(protocol, [task], [str(script)], tmp_path / "rows", tmp_path / "runs")
    assert not marker.exists() and not ran.exists()


# ------------------------------------------------------------- 3. weight tying
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.l1, self.l2, self.fc = nn.Linear(512, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.l3 = nn.Linear(32, 32)
        self.l3.weight = self.l2.weight

    def forward(self, x):
        x = torch.relu(self.l1(torch.relu(self.conv(x)).flatten(1)))
        return self.fc(torch.relu(self.l3(torch.relu(self.l2(x)))))


def test_tied_weights_are_refused():
    with pytest.raises(ValueError, match=r"l2, l3 share one tensor.*ignored_layers"):
        PruningProblem(_Tied(), "digits")


# ------------------------------------------------------- 4. caches keyed on content
def _half_catalog(first: bool) -> Catalog:
    def rule(w, kind, **_):  # keep the first or the last half of the filters
        rows = torch.arange(w.shape[0]).view(-1, *[1] * (w.dim() - 1)).expand_as(w)
        return rows < w.shape[0] // 2 if first else rows >= w.shape[0] // 2

    half = Action("half", frozenset({"conv3x3", "conv", "linear"}), 0.5, (), rule)
    return Catalog("test-same-name", (get_catalog("autosculpt").actions[0], half))


@pytest.fixture
def unregister_catalogs(monkeypatch):
    """Catalogs a test registers are gone after it (other tests list the registry)."""
    from autosculpt_env import patterns
    from autosculpt_env.envs import autosculpt as envmod

    monkeypatch.setattr(patterns, "CATALOGS", dict(patterns.CATALOGS))
    monkeypatch.setattr(envmod, "_SHARED", dict(envmod._SHARED))


def test_catalog_name_registered_again_is_not_served_stale_masks(unregister_catalogs):
    from autosculpt_env.patterns import register_catalog

    kw = dict(dataset="digits", catalog="test-same-name", evaluation="accuracy")
    first, second = _half_catalog(True), _half_catalog(False)
    register_catalog(first)
    a = gym.make("AutoSculpt-ResNet", **kw).unwrapped
    register_catalog(second)  # the same name, other rules
    b = gym.make("AutoSculpt-ResNet", **kw).unwrapped
    assert a.problem.catalog is first and b.problem.catalog is second
    i = next(i for i in range(a.num_layers) if a.problem.valid[i][1])
    assert not torch.equal(a.problem.mask(i, 1), b.problem.mask(i, 1))


# ------------------------------------------------------------------ 5. non-bool masks
@pytest.mark.parametrize(
    "keep",
    [
        lambda w: torch.full_like(w, 0.5),  # float 0.5: used to cast to all-True
        lambda w: np.ones(tuple(w.shape), dtype=bool),
        lambda w: None,
        lambda w: torch.ones(3, dtype=torch.bool),
    ],
    ids=["float", "numpy", "none", "shape"],
)
def test_rule_must_return_a_bool_tensor(keep):
    half = Action("half", frozenset({"conv", "linear"}), 0.5, (), lambda w, kind, **_: keep(w))
    cat = Catalog("mine", (get_catalog("autosculpt").actions[0], half))
    with pytest.raises(ValueError, match=r"rule of action 'half' \(catalog 'mine'\)"):
        cat.mask(1, torch.randn(4, 8), "linear")


# --------------------------------------------------- 6. two runners on one rows folder
def _fake_agent(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "agent-ran"
    script = tmp_path / "fake_agent.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    return script, marker


@pytest.mark.parametrize("held", ["rows", "runs"])
def test_second_runner_on_a_folder_stops(tmp_path, held):
    script, marker = _fake_agent(tmp_path)
    (tmp_path / held).mkdir()
    fd = os.open(tmp_path / held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first runner
    try:
        protocol = lb.make_protocol(max_reward_evaluations=2, seeds=[1], dataset="digits")
        with pytest.raises(ValueError, match="in use by another leaderboard runner"):
            lb.run_all(
                protocol,
                [TASK],
                [str(script)],
                tmp_path / "rows",
                tmp_path / "runs",
                progress=False,
            )
    finally:
        os.close(fd)
    assert not marker.exists()


# ---------------------------------------------------- 7. finetune trusts record metrics
def test_finetune_refuses_metrics_that_do_not_follow_from_actions(record, env, tmp_path, capsys):
    d = json.loads(record.to_json())
    dense = env.unwrapped.action_names[env.unwrapped.problem.dense_action]
    d["actions"] = [dense] * len(d["actions"])  # all dense, metrics still claim pruning
    out = tmp_path / "ft"
    argv = ["finetune", str(_write(tmp_path / "r.json", d)), "--out", str(out)]
    code = cli.main([*argv, "--samples", "32", "--epochs", "1", "--no-progress"])
    assert code != 0 and not out.exists()
    assert "do not follow from its actions" in capsys.readouterr().err


# ------------------------------------------------ 9. a search that produced nothing
@pytest.mark.parametrize(
    "agent, args",
    [
        ("random_search", ["--num-episodes", "0"]),
        # the issue's case: PPO with 4 envs and 2 reward evaluations finishes no episode
        ("ppo_mlp", ["--num-envs", "4", "--max-reward-evaluations", "2", "--no-save-model"]),
    ],
    ids=["no-episodes", "fewer-evaluations-than-envs"],
)
def test_agent_that_finishes_no_episode_fails(agent, args, tmp_path, monkeypatch, capsys):
    argv = [f"{agent}.py", "--env-id", "AutoSculpt-ResNet", "--dataset", "digits"]
    argv += ["--evaluation", "accuracy", "--threads", "1", "--no-progress", *args]
    argv += ["--output-dir", str(tmp_path), "--run-name", "r"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(evaluation_limit, "_PROCESS", None)  # the agent's limit ends with the test
    # in-process (runpy): the agent's imports are already loaded
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "agents" / f"{agent}.py"), run_name="__main__")
    assert e.value.code not in (0, None)
    assert "finished no episode" in capsys.readouterr().err
    assert not (tmp_path / "r" / "best.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(threads=0), "--threads"),
        (dict(max_reward_evaluations=-1), "--max-reward-evaluations"),
        (dict(env_id="NoSuch-v0"), "--env-id 'NoSuch-v0'"),
        (dict(num_envs=0), "--num-envs must be an integer >= 1"),
        (dict(num_minibatches=0), "--num-minibatches must be an integer >= 1"),
        (dict(learning_rate=float("nan")), "--learning-rate must be a finite number > 0"),
        (dict(critic_learning_rate=-1e-3), "--critic-learning-rate must be a finite number"),
    ],
    ids=[
        "threads-0",
        "negative-limit",
        "unknown-env-id",
        "no-envs",
        "no-minibatch",
        "lr-nan",
        "negative-lr",
    ],
)
def test_agent_arguments_are_checked_first(args, message):
    ns = types.SimpleNamespace(
        **{"threads": 1, "max_reward_evaluations": None, "env_id": "AutoSculpt-ResNet", **args}
    )
    with pytest.raises(SystemExit, match=message):
        tracking.check_args(ns)


# ---------------------------------------- 11. negative fine-tuning epochs are accepted
@pytest.mark.parametrize("epochs", [0, -1])
def test_protocol_refuses_no_finetuning(epochs):
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        lb.make_protocol(finetune_epochs=epochs, dataset="digits")


def test_cli_refuses_threads_zero(capsys):
    with pytest.raises(SystemExit):
        cli.main(["validate", "benchmarks/rows", "--threads", "0"])
    assert "--threads" in capsys.readouterr().err


# ------------------------------------------------------------------ fails unclearly
def test_unwritable_rows_folder_is_found_before_any_work(tmp_path):
    script, marker = _fake_agent(tmp_path)
    (tmp_path / "file").write_text("")
    protocol = lb.make_protocol(max_reward_evaluations=2, seeds=[1], dataset="digits")
    with pytest.raises(ValueError, match="rows folder .* is not writable.*Nothing was run"):
        lb.run_all(protocol, [TASK], [str(script)], tmp_path / "file" / "rows", tmp_path / "runs")
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_rows_folder_is_found_before_any_work(tmp_path):
    script, marker = _fake_agent(tmp_path)
    (tmp_path / "rows").mkdir(mode=0o500)
    protocol = lb.make_protocol(max_reward_evaluations=2, seeds=[1], dataset="digits")
    with pytest.raises(ValueError, match="not writable"):
        lb.run_all(protocol, [TASK], [str(script)], tmp_path / "rows", tmp_path / "runs")
    assert not marker.exists()


def test_wandb_without_network_goes_offline_quickly(tmp_path, monkeypatch):
    calls = {}
    fake = types.ModuleType("wandb")
    fake.Settings = lambda **kw: kw
    fake.init = lambda **kw: calls.update(kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr("socket.create_connection", no_network)
    run_dir, writer = tracking.start_run(types.SimpleNamespace(a=1), "r", str(tmp_path), True)
    writer.close()
    assert calls["mode"] == "offline"
    assert calls["settings"]["init_timeout"] <= 15


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: "{not json",
        lambda d: [d],
        lambda d: {k: v for k, v in d.items() if k != "metrics"},
        lambda d: {**d, "metrics": {k: v for k, v in d["metrics"].items() if k != "reward"}},
        lambda d: {**d, "metrics": {**d["metrics"], "accuracy": "high"}},
        lambda d: {**d, "actions": d["actions"][:-1]},
        lambda d: {**d, "layers": "conv1"},
        lambda d: {**d, "surprise": 1},
        lambda d: {**d, "env_kwargs": {**d["env_kwargs"], "entry_point": "os:system"}},
        lambda d: {**d, "env_kwargs": {**d["env_kwargs"], "reward_samples": "many"}},
        lambda d: {**d, "env_kwargs": []},
    ],
    ids=[
        "not-json",
        "list",
        "no-metrics",
        "metric-missing",
        "metric-string",
        "short-actions",
        "layers-string",
        "unknown-field",
        "unknown-kwarg",
        "kwarg-type",
        "kwargs-list",
    ],
)
def test_malformed_record_gives_one_line_naming_the_file(record, tmp_path, capsys, mutate):
    path = _write(tmp_path / "bad.json", mutate(json.loads(record.to_json())))
    code = cli.main(["evaluate", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["not-json", "not-an-object"])
def test_malformed_row_file_gives_one_line_naming_it(tmp_path, capsys, text):
    rows = tmp_path / "rows"
    rows.mkdir()
    bad = _write(rows / "AutoSculpt-ResNet@0.5__x__seed1.json", text)
    code = cli.main(["validate", str(rows)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and str(bad) in err, err


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.l1, self.l2, self.fc = nn.Linear(512, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.l1(torch.relu(self.conv(x)).flatten(1)))
        return self.fc(self.l2(torch.relu(self.l2(x))))


def test_module_called_twice_is_reported():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem = PruningProblem(_Twice(), "digits")
    assert "l2" not in problem.graph.layers
    assert any("l2 (2 calls)" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "convert, word",
    [
        (lambda m: m.double(), "torch.float64"),
        (lambda m: m.half(), "torch.float16"),
        (lambda m: m.to("meta"), "meta device"),
    ],
    ids=["float64", "half", "meta"],
)
def test_model_dtype_or_device_is_named(convert, word):
    with pytest.raises(ValueError) as e:
        PruningProblem(convert(_Twice()), "digits")
    assert word in str(e.value) and "in_channels" not in str(e.value)


def _weights_folder(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("AUTOSCULPT_ZOO_DIR", str(folder))
    key = "resnet20-fashion-mnist"
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def test_zoo_weights_folder_option(tmp_path, monkeypatch):
    weights, manifest = _weights_folder(tmp_path, monkeypatch)
    weights.write_bytes((zoo.SHIPPED_DIR / weights.name).read_bytes())
    manifest.write_text((zoo.SHIPPED_DIR / manifest.name).read_text())
    assert zoo.find("resnet20", "fashion-mnist")[0] == weights
    assert isinstance(zoo.load("resnet20", "fashion-mnist"), nn.Module)


def test_zoo_garbage_matching_its_hash(tmp_path, monkeypatch):
    weights, manifest = _weights_folder(tmp_path, monkeypatch)
    weights.write_bytes(b"garbage" * 100)
    man = json.loads((zoo.SHIPPED_DIR / manifest.name).read_text())
    manifest.write_text(json.dumps({**man, "sha256": zoo.sha256(weights)}))
    with pytest.raises(zoo.ZooError, match=f"{weights}.*not a loadable safetensors"):
        zoo.load("resnet20", "fashion-mnist")


def test_zoo_missing_manifest(tmp_path, monkeypatch):
    weights, manifest = _weights_folder(tmp_path, monkeypatch)
    weights.write_bytes((zoo.SHIPPED_DIR / weights.name).read_bytes())
    with pytest.raises(zoo.ZooError, match=f"{weights} has no {manifest.name}"):
        zoo.load("resnet20", "fashion-mnist")


def test_killed_runner_ends_its_agent(tmp_path):
    pid_file = tmp_path / "agent.pid"
    agent = tmp_path / "sleepy.py"
    agent.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    code = (
        "from autosculpt_env import leaderboard as lb\n"
        "p = lb.make_protocol(max_reward_evaluations=2, seeds=[1], dataset='digits')\n"
        f"lb.run_one(lb.Task('AutoSculpt-ResNet', 0.5), {str(agent)!r}, 1, p, {str(tmp_path)!r})\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and runner.poll() is None, "the agent did not start"
        time.sleep(0.1)
    agent_pid = int(pid_file.read_text())
    runner.kill()
    runner.wait()
    try:
        for _ in range(50):
            if not Path(f"/proc/{agent_pid}").exists() or "Z" in _proc_state(agent_pid):
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{agent_pid}").exists() or "Z" in _proc_state(agent_pid)
    finally:
        try:
            os.kill(agent_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_policy_mixing_names_and_indices(env):
    p = env.unwrapped.problem
    policy = [p.catalog.action_names[p.dense_action]] + [p.dense_action] * (p.num_layers - 1)
    with pytest.raises(ValueError, match="not a mix"):
        p.policy_indices(policy)


# ------------------------------------------ image counts: never cut behind the record's back
def test_record_states_the_image_counts_used(env, record):
    """The digits twin's default 2048 reward images: its reward split holds 120, and the
    record says 120 (it said 2048 while 120 were scored)."""
    from autosculpt_env import data

    base = env.unwrapped
    used = len(base.evaluator.labels)
    assert used == data.split_size("digits", "reward") == 120
    assert base.env_kwargs["reward_samples"] == record.env_kwargs["reward_samples"] == used
    train = data.split_size("digits", "train")
    for key in ("bn_recalibration_samples", "recovery_samples", "calibration_samples"):
        assert 0 <= record.env_kwargs[key] <= train, key
    again = records.make_env(record)  # replays with the counts it states
    assert again.unwrapped.env_kwargs == base.env_kwargs
    assert len(again.unwrapped.evaluator.labels) == used


@pytest.mark.parametrize(
    "key, split",
    [
        ("reward_samples", "reward"),
        ("bn_recalibration_samples", "train"),
        ("recovery_samples", "train"),
        ("calibration_samples", "train"),
    ],
)
def test_image_count_larger_than_its_split_is_refused(key, split):
    from autosculpt_env import data

    size = data.split_size("digits", split)
    message = rf"{key}={size + 1} is more than the {split} split of digits holds \({size} images\); pass {key} <= {size}"
    with pytest.raises(ValueError, match=message):
        gym.make("AutoSculpt-ResNet", dataset="digits", **{key: size + 1})
    # the largest count the split holds is accepted and stated as given
    if key == "reward_samples":
        e = gym.make("AutoSculpt-ResNet", dataset="digits", evaluation="accuracy", **{key: size})
        assert e.unwrapped.env_kwargs[key] == size


def test_a_zoo_models_own_defaults_fit_the_split_and_yield_to_given_values():
    """The ViT's own recovery defaults (2,048 images at batch 8) apply whichever id names the
    model; the digits twin's train split holds fewer, so the count is cut to it and the
    record says so; values a user gives are used as given, and refused past the split."""
    from autosculpt_env import data, zoo
    from autosculpt_env.evaluation import RECOVERY_BATCH_SIZE, RECOVERY_SAMPLES

    own = zoo.ZOO["vit"].env_defaults
    train = data.split_size("digits", "train")
    assert own["recovery_samples"] > train
    for env in (
        gym.make("AutoSculpt-ViT", dataset="digits"),
        gym.make("AutoSculpt-v0", model="vit", dataset="digits", evaluation="recovery"),
    ):
        kw = env.unwrapped.env_kwargs
        assert kw["recovery_samples"] == train
        assert kw["recovery_batch_size"] == own["recovery_batch_size"] != RECOVERY_BATCH_SIZE
        assert len(env.unwrapped._reward_evaluator.recovery_data) == train
    given = gym.make(
        "AutoSculpt-ViT", dataset="digits", recovery_samples=64, recovery_batch_size=32
    )
    assert given.unwrapped.env_kwargs["recovery_samples"] == 64
    assert given.unwrapped.env_kwargs["recovery_batch_size"] == 32
    resnet = gym.make("AutoSculpt-ResNet", dataset="digits").unwrapped.env_kwargs
    assert (resnet["recovery_samples"], resnet["recovery_batch_size"]) == (
        RECOVERY_SAMPLES,
        RECOVERY_BATCH_SIZE,
    )
    with pytest.raises(ValueError, match=rf"recovery_samples={train + 1} is more than"):
        gym.make("AutoSculpt-ViT", dataset="digits", recovery_samples=train + 1)


def test_train_subset_and_evaluator_refuse_more_than_the_split():
    from autosculpt_env import data
    from autosculpt_env.evaluation import AccuracyEvaluator
    from autosculpt_env.finetune import train_subset

    train, reward = data.split_size("digits", "train"), data.split_size("digits", "reward")
    assert len(train_subset("digits", train)) == train
    with pytest.raises(ValueError, match=rf"recovery_samples={train + 1} .* \({train} images\)"):
        train_subset("digits", train + 1, setting="recovery_samples")
    problem = PruningProblem("resnet20", "digits")
    with pytest.raises(ValueError, match=rf"reward_samples={reward + 1} .* \({reward} images\)"):
        AccuracyEvaluator(problem, "digits", reward_samples=reward + 1)


def test_finetune_samples_larger_than_the_split_are_refused_first(record, tmp_path, capsys):
    out = tmp_path / "ft"
    path = _write(tmp_path / "r.json", json.loads(record.to_json()))
    code = cli.main(["finetune", str(path), "--out", str(out), "--samples", "100000"])
    assert code != 0 and not out.exists()
    assert (
        "--samples=100000 is more than the train split of digits holds" in capsys.readouterr().err
    )


def test_protocol_finetune_samples_larger_than_the_split_stop_the_run_first(tmp_path):
    script, marker = _fake_agent(tmp_path)
    protocol = lb.make_protocol(
        max_reward_evaluations=2, seeds=[1], dataset="digits", finetune_samples=100000
    )
    with pytest.raises(ValueError, match=r"AutoSculpt-ResNet@0.5: finetune_samples=100000 .*"):
        lb.run_all(protocol, [TASK], [str(script)], tmp_path / "rows", tmp_path / "runs")
    assert not marker.exists()


def test_rows_and_records_get_the_usual_permissions(row, record, tmp_path):
    old = os.umask(0o022)
    try:
        path = lb.write_row(tmp_path / "rows", row)
        saved = record.save(tmp_path / "best.json")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert saved.stat().st_mode & 0o777 == 0o644


def test_finetuned_weights_get_the_usual_permissions(env, record, tmp_path):
    from autosculpt_env import finetune as ft

    base = env.unwrapped
    actions = base.problem.policy_indices(record.actions)
    model = base.pruned_model(actions)
    masks = base.problem.held_masks(actions)
    old = os.umask(0o022)
    try:
        out = ft.save(tmp_path / "ft", model, masks, record)
    finally:
        os.umask(old)
    for name in (ft.WEIGHTS_FILE, ft.MASKS_FILE, ft.RECORD_FILE):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_zoo_weights_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        zoo.train_entry("resnet20", "digits", out_dir=tmp_path, epochs=1, progress=False)
    finally:
        os.umask(old)
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)


# ---------------------------------------------------------------------- fuzz tests
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**9) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def _mutation(draw, base):
    """A copy of ``base`` with one value replaced, one key deleted or one key added."""
    obj = copy.deepcopy(base)
    paths = [p for p in _paths(obj) if p]
    path = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    kind = draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(_JSON)
    elif kind == "nudge" and isinstance(parent[path[-1]], int | float):
        parent[path[-1]] = parent[path[-1]] + draw(st.sampled_from([-1, 1e-3, 1e-9, 0.5]))
    else:
        parent[path[-1]] = draw(_JSON)
    return obj


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_records(record, tmp_path, data):
    original = json.loads(record.to_json())
    mutated = data.draw(_mutation(original))
    path = _write(tmp_path / "r.json", json.dumps(mutated))
    try:
        info = records.replay(records.load_record(path))
    except ValueError as e:
        assert _one_line(str(e)), str(e)
        return
    # it validates: then it validates identically (same policy, same metrics)
    rec = records.load_record(path)
    assert rec.actions == record.actions
    assert all(abs(info[k] - record.metrics[k]) <= 1e-3 for k in records.METRICS)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_rows(row, data):
    mutated = data.draw(_mutation(row))
    [result] = lb.validate([mutated])
    assert all(_one_line(e) for e in result["errors"]), result["errors"]
    if result["ok"]:  # it validates: then it says what the valid row says
        for k in ("policy", "test_accuracy", "flops_reduction", "reward", "agent", "seed"):
            assert mutated[k] == row[k]
