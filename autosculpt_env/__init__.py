"""autosculpt-env: pattern-based DNN pruning as a Gymnasium environment.

Importing the package registers the environment ids (see :func:`register_envs`)::

    import gymnasium as gym
    env = gym.make("autosculpt_env:AutoSculpt-ResNet")
"""

from __future__ import annotations

__version__ = "0.1.0"

ENTRY_POINT = "autosculpt_env.envs.autosculpt:AutoSculptEnv"

# The fixed configurations: a zoo model on Fashion-MNIST, the paper's catalog, AMC's
# budget reward, half the FLOPs removed. Every kwarg can be overridden in gym.make.
REGISTERED_CONFIGS: dict[str, dict] = {
    "AutoSculpt-v0": {},
    **{
        f"AutoSculpt-{family}": {
            "model": model,
            "dataset": "fashion-mnist",
            "catalog": "autosculpt",
            "reward": "budget",
            "target_flops_reduction": 0.5,
        }
        for family, model in (
            ("ResNet", "resnet20"),
            ("VGG", "vgg11"),
            ("MobileNet", "mobilenetv2"),
            ("ViT", "vit"),
        )
    },
}


def register_envs() -> None:
    """Register every id of :data:`REGISTERED_CONFIGS` (once; later calls do nothing)."""
    from gymnasium.envs.registration import register, registry

    for env_id, kwargs in REGISTERED_CONFIGS.items():
        if env_id in registry:
            continue
        # order_enforce=False: the env itself raises ValueError on step() before reset()
        register(id=env_id, entry_point=ENTRY_POINT, kwargs=dict(kwargs), order_enforce=False)


register_envs()
