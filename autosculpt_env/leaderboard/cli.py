"""The leaderboard's command line, defined once: ``autosculpt leaderboard`` and
``python benchmarks/leaderboard.py`` both call :func:`add_arguments` and :func:`command`.

    python benchmarks/leaderboard.py --track fast --jobs 2        # the fast track (resumable)
    python benchmarks/leaderboard.py --track full --jobs 2        # the full track
    python benchmarks/leaderboard.py --track full --backend ray --address auto   # on a cluster
    python benchmarks/leaderboard.py --only-render --validate     # tables and plots from rows
    python benchmarks/leaderboard.py --dataset digits --max-reward-evaluations 10 \\
        --rows-dir /tmp/rows --work-dir /tmp/runs \\
        --output /tmp/LB.md --plots-dir /tmp/plots   # a digits twin
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import positive_int
from .agents import AGENTS
from .protocol import TASKS, TRACKS, Task, make_protocol

DEFAULT_TRACK = "full"
DEFAULT_OUTPUT = "benchmarks/LEADERBOARD.md"
DEFAULT_PLOTS_DIR = "benchmarks/plots"
FIRST_ROWS_DIR = "benchmarks/rows"
"""The first leaderboard's rows (schema 1), rendered beside the tracks."""
DEFAULT_README = "README.md"
_DEFAULT = "<default>"  # --readme not given: the README goes with the default --output
README_BLOCK = "leaderboard"


def default_rows_dir(track: str) -> str:
    return f"benchmarks/tracks/{track}/rows"


def default_work_dir(track: str) -> str:
    return f"benchmarks/tracks/{track}/runs"


def default_render_dirs() -> list[str]:
    """Every rows folder of the committed leaderboard: the tracks', then the first one's."""
    return [default_rows_dir(t) for t in TRACKS] + [FIRST_ROWS_DIR]


