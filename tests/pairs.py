"""Pairs of graphs the verifier is held to: known-equivalent rewrites (which it must accept), known differences
(which it must reject), and the examples whose hand-fused forms verify at small dims; with the small-graph
builder they are written with."""

from __future__ import annotations

import superopt

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
    "layer_norm = rms_norm of x minus its mean": (
        graph("l", VEC, lambda g, x, y, z: g.layer_norm(x, eps=1e-5)),
        graph("r", VEC, lambda g, x, y, z: g.rms_norm(g.sub(x, g.mean(x, 1, keepdim=True)), eps=1e-5)),
    ),
    "rope is linear in x": (
        graph("l", VEC, lambda g, x, y, z: g.rope(g.add(x, y), z, z)),
        graph("r", VEC, lambda g, x, y, z: g.add(g.rope(x, z, z), g.rope(y, z, z))),
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


def _fused_argmax() -> tuple[superopt.KernelGraph, superopt.KernelGraph]:
    """argmax(x @ w) against one kernel whose epilogue takes the argmax of each row's whole tile (greedy decoding's
    LM head): the loop runs over K, the grid over rows."""
    spec = graph("spec", ROWS, lambda g, x, w: g.argmax(g.matmul(x, w), 1, keepdim=True))
    g = superopt.Graph("fused")
    x, w = (g.input(n, s, F32) for n, s in ROWS.items())
    b = g.block_graph(grid=(3,), forloop_range=2)
    logits = b.accum_sum(b.matmul(b.input(x, imap=(0,), fmap=1), b.input(w, imap=(None,), fmap=0)))
    b.output(b.argmax(logits, 1, keepdim=True), omap=(0,))
    (o,) = g.graph_def(b)
    g.output(o)
    return spec, g


EQUIVALENT["argmax of a matmul, in the matmul's epilogue"] = _fused_argmax()


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
    "rope with cos and sin swapped": (
        graph("l", VEC, lambda g, x, y, z: g.rope(x, y, z)),
        graph("r", VEC, lambda g, x, y, z: g.rope(x, z, y)),
    ),
    "rope is not x * cos + x * sin": (
        graph("l", VEC, lambda g, x, y, z: g.rope(x, y, z)),
        graph("r", VEC, lambda g, x, y, z: g.add(g.mul(x, y), g.mul(x, z))),
    ),
    "argmax of the values reversed": (
        graph("l", {"a": (3, 1), "b": (3, 1)}, lambda g, a, b: g.argmax(g.concat(a, b, 1), 1)),
        graph("r", {"a": (3, 1), "b": (3, 1)}, lambda g, a, b: g.argmax(g.concat(b, a, 1), 1)),
    ),
    "argmax is not max": (
        graph("l", SOFTMAX, lambda g, s: g.argmax(s, 1, keepdim=True)),
        graph("r", SOFTMAX, lambda g, s: g.max(s, 1, keepdim=True)),
    ),
    "gelu_tanh is not gelu": (
        graph("l", VEC, lambda g, x, y, z: g.gelu(x)),
        graph("r", VEC, lambda g, x, y, z: g.gelu_tanh(x)),
    ),
}


VERIFIED = ("rmsnorm_linear_bs1", "gated_mlp", "lora", "gqa_bs1", "qknorm_gqa_bs1")
