"""Episode records: what a search found, in a form anyone can replay.

A record names the env id and its keyword arguments, the action chosen for every layer (by
name), and the metrics the env reported. :func:`replay` rebuilds the env, plays the actions
and checks every recorded metric against the replay.

Records are files, and files are untrusted input (DESIGN.md section 6): :meth:`EpisodeRecord.from_dict`
checks every field's type before anything is built, only registered AutoSculpt ids are
accepted (a ``"module:Id"`` id would make ``gym.make`` import ``module``), and every error
is a one-line ``ValueError`` naming the file or field and what was expected.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__

#: the metrics an episode record stores (``EpisodeRecord.metrics``), in display order
METRICS = (
    "accuracy",
    "dense_accuracy",
    "flops_reduction",
    "params_reduction",
    "pruning_rate",
    "flops",
    "params",
    "reward",
)

#: metrics a record may add (from envs that measure them): the predicted latency reduction of
#: an env with a latency table (:mod:`autosculpt_env.latency`)
OPTIONAL_METRICS = ("latency_reduction",)

#: metrics derived from the actions alone (the cost table and the masks): checked to
#: :data:`EXACT_TOLERANCE` wherever a record becomes an env
COST_METRICS = ("flops", "params", "flops_reduction", "params_reduction", "pruning_rate")
EXACT_TOLERANCE = 1e-9

#: metrics that records made before dead parameters were subtracted count the stored way
#: (:meth:`autosculpt_env.cost.CostTable.stored_params`); such records still check
STORED_PARAMS_METRICS = ("params", "params_reduction")

_FIELDS = (
    "env_id",
    "env_kwargs",
    "layers",
    "actions",
    "metrics",
    "version",
    "extra",
    "reward_evaluations",
    "latency_table",
)
_REQUIRED = ("env_id", "env_kwargs", "layers", "actions", "metrics")


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file renamed into place).

    The file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s
    ``0o600``, so caches and rows written by one user stay readable by the others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_file_mode() -> int:
    """``0o666`` less the process umask (what ``open(path, "w")`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def registered_ids() -> list[str]:
    """The env ids a record or row may name: AutoSculpt ids in Gymnasium's registry."""
    from gymnasium.envs.registration import registry

    from . import ENTRY_POINT, REGISTERED_CONFIGS

    extra = [k for k, spec in registry.items() if spec.entry_point == ENTRY_POINT and ":" not in k]
    return list(dict.fromkeys([*REGISTERED_CONFIGS, *extra]))


def check_env_id(env_id, where: str = "env_id") -> str:
    """Refuse anything but a registered AutoSculpt id (``"pkg:Id"`` would import ``pkg``)."""
    if not isinstance(env_id, str):
        raise ValueError(f"{where} must be a string, got {type(env_id).__name__}")
    known = registered_ids()
    if env_id not in known:
        raise ValueError(
            f"{where} {env_id!r} is not a registered AutoSculpt id; known: {', '.join(known)}"
        )
    return env_id


def _env_kwarg_names() -> set[str]:
    import inspect

    from .envs.autosculpt import AutoSculptEnv

    params = inspect.signature(AutoSculptEnv.__init__).parameters
    return {k for k in params if k not in ("self", "render_mode")}


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_json_value(v) -> bool:
    if v is None or isinstance(v, str | bool) or _is_number(v):
        return not (isinstance(v, float) and not math.isfinite(v))
    if isinstance(v, list):
        return all(_is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json_value(x) for k, x in v.items())
    return False


def _check_keys(d: dict, required, known, what: str) -> None:
    """Refuse a missing required key or an unknown one, naming them and the known keys."""
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{what} missing {missing}")
    unknown = sorted(set(d) - set(known), key=str)
    if unknown:
        raise ValueError(f"{what} unknown keys {unknown}; known: {list(known)}")


def _check_fields(d) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"not an episode record: a JSON object expected, got {type(d).__name__}")
    _check_keys(d, _REQUIRED, _FIELDS, "not an episode record:")
    check_env_id(d["env_id"])
    kw = d["env_kwargs"]
    if not isinstance(kw, dict):
        raise ValueError(f"env_kwargs must be an object, got {type(kw).__name__}")
    bad = sorted(set(kw) - _env_kwarg_names(), key=str)
    if bad:
        raise ValueError(f"env_kwargs has unknown keys {bad}; known: {sorted(_env_kwarg_names())}")
    for k, v in kw.items():
        if not _is_json_value(v):
            raise ValueError(f"env_kwargs[{k!r}] is not a plain JSON value: {v!r}")
    for key in ("layers", "actions"):
        v = d[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{key} must be a non-empty list of names (strings)")
    if len(d["actions"]) != len(d["layers"]):
        raise ValueError(
            f"{len(d['actions'])} actions for {len(d['layers'])} layers (one action per layer)"
        )
    m = d["metrics"]
    if not isinstance(m, dict):
        raise ValueError(f"metrics must be an object, got {type(m).__name__}")
    _check_keys(m, METRICS, METRICS + OPTIONAL_METRICS, "metrics")
    for k in METRICS + tuple(k for k in OPTIONAL_METRICS if k in m):
        if not _is_number(m[k]) or not math.isfinite(m[k]):
            raise ValueError(f"metrics[{k!r}] must be a finite number, got {m[k]!r}")
    if not isinstance(d.get("version", ""), str):
        raise ValueError("version must be a string")
    extra = d.get("extra", {})
    if not isinstance(extra, dict) or not _is_json_value(extra):
        raise ValueError("extra must be an object of plain JSON values")
    _check_evaluation_stamp(d.get("reward_evaluations"))
    table = d.get("latency_table")
    if table is not None and not (
        isinstance(table, str)
        and 0 < len(table) <= 64
        and all(c in "0123456789abcdef" for c in table)
    ):
        raise ValueError(f"latency_table must be a latency table's key (hex digits), got {table!r}")
    if ("latency_reduction" in m) != (table is not None):
        raise ValueError("metrics latency_reduction and latency_table come together")


def _is_count(v, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_evaluation_stamp(stamp) -> None:
    """``reward_evaluations``: absent/None (records made before the env kept the count) or
    ``{"used": n, "limit": L}`` as :mod:`autosculpt_env.evaluation_limit` writes it."""
    if stamp is None:
        return
    if not isinstance(stamp, dict) or set(stamp) != {"used", "limit"}:
        raise ValueError('reward_evaluations must be {"used": n, "limit": L or null}')
    used, limit = stamp["used"], stamp["limit"]
    if not _is_count(used) or not (limit is None or _is_count(limit)):
        raise ValueError(
            f"reward_evaluations: used must be an integer >= 1 and limit one or null, got {stamp}"
        )
    if limit is not None and used > limit:
        raise ValueError(f"reward_evaluations: used {used} exceeds the limit {limit}")


@dataclass
class EpisodeRecord:
    """A replayable episode.

    Attributes:
        env_id: the registered id (``"AutoSculpt-ResNet"``).
        env_kwargs: keyword arguments given to ``gym.make`` (JSON values only).
        layers: prunable layer names, in decision order.
        actions: action name chosen for each layer.
        metrics: accuracy, dense_accuracy, flops_reduction, params_reduction, pruning_rate,
            reward, flops, params (as the env reported them).
        version: package version that produced the record.
        extra: free-form facts (agent, seed, step at which it was found ...).
        reward_evaluations: written by the env (:mod:`autosculpt_env.evaluation_limit`): the
            count of reward evaluations at which this episode was scored and the limit,
            ``{"used": n, "limit": L}`` (``None`` in records made before the env kept it).
        latency_table: the key of the latency table that gave ``metrics["latency_reduction"]``
            (:func:`autosculpt_env.latency.table_key`; ``None`` without one). The table is
            measured per machine, so a replay compares that metric only against the same
            table.
    """

    env_id: str
    env_kwargs: dict
    layers: list[str]
    actions: list[str]
    metrics: dict
    version: str = __version__
    extra: dict = field(default_factory=dict)
    reward_evaluations: dict | None = None
    latency_table: str | None = None

    def to_json(self) -> str:
        d = asdict(self)
        for key in ("reward_evaluations", "latency_table"):
            if d[key] is None:  # older records round-trip unchanged
                del d[key]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> EpisodeRecord:
        """A record from its JSON object, every field checked.

        Raises:
            ValueError: one line naming the first field that is missing, unknown or of the
                wrong type, or an env id that is not a registered AutoSculpt id.
        """
        _check_fields(d)
        d = json.loads(json.dumps(d))  # a private copy
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> EpisodeRecord:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EpisodeRecord:
        return load_record(path)


def load_record(path: str | os.PathLike) -> EpisodeRecord:
    """An :class:`EpisodeRecord` from a record file, a leaderboard row (its ``record``), or a
    fine-tuned folder (its ``record.json``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file and what is wrong with it.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "record.json"
    if not p.exists():
        raise FileNotFoundError(f"no record file {p}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{p} is not JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{p} cannot be read: {e}") from None
    if isinstance(d, dict) and "record" in d and "row_id" in d:  # a leaderboard row
        d = d["record"]
    try:
        record = EpisodeRecord.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    record.source = str(p)  # not a field: named in later errors, never saved
    return record


def _named(record: EpisodeRecord, e: Exception) -> ValueError:
    """``e`` as a one-line ``ValueError`` that names the record's file, when it has one."""
    source = getattr(record, "source", None)
    text = " ".join(str(e).split())
    return ValueError(f"{source}: {text}" if source and source not in text else text)


def make_env(record: EpisodeRecord, check: bool = True, **overrides):
    """``gym.make`` the record's env (overrides win, e.g. ``model=`` for a user's network).

    With ``check`` (the default) the record must fit the env it builds: the same layers,
    valid actions, and the metrics that follow from the actions alone
    (:data:`COST_METRICS`) equal to the recorded ones. A record edited to other actions
    but keeping its metrics is refused here, before anyone fine-tunes or scores it.

    Raises:
        ValueError: the env id is not a registered AutoSculpt id, the kwargs do not build
            an env, or the record does not fit it.
    """
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    check_env_id(record.env_id, "record env_id")
    kwargs = {**record.env_kwargs, **overrides}
    model = kwargs.get("model")
    if isinstance(model, str) and model.startswith("<"):
        raise ValueError(
            f"this record was made with a user's network ({model}); rebuild its env with "
            "make_env(record, model=network)"
        )
    try:
        env = gym.make(record.env_id, **kwargs)
    except (TypeError, KeyError, AssertionError, ValueError) as e:
        raise _named(
            record, ValueError(f"the record's env_kwargs do not build {record.env_id}: {e}")
        ) from None
    if check:
        try:
            check_fits(record, env)
        except ValueError as e:
            env.close()
            raise _named(record, e) from None
        except BaseException:
            env.close()
            raise
    return env


def check_fits(record: EpisodeRecord, env) -> list[int]:
    """Check that ``record`` fits ``env``: layers, actions, and its :data:`COST_METRICS`
    recomputed from the actions (no reward evaluation). Returns the action indices."""
    base = env.unwrapped
    actions = check_fits_layers(record, base)
    measured = cost_metrics(base, actions)
    errors = compare_metrics(
        record.metrics, measured, keys=COST_METRICS, stored=stored_params(base, actions)
    )
    if errors:
        raise ValueError(
            "the record's metrics do not follow from its actions: " + "; ".join(errors)
        )
    return actions


def cost_metrics(base, actions: list[int]) -> dict:
    """The :data:`COST_METRICS` of a policy on an (unwrapped) env, with no evaluation."""
    p = base.problem
    flops, params = p.policy_flops(actions), p.policy_params(actions)
    return {
        "flops": float(flops),
        "params": float(params),
        "flops_reduction": float(1.0 - flops / base.dense_flops),
        "params_reduction": float(1.0 - params / base.dense_params),
        "pruning_rate": float(p.pruning_rate(actions)),
    }


def stored_params(base, actions: list[int]) -> dict:
    """:data:`STORED_PARAMS_METRICS` of a policy counted the way records made before dead
    parameters were subtracted count them."""
    stored = base.problem.cost.stored_params(actions)
    return {"params": float(stored), "params_reduction": float(1.0 - stored / base.dense_params)}


def compare_metrics(
    recorded: dict,
    measured: dict,
    accuracy_tolerance: float = 1e-3,
    keys=METRICS,
    reward_of=None,
    stored: dict | None = None,
) -> list[str]:
    """Disagreements between recorded and measured metrics, one string each.

    Cost metrics must agree to :data:`EXACT_TOLERANCE`, accuracies within
    ``accuracy_tolerance``. The reward is checked two ways when ``reward_of`` (the env's
    reward as a function of accuracy) is given: the recorded reward must be the reward of
    the recorded accuracy (to :data:`EXACT_TOLERANCE`), and within ``accuracy_tolerance``
    times the reward's slope of the measured one. Given ``stored`` (:func:`stored_params`),
    a record whose :data:`STORED_PARAMS_METRICS` all equal the stored count (one made before
    dead parameters were subtracted) is checked against those instead.
    """
    errors = []
    if stored is not None and all(
        _is_number(recorded.get(k))
        and abs(recorded[k] - stored[k])
        <= EXACT_TOLERANCE * (max(1.0, abs(stored[k])) if k == "params" else 1.0)
        for k in STORED_PARAMS_METRICS
    ):
        measured = {**measured, **stored}
    for k in keys:
        rec, got = recorded.get(k), measured.get(k)
        if not _is_number(rec) or not _is_number(got):
            errors.append(f"{k}: recorded {rec!r}, measured {got!r}")
            continue
        if k == "reward":
            if reward_of is not None:
                expected = reward_of(recorded["accuracy"])
                slope = abs(reward_of(1.0) - reward_of(0.0))
                if abs(expected - rec) > EXACT_TOLERANCE:
                    errors.append(
                        f"reward {rec} is not the reward of the recorded accuracy ({expected})"
                    )
                elif abs(got - rec) > accuracy_tolerance * max(slope, 1.0) + EXACT_TOLERANCE:
                    errors.append(f"reward: recorded {rec}, replayed {got}")
            elif abs(got - rec) > accuracy_tolerance:
                errors.append(f"reward: recorded {rec}, replayed {got}")
            continue
        tol = accuracy_tolerance if k in ("accuracy", "dense_accuracy") else EXACT_TOLERANCE
        scale = max(1.0, abs(got)) if k in ("flops", "params") else 1.0
        if not abs(got - rec) <= tol * scale:
            errors.append(f"{k}: recorded {rec}, replayed {got}")
    return errors


def reward_function(base):
    """The env's terminal reward as a function of accuracy, at the policy just replayed."""
    from .rewards import terminal_reward

    def reward_of(info: dict):
        return lambda acc: terminal_reward(
            base.reward_name,
            acc,
            info["flops_reduction"],
            info["flops"],
            base.target,
            base.band_tolerance,
            base.tradeoff_lambda,
            info.get("latency_reduction"),
            getattr(base, "target_latency", None),
        )

    return reward_of


def replay(record: EpisodeRecord, accuracy_tolerance: float = 1e-3, **overrides) -> dict:
    """Play a record's actions again and check every metric of :data:`METRICS`.

    Cost metrics (FLOPs, parameters, their reductions, pruning rate) must come back equal,
    accuracy and dense accuracy within ``accuracy_tolerance``, and the reward must be the
    env's reward of the recorded accuracy and agree with the replayed reward.

    Returns:
        The terminal info of the replayed episode.

    Raises:
        ValueError: the replay disagrees (every disagreement is listed), or the record does
            not fit the env.
    """
    env = make_env(record, check=False, **overrides)
    try:
        base = env.unwrapped
        try:
            policy = check_fits_layers(record, base)
        except ValueError as e:
            raise _named(record, e) from None
        env.reset(seed=0)
        info, terminated = {}, False
        for a in policy:
            _, _, terminated, _, info = env.step(a)
        if not terminated:
            raise ValueError("the replayed episode did not end after one action per layer")
        errors = _compare_latency(record, base, info)
        measured = info
        if "latency_reduction" in record.metrics and record.latency_table != base.latency.key:
            # another machine's table: the reward is checked at the recorded latency
            measured = {**info, "latency_reduction": record.metrics["latency_reduction"]}
            measured["reward"] = reward_function(base)(measured)(info["accuracy"])
        reward_of = reward_function(base)(measured)
        stored = stored_params(base, policy)
    finally:
        env.close()
    errors += compare_metrics(
        record.metrics, measured, accuracy_tolerance, reward_of=reward_of, stored=stored
    )
    if errors:
        raise _named(record, ValueError("replay disagrees with the record: " + "; ".join(errors)))
    return info


def _compare_latency(record: EpisodeRecord, base, info: dict) -> list[str]:
    """The recorded latency reduction against the replay's, when both come from one table
    (a table measured on another machine predicts other times: not compared)."""
    if "latency_reduction" not in record.metrics:
        return []
    if getattr(base, "latency", None) is None:
        return ["the record has a latency_reduction but its env measures no latency"]
    if record.latency_table != base.latency.key:
        return []
    rec, got = record.metrics["latency_reduction"], info["latency_reduction"]
    if not abs(got - rec) <= EXACT_TOLERANCE:
        return [f"latency_reduction: recorded {rec}, replayed {got} (same table)"]
    return []


def check_fits_layers(record: EpisodeRecord, base) -> list[int]:
    """The record's action indices on ``base``, after checking its layer names."""
    if list(record.layers) != list(base.layer_names):
        raise ValueError(
            f"record layers do not match the env's layers ({record.env_id}: "
            f"{len(base.layer_names)} layers, the record names {len(record.layers)})"
        )
    actions = base.problem.actions_from_names(record.actions)
    base.problem.check_policy(actions)
    return actions
