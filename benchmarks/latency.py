"""Measured latency of dense, masked and materialised networks (issue 12, part 3).

For each zoo model and a set of policies (the leaderboard's best row per task, uniform
levels), times the dense, masked and materialised networks in torch and onnxruntime at each
batch size with a fixed thread count, all in one run, and prints the measured speedup of
the materialised network and its ratio to the FLOPs-ideal speedup (dense FLOPs / policy
FLOPs). ``--breakdown`` adds a per-layer table (each prunable layer timed alone on its real
input, dense vs materialised) for the first policy of each model; ``--table`` compares the
per-(layer, action) latency table's prediction (:mod:`autosculpt_env.latency`, the env's
``latency_reduction``) with the measured end-to-end latency of each materialised network at
the largest batch size, and summarises per model how often it is within 10 %;
``--table-only`` runs that stage alone (no masked network, no ONNX).

    python benchmarks/latency.py                       # all models, a few minutes
    python benchmarks/latency.py --models resnet20 --breakdown --table
    python benchmarks/latency.py --table-only          # the table's prediction, all models
    python benchmarks/latency.py --table-only --dataset digits --models resnet20 \
        --levels 0.5 --batch-sizes 8 --repeats 2       # a seconds-long check of the pipeline

ONNX files are written with the TorchScript exporter here (``dynamo=False``: the same
operators in a fraction of the time; ``autosculpt export`` uses the default exporter).
Timings depend on the machine and on what else runs on it; compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import torch

import autosculpt_env  # noqa: F401  (registers the ids)
from autosculpt_env import data
from autosculpt_env import materialize as mat
from autosculpt_env.latency import latency_table, median_latency

TABLE_GOAL = 0.10
"""The goal for the table's prediction: within 10 % of the measured latency."""

ENV_OF = {
    "resnet20": "AutoSculpt-ResNet",
    "vgg11": "AutoSculpt-VGG",
    "mobilenetv2": "AutoSculpt-MobileNet",
    "vit": "AutoSculpt-ViT",
}
ROWS = Path(__file__).parent / "rows"


def best_rows(env_id: str, dataset: str) -> list[tuple[str, list[str]]]:
    """The best leaderboard policy (highest reward) of each task of ``env_id``."""
    best: dict[float, dict] = {}
    for f in sorted(ROWS.glob("*.json")):
        row = json.loads(f.read_text())
        if row.get("env_id") != env_id or row.get("dataset") != dataset:
            continue
        t = float(row["target"])
        if t not in best or row["reward"] > best[t]["reward"]:
            best[t] = row
    return [(f"best@{t} ({r['agent']})", list(r["policy"])) for t, r in sorted(best.items())]


