"""Split reductions in the search (issue 19): a kernel whose grid also splits a reduced dim writes partial results
along a dim of its output, and the next kernel's loop over that dim combines them (split-K GEMVs: partial
products and mean squares; split-KV attention: partial numerators and denominators).

At small sizes the searches of an rmsnorm + linear GEMV and of a GQA decode attention return split candidates,
verified and through the float gate, which the Triton backend runs (under the interpreter) equal to the program
in float64; a combine taking the max of the partials instead of their sum, or summing partial means, is rejected
by verification; at full size the cost model ranks split-K ahead of the one-kernel GEMV for rmsnorm_linear_bs1 on
the H100.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import superopt
from superopt.ir import KernelGraph
from superopt.kernels import compile
from superopt.kernels.timing import TOLERANCE, relative_error
from superopt.result import Candidate
from superopt.search_space import PRESETS, search
from superopt.serialize import from_json, to_json
from superopt.verification import float_gate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")  # masked padding

GEMV = {"B": 2, "D": 2048, "N": 64}  # a long reduction, few output columns: split-K gives the grid its blocks
DECODE = {"B": 2, "S": 4, "D": 16, "L": 2048}  # a few query rows over a long KV sequence
# Decode attention needs no grid axis over the query rows, so two axes (batch, KV split) and two kernels do.
DECODE_PRESET = replace(PRESETS["attention"], name="decode", kernel_ops=2, grid_axes=2)


def partial_input(graph: KernelGraph) -> bool:
    """A kernel whose grid and loop split the same dim of an input: each block reduces a slice of it."""
    return any(
        bi.fmap is not None and bi.fmap in bi.imap for op in graph.ops if op.block is not None for bi in op.block.inputs
    )


def combines(graph: KernelGraph) -> list[tuple[int, str]]:
    """The accumulators (kernel index, tile name) that combine an upstream kernel's partials: over a loop along a
    dim the upstream kernel wrote its blocks' partials along."""
    produced = {out for op in graph.ops for out in op.outputs}
    found = []
    for k, op in enumerate(graph.ops):
        if op.block is None:
            continue
        looped = {bi.name for src, bi in zip(op.inputs, op.block.inputs) if src in produced and bi.fmap is not None}
        found += [(k, bop.outputs[0]) for bop in op.block.ops if bop.op.startswith("accum") and bop.inputs[0] in looped]
    return found


def split_candidate(name: str, dims: dict[str, int], preset: str | None = None) -> tuple[KernelGraph, Candidate]:
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=dims)
    result = search(spec, preset=preset, budget_s=60, workers=1, seed=0, progress="none")
    assert not result.stats.cut  # exhaustive: the same candidates on any machine
    split = [c for c in result.candidates if partial_input(c.graph) and combines(c.graph)]
    assert split, [str(c.graph) for c in result.candidates]
    return spec, split[0]


def assert_runs_as_the_program(spec: KernelGraph, graph: KernelGraph) -> None:
    """The Triton backend's kernels, under the interpreter, against the program in float64; and the float gate."""
    inputs = superopt.random_inputs(spec, seed=0, scale=0.5)
    (got,) = compile(graph)(**inputs)
    (want,) = superopt.run(spec, inputs, precision="float64")
    assert relative_error(got, want) <= TOLERANCE["float16"]
    gate = float_gate(graph, spec)
    assert gate.passed, gate.reason


def combine_mutants(graph: KernelGraph, swap: dict[str, str]) -> list[KernelGraph]:
    """The graph with one combining accumulator at a time replaced by another (by `swap`, where it names it)."""
    mutants = []
    for k, tile in combines(graph):
        doc = to_json(graph)
        (bop,) = [b for b in doc["ops"][k]["block"]["ops"] if b["outputs"] == [tile]]
        if bop["op"] in swap:
            bop["op"] = swap[bop["op"]]
            mutants.append(from_json(doc))
    return mutants


@pytest.fixture
def decode_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, DECODE_PRESET.name, DECODE_PRESET)


def test_gemv_search_finds_split_k():
    spec, found = split_candidate("rmsnorm_linear_bs1", GEMV)
    assert found.verify.method in ("proved", "tested") and found.kernels == 2
    first, combine = (op.block for op in found.graph.ops)
    x = first.inputs[0]
    (split,) = [a for a, d in enumerate(x.imap) if d == x.fmap]  # the grid axis over slices of D
    assert len(first.grid) == 2 and first.grid[split] > 1 and first.forloop_range > 1
    # products and mean squares per slice, both combined by the second kernel's loop over the slices
    assert len(first.outputs) == 2 and len(combines(found.graph)) == 2 and combine.forloop_range == first.grid[split]
    assert_runs_as_the_program(spec, found.graph)
    # the products' max instead of their sum; the slices' mean squares summed instead of averaged (which the
    # abstract expressions do not tell apart: they forget constants)
    mutants = combine_mutants(found.graph, {"accum_sum": "accum_max", "accum_mean_last": "accum_sum_last"})
    assert len(mutants) == 2
    for mutant in mutants:
        assert superopt.verify(spec, mutant, seed=0).equivalent is False


def test_decode_attention_search_finds_split_kv(decode_preset):
    spec, found = split_candidate("gqa_bs1", DECODE, preset=DECODE_PRESET.name)
    assert found.verify.method in ("proved", "tested") and found.kernels == 2
    first = found.graph.ops[0].block
    assert first is not None
    # k and v: one grid axis takes a slice of the KV positions, the loop walks it
    split = {
        name: [a for a, d in enumerate(bi.imap) if d is not None and d == bi.fmap]
        for name, bi in zip(found.graph.ops[0].inputs, first.inputs)
    }
    assert split["k"] == split["v"] and len(split["k"]) == 1 and not split["q"]
    assert len(combines(found.graph)) == 2  # numerators and denominators, each summed over the KV splits
    assert_runs_as_the_program(spec, found.graph)
    mutants = combine_mutants(found.graph, {"accum_sum": "accum_max", "accum_sum_last": "accum_max"})
    assert len(mutants) == 2  # the numerators' max instead of their sum, and the denominators'
    for mutant in mutants:
        assert superopt.verify(spec, mutant, seed=0).equivalent is False


def test_split_k_ranks_ahead_of_the_one_kernel_gemv_at_full_size():
    """rmsnorm_linear_bs1 on the H100: 96 or 128 blocks of one kernel stream the weight at a block's rate; split-K
    fills every SM several times over and streams it at the bandwidth, which pays for its second kernel. One process
    and a pool rank the same candidates."""
    spec = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml")
    result, pooled = (search(spec, device="h100", budget_s=60, workers=w, seed=0, progress="none") for w in (1, 2))
    assert not result.stats.cut and [c.hash for c in result.candidates] == [c.hash for c in pooled.candidates]
    best = result.best
    assert partial_input(best.graph) and len(combines(best.graph)) == 2
    one_kernel = [c for c in result.candidates if c.kernels == 1]
    assert one_kernel and best.predicted_us < min(c.predicted_us for c in one_kernel)
