"""Rows: one JSON file per (task, agent, seed), written atomically, loaded and validated.

A row holds a search's best policy, the env's count of the reward evaluations it spent,
its score with provenance, the protocol, and the full episode record, so anyone can replay
it. Rows are files and files are untrusted input (DESIGN.md section 6): :func:`check_row`
checks every field's type, the record (by the same :meth:`EpisodeRecord.from_dict` check as
every other record), and every summary field against the record, the protocol and the row
itself; :func:`validate` also replays the record and measures the row's numbers again.

Two schemas are read. Schema 2 (:data:`ROW_FIELDS`) is what the harness writes. Schema 1
(:data:`ROW_FIELDS_V1`) is the first leaderboard's (``benchmarks/rows/``); its rows keep
validating under the rules they were written by (their reward evaluations were counted by
the agents, the limit is named ``budget``, and the FLOPs band did not exist yet). Nothing
here rewrites a row.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import data
from ..records import EpisodeRecord, atomic_write_text, check_env_id, make_env, replay
from .protocol import (
    Protocol,
    Task,
    env_kwargs_problems,
    flops_problems,
    row_id,
    task_dataset,
    task_env_kwargs,
    track_of,
)

_NUM, _INT, _STR, _BOOL, _LIST, _DICT, _NONE = (
    "number",
    "integer",
    "string",
    "bool",
    "list",
    "object",
    "null",
)
_PROVENANCE = {
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
_SEARCH = {
    "schema": (_INT,),
    "row_id": (_STR,),
    "task": (_STR,),
    "env_id": (_STR,),
    "target": (_NUM,),
    "model": (_STR, _NONE),
    "dataset": (_STR,),
    "agent": (_STR,),
    "seed": (_INT,),
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
    "search_seconds": (_NUM,),
}
ROW_FIELDS_V1: dict[str, tuple[str, ...]] = {
    **_SEARCH,
    "budget": (_INT,),
    "test_accuracy": (_NUM,),
    "test_accuracy_before_finetune": (_NUM,),
    "dense_test_accuracy": (_NUM,),
    "finetune_seconds": (_NUM,),
    "finetune_recipe": (_DICT,),
    "finetune_samples": (_INT, _NONE),
    **_PROVENANCE,
}
"""Every field of a schema-1 row and the JSON types it may hold."""

ROW_FIELDS: dict[str, tuple[str, ...]] = {
    **_SEARCH,
    "max_reward_evaluations": (_INT,),
    "reward_evaluations": (_INT,),
    "found_at_evaluation": (_INT,),
    "flops": (_NUM,),
    "track": (_STR,),
    "search_reward": (_DICT, _NONE),
    "score": (_NUM,),
    "dense_score": (_NUM,),
    "test_accuracy": (_NUM, _NONE),
    "test_accuracy_before_finetune": (_NUM, _NONE),
    "dense_test_accuracy": (_NUM, _NONE),
    "score_seconds": (_NUM,),
    "finetune_recipe": (_DICT, _NONE),
    "finetune_samples": (_INT, _NONE),
    **_PROVENANCE,
}
"""Every field of a schema-2 row and the JSON types it may hold; ``_path`` is added by
:func:`load_rows`. A row with a missing, unknown or mistyped field does not validate.

