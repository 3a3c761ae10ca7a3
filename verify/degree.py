"""Degree bounds for the finite-field test's false-accept bound, and what a graph needs of the encoding.

Each tensor gets an upper bound on the degrees of a numerator and a denominator that represent every one of its
elements as a rational function of the inputs, where each exp result and each opaque result counts as one fresh
variable (see field.py). A sum of K elements adds fractions: when their denominator cannot vary along the summed
dim (a row normalizer broadcast along the row, say) the common denominator is kept, else the degrees grow K-fold.
`vary`/`den_vary` record the dims along which an element's value / denominator may change, `loop`/`den_loop`
the same across loop iterations inside a block graph. The walk is static: no tensor is computed.

A square root's atom may be counted either way round: as the variable R = R_sqrt(v), or as t = 1 / R (uniform
on the nonzero residues when R is; field.py). The choice is one change of variables for both graphs, so either
gives a valid bound; `inverse_roots` takes t, which keeps x / sqrt(v_l) a polynomial. That matters in a sum over
l: with R, p_l v_l / R_l summed over l = 1..L has a common denominator of degree L (rms_norm on V in attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction

from superopt.ir import BlockGraph, KernelGraph
from superopt.ops import TensorType

EXP_FAMILY = frozenset({"exp", "silu", "sigmoid", "accum_rescaled_sum"})


@dataclass(frozen=True)
class Deg:
    num: int
    den: int
    vary: frozenset[int]
    den_vary: frozenset[int] = frozenset()
    loop: bool = False
    den_loop: bool = False
    exp: bool = False  # depends on an exp result

    def total(self) -> int:
        return self.num + self.den


@dataclass
class Analysis:
    """What a graph needs: output degrees, the largest degree of an exp / opaque argument, the ops used, and
    whether an exp-family op takes an argument that itself depends on exp."""

    outputs: list[Deg] = field(default_factory=list)
    exp_arg: int = 0
    opaque_arg: int = 0
    ops: set[str] = field(default_factory=set)
    nested_exp: bool = False
    inverse_roots: bool = False
    constant_bits: int = 0  # the largest numerator or denominator of a constant attribute, in bits
    size_bits: int = 0  # bits of twice the largest tensor's element count: bounds every count and sum length


def _bits(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    r = Fraction(value)
    return max(r.numerator.bit_length(), r.denominator.bit_length())


@dataclass
class _Ctx:
    analysis: Analysis
    ins: list[TensorType]
    out: TensorType
    forloop: int = 1


def _shift(dims: frozenset[int], by: int) -> frozenset[int]:
    return frozenset(d + by for d in dims)


def _lift(d: Deg, rank: int, to_rank: int) -> Deg:
    """d seen through broadcasting to a higher rank (dims align from the right)."""
    return replace(d, vary=_shift(d.vary, to_rank - rank), den_vary=_shift(d.den_vary, to_rank - rank))


def _join(a: Deg, b: Deg, num: int, den: int) -> Deg:
    return Deg(
        num, den, a.vary | b.vary, a.den_vary | b.den_vary, a.loop or b.loop, a.den_loop or b.den_loop, a.exp or b.exp
    )


def _binary(kind: str) -> Callable[[_Ctx, Deg, Deg], Deg]:
    def rule(ctx: _Ctx, a: Deg, b: Deg) -> Deg:
        rank = len(ctx.out.shape)
        a, b = _lift(a, len(ctx.ins[0].shape), rank), _lift(b, len(ctx.ins[1].shape), rank)
        if kind == "add":
            return _join(a, b, max(a.num + b.den, b.num + a.den), a.den + b.den)
        if kind == "mul":
            return _join(a, b, a.num + b.num, a.den + b.den)
        out = _join(a, b, a.num + b.den, a.den + b.num)  # div: b's value moves into the denominator
        return replace(out, den_vary=a.den_vary | b.vary, den_loop=a.den_loop or b.loop)

    return rule


def _atom(kind: str) -> Callable[..., Deg]:
    """exp or an opaque op: a fresh variable; records its argument's degree."""

    def rule(ctx: _Ctx, x: Deg, **_: object) -> Deg:
        a = ctx.analysis
        if kind == "exp":
            a.exp_arg = max(a.exp_arg, x.total())
            a.nested_exp |= x.exp
        else:
            a.opaque_arg = max(a.opaque_arg, x.total())
        return Deg(1, 0, x.vary, loop=x.loop, exp=x.exp or kind == "exp")

    return rule


def _inverse(d: Deg) -> Deg:
    return Deg(d.den, d.num, d.vary, d.vary, d.loop, d.loop, d.exp)


def _root(ctx: _Ctx, x: Deg, **_: object) -> Deg:
    """sqrt(x): the atom R, or 1 / t for the atom t = 1 / R."""
    r = _atom("opaque")(ctx, x)
    return _inverse(r) if ctx.analysis.inverse_roots else r


def _sigmoid(ctx: _Ctx, x: Deg) -> Deg:
    return _inverse(_atom("exp")(ctx, x))  # 1 / (1 + exp(-x))


