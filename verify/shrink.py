"""Shrinking a pair of graphs along batch dims before testing them: slices computed alike and independently.

A batch of G chunks assigns to some inputs one dim each (size divisible by G); every other input is unbatched.
Walking a graph in order gives every tensor a batch dim or none, where each op keeps the chunks apart:
  - elementwise ops, accum_sum, accum_max and accum_rescaled_sum (with broadcasting): the batched operands'
    dims align to one output dim d, and every unbatched operand has size 1 there (it broadcasts);
  - rms_norm, reductions and the *_last accumulators: they do not reduce along d;
  - rope and dequant: as elementwise ops, but never along the last dim (rotated; packed and grouped);
  - matmul: the row dim of a with b unbatched, the column dim of b with a unbatched, or a batch dim (as for
    elementwise ops); never the contraction dim;
  - concat: both operands batched along the same dim, not the concat dim;
  - graph_def, where a grid axis g of size > 1 carries the batch: imap[g] splits every batched input along its
    batch dim and no unbatched input (None: all blocks along g read the same tiles of it), each output is placed
    along omap[g], and G divides grid[g]. The IR splits a dim by its grid axis outermost (before the loop), so
    chunk c of G is the blocks c * grid[g] / G, ... along g, which read chunk c of the batched inputs and write
    chunk c of the outputs, running the same block graph;
  - graph_def, where the tiles carry the batch: no grid axis of size > 1 and no fmap splits a batched input
    along its batch dim, so every tile holds all G chunks of it; the block graph's ops (loop body,
    accumulators, epilogue) keep the chunks apart by the rules above; and no grid axis of size > 1 splits an
    output along its batch dim, so each block writes chunk c of its tile to chunk c of the output.
A tensor with no batched operand is unbatched; an op that fits none of these rules blocks the batch.

Claim: if both graphs admit the batch and give each output the same batch dim, then chunk c of every output is
F(chunk c of the batched inputs, the unbatched inputs), the same function F for every c, which the graph with
every batched dim (and every grid axis carrying the batch) divided by G computes. By induction over the ops:
each rule is that statement for one op; an unbatched tensor depends on unbatched inputs only. So the full graphs
are equal as functions exactly when the shrunk graphs are (chunk 0 on arbitrary inputs is the shrunk graph), and
testing or proving the shrunk pair decides the full pair, with the same false-accept bound (an output element's
degree does not change: no summed dim is batched). Nothing is sampled: F covers every chunk.

Batches grow from each input dim as a seed: a conflict with an unbatched operand that would have to be batched
(one that does not broadcast, one a grid axis splits) is traced back to the inputs it comes from, which join the
batch, and the walk restarts. The shrink saving the most input elements is applied; the search repeats on the
shrunk pair until none is left. The shrunk graphs are rebuilt through the IR's builders and must come out with
exactly the shapes the rules predict, or the pair is kept as it is.
"""

from __future__ import annotations

import math

from superopt.errors import IRError
from superopt.ir import BlockGraph, KernelGraph, Op
from superopt.ops import OPS, TensorType

Dims = dict[str, int | None]  # tensor name -> its batch dim, or None (unbatched)
Graph = KernelGraph | BlockGraph


class _Conflict(Exception):
    """An op would mix chunks; `needs` lists tensors (with dims) that, batched, would resolve it (none: nothing
    would)."""

    def __init__(self, *needs: tuple[str, int]) -> None:
        self.needs = list(needs)


def _elementwise(names: list[str], shapes: list[tuple[int, ...]], dims: list[int | None], rank: int) -> int | None:
    aligned = {d + rank - len(s) for s, d in zip(shapes, dims) if d is not None}
    if not aligned:
        return None
    if len(aligned) > 1:
        raise _Conflict
    (d,) = aligned
    for name, shape, own in zip(names, shapes, dims):
        at = d - (rank - len(shape))
        if own is None and at >= 0 and shape[at] > 1:
            raise _Conflict((name, at))
    return d


def _matmul(names: list[str], shapes: list[tuple[int, ...]], dims: list[int | None], rank: int) -> int | None:
    (ra, rb), (da, db) = map(len, shapes), dims
    if da == ra - 1 or db == rb - 2:
        raise _Conflict  # the contraction dim
    if da == ra - 2 or db == rb - 1:
        if None not in (da, db):
            raise _Conflict  # rows of a with columns of b, or with a batch dim of b
        return rank - 2 if da == ra - 2 else rank - 1
    return _elementwise(names, [s[:-2] for s in shapes], dims, rank - 2)