``search_reward`` names the fitted model that gave the search its rewards (the ``proxy``
evaluation: the mode it stands for and its surrogate file's sha256; ``null`` for measured
rewards). ``score`` is the track's score (test accuracy after fine-tuning, or the fast
track's high-fidelity reward), ``dense_score`` the dense network's under the same measurement
(on the fast track, as the surrogate the search saw stores it: :func:`.run.score_reward`);
``test_accuracy``, ``test_accuracy_before_finetune``, ``dense_test_accuracy`` and the
fine-tuning fields are ``null`` on a track that does not fine-tune."""

SCHEMAS = {1: ROW_FIELDS_V1, 2: ROW_FIELDS}

OPTIONAL_ROW_FIELDS: dict[str, tuple[str, ...]] = {"speedup": (_DICT, _NONE)}
"""Fields a row of either schema may hold, absent from rows written before them.
``speedup``: the materialised network's measured speedup over the dense network with the
conditions of the measurement (:func:`autosculpt_env.latency.measured_speedup`), or ``null``
where the network could not be materialised; a column of the table, not part of the score.
Being a wall-clock measurement it is checked for consistency, not measured again."""

_ACCURACIES = (
    "reward_accuracy",
    "reward_accuracy_measured",
    "dense_reward_accuracy",
    "test_accuracy",
    "test_accuracy_before_finetune",
    "dense_test_accuracy",
    "score",
    "dense_score",
)


def score_of(row: dict) -> float:
    """The row's score (schema 1 rows: test accuracy after fine-tuning)."""
    return row["score"] if "score" in row else row["test_accuracy"]


def dense_score_of(row: dict) -> float:
    return row["dense_score"] if "dense_score" in row else row["dense_test_accuracy"]


def max_reward_evaluations_of(row: dict) -> int | None:
    """The reward evaluations the row's search could spend (schema 1 rows: ``budget``)."""
    return row.get("max_reward_evaluations", row.get("budget"))


