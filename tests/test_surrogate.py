"""The proxy's surrogate: keys, determinism, refusals, damaged files, leave-one-sampler-out,
samplers, and proxy-mode episodes on the digits twins. Tiny designs, digits only."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

import autosculpt_env
from autosculpt_env import surrogate as sg
from autosculpt_env import zoo
from autosculpt_env.evaluation import SAMPLE_SETTINGS, AccuracyEvaluator, ProxyEvaluator
from autosculpt_env.patterns import Action, Catalog, get_catalog
from autosculpt_env.policy_collection import (
    SAMPLERS,
    Collection,
    Design,
    EvaluationStore,
    StoreError,
    collect,
    draw,
)
from autosculpt_env.problem import PruningProblem

TINY = Design(per_sampler=4)
SETTINGS = (2048, 1024, 2048, 256, 16)  # as the env holds them (see config_key)
TWINS = ["AutoSculpt-ResNet", "AutoSculpt-VGG", "AutoSculpt-MobileNet", "AutoSculpt-ViT"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)) + x
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh surrogate cache; zoo weights still come from (and train into) the real one."""
    real_zoo = zoo.cache_dir() / "zoo"
    for model in ("resnet20", "vgg11", "mobilenetv2", "vit"):
        zoo.load(model, "digits")  # trains into the real cache on a fresh machine, once
    monkeypatch.setenv("AUTOSCULPT_ZOO_DIR", str(real_zoo))
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path / "cache"))
    from autosculpt_env.envs import autosculpt as envmod

    monkeypatch.setattr(envmod, "_SHARED", {})
    monkeypatch.setattr(sg, "FIRST_USE_DESIGN", TINY)
    return tmp_path / "cache"


def _problem(catalog="autosculpt"):
    problem = PruningProblem(Tiny(), "digits", catalog)
    plain = AccuracyEvaluator(problem, "digits", reward_samples=64, bn_recalibration_samples=0)
    return problem, plain


def _build(problem, plain, design=TINY, target=0.5, evaluator=None):
    key = sg.config_key(problem, plain, "digits", "accuracy", SETTINGS)
    evaluator = evaluator or (lambda: plain)
    return sg.build(problem, key, target, evaluator, design, progress=False), key


def _never():
    raise AssertionError("a policy was evaluated although every one was stored")


# ------------------------------------------------------------------------------- keys
def _catalog(first: bool) -> Catalog:
    def rule(w, kind, scores=None, **_):  # keep the first or the last half of the filters
        rows = torch.arange(w.shape[0]).view(-1, *[1] * (w.dim() - 1)).expand_as(w)
        return rows < w.shape[0] // 2 if first else rows >= w.shape[0] // 2

    dense = get_catalog("autosculpt").actions[0]
    half = Action("half", frozenset({"conv3x3", "conv", "linear"}), 0.5, (), rule)
    return Catalog("same-name", (dense, half))


def test_key_follows_the_masks_not_the_catalog_names():
    (pa, ea), (pb, eb) = _problem(_catalog(True)), _problem(_catalog(False))
    ka = sg.config_key(pa, ea, "digits", "accuracy", SETTINGS)
    kb = sg.config_key(pb, eb, "digits", "accuracy", SETTINGS)
    assert ka["catalog"] == kb["catalog"] and ka["actions"] == kb["actions"]
    assert ka["masks"] != kb["masks"]
    assert sg.evaluations_path(ka) != sg.evaluations_path(kb)
    assert sg.fit_path(ka, 0.5, TINY) != sg.fit_path(kb, 0.5, TINY)
    again = _problem(_catalog(True))
    assert sg.config_key(*again, "digits", "accuracy", SETTINGS) == ka
    # the mode and its settings are part of the key; the target is not (it keys the fit)
    kr = sg.config_key(pa, ea, "digits", "reconstruction", SETTINGS)
    assert kr["mode_settings"] == {"calibration_samples": 256} and kr != ka
    assert sg.fit_path(ka, 0.5, TINY) != sg.fit_path(ka, 0.7, TINY)
    assert sg.fit_path(ka, 0.5, TINY) != sg.fit_path(ka, 0.5, Design(per_sampler=5))


def test_two_catalogs_with_one_name_get_two_cache_entries(cache):
    for first in (True, False):
        _build(*_problem(_catalog(first)))
    assert len(list((cache / "surrogate" / "fits").glob("*.npz"))) == 2
    assert len(list((cache / "surrogate" / "evaluations").glob("*.jsonl"))) == 2


