"""Hand-written fused µGraphs for the example workloads, in the style of Mirage's best-found kernels.

Each builder takes the dims of its spec (examples/<name>.yaml; same names) and returns a KernelGraph with the
spec's inputs (names, shapes, dtypes) and outputs, in order. They serve as known-good targets for the search,
the verifier and the code generators. `python examples/fused.py` writes examples/fused/<name>.json for the
full-size dims of every spec that has a fused form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

import superopt
from superopt.ir import BlockGraph, Tensor
from superopt.serialize import dump

EXAMPLES = Path(__file__).resolve().parent
EPS = 1e-6  # the rms_norm eps of the specs
SMS = 132  # streaming multiprocessors of an H100

# Tiling rule: every tile extent is the largest power of two <= a cap that divides its dim (codegen tiles are
# powers of two, and such a tile divides any dim, full-size or shrunk for tests); the grid is dim / tile.
# The GEMV-like kernels take COLS output columns per block and CHUNK of the reduction dim per iteration; with
# SPLITS > 1, rmsnorm_linear and gated_mlp also split the reduction dim over SPLITS blocks (split-K: more blocks,
# longer contiguous rows per block) and a second kernel sums the partial products. Attention takes ROWS query
# rows and ATTENTION_CHUNK KV positions per iteration, and the most KV splits (a power of two) that keep the grid
# within WAVES waves of SMS blocks while each block still iterates at least MIN_ITERS times; its combine kernel
# takes COMBINE_ROWS rows per block.
# The values are the fastest of benchmarks/tile_sweep.py on the H100 (benchmarks/results/sweep.md): 64 fp16
# columns make 128-byte rows, a whole DRAM segment. On the H200 split-K (SPLITS=8, COLS=128, CHUNK=32) is the
# fastest rmsnorm_linear and one kernel still the fastest gated_mlp (benchmarks/results/sweep_h200.md); the
# benchmarks take each workload's tiles from the sweep, not from these defaults.
COLS, CHUNK, SPLITS = 64, 256, 1  # 8 warps instead of 4 measured slower (block size 256: 52 us against 36)
ROWS, ATTENTION_CHUNK, MIN_ITERS, COMBINE_ROWS, WAVES = 64, 128, 2, 16, 1


def pow2_tile(size: int, cap: int) -> int:
    """The largest power of two <= cap that divides size."""
    tile = 1
    while tile * 2 <= cap and size % (tile * 2) == 0:
        tile *= 2
    return tile


def kv_splits(row_blocks: int, chunks: int) -> int:
    """How many blocks share one sequence's KV positions (each gets chunks / splits loop iterations)."""
    splits = 1
    while chunks % (splits * 2) == 0 and chunks // (splits * 2) >= MIN_ITERS and row_blocks * splits * 2 <= SMS * WAVES:
        splits *= 2
    return splits


def _column_blocks_and_chunks(dims: Mapping[str, int]) -> tuple[int, int]:
    """How many blocks of COLS output columns and how many CHUNKs of the reduction dim D a GEMV form has."""
    return dims["N"] // pow2_tile(dims["N"], COLS), dims["D"] // pow2_tile(dims["D"], CHUNK)


def _column_blocks(g: superopt.KernelGraph, dims: Mapping[str, int]) -> BlockGraph:
    """A block graph over the N output columns that loops over the D reduction dim."""
    columns, chunks = _column_blocks_and_chunks(dims)
    return g.block_graph(grid=(columns,), forloop_range=chunks)


def _splits(dims: Mapping[str, int]) -> int:
    """How many slices of the reduction dim D split-K takes: SPLITS, fewer where a slice would be under a CHUNK."""
    return pow2_tile(_column_blocks_and_chunks(dims)[1], SPLITS)


