"""autosculpt-env: pattern-based DNN pruning as a Gymnasium environment.

Importing the package registers the environment ids (see :func:`register_envs`)::

    import gymnasium as gym
    env = gym.make("autosculpt_env:AutoSculpt-ResNet")

Submodules load on first use (``autosculpt_env.data.load(...)`` works after a bare
``import autosculpt_env``), so the import itself stays light (no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__version__ = "0.1.0"

from . import zoo as _zoo  # noqa: E402  (torch-free; needs __version__ via records)

ENTRY_POINT = "autosculpt_env.envs.autosculpt:AutoSculptEnv"

ENV_DEFAULTS: dict = {
    "dataset": _zoo.ENV_DATASET,
    "catalog": "autosculpt",
    "reward": "budget",
    "evaluation": "recovery",
    "target_flops_reduction": 0.5,
}
"""What every zoo model's id fixes besides ``model`` (every kwarg can be overridden in
``gym.make``): Fashion-MNIST, the paper's catalog, AMC's FLOPs-constrained reward scored
after a short masked recovery fine-tuning (the reward that ranked policies most like the
leaderboard score, ``benchmarks/fidelity/REWARD_FIDELITY.md``), half the FLOPs removed."""


def registered_configs() -> dict[str, dict]:
    """``{env id: kwargs}``: the generic ``AutoSculpt-v0`` and one id per zoo model
    (:data:`autosculpt_env.zoo.ZOO`): :data:`ENV_DEFAULTS`. A model's own defaults
    (``zoo.ZooModel.env_defaults``) are not id keywords: the env applies them to settings
    left at ``None``, so ``dataset="digits"`` can cut an image count to its split."""
    return {
        "AutoSculpt-v0": {},
        **{m.env_id: {"model": m.name, **ENV_DEFAULTS} for m in _zoo.ZOO.values()},
    }


REGISTERED_CONFIGS: dict[str, dict] = registered_configs()


def register_envs() -> None:
    """Register every id of :func:`registered_configs` (ids already registered are kept)."""
    from gymnasium.envs.registration import register, registry

    for env_id, kwargs in registered_configs().items():
        REGISTERED_CONFIGS.setdefault(env_id, kwargs)
        if env_id in registry:
            continue
        # order_enforce=False: the env itself raises ValueError on step() before reset()
        register(id=env_id, entry_point=ENTRY_POINT, kwargs=dict(kwargs), order_enforce=False)


def __getattr__(name: str) -> ModuleType:
    """Import a submodule on first attribute access (PEP 562)."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    import pkgutil

    return sorted({*globals(), *(m.name for m in pkgutil.iter_modules(__path__))})


register_envs()
