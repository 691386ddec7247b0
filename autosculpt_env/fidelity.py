"""Reward fidelity: how well does a reward predict the leaderboard score it stands for?

A reward (an ``evaluation=`` mode of the env) is a measurement of the leaderboard score
(:func:`autosculpt_env.scoring.score_policy`: test accuracy after the fixed fine-tuning).
This module measures how good a measurement it is, per leaderboard task:

* a fixed, stored **policy set** (:class:`PolicySet`) in up to three parts (:data:`SETS`).
  The *competitive* set holds the best policies that searches actually find (the committed
  leaderboard rows' policies and the best policies of further search runs): the region where
  the leaderboard ranks, and the set every goal is judged on. The *holdout* set holds more
  policies found the same way (search runs under other seeds), added after candidates were
  compared on the competitive set: a choice made there is confirmed here, on policies it was
  not made on. The *broad* set holds seeded random valid policies and mutations of
  competitive ones, for context only (a wide spread of quality makes any reward look good);
* the **ground truth**: each policy's score under two fine-tuning seeds
  (:data:`GROUND_TRUTH_SEEDS`). The rank correlation between the two seeds is the **noise
  ceiling**, the agreement no reward can be expected to beat; a reward is compared with the
  mean of the two;
* per candidate reward: Spearman's ρ and Kendall's τ with the ground truth (95 % paired
  bootstrap intervals, ``scipy.stats.bootstrap``), and its **cost** per evaluation as a
  ratio to a bare dense forward pass over the same reward images, timed in the same run;
* for the candidates that train (the ``recovery`` modes), optionally the same figures
  under other **recovery seeds** (the env's reward trains under seed 0): the bootstrap
  intervals resample policies, not the reward's own training noise, so two candidates are
  only told apart where they differ under every seed measured.

Everything expensive is stored as it is computed, one atomic file per result, so a killed
run loses at most the runs in flight, several runners can share a folder (a lock file per
result), and adding a candidate recomputes no ground truth. Layout of a fidelity folder
(default ``benchmarks/fidelity``)::

    <task>/policies.json                     the stored policy set
    <task>/ground_truth/<policy>__seed<s>.json   one fine-tuning run (test accuracy)
    <task>/rewards/<mode>.json               one candidate's reward per policy, its cost
    <task>/rewards/recovery_seed<k>/<mode>.json   the same reward, its recovery pass
                                             trained under seed k instead of the env's 0
    REWARD_FIDELITY.md, plots/<task>.png     the report (generated from the above)

Rewards are computed on the ``reward`` split; the ``test`` split is read only by the
ground truth (through :mod:`autosculpt_env.scoring`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .band import max_kept
from .leaderboard import TASKS, Task, git_commit, load_rows
from .leaderboard.run import search_reward_identity
from .readme_blocks import update_block
from .records import atomic_write_text

SETS: tuple[str, ...] = ("competitive", "holdout", "broad")
"""The parts of a policy set, by precedence: a policy found again for another part keeps the
earlier part here (a competitive policy a holdout search finds is not held out)."""

GROUND_TRUTH_SEEDS: tuple[int, ...] = (1, 2)
"""Fine-tuning seeds of the ground truth (the leaderboard seeds fine-tuning with its run's
seed, so these are two of the seeds its rows use)."""

DEFAULT_DIR = Path("benchmarks/fidelity")
SCHEMA = 1


def task_dir_name(task: Task) -> str:
    return task.name


def policy_key(actions: Sequence[str]) -> str:
    """A short stable name for a policy (its action names hashed)."""
    return hashlib.sha256(json.dumps(list(actions)).encode()).hexdigest()[:16]


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON atomically (:func:`autosculpt_env.records.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path, what: str):
    """Load JSON with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to recompute {what}") from None


# ------------------------------------------------------------------------- policy sets
@dataclass
class PolicyEntry:
    """One stored policy: its action names, which set it belongs to, where it came from."""

    actions: list[str]
    set: str  # one of SETS
    sources: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return policy_key(self.actions)


@dataclass
class PolicySet:
    """The fixed policies of one task, stored in ``<task>/policies.json``."""

    task: Task
    policies: list[PolicyEntry]

    def add(self, actions: Sequence[str], set_name: str, source: str) -> bool:
        """Add a policy (or a source to a stored one); a stored entry moves only to a part
        earlier in :data:`SETS`. Returns whether the policy is new."""
        if set_name not in SETS:
            raise ValueError(f"unknown policy set {set_name!r}; choose one of {', '.join(SETS)}")
        key = policy_key(actions)
        for p in self.policies:
            if p.key == key:
                if source not in p.sources:
                    p.sources.append(source)
                if SETS.index(set_name) < SETS.index(p.set):
                    p.set = set_name
                return False
        self.policies.append(PolicyEntry(list(actions), set_name, [source]))
        return True

    def of(self, set_name: str) -> list[PolicyEntry]:
        return [p for p in self.policies if p.set == set_name]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "task": self.task.name,
            "policies": [
                {"actions": p.actions, "set": p.set, "sources": p.sources} for p in self.policies
            ],
        }

    def save(self, root: Path) -> Path:
        path = Path(root) / task_dir_name(self.task) / "policies.json"
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, root: Path, task: Task) -> PolicySet:
        path = Path(root) / task_dir_name(task) / "policies.json"
        if not path.exists():
            return cls(task, [])
        d = read_json(path, "the policy set")
        if d.get("task") != task.name or not isinstance(d.get("policies"), list):
            raise ValueError(f"{path}: not the policy set of {task.name}")
        out = cls(task, [])
        for i, p in enumerate(d["policies"]):
            acts, set_name = p.get("actions"), p.get("set")
            if not (isinstance(acts, list) and all(isinstance(a, str) for a in acts)):
                raise ValueError(f"{path}: policy {i} has no list of action names")
            if set_name not in SETS:
                raise ValueError(f"{path}: policy {i} has set {set_name!r}")
            out.policies.append(PolicyEntry(acts, set_name, [str(s) for s in p.get("sources", [])]))
        return out


def make_task_env(task: Task, **overrides):
    """The task's env as the leaderboard builds it (its registered id's keywords, the task's
    FLOPs target, and ``overrides``)."""
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    kwargs = {"target_flops_reduction": task.target_flops_reduction, **overrides}
    return gym.make(task.env_id, **kwargs)


def add_row_policies(ps: PolicySet, rows_dir: str | os.PathLike) -> int:
    """Add the best policy of every committed leaderboard row of the task (competitive)."""
    added = 0
    for row in load_rows(rows_dir):
        if row.get("task") == ps.task.name:
            added += ps.add(row["policy"], "competitive", f"row:{row['row_id']}")
    return added


def random_valid_policy(env, rng: random.Random) -> list[int]:
    """A uniformly random valid action per layer (the env's action mask, FLOPs wall
    included), drawn without scoring the policy."""
    base = env.unwrapped
    base.reset(seed=0)
    actions: list[int] = []
    for t in range(base.num_layers):
        actions.append(int(rng.choice(np.flatnonzero(base.action_masks()).tolist())))
        if t < base.num_layers - 1:
            base.step(actions[-1])
    return actions


