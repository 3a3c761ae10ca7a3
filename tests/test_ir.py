"""The IR: builders, the checks that keep a graph well-formed, thread graphs, and the text form."""

from __future__ import annotations

import math

import pytest
import torch

import superopt
from superopt.interpret import ACCUMULATE, REFERENCE
from superopt.ops import OPS, missing_rules


def test_every_op_has_a_reference_rule():
    assert missing_rules({**REFERENCE, **ACCUMULATE, "graph_def": None}) == []


def test_op_table_levels():
    g = superopt.Graph()
    assert all(hasattr(g, n) for n, d in OPS.items() if "kernel" in d.levels and n != "graph_def")
    assert not hasattr(g, "accum_sum")
    x = g.input("x", (4, 8), "float16")
    with pytest.raises(superopt.IRError, match="not allowed in a kernel graph"):
        g.op("accum_sum", x)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda g, x, w: g.matmul(x, x), r"matmul: inner dims differ: \[4, 8\] @ \[4, 8\]"),
        (lambda g, x, w: g.add(x, w), r"add: shapes \[4, 8\] and \[8, 16\] do not broadcast"),
        (lambda g, x, w: g.add(x, g.input("h", (4, 8), "float32")), "add: operand dtypes differ"),
        (lambda g, x, w: g.sum(x, dim=2), "sum: dim 2 is out of range for a tensor of rank 2"),
        (lambda g, x, w: g.concat(x, w, dim=0), r"concat: shapes \[4, 8\] and \[8, 16\] differ outside dim 0"),
        (lambda g, x, w: g.rms_norm(x, eps="small"), "rms_norm: argument 'eps' must be float"),
        (lambda g, x, w: g.rms_norm(x, ep=1e-6), r"unknown keyword 'ep' for rms_norm \(expected: eps\)"),
        (lambda g, x, w: g.matmul(x), r"matmul takes 2 tensor operand\(s\), got 1"),
        (lambda g, x, w: g.exp(x, w), r"exp takes 1 tensor operand\(s\), got 2"),
        (lambda g, x, w: g.mul_scalar(x), "mul_scalar needs the argument 'c'"),
        (lambda g, x, w: g.op("softmax", x), "unknown op 'softmax'"),
        (lambda g, x, w: g.exp("nope"), "unknown tensor 'nope'"),
        (lambda g, x, w: g.input("q", (4, 8), "float64"), "bad dtype 'float64'"),
        (lambda g, x, w: g.exp(x, out="w"), "tensor name 'w' is already defined"),
    ],
)
def test_kernel_graph_errors(build, message):
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    with pytest.raises(superopt.IRError, match=message):
        build(g, x, w)


def test_negative_dims_are_normalized():
    g = superopt.Graph()
    s = g.sum(g.input("x", (4, 8)), dim=-1, keepdim=True)
    assert g.ops[-1].attrs == {"dim": 1, "keepdim": True}
    assert s.shape == (4, 1)


def _matmul_block(g, x, w, grid=(2,), forloop_range=4):
    b = g.block_graph(grid=grid, forloop_range=forloop_range)
    return b, b.input(x, imap=(None,) * len(grid), fmap=1), b.input(w, imap=(1,) + (None,) * (len(grid) - 1), fmap=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda g, x, w: g.block_graph(grid=(3,), forloop_range=1).input(w, imap=(1,)),
            "dim 1 of size 16 is not divisible by grid axis 0",
        ),
        (
            lambda g, x, w: g.block_graph(grid=(2,), forloop_range=3).input(x, imap=(None,), fmap=1),
            "not divisible by the forloop range 3",
        ),
        (
            lambda g, x, w: g.block_graph(grid=(2, 2), forloop_range=1).input(x, imap=(0,)),
            "imap has 1 entries for a grid of 2 axes",
        ),
        (lambda g, x, w: g.block_graph(grid=(2, 2)).input(x, imap=(0, 0)), "two grid axes map to dim 0"),
        (lambda g, x, w: g.block_graph(grid=(2,)).input(x, imap=(5,)), "grid axis 0 maps to dim 5"),
        (lambda g, x, w: g.block_graph(grid=(1, 1, 1, 1)), "grid must have 1 to 3 positive axes"),
        (lambda g, x, w: g.block_graph(grid=(2,), forloop_range=0), "forloop_range must be a positive integer"),
        (lambda g, x, w: g.block_graph(grid=(2,), block_size=100), "block_size must be a multiple of 32"),
    ],
)
def test_block_map_errors(build, message):
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    with pytest.raises(superopt.IRError, match=message):
        build(g, x, w)


def test_every_path_passes_exactly_one_accumulator():
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    b, xt, wt = _matmul_block(g, x, w)
    mm = b.matmul(xt, wt)
    with pytest.raises(superopt.IRError, match="passes no accumulator"):
        b.output(mm, omap=(1,))
    acc = b.accum_sum(mm)
    with pytest.raises(superopt.IRError, match="already passed an accumulator"):
        b.accum_sum(acc)
    with pytest.raises(superopt.IRError, match="mixes tiles from inside the loop"):
        b.add(acc, mm)
    with pytest.raises(superopt.IRError, match="omap misses grid axis 0 of size 2"):
        b.output(acc, omap=(None,))
    b.output(b.silu(acc), omap=(1,))
    (out,) = g.graph_def(b)
    assert out.shape == (4, 16) and out.dtype == "float16"


