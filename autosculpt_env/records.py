"""Episode records: what a search found, in a form anyone can replay.

A record names the env id and its keyword arguments, the action chosen for every layer (by
name), and the metrics the env reported. :func:`replay` rebuilds the env, plays the actions
and checks that FLOPs come back identical and accuracy within a tolerance.
"""

from __future__ import annotations

import json
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
    """

    env_id: str
    env_kwargs: dict
    layers: list[str]
    actions: list[str]
    metrics: dict
    version: str = __version__
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EpisodeRecord:
        d = json.loads(text)
        missing = {"env_id", "env_kwargs", "layers", "actions", "metrics"} - set(d)
        if missing:
            raise ValueError(f"not an episode record: missing {sorted(missing)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EpisodeRecord:
        return cls.from_json(Path(path).read_text())


def make_env(record: EpisodeRecord, **overrides):
    """``gym.make`` the record's env (overrides win, e.g. ``model=`` for a user's network)."""
    import gymnasium as gym

    import autosculpt_env  # noqa: F401  (registers the ids)

    return gym.make(record.env_id, **{**record.env_kwargs, **overrides})


def replay(record: EpisodeRecord, accuracy_tolerance: float = 1e-3, **overrides) -> dict:
    """Play a record's actions again and check its metrics.

    Returns:
        The terminal info of the replayed episode.

    Raises:
        ValueError: the replay disagrees (FLOPs must match exactly, accuracy within
            ``accuracy_tolerance``), or the record does not fit the env.
    """
    env = make_env(record, **overrides)
    try:
        base = env.unwrapped
        if list(record.layers) != list(base.layer_names):
            raise ValueError(f"record layers do not match the env's layers ({record.env_id})")
        policy = base.problem.actions_from_names(record.actions)
        env.reset(seed=0)
        info = {}
        for a in policy:
            _, _, terminated, _, info = env.step(a)
        assert terminated
    finally:
        env.close()
    m = record.metrics
    if "flops" in m and info["flops"] != m["flops"]:
        raise ValueError(f"replayed FLOPs {info['flops']} != recorded {m['flops']}")
    if abs(info["flops_reduction"] - m["flops_reduction"]) > 1e-12:
        raise ValueError(
            f"replayed FLOPs reduction {info['flops_reduction']} != recorded {m['flops_reduction']}"
        )
    if abs(info["accuracy"] - m["accuracy"]) > accuracy_tolerance:
        raise ValueError(f"replayed accuracy {info['accuracy']} != recorded {m['accuracy']}")
    return info