def mutate(env, actions: Sequence[int], rng: random.Random, tries: int = 100) -> list[int] | None:
    """Change 1-3 random layers to other valid actions, keeping the FLOPs target met."""
    base = env.unwrapped
    p = base.problem
    limit = max_kept(base.dense_flops, base.target)
    for _ in range(tries):
        out = list(actions)
        for layer in rng.sample(range(p.num_layers), k=min(p.num_layers, rng.randint(1, 3))):
            out[layer] = int(rng.choice(np.flatnonzero(p.valid[layer]).tolist()))
        if out != list(actions) and p.policy_flops(out) <= limit:
            return out
    return None


def add_broad_policies(ps: PolicySet, env, random_count: int, mutation_count: int, seed: int = 0):
    """Seeded random valid policies and mutations of the competitive set (the broad set)."""
    rng = random.Random(seed)
    names = env.unwrapped.action_names
    p = env.unwrapped.problem
    for i in range(random_count):
        acts = random_valid_policy(env, rng)
        ps.add([names[a] for a in acts], "broad", f"random:seed{seed}:{i}")
    parents = ps.of("competitive")
    for i in range(mutation_count if parents else 0):
        parent = parents[i % len(parents)]
        child = mutate(env, p.actions_from_names(parent.actions), rng)
        if child is not None:
            ps.add([names[a] for a in child], "broad", f"mutation:seed{seed}:{i}:{parent.key}")


# ------------------------------------------------------------------------ ground truth
def ground_truth_path(root: Path, task: Task, key: str, seed: int) -> Path:
    return Path(root) / task_dir_name(task) / "ground_truth" / f"{key}__seed{seed}.json"


def load_ground_truth(root: Path, task: Task) -> dict[str, dict[int, float]]:
    """``{policy key: {fine-tuning seed: test accuracy}}`` of the stored ground truth."""
    out: dict[str, dict[int, float]] = {}
    folder = Path(root) / task_dir_name(task) / "ground_truth"
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        d = read_json(path, "this ground-truth run")
        acc = d.get("test_accuracy")
        if (
            d.get("task") != task.name
            or policy_key(d.get("actions", [])) != d.get("key")
            or path.name != f"{d.get('key')}__seed{d.get('seed')}.json"
            or not isinstance(acc, float)
            or not 0.0 <= acc <= 1.0
        ):
            raise ValueError(f"{path}: not a valid ground-truth run of {task.name}; delete it")
        out.setdefault(d["key"], {})[int(d["seed"])] = acc
    return out


def import_row_ground_truth(root: Path, task: Task, rows_dir: str | os.PathLike) -> int:
    """Store the test accuracies of committed leaderboard rows as ground-truth runs.

    A row is the same computation as a ground-truth run when its fine-tuning seed is one of
    :data:`GROUND_TRUTH_SEEDS`, its recipe is the default one on the whole ``train`` split
    and it ran on one thread (fine-tuning on one thread is deterministic: recomputed runs
    reproduce such rows' test accuracy exactly, which :func:`check_row_agreement` reports).
    Returns the number of runs imported.
    """
    from .finetune import default_recipe

    n = 0
    for row in load_rows(rows_dir):
        seed = row.get("seed")
        if row.get("task") != task.name or seed not in GROUND_TRUTH_SEEDS:
            continue
        if (
            row.get("finetune_recipe") != default_recipe(row["dataset"]).to_dict()
            or row.get("finetune_samples") is not None
            or row.get("protocol", {}).get("threads") != 1
        ):
            continue
        key = policy_key(row["policy"])
        path = ground_truth_path(root, task, key, seed)
        if path.exists():
            continue
        atomic_write_json(
            path,
            {
                "schema": SCHEMA,
                "task": task.name,
                "key": key,
                "actions": list(row["policy"]),
                "seed": seed,
                "test_accuracy": float(row["test_accuracy"]),
                "recipe": row["finetune_recipe"],
                "seconds": row.get("finetune_seconds"),
                "threads": 1,
                "source": f"row:{row['row_id']}",
                "git_commit": row.get("git_commit"),
                "git_dirty": row.get("git_dirty"),
            },
        )
        n += 1
    return n


def check_row_agreement(root: Path, task: Task, rows_dir: str | os.PathLike) -> list[tuple]:
    """``(row id, seed, row test accuracy, recomputed)`` for every row whose policy and seed
    also have a ground-truth run computed here (not imported)."""
    computed = {}
    folder = Path(root) / task_dir_name(task) / "ground_truth"
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        d = read_json(path, "this ground-truth run")
        if "source" not in d:
            computed[(d["key"], d["seed"])] = d["test_accuracy"]
    out = []
    for row in load_rows(rows_dir):
        k = (policy_key(row["policy"]), row.get("seed"))
        if row.get("task") == task.name and k in computed:
            out.append((row["row_id"], row["seed"], row["test_accuracy"], computed[k]))
    return out


class _Lock:
    """An exclusive lock file beside a result: a second runner skips that result. A lock
    left by a dead process of this host is taken over."""

    def __init__(self, path: Path):
        self.path = Path(str(path) + ".lock")
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, _, pid = self.path.read_text().partition(":")
                    stale = host == socket.gethostname() and not _alive(int(pid))
                except (OSError, ValueError):
                    stale = False
                if not stale:
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ENVS: dict[tuple, object] = {}


def _task_env(task: Task, **overrides):
    key = (task, tuple(sorted(overrides.items())))
    if key not in _ENVS:
        _ENVS[key] = make_task_env(task, **overrides)
    return _ENVS[key]


def ground_truth_one(root: Path, task: Task, actions: Sequence[str], seed: int) -> str:
    """Fine-tune one policy with one seed and store its test accuracy (skips a stored or
    locked one). Returns ``"done"``, ``"stored"`` or ``"locked"``."""
    import torch

    from .scoring import score_policy

    key = policy_key(actions)
    path = ground_truth_path(root, task, key, seed)
    if path.exists():
        return "stored"
    lock = _Lock(path)
    if not lock.acquire():
        return "locked"
    try:
        if path.exists():
            return "stored"
        env = _task_env(task)
        s = score_policy(env, list(actions), seed=seed)
        commit, dirty = git_commit()
        atomic_write_json(
            path,
            {
                "schema": SCHEMA,
                "task": task.name,
                "key": key,
                "actions": list(actions),
                "seed": seed,
                "test_accuracy": float(s.test_accuracy),
                "recipe": s.recipe.to_dict(),
                "seconds": round(s.seconds, 2),
                "threads": torch.get_num_threads(),
                "git_commit": commit,
                "git_dirty": dirty,
            },
        )
        return "done"
    finally:
        lock.release()


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _gt_worker(args) -> tuple[str, str, int, str, float]:
    root, task, actions, seed = args
    t0 = time.perf_counter()
    status = ground_truth_one(root, task, actions, seed)
    return task.name, policy_key(actions), seed, status, time.perf_counter() - t0


def ground_truth_jobs(
    root: Path, tasks: Iterable[Task], sets: Sequence[str], seeds: Sequence[int]
) -> list[tuple]:
    """The ground-truth runs still missing, task by task, both seeds of a policy together."""
    todo = []
    for task in tasks:
        ps = PolicySet.load(root, task)
        for set_name in sets:
            for p in ps.of(set_name):
                for seed in seeds:
                    if not ground_truth_path(root, task, p.key, seed).exists():
                        todo.append((Path(root), task, p.actions, seed))
    return todo


