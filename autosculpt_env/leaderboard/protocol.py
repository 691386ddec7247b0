"""Tasks, protocols and the two tracks: everything that decides a row besides the agent.

A :class:`Task` is a registered env id and the FLOPs reduction it must reach. A
:class:`Protocol` fixes how many reward evaluations a search may spend (counted by the
env), the seeds, the reward the search sees, the FLOPs band the answer must land in, and
how the answer is scored. Its :meth:`Protocol.key` fingerprints what makes rows
comparable; rows of different keys never share a table.

The two tracks (:data:`TRACKS`) are fixed protocols:

* ``fast``: the search sees the cheap surrogate reward (:data:`FAST_SEARCH_EVALUATION`),
  with enough reward evaluations for learning to happen (1,000 episodes) and 10 seeds;
  the best policy is scored by the high-fidelity reward :data:`FAST_SCORE_EVALUATION` on
  the ``reward`` split, whose agreement with the fine-tuned test accuracy the
  reward-fidelity table publishes (README, "Reward fidelity"). A row costs seconds: no
  fine-tuning.
* ``full``: the search sees the env's default reward (:data:`DEFAULT_EVALUATION`) with the
  reward evaluations a CPU affords (25) and 5 seeds; the best policy is fine-tuned with the
  fixed recipe and scored by top-1 test accuracy, as in the first leaderboard.

Both resume, so they may run in parts; what each costs on 2 CPU cores (``--jobs 2``),
measured from its rows, is in ``docs/SUBMITTING.md``. ``fast-large`` and
``full-large`` are the same protocols with 10x the reward evaluations and more seeds, for a
GPU machine or a Ray cluster (``--backend ray``); their rows are a different protocol and
never mix with the 2-core ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from .. import ENV_DEFAULTS, data
from ..training import Recipe

FINETUNE_SCORE = "finetune"
"""``Protocol.score`` of a track scored by test accuracy after the fixed fine-tuning."""

FAST_SEARCH_EVALUATION = "proxy"
"""The reward the fast track's searches see: the shipped surrogate (``evaluation=``)."""

DEFAULT_EVALUATION: str = ENV_DEFAULTS["evaluation"]
"""The registered ids' default reward (``evaluation=``), chosen by the reward-fidelity
benchmark (README): the full track's searches see it and it scores the fast track."""

FAST_SCORE_EVALUATION = DEFAULT_EVALUATION
"""The reward that scores the fast track's best policies."""

FLOPS_BAND = 0.05
"""How far past the target a best policy's FLOPs reduction may go (the env's default
``band_tolerance``, the AutoSculpt paper's band): rows are compared at equal FLOPs."""


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


# fields added after the first leaderboard, with the values its rows implicitly had: they
# enter the key only when set otherwise, so the first leaderboard's keys stay valid
_LATER_FIELDS = {"name": None, "score": FINETUNE_SCORE, "flops_band": None}
# fields renamed since the first leaderboard, with the name they had then: rows written
# before hold that name, and the key is computed with it, so no key changes with a name
_EARLIER_NAMES = {"max_reward_evaluations": "budget"}
# fields that do not change what a row means
_NOT_IN_KEY = ("seeds", "threads", "agent_timeout_s", "gpus", "name")


