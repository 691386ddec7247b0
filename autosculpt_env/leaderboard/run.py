"""One leaderboard run: search, check, score, row.

For one (task, agent, seed) the harness

1. **searches** (:func:`search`): runs the agent as a program with the protocol's options
   and its limit of reward evaluations set in its environment
   (:mod:`autosculpt_env.evaluation_limit`: the env enforces it and keeps the count in a
   ledger file in the run folder); the agent writes its best
   episode as a replayable record (``best.json``);
2. **checks** the search (:func:`check_search`): the record is of the task's env, dataset
   and reward, its FLOPs reduction lies in the protocol's band, and the env's own count
   (the ledger and the record's stamp, never the agent's printout) stays within the limit;
3. **scores** the best policy (:func:`score`): fine-tuned with the fixed recipe and scored
   by test accuracy (the full track; the only place the test split is read), or scored by
   the protocol's high-fidelity reward on the reward split (the fast track); beside the
   score, not part of it, the measured speedup of the policy's materialised network over
   the dense one (:func:`materialised_speedup`);
4. returns the **row** (:func:`make_row`): every number above with its provenance, the
   env's progress curve and the full record, so the row can be replayed
   (:func:`autosculpt_env.leaderboard.rows.validate`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, data
from ..evaluation_limit import LEDGER_ENV, MAX_ENV, read_ledger
from ..records import EpisodeRecord, make_env
from .agents import AgentProgram, agent_command, find_agent
from .protocol import (
    Protocol,
    Task,
    check_task,
    env_kwargs_problems,
    flops_problems,
    row_id,
    task_dataset,
    task_env_kwargs,
)

ROW_SCHEMA = 2
"""The row format this harness writes (rows of schema 1, the first leaderboard's, are still
read and validated; :mod:`autosculpt_env.leaderboard.rows`)."""

LEDGER_FILE = "reward_evaluations.json"


class AgentError(RuntimeError):
    """An agent run failed or produced no usable best episode."""


def git_commit(root: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout the package runs from (``(None, None)`` outside git)."""
    from .agents import checkout_root

    root = root if root is not None else checkout_root()
    if root is None:
        return None, None
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


# ------------------------------------------------------------------------------ search
@dataclass
class Search:
    """What one search left behind, as the harness read it."""

    command: list[str]
    run_dir: Path
    record: EpisodeRecord
    reward_evaluations: int
    """the env's count at the end of the search (from its ledger)"""
    progress: list[list[float]]
    """the env's best in-band reward against its count (from its ledger)"""
    seconds: float
    checkout: tuple[str | None, bool | None] = (None, None)
    """``(commit, dirty)`` of the checkout when the agent started (:func:`git_commit`): the
    code the agent ran, whatever is committed while a long sweep goes on"""


def search(
    task: Task,
    program: AgentProgram,
    seed: int,
    protocol: Protocol,
    workdir: Path,
) -> Search:
    """Run the agent (folder ``workdir/search/<row id>``, started clean) and read its best
    record and the env's ledger.

    Raises:
        AgentError: the agent failed, ran too long, or left no record or ledger.
    """
    rid = row_id(task, program.name, seed)
    runs_dir = workdir / "search"
    run_dir = runs_dir / rid
    if run_dir.exists():  # left by a killed run: start clean, never read a stale best.json
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    ledger = run_dir / LEDGER_FILE
    cmd = agent_command(program, task, seed, protocol, runs_dir, rid)
    env_vars = {
        **os.environ,
        "OMP_NUM_THREADS": str(protocol.threads),
        "MKL_NUM_THREADS": str(protocol.threads),
        "WANDB_MODE": "disabled",
        MAX_ENV: str(protocol.max_reward_evaluations),
        LEDGER_ENV: str(ledger),
    }
    log = run_dir / "agent.log"
    what = f"{program.name} on {task.name} seed {seed}"
    checkout = git_commit()
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd,
                cwd=run_dir,
                env=env_vars,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=protocol.agent_timeout_s,
                preexec_fn=die_with_parent,
            )
    except subprocess.TimeoutExpired:
        raise AgentError(f"{what} ran past {protocol.agent_timeout_s}s; log: {log}") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise AgentError(f"{what} exited with {proc.returncode}; log {log}:\n{tail}")
    best = run_dir / "best.json"
    if not best.exists():
        raise AgentError(f"{what} wrote no {best}")
    try:
        record = EpisodeRecord.load(best)
    except ValueError as e:
        raise AgentError(f"{what}: {e}") from None
    # who ran and with which seed is the harness's fact, whatever the agent wrote
    record.extra = {**record.extra, "agent": program.name, "seed": seed}
    if not ledger.exists():
        raise AgentError(f"{what}: the env kept no ledger {ledger} (did the agent build its env?)")
    state = read_ledger(ledger)
    if state.get("limit") != protocol.max_reward_evaluations:
        raise AgentError(
            f"{what}: the env's limit was {state.get('limit')} reward evaluations, not the "
            f"protocol's {protocol.max_reward_evaluations}"
        )
    return Search(cmd, run_dir, record, int(state["used"]), state["progress"], seconds, checkout)