def run_ground_truth(
    root: Path,
    tasks: Iterable[Task] = TASKS,
    sets: Sequence[str] = SETS,
    seeds: Sequence[int] = GROUND_TRUTH_SEEDS,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
) -> int:
    """Compute every missing ground-truth run (resumable; safe to run twice at once)."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    todo = ground_truth_jobs(root, list(tasks), sets, seeds)
    if not todo:
        return 0
    done = 0
    bar = tqdm(total=len(todo), desc="ground truth (fine-tuning runs)", disable=not progress)
    if jobs <= 1:
        _init_worker(threads)
        results = map(_gt_worker, todo)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(jobs, _init_worker, (threads,))
        results = pool.imap(_gt_worker, todo)
    try:
        for name, key, seed, status, seconds in results:
            done += status == "done"
            bar.update(1)
            bar.write(f"{name} {key} seed {seed}: {status} ({seconds:.0f} s)")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return done


# ----------------------------------------------------------------- building a policy set
SEARCH_AGENTS: tuple[str, ...] = ("ppo_gnn", "ppo_mlp", "ddpg_amc", "random_search")
"""Agents whose search runs add their best policies to the competitive set."""

SEARCH_MAX_REWARD_EVALUATIONS = 50
"""Reward evaluations of each search run that feeds the competitive set: the order of the
leaderboard's limits (the first protocol's 100, the full track's 25), about a minute of
``accuracy`` evaluations per run."""

SEARCH_EVALUATION = "accuracy"
"""The ``evaluation=`` mode those search runs optimise. Not a candidate's own reward (a set
searched under one candidate would favour it), and the cheapest mode that is not a proxy."""


def search_best_policy(
    task: Task,
    agent: str,
    seed: int,
    workdir: Path,
    max_reward_evaluations: int = SEARCH_MAX_REWARD_EVALUATIONS,
    evaluation: str = SEARCH_EVALUATION,
) -> list[str]:
    """Run one agent as a program and return its best policy's action names."""
    import subprocess
    import sys

    from .leaderboard import agent_script
    from .records import EpisodeRecord

    name = f"{task.name}__{agent}__seed{seed}__{evaluation}{max_reward_evaluations}"
    best = Path(workdir) / name / "best.json"
    if not best.exists():
        cmd = [
            sys.executable,
            str(agent_script(agent)),
            "--env-id",
            task.env_id,
            "--target-flops-reduction",
            str(task.target_flops_reduction),
            "--evaluation",
            evaluation,
            "--seed",
            str(seed),
            "--max-reward-evaluations",
            str(max_reward_evaluations),
            "--threads",
            "1",
            "--output-dir",
            str(workdir),
            "--run-name",
            name,
            "--no-progress",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not best.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(tail))
    return list(EpisodeRecord.load(best).actions)


def build_policy_set(
    root: Path,
    task: Task,
    rows_dir: str | os.PathLike | None = "benchmarks/rows",
    agents: Sequence[str] = SEARCH_AGENTS,
    seeds: Sequence[int] = (11, 12, 13, 14, 15),
    max_reward_evaluations: int = SEARCH_MAX_REWARD_EVALUATIONS,
    evaluation: str = SEARCH_EVALUATION,
    broad_random: int = 12,
    broad_mutations: int = 12,
    workdir: Path = Path("benchmarks/runs/fidelity"),
    progress: bool = True,
    search_set: str = "competitive",
) -> PolicySet:
    """Build or extend a task's stored policy set (each step is skipped once done).

    Competitive: the committed rows' best policies, then the best policy of every
    (agent, seed) search run (``max_reward_evaluations`` evaluations of ``evaluation``);
    with ``search_set="holdout"`` those search runs fill the holdout set instead (give them
    seeds the competitive set's searches did not use).
    Broad: seeded random valid policies and mutations of competitive ones (drawn once; a
    stored set is never redrawn).
    """
    from tqdm.auto import tqdm

    if search_set not in ("competitive", "holdout"):
        raise ValueError(f"search runs fill the competitive or holdout set, not {search_set!r}")
    ps = PolicySet.load(root, task)
    if rows_dir is not None:
        add_row_policies(ps, rows_dir)
        import_row_ground_truth(root, task, rows_dir)
    runs = [(a, s) for a in agents for s in seeds]
    for agent, seed in tqdm(runs, desc=f"{task.name} searches", disable=not progress):
        source = f"search:{agent}:seed{seed}:{evaluation}{max_reward_evaluations}"
        if any(source in p.sources for p in ps.policies):
            continue
        best = search_best_policy(task, agent, seed, workdir, max_reward_evaluations, evaluation)
        ps.add(best, search_set, source)
        ps.save(root)
    if not ps.of("broad") and (broad_random or broad_mutations):
        env = make_task_env(task)
        try:
            add_broad_policies(ps, env, broad_random, broad_mutations)
        finally:
            env.close()
    ps.save(root)
    return ps


# ----------------------------------------------------------------------- candidate rewards
def parse_candidate(spec: str) -> tuple[str, dict]:
    """A candidate reward: an ``evaluation=`` mode, optionally with env settings,
    ``"recovery"`` or ``"recovery[recovery_batch_size=128]"``. Returns ``(mode, settings)``."""
    mode, _, rest = spec.partition("[")
    settings: dict = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"candidate {spec!r}: expected MODE or MODE[key=value,...]")
        for item in filter(None, rest[:-1].split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"candidate {spec!r}: {item!r} is not key=value")
            settings[key.strip()] = json.loads(value) if value[:1].isdigit() else value
    return mode, settings


def mode_settings(mode: str) -> dict:
    """The env settings ``mode`` reads, at the env's common defaults, not a zoo model's own
    (what a candidate spec leaves unsaid): ``{"recovery_samples": 1024,
    "recovery_batch_size": 16, "reward_readout": "accuracy"}`` for ``recovery`` (every mode
    reads the readout)."""
    from .evaluation import DEFAULT_READOUT, MODE_SETTINGS, RECOVERY_BATCH_SIZE, SAMPLE_SETTINGS

    defaults = {k: v[1] for k, v in SAMPLE_SETTINGS.items()}
    defaults["recovery_batch_size"] = RECOVERY_BATCH_SIZE
    parts = mode.split("+")
    out = {k: defaults[k] for part in parts for k in MODE_SETTINGS.get(part, ())}
    return {**out, "reward_readout": DEFAULT_READOUT}


def candidate_spec(mode: str, settings: dict) -> str:
    """The candidate name of ``mode`` with ``settings`` (those differing from the env's
    defaults appear, sorted): the inverse of :func:`parse_candidate`."""
    from .evaluation import SAMPLE_SETTINGS

    defaults = mode_settings(mode)
    # an image count given as None is its default: compare counts, not spellings
    changed = {
        k: v
        for k, v in settings.items()
        if k in defaults and not (v is None and k in SAMPLE_SETTINGS) and v != defaults[k]
    }
    if not changed:
        return mode
    return f"{mode}[{','.join(f'{k}={changed[k]}' for k in sorted(changed))}]"


def make_candidate_env(task: Task, spec: str):
    """The task's env evaluating with one candidate reward. Settings the spec leaves unsaid
    are the env's common defaults, given explicitly (not the task's registered id's, nor
    its zoo model's own, ``zoo.ZooModel.env_defaults``), so that a candidate's name means the
    same reward on every task."""
    return make_task_env(task, **candidate_kwargs(spec))


def candidate_kwargs(spec: str) -> dict:
    """The env keywords of a candidate: its mode, and every setting the mode reads (the
    spec's, else the env's common default, :func:`mode_settings`)."""
    mode, settings = parse_candidate(spec)
    return {"evaluation": mode, **mode_settings(mode), **settings}