# ------------------------------------------------------------------ determinism, cache
def test_build_is_deterministic_and_served_from_the_cache(cache):
    problem, plain = _problem()
    s1, key = _build(problem, plain)
    s2, _ = _build(problem, plain, evaluator=_never)  # refitted from the stored evaluations
    loaded = sg.load_or_build(problem, key, 0.5, _never, progress=False)
    rng = np.random.default_rng(0)
    pols = np.stack([[rng.choice(np.flatnonzero(v)) for v in problem.valid] for _ in range(20)])
    for s in (s2, loaded):
        assert s.model_name == s1.model_name
        assert all(np.array_equal(v, s.model.arrays[k]) for k, v in s1.model.arrays.items())
        assert np.array_equal(s.predict(pols), s1.predict(pols))
    assert [s1(p) for p in pols] == [loaded(p) for p in pols]
    assert np.allclose(s1.predict(pols), [s1(p) for p in pols], atol=1e-12)
    dense = [problem.dense_action] * problem.num_layers
    assert s1(dense) == plain(dense) == s1.dense_accuracy


def test_collection_resumes_where_a_killed_run_stopped(cache):
    problem, plain = _problem()
    key = sg.config_key(problem, plain, "digits", "accuracy", SETTINGS)
    store = EvaluationStore(sg.evaluations_path(key), key)
    calls = []

    def dying():
        def score(policy):
            if len(calls) == 7:
                raise KeyboardInterrupt  # killed mid-collection
            calls.append(tuple(policy))
            return plain(policy)

        return score

    with pytest.raises(KeyboardInterrupt):
        collect(problem, store, dying, 0.5, TINY, progress=False)
    assert len(EvaluationStore(store.path, key)) == 7  # every finished evaluation kept
    resumed = []

    def counting():
        return lambda p: resumed.append(tuple(p)) or plain(p)

    full = collect(problem, store, counting, 0.5, TINY, progress=False)
    assert not set(resumed) & set(calls)  # nothing scored twice
    assert len(store) == 7 + len(resumed)
    assert full.counts == {s: 4 for s in SAMPLERS}
    again = collect(problem, EvaluationStore(store.path, key), _never, 0.5, TINY, progress=False)
    assert np.array_equal(again.policies, full.policies)
    assert np.array_equal(again.accuracy, full.accuracy)


def test_samplers_are_seeded_prefixes_and_playable(cache):
    env = gym.make("AutoSculpt-VGG", dataset="digits", reward_samples=32)
    base = env.unwrapped
    for name in SAMPLERS:
        small = draw(name, base.problem, 0.5, 3, 0, base.evaluator)
        large = draw(name, base.problem, 0.5, 6, 0, base.evaluator)
        assert large[:3] == small and len(set(large)) == 6
        assert draw(name, base.problem, 0.5, 6, 1, base.evaluator) != large  # the seed matters
        for policy in large:
            base.problem.check_policy(policy)
            reduction = 1.0 - base.problem.policy_flops(policy) / base.dense_flops
            if name != "unconstrained":  # played as a budget episode at the target
                assert reduction >= 0.5 - 1e-9
                env.reset(seed=0)
                for a in policy:
                    env.step(a)


# ------------------------------------------------------------------------- refusals
def test_surrogate_refuses_another_configuration_or_target(cache):
    problem, plain = _problem()
    s, key = _build(problem, plain)
    with pytest.raises(sg.SurrogateMismatch, match=r"mode 'accuracy' vs 'recovery'"):
        s.check({**key, "mode": "recovery"}, 0.5)
    with pytest.raises(sg.SurrogateMismatch, match="masks"):
        s.check({**key, "masks": "0" * 64}, 0.5)
    with pytest.raises(sg.SurrogateMismatch, match="FLOPs target 0.5, not 0.7"):
        s.check(key, 0.7)
    other = PruningProblem("vgg11", "digits")  # another network: another feature layout
    with pytest.raises(sg.SurrogateError, match=str(s.path)):
        sg.Surrogate.load(s.path, other)