# ------------------------------------------------------------------------ files
def write_row(rows_dir: str | os.PathLike, row: dict, exclusive: bool = False) -> Path | None:
    """Write ``rows_dir/<row id>.json`` atomically (temporary file, then renamed into place).

    With ``exclusive``, a row that already exists is left alone and ``None`` returned (the
    file appears whole or not at all, and is never written twice, whichever process of a
    sweep gets there first).
    """
    path = Path(rows_dir) / f"{row['row_id']}.json"
    text = json.dumps(row, indent=1, sort_keys=True) + "\n"
    if not exclusive:
        return atomic_write_text(path, text, fsync=True)
    tmp = atomic_write_text(path.with_name(f".{path.name}.exclusive.tmp"), text, fsync=True)
    try:
        os.link(tmp, path)  # fails if the row exists: never replaces it
    except FileExistsError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_rows(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Rows from row files and/or rows folders (``*.json``; temporary files are ignored).

    Raises:
        ValueError: a file is not a row, or two files hold the same row id of the same
            protocol.
    """
    if isinstance(paths, str | os.PathLike):
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
        # a row id names a (task, agent, seed): rows of different protocols (the tracks, the
        # first leaderboard) share ids and never share a table
        key = (row.get("protocol_key"), row["row_id"])
        if key in seen:
            raise ValueError(
                f"row {row['row_id']} of protocol {key[0]} is stored twice: {seen[key]} and {f}"
            )
        seen[key] = f
        row["_path"] = str(f)
        rows.append(row)
    return rows


def check_folder(
    rows_dir: Path, protocol: Protocol, schema: int, search_rewards: dict | None = None
) -> None:
    """Refuse a rows folder that holds rows of another protocol or row schema, or (given
    ``search_rewards``, ``{task name: identity}``) rows searched on another surrogate."""
    if not rows_dir.exists():
        return
    for row in load_rows(rows_dir):
        if search_rewards and row.get("task") in search_rewards:
            if row.get("search_reward") != search_rewards[row["task"]]:
                raise ValueError(
                    f"{row['_path']} was searched on another surrogate ({row.get('search_reward')}, "
                    f"this run's is {search_rewards[row['task']]}): rows of different search "
                    "rewards never share a table; use another --rows-dir"
                )
        if row.get("protocol_key") != protocol.key():
            raise ValueError(
                f"{row['_path']} was produced under another protocol "
                f"({row.get('protocol_key')}, this run is {protocol.key()}: reward evaluations, evaluation, "
                "reward samples, dataset, FLOPs band, score or fine-tuning differ); use another "
                "--rows-dir"
            )
        if row.get("schema") != schema:
            raise ValueError(
                f"{row['_path']} is a row of schema {row.get('schema')} (an earlier harness); "
                f"this harness writes schema {schema}: use another --rows-dir"
            )


# ------------------------------------------------------------------------ checks
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
    schema = row.get("schema")
    fields = SCHEMAS.get(schema) if _json_type(schema) == _INT else None
    if fields is None:
        return [f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}"], None
    errors: list[str] = []
    for key, types in fields.items():
        if key not in row:
            errors.append(f"missing field {key!r}")
            continue
        t = _json_type(row[key])
        if t == _INT and _NUM in types:
            continue
        if t not in types:
            errors.append(f"{key} must be {' or '.join(types)}, got {t}")
    for key, types in OPTIONAL_ROW_FIELDS.items():
        if key in row and _json_type(row[key]) not in types:
            errors.append(f"{key} must be {' or '.join(types)}, got {_json_type(row[key])}")
        elif row.get(key) is not None and key == "speedup":
            from ..latency import speedup_problems

            errors += speedup_problems(row[key])
    unknown = sorted(set(row) - set(fields) - set(OPTIONAL_ROW_FIELDS) - {"_path"}, key=str)
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
    v2 = row["schema"] == 2

    def same(key, value, what):
        if row[key] != value or type(row[key]) is bool and type(value) is not bool:
            errors.append(f"{key} {row[key]!r} != {what} {value!r}")

    m, kw, extra = record.metrics, record.env_kwargs, record.extra
    check_env_id(row["env_id"], "row env_id")
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
        if key in row and row[key] is not None and not 0.0 <= row[key] <= 1.0:
            errors.append(f"{key} {row[key]} is not in [0, 1]")
    for key in ("search_seconds", "finetune_seconds", "score_seconds"):
        if key in row and row[key] < 0:
            errors.append(f"{key} {row[key]} is negative")
    same("agent", extra.get("agent"), "record's extra agent")
    same("seed", extra.get("seed"), "record's extra seed")
    # the protocol: its key, and every field it decides
    protocol = Protocol.from_dict(row["protocol"])
    same("protocol_key", protocol.key(), "its protocol's key")
    limit_field = "max_reward_evaluations" if v2 else "budget"
    same(limit_field, protocol.max_reward_evaluations, "its protocol's")
    same("dataset", task_dataset(task, protocol), "its protocol's dataset for the task")
    if row["seed"] not in protocol.seeds:
        errors.append(f"seed {row['seed']} is not one of its protocol's seeds {protocol.seeds}")
    if kw.get("evaluation") != protocol.evaluation:
        errors.append(
            f"record evaluation {kw.get('evaluation')!r} != protocol's {protocol.evaluation!r}"
        )
    expected = task_env_kwargs(task, protocol, kw.get("data_dir"))
    if kw.get("reward_samples") != expected["reward_samples"]:
        errors.append(
            f"record reward_samples {kw.get('reward_samples')} != protocol's "
            f"{expected['reward_samples']}"
        )
    errors += _score_fields(row, protocol, extra, same)
    # the reward evaluations
    limit, found, used = row[limit_field], row["found_at_evaluation"], row["reward_evaluations"]
    if v2:
        stamp = record.reward_evaluations
        if stamp is None:
            errors.append("the record carries no reward_evaluations stamp from the env")
        else:
            same("found_at_evaluation", stamp["used"], "record's reward_evaluations used")
            if stamp["limit"] != limit:
                errors.append(f"the record's limit {stamp['limit']} != the row's {limit}")
        same("track", track_of(protocol), "its protocol's track")
        errors += env_kwargs_problems(kw, expected)
    else:
        same("found_at_evaluation", extra.get("reward_evaluations"), "record's extra")
    if found is None or not 1 <= found <= limit:
        errors.append(f"best episode found at evaluation {found}, limit {limit}")
    if used is not None and not (found or 0) <= used <= limit:
        errors.append(f"{used} reward evaluations, best found at {found}, limit {limit}")
    # equal FLOPs
    errors += flops_problems(
        protocol, kw.get("reward", "budget"), kw.get("target_flops_reduction"), m["flops_reduction"]
    )
    # the command that ran the search
    cmd = row["command"]
    for flag, value in (
        ("--env-id", row["env_id"]),
        ("--seed", str(row["seed"])),
        ("--max-reward-evaluations", str(limit)),
    ):
        if not any(a == flag and b == value for a, b in zip(cmd, cmd[1:])):
            errors.append(f"command lacks {flag} {value}")
    errors += _check_progress(row["progress"], limit, m["reward"], exact=not v2)
    return errors


def _score_fields(row: dict, protocol: Protocol, extra: dict, same) -> list[str]:
    """The score and fine-tuning fields against the protocol and the record's
    ``extra.finetune`` (the fine-tuning that was scored)."""
    errors: list[str] = []
    if row["schema"] == 2:
        if not protocol.finetunes:
            for key in (
                "test_accuracy",
                "test_accuracy_before_finetune",
                "dense_test_accuracy",
                "finetune_recipe",
                "finetune_samples",
            ):
                if row[key] is not None:
                    errors.append(f"{key} must be null: its protocol does not fine-tune")
            if "finetune" in extra:
                errors.append("the record has extra.finetune but its protocol does not fine-tune")
            return errors
        for key in ("test_accuracy", "dense_test_accuracy", "finetune_recipe"):
            if row[key] is None:
                errors.append(f"{key} must be set: its protocol fine-tunes")
        if errors:
            return errors
        same("score", row["test_accuracy"], "its test_accuracy")
        same("dense_score", row["dense_test_accuracy"], "its dense_test_accuracy")
    ft = extra.get("finetune")
    if not isinstance(ft, dict):
        errors.append("the record has no extra.finetune (the fine-tuning that was scored)")
    else:
        same("test_accuracy", ft.get("test_accuracy"), "record's extra.finetune test_accuracy")
        same("finetune_recipe", ft.get("recipe"), "record's extra.finetune recipe")
        same("finetune_samples", ft.get("train_samples"), "record's extra.finetune train_samples")
        same("seed", ft.get("seed"), "record's extra.finetune seed")
    same("finetune_recipe", protocol.recipe_for(row["dataset"]).to_dict(), "its protocol's")
    same("finetune_samples", protocol.finetune_samples, "its protocol's")
    return errors


def _check_progress(curve, limit: int, reward: float, exact: bool) -> list[str]:
    """The progress curve: best reward against evaluations, rising within the limit, and
    ending at the record's reward (schema 1: the agent's curve) or at least as high as it
    (schema 2: the env's best in-band reward, whichever episode the agent reported)."""
    if not all(
        isinstance(p, list) and len(p) == 2 and all(_json_type(v) in (_INT, _NUM) for v in p)
        for p in curve
    ):
        return ["progress must be a list of [evaluations, best reward] pairs"]
    if not curve:
        return []
    errors = []
    xs = [p[0] for p in curve]
    if xs != sorted(xs) or xs[0] < 1 or xs[-1] > limit:
        errors.append(f"progress evaluations must rise within 1..{limit}")
    best = max(p[1] for p in curve)
    if exact and abs(best - reward) > 1e-5:
        errors.append(f"progress ends at best reward {best}, record's reward {reward}")
    if not exact and reward > best + 1e-5:
        errors.append(f"record's reward {reward} exceeds the env's best in-band reward {best}")
    return errors


# ---------------------------------------------------------------------- validate
def _forget_memo(record: EpisodeRecord) -> None:
    """Clear the policy memo of the record's env, so a replay in a process that already
    scored the policy (envs of one configuration share their evaluator) measures again."""
    env = make_env(record)
    try:
        env.unwrapped.evaluator.cache.clear()
    finally:
        env.close()


def validate(
    rows: Iterable[dict],
    accuracy_tolerance: float = 1e-3,
    full: bool = False,
    threads: int | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Check every row and replay its record.

    Each row is replayed with the torch CPU threads it was made with (its
    ``protocol.threads``) unless ``threads`` overrides them: a reduction summed in another
    order can move a pruned network's accuracy by points (docs/CHECKS.md), so a replay with
    other threads can fail a correct row. The caller's thread count is restored afterwards.

    Always (cheap, a few reward evaluations per row): the row's schema; every summary field
    against its record, its protocol and itself (:func:`check_row`); the record replayed in
    its env (every metric of :data:`~autosculpt_env.records.METRICS`: cost metrics exactly,
    reward-split accuracies within ``accuracy_tolerance``); the measured reward-split
    accuracy; the dense network's score (test accuracy once per configuration; the fast
    track's reward); the fast track's score (one evaluation).

    With ``full``, also the test accuracies of a fine-tuned row: before fine-tuning, and
    after fine-tuning again with the row's recipe, seed and subset (minutes per row on
    Fashion-MNIST), each within ``accuracy_tolerance``.

    Returns:
        One ``{"row_id", "ok", "errors"}`` per row; each is also passed to ``on_row`` as
        soon as it is known (a command prints it: a track's rows take minutes to replay).
    """
    import torch

    results = []
    caller_threads = torch.get_num_threads()
    for row in rows:
        errors, record = check_row(row)
        if record is not None and not errors:
            torch.set_num_threads(threads or Protocol.from_dict(row["protocol"]).threads)
            try:
                _forget_memo(record)
                replay(record, accuracy_tolerance=accuracy_tolerance)
                errors += _rederive(row, record, accuracy_tolerance, full)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                torch.set_num_threads(caller_threads)
        rid = row.get("row_id", "?") if isinstance(row, dict) else "?"
        results.append({"row_id": str(rid), "ok": not errors, "errors": errors})
        if on_row is not None:
            on_row(results[-1])
    return results


def _rederive(row: dict, record: EpisodeRecord, tolerance: float, full: bool) -> list[str]:
    """Measure again the row's numbers that the replay does not cover."""
    from .run import dense_test_accuracy, score_reward

    errors = []

    def close(key, measured, what="measured"):
        if abs(measured - row[key]) > tolerance:
            errors.append(f"{key} {row[key]} != {what} {measured}")

    protocol = Protocol.from_dict(row["protocol"])
    env = make_env(record)
    try:
        base = env.unwrapped
        actions = base.problem.actions_from_names(record.actions)
        if row.get("schema") == 2:
            from .run import search_reward_identity

            if (here := search_reward_identity(env)) != row["search_reward"]:
                errors.append(
                    f"search_reward {row['search_reward']} != this installation's {here} (the "
                    "search saw another surrogate)"
                )
        close("reward_accuracy_measured", float(base.reward_evaluator(actions)))
        if not protocol.finetunes:
            fresh = score_reward(record, protocol.score)
            close("score", fresh["score"])
            close("dense_score", fresh["dense_score"])
            return errors
        kw = record.env_kwargs
        test = data.load(kw["dataset"], "test", kw.get("data_dir"))
        close("dense_test_accuracy", dense_test_accuracy(env, test))
        if full:
            from ..scoring import score_policy
            from ..training import Recipe, accuracy

            close("test_accuracy_before_finetune", accuracy(base.pruned_model(actions), test))
            after = score_policy(
                env,
                actions,
                Recipe(**row["finetune_recipe"]),
                seed=row["seed"],
                train_samples=row["finetune_samples"],
            ).test_accuracy
            close("test_accuracy", after, "after fine-tuning again")
    finally:
        env.close()
    return errors
