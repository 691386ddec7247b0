"""The leaderboard protocol: fixed tasks, a fixed search budget, seeds, fixed fine-tuning.

The harness owns everything but the search (CompilerGym's rule: a method only supplies a
policy). For every (task, agent, seed) it

1. runs the agent as a program (``agents/NAME.py``, or any script with the same command
   line) with the budget in reward evaluations; the agent writes its best episode as a
   replayable record (``best.json``) and logs ``charts/best_reward`` against
   ``charts/reward_evaluations`` to TensorBoard;
2. fine-tunes the best policy with the protocol's fixed recipe, masks held exactly
   (:mod:`autosculpt_env.finetune`);
3. scores top-1 accuracy on the ``test`` split: after fine-tuning (the score), before it,
   and of the dense network. This is the only place the test split is read; the search
   saw the ``reward`` split only;
4. returns a *row*: task, agent, seed, budget, the policy (action names), FLOPs and
   parameter reductions, pruning rate, reward-split accuracy, test accuracies, timings,
   package version and git commit, the search's progress curve, and the full episode
   record, so the row can be replayed (:func:`validate`).

Rows are stored one JSON file per (task, agent, seed), written atomically (temporary file
+ ``os.replace``) under a rows folder: a killed run loses no finished row and never writes
one twice, and a resumed run skips the rows that exist. The table (:func:`render`) and
plots (:func:`plot`) are generated from the rows alone.

Every row of a rows folder must come from the same protocol (its :meth:`Protocol.key`:
budget, evaluation mode, reward samples, dataset override, fine-tuning recipe and subset);
seeds may be added later.

The default protocol is sized for a 2-core CPU: 100 reward evaluations per search
(``evaluation="accuracy"``, 2,048 reward images), seeds 1-3, one epoch of SGD fine-tuning
on the whole ``train`` split (:data:`autosculpt_env.finetune.FINETUNE_RECIPE`), one torch
thread per run and two runs at a time (``--jobs 2``). One reward evaluation costs about
0.4 s (VGG-11) to 1.3 s (ViT) on one core, one fine-tuning epoch 20 s (VGG-11) to 75 s
(MobileNetV2); the 90 rows (5 tasks x 6 agents x 3 seeds) take about 2-2.5 hours.
``--dataset digits`` runs a twin of the whole table in minutes.

Run it with ``python benchmarks/leaderboard.py`` or ``autosculpt leaderboard``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import __version__, data
from .records import (
    EpisodeRecord,
    atomic_write_text,
    check_env_id,
    make_env,
    replay,
)
from .training import Recipe

ROW_SCHEMA = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
AGENTS_DIR = Path(os.environ.get("AUTOSCULPT_AGENTS_DIR", REPO_ROOT / "agents"))

AGENTS: tuple[str, ...] = ("ppo_gnn", "ppo_mlp", "ddpg_amc", "random_search", "uniform", "greedy")
"""The reference agents (``agents/NAME.py``)."""


@dataclass(frozen=True)
class Task:
    """A leaderboard task: a registered env id and the FLOPs reduction it must reach."""

    env_id: str
    target_flops_reduction: float = 0.5

    @property
    def name(self) -> str:
        return f"{self.env_id}@{self.target_flops_reduction:g}"

    @classmethod
    def parse(cls, text: str) -> Task:
        """``"AutoSculpt-ResNet@0.7"`` (or ``"AutoSculpt-ResNet"`` for target 0.5)."""
        env_id, _, target = text.partition("@")
        if not env_id:
            raise ValueError(f"task {text!r}: expected ENV_ID or ENV_ID@TARGET")
        try:
            value = float(target) if target else 0.5
        except ValueError:
            raise ValueError(f"task {text!r}: the target after '@' must be a number") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"task {text!r}: the target must be in (0, 1)")
        return cls(env_id, value)


TASKS: tuple[Task, ...] = (
    Task("AutoSculpt-ResNet", 0.5),
    Task("AutoSculpt-VGG", 0.5),
    Task("AutoSculpt-MobileNet", 0.5),
    Task("AutoSculpt-ViT", 0.5),
    Task("AutoSculpt-ResNet", 0.7),
)
"""The fixed tasks: the four registered configurations at half the FLOPs, and ResNet-20 at
70 % of the FLOPs removed."""


@dataclass(frozen=True)
class Protocol:
    """Everything that decides a leaderboard row besides the agent.

    Attributes:
        budget: reward evaluations each search may spend (``--max-reward-evaluations``).
        seeds: agent seeds (each seed also seeds its fine-tuning).
        reward_samples: reward-split images per evaluation. The agents do not take it on
            their command line, so it must equal the env's value (2048 by default); rows
            whose record says otherwise are refused.
        evaluation: ``"accuracy"`` or ``"proxy"`` (passed to the agents).
        dataset: override every task's dataset (``"digits"`` for a fast twin of the table).
        finetune_recipe: the fine-tuning recipe; ``None`` takes
            :func:`autosculpt_env.finetune.default_recipe` of the dataset.
        finetune_samples: fine-tune on a fixed subset of this many ``train`` images
            (``None``: the whole split).
        threads: torch CPU threads of each agent and fine-tuning.
        agent_timeout_s: kill an agent that runs longer (``None``: no limit).
        agent_args: extra command-line arguments per agent name (part of the protocol).
    """

    budget: int = 100
    seeds: tuple[int, ...] = (1, 2, 3)
    reward_samples: int = 2048
    evaluation: str = "accuracy"
    dataset: str | None = None
    finetune_recipe: Recipe | None = None
    finetune_samples: int | None = None
    threads: int = 1
    agent_timeout_s: float | None = None
    agent_args: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        def integer(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not integer(self.budget, 1):
            raise ValueError(f"budget must be >= 1 reward evaluation, got {self.budget!r}")
        if not self.seeds or not all(integer(s, 0) for s in self.seeds):
            raise ValueError(f"seeds must be one or more integers >= 0, got {self.seeds!r}")
        if not integer(self.reward_samples, 1):
            raise ValueError(f"reward_samples must be an integer >= 1, got {self.reward_samples!r}")
        if not integer(self.threads, 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.finetune_samples is not None and not integer(self.finetune_samples, 1):
            raise ValueError(
                f"finetune_samples must be an integer >= 1 (or None: the whole train split), "
                f"got {self.finetune_samples!r}"
            )
        if self.agent_timeout_s is not None and not (
            isinstance(self.agent_timeout_s, int | float) and self.agent_timeout_s > 0
        ):
            raise ValueError(f"agent_timeout_s must be > 0 seconds, got {self.agent_timeout_s!r}")
        recipe = self.finetune_recipe
        if recipe is not None and not integer(recipe.epochs, 1):
            # zero or negative epochs would write rows scored with no fine-tuning at all
            raise ValueError(f"fine-tuning epochs must be an integer >= 1, got {recipe.epochs!r}")
        from .evaluation import EVALUATIONS

        if self.evaluation not in EVALUATIONS:
            raise ValueError(
                f"evaluation must be one of {', '.join(EVALUATIONS)}, got {self.evaluation!r}"
            )
        if self.dataset is not None:
            data.info(self.dataset)

    def recipe_for(self, dataset: str) -> Recipe:
        from .finetune import default_recipe

        return self.finetune_recipe if self.finetune_recipe is not None else default_recipe(dataset)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["agent_args"] = {k: list(v) for k, v in self.agent_args.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        d = dict(d)
        if d.get("finetune_recipe") is not None:
            d["finetune_recipe"] = Recipe(**d["finetune_recipe"])
        d["seeds"] = tuple(d.get("seeds", ()))
        d["agent_args"] = {k: tuple(v) for k, v in (d.get("agent_args") or {}).items()}
        return cls(**d)

    def key(self) -> str:
        """Fingerprint of what makes rows comparable (seeds, threads and timeouts excluded)."""
        from .finetune import FINETUNE_RECIPES

        d = self.to_dict()
        for k in ("seeds", "threads", "agent_timeout_s"):
            d.pop(k)
        if d["finetune_recipe"] is None:  # the defaults are part of the protocol too
            d["finetune_recipe"] = {k: r.to_dict() for k, r in sorted(FINETUNE_RECIPES.items())}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class AgentError(RuntimeError):
    """An agent run failed or produced no usable best episode."""


# ------------------------------------------------------------------------------ helpers
def task_dataset(task: Task, protocol: Protocol) -> str:
    """The dataset a task runs on under a protocol."""
    if protocol.dataset is not None:
        return protocol.dataset
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    return gym.spec(task.env_id).kwargs.get("dataset", "fashion-mnist")


def row_id(task: Task, agent: str, seed: int) -> str:
    return f"{task.name}__{Path(agent).stem}__seed{seed}"


def agent_script(agent: str) -> Path:
    """``agents/NAME.py`` for a reference agent name, or the path of a user's script."""
    path = Path(agent)
    if path.suffix == ".py":
        if not path.exists():
            raise FileNotFoundError(f"agent script {path} does not exist")
        return path.resolve()
    script = AGENTS_DIR / f"{agent}.py"
    if not script.exists():
        known = sorted(p.stem for p in AGENTS_DIR.glob("*.py")) if AGENTS_DIR.exists() else []
        raise FileNotFoundError(
            f"no agent {agent!r} in {AGENTS_DIR} (known: {', '.join(known) or 'none'}); pass a "
            "name there or the path of a .py script with the agents' command line "
            "(set AUTOSCULPT_AGENTS_DIR for another folder)"
        )
    return script