def test_proxy_stands_for_the_registered_default(monkeypatch):
    assert sg.proxied_mode("vgg11", "autosculpt") == autosculpt_env.ENV_DEFAULTS["evaluation"]
    monkeypatch.setitem(
        autosculpt_env.REGISTERED_CONFIGS,
        "AutoSculpt-VGG",
        {**autosculpt_env.REGISTERED_CONFIGS["AutoSculpt-VGG"], "evaluation": "reconstruction"},
    )
    assert sg.proxied_mode("vgg11", "autosculpt") == "reconstruction"
    monkeypatch.setitem(
        autosculpt_env.REGISTERED_CONFIGS,
        "AutoSculpt-VGG",
        {**autosculpt_env.REGISTERED_CONFIGS["AutoSculpt-VGG"], "evaluation": "recovery"},
    )
    assert sg.proxied_mode("vgg11", "patdnn") == "accuracy"  # no registered id: env default
    assert sg.proxied_mode("Tiny", "autosculpt") == "accuracy"
    env = gym.make("AutoSculpt-VGG", dataset="digits", reward_samples=32)
    key, mode = sg.env_key(env)
    # the images the recovery fine-tuning used: the default, or the whole split when smaller
    default = SAMPLE_SETTINGS["recovery_samples"][1]
    used = min(default, autosculpt_env.data.split_size("digits", "train"))
    assert mode == "recovery" and key["mode_settings"]["recovery_samples"] == used


# ------------------------------------------------------------------- damaged files
def test_store_errors_name_the_file(cache):
    problem, plain = _problem()
    _, key = _build(problem, plain)
    path = sg.evaluations_path(key)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + lines[-1][:15])  # killed while writing a line
    store = EvaluationStore(path, key)
    assert len(store) == len(lines) - 1 and path.read_text() == "".join(lines)
    path.write_text("".join(lines[:3]) + "garbage\n" + "".join(lines[3:]))
    with pytest.raises(StoreError, match=rf"{path} line 4 .*delete {path}"):
        EvaluationStore(path, key)
    path.write_text("".join(lines))
    with pytest.raises(StoreError, match="another configuration"):
        EvaluationStore(path, {**key, "mode": "recovery"})


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_cached_fit_is_refitted_with_a_warning(cache, damage):
    problem, plain = _problem()
    s, key = _build(problem, plain)
    path = sg.fit_path(key, 0.5, TINY)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"PK\x03\x04junk")
    with pytest.warns(UserWarning, match=rf"{path}.*refitting it from the stored evaluations"):
        again = sg.load_or_build(problem, key, 0.5, _never, progress=False)  # no evaluation
    assert np.array_equal(again.predict(s.collection.policies), s.predict(s.collection.policies))
    assert sg.Surrogate.load(path, problem).model_name == s.model_name  # rewritten whole


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_damaged_shipped_file_names_it(cache, tmp_path, damage):
    problem, plain = _problem()
    s, key = _build(problem, plain)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    entry = sg.ship(s, "Tiny-v0", folder=shipped)
    assert entry["file"] == "Tiny-v0@0.5.npz" and entry["env_id"] == "Tiny-v0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = sg.load_or_build(problem, key, 0.5, _never, progress=False, shipped=shipped)
    assert ok.sha256 == entry["sha256"]
    path = shipped / entry["file"]
    data = bytearray(path.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[:100]))
    else:
        path.unlink()
    with pytest.raises(sg.SurrogateError, match=rf"{path}.*reinstall the package"):
        sg.load_or_build(problem, key, 0.5, _never, progress=False, shipped=shipped)


def test_shipped_manifest_hashes_verify():
    entries = sg.read_manifest()["surrogates"]
    if not entries:
        pytest.skip("no surrogate ships yet (benchmarks/proxy_fidelity.py --ship writes them)")
    for name, entry in entries.items():
        assert sg.verify_shipped(name).name == entry["file"]
        assert entry["env_id"] in autosculpt_env.REGISTERED_CONFIGS
        assert entry["key"]["mode"] == entry["mode"] and entry["policies"] >= 1000


