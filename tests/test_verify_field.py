"""The finite-field encoding (verify/field.py), the batched block executor, and the degree analysis: each held
to an independent reference (integer arithmetic, the literal interpreter, hand-derived values)."""

from __future__ import annotations

import pytest
import torch
from graphs import INPUT_SHAPES, build, import_fused
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import superopt
from superopt.interpret import TorchEval, random_inputs
from superopt.interpret import evaluate as literal_evaluate
from superopt.ops import missing_rules
from superopt.verification import batched, degree, field, smt
from superopt.verification.field import P_MIN, Q_MIN, FieldEval


def _is_prime(n: int) -> bool:
    return n > 1 and all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13)) and all(n % d for d in range(2, 1000))


def test_each_test_draws_its_own_safe_primes_that_fit_int64():
    ev = FieldEval(6, seed=11)
    for p, q in ev.primes:
        assert _is_prime(p) and _is_prime(q) and p == 2 * q + 1
        assert (p - 1) ** 2 < 2**63  # a product of two residues fits
        assert p >= P_MIN and Q_MIN <= q < 2**30  # exponents stay three 10-bit digits
    assert len(set(ev.primes)) == 6  # fresh per test
    assert FieldEval(6, seed=11).primes == ev.primes  # deterministic for a seed
    assert FieldEval(6, seed=12).primes != ev.primes
    assert ev.mod.tolist() == [p for p, _ in ev.primes] + [q for _, q in ev.primes]


def test_is_prime_matches_trial_division():
    for n in [*range(0, 3000), 2**31 - 1, 2**31 - 3, 2147483579, 1073741789, 3215031751 - 2]:
        assert field.is_prime(n) == (n > 1 and all(n % d for d in range(2, min(n, 46341)))), n


def test_every_op_has_a_rule_in_every_table():
    for table in (field.FIELD, degree.DEGREE, smt.SYMBOLIC):
        assert missing_rules(table, "block") == []
        assert missing_rules(table, "kernel") == ["graph_def"]  # run by the executors themselves


def test_w_has_order_q_and_exp_is_a_homomorphism():
    ev = FieldEval(3, seed=5)
    for t, (p, q) in enumerate(ev.primes):
        w = int(ev.w[t])
        assert w != 1 and pow(w, q, p) == 1
    x, y = ev._residues((50,)), ev._residues((50,))
    lhs = ev.exp(ev.add(x, y))
    rhs = ev.mul(ev.exp(x), ev.exp(y))
    assert torch.equal(lhs[:3], rhs[:3])  # exp(a + b) = exp(a) exp(b) in Z_P
    assert not torch.equal(ev.exp(x)[:3], ev.exp(y)[:3])


def test_exp_is_w_to_the_exponent():
    ev = FieldEval(2, seed=1)
    x = ev._residues((20,))
    out = ev.exp(x)
    for t, (p, _) in enumerate(ev.primes):
        w = int(ev.w[t])
        assert out[t].tolist() == [pow(w, e, p) for e in x[2 + t].tolist()]


def test_constants_are_exact_rationals():
    ev = FieldEval(1, seed=0)
    [(p, q)] = ev.primes
    for value in (1e-6, 0.1, -2.5, 1 / 3):
        num, den = value.as_integer_ratio()
        c = ev.const(value)
        assert int(c[0]) * den % p == num % p and int(c[1]) * den % q == num % q
    assert not torch.equal(ev.const(1e-6), ev.const(1e-5))


def test_inverse_and_zero_denominator():
    ev = FieldEval(2, seed=3)
    x = ev._residues((40,))
    x = torch.where(x == 0, torch.ones_like(x), x)
    assert bool((ev.mul(x, ev.inv(x)) == 1).all())
    with pytest.raises(field.ZeroDenominator):
        ev.inv(torch.zeros(4, 3, dtype=torch.int64))


@pytest.mark.parametrize("m,k,n", [(3, 5, 4), (2, 4096, 3), (1, 1, 1)])
def test_matmul_is_exact_mod_p(m, k, n):
    ev = FieldEval(1, seed=k)
    a, b = ev._residues((m, k)), ev._residues((k, n))
    out = ev.matmul(a, b)
    for c, mod in enumerate(ev.mod.tolist()):
        rows, cols = a[c].tolist(), b[c].tolist()
        want = [[sum(r[i] * cols[i][j] for i in range(k)) % mod for j in range(n)] for r in rows]
        assert out[c].tolist() == want


