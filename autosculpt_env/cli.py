"""The ``autosculpt`` command.

Subcommands (each has ``--help``)::

    autosculpt info                       env ids, zoo models, catalogs, rewards
    autosculpt zoo list                   zoo entries with their manifests
    autosculpt zoo train --model M --dataset D [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from . import zoo

    rows = zoo.available()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'dataset':<14} {'test acc':>8}  {'params':>8}  weights")
    for r in rows:
        man = r["manifest"]
        acc = f"{100 * man['test_accuracy']:.2f}%" if man else "-"
        params = sum(p.numel() for p in zoo.entry(r["model"], r["dataset"]).build().parameters())
        where = r["path"] or "not trained (digits train on first use)"
        print(f"{r['model']:<12} {r['dataset']:<14} {acc:>8}  {params / 1e3:>7.1f}k  {where}")
    return 0


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    from . import zoo

    torch.set_num_threads(args.threads) if args.threads else None
    cmd = f"autosculpt zoo train --model {args.model} --dataset {args.dataset}"
    if args.out:
        cmd += f" --out {args.out}"
    if args.epochs is not None:
        cmd += f" --epochs {args.epochs}"
    if args.seed is not None:
        cmd += f" --seed {args.seed}"
    man = zoo.train_entry(
        args.model,
        args.dataset,
        out_dir=args.out,
        data_dir=args.data_dir,
        epochs=args.epochs,
        seed=args.seed,
        command=cmd,
    )
    print(
        f"{man['model']}/{man['dataset']}: test accuracy {100 * man['test_accuracy']:.2f}% "
        f"after {man['epochs']} epochs ({man['train_seconds']:.0f}s) -> {args.out or zoo.cache_dir() / 'zoo'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosculpt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    zoo_p = sub.add_parser("zoo", help="list or train the pretrained model zoo")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True)
    lst = zoo_sub.add_parser(
        "list", help="zoo entries with test accuracy and where the weights are"
    )
    lst.add_argument("--json", action="store_true", help="print the manifests as JSON")
    lst.set_defaults(func=_cmd_zoo_list)
    tr = zoo_sub.add_parser("train", help="train a zoo entry on the train split")
    tr.add_argument("--model", required=True, help="resnet20, vgg11, mobilenetv2 or vit")
    tr.add_argument("--dataset", required=True, help="fashion-mnist or digits")
    tr.add_argument("--out", default=None, help="output folder (default $AUTOSCULPT_CACHE/zoo)")
    tr.add_argument("--data-dir", default=None, help="dataset folder")
    tr.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    tr.add_argument("--seed", type=int, default=None, help="override the entry's seed")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.set_defaults(func=_cmd_zoo_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"autosculpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
