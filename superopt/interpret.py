"""The reference interpreter: the meaning of every graph, on torch CPU tensors.

A graph-defined op is executed literally: for each block index, for each forloop iteration, slice the inputs
by imap/fmap, run the loop ops, feed the accumulators; then run the epilogue once and write by omap.
`precision="float64"` computes everything in float64; `"native"` rounds every op's result to its tensor's
dtype (computing each op in float32, as GPU kernels accumulate).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from superopt.errors import SuperoptError
from superopt.ir import BlockGraph, BlockInput, KernelGraph, Op
from superopt.ops import ACCUMULATORS, DTYPES, TensorType


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt(centered.square().mean(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] for the halves x1, x2 of the last dim."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def is_packed_int4(q: torch.Tensor, scale: torch.Tensor, group: int) -> bool:
    """Whether dequant's q holds int4 bytes: its rows are half as long as the values its scales cover (the shape
    rule; an interpretation sees q's elements, not its IR type)."""
    return q.shape[-1] * 2 == scale.shape[-1] * group


def nibble_order(low: torch.Tensor, high: torch.Tensor, high_first: bool) -> torch.Tensor:
    """The values of int4 bytes from each byte's low and high nibble (as any interpretation has them): value 2j
    from the low nibble of byte j and 2j + 1 from the high one, swapped where high_first."""
    return torch.stack([high, low] if high_first else [low, high], -1).flatten(-2)


def unpack_int4(q: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """int4 bytes (any tensor holding the byte values 0..255) as their signed values, two per byte along the last
    dim (nibble_order), as int64."""
    byte = q.to(torch.int64)
    return (nibble_order(byte & 15, byte >> 4, high_first) ^ 8) - 8  # two's complement of 4 bits: 8..15 are -8..-1


def _dequant(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, *, group: int, high_first: bool
) -> torch.Tensor:
    """(q - zero) * scale in scale's precision (float32, or float64 for precision="float64"), each scale and zero
    repeated over its group of the last dim (a copy: bit for bit)."""
    values = (unpack_int4(q, high_first) if is_packed_int4(q, scale, group) else q).to(scale.dtype)
    if zero is not None:
        values = values - zero.repeat_interleave(group, -1)
    return values * scale.repeat_interleave(group, -1)


# Predefined ops: rule(*operands, **attrs) -> tensor.
REFERENCE: dict[str, Callable[..., torch.Tensor]] = {
    "matmul": torch.matmul,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "exp": torch.exp,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "square": torch.square,
    "neg": torch.neg,
    "mul_scalar": lambda x, c: x * c,
    "add_scalar": lambda x, c: x + c,
    "sum": lambda x, dim, keepdim: x.sum(dim, keepdim=keepdim),
    "max": lambda x, dim, keepdim: x.amax(dim, keepdim=keepdim),
    "argmax": lambda x, dim, keepdim: x.argmax(dim, keepdim=keepdim).to(x.dtype),  # the IR has float dtypes only
    "mean": lambda x, dim, keepdim: x.mean(dim, keepdim=keepdim),
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "rope": lambda x, cos, sin: x * cos + rotate_half(x) * sin,
    "concat": lambda a, b, dim: torch.cat([a, b], dim),
    "dequant": _dequant,
}


def _sum_last(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.sum(-1, keepdim=True) for x in xs]).sum(0)


