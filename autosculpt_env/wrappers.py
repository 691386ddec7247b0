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

from .features import STATE_NAMES, STATIC_BASE


class FlatObservation(gym.ObservationWrapper):
    """Observe only the current layer's node features and the episode state.

    The vector is the current layer's row of the graph observation (operator type, shapes,
    FLOPs and params shares, weight statistics, per-action kept energy and FLOPs left,
    episode state: FLOPs reduction so far, budget left, progress), followed by the nominal
    sparsity of the previous layer's action (AMC's "previous action"). After the last
    layer it is all zeros but the global state.

    Example:
        >>> import gymnasium as gym, autosculpt_env
        >>> from autosculpt_env.wrappers import FlatObservation
        >>> env = FlatObservation(gym.make("AutoSculpt-ResNet", dataset="digits"))
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape == env.observation_space.shape and obs.dtype == np.float32
        True
        >>> bool(env.action_masks()[0])
        True
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        base = env.unwrapped
        P = base.num_actions
        self._width = STATIC_BASE + 3 * P + len(STATE_NAMES)
        self._current_col = STATIC_BASE + 3 * P + STATE_NAMES.index("current")
        self._decided_col = STATIC_BASE + 3 * P + STATE_NAMES.index("decided")
        self._sparsity_col = STATIC_BASE + 3 * P + STATE_NAMES.index("chosen_sparsity")
        self._global_cols = slice(
            STATIC_BASE + 3 * P + STATE_NAMES.index("flops_reduction"), self._width
        )
        self._rows = np.asarray(base.problem.graph.layer_nodes)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self._width + 1,), np.float32)

    def observation(self, observation: spaces.GraphInstance) -> np.ndarray:
        x = observation.nodes
        layer_rows = x[self._rows]
        current = np.flatnonzero(layer_rows[:, self._current_col] > 0)
        out = np.zeros(self._width + 1, dtype=np.float32)
        if current.size:
            t = int(current[0])
            out[: self._width] = layer_rows[t]
            out[self._width] = layer_rows[t - 1, self._sparsity_col] if t > 0 else 0.0
        else:
            out[self._global_cols] = x[0, self._global_cols]
            out[self._width] = layer_rows[-1, self._sparsity_col]
        return out

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()


class ContinuousAction(gym.ActionWrapper):
    """Map a continuous action in [0, 1] onto the catalog's actions ordered by sparsity.

    ``a`` in [0, 1] picks the action whose position in the sparsity-sorted catalog is
    nearest to ``a * (P - 1)``; if that action is invalid for the current layer (e.g. the
    budget wall masks it), the valid action with the nearest nominal sparsity is taken
    instead (ties go to the sparser one, which keeps the FLOPs target reachable). The
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
        a = int(self._order[pos])
        mask = self.env.unwrapped.action_masks()
        if not mask[a]:
            valid = np.flatnonzero(mask)
            dist = np.abs(self._sparsity[valid] - self._sparsity[a]) - 1e-9 * self._sparsity[valid]
            a = int(valid[np.argmin(dist)])
        return a

    def step(self, action):
        a = self.action(action)
        obs, reward, terminated, truncated, info = self.env.step(a)
        info = dict(info)
        info["discrete_action"] = a
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()
