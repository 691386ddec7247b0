"""How well does the proxy rank policies? Collect, fit, and measure it leave-one-sampler-out.

    python benchmarks/proxy_fidelity.py                       # every leaderboard task
    python benchmarks/proxy_fidelity.py --tasks AutoSculpt-ResNet@0.5 --per-sampler 12
    python benchmarks/proxy_fidelity.py --dataset digits      # the digits twins, fast
    python benchmarks/proxy_fidelity.py --ship                # ... and ship the surrogates
    python benchmarks/proxy_fidelity.py --report-only         # the report from what is stored

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
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import torch
import tyro

import autosculpt_env  # noqa: F401
from autosculpt_env import surrogate
from autosculpt_env.leaderboard import TASKS, Task
from autosculpt_env.policy_collection import SAMPLERS, Design

ROOT = Path(__file__).resolve().parents[1]


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
    threads: int = 1
    """torch CPU threads"""
    ship: bool = False
    """copy the fitted surrogates into autosculpt_env/surrogates (registered datasets only)"""
    report_only: bool = False
    """write the report from the shipped (else cached) surrogates: no collection, no fit
    (tasks with neither are listed as not built yet)"""
    out: Path = ROOT / "benchmarks" / "PROXY_FIDELITY.md"
    """the markdown report"""
    progress: bool = True
    """progress bars"""
    store: Path | None = None
    """keep the evaluations in this folder instead of the cache (a committed folder lets a
    collection that outlasts the machine resume on the next one)"""


def run_task(name: str, args: Args) -> surrogate.Surrogate | None:
    try:
        task = Task.parse(name)
    except ValueError as e:
        raise SystemExit(f"--tasks: {e}") from None
    env_id, target = task.env_id, task.target_flops_reduction
    kw = {} if args.dataset is None else {"dataset": args.dataset}
    mode = surrogate.proxied_mode_of(env_id)
    scorer = gym.make(env_id, target_flops_reduction=target, evaluation=mode, **kw).unwrapped
    key, _ = surrogate.env_key(scorer)

    def evaluator():
        return lambda policy: scorer.evaluate_policy(policy)["accuracy"]

    design = Design(tuple(args.samplers), args.per_sampler, args.seed)
    if args.report_only:
        return _stored(name, scorer, key, target, design)
    t0 = time.perf_counter()
    s = surrogate.build(scorer.problem, key, target, evaluator, design, args.progress)
    print(
        f"{name}: {len(s.collection.policies)} policies ({scorer.num_reward_evaluations} "
        f"evaluated now), mode {mode}, chosen {s.model_name}, held-out Spearman min "
        f"{_num(s.meta()['heldout_min'])}, {time.perf_counter() - t0:.0f} s"
    )
    return s


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


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(results: dict[str, surrogate.Surrogate | None], command: str) -> str:
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
        "*pooled* ranks all out-of-fold predictions together. The "
        "candidate with the best *min* is refitted on all policies and used (marked ✓; its "
        "figures are the best of four on the same folds, so slightly optimistic). Predict: "
        "median time of one call, measured when it was fitted (machine load unknown).",
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
        lines += [
            f"Mode `{meta['mode']}` of `{meta['key']['model']}` on `{meta['key']['dataset']}`, "
            f"{meta['policies']} policies ({meta['design']['per_sampler']} per sampler, seed "
            f"{meta['design']['seed']}) + the dense one (accuracy {s.dense_accuracy:.4f}); "
            f"measured accuracy {c.accuracy.min():.4f}–{c.accuracy.max():.4f}. Chosen: "
            f"**{s.model_name}**, predict {s.predict_us:.0f} µs.",
            "",
            "| sampler | policies | "
            + " | ".join(k + (" ✓" if k == s.model_name else "") for k in cands)
            + " |",
            "|---|---:|" + "---:|" * len(cands),
        ]
        for sampler in c.samplers:
            row = [_num(s.heldout[k].per_sampler.get(sampler)) for k in cands]
            lines.append(f"| {sampler} | {c.counts[sampler]} | " + " | ".join(row) + " |")
        lines.append(
            "| **min** | | "
            + " | ".join(f"**{_num(s.heldout[k].minimum, 3)}**" for k in cands)
            + " |"
        )
        lines.append("| pooled | | " + " | ".join(_num(s.heldout[k].overall) for k in cands) + " |")
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
    torch.set_num_threads(args.threads)
    if args.store is not None:
        args.store.mkdir(parents=True, exist_ok=True)
        os.environ[surrogate.STORE_ENV] = str(args.store.resolve())
    results = {name: run_task(name, args) for name in args.tasks}
    if args.ship:
        if args.dataset is not None:
            raise SystemExit("--ship ships the registered tasks' surrogates: drop --dataset")
        for name, s in results.items():
            entry = surrogate.ship(s, Task.parse(name).env_id, name)
            print(f"shipped {name}: {entry['file']} sha256 {entry['sha256'][:12]}…")
    command = "python benchmarks/proxy_fidelity.py " + " ".join(sys.argv[1:])
    args.out.write_text(render(results, command.strip()) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
