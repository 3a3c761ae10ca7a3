"""Abstract expressions: what a tensor computes, up to the axioms the search prunes with.

An abstract expression forgets indices, constants and signs: matmul(a, b) is sum_k(a * b), an accumulator is a
sum over the loop's iterations, neg is the identity. Constants are kept without their values, else a candidate
that drops one would pass for the program (and a scaled tile would be the same tile as the unscaled one): x * c
is x * #c, one symbol for every factor, and x + c is x + 1; so rms_norm(x), whose mean square has eps added, is
x / sqrt(sum_n(x * x) + 1), as a hand-written x * rsqrt(mean(x * x) + eps) is.
Mirage (OSDI'25, §4) prunes a µGraph prefix unless its abstract expression can be a subexpression of one
equivalent to the program's, deciding that with an SMT solver over axioms: commutativity and associativity of
+ and *, distributivity of * over +, sum over + (sum_i(a + b) = sum_i a + sum_i b), sum over * and /
(sum_i(a * b) = sum_i(a) * b), sum splitting (sum_ab = sum_a sum_b), and the division rules
((a + b) / c = a / c + b / c, a * (b / c) = (a * b) / c, (a / b) / c = a / (b * c)); x / x = 1 is not one.

Those axioms have a normal form, which is what this module computes: a set of terms (x + x = x, as constants are
forgotten), each term a product whose numerator and denominator are kept apart (nothing cancels) and whose
sums have merged into one size per side (sum_i sum_j a has size i*j; sizes are monomials over the symbols of
search_space/dims.py, so a sum's size is exact for every later choice of tile sizes). Functions (exp, silu,
sqrt, ...) are atoms over the normal form of their argument. Equivalence under the axioms is equality of
normal forms, and "can be a subexpression of something equivalent to T" is: some polynomial P of T (T itself,
an atom's argument, a denominator) is c * E + R for a term c, i.e. c times each term of E is a term of P.
That is the cheap syntactic check, and it decides the question for these axioms; answers are cached.

z3 is the referee (`prove_equal`): it proves, in a real-valued model of the axioms (a sum of size n multiplies
by a positive real per symbol of n), that two expressions are equal. Since the normal form decides the axioms,
the search needs no solver call per prefix (Mirage's z3 queries would only repeat the syntactic answer, slower);
the tests hold the normal form to z3 instead: equal under the axioms, equal normal forms, and z3 agrees.

A concatenation is a pair of expressions (`Cat`): matmul of two tiles concatenated along the contracted dim
pairs their parts ((a || b) @ (c || d) = a @ c + b @ d); other ops apply to both parts.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import z3

from superopt.search_space.dims import UNIT, Dim, Monomial, ddiv, divides, dmul, is_cat

Atom = tuple  # ("in", name) | (fn, Poly) | ("max" | "argmax", size, Poly) | ("poly", Poly): a sum in a denominator
Term = tuple  # (numerator size, denominator size, numerator atoms, denominator atoms); atoms sorted by `key`
Poly = frozenset  # of Term


@dataclass(frozen=True)
class Cat:
    """Two expressions concatenated along `dim` (negative: counted from the end), of extents `sizes`."""

    dim: int
    left: Value
    right: Value
    sizes: tuple[Dim, Dim]


Value = Poly | Cat
ONE: Term = (UNIT, UNIT, (), ())
CONSTANT: Poly = frozenset({ONE})  # an added constant, its value forgotten
SCALE_NAME = "#c"  # no input's name: not an identifier
SCALE: Poly = frozenset({(UNIT, UNIT, (("in", SCALE_NAME),), ())})  # a constant factor, its value forgotten


@functools.lru_cache(maxsize=1 << 16)
def key(x: Atom | Poly | Term) -> str:
    """A canonical string of an atom, term or polynomial: the same in every process (unlike repr, whose order of
    a frozenset's elements follows string hashes), so that atom order and anything sorted by it are too."""
    if isinstance(x, frozenset):
        return "{" + ",".join(sorted(key(t) for t in x)) + "}"
    if x and x[0] == "in":
        return x[1]
    if x and isinstance(x[0], str):  # an atom: (fn, Poly), ("max" | "argmax", size, Poly), ("poly", Poly)
        return f"{x[0]}{x[1] if len(x) == 3 else ''}({key(x[-1])})"
    return f"{x[0]}/{x[1]}*" + "*".join(map(key, x[2])) + "/" + "/".join(map(key, x[3]))


def _sorted(atoms: list[Atom]) -> tuple[Atom, ...]:
    return tuple(sorted(atoms, key=key))


def leaf(name: str) -> Poly:
    return frozenset({(UNIT, UNIT, (("in", name),), ())})


def atom(a: Atom) -> Poly:
    return frozenset({(UNIT, UNIT, (a,), ())})


def _tmul(a: Term, b: Term) -> Term:
    return (dmul(a[0], b[0]), dmul(a[1], b[1]), _sorted([*a[2], *b[2]]), _sorted([*a[3], *b[3]]))


def _tinv(t: Term) -> Term:
    return (t[1], t[0], t[3], t[2])


def add(a: Poly, b: Poly) -> Poly:
    return a | b


def mul(a: Poly, b: Poly) -> Poly:
    return frozenset(_tmul(x, y) for x in a for y in b)


def div(a: Poly, b: Poly) -> Poly:
    if len(b) == 1:
        (t,) = b
        return frozenset(_tmul(x, _tinv(t)) for x in a)
    return mul(a, frozenset({(UNIT, UNIT, (), (("poly", b),))}))


def sum_(size: Monomial, a: Poly) -> Poly:
    return frozenset((dmul(t[0], size), t[1], t[2], t[3]) for t in a)


def sqrt(a: Poly) -> Poly:
    return atom(("sqrt", a))


def rms(size: Monomial, a: Poly) -> Poly:
    return sqrt(add(sum_(size, mul(a, a)), CONSTANT))  # eps added to the mean square


# --- rules per op ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a rule may look at besides its operands' expressions."""

    shapes: tuple[tuple[Dim, ...], ...]  # operand shapes
    attrs: dict
    loop: Monomial  # the forloop range of the block graph (UNIT at kernel level)


def _lift(fn: Callable[..., Value | None], args: tuple[Value, ...]) -> Value | None:
    """Applies an elementwise rule to both parts of a concatenated operand; None where the parts of two
    operands would not line up (an operand not concatenated must broadcast along the concatenated dim)."""
    for k, a in enumerate(args):
        if isinstance(a, Cat):
            for j, b in enumerate(args):
                if j != k and (isinstance(b, Cat) and (b.dim, b.sizes) != (a.dim, a.sizes)):
                    return None
            parts = []
            for side in ("left", "right"):
                sub = tuple(getattr(b, side) if isinstance(b, Cat) else b for b in args)
                parts.append(_lift(fn, sub))
            if None in parts:
                return None
            return Cat(a.dim, parts[0], parts[1], a.sizes)
    return fn(*args)


def _elementwise(fn: Callable[..., Value | None]) -> Callable[[Ctx, tuple[Value, ...]], Value | None]:
    def rule(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
        for a, shape in zip(args, ctx.shapes):
            if isinstance(a, Cat) and a.dim < -len(shape):
                return None
        return _lift(fn, args)

    return rule


def _function(name: str) -> Callable[[Ctx, tuple[Value, ...]], Value | None]:
    return _elementwise(lambda x: atom((name, x)))


def _last_size(shape: tuple[Dim, ...]) -> Monomial | None:
    return None if is_cat(shape[-1]) else shape[-1]


def _matmul(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
    a, b = args
    sa, sb = ctx.shapes
    if isinstance(a, Cat) and a.dim == -1:
        if not (isinstance(b, Cat) and b.dim == -2 and b.sizes == a.sizes):
            return None
        return add(sum_(a.sizes[0], mul(a.left, b.left)), sum_(a.sizes[1], mul(a.right, b.right)))
    if isinstance(b, Cat) and b.dim == -2:
        return None
    if isinstance(a, Cat):  # along a row or batch dim of a: the output is concatenated the same way
        parts = [_matmul(Ctx(ctx.shapes, ctx.attrs, ctx.loop), (p, b)) for p in (a.left, a.right)]
        return None if None in parts or isinstance(b, Cat) else Cat(a.dim, parts[0], parts[1], a.sizes)
    if isinstance(b, Cat):
        parts = [_matmul(ctx, (a, p)) for p in (b.left, b.right)]
        return None if None in parts else Cat(b.dim, parts[0], parts[1], b.sizes)
    k = _last_size(sa)
    return None if k is None else sum_(k, mul(a, b))


def _reduce_dim(ctx: Ctx, a: Value, combine: Callable[[Monomial, Poly], Poly]) -> Value | None:
    shape = ctx.shapes[0]
    dim = ctx.attrs["dim"] - len(shape)  # negative
    if isinstance(a, Cat):
        if a.dim == dim:
            if combine is not sum_:
                return None
            return add(sum_(a.sizes[0], a.left), sum_(a.sizes[1], a.right))  # type: ignore[arg-type]
        shift = 1 if not ctx.attrs["keepdim"] and dim > a.dim else 0
        parts = [_reduce_dim(ctx, p, combine) for p in (a.left, a.right)]
        return None if None in parts else Cat(a.dim + shift, parts[0], parts[1], a.sizes)
    size = shape[dim]
    return None if is_cat(size) else combine(size, a)


def _accum_last(ctx: Ctx, a: Value, fn: Callable[[Monomial, Poly], Poly]) -> Value | None:
    shape = ctx.shapes[0]
    if isinstance(a, Cat):
        if a.dim == -1:
            return None
        parts = [_accum_last(ctx, p, fn) for p in (a.left, a.right)]
        return None if None in parts else Cat(a.dim, parts[0], parts[1], a.sizes)
    last = _last_size(shape)
    return None if last is None else fn(dmul(ctx.loop, last), a)


def _per_row(fn: Callable[[Monomial, Poly], Poly]) -> Callable[[Ctx, tuple[Value, ...]], Value | None]:
    """An op over the last dim: the parts of a concatenation along another dim each normalized on their own."""

    def rule(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
        (x,) = args
        if isinstance(x, Cat):
            if x.dim == -1:
                return None
            parts = [rule(ctx, (p,)) for p in (x.left, x.right)]
            return None if None in parts else Cat(x.dim, parts[0], parts[1], x.sizes)
        n = _last_size(ctx.shapes[0])
        return None if n is None else fn(n, x)

    return rule


def _layer_norm(n: Monomial, x: Poly) -> Poly:
    """x minus its mean (a sum, with signs and constants forgotten), then normalized as rms_norm is."""
    centered = add(x, sum_(n, x))
    return div(centered, rms(n, centered))


def _rope(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
    """x * cos + rotate_half(x) * sin: with indices and signs forgotten, rotate_half(x) is x."""
    x, cos, sin = args
    return None if any(isinstance(a, Cat) for a in args) else add(mul(x, cos), mul(x, sin))


def _dequant(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
    """(q - zero) * scale: with indices and signs forgotten, a group's scale is the scale and an int4 byte's
    values are the byte."""
    if any(isinstance(a, Cat) for a in args):
        return None
    q, scale, *zero = args
    return mul(add(q, zero[0]) if zero else q, scale)


def _concat(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
    a, b = args
    dim = ctx.attrs["dim"] - len(ctx.shapes[0])
    return Cat(dim, a, b, (ctx.shapes[0][dim], ctx.shapes[1][dim]))


def _rescaled(x: Poly, m: Poly, loop: Monomial) -> Poly:
    top = atom(("max", loop, m))
    return sum_(loop, mul(x, div(atom(("exp", m)), atom(("exp", top)))))


def _same(ctx: Ctx, args: tuple[Value, ...]) -> Value | None:
    return args[0]


RULES: dict[str, Callable[[Ctx, tuple[Value, ...]], Value | None]] = {
    "matmul": _matmul,
    "add": _elementwise(add),
    "sub": _elementwise(add),
    "mul": _elementwise(mul),
    "div": _elementwise(div),
    **{f: _function(f) for f in ("exp", "silu", "gelu", "gelu_tanh", "relu", "sigmoid", "sqrt")},
    "rsqrt": _elementwise(lambda x: div(frozenset({ONE}), sqrt(x))),
    "square": _elementwise(lambda x: mul(x, x)),
    "neg": _same,
    "mul_scalar": _elementwise(lambda x: mul(x, SCALE)),
    "add_scalar": _elementwise(lambda x: add(x, CONSTANT)),
    "sum": lambda ctx, args: _reduce_dim(ctx, args[0], sum_),
    "mean": lambda ctx, args: _reduce_dim(ctx, args[0], sum_),
    "max": lambda ctx, args: _reduce_dim(ctx, args[0], lambda n, x: atom(("max", n, x))),
    "argmax": lambda ctx, args: _reduce_dim(ctx, args[0], lambda n, x: atom(("argmax", n, x))),
    "rms_norm": _per_row(lambda n, x: div(x, rms(n, x))),
    "layer_norm": _per_row(_layer_norm),
    "rope": _rope,
    "concat": _concat,
    "dequant": _dequant,
    "accum_sum": lambda ctx, args: _elementwise(lambda x: sum_(ctx.loop, x))(ctx, args),
    "accum_sum_last": lambda ctx, args: _accum_last(ctx, args[0], sum_),
    "accum_mean_last": lambda ctx, args: _accum_last(ctx, args[0], sum_),
    "accum_rms_last": lambda ctx, args: _accum_last(ctx, args[0], rms),
    "accum_max": lambda ctx, args: _elementwise(lambda x: atom(("max", ctx.loop, x)))(ctx, args),
    "accum_rescaled_sum": lambda ctx, args: _elementwise(lambda x, m: _rescaled(x, m, ctx.loop))(ctx, args),
}


def apply(op: str, args: tuple[Value, ...], ctx: Ctx) -> Value | None:
    """The abstract expression of `op` on operands `args`; None where it has none (the prefix is dropped)."""
    return RULES[op](ctx, args)


# --- the pruning check ----------------------------------------------------------------------------------------


def _tdivides(a: Term, b: Term) -> bool:
    return (
        divides(a[0], b[0])
        and divides(a[1], b[1])
        and not Counter(a[2]) - Counter(b[2])
        and not Counter(a[3]) - Counter(b[3])
    )


def _tquot(b: Term, a: Term) -> Term:
    def minus(x: tuple, y: tuple) -> tuple:
        return _sorted(list((Counter(x) - Counter(y)).elements()))

    return (ddiv(b[0], a[0]), ddiv(b[1], a[1]), minus(b[2], a[2]), minus(b[3], a[3]))


def leaves(v: Value) -> frozenset[str]:
    """The inputs `v` reads (not the symbol of constant factors). A walk with its own stack, as `_polys`."""
    out: set[str] = set()
    stack = [v]
    while stack:
        v = stack.pop()
        if isinstance(v, Cat):
            stack += [v.left, v.right]
            continue
        for t in v:
            for a in (*t[2], *t[3]):
                if a[0] == "in":
                    out.add(a[1])
                else:
                    stack.append(a[-1])
    return frozenset(out - {SCALE_NAME})


def _polys(v: Value, out: list[Poly]) -> None:
    """Every polynomial an equivalent of `v` can have as a subexpression: v, atoms' arguments, denominators.
    A walk with its own stack: a chain of a thousand ops nests its expression a thousand deep."""
    stack = [v]
    while stack:
        v = stack.pop()
        if isinstance(v, Cat):
            stack += [v.right, v.left]
            continue
        out.append(v)
        for t in v:
            if t[1] or t[3]:
                out.append(frozenset({(t[1], UNIT, t[3], ())}))
            stack.extend(a[-1] for a in reversed((*t[2], *t[3])) if a[0] != "in")


class Target:
    """The program's output expressions, and the cached check `may_be_subexpr`."""

    def __init__(self, outputs: list[Value]) -> None:
        self.outputs = outputs
        polys: list[Poly] = []
        for v in outputs:
            _polys(v, polys)
        self.polys = list(dict.fromkeys(polys))
        self.functions = {a[0] for p in self.polys for t in p for a in (*t[2], *t[3]) if a[0] not in ("in", "poly")}
        self.cache: dict[Value, bool] = {}

    def may_be_subexpr(self, v: Value) -> bool:
        hit = self.cache.get(v)
        if hit is None:
            hit = self.cache[v] = self._check(v)
        return hit

    def _check(self, v: Value) -> bool:
        if isinstance(v, Cat):
            return self.may_be_subexpr(v.left) and self.may_be_subexpr(v.right)
        first, *rest = v  # any term may go first: c must map it to some term of P
        for p in self.polys:
            for t in p:
                if _tdivides(first, t):
                    c = _tquot(t, first)
                    if all(_tmul(c, r) in p for r in rest):
                        return True
        return False


# --- z3: the referee ------------------------------------------------------------------------------------------


class _Z3Model:
    """A real-valued model of the axioms: each input a real, each sum size a product of positive reals, each
    function an uninterpreted real function."""

    def __init__(self) -> None:
        self.vars: dict[str, z3.ArithRef] = {}
        self.funcs: dict[str, z3.FuncDeclRef] = {}
        self.positive: list[z3.BoolRef] = []

    def _var(self, name: str, positive: bool = False) -> z3.ArithRef:
        if name not in self.vars:
            self.vars[name] = z3.Real(name)
            if positive:
                self.positive.append(self.vars[name] > 0)
        return self.vars[name]

    def size(self, m: Monomial) -> z3.ArithRef:
        out = z3.RealVal(1)
        for s, e in m:
            v = self._var(f"sigma_{s}", positive=True)
            for _ in range(abs(e)):
                out = out * v if e > 0 else out / v
        return out

    def atom(self, a: Atom) -> z3.ArithRef:
        if a[0] == "in":
            return self._var(f"in_{a[1]}")
        if a[0] == "poly":
            return self.value(a[1])
        name = a[0] if len(a) == 2 else f"{a[0]}_{repr(a[1])}"  # a reduction's function depends on its size
        if name not in self.funcs:
            self.funcs[name] = z3.Function(f"fn_{len(self.funcs)}", z3.RealSort(), z3.RealSort())
        return self.funcs[name](self.value(a[-1]))

    def value(self, v: Value) -> z3.ArithRef:
        if isinstance(v, Cat):  # a concatenation is modelled as an uninterpreted pair
            if "cat" not in self.funcs:
                self.funcs["cat"] = z3.Function("cat", z3.RealSort(), z3.RealSort(), z3.RealSort())
            return self.funcs["cat"](self.value(v.left), self.value(v.right))
        total = z3.RealVal(0)
        for t in sorted(v, key=key):
            num = self.size(t[0])
            for a in t[2]:
                num = num * self.atom(a)
            den = self.size(t[1])
            for a in t[3]:
                den = den * self.atom(a)
            total = total + num / den
        return total


_PROOFS: dict[tuple[Value, Value], bool] = {}


def prove_equal(a: Value, b: Value, timeout_ms: int = 2000) -> bool:
    """z3 proves a = b in the real-valued model of the axioms (False also when it cannot tell in time)."""
    key = (a, b)
    if key not in _PROOFS:
        model = _Z3Model()
        lhs, rhs = model.value(a), model.value(b)
        solver = z3.Solver()
        solver.set("timeout", timeout_ms)
        solver.add(*model.positive, lhs != rhs)
        _PROOFS[key] = solver.check() == z3.unsat
    return _PROOFS[key]