def _split_products(
    g: superopt.KernelGraph, x: Tensor, ws: list[Tensor], dims: Mapping[str, int], squares: bool = False
) -> list[Tensor]:
    """Split-K: block (n, s) multiplies slice s of x's D by the same rows of each w's column block n; the partial
    products of the slices stack along the rows, (splits * B, N) each. With `squares`, also the sums of squares
    of x's rows over slice s, (splits * B, column blocks)."""
    (columns, chunks), splits = _column_blocks_and_chunks(dims), _splits(dims)
    b = g.block_graph(grid=(columns, splits), forloop_range=chunks // splits)
    xt = b.input(x, imap=(None, 1), fmap=1)
    for w in ws:
        b.output(b.accum_sum(b.matmul(xt, b.input(w, imap=(1, 0), fmap=0))), omap=(1, 0))
    if squares:
        b.output(b.accum_sum_last(b.square(xt)), omap=(1, 0))
    return g.graph_def(b, outs=[f"partial{k}" for k in range(len(ws))] + (["squares"] if squares else []))


def _combine_blocks(g: superopt.KernelGraph, dims: Mapping[str, int]) -> BlockGraph:
    """The kernel after split-K: a block per COLS output columns, a loop iteration per slice."""
    return g.block_graph(grid=(_column_blocks_and_chunks(dims)[0],), forloop_range=_splits(dims))


def rmsnorm_linear(dims: Mapping[str, int]) -> superopt.KernelGraph:
    """rms_norm(x) @ w = (x @ w) / rms(x): the sum of squares and the matmul share one loop over D. Split-K:
    block (n, s) also sums the squares of x's slice s, and writes them for its column block n (every column block
    its own copy, so no two blocks write one place); the combine kernel sums products and squares over slices."""
    g = superopt.Graph("rmsnorm_linear")
    x = g.input("x", (dims["B"], dims["D"]))
    w = g.input("w", (dims["D"], dims["N"]))
    if _splits(dims) == 1:
        b = _column_blocks(g, dims)
        xt = b.input(x, imap=(None,), fmap=1)
        product = b.accum_sum(b.matmul(xt, b.input(w, imap=(1,), fmap=0)))
        rms = b.accum_rms_last(xt, eps=EPS)
    else:
        partial, squares = _split_products(g, x, [w], dims, squares=True)
        b = _combine_blocks(g, dims)
        product = b.accum_sum(b.input(partial, imap=(1,), fmap=0))
        mean_square = b.mul_scalar(b.accum_sum(b.input(squares, imap=(1,), fmap=0)), c=1 / dims["D"])
        rms = b.sqrt(b.add_scalar(mean_square, c=EPS))
    b.output(b.div(product, rms), omap=(1,))
    (o,) = g.graph_def(b, outs=["o"])
    g.output(o)
    return g


def gated_mlp(dims: Mapping[str, int]) -> superopt.KernelGraph:
    """Both matmuls accumulate in one loop over D (split-K: in one kernel over slices of D, whose partial
    products the combine kernel sums); silu(a) * b runs in the epilogue."""
    g = superopt.Graph("gated_mlp")
    x = g.input("x", (dims["B"], dims["D"]))
    w1 = g.input("w1", (dims["D"], dims["N"]))
    w2 = g.input("w2", (dims["D"], dims["N"]))
    if _splits(dims) == 1:
        b = _column_blocks(g, dims)
        xt = b.input(x, imap=(None,), fmap=1)
        a, c = (b.accum_sum(b.matmul(xt, b.input(w, imap=(1,), fmap=0))) for w in (w1, w2))
    else:
        partials = _split_products(g, x, [w1, w2], dims)
        b = _combine_blocks(g, dims)
        a, c = (b.accum_sum(b.input(p, imap=(1,), fmap=0)) for p in partials)
    b.output(b.mul(b.silu(a), c), omap=(1,))
    (o,) = g.graph_def(b, outs=["o"])
    g.output(o)
    return g


def lora(dims: Mapping[str, int]) -> superopt.KernelGraph:
    """Mirage's LoRA: x @ w + (x @ a) @ b = sum_i (x_i || x_i @ a_i) @ (w_i || b) over the chunks i of D."""
    g = superopt.Graph("lora")
    x = g.input("x", (dims["B"], dims["D"]))
    w = g.input("w", (dims["D"], dims["N"]))
    a = g.input("a", (dims["D"], dims["R"]))
    b_in = g.input("b", (dims["R"], dims["N"]))
    b = _column_blocks(g, dims)
    xt = b.input(x, imap=(None,), fmap=1)
    wt = b.input(w, imap=(1,), fmap=0)
    at = b.input(a, imap=(None,), fmap=0)
    bt = b.input(b_in, imap=(1,), fmap=None)  # loop-invariant: the same rows of b every iteration
    lhs = b.concat(xt, b.matmul(xt, at), dim=1)
    rhs = b.concat(wt, bt, dim=0)
    b.output(b.accum_sum(b.matmul(lhs, rhs)), omap=(1,))
    (o,) = g.graph_def(b, outs=["o"])
    g.output(o)
    return g


def attention(g: superopt.KernelGraph, q: Tensor, k: Tensor, v: Tensor, norm: bool = False) -> Tensor:
    """Split-KV attention in two kernels: partial exp(q @ k) @ v and row sums per (batch, KV split, row tile),
    concatenated along the last dim; then a combine kernel sums the splits and divides. With `norm`, rms_norm
    of q and v rows runs on their tiles: a tile holds whole rows (the head dim), so no kernel of its own."""
    batch, seq, _ = q.shape
    length = k.shape[2]
    rows, chunk = pow2_tile(seq, ROWS), pow2_tile(length, ATTENTION_CHUNK)
    splits = kv_splits(batch * (seq // rows), length // chunk)
    b = g.block_graph(grid=(batch, splits, seq // rows), forloop_range=length // chunk // splits)
    qt = b.input(q, imap=(0, None, 1))
    kt = b.input(k, imap=(0, 2, None), fmap=2)
    vt = b.input(v, imap=(0, 1, None), fmap=1)
    if norm:
        qt, vt = b.rms_norm(qt, eps=EPS), b.rms_norm(vt, eps=EPS)
    e = b.exp(b.matmul(qt, kt))
    b.output(b.accum_sum(b.matmul(e, vt)), omap=(0, 2, 1))  # (batch, seq, splits * head dim)
    b.output(b.accum_sum_last(e), omap=(0, 2, 1))  # (batch, seq, splits)
    numerators, denominators = g.graph_def(b, outs=["numerators", "denominators"])

    rows = pow2_tile(seq, COMBINE_ROWS)
    c = g.block_graph(grid=(batch, seq // rows), forloop_range=splits)
    num = c.accum_sum(c.input(numerators, imap=(0, 1), fmap=2))
    den = c.accum_sum(c.input(denominators, imap=(0, 1), fmap=2))
    c.output(c.div(num, den), omap=(0, 1))
    (o,) = g.graph_def(c, outs=["o"])
    return o


def _attention_inputs(g: superopt.KernelGraph, dims: Mapping[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    batch, seq, head, length = dims["B"], dims["S"], dims["D"], dims["L"]
    return g.input("q", (batch, seq, head)), g.input("k", (batch, head, length)), g.input("v", (batch, length, head))


def gqa(dims: Mapping[str, int]) -> superopt.KernelGraph:
    g = superopt.Graph("gqa")
    g.output(attention(g, *_attention_inputs(g, dims)))
    return g


def qknorm_gqa(dims: Mapping[str, int]) -> superopt.KernelGraph:
    """The attention kernels with rms_norm on the q and v tiles."""
    g = superopt.Graph("qknorm_gqa")
    g.output(attention(g, *_attention_inputs(g, dims), norm=True))
    return g


def ntrans(dims: Mapping[str, int]) -> superopt.KernelGraph:
    """The whole normalized residual update in one kernel: a block per row holds its full rows of h, x and
    alpha, so both rms_norms reduce in registers; no loop (its accum_sum is the identity)."""
    g = superopt.Graph("ntrans")
    h, x, alpha = (g.input(n, (dims["B"], dims["D"])) for n in ("h", "x", "alpha"))
    b = g.block_graph(grid=(dims["B"],), forloop_range=1)
    ht, xt, at = (b.input(t, imap=(0,)) for t in (h, x, alpha))
    y = b.add(xt, b.mul(at, b.add(b.rms_norm(ht, eps=EPS), xt)))
    b.output(b.accum_sum(b.rms_norm(y, eps=EPS)), omap=(0,))
    (o,) = g.graph_def(b, outs=["o"])
    g.output(o)
    return g


FUSED: dict[str, Callable[[Mapping[str, int]], superopt.KernelGraph]] = {
    "rmsnorm_linear_bs1": rmsnorm_linear,
    "rmsnorm_linear_bs8": rmsnorm_linear,
    "gated_mlp": gated_mlp,
    "lora": lora,
    "gqa_bs1": gqa,
    "gqa_bs8": gqa,
    "qknorm_gqa_bs1": qknorm_gqa,
    "qknorm_gqa_bs8": qknorm_gqa,
    "mqa_bs1": gqa,
    "ntrans_bs1": ntrans,
    "ntrans_bs8": ntrans,
}


def spec_dims(name: str) -> dict[str, int]:
    """The full-size dims of examples/<name>.yaml."""
    with open(EXAMPLES / f"{name}.yaml") as f:
        return yaml.safe_load(f)["dims"]


def build(name: str, dims: Mapping[str, int] | None = None) -> superopt.KernelGraph:
    """The fused µGraph of example `name`, named after it, at `dims` (default: the spec's full size)."""
    graph = FUSED[name](spec_dims(name) if dims is None else dims)
    graph.name = name
    return graph


def main() -> None:
    out = EXAMPLES / "fused"
    out.mkdir(exist_ok=True)
    for name in FUSED:
        dump(build(name), out / f"{name}.json")
        print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
