"""Finding agent programs, and the command line the harness runs them with.

An agent is a program (``docs/SUBMITTING.md`` has the contract). The harness finds it by
what the user passes, in this order:

1. a path to a ``.py`` script: run as ``python SCRIPT``;
2. a name registered by an installed package under the entry-point group
   :data:`ENTRY_POINT_GROUP` (``[project.entry-points."autosculpt_env.agents"]``,
   ``my_agent = "my_package.my_agent"``): the module is run as ``python -m MODULE``;
3. a name ``NAME`` with a ``NAME.py`` in the agents search path: the folders of
   ``--agents-dir``, then of :data:`AGENTS_PATH_ENV` (``os.pathsep``-separated), then the
   ``agents/`` folder of the source checkout the package runs from, if it runs from one.

An installed package (no checkout) therefore finds the reference agents only when told
where they are; the error says so and lists every folder it looked in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .protocol import Protocol, Task

ENTRY_POINT_GROUP = "autosculpt_env.agents"
"""Entry-point group under which installed packages register agent modules."""

AGENTS_PATH_ENV = "AUTOSCULPT_AGENTS_PATH"
"""Environment variable: folders searched for ``NAME.py`` (``os.pathsep``-separated)."""

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def checkout_root() -> Path | None:
    """The source checkout the package runs from (``None`` for an installed package)."""
    root = _PACKAGE_ROOT
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and 'name = "autosculpt-env"' in pyproject.read_text(errors="ignore"):
        return root
    return None


def reference_agents() -> tuple[str, ...]:
    """Every ``NAME.py`` of the source checkout's ``agents/`` folder, sorted (none for an
    installed package): a new reference agent is its file, nothing else."""
    root = checkout_root()
    if root is None:
        return ()
    scripts = (root / "agents").glob("*.py")
    return tuple(sorted(p.stem for p in scripts if not p.stem.startswith("_")))


AGENTS: tuple[str, ...] = reference_agents()
"""The reference agents, the harness's default (:func:`reference_agents`)."""


def search_path(agents_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The folders searched for ``NAME.py``, in order."""
    dirs = [Path(d) for d in agents_dirs]
    for var in (AGENTS_PATH_ENV, "AUTOSCULPT_AGENTS_DIR"):  # the second: its older name
        dirs += [Path(d) for d in os.environ.get(var, "").split(os.pathsep) if d]
    root = checkout_root()
    if root is not None:
        dirs.append(root / "agents")
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _entry_point(name: str) -> str | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.value.split(":", 1)[0]
    return None


@dataclass(frozen=True)
class AgentProgram:
    """How to start an agent: ``argv`` (after the Python interpreter) and its name."""

    name: str
    argv: tuple[str, ...]

    @property
    def script(self) -> Path | None:
        return Path(self.argv[0]) if self.argv and self.argv[0] != "-m" else None


def find_agent(agent: str, agents_dirs: Sequence[str | os.PathLike] = ()) -> AgentProgram:
    """Resolve an agent name or script path to the program the harness runs.

    Raises:
        FileNotFoundError: nothing by that name, naming every place looked in and the fix.
    """
    path = Path(agent)
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"agent script {path} does not exist")
        return AgentProgram(path.stem, (str(path.resolve()),))
    if not agent or os.sep in agent:
        raise FileNotFoundError(f"agent {agent!r}: pass a NAME or the path of a .py script")
    module = _entry_point(agent)
    if module is not None:
        return AgentProgram(agent, ("-m", module))
    dirs = search_path(agents_dirs)
    for d in dirs:
        script = d / f"{agent}.py"
        if script.is_file():
            return AgentProgram(agent, (str(script),))
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.py")})
    raise FileNotFoundError(
        f"no agent {agent!r}: not a registered {ENTRY_POINT_GROUP} entry point, and no "
        f"{agent}.py in {', '.join(map(str, dirs)) or 'any agents folder'} (known: "
        f"{', '.join(known) or 'none'}). Pass the path of a .py script, --agents-dir FOLDER, "
        f"or set {AGENTS_PATH_ENV}; an installed package finds the reference agents in the "
        "agents/ folder of the source checkout"
    )


def agent_script(agent: str, agents_dirs: Sequence[str | os.PathLike] = ()) -> Path:
    """The script file of an agent (for agents run as a script)."""
    program = find_agent(agent, agents_dirs)
    if program.script is None:
        raise FileNotFoundError(f"agent {agent!r} is a module ({program.argv[1]}), not a script")
    return program.script


def agent_command(
    program: AgentProgram,
    task: Task,
    seed: int,
    protocol: Protocol,
    runs_dir: Path,
    name: str,
) -> list[str]:
    """The command line of one search (the row's ``command`` field is it without the
    interpreter). Every agent gets the same options (``docs/SUBMITTING.md``)."""
    cmd = [sys.executable, *program.argv, "--env-id", task.env_id]
    if protocol.dataset is not None:
        cmd += ["--dataset", protocol.dataset]
    if protocol.evaluation != "accuracy":
        cmd += ["--evaluation", protocol.evaluation]
    cmd += ["--target-flops-reduction", f"{task.target_flops_reduction:g}"]
    cmd += ["--seed", str(seed), "--max-reward-evaluations", str(protocol.max_reward_evaluations)]
    cmd += ["--threads", str(protocol.threads)]
    cmd += ["--output-dir", str(runs_dir), "--run-name", name, "--no-progress"]
    cmd += list(protocol.agent_args.get(program.name, ()))
    return cmd
