"""Verification time: every example program against its hand-fused µGraph at full size, on this machine's CPU.

For each examples/fused/<name>.json and examples/<name>.yaml it times `superopt.verify(program, fused)` with the
defaults (4 finite-field tests, a z3 proof where the shrunk pair is small), after one warm-up verification so
that imports and first-use costs are not counted; the median and the slowest of REPEATS runs with different
seeds. It also times each program against itself, and one `superopt verify` command end to end (a fresh
Python process: imports included).

    python benchmarks/verify_bench.py [--out benchmarks/results/verify_bench.md] [--repeats 3]

Prints the table and writes it, with the machine and date, to OUT.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

import superopt
from superopt.verification import VerifyResult, verify

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def timed(a: superopt.KernelGraph, b: superopt.KernelGraph, repeats: int) -> tuple[list[float], VerifyResult]:
    times, result = [], None
    for seed in range(repeats):
        start = time.perf_counter()
        result = verify(a, b, seed=seed)
        times.append(time.perf_counter() - start)
        if result.equivalent is not True:
            raise SystemExit(f"{a.name}: not verified equivalent:\n{result}")
    return times, result


def bound(result: VerifyResult) -> str:
    if result.method == "proved":
        return "0 (proof)"
    return f"2^{math.log2(result.bound):.0f} ({result.tests} tests of 2^{math.log2(result.per_test_bound):.1f})"


def row(name: str, times: list[float], result: VerifyResult) -> str:
    cells = [name, f"{statistics.median(times):.3f}", f"{max(times):.3f}", result.method, bound(result)]
    return "| " + " | ".join(cells + ["; ".join(result.shrunk) or "-"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "verify_bench.md")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    names = sorted(p.stem for p in (EXAMPLES / "fused").glob("*.json"))
    warm = superopt.load(EXAMPLES / "fused" / f"{names[0]}.json")
    verify(warm, warm, seed=0)

    header = [
        "| pair | median s | max s | method | false-accept bound | checked on one chunk of |",
        "|---|---|---|---|---|---|",
    ]
    fused = list(header)
    for name in names:
        program = superopt.load(EXAMPLES / f"{name}.yaml")
        candidate = superopt.load(EXAMPLES / "fused" / f"{name}.json")
        fused.append(row(f"{name} vs fused", *timed(program, candidate, args.repeats)))
        print(fused[-1], flush=True)
    itself = list(header)
    for path in sorted(EXAMPLES.glob("*.yaml")):
        program = superopt.load(path)
        itself.append(row(f"{path.stem} vs itself", *timed(program, program, args.repeats)))
        print(itself[-1], flush=True)

    command = [shutil.which("superopt") or "superopt", "verify", f"examples/{names[0]}.yaml"]
    command.append(f"examples/fused/{names[0]}.json")
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    cli = time.perf_counter() - start
    print(f"`{' '.join(command[1:])}` end to end: {cli:.2f} s", flush=True)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = [
        "# Verification time (benchmarks/verify_bench.py)",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; load average at the end: {load} "
        "(the machine is shared, so times vary).",
        "",
        "`superopt.verify(program, candidate)` with its defaults, after a warm-up; median and slowest of "
        f"{args.repeats} seeds. The bound is the false-accept probability of the finite-field tests, per test in "
        "brackets; each pair is first shrunk along the batch dims both graphs compute chunk by chunk "
        "(verify/shrink.py), which decides the full pair.",
        "",
        "## Programs against their hand-fused µGraphs (full size)",
        "",
        *fused,
        "",
        "## Programs against themselves",
        "",
        *itself,
        "",
        f"`superopt verify {' '.join(command[2:])}` as a command, end to end: {cli:.2f} s (most of it importing "
        "torch).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