def ort_latency(path: str, x: torch.Tensor, threads: int, repeats: int) -> float:
    sess = mat.onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_breakdown(dense, materialised, layers: list[str], x: torch.Tensor, repeats: int):
    """Each prunable layer timed alone on the input it sees in the network."""
    rows = []
    for net, key in ((dense, "dense"), (materialised, "mat")):
        inputs: dict[str, torch.Tensor] = {}

        def keep(name: str, store: dict = inputs):
            return lambda m, i, o: store.__setitem__(name, i[0])

        hooks = [net.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        for j, n in enumerate(layers):
            t = median_latency(net.get_submodule(n), inputs[n], repeats)
            if key == "dense":
                rows.append({"layer": n, "dense": t})
            else:
                rows[j]["mat"] = t
    return rows


def table_summary(model: str, errors: list[float]) -> str:
    """One line: how well the table's sum predicted the measured latencies of a model."""
    within = sum(abs(e) <= TABLE_GOAL for e in errors)
    worst = max(errors, key=abs)
    return (
        f"  table on {model}: median |error| {100 * statistics.median(map(abs, errors)):.1f} %, "
        f"worst {100 * worst:+.1f} %, {within}/{len(errors)} policies within "
        f"{100 * TABLE_GOAL:.0f} %"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(ENV_OF))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="per-layer times")
    ap.add_argument("--table", action="store_true", help="latency-table prediction check")
    ap.add_argument(
        "--table-only", action="store_true", help="only the latency-table prediction check"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.table = args.table or args.table_only
    torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at start; median of {args.repeats} runs"
    )
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="latency-"))
    hdr = (
        f"{'model':<12} {'policy':<26} {'ideal':>6} "
        + " ".join(f"{'torch b' + str(b):>9} {'ort b' + str(b):>9}" for b in args.batch_sizes)
        + f" {'ratio':>6}"
    )
    if not args.table_only:
        print(hdr)
    for model in args.models:
        env_id = ENV_OF[model]
        reward = data.load(args.dataset, "reward").images
        env = gym.make(env_id, dataset=args.dataset, reward_samples=min(256, len(reward)))
        base = env.unwrapped
        p = base.problem
        images = reward[:64]
        policies = best_rows(env_id, args.dataset)
        for lv in args.levels:
            a = p.catalog.action_names.index(f"level_{lv:.1f}")
            policies.append(
                (
                    f"uniform level_{lv:.1f}",
                    [a if p.valid[i, a] else 0 for i in range(p.num_layers)],
                )
            )
        table = (
            latency_table(
                p, batch_size=max(args.batch_sizes), repeats=args.repeats, threads=args.threads
            )
            if args.table
            else None
        )
        if args.table_only:
            results += table_check(model, base, table, policies, images, args.repeats)
            env.close()
            continue
        dense_onnx = mat.export_onnx(p.model, tmp / f"{model}-dense.onnx", images[:2], dynamo=False)
        dense_t = {}
        for b in args.batch_sizes:
            x = torch.randn(b, *images.shape[1:])
            dense_t[b] = (
                median_latency(p.model, x, args.repeats),
                ort_latency(dense_onnx, x, args.threads, args.repeats),
            )
        errors = []
        for k, (label, policy) in enumerate(policies):
            actions = p.policy_indices(policy)
            m = mat.materialize_policy(env, actions, check_inputs=images)
            masked = base.pruned_model(actions)
            ideal = base.dense_flops / p.policy_flops(actions)  # no reward evaluation needed
            path = mat.export_onnx(m.model, tmp / f"{model}-{k}.onnx", images[:2], dynamo=False)
            mat.check_onnx(path, m.model, images)
            row = {
                "model": model,
                "policy": label,
                "ideal": ideal,
                "runtime_perms": len(m.runtime_permutations),
            }
            cells = []
            for b in args.batch_sizes:
                x = torch.randn(b, *images.shape[1:])
                t_mask = median_latency(masked, x, args.repeats)
                t_mat = median_latency(m.model, x, args.repeats)
                o_mat = ort_latency(path, x, args.threads, args.repeats)
                row[f"b{b}"] = {
                    "torch_dense": dense_t[b][0],
                    "torch_masked": t_mask,
                    "torch_mat": t_mat,
                    "ort_dense": dense_t[b][1],
                    "ort_mat": o_mat,
                }
                cells.append(f"{dense_t[b][0] / t_mat:>8.2f}x {dense_t[b][1] / o_mat:>8.2f}x")
            big = row[f"b{max(args.batch_sizes)}"]
            row["ratio_torch"] = big["torch_dense"] / big["torch_mat"] / ideal
            row["ratio_ort"] = big["ort_dense"] / big["ort_mat"] / ideal
            line = f"{model:<12} {label:<26} {ideal:>5.2f}x " + " ".join(cells)
            line += f" {row['ratio_torch']:>5.2f}/{row['ratio_ort']:.2f}"
            if table is not None:
                pred = table.policy_latency(actions)
                row["table_error"] = pred / big["torch_mat"] - 1.0
                errors.append(row["table_error"])
                line += f"  table {100 * row['table_error']:+.0f}%"
            print(line, flush=True)
            if args.breakdown and k == 0:
                xb = torch.randn(max(args.batch_sizes), *images.shape[1:])
                br = layer_breakdown(p.model, m.model, [x.name for x in p.layers], xb, args.repeats)
                total = big["torch_dense"]
                print(f"  per-layer at batch {xb.shape[0]} (dense total {1e3 * total:.1f} ms):")
                for r in br:
                    print(
                        f"    {r['layer']:<22} dense {1e3 * r['dense']:7.2f} ms  "
                        f"materialised {1e3 * r['mat']:7.2f} ms  ({r['dense'] / r['mat']:.2f}x)  "
                        f"{m.layers.get(r['layer'], '')}"
                    )
                rest = total - sum(r["dense"] for r in br)
                print(f"    outside the prunable layers: {1e3 * rest:.2f} ms ({rest / total:.0%})")
                row["breakdown"] = br
            results.append(row)
        if errors:
            print(table_summary(model, errors), flush=True)
        env.close()
    if args.table_only:
        print(
            f"# table = the latency table's sum (fixed + per-layer entries, batch "
            f"{max(args.batch_sizes)}); measured = the materialised network end to end; "
            f"error = table / measured - 1; goal: within {100 * TABLE_GOAL:.0f} %"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    print(
        "# columns: measured speedup of the materialised network over the dense one; ratio = "
        f"speedup / FLOPs-ideal at batch {max(args.batch_sizes)} (torch/onnxruntime)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def table_check(model, base, table, policies, images, repeats: int) -> list[dict]:
    """The table's predicted latency of each policy against the measured end-to-end latency
    of its materialised network (at the table's batch size); prints a line each and a
    summary."""
    p = base.problem
    x = torch.randn(table.batch_size, *images.shape[1:])
    dense = median_latency(p.model, x, repeats)
    print(
        f"{model}: dense measured {1e3 * dense:.2f} ms, table {1e3 * table.dense_latency:.2f} ms "
        f"(batch {table.batch_size})"
    )
    rows = []
    for label, policy in policies:
        actions = p.policy_indices(policy)
        m = mat.materialize_policy(base, actions, check_inputs=images)
        measured = median_latency(m.model, x, repeats)
        predicted = table.policy_latency(actions)
        row = {
            "model": model,
            "policy": label,
            "batch_size": table.batch_size,
            "predicted": predicted,
            "measured": measured,
            "dense_measured": dense,
            "table_error": predicted / measured - 1.0,
            "runtime_perms": len(m.runtime_permutations),
        }
        print(
            f"  {label:<26} table {1e3 * predicted:8.2f} ms  measured {1e3 * measured:8.2f} ms  "
            f"error {100 * row['table_error']:+6.1f} %  speedup {dense / measured:.2f}x "
            f"(table {table.dense_latency / predicted:.2f}x)",
            flush=True,
        )
        rows.append(row)
    print(table_summary(model, [r["table_error"] for r in rows]), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
