"""Finite-field random testing of graph equivalence (Mirage, OSDI'25 section 5), several tests at once.

Encoding. Every value is a pair (v mod P, v mod Q) with P = 2Q + 1 prime, so Q | P - 1 and Z_P* holds a subgroup
of order Q. Inputs are independent uniform residues in each field. +, -, *, / and exact constants (a float
scalar or eps is the rational it denotes, `Fraction(c)`) act in both fields; sums and matmuls reduce exactly.
exp(x) = w^(x mod Q) in Z_P for a random w of order Q, so exp(a + b) = exp(a) exp(b) holds exactly: the
Z_Q half is where exponents live. silu(x) = x / (1 + exp(-x)) and sigmoid(x) = 1 / (1 + exp(-x)) are those
expressions. A test draws fresh inputs, a fresh w and fresh keys for every test; T tests run side by side in a
trailing dim of 2T components (T mod P, then T mod Q). A zero denominator raises ZeroDenominator and the caller
redraws; nothing is ever mapped to a constant.

The primes. Each test draws its own pair, Q uniformly (by rejection) among the SAFE_PRIMES primes in [2^29, 2^30)
with 2Q + 1 prime, from the test's seed. A fixed pair would be defeated by one constant: c = P (or any multiple)
is 0 in Z_P, so `x + c` and `x` would agree in every test. With primes drawn per test, an integer of B bits
(a constant's numerator, a coefficient of the difference below) is divisible by at most B / 29 of the candidate
primes, so a fixed constant vanishes in one test with probability at most B / 29 / SAFE_PRIMES, and T tests
draw T independent primes. Q < 2^30 keeps an exponent three 10-bit digits; P < 2^31 keeps a product of two
residues inside int64.

Soundness (no false accept). Let A be the free algebra of terms over the inputs: field operations, exp, and one
uninterpreted function symbol per op outside the field (sqrt, gelu, relu, max, ...), with exactly the laws of
fields and exp(a + b) = exp(a) exp(b). The real semantics is a model of A (reals satisfy those laws; the opaque
ops are some functions), so two graphs whose terms are equal in A compute the same real function wherever their
denominators are nonzero. The encoding is a random homomorphic image of A: an uninterpreted symbol f becomes a
fresh keyed pseudo-random function R_f of its argument's residue (one per field, modelled as a random oracle),
and the Z_Q image of exp(t) (needed only when exp is nested) is another such function. So graphs that differ as
real functions differ in A, and a random image separates them with high probability:
  - exp-free and opaque-free graphs: Schwartz-Zippel on N1 D2 - N2 D1 gives P[false accept] <= D / P per test,
    D the degree bound computed in `degree.py`.
  - opaque results and exp atoms are treated as fresh variables, drawn from the P - 1 nonzero residues
    (opaque) and the Q powers of w (exp), so D / Q replaces D / P where exp occurs; that holds unless two
    formally distinct arguments collide, which adds D_arg / P (opaque) and D_arg / Q (exponents) for one
    pair. This part is a heuristic bound, not a theorem: no union bound over all pairs is taken (it would be
    vacuous for a softmax over thousands of positions); Li and Wu (2025) conjecture that it holds, and Mirage
    relies on it.
Tests are independent, so T tests give bound^T.

Completeness (an equivalent rewrite is not rejected) holds where the encoding is itself a model of the real
identities the rewrites use: field identities (associativity of matmul, distributivity, a division moved past a
sum or a matmul, concatenation forms), exp(a + b) = exp(a) exp(b) (a row max subtracted in softmax: whatever
value max encodes to, w^-m cancels between numerator and denominator), silu and sigmoid as written.

sqrt and rsqrt. sqrt(v) = R_sqrt(v) (with R_sqrt(0) = 0, a true identity), rsqrt(v) = 1 / R_sqrt(v); rms_norm and
accum_rms_last use the same R_sqrt on the mean square plus eps. Sound: R_sqrt is an uninterpreted function, as
above. Complete for the rewrites the search makes, because they all apply sqrt to the same field value on both
sides: the mean square is a sum times the exact inverse of the count, and sum_i sum_j x_ij^2 / (F n) over loop
iterations equals mean(x^2) over the row as residues; x * rsqrt(v), x / sqrt(v), and a division by sqrt(v)
moved past a matmul all become x * R_sqrt(v)^-1. It is not complete for sqrt(a) sqrt(b) = sqrt(ab) or
sqrt(x)^2 = x; such graphs are rejected in the field and left to the caller (see `COMPLETE`).

max, accum_max and accum_rescaled_sum's running max are one symmetric opaque function of the multiset of values
max-ed: R_max(sum_i R_elem(x_i)); equal multisets give equal values, so the online-softmax rescaling
sum_i x_i exp(m_i - M) cancels as it does over the reals. max(max(a), max(b)) = max(a, b) is not modelled.

argmax is an opaque function of the sequence of values along its dim, not of their multiset (the index moves
with a permutation): R_argmax(sum_i R_pos(i) R_elem(x_i)), its own keys, so it is neither max nor argmax of
the values in another order. None of its real identities (argmax(x + c) = argmax(x), argmax of a monotone
function of x, a split argmax recombined) is modelled: it is outside COMPLETE.

dequant. An int8 input is a residue like any other: (q - zero) * scale, with each scale and zero repeated over
its group, is polynomial in q, scale and zero, so exact. An int4 input is drawn as one residue b per byte, and
its two values are two opaque functions of it, R_low(b) for value 2j and R_high(b) for 2j + 1 (swapped where
high_first): independent fresh variables, as the real nibbles of a byte are independent values. Only dequant
reads an integer tensor, so every real identity between two graphs is one in those values, scales and zeros,
and holds in the field: dequant is in COMPLETE. A graph that reads the other nibble, another group's scale or
drops the zero differs as a polynomial in them and is caught like any other difference. (Identities that hold
only because a value has 16 or 256 possibilities, a product over all of them vanishing, are not modelled; no
rewrite uses one.)
"""

