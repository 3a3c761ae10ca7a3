"""Triton code generation, run under the Triton interpreter on CPU tensors against the reference interpreter.

Shapes are small (the interpreter runs each program in numpy) but odd where padding matters: tile extents of
3, 5 or 20 are padded to 16 or 32 and masked.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from graphs import FUSED_SMALL, import_fused

import superopt
from superopt.kernels import compile
from superopt.kernels.lower import LAST_STATE_PER_THREAD, lower, padded
from superopt.kernels.timing import TOLERANCE, relative_error
from superopt.kernels.triton_codegen import ACCUMULATE, EMIT, CodegenError
from superopt.ops import OPS, missing_rules

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytestmark = [
    # padding lanes may compute 0 / 0 or rsqrt(0); they are masked out, but numpy warns
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


fused = import_fused()


@pytest.fixture(autouse=True, scope="module")
def _cache_in_tmp(tmp_path_factory):
    """Generated modules go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPEROPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


# Small dims per workload: a few blocks and loop iterations each, and extents that need padding.
SMALL = {
    "rmsnorm_linear_bs1": {"B": 3, "D": 256, "N": 48},
    "rmsnorm_linear_bs8": {"B": 16, "D": 128, "N": 32},
    "gated_mlp": {"B": 5, "D": 256, "N": 32},
    "gqa_bs1": {"B": 2, "S": 32, "D": 8, "L": 256},
    "gqa_bs8": {"B": 3, "S": 16, "D": 16, "L": 128},
    "qknorm_gqa_bs1": {"B": 1, "S": 32, "D": 16, "L": 256},
    "qknorm_gqa_bs8": {"B": 2, "S": 16, "D": 8, "L": 128},
    "mqa_bs1": {"B": 1, "S": 64, "D": 8, "L": 256},
    "lora": {"B": 4, "D": 256, "N": 32, "R": 4},
    "ntrans_bs1": {"B": 3, "D": 64},
    "ntrans_bs8": {"B": 8, "D": 32},
}


def assert_matches_reference(
    graph: superopt.KernelGraph, seed: int = 0, scale: float = 0.5, reference: superopt.KernelGraph | None = None
) -> None:
    """The compiled graph, run under the interpreter, against the reference interpreter in float64 running
    `reference` (default: the graph itself)."""
    inputs = superopt.random_inputs(graph, seed=seed, scale=scale)
    got = compile(graph)(**inputs)
    want = superopt.run(reference or graph, inputs, precision="float64")
    for name, g, w in zip(graph.outputs, got, want):
        ty = graph.tensors[name]
        assert tuple(g.shape) == ty.shape and g.dtype == getattr(torch, ty.dtype)
        error = relative_error(g, w)
        assert error <= TOLERANCE[ty.dtype], f"{name}: relative error {error:.2e}"


def compiled_for_the_gpu(code: str, tmp_path: Path) -> str:
    """`code` run in a fresh interpreter with Triton compiling for the GPU (no interpreter), its own cache; its
    stdout, after asserting it exited 0."""
    env = os.environ | {"TRITON_INTERPRET": "0", "SUPEROPT_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_block_op_has_a_rule():
    assert missing_rules(EMIT | ACCUMULATE, "block") == []


@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_fused_graph_matches_reference(name):
    assert_matches_reference(fused.build(name, SMALL[name]))


@pytest.mark.parametrize("name", ["rmsnorm_linear_bs8", "gated_mlp"])
def test_split_k_form_computes_the_program(name):
    """The split-K forms (partial products over slices of D, then a combine kernel whose short loop over the
    slices is unrolled) equal the program: run under the interpreter, and by the verifier."""
    split = import_fused("examples_fused_split")
    split.COLS, split.CHUNK, split.SPLITS = 32, 64, 4
    graph = split.build(name, FUSED_SMALL[name])
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=FUSED_SMALL[name])
    assert len(graph.ops) == 2 and "in tl.static_range(FORLOOP)" in compile(graph).source
    assert_matches_reference(graph, reference=spec)
    assert superopt.verify(spec, graph, seed=0).equivalent


