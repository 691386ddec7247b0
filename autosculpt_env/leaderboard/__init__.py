"""The leaderboard: fixed tasks and protocols, agents run as programs, rows that replay.

The harness owns everything but the search (CompilerGym's rule: a method only supplies a
policy): the env counts the search's reward evaluations
(:mod:`autosculpt_env.evaluation_limit`), the harness checks and scores the best policy it
found, and every number of a row can be measured again. One module per responsibility:

* :mod:`.protocol`: :class:`Task`, :data:`TASKS`, :class:`Protocol` and the two tracks
  (:data:`TRACKS`: ``fast`` and ``full``, and their larger versions);
* :mod:`.agents`: finding agent programs (search path, entry points) and their command line;
* :mod:`.run`: one run, search -> check -> score -> row (:func:`run_one`);
* :mod:`.rows`: row files: write, load, check and validate by replay (schemas 1 and 2);
* :mod:`.sweep`: every missing row, resumable, on a local process pool or on Ray;
* :mod:`.stats`: bootstrap intervals, IQM, probability of improvement, performance profiles;
* :mod:`.report`: the markdown table, the plots and the README standings;
* :mod:`.cli`: the one definition of the command line (``autosculpt leaderboard`` and
  ``python benchmarks/leaderboard.py``).

``docs/SUBMITTING.md`` says what an agent must accept and write.
"""

from __future__ import annotations

from .agents import AGENTS, ENTRY_POINT_GROUP, AgentProgram, agent_script, find_agent
from .cli import DEFAULT_OUTPUT, DEFAULT_PLOTS_DIR, add_arguments, command
from .protocol import (
    FAST,
    FULL,
    TASKS,
    TRACKS,
    Protocol,
    Task,
    make_protocol,
    row_id,
    task_dataset,
    track_of,
)
from .report import aggregate, plot, readme_block, render, summarize
from .rows import ROW_FIELDS, ROW_FIELDS_V1, check_row, load_rows, validate, write_row
from .run import ROW_SCHEMA, AgentError, git_commit, run_one
from .sweep import FolderLock, check_writable, run_all

__all__ = [
    "AGENTS",
    "DEFAULT_OUTPUT",
    "DEFAULT_PLOTS_DIR",
    "ENTRY_POINT_GROUP",
    "FAST",
    "FULL",
    "ROW_FIELDS",
    "ROW_FIELDS_V1",
    "ROW_SCHEMA",
    "TASKS",
    "TRACKS",
    "AgentError",
    "AgentProgram",
    "FolderLock",
    "Protocol",
    "Task",
    "add_arguments",
    "agent_script",
    "aggregate",
    "check_row",
    "check_writable",
    "command",
    "find_agent",
    "git_commit",
    "load_rows",
    "make_protocol",
    "plot",
    "readme_block",
    "render",
    "row_id",
    "run_all",
    "run_one",
    "summarize",
    "task_dataset",
    "track_of",
    "validate",
    "write_row",
]
