"""verify(a, b): are two programs or µGraphs with the same inputs and outputs equivalent?

The pair is first shrunk along its batch dims (shrink.py): slices that both graphs compute alike and
independently are checked once, which decides the full pair. Finite-field tests on the shrunk pair decide first
(field.py). If they all agree, the graphs are equivalent with the reported false-accept bound ("tested"),
upgraded to "proved" when z3 can show it on shrunk graphs small enough to expand (smt.py). If a test disagrees
and both graphs lie in the fragment the field encodes exactly, they are not equivalent. Outside it (sqrt, max,
gelu, ... or a nested exp) a field mismatch may come from the encoding, so float64 decides, on the full graphs
so that a counterexample reproduces on them: a clear difference is one; otherwise the verdict is undecided
("numeric only").
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.verification import field, numeric, smt
from superopt.verification.degree import EXP_FAMILY, Analysis, analyze
from superopt.verification.shrink import shrink

DRAWS = 8  # redraws after a zero denominator before giving up
SMT_SIZE = 2000  # proofs are tried on graphs expanding to at most this many scalar operations (z3: ~0.2 ms each)


class SignatureMismatch(SuperoptError):
    """The two graphs do not have the same inputs (names, shapes, dtypes) and outputs (shapes, dtypes)."""


@dataclass
class Counterexample:
    """Where the graphs differ: output `output` (by a's name) on random_inputs(seed, scale) in float64, or, for a
    difference only the field shows, in field test `test` of FieldEval(tests, seed)."""

    output: str
    seed: int
    scale: float | None = None
    error: float | None = None
    test: int | None = None

    def __str__(self) -> str:
        if self.test is not None:
            return f"output {self.output} differs in finite-field test {self.test} of seed {self.seed}"
        return (
            f"output {self.output} differs by {self.error:.3g} (relative, float64) "
            f"on random inputs of seed {self.seed}, scale {self.scale:g}"
        )


@dataclass
class VerifyResult:
    """equivalent: True, False, or None (undecided, `reason` says why). method: "proved", "tested" (`tests`
    finite-field tests; `bound` is the false-accept probability, `per_test_bound` that of one test) or
    "numeric only" (float64 alone)."""

    equivalent: bool | None
    method: str
    tests: int
    bound: float
    per_test_bound: float
    counterexample: Counterexample | None = None
    reason: str = ""
    seed: int = 0
    seconds: float = 0.0
    shrunk: tuple[str, ...] = ()  # the batches the pair was shrunk along (shrink.py)

    def __str__(self) -> str:
        verdict = {True: "equivalent", False: "not equivalent", None: "undecided"}[self.equivalent]
        if self.method == "proved":
            how = "proved (z3)"
        elif self.method == "tested":
            how = f"tested: {self.tests} finite-field tests, false-accept bound {self.bound:.3g}"
            how += f" ({self.per_test_bound:.3g} per test)"
        else:
            how = "numeric only"
        lines = [f"{verdict} ({how}; seed {self.seed}, {self.seconds:.2f} s)"]
        if self.shrunk:
            lines.append(f"checked on one chunk of independent slices: {'; '.join(self.shrunk)}")
        if self.counterexample is not None:
            lines.append(str(self.counterexample))
        if self.reason:
            lines.append(self.reason)
        return "\n".join(lines)


def check_signature(a: KernelGraph, b: KernelGraph) -> None:
    """Raises SignatureMismatch unless a and b have the same inputs by name and the same output types in order."""
    ins_a = {n: a.tensors[n] for n in a.inputs}
    ins_b = {n: b.tensors[n] for n in b.inputs}
    if ins_a != ins_b:
        only = sorted(set(ins_a) ^ set(ins_b))
        if only:
            raise SignatureMismatch(f"inputs differ: {', '.join(only)} in only one of {a.name}, {b.name}")
        name = next(n for n in ins_a if ins_a[n] != ins_b[n])
        raise SignatureMismatch(f"input {name} is {ins_a[name]} in {a.name} but {ins_b[name]} in {b.name}")
    outs_a = [a.tensors[o] for o in a.outputs]
    outs_b = [b.tensors[o] for o in b.outputs]
    if outs_a != outs_b:
        returns = [", ".join(map(str, outs)) for outs in (outs_a, outs_b)]
        raise SignatureMismatch(f"outputs differ: {a.name} returns {returns[0]}, {b.name} returns {returns[1]}")


def false_accept_bound(a: Analysis, b: Analysis) -> float:
    """One test's false-accept bound (field.py): the degree D of N_a D_b - N_b D_a over the size of the smallest
    set a variable is drawn from (inputs: P residues, opaque atoms: P - 1, exp atoms: the Q powers of w), plus
    one collision of opaque arguments over P and of exponents over Q, plus the chance that the test's prime
    divides every coefficient of the difference (nonzero over the rationals, once denominators are cleared).
    Each degree of a coefficient multiplies by a constant or count of at most b bits and sums fewer than 2^s
    terms (s: `size_bits`), so it has at most D (b + s) bits and at most D (b + s) / 29 of the SAFE_PRIMES
    candidates divide it. The smallest prime of the range stands for the drawn one."""
    output = max((max(x.num + y.den, y.num + x.den) for x, y in zip(a.outputs, b.outputs)), default=0)
    opaque = 2 * max(a.opaque_arg, b.opaque_arg)
    exponent = 2 * max(a.exp_arg, b.exp_arg)
    values = field.Q_MIN if (a.ops | b.ops) & EXP_FAMILY else field.P_MIN - 1
    size = max(a.size_bits, b.size_bits)
    bits = output * (max(a.constant_bits, b.constant_bits, size) + size)
    prime = bits / field.PRIME_BITS / field.SAFE_PRIMES
    return min(1.0, output / values + opaque / field.P_MIN + exponent / field.Q_MIN + prime)


def per_test_bound(a: KernelGraph, b: KernelGraph) -> float:
    """The smaller of the two bounds that count square roots as atoms or as inverse atoms (degree.py)."""
    return min(false_accept_bound(analyze(a, flip), analyze(b, flip)) for flip in (False, True))


def _expansion(graph: KernelGraph) -> int:
    """Scalar operations a symbolic evaluation of graph performs, roughly."""
    total = 0
    for op in graph.ops:
        if op.block is None:
            inner = graph.tensors[op.inputs[0]].shape[-1] if op.op == "matmul" else 1
            total += inner * math.prod(graph.tensors[op.outputs[0]].shape)
            continue
        b = op.block
        runs = math.prod(b.grid) * b.forloop_range
        for bop in b.ops:
            inner = b.tensors[bop.inputs[0]].shape[-1] if bop.op == "matmul" else 1
            total += runs * inner * math.prod(b.tensors[bop.outputs[0]].shape)
    return total


def _field_mismatch(a: KernelGraph, b: KernelGraph, tests: int, seed: int, needs: Analysis) -> tuple[int, int] | None:
    """The first (output, test) where the graphs' field values differ; raises ZeroDenominator (a redraw also
    draws fresh primes: the seed changes)."""
    ev = field.FieldEval(tests, seed, exponents=bool(needs.ops & EXP_FAMILY), nested=needs.nested_exp)
    for k, (x, y) in enumerate(zip(field.evaluate(a, ev), field.evaluate(b, ev))):
        differs = (x[:tests] != y[:tests]).reshape(tests, -1).any(1)
        if bool(differs.any()):
            return k, int(differs.nonzero()[0])
    return None


def verify(
    a: KernelGraph,
    b: KernelGraph,
    tests: int = 4,
    seed: int | None = None,
    prove: bool = True,
    numeric_ok: bool = False,
) -> VerifyResult:
    """Decides whether a and b compute the same outputs (see the module doc). `seed` fixes the randomness
    (default: fresh); `prove` tries z3 on small graphs; with `numeric_ok`, agreement in float64 alone counts as
    equivalent (method "numeric only"). Raises SignatureMismatch if the graphs' inputs or outputs differ."""
    start = time.perf_counter()
    check_signature(a, b)
    seed = secrets.randbits(62) if seed is None else seed
    small_a, small_b, shrunk = shrink(a, b)
    analyses = analyze(small_a), analyze(small_b)
    per_test = per_test_bound(small_a, small_b)
    needs = Analysis(ops=analyses[0].ops | analyses[1].ops, nested_exp=any(x.nested_exp for x in analyses))

    def result(equivalent: bool | None, method: str, **kw: object) -> VerifyResult:
        bound = per_test**tests if method == "tested" else 0.0 if method == "proved" else 1.0
        seconds = time.perf_counter() - start
        return VerifyResult(equivalent, method, tests, bound, per_test, seed=seed, seconds=seconds, shrunk=shrunk, **kw)

    for draw in range(DRAWS):
        try:
            mismatch = _field_mismatch(small_a, small_b, tests, seed + draw, needs)
            break
        except field.ZeroDenominator:
            continue
    else:
        return result(None, "tested", reason=f"a denominator was zero in each of {DRAWS} draws: a division by zero?")
    field_seed = seed + draw

    if mismatch is None:
        if prove and max(_expansion(small_a), _expansion(small_b)) <= SMT_SIZE:
            try:
                if smt.prove(small_a, small_b):
                    return result(True, "proved")
            except smt.Unprovable:
                pass
        return result(True, "tested")

    output = a.outputs[mismatch[0]]
    exact = needs.ops <= field.COMPLETE and not needs.nested_exp
    difference, largest = numeric.first_difference(a, b)
    if difference is not None:
        example = Counterexample(a.outputs[difference.output], difference.seed, difference.scale, difference.error)
        return result(False, "tested" if exact else "numeric only", counterexample=example)
    if exact:
        note = f"the difference is below float64 resolution here (largest relative difference {largest:.3g})"
        return result(False, "tested", counterexample=Counterexample(output, field_seed, test=mismatch[1]), reason=note)
    what = ", ".join(sorted(needs.ops - field.COMPLETE) + ["exp nested in an exponent"] * needs.nested_exp)
    reason = (
        f"the finite-field encoding of {what} is not exact and shows a difference in output {output}, "
        f"but float64 agrees (largest relative difference {largest:.3g})"
    )
    return result(True if numeric_ok else None, "numeric only", reason=reason)
