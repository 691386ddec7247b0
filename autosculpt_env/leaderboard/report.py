"""The leaderboard's tables and plots, generated from rows alone.

Rows are grouped by protocol (:meth:`Protocol.key`): a table never mixes protocols. For each
group, :func:`render` writes the statistics of :mod:`autosculpt_env.leaderboard.stats`:
across tasks, every agent's interquartile mean of normalised scores and its probability of
improving on random search, with 95 % stratified-bootstrap intervals; per task, the mean
score with a 95 % bootstrap interval. :func:`plot` draws, per group, the performance
profiles, the FLOPs/score scatter with its Pareto front, and the search progress curves.
:func:`readme_block` is the short standings block of the README.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import stats
from .agents import AGENTS
from .protocol import TASKS, TRACKS, Protocol
from .rows import dense_score_of, max_reward_evaluations_of, score_of

BASELINE = "uniform"
"""The agent whose mean score is 0 on the normalised scale (the dense network is 1)."""
REFERENCE = "random_search"
"""The agent every other agent's probability of improvement is measured against."""
MAIN_AGENT = "ppo_gnn"
"""The project's main agent (``make run``): the README says where it stands."""

_TRACK_ORDER = list(TRACKS) + ["custom"]


@dataclass
class Group:
    """The rows of one protocol."""

    key: str
    protocol: Protocol
    schema: int
    track: str
    rows: list[dict]

    @property
    def title(self) -> str:
        if self.schema == 1:
            return f"First leaderboard (schema-1 rows, protocol `{self.key}`)"
        name = {"fast": "Fast track", "full": "Full track"}.get(self.track, f"Track `{self.track}`")
        return f"{name} (protocol `{self.key}`)"

    @property
    def slug(self) -> str:
        return (
            self.track
            if self.schema == 2 and self.track != "custom"
            else f"{self.track}-{self.key}"
        )

    def missing(self) -> list[str]:
        """The row ids a named track still lacks: every fixed task x reference agent x
        protocol seed without a row (empty for the first leaderboard and custom protocols,
        whose extent only their runner knows)."""
        if self.schema != 2 or self.track not in TRACKS:
            return []
        have = {(r["task"], r["agent"], r["seed"]) for r in self.rows}
        return [
            f"{t.name}__{a}__seed{s}"
            for t in TASKS
            for a in AGENTS
            for s in self.protocol.seeds
            if (t.name, a, s) not in have
        ]

    def completeness(self) -> str:
        """One sentence saying how much of a named track is in, or "" when all of it is."""
        missing = self.missing()
        if not missing:
            return ""
        total = len(TASKS) * len(AGENTS) * len(self.protocol.seeds)
        done = [t.name for t in TASKS if not any(m.startswith(f"{t.name}__") for m in missing)]
        return (
            f"**Partial:** {total - len(missing)} of the track's {total} rows ({len(TASKS)} tasks "
            f"x {len(AGENTS)} reference agents x {len(self.protocol.seeds)} seeds) are in; "
            f"tasks complete: {', '.join(f'`{t}`' for t in done) or 'none'}. The figures "
            "below cover only the rows that exist and will change as the track completes."
        )

    @property
    def score_name(self) -> str:
        if self.protocol.finetunes:
            return "test accuracy after fine-tuning"
        return f"reward-split accuracy under `evaluation={self.protocol.score}`"


def groups(rows: list[dict]) -> list[Group]:
    """Rows grouped by protocol key: schema-2 tracks in :data:`TRACKS` order, then custom
    protocols, then schema-1 rows."""
    by_key: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        by_key.setdefault((r.get("schema", 1), r["protocol_key"]), []).append(r)
    out = []
    for (schema, key), rs in by_key.items():
        track = rs[0].get("track", "first") if schema == 2 else "first"
        out.append(Group(key, Protocol.from_dict(rs[0]["protocol"]), schema, track, rs))

    def order(g: Group):
        rank = _TRACK_ORDER.index(g.track) if g.track in _TRACK_ORDER else len(_TRACK_ORDER)
        return (g.schema != 2, rank, g.key)

    return sorted(out, key=order)


