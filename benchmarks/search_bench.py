"""The search benchmark: each of the eleven example workloads searched within its budget, against the hand-fused
µGraphs of examples/fused.py.

For each examples/<name>.yaml at full size it runs `superopt.search_space.search` (the spec's preset, a 120 s
wall budget, device h100, seed 0, a process pool over the CPU's cores) and checks that the best candidate is at
least as good as the hand-fused form by the cost model (kernels/cost.py), and is of the form the issue names:
one kernel for lora and ntrans; one kernel or split-K for rmsnorm_linear and gated_mlp, a split-K candidate
among those found, and the best at least as good as fused.py's split-K forms (2 to 16 slices); a concatenation
for lora (a verified candidate multiplying (x || x a) by (w || b)); split-KV for the attention workloads (split-K
and split-KV: a kernel whose grid and loop split the same dim of an input, and a kernel combining its partials).

    python benchmarks/search_bench.py                        # all eleven, about 20 minutes on 2 cores
    python benchmarks/search_bench.py --only lora,gqa_bs1 --budget 60 --out /tmp/s

Writes OUT/search_bench.md and OUT/search_bench.json (with each workload's top 5 candidates, which
benchmarks/tile_sweep.py --search times on a GPU) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
from pathlib import Path

import superopt
from superopt.kernels.cost import predict
from superopt.kernels.device import get_device
from superopt.pipeline import TOP_K
from superopt.search_space import search

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ONE_KERNEL = ("lora", "ntrans")
GEMV = ("rmsnorm_linear", "gated_mlp")
ATTENTION = ("gqa", "qknorm_gqa", "mqa")


def _fused():
    spec = importlib.util.spec_from_file_location("examples_fused", EXAMPLES / "fused.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_reduction(graph: superopt.KernelGraph) -> bool:
    """A kernel whose grid and loop split the same dim of an input (partial results), and a kernel after it."""
    blocks = [op.block for op in graph.ops if op.block is not None]
    return len(blocks) >= 2 and any(bi.fmap is not None and bi.fmap in bi.imap for b in blocks for bi in b.inputs)


def hand_split_k_us(fused, name: str, spec) -> float:
    """The fastest of examples/fused.py's split-K forms of `name` (its tiles; 2, 4, 8 or 16 slices) by the cost
    model."""
    default, times = fused.SPLITS, []
    try:
        for splits in (2, 4, 8, 16):
            fused.SPLITS = splits
            times.append(predict(fused.build(name), spec).us)
    finally:
        fused.SPLITS = default
    return min(times)


def concat_form(graph: superopt.KernelGraph) -> bool:
    return any(bop.op == "concat" for op in graph.ops if op.block is not None for bop in op.block.ops)


def run(name: str, budget: float, device: str, fused) -> dict:
    graph = superopt.load(EXAMPLES / f"{name}.yaml")
    result = search(graph, budget_s=budget, device=device, progress="none")
    best, stats = result.best, result.stats
    spec = get_device(device)
    hand = fused.build(name) if name in fused.FUSED else None
    hand_us = predict(hand, spec).us if hand is not None else None
    family = name.rsplit("_bs", 1)[0]
    checks = {"as good as hand-fused": hand_us is None or best.predicted_us <= hand_us * (1 + 1e-9)}
    if family in ONE_KERNEL:
        checks["one kernel"] = best.kernels == 1
    if family in GEMV:
        checks["one kernel or split-K"] = best.kernels == 1 or split_reduction(best.graph)
        checks["split-K found"] = any(split_reduction(c.graph) for c in result.candidates)
        checks["as good as hand split-K"] = best.predicted_us <= hand_split_k_us(fused, name, spec) * (1 + 1e-9)
    if family == "lora":
        checks["concat form found"] = any(concat_form(c.graph) for c in result.candidates)
    if family in ATTENTION:
        checks["split-KV"] = split_reduction(best.graph)
    return {
        "workload": name,
        "preset": stats.preset,
        "states": stats.states,
        "pruned_abstract": stats.pruned_abstract,
        "pruned_limits": stats.pruned_limits,
        "plans": stats.plans,
        "candidates": stats.candidates,
        "depth": stats.depth,
        "exhausted": stats.exhausted,
        "seconds": stats.seconds,
        "best_kernels": best.kernels,
        "best_us": round(best.predicted_us, 2),
        "best_verify": best.verify.method,
        "hand_kernels": len(hand.ops) if hand is not None else None,
        "hand_us": round(hand_us, 2) if hand_us is not None else None,
        "program_us": round(predict(graph, spec).us, 2),
        "checks": checks,
        "ok": all(checks.values()) and stats.seconds <= budget * 1.05,
        "stats": stats.to_json(),
        "best": best.to_json(),
        "top": [c.to_json() for c in result.candidates[:TOP_K]],  # what the pipeline would time on a GPU
    }


def table(rows: list[dict]) -> str:
    head = (
        "| workload | preset | states | pruned (abstract) | pruned (limits) | plans | candidates | depth | seconds "
        "| best kernels | best us | hand-fused us (kernels) | program us | checks |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        hand = f"{r['hand_us']} ({r['hand_kernels']})" if r["hand_us"] is not None else "-"
        checks = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["checks"].items())
        depth = f"{r['depth']}{'+' if r['exhausted'] else ''}"
        lines.append(
            f"| {r['workload']} | {r['preset']} | {r['states']} | {r['pruned_abstract']} | {r['pruned_limits']} "
            f"| {r['plans']} | {r['candidates']} | {depth} | {r['seconds']:.1f} | {r['best_kernels']} "
            f"| {r['best_us']} | {hand} | {r['program_us']} | {checks} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated workload names (default: every examples/*.yaml)")
    parser.add_argument("--budget", type=float, default=120.0, help="wall seconds per search")
    parser.add_argument("--device", default="h100")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
    fused = _fused()
    rows = []
    for name in names:
        rows.append(run(name, args.budget, args.device, fused))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "budget_s": args.budget,
        "device": args.device,
        "superopt": superopt.__version__,
    }
    md = [
        "# Search benchmark",
        "",
        f"{meta['date']}; {meta['machine']}; budget {args.budget:g} s per workload; cost model device "
        f"{args.device}. Times are predicted by kernels/cost.py; `depth` is the deepest kernel count enumerated "
        "completely (+: the budget cut the next one); pruned (abstract) counts op results the abstract-expression "
        "check turned down, pruned (limits) size choices beyond the device's limits.",
        "",
        table(rows),
        "",
        f"All checks pass: {'yes' if all(r['ok'] for r in rows) else 'NO'}.",
    ]
    (args.out / "search_bench.md").write_text("\n".join(md) + "\n")
    (args.out / "search_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