def check_search(result: Search, task: Task, protocol: Protocol) -> list[str]:
    """Why the search's best record cannot become a row (empty: it can)."""
    record, kw, m = result.record, result.record.env_kwargs, result.record.metrics
    dataset = task_dataset(task, protocol)
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
    expected = task_env_kwargs(task, protocol, kw.get("data_dir"))
    if kw.get("reward_samples") != expected["reward_samples"]:
        problems.append(
            f"reward_samples {kw.get('reward_samples')} != the protocol's {expected['reward_samples']} "
            "(the agents take the env's default)"
        )
    if not problems:  # every other keyword (catalog, reward ...) is the task's too
        problems += env_kwargs_problems(kw, expected)
    # the reward evaluations, as the env counted them
    stamp = record.reward_evaluations
    limit = protocol.max_reward_evaluations
    if result.reward_evaluations > limit:
        problems.append(f"spent {result.reward_evaluations} reward evaluations, limit {limit}")
    if stamp is None:
        problems.append("the record carries no reward_evaluations stamp from the env")
    elif stamp["limit"] != limit or stamp["used"] > result.reward_evaluations:
        problems.append(
            f"the record was scored at evaluation {stamp['used']} of a limit of "
            f"{stamp['limit']}; the env's ledger says {result.reward_evaluations} of {limit}"
        )
    # equal FLOPs
    problems += flops_problems(
        protocol, kw.get("reward", "budget"), task.target_flops_reduction, m["flops_reduction"]
    )
    # the answer is a reward the env handed out (the replay checks the numbers themselves)
    if result.progress and m["reward"] > max(p[1] for p in result.progress) + 1e-6:
        problems.append(
            f"record reward {m['reward']} exceeds the best in-band reward the env handed out "
            f"({max(p[1] for p in result.progress)})"
        )
    return problems


# ------------------------------------------------------------------------------- score
def search_reward_identity(env) -> dict | None:
    """What decided the rewards a search saw, when a fitted model gave them: for the
    ``proxy`` evaluation, the mode it stands for and the sha256 of its surrogate file
    (``None`` for measured rewards, which the record's env keywords already decide)."""
    identity = getattr(getattr(env.unwrapped, "_reward_evaluator", None), "identity", None)
    if identity is None:
        return None
    return {"mode": identity["mode"], "sha256": identity["sha256"]}


_DENSE_TEST: dict[str, float] = {}


def dense_test_accuracy(env, test) -> float:
    """The dense network's test accuracy (once per env configuration and process)."""
    base = env.unwrapped
    key = json.dumps([base.spec.id if base.spec else None, base.env_kwargs], sort_keys=True)
    if key not in _DENSE_TEST:
        from ..training import accuracy

        _DENSE_TEST[key] = accuracy(base.problem.model, test)
    return _DENSE_TEST[key]


