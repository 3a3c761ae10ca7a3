"""Triton code generation for µGraphs: one Triton kernel per kernel op.

A graph-defined op's block graph becomes one kernel: its grid is the launch grid (axis a = tl.program_id(a)),
imaps and fmaps become pointer offsets (block index x block extent, loop iteration x tile extent, times the
tensor's strides), the forloop is a `for` loop, and accumulators keep float32 state in registers across it.
Predefined ops are lowered to block graphs first (kernels/lower.py), so every kernel is generated one way.

Tiles live in registers as float32 Triton tensors of the IR tile's rank. Triton tensors have power-of-two
extents and tl.dot needs every extent >= 16, so each dim of real size n > 1 is padded to max(16, 2^ceil(log2 n))
(size-1 dims stay 1, so broadcasting works as in the IR); loads and stores are masked, and sums, maxima and dot
products over a padded dim mask the padding unless it is known to hold zeros. A concat is kept as its parts
(`Pieces`): ops distribute over them, a dot over a concatenated K is a sum of dots, a store writes each part.
Single-consumer elementwise chains (superopt.ir.thread_graphs) are emitted as one expression.

CPU tensors run under the Triton interpreter on a machine without a GPU (or wherever TRITON_INTERPRET=1 asks for
it). Triton fixes the mode for the whole process when it is first imported (its own modules decorate kernels as
they load), so the first run on CPU tensors switches the interpreter on (`use_interpreter`), and says so if
triton was already imported for the GPU.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import keyword
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from superopt.cache import Cache
from superopt.errors import SuperoptError
from superopt.ir import BlockGraph, BlockInput, KernelGraph, Op, format_block, identifier, thread_graphs
from superopt.kernels.lower import lower, padded, sums_after_loop, unrolled
from superopt.ops import ACCUMULATORS, DTYPES


class CodegenError(SuperoptError):
    """A µGraph this code generator cannot express in Triton; the message names the op."""


RESERVED_NAMES = frozenset(dir(builtins)) | {"tl", "triton", "torch"}  # names generated code relies on

# --- values: what an IR tile is in the generated code --------------------------------------------------------


@dataclass
class Tile:
    """A float32 register tensor: `expr` is a variable or (inside a thread graph) an expression; `shape` is the
    IR tile's real shape; `zero_pads` says the padding lanes hold zeros."""

    expr: str
    shape: tuple[int, ...]
    zero_pads: bool


@dataclass
class Pieces:
    """A concat along `dim`, kept as its parts."""

    dim: int
    parts: list[Tile | Pieces]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)


@dataclass
class Unloaded:
    """A block input only dequant reads (an int4 q; a scale or zero): dequant loads it itself, each lane of its
    result from the element that lane needs (its value's byte, its group's scale), so nothing is expanded in
    registers."""

    input: BlockInput


Value = Tile | Pieces


def _atom(expr: str) -> str:
    """`expr` safe to index or apply an operator to."""
    return expr if expr.isidentifier() else f"({expr})"


def _expand(expr: str, dim: int, rank: int) -> str:
    """A 1-d tensor placed at `dim` of a rank-`rank` tensor (`v[None, :]`)."""
    if rank == 1:
        return expr
    return f"{_atom(expr)}[{', '.join(':' if d == dim else 'None' for d in range(rank))}]"


def _lift(expr: str, rank: int, to: int) -> str:
    """Leading size-1 dims, so tensors of different rank broadcast as the IR's right-aligned rule says."""
    return expr if rank == to else f"{_atom(expr)}[{', '.join(['None'] * (to - rank) + [':'] * rank)}]"


# --- the emitter ---------------------------------------------------------------------------------------------


@dataclass
class Emitter:
    """Lines of one kernel body, in three regions: before the loop (index vectors, loop-invariant loads and
    ops, accumulator state), the loop body, and after the loop (finalized accumulators, epilogue, stores)."""

    block: BlockGraph
    pre: list[str] = field(default_factory=list)
    loop: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    reserved: set[str] = field(default_factory=set)  # the IR's tile names: each names its own variable
    used: set[str] = field(default_factory=set)
    aranges: dict[int, str] = field(default_factory=dict)
    params: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # input tile -> (pointer, strides)
    # A loaded tile's float32 variable -> (the load in the input's dtype, that dtype): tl.dot takes the load
    # itself, so Triton's pipeliner sees load -> dot and stages it through shared memory asynchronously.
    native: dict[str, tuple[str, str]] = field(default_factory=dict)
    region: str = "pre"
    pids: list[str] = field(default_factory=list)  # the grid axes' program ids
    it: str = "it"  # the loop variable

    def fresh(self, base: str) -> str:
        """A new variable name: an IR tile's own name the first time, else `base` with a number."""
        if keyword.iskeyword(base) or base in RESERVED_NAMES:
            base = f"t_{base}"
        if base in self.reserved and base not in self.used:
            self.used.add(base)
            return base
        name, n = base, 1
        while name in self.used or name in self.reserved:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name

    def emit(self, line: str) -> None:
        getattr(self, self.region).append(line)

    def assign(self, expr: str, base: str) -> str:
        name = self.fresh(base)
        self.emit(f"{name} = {expr}")
        return name

    def bind(self, value: Value, base: str) -> Value:
        """Puts a value's expressions into variables (named after the IR tile)."""
        if isinstance(value, Pieces):
            return Pieces(value.dim, [self.bind(p, f"{base}_{k}") for k, p in enumerate(value.parts)])
        if value.expr.isidentifier():
            return value
        return Tile(self.assign(value.expr, base), value.shape, value.zero_pads)

    def var(self, tile: Tile) -> Tile:
        """`tile` as a variable, for expressions that use it twice."""
        return tile if tile.expr.isidentifier() else Tile(self.assign(tile.expr, "t"), tile.shape, tile.zero_pads)

    def var_value(self, value: Value) -> Value:
        return _map_tiles(value, self.var)

    def index(self, size: int) -> str:
        """The index vector over a dim of real size `size` (its padded extent is the constexpr BLOCK_<size>)."""
        if size not in self.aranges:
            self.aranges[size] = self.fresh(f"i_{size}")
        return self.aranges[size]

    def dim_mask(self, size: int, dim: int, rank: int) -> str | None:
        if padded(size) == size:
            return None
        return _expand(f"{self.index(size)} < {size}", dim, rank)

    def tile_mask(self, shape: tuple[int, ...]) -> str | None:
        masks = [m for d, s in enumerate(shape) if (m := self.dim_mask(s, d, len(shape))) is not None]
        return " & ".join(masks) or None

    def masked(self, tile: Tile, dim: int, fill: str, needed: bool = True) -> str:
        """`tile` with the padding of `dim` set to `fill` (where it matters and may not already hold it)."""
        mask = self.dim_mask(tile.shape[dim], dim, len(tile.shape))
        if mask is None or not needed:
            return tile.expr
        return f"tl.where({mask}, {tile.expr}, {fill})"