from __future__ import annotations

import random
from fractions import Fraction

import torch

from superopt.interpret import is_packed_int4, nibble_order
from superopt.ir import KernelGraph, Op
from superopt.ops import TensorType
from superopt.verification import batched

Q_MIN, Q_END = 2**29, 2**30  # each test's Q is drawn from [Q_MIN, Q_END); P = 2Q + 1
P_MIN = 2 * Q_MIN + 1  # the smallest P, Q_MIN the smallest Q: what the false-accept bound divides by
SAFE_PRIMES = 1_634_069  # primes Q in [2^29, 2^30) with 2Q + 1 prime (counted once by a sieve up to 2^31)
PRIME_BITS = 29  # a prime drawn is at least 2^29: an integer of B bits has at most B / 29 such prime factors
DIGIT = 10  # exponents (< 2^30) are read as three 10-bit digits, each indexing a table of powers of w
MIX = 2147483579  # the prime modulus of the opaque functions' mixing rounds (any prime < 2^31 serves)
_SMALL_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)

# Ops encoded exactly: the field image of every real identity they satisfy holds. Any other op (and exp nested
# inside an exponent, see degree.py) makes a mismatch inconclusive.
COMPLETE = frozenset(
    {
        "matmul",
        "add",
        "sub",
        "mul",
        "div",
        "exp",
        "silu",
        "sigmoid",
        "square",
        "neg",
        "mul_scalar",
        "add_scalar",
        "rope",
    }
    | {"sum", "mean", "concat", "dequant", "accum_sum", "accum_sum_last", "accum_mean_last", "graph_def"}
)
OPAQUE = ("sqrt", "gelu", "gelu_tanh", "relu", "max", "max.elem", "exp.q", "argmax", "argmax.elem", "argmax.pos")
OPAQUE += ("int4.low", "int4.high")


class ZeroDenominator(Exception):
    """A denominator evaluated to zero in some test (or a constant's denominator is a multiple of a drawn prime);
    the caller redraws."""


