"""The ``autosculpt`` command.

Subcommands (each has ``--help``)::

    autosculpt info                       env ids, zoo models, catalogs, rewards
    autosculpt zoo list                   zoo entries with their manifests
    autosculpt zoo train --model M --dataset D [--out DIR] [--epochs N]
    autosculpt evaluate RECORD            replay an episode record and print its metrics
    autosculpt finetune RECORD --out DIR  fine-tune a record's policy, masks held; save it
    autosculpt validate ROWS...           replay leaderboard rows (exit code 1 on a mismatch)
    autosculpt leaderboard [--track fast|full] [...]   run / resume / render the leaderboard
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads 0`` would fail deep inside torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a tolerance in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _threads_option(parser: argparse.ArgumentParser, default: int | None = 1) -> None:
    parser.add_argument("--threads", type=positive_int, default=default, help="torch CPU threads")


def _tolerance_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tolerance", type=_fraction, default=1e-3, help="accuracy tolerance (fraction)"
    )


def _record_to_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that reads a record and writes a folder."""
    parser.add_argument("record", help="record JSON (best.json) or leaderboard row")
    parser.add_argument("--out", required=True, help="output folder")


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


# ------------------------------------------------------------------------------- info
def info_dict() -> dict:
    """What ``autosculpt info`` prints: env ids with kwargs, zoo, catalogs, rewards."""
    import inspect

    from . import REGISTERED_CONFIGS, zoo
    from .envs.autosculpt import AutoSculptEnv
    from .patterns import CATALOGS
    from .rewards import REWARDS

    defaults = {
        k: p.default
        for k, p in inspect.signature(AutoSculptEnv.__init__).parameters.items()
        if k not in ("self", "render_mode")
    }
    envs = {
        env_id: {**defaults, **zoo.env_defaults(kw.get("model")), **kw}
        for env_id, kw in REGISTERED_CONFIGS.items()
    }
    models = [
        {
            "model": r["model"],
            "dataset": r["dataset"],
            "config": r["config"],
            "test_accuracy": r["manifest"]["test_accuracy"] if r["manifest"] else None,
            "weights": r["path"],
        }
        for r in zoo.available()
    ]
    catalogs = {
        name: {
            "description": cat.description,
            "actions": cat.action_names,
            "layer_kinds": cat.layer_kinds,
            "engines": cat.engines,
        }
        for name, cat in CATALOGS.items()
    }
    rewards = {name: f"{r.formula}; range {r.range}" for name, r in REWARDS.items()}
    return {"envs": envs, "zoo": models, "catalogs": catalogs, "rewards": rewards}


def _cmd_info(args: argparse.Namespace) -> int:
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print("Environment ids (gym.make(ID, **overrides)):")
    for env_id, kw in d["envs"].items():
        print(f"  {env_id}")
        print("    " + ", ".join(f"{k}={v!r}" for k, v in kw.items()))
    print("\nZoo models:")
    for m in d["zoo"]:
        acc = (
            f"{100 * m['test_accuracy']:.2f}%" if m["test_accuracy"] is not None else "not trained"
        )
        print(f"  {m['model']:<12} {m['dataset']:<14} {acc:>12}  {m['config']}")
    print("\nPattern catalogs (action index = position):")
    for name, c in d["catalogs"].items():
        print(f"  {name}: {c['description']}")
        print(f"    actions: {' '.join(c['actions'])}")
        print(f"    layer kinds: {' '.join(c['layer_kinds'])}; engines: {', '.join(c['engines'])}")
    print("\nRewards (reward=...):")
    for name, formula in d["rewards"].items():
        print(f"  {name:<10} {formula}")
    return 0