@st.composite
def ring_programs(draw: st.DrawFn) -> dict:
    """Recipes (tests/graphs.py) of ring ops only: on integer inputs their float64 values are exact."""
    shapes = list(INPUT_SHAPES)
    steps = []
    for _ in range(draw(st.integers(1, 7))):
        a = draw(st.sampled_from(range(len(shapes))))
        same = [i for i, s in enumerate(shapes) if s == shapes[a]]
        kind = draw(st.sampled_from(["binary", "unary", "scalar", "sum", "matmul", "concat"]))
        if kind == "binary":
            step = (draw(st.sampled_from(["add", "sub", "mul"])), (a, draw(st.sampled_from(same))), {})
        elif kind == "unary":
            step = (draw(st.sampled_from(["square", "neg"])), (a,), {})
        elif kind == "scalar":
            step = (
                draw(st.sampled_from(["mul_scalar", "add_scalar"])),
                (a,),
                {"c": draw(st.sampled_from([2.0, -1.0]))},
            )
        elif kind == "sum" and len(shapes[a]) == 2:
            step = ("sum", (a,), {"dim": draw(st.sampled_from([0, 1])), "keepdim": True})
        elif kind == "matmul" and len(shapes[a]) == 2 and shapes[a][1] == 6:
            step = ("matmul", (a, draw(st.sampled_from([i for i, s in enumerate(shapes) if s == (6, 6)]))), {})
        elif kind == "concat" and len(shapes[a]) == 2:
            step = ("concat", (a, draw(st.sampled_from(same))), {"dim": 0})
        else:
            continue
        steps.append(step)
        shape = list(shapes[a])
        if step[0] == "sum":
            shape[step[2]["dim"]] = 1
        elif step[0] == "matmul":
            shape[1] = 6
        elif step[0] == "concat":
            shape[0] *= 2
        shapes.append(tuple(shape))
    if not steps:
        steps, shapes = [("neg", (0,), {})], shapes + [INPUT_SHAPES[0]]
    outputs = draw(
        st.lists(st.sampled_from(range(len(INPUT_SHAPES), len(shapes))), min_size=1, max_size=2, unique=True)
    )
    return {"steps": steps, "outputs": outputs}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ring_programs())
def test_field_agrees_with_the_interpreter_on_integers(recipe):
    """Programs of ring ops on small integer inputs: the float64 interpreter's values are exact integers, and
    the field's values must equal them mod P and mod Q."""
    graph = build(recipe)
    gen = torch.Generator().manual_seed(0)
    ints = {n: torch.randint(-3, 4, s, generator=gen).double() for n, s in zip(graph.inputs, INPUT_SHAPES)}
    exact = superopt.run(graph, ints, "float64")
    assume(all(float(x.abs().max()) < 2**50 for x in exact))
    ev = FieldEval(1, seed=0)
    [(p, q)] = ev.primes
    for n in graph.inputs:
        ev.inputs[n] = torch.stack([ints[n].long() % p, ints[n].long() % q])
    for x, y in zip(exact, field.evaluate(graph, ev)):
        assert torch.equal(x.long() % p, y[0]) and torch.equal(x.long() % q, y[1])


def block_zoo() -> superopt.KernelGraph:
    """A graph-defined op using every accumulator, a loop-invariant input, two grid axes, concat, an epilogue,
    and an argmax in the loop (its dim shifted past the batch dims as max's is)."""
    g = superopt.Graph("zoo")
    x = g.input("x", (4, 6, 8), "float32")
    y = g.input("y", (4, 8, 6), "float32")
    b = g.block_graph(grid=(2, 3), forloop_range=2)
    xt = b.input(x, imap=(0, 1), fmap=2)  # (2, 2, 4) per iteration
    yt = b.input(y, imap=(0, None), fmap=1)  # (2, 4, 6)
    whole = b.input(x, imap=(0, 1), fmap=None)  # (2, 2, 8), the same every iteration
    inv = b.input(y, imap=(0, None), fmap=None)  # (2, 8, 6)
    s = b.matmul(xt, yt)
    m = b.max(s, dim=2, keepdim=True)
    e = b.exp(b.sub(s, m))
    outs = [
        b.div(b.accum_rescaled_sum(e, m), b.accum_rescaled_sum(b.sum(e, 2, keepdim=True), m)),
        b.accum_sum(b.concat(s, s, dim=2)),
        b.accum_max(b.square(s)),
        b.mul(b.accum_mean_last(xt), b.accum_rms_last(xt, eps=1e-3)),
        b.accum_sum_last(b.matmul(whole, b.silu(inv))),
        b.accum_sum(b.argmax(s, 1, keepdim=True)),
    ]
    for o in outs:
        b.output(o, omap=(0, 1))
    for o in g.graph_def(b):
        g.output(o)
    return g