@pytest.mark.parametrize("rows", [8, 64])
def test_last_dim_sums_after_the_loop_or_in_it(rows):
    """accum_rms_last over a tile of at most LAST_STATE_PER_THREAD values a thread keeps a tile-shaped sum and
    reduces it after the loop (8 rows: 16 x 256 padded); a larger tile (64 rows) reduces in every iteration.
    Both equal the program."""
    g = superopt.Graph("row_rms")
    b = g.block_graph(grid=(1,), forloop_range=8)
    b.output(b.accum_rms_last(b.input(g.input("x", (rows, 2048)), (None,), fmap=1), eps=1e-6), omap=(None,))
    g.output(g.graph_def(b)[0])
    after = padded(rows) * 256 <= LAST_STATE_PER_THREAD * b.block_size
    assert after == (rows == 8) and ("accum_rms_last_terms +=" in compile(g).source) == after
    assert_matches_reference(g)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_matches_reference(name):
    assert_matches_reference(superopt.load(EXAMPLES / f"{name}.yaml", dims=SMALL[name]), seed=1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_search_winner_matches_the_program(name):
    """Each example's best candidate, searched at small dims, compiled and run under the interpreter."""
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=SMALL[name])
    best = superopt.search(spec, budget_s=10, workers=1, progress="none").best
    assert_matches_reference(best.graph, seed=2, reference=spec)


# --- each predefined op, lowered to a block graph and generated ---------------------------------------------


def _one_op(op: str, shapes: list[tuple[int, ...]], dtype: str = "float16", **attrs) -> superopt.KernelGraph:
    g = superopt.Graph(f"one_{op}")
    ins = [g.input(f"x{k}", s, dtype) for k, s in enumerate(shapes)]
    g.output(g.op(op, *ins, **attrs))
    return g


UNARY = [n for n, d in OPS.items() if d.kind in ("unary", "scalar") and "kernel" in d.levels]


@pytest.mark.parametrize("op", UNARY)
def test_unary_op(op):
    attrs = {"c": -1.5} if OPS[op].kind == "scalar" else {}
    g = _one_op(op, [(3, 20)], "float32", **attrs)
    inputs = {"x0": torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) + 0.5}  # sqrt, rsqrt: positive
    (got,) = compile(g)(**inputs)
    want = superopt.run(g, inputs, precision="float64")[0]
    assert relative_error(got, want) <= TOLERANCE["float32"]


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", [[(3, 5, 20), (5, 1)], [(20,), (3, 5, 20)], [(3, 1, 20), (1, 5, 20)]])
def test_binary_op_broadcasting(op, shapes):
    assert_matches_reference(_one_op(op, shapes), scale=1.0)


@pytest.mark.parametrize("op", ["sum", "max", "mean"])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("keepdim", [False, True])
def test_reduce_op(op, dim, keepdim):
    assert_matches_reference(_one_op(op, [(3, 5, 20)], "float32", dim=dim, keepdim=keepdim), scale=1.0)


def _ties() -> torch.Tensor:
    """(3, 5, 20) bfloat16 small integers, with ties along every dim; set lines: [1, 3, 3, 2, -5, ...] (index 1
    along dim 2), equal negative values along each dim (padding that held 0 would win), and -inf everywhere along
    dim 2 (index 0)."""
    x = torch.randint(-2, 3, (3, 5, 20), generator=torch.Generator().manual_seed(0)).double()
    x[0, 0] = torch.tensor([1.0, 3, 3, 2] + [-5] * 16)
    x[1, 2], x[2, :, 7], x[:, 4, 0] = -2, -2, -1
    x[2, 3] = -math.inf
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("keepdim", [False, True])
def test_argmax_op_is_torchs_first_maximum(dim, keepdim):
    """tl.argmax over ties and masked padding (extents 3, 5, 20 padded to 16, 16, 32) equals torch.argmax in
    float64 exactly: float32 indices of a bfloat16 input."""
    x = _ties()
    (got,) = compile(_one_op("argmax", [(3, 5, 20)], "bfloat16", dim=dim, keepdim=keepdim))(x)
    want = torch.argmax(x.double(), dim, keepdim)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    if dim == 2:
        assert got.reshape(3, 5)[0, 0] == 1 and got.reshape(3, 5)[2, 3] == 0


def test_argmax_over_a_concatenated_dim():
    """argmax over concat(x, y) kept as its parts: a later part's maximum wins only where it is greater (a tie
    with an earlier part keeps the earlier index), its index offset by the first part's extent."""
    g = superopt.Graph("cat_argmax")
    x, y = g.input("x", (6, 20), "float32"), g.input("y", (6, 7), "float32")
    b = g.block_graph(grid=(2,))
    xt, yt = b.input(x, (0,)), b.input(y, (0,))
    b.output(b.accum_sum(b.argmax(b.concat(xt, yt, dim=1), dim=1, keepdim=True)), omap=(0,))
    b.output(b.accum_sum(b.argmax(b.concat(xt, b.neg(xt), dim=0), dim=0, keepdim=True)), omap=(0,))
    for o in g.graph_def(b, inputs=[x, y]):
        g.output(o)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randint(-3, 3, (6, 20), generator=gen).float(), torch.randint(-3, 3, (6, 7), generator=gen).float()
    xs[0, 4], ys[0, 2] = 9, 9  # a tie across the parts: x's index
    ys[1, 5] = 9  # y's alone: 20 + 5
    xs[2], ys[2] = -math.inf, -math.inf
    rows, columns = compile(g)(xs, ys)
    assert rows[:3, 0].tolist() == [4, 25, 0]
    assert torch.equal(rows, torch.cat([xs, ys], 1).double().argmax(1, keepdim=True).float())
    halves = [torch.cat([h, -h]).double().argmax(0, keepdim=True) for h in xs.double().split(3)]
    assert torch.equal(columns, torch.cat(halves).float())