def _distribute(fn: Callable[..., Value], dim: int, parts_of: list[Value], what: str) -> Value:
    """Applies `fn` to the parts of concatenated operands (along `dim`, aligned right); operands that are not
    Pieces must broadcast along it."""
    rank = max(len(v.shape) for v in parts_of)
    counts = {len(v.parts) for v in parts_of if isinstance(v, Pieces)}
    sizes = {tuple(p.shape[v.dim] for p in v.parts) for v in parts_of if isinstance(v, Pieces)}
    for v in parts_of:
        shift = rank - len(v.shape)
        if isinstance(v, Pieces):
            aligned = v.dim + shift == dim
        else:
            aligned = dim < shift or v.shape[dim - shift] == 1  # it broadcasts along dim
        if not aligned:
            raise CodegenError(f"{what}: operands are concatenated along different dims; cannot split them")
    if len(counts) != 1 or len(sizes) != 1:
        raise CodegenError(f"{what}: operands are concatenated at different split points")
    return Pieces(
        dim, [fn(*(v.parts[k] if isinstance(v, Pieces) else v for v in parts_of)) for k in range(counts.pop())]
    )


def _pieces_dim(values: list[Value]) -> int | None:
    """The output dim along which the concatenated operand(s) among `values` split, aligned right."""
    rank = max(len(v.shape) for v in values)
    for v in values:
        if isinstance(v, Pieces):
            return v.dim + rank - len(v.shape)
    return None


# --- per-op rules: rule(emitter, op, operands) -> value -------------------------------------------------------

UNARY = {
    "exp": ("tl.exp({x})", False),
    "silu": ("{x} * tl.sigmoid({x})", True),
    "gelu": ("0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))", True),  # torch's exact (erf) gelu
    # gelu's tanh form, tanh(u) written 2 sigmoid(2u) - 1, with 2 sqrt(2 / pi) = 1.5957691216057308
    "gelu_tanh": ("{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))", True),
    "relu": ("tl.maximum({x}, 0.0)", True),
    "sigmoid": ("tl.sigmoid({x})", False),
    "sqrt": ("tl.sqrt({x})", True),
    "rsqrt": ("tl.rsqrt({x})", False),
    "square": ("{x} * {x}", True),
    "neg": ("-{x}", True),
    "mul_scalar": ("{x} * {c}", True),
    "add_scalar": ("{x} + {c}", False),
}
BINARY = {"add": ("+", True), "sub": ("-", True), "mul": ("*", True), "div": ("/", False)}


def _constant(c: float) -> str:
    return repr(c) if math.isfinite(c) else f"float('{c}')"


def _unary(em: Emitter, op: Op, args: list[Value]) -> Value:
    (x,) = args
    if isinstance(x, Pieces):
        return _distribute(lambda p: _unary(em, op, [p]), x.dim, [x], op.op)
    template, keeps_zero = UNARY[op.op]
    if template.count("{x}") > 1:
        x = em.var(x)
    call = template.startswith("tl.") and template.endswith("({x})")  # the operand is a call's whole argument
    expr = template.format(x=x.expr if call else _atom(x.expr), **{k: _constant(v) for k, v in op.attrs.items()})
    return Tile(expr, x.shape, x.zero_pads and keeps_zero)


def _binary(em: Emitter, op: Op, args: list[Value]) -> Value:
    dim = _pieces_dim(args)
    if dim is not None:
        return _distribute(lambda a, b: _binary(em, op, [a, b]), dim, args, op.op)
    a, b = args
    rank = max(len(a.shape), len(b.shape))
    symbol, keeps_zero = BINARY[op.op]
    shape = tuple(
        max(x, y) for x, y in zip((1,) * (rank - len(a.shape)) + a.shape, (1,) * (rank - len(b.shape)) + b.shape)
    )
    expr = f"{_lift(_atom(a.expr), len(a.shape), rank)} {symbol} {_lift(_atom(b.expr), len(b.shape), rank)}"
    return Tile(expr, shape, keeps_zero and a.zero_pads and b.zero_pads)


def _reduce_tile(em: Emitter, kind: str, x: Tile, dim: int, keepdim: bool) -> Tile:
    fill = "float('-inf')" if kind == "max" else "0.0"
    expr = em.masked(x, dim, fill, needed=kind == "max" or not x.zero_pads)
    fn = "tl.max" if kind == "max" else "tl.sum"
    shape = list(x.shape)
    shape[dim : dim + 1] = [1] if keepdim else []
    return Tile(f"{fn}({expr}, axis={dim}, keep_dims={keepdim})", tuple(shape), x.zero_pads)


