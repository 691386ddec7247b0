"""Evaluated policies to fit a reward surrogate on: several samplers, one resumable store.

A surrogate (:mod:`autosculpt_env.surrogate`) learns ``policy -> accuracy`` from policies
scored by the reward mode it stands for. Its held-out fidelity is measured the way
NAS-Bench-301 measures its surrogates: leave one *sampler* out, fit on the others, rank the
held-out sampler's policies. So policies come from several samplers, each drawing a
different part of the space an agent visits at a FLOPs target ``t``:

=================  ============================================================================
sampler            what it draws
=================  ============================================================================
``uniform``        each layer's action uniform over the actions the env allows (AMC's action
                   wall at ``t``): the ``random_search`` agent's policies
``levels``         one nominal sparsity per policy, uniform in [0, 1], each layer's action the
                   nearest to it plus Gaussian noise (sd uniform in [0, 0.3]), repaired to meet
                   ``t``: near-uniform pruning, where DDPG-style agents start
``evolution``      regularised evolution (Real et al., 2019): population 20, tournaments of 5,
                   children re-decide 1-3 layers; a search's trajectory towards good policies
``local``          hill climbing: one layer re-decided per move, accepted when the accuracy
                   does not drop, restart after 20 moves without improvement
``unconstrained``  each layer uniform over its valid actions, no FLOPs target (what the
                   ``band``, ``log_flops`` and ``tradeoff`` rewards let an agent play)
=================  ============================================================================

Every policy but ``unconstrained``'s meets the target exactly as a ``budget`` episode does:
the env's action wall (:meth:`CostTable.min_flops_next`) is applied layer by layer, and an
action it forbids is replaced by the allowed one nearest in nominal sparsity. Samplers are
seeded per (design seed, sampler, target) and never depend on how many policies are asked
for, so a smaller design's policies are a prefix of a larger one's.

:class:`EvaluationStore` memoises ``policy -> accuracy`` on disk, one JSON line per
evaluation after a header line holding the key (everything that decides an accuracy: see
:func:`autosculpt_env.surrogate.config_key`) and the torch thread count it ran with (a
recovery mode's accuracy depends on it: continuing a store under another count warns). Each
evaluation is appended and synced before the next starts, so a killed collection loses at
most the one in flight; replaying the samplers against the store re-derives which sampler
drew which policy without evaluating anything again. Processes collecting into one store at
once share the work: each evaluation is made under a lock file after reading the others'
new lines.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .band import max_kept
from .problem import PruningProblem
from .records import default_file_mode

SAMPLERS: tuple[str, ...] = ("uniform", "levels", "evolution", "local", "unconstrained")
"""The samplers, in the order a collection draws them (see the module docstring)."""

POPULATION, TOURNAMENT, PATIENCE = 20, 5, 20


class StoreError(RuntimeError):
    """A stored evaluation file is damaged or belongs to another configuration."""


@dataclass(frozen=True)
class Design:
    """How many policies each sampler draws, and from which seed.

    Attributes:
        samplers: names from :data:`SAMPLERS`.
        per_sampler: unique policies each sampler contributes.
        seed: base seed of every sampler.
        also_targets: other FLOPs targets at which the same samplers draw too (all but
            ``unconstrained``, whose policies are the same at every target), for training
            only: the held-out figures rank the fit target's own policies, and a policy's
            accuracy does not depend on the target, so a configuration's other targets add
            training data where agents of those tasks search (the leaderboard's ResNet-20
            at 50 % and 70 %).
    """

    samplers: tuple[str, ...] = SAMPLERS
    per_sampler: int = 60
    seed: int = 0
    also_targets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise ValueError(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}")
        if len(set(self.samplers)) != len(self.samplers):
            raise ValueError(f"samplers are listed twice: {self.samplers}")
        if not isinstance(self.per_sampler, int) or self.per_sampler < 1:
            raise ValueError(f"per_sampler must be an integer >= 1, got {self.per_sampler!r}")
        bad = [t for t in self.also_targets if not 0.0 < float(t) < 1.0]
        if bad:
            raise ValueError(f"also_targets must be FLOPs reductions in (0, 1), got {bad}")
        if len(set(self.also_targets)) != len(self.also_targets):
            raise ValueError(f"also_targets are listed twice: {self.also_targets}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samplers"] = list(self.samplers)
        # absent when empty: a design without it keeps the dict (and the digests) it had
        d["also_targets"] = [float(t) for t in self.also_targets]
        if not d["also_targets"]:
            del d["also_targets"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Design:
        also = tuple(float(t) for t in d.get("also_targets", ()))
        return cls(tuple(d["samplers"]), int(d["per_sampler"]), int(d["seed"]), also)


@dataclass
class Collection:
    """Policies with their accuracies, labelled by the sampler that drew them.

    A policy two samplers drew appears once per sampler (leave-one-sampler-out removes it
    from the training side whenever its sampler is held out).

    Attributes:
        policies: int ``(N, L)`` action indices.
        accuracy: float ``(N,)``.
        sampler: int ``(N,)`` index into ``samplers``.
        samplers: sampler names.
        dense_accuracy: the dense policy's accuracy under the same mode.
        counts: the fit target's own policies per sampler (computed).
        training_only: bool ``(N,)``, the policies drawn at :attr:`Design.also_targets`
            (default: none); they train the surrogate and are never held out.
    """

    policies: np.ndarray
    accuracy: np.ndarray
    sampler: np.ndarray
    samplers: tuple[str, ...]
    dense_accuracy: float
    counts: dict[str, int] = field(default_factory=dict)
    training_only: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.sampler)
        if self.training_only is None:
            self.training_only = np.zeros(n, dtype=bool)
        self.training_only = np.asarray(self.training_only, dtype=bool).reshape(n)
        own = self.sampler[~self.training_only]
        self.counts = {s: int((own == i).sum()) for i, s in enumerate(self.samplers)}


# ------------------------------------------------------------------------------ store
class EvaluationStore:
    """``policy -> accuracy`` on disk (JSON lines after a key header), append-only.

    Several processes may fill one store at once (two collections of one configuration, or
    an ``AsyncVectorEnv``'s copies building their proxy): each evaluation happens under the
    store's lock after reading what the others appended, so none is computed twice and no
    line is interleaved; the lock is held for one evaluation at a time.

    Args:
        path: the ``.jsonl`` file (created on the first :meth:`add`).
        key: what decides the accuracies; a file holding another key is refused.
    """

    def __init__(self, path: str | os.PathLike, key: dict):
        self.path = Path(path)
        self.key = key
        self.values: dict[tuple[int, ...], float] = {}
        self.threads: set[int] = set()  # torch thread counts the stored evaluations ran with
        self._header = json.dumps({"key": key}, sort_keys=True)
        self._read = 0  # bytes of the file already parsed
        self._lines = 0
        with self.locked():
            pass

    @property
    def _fix(self) -> str:
        return f"delete {self.path} to collect its evaluations again"

    def sync(self) -> None:
        """Read what was appended since the last call (call it under :meth:`locked`).

        A last line without its newline is the one a killed collector was writing: it is
        cut off. Any other unreadable line is an error naming the file and the line.
        """
        if not self.path.exists():
            self.values, self._read, self._lines = {}, 0, 0
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self._read)
                raw = f.read()
        except OSError as e:
            raise StoreError(
                f"cannot read the evaluation store {self.path} ({e}); {self._fix}"
            ) from None
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # an unfinished last line: cut it off (we hold the lock)
            os.truncate(self.path, self._read + end)
        for line in raw[:end].splitlines():
            self._lines += 1
            self._parse(line)
        self._read += end

    def _parse(self, line: bytes) -> None:
        n = self._lines
        if n == 1:
            try:
                header = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise StoreError(
                    f"{self.path} has no readable key on line 1; {self._fix}"
                ) from None
            if not isinstance(header, dict) or header.get("key") != self.key:
                raise StoreError(
                    f"{self.path} holds evaluations of another configuration (its key differs "
                    f"from this one's); {self._fix}"
                )
            return
        try:
            d = json.loads(line)
            actions = d["policy"]
            if not isinstance(actions, list) or not all(type(a) is int for a in actions):
                raise ValueError("the policy must be a list of integers")
            acc = d["accuracy"]
            if not isinstance(acc, float) or not 0.0 <= acc <= 1.0:
                raise ValueError(f"accuracy {acc!r} is not a float in [0, 1]")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(
                f"{self.path} line {n} is not an evaluation ({type(e).__name__}: {e}); the "
                f"file is damaged: {self._fix} ({len(self.values)} evaluations before it)"
            ) from None
        self.values[tuple(actions)] = acc
        if type(d.get("threads")) is int:
            self.threads.add(d["threads"])

    def get(self, policy: Sequence[int]) -> float | None:
        return self.values.get(tuple(int(a) for a in policy))

    def add(self, policy: Sequence[int], accuracy: float, threads: int | None = None) -> None:
        """Store one evaluation durably (appended and synced; call it under :meth:`locked`).

        ``threads``: the torch thread count it was computed with (stored with it: a recovery
        mode's accuracy depends on it; ``None`` where unknown, e.g. copied from a file)."""
        key = tuple(int(a) for a in policy)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {"policy": list(key), "accuracy": float(accuracy)}
        if threads is not None:
            line["threads"] = int(threads)
            self.threads.add(int(threads))
        text = json.dumps(line) + "\n"
        if self._read == 0:
            text = self._header + "\n" + text
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self._read += len(text.encode())
        self._lines += text.count("\n")
        self.values[key] = float(accuracy)

    def __len__(self) -> int:
        return len(self.values)

    @contextmanager
    def locked(self):
        """Hold the store's exclusive lock, having read what others appended."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.sync()
            yield self
        finally:
            os.close(fd)  # closing drops the flock


# --------------------------------------------------------------------------- samplers
class _Space:
    """The actions an episode may take at a FLOPs target: valid ones, under the action wall."""

    def __init__(self, problem: PruningProblem, target: float | None):
        self.problem = problem
        self.cost = problem.cost
        # the FLOPs part of the env's action wall (AutoSculptEnv._max_flops): FLOPs at most
        # (1 - target) of dense
        self.max_flops = None if target is None else max_kept(problem.cost.dense_flops, target)
        self.sparsity = np.asarray([a.sparsity for a in problem.catalog.actions], dtype=float)
        self.valid = problem.valid
        self.L = problem.num_layers

    def allowed(self, prefix: list[int]) -> np.ndarray:
        mask = self.valid[len(prefix)].copy()
        if self.max_flops is not None:
            mask &= self.cost.min_flops_next(prefix) <= self.max_flops
        return mask

    def repair(self, desired: Sequence[int]) -> tuple[int, ...]:
        """Walk the layers keeping each desired action the wall allows, else the allowed one
        nearest in nominal sparsity (ties: the sparser)."""
        out: list[int] = []
        for i in range(self.L):
            mask = self.allowed(out)
            a = int(desired[i])
            if not mask[a]:
                cand = np.flatnonzero(mask)
                gap = np.abs(self.sparsity[cand] - self.sparsity[a]) - 1e-9 * self.sparsity[cand]
                a = int(cand[np.argmin(gap)])
            out.append(a)
        return tuple(out)

    def uniform(self, rng: np.random.Generator) -> tuple[int, ...]:
        out: list[int] = []
        for _ in range(self.L):
            out.append(int(rng.choice(np.flatnonzero(self.allowed(out)))))
        return tuple(out)

    def levels(self, rng: np.random.Generator) -> tuple[int, ...]:
        q, sd = rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.3)
        desired = []
        for i in range(self.L):
            cand = np.flatnonzero(self.valid[i])
            s = q + sd * rng.standard_normal()
            desired.append(int(cand[np.argmin(np.abs(self.sparsity[cand] - s))]))
        return self.repair(desired)

    def mutate(self, policy: Sequence[int], rng: np.random.Generator, k: int) -> tuple[int, ...]:
        desired = list(policy)
        for i in rng.choice(self.L, size=min(k, self.L), replace=False):
            cand = np.flatnonzero(self.valid[i])
            other = cand[cand != desired[i]]
            if other.size:
                desired[i] = int(rng.choice(other))
        return self.repair(desired)


def _sampler_rng(seed: int, name: str, target: float | None) -> np.random.Generator:
    t = -1 if target is None else int(round(target * 1_000_000))
    return np.random.default_rng([seed, zlib.crc32(name.encode()), t + 1])


def draw(
    name: str,
    problem: PruningProblem,
    target: float | None,
    n: int,
    seed: int,
    evaluate: Callable[[tuple[int, ...]], float],
) -> list[tuple[int, ...]]:
    """Up to ``n`` unique policies of one sampler, each scored with ``evaluate`` as drawn.

    Gives fewer only when 50 n draws in a row find nothing new (a tiny policy space).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if name == "unconstrained":
        target = None  # its policies do not depend on the target: shared by every target's
    space = _Space(problem, target)
    rng = _sampler_rng(seed, name, target)
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    misses = 0

    def take(policy: tuple[int, ...]) -> float | None:
        nonlocal misses
        if policy in seen:
            misses += 1
            return None
        misses = 0
        seen.add(policy)
        out.append(policy)
        return evaluate(policy)

    def exhausted() -> bool:
        return len(out) >= n or misses >= 50 * n

    if name in ("uniform", "unconstrained"):
        while not exhausted():
            take(space.uniform(rng))
    elif name == "levels":
        while not exhausted():
            take(space.levels(rng))
    elif name == "evolution":
        population: deque[tuple[tuple[int, ...], float]] = deque()
        while len(population) < POPULATION and not exhausted():
            p = space.uniform(rng)
            acc = take(p)
            if acc is not None:
                population.append((p, acc))
        while not exhausted() and population:
            pick = rng.choice(len(population), size=min(TOURNAMENT, len(population)), replace=False)
            parent = max((population[int(j)] for j in pick), key=lambda pa: pa[1])[0]
            child = space.mutate(parent, rng, int(rng.integers(1, 4)))
            acc = take(child)
            if acc is not None:
                population.append((child, acc))
                if len(population) > POPULATION:
                    population.popleft()
    else:  # local
        current, best, stall = None, -1.0, PATIENCE
        while not exhausted():
            if stall >= PATIENCE:
                p = space.uniform(rng)
                acc = take(p)
                if acc is not None:
                    current, best, stall = p, acc, 0
                continue
            child = space.mutate(current, rng, 1)
            acc = take(child)
            if acc is None:
                stall += 1
                continue
            stall = 0 if acc > best else stall + 1
            if acc >= best:
                current, best = child, acc
    return out


_WARNED: set[tuple[str, int]] = set()


def _warn_threads(store: EvaluationStore, threads: int) -> None:
    """Warn (once per store and thread count) that a store mixes torch thread counts."""
    if (str(store.path), threads) in _WARNED:
        return
    _WARNED.add((str(store.path), threads))
    warnings.warn(
        f"{store.path} holds evaluations made with {sorted(store.threads)} torch thread(s) and "
        f"this process runs {threads}: a recovery mode's accuracy depends on the thread count "
        "(floating-point differences grow through its training pass), so the collection mixes "
        f"two realisations of the reward; set torch.set_num_threads({sorted(store.threads)[0]}) "
        "(--threads) to continue it alike, or delete the file to collect it again",
        stacklevel=3,
    )


def _memoised(
    store: EvaluationStore,
    evaluator: Callable[[], Callable[[Sequence[int]], float]],
    bar,
) -> Callable[[tuple[int, ...]], float]:
    """``policy -> accuracy`` from ``store``, scoring (and storing) only what it lacks; the
    evaluator is built on the first miss."""
    evaluate_fn: Callable[[Sequence[int]], float] | None = None

    def evaluate(policy: tuple[int, ...]) -> float:
        nonlocal evaluate_fn
        acc = store.get(policy)
        if acc is None:
            with store.locked():  # another collector may have scored it meanwhile
                acc = store.get(policy)
                if acc is None:
                    threads = torch.get_num_threads()
                    if store.threads - {threads}:
                        _warn_threads(store, threads)
                    if evaluate_fn is None:
                        evaluate_fn = evaluator()
                    acc = float(evaluate_fn(list(policy)))
                    store.add(policy, acc, threads)
        bar.update(1)
        return acc

    return evaluate


def collect(
    problem: PruningProblem,
    store: EvaluationStore,
    evaluator: Callable[[], Callable[[Sequence[int]], float]],
    target: float,
    design: Design,
    progress: bool = True,
    desc: str = "surrogate policies",
) -> Collection:
    """Draw and score every sampler's policies (resuming from the store).

    Args:
        problem: the pruning problem.
        store: the evaluation memo; new evaluations are appended to it one by one.
        evaluator: returns the reward-mode evaluator (``policy -> accuracy``); called only
            when a policy is missing from the store, so a complete store needs no model run.
        target: the FLOPs target the constrained samplers meet.
        design: samplers, policies per sampler, seed, other targets drawn for training.
        progress: show a progress bar (policies drawn, stored ones included).
        desc: the progress bar's label.

    Returns:
        The :class:`Collection` (the target's own policies first, then those drawn at each
        of ``design.also_targets``, marked ``training_only``).

    Raises:
        ValueError: ``target`` is one of ``design.also_targets``.
    """
    if any(abs(float(t) - float(target)) < 1e-9 for t in design.also_targets):
        raise ValueError(
            f"the design's also_targets {list(design.also_targets)} include the fit target "
            f"{target:g}; list only the other targets"
        )
    extra = tuple(s for s in design.samplers if s != "unconstrained")  # the same at every target
    draws = [(target, design.samplers)] + [(t, extra) for t in design.also_targets]
    bar = tqdm(
        total=sum(len(names) for _, names in draws) * design.per_sampler + 1,
        desc=desc,
        disable=not progress,
        leave=False,
    )
    evaluate = _memoised(store, evaluator, bar)
    try:
        dense = evaluate(tuple([problem.dense_action] * problem.num_layers))
        rows, labels, training = [], [], []
        for k, (t, names) in enumerate(draws):
            for name in names:
                drawn = draw(name, problem, t, design.per_sampler, design.seed, evaluate)
                rows += drawn
                labels += [design.samplers.index(name)] * len(drawn)
                training += [k > 0] * len(drawn)
    finally:
        bar.close()
    return Collection(
        policies=np.asarray(rows, dtype=np.int64).reshape(len(rows), problem.num_layers),
        accuracy=np.asarray([store.get(p) for p in rows], dtype=np.float64),
        sampler=np.asarray(labels, dtype=np.int64),
        samplers=tuple(design.samplers),
        dense_accuracy=dense,
        training_only=np.asarray(training, dtype=bool),
    )


def rescore(
    collection: Collection,
    store: EvaluationStore,
    evaluator: Callable[[], Callable[[Sequence[int]], float]],
    per_sampler: int,
    progress: bool = True,
    desc: str = "rescored policies",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Score each sampler's first ``per_sampler`` policies again with another evaluator (e.g.
    the same reward under another seed), resuming from ``store``.

    Returns:
        ``{sampler: (accuracies in the collection, accuracies now)}``.
    """
    own = ~collection.training_only
    picked = {
        name: np.flatnonzero((collection.sampler == j) & own)[:per_sampler]
        for j, name in enumerate(collection.samplers)
    }
    bar = tqdm(
        total=sum(len(i) for i in picked.values()), desc=desc, disable=not progress, leave=False
    )
    evaluate = _memoised(store, evaluator, bar)
    try:
        return {
            name: (
                collection.accuracy[idx],
                np.asarray([evaluate(tuple(collection.policies[i].tolist())) for i in idx]),
            )
            for name, idx in picked.items()
        }
    finally:
        bar.close()
