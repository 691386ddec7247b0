"""Run bookkeeping shared by the agents: TensorBoard, optional wandb, the best episode.

* :func:`start_run` opens ``runs/<run_name>/`` with a TensorBoard writer and, with
  ``track=True``, a wandb run that mirrors TensorBoard. wandb goes offline by itself when
  there is no API key or no network, and a wandb failure only prints a warning: tracking
  never blocks or kills a run.
* :class:`BestEpisode` keeps the best episode by reward and writes it as a replayable
  record to ``runs/<run_name>/best.json`` whenever it improves.
* :class:`Budget` counts env steps and reward evaluations (one per finished episode or
  ``evaluate_policy`` call) so every agent can stop at the same number of evaluations.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from .records import EpisodeRecord


def _wandb_can_go_online() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def start_run(
    args,
    run_name: str,
    output_dir: str = "runs",
    track: bool = False,
    project: str = "autosculpt-env",
    entity: str | None = None,
):
    """Create ``output_dir/run_name`` and return ``(run_dir, writer)``.

    The writer is a ``torch.utils.tensorboard.SummaryWriter``; hyperparameters go into a
    markdown table under the ``hyperparameters`` text tag, as CleanRL does.
    """
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = asdict(args) if is_dataclass(args) else dict(vars(args))
    if track:
        try:
            import wandb

            mode = "online" if _wandb_can_go_online() else "offline"
            wandb.init(
                project=project,
                entity=entity,
                sync_tensorboard=True,
                config=config,
                name=run_name,
                dir=str(run_dir),
                mode=mode,
                save_code=True,
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
            if mode == "offline":
                print(
                    f"wandb: offline (no API key or network); sync later with `wandb sync {run_dir}/wandb`"
                )
        except Exception as e:  # tracking must never stop a search
            warnings.warn(
                f"wandb could not start ({e}); continuing with TensorBoard only", stacklevel=2
            )
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()),
    )
    return run_dir, writer


def finish_run(writer, track: bool) -> None:
    writer.close()
    if track:
        try:
            import wandb

            wandb.finish()
        except Exception as e:
            warnings.warn(f"wandb did not finish cleanly ({e})", stacklevel=2)


class Budget:
    """Counts env steps and reward evaluations against an optional evaluation limit."""

    def __init__(self, max_reward_evaluations: int | None = None):
        self.max_reward_evaluations = max_reward_evaluations
        self.reward_evaluations = 0
        self.env_steps = 0
        self.start = time.time()

    def add(self, steps: int = 0, evaluations: int = 0) -> None:
        self.env_steps += steps
        self.reward_evaluations += evaluations

    @property
    def exhausted(self) -> bool:
        return (
            self.max_reward_evaluations is not None
            and self.reward_evaluations >= self.max_reward_evaluations
        )

    @property
    def remaining(self) -> int | None:
        if self.max_reward_evaluations is None:
            return None
        return max(0, self.max_reward_evaluations - self.reward_evaluations)


class BestEpisode:
    """Keeps the best episode seen (by reward) and saves it as ``best.json``.

    Args:
        env: any env built by ``gym.make`` for the run (its unwrapped env provides the id,
            kwargs and layer names for the record).
        run_dir: where ``best.json`` goes.
        extra: facts stored with the record (agent, seed ...).
    """

    def __init__(self, env, run_dir: str | os.PathLike, extra: dict | None = None):
        self.base = env.unwrapped
        self.path = Path(run_dir) / "best.json"
        self.extra = dict(extra or {})
        self.reward = -np.inf
        self.record: EpisodeRecord | None = None
        self.history: list[tuple[int, float]] = []  # (reward evaluations, best reward so far)

    def update(self, info: dict, reward: float, evaluations: int, global_step: int) -> bool:
        """Offer a finished episode's terminal info; return True when it is the new best."""
        improved = reward > self.reward
        if improved:
            self.reward = float(reward)
            self.record = self.base.record_from_info(
                info,
                extra={**self.extra, "reward_evaluations": evaluations, "global_step": global_step},
            )
            self.record.save(self.path)
        self.history.append((evaluations, self.reward))
        return improved

    def summary(self) -> str:
        if self.record is None:
            return "no episode finished"
        m = self.record.metrics
        return (
            f"best reward {self.reward:.4f}: accuracy {100 * m['accuracy']:.2f}% "
            f"(dense {100 * m['dense_accuracy']:.2f}%), FLOPs -{100 * m['flops_reduction']:.1f}%, "
            f"params -{100 * m['params_reduction']:.1f}%, pruning rate {100 * m['pruning_rate']:.1f}%\n"
            f"policy: {' '.join(self.record.actions)}\nrecord: {self.path}"
        )
