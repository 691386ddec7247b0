"""The README's reference tables, generated from the registries they describe.

Each table is a generated block (:mod:`autosculpt_env.readme_blocks`) whose body comes from
the one place that states its facts: env ids from :func:`autosculpt_env.registered_configs`
and :data:`autosculpt_env.zoo.ZOO`, the observation layout from
:class:`autosculpt_env.features.FeatureLayout`, rewards from
:data:`autosculpt_env.rewards.REWARDS`, catalogs from :data:`autosculpt_env.patterns.CATALOGS`.
A new zoo model, catalog or reward reaches the README by running::

    python -m autosculpt_env.docs          # rewrite the blocks of README.md
    python -m autosculpt_env.docs --check  # exit 1 if a block is out of date (CI, tests)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .readme_blocks import update_block

GENERATOR = "python -m autosculpt_env.docs"
README = Path(__file__).resolve().parents[1] / "README.md"


def envs_block() -> str:
    from . import registered_configs, zoo

    rows = [
        "| id | model | dataset | catalog | reward | reward evaluation | FLOPs target |",
        "|---|---|---|---|---|---|---|",
    ]
    import inspect

    from .envs.autosculpt import AutoSculptEnv

    generic = inspect.signature(AutoSculptEnv.__init__).parameters["evaluation"].default
    rows.append(
        "| `AutoSculpt-v0` | any (`model=`; default `resnet20`) | any | any | any | any "
        f"(default `{generic}`) | any |"
    )
    for env_id, kw in registered_configs().items():
        if env_id == "AutoSculpt-v0":
            continue
        title = zoo.ZOO[kw["model"]].title
        rows.append(
            f"| `{env_id}` | {title} (`{kw['model']}`) | {kw['dataset']} | `{kw['catalog']}` | "
            f"`{kw['reward']}` | `{kw['evaluation']}` | {kw['target_flops_reduction']} |"
        )
    return "\n".join(rows)


def observation_block() -> str:
    from .features import describe_layout_markdown

    return describe_layout_markdown()


def rewards_block() -> str:
    from .rewards import reward_table

    return reward_table(markdown=True)


def catalogs_block() -> str:
    from .patterns import CATALOGS

    rows = ["| catalog | actions | layer kinds | engines | what |", "|---|---|---|---|---|"]
    for name, cat in CATALOGS.items():
        actions = cat.action_names
        shown = actions if len(actions) <= 4 else [actions[0], "…", actions[-1]]
        rows.append(
            f"| `{name}` | {' '.join(f'`{a}`' if a != '…' else a for a in shown)} "
            f"({len(actions)}) | {', '.join(cat.layer_kinds)} | {', '.join(cat.engines)} | "
            f"{cat.description} |"
        )
    return "\n".join(rows)


def zoo_block() -> str:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from . import data as data_mod
    from . import zoo

    rows = [
        "| zoo model | env id | architecture | params | MFLOPs / image | test accuracy | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in zoo.ZOO.values():
        entry = zoo.ENTRIES[(model.name, zoo.ENV_DATASET)]
        net = entry.build().eval()
        info = data_mod.info(entry.dataset)
        x = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x)
        found = zoo.find(model.name, entry.dataset)
        acc = f"**{100 * found[1]['test_accuracy']:.2f} %**" if found else "not trained"
        config = ", ".join(f"{k}={v}" for k, v in entry.config.items())
        params = sum(p.numel() for p in net.parameters())
        command = (
            f"`autosculpt zoo train --model {model.name} --dataset {entry.dataset} "
            "--out autosculpt_env/zoo_weights`"
        )
        rows.append(
            f"| `{model.name}` | `{model.env_id}` | {model.title} ({config}) | "
            f"{params / 1e3:.0f}k | {counter.get_total_flops() / 1e6:.1f} | {acc} | {command} |"
        )
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "envs": envs_block,
    "observation": observation_block,
    "rewards": rewards_block,
    "catalogs": catalogs_block,
    "zoo": zoo_block,
}
"""README block name -> body generator."""


def stale_blocks(path: Path | str = README) -> list[str]:
    """Blocks of :data:`BLOCKS` whose body in ``path`` differs from what they generate, or
    that ``path`` lacks."""
    import re

    text = Path(path).read_text()
    stale = []
    for name, body in BLOCKS.items():
        m = re.search(rf"<!-- {name}:start\b[^\n]*-->\n(.*?)\n<!-- {name}:end -->", text, re.S)
        if m is None or m.group(1) != body().strip():
            stale.append(name)
    return stale


def write(path: Path | str = README) -> list[str]:
    """Rewrite every block of :data:`BLOCKS` in ``path``; returns the names that changed."""
    return [name for name, body in BLOCKS.items() if update_block(path, name, body())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n")[0])
    parser.add_argument("--readme", default=str(README), help="the markdown file")
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_blocks(args.readme)
        if stale:
            print(f"{args.readme}: out of date: {', '.join(stale)}; run {GENERATOR}")
            return 1
        print(f"{args.readme}: generated blocks up to date")
        return 0
    changed = write(args.readme)
    print(f"{args.readme}: rewrote {', '.join(changed) if changed else 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
