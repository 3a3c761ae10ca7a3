"""Constants chosen to vanish in the finite field: with a fixed pair of primes, `x + c` and `x` agree in every
test when c is a multiple of the prime. Each test draws its own primes (verify/field.py), so no constant, not
the old fixed primes, nor any prime the code could draw for a given seed, makes a non-equivalent pair pass."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from pairs import graph

from superopt.cli.verify_cmd import verify_command
from superopt.serialize import dump
from superopt.verification import field, verify

OLD_P, OLD_Q = 2147483579, 1073741789  # the fixed primes field.py used before it drew them per test
ROW = {"x": (2, 8)}


def drawn_primes(seeds: range, tests: int = 4) -> list[int]:
    """Every P and Q the field draws for these seeds, as FieldEval does (the verifier's redraws use seed + k)."""
    found = []
    for seed in seeds:
        rng = random.Random(seed)
        for _ in range(tests):
            found.extend(field.safe_prime(rng))
    return found


def vanishing_constants() -> list[float]:
    """Floats whose numerator is a multiple of a prime the field has used or may draw: the primes themselves,
    times powers of two (the same residue class up to a unit), and their products where a float holds them."""
    primes = [OLD_P, OLD_Q, *drawn_primes(range(3))]
    out = {float(p) for p in primes} | {float(p) * 2.0**k for p in primes[:4] for k in (-40, -3, 7)}
    out |= {float(OLD_P * OLD_Q), float(OLD_Q * 3)}
    return sorted(out)


def pairs(c: float) -> dict[str, tuple]:
    """Non-equivalent pairs for a constant c != 0, each (program, candidate)."""
    return {
        "x + c vs x": (graph("a", ROW, lambda g, x: g.add_scalar(x, c)), graph("b", ROW, lambda g, x: x)),
        "x * (1 + c) vs x": (graph("a", ROW, lambda g, x: g.mul_scalar(x, 1.0 + c)), graph("b", ROW, lambda g, x: x)),
        "exp(x + c) vs exp(x)": (
            graph("a", ROW, lambda g, x: g.exp(g.add_scalar(x, c))),
            graph("b", ROW, lambda g, x: g.exp(x)),
        ),
        "x * c + x vs x": (
            graph("a", ROW, lambda g, x: g.add(g.mul_scalar(x, c), x)),
            graph("b", ROW, lambda g, x: x),
        ),
    }


@pytest.mark.parametrize("c", vanishing_constants())
@pytest.mark.parametrize("seed", [0, 1, 2, None])
def test_a_constant_that_vanishes_mod_a_prime_is_caught(c, seed):
    for name, (a, b) in pairs(c).items():
        if name == "x * (1 + c) vs x" and 1.0 + c == 1.0:
            continue  # c below float resolution next to 1: the two graphs are the same program
        result = verify(a, b, seed=seed, prove=False)
        assert result.equivalent is False, (name, c, str(result))


def test_mutants_of_every_drawn_prime_fail_through_the_cli(tmp_path):
    """`superopt verify` exits 1 on each pair, for constants built from the primes the given seed draws."""
    seed = 7
    for k, p in enumerate(drawn_primes(range(seed, seed + 1))):
        for name, (a, b) in pairs(float(p)).items():
            dump(a, tmp_path / "a.json")
            dump(b, tmp_path / "b.json")
            result = CliRunner().invoke(
                verify_command, [str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--seed", str(seed)]
            )
            assert result.exit_code == 1, (k, p, name, result.output)
            assert result.output.startswith("not equivalent")


def test_the_primes_drawn_are_spread_over_the_range():
    """Rejection sampling draws Q uniformly: across many draws no prime repeats and both halves of the range are
    hit about equally."""
    qs = drawn_primes(range(50))[1::2]
    assert len(set(qs)) == len(qs) == 200
    low = sum(q < (field.Q_MIN + field.Q_END) // 2 for q in qs)
    assert 70 <= low <= 130
