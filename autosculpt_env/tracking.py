"""Run bookkeeping shared by the agents: TensorBoard, optional wandb, the best episode.

* :func:`start_run` opens ``runs/<run_name>/`` with a TensorBoard writer and, with
  ``track=True``, a wandb run that mirrors TensorBoard. wandb goes offline by itself when
  there is no API key or no network, and a wandb failure only prints a warning: tracking
  never blocks or kills a run.
* :class:`BestEpisode` keeps the best episode by reward among those whose FLOPs reduction
  lies in the task's band (:func:`autosculpt_env.band.env_within_band`) and writes it as a
  replayable record to ``runs/<run_name>/best.json`` whenever it improves.

The reward-evaluation limit is not kept here: the env counts and enforces it
(:mod:`autosculpt_env.evaluation_limit`); agents read its ``remaining`` to stop in time.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from .band import env_within_band
from .records import EpisodeRecord

#: seconds wandb may take to start online, and to reach its server before we go offline
WANDB_INIT_TIMEOUT_S = 15
WANDB_PROBE_TIMEOUT_S = 3


def _wandb_reachable(timeout: float = WANDB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to wandb's server opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _wandb_can_go_online() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    # a key without a network would stall wandb.init for its whole timeout: probe first
    return has_key and _wandb_reachable()


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
                settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True),
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


def check_args(args) -> None:
    """Refuse settings no run can use, before any work (an agent's first call).

    Checks ``threads`` (>= 1), ``max_reward_evaluations`` (``None`` or >= 1), the vector
    agents' ``num_envs``, ``num_steps``, ``num_minibatches`` and ``update_epochs`` (>= 1),
    learning rates (> 0, not NaN) and ``env_id`` (a registered id), where ``args`` has them.

    Raises:
        SystemExit: with a one-line message naming the option and the fix.
    """
    threads = getattr(args, "threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SystemExit(f"error: --threads must be an integer >= 1, got {threads!r}")
    limit = getattr(args, "max_reward_evaluations", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SystemExit(
            f"error: --max-reward-evaluations must be an integer >= 1 (or omitted), got {limit!r}"
        )
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs"):
        value = getattr(args, name, 1)  # vector agents' loop sizes: 0 would divide by zero
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} must be an integer >= 1, got {value!r}")
    for name in ("learning_rate", "actor_learning_rate", "critic_learning_rate"):
        value = getattr(args, name, 1.0)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} must be a finite number > 0, got {value!r}")
    env_id = getattr(args, "env_id", None)
    if env_id is not None:
        from gymnasium.envs.registration import registry

        import autosculpt_env  # noqa: F401  (registers the ids)

        from .records import registered_ids

        if env_id not in registry or ":" in env_id:
            raise SystemExit(
                f"error: --env-id {env_id!r} is not a registered env id; AutoSculpt ids: "
                f"{', '.join(registered_ids())}"
            )


class BestEpisode:
    """Keeps the best episode seen (by reward, among episodes inside the FLOPs band) and
    saves it as ``best.json``; the record carries the env's reward-evaluation count.

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
        self.episodes = 0  # finished episodes offered
        self.outside_band = 0  # of which outside the FLOPs band

    def update(self, info: dict, reward: float, global_step: int) -> bool:
        """Offer a finished episode's terminal info (or ``evaluate_policy``'s metrics); return
        True when it is the new best. An episode outside the FLOPs band never is."""
        self.episodes += 1
        if not env_within_band(self.base, float(info["flops_reduction"])):
            self.outside_band += 1
            return False
        improved = reward > self.reward
        if improved:
            self.reward = float(reward)
            self.record = self.base.record_from_info(
                info, extra={**self.extra, "global_step": global_step}
            )
            self.record.save(self.path)
        return improved

    def exit_status(self) -> int:
        """0 when a best episode was recorded; else 1, after saying why on stderr.

        A search that finished no episode (e.g. a limit of reward evaluations below the
        number of parallel envs), or none inside the FLOPs band, wrote no ``best.json``: it
        must not look like a success.
        """
        if self.record is not None:
            return 0
        import sys

        if self.episodes == 0:
            why = (
                "the search finished no episode; give it a larger --max-reward-evaluations "
                "(at least --num-envs for vector agents) or more steps"
            )
        else:
            lo, hi = self.base.target, self.base.target + self.base.band_tolerance
            why = (
                f"none of the {self.episodes} episodes the search finished removed between "
                f"{lo:g} and {hi:g} of the FLOPs (the band results are compared in); give it "
                "more reward evaluations"
            )
        print(f"error: {why}, so no {self.path} was written", file=sys.stderr)
        return 1

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
