"""The reward-evaluation limit of a search, counted and enforced by the environment.

One *reward evaluation* is one reward the env hands out: the terminal step of an episode, or
one ``evaluate_policy`` call (``episode_record(policy)`` too). Every one counts, whether or
not the env's memo had scored the policy before: the search asked for it, and the count is
the sample complexity RL papers report (episodes), which stays the same whatever the memo
holds. Non-terminal steps, action masks and cost look-ups are free.

Every AutoSculpt env of a process charges one :class:`EvaluationLimit`, the process's
(:func:`current`): the copies inside a ``SyncVectorEnv`` share it, and a run that builds a
second env cannot start a second count. The env charges it *before* it evaluates, so a
search can never spend past the limit: the evaluation that would go over raises
:class:`EvaluationLimitReached`, and nothing is scored. The count at which an episode was
scored goes into its terminal ``info["reward_evaluations"]`` and into its episode record
(``EpisodeRecord.reward_evaluations``: ``{"used": n, "limit": L}``), written by the env, not
by the agent.

Set the limit from an agent with :func:`limit_reward_evaluations` (or, scoped, the
:func:`limited_reward_evaluations` context manager). A harness sets it from outside
instead: with :data:`MAX_ENV` and :data:`LEDGER_ENV` in an agent's environment, the
process's count lives in that ledger file (a small JSON object updated under ``flock``),
shared by every process of the run (``AsyncVectorEnv`` workers inherit it) and read back by
the harness with :func:`read_ledger`, whatever the agent prints or logs. The ledger also
keeps the best reward the env handed out among policies inside the FLOPs band
(:mod:`autosculpt_env.band`), against the count: the search's progress curve, as the env
saw it.

Example:
    >>> from autosculpt_env.evaluation_limit import (
    ...     EvaluationLimitReached, limited_reward_evaluations)
    >>> with limited_reward_evaluations(2) as evaluations:
    ...     evaluations.charge(), evaluations.charge(), evaluations.remaining
    (1, 2, 0)
    >>> with limited_reward_evaluations(1) as evaluations:
    ...     _ = evaluations.charge()
    ...     try:
    ...         evaluations.charge()
    ...     except EvaluationLimitReached as e:
    ...         print(str(e).split(";")[0])
    the search has spent the 1 reward evaluations the environment allows it
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path

#: environment variable with the limit a harness imposes on an agent process
MAX_ENV = "AUTOSCULPT_MAX_REWARD_EVALUATIONS"
#: environment variable with the ledger file a harness reads the count back from
LEDGER_ENV = "AUTOSCULPT_REWARD_LEDGER"


class EvaluationLimitReached(RuntimeError):
    """A reward evaluation was asked for past the limit (nothing was scored)."""


def _check_limit(limit, what: str = "max_reward_evaluations") -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"{what} must be an integer >= 1 (or None: no limit), got {limit!r}")
    return int(limit)


class EvaluationLimit:
    """A count of reward evaluations against an optional limit.

    Args:
        limit: the most reward evaluations allowed (``None``: count without a limit).
        ledger: a JSON file holding the count, for a count shared between processes and
            read back by a harness; ``None`` keeps the count in memory.
    """

    def __init__(self, limit: int | None = None, ledger: str | os.PathLike | None = None):
        self.limit = _check_limit(limit)
        self.ledger = None if ledger is None else Path(ledger)
        self._state = {"limit": self.limit, "used": 0, "progress": []}
        if self.ledger is not None:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with self._locked() as state:
                if state.get("limit", self.limit) != self.limit:
                    raise ValueError(
                        f"ledger {self.ledger} holds a limit of {state['limit']} reward "
                        f"evaluations, not {self.limit}; use a fresh ledger file"
                    )
                state.setdefault("limit", self.limit)
                state.setdefault("used", 0)
                state.setdefault("progress", [])

    # ------------------------------------------------------------------ storage
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The state, read and written back under an exclusive lock (ledger) or in memory."""
        if self.ledger is None:
            yield self._state
            return
        import fcntl

        fd = os.open(self.ledger, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
            try:
                state = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"ledger {self.ledger} is not JSON ({e}); remove it") from None
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                data = json.dumps(state).encode()
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, data)
        finally:
            os.close(fd)  # drops the lock

    def _read(self) -> dict:
        if self.ledger is None:
            return self._state
        return read_ledger(self.ledger) if self.ledger.exists() else dict(self._state)

    # ------------------------------------------------------------------- counting
    @property
    def used(self) -> int:
        """Reward evaluations spent so far."""
        return int(self._read()["used"])

    @property
    def remaining(self) -> int | None:
        """Reward evaluations left (``None``: no limit)."""
        return None if self.limit is None else max(0, self.limit - self.used)

    @property
    def limit_reached(self) -> bool:
        """Whether the limit is spent (the next reward evaluation would be refused)."""
        return self.limit is not None and self.used >= self.limit

    @property
    def progress(self) -> list[list[float]]:
        """``[[count, best reward so far], ...]`` at every improvement of the best reward
        among policies inside the FLOPs band."""
        return [list(p) for p in self._read()["progress"]]

    def charge(self) -> int:
        """Spend one reward evaluation; return the count including it.

        Raises:
            EvaluationLimitReached: the limit is already spent (the count is unchanged).
        """
        with self._locked() as state:
            used = int(state.get("used", 0))
            if self.limit is not None and used >= self.limit:
                raise EvaluationLimitReached(
                    f"the search has spent the {self.limit} reward evaluations the environment "
                    "allows it; stop before asking for another episode or evaluate_policy call "
                    "(check EvaluationLimit.remaining or .limit_reached)"
                )
            state["used"] = used + 1
        return used + 1

    def report(self, count: int, reward: float, in_band: bool) -> None:
        """Note the reward handed out at evaluation ``count`` (progress curve)."""
        if not in_band or not math.isfinite(reward):
            return
        value = round(float(reward), 6)  # as stored: compare like with like
        with self._locked() as state:
            curve = state.setdefault("progress", [])
            if not curve or value > curve[-1][1]:
                curve.append([int(count), value])

    def stamp(self, count: int) -> dict:
        """What a record of the episode scored at evaluation ``count`` says about the count."""
        return {"used": int(count), "limit": self.limit}

    def __repr__(self) -> str:
        where = f", ledger={str(self.ledger)!r}" if self.ledger is not None else ""
        return f"EvaluationLimit(limit={self.limit}, used={self.used}{where})"


