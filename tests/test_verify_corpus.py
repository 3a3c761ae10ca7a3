"""The verifier against a mutation corpus: every example program and every hand-written fused µGraph, at small
dims, mutated one to three times (operands swapped or rewired, an op, reduction axis, keepdim, scalar, eps,
imap, fmap, omap, grid, loop range or accumulator changed, an op bypassed).

A mutant counts as "not equivalent" when the reference interpreter in float64 shows a clear difference on random
inputs (decided independently of the verifier); every such mutant must be rejected. Mutants without a float64
difference may be equivalent (an add's operands swapped, a loop range halved); the verifier may accept them, or
reject them only on exact finite-field evidence of a difference below float64 resolution. (The known-equivalent
rewrites, which must be accepted, are in test_verify.py.)

SUPEROPT_VERIFY_MUTANTS sets the mutants drawn per source (default 100, under a minute in all; the issue's bar is
1000: SUPEROPT_VERIFY_MUTANTS=1000 pytest tests/test_verify_corpus.py takes about 7 minutes on 2 cores).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from mutants import MUTANTS, SOURCES, clearly_different, mutant, mutation_lists

from superopt.serialize import graph_hash
from superopt.verification import verify

TALLY: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_mutants_not_equivalent_are_rejected(source):
    original = SOURCES[source]
    seen: set[str] = {graph_hash(original)}
    kinds = ["mutants", "different", "accepted", "undecided", "field only", "shrunk"]
    tally = TALLY.setdefault(source, dict.fromkeys(kinds, 0))

    @settings(
        max_examples=MUTANTS * 3,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutation_lists(original))
    def check(mutations):
        if tally["mutants"] >= MUTANTS:
            return
        graph = mutant(original, mutations)
        if graph is None or graph_hash(graph) in seen:
            return
        seen.add(graph_hash(graph))
        tally["mutants"] += 1
        result = verify(original, graph, tests=2, seed=len(seen), prove=False)
        tally["shrunk"] += bool(result.shrunk)
        if clearly_different(original, graph):
            tally["different"] += 1
            assert result.equivalent is not True, f"false accept: {mutations}\n{result}"
        elif result.equivalent is False:
            assert result.counterexample.test is not None, f"{mutations}: float64 shows no difference\n{result}"
            tally["field only"] += 1
        else:
            tally["accepted" if result.equivalent else "undecided"] += 1

    check()
    assert tally["mutants"] >= min(MUTANTS, 10), tally
    assert tally["different"] > tally["mutants"] // 3, tally
    assert tally["shrunk"] > tally["mutants"] // 4, tally  # the shrink (verify/shrink.py) is exercised too
