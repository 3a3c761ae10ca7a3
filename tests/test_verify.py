"""verify(a, b) and `superopt verify`: known-equivalent rewrites are accepted (and proved where z3 can), known
non-equivalences rejected with a counterexample that reproduces, the encodings outside the exact fragment (sqrt,
relu, max, ...) never accept a difference and never claim one float64 cannot show, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from graphs import FUSED_SMALL
from test_verify_field import fused_module

import superopt
from superopt.cli.verify_cmd import verify_command
from superopt.interpret import random_inputs
from superopt.serialize import dump
from superopt.verification import SignatureMismatch, verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
F32 = "float32"


def graph(name: str, inputs: dict[str, tuple[int, ...]], body) -> superopt.KernelGraph:
    """A kernel graph with float32 inputs; body(g, *inputs) returns its output tensor(s)."""
    g = superopt.Graph(name)
    ts = [g.input(n, s, F32) for n, s in inputs.items()]
    outs = body(g, *ts)
    for o in outs if isinstance(outs, tuple) else (outs,):
        g.output(o)
    return g


MAT = {"a": (3, 4), "b": (4, 5), "c": (5, 2)}
VEC = {"x": (3, 6), "y": (3, 6), "z": (3, 6)}
ROWS = {"x": (3, 6), "w": (6, 4)}
LORA = {"x": (2, 6), "w": (6, 5), "a": (6, 2), "b": (2, 5)}
SOFTMAX = {"s": (3, 7)}


def _softmax(g, s):
    e = g.exp(s)
    return g.div(e, g.sum(e, 1, keepdim=True))


def _softmax_shifted(g, s):
    e = g.exp(g.sub(s, g.max(s, 1, keepdim=True)))
    return g.div(e, g.sum(e, 1, keepdim=True))


def _row_scale(g, x):
    return g.rsqrt(g.add_scalar(g.mean(g.square(x), 1, keepdim=True), 1e-6))  # 1 / rms(x), per row


# Pairs of graphs equal as real functions: the rewrites the search relies on.
EQUIVALENT = {
    "matmul associativity": (
        graph("l", MAT, lambda g, a, b, c: g.matmul(g.matmul(a, b), c)),
        graph("r", MAT, lambda g, a, b, c: g.matmul(a, g.matmul(b, c))),
    ),
    "distributivity": (
        graph("l", VEC, lambda g, x, y, z: g.mul(g.add(x, y), z)),
        graph("r", VEC, lambda g, x, y, z: g.add(g.mul(x, z), g.mul(y, z))),
    ),
    "exp(a + b) = exp(a) exp(b)": (
        graph("l", VEC, lambda g, x, y, z: g.exp(g.add(x, y))),
        graph("r", VEC, lambda g, x, y, z: g.mul(g.exp(x), g.exp(y))),
    ),
    "division moved past a sum": (
        graph("l", ROWS, lambda g, x, w: g.sum(g.mul(x, _row_scale(g, x)), 1, keepdim=True)),
        graph("r", ROWS, lambda g, x, w: g.mul(g.sum(x, 1, keepdim=True), _row_scale(g, x))),
    ),
    "division moved past a matmul": (
        graph("l", ROWS, lambda g, x, w: g.matmul(g.rms_norm(x, eps=1e-6), w)),
        graph("r", ROWS, lambda g, x, w: g.mul(g.matmul(x, w), _row_scale(g, x))),
    ),
    "lora concat form": (
        graph("l", LORA, lambda g, x, w, a, b: g.add(g.matmul(x, w), g.matmul(g.matmul(x, a), b))),
        graph("r", LORA, lambda g, x, w, a, b: g.matmul(g.concat(x, g.matmul(x, a), 1), g.concat(w, b, 0))),
    ),
    "row max subtracted in softmax": (graph("l", SOFTMAX, _softmax), graph("r", SOFTMAX, _softmax_shifted)),
    "silu = x * sigmoid(x)": (
        graph("l", VEC, lambda g, x, y, z: g.silu(x)),
        graph("r", VEC, lambda g, x, y, z: g.mul(x, g.sigmoid(x))),
    ),
    "x / sqrt(v) = x * rsqrt(v)": (
        graph("l", VEC, lambda g, x, y, z: g.div(x, g.sqrt(g.add_scalar(g.square(y), 1.0)))),
        graph("r", VEC, lambda g, x, y, z: g.mul(x, g.rsqrt(g.add_scalar(g.square(y), 1.0)))),
    ),
}


def _online_softmax() -> tuple[superopt.KernelGraph, superopt.KernelGraph]:
    """softmax(q @ k) @ v against a flash-attention block graph: running max, rescaled sums."""
    shapes = {"q": (2, 3), "k": (3, 8), "v": (8, 2)}
    spec = graph("spec", shapes, lambda g, q, k, v: g.matmul(_softmax(g, g.matmul(q, k)), v))
    g = superopt.Graph("flash")
    q, k, v = (g.input(n, s, F32) for n, s in shapes.items())
    b = g.block_graph(grid=(1,), forloop_range=4)
    s = b.matmul(b.input(q, imap=(None,)), b.input(k, imap=(None,), fmap=1))
    m = b.max(s, 1, keepdim=True)
    e = b.exp(b.sub(s, m))
    num = b.accum_rescaled_sum(b.matmul(e, b.input(v, imap=(None,), fmap=0)), m)
    den = b.accum_rescaled_sum(b.sum(e, 1, keepdim=True), m)
    b.output(b.div(num, den), omap=(None,))
    (o,) = g.graph_def(b)
    g.output(o)
    return spec, g


EQUIVALENT["online softmax (accum_max, accum_rescaled_sum)"] = _online_softmax()


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_known_rewrites_are_accepted(name):
    a, b = EQUIVALENT[name]
    result = verify(a, b, seed=0)
    assert result.equivalent is True, result
    assert result.method in ("proved", "tested")
    tested = verify(a, b, seed=1, prove=False)
    assert tested.method == "tested" and tested.tests == 4
    # per test, the chance that the drawn prime divides the difference's coefficients dominates (field.py)
    assert 0 < tested.per_test_bound < 1e-4 and tested.bound == pytest.approx(tested.per_test_bound**4)


def test_small_rewrites_are_proved():
    for name in ("matmul associativity", "distributivity", "exp(a + b) = exp(a) exp(b)", "lora concat form"):
        assert verify(*EQUIVALENT[name], seed=0).method == "proved", name
    assert verify(*_online_softmax(), seed=0).method == "proved"


# Pairs that differ as real functions, several of them only through the opaque encodings.
DIFFERENT = {
    "matmul operands reassociated wrongly": (
        graph("l", {"a": (3, 3), "b": (3, 3)}, lambda g, a, b: g.matmul(a, b)),
        graph("r", {"a": (3, 3), "b": (3, 3)}, lambda g, a, b: g.matmul(b, a)),
    ),
    "eps changed": (
        graph("l", ROWS, lambda g, x, w: g.rms_norm(x, eps=1e-6)),
        graph("r", ROWS, lambda g, x, w: g.rms_norm(x, eps=1e-5)),
    ),
    "sqrt(x^2) is |x|, not x": (
        graph("l", VEC, lambda g, x, y, z: g.sqrt(g.square(x))),
        graph("r", VEC, lambda g, x, y, z: x),
    ),
    "sqrt(a + b) is not sqrt(a) + sqrt(b)": (
        graph("l", VEC, lambda g, x, y, z: g.sqrt(g.add(g.square(x), g.square(y)))),
        graph("r", VEC, lambda g, x, y, z: g.add(g.sqrt(g.square(x)), g.sqrt(g.square(y)))),
    ),
    "silu swapped for gelu": (
        graph("l", VEC, lambda g, x, y, z: g.silu(x)),
        graph("r", VEC, lambda g, x, y, z: g.gelu(x)),
    ),
    "relu(x) is not x": (graph("l", VEC, lambda g, x, y, z: g.relu(x)), graph("r", VEC, lambda g, x, y, z: x)),
    "max over the wrong axis": (
        graph("l", SOFTMAX, lambda g, s: g.sub(s, g.max(s, 1, keepdim=True))),
        graph("r", SOFTMAX, lambda g, s: g.sub(s, g.max(g.neg(s), 1, keepdim=True))),
    ),
    "softmax without its denominator": (graph("l", SOFTMAX, _softmax), graph("r", SOFTMAX, lambda g, s: g.exp(s))),
}


@pytest.mark.parametrize("name", sorted(DIFFERENT))
def test_known_differences_are_rejected_with_a_reproducible_counterexample(name):
    a, b = DIFFERENT[name]
    result = verify(a, b, seed=0)
    assert result.equivalent is False, result
    ce = result.counterexample
    inputs = random_inputs(a, ce.seed, ce.scale)
    x = superopt.run(a, inputs, "float64")[a.outputs.index(ce.output)]
    y = superopt.run(b, inputs, "float64")[a.outputs.index(ce.output)]
    assert not torch.allclose(x, y, rtol=1e-9, atol=0, equal_nan=True)


def test_an_opaque_encoding_never_claims_a_difference_float64_cannot_show():
    """relu(x) - relu(-x) = x over the reals; the field encodes relu as an opaque function, so the tests see a
    difference, but the verdict is undecided, not "not equivalent" (and, with numeric_ok, "numeric only")."""
    a = graph("l", VEC, lambda g, x, y, z: g.sub(g.relu(x), g.relu(g.neg(x))))
    b = graph("r", VEC, lambda g, x, y, z: x)
    result = verify(a, b, seed=0)
    assert result.equivalent is None and result.method == "numeric only" and "relu" in result.reason
    assert verify(a, b, seed=0, numeric_ok=True).equivalent is True


def test_eps_below_float64_resolution_is_still_rejected_by_the_exact_field():
    """x + 1e-30 differs from x by less than float64 shows at any input scale tried; the field is exact."""
    a = graph("l", VEC, lambda g, x, y, z: g.add_scalar(x, 1e-30))
    b = graph("r", VEC, lambda g, x, y, z: g.mul_scalar(x, 1.0))
    result = verify(a, b, seed=0)
    assert result.equivalent is False and result.counterexample.test is not None
    assert "below float64 resolution" in result.reason


def test_a_zero_denominator_on_every_draw_is_undecided():
    a = graph("l", VEC, lambda g, x, y, z: g.div(x, g.sub(y, y)))
    b = graph("r", VEC, lambda g, x, y, z: g.div(y, g.sub(x, x)))
    result = verify(a, b, seed=0)
    assert result.equivalent is None and "zero" in result.reason


def test_signature_mismatch():
    a = graph("a", {"x": (3, 4)}, lambda g, x: g.neg(x))
    with pytest.raises(SignatureMismatch, match="input x"):
        verify(a, graph("b", {"x": (3, 5)}, lambda g, x: g.neg(x)))
    with pytest.raises(SignatureMismatch, match="y"):
        verify(a, graph("b", {"y": (3, 4)}, lambda g, y: g.neg(y)))
    with pytest.raises(SignatureMismatch, match="outputs differ"):
        verify(a, graph("b", {"x": (3, 4)}, lambda g, x: g.sum(x, 1)))


def test_same_seed_same_verdict_fresh_seed_by_default():
    a, b = EQUIVALENT["distributivity"]
    assert verify(a, b, seed=7, prove=False).seed == 7
    assert verify(a, b, prove=False).seed != verify(a, b, prove=False).seed


# --- the example candidates ---------------------------------------------------------------------------------

VERIFIED = ("rmsnorm_linear_bs1", "gated_mlp", "lora", "gqa_bs1", "qknorm_gqa_bs1")
CLI_LORA = {"B": 4, "D": 256, "N": 32, "R": 4}  # small enough, once shrunk, for z3 to prove


@pytest.mark.parametrize("name", VERIFIED)
def test_fused_candidates_verify_at_small_dims(name):
    fused = fused_module().build(name, FUSED_SMALL[name])
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=FUSED_SMALL[name])
    result = verify(spec, fused, seed=0)
    assert result.equivalent is True and result.method in ("proved", "tested")
    assert result.per_test_bound < 2**-16  # mostly the chance of a prime dividing the difference (field.py)


@pytest.mark.parametrize("name", sorted(p.stem for p in (EXAMPLES / "fused").glob("*.json")))
def test_fused_examples_verify_at_full_size(name):
    """Every hand-fused µGraph against its program at the spec's dims, shrunk along their batches (the time it
    takes is benchmarks/verify_bench.py's business): equivalent, below 2^-16 per test (mostly the chance of a
    drawn prime dividing the difference, field.py), below 2^-64 in 4 tests."""
    spec = superopt.load(EXAMPLES / f"{name}.yaml")
    fused = superopt.load(EXAMPLES / "fused" / f"{name}.json")
    result = verify(spec, fused, seed=0)
    assert result.equivalent is True and result.shrunk, result
    assert result.method == "proved" or (result.tests == 4 and result.bound < 2**-64)
    assert result.per_test_bound < 2**-16


# --- the CLI ------------------------------------------------------------------------------------------------


def _invoke(*args: str):
    return CliRunner().invoke(verify_command, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    fused = fused_module().build("lora", CLI_LORA)
    dump(fused, tmp_path / "fused.json")
    dims = ", ".join(f"{k}: {v}" for k, v in CLI_LORA.items())
    lines = (EXAMPLES / "lora.yaml").read_text().splitlines()
    spec = "\n".join(f"dims: {{{dims}}}" if line.startswith("dims:") else line for line in lines) + "\n"
    (tmp_path / "lora.yaml").write_text(spec)
    (tmp_path / "wrong.yaml").write_text(spec.replace("o = add(y, z)", "o = sub(y, z)"))
    (tmp_path / "bad.yaml").write_text("name: [\n")
    return tmp_path


def test_cli_equivalent_exits_0(files):
    result = _invoke(files / "lora.yaml", files / "fused.json", "--seed", "1", "--no-prove")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("equivalent (tested: 4 finite-field tests")
    assert "checked on one chunk of independent slices: w[1], b[1] in 32 chunks; x[0] in 4 chunks" in result.output
    assert _invoke(files / "lora.yaml", files / "fused.json").output.startswith("equivalent (proved (z3)")


def test_cli_not_equivalent_exits_1_with_output_and_seed(files):
    result = _invoke(files / "lora.yaml", files / "wrong.yaml", "--seed", "1")
    assert result.exit_code == 1
    assert "not equivalent" in result.output and "output o differs" in result.output and "seed" in result.output


def test_cli_undecided_exits_3(tmp_path):
    a = graph("l", VEC, lambda g, x, y, z: g.sub(g.relu(x), g.relu(g.neg(x))))
    b = graph("r", VEC, lambda g, x, y, z: x)
    dump(a, tmp_path / "a.json")
    dump(b, tmp_path / "b.json")
    result = _invoke(tmp_path / "a.json", tmp_path / "b.json")
    assert result.exit_code == 3 and "undecided" in result.output and "relu" in result.output


def test_cli_bad_input_exits_2_with_one_line(files):
    for args in [(files / "lora.yaml", files / "missing.json"), (files / "bad.yaml", files / "lora.yaml")]:
        result = _invoke(*args)
        assert result.exit_code == 2
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")  # one line, no traceback
    other = _invoke(files / "lora.yaml", EXAMPLES / "gated_mlp.yaml")
    assert other.exit_code == 2 and "inputs differ" in other.output


def test_cli_gate(files):
    result = _invoke(files / "lora.yaml", files / "fused.json", "--gate", "--seed", "1")
    assert result.exit_code == 0 and "float gate: passed" in result.output