# ------------------------------------------------------------- leave one sampler out
def test_leave_one_sampler_out_holds_each_sampler_out(monkeypatch):
    problem, _ = _problem()
    features = sg.Features(problem)
    rng = np.random.default_rng(0)
    unique: dict[tuple, None] = {}
    while len(unique) < 200:
        unique[tuple(int(rng.choice(np.flatnonzero(v))) for v in problem.valid)] = None
    pols = np.asarray(list(unique))
    pols[150] = pols[5]  # one policy drawn by samplers a and d
    x = features(pols)
    w = np.zeros(x.shape[1])
    for block in ("removed_energy", "pairs", "totals"):
        w[features.slices[block]] = rng.normal(size=features.layout()[block])
    z = x @ w
    y = 1 / (1 + np.exp(-3 * z / np.abs(z).max()))  # log-odds the pairwise ridge can fit exactly
    c = Collection(pols, y, np.repeat(np.arange(4), 50), ("a", "b", "c", "d"), 1.0)
    seen = []
    real = sg.fit_candidate

    def spy(name, xt, yt, f):
        seen.append(xt)
        return real(name, xt, yt, f)

    monkeypatch.setattr(sg, "fit_candidate", spy)
    h = sg.leave_one_sampler_out("pairwise", c, x, features)
    assert list(h.per_sampler) == ["a", "b", "c", "d"] and len(seen) == 4
    for j, train in enumerate(seen):
        held = {r.tobytes() for r in x[c.sampler == j]}
        assert not {r.tobytes() for r in train} & held  # no held-out policy is trained on
    assert [len(t) for t in seen] == [149, 150, 150, 149]  # the shared policy: out twice
    assert h.minimum > 0.95 and h.overall > 0.95
    noise = Collection(pols, rng.uniform(size=200), c.sampler, c.samplers, 1.0)
    assert sg.leave_one_sampler_out("pairwise", noise, x, features).minimum < 0.5


# ------------------------------------------------------------------- the env's proxy
SMALL = {"reward_samples": 64, "recovery_samples": 32}  # a cheap default reward to stand for


@pytest.mark.parametrize("env_id", TWINS)
def test_proxy_episode_on_every_digits_twin(cache, env_id):
    env = gym.make(env_id, dataset="digits", evaluation="proxy", **SMALL)
    base = env.unwrapped
    proxy = base._reward_evaluator
    assert isinstance(proxy, ProxyEvaluator)
    assert proxy.mode == autosculpt_env.REGISTERED_CONFIGS[env_id]["evaluation"]
    assert proxy.identity["sha256"] == zoo.sha256(proxy.surrogate.path)
    assert proxy.key == sg.env_key(gym.make(env_id, dataset="digits", **SMALL))[0]
    rng = np.random.default_rng(0)
    _, info = env.reset(seed=0)
    done = False
    while not done:
        _, reward, done, _, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
    assert 0.0 <= info["accuracy"] <= 1.0 and reward == info["accuracy"]
    dense = base.evaluate_policy([base.problem.dense_action] * base.num_layers)
    # the proxy answers the dense policy with what the mode it stands for gives it
    proxied = gym.make(env_id, dataset="digits", **SMALL).unwrapped._reward_evaluator
    assert dense["accuracy"] == info["dense_accuracy"] == proxied.dense_accuracy
    fits = list((cache / "surrogate" / "fits").glob("*.npz"))
    assert len(fits) == 1
    # a second process (here: a cleared memo) loads the fit instead of collecting again
    from autosculpt_env.envs import autosculpt as envmod

    envmod._SHARED.clear()
    mtime = fits[0].stat().st_mtime_ns
    again = gym.make(env_id, dataset="digits", evaluation="proxy", **SMALL)
    assert fits[0].stat().st_mtime_ns == mtime
    assert again.unwrapped.evaluate_policy(info["policy"])["accuracy"] == info["accuracy"]
    # another target: another surrogate, fitted on that target's policies
    gym.make(env_id, dataset="digits", evaluation="proxy", target_flops_reduction=0.3, **SMALL)
    assert len(list((cache / "surrogate" / "fits").glob("*.npz"))) == 2