def _reduce_value(em: Emitter, kind: str, x: Value, dim: int, keepdim: bool) -> Value:
    """sum or max over `dim`; over a concatenated dim, the parts' results are combined."""
    if isinstance(x, Tile):
        return _reduce_tile(em, kind, x, dim, keepdim)
    if x.dim != dim:
        return Pieces(
            x.dim - (not keepdim and dim < x.dim), [_reduce_value(em, kind, p, dim, keepdim) for p in x.parts]
        )
    parts = [_reduce_value(em, kind, p, dim, keepdim) for p in x.parts]
    expr = parts[0].expr
    for p in parts[1:]:
        expr = f"tl.maximum({expr}, {p.expr})" if kind == "max" else f"{_atom(expr)} + {_atom(p.expr)}"
    return Tile(expr, parts[0].shape, all(p.zero_pads for p in parts))


def _argmax_value(em: Emitter, x: Value, dim: int, keepdim: bool) -> Value:
    """The first index of the maximum over `dim`, as float32 (tl.argmax's tie_break_left: the lowest index among
    equal maxima, as torch.argmax); padding is -inf, so a real lane wins any tie with it. Over a concatenated
    dim, a later part's maximum replaces the running one only where it is greater, its index offset by the
    parts before it."""
    shape = list(x.shape)
    shape[dim : dim + 1] = [1] if keepdim else []
    if isinstance(x, Tile):
        expr = em.masked(x, dim, "float('-inf')")
        index = f"tl.argmax({expr}, axis={dim}, tie_break_left=True, keep_dims={keepdim})"
        return Tile(f"{index}.to(tl.float32)", tuple(shape), x.zero_pads)
    if x.dim != dim:
        return Pieces(x.dim - (not keepdim and dim < x.dim), [_argmax_value(em, p, dim, keepdim) for p in x.parts])
    best = where = ""
    offset = 0
    for part in x.parts:
        if isinstance(part, Pieces):
            raise CodegenError("argmax: a concatenation nested in the concatenated dim is not supported")
        expr = em.masked(part, dim, "float('-inf')")
        value, index = em.fresh("part_max"), em.fresh("part_arg")
        em.emit(
            f"{value}, {index} = tl.max({expr}, axis={dim}, return_indices=True, return_indices_tie_break_left=True, "
            f"keep_dims={keepdim})"
        )
        if best:
            em.emit(f"{where} = tl.where({value} > {best}, {index} + {offset}, {where})")
            em.emit(f"{best} = tl.maximum({best}, {value})")
        else:
            best, where = value, index
        offset += part.shape[dim]
    return Tile(f"{where}.to(tl.float32)", tuple(shape), all(p.zero_pads for p in x.parts))


def _argmax(em: Emitter, op: Op, args: list[Value]) -> Value:
    return _argmax_value(em, args[0], op.attrs["dim"], op.attrs["keepdim"])


def _divide(x: Value, by: str) -> Value:
    if isinstance(x, Pieces):
        return Pieces(x.dim, [_divide(p, by) for p in x.parts])
    return Tile(f"{_atom(x.expr)} / {by}", x.shape, x.zero_pads)


def _reduce(em: Emitter, op: Op, args: list[Value]) -> Value:
    (x,) = args
    dim, keepdim = op.attrs["dim"], op.attrs["keepdim"]
    total = _reduce_value(em, "max" if op.op == "max" else "sum", x, dim, keepdim)
    return _divide(total, str(x.shape[dim])) if op.op == "mean" else total


def _square(em: Emitter, x: Value) -> Value:
    if isinstance(x, Pieces):
        return Pieces(x.dim, [_square(em, p) for p in x.parts])
    x = em.var(x)
    return Tile(f"{x.expr} * {x.expr}", x.shape, x.zero_pads)


def _rms_norm(em: Emitter, op: Op, args: list[Value]) -> Value:
    x = em.var_value(args[0])
    last = len(x.shape) - 1
    ms = _reduce_value(em, "sum", _square(em, x), last, True)
    rms = em.assign(f"tl.sqrt({_atom(ms.expr)} / {x.shape[last]} + {op.attrs['eps']!r})", "rms")
    return _map_tiles(x, lambda t: Tile(f"{t.expr} / {rms}", t.shape, t.zero_pads))


def _layer_norm(em: Emitter, op: Op, args: list[Value]) -> Value:
    """x minus its mean, over the square root of the mean square of that (its padding masked: it is -mean)."""
    x = em.var_value(args[0])
    last = len(x.shape) - 1
    n = x.shape[last]
    mean = em.assign(f"{_atom(_reduce_value(em, 'sum', x, last, True).expr)} / {n}", "mean")
    centered = em.var_value(_map_tiles(x, lambda t: Tile(f"{t.expr} - {mean}", t.shape, False)))
    ms = _reduce_value(em, "sum", _square(em, centered), last, True)
    rms = em.assign(f"tl.sqrt({_atom(ms.expr)} / {n} + {op.attrs['eps']!r})", "rms")
    return _map_tiles(centered, lambda t: Tile(f"{t.expr} / {rms}", t.shape, False))