def test_graph_def_checks_its_inputs():
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    b, xt, wt = _matmul_block(g, x, w)
    b.output(b.accum_sum(b.matmul(xt, wt)), omap=(1,))
    with pytest.raises(
        superopt.IRError, match="input 0 'w' is float16\\[8, 16\\], the block graph expects float16\\[4, 8\\]"
    ):
        g.graph_def(b, inputs=[w, x])
    with pytest.raises(superopt.IRError, match="the block graph has 2 inputs, got 1"):
        g.graph_def(b, inputs=[x])


def test_tiled_matmul_is_literal_and_exact():
    """Grid over N (2 blocks) and rows (2 blocks), loop over K: equals x @ w in float64 exactly enough."""
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float32"), g.input("w", (8, 16), "float32")
    b = g.block_graph(grid=(2, 2), forloop_range=4)
    xt = b.input(x, imap=(None, 0), fmap=1)
    wt = b.input(w, imap=(1, None), fmap=0)
    assert xt.shape == (2, 2) and wt.shape == (2, 8)
    b.output(b.accum_sum(b.matmul(xt, wt)), omap=(1, 0))
    (o,) = g.graph_def(b)
    g.output(o)
    xs = {"x": torch.randn(4, 8, dtype=torch.float64), "w": torch.randn(8, 16, dtype=torch.float64)}
    (got,) = superopt.run(g, xs, precision="float64")
    torch.testing.assert_close(got, xs["x"] @ xs["w"], rtol=1e-12, atol=1e-12)


def test_accumulators_against_hand_computed_values():
    """x = [[1, 2, 3, 4]] split over 2 iterations of [a, b]: each accumulator against its definition."""
    g = superopt.Graph()
    x = g.input("x", (1, 4), "float32")
    m = g.input("m", (1, 2), "float32")
    b = g.block_graph(grid=(1,), forloop_range=2)
    xt, mt = b.input(x, imap=(None,), fmap=1), b.input(m, imap=(None,), fmap=1)
    outs = {
        "sum": b.accum_sum(xt),
        "sum_last": b.accum_sum_last(xt),
        "mean_last": b.accum_mean_last(xt),
        "rms_last": b.accum_rms_last(xt, eps=0.5),
        "max": b.accum_max(xt),
        "rescaled": b.accum_rescaled_sum(xt, mt),
    }
    for t in outs.values():
        b.output(t, omap=(None,))
    for t in g.graph_def(b, outs=list(outs)):
        g.output(t)
    got = dict(
        zip(outs, superopt.run(g, {"x": torch.tensor([[1.0, 2, 3, 4]]), "m": torch.tensor([[0.0, 1.0]])}, "float64"))
    )
    e = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    expected = {
        "sum": [[4.0, 6.0]],
        "sum_last": [[10.0]],
        "mean_last": [[2.5]],
        "rms_last": [[((1 + 4 + 9 + 16) / 4 + 0.5) ** 0.5]],
        "max": [[3.0, 4.0]],
        "rescaled": [[1 * e + 3, 2 * e + 4]],
    }
    for k, v in expected.items():
        torch.testing.assert_close(got[k], torch.tensor(v, dtype=torch.float64), rtol=1e-12, atol=0)


