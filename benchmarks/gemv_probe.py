"""GEMV probe: how Triton streams a weight matrix on this GPU, outside superopt's code generator.

rmsnorm_linear and gated_mlp are x (B, D) @ w (D, N) with B of 2 to 16 rows: all weight stream. This times
hand-written Triton kernels for x @ w (B=2 and 16, D=4096, N=6144, fp16) that differ in one choice each (tile
sizes, warps, pipeline stages, tensor cores or CUDA cores, split-K), beside torch (cuBLAS) and a plain read of
w, the same way benchmarks/peers.py times (CUDA-graph replay, L2 flushed, median): how close superopt's
generated GEMVs (benchmarks/results/sweep_h200.md) come to what Triton can do, and which choices matter.

    python benchmarks/gemv_probe.py --out results
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from peers import run_meta  # benchmarks/peers.py: a script's own folder is on sys.path

from superopt.kernels.device import DEVICES, detect
from superopt.kernels.timing import bench

D, N = 4096, 6144


@triton.jit
def gemv(
    x_ptr,
    w_ptr,
    out_ptr,
    B: tl.constexpr,
    BB: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    DOT: tl.constexpr,
    NCOLS: tl.constexpr,
    KTOTAL: tl.constexpr,
):
    n0 = tl.program_id(0) * BN
    k0 = tl.program_id(1) * K_PER_SPLIT
    rb, rk, rn = tl.arange(0, BB), tl.arange(0, BK), tl.arange(0, BN)
    acc = tl.zeros((BB, BN), tl.float32)
    for k in range(k0, k0 + K_PER_SPLIT, BK):
        x = tl.load(x_ptr + rb[:, None] * KTOTAL + (k + rk)[None, :], mask=(rb < B)[:, None], other=0.0)
        w = tl.load(w_ptr + (k + rk)[:, None] * NCOLS + (n0 + rn)[None, :])
        if DOT:
            acc += tl.dot(x, w)
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    out = out_ptr + tl.program_id(1) * B * NCOLS + rb[:, None] * NCOLS + (n0 + rn)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rb < B)[:, None])


def variants(batch: int):
    for bn, bk, warps, stages, splits, dot in itertools.product(
        (64, 128, 256), (32, 64, 128, 256), (4, 8), (3, 5), (1, 8, 16), (True, False)
    ):
        tile = bn * bk * 2
        if tile > 64 * 1024 or tile * (stages - 1) > 200 * 1024 or D // splits < bk:
            continue
        if (splits == 1) != (bk >= 128 and bn <= 128):
            continue  # one split wants long loads per iteration and enough blocks; split-K, short ones
        if not dot and (bk * bn > 8192 or batch > 2):
            continue  # the CUDA-core form broadcasts a (B, BK, BN) product in registers
        yield {"BN": bn, "BK": bk, "warps": warps, "stages": stages, "splits": splits, "dot": dot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.time()
    rows = []
    w = torch.randn(D, N, dtype=torch.float16, device="cuda") * 0.02
    read = torch.empty(N, dtype=torch.float32, device="cuda")
    rows.append(
        {"batch": 0, "what": "w.sum(0), a plain read", "us": bench(lambda: torch.sum(w, 0, out=read)).median_us}
    )
    for batch in (2, 16):
        x = torch.randn(batch, D, dtype=torch.float16, device="cuda")
        ref = (x.double() @ w.double()).float()
        rows.append({"batch": batch, "what": "torch x @ w", "us": bench(lambda x=x: x @ w).median_us})
        for v in variants(batch):
            splits = v["splits"]
            out = torch.empty(splits * batch, N, dtype=torch.float32 if splits > 1 else torch.float16, device="cuda")
            grid = (N // v["BN"], splits)

            def run(v=v, out=out, grid=grid, x=x, batch=batch):
                gemv[grid](
                    x,
                    w,
                    out,
                    batch,
                    max(16, batch) if v["dot"] else max(2, batch),
                    v["BK"],
                    v["BN"],
                    D // v["splits"],
                    v["dot"],
                    N,
                    D,
                    num_warps=v["warps"],
                    num_stages=v["stages"],
                )

            try:
                run()
                got = out.view(splits, batch, N).float().sum(0)
                err = ((got - ref).norm() / ref.norm()).item()
                rows.append({"batch": batch, **v, "err": err, "us": bench(run).median_us})
            except Exception as e:  # noqa: BLE001 (a variant that fails is recorded)
                rows.append({"batch": batch, **v, "error": f"{type(e).__name__}: {e}"[:200]})
    meta = run_meta(detect() or DEVICES["h100"], started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bytes_w = D * N * 2
    lines = [
        f"# GEMV probe on {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}.",
    ]
    lines += ["", "| batch | variant | us | TB/s of w |", "|---|---|---|---|"]
    for batch in (0, 2, 16):
        mine = sorted((r for r in rows if r["batch"] == batch and "us" in r), key=lambda r: r["us"])
        for r in mine[:12]:
            what = r.get("what") or " ".join(f"{k}={r[k]}" for k in ("BN", "BK", "warps", "stages", "splits", "dot"))
            lines.append(f"| {batch} | {what} | {r['us']:.1f} | {bytes_w / r['us'] / 1e6:.2f} |")
    (out / "gemv_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