def path_or_none(text: str) -> str | None:
    """An output file option's value: a path, or ``None`` (any case) for no such file, the
    spelling ``benchmarks/reward_fidelity.py`` takes too."""
    return None if text.strip().lower() == "none" else text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The leaderboard's options (every default of a track comes from its protocol)."""
    from ..evaluation import EVALUATIONS
    from .sweep import BACKENDS, parse_duration

    tracks = ", ".join(
        f"{n}: {t.max_reward_evaluations} evaluations x {len(t.seeds)} seeds"
        for n, t in TRACKS.items()
    )
    proto = p.add_argument_group("protocol (defaults: the track's)")
    proto.add_argument(
        "--track",
        default=DEFAULT_TRACK,
        choices=list(TRACKS),
        help=f"the fixed protocol to run ({tracks}); options below change it into a custom one",
    )
    proto.add_argument(
        "--tasks", nargs="+", default=None, help="ENV_ID@TARGET ... (default: the five tasks)"
    )
    proto.add_argument(
        "--agents",
        nargs="+",
        default=None,
        help=f"agent names or .py scripts (default: {' '.join(AGENTS)})",
    )
    proto.add_argument("--seeds", nargs="+", type=int, default=None, help="agent seeds")
    proto.add_argument(
        "--max-reward-evaluations",
        type=positive_int,
        default=None,
        help="reward evaluations each search may spend (passed to the agents)",
    )
    proto.add_argument(
        "--dataset", default=None, help="override every task's dataset (digits: a fast twin)"
    )
    proto.add_argument(
        "--evaluation", default=None, choices=list(EVALUATIONS), help="the reward the search sees"
    )
    proto.add_argument(
        "--score",
        default=None,
        choices=["finetune", *EVALUATIONS],
        help="finetune (test accuracy after fine-tuning) or the evaluation mode that scores",
    )
    proto.add_argument(
        "--finetune-epochs", type=int, default=None, help="override the fine-tuning epochs"
    )
    proto.add_argument(
        "--finetune-samples", type=int, default=None, help="fine-tune on this many train images"
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--agents-dir", nargs="+", default=[], help="folders searched for NAME.py agents"
    )
    run.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per run")
    run.add_argument("--jobs", type=positive_int, default=1, help="runs at a time (local backend)")
    run.add_argument(
        "--backend", default="local", choices=list(BACKENDS), help="local process pool or Ray"
    )
    run.add_argument(
        "--address", default=None, help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001)"
    )
    run.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task asks for")
    run.add_argument(
        "--time-budget",
        type=parse_duration,
        default=None,
        help="start no row after this long (3600, 90m, 2h; counted from the first row); "
        "running rows finish and the same command continues the sweep",
    )
    run.add_argument(
        "--agent-timeout",
        type=float,
        default=None,
        help="kill an agent run after this many seconds",
    )
    out = p.add_argument_group("files")
    out.add_argument(
        "--rows-dir", default=None, help="row files (default benchmarks/tracks/TRACK/rows)"
    )
    out.add_argument(
        "--work-dir",
        default=None,
        help="agents' run folders, fine-tuned networks (default benchmarks/tracks/TRACK/runs)",
    )
    out.add_argument(
        "--output",
        type=path_or_none,
        default=DEFAULT_OUTPUT,
        help="markdown table to write (None: no table)",
    )
    out.add_argument(
        "--plots-dir",
        type=path_or_none,
        default=DEFAULT_PLOTS_DIR,
        help="folder of the plots (None: no plots)",
    )
    out.add_argument(
        "--render-from",
        nargs="+",
        default=None,
        help="rows folders the table is made from (default: every track's and the first "
        "leaderboard's with the default --rows-dir, else --rows-dir)",
    )
    out.add_argument(
        "--readme",
        type=path_or_none,
        default=_DEFAULT,
        help=f"markdown file whose '{README_BLOCK}' block gets the standings (default: "
        f"{DEFAULT_README} when --output is the default; None: no README)",
    )
    out.add_argument("--only-render", action="store_true", help="run nothing; render the rows")
    out.add_argument("--validate", action="store_true", help="replay every row before rendering")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def command(
    track: str = DEFAULT_TRACK,
    tasks: Sequence[str] | None = None,
    agents: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_reward_evaluations: int | None = None,
    dataset: str | None = None,
    evaluation: str | None = None,
    score: str | None = None,
    finetune_epochs: int | None = None,
    finetune_samples: int | None = None,
    agents_dir: Sequence[str] = (),
    threads: int = 1,
    jobs: int = 1,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float = 0.0,
    agent_timeout: float | None = None,
    time_budget: float | None = None,
    rows_dir: str | None = None,
    work_dir: str | None = None,
    output: str | None = DEFAULT_OUTPUT,
    plots_dir: str | None = DEFAULT_PLOTS_DIR,
    render_from: Sequence[str] | None = None,
    readme: str | None = _DEFAULT,
    only_render: bool = False,
    validate: bool = False,
    progress: bool = True,
) -> int:
    """Run the missing rows of a protocol (unless ``only_render``), then write the table,
    plots and README standings from the rows. Returns an exit code: 0, or 1 when a run
    failed or a row did not validate. The parameters are the options, by the same names."""
    from .report import plot, readme_block, render
    from .rows import load_rows
    from .rows import validate as validate_rows
    from .sweep import check_writable, run_all

    default_rows = rows_dir is None
    rows_dir = rows_dir or default_rows_dir(track)
    work_dir = work_dir or default_work_dir(track)
    protocol = make_protocol(
        max_reward_evaluations,
        seeds,
        dataset,
        evaluation,
        finetune_epochs,
        finetune_samples,
        threads,
        agent_timeout,
        track=track,
        score=score,
        gpus=gpus_per_run,
    )
    if readme is _DEFAULT:  # the repository's README goes with the repository's table
        readme = (
            DEFAULT_README
            if output is not None
            and Path(output) == Path(DEFAULT_OUTPUT)
            and Path(DEFAULT_README).exists()
            else None
        )
    elif readme is not None and not Path(readme).is_file():
        # refused before any run: a sweep of hours must not end on a misspelt file name
        raise ValueError(
            f"--readme {readme}: no such file; name an existing markdown file, or None for no "
            "README"
        )
    code = 0
    if output is not None:
        check_writable(Path(output).parent, "output folder", "--output")
    if plots_dir is not None:
        check_writable(plots_dir, "plots folder", "--plots-dir")
    if not only_render:
        if not agents and not AGENTS:
            raise SystemExit(
                "--agents: no agents named and no source checkout's agents/ folder to take "
                "the reference agents from; name agents (NAME, or a path to NAME.py) with --agents"
            )
        result = run_all(
            protocol,
            [Task.parse(t) for t in tasks] if tasks else list(TASKS),
            list(agents) if agents else list(AGENTS),
            rows_dir,
            work_dir,
            jobs=jobs,
            progress=progress,
            backend=backend,
            address=address,
            agents_dirs=tuple(agents_dir),
            time_budget=time_budget,
        )
        if result["left"]:
            print(
                f"time budget of {time_budget:g} s spent: {len(result['left'])} rows not "
                "started; run the same command again to continue",
                file=sys.stderr,
            )
        if result["failed"]:
            code = 1
            print(f"{len(result['failed'])} runs failed (no row written):", file=sys.stderr)
            for rid, err in result["failed"].items():
                print(f"  {rid}: {err}", file=sys.stderr)
    if render_from is None:
        render_from = default_render_dirs() if default_rows else [rows_dir]
    rows = load_rows([d for d in render_from if Path(d).exists()])
    if validate:
        bad = [v for v in validate_rows(rows) if not v["ok"]]
        for v in bad:
            print(f"row {v['row_id']} does not validate: {'; '.join(v['errors'])}", file=sys.stderr)
        code = 1 if bad else code
    if plots_dir is not None and rows:
        for path in plot(rows, plots_dir):
            print(f"wrote {path}")
    if output is not None:
        Path(output).write_text(render(rows, plots_dir, output) + "\n")
        print(f"wrote {output} ({len(rows)} rows)")
    if readme is not None:
        from ..readme_blocks import update_block

        if update_block(readme, README_BLOCK, readme_block(rows)):
            print(f"updated the {README_BLOCK} block of {readme}")
    return code


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/leaderboard.py``: the same options as ``autosculpt leaderboard``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/leaderboard.py",
        description="Run every missing (task, agent, seed) row of a track, then write the "
        "markdown table and plots from the rows. Re-running the same command resumes.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(**vars(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"leaderboard: error: {e}", file=sys.stderr)
        return 2
