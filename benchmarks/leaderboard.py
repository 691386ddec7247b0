"""Run a leaderboard track: agents x tasks x seeds, resumable, then write the table and plots.

The protocols, the harness and the options live in :mod:`autosculpt_env.leaderboard`; this
script is its command line (``autosculpt leaderboard`` takes the same options, defined once
in :func:`autosculpt_env.leaderboard.add_arguments`). Rows go one JSON file per (task,
agent, seed) into ``benchmarks/tracks/TRACK/rows``; a killed run is resumed by running the
same command again. ``benchmarks/LEADERBOARD.md``, ``benchmarks/plots/`` and the README's
standings block are generated from the rows alone. ``docs/SUBMITTING.md`` explains how to
run your own agent.

    python benchmarks/leaderboard.py --track fast --jobs 2    # the fast track (2 cores)
    python benchmarks/leaderboard.py --track full --jobs 2    # the full track (2 cores)
    python benchmarks/leaderboard.py --track full-large --backend ray --address auto
    python benchmarks/leaderboard.py --only-render --validate # table and plots from the rows
    python benchmarks/leaderboard.py --dataset digits --max-reward-evaluations 10 \\
        --rows-dir /tmp/rows --work-dir /tmp/runs --output /tmp/LB.md --plots-dir /tmp/plots
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from autosculpt_env.leaderboard.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
