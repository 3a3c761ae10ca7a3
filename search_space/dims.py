"""Symbolic tensor dims for the search: dim classes of a program, and sizes as monomials over symbols.

The search does not pick tile sizes while it builds µGraphs; it works with symbols and picks sizes afterwards
(search_space/instantiate.py). Each class of program dims that must agree (a matmul's contracted dims, the dims
an elementwise op aligns, ...) becomes one symbol with its concrete size; each grid axis and each forloop of a
graph-defined op becomes a free symbol. A dim is a monomial over those symbols, e.g. K / (g0_0 * f0), so tile
shapes, shape checks and the sizes of sums in abstract expressions are exact for every later choice of sizes.
A concatenated dim is ("cat", a, b). Size-1 dims are the empty monomial ().
"""

from __future__ import annotations

from fractions import Fraction

from superopt.ir import KernelGraph
from superopt.ops import OPS

Monomial = tuple[tuple[str, int], ...]  # sorted (symbol, exponent), exponents nonzero
Dim = Monomial | tuple  # a Monomial, or ("cat", Dim, Dim)
UNIT: Monomial = ()


def sym(name: str) -> Monomial:
    return ((name, 1),)


def is_cat(d: Dim) -> bool:
    return bool(d) and d[0] == "cat"


def _combine(a: Monomial, b: Monomial, sign: int) -> Monomial:
    exps = dict(a)
    for s, e in b:
        exps[s] = exps.get(s, 0) + sign * e
    return tuple(sorted((s, e) for s, e in exps.items() if e))


def dmul(a: Monomial, b: Monomial) -> Monomial:
    return _combine(a, b, 1)


def ddiv(a: Monomial, b: Monomial) -> Monomial:
    return _combine(a, b, -1)


def divides(a: Monomial, b: Monomial) -> bool:
    """a | b for every choice of the symbols: b / a has no negative exponent."""
    return all(e > 0 for _, e in ddiv(b, a))


def value(d: Dim, env: dict[str, int]) -> Fraction:
    """The size of `d` with each symbol replaced by its value in `env`."""
    if is_cat(d):
        return value(d[1], env) + value(d[2], env)
    out = Fraction(1)
    for s, e in d:
        out *= Fraction(env[s]) ** e
    return out


def domain(size: int) -> list[int]:
    """The values a grid axis or loop over a class of `size` may take: v > 1 dividing it, v or size / v a power
    of two. Built from the powers of two dividing `size` (at most 31 for a dim the IR accepts), never by trying
    every v up to `size`, which would take minutes for a large dim."""
    twos = [1 << k for k in range((size & -size).bit_length())]
    return sorted({v for p in twos for v in (p, size // p) if v > 1})


def dim_classes(graph: KernelGraph) -> tuple[dict[str, tuple[Dim, ...]], dict[str, int]]:
    """Symbolic shapes of every tensor of `graph` (class symbols c0, c1, ...) and each symbol's size.

    Dims are unified by the ops' shape rules: a matmul's contracted dims, its output dims with the operands',
    the dims an elementwise op aligns (unless one of them has size 1), the dims a reduction, norm or concat keeps.
    """
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    def union(a: tuple[str, int], b: tuple[str, int]) -> None:
        parent[find(a)] = find(b)

    def aligned(out: str, src: str) -> None:
        o, s = graph.tensors[out].shape, graph.tensors[src].shape
        for k in range(1, len(s) + 1):
            if s[-k] == o[-k] and s[-k] != 1:
                union((out, len(o) - k), (src, len(s) - k))

    for op in graph.ops:
        out = op.outputs[0]
        kind = OPS[op.op].kind
        if kind == "matmul":
            a, b = op.inputs
            ra, rb, ro = (len(graph.tensors[t].shape) for t in (a, b, out))
            union((a, ra - 1), (b, rb - 2))
            union((out, ro - 2), (a, ra - 2))
            union((out, ro - 1), (b, rb - 1))
            for t, r in ((a, ra), (b, rb)):
                for k in range(3, r + 1):
                    if graph.tensors[t].shape[-k] != 1:
                        union((out, ro - k), (t, r - k))
        elif kind in ("unary", "scalar", "norm", "binary", "rope"):
            for src in op.inputs:
                aligned(out, src)
        elif kind == "reduce":
            (src,) = op.inputs
            dim, keep = op.attrs["dim"], op.attrs["keepdim"]
            for k in range(len(graph.tensors[src].shape)):
                if k != dim:
                    union((out, k if keep or k < dim else k - 1), (src, k))
        elif kind == "concat":
            for src in op.inputs:
                for k in range(len(graph.tensors[src].shape)):
                    if k != op.attrs["dim"]:
                        union((out, k), (src, k))
    roots: dict[tuple[str, int], str] = {}
    sizes: dict[str, int] = {}
    shapes: dict[str, tuple[Dim, ...]] = {}
    for name, ty in graph.tensors.items():
        dims = []
        for k, size in enumerate(ty.shape):
            if size == 1:
                dims.append(UNIT)
                continue
            root = find((name, k))
            if root not in roots:
                roots[root] = f"c{len(roots)}"
                sizes[roots[root]] = size
            dims.append(sym(roots[root]))
        shapes[name] = tuple(dims)
    return shapes, sizes
