"""Graph-defined ops run with all blocks and all loop iterations at once, for any evaluator.

`superopt.interpret.run_block` executes a block graph literally, one block and one iteration at a time; that is
the definition, and too slow for the verifier at full sizes (thousands of blocks x iterations of Python). Here
every tile carries leading batch dims, one per grid axis and one for the loop iteration: a block input is
reshaped so that the slice block b / iteration i would read sits at batch index (b, i); a tile that does not
depend on an axis has size 1 there and broadcasts. Ops see their tile dims after the batch dims (operands of
lower rank are padded so broadcasting lines up, `dim` attributes are shifted); accumulators get the
per-iteration values as `run_block` gives them. Values are the evaluator's own tensors; `lead` leading dims
before the logical ones (the finite field's test components) ride along. Tests hold it equal to `run_block`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from superopt.ir import BlockGraph, BlockInput, BlockOutput, KernelGraph, Op
from superopt.ops import ACCUMULATORS, TensorType


class Evaluator(Protocol):
    def op(self, op: Op, args: list[torch.Tensor], ty: TensorType) -> torch.Tensor: ...

    def accumulate(self, op: Op, per_iter: list[list[torch.Tensor]], ty: TensorType) -> torch.Tensor: ...


def _tiles(x: torch.Tensor, bi: BlockInput, block: BlockGraph, lead: int) -> torch.Tensor:
    """x reshaped to (lead dims..., grid axes..., iteration, tile dims...)."""
    split = list(x.shape[:lead])
    position: dict[int | str, int] = {}  # grid axis or "loop" -> its dim in `split`
    for dim, size in enumerate(x.shape[lead:]):
        for axis, mapped in enumerate(bi.imap):
            if mapped == dim:
                position[axis] = len(split)
                split.append(block.grid[axis])
                size //= block.grid[axis]
        if bi.fmap == dim:
            position["loop"] = len(split)
            split.append(block.forloop_range)
            size //= block.forloop_range
        split.append(size)
    x = x.reshape(split)
    keys: list[int | str] = [*range(len(block.grid)), "loop"]
    front = [position[k] for k in keys if k in position]
    x = x.permute(list(range(lead)) + front + [d for d in range(lead, x.dim()) if d not in front])
    batch = [(block.grid + (block.forloop_range,))[i] if k in position else 1 for i, k in enumerate(keys)]
    return x.reshape(x.shape[:lead] + tuple(batch) + x.shape[lead + len(front) :])


def _untile(y: torch.Tensor, bo: BlockOutput, block: BlockGraph, lead: int) -> torch.Tensor:
    """The inverse for an output tile (iteration dim of size 1): grid axis a concatenates along omap[a]."""
    n = len(block.grid)
    y = y.expand(*y.shape[:lead], *block.grid, *y.shape[lead + n :])
    y = y.reshape(y.shape[: lead + n] + y.shape[lead + n + 1 :])  # drop the iteration dim
    order = list(range(lead)) + [lead + a for a in range(n) if bo.omap[a] is None]  # size 1 (the IR requires it)
    for d in range(y.dim() - lead - n):
        order += [lead + a for a in range(n) if bo.omap[a] == d] + [lead + n + d]
    return y.permute(order).reshape(y.shape[:lead] + block.output_type(bo).shape)


def _batched_op(op: Op, nb: int) -> Op:
    attrs = {k: v + nb if k == "dim" else v for k, v in op.attrs.items()}
    return Op(op.op, op.inputs, op.outputs, attrs)


def _operands(op: str, xs: list[torch.Tensor], ranks: list[int], lead: int, nb: int) -> list[torch.Tensor]:
    """Tiles padded to one rank after the `lead` and `nb` batch dims. concat's operands are expanded to one batch
    shape, as it is the one op that does not broadcast (the others must not see expanded views: matmul would
    copy them)."""
    xs = [x.reshape(x.shape[: lead + nb] + (1,) * (max(ranks) - r) + x.shape[lead + nb :]) for x, r in zip(xs, ranks)]
    if op != "concat":
        return xs
    batch = torch.broadcast_shapes(*(x.shape[lead : lead + nb] for x in xs))
    return [x.expand(*x.shape[:lead], *batch, *x.shape[lead + nb :]) for x in xs]


def run_block(block: BlockGraph, args: list[torch.Tensor], ev: Evaluator, lead: int = 0) -> list[torch.Tensor]:
    """Same results as `superopt.interpret.run_block(block, args, ev)`, all blocks and iterations at once."""
    nb = len(block.grid) + 1
    loop = lead + nb - 1
    env = {bi.name: _tiles(x, bi, block, lead) for bi, x in zip(block.inputs, args)}
    for op in block.ops:
        ty = block.tensors[op.outputs[0]]
        ranks = [len(block.tensors[i].shape) for i in op.inputs]
        operands = _operands(op.op, [env[i] for i in op.inputs], ranks, lead, nb)
        if op.op in ACCUMULATORS:
            steps = block.forloop_range
            per_iter = [[x.narrow(loop, it, 1) if x.shape[loop] > 1 else x for x in operands] for it in range(steps)]
            env[op.outputs[0]] = ev.accumulate(_batched_op(op, nb), per_iter, ty)
        else:
            env[op.outputs[0]] = ev.op(_batched_op(op, nb), operands, ty)
    return [_untile(env[bo.name], bo, block, lead) for bo in block.outputs]


def evaluate(graph: KernelGraph, args: list[torch.Tensor], ev: Evaluator, lead: int = 0) -> list[torch.Tensor]:
    """`superopt.interpret.evaluate` with graph-defined ops run by the batched `run_block`; values have `lead`
    representation dims before the logical ones."""
    env = dict(zip(graph.inputs, args))
    for op in graph.ops:
        operands = [env[i] for i in op.inputs]
        if op.block is not None:
            env.update(zip(op.outputs, run_block(op.block, operands, ev, lead)))
        else:
            env[op.outputs[0]] = ev.op(op, operands, graph.tensors[op.outputs[0]])
    return [env[o] for o in graph.outputs]