def score(
    record: EpisodeRecord,
    seed: int,
    protocol: Protocol,
    model_dir: Path | None = None,
    progress: bool = False,
) -> dict:
    """Score a checked record under ``protocol``; return the row's score fields.

    Both tracks first measure the record again (one evaluation: its FLOPs exactly, its
    reward-split accuracy under plain ``accuracy``), so the network that is scored is the
    one the record describes. The full track then fine-tunes it (saved into ``model_dir``)
    and reads the test split; the fast track scores it with the ``protocol.score`` reward.

    Raises:
        AgentError: the record does not describe the network it names.
    """
    import torch

    from ..training import accuracy

    dataset, kw, m = record.env_kwargs["dataset"], record.env_kwargs, record.metrics
    threads = torch.get_num_threads()
    torch.set_num_threads(protocol.threads)
    env = make_env(record)
    try:
        base = env.unwrapped
        actions = base.problem.actions_from_names(record.actions)
        flops = base.problem.policy_flops(actions)
        measured = float(base.reward_evaluator(actions))  # the reward the search saw
        if flops != m["flops"]:
            raise AgentError(f"record FLOPs {m['flops']} != {flops}")
        if abs(measured - m["accuracy"]) > 1e-3:
            raise AgentError(f"record accuracy {m['accuracy']} != measured {measured}")
        out = {
            "search_reward": search_reward_identity(env),
            "reward_accuracy_measured": measured,
            "test_accuracy": None,
            "test_accuracy_before_finetune": None,
            "dense_test_accuracy": None,
            "finetune_recipe": None,
            "finetune_samples": None,
            "speedup": materialised_speedup(env, actions),
        }
        t0 = time.perf_counter()
        if protocol.finetunes:
            from ..finetune import save
            from ..scoring import score_policy

            recipe = protocol.recipe_for(dataset)
            scored = score_policy(
                env,
                actions,
                recipe,
                seed=seed,
                train_samples=protocol.finetune_samples,
                progress=progress,
            )
            test = data.load(dataset, "test", kw.get("data_dir"))
            out.update(
                score=scored.test_accuracy,
                dense_score=dense_test_accuracy(env, test),
                test_accuracy=scored.test_accuracy,
                test_accuracy_before_finetune=accuracy(base.pruned_model(actions), test),
                finetune_recipe=recipe.to_dict(),
                finetune_samples=protocol.finetune_samples,
            )
            out["dense_test_accuracy"] = out["dense_score"]
            record.extra = {
                **record.extra,
                "finetune": {
                    "recipe": recipe.to_dict(),
                    "train_samples": protocol.finetune_samples,
                    "seed": seed,
                    "test_accuracy": scored.test_accuracy,
                },
            }
            if model_dir is not None:
                save(model_dir, scored.model, scored.masks, record)
        else:
            out.update(score_reward(record, protocol.score))
        out["score_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        env.close()
        torch.set_num_threads(threads)
    return out


def materialised_speedup(env, actions: list[int]) -> dict | None:
    """A row's ``speedup``: the policy's materialised network against the dense network,
    timed end to end in torch (:func:`autosculpt_env.latency.measured_speedup`: batch 256,
    one thread, with the machine and its load average). A wall-clock measurement, so not
    part of the score and not measured again by validation. ``None``, with a warning, for a
    network that cannot be materialised."""
    import warnings

    from ..latency import measured_speedup
    from ..materialize import MaterializeError

    try:
        return measured_speedup(env, actions)
    except MaterializeError as e:
        warnings.warn(f"no speedup measured: {e}", stacklevel=2)
        return None


def score_reward(record: EpisodeRecord, evaluation: str) -> dict:
    """The fast track's score: the policy's and the dense network's reward-split accuracy
    under the ``evaluation`` mode (deterministic, so validation measures it again).

    When the search saw the surrogate of that very mode (the fast track), the dense score is
    the one stored with the surrogate (its file's sha256 is in the row): one reference per
    task, the same on every machine. Measured again, a reward that trains moves on the dense
    network with the CPU's kernels: the ViT's ``recovery`` dense score was 82.13 % on one AMD
    EPYC with its AVX-512 kernels, 82.03 % with AVX2 ones, 81.98 % with none, and 82.32 %
    where its surrogate was built (81.6-84.2 % over recovery seeds 1-3), while the policies'
    scores stayed within an image; a normalisation whose top moved with the machine would
    not compare rows scored on different machines. ``ATEN_CPU_CAPABILITY`` chooses the
    kernels."""
    env = make_env(record, evaluation=evaluation)
    try:
        m = env.unwrapped.evaluate_policy(record.actions)
    finally:
        env.close()
    dense = float(m["dense_accuracy"])
    if record.env_kwargs.get("evaluation") == "proxy":
        search = make_env(record)
        try:
            proxy = search.unwrapped.reward_evaluator
            if proxy.mode == evaluation:
                dense = float(proxy.dense_accuracy)
        finally:
            search.close()
    return {"score": float(m["accuracy"]), "dense_score": dense}


# -------------------------------------------------------------------------------- row
def make_row(
    task: Task,
    program: AgentProgram,
    seed: int,
    protocol: Protocol,
    found: Search,
    scored: dict,
) -> dict:
    """The row of a scored search (schema :data:`ROW_SCHEMA`, fields in
    :data:`autosculpt_env.leaderboard.rows.ROW_FIELDS`)."""
    import torch

    from .protocol import track_of

    record, m, kw = found.record, found.record.metrics, found.record.env_kwargs
    commit, dirty = found.checkout
    return {
        "schema": ROW_SCHEMA,
        "row_id": row_id(task, program.name, seed),
        "track": track_of(protocol),
        "task": task.name,
        "env_id": task.env_id,
        "target": task.target_flops_reduction,
        "model": kw.get("model"),
        "dataset": kw.get("dataset"),
        "agent": program.name,
        "seed": seed,
        "max_reward_evaluations": protocol.max_reward_evaluations,
        "reward_evaluations": found.reward_evaluations,
        "found_at_evaluation": record.reward_evaluations["used"],
        "policy": list(record.actions),
        "flops": m["flops"],
        "flops_reduction": m["flops_reduction"],
        "params_reduction": m["params_reduction"],
        "pruning_rate": m["pruning_rate"],
        "reward": m["reward"],
        "reward_accuracy": m["accuracy"],
        "dense_reward_accuracy": m["dense_accuracy"],
        **{k: scored[k] for k in _SCORE_FIELDS},
        "search_seconds": round(found.seconds, 2),
        "version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "command": found.command[1:],
        "protocol": protocol.to_dict(),
        "protocol_key": protocol.key(),
        "progress": found.progress,
        "record": json.loads(record.to_json()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_SCORE_FIELDS = (
    "search_reward",
    "score",
    "dense_score",
    "reward_accuracy_measured",
    "test_accuracy",
    "test_accuracy_before_finetune",
    "dense_test_accuracy",
    "finetune_recipe",
    "finetune_samples",
    "score_seconds",
    "speedup",
)


def run_one(
    task: Task,
    agent: str,
    seed: int,
    protocol: Protocol,
    workdir: str | os.PathLike,
    progress: bool = False,
    agents_dirs: tuple[str, ...] = (),
) -> dict:
    """Search, check and score one (task, agent, seed); return its row.

    The agent's run folder (log, ledger, ``best.json``) is ``workdir/search/<row id>`` and
    a fine-tuned network ``workdir/models/<row id>``.

    Raises:
        AgentError: the agent failed, overspent, or wrote no usable record.
    """
    workdir = Path(workdir).resolve()
    check_task(task, protocol)
    program = find_agent(agent, agents_dirs)
    found = search(task, program, seed, protocol, workdir)
    problems = check_search(found, task, protocol)
    what = f"{program.name} on {task.name} seed {seed}"
    if problems:
        raise AgentError(f"{what}: " + "; ".join(problems))
    model_dir = workdir / "models" / row_id(task, program.name, seed)
    try:
        scored = score(found.record, seed, protocol, model_dir, progress)
    except AgentError as e:
        raise AgentError(f"{what}: {e}") from None
    return make_row(task, program, seed, protocol, found, scored)
