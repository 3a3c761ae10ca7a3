"""Proofs of equivalence with z3, for graphs small enough to expand into one term per output element.

Every element becomes a fraction num/den of z3 real polynomials over the inputs and over uninterpreted function
applications: exp(t) is split by exp(a + b) = exp(a) exp(b) over the monomials of t (integer multiples become
powers, so exp(2x - y) = E(x)^2 / E(y)); sqrt, gelu, relu are functions of their argument's normal form (sqrt(0)
= 0); max and the accumulators' running max are one function of the sorted multiset of values; argmax is one
of the values in their order (a permutation moves the index); an int4 byte's two values are two functions of
it (int8 values are the inputs themselves). Each of those is a true identity of the real ops,
so equal fractions mean equal real functions wherever every denominator is nonzero. The two graphs are equal
when num1 * den2 - num2 * den1 expands to 0 (z3's sum-of-monomials normal form), or, failing that, when z3
finds no real assignment making them differ within the time limit. Anything else is "not proved", never "not
equivalent": the uninterpreted functions are weaker than the real ones.

Elements are held as int64 ids into a table of fractions, so the batched executor runs the graph unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction

import torch
import z3

from superopt.interpret import is_packed_int4, nibble_order
from superopt.ir import KernelGraph, Op
from superopt.ops import TensorType
from superopt.verification import batched

Den = tuple[tuple[int, int], ...]  # (factor id, power), sorted; () is 1
Frac = tuple[z3.ArithRef, Den]
ONE = z3.RealVal(1)
ZERO = z3.RealVal(0)


class Unprovable(Exception):
    """The graphs cannot be compared symbolically (a constant zero denominator)."""


class TooLarge(Unprovable):
    """The graph expands into more terms than the budget allows."""


def _is_one(t: z3.ArithRef) -> bool:
    return z3.is_rational_value(t) and t.as_fraction() == 1


def _is_zero(t: z3.ArithRef) -> bool:
    return z3.is_rational_value(t) and t.as_fraction() == 0


def _normal(t: z3.ArithRef) -> z3.ArithRef:
    return z3.simplify(t, som=True)


class SymbolicEval:
    """An evaluator over tensors of term ids (the op/accumulate interface of `batched`)."""

    def __init__(self, budget: int) -> None:
        self.terms: list[Frac] = []
        self.memo: dict[tuple, int] = {}
        self.budget = budget
        self.functions: dict[tuple[str, int], z3.FuncDeclRef] = {}
        self.factors: dict[int, z3.ArithRef] = {}  # denominator factors by z3 AST id

    def intern(self, key: tuple, make: Callable[[], Frac]) -> int:
        if key not in self.memo:
            if len(self.terms) >= self.budget:
                raise TooLarge
            self.terms.append(make())
            self.memo[key] = len(self.terms) - 1
        return self.memo[key]

    def leaf(self, name: str, ty: TensorType) -> torch.Tensor:
        ids = [
            self.intern(("in", name, i), lambda i=i: (z3.Real(f"{name}{list(i)}"), ()))
            for i in itertools.product(*map(range, ty.shape))
        ]
        return torch.tensor(ids, dtype=torch.int64).reshape(ty.shape)

    def const(self, value: float) -> int:
        return self.intern(("const", Fraction(value)), lambda: (z3.RealVal(Fraction(value)), ()))

    def fn(self, name: str, *args: z3.ArithRef) -> z3.ArithRef:
        key = (name, len(args))
        if key not in self.functions:
            self.functions[key] = z3.Function(f"{name}{len(args)}", *[z3.RealSort()] * (len(args) + 1))
        return self.functions[key](*args)

    # --- fractions: a numerator and a denominator kept as powers of factors -------------------------------

    def factor(self, t: z3.ArithRef) -> Den:
        key = t.get_id()
        self.factors.setdefault(key, t)
        return ((key, 1),)

    def product(self, den: Den) -> z3.ArithRef:
        out = ONE
        for key, power in den:
            for _ in range(power):
                out = _mul(out, self.factors[key])
        return out

    def scaled(self, n: z3.ArithRef, den: Den, to: Den) -> z3.ArithRef:
        """n / den rewritten over the multiple `to` of den: n times the missing factors."""
        have = dict(den)
        return _mul(n, self.product(tuple((k, p - have.get(k, 0)) for k, p in to)))

    def add(self, a: int, b: int) -> int:
        def make() -> Frac:
            (n1, d1), (n2, d2) = self.terms[a], self.terms[b]
            common = _lcm(d1, d2)
            return self.scaled(n1, d1, common) + self.scaled(n2, d2, common), common

        return self.intern(("add",) + tuple(sorted((a, b))), make)

    def mul(self, a: int, b: int) -> int:
        def make() -> Frac:
            (n1, d1), (n2, d2) = self.terms[a], self.terms[b]
            powers = dict(d1)
            for k, p in d2:
                powers[k] = powers.get(k, 0) + p
            return _mul(n1, n2), tuple(sorted(powers.items()))

        return self.intern(("mul",) + tuple(sorted((a, b))), make)

    def inv(self, a: int) -> int:
        def make() -> Frac:
            n, d = self.terms[a]
            if z3.is_rational_value(n):
                if n.as_fraction() == 0:
                    raise Unprovable("division by a constant zero")
                return _mul(self.product(d), z3.RealVal(1 / n.as_fraction())), ()
            return self.product(d), self.factor(n)

        return self.intern(("inv", a), make)

    def neg(self, a: int) -> int:
        return self.mul(a, self.const(-1))

    def key(self, a: int) -> z3.ArithRef:
        """A normal form of element a's value, to apply an uninterpreted function to."""
        n, d = self.terms[a]
        return _normal(n) if not d else _normal(n) / _normal(self.product(d))

    def exp(self, a: int) -> int:
        def make() -> Frac:
            num, den = ONE, ONE
            n, d = self.terms[a]
            monomials = [(Fraction(1), self.key(a))] if d else _monomials(_normal(n))
            for coeff, mono in monomials:
                whole = coeff.denominator == 1
                power = coeff.numerator if whole else (1 if coeff > 0 else -1)
                atom = self.fn("exp", mono if whole else _normal(z3.RealVal(abs(coeff)) * mono))
                for _ in range(abs(power)):
                    num, den = (_mul(num, atom), den) if power > 0 else (num, _mul(den, atom))
            return num, () if _is_one(den) else self.factor(den)

        return self.intern(("exp", a), make)

    def opaque(self, name: str, a: int) -> int:
        def make() -> Frac:
            k = self.key(a)
            if name == "sqrt" and _is_zero(k):
                return ZERO, ()
            return self.fn(name, k), ()

        return self.intern((name, a), make)

    def multiset(self, ids: list[int]) -> int:
        keys = sorted((self.key(i) for i in ids), key=lambda t: t.sexpr())
        return self.intern(("max",) + tuple(sorted(ids)), lambda: (self.fn("max", *keys), ()))

    def sequence(self, ids: list[int]) -> int:
        """argmax's encoding: one function of the values in their order."""
        return self.intern(("argmax",) + tuple(ids), lambda: (self.fn("argmax", *(self.key(i) for i in ids)), ()))

    # --- tensors --------------------------------------------------------------------------------------------

    def map(self, fn: Callable[..., int], *xs: torch.Tensor) -> torch.Tensor:
        xs = torch.broadcast_tensors(*xs)
        flat = [x.reshape(-1).tolist() for x in xs]
        return torch.tensor([fn(*v) for v in zip(*flat)], dtype=torch.int64).reshape(xs[0].shape)

    def fold(self, x: torch.Tensor, dim: int, fn: Callable[[list[int]], int]) -> torch.Tensor:
        """fn over the list of ids along `dim`, which is dropped."""
        moved = x.movedim(dim, -1)
        rows = moved.reshape(-1, moved.shape[-1]).tolist()
        return torch.tensor([fn(r) for r in rows], dtype=torch.int64).reshape(moved.shape[:-1])

    def total(self, ids: list[int]) -> int:
        out = ids[0]
        for i in ids[1:]:
            out = self.add(out, i)
        return out

    def stack(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch.broadcast_tensors(*xs), -1)

    def op(self, op: Op, args: list[torch.Tensor], ty: TensorType) -> torch.Tensor:
        return SYMBOLIC[op.op](self, *args, **op.attrs)

    def accumulate(self, op: Op, per_iter: list[list[torch.Tensor]], ty: TensorType) -> torch.Tensor:
        return SYMBOLIC[op.op](self, *(list(xs) for xs in zip(*per_iter)), **op.attrs)