def _reduced(d: Deg, dim: int, count: int, keepdim: bool, summed: bool) -> Deg:
    """d after reducing `dim` (count elements); `summed` adds fractions, else the result is an atom."""
    num, den = d.num, d.den
    if summed and den and dim in d.den_vary:
        num, den = num + (count - 1) * den, count * den

    def drop(dims: frozenset[int]) -> frozenset[int]:
        return frozenset(x if keepdim or x < dim else x - 1 for x in dims if x != dim)

    return Deg(num, den, drop(d.vary), drop(d.den_vary), d.loop, d.den_loop, d.exp)


def _sum(ctx: _Ctx, x: Deg, dim: int, keepdim: bool) -> Deg:
    return _reduced(x, dim, ctx.ins[0].shape[dim], keepdim, True)


def _max(ctx: _Ctx, x: Deg, dim: int, keepdim: bool) -> Deg:
    reduced = _reduced(x, dim, ctx.ins[0].shape[dim], keepdim, False)
    return _atom("opaque")(ctx, replace(x, vary=reduced.vary))


def _rms_norm(ctx: _Ctx, x: Deg, eps: float) -> Deg:
    last = len(ctx.out.shape) - 1
    square = _binary("mul")(replace(ctx, ins=[ctx.out, ctx.out]), x, x)
    root = _root(ctx, _reduced(square, last, ctx.out.shape[last], True, True))
    return _binary("div")(replace(ctx, ins=[ctx.out, ctx.out]), x, root)


def _layer_norm(ctx: _Ctx, x: Deg, eps: float) -> Deg:
    """rms_norm of x minus its mean over the last dim (a sum of x over that dim, as `sum` counts it)."""
    last = len(ctx.out.shape) - 1
    mean = _reduced(x, last, ctx.out.shape[last], True, True)
    centered = _binary("add")(replace(ctx, ins=[ctx.out, ctx.out]), x, mean)
    return _rms_norm(ctx, centered, eps)


def _rope(ctx: _Ctx, x: Deg, cos: Deg, sin: Deg) -> Deg:
    """x * cos + rotate_half(x) * sin: rotate_half(x) has x's degrees (its elements are x's, negated)."""
    rank = len(ctx.out.shape)
    lifted = [_lift(d, len(t.shape), rank) for d, t in zip((cos, sin), ctx.ins[1:])]
    mul = _binary("mul")(replace(ctx, ins=[ctx.out, ctx.out]), x, lifted[0])
    rotated = _binary("mul")(replace(ctx, ins=[ctx.out, ctx.out]), x, lifted[1])
    return _binary("add")(replace(ctx, ins=[ctx.out, ctx.out]), mul, rotated)


def _matmul(ctx: _Ctx, a: Deg, b: Deg) -> Deg:
    ra, rb, rank = len(ctx.ins[0].shape), len(ctx.ins[1].shape), len(ctx.out.shape)
    k = ctx.ins[0].shape[-1]
    num, den = a.num + b.num, a.den + b.den
    if (a.den and ra - 1 in a.den_vary) or (b.den and rb - 2 in b.den_vary):  # a common denominator of k terms
        num, den = num + (k - 1) * den, k * den

    def place(dims: frozenset[int], r: int, inner: int, outer: int, to: int) -> frozenset[int]:
        """Batch dims shift to the output's rank; the outer (row or column) dim goes to `to`."""
        return frozenset(to if d == outer else d + rank - r for d in dims if d != inner)

    def both(get: Callable[[Deg], frozenset[int]]) -> frozenset[int]:
        return place(get(a), ra, ra - 1, ra - 2, rank - 2) | place(get(b), rb, rb - 2, rb - 1, rank - 1)

    return Deg(
        num,
        den,
        both(lambda d: d.vary),
        both(lambda d: d.den_vary),
        a.loop or b.loop,
        a.den_loop or b.den_loop,
        a.exp or b.exp,
    )


def _concat(ctx: _Ctx, a: Deg, b: Deg, dim: int) -> Deg:
    den = max(a.den, b.den)
    out = _join(a, b, max(a.num, b.num), den)
    return replace(out, vary=out.vary | {dim}, den_vary=out.den_vary | ({dim} if den else frozenset()))


def _accum(ctx: _Ctx, x: Deg, last: bool = False) -> Deg:
    """A sum over the loop iterations (and the tile's last dim for the *_last accumulators)."""
    count = ctx.forloop
    summed = x
    if last:
        dim = len(ctx.out.shape) - 1
        summed = _reduced(x, dim, 1, True, True)
        count *= ctx.ins[0].shape[dim]
    num, den = x.num, x.den
    if den and (x.den_loop or (last and len(ctx.out.shape) - 1 in x.den_vary)):
        num, den = num + (count - 1) * den, count * den
    return Deg(num, den, summed.vary, summed.den_vary, exp=x.exp)


def _rms_last(ctx: _Ctx, x: Deg, eps: float) -> Deg:
    return _root(ctx, _accum(ctx, _binary("mul")(replace(ctx, ins=[ctx.out, ctx.out]), x, x), last=True))