def rewards_path(root: Path, task: Task, mode: str, seed: int = 0) -> Path:
    """Where a candidate's rewards are stored; ``seed``: its recovery pass's (0, the env's,
    unless a seed replicate is meant)."""
    folder = Path(root) / task_dir_name(task) / "rewards"
    if int(seed) != 0:
        folder = folder / f"recovery_seed{int(seed)}"
    return folder / f"{mode}.json"


def check_reward_seed(mode: str, seed) -> int:
    """``seed`` as a recovery seed of candidate ``mode``, or a ValueError naming the fix."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"a recovery seed must be an integer >= 0, got {seed!r}")
    if seed != 0 and "recovery" not in parse_candidate(mode)[0].split("+"):
        raise ValueError(
            f"candidate {mode!r} trains nothing, so it has no recovery seed; seed "
            f"{seed} applies only to the recovery modes (recovery, reconstruction+recovery)"
        )
    return seed


def reward_seeds(root: Path, task: Task, mode: str) -> list[int]:
    """The recovery seeds other than 0 whose rewards of ``mode`` are stored, sorted."""
    folder = Path(root) / task_dir_name(task) / "rewards"
    found = []
    for sub in folder.glob("recovery_seed*"):
        tail = sub.name[len("recovery_seed") :]
        if tail.isdigit() and int(tail) != 0 and (sub / f"{mode}.json").exists():
            found.append(int(tail))
    return sorted(found)


def load_rewards(root: Path, task: Task, mode: str, seed: int = 0) -> dict:
    """``{"values": {policy key: reward accuracy}, "cost": {...} | None, ...}`` of a mode
    (under recovery seed ``seed``)."""
    seed = check_reward_seed(mode, seed)
    path = rewards_path(root, task, mode, seed)
    if not path.exists():
        out = {"mode": mode, "task": task.name, "values": {}, "cost": None}
        return out if seed == 0 else {**out, "recovery_seed": seed}
    d = read_json(path, f"the {mode} rewards")
    values = d.get("values")
    if (
        d.get("mode") != mode
        or d.get("task") != task.name
        or d.get("recovery_seed", 0) != seed
        or not isinstance(values, dict)
        or not all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values.values())
    ):
        what = f"the {mode} rewards of {task.name}" + (
            f" under recovery seed {seed}" if seed else ""
        )
        raise ValueError(f"{path}: not {what}; delete it to recompute")
    return d


def compute_rewards(
    root: Path,
    task: Task,
    mode: str,
    threads: int = 1,
    progress: bool = True,
    save_every: int = 8,
    seed: int = 0,
) -> dict:
    """Score every stored policy of the task with one ``evaluation=`` mode (missing ones
    only; stored every ``save_every`` policies, so a killed run loses little).

    ``seed``: the recovery pass's seed (a candidate that trains; 0 is the env's reward,
    another measures how much its ranking depends on that seed, stored apart,
    :func:`rewards_path`). A ``proxy`` candidate's answers depend on the surrogate file it
    loads, not on settings: the file's sha256 is stored with them, and values another
    surrogate gave are refused.
    """
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    seed = check_reward_seed(mode, seed)
    ps = PolicySet.load(root, task)
    d = load_rewards(root, task, mode, seed)
    todo = [p for p in ps.policies if p.key not in d["values"]]
    fitted = parse_candidate(mode)[0] == "proxy"  # its answers depend on a file, not settings
    if not todo and not fitted:
        return d
    path = rewards_path(root, task, mode, seed)
    trains = "recovery" in parse_candidate(mode)[0].split("+")
    if trains and todo and d["values"] and d.get("threads", threads) != threads:
        raise ValueError(
            f"{path}: computed with {d['threads']} torch thread(s), asked for {threads}; a "
            "recovery reward moves with the thread count (its training pass adds up in "
            f"another order), so rerun with --threads {d['threads']}, or delete the file to "
            "recompute every policy"
        )
    if not d["values"]:
        d["threads"] = threads  # a file older than this record leaves it unknown
    env = make_candidate_env(task, mode)
    base = env.unwrapped
    if fitted:
        now = search_reward_identity(env)
        if d["values"] and d.get("surrogate") != now:
            env.close()
            there = (d.get("surrogate") or {}).get("sha256", "not recorded")
            raise ValueError(
                f"{path}: scored by another surrogate than the one {mode!r} loads now "
                f"(sha256 {there} there, {now['sha256']} now); delete it to rescore "
                "every policy with the current one"
            )
        d["surrogate"] = now
        if not todo:
            env.close()
            return d
    stored = d.get("env_kwargs") or {}
    from .evaluation import unused_settings

    ignored = unused_settings(parse_candidate(mode)[0])
    differ = {
        k
        for k in stored.keys() & base.env_kwargs.keys()
        if stored[k] != base.env_kwargs[k] and k not in ignored
    }
    if differ:
        env.close()
        raise ValueError(
            f"{path}: computed with other env settings than {mode!r} has now ("
            + ", ".join(
                f"{k}: {stored[k]!r} there, {base.env_kwargs[k]!r} now" for k in sorted(differ)
            )
            + "); rename it to a candidate that spells its settings, e.g. "
            f"'{parse_candidate(mode)[0]}[{sorted(differ)[0]}={stored[sorted(differ)[0]]}]', or delete it"
        )
    d["env_kwargs"] = base.env_kwargs
    score = _scorer(env, seed)
    desc = f"{task.name} {mode}" + (f" (recovery seed {seed})" if seed else "")
    try:
        for n, p in enumerate(tqdm(todo, desc=desc, disable=not progress), 1):
            d["values"][p.key] = score(p.actions)
            if n % save_every == 0 or n == len(todo):
                atomic_write_json(path, d)
    finally:
        env.close()
    return d


def _scorer(env, seed: int):
    """``actions -> reward`` of a candidate's env: its own reward (seed 0), or the same
    reward with the recovery pass trained under ``seed``."""
    base = env.unwrapped
    if not seed:
        return lambda actions: float(base.evaluate_policy(actions)["accuracy"])
    from .envs.autosculpt import seeded_reward_evaluator

    seeded = seeded_reward_evaluator(env, seed)

    def score(actions) -> float:
        idx = base.problem.policy_indices(actions)
        base.problem.check_policy(idx)
        return float(seeded(idx))

    return score


def verify_rewards(
    root: Path,
    task: Task,
    mode: str,
    policies: int = 4,
    seed: int = 0,
    threads: int | None = None,
    sample_seed: int = 0,
) -> list[tuple[str, float, float]]:
    """Score ``policies`` stored policies of a candidate again (seeded choice, search-run
    policies first: the ones added after the rows) and return ``(policy key, stored, now)``
    for each that does not reproduce. Run it with the thread count the file states (its
    ``threads``, the default here; 1 where a file predates that record)."""
    import torch

    d = load_rewards(root, task, mode, seed)
    keys = set(d["values"])
    ps = [p for p in PolicySet.load(root, task).policies if p.key in keys]
    if not ps:
        return []
    rng = random.Random(sample_seed)
    searched = [p for p in ps if any(s.startswith("search:") for s in p.sources)]
    rest = [p for p in ps if p not in searched]
    pick = rng.sample(searched, min(policies, len(searched)))
    pick += rng.sample(rest, min(policies - len(pick), len(rest)))
    torch.set_num_threads(int(threads or d.get("threads") or 1))
    env = make_candidate_env(task, mode)
    score = _scorer(env, seed)
    out = []
    try:
        for p in pick:
            now = score(p.actions)
            if now != d["values"][p.key]:
                out.append((p.key, d["values"][p.key], now))
    finally:
        env.close()
    return out


def measure_cost(
    root: Path, task: Task, mode: str, evaluations: int = 6, threads: int = 1, seed: int = 123
) -> dict:
    """Time ``evaluations`` unseen random valid policies under ``mode`` and a bare dense
    forward pass over the same reward images, in this one run; store their ratio.

    The env is warmed up on the stored policy set first (for ``reconstruction`` this fills
    the per-(layer, action) refit cache as a long search would), so the figure is the
    steady-state cost of one evaluation. Run it on an otherwise idle machine.
    """
    import torch

    torch.set_num_threads(threads)
    env = make_candidate_env(task, mode)
    base = env.unwrapped
    try:
        for p in PolicySet.load(root, task).policies[:8]:
            base.evaluate_policy(p.actions)
        images = base.evaluator.images
        net = base.problem.model

        def bare() -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(images), 1024):
                    net(images[i : i + 1024])
            return time.perf_counter() - t0

        rng = random.Random(seed)
        forward, evals = [], []
        for _ in range(evaluations):
            forward.append(bare())
            policy = random_valid_policy(env, rng)
            t0 = time.perf_counter()
            base.evaluate_policy(policy)
            evals.append(time.perf_counter() - t0)
        forward.append(bare())
    finally:
        env.close()
    cost = {
        "ratio": float(np.median(evals) / np.median(forward)),
        "evaluation_seconds": float(np.median(evals)),
        "forward_seconds": float(np.median(forward)),
        "evaluations": evaluations,
        "reward_images": len(images),
        "threads": threads,
    }
    d = load_rewards(root, task, mode)
    d["cost"] = cost
    atomic_write_json(rewards_path(root, task, mode), d)
    return cost


# -------------------------------------------------------------------------------- report
@dataclass
class Agreement:
    """Rank agreement of one reward with the ground truth on one policy set."""

    n: int
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    kendall_ci: tuple[float, float]


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho (Pearson of average ranks, as ``scipy.stats.spearmanr``;
    0 where a side is constant) along ``axis``, the policies' axis (``scipy.stats.bootstrap``
    stacks its resamples along the others)."""
    from scipy import stats

    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    rx, ry = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    return np.divide((rx * ry).sum(-1), den, out=np.zeros_like(den), where=den > 0)


