"""verify(a, b) and `superopt verify`: known-equivalent rewrites are accepted (and proved where z3 can), known
non-equivalences rejected with a counterexample that reproduces, the encodings outside the exact fragment (sqrt,
relu, max, ...) never accept a difference and never claim one float64 cannot show, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from graphs import FUSED_SMALL, import_fused
from pairs import DIFFERENT, EQUIVALENT, VEC, VERIFIED, graph

import superopt
from superopt.cli.verify_cmd import verify_command
from superopt.interpret import random_inputs
from superopt.serialize import dump
from superopt.verification import SignatureMismatch, verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
    assert verify(*EQUIVALENT["online softmax (accum_max, accum_rescaled_sum)"], seed=0).method == "proved"


# Pairs that differ as real functions, several of them only through the opaque encodings.
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

CLI_LORA = {"B": 4, "D": 256, "N": 32, "R": 4}  # small enough, once shrunk, for z3 to prove


@pytest.mark.parametrize("name", VERIFIED)
def test_fused_candidates_verify_at_small_dims(name):
    fused = import_fused("examples_fused_for_verify").build(name, FUSED_SMALL[name])
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
    fused = import_fused("examples_fused_for_verify").build("lora", CLI_LORA)
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