# Rows and columns with ties: [1, 3, 3, 2] -> 1, all equal -> 0, all -inf -> 0; column 1 ties 5 at rows 1 and 3.
TIES = [[1.0, 3, 3, 2], [5, 5, 0, 5], [-math.inf] * 4, [-2, 5, 3, 7]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("precision", ["native", "float64"])
def test_argmax_is_the_first_maximum_as_float32(dtype, precision):
    """Against hand-derived indices and torch.argmax in float64; float32 whatever the input's dtype, max's shape."""
    g = superopt.Graph()
    x = g.input("x", (4, 4), dtype)
    per_row, per_column = g.argmax(x, dim=-1), g.argmax(x, 0, True)
    g.output(per_row)
    g.output(per_column)
    assert (per_row.shape, per_row.dtype, per_column.shape, per_column.dtype) == ((4,), "float32", (1, 4), "float32")
    assert g.ops[0].attrs == {"dim": 1, "keepdim": False}
    ties = torch.tensor(TIES, dtype=torch.float64)
    rows, columns = superopt.run(g, {"x": ties}, precision)
    assert rows.dtype == (torch.float32 if precision == "native" else torch.float64)
    assert rows.tolist() == [1, 0, 0, 3] and columns.tolist() == [[1, 1, 0, 3]]
    assert torch.equal(rows.long(), torch.argmax(ties, -1)) and torch.equal(columns.long(), ties.argmax(0, True))


def test_argmax_in_a_block_graph_indexes_the_tile():
    """The grid splits the reduced dim in two tiles of 4 and the loop each tile in two chunks of 2: each block
    finds the first maximum of its chunk, by its index within the chunk, and accum_sum adds the two chunks'."""
    g = superopt.Graph()
    x = g.input("x", (1, 8), "float32")
    b = g.block_graph(grid=(2,), forloop_range=2)
    b.output(b.accum_sum(b.argmax(b.input(x, imap=(1,), fmap=1), 1, keepdim=True)), omap=(1,))
    g.output(g.graph_def(b)[0])
    (got,) = superopt.run(g, {"x": torch.tensor([[1.0, 3, 2, 3, 6, 6, 7, 7]])}, "float64")
    assert got.tolist() == [[1 + 1, 0 + 0]]  # chunks [1, 3] [2, 3] | [6, 6] [7, 7]: indices 1 1 | 0 0


def test_native_precision_rounds_each_op_to_its_dtype():
    """In float16, 1 + 3e-4 rounds back to 1 (the spacing at 1 is 2^-10), so x1000 gives 1000, not 1000.3."""
    g = superopt.Graph()
    x = g.input("x", (1, 1), "float16")
    g.output(g.mul_scalar(g.add_scalar(x, c=3e-4), c=1000.0))
    (native,) = superopt.run(g, {"x": torch.ones(1, 1)})
    (exact,) = superopt.run(g, {"x": torch.ones(1, 1)}, precision="float64")
    assert native.dtype == torch.float16 and native.item() == 1000.0
    assert exact.dtype == torch.float64 and exact.item() == pytest.approx(1000.3, rel=1e-12)


def test_run_checks_its_inputs():
    g = superopt.Graph("p")
    g.output(g.exp(g.input("x", (2, 3))))
    with pytest.raises(superopt.SuperoptError, match=r"inputs missing: \['x'\]; not inputs of the graph: \['y'\]"):
        superopt.run(g, {"y": torch.ones(2, 3)})
    with pytest.raises(superopt.SuperoptError, match=r"input 'x' has shape \[3, 2\], the graph expects \[2, 3\]"):
        superopt.run(g, {"x": torch.ones(3, 2)})


def test_thread_graphs_are_trees_of_single_consumer_elementwise_ops():
    g = superopt.Graph()
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    b, xt, wt = _matmul_block(g, x, w)
    acc = b.accum_sum(b.matmul(xt, wt))  # ops 0, 1
    s = b.silu(acc)  # 2: feeds only 3
    t = b.mul_scalar(s, c=2.0)  # 3: feeds 4 and 5, so the chain ends here
    u, v = b.exp(t), b.neg(t)  # 4, 5
    b.output(b.add(u, v), omap=(1,))  # 6: both its operands have it as their one consumer: one tree
    b.output(t, omap=(1,))
    assert superopt.thread_graphs(b) == [(2, 3), (4, 5, 6)]


def test_text_form_reads_like_the_program():
    g = superopt.Graph("rmsnorm_linear")
    x, w = g.input("x", (4, 8), "float16"), g.input("w", (8, 16), "float16")
    b, xt, wt = _matmul_block(g, x, w)
    acc, r = b.accum_sum(b.matmul(xt, wt)), b.accum_rms_last(xt)
    b.output(b.div(acc, r), omap=(1,))
    (o,) = g.graph_def(b, outs=["o"])
    g.output(o)
    assert str(g).splitlines() == [
        "def rmsnorm_linear(x: float16[4, 8], w: float16[8, 16]):",
        "    o: float16[4, 16] = graph_def(x, w, grid=[2], forloop_range=4, block_size=128):",
        "        x_tile: float16[4, 2] = input(x, imap=[None], fmap=1)",
        "        w_tile: float16[2, 8] = input(w, imap=[1], fmap=0)",
        "        matmul: float16[4, 8] = matmul(x_tile, w_tile)",
        "        accum_sum: float16[4, 8] = accum_sum(matmul)",
        "        accum_rms_last: float16[4, 1] = accum_rms_last(x_tile, eps=1e-06)",
        "        # after the loop",
        "        div: float16[4, 8] = div(accum_sum, accum_rms_last)",
        "        return div (omap=[1])",
        "    return o",
    ]


def test_rename_inputs_keeps_the_function_and_the_hash():
    g = superopt.Graph("a")
    x, w = g.input("x", (4, 8), "float32"), g.input("w", (8, 2), "float32")
    g.output(g.matmul(g.exp(x), w, out="y"))
    named = superopt.ir.rename_inputs(g, ["y", "x"], "b")  # 'y' is also an inner tensor's name: it moves aside
    assert (named.name, named.inputs) == ("b", ["y", "x"]) and named.outputs != ["y"]
    assert superopt.graph_hash(named) == superopt.graph_hash(g)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(8, 2, generator=gen)
    expect = torch.exp(a.double()) @ b.double()
    assert torch.allclose(superopt.run(named, {"y": a, "x": b}, "float64")[0], expect)
    with pytest.raises(superopt.IRError, match="2 inputs, 1 names given"):
        superopt.ir.rename_inputs(g, ["x"], "c")
