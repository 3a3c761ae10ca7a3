"""Properties of random programs: JSON round trip, the canonical hash, and the interpreter against torch."""

from __future__ import annotations

import torch
from graphs import INPUT_SHAPES, build, default_names, direct, recipes
from hypothesis import given, settings
from hypothesis import strategies as st

import superopt
from superopt.serialize import from_json, graph_hash, to_json


@settings(max_examples=150, deadline=None)
@given(recipes())
def test_json_round_trip_is_the_identity(recipe):
    g = build(recipe)
    doc = to_json(g)
    back = from_json(doc)
    assert to_json(back) == doc
    assert str(back) == str(g)
    assert graph_hash(back) == graph_hash(g)


@settings(max_examples=150, deadline=None)
@given(recipes(), st.randoms(use_true_random=False))
def test_hash_ignores_names_and_the_order_of_independent_ops(recipe, rnd):
    names = default_names(recipe)
    renamed = [f"v{i}" for i in rnd.sample(range(1000), len(names))]
    assert graph_hash(build(recipe, names=renamed)) == graph_hash(build(recipe))

    # A random topological order of the steps, operands renumbered to follow.
    n, steps = len(INPUT_SHAPES), recipe["steps"]
    order, placed = [], set(range(n))
    while len(order) < len(steps):
        ready = [k for k in range(len(steps)) if k not in order and all(a in placed for a in steps[k][1])]
        k = rnd.choice(ready)
        order.append(k)
        placed.add(n + k)
    new_index = {i: i for i in range(n)} | {n + k: n + pos for pos, k in enumerate(order)}
    shuffled = {
        "steps": [(steps[k][0], tuple(new_index[a] for a in steps[k][1]), steps[k][2]) for k in order],
        "outputs": [new_index[o] for o in recipe["outputs"]],
    }
    assert graph_hash(build(shuffled)) == graph_hash(build(recipe))


def _ancestors(recipe: dict) -> set[int]:
    n, steps = len(INPUT_SHAPES), recipe["steps"]
    live, todo = set(), list(recipe["outputs"])
    while todo:
        t = todo.pop()
        if t >= n and t not in live:
            live.add(t)
            todo.extend(steps[t - n][1])
    return {t - n for t in live}


@settings(max_examples=150, deadline=None)
@given(recipes(), st.data())
def test_hash_changes_with_shapes_dtypes_and_attributes(recipe, data):
    h = graph_hash(build(recipe))
    assert graph_hash(build(recipe, scale=2)) != h
    assert graph_hash(build(recipe, dtype="float16")) != h
    live_with_attrs = [k for k in sorted(_ancestors(recipe)) if recipe["steps"][k][2]]
    if live_with_attrs:
        k = data.draw(st.sampled_from(live_with_attrs))
        op, args, attrs = recipe["steps"][k]
        key = data.draw(st.sampled_from(sorted(attrs)))
        changed = dict(attrs)
        changed[key] = {"dim": lambda d: 1 - d, "keepdim": lambda b: not b}.get(key, lambda v: v * 3)(attrs[key])
        if changed[key] != attrs[key]:
            steps = list(recipe["steps"])
            steps[k] = (op, args, changed)
            try:
                other = build({**recipe, "steps": steps})
            except superopt.IRError:  # the new attribute made a later op ill-formed: nothing to compare
                return
            assert graph_hash(other) != h


@settings(max_examples=200, deadline=None)
@given(recipes(), st.integers(0, 2**31 - 1))
def test_interpreter_agrees_with_torch(recipe, seed):
    g = build(recipe)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in INPUT_SHAPES]
    got = superopt.run(g, dict(zip(g.inputs, xs)), precision="float64")
    want = direct(recipe, xs)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, equal_nan=True)