def _op(op: Op, graph: Graph, dims: list[int | None]) -> int | None:
    """The batch dim of a predefined op's output (kernel or block level)."""
    kind, names = OPS[op.op].kind, list(op.inputs)
    shapes = [graph.tensors[i].shape for i in names]
    rank = len(graph.tensors[op.outputs[0]].shape)
    d = dims[0]
    if kind == "binary" or op.op == "accum_rescaled_sum":
        return _elementwise(names, shapes, dims, rank)
    if kind == "matmul":
        return _matmul(names, shapes, dims, rank)
    if kind == "reduce":
        dim = op.attrs["dim"]
        if d == dim:
            raise _Conflict
        return d if d is None or op.attrs["keepdim"] or d < dim else d - 1
    if kind == "concat":
        if dims[0] == dims[1] != op.attrs["dim"]:
            return d
        if None in dims and dims != [None, None]:
            k = dims.index(None)
            raise _Conflict((names[k], dims[1 - k]))
        raise _Conflict
    if kind == "norm" or op.op.endswith("_last"):
        if d == rank - 1:
            raise _Conflict
        return d
    if kind in ("rope", "dequant"):  # elementwise over the operands, but the last dim stays whole
        d = _elementwise(names, shapes, dims, rank)
        if d == rank - 1:
            raise _Conflict
        return d
    if kind in ("unary", "scalar", "accum"):
        return d
    raise _Conflict


def _axis(block: BlockGraph, mapping: tuple[int | None, ...], dim: int) -> int | None:
    """The grid axis of size > 1 that `mapping` (an imap or omap) sends to `dim`, if any."""
    return next((a for a, m in enumerate(mapping) if m == dim and block.grid[a] > 1), None)


def _graph_def(op: Op, dims: list[int | None]) -> tuple[list[int | None], int | None, Dims | None]:
    """The outputs' batch dims, and the grid axis carrying the batch or the block graph's batch dims."""
    block: BlockGraph = op.block
    batched = [(bi, d) for bi, d in zip(block.inputs, dims) if d is not None]
    if not batched:
        return [None] * len(block.outputs), None, None
    g = _axis(block, batched[0][0].imap, batched[0][1])
    if g is not None:
        for name, bi, d in zip(op.inputs, block.inputs, dims):
            if d is None and bi.imap[g] is not None:
                raise _Conflict((name, bi.imap[g]))
            if d is not None and bi.imap[g] != d:
                raise _Conflict
        return [bo.omap[g] for bo in block.outputs], g, None
    if any(_axis(block, bi.imap, d) is not None or bi.fmap == d for bi, d in batched):
        raise _Conflict
    inner: Dims = {bi.name: d for bi, d in zip(block.inputs, dims)}
    for bop in block.ops:
        try:
            inner[bop.outputs[0]] = _op(bop, block, [inner[i] for i in bop.inputs])
        except _Conflict as c:  # name the graph_def's operands instead of the block inputs
            needs = [_sources(block, t, d) for t, d in c.needs]
            if not needs or None in needs:
                raise _Conflict from None
            names = [bi.name for bi in block.inputs]
            raise _Conflict(*((op.inputs[names.index(t)], d) for ts in needs for t, d in ts)) from None
    outs = [inner[bo.name] for bo in block.outputs]
    if any(e is not None and _axis(block, bo.omap, e) is not None for bo, e in zip(block.outputs, outs)):
        raise _Conflict
    return outs, None, inner


def _sources(graph: Graph, name: str, dim: int, producers: dict[str, Op] | None = None) -> list[tuple[str, int]] | None:
    """The graph inputs (with dims) that would have to be batched for tensor `name` to be batched along `dim`:
    the rules read backwards. None if no inputs would do."""
    inputs = graph.inputs if isinstance(graph, KernelGraph) else [bi.name for bi in graph.inputs]
    if name in inputs:
        return [(name, dim)]
    producers = graph.producers() if producers is None else producers
    op = producers[name]
    kind = OPS[op.op].kind
    shapes = [graph.tensors[i].shape for i in op.inputs]
    rank = len(graph.tensors[name].shape)
    if op.block is not None:
        block = op.block
        bo = block.outputs[op.outputs.index(name)]
        g = _axis(block, bo.omap, dim)
        if g is not None:
            wanted = [(i, bi.imap[g]) for i, bi in zip(op.inputs, block.inputs) if bi.imap[g] is not None]
        else:
            inner = _sources(block, bo.name, dim) or []
            names = [bi.name for bi in block.inputs]
            wanted = [(op.inputs[names.index(t)], d) for t, d in inner]
    elif kind == "matmul" and dim >= rank - 2:
        k = dim - rank + 2  # 0: the rows of a, 1: the columns of b
        wanted = [(op.inputs[k], len(shapes[k]) - 2 + k)]
    elif kind in ("binary", "matmul", "rope", "dequant") or op.op == "accum_rescaled_sum":
        wanted = [(i, dim - rank + len(s)) for i, s in zip(op.inputs, shapes) if dim - rank + len(s) >= 0]
        wanted = [(i, d) for i, d in wanted if graph.tensors[i].shape[d] > 1]
    elif kind == "reduce":
        wanted = [(op.inputs[0], dim if op.attrs["keepdim"] or dim < op.attrs["dim"] else dim + 1)]
    else:  # unary, scalar, norm, concat, the other accumulators: the same dim of every operand
        wanted = [(i, dim) for i in op.inputs]
    found = []
    for operand, d in wanted:
        more = _sources(graph, operand, d, producers)
        if more is None:
            return None
        found += more
    return found or None


