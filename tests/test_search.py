"""The µGraph search (search_space/): abstract expressions, pruning, device limits, the search end to end.

Independent references: the reference interpreter in float64 (every candidate against the program), the
hand-fused µGraphs of examples/fused.py (the search must find their structure, with pruning on and off), z3 (on
the axioms), and shared-memory sizes derived by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import z3
from graphs import import_fused

import superopt
from superopt.errors import IRError, SuperoptError
from superopt.interpret import random_inputs, run
from superopt.kernels.device import DEVICES
from superopt.ops import missing_rules
from superopt.search_space import PRESETS, search
from superopt.search_space import abstract_expr as ae
from superopt.search_space.enumerator import SHAPES, Searcher, make_problem
from superopt.search_space.instantiate import Sizer, concrete, fits, smem_bytes
from superopt.serialize import from_json, graph_hash
from superopt.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
fused = import_fused()

SMALL = {
    "rmsnorm_linear_bs1": {"B": 2, "D": 64, "N": 32},
    "gated_mlp": {"B": 2, "D": 64, "N": 32},
    "lora": {"B": 2, "D": 32, "N": 32, "R": 4},
    "ntrans_bs1": {"B": 4, "D": 16},
    "gqa_bs1": {"B": 2, "S": 8, "D": 4, "L": 32},
}
# Smaller spaces than the presets', so that a search without pruning ends: the block ops of the fused forms.
TINY = {
    "rmsnorm_linear_bs1": replace(
        PRESETS["mlp"],
        name="tiny",
        kernel_ops=1,
        block_ops=4,
        block_op_names=("matmul", "div", "accum_sum", "accum_rms_last"),
    ),
    "lora": replace(PRESETS["lora"], name="tiny", kernel_ops=1, block_op_names=("matmul", "concat", "accum_sum")),
}
TINY_ATTENTION = replace(PRESETS["attention"], name="tiny_attention", kernel_ops=2, grid_axes=2)


def program(name: str) -> superopt.KernelGraph:
    return superopt.load(EXAMPLES / f"{name}.yaml", SMALL[name])


def hashes(result) -> list[str]:
    return [c.hash for c in result.candidates]


# --- abstract expressions ---------------------------------------------------------------------------------------


def _graph(expr: str) -> superopt.KernelGraph:
    """`expr` over inputs a, b, c (4 x 4), written as a spec op line."""
    inputs = "{" + ", ".join(f"{n}: {{shape: [4, 4]}}" for n in "abc") + "}"
    return parse_spec(f"inputs: {inputs}\nops: ['o = {expr}']\noutputs: [o]\n")


def _real(graph: superopt.KernelGraph) -> tuple[z3.ArithRef, list]:
    """The program in a real-valued model written here, apart from the normal form: each input a real, a sum
    over a dim class c (a matmul's contraction, a reduction, the mean inside rms_norm) the positive real n_c
    times its summand, exp and sqrt positive uninterpreted functions, an added constant (rms_norm's eps
    included) the real eps. Returns the output and the side
    conditions."""
    shapes = make_problem(graph).shapes
    funcs = {f: z3.Function(f, z3.RealSort(), z3.RealSort()) for f in ("exp", "sqrt")}
    sides: list = []

    def n(dim) -> z3.ArithRef:
        (c, _), *_ = dim
        sides.append(z3.Real(f"n_{c}") > 0)
        return z3.Real(f"n_{c}")

    def call(f: str, x: z3.ArithRef) -> z3.ArithRef:
        sides.append(funcs[f](x) > 0)
        return funcs[f](x)

    eps = z3.Real("eps")  # every constant added here is rms_norm's eps
    env = {name: z3.Real(name) for name in graph.inputs}
    for op in graph.ops:
        x, dims = [env[i] for i in op.inputs], shapes[op.inputs[0]]
        if op.op in ("add", "mul", "div"):
            out = {"add": x[0] + x[1], "mul": x[0] * x[1], "div": x[0] / x[1]}[op.op]
        elif op.op in ("matmul", "sum"):
            out = n(dims[op.attrs.get("dim", -1)]) * x[0] * (x[1] if op.op == "matmul" else 1)
        elif op.op == "add_scalar":
            out = x[0] + eps
        elif op.op == "rms_norm":
            out = x[0] / call("sqrt", n(dims[-1]) * x[0] * x[0] + eps)
        else:
            out = call(op.op, x[0])
        env[op.outputs[0]] = out
    return env[graph.outputs[0]], sides


def _proved_equal(left: str, right: str) -> bool:
    (x, xs), (y, ys) = _real(_graph(left)), _real(_graph(right))
    solver = z3.Solver()
    solver.set("timeout", 5000)
    solver.add(*xs, *ys, x != y)
    return solver.check() == z3.unsat


def _value(expr: str) -> ae.Value:
    return make_problem(_graph(expr)).target.outputs[0]


# Pairs equal under the axioms (distributivity, sums over products, division moved past a matmul, rms_norm
# as x / rms(x)), and pairs that differ.
EQUAL = [
    ("(a + b) * c", "a * c + b * c"),
    ("(a + b) @ c", "a @ c + b @ c"),
    ("rms_norm(a) @ b", "(a @ b) / sqrt(sum(a * a, dim=1, keepdim=True) + 1e-6)"),
    ("(exp(a) / sum(exp(a), dim=1, keepdim=True)) @ b", "(exp(a) @ b) / sum(exp(a), dim=1, keepdim=True)"),
]
DIFFERENT = [
    ("a @ b", "b @ a"),
    ("exp(a + b)", "exp(a) * exp(b)"),
    ("sum(a @ b, dim=1, keepdim=True)", "a @ b"),
    ("a / (b + c)", "a / b + a / c"),
]


@pytest.mark.parametrize("left, right", EQUAL)
def test_axioms_give_equal_normal_forms_and_z3_agrees(left, right):
    x, y = _value(left), _value(right)
    assert x == y
    assert ae.prove_equal(x, y)
    assert _proved_equal(left, right)  # z3 on the programs themselves


@pytest.mark.parametrize("left, right", DIFFERENT)
def test_different_expressions_stay_apart_and_z3_agrees(left, right):
    x, y = _value(left), _value(right)
    assert x != y
    assert not ae.prove_equal(x, y)
    assert not _proved_equal(left, right)


def test_subexpression_check():
    target = make_problem(superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml")).target
    x, w = ae.leaf("x"), ae.leaf("w")
    size = (("c1", 1), ("f0", -1))  # a loop's chunk of the contracted dim
    assert target.may_be_subexpr(ae.sum_(size, ae.mul(x, w)))  # a partial matmul: summed over the loop, the matmul
    assert target.may_be_subexpr(ae.rms((("c1", 1),), x))  # rms over the whole row: the divisor after the loop
    assert not target.may_be_subexpr(ae.rms(size, x))  # rms of one chunk: no sum completes it
    assert not target.may_be_subexpr(ae.mul(ae.atom(("exp", x)), w))  # the program has no exp
    assert not target.may_be_subexpr(ae.add(x, w))  # x + w appears nowhere, under any axiom
    assert missing_rules(ae.RULES) == ["graph_def"]  # graph_def is expanded by the search itself


def test_argmax_is_an_atom_of_its_own():
    """argmax is an atom over the reduced values like max's, but a different one, and one per reduced size: z3
    must not prove argmax over one dim class equal to argmax over another, nor to max."""
    rows, columns = _value("argmax(a, dim=1, keepdim=True)"), _value("argmax(a, dim=0, keepdim=True)")
    largest = _value("max(a, dim=1, keepdim=True)")
    assert len({rows, columns, largest}) == 3
    assert not ae.prove_equal(rows, columns) and not ae.prove_equal(rows, largest)
    assert ae.prove_equal(_value("argmax(a + b, dim=1, keepdim=True)"), _value("argmax(b + a, dim=1, keepdim=True)"))
    target = make_problem(_graph("argmax(a @ b, dim=1, keepdim=True)")).target
    ((_, _, (found,), _),) = target.outputs[0]
    assert found[0] == "argmax" and found[2] == _value("a @ b")
    assert target.may_be_subexpr(found[2])  # the logits: a prefix computing them is kept
    assert not target.may_be_subexpr(ae.atom(("max", *found[1:])))  # their max is not on the way


def test_every_op_has_a_shape_rule():
    assert missing_rules(SHAPES, "block") == []
    assert missing_rules(SHAPES, "kernel") == ["graph_def"]  # a graph-defined op's shape is its block graph's


# --- the enumerator: pruning keeps the known-good µGraph ------------------------------------------------------


def _plans(graph: superopt.KernelGraph, preset, prune: bool) -> list:
    searcher = Searcher(make_problem(graph), preset, prune=prune)
    depths = range(1, preset.kernel_ops + 1)
    return [plan for depth in depths for root in searcher.roots(depth) for plan in searcher.run(depth, root).plans]


@pytest.mark.parametrize("name", sorted(TINY))
def test_pruning_never_loses_the_known_good_mugraph(name):
    graph = program(name)
    problem = make_problem(graph)
    hand = fused.build(name, SMALL[name])
    (block,) = [op.block for op in hand.ops]
    env = {**problem.sizes, "g0_0": block.grid[0], "f0": block.forloop_range}

    def instances(plans):
        out = set()
        for plan in plans:
            try:
                out.add(graph_hash(concrete(problem, plan, env)))
            except (IRError, KeyError):
                pass  # another grid or loop than the fused form's
        return out

    pruned, full = _plans(graph, TINY[name], True), _plans(graph, TINY[name], False)
    assert {p.key() for p in full} <= {p.key() for p in pruned}
    assert graph_hash(hand) in instances(pruned)
    assert graph_hash(hand) in instances(full)


# --- the search end to end ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_attention(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny_attention", TINY_ATTENTION)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_candidate_is_equivalent_in_float64(name, tiny_attention):
    graph = program(name)
    preset = "tiny_attention" if name.startswith("gqa") else None
    result = search(graph, preset=preset, budget_s=30 if preset else 8, seed=1, progress="none")
    assert result.candidates and result.best.predicted_us <= result.candidates[-1].predicted_us
    assert graph_hash(graph) in hashes(result)  # the input program is always a candidate
    inputs = random_inputs(graph, seed=3, scale=0.5)
    (want,) = run(graph, inputs, precision="float64")
    for c in result.candidates:
        (got,) = run(c.graph, inputs, precision="float64")
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert c.verify.method in ("identity", "proved", "tested")
    fused_form = {"rmsnorm_linear_bs1": 1, "gated_mlp": 1, "lora": 1, "ntrans_bs1": 1, "gqa_bs1": 2}[name]
    assert result.best.kernels == fused_form


def test_qknorm_search_puts_the_norms_on_the_attention_tiles():
    """The qknorm specs' preset (attention_norm) lets the search find the two-kernel form: rms_norm on the q and v
    tiles inside the split-KV kernel, no norm kernels of their own. The enumeration stops at a state count, not at
    the wall clock, so a slower machine reaches the same plans (the form appears within 30,000 states)."""
    graph = superopt.load(EXAMPLES / "qknorm_gqa_bs1.yaml", dims={"B": 1, "S": 32, "D": 16, "L": 256})
    result = search(graph, budget_s=300, states=30_000, seed=1, progress="none")
    assert result.stats.cut == ["states"] and result.stats.states == 30_000
    best = result.best
    norms = [bop.op for op in best.graph.ops if op.block is not None for bop in op.block.ops if bop.op == "rms_norm"]
    assert best.kernels == 2 and len(norms) == 2 and not any(op.op == "rms_norm" for op in best.graph.ops)
    inputs = random_inputs(graph, seed=3, scale=0.5)
    torch.testing.assert_close(run(best.graph, inputs, "float64"), run(graph, inputs, "float64"), rtol=1e-9, atol=0)


def test_pool_and_one_process_find_the_same_candidates():
    for name in ("gated_mlp", "ntrans_bs1"):
        one = search(program(name), workers=1, progress="none")
        pool = search(program(name), workers=2, progress="none")
        assert not one.stats.exhausted and not pool.stats.exhausted
        assert hashes(one) == hashes(pool)
        assert len(hashes(one)) > 2


def test_a_run_counts_the_same_states_whatever_the_memo_holds():
    """A first-level choice run after others (block graphs it meets memoized by them) counts and finds what it
    does alone: what makes the states budget independent of how choices are shared between processes."""
    problem = make_problem(program("gqa_bs1"))
    warm = Searcher(problem, TINY_ATTENTION)
    roots = warm.roots(2)
    runs = [warm.run(2, root) for root in roots]
    assert warm._visits < sum(r.counts.states for r in runs)  # memo hits: fewer states visited than counted
    for root, after in zip(roots, runs):
        alone = Searcher(problem, TINY_ATTENTION).run(2, root)
        assert alone.counts == after.counts and alone.at == after.at
        assert [p.key() for p in alone.plans] == [p.key() for p in after.plans]


def test_sizes_do_not_depend_on_the_plans_sized_before():
    """The sizer shares a kernel's sizes between plans where its block graph and input types agree: each plan gets
    what a sizer of its own gives it, and the rejected count is the same in any order."""
    problem = make_problem(program("gqa_bs1"))
    searcher = Searcher(problem, TINY_ATTENTION)
    plans = [p for root in searcher.roots(2) for p in searcher.run(2, root).plans]
    device = replace(DEVICES["h100"], smem_per_block=2048)  # some sizes rejected
    forward, backward = Sizer(problem, device), Sizer(problem, device)
    sized = [forward.best(p) for p in plans]
    assert len(forward._kernels) < len(forward._named) and forward.rejected > 0 and any(sized)
    assert sized == [Sizer(problem, device).best(p) for p in plans]
    assert sized[::-1] == [backward.best(p) for p in reversed(plans)]
    assert forward.rejected == backward.rejected


def test_states_budget_is_the_same_for_any_number_of_workers():
    graph = superopt.load(EXAMPLES / "lora.yaml")  # full size: 16 plans in about 25,000 states
    whole = search(graph, workers=2, progress="none")
    assert not whole.stats.cut and whole.stats.states > 6_000
    results = {w: search(graph, states=6_000, workers=w, progress="none") for w in (1, 2)}
    for r in results.values():
        assert r.stats.cut == ["states"] and r.stats.exhausted and r.stats.states == 6_000
        assert 1 < len(r.candidates) < len(whole.candidates)
    assert hashes(results[1]) == hashes(results[2])
    assert results[1].stats.plans == results[2].stats.plans < whole.stats.plans
    # a states budget beyond the search's end cuts nothing: the unbounded answer
    assert hashes(search(graph, states=whole.stats.states + 1, workers=1, progress="none")) == hashes(whole)


def test_deterministic_for_a_seed():
    def strip(result):
        doc = result.to_json()
        for key in ("seconds", "seconds_enumerate", "seconds_size", "workers"):
            doc["stats"].pop(key)
        return doc

    runs = [strip(search(program("rmsnorm_linear_bs1"), seed=7, workers=w, progress="none")) for w in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0]["candidates"] == runs[2]["candidates"]


def test_result_json_round_trips():
    result = search(program("rmsnorm_linear_bs1"), progress="none")
    doc = json.loads(json.dumps(result.to_json()))
    assert set(doc) == {"candidates", "stats", "ranked_by"}
    assert {"states", "pruned", "candidates", "seconds", "pruned_abstract", "pruned_limits"} <= set(doc["stats"])
    for c, d in zip(result.candidates, doc["candidates"]):
        assert graph_hash(from_json(d["mugraph"])) == d["hash"] == c.hash
        assert d["kernels"] == len(c.graph.ops)
        assert {"method"} <= set(d["verify"])
    assert result.best.verify.method in ("proved", "tested")  # the fused form, verified on a small instance


# --- device limits ---------------------------------------------------------------------------------------------


def test_shared_memory_counts_tile_lifetimes():
    g = superopt.Graph()
    x, w = g.input("x", (2, 8)), g.input("w", (8, 4))
    b = g.block_graph(grid=(2,), forloop_range=2)
    xt, wt = b.input(x, imap=(None,), fmap=1), b.input(w, imap=(1,), fmap=0)
    r = b.accum_rms_last(xt)
    b.output(b.div(b.accum_sum(b.matmul(xt, wt)), r), omap=(1,))
    # Timeline: accum_rms_last, matmul, accum_sum, div. At matmul: x tile 16 B, w tile 16 B, the matmul's result
    # 8 B (fp16), accumulators 8 B + 16 B (fp32): 64 B. All tiles at once would be 72 B (the div's 8 B as well).
    assert smem_bytes(b) == 64
    assert fits(b, DEVICES["h100"])
    assert not fits(b, replace(DEVICES["h100"], smem_per_block=63))
    assert not fits(b, replace(DEVICES["h100"], max_grid=(1, 1, 1)))


def test_device_limits_prune(monkeypatch):
    small = replace(DEVICES["h100"], name="small", smem_per_block=2048, smem_per_sm=2048)
    monkeypatch.setitem(DEVICES, "small", small)
    graph = program("rmsnorm_linear_bs1")
    roomy, tight = (search(graph, device=d, progress="none") for d in ("h100", "small"))
    assert tight.stats.pruned_limits > roomy.stats.pruned_limits
    for c in tight.candidates:
        assert all(fits(op.block, small) for op in c.graph.ops if op.block is not None)


# --- presets, progress -----------------------------------------------------------------------------------------


def test_presets():
    assert {"mlp", "attention", "lora", "norm", "default"} <= set(PRESETS)
    for p in PRESETS.values():
        assert set(p.block_op_names) <= set(superopt.OPS)
        assert p.graph_defs <= p.kernel_ops and 1 <= p.grid_axes <= 3
    with pytest.raises(SuperoptError, match="unknown preset 'nope'"):
        search(program("ntrans_bs1"), preset="nope")
    with pytest.raises(SuperoptError, match="unknown device"):
        search(program("ntrans_bs1"), device="nope")


def test_progress_modes(capsys):
    graph = program("rmsnorm_linear_bs1")
    search(graph, progress="none")
    assert capsys.readouterr().err == ""
    search(graph, progress="json")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[-1]["stage"] == "done" and lines[-1]["search"] == graph.name
    search(graph, progress="plain")
    assert "states" in capsys.readouterr().err
    with pytest.raises(SuperoptError, match="progress"):
        search(graph, progress="loud")


def test_on_candidate_sees_every_candidate():
    seen = []
    result = search(program("gated_mlp"), progress="none", on_candidate=seen.append)
    assert sorted(c.hash for c in seen) == sorted(hashes(result))