def test_argmax_kernels_compile_for_hopper(tmp_path):
    """What the interpreter runs in numpy, Triton's compiler for sm_90 must take too: tl.argmax, and tl.max with
    its indices over a concatenation's parts."""
    code = (
        "import superopt\n"
        "from superopt.kernels import compile\n"
        "g = superopt.Graph('am')\n"
        "x, y = g.input('x', (6, 20), 'bfloat16'), g.input('y', (6, 7), 'bfloat16')\n"
        "b = g.block_graph(grid=(2,))\n"
        "cat = b.concat(b.input(x, (0,)), b.input(y, (0,)), dim=1)\n"
        "b.output(b.accum_sum(b.argmax(cat, 1, keepdim=True)), omap=(0,))\n"
        "g.output(g.graph_def(b, inputs=[x, y])[0])\n"
        "g.output(g.argmax(x, 0))\n"
        "for k in compile(g).kernels:\n"
        "    print(k.code.name, '.entry' in k.compile_for(90).asm['ptx'])\n"
    )
    stdout = compiled_for_the_gpu(code, tmp_path)
    assert stdout.count(" True\n") == 2, stdout


@pytest.mark.parametrize("dim", [0, 1])
def test_concat_op(dim):
    shapes = [(3, 20), (5, 20)] if dim == 0 else [(3, 20), (3, 7)]
    assert_matches_reference(_one_op("concat", shapes, dim=dim), scale=1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_ops(op, dtype):
    assert_matches_reference(_one_op(op, [(5, 40)], dtype, eps=1e-5), scale=1.0)


@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 64), (1, 64), (1, 64)],  # one cos/sin row for every head
        [(2, 4, 96), (2, 1, 96), (2, 1, 96)],  # a head dim the padding does not halve
    ],
)
def test_rope_op(shapes):
    assert_matches_reference(_one_op("rope", shapes, "float32"), scale=1.0)


@pytest.mark.parametrize(
    "shapes",
    [
        [(20, 40), (40, 24)],  # every extent padded
        [(1, 64), (64, 32)],  # M = 1: a product on CUDA cores
        [(3, 20, 16), (16, 24)],  # batched times a matrix
        [(1, 20, 16), (3, 16, 24)],  # a broadcast batch
        [(3, 20, 16), (3, 16, 24)],
    ],
)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_matmul_op(shapes, dtype):
    assert_matches_reference(_one_op("matmul", shapes, dtype), scale=1.0)


@pytest.mark.parametrize(
    "op", sorted(n for n, d in OPS.items() if "kernel" in d.levels and n not in ("graph_def", "dequant"))
)
def test_lowered_op_computes_the_op(op):
    """lower() alone, through the reference interpreter: the block graph it builds computes the op."""
    d = OPS[op]
    shapes = {"matmul": [(4, 6, 8), (8, 10)], "concat": [(4, 6), (4, 3)]}.get(op, [(4, 6, 8)] * d.arity)
    attrs = {"reduce": {"dim": 1, "keepdim": False}, "scalar": {"c": 2.0}, "concat": {"dim": 1}}.get(d.kind, {})
    plain = _one_op(op, shapes, "float32", **attrs)
    block = lower(plain, plain.ops[0])
    fused_form = superopt.Graph("lowered")
    ins = [fused_form.input(n, plain.tensors[n].shape, "float32") for n in plain.inputs]
    (out,) = fused_form.graph_def(block, inputs=ins)
    fused_form.output(out)
    inputs = superopt.random_inputs(plain, seed=3)
    inputs = {k: v.abs() + 0.1 for k, v in inputs.items()}
    (want,) = superopt.run(plain, inputs, precision="float64")
    (got,) = superopt.run(fused_form, inputs, precision="float64")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits, zero", [("int4", False), ("int4", True), ("int8", True)])