def task_order(rows: list[dict]) -> list[str]:
    names = [t.name for t in TASKS]
    present = {r["task"] for r in rows}
    return [n for n in names if n in present] + sorted(present - set(names))


def agent_order(rows: list[dict]) -> list[str]:
    return sorted(
        {r["agent"] for r in rows},
        key=lambda a: (a not in AGENTS, AGENTS.index(a) if a in AGENTS else 0, a),
    )


def _runs(rows: list[dict], task: str, agent: str) -> list[dict]:
    return sorted(
        (r for r in rows if r["task"] == task and r["agent"] == agent), key=lambda r: r["seed"]
    )


# ---------------------------------------------------------------------------- summaries
def summarize(rows: list[dict]) -> dict[str, list[dict]]:
    """Per task, per agent (best mean score first): runs, mean score with its 95 % bootstrap
    interval, and the means of the other columns."""
    out: dict[str, list[dict]] = {}
    for task in task_order(rows):
        entries = []
        for agent in agent_order(rows):
            rs = _runs(rows, task, agent)
            if not rs:
                continue
            scores = [score_of(r) for r in rs]
            entries.append(
                {
                    "agent": agent,
                    "seeds": [r["seed"] for r in rs],
                    "score": stats.mean_ci(scores),
                    "flops_reduction": float(np.mean([r["flops_reduction"] for r in rs])),
                    "speedup": _mean_speedup(rs),
                    "reward_accuracy": float(np.mean([r["reward_accuracy"] for r in rs])),
                    "found_at": float(np.mean([r["found_at_evaluation"] or 0 for r in rs])),
                    "search_seconds": float(np.mean([r["search_seconds"] for r in rs])),
                    "dense_score": dense_score_of(rs[0]),
                    "model": rs[0].get("model"),
                    "dataset": rs[0].get("dataset"),
                    "max_reward_evaluations": max_reward_evaluations_of(rs[0]),
                }
            )
        entries.sort(key=lambda e: (-e["score"][0], e["agent"]))
        out[task] = entries
    return out


def _mean_speedup(rows: list[dict]) -> tuple[float, int] | None:
    """Mean measured speedup of the runs that have one, and how many do (``None``: none)."""
    values = [r["speedup"]["speedup"] for r in rows if r.get("speedup")]
    return (float(np.mean(values)), len(values)) if values else None


def _speedup_cell(value: tuple[float, int] | None, runs: int) -> str:
    if value is None:
        return "–"
    mean, n = value
    return f"{mean:.2f}x" + ("" if n == runs else f" ({n}/{runs})")


def normalised_scores(rows: list[dict], baseline: str = BASELINE) -> tuple[dict, list[str]]:
    """``({agent: [runs of task 1, ...]}, tasks)``: scores normalised per task between the
    baseline's mean score (0) and the dense network's (1). Only tasks where the baseline has
    rows and differs from the dense network are kept."""
    tasks = []
    for task in task_order(rows):
        base = [score_of(r) for r in _runs(rows, task, baseline)]
        if not base:
            continue
        dense = dense_score_of(next(r for r in rows if r["task"] == task))
        if abs(dense - float(np.mean(base))) > 1e-12:
            tasks.append((task, float(np.mean(base)), dense))
    out = {}
    for agent in agent_order(rows):
        per_task = []
        for task, low, high in tasks:
            rs = _runs(rows, task, agent)
            if not rs:
                break
            per_task.append(np.array([stats.normalise(score_of(r), low, high) for r in rs]))
        else:
            if tasks:
                out[agent] = per_task
    return out, [t for t, _, _ in tasks]


def aggregate(rows: list[dict], baseline: str = BASELINE, reference: str = REFERENCE) -> list[dict]:
    """Per agent (best IQM first): IQM of normalised scores over all tasks with its interval,
    the mean normalised score, and the probability of improvement over ``reference``.
    Agents missing a task are left out (the aggregate would not be comparable)."""
    scores, tasks = normalised_scores(rows, baseline)
    out = []
    for agent, per_task in scores.items():
        entry = {
            "agent": agent,
            "tasks": len(tasks),
            "runs": int(sum(len(s) for s in per_task)),
            "iqm": stats.aggregate_iqm(per_task),
            "mean": float(np.mean(np.concatenate(per_task))),
            "p_improvement": None,
        }
        if reference in scores and agent != reference:
            entry["p_improvement"] = stats.probability_of_improvement(per_task, scores[reference])
        out.append(entry)
    out.sort(key=lambda e: (-e["iqm"][0], e["agent"]))
    return out


