"""Tile sweep: the candidates of the eleven workloads, timed on this GPU, to check the cost model and to pick.

The candidates of a workload are the hand-fused µGraph of examples/fused.py at every tiling its knobs allow
(COLS, CHUNK and split-K SPLITS for the GEMV-like forms; ROWS, ATTENTION_CHUNK, MIN_ITERS and WAVES of KV
splits for attention), and with --search, the top candidates of the search (benchmarks/search_bench.py's
results file, searched for this device). Each is a different µGraph of the same program, so the sweep checks
the cost model on them: per workload and over all, the Spearman rank correlation between predicted and
measured time, and whether the measured-best candidate is in the model's top 5. It also records the pipeline's
pick per workload, the fastest measured of the model's top 5, which benchmarks/peers.py --picks times against
torch, and the registers and spills of each compiled kernel. Each candidate is checked against the float64
reference before it is timed; candidates the model finds infeasible (a block that does not fit) are not
compiled.

    python benchmarks/tile_sweep.py --out results [--only gated_mlp,gqa_bs1] [--search results/search_bench.json ...]

Writes OUT/sweep.md and OUT/sweep.json (device, date, versions, every number).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

from peers import load_fused, run_meta  # benchmarks/peers.py: a script's own folder is on sys.path

import superopt
from superopt.kernels import compile
from superopt.kernels.cost import floor, predict
from superopt.kernels.device import DEVICES, detect
from superopt.kernels.timing import bench, check, input_scale, random_device_inputs, reference_outputs
from superopt.pipeline import TOP_K
from superopt.serialize import from_json, to_json

ROOT = Path(__file__).resolve().parent.parent
GEMV = {"COLS": (64, 128, 256), "CHUNK": (32, 64, 128, 256), "SPLITS": (1, 4, 8, 16)}
ATTENTION = {"ROWS": (64, 128), "ATTENTION_CHUNK": (64, 128), "MIN_ITERS": (1, 4), "WAVES": (1, 2)}
KNOBS = {
    "rmsnorm_linear_bs1": GEMV,
    "rmsnorm_linear_bs8": GEMV,
    "gated_mlp": GEMV,
    "lora": {"COLS": (16, 32, 64, 128), "CHUNK": (64, 128, 256)},
    "gqa_bs1": ATTENTION,
    "gqa_bs8": ATTENTION,
    "qknorm_gqa_bs1": ATTENTION,
    "qknorm_gqa_bs8": ATTENTION,
    "mqa_bs1": ATTENTION,
    "ntrans_bs1": {},
    "ntrans_bs8": {},
}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def resources(fn) -> list[dict]:
    """Registers per thread, spilled bytes and shared memory of each kernel as Triton compiled it at its first
    launch (specialized on the arguments, so pipelined as it runs); empty where this Triton hides them."""
    found = []
    try:
        for kernel in fn.kernels:
            jit = getattr(kernel.module(), kernel.code.name)
            for caches in jit.device_caches.values():
                for c in caches[0].values():
                    found.append({"regs": c.n_regs, "spills": c.n_spills, "smem": c.metadata.shared})
    except (AttributeError, IndexError, TypeError):
        return []
    return found


def variants(name: str, fused):
    """(source, knobs, graph) for every tiling of the workload's fused form; the knobs are left as they were."""
    knobs = KNOBS[name]
    defaults = {k: getattr(fused, k) for k in knobs}
    try:
        for values in itertools.product(*knobs.values()):
            setting = dict(zip(knobs, values))
            for k, v in setting.items():
                setattr(fused, k, v)
            yield "fused", setting, fused.build(name)
    finally:
        for k, v in defaults.items():
            setattr(fused, k, v)


def time_candidates(name: str, candidates, device, reps: int) -> list[dict]:
    spec = superopt.load(ROOT / "examples" / f"{name}.yaml")
    inputs = random_device_inputs(spec, seed=0, scale=input_scale(spec))
    args = [inputs[n] for n in spec.inputs]
    refs, own = reference_outputs(spec, args), reference_outputs(spec, args, "native")
    floor_us = floor(spec, device).us
    rows, seen = [], set()
    for source, knobs, graph in candidates:
        key = superopt.graph_hash(graph)
        if key in seen:  # knobs a dim clamps give the same µGraph
            continue
        seen.add(key)
        row = {"workload": name, "source": source, "knobs": knobs, "hash": key, "floor_us": floor_us}
        row["mugraph"] = to_json(graph)  # kept for the picks only (see main)
        row["predicted_us"] = predict(graph, device).us
        if not math.isfinite(row["predicted_us"]):
            rows.append(row | {"status": "infeasible"})
            continue
        try:
            fn = compile(graph)
            outs = fn(*args)
            row["error_vs_tolerance"] = check(spec, outs, refs, own)
            row["measured_us"] = bench(lambda fn=fn: fn(*args), reps=reps).median_us
            row["status"] = "ok" if row["error_vs_tolerance"] <= 1 else "wrong"
            row["kernels"] = resources(fn)
        except Exception as e:  # noqa: BLE001 (a variant that fails is recorded, and the sweep goes on)
            row["status"] = f"error: {type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