# --------------------------------------------------------------------------- evaluate
def _load_record(path: str):
    """An EpisodeRecord from a record file, a leaderboard row, or a fine-tuned folder."""
    from .records import load_record

    return load_record(path)  # every field checked; errors name the file


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .records import replay

    torch.set_num_threads(args.threads)
    record = _load_record(args.record)
    try:
        info = replay(record, accuracy_tolerance=args.tolerance)
        ok, why = True, ""
    except ValueError as e:
        ok, why = False, str(e)
        from .records import make_env

        env = make_env(record, check=False)  # show what the actions give, side by side
        info = env.unwrapped.evaluate_policy(record.actions)
        env.close()
    from .records import METRICS as keys

    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "error": why,
                    "recorded": record.metrics,
                    "replayed": {k: info.get(k) for k in keys},
                },
                indent=2,
            )
        )
    else:
        print(f"{record.env_id} {record.env_kwargs}")
        print(f"policy: {' '.join(record.actions)}")
        print(f"{'metric':<18} {'recorded':>14} {'replayed':>14}")
        for k in keys:
            rec, rep = (
                "-" if v is None else f"{v:.6g}" for v in (record.metrics.get(k), info.get(k))
            )
            print(f"{k:<18} {rec:>14} {rep:>14}")
        print("replay: OK" if ok else f"replay: MISMATCH ({why})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- finetune
def _cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import data
    from . import finetune as ft
    from .records import METRICS, compare_metrics, make_env, reward_function, stored_params
    from .training import accuracy

    torch.set_num_threads(args.threads)
    for name in ("epochs", "samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    record = _load_record(args.record)
    recipe = ft.default_recipe(record.env_kwargs.get("dataset", "fashion-mnist"))
    changes = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    recipe = replace(recipe, **changes)
    env = make_env(record)  # refuses metrics that do not follow from the actions
    try:
        base = env.unwrapped
        if args.samples is not None:  # before any work, not cut to the split's size
            kw = base.env_kwargs
            data.check_samples("--samples", args.samples, kw["dataset"], "train", kw["data_dir"])
        actions = base.problem.actions_from_names(record.actions)
        # the output record shows measured numbers, never the input's: measure them all
        fresh = base.evaluate_policy(actions)
        wrong = compare_metrics(
            record.metrics,
            fresh,
            reward_of=reward_function(base)(fresh),
            stored=stored_params(base, actions),
        )
        if wrong:
            raise ValueError(
                f"{args.record}: the record's metrics disagree with its actions: "
                + "; ".join(wrong)
            )
        record.metrics = {k: fresh[k] for k in METRICS}
        # a held-out check on the reward split (never the test split): the env's own
        # measurement of the pruned network, then the fine-tuned one on the same images
        before = float(base.evaluator(actions))
        model, masks = ft.finetune(
            env,
            actions,
            recipe,
            seed=args.seed,
            progress=not args.no_progress,
            train_samples=args.samples,
        )
        after = accuracy(model, _reward_split(base))
    finally:
        env.close()
    record.extra = {
        **record.extra,
        "finetune": {
            "recipe": recipe.to_dict(),
            "train_samples": args.samples,
            "seed": args.seed,
            "reward_accuracy": after,
        },
    }
    out = ft.save(args.out, model, masks, record)
    print(
        f"reward-split accuracy: {100 * before:.2f}% before fine-tuning, {100 * after:.2f}% after"
    )
    print(f"wrote {out}/{ft.WEIGHTS_FILE}, {ft.MASKS_FILE}, {ft.RECORD_FILE}")
    return 0


def _reward_split(base):
    from . import data

    kw = base.env_kwargs
    ds = data.load(kw["dataset"], "reward", kw.get("data_dir"))
    n = kw["reward_samples"]  # the count the env used (it refuses one the split cannot hold)
    return data.ImageDataset(ds.images[:n], ds.labels[:n], ds.info, "reward")


# ----------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safetensors.torch import save_file

    from . import data
    from . import materialize as mat
    from .latency import median_latency
    from .records import make_env

    torch.set_num_threads(args.threads)
    record = _load_record(args.record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env(record)
    try:
        base = env.unwrapped
        actions = base.problem.actions_from_names(record.actions)
        kw = base.env_kwargs
        images = data.load(kw["dataset"], "reward", kw.get("data_dir")).images[:256]
        m = mat.materialize_policy(env, actions, check_inputs=images)
        dense = base.problem.model
        masked = base.pruned_model(actions)
        metrics = base.evaluate_policy(actions)
    finally:
        env.close()
    state = {k: v.detach().contiguous() for k, v in m.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"env_id": record.env_id})
    example = images[:2]
    onnx_diffs = {}
    for name, net in (("dense", dense), ("model", m.model)):
        path = mat.export_onnx(net, out / f"{name}.onnx", example)
        onnx_diffs[name] = mat.check_onnx(path, net, images)
    x = torch.randn(args.batch_size, *images.shape[1:])
    times = {
        name: median_latency(net, x, args.repeats)
        for name, net in (("dense", dense), ("masked", masked), ("materialised", m.model))
    }
    ideal = 1.0 / max(1e-12, 1.0 - metrics["flops_reduction"])
    report = {
        "record": str(args.record),
        "env_id": record.env_id,
        "policy": record.actions,
        "flops_reduction": metrics["flops_reduction"],
        "params_env": metrics["params"],
        "params_materialised": m.params,
        "dead_params": m.dead_params,
        "max_abs_diff_float32": m.max_abs_diff,
        "max_abs_diff_float64": m.max_abs_diff_float64,
        "float32_noise": m.float32_noise,
        "onnx_max_abs_diff": onnx_diffs,
        "layers": m.layers,
        "runtime_permutations": m.runtime_permutations,
        "latency_s": times,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "speedup": times["dense"] / times["materialised"],
        "flops_ideal_speedup": ideal,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    record.save(out / "record.json")
    print(m.summary())
    print(
        f"outputs: max |materialised - masked| {m.max_abs_diff:.2e} (float32; the masked "
        f"network's own float32 error {m.float32_noise:.2e}), {m.max_abs_diff_float64:.1e} in "
        f"float64; onnxruntime vs torch {max(onnx_diffs.values()):.2e}"
    )
    print(
        f"params: {m.params} (env reports {metrics['params']:.0f}; {m.dead_params} more that "
        "the masked network stores are held at zero or only ever see a removed channel: cut "
        "or stored as zeros)"
    )
    print(
        f"torch latency at batch {args.batch_size}, {args.threads} thread(s): dense "
        f"{1e3 * times['dense']:.2f} ms, masked {1e3 * times['masked']:.2f} ms, materialised "
        f"{1e3 * times['materialised']:.2f} ms"
    )
    print(
        f"measured speedup {report['speedup']:.2f}x vs dense; FLOPs-ideal {ideal:.2f}x "
        f"(ratio {report['speedup'] / ideal:.2f})"
    )
    print(f"wrote {out}/model.safetensors, model.onnx, dense.onnx, report.json, record.json")
    return 0


# --------------------------------------------------------------------------- validate
def _cmd_validate(args: argparse.Namespace) -> int:
    from . import leaderboard as lb

    try:
        rows = lb.load_rows(args.rows)
    except (ValueError, FileNotFoundError) as e:
        print(f"autosculpt validate: {e}", file=sys.stderr)
        return 1
    if not rows:
        print("autosculpt validate: no rows found", file=sys.stderr)
        return 1
    made_with = {r["protocol"].get("threads") for r in rows if isinstance(r.get("protocol"), dict)}
    if args.threads is not None and made_with - {args.threads}:
        print(
            f"autosculpt validate: warning: replaying with --threads {args.threads}, but rows "
            f"were made with {sorted(made_with, key=str)} thread(s); a correct row can fail a "
            "replay with other threads (docs/CHECKS.md). Leave --threads out to use each "
            "row's own.",
            file=sys.stderr,
        )

    def report(r: dict) -> None:
        print(
            f"{'OK  ' if r['ok'] else 'FAIL'} {r['row_id']}"
            + ("" if r["ok"] else ": " + "; ".join(r["errors"])),
            flush=True,
        )

    results = lb.validate(
        rows,
        accuracy_tolerance=args.tolerance,
        full=args.full,
        threads=args.threads,
        on_row=report,
    )
    bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - bad}/{len(results)} rows validate")
    return 1 if bad else 0


# ------------------------------------------------------------------------ leaderboard
def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from . import leaderboard as lb

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    return lb.command(**options)


def _add_leaderboard_parser(sub) -> None:
    from .leaderboard import add_arguments

    p = sub.add_parser(
        "leaderboard",
        help="run, resume and render a leaderboard track (same as benchmarks/leaderboard.py)",
        description="Run every missing (task, agent, seed) row of a track, then write the "
        "markdown table and plots from the rows. Re-running the same command resumes. "
        "See docs/SUBMITTING.md.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_leaderboard)


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
    tr.add_argument("--model", required=True, help="a zoo model (autosculpt zoo list)")
    tr.add_argument("--dataset", required=True, help="fashion-mnist or digits")
    tr.add_argument("--out", default=None, help="output folder (default $AUTOSCULPT_CACHE/zoo)")
    tr.add_argument("--data-dir", default=None, help="dataset folder")
    tr.add_argument(
        "--epochs", type=positive_int, default=None, help="override the recipe's epochs"
    )
    tr.add_argument("--seed", type=int, default=None, help="override the entry's seed")
    _threads_option(tr, default=None)
    tr.set_defaults(func=_cmd_zoo_train)

    info = sub.add_parser(
        "info", help="env ids with their kwargs, zoo models, catalogs with action names, rewards"
    )
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_cmd_info)

    ev = sub.add_parser(
        "evaluate",
        help="replay an episode record and print its metrics (exit code 1 on a mismatch)",
        description="Rebuild the record's env, play its actions and compare FLOPs (exactly) and "
        "reward-split accuracy (within --tolerance) with the recorded metrics.",
    )
    ev.add_argument("record", help="record JSON (best.json), leaderboard row, or fine-tuned folder")
    _tolerance_option(ev)
    _threads_option(ev)
    ev.add_argument("--json", action="store_true", help="print as JSON")
    ev.set_defaults(func=_cmd_evaluate)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a record's pruned network with its masks held exactly, and save it",
        description="Start from the network the env scored (masks applied, removed channels "
        "zeroed, batch norms recalibrated), train it on the train split with masked "
        "gradients and masks re-applied after every step, and write model.safetensors, "
        "masks.safetensors and record.json into --out.",
    )
    _record_to_folder_arguments(ft)
    ft.add_argument(
        "--epochs", type=positive_int, default=None, help="override the recipe's epochs"
    )
    ft.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    ft.add_argument(
        "--samples", type=positive_int, default=None, help="train on a subset of this many images"
    )
    ft.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    _threads_option(ft)
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_cmd_finetune)

    va = sub.add_parser(
        "validate",
        help="replay leaderboard rows; exit code 1 on any mismatch",
        description="Check each row's fields against its episode record and protocol, replay "
        "the record (FLOPs, parameters and pruning rate exactly, reward-split accuracies within "
        "--tolerance) and measure the dense test accuracy again. --full also re-measures the "
        "test accuracies, fine-tuning every row again (slow). See docs/CHECKS.md.",
    )
    va.add_argument("rows", nargs="+", help="rows folders and/or row files")
    _tolerance_option(va)
    va.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads of the replay (default: each row's own, its protocol.threads)",
    )
    va.add_argument(
        "--full",
        action="store_true",
        help="also fine-tune every row again and check its test accuracies (slow)",
    )
    va.set_defaults(func=_cmd_validate)

    ex = sub.add_parser(
        "export",
        help="materialise a record's policy as a smaller network (safetensors + ONNX) and time it",
        description="Cut removed channels and heads, run row/column patterns as smaller dense "
        "kernels, check the outputs against the masked network, write model.safetensors, "
        "model.onnx and dense.onnx (checked with onnxruntime) and report.json into --out, and "
        "print the measured speedup against the dense network.",
    )
    _record_to_folder_arguments(ex)
    ex.add_argument("--batch-size", type=positive_int, default=256, help="batch for the timing")
    ex.add_argument("--repeats", type=positive_int, default=20, help="timed runs (median kept)")
    _threads_option(ex)
    ex.set_defaults(func=_cmd_export)

    _add_leaderboard_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (`autosculpt zoo list | head`): stop quietly, as Unix tools
        # do, and point stdout at /dev/null so the exit-time flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"autosculpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