def _kendall(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Kendall's tau-b (as ``scipy.stats.kendalltau``; 0 where a side is constant) along
    ``axis``, as :func:`_spearman`: concordant minus discordant pairs over the geometric mean
    of the pairs untied on each side."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    sx = np.sign(x[..., :, None] - x[..., None, :]).astype(np.int8)
    sy = np.sign(y[..., :, None] - y[..., None, :]).astype(np.int8)
    s = (sx * sy).sum((-1, -2), dtype=np.int64)
    den = np.sqrt(
        np.abs(sx).sum((-1, -2), dtype=np.int64) * np.abs(sy).sum((-1, -2), dtype=np.int64),
        dtype=float,
    )
    return np.divide(s, den, out=np.zeros_like(den), where=den > 0)


def agreement(x: Sequence[float], y: Sequence[float], resamples: int = 2000) -> Agreement:
    """Spearman's rho and Kendall's tau of paired values, with 95 % percentile intervals
    from a paired bootstrap over policies (``scipy.stats.bootstrap``, seeded; the statistics
    are computed for all resamples at once)."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    out = []
    for f in (_spearman, _kendall):
        ci = stats.bootstrap(
            (x, y),
            f,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            method="percentile",
            random_state=0,
        ).confidence_interval
        out += [float(f(x, y)), (float(ci.low), float(ci.high))]
    return Agreement(len(x), out[0], out[1], out[2], out[3])


GOAL_SPEARMAN = 0.8
"""The default reward's goal: Spearman >= 0.8 with the score on the competitive set, or
within :data:`GOAL_CEILING_MARGIN` of the noise ceiling where that is lower."""
GOAL_CEILING_MARGIN = 0.05
GOAL_COST = 5.0
"""... at no more than this multiple of a bare dense forward over the reward images."""


def goal_of(ceiling: Agreement | None) -> float:
    """The Spearman the default must reach on a set with this noise ceiling (the ceiling's own
    agreement; ``None``: not measured, so the plain goal)."""
    if ceiling is None:
        return GOAL_SPEARMAN
    return min(GOAL_SPEARMAN, ceiling.spearman - GOAL_CEILING_MARGIN)


def default_mode(task: Task) -> str:
    """The candidate the task's registered id rewards with by default: its ``evaluation=``
    mode, with the settings that mode reads where the id or its zoo model
    (``zoo.ZooModel.env_defaults``) sets them apart from the env's common defaults
    (``"recovery[recovery_batch_size=8,recovery_samples=2048]"``)."""
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    from . import zoo
    from .surrogate import _env_defaults

    registered = gym.spec(task.env_id).kwargs
    kwargs = {**zoo.env_defaults(registered.get("model")), **registered}
    mode = kwargs.get("evaluation", _env_defaults()["evaluation"])
    return candidate_spec(mode, {k: kwargs[k] for k in mode_settings(mode) if k in kwargs})


def verdict(table: dict) -> str:
    """One line: does the task's default reward meet the goal, and by how much not."""
    entry = table["modes"].get(table["default"], {})
    a, ceiling = entry.get("competitive"), table["sets"]["competitive"].get("ceiling")
    if a is None or ceiling is None:
        return f"{table['task']}: no measurement of the default `{table['default']}` yet"
    goal = goal_of(ceiling)
    cost = entry.get("cost")
    cost_s = "cost not measured" if not cost else f"cost {_fmt_cost(cost['ratio'])}"
    cost_ok = bool(cost) and cost["ratio"] <= GOAL_COST
    met = a.spearman >= goal
    fresh = entry.get("searches_only")
    held = entry.get("holdout")
    reps = [r for r in entry.get("seeds", []) if r.n == a.n]
    seeds_s = (
        ""
        if not reps
        else f"; under recovery seeds 0, {', '.join(str(r.seed) for r in reps)}: ρ "
        + ", ".join(f"{v:.2f}" for v in [a.spearman] + [r.spearman for r in reps])
        + f" (mean {np.mean([a.spearman] + [r.spearman for r in reps]):.2f})"
    )
    mean = _same_policies(entry)
    if reps and mean is not None:
        seeds_s += (
            f"; the reward averaged over those {len(mean.seeds)} recovery passes "
            f"(at {len(mean.seeds)}× its cost): ρ {mean.agreement.spearman:.2f}"
        )
    return (
        f"{table['task']}: ρ {a.spearman:.2f} against a goal of {goal:.2f} "
        + ("(met)" if met else f"(short by {goal - a.spearman:.2f})")
        + seeds_s
        + f"; {cost_s}"
        + ("" if not cost else " (within 5×)" if cost_ok else f" (over {GOAL_COST:.0f}×)")
        + (
            ""
            if fresh is None
            else f"; on the {fresh.n} search-run policies alone: ρ {_fmt(fresh, 'rho')}"
        )
        + ("" if held is None else f"; on the {held.n} holdout policies: ρ {_fmt_holdout(entry)}")
    )


def proxy_verdict(table: dict) -> str:
    """One line: the shipped surrogate's lowest held-out Spearman for the task, if any."""
    from .surrogate import heldout_agreement

    task = Task.parse(table["task"])
    rho = heldout_agreement(task.env_id, task.target_flops_reduction)
    if rho is None:
        return f"{table['task']}: no surrogate of `{table['default']}` ships yet"
    digits = 2 if abs(rho - GOAL_SPEARMAN) >= 0.005 else 3  # 0.797 is not "0.80 (met)"
    met = "met" if rho >= GOAL_SPEARMAN else f"short by {GOAL_SPEARMAN - rho:.{digits}f}"
    return f"{table['task']}: the proxy's lowest held-out ρ {rho:.{digits}f} ({met})"


def task_table(root: Path, task: Task, modes: Sequence[str]) -> dict:
    """Everything the report shows for one task (computed from stored results only)."""
    ps = PolicySet.load(root, task)
    gt = load_ground_truth(root, task)
    seeds = GROUND_TRUTH_SEEDS
    complete = {k: v for k, v in gt.items() if all(s in v for s in seeds)}
    out = {"task": task.name, "sets": {}, "modes": {}, "default": default_mode(task)}
    stored = {mode: load_rewards(root, task, mode) for mode in modes}
    replicates = {  # mode -> other recovery seed -> its stored values
        mode: {
            s: load_rewards(root, task, mode, s)["values"] for s in reward_seeds(root, task, mode)
        }
        for mode in modes
    }
    for set_name in SETS:
        members = ps.of(set_name)
        keys = [p.key for p in members if p.key in complete]
        info = {"policies": len(members), "with_ground_truth": len(keys)}
        if len(keys) >= 4:
            a = [complete[k][seeds[0]] for k in keys]
            b = [complete[k][seeds[1]] for k in keys]
            info["ceiling"] = agreement(a, b)
            info["score_range"] = (min(a + b), max(a + b))
        out["sets"][set_name] = info
        for mode in modes:
            values = stored[mode]
            have = [k for k in keys if k in values["values"]]
            entry = out["modes"].setdefault(mode, {"cost": values.get("cost")})
            if len(have) >= 4:
                entry[set_name] = agreement(
                    [values["values"][k] for k in have],
                    [float(np.mean(list(complete[k].values()))) for k in have],
                )
            if set_name in ("competitive", "holdout"):
                reps = _seed_replicates(keys, complete, values["values"], replicates[mode])
                prefix = "" if set_name == "competitive" else "holdout_"
                entry[prefix + "seeds"] = reps
                mean = _seed_mean(keys, complete, values["values"], replicates[mode], reps)
                if mean is not None:
                    entry[prefix + "seed_mean"] = mean
    # the package-wide default was chosen on the committed rows' policies before the search
    # runs existed, so on those it is an out-of-sample figure (not for a per-model default
    # chosen on all of them, e.g. the ViT's)
    searched = {
        p.key
        for p in ps.of("competitive")
        if p.key in complete and p.sources and all(s.startswith("search:") for s in p.sources)
    }
    default = out["default"]
    values = (stored[default] if default in stored else load_rewards(root, task, default))["values"]
    have = sorted(k for k in searched if k in values)
    if len(have) >= 4:
        out["modes"].setdefault(out["default"], {})["searches_only"] = agreement(
            [values[k] for k in have], [float(np.mean(list(complete[k].values()))) for k in have]
        )
    return out


@dataclass
class SeedReplicate:
    """A candidate under another recovery seed, on the competitive policies scored under
    both it and seed 0: its Spearman with the score, and with itself under seed 0 (how
    repeatable the reward's ranking is)."""

    seed: int
    n: int
    spearman: float
    agreement_with_seed0: float


def _seed_replicates(keys, complete, values, replicates) -> list[SeedReplicate]:
    """``values`` are a candidate's rewards under recovery seed 0, ``replicates`` maps each
    other recovery seed to its rewards (both keyed by policy)."""
    from scipy import stats

    out = []
    for seed, other in replicates.items():
        have = [k for k in keys if k in other and k in values]
        if len(have) < 4:
            continue
        x = [other[k] for k in have]
        score = [float(np.mean(list(complete[k].values()))) for k in have]
        rho = stats.spearmanr(x, score)[0]
        same = stats.spearmanr(x, [values[k] for k in have])[0]
        out.append(
            SeedReplicate(seed, len(have), float(np.nan_to_num(rho)), float(np.nan_to_num(same)))
        )
    return out


@dataclass
class SeedMean:
    """A candidate's rewards averaged over recovery seed 0 and the seeds of its replicates,
    on the policies scored under all of them: how well the reward would rank with its
    training noise averaged out over ``len(seeds)`` recovery passes (at that multiple of
    its cost)."""

    seeds: tuple[int, ...]
    agreement: Agreement


def _seed_mean(keys, complete, values, replicates, reps) -> SeedMean | None:
    seeds = [0] + [r.seed for r in reps]
    if len(seeds) < 2:
        return None
    runs = [values] + [replicates[s] for s in seeds[1:]]
    have = [k for k in keys if all(k in run for run in runs)]
    if len(have) < 4:
        return None
    return SeedMean(
        tuple(seeds),
        agreement(
            [float(np.mean([run[k] for run in runs])) for k in have],
            [float(np.mean(list(complete[k].values()))) for k in have],
        ),
    )


def _fmt_seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}"