def test_lowered_dequant_computes_the_op(bits, zero):
    """lower() of dequant (whole rows a block: its groups and packing run along them), through the reference
    interpreter in float64: the same values as the op."""
    plain = superopt.Graph("dequant")
    q = plain.input("q", (4, 6, 4 if bits == "int4" else 8), bits)
    scale = plain.input("scale", (4, 6, 2), "float32")
    plain.output(plain.dequant(q, scale, plain.input("zero", (4, 6, 2), "float32") if zero else None, group=4))
    block = lower(plain, plain.ops[0])
    fused_form = superopt.Graph("lowered")
    ins = [fused_form.input(n, plain.tensors[n].shape, plain.tensors[n].dtype) for n in plain.inputs]
    (out,) = fused_form.graph_def(block, inputs=ins)
    fused_form.output(out)
    inputs = superopt.random_inputs(plain, seed=3)
    (want,) = superopt.run(plain, inputs, precision="float64")
    (got,) = superopt.run(fused_form, inputs, precision="float64")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- block graphs beyond the examples: the other accumulators, concatenations, dtypes ------------------------


def test_online_softmax_attention():
    """Flash attention as a block graph: accum_rescaled_sum with a per-iteration row max (online softmax)."""
    g = superopt.Graph("flash")
    q, k, v = g.input("q", (2, 32, 16)), g.input("k", (2, 16, 64)), g.input("v", (2, 64, 16))
    b = g.block_graph(grid=(2, 2), forloop_range=4)
    qt, kt, vt = b.input(q, (0, 1)), b.input(k, (0, None), fmap=2), b.input(v, (0, None), fmap=1)
    s = b.matmul(qt, kt)
    m = b.max(s, dim=2, keepdim=True)
    e = b.exp(b.sub(s, m))
    num = b.accum_rescaled_sum(b.matmul(e, vt), m)
    den = b.accum_rescaled_sum(b.sum(e, dim=2, keepdim=True), m)
    b.output(b.div(num, den), omap=(0, 1))
    (o,) = g.graph_def(b)
    g.output(o)
    assert_matches_reference(g, scale=2.0)  # large logits: only the rescaling keeps exp in range


def test_max_and_mean_accumulators():
    g = superopt.Graph("stats")
    x = g.input("x", (12, 40), "float32")
    b = g.block_graph(grid=(3,), forloop_range=5)
    xt = b.input(x, (0,), fmap=1)
    b.output(b.add(b.accum_max(xt), b.accum_mean_last(xt)), omap=(0,))
    b.output(b.accum_rms_last(b.mul_scalar(xt, 3.0), eps=1e-3), omap=(0,))
    outs = g.graph_def(b)
    for o in outs:
        g.output(o)
    assert_matches_reference(g, scale=1.0)


def test_concatenations_kept_as_parts():
    """Concat along M feeding a matmul, an elementwise op over the parts, a sum over the concatenated dim, and a
    store of parts: none materializes the concatenation."""
    g = superopt.Graph("parts")
    x1, x2 = g.input("x1", (8, 32)), g.input("x2", (8, 32))
    w = g.input("w", (32, 24))
    b = g.block_graph(grid=(2,), forloop_range=2)
    t1, t2 = b.input(x1, (None,), fmap=1), b.input(x2, (None,), fmap=1)
    wt = b.input(w, (1,), fmap=0)
    rows = b.concat(t1, t2, dim=0)  # (16, 16): two parts along M
    prod = b.accum_sum(b.exp(b.mul_scalar(b.matmul(rows, wt), 0.1)))
    b.output(prod, omap=(1,))
    b.output(b.accum_sum_last(b.concat(t1, b.neg(t2), dim=1)), omap=(0,))  # a sum over the concatenated dim
    outs = g.graph_def(b, inputs=[x1, x2, w])
    for o in outs:
        g.output(o)
    assert_matches_reference(g, scale=1.0)


def test_unsupported_concat_is_a_codegen_error():
    """A product of operands concatenated along K at different split points has no sum-of-dots form."""
    g = superopt.Graph("bad")
    x, w, u = g.input("x", (16, 32)), g.input("w", (48, 16)), g.input("u", (16, 16))
    b = g.block_graph(grid=(1,))
    xt = b.input(x, (None,))
    lhs = b.concat(xt, b.neg(xt), dim=1)  # K parts 32 + 32
    rhs = b.concat(b.input(w, (None,)), b.input(u, (None,)), dim=0)  # K parts 48 + 16
    b.output(b.accum_sum(b.matmul(lhs, rhs)), omap=(None,))
    g.output(g.graph_def(b, inputs=[x, w, u])[0])
    with pytest.raises(CodegenError, match="split at different points"):
        compile(g)