def test_batched_executor_equals_the_literal_interpreter():
    fused = import_fused("examples_fused_for_verify")
    graphs = [
        block_zoo(),
        fused.build("rmsnorm_linear_bs1", {"B": 2, "D": 512, "N": 64}),
        fused.build("lora", {"B": 4, "D": 512, "N": 64, "R": 4}),
        fused.build("qknorm_gqa_bs1", {"B": 2, "S": 128, "D": 4, "L": 1024}),
    ]
    for graph in graphs:
        ev = TorchEval("float64")
        inputs = random_inputs(graph, 0)
        args = [ev.cast(inputs[n], graph.tensors[n]) for n in graph.inputs]
        for x, y in zip(literal_evaluate(graph, args, ev), batched.evaluate(graph, args, ev)):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12), graph.name


# --- argmax: an opaque function of its values in order ----------------------------------------------------------


def _argmax_programs() -> dict[str, superopt.KernelGraph]:
    """Over rows of two values [a, b]: argmax and max of them in order and reversed, and argmax of the sum a + b
    written both ways round."""
    programs = {}
    for name, body in {
        "argmax": lambda g, a, b: g.argmax(g.concat(a, b, 1), 1),
        "argmax reversed": lambda g, a, b: g.argmax(g.concat(b, a, 1), 1),
        "max": lambda g, a, b: g.max(g.concat(a, b, 1), 1),
        "max reversed": lambda g, a, b: g.max(g.concat(b, a, 1), 1),
        "argmax of a + b": lambda g, a, b: g.argmax(g.add(a, b), 0),
        "argmax of b + a": lambda g, a, b: g.argmax(g.add(b, a), 0),
    }.items():
        g = superopt.Graph(name.replace(" ", "_").replace("+", "plus"))
        g.output(body(g, g.input("a", (5, 1), "float32"), g.input("b", (5, 1), "float32")))
        programs[name] = g
    return programs


def test_field_tells_argmax_from_argmax_reversed_and_from_max():
    """The field keys argmax on the ordered values: reversing them changes every row's value (it changes the real
    index too), while max, a function of the multiset, stays the same; argmax of one value computed two ways
    agrees. Checked on the field's values, with the float64 truth beside each claim."""
    programs = _argmax_programs()
    ev = FieldEval(4, seed=0)
    value = {name: field.evaluate(g, ev)[0] for name, g in programs.items()}
    assert bool((value["argmax"] != value["argmax reversed"]).all())
    assert bool((value["argmax"] != value["max"]).all())
    assert torch.equal(value["max"], value["max reversed"])
    assert torch.equal(value["argmax of a + b"], value["argmax of b + a"])
    inputs = random_inputs(programs["argmax"], seed=0)
    real = {name: superopt.run(g, inputs, "float64")[0] for name, g in programs.items()}
    assert torch.equal(real["argmax"], 1 - real["argmax reversed"]) and torch.equal(real["max"], real["max reversed"])


def test_argmax_sequence_depends_on_every_position():
    """A change at any one position of a row (a value, or two values swapped) changes the row's encoding."""
    ev = FieldEval(2, seed=3)
    x = ev._residues((6,))
    base = field.FIELD["argmax"](ev, x, 0, False)
    for k in range(6):
        changed = x.clone()
        changed[:, k] = (changed[:, k] + 1) % ev.m(x)[:, 0]
        assert bool((field.FIELD["argmax"](ev, changed, 0, False) != base).all()), k
    swapped = x[:, [1, 0, 2, 3, 4, 5]]
    assert bool((field.FIELD["argmax"](ev, swapped, 0, False) != base).all())
    assert torch.equal(field.FIELD["max"](ev, swapped, 0, False), field.FIELD["max"](ev, x, 0, False))


def test_z3_keys_argmax_on_the_order_and_max_on_the_multiset():
    programs = _argmax_programs()
    assert smt.prove(programs["argmax of a + b"], programs["argmax of b + a"])
    assert smt.prove(programs["max"], programs["max reversed"])
    assert not smt.prove(programs["argmax"], programs["argmax reversed"])
    assert not smt.prove(programs["argmax"], programs["max"])
