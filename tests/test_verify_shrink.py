"""Shrinking a pair along its batch dims (verify/shrink.py): the shrunk graph computes the first and the last
chunk of every output from the same chunk of the inputs, held to the literal interpreter in float64 on random
programs, on every example and fused µGraph and on their mutants; the batches that would mix chunks are refused;
and the full-size examples shrink to one row or column."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from graphs import build, recipes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutants import SOURCES, mutant, single_mutations

import superopt
from superopt.interpret import random_inputs
from superopt.verification import verify
from superopt.verification.shrink import shrink

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
F32 = "float32"


def _chunk(x: torch.Tensor, shape: tuple[int, ...], last: bool) -> torch.Tensor:
    """The first (or last) block of x of the given shape: chunk 0 (or the last chunk) along every batched dim."""
    return x[tuple(slice(n - s, n) if last else slice(0, s) for n, s in zip(x.shape, shape))]


def assert_chunks_exact(graph: superopt.KernelGraph, seed: int = 0) -> bool:
    """shrink(graph, graph) computes graph's first and last chunks exactly; True if it shrank anything."""
    small, _, notes = shrink(graph, graph)
    inputs = random_inputs(graph, seed, 0.5)
    full = superopt.run(graph, inputs, "float64")
    for last in (False, True):
        part = {n: _chunk(x, small.tensors[n].shape, last) for n, x in inputs.items()}
        for x, y in zip(full, superopt.run(small, part, "float64")):
            assert torch.allclose(_chunk(x, tuple(y.shape), last), y, rtol=1e-9, atol=1e-12, equal_nan=True), notes
    return bool(notes)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(recipes())
def test_random_programs_shrink_exactly(recipe):
    assert_chunks_exact(build(recipe))


FUSED = sorted(name for name in SOURCES if name.startswith("fused:"))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_source_shrinks_exactly(source):
    assert assert_chunks_exact(SOURCES[source]), f"{source} did not shrink"


@pytest.mark.parametrize("source", FUSED)
def test_mutants_shrink_exactly(source):
    """Mutated imaps, omaps, fmaps, grids, accumulators, axes, operands: whatever shrink accepts, it shrinks
    exactly; a good share of the mutants still shrink."""
    original = SOURCES[source]
    valid = [m for m in single_mutations(original) if mutant(original, [m]) is not None]
    shrunk = []

    @settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(valid), min_size=1, max_size=2))
    def check(mutations):
        graph = mutant(original, mutations)
        if graph is not None:
            shrunk.append(assert_chunks_exact(graph))

    check()
    assert sum(shrunk) > len(shrunk) // 3, f"{sum(shrunk)} of {len(shrunk)} mutants shrank"


def _graph(inputs: dict[str, tuple[int, ...]], body) -> superopt.KernelGraph:
    g = superopt.Graph("g")
    g.output(body(g, *(g.input(n, s, F32) for n, s in inputs.items())))
    return g


def test_batches_that_would_mix_chunks_are_refused():
    """A matmul's contraction dim, a reduced dim, a concat dim, a block output's dim that a grid axis splits and
    a dim some block reads whole are never batched; a pair that differs in some chunks only is told apart."""
    mm = shrink(*[_graph({"x": (4, 6), "w": (6, 8)}, lambda g, x, w: g.matmul(x, w))] * 2)[0]
    assert [mm.tensors[n].shape for n in mm.inputs] == [(1, 6), (6, 1)]
    total = shrink(*[_graph({"x": (4, 6)}, lambda g, x: g.sum(x, 1))] * 2)[0]
    assert total.tensors["x"].shape == (1, 6)

    halves = {"a": (2, 3), "b": (2, 3)}
    same = _graph(halves, lambda g, a, b: g.neg(g.concat(a, b, 0)))
    half = _graph(halves, lambda g, a, b: g.concat(g.neg(a), b, 0))  # equal to `same` in its first chunk only
    assert shrink(same, half)[0].tensors["a"].shape == (2, 1)  # columns, never the concat dim
    assert verify(same, half, seed=0).equivalent is False

    copies = superopt.Graph("copies")  # both blocks write all rows of x: the output's rows are split by the grid
    b = copies.block_graph(grid=(2,))
    b.output(b.accum_sum(b.neg(b.input(copies.input("x", (2, 3), F32), imap=(None,)))), omap=(0,))
    copies.output(copies.graph_def(b)[0])
    assert shrink(copies, copies)[0].tensors["x"].shape == (2, 1)
    assert_chunks_exact(copies)

    scaled = superopt.Graph("scaled")  # each block's rows of x times the column sums of all of x
    x = scaled.input("x", (4, 3), F32)
    b = scaled.block_graph(grid=(2,))
    rows = b.input(x, imap=(0,))
    b.output(b.accum_sum(b.mul(rows, b.sum(b.input(x, imap=(None,)), 0, keepdim=True))), omap=(0,))
    scaled.output(scaled.graph_def(b)[0])
    assert shrink(scaled, scaled)[0].tensors["x"].shape == (4, 1)
    assert_chunks_exact(scaled)


FULL = {
    "rmsnorm_linear_bs8": {"x": (1, 4096), "w": (4096, 1)},
    "gated_mlp": {"x": (1, 4096), "w1": (4096, 1), "w2": (4096, 1)},
    "lora": {"x": (1, 256), "w": (256, 1), "a": (256, 16), "b": (16, 1)},
    "gqa_bs8": {"q": (1, 1, 64), "k": (1, 64, 4096), "v": (1, 4096, 64)},
    "ntrans_bs8": {"h": (1, 4096), "x": (1, 4096), "alpha": (1, 4096)},
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_examples_shrink_to_one_row(name):
    spec = superopt.load(EXAMPLES / f"{name}.yaml")
    fused = superopt.load(EXAMPLES / "fused" / f"{name}.json")
    small_spec, small_fused, notes = shrink(spec, fused)
    assert {n: small_spec.tensors[n].shape for n in spec.inputs} == FULL[name], notes
    assert {n: small_fused.tensors[n].shape for n in spec.inputs} == FULL[name]