def git_commit(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout the package runs from (``(None, None)`` outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def read_progress(run_dir: str | os.PathLike) -> list[list[float]]:
    """The search's best reward against reward evaluations: ``[[evaluations, best], ...]``.

    Read from ``progress.csv`` (columns ``reward_evaluations,best_reward``) when the agent
    writes one, else from its TensorBoard events ``charts/best_reward`` and
    ``charts/reward_evaluations`` (logged together, once per evaluation). Only the points
    where the best reward changes, and the last point, are kept.
    """
    run_dir = Path(run_dir)
    pairs: list[tuple[float, float]] = []
    csv = run_dir / "progress.csv"
    if csv.exists():
        lines = csv.read_text().strip().splitlines()
        header = [h.strip() for h in lines[0].split(",")]
        i, j = header.index("reward_evaluations"), header.index("best_reward")
        for line in lines[1:]:
            cols = line.split(",")
            pairs.append((float(cols[i]), float(cols[j])))
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        if not {"charts/best_reward", "charts/reward_evaluations"} <= tags:
            return []
        best = acc.Scalars("charts/best_reward")
        evals = acc.Scalars("charts/reward_evaluations")
        if len(best) == len(evals):  # written together: pair them in order
            pairs = [(e.value, b.value) for e, b in zip(evals, best)]
        else:  # pair by step (the last evaluation count logged at that step)
            at = {e.step: e.value for e in evals}
            pairs = [(at[b.step], b.value) for b in best if b.step in at]
    out: list[list[float]] = []
    pairs = [(float(n), round(float(b), 6)) for n, b in pairs if math.isfinite(b)]
    for n, b in pairs:
        if not out or b != out[-1][1]:
            out.append([n, b])
    if pairs and out[-1][0] != pairs[-1][0]:
        out.append(list(pairs[-1]))
    return out


_DENSE_TEST: dict[str, float] = {}


def _dense_test_accuracy(env, test) -> float:
    base = env.unwrapped
    key = json.dumps([base.spec.id if base.spec else None, base.env_kwargs], sort_keys=True)
    if key not in _DENSE_TEST:
        from .training import accuracy

        _DENSE_TEST[key] = accuracy(base.problem.model, test)
    return _DENSE_TEST[key]


# ------------------------------------------------------------------------------ one row
def agent_command(
    task: Task, agent: str, seed: int, protocol: Protocol, runs_dir: Path, name: str
) -> list[str]:
    """The command line of one search (what the row's ``command`` field records)."""
    cmd = [sys.executable, str(agent_script(agent)), "--env-id", task.env_id]
    if protocol.dataset is not None:
        cmd += ["--dataset", protocol.dataset]
    if protocol.evaluation != "accuracy":
        cmd += ["--evaluation", protocol.evaluation]
    cmd += ["--target-flops-reduction", f"{task.target_flops_reduction:g}"]
    cmd += ["--seed", str(seed), "--max-reward-evaluations", str(protocol.budget)]
    cmd += ["--threads", str(protocol.threads)]
    cmd += ["--output-dir", str(runs_dir), "--run-name", name, "--no-progress"]
    cmd += list(protocol.agent_args.get(Path(agent).stem, ()))
    return cmd


def run_one(
    task: Task,
    agent: str,
    seed: int,
    protocol: Protocol,
    workdir: str | os.PathLike,
    progress: bool = False,
) -> dict:
    """Search, fine-tune and score one (task, agent, seed); return its row.

    The agent's run folder (log, TensorBoard events, ``best.json``) is
    ``workdir/search/<row id>`` and the fine-tuned network ``workdir/models/<row id>``
    (:func:`autosculpt_env.finetune.save`).

    Raises:
        AgentError: the agent failed, overspent the budget, or wrote no usable record.
    """
    import torch

    from .finetune import save
    from .scoring import score_policy
    from .training import accuracy

    workdir = Path(workdir)
    rid = row_id(task, agent, seed)
    dataset = task_dataset(task, protocol)
    runs_dir = workdir / "search"
    run_dir = runs_dir / rid
    if run_dir.exists():  # left by a killed run: start clean, never read a stale best.json
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = agent_command(task, agent, seed, protocol, runs_dir, rid)
    env_vars = {
        **os.environ,
        "OMP_NUM_THREADS": str(protocol.threads),
        "MKL_NUM_THREADS": str(protocol.threads),
        "WANDB_MODE": "disabled",
    }
    log = run_dir / "agent.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd,
                cwd=agent_script(agent).parent.parent,
                env=env_vars,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=protocol.agent_timeout_s,
                preexec_fn=die_with_parent,
            )
    except subprocess.TimeoutExpired:
        raise AgentError(
            f"{agent} on {task.name} seed {seed} ran past {protocol.agent_timeout_s}s; log: {log}"
        ) from None
    search_seconds = time.perf_counter() - t0
    out = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise AgentError(
            f"{agent} on {task.name} seed {seed} exited with {proc.returncode}; log {log}:\n{tail}"
        )
    best = run_dir / "best.json"
    if not best.exists():
        raise AgentError(f"{agent} on {task.name} seed {seed} wrote no {best}")
    record = EpisodeRecord.load(best)
    progress_curve = read_progress(run_dir)
    used = re.findall(r"(\d+) reward evaluations", out)
    used_evals = int(used[-1]) if used else (int(progress_curve[-1][0]) if progress_curve else None)

    kw = record.env_kwargs
    problems = []
    if record.env_id != task.env_id:
        problems.append(f"env id {record.env_id!r} != {task.env_id!r}")
    if abs(float(kw.get("target_flops_reduction", -1)) - task.target_flops_reduction) > 1e-12:
        problems.append(
            f"target {kw.get('target_flops_reduction')} != {task.target_flops_reduction}"
        )
    if kw.get("dataset") != dataset:
        problems.append(f"dataset {kw.get('dataset')!r} != {dataset!r}")
    if kw.get("evaluation") != protocol.evaluation:
        problems.append(f"evaluation {kw.get('evaluation')!r} != {protocol.evaluation!r}")
    if kw.get("reward_samples") != protocol.reward_samples:
        problems.append(
            f"reward_samples {kw.get('reward_samples')} != the protocol's {protocol.reward_samples} "
            "(the agents take the env's default)"
        )
    found_at = record.extra.get("reward_evaluations")
    if used_evals is not None and used_evals > protocol.budget:
        problems.append(f"spent {used_evals} reward evaluations, budget {protocol.budget}")
    if found_at is None or found_at > protocol.budget:
        problems.append(f"best episode found at evaluation {found_at}, budget {protocol.budget}")
    m = record.metrics
    if (
        kw.get("reward", "budget") == "budget"
        and m["flops_reduction"] < task.target_flops_reduction - 1e-12
    ):
        problems.append(
            f"FLOPs reduction {m['flops_reduction']:.4f} misses the target {task.target_flops_reduction}"
        )
    if problems:
        raise AgentError(f"{agent} on {task.name} seed {seed}: " + "; ".join(problems))

    # ---- fine-tuning and final evaluation: the only place the test split is read
    threads = torch.get_num_threads()
    torch.set_num_threads(protocol.threads)
    recipe = protocol.recipe_for(dataset)
    env = make_env(record)
    try:
        base = env.unwrapped
        actions = base.problem.actions_from_names(record.actions)
        # the record must describe the network that is fine-tuned: same FLOPs, same
        # reward-split accuracy (one evaluation; `validate` replays the whole episode later)
        flops = base.problem.policy_flops(actions)
        measured_reward_acc = float(base.evaluator(actions))
        if "flops" in m and flops != m["flops"]:
            raise AgentError(
                f"{agent} on {task.name} seed {seed}: record FLOPs {m['flops']} != {flops}"
            )
        if protocol.evaluation == "accuracy" and abs(measured_reward_acc - m["accuracy"]) > 1e-3:
            raise AgentError(
                f"{agent} on {task.name} seed {seed}: record accuracy {m['accuracy']} != "
                f"measured {measured_reward_acc}"
            )
        scored = score_policy(
            env,
            actions,
            recipe,
            seed=seed,
            train_samples=protocol.finetune_samples,
            progress=progress,
        )
        model, masks, test_acc = scored.model, scored.masks, scored.test_accuracy
        finetune_seconds = scored.seconds
        test = data.load(dataset, "test", kw.get("data_dir"))
        pruned_test_acc = accuracy(base.pruned_model(actions), test)
        dense_test_acc = _dense_test_accuracy(env, test)
    finally:
        env.close()
        torch.set_num_threads(threads)
    record.extra = {
        **record.extra,
        "finetune": {
            "recipe": recipe.to_dict(),
            "train_samples": protocol.finetune_samples,
            "seed": seed,
            "test_accuracy": test_acc,
        },
    }
    save(workdir / "models" / rid, model, masks, record)

    commit, dirty = git_commit()
    return {
        "schema": ROW_SCHEMA,
        "row_id": rid,
        "task": task.name,
        "env_id": task.env_id,
        "target": task.target_flops_reduction,
        "model": kw.get("model"),
        "dataset": dataset,
        "agent": Path(agent).stem,
        "seed": seed,
        "budget": protocol.budget,
        "reward_evaluations": used_evals,
        "found_at_evaluation": found_at,
        "policy": list(record.actions),
        "flops": m.get("flops"),
        "flops_reduction": m["flops_reduction"],
        "params_reduction": m["params_reduction"],
        "pruning_rate": m["pruning_rate"],
        "reward": m["reward"],
        "reward_accuracy": m["accuracy"],
        "reward_accuracy_measured": measured_reward_acc,
        "dense_reward_accuracy": m["dense_accuracy"],
        "test_accuracy": test_acc,
        "test_accuracy_before_finetune": pruned_test_acc,
        "dense_test_accuracy": dense_test_acc,
        "search_seconds": round(search_seconds, 2),
        "finetune_seconds": round(finetune_seconds, 2),
        "finetune_recipe": recipe.to_dict(),
        "finetune_samples": protocol.finetune_samples,
        "version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "command": cmd[1:],
        "protocol": protocol.to_dict(),
        "protocol_key": protocol.key(),
        "progress": progress_curve,
        "record": json.loads(record.to_json()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------- rows
def write_row(rows_dir: str | os.PathLike, row: dict) -> Path:
    """Write ``rows_dir/<row id>.json`` atomically (temporary file + ``os.replace``)."""
    path = Path(rows_dir) / f"{row['row_id']}.json"
    return atomic_write_text(path, json.dumps(row, indent=1, sort_keys=True) + "\n", fsync=True)


def load_rows(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Rows from row files and/or rows folders (``*.json``; temporary files are ignored).

    Raises:
        ValueError: a file is not a row, or two files hold the same row id.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.json") if not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no row file or folder {p}")
    rows, seen = [], {}
    for f in files:
        try:
            row = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not JSON: {e}") from e
        if not isinstance(row, dict) or "row_id" not in row or "record" not in row:
            raise ValueError(f"{f} is not a leaderboard row")
        if row["row_id"] in seen:
            raise ValueError(f"row {row['row_id']} is stored twice: {seen[row['row_id']]} and {f}")
        seen[row["row_id"]] = f
        row["_path"] = str(f)
        rows.append(row)
    return rows


def _check_protocol(rows_dir: Path, protocol: Protocol) -> None:
    if not rows_dir.exists():
        return
    for row in load_rows(rows_dir):
        if row.get("protocol_key") != protocol.key():
            raise ValueError(
                f"{row['_path']} was produced under another protocol "
                f"({row.get('protocol_key')}, this run is {protocol.key()}: budget, evaluation, "
                "reward samples, dataset or fine-tuning differ); use another --rows-dir"
            )


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Used for agent processes and worker processes: a runner that is killed, even with
    SIGKILL, takes its searches with it instead of leaving them writing into run folders
    that a resumed run reuses. A no-op where ``prctl`` is unavailable.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class FolderLock:
    """An exclusive ``flock`` on a folder, held by one runner for its whole run.

    A second runner on the same rows folder or work folder would compute every row twice,
    mix its progress curves into the first one's run folders and delete its half-written
    rows; it stops instead, with a clear error. The lock is on the folder itself (no lock
    file), and the kernel drops it when the holder dies, so a killed runner leaves nothing
    stale behind.
    """

    def __init__(self, folder: str | os.PathLike, what: str, option: str):
        self.folder, self.what, self.option = Path(folder), what, option
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        import fcntl

        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{self.what} {self.folder} is in use by another leaderboard runner; wait for "
                f"it to finish (then run again to resume) or pass another {self.option}"
            ) from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _run_and_write(args: tuple) -> tuple[str, str | None, float]:
    task, agent, seed, protocol, workdir, rows_dir = args
    t0 = time.perf_counter()
    try:
        row = run_one(task, agent, seed, protocol, workdir)
    except AgentError as e:
        return row_id(task, agent, seed), f"{e}", time.perf_counter() - t0
    except Exception as e:  # one broken run must not stop the table
        tb = "".join(traceback.format_exception(e)[-6:])
        return row_id(task, agent, seed), f"{type(e).__name__}: {e}\n{tb}", time.perf_counter() - t0
    write_row(rows_dir, row)
    return row["row_id"], None, time.perf_counter() - t0


def check_writable(folder: str | os.PathLike, what: str, option: str) -> None:
    """Create ``folder`` and a file in it, or raise a ``ValueError`` saying so, before any
    search or fine-tuning is spent on rows that could not be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"{what} {folder} is not writable ({e.strerror or e}); fix its permissions or "
            f"pass another {option}. Nothing was run."
        ) from None


def run_all(
    protocol: Protocol,
    tasks: Sequence[Task] = TASKS,
    agents: Sequence[str] = AGENTS,
    rows_dir: str | os.PathLike = "benchmarks/rows",
    workdir: str | os.PathLike = "benchmarks/runs",
    jobs: int = 1,
    progress: bool = True,
) -> dict:
    """Run every missing (task, agent, seed) row; resumable.

    Rows already in ``rows_dir`` are skipped. A failed run (e.g. a broken agent) writes no
    row, is reported, and does not stop the others.

    Returns:
        ``{"done": [...], "skipped": [...], "failed": {row id: error}}``.
    """
    from contextlib import ExitStack

    rows_dir, workdir = Path(rows_dir), Path(workdir)
    check_writable(rows_dir, "rows folder", "--rows-dir")
    check_writable(workdir, "work folder", "--work-dir")
    with ExitStack() as locks:  # before anything is read, deleted or run
        locks.enter_context(FolderLock(rows_dir, "rows folder", "--rows-dir"))
        if workdir.resolve() != rows_dir.resolve():
            locks.enter_context(FolderLock(workdir, "work folder", "--work-dir"))
        return _run_all_locked(protocol, tasks, agents, rows_dir, workdir, jobs, progress)


def _run_all_locked(protocol, tasks, agents, rows_dir: Path, workdir: Path, jobs, progress):
    from tqdm.auto import tqdm

    _check_protocol(rows_dir, protocol)
    for stale in rows_dir.glob(".*.tmp"):  # a row being written when a run was killed
        stale.unlink(missing_ok=True)
    for agent in agents:
        agent_script(agent)
    todo, skipped = [], []
    for task in tasks:
        for agent in agents:
            for seed in protocol.seeds:
                rid = row_id(task, agent, seed)
                if (rows_dir / f"{rid}.json").exists():
                    skipped.append(rid)
                else:
                    todo.append((task, agent, seed, protocol, workdir, rows_dir))
    result = {"done": [], "skipped": skipped, "failed": {}}
    bar = tqdm(total=len(todo), disable=not progress, unit="run", dynamic_ncols=True)
    if skipped:
        bar.write(f"resuming: {len(skipped)} rows exist in {rows_dir}, {len(todo)} to run")

    def report(rid, err, seconds):
        bar.update(1)
        if err is None:
            result["done"].append(rid)
            bar.write(f"  {rid}: {seconds:.0f}s")
        else:
            result["failed"][rid] = err
            bar.write(f"  {rid}: FAILED {err.splitlines()[0][:300]}")

    if jobs <= 1:
        for args in todo:
            bar.set_postfix_str(row_id(*args[:3]))
            report(*_run_and_write(args))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=die_with_parent
        ) as pool:
            futures = [pool.submit(_run_and_write, args) for args in todo]
            for fut in as_completed(futures):
                report(*fut.result())
    bar.close()
    return result


# ---------------------------------------------------------------------------- validate
def _forget_memo(record: EpisodeRecord) -> None:
    """Clear the policy memo of the record's env, so a replay in a process that already
    scored the policy (envs of one configuration share their evaluator) measures again."""
    env = make_env(record)
    try:
        env.unwrapped.evaluator.cache.clear()
    finally:
        env.close()


_NUM, _INT, _STR, _BOOL, _LIST, _DICT, _NONE = (
    "number",
    "integer",
    "string",
    "bool",
    "list",
    "object",
    "null",
)
ROW_FIELDS: dict[str, tuple[str, ...]] = {
    "schema": (_INT,),
    "row_id": (_STR,),
    "task": (_STR,),
    "env_id": (_STR,),
    "target": (_NUM,),
    "model": (_STR, _NONE),
    "dataset": (_STR,),
    "agent": (_STR,),
    "seed": (_INT,),
    "budget": (_INT,),
    "reward_evaluations": (_INT, _NONE),
    "found_at_evaluation": (_INT, _NONE),
    "policy": (_LIST,),
    "flops": (_NUM, _NONE),
    "flops_reduction": (_NUM,),
    "params_reduction": (_NUM,),
    "pruning_rate": (_NUM,),
    "reward": (_NUM,),
    "reward_accuracy": (_NUM,),
    "reward_accuracy_measured": (_NUM,),
    "dense_reward_accuracy": (_NUM,),
    "test_accuracy": (_NUM,),
    "test_accuracy_before_finetune": (_NUM,),
    "dense_test_accuracy": (_NUM,),
    "search_seconds": (_NUM,),
    "finetune_seconds": (_NUM,),
    "finetune_recipe": (_DICT,),
    "finetune_samples": (_INT, _NONE),
    "version": (_STR,),
    "git_commit": (_STR, _NONE),
    "git_dirty": (_BOOL, _NONE),
    "torch": (_STR,),
    "command": (_LIST,),
    "protocol": (_DICT,),
    "protocol_key": (_STR,),
    "progress": (_LIST,),
    "record": (_DICT,),
    "created": (_STR,),
}
"""Every field of a row (schema 1) and the JSON types it may hold; ``_path`` is added by
:func:`load_rows`. A row with a missing, unknown or mistyped field does not validate."""

_ACCURACIES = (
    "reward_accuracy",
    "reward_accuracy_measured",
    "dense_reward_accuracy",
    "test_accuracy",
    "test_accuracy_before_finetune",
    "dense_test_accuracy",
)


def _json_type(v) -> str:
    if v is None:
        return _NONE
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):
        return _NUM if math.isfinite(v) else "non-finite number"
    if isinstance(v, str):
        return _STR
    if isinstance(v, list):
        return _LIST
    if isinstance(v, dict):
        return _DICT
    return type(v).__name__


def check_row(row) -> tuple[list[str], EpisodeRecord | None]:
    """The checks of a row that need no env: schema, and every summary field against its
    record, its protocol and itself. Returns ``(errors, record)`` (record ``None`` when it
    is malformed); never raises."""
    if not isinstance(row, dict):
        return [f"a row is a JSON object, got {type(row).__name__}"], None
    errors: list[str] = []
    for key, types in ROW_FIELDS.items():
        if key not in row:
            errors.append(f"missing field {key!r}")
            continue
        t = _json_type(row[key])
        if t == _INT and _NUM in types:
            continue
        if t not in types:
            errors.append(f"{key} must be {' or '.join(types)}, got {t}")
    unknown = sorted(set(row) - set(ROW_FIELDS) - {"_path"}, key=str)
    if unknown:
        errors.append(f"unknown fields {unknown}")
    if errors:
        return errors, None
    try:
        record = EpisodeRecord.from_dict(row["record"])
    except ValueError as e:
        return [f"record: {e}"], None
    try:
        errors += _row_against_record(row, record)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a malformed protocol
        errors.append(f"{type(e).__name__}: {e}")
    return errors, record


def _row_against_record(row: dict, record: EpisodeRecord) -> list[str]:
    errors: list[str] = []

    def same(key, value, what):
        if row[key] != value or type(row[key]) is bool and type(value) is not bool:
            errors.append(f"{key} {row[key]!r} != {what} {value!r}")

    m, kw, extra = record.metrics, record.env_kwargs, record.extra
    check_env_id(row["env_id"], "row env_id")
    same("schema", ROW_SCHEMA, "the schema")
    same("env_id", record.env_id, "record's")
    same("target", kw.get("target_flops_reduction"), "record's")
    task = Task(row["env_id"], float(row["target"]))
    same("task", task.name, "its env id and target")
    same("row_id", row_id(task, row["agent"], row["seed"]), "its task, agent and seed")
    same("model", kw.get("model"), "record's")
    same("dataset", kw.get("dataset"), "record's")
    if row["policy"] != record.actions:
        errors.append("policy differs from the record's actions")
    for key, mkey in (
        ("flops", "flops"),
        ("flops_reduction", "flops_reduction"),
        ("params_reduction", "params_reduction"),
        ("pruning_rate", "pruning_rate"),
        ("reward", "reward"),
        ("reward_accuracy", "accuracy"),
        ("dense_reward_accuracy", "dense_accuracy"),
    ):
        same(key, m[mkey], "record's")
    for key in _ACCURACIES + ("flops_reduction", "params_reduction", "pruning_rate"):
        if not 0.0 <= row[key] <= 1.0:
            errors.append(f"{key} {row[key]} is not in [0, 1]")
    for key in ("search_seconds", "finetune_seconds"):
        if row[key] < 0:
            errors.append(f"{key} {row[key]} is negative")
    for key, ekey in (
        ("agent", "agent"),
        ("seed", "seed"),
        ("found_at_evaluation", "reward_evaluations"),
    ):
        same(key, extra.get(ekey), f"record's extra {ekey}")
    ft = extra.get("finetune")
    if not isinstance(ft, dict):
        errors.append("the record has no extra.finetune (the fine-tuning that was scored)")
    else:
        same("test_accuracy", ft.get("test_accuracy"), "record's extra.finetune test_accuracy")
        same("finetune_recipe", ft.get("recipe"), "record's extra.finetune recipe")
        same("finetune_samples", ft.get("train_samples"), "record's extra.finetune train_samples")
        same("seed", ft.get("seed"), "record's extra.finetune seed")
    # the protocol: its key, and every field it decides
    protocol = Protocol.from_dict(row["protocol"])
    same("protocol_key", protocol.key(), "its protocol's key")
    same("budget", protocol.budget, "its protocol's")
    same("dataset", task_dataset(task, protocol), "its protocol's dataset for the task")
    same("finetune_recipe", protocol.recipe_for(row["dataset"]).to_dict(), "its protocol's")
    same("finetune_samples", protocol.finetune_samples, "its protocol's")
    if row["seed"] not in protocol.seeds:
        errors.append(f"seed {row['seed']} is not one of its protocol's seeds {protocol.seeds}")
    if kw.get("evaluation") != protocol.evaluation:
        errors.append(
            f"record evaluation {kw.get('evaluation')!r} != protocol's {protocol.evaluation!r}"
        )
    if kw.get("reward_samples") != protocol.reward_samples:
        errors.append(
            f"record reward_samples {kw.get('reward_samples')} != protocol's {protocol.reward_samples}"
        )
    # the budget
    budget, found, used = row["budget"], row["found_at_evaluation"], row["reward_evaluations"]
    if found is None or not 1 <= found <= budget:
        errors.append(f"best episode found at evaluation {found}, budget {budget}")
    if used is not None and not (found or 0) <= used <= budget:
        errors.append(f"{used} reward evaluations, best found at {found}, budget {budget}")
    target = kw.get("target_flops_reduction")
    if kw.get("reward", "budget") == "budget" and m["flops_reduction"] < target - 1e-12:
        errors.append(f"FLOPs reduction {m['flops_reduction']:.4f} misses target {target}")
    # the command that ran the search
    cmd = row["command"]
    for flag, value in (
        ("--env-id", row["env_id"]),
        ("--seed", str(row["seed"])),
        ("--max-reward-evaluations", str(budget)),
    ):
        if not any(a == flag and b == value for a, b in zip(cmd, cmd[1:])):
            errors.append(f"command lacks {flag} {value}")
    # the progress curve: best reward against evaluations, ending at the record's reward
    curve = row["progress"]
    if not all(
        isinstance(p, list) and len(p) == 2 and all(_json_type(v) in (_INT, _NUM) for v in p)
        for p in curve
    ):
        errors.append("progress must be a list of [evaluations, best reward] pairs")
    elif curve:
        xs = [p[0] for p in curve]
        if xs != sorted(xs) or xs[0] < 1 or xs[-1] > budget:
            errors.append(f"progress evaluations must rise within 1..{budget}")
        if abs(max(p[1] for p in curve) - m["reward"]) > 1e-5:
            errors.append(
                f"progress ends at best reward {max(p[1] for p in curve)}, record's reward {m['reward']}"
            )
    return errors


def validate(
    rows: Iterable[dict], accuracy_tolerance: float = 1e-3, full: bool = False
) -> list[dict]:
    """Check every row and replay its record.

    Always (cheap, a few reward evaluations per row): the row's schema; every summary field
    against its record, its protocol and itself (:func:`check_row`); the record replayed in
    its env (every metric of :data:`~autosculpt_env.records.METRICS`: cost metrics exactly,
    reward-split accuracies within ``accuracy_tolerance``); the measured reward-split
    accuracy; the dense network's test accuracy (once per configuration).

    With ``full``, also the test accuracies: before fine-tuning, and after fine-tuning
    again with the row's recipe, seed and subset (minutes per row on Fashion-MNIST), each
    within ``accuracy_tolerance``.

    Returns:
        One ``{"row_id", "ok", "errors"}`` per row.
    """
    results = []
    for row in rows:
        errors, record = check_row(row)
        if record is not None and not errors:
            try:
                _forget_memo(record)
                replay(record, accuracy_tolerance=accuracy_tolerance)
                errors += _rederive(row, record, accuracy_tolerance, full)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                errors.append(f"{type(e).__name__}: {e}")
        rid = row.get("row_id", "?") if isinstance(row, dict) else "?"
        results.append({"row_id": str(rid), "ok": not errors, "errors": errors})
    return results


def _rederive(row: dict, record: EpisodeRecord, tolerance: float, full: bool) -> list[str]:
    """Measure again the row's numbers that the replay does not cover."""
    errors = []
    env = make_env(record)
    try:
        base = env.unwrapped
        actions = base.problem.actions_from_names(record.actions)
        measured = float(base.evaluator(actions))
        if abs(measured - row["reward_accuracy_measured"]) > tolerance:
            errors.append(
                f"reward_accuracy_measured {row['reward_accuracy_measured']} != measured {measured}"
            )
        kw = record.env_kwargs
        test = data.load(kw["dataset"], "test", kw.get("data_dir"))
        dense = _dense_test_accuracy(env, test)
        if abs(dense - row["dense_test_accuracy"]) > tolerance:
            errors.append(f"dense_test_accuracy {row['dense_test_accuracy']} != measured {dense}")
        if full:
            from .scoring import score_policy
            from .training import Recipe, accuracy

            before = accuracy(base.pruned_model(actions), test)
            if abs(before - row["test_accuracy_before_finetune"]) > tolerance:
                errors.append(
                    f"test_accuracy_before_finetune {row['test_accuracy_before_finetune']} "
                    f"!= measured {before}"
                )
            after = score_policy(
                env,
                actions,
                Recipe(**row["finetune_recipe"]),
                seed=row["seed"],
                train_samples=row["finetune_samples"],
            ).test_accuracy
            if abs(after - row["test_accuracy"]) > tolerance:
                errors.append(
                    f"test_accuracy {row['test_accuracy']} != {after} after fine-tuning again"
                )
    finally:
        env.close()
    return errors


# ---------------------------------------------------------------------- table and plots
def _task_order(rows: list[dict]) -> list[str]:
    names = [t.name for t in TASKS]
    present = {r["task"] for r in rows}
    return [n for n in names if n in present] + sorted(present - set(names))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def summarize(rows: list[dict]) -> dict[str, list[dict]]:
    """Per task, per agent: means and standard deviations over seeds, best first."""
    out: dict[str, list[dict]] = {}
    for task in _task_order(rows):
        by_agent: dict[str, list[dict]] = {}
        for r in rows:
            if r["task"] == task:
                by_agent.setdefault(r["agent"], []).append(r)
        entries = []
        for agent, rs in by_agent.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            entries.append(
                {
                    "agent": agent,
                    "seeds": [r["seed"] for r in rs],
                    "test_accuracy": _mean_std([r["test_accuracy"] for r in rs]),
                    "flops_reduction": _mean_std([r["flops_reduction"] for r in rs]),
                    "reward_accuracy": _mean_std([r["reward_accuracy"] for r in rs]),
                    "test_accuracy_before_finetune": _mean_std(
                        [r["test_accuracy_before_finetune"] for r in rs]
                    ),
                    "search_seconds": sum(r["search_seconds"] for r in rs) / len(rs),
                    "dense_test_accuracy": rs[0]["dense_test_accuracy"],
                    "model": rs[0].get("model"),
                    "dataset": rs[0].get("dataset"),
                    "budget": rs[0].get("budget"),
                }
            )
        entries.sort(key=lambda e: (-e["test_accuracy"][0], e["agent"]))
        out[task] = entries
    return out


def standings(summary: dict[str, list[dict]]) -> list[dict]:
    """Across tasks, per agent: mean rank (1 = best), first places, and mean gap to the
    dense network's test accuracy; best mean rank first. An agent is ranked only on the
    tasks it has rows for, and the count is reported with it.

    >>> s = {"A@0.5": [{"agent": "x", "test_accuracy": (0.9, None), "dense_test_accuracy": 0.95},
    ...                {"agent": "y", "test_accuracy": (0.8, None), "dense_test_accuracy": 0.95}],
    ...      "B@0.5": [{"agent": "y", "test_accuracy": (0.7, None), "dense_test_accuracy": 0.9},
    ...                {"agent": "x", "test_accuracy": (0.65, None), "dense_test_accuracy": 0.9}],
    ...      "C@0.7": [{"agent": "x", "test_accuracy": (0.5, None), "dense_test_accuracy": 0.9}]}
    >>> for e in standings(s):
    ...     print(e["agent"], e["mean_rank"], e["wins"], e["tasks"], e["ranks"], round(e["gap_to_dense"], 3))
    x 1.3333333333333333 2 3 {'A@0.5': 1, 'B@0.5': 2, 'C@0.7': 1} -0.233
    y 1.5 1 2 {'A@0.5': 2, 'B@0.5': 1} -0.175
    """
    per_agent: dict[str, dict] = {}
    for task, entries in summary.items():
        for rank, e in enumerate(entries, 1):
            a = per_agent.setdefault(e["agent"], {"ranks": {}, "gaps": []})
            a["ranks"][task] = rank
            a["gaps"].append(e["test_accuracy"][0] - e["dense_test_accuracy"])
    out = [
        {
            "agent": agent,
            "mean_rank": sum(a["ranks"].values()) / len(a["ranks"]),
            "wins": list(a["ranks"].values()).count(1),
            "tasks": len(a["ranks"]),
            "ranks": a["ranks"],
            "gap_to_dense": sum(a["gaps"]) / len(a["gaps"]),
        }
        for agent, a in per_agent.items()
    ]
    out.sort(key=lambda e: (e["mean_rank"], -e["gap_to_dense"], e["agent"]))
    return out


def render(rows: list[dict]) -> str:
    """The leaderboard as markdown, generated from the rows alone."""
    lines = ["# AutoSculpt-env leaderboard", ""]
    if not rows:
        return "\n".join(lines + ["No rows yet.", ""])
    protocols = {r.get("protocol_key"): r.get("protocol") for r in rows}
    lines += [
        "Score: top-1 **test** accuracy after fine-tuning the best policy a search found, mean ± "
        "standard deviation over seeds (best first). The search sees the `reward` split only; "
        "the test split is read once per row, after fine-tuning. Every row is replayable: "
        "`autosculpt validate ROWS_DIR` replays them. Generated by `python "
        "benchmarks/leaderboard.py --only-render` from "
        f"{len(rows)} rows; do not edit by hand.",
        "",
    ]
    for key, p in protocols.items():
        recipe = p.get("finetune_recipe")
        lines.append(
            f"Protocol `{key}`: {p['budget']} reward evaluations per search, evaluation "
            f"`{p['evaluation']}` on (up to) {p['reward_samples']} reward-split images"
            + (f", dataset override `{p['dataset']}`" if p.get("dataset") else "")
            + ", fine-tuning "
            + (
                f"{recipe['epochs']} epoch(s) {recipe['optimizer']} lr {recipe['lr']}"
                if recipe
                else "with the dataset's default recipe (`autosculpt_env.finetune`)"
            )
            + (
                f" on {p['finetune_samples']} train images"
                if p.get("finetune_samples")
                else " on the whole train split"
            )
            + "."
        )
    if len(protocols) > 1:
        lines.append("")
        lines.append("**Warning: these rows come from more than one protocol.**")
    lines.append("")
    summary = summarize(rows)
    if len(summary) > 1:
        tasks = list(summary)
        lines += [
            "## Overall",
            "",
            "Mean rank over the tasks below (1 = best; ties in mean rank broken by the gap), "
            "first places, and the mean gap between the agent's test accuracy after "
            "fine-tuning and the dense network's. Ranks per task, in order: "
            + ", ".join(f"`{t}`" for t in tasks)
            + ".",
            "",
            "| agent | mean rank | first places | gap to dense (pt) | ranks per task |",
            "|---|---:|---:|---:|---|",
        ]
        for e in standings(summary):
            lines.append(
                f"| {e['agent']} | {e['mean_rank']:.1f} | {e['wins']}/{e['tasks']} "
                f"| {100 * e['gap_to_dense']:+.2f} "
                f"| {' '.join(str(e['ranks'].get(t, '–')) for t in tasks)} |"
            )
        lines.append("")
    for task, entries in summary.items():
        e0 = entries[0]
        lines += [
            f"## {task}",
            "",
            f"{e0['model']} on {e0['dataset']}, target FLOPs reduction "
            f"{task.rsplit('@', 1)[-1]}; dense test accuracy {100 * e0['dense_test_accuracy']:.2f} %.",
            "",
            "| rank | agent | test acc. after FT (%) | FLOPs reduction (%) "
            "| reward acc. before FT (%) | test acc. before FT (%) | search (s) | seeds |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for rank, e in enumerate(entries, 1):
            lines.append(
                f"| {rank} | {e['agent']} | {_pct(*e['test_accuracy'])} "
                f"| {_pct(*e['flops_reduction'])} | {_pct(*e['reward_accuracy'])} "
                f"| {_pct(*e['test_accuracy_before_finetune'])} | {e['search_seconds']:.0f} "
                f"| {' '.join(map(str, e['seeds']))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are maximised, by increasing x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def plot(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``pareto.png`` (FLOPs reduction vs test accuracy after fine-tuning, with the
    Pareto front) and ``progress.png`` (best reward vs reward evaluations per agent, mean
    over seeds with the seeds' range) into ``out_dir``; return their paths."""
    import numpy as np
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = _task_order(rows)
    agents = sorted({r["agent"] for r in rows}, key=lambda a: (a not in AGENTS, a))
    colors = {a: f"C{i % 10}" for i, a in enumerate(agents)}
    markers = "os^Dv<>P*X"
    n = max(1, len(tasks))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    paths = []

    fig = Figure(figsize=(4.6 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        for i, a in enumerate(agents):
            pts = [
                (100 * r["flops_reduction"], 100 * r["test_accuracy"])
                for r in rs
                if r["agent"] == a
            ]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, color=colors[a], marker=markers[i % len(markers)], label=a, s=28)
        front = _pareto([(100 * r["flops_reduction"], 100 * r["test_accuracy"]) for r in rs])
        if front:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="k", lw=0.8, alpha=0.6, label="Pareto front")
        if rs:
            ax.axhline(
                100 * rs[0]["dense_test_accuracy"], color="grey", ls="--", lw=0.8, label="dense"
            )
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylabel("test accuracy after fine-tuning (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    if tasks:
        axes[0].legend(fontsize=7)
    paths.append(out_dir / "pareto.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(4.6 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        budget = max([r.get("budget") or 1 for r in rs] + [1])
        grid = np.arange(1, budget + 1)
        for a in agents:
            curves = []
            for r in rs:
                if r["agent"] != a or not r.get("progress"):
                    continue
                pts = np.asarray(r["progress"], dtype=float)
                # step function: the best reward known after n evaluations
                pos = np.searchsorted(pts[:, 0], grid, side="right") - 1
                curve = np.where(pos >= 0, pts[np.clip(pos, 0, None), 1], np.nan)
                last = pts[-1, 0]
                curve[grid > max(last, r.get("reward_evaluations") or last)] = np.nan
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
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    if tasks:
        axes[0].legend(fontsize=7)
    paths.append(out_dir / "progress.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


# -------------------------------------------------------------------- the whole command
def run_leaderboard(
    protocol: Protocol,
    tasks: Sequence[Task] = TASKS,
    agents: Sequence[str] = AGENTS,
    rows_dir: str | os.PathLike = "benchmarks/rows",
    workdir: str | os.PathLike = "benchmarks/runs",
    output: str | os.PathLike | None = "benchmarks/LEADERBOARD.md",
    plots_dir: str | os.PathLike | None = "benchmarks/plots",
    only_render: bool = False,
    check: bool = False,
    jobs: int = 1,
    progress: bool = True,
) -> int:
    """Run the missing rows (unless ``only_render``), then write the table and plots from
    every row in ``rows_dir``. With ``check``, replay the rows first. Returns an exit code:
    0, or 1 when a run failed or a row did not validate."""
    code = 0
    if output is not None:
        check_writable(Path(output).parent, "output folder", "--output")
    if plots_dir is not None:
        check_writable(plots_dir, "plots folder", "--plots-dir")
    if not only_render:
        result = run_all(protocol, tasks, agents, rows_dir, workdir, jobs=jobs, progress=progress)
        if result["failed"]:
            code = 1
            print(f"{len(result['failed'])} runs failed (no row written):", file=sys.stderr)
            for rid, err in result["failed"].items():
                print(f"  {rid}: {err}", file=sys.stderr)
    rows = load_rows(rows_dir) if Path(rows_dir).exists() else []
    if check:
        bad = [v for v in validate(rows) if not v["ok"]]
        for v in bad:
            print(f"row {v['row_id']} does not validate: {'; '.join(v['errors'])}", file=sys.stderr)
        code = 1 if bad else code
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(render(rows) + "\n")
        print(f"wrote {output} ({len(rows)} rows)")
    if plots_dir is not None and rows:
        for p in plot(rows, plots_dir):
            print(f"wrote {p}")
    return code


def protocol_with(protocol: Protocol, **changes) -> Protocol:
    """A copy of ``protocol`` with ``changes`` (``None`` values are ignored)."""
    return replace(protocol, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_BUDGET = 100
DEFAULT_ROWS_DIR = "benchmarks/rows"
DEFAULT_WORK_DIR = "benchmarks/runs"
DEFAULT_OUTPUT = "benchmarks/LEADERBOARD.md"
DEFAULT_PLOTS_DIR = "benchmarks/plots"


def make_protocol(
    budget: int = DEFAULT_BUDGET,
    seeds: Sequence[int] = (1, 2, 3),
    dataset: str | None = None,
    evaluation: str = "accuracy",
    finetune_epochs: int | None = None,
    finetune_samples: int | None = None,
    threads: int = 1,
    agent_timeout_s: float | None = None,
) -> Protocol:
    """A :class:`Protocol` from command-line options. ``finetune_epochs`` changes the epochs
    of the default recipe of ``dataset`` (Fashion-MNIST's when no dataset is overridden)."""
    recipe = None
    if finetune_epochs is not None:
        from .finetune import default_recipe

        recipe = replace(default_recipe(dataset or "fashion-mnist"), epochs=int(finetune_epochs))
    return Protocol(
        budget=int(budget),
        seeds=tuple(int(s) for s in seeds),
        evaluation=evaluation,
        dataset=dataset,
        finetune_recipe=recipe,
        finetune_samples=finetune_samples,
        threads=int(threads),
        agent_timeout_s=agent_timeout_s,
    )


def command(
    tasks: Sequence[str] | None = None,
    agents: Sequence[str] | None = None,
    seeds: Sequence[int] = (1, 2, 3),
    budget: int = DEFAULT_BUDGET,
    dataset: str | None = None,
    evaluation: str = "accuracy",
    finetune_epochs: int | None = None,
    finetune_samples: int | None = None,
    threads: int = 1,
    jobs: int = 1,
    rows_dir: str = DEFAULT_ROWS_DIR,
    work_dir: str = DEFAULT_WORK_DIR,
    output: str | None = DEFAULT_OUTPUT,
    plots_dir: str | None = DEFAULT_PLOTS_DIR,
    only_render: bool = False,
    validate: bool = False,
    progress: bool = True,
    agent_timeout: float | None = None,
) -> int:
    """What ``benchmarks/leaderboard.py`` and ``autosculpt leaderboard`` run; the parameters
    are their options, by the same names. ``validate`` replays every row before rendering;
    ``agent_timeout`` kills an agent run after that many seconds."""
    protocol = make_protocol(
        budget,
        seeds,
        dataset,
        evaluation,
        finetune_epochs,
        finetune_samples,
        threads,
        agent_timeout,
    )
    task_list = [Task.parse(t) for t in tasks] if tasks else list(TASKS)
    return run_leaderboard(
        protocol,
        task_list,
        list(agents) if agents else list(AGENTS),
        rows_dir=rows_dir,
        workdir=work_dir,
        output=output,
        plots_dir=plots_dir,
        only_render=only_render,
        check=validate,
        jobs=jobs,
        progress=progress,
    )