def _rope(em: Emitter, op: Op, args: list[Value]) -> Value:
    """x * cos + rotate_half(x) * sin. rotate_half is a signed permutation of the last dim, applied as a sum
    over x's last dim against its +-1 matrix (exact, and free of tl.dot's limits on small tiles)."""
    x, cos, sin = args
    if any(isinstance(v, Pieces) for v in args):
        raise CodegenError("rope: a concatenated operand is not supported")
    x = em.var(x)
    rank, half = len(x.shape), x.shape[-1] // 2
    k = em.index(x.shape[-1])
    src, dst = f"{k}[:, None]", f"{k}[None, :]"  # x's index, rotate_half's
    sign = em.assign(
        f"tl.where(({src} == {dst} + {half}) & ({dst} < {half}), -1.0, "
        f"tl.where(({src} + {half} == {dst}) & ({dst} >= {half}), 1.0, 0.0))",
        "rotate",
    )
    rotated = Tile(f"tl.sum({_insert_none(x.expr, rank, rank)} * {sign}, axis={rank - 1})", x.shape, False)
    terms = [_binary(em, Op("mul", (), ()), [x, cos]), _binary(em, Op("mul", (), ()), [rotated, sin])]
    return _binary(em, Op("add", (), ()), terms)


def _map_tiles(x: Value, fn: Callable[[Tile], Tile]) -> Value:
    return Pieces(x.dim, [_map_tiles(p, fn) for p in x.parts]) if isinstance(x, Pieces) else fn(x)


def _dot_operand(em: Emitter, x: Tile, k_dim: int, dtype: str, batch: tuple[int, ...]) -> str:
    """An operand of tl.dot: padding of K zeroed, in the graph's dtype, lifted to the batch shape."""
    if dtype == "bfloat16" and interpreting():
        # Triton's interpreter computes a bf16 dot wrongly (numpy has no bf16); float32 operands hold the bf16
        # values exactly, and accumulate in float32 as the GPU's bf16 MMA does
        dtype = "float32"
    expr = em.masked(x, k_dim, "0.0", needed=not x.zero_pads)
    if em.native.get(expr, (None, None))[1] == dtype:
        expr = em.native[expr][0]
    elif dtype != "float32":
        expr = f"{_atom(expr)}.to({DTYPES[dtype].triton})"
    if batch and (len(x.shape) == 2 or x.shape[0] != batch[0]):
        full = ", ".join(str(padded(s)) for s in batch + x.shape[-2:])
        expr = f"tl.broadcast_to({_lift(expr, len(x.shape), 3)}, ({full}))"
    return expr


def _insert_none(expr: str, rank: int, pos: int) -> str:
    return f"{_atom(expr)}[{', '.join([':'] * pos + ['None'] + [':'] * (rank - pos))}]"


def _dot(em: Emitter, a: Tile, b: Tile, dtype: str) -> Tile:
    rank = max(len(a.shape), len(b.shape))
    if rank > 3:
        raise CodegenError(f"matmul of rank {rank}: Triton's dot takes at most one batch dim")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = (max(a.shape[0] if len(a.shape) == 3 else 1, b.shape[0] if len(b.shape) == 3 else 1),) * (rank - 2)
    zero = a.zero_pads and b.zero_pads
    if 1 in (m, k, n):  # tl.dot needs extents >= 16: a product with a size-1 dim runs on CUDA cores
        lhs_k = em.masked(a, len(a.shape) - 1, "0.0", needed=not a.zero_pads)
        rhs_k = em.masked(b, len(b.shape) - 2, "0.0", needed=not b.zero_pads)
        lhs = _insert_none(_lift(lhs_k, len(a.shape), rank), rank, rank)  # (..., M, K, 1)
        rhs = _insert_none(_lift(rhs_k, len(b.shape), rank), rank, rank - 2)  # (..., 1, K, N)
        return Tile(f"tl.sum({lhs} * {rhs}, axis={rank - 1})", batch + (m, n), zero)
    precision = ', input_precision="ieee"' if dtype == "float32" else ""
    if batch == (1,):  # a 2-d dot: Hopper's warpgroup MMA (wgmma) takes no batch dim
        lhs, rhs = (_squeeze_batch(_dot_operand(em, x, len(x.shape) - d, dtype, ()), x) for x, d in ((a, 1), (b, 2)))
        return Tile(f"tl.reshape(tl.dot({lhs}, {rhs}{precision}), (1, {padded(m)}, {padded(n)}))", batch + (m, n), zero)
    lhs = _dot_operand(em, a, len(a.shape) - 1, dtype, batch)
    rhs = _dot_operand(em, b, len(b.shape) - 2, dtype, batch)
    return Tile(f"tl.dot({lhs}, {rhs}{precision})", batch + (m, n), zero)


def _squeeze_batch(expr: str, x: Tile) -> str:
    if len(x.shape) == 2:
        return expr
    return f"tl.reshape({expr}, ({padded(x.shape[-2])}, {padded(x.shape[-1])}))"


def _matmul_values(em: Emitter, a: Value, b: Value, dtype: str, what: str) -> Value:
    ra, rb = len(a.shape), len(b.shape)
    rank = max(ra, rb)
    if isinstance(a, Pieces) and a.dim == ra - 1 or isinstance(b, Pieces) and b.dim == rb - 2:
        if not (isinstance(a, Pieces) and isinstance(b, Pieces) and a.dim == ra - 1 and b.dim == rb - 2):
            raise CodegenError(f"{what}: only one operand is concatenated along the contracted dim")
        if [p.shape[-1] for p in a.parts] != [p.shape[-2] for p in b.parts]:
            raise CodegenError(f"{what}: the operands' concatenations along K split at different points")
        terms = [_matmul_values(em, pa, pb, dtype, what) for pa, pb in zip(a.parts, b.parts)]
        return _sum_values(terms)
    if isinstance(a, Pieces):
        if a.dim != ra - 2:
            raise CodegenError(f"{what}: concatenation along a batch dim is not supported")
        return Pieces(rank - 2, [_matmul_values(em, p, b, dtype, what) for p in a.parts])
    if isinstance(b, Pieces):
        if b.dim != rb - 1:
            raise CodegenError(f"{what}: concatenation along a batch dim is not supported")
        return Pieces(rank - 1, [_matmul_values(em, a, p, dtype, what) for p in b.parts])
    return _dot(em, a, b, dtype)