def searched(paths: list[Path], name: str):
    """The search's top candidates of `name` as (source, knobs, graph), from the last of the search_bench.json
    files that has the workload (a later search of some workloads, with another preset, replaces their rows)."""
    rows = [row for path in paths for row in json.loads(path.read_text())["rows"] if row["workload"] == name]
    for rank, c in enumerate(rows[-1].get("top", []) if rows else []):
        yield "search", {"rank": rank}, from_json(c["mugraph"])


def summary(rows: list[dict]) -> tuple[str, dict]:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        "| workload | timed (search) | floor | best measured | it is | its predicted | model top-5 has best "
        "| pick (best of top 5) | spearman |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    stats = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in ok if r["workload"] == name]
        if not mine:
            lines.append(f"| {name} | 0 ok | | | | | | | |")
            continue
        best = min(mine, key=lambda r: r["measured_us"])
        top = sorted(mine, key=lambda r: r["predicted_us"])[:TOP_K]  # as the pipeline
        pick = min(top, key=lambda r: r["measured_us"])
        rho = spearman([r["predicted_us"] for r in mine], [r["measured_us"] for r in mine]) if len(mine) > 2 else 1.0
        stats[name] = {"best_in_top5": best in top, "spearman": rho, "best_us": best["measured_us"], "pick": pick}
        what = " ".join(f"{k}={v}" for k, v in best["knobs"].items())
        searched_n = sum(r["source"] == "search" for r in mine)
        lines.append(
            f"| {name} | {len(mine)} ({searched_n}) | {best['floor_us']:.1f} | {best['measured_us']:.1f} | "
            f"{best['source']} {what} | {best['predicted_us']:.1f} | {'yes' if best in top else 'no'} | "
            f"{pick['measured_us']:.1f} | {rho:.2f} |"
        )
    rho = spearman([r["predicted_us"] for r in ok], [r["measured_us"] for r in ok]) if len(ok) > 2 else 0
    search_ok = [r for r in ok if r["source"] == "search"]
    rho_search = (
        spearman([r["predicted_us"] for r in search_ok], [r["measured_us"] for r in search_ok])
        if len(search_ok) > 2
        else 0
    )
    every = sum(s["best_in_top5"] for s in stats.values())
    lines.append(
        f"\nAll {len(ok)} ok candidates: Spearman(predicted, measured) = {rho:.2f}; the {len(search_ok)} search "
        f"candidates alone: {rho_search:.2f}. Measured-best in the model's top 5: {every} of {len(stats)} workloads."
    )
    failed = [r for r in rows if r["status"] not in ("ok", "infeasible")]
    lines += [f"- {r['workload']} {r['source']} {r['knobs']}: {r['status']}" for r in failed]
    return "\n".join(lines), stats | {"all": {"spearman": rho, "spearman_search": rho_search, "candidates": len(ok)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument(
        "--search", type=Path, nargs="*", default=[], help="search_bench.json files whose top candidates to time too"
    )
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    started = time.time()
    device = detect() or DEVICES["h100"]
    fused = load_fused()
    rows = []
    for name in [n for n in args.only.split(",") if n] or list(KNOBS):
        candidates = itertools.chain(variants(name, fused), searched(args.search, name))
        rows += time_candidates(name, candidates, device, args.reps)
        print(f"{name}: done at {time.time() - started:.0f} s", flush=True)
    meta = run_meta(device, started)
    text, stats = summary(rows)
    picks = {s["pick"]["hash"] for s in stats.values() if "pick" in s}
    for row in rows:
        if row["hash"] not in picks:
            del row["mugraph"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Candidates timed on {meta['device']}\n\n{meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"predicted by the cost model for {meta['spec']}. Microseconds, CUDA-graph replay, L2 flushed, median.\n\n"
    )
    (out / "sweep.md").write_text(header + text + "\n")
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "stats": stats, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