def standing(agg: list[dict], agent: str = MAIN_AGENT) -> str:
    """One sentence on where ``agent`` stands in an :func:`aggregate`: its rank by IQM, the
    agents whose IQM intervals overlap its own (not told apart from it), and whether its
    probability of beating the reference is above or below one half with 95 % confidence.
    "" when the agent is not in the aggregate."""
    mine = next((e for e in agg if e["agent"] == agent), None)
    if mine is None:
        return ""
    rank = agg.index(mine) + 1
    _, lo, hi = mine["iqm"]
    overlap = [
        f"`{e['agent']}`" for e in agg if e is not mine and e["iqm"][1] <= hi and lo <= e["iqm"][2]
    ]
    text = f"`{agent}` ranks {rank} of {len(agg)} by IQM ({_ci(mine['iqm'], 1.0)}); " + (
        f"its interval overlaps those of {', '.join(overlap)}, so it is not told apart from "
        + ("them" if len(overlap) > 1 else "it")
        if overlap
        else "its interval overlaps no other agent's"
    )
    p = mine["p_improvement"]
    if p is not None:
        low, high = round(p[1], 2), round(p[2], 2)  # as printed: the words match the figures
        verdict = (
            "above one half with 95 % confidence"
            if low > 0.5
            else "below one half with 95 % confidence"
            if high < 0.5
            else "not distinguishable from one half"
        )
        text += f"; P(a run beats `{REFERENCE}`) {_ci(p, 1.0)}, {verdict}"
    return text + "."