def _sum_values(terms: list[Value]) -> Value:
    if any(isinstance(t, Pieces) for t in terms):
        raise CodegenError("matmul: a sum of concatenated products is not supported")
    return Tile(" + ".join(t.expr for t in terms), terms[0].shape, all(t.zero_pads for t in terms))


def _matmul(em: Emitter, op: Op, args: list[Value]) -> Value:
    return _matmul_values(em, args[0], args[1], em.block.tensors[op.inputs[0]].dtype, op.op)


def _concat(em: Emitter, op: Op, args: list[Value]) -> Value:
    dim = op.attrs["dim"]
    parts = [p for v in args for p in (v.parts if isinstance(v, Pieces) and v.dim == dim else [v])]
    return Pieces(dim, parts)


def _dequant(em: Emitter, op: Op, args: list[Value | Unloaded]) -> Value:
    """(q - zero) * scale in float32, each lane's scale and zero loaded from its group (lane k reads element
    k // group) and, for int4, its byte (k // 2), the value shifted out of the low or high nibble."""
    q, *params = args
    if not all(isinstance(p, Unloaded) for p in params):
        raise CodegenError("dequant: its scale and zero must be block inputs that only dequant reads")
    shape = em.block.tensors[op.outputs[0]].shape
    rank, group = len(shape), op.attrs["group"]
    scale, *zero = (_load(em, p.input, gather=group) for p in params)
    if isinstance(q, Unloaded):
        byte = _load(em, q.input, gather=2).expr
        lane = _expand(em.index(shape[-1]), rank - 1, rank)
        shift = f"(1 - {lane} % 2) * 4" if op.attrs["high_first"] else f"({lane} % 2) * 4"
        values = f"((((({byte}.to(tl.int32) >> {shift}) & 15) ^ 8) - 8).to(tl.float32))"
    else:
        values = _atom(q.expr)
    if zero:
        values = f"({values} - {zero[0].expr})"
    # every load pads with zeros, so a padding lane is 0 * 0
    return Tile(f"{values} * {scale.expr}", shape, True)


EMIT: dict[str, Callable[[Emitter, Op, list[Value]], Value]] = {
    **{name: _unary for name in UNARY},
    **{name: _binary for name in BINARY},
    "sum": _reduce,
    "max": _reduce,
    "argmax": _argmax,
    "mean": _reduce,
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "rope": _rope,
    "matmul": _matmul,
    "concat": _concat,
    "dequant": _dequant,
}


# --- accumulators: rule(emitter, op, operands) -> value after the loop ----------------------------------------
# Each writes its state's initialization before the loop, its update in the loop, and its result after it.


def _state(em: Emitter, shape: tuple[int, ...], fill: str, base: str) -> str:
    padded_shape = ", ".join(str(padded(s)) for s in shape)
    name = em.fresh(base)
    em.pre.append(f"{name} = tl.full(({padded_shape},), {fill}, tl.float32)")
    return name


def _accum_elementwise(em: Emitter, op: Op, args: list[Value]) -> Value:
    """accum_sum and accum_max: one state per part."""
    (x,) = args
    if isinstance(x, Pieces):
        return Pieces(x.dim, [_accum_elementwise(em, op, [p]) for p in x.parts])
    is_max = op.op == "accum_max"
    acc = _state(em, x.shape, "float('-inf')" if is_max else "0.0", op.outputs[0])
    em.loop.append(f"{acc} = tl.maximum({acc}, {x.expr})" if is_max else f"{acc} += {x.expr}")
    return Tile(acc, x.shape, x.zero_pads)


def _accum_last(em: Emitter, op: Op, args: list[Value]) -> Value:
    """accum_sum_last / accum_mean_last / accum_rms_last: a sum over the iterations and the tile's last dim
    (elementwise in the loop and over the last dim after it, where `sums_after_loop`)."""
    (x,) = args
    last = len(x.shape) - 1
    if op.op == "accum_rms_last":
        x = _square(em, x)
    base = op.outputs[0] + ("_sum" if op.op != "accum_sum_last" else "")
    if isinstance(x, Tile) and sums_after_loop(x.shape, em.block.block_size):
        terms = _state(em, x.shape, "0.0", op.outputs[0] + "_terms")
        em.loop.append(f"{terms} += {x.expr}")
        total = em.bind(_reduce_tile(em, "sum", Tile(terms, x.shape, x.zero_pads), last, True), base)
        acc = total.expr
    else:
        total = _reduce_value(em, "sum", x, last, True)
        acc = _state(em, total.shape, "0.0", base)
        em.loop.append(f"{acc} += {total.expr}")
    count = em.block.forloop_range * x.shape[last]
    if op.op == "accum_sum_last":
        return Tile(acc, total.shape, total.zero_pads)
    if op.op == "accum_mean_last":
        return Tile(f"{acc} / {count}", total.shape, total.zero_pads)
    return Tile(f"tl.sqrt({acc} / {count} + {op.attrs['eps']!r})", total.shape, False)