def _mul(a: z3.ArithRef, b: z3.ArithRef) -> z3.ArithRef:
    return b if _is_one(a) else a if _is_one(b) else a * b


def _lcm(a: Den, b: Den) -> Den:
    powers = dict(a)
    for k, p in b:
        powers[k] = max(powers.get(k, 0), p)
    return tuple(sorted(powers.items()))


def _monomials(t: z3.ArithRef) -> list[tuple[Fraction, z3.ArithRef]]:
    """(coefficient, monomial) pairs of a sum-of-monomials normal form."""
    parts = t.children() if z3.is_add(t) else [t]
    out = []
    for part in parts:
        if z3.is_rational_value(part):
            out.append((part.as_fraction(), ONE))
        elif z3.is_mul(part) and z3.is_rational_value(part.children()[0]):
            rest = part.children()[1:]
            out.append((part.children()[0].as_fraction(), rest[0] if len(rest) == 1 else z3.Product(*rest)))
        else:
            out.append((Fraction(1), part))
    return [(c, m) for c, m in out if c != 0]


def _matmul(ev: SymbolicEval, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lhs, rhs = a.unsqueeze(-1), b.unsqueeze(-3)  # (..., M, K, 1) and (..., 1, K, N)
    return ev.fold(ev.map(ev.mul, lhs, rhs), -2, ev.total)


def _rms(ev: SymbolicEval, total: int, count: int, eps: float) -> int:
    return ev.opaque("sqrt", ev.add(ev.mul(total, ev.const(Fraction(1, count))), ev.const(eps)))


def _rms_norm(ev: SymbolicEval, x: torch.Tensor, eps: float) -> torch.Tensor:
    root = ev.fold(ev.map(ev.mul, x, x), -1, lambda ids: _rms(ev, ev.total(ids), len(ids), eps))
    return ev.map(lambda v, r: ev.mul(v, ev.inv(r)), x, root.unsqueeze(-1))


def _layer_norm(ev: SymbolicEval, x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = ev.fold(x, -1, lambda ids: ev.mul(ev.total(ids), ev.const(Fraction(1, len(ids)))))
    return _rms_norm(ev, ev.map(lambda v, m: ev.add(v, ev.neg(m)), x, mean.unsqueeze(-1)), eps)


def _rope(ev: SymbolicEval, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([ev.map(ev.neg, x2), x1], -1)
    return ev.map(lambda v, c, r, s: ev.add(ev.mul(v, c), ev.mul(r, s)), x, cos, rotated, sin)


def _dequant(
    ev: SymbolicEval,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    group: int,
    high_first: bool,
) -> torch.Tensor:
    """(q - zero) * scale over the groups of the last dim; an int4 byte's two values are functions of it."""
    values = q
    if is_packed_int4(q, scale, group):
        low, high = (ev.map(lambda v, f=f: ev.opaque(f, v), q) for f in ("int4_low", "int4_high"))
        values = nibble_order(low, high, high_first)
    if zero is not None:
        values = ev.map(lambda v, z: ev.add(v, ev.neg(z)), values, zero.repeat_interleave(group, -1))
    return ev.map(ev.mul, values, scale.repeat_interleave(group, -1))


def _reduce(fn: Callable[[SymbolicEval, list[int]], int]) -> Callable[..., torch.Tensor]:
    def rule(ev: SymbolicEval, x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
        out = ev.fold(x, dim, lambda ids: fn(ev, ids))
        return out.unsqueeze(dim) if keepdim else out

    return rule


def _sum_last(ev: SymbolicEval, xs: list[torch.Tensor]) -> torch.Tensor:
    return ev.fold(torch.cat(torch.broadcast_tensors(*xs), -1), -1, ev.total).unsqueeze(-1)


def _rescaled_sum(ev: SymbolicEval, xs: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
    top = ev.fold(ev.stack(ms), -1, ev.multiset)
    terms = [ev.map(lambda v, m, t: ev.mul(v, ev.exp(ev.add(m, ev.neg(t)))), x, m, top) for x, m in zip(xs, ms)]
    return ev.fold(ev.stack(terms), -1, ev.total)


def _unary(fn: Callable[[SymbolicEval, int], int]) -> Callable[..., torch.Tensor]:
    return lambda ev, x: ev.map(lambda v: fn(ev, v), x)


def _sigmoid(ev: SymbolicEval, v: int) -> int:
    return ev.inv(ev.add(ev.const(1), ev.exp(ev.neg(v))))


# One rule per op of the table (graph_def is run by the executor), as in field.FIELD.
SYMBOLIC = {
    "matmul": _matmul,
    "add": lambda ev, a, b: ev.map(ev.add, a, b),
    "sub": lambda ev, a, b: ev.map(lambda x, y: ev.add(x, ev.neg(y)), a, b),
    "mul": lambda ev, a, b: ev.map(ev.mul, a, b),
    "div": lambda ev, a, b: ev.map(lambda x, y: ev.mul(x, ev.inv(y)), a, b),
    "exp": _unary(SymbolicEval.exp),
    "silu": _unary(lambda ev, v: ev.mul(v, _sigmoid(ev, v))),
    "gelu": _unary(lambda ev, v: ev.opaque("gelu", v)),
    "gelu_tanh": _unary(lambda ev, v: ev.opaque("gelu_tanh", v)),
    "relu": _unary(lambda ev, v: ev.opaque("relu", v)),
    "sigmoid": _unary(_sigmoid),
    "sqrt": _unary(lambda ev, v: ev.opaque("sqrt", v)),
    "rsqrt": _unary(lambda ev, v: ev.inv(ev.opaque("sqrt", v))),
    "square": _unary(lambda ev, v: ev.mul(v, v)),
    "neg": _unary(SymbolicEval.neg),
    "mul_scalar": lambda ev, x, c: ev.map(lambda v: ev.mul(v, ev.const(c)), x),
    "add_scalar": lambda ev, x, c: ev.map(lambda v: ev.add(v, ev.const(c)), x),
    "sum": _reduce(lambda ev, ids: ev.total(ids)),
    "max": _reduce(lambda ev, ids: ev.multiset(ids)),
    "argmax": _reduce(lambda ev, ids: ev.sequence(ids)),
    "mean": _reduce(lambda ev, ids: ev.mul(ev.total(ids), ev.const(Fraction(1, len(ids))))),
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "rope": _rope,
    "concat": lambda ev, a, b, dim: torch.cat([a, b], dim),
    "dequant": _dequant,
    "accum_sum": lambda ev, xs: ev.fold(ev.stack(xs), -1, ev.total),
    "accum_sum_last": _sum_last,
    "accum_mean_last": lambda ev, xs: ev.map(
        lambda v: ev.mul(v, ev.const(Fraction(1, len(xs) * xs[0].shape[-1]))), _sum_last(ev, xs)
    ),
    "accum_rms_last": lambda ev, xs, eps: ev.map(
        lambda v: _rms(ev, v, len(xs) * xs[0].shape[-1], eps), _sum_last(ev, [ev.map(ev.mul, x, x) for x in xs])
    ),
    "accum_max": lambda ev, xs: ev.fold(ev.stack(xs), -1, ev.multiset),
    "accum_rescaled_sum": _rescaled_sum,
}


def prove(a: KernelGraph, b: KernelGraph, budget: int = 20000, timeout_ms: int = 2000) -> bool:
    """True if z3 shows that a and b (same inputs by name) compute the same outputs; False if it cannot.
    Raises TooLarge past `budget` distinct terms, Unprovable for a constant zero denominator."""
    ev = SymbolicEval(budget)
    outs = []
    for g in (a, b):
        args = [ev.leaf(n, g.tensors[n]) for n in g.inputs]
        outs.append(batched.evaluate(g, args, ev))
    solver = None
    for x, y in zip(*outs):
        for i, j in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()):
            (n1, d1), (n2, d2) = ev.terms[i], ev.terms[j]
            common = _lcm(d1, d2)
            difference = ev.scaled(n1, d1, common) - ev.scaled(n2, d2, common)
            if i == j or _is_zero(_normal(difference)):
                continue
            if solver is None:
                solver = z3.Solver()
                solver.set("timeout", timeout_ms)
            solver.push()
            solver.add(difference != 0, *(ev.factors[k] != 0 for k, _ in common))
            verdict = solver.check()
            solver.pop()
            if verdict != z3.unsat:
                return False
    return True