def read_ledger(path: str | os.PathLike) -> dict:
    """``{"limit", "used", "progress"}`` from a ledger file written by the env.

    Raises:
        FileNotFoundError: no ledger (the process never built an env with it).
        ValueError: the file is not a ledger.
    """
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"ledger {path} is not JSON: {e}") from None
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("used"), int)
        and (state.get("limit") is None or isinstance(state.get("limit"), int))
        and isinstance(state.get("progress", []), list)
    )
    if not ok:
        raise ValueError(f"{path} is not a reward-evaluation ledger")
    state.setdefault("progress", [])
    return state


# ------------------------------------------------------------------- the process's limit
_PROCESS: EvaluationLimit | None = None


def _from_environment() -> EvaluationLimit | None:
    limit, ledger = os.environ.get(MAX_ENV), os.environ.get(LEDGER_ENV)
    if limit is None and ledger is None:
        return None
    try:
        value = None if limit in (None, "") else int(limit)
    except ValueError:
        raise ValueError(f"{MAX_ENV}={limit!r} is not an integer") from None
    return EvaluationLimit(_check_limit(value, MAX_ENV), ledger or None)


def current() -> EvaluationLimit:
    """The limit every env of this process charges (set from :data:`MAX_ENV` /
    :data:`LEDGER_ENV` when a harness gave them; otherwise a count with no limit)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = _from_environment() or EvaluationLimit()
    return _PROCESS


def limit_reward_evaluations(
    limit: int | None, ledger: str | os.PathLike | None = None
) -> EvaluationLimit:
    """Start this process's limit: at most ``limit`` reward evaluations from now on.

    An agent calls it once with its ``--max-reward-evaluations``. Under a harness (which
    set :data:`MAX_ENV`) the harness's limit stays in force: ``limit`` must then be the
    same number or ``None``.

    Raises:
        ValueError: ``limit`` is not an integer >= 1 or ``None``, or differs from the
            harness's.
    """
    global _PROCESS
    limit = _check_limit(limit)
    outer = _from_environment()
    if outer is not None:
        if limit is not None and limit != outer.limit:
            raise ValueError(
                f"--max-reward-evaluations {limit} differs from the {outer.limit} the harness "
                f"set ({MAX_ENV}); pass the same number or leave it out"
            )
        _PROCESS = outer
    else:
        _PROCESS = EvaluationLimit(limit, ledger)
    return _PROCESS


@contextlib.contextmanager
def limited_reward_evaluations(
    limit: int | None, ledger: str | os.PathLike | None = None
) -> Iterator[EvaluationLimit]:
    """This process's limit for the duration of a ``with`` block (the previous one after)."""
    global _PROCESS
    previous = _PROCESS
    _PROCESS = EvaluationLimit(limit, ledger)
    try:
        yield _PROCESS
    finally:
        _PROCESS = previous