def _accum_rescaled_sum(em: Emitter, op: Op, args: list[Value]) -> Value:
    """sum_i x_i * exp(m_i - max_j m_j), online: the running max rescales the running sum when it grows."""
    x, m = args
    if isinstance(m, Pieces):
        raise CodegenError("accum_rescaled_sum: a concatenated scale is not supported")
    top = _state(em, m.shape, "float('-inf')", op.outputs[0] + "_max")
    grown = em.fresh(op.outputs[0] + "_newmax")
    em.loop.append(f"{grown} = tl.maximum({top}, {m.expr})")
    rank = len(x.shape)

    def update(part: Tile) -> Tile:
        acc = _state(em, part.shape, "0.0", op.outputs[0])
        old, new = (
            _lift(f"tl.exp({top} - {grown})", len(m.shape), rank),
            _lift(f"tl.exp({m.expr} - {grown})", len(m.shape), rank),
        )
        em.loop.append(f"{acc} = {acc} * {old} + {_atom(part.expr)} * {new}")
        return Tile(acc, part.shape, part.zero_pads)

    result = _map_tiles(x, update)
    em.loop.append(f"{top} = {grown}")
    return result


ACCUMULATE: dict[str, Callable[[Emitter, Op, list[Value]], Value]] = {
    "accum_sum": _accum_elementwise,
    "accum_max": _accum_elementwise,
    "accum_sum_last": _accum_last,
    "accum_mean_last": _accum_last,
    "accum_rms_last": _accum_last,
    "accum_rescaled_sum": _accum_rescaled_sum,
}


# --- one kernel per block graph ------------------------------------------------------------------------------


def _regions(block: BlockGraph) -> dict[str, str]:
    """Where each tile is computed: before the loop (it does not change across iterations), in it, or after it."""
    region = {bi.name: "loop" if bi.fmap is not None else "pre" for bi in block.inputs}
    for op in block.ops:
        ins = {region[i] for i in op.inputs}
        region[op.outputs[0]] = "post" if op.op in ACCUMULATORS or "post" in ins else "loop" if "loop" in ins else "pre"
    return region


@dataclass
class KernelSource:
    """The generated module of one kernel: `source` defines the @triton.jit kernel `name` and `launch(*inputs)`,
    which allocates the outputs, launches the kernel and returns the outputs as a tuple."""

    name: str
    source: str
    signature: dict[str, str]  # kernel parameter -> Triton type ("*fp16", "i32", "constexpr")
    constexprs: dict[str, int]
    num_warps: int


def _load(em: Emitter, bi: BlockInput, gather: int | None = None) -> Tile:
    """Block input `bi`'s tile, in float32 (its dtype's load kept in `em.native` for tl.dot). With `gather`, the
    last dim is read as dequant's lanes: lane k of a row holds element k // gather of it (a group's scale, an
    int4 byte, which stays uint8), the tile `gather` times as long."""
    tile = em.block.tensors[bi.name].shape
    rank = len(tile)
    lanes = tile if gather is None else tile[:-1] + (tile[-1] * gather,)
    ptr, strides = em.params[bi.name]
    terms = []
    for d in range(rank):
        offset = [
            f"{em.pids[a]} * {bi.source.shape[d] // em.block.grid[a]}" for a, dim in enumerate(bi.imap) if dim == d
        ]
        index = _expand(em.index(lanes[d]), d, rank)
        offset.append(f"{_atom(index)} // {gather}" if gather is not None and d == rank - 1 else index)
        terms.append(f"({' + '.join(offset)}) * {strides[d]}" if len(offset) > 1 else f"{offset[0]} * {strides[d]}")
    ptrs = em.fresh(f"{bi.name}_ptrs")
    em.pre.append(f"{ptrs} = {ptr} + {' + '.join(terms)}")
    if bi.fmap is not None:
        ptrs = f"{ptrs} + {em.it} * {tile[bi.fmap]} * {strides[bi.fmap]}"
    mask = em.tile_mask(lanes)
    masking = f", mask={mask}, other=0" if mask else ""
    region = getattr(em, "loop" if bi.fmap is not None else "pre")
    var = em.fresh(bi.name)
    raw = em.fresh(f"{var}_{bi.source.dtype}")
    region.append(f"{raw} = tl.load({ptrs}{masking})")
    if gather is not None and DTYPES[bi.source.dtype].integer:
        return Tile(raw, lanes, True)  # int4 bytes: dequant shifts the values out
    region.append(f"{var} = {raw}.to(tl.float32)")
    if gather is not None:
        return Tile(var, lanes, True)
    em.native[var] = (raw, bi.source.dtype)
    return Tile(var, tile, True)


def _dequant_only(block: BlockGraph) -> set[str]:
    """The block inputs dequant loads itself: an int4 q, and scales and zeros no other op reads."""
    readers = block.consumers()
    return {
        bi.name
        for bi in block.inputs
        if bi.source.dtype == "int4"
        or readers[bi.name]
        and all(op.op == "dequant" and bi.name not in op.inputs[:1] for op in readers[bi.name])
    }


def _store(em: Emitter, value: Value, ptr: str, strides: list[str], offsets: list[str], dtype: str) -> None:
    """Writes `value` at `offsets` (per dim) of the output; a concat writes each part at its own offset."""
    if isinstance(value, Pieces):
        at = 0
        for part in value.parts:
            shifted = list(offsets)
            shifted[value.dim] = f"{offsets[value.dim]} + {at}" if at else offsets[value.dim]
            _store(em, part, ptr, strides, shifted, dtype)
            at += part.shape[value.dim]
        return
    rank = len(value.shape)
    terms = []
    for d in range(rank):
        index = _expand(em.index(value.shape[d]), d, rank)
        terms.append(f"({offsets[d]} + {index}) * {strides[d]}" if offsets[d] != "0" else f"{index} * {strides[d]}")
    mask = em.tile_mask(value.shape)
    masking = f", mask={mask}" if mask else ""
    em.post.append(f"tl.store({ptr} + {' + '.join(terms)}, {_rounded(em, value.expr, dtype)}{masking})")


