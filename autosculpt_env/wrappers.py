"""Wrappers that let agents built for flat observations or continuous actions use the env.

* :class:`FlatObservation`: AMC-style fixed-size vector of the current layer plus global
  episode state, so MLP agents and sb3-contrib's ``MaskablePPO`` run unchanged.
* :class:`ContinuousAction`: a ``Box([0], [1])`` action mapped onto the catalog's actions
  ordered by sparsity (for DDPG, as in AMC).

Vector envs: ``gymnasium.vector.SyncVectorEnv`` and
``AsyncVectorEnv(..., shared_memory=False)`` both work. With the graph observation the
batched observation is a tuple of ``GraphInstance`` (one per sub-env); the per-env action
masks arrive stacked in ``infos["action_mask"]`` with shape ``(num_envs, P)``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .features import FeatureLayout


class FlatObservation(gym.ObservationWrapper):
    """Observe only the current layer's node features and the episode state.

    The vector is the current layer's row of the graph observation (operator type, shapes,
    FLOPs and params shares, weight statistics, per-action kept energy and FLOPs left,
    episode state: FLOPs reduction so far, FLOPs to the target, progress; columns named by
    :attr:`feature_names`), followed by ``previous_sparsity``, the nominal sparsity of the
    previous layer's action (AMC's "previous action"). After the last layer it is all zeros
    but the global state and ``previous_sparsity``.

    Example:
        >>> import gymnasium as gym, autosculpt_env
        >>> from autosculpt_env.wrappers import FlatObservation
        >>> env = FlatObservation(gym.make("AutoSculpt-ResNet", dataset="digits"))
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape == env.observation_space.shape and obs.dtype == np.float32
        True
        >>> float(obs[env.feature_names.index("current")]), bool(env.action_masks()[0])
        (1.0, True)
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        base = env.unwrapped
        self.layout: FeatureLayout = base.feature_layout
        self.feature_names: list[str] = [*self.layout.names, "previous_sparsity"]
        """Name of every entry of the observation vector."""
        self._rows = np.asarray(base.problem.graph.layer_nodes)
        self._current = self.layout.column("current")
        self._sparsity = self.layout.column("chosen_sparsity")
        self._previous = self.layout.size  # the entry after the layer row
        self.observation_space = spaces.Box(-np.inf, np.inf, (len(self.feature_names),), np.float32)

    def observation(self, observation: spaces.GraphInstance) -> np.ndarray:
        layer_rows = observation.nodes[self._rows]
        current = np.flatnonzero(layer_rows[:, self._current] > 0)
        out = np.zeros(len(self.feature_names), dtype=np.float32)
        if current.size:
            t = int(current[0])
            out[: self.layout.size] = layer_rows[t]
            out[self._previous] = layer_rows[t - 1, self._sparsity] if t > 0 else 0.0
        else:
            glob = self.layout.global_state
            out[glob] = observation.nodes[0, glob]
            out[self._previous] = layer_rows[-1, self._sparsity]
        return out

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()


def nearest_valid(valid: np.ndarray, sparsity: np.ndarray, action: int) -> int:
    """The valid action nearest in nominal sparsity to ``action`` (itself when valid).

    Ties go to the sparser action, which keeps a FLOPs target reachable.

    Args:
        valid: bool ``(P,)``, the valid actions (an action mask).
        sparsity: ``(P,)`` nominal sparsity of every action.
        action: the wanted action index.
    """
    if valid[action]:
        return int(action)
    candidates = np.flatnonzero(valid)
    dist = np.abs(sparsity[candidates] - sparsity[action]) - 1e-9 * sparsity[candidates]
    return int(candidates[np.argmin(dist)])


class ContinuousAction(gym.ActionWrapper):
    """Map a continuous action in [0, 1] onto the catalog's actions ordered by sparsity.

    ``a`` in [0, 1] picks the action whose position in the sparsity-sorted catalog is
    nearest to ``a * (P - 1)``; if that action is invalid for the current layer (e.g. the
    action wall of the ``budget`` reward masks it), :func:`nearest_valid` takes the valid
    action with the nearest nominal sparsity instead (ties go to the sparser one). The
    discrete action actually played is reported as ``info["discrete_action"]``.

    Example:
        >>> import gymnasium as gym, numpy as np, autosculpt_env
        >>> from autosculpt_env.wrappers import ContinuousAction
        >>> env = ContinuousAction(gym.make("AutoSculpt-ResNet", dataset="digits"))
        >>> _ = env.reset(seed=0)
        >>> env.unwrapped.action_names[env.action(np.array([0.0]))]
        'level_0.0'
        >>> env.unwrapped.action_names[env.action(np.array([1.0]))]
        'level_0.9'
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        base = env.unwrapped
        sparsity = np.asarray([a.sparsity for a in base.problem.catalog.actions])
        self._order = np.argsort(sparsity, kind="stable")
        self._sparsity = sparsity
        self.action_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    def action(self, action) -> int:
        x = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
        pos = int(round(x * (len(self._order) - 1)))
        return nearest_valid(
            self.env.unwrapped.action_masks(), self._sparsity, int(self._order[pos])
        )

    def step(self, action):
        a = self.action(action)
        obs, reward, terminated, truncated, info = self.env.step(a)
        info = dict(info)
        info["discrete_action"] = a
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()
