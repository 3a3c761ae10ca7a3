"""The peer benchmark: the eleven example workloads on this GPU, superopt's kernels against torch's.

For each workload (examples/<name>.yaml at full size, fp16, inputs N(0, 0.5^2)) it times, the same way in one run
(kernels/timing.py's `bench`: warm-up, L2 flushed before each run, CUDA events, median):
  eager          the program's ops in torch, one kernel each, launched from Python
  eager+graph    the same, captured in a CUDA graph and replayed
  compile        torch.compile (default mode), replayed in a CUDA graph
  max-autotune   torch.compile(mode="max-autotune-no-cudagraphs"), replayed in a CUDA graph (while the time budget
                 allows: its autotuning takes tens of seconds a workload)
  superopt       with --search S, what `superopt search examples/<name>.yaml --budget S` picks on this GPU (the
                 cache's result where it holds one for this GPU and these versions, else a search now: search,
                 verify, time the top candidates, pick the fastest measured); with --picks (a sweep.json of
                 benchmarks/tile_sweep.py, run before on this GPU), the sweep's pick; else the hand-fused µGraph of
                 examples/fused.py at its default tiles. Compiled by superopt's Triton backend and replayed in a
                 CUDA graph
  hand-fused     the hand-written µGraph of examples/fused.py, where there is one and superopt is not it: where a
                 person still beats the search
Every output is checked on the GPU against the program evaluated in float64 (error / dtype tolerance <= 1).
The floor is max(bytes of inputs and outputs / measured copy bandwidth, FLOPs / measured matmul rate).

    pip install -e . --no-deps --no-build-isolation            # once: superopt.kernels maps to kernels/
    python benchmarks/tile_sweep.py --out results \
        --search results/search_bench.json results/attention_norm/search_bench.json
    python benchmarks/peers.py --out results --picks results/sweep.json   # everything, about 2 minutes
    python benchmarks/peers.py --out /tmp/p --only lora,gqa_bs1 --max-autotune none
    python benchmarks/peers.py --out results --search 40 --cache-dir /tmp/cache     # the search's own picks

Writes OUT/peers.md and OUT/peers.json (device, date, versions, every number) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import superopt
from superopt.cache import Cache
from superopt.kernels import compile
from superopt.kernels.cost import floor, predict
from superopt.kernels.device import DEVICES, DeviceSpec, detect
from superopt.kernels.timing import bench, check, input_scale, random_device_inputs, reference_outputs
from superopt.pipeline import Settings, eager, fresh_compile, optimize_program
from superopt.serialize import from_json

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORKLOADS = [
    "rmsnorm_linear_bs1",
    "rmsnorm_linear_bs8",
    "gated_mlp",
    "gqa_bs1",
    "gqa_bs8",
    "qknorm_gqa_bs1",
    "qknorm_gqa_bs8",
    "mqa_bs1",
    "lora",
    "ntrans_bs1",
    "ntrans_bs8",
]
# The workloads max-autotune is timed on by default (the peers' published table has it there), to stay within the
# time budget.
ANCHOR_AUTOTUNED = {"rmsnorm_linear_bs1", "gated_mlp", "gqa_bs8", "qknorm_gqa_bs1", "lora", "ntrans_bs8"}
PEERS = ["eager", "eager+graph", "compile", "max-autotune"]
HAND_SLOWER_BY = 1.03  # a hand-fused µGraph more than this much faster than the search's pick: the search trails


def load_fused():
    spec = importlib.util.spec_from_file_location("examples_fused", EXAMPLES / "fused.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_meta(spec: DeviceSpec, started: float) -> dict:
    """What a result file records of its run: the GPU, the spec ranked for, date, versions, duration."""
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "spec": spec.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seconds": round(time.time() - started, 1),
    }


def measured_device(spec: DeviceSpec) -> tuple[DeviceSpec, float, float]:
    """The spec with this GPU's measured copy bandwidth (bytes read + written) and fp16 matmul rate."""
    n = 512 * 1024 * 1024
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    copy_us = bench(lambda: dst.copy_(src), reps=20, cuda_graph=False).median_us
    bandwidth = 2 * n / (copy_us * 1e-6)
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    mm_us = bench(lambda: a @ a, reps=20, cuda_graph=False).median_us
    rate = 2 * 8192**3 / (mm_us * 1e-6)
    flops = dict(spec.tensor_flops) | {"float16": rate}
    return replace(spec, dram_bytes_per_s=bandwidth, tensor_flops=flops), bandwidth, rate