def _fmt_seeds(reps: Sequence[SeedReplicate], mean: SeedMean | None = None) -> str:
    if not reps:
        return "–"
    text = "; ".join(f"{r.seed}: {r.spearman:.2f} ({r.agreement_with_seed0:.2f})" for r in reps)
    if mean is not None:
        text += f"; averaged over {_fmt_seed_list(mean.seeds)}: {mean.agreement.spearman:.2f}"
    return text


def _same_policies(entry: dict, set_name: str = "competitive") -> SeedMean | None:
    """The candidate's seed-averaged figure on ``set_name`` if it ranks the same policies as
    its figure there, else ``None`` (a figure on fewer would read as its peer)."""
    prefix = "" if set_name == "competitive" else f"{set_name}_"
    mean, a = entry.get(prefix + "seed_mean"), entry.get(set_name)
    return mean if mean is not None and a is not None and mean.agreement.n == a.n else None


def _fmt_holdout(entry: dict) -> str:
    """The holdout column: ρ under recovery seed 0, then under the other seeds measured."""
    reps = [
        r for r in entry.get("holdout_seeds", []) if r.n == getattr(entry.get("holdout"), "n", -1)
    ]
    if not reps:
        return _fmt(entry.get("holdout"), "rho")
    seeds = ", ".join(str(r.seed) for r in reps)
    values = ", ".join(f"{r.spearman:.2f}" for r in reps)
    mean = _same_policies(entry, "holdout")
    averaged = (
        ""
        if mean is None
        else f"; averaged over {_fmt_seed_list(mean.seeds)}: {mean.agreement.spearman:.2f}"
    )
    return f"{_fmt(entry.get('holdout'), 'rho')} (seeds {seeds}: {values}{averaged})"


def _measured(entry: dict) -> bool:
    """Whether a task table's mode entry holds any figure (agreement, seed replicate, cost)."""
    return any(entry.get(k) for k in ("cost", "seeds", "holdout_seeds", "searches_only", *SETS))