# ------------------------------------------------------------------------------ render
def _num(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"


def _ci(v: tuple[float, float, float], scale: float = 100.0, digits: int = 2) -> str:
    m, lo, hi = (_num(scale * x, digits) for x in v)
    return f"{m} [{lo}, {hi}]"


def render(
    rows: list[dict],
    plots_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
) -> str:
    """The leaderboard as markdown, generated from the rows alone (links to the plots of
    :func:`plot` in ``plots_dir``, relative to the ``output`` file, when both are given)."""
    lines = ["# AutoSculpt-env leaderboard", ""]
    if not rows:
        return "\n".join(lines + ["No rows yet.", ""])
    lines += [
        "Generated by `python benchmarks/leaderboard.py --only-render` from "
        f"{len(rows)} rows; do not edit by hand. Every row is replayable: `autosculpt "
        "validate ROWS_DIR` replays it and measures its numbers again. Statistics after "
        "Agarwal et al. (2021): per task the mean score over seeds with a 95 % bootstrap "
        "interval; across tasks the interquartile mean (IQM) of scores normalised per task "
        f"between the `{BASELINE}` baseline (0) and the dense network (1), and the "
        f"probability that a run of the agent beats a run of `{REFERENCE}` on the same task "
        "(averaged over tasks), both with 95 % stratified-bootstrap intervals. Rows of "
        "different protocols are never mixed. *Measured speedup* is the policy's "
        "materialised network against the dense network in torch (batch 256, one thread, "
        "the mean over the runs that measured it, – where none did): a wall-clock "
        "measurement on the machine that made the row, not part of the score.",
        "",
    ]
    for g in groups(rows):
        lines += _render_group(g, plots_dir, output)
    return "\n".join(lines)


def _render_group(g: Group, plots_dir, output) -> list[str]:
    lines = [f"## {g.title}", "", g.protocol.describe()]
    if g.completeness():
        lines += ["", g.completeness()]
    if g.schema == 2:
        lines += [
            "",
            "The env counted every search's reward evaluations and refused any past the "
            "protocol's limit; the count is in each row and its record.",
        ]
    if g.schema == 1:
        lines += [
            "",
            "These rows predate the env's count of reward evaluations and the FLOPs band: "
            "their reward evaluations were counted by the agents and their best policies may "
            "remove more FLOPs than the target (see the FLOPs column).",
        ]
    lines.append("")
    agg = aggregate(g.rows)
    if agg:
        _, tasks = normalised_scores(g.rows)
        lines += [
            "### Across tasks",
            "",
            f"Normalised over {len(tasks)} task(s): " + ", ".join(f"`{t}`" for t in tasks) + ".",
            "",
            f"| agent | IQM normalised score [95 % CI] | mean normalised score | P(beats {REFERENCE}) [95 % CI] | runs |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in agg:
            p = "–" if e["p_improvement"] is None else _ci(e["p_improvement"], 1.0)
            lines.append(
                f"| {e['agent']} | {_ci(e['iqm'], 1.0)} | {_num(e['mean'], 2)} | {p} | {e['runs']} |"
            )
        lines.append("")
        if standing(agg):
            lines += [standing(agg), ""]
    if plots_dir is not None:
        folder = Path(plots_dir) / g.slug
        base = Path(output).parent if output is not None else Path(".")
        links = [
            f"![{name}]({Path(os.path.relpath(folder / f'{name}.png', base)).as_posix()})"
            for name in ("profile", "pareto", "progress")
            if (name != "profile" or agg)
        ]
        lines += [" ".join(links), ""]
    for task, entries in summarize(g.rows).items():
        e0 = entries[0]
        lines += [
            f"### {task}",
            "",
            f"{e0['model']} on {e0['dataset']}, target FLOPs reduction "
            f"{task.rsplit('@', 1)[-1]}; dense network: {100 * e0['dense_score']:.2f} %.",
            "",
            "| rank | agent | score (%) [95 % CI] | FLOPs reduction (%) | measured speedup "
            "| reward acc. (%) | best found at (evaluations) | search (s) | seeds |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for rank, e in enumerate(entries, 1):
            lines.append(
                f"| {rank} | {e['agent']} | {_ci(e['score'])} | {100 * e['flops_reduction']:.1f} "
                f"| {_speedup_cell(e['speedup'], len(e['seeds']))} "
                f"| {100 * e['reward_accuracy']:.2f} | {e['found_at']:.0f} / {e['max_reward_evaluations']} "
                f"| {e['search_seconds']:.0f} | {len(e['seeds'])} |"
            )
        lines.append("")
    return lines


def readme_block(rows: list[dict]) -> str:
    """The README's standings: per protocol, every agent's IQM and probability of beating
    random search, with intervals, generated from the rows."""
    lines = []
    for g in groups(rows):
        agg = aggregate(g.rows)
        if not agg:
            continue
        lines += [
            f"**{g.title}** — score: {g.score_name}; IQM of scores normalised between "
            f"`{BASELINE}` (0) and the dense network (1), and P(run beats `{REFERENCE}`), "
            "95 % stratified-bootstrap intervals (`benchmarks/LEADERBOARD.md`)"
            + (f". {g.completeness()}" if g.completeness() else ":"),
            "",
            f"| agent | IQM [95 % CI] | P(beats {REFERENCE}) [95 % CI] |",
            "|---|---:|---:|",
        ]
        for e in agg:
            p = "–" if e["p_improvement"] is None else _ci(e["p_improvement"], 1.0)
            lines.append(f"| {e['agent']} | {_ci(e['iqm'], 1.0)} | {p} |")
        lines.append("")
        if standing(agg):
            lines += [standing(agg), ""]
    return "\n".join(lines) if lines else "No leaderboard rows yet."


# -------------------------------------------------------------------------------- plots
def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are maximised, by increasing x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def plot(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Per protocol group, into ``out_dir/<group>/``: ``profile.png`` (performance profiles of
    normalised scores with stratified-bootstrap bands; when a baseline makes scores
    normalisable), ``pareto.png`` (FLOPs reduction against score, Pareto front) and
    ``progress.png`` (best reward against reward evaluations, mean over seeds with their
    range). Returns the paths written."""
    paths = []
    for g in groups(rows):
        folder = Path(out_dir) / g.slug
        folder.mkdir(parents=True, exist_ok=True)
        paths += _plot_group(g, folder)
    return paths


def _grid(n: int):
    from matplotlib.figure import Figure

    ncols = min(3, max(1, n))
    nrows = math.ceil(max(1, n) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.8 * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _finish(fig, axes, used: int, path: Path) -> Path:
    """Grid the first ``used`` panels and hide the rest, put the legend on the first, write
    ``path``."""
    for ax in axes[:used]:
        ax.grid(alpha=0.3)
    for ax in axes[used:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def _plot_group(g: Group, folder: Path) -> list[Path]:
    from matplotlib.figure import Figure

    rows, paths = g.rows, []
    tasks, agents = task_order(rows), agent_order(rows)
    colors = {a: f"C{i % 10}" for i, a in enumerate(agents)}
    markers = "os^Dv<>P*X"

    scores, norm_tasks = normalised_scores(rows)
    if scores:
        fig = Figure(figsize=(6.0, 4.2), layout="constrained")
        ax = fig.subplots()
        flat = np.concatenate([np.concatenate(v) for v in scores.values()])
        finite = flat[np.isfinite(flat)]
        taus = np.linspace(min(0.0, finite.min()) - 0.05, max(1.0, finite.max()) + 0.05, 61)
        for agent, per_task in scores.items():
            prof, lo, hi = stats.performance_profile(per_task, taus, reps=500)
            ax.plot(taus, prof, color=colors[agent], label=agent, lw=1.5)
            ax.fill_between(taus, lo, hi, color=colors[agent], alpha=0.15)
        ax.set_xlabel(f"normalised score τ ({BASELINE} = 0, dense = 1)")
        ax.set_ylabel("fraction of runs with score > τ")
        ax.set_title(
            f"{g.title.split(' (')[0]}: performance profiles over {len(norm_tasks)} task(s)",
            fontsize=9,
        )
        paths.append(_finish(fig, [ax], 1, folder / "profile.png"))

    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        for i, a in enumerate(agents):
            pts = [(100 * r["flops_reduction"], 100 * score_of(r)) for r in rs if r["agent"] == a]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, color=colors[a], marker=markers[i % len(markers)], label=a, s=28)
        front = _pareto([(100 * r["flops_reduction"], 100 * score_of(r)) for r in rs])
        if front:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="k", lw=0.8, alpha=0.6, label="Pareto front")
        ax.axhline(100 * dense_score_of(rs[0]), color="grey", ls="--", lw=0.8, label="dense")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel(f"score (%): {g.score_name}"[:60], fontsize=8)
    paths.append(_finish(fig, axes, len(tasks), folder / "pareto.png"))

    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        limit = max([max_reward_evaluations_of(r) or 1 for r in rs] + [1])
        grid = np.arange(1, limit + 1)
        for a in agents:
            curves = []
            for r in rs:
                if r["agent"] != a or not r.get("progress"):
                    continue
                pts = np.asarray(r["progress"], dtype=float)
                # step function: the best reward known after n evaluations
                pos = np.searchsorted(pts[:, 0], grid, side="right") - 1
                curve = np.where(pos >= 0, pts[np.clip(pos, 0, None), 1], np.nan)
                last = r.get("reward_evaluations") or pts[-1, 0]
                curve[grid > max(last, pts[-1, 0])] = np.nan
                curves.append(curve)
            if not curves:
                continue
            c = np.vstack(curves)
            with warnings.catch_warnings():  # all-NaN columns: no seed has a value yet
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(c, 0), np.nanmin(c, 0), np.nanmax(c, 0)
            ax.plot(grid, mean, color=colors[a], label=a, lw=1.4, drawstyle="steps-post")
            ax.fill_between(grid, lo, hi, color=colors[a], alpha=0.15, step="post")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("reward evaluations")
        ax.set_ylabel("best reward so far")
        if limit >= 200:
            ax.set_xscale("log")
    paths.append(_finish(fig, axes, len(tasks), folder / "progress.png"))
    return paths