def one_launch_us() -> float:
    """What this timing method measures for one kernel that does nothing: its lower limit for any program."""
    x = torch.zeros(1, device="cuda")
    return bench(lambda: x.add_(1), reps=100).median_us


@dataclass
class Workload:
    name: str
    spec: superopt.KernelGraph
    ours: superopt.KernelGraph  # the fused µGraph, or the spec itself
    args: list[torch.Tensor]
    refs: list[torch.Tensor]
    row: dict


def search_pick(name: str, budget_s: float, cache: Cache) -> dict:
    """What `superopt search examples/<name>.yaml --budget budget_s` picks here: the graph, what it is, and the
    search's table (each candidate tried: kernels, predicted and measured us, trial status)."""
    spec = superopt.load(EXAMPLES / f"{name}.yaml")
    settings = Settings.merged(spec.search_settings, budget_s=budget_s)
    outcome = optimize_program(spec, settings, cache, "search", progress="none")
    result = outcome.result
    best = result.best if result is not None else None
    what = f"search {outcome.status}" + (f" {best.hash[:12]} ({best.kernels} kernels)" if best is not None else "")
    tried = [row.to_json() for row in result.candidates] if result is not None else []
    return {"graph": outcome.winner, "what": what, "tried": tried, "cut": list(result.cut) if result else []}


def ours(name: str, fused, picks: dict) -> tuple[superopt.KernelGraph, str]:
    """superopt's µGraph for the workload and what it is: the search's or the sweep's pick, else the fused form,
    else the spec."""
    if name in picks and "graph" in picks[name]:
        return picks[name]["graph"], picks[name]["what"]
    if name in picks:
        pick = picks[name]["pick"]
        what = " ".join(f"{k}={v}" for k, v in pick["knobs"].items())
        return from_json(pick["mugraph"]), f"{pick['source']} {what}"
    if name in fused.FUSED:
        return fused.build(name), "fused"
    return superopt.load(EXAMPLES / f"{name}.yaml"), "spec"


def prepare(name: str, fused, picks: dict, spec_device: DeviceSpec, measured: DeviceSpec) -> Workload:
    """Inputs, float64 reference and the row's fixed numbers: the floor at the measured rates, the cost
    model's prediction at the datasheet's (it applies its own achievable fractions)."""
    spec = superopt.load(EXAMPLES / f"{name}.yaml")
    inputs = random_device_inputs(spec, seed=0, scale=input_scale(spec))
    args = [inputs[n] for n in spec.inputs]
    graph, what = ours(name, fused, picks)
    row = {
        "name": name,
        "superopt_graph": what,
        "floor_us": floor(spec, measured).us,
        "predicted_us": predict(graph, spec_device).us,
        "predicted_spec_us": predict(spec, spec_device).us,
        "results": {},
    } | ({"search": {k: picks[name][k] for k in ("tried", "cut")}} if "tried" in picks.get(name, {}) else {})
    return Workload(name, spec, graph, args, reference_outputs(spec, args), row)


def time_peer(w: Workload, label: str, make: Callable[[], Callable], cuda_graph: bool, reps: int) -> None:
    """Builds, checks and times one implementation; any failure is recorded in the row, and the run goes on."""
    started = time.time()
    try:
        fn = make()
        outs = fn(*w.args)
        error = check(w.spec, outs, w.refs)
        timing = bench(lambda: fn(*w.args), reps=reps, cuda_graph=cuda_graph)
        result = {"status": "ok" if error <= 1 else "wrong", "error_vs_tolerance": error} | asdict(timing)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result = {"status": "error", "message": f"{type(e).__name__}: {e}"[:500]}
    w.row["results"][label] = result | {"seconds": round(time.time() - started, 1)}


def _us(result: dict | None) -> float:
    return result["median_us"] if result and result.get("status") == "ok" else math.inf


