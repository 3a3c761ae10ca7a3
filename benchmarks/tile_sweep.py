"""Tile sweep: the hand-fused µGraphs of examples/fused.py at every tiling its knobs allow, timed on this GPU.

Each variant is a different µGraph of the same program (grid, forloop range, tiles), so the sweep is a set of
candidates on which to check the cost model: it prints, per workload, each variant's predicted and measured
time, and the Spearman rank correlation between them over all variants, and whether the measured-best variant
is in the model's top 5. Each variant is checked against the float64 reference before it is timed.

    python benchmarks/tile_sweep.py --out results/sweep [--only gated_mlp,gqa_bs1]

Writes OUT/sweep.md and OUT/sweep.json (device, date, versions, every number).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from peers import load_fused, run_meta  # benchmarks/peers.py: a script's own folder is on sys.path

import superopt
from superopt.kernels import compile
from superopt.kernels.cost import floor, predict
from superopt.kernels.device import DEVICES, detect
from superopt.kernels.timing import bench, check, input_scale, random_device_inputs, reference_outputs

ROOT = Path(__file__).resolve().parent.parent
GEMV = {"COLS": (16, 32, 64, 128), "CHUNK": (64, 128, 256)}
ATTENTION = {"ROWS": (16, 64, 128), "ATTENTION_CHUNK": (32, 64, 128), "MIN_ITERS": (1, 4), "COMBINE_ROWS": (16,)}
KNOBS = {
    "rmsnorm_linear_bs1": GEMV,
    "rmsnorm_linear_bs8": GEMV,
    "gated_mlp": GEMV,
    "lora": GEMV,
    "gqa_bs1": ATTENTION,
    "gqa_bs8": ATTENTION,
    "qknorm_gqa_bs1": ATTENTION,
    "mqa_bs1": ATTENTION,
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


def sweep(name: str, fused, device, reps: int) -> list[dict]:
    spec = superopt.load(ROOT / "examples" / f"{name}.yaml")
    inputs = random_device_inputs(spec, seed=0, scale=input_scale(spec))
    args = [inputs[n] for n in spec.inputs]
    refs = reference_outputs(spec, args)
    knobs = KNOBS[name]
    defaults = {k: getattr(fused, k) for k in knobs}
    rows, seen = [], set()
    for values in itertools.product(*knobs.values()):
        setting = dict(zip(knobs, values))
        for k, v in setting.items():
            setattr(fused, k, v)
        graph = fused.build(name)
        key = superopt.graph_hash(graph)
        if key in seen:  # knobs a dim clamps give the same µGraph
            continue
        seen.add(key)
        row = {"workload": name, "knobs": setting, "predicted_us": predict(graph, device).us}
        try:
            fn = compile(graph)
            outs = fn(*args)
            row["error_vs_tolerance"] = check(spec, outs if isinstance(outs, tuple) else (outs,), refs)
            row["measured_us"] = bench(lambda fn=fn: fn(*args), reps=reps).median_us
            row["status"] = "ok" if row["error_vs_tolerance"] <= 1 else "wrong"
        except Exception as e:  # noqa: BLE001 (a variant that fails is recorded, and the sweep goes on)
            row["status"] = f"error: {type(e).__name__}: {e}"[:300]
        rows.append(row)
    for k, v in defaults.items():
        setattr(fused, k, v)
    floor_us = floor(spec, device).us
    for row in rows:
        row["floor_us"] = floor_us
    return rows


def summary(rows: list[dict]) -> tuple[str, dict]:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        "| workload | variants | floor | best measured | its knobs | its predicted | model top-5 has best | spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stats = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in ok if r["workload"] == name]
        if not mine:
            lines.append(f"| {name} | 0 ok | | | | | | |")
            continue
        best = min(mine, key=lambda r: r["measured_us"])
        top5 = sorted(mine, key=lambda r: r["predicted_us"])[:5]
        rho = spearman([r["predicted_us"] for r in mine], [r["measured_us"] for r in mine]) if len(mine) > 2 else 0
        stats[name] = {"best_in_top5": best in top5, "spearman": rho, "best_us": best["measured_us"]}
        knobs = " ".join(f"{k}={v}" for k, v in best["knobs"].items())
        lines.append(
            f"| {name} | {len(mine)} | {best['floor_us']:.1f} | {best['measured_us']:.1f} | {knobs} | "
            f"{best['predicted_us']:.1f} | {'yes' if best in top5 else 'no'} | {rho:.2f} |"
        )
    rho = spearman([r["predicted_us"] for r in ok], [r["measured_us"] for r in ok]) if len(ok) > 2 else 0
    lines.append(f"\nAll {len(ok)} ok variants: Spearman(predicted, measured) = {rho:.2f}.")
    return "\n".join(lines), stats | {"all": {"spearman": rho, "variants": len(ok)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    started = time.time()
    device = detect() or DEVICES["h100"]
    fused = load_fused()
    rows = []
    for name in [n for n in args.only.split(",") if n] or list(KNOBS):
        rows += sweep(name, fused, device, args.reps)
        print(f"{name}: done at {time.time() - started:.0f} s", flush=True)
    meta = run_meta(device, started)
    text, stats = summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Tile sweep on {meta['device']}\n\n{meta['date']}, torch {meta['torch']}, triton {meta['triton']}.\n\n"
    (out / "sweep.md").write_text(header + text + "\n")
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "stats": stats, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