def is_prime(n: int) -> bool:
    """Miller-Rabin with bases 2, 3, 5, 7: exact for n < 3,215,031,751, which covers every P (< 2^31)."""
    if n < 2 or any(n % p == 0 for p in (2, *_SMALL_PRIMES)):
        return n in (2, *_SMALL_PRIMES)
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def safe_prime(rng: random.Random) -> tuple[int, int]:
    """(P, Q) with Q uniform among the primes in [Q_MIN, Q_END) whose P = 2Q + 1 is prime (rejection sampling:
    about 330 draws, most refused by a small prime, under a millisecond)."""
    while True:
        q = rng.randrange(Q_MIN, Q_END) | 1
        if is_prime(q) and is_prime(2 * q + 1):
            return 2 * q + 1, q


class FieldEval:
    """An evaluator (op/accumulate, as `superopt.interpret.TorchEval`) over T tests in Z_P x Z_Q.

    A value of logical shape S is an int64 tensor of shape (2T,) + S: components t < T are mod P (test t),
    components T + t are mod Q (test t). The component dim leads so that matmul operands stay contiguous.
    Only exp reads the Q components, so they are dropped where no exp can read them: without `exponents`
    (graphs with no exp) no value has them; without `nested` (no exp argument depends on an exp) exp results
    and everything computed from them keep the P components only (an op on a mix keeps the common prefix).
    """

    def __init__(self, tests: int, seed: int, exponents: bool = True, nested: bool = True) -> None:
        self.tests = tests
        self.nested = nested
        self.gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.primes = [safe_prime(rng) for _ in range(tests)]  # (P_t, Q_t) of test t
        self.p = torch.tensor([p for p, _ in self.primes])
        self.mod = torch.tensor([p for p, _ in self.primes] + [q for _, q in self.primes] * exponents)
        self.inputs: dict[str, torch.Tensor] = {}
        self._consts: dict[Fraction, torch.Tensor] = {}
        self.keys = {name: self._residues((3,)) for name in OPAQUE}
        # w_t = g^2 for g in [2, P_t - 2] has order Q_t: the squares form the subgroup of order Q_t, and g^2 != 1.
        self.w = torch.tensor([pow(rng.randrange(2, p - 1), 2, p) for p, _ in self.primes])
        self.tables = [
            _powers(torch.tensor([pow(int(w), 1 << (DIGIT * k), p) for w, (p, _) in zip(self.w, self.primes)]), self.p)
            for k in range(3)
        ]

    def _residues(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform residues in each component's field (62 random bits reduced: a bias below 2^-31)."""
        x = torch.empty((len(self.mod),) + tuple(shape), dtype=torch.int64)
        return x.random_(0, 2**62, generator=self.gen).remainder_(self.m(x))

    def m(self, x: torch.Tensor) -> torch.Tensor:
        """The moduli of x's components, shaped to broadcast against x."""
        return self.mod[: x.shape[0]].reshape((-1,) + (1,) * (x.dim() - 1))

    # --- evaluator interface -------------------------------------------------------------------------------

    def input(self, name: str, ty: TensorType) -> torch.Tensor:
        """The random value of graph input `name`, the same for every graph evaluated with this object."""
        if name not in self.inputs:
            self.inputs[name] = self._residues(ty.shape)
        return self.inputs[name]

    def op(self, op: Op, args: list[torch.Tensor], ty: TensorType) -> torch.Tensor:
        return FIELD[op.op](self, *args, **op.attrs)

    def accumulate(self, op: Op, per_iter: list[list[torch.Tensor]], ty: TensorType) -> torch.Tensor:
        return FIELD[op.op](self, *(list(xs) for xs in zip(*per_iter)), **op.attrs)

    # --- arithmetic (dims are logical: the component dim is skipped) --------------------------------------

    def const(self, value: float | int | Fraction) -> torch.Tensor:
        """The exact rational `value` as a residue in each component, shape (2T,)."""
        r = Fraction(value)
        if r not in self._consts:
            if any(r.denominator % m == 0 for m in self.mod.tolist()):
                raise ZeroDenominator
            self._consts[r] = torch.tensor([r.numerator % m * pow(r.denominator, -1, m) % m for m in self.mod.tolist()])
        return self._consts[r]

    def scalar(self, x: torch.Tensor, value: float | int | Fraction) -> torch.Tensor:
        return self.const(value)[: x.shape[0]].reshape(self.m(x).shape)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _align(a, b)
        return (a + b).remainder_(self.m(a))

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _align(a, b)
        return (a - b).remainder_(self.m(a))

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _align(a, b)
        return (a * b).remainder_(self.m(a))

    def inv(self, x: torch.Tensor) -> torch.Tensor:
        """x^-1 = x^(m - 2) per component; raises ZeroDenominator if any component is 0."""
        if bool((x == 0).any()):
            raise ZeroDenominator
        mod = self.m(x)
        exponent = mod - 2
        result = torch.ones_like(x)
        base = x
        while bool((exponent > 0).any()):
            result = torch.where(exponent % 2 == 1, result * base % mod, result)
            base = base * base % mod
            exponent = exponent // 2
        return result

    def div(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.mul(a, self.inv(b))

    def sum(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        out = x.sum(dim + 1, keepdim=keepdim)
        return out % self.m(out)

    def mean(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        out = self.sum(x, dim, keepdim)
        return self.mul(out, self.scalar(out, Fraction(1, x.shape[dim + 1])))

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact (a @ b) mod m through float64 matmuls: the smaller operand is cut into L-bit digits, the larger
        is used whole (< 2^31), with K * 2^L * 2^31 <= 2^53 so that every float64 sum is an exact integer; the
        digits' products are combined by Horner's rule in int64 (< 2^31 * 2^L + 2^53 < 2^63)."""
        a, b = _align(a, b)
        k = a.shape[-1]
        limb = 22 - max(k - 1, 1).bit_length()
        if limb < 2:
            raise ValueError(f"matmul inner dim {k} is too long for exact float64 limbs")
        cut_a = a.numel() <= b.numel()
        small, whole = (a, b) if cut_a else (b, a)
        mod, whole = self.m(whole), whole.double()
        out = None
        for shift in reversed(range(0, 31, limb)):
            digit = ((small >> shift) & ((1 << limb) - 1)).double()
            part = (_matmul(digit, whole) if cut_a else _matmul(whole, digit)).long()
            out = part if out is None else out.mul_(1 << limb).add_(part)
            out.remainder_(mod)
        return out

    # --- opaque functions and exp --------------------------------------------------------------------------

    def opaque(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A keyed pseudo-random function of each residue, into [1, m): xor with a key, multiply mod MIX, fold
        the high bits down; three rounds. Every intermediate stays below 2^62."""
        keys = self.keys[name][: x.shape[0]].T.reshape((3,) + self.m(x).shape)
        z = x
        for r, mult in enumerate((0x5BD1E995, 0x27D4EB2F, 0x165667B1)):
            z = (z ^ keys[r]) * mult % MIX
            z = z ^ (z >> 13)
        return 1 + z % (self.m(x) - 1)

    def multiset(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The symmetric opaque function of the values along tensor dim `dim` (max's encoding)."""
        parts = self.opaque(x, "max.elem").sum(dim)
        return self.opaque(parts % self.m(parts), "max")

    def sequence(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The opaque function of the values along tensor dim `dim` in their order (argmax's encoding): each
        value's opaque image weighted by an opaque image of its position, so a permutation changes it."""
        n = x.shape[dim]
        where = [1] * x.dim()
        where[0], where[dim] = x.shape[0], n
        positions = self.opaque(torch.arange(n).expand(x.shape[0], n).reshape(where), "argmax.pos")
        parts = (self.opaque(x, "argmax.elem") * positions % self.m(x)).sum(dim)  # products < 2^62, reduced first
        return self.opaque(parts % self.m(parts), "argmax")

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tests
        if x.shape[0] == t:
            raise ValueError("FieldEval(exponents=False) cannot evaluate exp")
        e = x[t:].reshape(t, -1)  # each test's exponent: its Z_Q component
        p_part = None
        for k, table in enumerate(self.tables):
            power = table.gather(1, (e >> (DIGIT * k)) & ((1 << DIGIT) - 1))
            p_part = power if p_part is None else p_part.mul_(power).remainder_(self.p[:, None])
        p_part = p_part.reshape(x[t:].shape)
        return torch.cat([p_part, self.opaque(x, "exp.q")[t:]]) if self.nested else p_part

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x == 0, x, self.opaque(x, "sqrt"))

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        e = self.exp((-x) % self.m(x))
        return self.inv((1 + e) % self.m(e))

    def rms(self, total: torch.Tensor, count: int, eps: float) -> torch.Tensor:
        """sqrt(total / count + eps): the root mean square of rms_norm and accum_rms_last."""
        mean = self.mul(total, self.scalar(total, Fraction(1, count)))
        return self.sqrt(self.add(mean, self.scalar(total, eps)))


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The components both operands have (the P components come first)."""
    c = min(a.shape[0], b.shape[0])
    return a[:c], b[:c]


def _align(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The common components, and the operand of lower logical rank padded with size-1 dims after the component
    dim, so that broadcasting lines up the logical dims from the right."""
    a, b = _common(a, b)
    if a.dim() < b.dim():
        a = a.reshape(a.shape[:1] + (1,) * (b.dim() - a.dim()) + a.shape[1:])
    elif b.dim() < a.dim():
        b = b.reshape(b.shape[:1] + (1,) * (a.dim() - b.dim()) + b.shape[1:])
    return a, b


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for operands of equal rank, as few large matmuls: a batch dim where only b varies joins b's
    columns, one where only a varies joins a's rows (torch.matmul would expand the other operand)."""
    batch = range(a.dim() - 2)
    cols = [d for d in batch if a.shape[d] == 1 < b.shape[d]]
    rows = [d for d in batch if b.shape[d] == 1 < a.shape[d]]
    common = [d for d in batch if d not in cols and d not in rows]
    m, n = a.dim() - 2, a.dim() - 1
    lhs = a.permute(common + cols + rows + [m, n])
    lhs = lhs.reshape(lhs.shape[: len(common)] + (-1, a.shape[n]))
    rhs = b.permute(common + rows + [m] + cols + [n])
    rhs = rhs.reshape(rhs.shape[: len(common)] + (b.shape[m], -1))
    out = torch.matmul(lhs, rhs)
    shape = [a.shape[d] for d in common] + [a.shape[d] for d in rows] + [a.shape[m]]
    shape += [b.shape[d] for d in cols] + [b.shape[n]]
    out = out.reshape(shape)
    order = common + rows + [m] + cols + [n]  # the original dim each dim of `out` stands for
    return out.permute([order.index(d) for d in [*batch, m, n]])


def _powers(base: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """base[t]^i mod p[t] for i < 2^DIGIT, shape (T, 2^DIGIT), by doubling."""
    table = torch.ones(base.shape[0], 1, dtype=torch.int64)
    step = base.clone()
    while table.shape[1] < 1 << DIGIT:
        table = torch.cat([table, table * step[:, None] % p[:, None]], 1)
        step = step * step % p
    return table


def _sum_last(ev: FieldEval, xs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.stack([x.sum(-1, keepdim=True) for x in xs]).sum(0)
    return out % ev.m(out)


def _accum_max(ev: FieldEval, xs: list[torch.Tensor]) -> torch.Tensor:
    return ev.multiset(torch.stack(xs, 1), 1)


def _rescaled_sum(ev: FieldEval, xs: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
    top = _accum_max(ev, ms)
    terms = torch.stack([ev.mul(x, ev.exp(ev.sub(m, top))) for x, m in zip(xs, ms)]).sum(0)
    return terms % ev.m(terms)


def _rms_norm(ev: FieldEval, x: torch.Tensor, eps: float) -> torch.Tensor:
    total = ev.mul(x, x).sum(-1, keepdim=True)
    return ev.mul(x, ev.inv(ev.rms(total % ev.m(total), x.shape[-1], eps)))


def _layer_norm(ev: FieldEval, x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / R_sqrt(mean((x - mean)^2) + eps): the same R_sqrt as rms_norm, on the centered values."""
    centered = ev.sub(x, ev.mean(x, x.dim() - 2, keepdim=True))
    total = ev.mul(centered, centered).sum(-1, keepdim=True)
    return ev.mul(centered, ev.inv(ev.rms(total % ev.m(total), x.shape[-1], eps)))


def _rope(ev: FieldEval, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([(-x2) % ev.m(x2), x1], -1)
    return ev.add(ev.mul(x, cos), ev.mul(rotated, sin))


def _rms_last(ev: FieldEval, xs: list[torch.Tensor], eps: float) -> torch.Tensor:
    return ev.rms(_sum_last(ev, [ev.mul(x, x) for x in xs]), len(xs) * xs[0].shape[-1], eps)


def _max(ev: FieldEval, x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    out = ev.multiset(x, dim + 1)
    return out.unsqueeze(dim + 1) if keepdim else out


def _argmax(ev: FieldEval, x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    out = ev.sequence(x, dim + 1)
    return out.unsqueeze(dim + 1) if keepdim else out


def _dequant(
    ev: FieldEval,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    group: int,
    high_first: bool,
) -> torch.Tensor:
    """(q - zero) * scale over the groups of the last dim; an int4 byte's two values are its opaque images."""
    values = q
    if is_packed_int4(q, scale, group):
        values = nibble_order(ev.opaque(q, "int4.low"), ev.opaque(q, "int4.high"), high_first)
    if zero is not None:
        values = ev.sub(values, zero.repeat_interleave(group, -1))
    return ev.mul(values, scale.repeat_interleave(group, -1))


def _accum_sum(ev: FieldEval, xs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.stack(xs).sum(0)
    return out % ev.m(out)


# One rule per op of the table (graph_def is run by the executor): rule(ev, *operands, **attrs); accumulators
# get, per operand, the list of its per-iteration values.
FIELD = {
    "matmul": FieldEval.matmul,
    "add": FieldEval.add,
    "sub": FieldEval.sub,
    "mul": FieldEval.mul,
    "div": FieldEval.div,
    "exp": FieldEval.exp,
    "silu": lambda ev, x: ev.mul(x, ev.sigmoid(x)),
    "gelu": lambda ev, x: ev.opaque(x, "gelu"),
    "gelu_tanh": lambda ev, x: ev.opaque(x, "gelu_tanh"),
    "relu": lambda ev, x: ev.opaque(x, "relu"),
    "sigmoid": FieldEval.sigmoid,
    "sqrt": FieldEval.sqrt,
    "rsqrt": lambda ev, x: ev.inv(ev.sqrt(x)),
    "square": lambda ev, x: ev.mul(x, x),
    "neg": lambda ev, x: (-x) % ev.m(x),
    "mul_scalar": lambda ev, x, c: ev.mul(x, ev.scalar(x, c)),
    "add_scalar": lambda ev, x, c: ev.add(x, ev.scalar(x, c)),
    "sum": FieldEval.sum,
    "max": _max,
    "argmax": _argmax,
    "mean": FieldEval.mean,
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "rope": _rope,
    "concat": lambda ev, a, b, dim: torch.cat(_common(a, b), dim + 1),
    "dequant": _dequant,
    "accum_sum": _accum_sum,
    "accum_sum_last": _sum_last,
    "accum_mean_last": lambda ev, xs: ev.mul(
        _sum_last(ev, xs), ev.scalar(xs[0], Fraction(1, len(xs) * xs[0].shape[-1]))
    ),
    "accum_rms_last": _rms_last,
    "accum_max": _accum_max,
    "accum_rescaled_sum": _rescaled_sum,
}


def evaluate(graph: KernelGraph, ev: FieldEval) -> list[torch.Tensor]:
    """The graph's outputs on ev's random inputs (looked up by input name), T tests at once."""
    return batched.evaluate(graph, [ev.input(n, graph.tensors[n]) for n in graph.inputs], ev, lead=1)