def _walk(graph: KernelGraph, batch: Dims) -> tuple[Dims, dict[int, int], dict[int, Dims]]:
    """Every tensor's batch dim; per graph_def (by op index), the grid axis carrying the batch, or the batch dims
    inside its block graph. A conflict lists the inputs that would resolve it, if any."""
    dims: Dims = {n: batch.get(n) for n in graph.inputs}
    axes, inner = {}, {}
    for k, op in enumerate(graph.ops):
        ins = [dims[i] for i in op.inputs]
        try:
            if op.block is None:
                dims[op.outputs[0]] = _op(op, graph, ins)
                continue
            outs, g, block_dims = _graph_def(op, ins)
        except _Conflict as c:
            needs = [_sources(graph, t, d) for t, d in c.needs]
            if not needs or None in needs:
                raise _Conflict from None
            raise _Conflict(*(n for ns in needs for n in ns)) from None
        dims.update(zip(op.outputs, outs))
        if g is not None:
            axes[k] = g
        if block_dims is not None:
            inner[k] = block_dims
    return dims, axes, inner


def _batch(a: KernelGraph, b: KernelGraph, seed: str, dim: int) -> tuple[Dims, int] | None:
    """The batch grown from input `seed` batched along `dim`, with its number of chunks; None if none."""
    batch: Dims = {seed: dim}
    while True:
        try:
            walks = _walk(a, batch), _walk(b, batch)
        except _Conflict as c:
            if not c.needs or any(batch.get(n, d) != d for n, d in c.needs) or all(n in batch for n, _ in c.needs):
                return None
            batch.update(c.needs)
            continue
        if [walks[0][0][o] for o in a.outputs] != [walks[1][0][o] for o in b.outputs]:
            return None
        sizes = [a.tensors[n].shape[d] for n, d in batch.items()]
        grids = [g.ops[k].block.grid[axis] for g, w in zip((a, b), walks) for k, axis in w[1].items()]
        return batch, math.gcd(*sizes, *grids)


def _divided(types: dict[str, TensorType], dims: Dims, chunks: int) -> dict[str, TensorType]:
    out = {}
    for n, ty in types.items():
        shape = list(ty.shape)
        if dims.get(n) is not None:
            shape[dims[n]] //= chunks
        out[n] = TensorType(tuple(shape), ty.dtype)
    return out


def _rebuild(graph: KernelGraph, batch: Dims, chunks: int) -> KernelGraph | None:
    """graph with every batched dim, and every grid axis carrying the batch, divided by `chunks`; None if the
    IR's builders disagree with the rules."""
    dims, axes, inner = _walk(graph, batch)
    out = KernelGraph(graph.name)
    for n in graph.inputs:
        out.input(n, _divided(graph.tensors, dims, chunks)[n].shape, graph.tensors[n].dtype)
    for k, op in enumerate(graph.ops):
        if op.block is None:
            out.op(op.op, *op.inputs, out=op.outputs[0], **op.attrs)
            continue
        old = op.block
        grid = tuple(size // chunks if axes.get(k) == axis else size for axis, size in enumerate(old.grid))
        block = BlockGraph(grid, old.forloop_range, old.block_size)
        for name, bi in zip(op.inputs, old.inputs):
            block.input(out.tensors[name], bi.imap, bi.fmap, name=bi.name)
        for bop in old.ops:
            block.op(bop.op, *bop.inputs, out=bop.outputs[0], **bop.attrs)
        for bo in old.outputs:
            block.output(bo.name, bo.omap)
        if block.tensors != _divided(old.tensors, inner.get(k, {}), chunks):
            return None
        out.graph_def(block, inputs=op.inputs, outs=op.outputs)
    for o in graph.outputs:
        out.output(o)
    return out if out.tensors == _divided(graph.tensors, dims, chunks) else None


def shrink(a: KernelGraph, b: KernelGraph) -> tuple[KernelGraph, KernelGraph, tuple[str, ...]]:
    """a and b shrunk along every batch found (same inputs and outputs assumed), and one line per batch."""
    chunks_of: dict[str, int] = {}  # a batch's inputs and dims -> its chunks over all shrinks
    while True:
        found = []
        for n in a.inputs:
            for d, size in enumerate(a.tensors[n].shape):
                if size > 1 and not any(batch.get(n) == d for batch, _ in found):  # a batch grows from any member
                    found += [x for x in [_batch(a, b, n, d)] if x is not None and x[1] > 1]
        if not found:
            break
        batch, chunks = max(found, key=lambda x: sum(math.prod(a.tensors[n].shape) for n in x[0]) * (1 - 1 / x[1]))
        try:
            small = _rebuild(a, batch, chunks), _rebuild(b, batch, chunks)
        except IRError:
            small = None, None
        if None in small:
            break  # the rules and the IR disagree (a bug): keep the pair as shrunk so far
        a, b = small
        where = ", ".join(f"{n}[{d}]" for n, d in batch.items())
        chunks_of[where] = chunks_of.get(where, 1) * chunks
    return a, b, tuple(f"{where} in {chunks} chunks" for where, chunks in chunks_of.items())