def test_heldout_agreement_reads_the_manifest(tmp_path, monkeypatch, cache):
    monkeypatch.setitem(  # the surrogate below is fitted for accuracy: make that the default
        autosculpt_env.REGISTERED_CONFIGS,
        "AutoSculpt-VGG",
        {**autosculpt_env.REGISTERED_CONFIGS["AutoSculpt-VGG"], "evaluation": "accuracy"},
    )
    problem, plain = _problem()
    s, _ = _build(problem, plain)
    sg.ship(s, "AutoSculpt-VGG", folder=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["surrogates"]["AutoSculpt-VGG@0.5"]["heldout_min"] = 0.42  # a recognisable value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert sg.heldout_agreement("AutoSculpt-VGG", 0.5, tmp_path) == 0.42
    assert sg.heldout_agreement("AutoSculpt-VGG", 0.7, tmp_path) is None
    assert sg.heldout_agreement("AutoSculpt-ViT", 0.5, tmp_path) is None
    monkeypatch.setitem(
        autosculpt_env.REGISTERED_CONFIGS,
        "AutoSculpt-VGG",
        {**autosculpt_env.REGISTERED_CONFIGS["AutoSculpt-VGG"], "evaluation": "recovery"},
    )
    assert sg.heldout_agreement("AutoSculpt-VGG", 0.5, tmp_path) is None  # fitted for accuracy


def test_the_env_serves_its_own_design_not_a_benchmarks(cache):
    problem, plain = _problem()
    bigger, key = _build(problem, plain, design=Design(per_sampler=6))  # as a benchmark does
    served = sg.load_or_build(problem, key, 0.5, lambda: plain, progress=False)
    assert served.design == TINY and bigger.design == Design(per_sampler=6)
    assert served.path != bigger.path and bigger.path.exists()
    assert len(served.collection.policies) < len(bigger.collection.policies)


def test_every_candidate_predicts_one_policy_as_a_batch_does(cache):
    env = gym.make("AutoSculpt-ResNet", dataset="digits", reward_samples=32)
    problem = env.unwrapped.problem
    features = sg.Features(problem)
    rng = np.random.default_rng(1)
    pols = np.stack([[rng.choice(np.flatnonzero(v)) for v in problem.valid] for _ in range(40)])
    x = features(pols)
    assert np.allclose(np.concatenate([features.one(p) for p in pols]), x, atol=1e-12)
    assert x.shape[1] == sum(features.layout().values())
    y = 1 / (1 + np.exp(-(x[:, features.slices["removed_energy"]].sum(1) - 5)))
    for name in sg.CANDIDATES:  # trees are also checked against scikit-learn when fitted
        model = sg.fit_candidate(name, x, y, features)
        batch = model.predict(x)
        assert np.allclose([model.predict(features.one(p))[0] for p in pols], batch, atol=1e-12)
        assert sg.spearman(batch, y) > 0.8, name  # each learns a smooth target it is fitted on


def test_the_proxy_report_spells_the_reward_a_surrogate_stands_for():
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_fidelity.py"
    spell = runpy.run_path(str(script))["proxied_candidate"]
    vit = {
        "mode": "recovery",
        "mode_settings": {"recovery_samples": 2048, "recipe": {"batch_size": 8}},
    }
    assert spell(vit) == "recovery[recovery_batch_size=8,recovery_samples=2048]"
    assert spell({**vit, "readout": "probability"}) == (
        "recovery[recovery_batch_size=8,recovery_samples=2048,reward_readout=probability]"
    )
    common = {"mode_settings": {"recovery_samples": 1024, "recipe": {"batch_size": 16}}}
    assert spell({"mode": "recovery", **common}) == "recovery"
    both = {"calibration_samples": 256, **common["mode_settings"]}
    assert spell({"mode": "reconstruction+recovery", "mode_settings": both}) == (
        "reconstruction+recovery"
    )
    assert spell({"mode": "accuracy", "mode_settings": {}}) == "accuracy"


def test_proxy_fidelity_benchmark_writes_its_report(cache, tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_fidelity.py"
    bench = runpy.run_path(str(script))
    out = tmp_path / "PROXY_FIDELITY.md"
    args = bench["Args"](
        tasks=["AutoSculpt-VGG@0.5"], dataset="digits", per_sampler=3, out=out, progress=False
    )
    bench["main"](args)
    report = out.read_text()
    assert "## AutoSculpt-VGG@0.5" in report and "*A small run (3 policies per sampler" in report
    assert "Stands for `recovery" in report and "of `vgg11` on `digits`" in report
    for sampler in SAMPLERS:
        assert f"| {sampler} | 3 |" in report
    fits = list((cache / "surrogate" / "fits").glob("*.npz"))
    assert len(fits) == 1  # cached under the benchmark's design, never served by the env
    again = tmp_path / "again.md"
    bench["main"](
        bench["Args"](
            tasks=["AutoSculpt-VGG@0.5"],
            dataset="digits",
            per_sampler=3,
            out=again,
            progress=False,
            report_only=True,
        )
    )  # from the cached fit: the same figures, nothing fitted or collected again
    strip = lambda text: text.split("## ", 1)[1]  # noqa: E731  (the command line differs)
    assert strip(again.read_text()) == strip(report)
    assert len(list((cache / "surrogate" / "fits").glob("*.npz"))) == 1
    never_fitted = bench["Args"](
        tasks=["AutoSculpt-ResNet@0.5"],
        dataset="digits",
        per_sampler=3,
        out=again,
        progress=False,
        report_only=True,
    )
    bench["main"](never_fitted)  # listed, not fitted
    assert "- AutoSculpt-ResNet@0.5: no shipped surrogate and no cached fit" in again.read_text()
    assert len(list((cache / "surrogate" / "fits").glob("*.npz"))) == 1
    with pytest.raises(SystemExit, match="ENV_ID@TARGET|target"):
        bench["main"](bench["Args"](tasks=["AutoSculpt-VGG@x"], dataset="digits", out=out))


def test_proxy_fidelity_store_keeps_the_evaluations_in_a_folder(cache, tmp_path, monkeypatch):
    """``--store DIR``: the evaluations go to DIR (a committed folder outlives the machine)
    and a second run resumes from them without evaluating again; the reward's seed agreement
    (``--reward-seed-policies``) is stored there too and read back by --report-only."""
    import runpy
    from pathlib import Path

    monkeypatch.setenv(sg.STORE_ENV, "")  # restored after the test (main sets it)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_fidelity.py"
    bench = runpy.run_path(str(script))
    store = tmp_path / "collections"
    args = dict(tasks=["AutoSculpt-VGG@0.5"], dataset="digits", per_sampler=2, progress=False)
    bench["main"](bench["Args"](**args, out=tmp_path / "a.md", store=store))
    files = list(store.glob("*.jsonl"))
    assert len(files) == 1
    lines = files[0].read_text().splitlines()
    # the key, then one line per evaluation (the drawn policies, and the dense reference)
    assert len(lines) >= 1 + 2 * len(SAMPLERS)
    assert not list((cache / "surrogate" / "evaluations").glob("*.jsonl"))
    assert "reward's seeds" not in (tmp_path / "a.md").read_text()  # none scored under seed 1

    # resumed, and --reward-seed-policies 2: each sampler's first 2 policies scored again
    # with the recovery pass under seed 1, in a store of their own key beside the first
    bench["main"](bench["Args"](**args, out=tmp_path / "b.md", store=store, reward_seed_policies=2))
    assert files[0].read_text().splitlines() == lines  # resumed: nothing evaluated again
    (seeded_file,) = set(store.glob("*.jsonl")) - set(files)
    seeded = seeded_file.read_text().splitlines()
    assert json.loads(seeded[0])["key"]["mode_settings"]["recovery_seed"] == 1
    assert len(seeded) == 1 + 2 * len(SAMPLERS)  # the key, 2 policies per sampler
    report = (tmp_path / "b.md").read_text()
    assert "reward's seeds |" in report
    for sampler in SAMPLERS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {sampler} |"))
        assert row.endswith("(2) |"), row
    bench["main"](bench["Args"](**args, out=tmp_path / "c.md", store=store, report_only=True))
    assert seeded_file.read_text().splitlines() == seeded  # read back, nothing scored again
    strip = lambda text: text.split("## ", 1)[1]  # noqa: E731  (the command line differs)
    assert strip((tmp_path / "c.md").read_text()) == strip(report)


def test_proxy_fidelity_measures_another_modes_surrogate_apart(cache, tmp_path, monkeypatch):
    """``--mode MODE``: a surrogate of a reward ``evaluation="proxy"`` does not serve (a
    candidate default's), under that mode's own key, reported to --out only, never shipped;
    the env's proxy is left as it was."""
    import runpy
    from pathlib import Path

    monkeypatch.setenv(sg.STORE_ENV, "")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_fidelity.py"
    bench = runpy.run_path(str(script))
    store = tmp_path / "collections"
    args = dict(tasks=["AutoSculpt-VGG@0.5"], dataset="digits", per_sampler=2, progress=False)
    mode = "reconstruction+recovery"
    bench["main"](bench["Args"](**args, mode=mode, out=tmp_path / "m.md", store=store))
    assert "Stands for `reconstruction+recovery` of `vgg11`" in (tmp_path / "m.md").read_text()
    (stored,) = store.glob("*.jsonl")
    env = gym.make("AutoSculpt-VGG", dataset="digits")
    assert json.loads(stored.read_text().splitlines()[0])["key"] == sg.env_key(env, mode)[0]
    assert sg.env_key(env, mode)[0] != sg.env_key(env)[0]  # not the key proxy mode reads
    for bad, match in (
        (dict(mode=mode), "give --out"),  # the published report keeps the served proxies
        (dict(mode=mode, out=tmp_path / "x.md", ship=True), "drop one"),
        (dict(mode="proxy", out=tmp_path / "x.md"), "stands for one of accuracy"),
    ):
        with pytest.raises(SystemExit, match=match):
            bench["main"](bench["Args"](**args, store=store, **bad))
    assert list(store.glob("*.jsonl")) == [stored]  # the refused runs scored nothing
    with pytest.raises(ValueError, match="not 'proxy'"):
        sg.env_key(env, "proxy")


def test_a_seeded_reward_evaluator_is_the_env_reward_under_another_seed(cache):
    from autosculpt_env.envs.autosculpt import seeded_reward_evaluator

    env = gym.make("AutoSculpt-VGG", dataset="digits", evaluation="recovery").unwrapped
    rng = np.random.default_rng(0)
    policies = [[int(rng.choice(np.flatnonzero(v))) for v in env.problem.valid] for _ in range(3)]
    base = [env.evaluate_policy(p)["accuracy"] for p in policies]
    assert [seeded_reward_evaluator(env, 0)(p) for p in policies] == base
    other = [seeded_reward_evaluator(env, 1)(p) for p in policies]
    assert other != base  # the seed decides the recovery pass's batches
    assert [env.evaluate_policy(p)["accuracy"] for p in policies] == base  # env untouched
    key, _ = sg.env_key(env)
    assert sg.seeded_key(key, 0) == key and sg.seeded_key(key, 1) != key
    plain = gym.make("AutoSculpt-VGG", dataset="digits", evaluation="accuracy")
    with pytest.raises(ValueError, match="no seed"):
        seeded_reward_evaluator(plain, 1)


def _collect_in_child(problem, plain, key, path):
    store = EvaluationStore(path, key)
    collect(problem, store, lambda: plain, 0.5, TINY, progress=False)


def test_two_collectors_share_one_store(cache):
    import multiprocessing as mp

    problem, plain = _problem()
    key = sg.config_key(problem, plain, "digits", "accuracy", SETTINGS)
    path = sg.evaluations_path(key)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_collect_in_child, args=(problem, plain, key, path)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    policies = [tuple(json.loads(line)["policy"]) for line in lines[1:]]
    assert len(policies) == len(set(policies))  # nothing scored twice, no line interleaved
    full = collect(problem, EvaluationStore(path, key), _never, 0.5, TINY, progress=False)
    assert {tuple(p) for p in full.policies} <= set(policies)


# ------------------------------------------------------- other targets, shipped evaluations
def test_other_targets_train_but_are_never_held_out(cache):
    problem, plain = _problem()
    key = sg.config_key(problem, plain, "digits", "accuracy", SETTINGS)
    store = EvaluationStore(sg.evaluations_path(key), key)
    pooled = Design(per_sampler=4, also_targets=(0.3,))
    mine = collect(problem, store, lambda: plain, 0.5, TINY, progress=False)
    theirs = collect(problem, store, lambda: plain, 0.3, TINY, progress=False)
    both = collect(problem, store, _never, 0.5, pooled, progress=False)  # all stored already
    n = len(mine.policies)
    assert np.array_equal(both.policies[:n], mine.policies)  # the target's own, first
    assert not both.training_only[:n].any() and both.training_only[n:].all()
    assert both.counts == mine.counts  # counts are the target's own policies
    constrained = theirs.sampler != SAMPLERS.index("unconstrained")  # same at every target
    assert np.array_equal(both.policies[n:], theirs.policies[constrained])
    assert np.array_equal(both.sampler[n:], theirs.sampler[constrained])

    seen = []
    real = sg.fit_candidate

    def spy(name, xt, yt, f):
        seen.append({r.tobytes() for r in xt})
        return real(name, xt, yt, f)

    features = sg.Features(problem)
    x = features(both.policies)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sg, "fit_candidate", spy)
        h = sg.leave_one_sampler_out("additive", both, x, features)
    rows = [r.tobytes() for r in x]
    for j, train in enumerate(seen):
        own_j = {
            r for r, lab, t in zip(rows, both.sampler, both.training_only) if lab == j and not t
        }
        other_j = {r for r, lab, t in zip(rows, both.sampler, both.training_only) if lab != j and t}
        assert not train & own_j  # the held-out policies are never trained on
        assert other_j - own_j <= train  # other samplers' other-target policies train
        same_sampler = {
            r for r, lab, t in zip(rows, both.sampler, both.training_only) if lab == j and t
        }
        assert not train & same_sampler  # nor the held-out sampler's draws at other targets
    assert set(h.per_sampler) == set(SAMPLERS)

    s = sg.fit(problem, key, 0.5, pooled, both)
    path = s.save(cache / "pooled.npz")
    back = sg.Surrogate.load(path, problem)
    assert np.array_equal(back.collection.training_only, both.training_only)
    assert back.design == pooled and back.meta()["training_only"] == len(both.policies) - n

    with pytest.raises(ValueError, match="include the fit target 0.3"):
        collect(problem, store, _never, 0.3, pooled, progress=False)
    with pytest.raises(ValueError, match=r"also_targets must be FLOPs reductions in \(0, 1\)"):
        Design(also_targets=(1.5,))
    assert "also_targets" not in TINY.to_dict()  # existing designs keep their digests
    assert Design.from_dict(pooled.to_dict()) == pooled


def test_a_fresh_store_is_seeded_from_the_shipped_evaluations(cache, tmp_path, monkeypatch):
    problem, plain = _problem()
    s, key = _build(problem, plain)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    sg.ship(s, "Tiny-v0", folder=shipped)
    monkeypatch.setenv("AUTOSCULPT_CACHE", str(tmp_path / "fresh"))  # a machine without them
    store = EvaluationStore(sg.evaluations_path(key), key)
    assert len(store) == 0
    added = sg.import_shipped(problem, store, shipped)
    assert added == len({tuple(p) for p in s.collection.policies}) + 1  # and the dense one
    assert sg.import_shipped(problem, store, shipped) == 0  # nothing twice
    again = sg.build(problem, key, 0.5, _never, TINY, progress=False, shipped=shipped)
    assert np.array_equal(again.collection.accuracy, s.collection.accuracy)
    other = EvaluationStore(tmp_path / "other.jsonl", {**key, "mode": "recovery"})
    assert sg.import_shipped(problem, other, shipped) == 0  # another key's store takes none
    path = shipped / "Tiny-v0@0.5.npz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(sg.SurrogateError, match="reinstall the package"):
        sg.import_shipped(problem, EvaluationStore(tmp_path / "x.jsonl", key), shipped)


def test_proxy_fidelity_pools_a_networks_other_targets(cache, tmp_path):
    import runpy
    from pathlib import Path

    from autosculpt_env.leaderboard import Task

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_fidelity.py"
    bench = runpy.run_path(str(script))
    assert bench["other_targets"](Task.parse("AutoSculpt-ResNet@0.5")) == (0.7,)
    assert bench["other_targets"](Task.parse("AutoSculpt-ResNet@0.7")) == (0.5,)
    assert bench["other_targets"](Task.parse("AutoSculpt-VGG@0.5")) == ()
    assert bench["other_targets"](Task.parse("AutoSculpt-ResNet@0.5"), pool=False) == ()
    out = tmp_path / "PROXY_FIDELITY.md"
    args = bench["Args"](
        tasks=["AutoSculpt-ResNet@0.7"], dataset="digits", per_sampler=2, out=out, progress=False
    )
    bench["main"](args)
    report = out.read_text()
    assert "and 8 more drawn at target 0.5 to train on (never held out)" in report
    for sampler in SAMPLERS:
        assert f"| {sampler} | 2 |" in report  # the held-out counts are the target's own


def test_a_store_records_thread_counts_and_warns_when_they_mix(cache):
    problem, plain = _problem()
    key = sg.config_key(problem, plain, "digits", "accuracy", SETTINGS)
    store = EvaluationStore(sg.evaluations_path(key), key)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            collect(problem, store, lambda: plain, 0.5, TINY, progress=False)
        lines = [json.loads(line) for line in store.path.read_text().splitlines()[1:]]
        assert {d["threads"] for d in lines} == {1}
        assert EvaluationStore(store.path, key).threads == {1}  # read back from the file
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match=r"made with \[1\] torch thread\(s\).*runs 2"):
            collect(problem, store, lambda: plain, 0.5, Design(per_sampler=6), progress=False)
    finally:
        torch.set_num_threads(before)
    copied = EvaluationStore(cache / "copied.jsonl", key)
    with copied.locked():
        copied.add((0,) * problem.num_layers, 0.5)  # a copied value: thread count unknown
    assert copied.threads == set() and "threads" not in copied.path.read_text()
