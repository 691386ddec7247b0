"""The reference tables of README.md and docs/SUBMITTING.md, generated from the registries
they describe.

Each table is a generated block (:mod:`autosculpt_env.readme_blocks`) whose body comes from
the one place that states its facts: env ids from :func:`autosculpt_env.registered_configs`
and :data:`autosculpt_env.zoo.ZOO`, the observation layout from
:class:`autosculpt_env.features.FeatureLayout`, rewards from
:data:`autosculpt_env.rewards.REWARDS`, catalogs from :data:`autosculpt_env.patterns.CATALOGS`,
the leaderboard's tracks (in ``docs/SUBMITTING.md``) from
:data:`autosculpt_env.leaderboard.protocol.TRACKS`.
A new zoo model, catalog or reward reaches the README by running::

    python -m autosculpt_env.docs          # rewrite the blocks of README.md and SUBMITTING.md
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
SUBMITTING = README.parent / "docs" / "SUBMITTING.md"


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
        model = zoo.ZOO[kw["model"]]
        own = ", ".join(f"`{k}={v}`" for k, v in model.env_defaults.items())
        rows.append(
            f"| `{env_id}` | {model.title} (`{kw['model']}`) | {kw['dataset']} | "
            f"`{kw['catalog']}` | `{kw['reward']}` | `{kw['evaluation']}`"
            f"{f' ({own})' if own else ''} | {kw['target_flops_reduction']} |"
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


def tracks_block() -> str:
    from .leaderboard.protocol import DEFAULT_EVALUATION, FAST_SEARCH_EVALUATION, TRACKS, _ranges

    sees = {
        FAST_SEARCH_EVALUATION: "the shipped surrogate",
        DEFAULT_EVALUATION: "the env's default reward",
    }
    rows = [
        "| track | the search sees | reward evaluations | seeds | score |",
        "|---|---|---:|---:|---|",
    ]
    for name, p in TRACKS.items():
        score = (
            "test accuracy after the fixed fine-tuning"
            if p.finetunes
            else f"the best policy's `{p.score}` reward on the reward split"
        )
        seen = sees.get(p.evaluation, "the reward")
        rows.append(
            f"| `{name}` | {seen} (`evaluation={p.evaluation}`) | "
            f"{p.max_reward_evaluations:,} | {_ranges(p.seeds).replace('-', '–')} | {score} |"
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

SUBMITTING_BLOCKS: dict[str, Callable[[], str]] = {"tracks": tracks_block}
"""docs/SUBMITTING.md block name -> body generator."""


def _blocks_of(path: Path | str) -> dict[str, Callable[[], str]]:
    return SUBMITTING_BLOCKS if Path(path).resolve() == SUBMITTING.resolve() else BLOCKS


def stale_blocks(path: Path | str = README) -> list[str]:
    """Blocks of ``path`` (:data:`SUBMITTING_BLOCKS` for docs/SUBMITTING.md, else
    :data:`BLOCKS`) whose body differs from what they generate, or that ``path`` lacks."""
    import re

    text = Path(path).read_text()
    stale = []
    for name, body in _blocks_of(path).items():
        m = re.search(rf"<!-- {name}:start\b[^\n]*-->\n(.*?)\n<!-- {name}:end -->", text, re.S)
        if m is None or m.group(1) != body().strip():
            stale.append(name)
    return stale


def write(path: Path | str = README) -> list[str]:
    """Rewrite every block of ``path`` (as :func:`stale_blocks` picks them); returns the
    names that changed."""
    return [name for name, body in _blocks_of(path).items() if update_block(path, name, body())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--readme", default=None, help="one markdown file (default: README.md and SUBMITTING.md)"
    )
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    paths = [args.readme] if args.readme else [README, SUBMITTING]
    code = 0
    for path in paths:
        if args.check:
            stale = stale_blocks(path)
            if stale:
                print(f"{path}: out of date: {', '.join(stale)}; run {GENERATOR}")
                code = 1
            else:
                print(f"{path}: generated blocks up to date")
            continue
        changed = write(path)
        print(f"{path}: rewrote {', '.join(changed) if changed else 'nothing'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
