"""The float gate, the z3 prover's refusals, and the degree analysis behind the false-accept bound."""

from __future__ import annotations

from pathlib import Path

import pytest
from graphs import FUSED_SMALL, import_fused
from pairs import DIFFERENT, VERIFIED, graph

import superopt
from superopt.verification import float_gate, smt
from superopt.verification.check import false_accept_bound, per_test_bound
from superopt.verification.degree import analyze
from superopt.verification.field import P_MIN, PRIME_BITS, Q_MIN, SAFE_PRIMES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _fp16(name: str, shapes: dict, body) -> superopt.KernelGraph:
    g = superopt.Graph(name)
    ts = [g.input(n, s, "float16") for n, s in shapes.items()]
    g.output(body(g, *ts))
    return g


ATTENTION = {"q": (4, 256), "k": (256, 8)}


def _softmax(g, q, k, shift: bool):
    s = g.matmul(q, k)  # entries ~ N(0, 256) at unit inputs: exp overflows float16 unless the max is subtracted
    if shift:
        s = g.sub(s, g.max(s, 1, keepdim=True))
    e = g.exp(s)
    return g.div(e, g.sum(e, 1, keepdim=True))


@pytest.mark.parametrize("name", VERIFIED)
def test_fused_candidates_pass_the_gate(name):
    fused = import_fused("examples_fused_for_verify").build(name, FUSED_SMALL[name])
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=FUSED_SMALL[name])
    result = float_gate(fused, spec)
    assert result.passed, result.reason
    assert 0 < result.error < 1e-2 and len(result.scales) == 2


def test_inputs_are_scaled_until_the_reference_stays_in_range():
    """The gqa spec takes an unshifted exp: at unit inputs its float64 values leave float16's range, so the gate
    uses smaller inputs; rmsnorm_linear stays in range at unit inputs."""
    gqa = superopt.load(EXAMPLES / "gqa_bs1.yaml", dims=FUSED_SMALL["gqa_bs1"])
    assert float_gate(gqa, gqa).scales[0] < 1
    rms = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml", dims=FUSED_SMALL["rmsnorm_linear_bs1"])
    assert float_gate(rms, rms).scales == [1.0, 0.25]


def test_unshifted_exp_overflowing_float16_is_rejected():
    reference = _fp16("shifted", ATTENTION, lambda g, q, k: _softmax(g, q, k, True))
    candidate = _fp16("unshifted", ATTENTION, lambda g, q, k: _softmax(g, q, k, False))
    assert float_gate(reference, reference).passed
    result = float_gate(candidate, reference)
    assert not result.passed and "NaN or overflow" in result.reason and result.scales[0] == 1.0


def test_cancellation_beyond_float16_tolerance_is_rejected():
    reference = _fp16("x", {"x": (8, 16)}, lambda g, x: g.neg(x))
    candidate = _fp16("y", {"x": (8, 16)}, lambda g, x: g.add_scalar(g.neg(g.add_scalar(x, 1000.0)), 1000.0))
    result = float_gate(candidate, reference)
    assert not result.passed and result.reason.startswith("error")


def test_a_reference_out_of_range_at_every_scale_fails_the_gate():
    reference = _fp16("big", {"x": (4, 4)}, lambda g, x: g.mul_scalar(x, 1e9))
    result = float_gate(reference, reference)
    assert not result.passed and "dtype range" in result.reason and result.scales == []


@pytest.mark.parametrize("name", sorted(DIFFERENT))
def test_z3_never_proves_a_difference(name):
    assert smt.prove(*DIFFERENT[name]) is False


def test_z3_budget():
    a, b = DIFFERENT["eps changed"]
    with pytest.raises(smt.TooLarge):
        smt.prove(a, b, budget=10)


# --- degrees -----------------------------------------------------------------------------------------------


