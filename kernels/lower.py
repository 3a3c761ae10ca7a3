"""Tiling shared by the backends and the cost model: the padded extent of a tile dim, and predefined kernel ops
as block graphs, so that code generation and the cost model treat every kernel the same way: a matmul becomes a
tiled loop over K with accum_sum; any other op becomes one block op per tile followed by accum_sum over a single
iteration (the identity), the grid splitting the dims the op does not reduce.
"""

from __future__ import annotations

import math

from superopt.ir import BlockGraph, KernelGraph, Op
from superopt.ops import OPS, TensorType

TILE_ELEMENTS = 4096  # elements per block for non-matmul ops: 32 fp32 registers a thread at 128 threads
MATMUL_TILE = 64  # cap on each of a lowered matmul's M, N and K tiles
MIN_EXTENT = 16  # codegen pads tile extents 2..15 to 16 (tl.dot's minimum)
UNROLL_LIMIT = 16  # loops without a matmul up to this range are unrolled (see `unrolled`)
LAST_STATE_PER_THREAD = 32  # fp32 values per thread an accum_*_last may keep to sum after its loop


def padded(size: int) -> int:
    """The extent a tile dim of real size `size` has in registers: a power of two (Triton's rule), at least 16
    unless it is 1 (tl.dot's minimum; size-1 dims stay 1 so that broadcasting works as in the IR)."""
    return 1 if size == 1 else max(MIN_EXTENT, 1 << (size - 1).bit_length())


def unrolled(block: BlockGraph) -> bool:
    """Whether codegen unrolls the block's loop. Triton software-pipelines the loads of loops that feed tl.dot;
    a short loop without one (a split-K or split-KV combine) would otherwise wait a full memory latency per
    iteration, while unrolled its loads are all issued before the first one is used."""
    return 1 < block.forloop_range <= UNROLL_LIMIT and not any(op.op == "matmul" for op in block.ops)


def sums_after_loop(tile: tuple[int, ...], block_size: int) -> bool:
    """Whether an accum_*_last over `tile` keeps a tile-shaped sum in the loop and reduces its last dim once
    after it: a sum across threads in every iteration costs a barrier that stalls the pipelined loads
    (H200: rmsnorm_linear's one-kernel form, benchmarks/results/pipeline_probe.md), so where its registers
    are few, it is done once."""
    return math.prod(map(padded, tile)) <= LAST_STATE_PER_THREAD * block_size


def pow2_tile(size: int, cap: int) -> int:
    """The largest power of two <= cap that divides size (codegen pads tiles to powers of two)."""
    tile = 1
    while tile * 2 <= cap and size % (tile * 2) == 0:
        tile *= 2
    return tile


def _aligned_imap(source: tuple[int, ...], out: tuple[int, ...], split_dims: list[int]) -> tuple[int | None, ...]:
    """imap of an operand broadcast (aligned from the right) to `out`: a grid axis splits the operand's dim
    aligned with the output dim it splits, unless the operand has size 1 there or lacks the dim."""
    shift = len(out) - len(source)
    return tuple(d - shift if d >= shift and source[d - shift] == out[d] else None for d in split_dims)


def _tile_name(block: BlockGraph, op: Op, k: int) -> str | None:
    """Operand k's tile is named after its kernel tensor (None: a default name, for a tensor used twice)."""
    name = f"{op.inputs[k]}_tile"
    return None if name in block.tensors else name


def _split(shape: tuple[int, ...], whole: set[int]) -> tuple[list[int], list[int]]:
    """Chooses up to three dims to split, so a tile has at most TILE_ELEMENTS elements; returns (dims, grid
    sizes). Dims of size 2 to 15 are split fully first: codegen pads such a tile extent to 16."""
    tile = list(shape)
    dims, grid = [], []
    small = [d for d in range(len(shape)) if d not in whole and 1 < shape[d] < MIN_EXTENT]
    for d in small + [d for d in range(len(shape)) if d not in small]:
        if len(dims) == 3 or math.prod(tile) <= TILE_ELEMENTS and d not in small:
            break
        if d in whole or shape[d] == 1:
            continue
        rest = math.prod(tile) // tile[d]
        tile[d] = pow2_tile(shape[d], max(1, TILE_ELEMENTS // rest)) if d not in small else 1
        dims.append(d)
        grid.append(shape[d] // tile[d])
    if not dims:
        return [0], [1]
    order = sorted(range(len(dims)), key=lambda k: dims[k])
    return [dims[k] for k in order], [grid[k] for k in order]


def _lower_matmul(graph: KernelGraph, op: Op) -> BlockGraph:
    """Grid axes: N tiles, M tiles, and the batch dim of a rank-3 product; the loop runs over K tiles."""
    a, b = (graph.tensors[i] for i in op.inputs)
    out = graph.tensors[op.outputs[0]]
    rank = len(out.shape)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    tile_m, tile_n, tile_k = (pow2_tile(s, MATMUL_TILE) for s in (m, n, k))
    batched = rank == 3 and out.shape[0] > 1
    block = BlockGraph([n // tile_n, m // tile_m] + ([out.shape[0]] if batched else []), forloop_range=k // tile_k)

    def batch_dim(ty: TensorType) -> list[int | None]:
        return [0 if len(ty.shape) == 3 and ty.shape[0] > 1 else None] if batched else []

    at = block.input(a, [None, len(a.shape) - 2] + batch_dim(a), fmap=len(a.shape) - 1, name=_tile_name(block, op, 0))
    bt = block.input(b, [len(b.shape) - 1, None] + batch_dim(b), fmap=len(b.shape) - 2, name=_tile_name(block, op, 1))
    block.output(block.accum_sum(block.matmul(at, bt)), omap=[rank - 1, rank - 2] + ([0] if batched else []))
    return block


def _lower_pointwise(graph: KernelGraph, op: Op) -> BlockGraph:
    """Ops that reduce at most the dims in `whole`, which stay whole in every tile."""
    ins = [graph.tensors[i] for i in op.inputs]
    out = graph.tensors[op.outputs[0]]
    kind = OPS[op.op].kind
    if kind == "reduce":
        base, whole = ins[0].shape, {op.attrs["dim"]}
    elif kind == "norm":
        base, whole = ins[0].shape, {len(out.shape) - 1}
    elif kind in ("rope", "dequant"):  # dequant: the last dim is packed and grouped, whole rows a block
        base, whole = out.shape, {len(out.shape) - 1}
    elif kind == "concat":
        base, whole = out.shape, {op.attrs["dim"]}
    else:
        base, whole = out.shape, set()
    dims, grid = _split(base, whole)
    block = BlockGraph(grid)
    tiles = [
        block.input(ty, _aligned_imap(ty.shape, base, dims), name=_tile_name(block, op, k)) for k, ty in enumerate(ins)
    ]
    result = block.op(op.op, *tiles, **op.attrs)
    if kind == "reduce" and not op.attrs["keepdim"]:
        omap = [d - (d > op.attrs["dim"]) for d in dims]
    else:
        omap = dims
    block.output(block.accum_sum(result), omap=omap)
    return block


def lower(graph: KernelGraph, op: Op) -> BlockGraph:
    """The block graph computing predefined kernel op `op` of `graph` (graph-defined ops return their own)."""
    if op.block is not None:
        return op.block
    return _lower_matmul(graph, op) if op.op == "matmul" else _lower_pointwise(graph, op)


def kernel_blocks(graph: KernelGraph) -> list[BlockGraph]:
    """One block graph per kernel op of `graph`, in order."""
    return [lower(graph, op) for op in graph.ops]