def table(rows: list[dict]) -> str:
    head = ["workload", "floor", *PEERS, "superopt", "hand-fused", "graph", "predicted", "best peer / superopt"]
    head += ["floor / superopt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = []
    for row in rows:
        res = row["results"]
        cells = [row["name"], f"{row['floor_us']:.1f}"]
        for label in [*PEERS, "superopt", "hand-fused"]:
            r = res.get(label)
            cells.append("" if r is None else f"{r['median_us']:.1f}" if r["status"] == "ok" else r["status"])
        best = min(_us(res.get(p)) for p in PEERS)
        ours = _us(res.get("superopt"))
        cells += [row["superopt_graph"], f"{row['predicted_us']:.1f}"]
        cells.append(f"{best / ours:.2f}x" if math.isfinite(ours) and math.isfinite(best) else "")
        cells.append(f"{row['floor_us'] / ours:.2f}" if math.isfinite(ours) else "")
        lines.append("| " + " | ".join(cells) + " |")
        if math.isfinite(ours) and math.isfinite(best):
            ratios.append(best / ours)
    if ratios:
        geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        wins = sum(r > 1 for r in ratios)
        lines.append(
            f"\nsuperopt beats the best peer on {wins} of {len(ratios)} workloads; geometric mean of best peer / "
            f"superopt: {geomean:.2f}x."
        )
    trails = [
        row["name"]
        for row in rows
        if _us(row["results"].get("hand-fused")) * HAND_SLOWER_BY < _us(row["results"].get("superopt"))
    ]
    if any("hand-fused" in row["results"] for row in rows):
        lines.append(f"A hand-fused µGraph faster than superopt's pick by more than 3%: {', '.join(trails) or 'none'}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for peers.md and peers.json")
    parser.add_argument("--only", default="", help="comma-separated workloads (default: all eleven)")
    parser.add_argument("--max-autotune", choices=["anchors", "all", "none"], default="anchors")
    parser.add_argument("--budget-s", type=float, default=360, help="no max-autotune compile starts after this")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--picks", type=Path, help="a sweep.json from benchmarks/tile_sweep.py on this GPU")
    parser.add_argument("--search", type=float, help="time what `superopt search --budget S` picks (seconds)")
    parser.add_argument("--cache-dir", type=Path, help="the search's cache (default: superopt's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("peers.py needs a CUDA GPU")
    started = time.time()
    spec = detect() or DEVICES["h100"]
    device, bandwidth, rate = measured_device(spec)
    names = [n for n in args.only.split(",") if n] or WORKLOADS
    fused = load_fused()
    picks = json.loads(args.picks.read_text())["stats"] if args.picks else {}
    if args.search is not None:  # searched (or read from the cache) before anything is timed
        cache = Cache(args.cache_dir)
        for name in names:
            picks[name] = search_pick(name, args.search, cache)
            print(f"{name}: {picks[name]['what']} at {time.time() - started:.0f} s", flush=True)
    workloads = []
    for name in names:  # first every peer but max-autotune, whose autotuning takes tens of seconds a workload
        w = prepare(name, fused, picks, spec, device)
        program = eager(w.spec)
        time_peer(w, "eager", lambda program=program: program, False, args.reps)
        time_peer(w, "eager+graph", lambda program=program: program, True, args.reps)
        time_peer(w, "compile", lambda program=program: fresh_compile(program), True, args.reps)
        time_peer(w, "superopt", lambda w=w: compile(w.ours), True, args.reps)
        if name in fused.FUSED and w.row["superopt_graph"] != "fused":
            hand = fused.build(name)
            time_peer(w, "hand-fused", lambda hand=hand: compile(hand), True, args.reps)
        workloads.append(w)
        print(f"{name}: done at {time.time() - started:.0f} s", flush=True)
    for w in workloads:
        wanted = {"all": True, "none": False, "anchors": w.name in ANCHOR_AUTOTUNED}[args.max_autotune]
        if not wanted:
            continue
        if time.time() - started > args.budget_s:
            w.row["results"]["max-autotune"] = {"status": "skipped (time budget)"}
            continue
        autotuned = fresh_compile(eager(w.spec), mode="max-autotune-no-cudagraphs")
        time_peer(w, "max-autotune", lambda autotuned=autotuned: autotuned, True, args.reps)
        print(f"{w.name} max-autotune: done at {time.time() - started:.0f} s", flush=True)
    rows = [w.row for w in workloads]
    launch = one_launch_us()
    meta = run_meta(spec, started) | {
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fp16_matmul_flops": rate,
        "one_empty_kernel_us": launch,
    }
    text = table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# superopt vs peers on {meta['device']}\n\n{meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, fp16 matmul {rate / 1e12:.0f} TFLOP/s. Microseconds, median "
        "of CUDA-event-timed runs, L2 flushed; all but eager replayed in a CUDA graph. A cell that is not a number "
        "says why (wrong: fails the float64 check). best peer / superopt > 1: superopt is faster. One kernel that "
        f"does nothing measures {launch:.1f} us this way.\n\n"
    )
    (out / "peers.md").write_text(header + text + "\n")
    (out / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text)
    print(f"total {meta['seconds']} s; wrote {out / 'peers.md'} and {out / 'peers.json'}")


if __name__ == "__main__":
    main()