def test_a_shared_row_denominator_is_kept_through_a_matmul():
    """softmax(s) @ v: exp gives atoms of degree 1; e / sum(e) is (1, 1) with a denominator constant along the
    row, so the matmul over that row gives (2, 1), not K-fold degrees."""

    def body(g, s, v):
        e = g.exp(s)
        return g.matmul(g.div(e, g.sum(e, 1, keepdim=True)), v)

    g = graph("attention", {"s": (3, 50), "v": (50, 4)}, body)
    (out,) = analyze(g).outputs
    assert (out.num, out.den) == (2, 1)


def test_a_varying_denominator_multiplies_degrees_by_the_sum_length():
    g = graph("ratio", {"x": (3, 50), "y": (3, 50)}, lambda g, x, y: g.sum(g.div(x, y), 1))
    (out,) = analyze(g).outputs
    assert (out.num, out.den) == (1 + 49, 50)


def prime_term(degree: int, constant_bits: int, size_bits: int) -> float:
    return degree * (max(constant_bits, size_bits) + size_bits) / PRIME_BITS / SAFE_PRIMES


def test_bound_of_a_polynomial_pair_is_schwartz_zippel():
    """(a @ b) @ c against a @ (b @ c): degree 3 each, no denominators, no constants: 3 / P per test, plus the
    chance that the drawn prime divides the difference's coefficients: 3 (s + s) bits of them, s = 6 (twice the
    largest tensor, 20 elements, is 40: 6 bits), over 29 bits a prime, out of SAFE_PRIMES."""
    shapes = {"a": (3, 4), "b": (4, 5), "c": (5, 2)}
    left = analyze(graph("l", shapes, lambda g, a, b, c: g.matmul(g.matmul(a, b), c)))
    right = analyze(graph("r", shapes, lambda g, a, b, c: g.matmul(a, g.matmul(b, c))))
    assert false_accept_bound(left, right) == pytest.approx(3 / P_MIN + prime_term(3, 6, 6))
    assert left.exp_arg == left.opaque_arg == 0 and not left.nested_exp


def test_rms_norm_under_a_sum_counts_its_root_inverted():
    """softmax(s) @ rms_norm(v) (qknorm attention): with the root R_l as the variable, the sum over l has a
    common denominator of degree 2L; with t_l = 1 / R_l the output stays (3, 1), and the bound takes that."""

    def body(g, s, v):
        e = g.exp(s)
        return g.matmul(g.div(e, g.sum(e, 1, keepdim=True)), g.rms_norm(v, eps=1e-6))

    g = graph("qknorm", {"s": (3, 50), "v": (50, 4)}, body)
    (plain,) = analyze(g).outputs
    (inverted,) = analyze(g, inverse_roots=True).outputs
    assert (plain.num, plain.den) == (100, 100) and (inverted.num, inverted.den) == (3, 1)
    exponent = 2 * analyze(g).exp_arg / Q_MIN
    eps_bits = max(n.bit_length() for n in (1e-6).as_integer_ratio())
    expected = (
        (3 + 1) / Q_MIN + 2 * analyze(g).opaque_arg / P_MIN + exponent + prime_term(4, eps_bits, (2 * 150).bit_length())
    )
    assert per_test_bound(g, g) == pytest.approx(expected)


def test_exp_atoms_are_counted_over_q():
    """exp atoms take the Q values of w's powers: exp(x) against itself is 1 / Q, plus an exponent pair 2 / Q."""
    g = graph("e", {"x": (2, 3)}, lambda g, x: g.exp(x))
    assert per_test_bound(g, g) == pytest.approx(3 / Q_MIN + prime_term(1, 0, (2 * 6).bit_length()))


def test_nested_exp_is_detected():
    assert analyze(graph("nested", {"x": (2, 3)}, lambda g, x: g.exp(g.silu(x)))).nested_exp
    assert analyze(graph("nested", {"x": (2, 3)}, lambda g, x: g.silu(g.exp(x)))).nested_exp
    assert not analyze(graph("flat", {"x": (2, 3)}, lambda g, x: g.mul(g.exp(x), g.silu(x)))).nested_exp