def _fmt_cost(ratio: float) -> str:
    """A cost ratio: one decimal, or one significant digit below 0.1 (the proxy's is about
    1e-4, which one decimal would print as 0.0)."""
    return f"{ratio:.1f}×" if ratio >= 0.095 else f"{ratio:.1g}×"


def _fmt(a: Agreement | None, which: str) -> str:
    if a is None:
        return "–"
    v, ci = (a.spearman, a.spearman_ci) if which == "rho" else (a.kendall, a.kendall_ci)
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


MODES_REPORTED: tuple[str, ...] = (
    "accuracy",
    "reconstruction",
    "recovery",
    "recovery[recovery_samples=2048]",
    "recovery[recovery_batch_size=128,recovery_samples=2048]",
    "reconstruction+recovery",
    "reconstruction+recovery[recovery_batch_size=128,recovery_samples=2048]",
    "proxy",
)


def render_report(tables: list[dict]) -> str:
    """The markdown report (one table for all tasks, then the per-set details)."""
    lines = [
        "# Reward fidelity",
        "",
        "How well each reward (`evaluation=` mode) ranks policies like the leaderboard score "
        "(test accuracy after the fixed fine-tuning; mean of fine-tuning seeds "
        f"{' and '.join(map(str, GROUND_TRUTH_SEEDS))}). Generated by "
        "`python benchmarks/reward_fidelity.py` from the stored results in "
        "`benchmarks/fidelity/`; see `autosculpt_env/fidelity.py` for the method.",
        "",
        "Competitive set (the policies searches find; every goal is judged here). "
        "ρ: Spearman, τ: Kendall, with 95 % paired-bootstrap intervals. Ceiling: the score's "
        "agreement with itself across the two fine-tuning seeds. Cost: one evaluation as a "
        "multiple of a bare dense forward over the same reward images, timed in one run. "
        "Other recovery seeds: the same candidate with its recovery pass trained under "
        "another seed (the env's reward uses 0), as `seed: ρ (ρ with the seed-0 reward)`; "
        "the intervals resample policies, not this training noise. "
        "Holdout: more policies found the same way (search runs under other seeds), added "
        "after the candidates were compared on the competitive set, so a choice made there "
        "is tested on policies it was not made on (ρ under recovery seed 0, then under the "
        "other seeds measured).",
        "",
        "| task | policies (with ground truth) | ceiling ρ | mode | ρ | τ "
        "| other recovery seeds | ρ on holdout set | ρ on broad set | cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tables:
        comp = t["sets"]["competitive"]
        ceiling = _fmt(comp.get("ceiling"), "rho")
        first = True
        for mode, entry in t["modes"].items():
            if mode != t["default"] and not _measured(entry):
                continue  # a candidate stored for other tasks only
            cost = entry.get("cost")
            cost_s = _fmt_cost(cost["ratio"]) if cost else "–"
            lead = (
                f"| {t['task']} | {comp['policies']} ({comp['with_ground_truth']}) | {ceiling} "
                if first
                else "| | | "
            )
            name = f"**{mode}** (default)" if mode == t["default"] else mode
            a = entry.get("competitive")
            if a is not None and a.n != comp["with_ground_truth"]:
                name += f" (on {a.n} of them)"  # rewards not yet computed for every policy
            lines.append(
                lead
                + f"| {name} | {_fmt(entry.get('competitive'), 'rho')} | "
                + f"{_fmt(entry.get('competitive'), 'tau')} | "
                + f"{_fmt_seeds(entry.get('seeds', []), _same_policies(entry))} | "
                + f"{_fmt_holdout(entry)} | "
                + f"{_fmt(entry.get('broad'), 'rho')} | {cost_s} |"
            )
            first = False
        if first:
            lines.append(
                f"| {t['task']} | {comp['policies']} ({comp['with_ground_truth']}) | {ceiling} "
                "| – | – | – | – | – | – | – |"
            )
    lines += [
        "",
        f"The registered ids' default reward against the goal (Spearman ≥ {GOAL_SPEARMAN} on the "
        f"competitive set, or within {GOAL_CEILING_MARGIN} of the ceiling where that is lower, "
        f"at ≤ {GOAL_COST:.0f}× a bare forward):",
        "",
        *[f"- {verdict(t)}" for t in tables],
        "",
        'The proxy (`evaluation="proxy"`, a surrogate of the default reward) against its goal '
        f"(Spearman ≥ {GOAL_SPEARMAN} with the default reward on held-out policies, leave one "
        "sampler out; `benchmarks/PROXY_FIDELITY.md`):",
        "",
        *[f"- {proxy_verdict(t)}" for t in tables],
    ]
    if any(frontier(t) for t in tables):
        lines += [
            "",
            "The cost-fidelity frontier on the competitive set: the timed candidates that no "
            "other timed one beats at once on cost and on ρ, cheapest first, each with its ρ on "
            "the holdout set where measured (candidates without a cost are left out; "
            "`--cost MODE` times one):",
            "",
            *[f"- {frontier_line(t)}" for t in tables],
            "",
            f"![cost-fidelity frontier]({FRONTIER_PLOT})",
        ]
    held = [t for t in tables if t["sets"].get("holdout", {}).get("policies")]
    if held:
        lines += [
            "",
            "Holdout set per task: policies with ground truth, and the ceiling there: "
            + ", ".join(
                f"{t['task']} {t['sets']['holdout']['with_ground_truth']}/"
                f"{t['sets']['holdout']['policies']}"
                + (
                    f" (ceiling ρ {_fmt(t['sets']['holdout']['ceiling'], 'rho')})"
                    if t["sets"]["holdout"].get("ceiling")
                    else ""
                )
                for t in held
            )
            + ".",
        ]
    lines += [
        "",
        "Broad set (seeded random valid policies and mutations of competitive ones; context "
        "only): policies with ground truth per task: "
        + ", ".join(
            f"{t['task']} {t['sets']['broad']['with_ground_truth']}/{t['sets']['broad']['policies']}"
            for t in tables
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def _panels(n: int, max_cols: int, size: tuple[float, float]):
    """A figure of ``n`` panels, at most ``max_cols`` a row, each ``size`` inches; the grid's
    spare panels are hidden. Returns ``(fig, axes)``, ``axes`` a 2-D array."""
    import matplotlib.pyplot as plt

    cols = min(max_cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_task(root: Path, task: Task, modes: Sequence[str], out: Path) -> Path | None:
    """Scatter of each mode's reward against the score (competitive filled, holdout
    crosses, broad hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = PolicySet.load(root, task)
    gt = {
        k: float(np.mean(list(v.values())))
        for k, v in load_ground_truth(root, task).items()
        if all(s in v for s in GROUND_TRUTH_SEEDS)
    }
    default = default_mode(task)
    modes = [m for m in modes if load_rewards(root, task, m)["values"]]
    modes = sorted(modes, key=lambda m: m != default)  # the default's panel first
    if not gt or not modes:
        return None
    styles = {
        "competitive": {"color": "C0"},
        "holdout": {"color": "C2", "marker": "x"},
        "broad": {"facecolors": "none", "edgecolors": "C1"},
    }
    fig, axes = _panels(len(modes), 4, (3.4, 3.3))
    for ax, mode in zip(axes.flat, modes):
        values = load_rewards(root, task, mode)["values"]
        for set_name in SETS:
            keys = [p.key for p in ps.of(set_name) if p.key in gt and p.key in values]
            if keys:
                ax.scatter(
                    [100 * values[k] for k in keys],
                    [100 * gt[k] for k in keys],
                    s=14,
                    label=set_name,
                    **styles[set_name],
                )
        base, _, settings = mode.partition("[")
        title = base + (
            "\n" + textwrap.fill("[" + settings.replace(",", ", "), 46) if settings else ""
        )
        title += " (default)" if mode == default else ""
        ax.set_title(title, fontsize=8, fontweight="bold" if mode == default else "normal")
        ax.set_xlabel("reward (%)", fontsize=8)
        ax.set_ylabel("score: test acc. after FT (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(task.name, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


FRONTIER_PLOT = "plots/frontier.png"
"""The frontier figure, relative to the fidelity folder (the report links it from there)."""


def timed_points(table: dict, set_name: str = "competitive") -> list[tuple[str, float, Agreement]]:
    """``(mode, cost ratio, agreement on set_name)`` of every candidate that is timed and scored
    on the whole set, in the table's order."""
    n = table["sets"][set_name].get("with_ground_truth", 0)
    return [
        (mode, entry["cost"]["ratio"], entry[set_name])
        for mode, entry in table["modes"].items()
        if entry.get("cost") and entry.get(set_name) is not None and entry[set_name].n == n
    ]


def frontier(table: dict, set_name: str = "competitive") -> list[tuple[str, float, Agreement]]:
    """The task's cost-fidelity frontier on ``set_name``: ``(mode, cost ratio, agreement)`` of
    every timed candidate, scored on the whole set, that no other one beats at once on cost and
    on Spearman with the score, cheapest first (each ranks better than every cheaper one)."""
    out: list[tuple[str, float, Agreement]] = []
    for p in sorted(timed_points(table, set_name), key=lambda p: (p[1], -p[2].spearman)):
        if not out or p[2].spearman > out[-1][2].spearman:
            out.append(p)
    return out


def frontier_line(table: dict) -> str:
    """One line: the task's frontier on the competitive set (with each point's holdout ρ)."""
    points = frontier(table)
    if not points:
        return f"{table['task']}: no timed candidate yet"
    parts = []
    for mode, ratio, a in points:
        held = table["modes"][mode].get("holdout")
        held_s = "" if held is None else f", holdout {held.spearman:.2f}"
        parts.append(f"`{mode}` {_fmt_cost(ratio)} ρ {a.spearman:.2f}{held_s}")
    within = [p for p in points if p[1] <= GOAL_COST]
    best = (
        f"; best within {GOAL_COST:.0f}×: `{within[-1][0]}`"
        if within
        else f"; none within {GOAL_COST:.0f}×"
    )
    return f"{table['task']}: " + " → ".join(parts) + best


def plot_frontier(tables: Sequence[dict], out: Path) -> Path | None:
    """One panel per task: each timed candidate's Spearman with the score against its cost
    (competitive set: dot with its 95 % interval; holdout set: cross), the frontier as a step
    line, the goal and the cost bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [t for t in tables if frontier(t)]
    if not timed:
        return None
    modes = list(dict.fromkeys(m for t in timed for m, e in t["modes"].items() if e.get("cost")))
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(modes)}
    fig, axes = _panels(len(timed), 3, (4.2, 3.6))
    rows = axes.shape[0]
    for ax, t in zip(axes.flat, timed):
        for mode, x, a in timed_points(t):
            is_default = mode == t["default"]
            ax.errorbar(
                x,
                a.spearman,
                yerr=[[a.spearman - a.spearman_ci[0]], [a.spearman_ci[1] - a.spearman]],
                fmt="o",
                ms=8 if is_default else 5,
                color=colors[mode],
                mec="black" if is_default else colors[mode],
                elinewidth=0.8,
                alpha=0.9,
            )
            held = t["modes"][mode].get("holdout")
            if held is not None:
                ax.plot(x, held.spearman, "x", color=colors[mode], ms=6)
        pts = frontier(t)
        xs = [p[1] for p in pts]
        ys = [p[2].spearman for p in pts]
        ax.step(xs, ys, where="post", color="grey", lw=1, zorder=0)
        ax.axhline(goal_of(t["sets"]["competitive"].get("ceiling")), ls="--", color="k", lw=0.8)
        ax.axvline(GOAL_COST, ls=":", color="black", lw=0.8)
        ax.set_title(t["task"], fontsize=9)
        ax.set_xlabel("cost (× a bare dense forward)", fontsize=8)
        ax.set_ylabel("Spearman ρ with the score", fontsize=8)
        ax.set_ylim(-0.6, 1.0)
        ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[m], label=m) for m in modes] + [
        plt.Line2D([], [], marker="o", ls="", color="white", mec="black", label="the default"),
        plt.Line2D([], [], marker="x", ls="", color="black", label="holdout set"),
        plt.Line2D([], [], ls="--", color="black", label="goal"),
        plt.Line2D([], [], ls=":", color="black", label=f"{GOAL_COST:.0f}× bound"),
        plt.Line2D([], [], color="grey", label="frontier (competitive)"),
    ]
    spare = list(axes.flat[len(timed) :])
    if spare:  # the legend takes the first empty panel
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles=handles, loc="center", fontsize=7, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, min(0.45, 0.07 * -(-len(handles) // 2) / rows), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def reported_modes(root: Path, tasks: Iterable[Task]) -> list[str]:
    """:data:`MODES_REPORTED`, then every other candidate with stored rewards for a task."""
    stored = {
        f.stem for t in tasks for f in (Path(root) / task_dir_name(t) / "rewards").glob("*.json")
    }
    return list(MODES_REPORTED) + sorted(stored - set(MODES_REPORTED))


def write_report(
    root: Path,
    tasks: Iterable[Task] = TASKS,
    modes: Sequence[str] | None = None,
    readme: Path | None = None,
) -> Path:
    """Write ``REWARD_FIDELITY.md`` and ``plots/<task>.png`` from the stored results (and the
    README's generated block, if ``readme`` is given). ``modes`` defaults to
    :func:`reported_modes`."""
    tasks = list(tasks)
    modes = reported_modes(root, tasks) if modes is None else list(modes)
    tables = [task_table(root, t, modes) for t in tasks]
    for t in tasks:
        plot_task(root, t, modes, Path(root) / "plots" / f"{task_dir_name(t)}.png")
    plot_frontier(tables, Path(root) / FRONTIER_PLOT)
    path = Path(root) / "REWARD_FIDELITY.md"
    text = render_report(tables)
    path.write_text(text)
    if readme is not None and Path(readme).exists():
        update_readme(Path(readme), text, root)
    return path


README_BLOCK = "reward-fidelity"
"""The README block (:mod:`autosculpt_env.readme_blocks`) this report regenerates."""


def update_readme(readme: Path, report: str, root: Path = DEFAULT_DIR) -> bool:
    """Replace the README's reward-fidelity block with the report's body (its title dropped;
    its links into ``root``, the fidelity folder it lies in, made relative to the README).
    Returns whether the README changed."""
    body = report.split("\n", 2)[2].strip()
    prefix = Path(os.path.relpath(Path(root).resolve(), Path(readme).resolve().parent)).as_posix()
    body = body.replace("](plots/", f"]({prefix}/plots/")
    return update_block(readme, README_BLOCK, body)
