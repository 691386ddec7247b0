"""How well does the proxy rank policies? Collect, fit, and measure it leave-one-sampler-out.

    python benchmarks/proxy_fidelity.py                       # every leaderboard task
    python benchmarks/proxy_fidelity.py --tasks AutoSculpt-ResNet@0.5 --per-sampler 12
    python benchmarks/proxy_fidelity.py --dataset digits      # the digits twins, fast
    python benchmarks/proxy_fidelity.py --ship                # ... and ship the surrogates
    python benchmarks/proxy_fidelity.py --report-only         # the report from what is stored
    python benchmarks/proxy_fidelity.py --tasks AutoSculpt-MobileNet@0.5 \\
        --mode reconstruction+recovery --out /tmp/PROXY.md  # a candidate default's proxy

For each task (env id @ FLOPs target): draws ``--per-sampler`` policies from each sampler of
:mod:`autosculpt_env.policy_collection`, scores each with the reward mode the proxy stands
for (the registered default, through the env's own ``evaluate_policy``), fits every
candidate of :mod:`autosculpt_env.surrogate` leave-one-sampler-out, keeps the one with the
best minimum held-out Spearman, and writes ``benchmarks/PROXY_FIDELITY.md``. Evaluations
are stored one by one in ``$AUTOSCULPT_CACHE/surrogate/evaluations``: a killed run resumes
where it stopped, and a larger ``--per-sampler`` reuses every policy a smaller one drew;
``--store DIR`` keeps them in ``DIR`` instead (commit it, and a collection longer than a
machine's lifetime resumes on the next: ``benchmarks/fidelity/collections``).
Tasks are independent: run two at once (one per core) with ``--tasks``, then ``--ship``
with all of them to write the report from stored evaluations alone (it refits), or
``--report-only`` to write it from the shipped or cached fits without fitting anything. ``--ship`` copies the
fitted surrogates and their evaluations into ``autosculpt_env/surrogates`` (with sha256 and
held-out figures in ``manifest.json``) so ``evaluation="proxy"`` is instant on install.

``--reward-seed-policies N`` scores each sampler's first ``N`` policies again with the
reward's recovery pass trained under seed 1 instead of 0 (stored like the evaluations) and
reports the reward's own seed-0-vs-1 Spearman per sampler: how much of the reward's ranking
of a sampler's policies is its training seed's. Context, not a bound on the surrogate: part
of a seed's effect varies smoothly with the policy, and a surrogate of the seed-0 values
learns it. Every report shows what is stored of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

import autosculpt_env  # noqa: F401
from autosculpt_env import surrogate
from autosculpt_env.envs.autosculpt import seeded_reward_evaluator
from autosculpt_env.leaderboard import TASKS, Task
from autosculpt_env.policy_collection import SAMPLERS, Design, EvaluationStore, rescore

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "PROXY_FIDELITY.md"


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: [t.name for t in TASKS])
    """tasks as ENV_ID@TARGET (default: the leaderboard's five)"""
    dataset: str | None = None
    """override every task's dataset (digits: a fast check of the pipeline)"""
    per_sampler: int = surrogate.FULL_DESIGN.per_sampler
    """unique policies drawn by each sampler"""
    samplers: tuple[str, ...] = SAMPLERS
    """samplers to draw from (leave-one-sampler-out needs at least two)"""
    seed: int = 0
    """seed of the samplers"""
    pool_targets: bool = True
    """also draw the samplers at the other leaderboard targets of a task's env id, to train
    on (not held out: Design.also_targets); a policy's accuracy does not depend on the target"""
    threads: int = 1
    """torch CPU threads"""
    ship: bool = False
    """copy the fitted surrogates into autosculpt_env/surrogates (registered datasets only)"""
    report_only: bool = False
    """write the report from the shipped (else cached) surrogates: no collection, no fit
    (tasks with neither are listed as not built yet)"""
    out: Path = DEFAULT_OUT
    """the markdown report"""
    progress: bool = True
    """progress bars"""
    store: Path | None = None
    """keep the evaluations in this folder instead of the cache (a committed folder lets a
    collection that outlasts the machine resume on the next one)"""
    mode: str | None = None
    """the reward mode the surrogates stand for (default: the one ``evaluation="proxy"``
    serves, the registered id's default): another measures a candidate default's proxy
    before a switch; it needs --out (the published report keeps the served proxies) and
    never ships"""
    reward_seed_policies: int = 0
    """score each sampler's first N policies again under the recovery pass's seed 1 (the
    reward's own seed agreement; 30 for the published report; with --report-only, the
    shipped surrogate's policies)"""


SEED = 1
"""The recovery seed the reward's seed agreement compares with the env's (0)."""


def run_task(name: str, args: Args) -> tuple[surrogate.Surrogate | None, dict]:
    """The task's surrogate (``None`` if --report-only finds none) and its reward's seed
    agreement (:func:`_seed_agreement`; empty for a reward that trains nothing)."""
    try:
        task = Task.parse(name)
    except ValueError as e:
        raise SystemExit(f"--tasks: {e}") from None
    env_id, target = task.env_id, task.target_flops_reduction
    kw = {} if args.dataset is None else {"dataset": args.dataset}
    mode = args.mode or surrogate.proxied_mode_of(env_id)
    scorer = gym.make(env_id, target_flops_reduction=target, evaluation=mode, **kw).unwrapped
    key, _ = surrogate.env_key(scorer, args.mode)

    def evaluator():
        return lambda policy: scorer.evaluate_policy(policy)["accuracy"]

    design = Design(
        tuple(args.samplers), args.per_sampler, args.seed, other_targets(task, args.pool_targets)
    )
    if args.report_only:
        s = _stored(name, scorer, key, target, design)
    else:
        t0 = time.perf_counter()
        s = surrogate.build(scorer.problem, key, target, evaluator, design, args.progress)
        print(
            f"{name}: {len(s.collection.policies)} policies ({scorer.num_reward_evaluations} "
            f"evaluated now), mode {mode}, chosen {s.model_name}, held-out Spearman min "
            f"{_num(s.meta()['heldout_min'])}, {time.perf_counter() - t0:.0f} s"
        )
    seeds = {}
    if s is not None and "recovery" in mode:
        seeds = _seed_agreement(name, scorer, key, s.collection, args)
    return s, seeds


def other_targets(task: Task, pool: bool = True) -> tuple[float, ...]:
    """The leaderboard's other targets of the task's env id (none without ``pool``)."""
    if not pool:
        return ()
    return tuple(
        sorted(
            {
                t.target_flops_reduction
                for t in TASKS
                if t.env_id == task.env_id
                and t.target_flops_reduction != task.target_flops_reduction
            }
        )
    )


def _seed_agreement(name: str, scorer, key: dict, collection, args: Args) -> dict:
    """``{sampler: (Spearman of the reward under seeds 0 and SEED, policies)}`` from what is
    stored, after scoring ``--reward-seed-policies`` per sampler (with --report-only too: it
    fits and collects nothing for the surrogate, and takes a shipped one's policies)."""
    seeded = surrogate.seeded_key(key, SEED)
    store = EvaluationStore(surrogate.evaluations_path(seeded), seeded)
    if args.reward_seed_policies > 0:

        def evaluator():
            return seeded_reward_evaluator(scorer, SEED)

        t0 = time.perf_counter()
        rescore(
            collection,
            store,
            evaluator,
            args.reward_seed_policies,
            args.progress,
            desc=f"{name} reward under seed {SEED}",
        )
        print(f"{name}: reward seed agreement scored, {time.perf_counter() - t0:.0f} s")
    out = {}  # the store read itself when opened, and holds what rescore added
    for j, sampler in enumerate(collection.samplers):
        own = (collection.sampler == j) & ~collection.training_only
        stored = {i: store.get(collection.policies[i]) for i in np.flatnonzero(own)}
        idx = [i for i, value in stored.items() if value is not None]
        again = np.asarray([stored[i] for i in idx])
        out[sampler] = (surrogate.spearman(collection.accuracy[idx], again), len(idx))
    return out


def _stored(
    name: str, scorer, key: dict, target: float, design: Design
) -> surrogate.Surrogate | None:
    """The shipped surrogate of a task, else the cached fit of ``design``, else ``None``;
    never collects or fits."""

    def refuse():
        raise SystemExit(f"--report-only: {name} would need policies scored; nothing was written")

    if (
        surrogate.find_shipped(key, target) is None
        and not surrogate.fit_path(key, target, design).exists()
    ):
        return None
    return surrogate.load_or_build(scorer.problem, key, target, refuse, design, progress=False)


def proxied_candidate(key: dict) -> str:
    """The reward a surrogate key stands for, spelt as a fidelity candidate (its mode with the
    settings it reads where they differ from the env's common defaults, e.g.
    ``recovery[recovery_batch_size=8,recovery_samples=2048]``)."""
    from autosculpt_env.fidelity import candidate_spec

    given = key.get("mode_settings", {})
    settings = {k: given[k] for k in ("recovery_samples", "calibration_samples") if k in given}
    if "recipe" in given:
        settings["recovery_batch_size"] = given["recipe"]["batch_size"]
    if "readout" in key:
        settings["reward_readout"] = key["readout"]
    return candidate_spec(key["mode"], settings)


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(
    results: dict[str, surrogate.Surrogate | None], seed_agreement: dict[str, dict], command: str
) -> str:
    lines = [
        "# Proxy fidelity",
        "",
        '`evaluation="proxy"` is a surrogate of the reward mode it stands for, fitted on '
        "evaluated policies (`autosculpt_env/surrogate.py`, policies from "
        "`autosculpt_env/policy_collection.py`). Its fidelity is measured leave-one-sampler-out "
        "(as NAS-Bench-301 measures its surrogates): each candidate model is fitted on every "
        "sampler's policies but one, and ranks the held-out sampler's; the figure is Spearman's "
        "ρ between predicted and measured accuracy. *min* is the lowest held-out figure (the "
        "goal: ≥ 0.8 on every task; three decimals, so that 0.797 does not read as 0.80); "
        "*pooled* ranks all out-of-fold predictions together. Where the task's env id has "
        "other leaderboard targets, the samplers also draw there (a policy's accuracy does not "
        "depend on the target): those policies train every fold but their own sampler's and "
        "are never held out (`--pool-targets`, the default). The "
        "candidate with the best *min* is refitted on all policies and used (marked ✓; its "
        "figures are the best of four on the same folds, so slightly optimistic). Predict: "
        "median time of one call, measured when it was fitted (machine load unknown). "
        f"*Reward's seeds*: Spearman between the reward and the same reward with its recovery "
        f"pass trained under seed {SEED} instead of 0, on a sampler's first policies (how many: "
        "in brackets; `--reward-seed-policies`): how much of the reward's ranking of a "
        "sampler's policies is its training seed's. Context, not a bound on the surrogate: "
        "part of a seed's effect varies smoothly with the policy, and a surrogate fitted on "
        "seed-0 values learns it.",
        "",
        f"Generated by `{command}`.",
        "",
    ]
    missing = [name for name, s in results.items() if s is None]
    for name, s in results.items():
        if s is None:
            continue
        meta = s.meta()
        c = s.collection
        cands = [k for k in surrogate.CANDIDATES if k in s.heldout]  # a fixed column order
        lines += [f"## {name}", ""]
        if meta["design"]["per_sampler"] < surrogate.FULL_DESIGN.per_sampler:
            lines += [
                f"*A small run ({meta['design']['per_sampler']} policies per sampler; the full "
                f"design draws {surrogate.FULL_DESIGN.per_sampler}): it checks the pipeline; its "
                "figures are not the proxy's published fidelity.*",
                "",
            ]
        seeds = seed_agreement.get(name, {})
        seeds = seeds if any(n for _, n in seeds.values()) else {}
        own = c.accuracy[~c.training_only]
        extra = meta.get("training_only", 0)
        also = meta["design"].get("also_targets", [])
        also = (
            f", and {extra} more drawn at target {', '.join(f'{t:g}' for t in also)} to train "
            "on (never held out)"
            if extra
            else ""
        )
        lines += [
            f"Stands for `{proxied_candidate(meta['key'])}` of `{meta['key']['model']}` on "
            f"`{meta['key']['dataset']}`, "
            f"{meta['policies'] - extra} policies ({meta['design']['per_sampler']} per "
            f"sampler, seed {meta['design']['seed']}) + the dense one (accuracy "
            f"{s.dense_accuracy:.4f}){also}; "
            f"measured accuracy {own.min():.4f}–{own.max():.4f}. Chosen: "
            f"**{s.model_name}**, predict {s.predict_us:.0f} µs.",
            "",
            "| sampler | policies | "
            + " | ".join(k + (" ✓" if k == s.model_name else "") for k in cands)
            + (" | reward's seeds" if seeds else "")
            + " |",
            "|---|---:|" + "---:|" * (len(cands) + bool(seeds)),
        ]
        tail = " |" if seeds else ""
        for sampler in c.samplers:
            row = [_num(s.heldout[k].per_sampler.get(sampler)) for k in cands]
            if seeds:
                rho, n = seeds.get(sampler, (None, 0))
                row.append(f"{_num(rho)} ({n})" if n else "–")
            lines.append(f"| {sampler} | {c.counts[sampler]} | " + " | ".join(row) + " |")
        lines.append(
            "| **min** | | "
            + " | ".join(f"**{_num(s.heldout[k].minimum, 3)}**" for k in cands)
            + tail
            + " |"
        )
        lines.append(
            "| pooled | | " + " | ".join(_num(s.heldout[k].overall) for k in cands) + tail + " |"
        )
        lines.append("")
    if missing:
        lines += ["## Not built yet", ""]
        lines += [
            f"- {name}: no shipped surrogate and no cached fit; "
            f"`python benchmarks/proxy_fidelity.py --tasks {name} --ship` builds it"
            for name in missing
        ]
        lines.append("")
    return "\n".join(lines)


def main(args: Args) -> None:
    import sys

    if args.ship and args.report_only:
        raise SystemExit("--ship fits and ships; --report-only fits nothing: pick one")
    if args.mode is not None:
        try:
            surrogate.check_proxiable(args.mode)
        except ValueError as e:
            raise SystemExit(f"--mode: {e}") from None
        if args.ship:
            raise SystemExit(
                f"--ship ships the surrogates evaluation='proxy' serves; --mode {args.mode} "
                "measures another reward's: drop one"
            )
        if args.out.resolve() == DEFAULT_OUT.resolve():
            raise SystemExit(
                f"--mode {args.mode}: give --out FILE; {DEFAULT_OUT.relative_to(ROOT)} keeps "
                "the figures of the surrogates evaluation='proxy' serves"
            )
    torch.set_num_threads(args.threads)
    if args.store is not None:
        args.store.mkdir(parents=True, exist_ok=True)
        os.environ[surrogate.STORE_ENV] = str(args.store.resolve())
    done = {name: run_task(name, args) for name in args.tasks}
    results = {name: s for name, (s, _) in done.items()}
    if args.ship:
        if args.dataset is not None:
            raise SystemExit("--ship ships the registered tasks' surrogates: drop --dataset")
        for name, s in results.items():
            entry = surrogate.ship(s, Task.parse(name).env_id, name)
            print(f"shipped {name}: {entry['file']} sha256 {entry['sha256'][:12]}…")
    command = "python benchmarks/proxy_fidelity.py " + " ".join(sys.argv[1:])
    seeds = {name: seeds for name, (_, seeds) in done.items()}
    args.out.write_text(render(results, seeds, command.strip()) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