@dataclass(frozen=True)
class Protocol:
    """Everything that decides a leaderboard row besides the agent.

    Attributes:
        max_reward_evaluations: reward evaluations each search may spend (the agents'
            ``--max-reward-evaluations``; the env counts and enforces it,
            :mod:`autosculpt_env.evaluation_limit`).
        seeds: agent seeds (each seed also seeds its fine-tuning).
        reward_samples: reward-split images per evaluation, or the whole split when it
            holds fewer (the digits twins' holds 120). The agents do not take it on their
            command line, so it must equal the env's value (2048 by default); rows whose
            record says otherwise are refused.
        evaluation: the reward the search sees (``evaluation=`` mode, passed to the agents).
        dataset: override every task's dataset (``"digits"`` for a fast twin of the table).
        finetune_recipe: the fine-tuning recipe; ``None`` takes
            :func:`autosculpt_env.finetune.default_recipe` of the dataset.
        finetune_samples: fine-tune on a fixed subset of this many ``train`` images
            (``None``: the whole split).
        threads: torch CPU threads of each agent and fine-tuning (and the CPUs a Ray task
            asks for).
        agent_timeout_s: kill an agent that runs longer (``None``: no limit).
        agent_args: extra command-line arguments per agent name (part of the protocol).
        name: the track it is (``"fast"``, ``"full"`` ...), for display; not in the key.
        score: ``"finetune"`` (test accuracy after the fixed fine-tuning) or an
            ``evaluation=`` mode whose reward-split accuracy scores the best policy.
        flops_band: a best policy's FLOPs reduction must lie in ``[target, target +
            flops_band]`` (``None``: only the lower edge, as in the first leaderboard).
        gpus: GPUs each run asks for on a Ray cluster (not in the key).
    """

    max_reward_evaluations: int = 100
    seeds: tuple[int, ...] = (1, 2, 3)
    reward_samples: int = 2048
    evaluation: str = "accuracy"
    dataset: str | None = None
    finetune_recipe: Recipe | None = None
    finetune_samples: int | None = None
    threads: int = 1
    agent_timeout_s: float | None = None
    agent_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    name: str | None = None
    score: str = FINETUNE_SCORE
    flops_band: float | None = None
    gpus: float = 0.0

    def __post_init__(self):
        def integer(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not integer(self.max_reward_evaluations, 1):
            raise ValueError(
                "max_reward_evaluations must be an integer >= 1, got "
                f"{self.max_reward_evaluations!r}"
            )
        if not self.seeds or not all(integer(s, 0) for s in self.seeds):
            raise ValueError(f"seeds must be one or more integers >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {self.seeds!r}")
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
        from ..evaluation import EVALUATIONS

        if self.evaluation not in EVALUATIONS:
            raise ValueError(
                f"evaluation must be one of {', '.join(EVALUATIONS)}, got {self.evaluation!r}"
            )
        if self.score != FINETUNE_SCORE and self.score not in EVALUATIONS:
            raise ValueError(
                f"score must be {FINETUNE_SCORE!r} or one of {', '.join(EVALUATIONS)}, "
                f"got {self.score!r}"
            )
        if self.flops_band is not None and not (
            isinstance(self.flops_band, int | float)
            and not isinstance(self.flops_band, bool)
            and 0.0 < self.flops_band < 1.0
        ):
            raise ValueError(f"flops_band must be in (0, 1) or None, got {self.flops_band!r}")
        if not (isinstance(self.gpus, int | float) and self.gpus >= 0):
            raise ValueError(f"gpus must be a number >= 0, got {self.gpus!r}")
        if self.dataset is not None:
            data.info(self.dataset)

    @property
    def finetunes(self) -> bool:
        """Whether rows are scored after fine-tuning (else by :attr:`score`'s reward)."""
        return self.score == FINETUNE_SCORE

    def recipe_for(self, dataset: str) -> Recipe:
        from ..finetune import default_recipe

        return self.finetune_recipe if self.finetune_recipe is not None else default_recipe(dataset)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["agent_args"] = {k: list(v) for k, v in self.agent_args.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        """A protocol from :meth:`to_dict` (or a first-leaderboard row's, which lacks the
        later fields)."""
        d = dict(d)
        for name, earlier in _EARLIER_NAMES.items():
            if earlier in d and name not in d:
                d[name] = d.pop(earlier)
        if d.get("finetune_recipe") is not None:
            d["finetune_recipe"] = Recipe(**d["finetune_recipe"])
        d["seeds"] = tuple(d.get("seeds", ()))
        d["agent_args"] = {k: tuple(v) for k, v in (d.get("agent_args") or {}).items()}
        return cls(**d)

    def key(self) -> str:
        """Fingerprint of what makes rows comparable (seeds, threads, timeouts, GPUs and the
        display name excluded)."""
        from ..finetune import FINETUNE_RECIPES

        d = self.to_dict()
        for k in _NOT_IN_KEY:
            d.pop(k)
        for k, first in _LATER_FIELDS.items():
            if k in d and d[k] == first:
                d.pop(k)
        for name, earlier in _EARLIER_NAMES.items():
            d[earlier] = d.pop(name)
        if d["finetune_recipe"] is None:  # the defaults are part of the protocol too
            d["finetune_recipe"] = {k: r.to_dict() for k, r in sorted(FINETUNE_RECIPES.items())}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        """One sentence: what the search sees and how its answer is scored."""
        band = (
            f", best policy within +{self.flops_band:g} of the target FLOPs reduction"
            if self.flops_band is not None
            else ""
        )
        if self.finetunes:
            recipe = self.finetune_recipe
            scored = (
                "test accuracy after fine-tuning "
                + (
                    f"{recipe.epochs} epoch(s) {recipe.optimizer} lr {recipe.lr}"
                    if recipe
                    else "with the dataset's default recipe (`autosculpt_env.finetune`)"
                )
                + (
                    f" on {self.finetune_samples} train images"
                    if self.finetune_samples
                    else " on the whole train split"
                )
            )
        else:
            scored = f"the `{self.score}` reward of the best policy on the reward split"
        return (
            f"{self.max_reward_evaluations} reward evaluations per search, reward "
            f"`{self.evaluation}` on (up to) {self.reward_samples} reward-split images"
            + (f", dataset override `{self.dataset}`" if self.dataset else "")
            + f"{band}; score: {scored}; seeds {_ranges(self.seeds)}."
        )


def _ranges(seeds: Sequence[int]) -> str:
    """``1-5, 9``."""
    out, run = [], []
    for s in sorted(seeds):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


FAST = Protocol(
    name="fast",
    max_reward_evaluations=1000,
    seeds=tuple(range(1, 11)),
    evaluation=FAST_SEARCH_EVALUATION,
    score=FAST_SCORE_EVALUATION,
    flops_band=FLOPS_BAND,
)
FULL = Protocol(
    name="full",
    max_reward_evaluations=25,
    seeds=tuple(range(1, 6)),
    evaluation=DEFAULT_EVALUATION,
    score=FINETUNE_SCORE,
    flops_band=FLOPS_BAND,
)
TRACKS: dict[str, Protocol] = {
    "fast": FAST,
    "full": FULL,
    "fast-large": replace(
        FAST, name="fast-large", max_reward_evaluations=10_000, seeds=tuple(range(1, 21))
    ),
    "full-large": replace(
        FULL, name="full-large", max_reward_evaluations=250, seeds=tuple(range(1, 11))
    ),
}
"""The fixed protocols by name. ``fast`` and ``full`` fit 2 CPU cores; the ``-large`` ones
are for a GPU machine or a cluster (the same protocol, 10x the reward evaluations, more
seeds)."""


def track_of(protocol: Protocol) -> str:
    """The name of the track ``protocol`` is (by key), or ``"custom"``."""
    for name, track in TRACKS.items():
        if track.key() == protocol.key():
            return name
    return "custom"


def make_protocol(
    max_reward_evaluations: int | None = None,
    seeds: Sequence[int] | None = None,
    dataset: str | None = None,
    evaluation: str | None = None,
    finetune_epochs: int | None = None,
    finetune_samples: int | None = None,
    threads: int = 1,
    agent_timeout_s: float | None = None,
    track: str = "full",
    score: str | None = None,
    gpus: float = 0.0,
) -> Protocol:
    """A :class:`Protocol` from command-line options: ``track``'s, with every option that
    is given replacing the track's value. ``finetune_epochs`` changes the epochs of the
    default recipe of ``dataset`` (Fashion-MNIST's when no dataset is overridden). A
    protocol changed this way has another key, and its rows are named ``custom``."""
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; choose one of {', '.join(TRACKS)}")
    base = TRACKS[track]
    recipe = base.finetune_recipe
    if finetune_epochs is not None:
        from ..finetune import default_recipe

        recipe = replace(default_recipe(dataset or "fashion-mnist"), epochs=finetune_epochs)
    changed = replace(
        base,
        max_reward_evaluations=(
            base.max_reward_evaluations
            if max_reward_evaluations is None
            else max_reward_evaluations
        ),
        seeds=base.seeds if seeds is None else tuple(seeds),
        dataset=dataset,
        evaluation=base.evaluation if evaluation is None else evaluation,
        finetune_recipe=recipe,
        finetune_samples=finetune_samples,
        threads=threads,
        agent_timeout_s=agent_timeout_s,
        score=base.score if score is None else score,
        gpus=gpus,
    )
    return replace(changed, name=track_of(changed))


def task_dataset(task: Task, protocol: Protocol) -> str:
    """The dataset a task runs on under a protocol."""
    if protocol.dataset is not None:
        return protocol.dataset
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    return gym.spec(task.env_id).kwargs.get("dataset", "fashion-mnist")


def task_env_kwargs(task: Task, protocol: Protocol, data_dir=None) -> dict:
    """The env keyword arguments a search of ``task`` under ``protocol`` runs with, as its
    record states them: the registered configuration's, with the task's target and the
    protocol's dataset, search reward and reward samples, image counts, recovery batch
    size and readout as the env uses them (:func:`autosculpt_env.evaluation.env_settings`: the
    protocol's ``reward_samples`` or the whole reward split when it holds fewer, the zoo
    model's own defaults). ``data_dir`` (the user's) is read for the splits' sizes and not
    compared."""
    import inspect

    import gymnasium as gym

    from ..envs.autosculpt import AutoSculptEnv
    from ..evaluation import SAMPLE_SETTINGS, env_settings

    params = inspect.signature(AutoSculptEnv.__init__).parameters
    kwargs = {k: p.default for k, p in params.items() if k not in ("self", "render_mode")}
    kwargs.update(gym.spec(task.env_id).kwargs)
    dataset = task_dataset(task, protocol)
    kwargs.update(
        target_flops_reduction=task.target_flops_reduction,
        evaluation=protocol.evaluation,
        reward_samples=min(protocol.reward_samples, data.split_size(dataset, "reward", data_dir)),
        dataset=dataset,
    )
    kwargs.update(
        env_settings(
            kwargs["model"],
            dataset,
            data_dir,
            recovery_batch_size=kwargs["recovery_batch_size"],
            reward_readout=kwargs["reward_readout"],
            **{k: kwargs[k] for k in SAMPLE_SETTINGS},
        )
    )
    kwargs.pop("data_dir", None)
    return kwargs


def flops_problems(
    protocol: Protocol, reward: str, target: float, flops_reduction: float
) -> list[str]:
    """Why a best policy's FLOPs reduction cannot be compared at the target (empty: it can).

    With the ``budget`` reward it must meet the target; with a protocol band it must lie in
    ``[target, target + band]`` (rows are compared at equal FLOPs).
    """
    from ..band import within_band

    problems = []
    if reward == "budget" and flops_reduction < target - 1e-12:
        problems.append(f"FLOPs reduction {flops_reduction:.4f} misses the target {target}")
    if protocol.flops_band is not None and not within_band(
        flops_reduction, target, protocol.flops_band
    ):
        problems.append(
            f"FLOPs reduction {flops_reduction:.4f} is outside the band [{target:g}, "
            f"{target + protocol.flops_band:g}]: rows are compared at equal FLOPs"
        )
    return problems


def check_task(task: Task, protocol: Protocol, data_dir=None) -> None:
    """Refuse, before any search, a task the protocol cannot run and score: an id that is
    not a registered AutoSculpt id, or a fine-tuning subset its train split cannot hold.

    Raises:
        ValueError: naming the task, the value and the fix.
    """
    from ..records import check_env_id

    check_env_id(task.env_id, f"task {task.name}: env id")
    if protocol.finetunes and protocol.finetune_samples is not None:
        dataset = task_dataset(task, protocol)
        try:
            data.check_samples(
                "finetune_samples", protocol.finetune_samples, dataset, "train", data_dir
            )
        except ValueError as e:
            raise ValueError(f"task {task.name}: {e} (--finetune-samples)") from None


def env_kwargs_problems(record_kwargs: dict, expected: dict) -> list[str]:
    """Keywords of a record's env that differ from the task's (keys the record lacks are an
    older env's and left alone)."""
    problems = []
    for key, value in sorted(record_kwargs.items()):
        if key not in expected:
            continue
        want = expected[key]
        same = (
            abs(float(value) - float(want)) <= 1e-12
            if isinstance(value, float) and isinstance(want, int | float)
            else value == want
        )
        if not same:
            problems.append(f"env keyword {key}={value!r}, the task's is {want!r}")
    return problems


def row_id(task: Task, agent: str, seed: int) -> str:
    """``TASK__AGENT__seedN``, the name of a row's file."""
    from pathlib import Path

    return f"{task.name}__{Path(agent).stem}__seed{seed}"