# --- the generated source and its cache -------------------------------------------------------------------------


def test_source_is_readable_and_cached_by_block_graph():
    g = fused.build("rmsnorm_linear_bs1", SMALL["rmsnorm_linear_bs1"])
    first, again = compile(g), compile(g)
    (kernel,) = first.kernels
    src = kernel.code.source
    assert kernel.code.name.startswith("rmsnorm_linear_bs1_o_")
    assert f"def {kernel.code.name}(" in src and "@triton.jit" in src
    assert "for it in range(FORLOOP):" in src and "tl.dot(" in src and "FORLOOP: tl.constexpr" in src
    assert "BLOCK_3=16" in src  # 3 rows padded to 16, masked
    assert again.kernels[0].module() is kernel.module()  # one module per block graph
    other = fused.build("rmsnorm_linear_bs1", {**SMALL["rmsnorm_linear_bs1"], "N": 64})
    assert compile(other).kernels[0].code.name != kernel.code.name


def test_padded_extents():
    assert [padded(n) for n in (1, 2, 15, 16, 17, 48, 64, 100)] == [1, 16, 16, 16, 32, 64, 64, 128]


def test_bf16_results_round_to_nearest_even():
    """As the GPU rounds (the interpreter alone would truncate): x / 3 in bf16 equals torch's, element for
    element."""
    g = _one_op("mul_scalar", [(4, 256)], "bfloat16", c=1 / 3)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    (got,) = compile(g)(x)
    assert torch.equal(got, (x.float() * (1 / 3)).to(torch.bfloat16))


def test_inputs_by_position_or_name_and_checked():
    g = fused.build("lora", SMALL["lora"])
    c = compile(g)
    inputs = superopt.random_inputs(g, seed=2)
    by_name = c(**inputs)
    by_position = c(*inputs.values())
    torch.testing.assert_close(by_name, by_position, rtol=0, atol=0)
    with pytest.raises(superopt.SuperoptError, match="input 'w' must be a float16"):
        c(**{**inputs, "w": inputs["w"].float()})
    with pytest.raises(superopt.SuperoptError, match="inputs missing: b"):
        c(inputs["x"], inputs["w"], inputs["a"])


def test_cpu_use_needs_no_setup(tmp_path):
    """A fresh process without TRITON_INTERPRET: the first run on CPU tensors switches the interpreter on; had
    triton been imported for the GPU first, it says so in one line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"SUPEROPT_CACHE_DIR": str(tmp_path)}
    code = (
        "import os, superopt, torch\n"
        "from superopt.kernels import compile\n"
        "g = superopt.Graph('t'); x = g.input('x', (4, 32), 'float32'); g.output(g.exp(x))\n"
        "x = torch.randn(4, 32)\n"
        "assert torch.allclose(compile(g)(x)[0], x.exp())\n"
        "assert os.environ['TRITON_INTERPRET'] == '1'\n"
    )
    late = code.replace("import os,", "import triton, os,")
    if torch.cuda.is_available():
        pytest.skip("with a GPU, CPU tensors run on it instead")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "set TRITON_INTERPRET=1 before importing triton" in proc.stderr


def test_full_size_fused_kernels_compile_for_hopper(tmp_path):
    """Triton's ahead-of-time compile for sm_90 (no GPU needed) of every full-size fused kernel: each fits in
    the H100's shared memory, and the attention kernels use Hopper's warpgroup MMA."""
    code = (
        "import sys, importlib.util\n"
        "from superopt.kernels import compile, get_device\n"
        f"spec = importlib.util.spec_from_file_location('f', {str(EXAMPLES / 'fused.py')!r})\n"
        "fused = importlib.util.module_from_spec(spec); spec.loader.exec_module(fused)\n"
        "limit = get_device('h100').smem_per_block\n"
        "for name in ('rmsnorm_linear_bs8', 'gated_mlp', 'lora', 'qknorm_gqa_bs8', 'mqa_bs1'):\n"
        "    for k in compile(fused.build(name)).kernels:\n"
        "        c = k.compile_for(90)\n"
        "        assert c.metadata.shared <= limit, (k.code.name, c.metadata.shared)\n"
        "        if 'numerators' in k.code.name:\n"
        "            assert 'wgmma' in c.asm['ptx'], k.code.name\n"
        "        print(k.code.name, c.metadata.shared)\n"
    )
    stdout = compiled_for_the_gpu(code, tmp_path)
    assert stdout.count("\n") == 7  # 1 + 1 + 1 + 2 + 2 kernels