def _rounded(em: Emitter, expr: str, dtype: str) -> str:
    """float32 `expr` rounded to `dtype`, to nearest even as the GPU rounds. Triton's interpreter truncates to
    bf16 instead, which biases every value toward zero (a chain of bf16 ops drifts by an ulp an op), so there the
    rounding is written out on the bits."""
    if dtype != "bfloat16" or not interpreting():
        return f"{_atom(expr)}.to({DTYPES[dtype].triton})"
    bits = em.fresh("bits")
    em.post.append(f"{bits} = {_atom(expr)}.to(tl.uint32, bitcast=True)")
    return f"(({bits} + 0x7FFF + (({bits} >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)"


def _num_warps(block_size: int) -> int:
    """Triton's warps per program: a power of two, so the block size rounded down to one."""
    return 1 << ((block_size // 32).bit_length() - 1)


def block_kernel(block: BlockGraph, name: str) -> KernelSource:
    """The Triton module of one block graph; `name` (an identifier) names the kernel."""

    em = Emitter(block, reserved=set(block.tensors))
    for bi in block.inputs:
        rank = len(bi.source.shape)
        em.params[bi.name] = (em.fresh(f"{bi.name}_ptr"), [em.fresh(f"{bi.name}_s{d}") for d in range(rank)])
    outs = []
    for k, bo in enumerate(block.outputs):
        rank = len(block.tensors[bo.name].shape)
        outs.append((em.fresh(f"out{k}_ptr"), [em.fresh(f"out{k}_s{d}") for d in range(rank)]))
    forloop = em.fresh("FORLOOP")
    em.pids = pids = [em.fresh(f"pid_{a}") for a in range(len(block.grid))]
    em.it = it = em.fresh("it")

    region = _regions(block)
    deferred = _dequant_only(block)
    values: dict[str, Value | Unloaded] = {
        bi.name: Unloaded(bi) if bi.name in deferred else _load(em, bi) for bi in block.inputs
    }
    inline = set()
    for chain in thread_graphs(block):
        for i, j in zip(chain, chain[1:]):
            if region[block.ops[i].outputs[0]] == region[block.ops[j].outputs[0]]:
                inline.add(i)
    for i, op in enumerate(block.ops):
        out = op.outputs[0]
        args = [values[n] for n in op.inputs]
        if op.op in ACCUMULATORS:
            em.region = "post"
            value = ACCUMULATE[op.op](em, op, args)
        else:
            em.region = region[out]
            value = EMIT[op.op](em, op, args)
        values[out] = value if i in inline else em.bind(value, out)

    for k, bo in enumerate(block.outputs):
        value = values[bo.name]
        offsets = ["0"] * len(value.shape)
        for a, dim in enumerate(bo.omap):
            if dim is not None:
                offsets[dim] = f"{pids[a]} * {value.shape[dim]}"
        ptr, strides = outs[k]
        _store(em, value, ptr, strides, offsets, block.tensors[bo.name].dtype)

    constexprs = {em.fresh(f"BLOCK_{size}"): padded(size) for size in sorted(em.aranges)}
    block_names = dict(zip(sorted(em.aranges), constexprs))
    pointer_types = [bi.source.dtype for bi in block.inputs] + [block.tensors[bo.name].dtype for bo in block.outputs]
    signature = {p: "*" + DTYPES[t].triton_signature for (p, _), t in zip([*em.params.values(), *outs], pointer_types)}
    signature |= {s: "i32" for _, strides in [*em.params.values(), *outs] for s in strides}
    constants = {forloop: block.forloop_range} | constexprs
    signature |= {c: "constexpr" for c in constants}
    groups = [  # one line each: pointers, strides, compile-time constants
        [p for p, t in signature.items() if t.startswith("*")],
        [p for p, t in signature.items() if t == "i32"],
        [f"{p}: tl.constexpr" for p, t in signature.items() if t == "constexpr"],
    ]
    body = [f"{pid} = tl.program_id({a})" for a, pid in enumerate(pids)]
    body += [f"{em.aranges[size]} = tl.arange(0, {block_names[size]})" for size in sorted(em.aranges)]
    loop = "tl.static_range" if unrolled(block) else "range"
    body += em.pre + [f"for {it} in {loop}({forloop}):"] + ["    " + line for line in em.loop] + em.post

    sources = tuple(f"in{k}" for k in range(len(block.inputs)))
    graph_text = [f"#   grid={list(block.grid)} forloop_range={block.forloop_range} block_size={block.block_size}"]
    graph_text += format_block(block, sources, "#   ")
    inputs = ", ".join(sources)
    allocs = []
    for k, bo in enumerate(block.outputs):
        ty = block.output_type(bo)
        allocs.append(f"    out{k} = torch.empty({ty.shape!r}, dtype=torch.{ty.dtype}, device={sources[0]}.device)")
    out_names = [f"out{k}" for k in range(len(block.outputs))]
    strides_args = ", ".join(f"*{t}.stride()" for t in (*sources, *out_names))
    const_args = ", ".join(f"{c}={v}" for c, v in constants.items())
    grid = ", ".join(map(str, block.grid))
    num_warps = _num_warps(block.block_size)
    lines = [
        "# Generated by superopt from this block graph:",
        *graph_text,
        "",
        "import torch",
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}(",
        *(f"    {', '.join(group)}," for group in groups if group),
        "):",
        *("    " + line for line in body),
        "",
        "",
        f"def launch({inputs}):",
        *allocs,
        f"    {name}[({grid},)]({', '.join((*sources, *out_names))}, {strides_args}, {const_args}, "
        f"num_warps={num_warps})",
        f"    return ({', '.join(out_names)},)",
        "",
    ]
    return KernelSource(name, "\n".join(lines), signature, constants, num_warps)


# --- compiling and running a kernel graph ---------------------------------------------------------------------


def block_key(block: BlockGraph) -> str:
    """A hash of everything that shapes a block graph's kernel: grid, loop, block size, maps, types and ops."""

    text = "\n".join(
        [repr((block.grid, block.forloop_range, block.block_size))]
        + [repr((bi.source, bi.imap, bi.fmap)) for bi in block.inputs]
        + format_block(block, tuple(f"in{k}" for k in range(len(block.inputs))), "")
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_MODULES: dict[str, ModuleType] = {}


@dataclass
class GeneratedKernel:
    """One kernel op's generated module, loaded (and so compiled by Triton) on first launch."""

    op: Op
    block: BlockGraph
    code: KernelSource
    folder: Path  # where its module is written (Triton needs a kernel's source file)

    def module(self) -> ModuleType:
        name = self.code.name
        if name not in _MODULES:
            folder = self.folder
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.py"
            if not path.exists() or path.read_text() != self.code.source:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(self.code.source)
                os.replace(tmp, path)  # atomic: concurrent processes see a whole file
            spec = importlib.util.spec_from_file_location(f"superopt_generated.{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULES[name] = module
        return _MODULES[name]

    def launch(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module().launch(*inputs)

    def compile_for(self, arch: int = 90) -> Any:
        """Triton's ahead-of-time compile for CUDA sm_<arch>, no GPU needed (not under the interpreter): proves
        the kernel compiles; the result's `asm` holds its PTX and `metadata.shared` its shared-memory bytes."""
        import triton  # an optional dependency (the dev and gpu extras), as in the generated modules
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        if interpreting():
            raise SuperoptError("compile_for compiles for the GPU: it needs TRITON_INTERPRET unset or 0")
        kernel = getattr(self.module(), self.code.name)
        source = ASTSource(kernel, self.code.signature, self.code.constexprs)
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": self.code.num_warps})


def generate(graph: KernelGraph, folder: Path | None = None) -> list[GeneratedKernel]:
    """One generated kernel per op of `graph`, named after the graph, the op's first output and the block
    graph's hash (which also names its module in `folder`, default: the default cache's kernel folder)."""
    folder = folder if folder is not None else Cache().kernel_dir
    kernels = []
    for op in graph.ops:
        block = lower(graph, op)
        name = f"{identifier(f'{graph.name}_{op.outputs[0]}', 'k')}_{block_key(block)}"
        kernels.append(GeneratedKernel(op, block, block_kernel(block, name), folder))
    return kernels


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_interpreter() -> None:
    """Switches the Triton interpreter on for this process, as CPU tensors need; a SuperoptError if triton was
    already imported without it (Triton cannot change modes then) or TRITON_INTERPRET=0 asks for the GPU."""
    if interpreting():
        return
    if "TRITON_INTERPRET" in os.environ:
        raise SuperoptError("CPU tensors need the Triton interpreter, and TRITON_INTERPRET=0 turns it off")
    if "triton" in sys.modules:
        raise SuperoptError(
            "CPU tensors need the Triton interpreter, and triton was already imported for the GPU: "
            "set TRITON_INTERPRET=1 before importing triton"
        )
    os.environ["TRITON_INTERPRET"] = "1"


class CompiledGraph:
    """A kernel graph as Triton kernels: call it with torch tensors (by position, or by input name), one kernel
    launch per kernel op; it returns the tuple of output tensors (one output included), as `superopt.run` does.

    CUDA tensors run on the GPU. CPU tensors run under the Triton interpreter where there is no GPU (or
    TRITON_INTERPRET=1 asks for it), else on the GPU, the outputs copied back."""

    def __init__(self, graph: KernelGraph, module_dir: Path | None = None) -> None:
        if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
            use_interpreter()  # without a GPU the kernels run only there, and their code depends on it (a bf16 dot)
        self.graph = graph
        self.kernels = generate(graph, module_dir)

    @property
    def source(self) -> str:
        """All generated modules, one after another."""
        return "\n\n".join(f"# ---- kernel {k.code.name} ----\n{k.code.source}" for k in self.kernels)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        g = self.graph
        if len(args) > len(g.inputs):
            raise SuperoptError(f"{g.name}: takes {len(g.inputs)} inputs, got {len(args)}")
        given = dict(zip(g.inputs, args))
        for key, value in kwargs.items():
            if key not in g.inputs or key in given:
                raise SuperoptError(f"{g.name}: unexpected or repeated input '{key}' (inputs: {', '.join(g.inputs)})")
            given[key] = value
        missing = [n for n in g.inputs if n not in given]
        if missing:
            raise SuperoptError(f"{g.name}: inputs missing: {', '.join(missing)}")
        tensors = []
        for name in g.inputs:
            ty, x = g.tensors[name], given[name]
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != ty.shape or x.dtype != DTYPES[ty.dtype].torch:
                got = f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise SuperoptError(f"{g.name}: input '{name}' must be a {ty} tensor, got {got}")
            tensors.append(x)
        return tensors

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """The graph's outputs, in order, as a tuple (as `superopt.run` returns them), one output included."""
        inputs = self._bind(args, kwargs)
        device = inputs[0].device if inputs else torch.device("cpu")
        if device.type == "cpu" and not interpreting():
            if torch.cuda.is_available():
                inputs = [x.cuda() for x in inputs]
            else:
                use_interpreter()
        env = dict(zip(self.graph.inputs, inputs))
        for kernel in self.kernels:
            env.update(zip(kernel.op.outputs, kernel.launch(*(env[i] for i in kernel.op.inputs))))
        return tuple(env[o].to(device) for o in self.graph.outputs)


def compile_triton(graph: KernelGraph, module_dir: Path | None = None) -> CompiledGraph:
    return CompiledGraph(graph, module_dir)
