"""Pipeline probe: how deep Triton's software pipeline should be for superopt's generated GEMV kernels.

Triton pipelines the loads that feed tl.dot, num_stages deep (its default 3). This times the GEMV-like forms
of examples/fused.py (one kernel, and split-K) with num_stages 3, 4 and 5, and, at 3, as generated before
the codegen summed accum_*_last tiles elementwise in the loop (LAST_STATE_PER_THREAD = 0: a sum across threads
in every iteration); each checked against the float64 reference.

    python benchmarks/pipeline_probe.py --out results
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from peers import load_fused, run_meta  # benchmarks/peers.py: a script's own folder is on sys.path

import superopt
from superopt.kernels import compile, lower
from superopt.kernels.device import DEVICES, detect
from superopt.kernels.timing import bench, check, input_scale, random_device_inputs, reference_outputs

ROOT = Path(__file__).resolve().parent.parent
GEMV = [(64, 64, 1), (64, 128, 1), (64, 256, 1), (128, 128, 1), (128, 32, 16), (64, 64, 16)]
ATTENTION = ("ROWS", "ATTENTION_CHUNK", "MIN_ITERS", "WAVES")
KNOBS = ("COLS", "CHUNK", "SPLITS")
CASES = [
    *((name, dict(zip(KNOBS, t))) for name in ("rmsnorm_linear_bs1", "rmsnorm_linear_bs8") for t in GEMV),
    *(("gated_mlp", dict(zip(KNOBS, t))) for t in GEMV[:5]),
    ("lora", {"COLS": 32, "CHUNK": 256}),
    ("gqa_bs1", dict(zip(ATTENTION, (64, 128, 1, 1)))),
    ("qknorm_gqa_bs1", dict(zip(ATTENTION, (64, 128, 1, 1)))),
    ("qknorm_gqa_bs8", dict(zip(ATTENTION, (128, 64, 1, 2)))),
    ("mqa_bs1", dict(zip(ATTENTION, (64, 64, 1, 2)))),
]
# (num_stages, accum_*_last summed after the loop, the loop annotated: tl.range(..., num_stages) pipelines
# every load in it, not only those feeding tl.dot)
VARIANTS = [(3, False, False), (3, True, False), (4, True, False), (5, True, False)]
VARIANTS += [(3, True, True), (4, True, True), (5, True, True)]


def variant(graph: superopt.KernelGraph, stages: int, after_loop: bool, annotated: bool):
    """`graph` compiled with num_stages `stages`, its kernels renamed so that each variant is its own module."""
    default = lower.LAST_STATE_PER_THREAD
    lower.LAST_STATE_PER_THREAD = default if after_loop else 0
    try:
        fn = compile(graph)
    finally:
        lower.LAST_STATE_PER_THREAD = default
    tag = f"s{stages}{'' if after_loop else 'r'}{'a' if annotated else ''}"
    for k in fn.kernels:
        src, name = re.sub(r"num_warps=(\d+)\)", rf"num_warps=\1, num_stages={stages})", k.code.source), k.code.name
        if annotated:
            src = re.sub(r"in range\((\w+)\):", rf"in tl.range(\1, num_stages={stages}):", src)
        k.code.source, k.code.name = src.replace(name, f"{name}_{tag}"), f"{name}_{tag}"
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.time()
    fused = load_fused()
    rows = []
    for name, knobs in CASES:
        for k, v in knobs.items():
            setattr(fused, k, v)
        graph = fused.build(name)
        spec = superopt.load(ROOT / "examples" / f"{name}.yaml")
        inputs = random_device_inputs(spec, seed=0, scale=input_scale(spec))
        xs = [inputs[n] for n in spec.inputs]
        refs = reference_outputs(spec, xs)
        for stages, after_loop, annotated in VARIANTS:
            row = {"workload": name, "knobs": knobs, "stages": stages, "sum_after_loop": after_loop}
            row["annotated"] = annotated
            try:
                fn = variant(graph, stages, after_loop, annotated)
                outs = fn(*xs)
                row["error_vs_tolerance"] = check(spec, outs, refs)
                row["us"] = bench(lambda fn=fn, xs=xs: fn(*xs), reps=50).median_us
            except Exception as e:  # noqa: BLE001 (a variant that fails is recorded)
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(row, flush=True)
    meta = run_meta(detect() or DEVICES["h100"], started)
    lines = [
        f"# Pipeline probe on {meta['device']}\n",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}.\n",
    ]
    heads = [f"stages {s}{'' if a else ', sum in loop'}{', tl.range' if r else ''}" for s, a, r in VARIANTS]
    lines += ["| workload | knobs | " + " | ".join(heads) + " |"]
    lines += ["|---|---|" + "---|" * len(VARIANTS)]
    for i in range(0, len(rows), len(VARIANTS)):
        group = rows[i : i + len(VARIANTS)]
        cells = [f"{r['us']:.1f}" if "us" in r and r["error_vs_tolerance"] <= 1 else "err" for r in group]
        knobs = " ".join(f"{k}={v}" for k, v in group[0]["knobs"].items())
        lines.append(f"| {group[0]['workload']} | {knobs} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_probe.md").write_text("\n".join(lines) + "\n")
    (out / "pipeline_probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