def _rescaled_sum(xs: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
    top = torch.stack(ms).amax(0)
    return torch.stack([x * torch.exp(m - top) for x, m in zip(xs, ms)]).sum(0)


# Accumulators: rule(per-iteration values of each operand, **attrs) -> tensor.
ACCUMULATE: dict[str, Callable[..., torch.Tensor]] = {
    "accum_sum": lambda xs: torch.stack(xs).sum(0),
    "accum_sum_last": _sum_last,
    "accum_mean_last": lambda xs: _sum_last(xs) / (len(xs) * xs[0].shape[-1]),
    "accum_rms_last": lambda xs, eps: torch.sqrt(
        _sum_last([x.square() for x in xs]) / (len(xs) * xs[0].shape[-1]) + eps
    ),
    "accum_max": lambda xs: torch.stack(xs).amax(0),
    "accum_rescaled_sum": _rescaled_sum,
}


class TorchEval:
    """Evaluates ops in one precision: float64 everywhere, or each result rounded to its own dtype.

    Other interpretations over tensors (the finite field in verify/) supply an object with the same three
    methods, `cast`, `op` and `accumulate`, and reuse `evaluate` and `run_block` unchanged.
    """

    def __init__(self, precision: str) -> None:
        if precision not in ("native", "float64"):
            raise SuperoptError(f"precision must be 'native' or 'float64', got {precision!r}")
        self.float64 = precision == "float64"

    def cast(self, x: torch.Tensor, ty: TensorType) -> torch.Tensor:
        return x.to(torch.float64 if self.float64 else DTYPES[ty.dtype].torch)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.float64 else x.float()

    def op(self, op: Op, args: list[torch.Tensor], ty: TensorType) -> torch.Tensor:
        return self.cast(REFERENCE[op.op](*map(self.compute, args), **op.attrs), ty)

    def accumulate(self, op: Op, per_iter: list[list[torch.Tensor]], ty: TensorType) -> torch.Tensor:
        operands = [[self.compute(x) for x in xs] for xs in zip(*per_iter)]
        return self.cast(ACCUMULATE[op.op](*operands, **op.attrs), ty)


def _slice_input(x: torch.Tensor, bi: BlockInput, block: BlockGraph, bidx: tuple[int, ...], it: int) -> torch.Tensor:
    for axis, dim in enumerate(bi.imap):
        if dim is not None:
            size = x.shape[dim] // block.grid[axis]
            x = x.narrow(dim, bidx[axis] * size, size)
    if bi.fmap is not None:
        size = x.shape[bi.fmap] // block.forloop_range
        x = x.narrow(bi.fmap, it * size, size)
    return x


def run_block(block: BlockGraph, args: list[torch.Tensor], ev: TorchEval) -> list[torch.Tensor]:
    """One graph-defined op, literally: every block, every loop iteration."""
    loop_ops = [op for op in block.ops if op.op not in ACCUMULATORS and not any(block.after_loop[i] for i in op.inputs)]
    accums = [op for op in block.ops if op.op in ACCUMULATORS]
    epilogue = [op for op in block.ops if op.op not in ACCUMULATORS and any(block.after_loop[i] for i in op.inputs)]
    outs = [ev.cast(torch.empty(block.output_type(o).shape), block.output_type(o)) for o in block.outputs]
    for bidx in itertools.product(*(range(g) for g in block.grid)):
        seen: list[list[list[torch.Tensor]]] = [[] for _ in accums]
        for it in range(block.forloop_range):
            env = {bi.name: _slice_input(x, bi, block, bidx, it) for bi, x in zip(block.inputs, args)}
            for op in loop_ops:
                env[op.outputs[0]] = ev.op(op, [env[i] for i in op.inputs], block.tensors[op.outputs[0]])
            for k, op in enumerate(accums):
                seen[k].append([env[i] for i in op.inputs])
        env = {op.outputs[0]: ev.accumulate(op, seen[k], block.tensors[op.outputs[0]]) for k, op in enumerate(accums)}
        for op in epilogue:
            env[op.outputs[0]] = ev.op(op, [env[i] for i in op.inputs], block.tensors[op.outputs[0]])
        for out, bo in zip(outs, block.outputs):
            tile = env[bo.name]
            dst = out
            for axis, dim in enumerate(bo.omap):
                if dim is not None:
                    dst = dst.narrow(dim, bidx[axis] * tile.shape[dim], tile.shape[dim])
            dst.copy_(tile)
    return outs


def run(graph: KernelGraph, inputs: dict[str, torch.Tensor], precision: str = "native") -> list[torch.Tensor]:
    """Runs `graph` on CPU tensors, one per graph input by name; returns the outputs in order.

    Inputs are converted to the computing dtype (float64, or each input's own dtype); their shapes must match.
    """
    ev = TorchEval(precision)
    missing = [n for n in graph.inputs if n not in inputs]
    extra = [n for n in inputs if n not in graph.tensors or n not in graph.inputs]
    if missing or extra:
        raise SuperoptError(
            f"{graph.name}: inputs missing: {missing or 'none'}; not inputs of the graph: {extra or 'none'}"
        )
    args = []
    for name in graph.inputs:
        ty = graph.tensors[name]
        x = torch.as_tensor(inputs[name])
        if tuple(x.shape) != ty.shape:
            raise SuperoptError(
                f"{graph.name}: input '{name}' has shape {list(x.shape)}, the graph expects {list(ty.shape)}"
            )
        if DTYPES[ty.dtype].integer and x.dtype != DTYPES[ty.dtype].torch:  # a cast would wrap or truncate
            raise SuperoptError(f"{graph.name}: input '{name}' ({ty}) must be a {DTYPES[ty.dtype].torch} tensor")
        args.append(ev.cast(x.detach().cpu(), ty))
    return evaluate(graph, args, ev)


def evaluate(graph: KernelGraph, args: list[torch.Tensor], ev: TorchEval) -> list[torch.Tensor]:
    """Runs `graph` on `args` (one per input, in order, already in ev's representation)."""
    env = dict(zip(graph.inputs, args))
    for op in graph.ops:
        args = [env[i] for i in op.inputs]
        if op.block is not None:
            env.update(zip(op.outputs, run_block(op.block, args, ev)))
        else:
            env[op.outputs[0]] = ev.op(op, args, graph.tensors[op.outputs[0]])
    return [env[o] for o in graph.outputs]


def random_inputs(graph: KernelGraph, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded normal inputs in each input's dtype, scaled by `scale`; integer inputs (quantized weights) are
    uniform over their dtype's range whatever the scale (their scales are float inputs). The same seed gives the
    same tensors."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in graph.inputs:
        ty = DTYPES[graph.tensors[n].dtype]
        if ty.integer:
            info = torch.iinfo(ty.torch)
            out[n] = torch.randint(info.min, info.max + 1, graph.tensors[n].shape, generator=gen, dtype=ty.torch)
        else:
            out[n] = (torch.randn(graph.tensors[n].shape, generator=gen, dtype=torch.float64) * scale).to(ty.torch)
    return out