def _rescaled_sum(ctx: _Ctx, x: Deg, m: Deg) -> Deg:
    scale = _atom("exp")(ctx, Deg(m.num, m.den, m.vary, m.den_vary, m.loop, m.den_loop, m.exp))
    return _accum(
        ctx,
        _binary("mul")(
            replace(ctx, ins=[ctx.out, ctx.out]), x, _lift(scale, len(ctx.ins[1].shape), len(ctx.out.shape))
        ),
    )


def _dequant(ctx: _Ctx, q: Deg, scale: Deg, zero: Deg | None = None, *, group: int, high_first: bool) -> Deg:
    """(q - zero) * scale; an int4 byte's two values are opaque atoms of it (field.py)."""
    same = replace(ctx, ins=[ctx.out, ctx.out])
    values = _atom("opaque")(ctx, q) if ctx.ins[0].dtype == "int4" else q
    shifted = _binary("add")(same, values, zero) if zero is not None else values
    return _binary("mul")(same, shifted, scale)


def _same(ctx: _Ctx, x: Deg, **_: object) -> Deg:
    return x


def _square(ctx: _Ctx, x: Deg) -> Deg:
    return replace(x, num=2 * x.num, den=2 * x.den)


def _add_scalar(ctx: _Ctx, x: Deg, c: float) -> Deg:
    return replace(x, num=max(x.num, x.den))


# One rule per op of the table (graph_def is walked by `analyze`): rule(ctx, *operand degrees, **attrs).
DEGREE: dict[str, Callable[..., Deg]] = {
    "matmul": _matmul,
    "add": _binary("add"),
    "sub": _binary("add"),
    "mul": _binary("mul"),
    "div": _binary("div"),
    "exp": _atom("exp"),
    "silu": lambda ctx, x: _binary("mul")(replace(ctx, ins=[ctx.out, ctx.out]), x, _sigmoid(ctx, x)),
    "gelu": _atom("opaque"),
    "gelu_tanh": _atom("opaque"),
    "relu": _atom("opaque"),
    "sigmoid": _sigmoid,
    "sqrt": _root,
    "rsqrt": lambda ctx, x: _inverse(_root(ctx, x)),
    "square": _square,
    "neg": _same,
    "mul_scalar": _same,
    "add_scalar": _add_scalar,
    "sum": _sum,
    "max": _max,
    "argmax": _max,  # an opaque atom of the reduced values, as max is (their order does not change the degree)
    "mean": _sum,
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "rope": _rope,
    "concat": _concat,
    "dequant": _dequant,
    "accum_sum": _accum,
    "accum_sum_last": lambda ctx, x: _accum(ctx, x, last=True),
    "accum_mean_last": lambda ctx, x: _accum(ctx, x, last=True),
    "accum_rms_last": _rms_last,
    "accum_max": lambda ctx, x: _atom("opaque")(ctx, replace(x, loop=False, den_loop=False)),
    "accum_rescaled_sum": _rescaled_sum,
}


def _varying(ty: TensorType) -> frozenset[int]:
    return frozenset(d for d, size in enumerate(ty.shape) if size > 1)


def _walk(graph: KernelGraph | BlockGraph, env: dict[str, Deg], analysis: Analysis, forloop: int = 1) -> None:
    for op in graph.ops:
        analysis.ops.add(op.op)
        analysis.constant_bits = max([analysis.constant_bits, *map(_bits, op.attrs.values())])
        ins = [graph.tensors[i] for i in op.inputs]
        if op.block is not None:
            _walk_block(op.block, [env[i] for i in op.inputs], op.outputs, env, analysis)
            continue
        ctx = _Ctx(analysis, ins, graph.tensors[op.outputs[0]], forloop)
        env[op.outputs[0]] = DEGREE[op.op](ctx, *[env[i] for i in op.inputs], **op.attrs)


def _walk_block(
    block: BlockGraph, args: list[Deg], outs: tuple[str, ...], env: dict[str, Deg], analysis: Analysis
) -> None:
    tiles = {}
    for bi, d in zip(block.inputs, args):
        tiles[bi.name] = replace(d, loop=bi.fmap in d.vary, den_loop=bi.fmap in d.den_vary)
    _walk(block, tiles, analysis, block.forloop_range)
    for name, bo in zip(outs, block.outputs):
        tile = tiles[bo.name]
        env[name] = replace(
            tile, vary=tile.vary | frozenset(d for d in bo.omap if d is not None), loop=False, den_loop=False
        )


def analyze(graph: KernelGraph, inverse_roots: bool = False) -> Analysis:
    analysis = Analysis(inverse_roots=inverse_roots)
    analysis.size_bits = (2 * max(math.prod(t.shape) for t in graph.tensors.values())).bit_length()
    env = {n: Deg(1, 0, _varying(graph.tensors[n])) for n in graph.inputs}
    _walk(graph, env, analysis)
    analysis.outputs = [env[o] for o in graph.outputs]
    return analysis
