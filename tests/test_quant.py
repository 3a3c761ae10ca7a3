"""Quantized weights: quantize -> dequant against numpy bit for bit, the dequant op in every interpretation, a
dequant-fused GEMV verified against its program, and the mutants a kernel author could write rejected."""

from __future__ import annotations

import copy
import shutil
import subprocess
from importlib import resources

import numpy as np
import pytest
import torch
from graphs import dequant_gemv
from mutants import DEQUANT_DIMS, clearly_different

import superopt
from superopt.errors import SpecError, SuperoptError
from superopt.interpret import random_inputs
from superopt.kernels.cost import floor, predict
from superopt.kernels.cuda_codegen import emit_dequant
from superopt.kernels.device import get_device
from superopt.kernels.triton_codegen import compile_triton
from superopt.quant import dequantize, pack_int4, quantize
from superopt.serialize import from_json, graph_hash, to_json
from superopt.spec import parse_spec
from superopt.verification import verify

NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


# --- an independent numpy implementation of the documented semantics ------------------------------------------


def np_round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 x rounded to `dtype` (to nearest even), as float32; bf16 (numpy has none) on the bits."""
    x = x.astype(np.float32)
    if dtype != torch.bfloat16:
        return x.astype(NUMPY[dtype]).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def np_quantize(w: np.ndarray, bits: int, group: int, symmetric: bool, dtype: torch.dtype):
    qmin, qmax = (-8, 7) if bits == 4 else (-128, 127)
    g = w.astype(np.float32).reshape(*w.shape[:-1], -1, group)
    if symmetric:
        spread = np.abs(g).max(-1) / np.float32(qmax)
    else:
        low, high = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        spread = (high - low) / np.float32(qmax - qmin)
    scale = np_round_to(spread, dtype)
    scale[scale == 0] = 1
    zero = None
    q = np.round(g / scale[..., None])
    if not symmetric:
        zero = np_round_to(np.clip(qmin - np.round(low / scale), qmin, qmax), dtype)
        q = q + zero[..., None]
    return np.clip(q, qmin, qmax).astype(np.int64).reshape(w.shape), scale, zero


def np_pack(values: np.ndarray, high_first: bool) -> np.ndarray:
    nib = values & 15
    first, second = (nib[..., 1::2], nib[..., 0::2]) if high_first else (nib[..., 0::2], nib[..., 1::2])
    return (first + 16 * second).astype(np.uint8)


def np_values(q: np.ndarray, bits: int, high_first: bool) -> np.ndarray:
    """Signed values from int8 q, or from int4 bytes: nibble arithmetic written out."""
    if bits == 8:
        return q.astype(np.int64)
    low, high = q.astype(np.int64) % 16, q.astype(np.int64) // 16
    first, second = (high, low) if high_first else (low, high)
    out = np.empty(q.shape[:-1] + (2 * q.shape[-1],), dtype=np.int64)
    out[..., 0::2], out[..., 1::2] = first, second
    return np.where(out >= 8, out - 16, out)


def np_dequant(values: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, group: int, dtype: torch.dtype):
    s = np.repeat(scale.astype(np.float32), group, -1)
    v = values.astype(np.float32)
    if zero is not None:
        v = v - np.repeat(zero.astype(np.float32), group, -1)
    return np_round_to(v * s, dtype)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normal weights with outliers, an all-zero group and an all-positive one."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(4).mul(20).add(0.1)
    w[0, :8] = 0
    w[1, :8] = w[1, :8].abs() + 1
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,high_first", [(8, False), (4, False), (4, True)])
def test_quantize_then_dequant_equals_numpy_bit_for_bit(bits, high_first, symmetric, dtype):
    w = weights((6, 64), seed=bits)
    q, scale, zero = quantize(w, bits, 8, symmetric=symmetric, dtype=dtype, high_first=high_first)
    values, np_scale, np_zero = np_quantize(w.numpy(), bits, 8, symmetric, dtype)
    want_q = np_pack(values, high_first) if bits == 4 else values.astype(np.int8)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8) and np.array_equal(q.numpy(), want_q)
    assert scale.dtype == dtype and np.array_equal(as_np(scale), np_scale)
    assert (zero is None) == symmetric and (symmetric or np.array_equal(as_np(zero), np_zero))
    got = dequantize(q, scale, zero, 8, high_first)  # the IR's dequant, by the reference interpreter
    want = np_dequant(np_values(want_q, bits, high_first), np_scale, np_zero, 8, dtype)
    assert got.dtype == dtype and np.array_equal(as_np(got).view(np.uint32), want.view(np.uint32))
    # round to nearest: within half a step of every weight (plus the stored scale's rounding)
    step = np.repeat(np_scale, 8, -1)
    assert np.abs(as_np(got) - w.numpy()).max() / step.max() <= 0.5 + 2**-6


def test_dequant_reads_the_documented_nibbles():
    """Byte 0x21 holds 1 then 2; 0x8F holds -1 (15) then -8 (8); high_first swaps them."""
    q = torch.tensor([[0x21, 0x8F]], dtype=torch.uint8)
    one = torch.ones(1, 1)
    assert dequantize(q, one, None, 4).tolist() == [[1, 2, -1, -8]]
    assert dequantize(q, one, None, 4, high_first=True).tolist() == [[2, 1, -8, -1]]
    assert dequantize(q, one * 2, one * 3, 4).tolist() == [[-4, -2, -8, -22]]
    assert pack_int4(torch.tensor([[1, 2, -1, -8]])).tolist() == [[0x21, 0x8F]]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: quantize(torch.ones(2, 12), 4, 8), "does not split into groups of 8"),
        (lambda: quantize(torch.ones(2, 9), 4, 3), "int4 packs two values a byte"),
        (lambda: quantize(torch.ones(2, 8), 3, 4), "bits must be 4 or 8"),
        (lambda: quantize(torch.ones(2, 8), 8, 0), "group must be a positive integer"),
        (lambda: quantize(torch.ones(2, 8), 8, True), "group must be a positive integer"),
        (lambda: quantize(torch.full((2, 8), float("nan")), 8, 4), "NaN"),
        (lambda: quantize(torch.ones(2, 8, dtype=torch.int32), 8, 4), "float tensor"),
        (lambda: pack_int4(torch.tensor([[8, 0]])), "-8..7"),
    ],
)
def test_quantize_refuses_bad_input_in_one_line(call, message):
    with pytest.raises(SuperoptError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


# --- the IR: shapes, dtypes, specs, JSON ------------------------------------------------------------------------

SPEC = """
name: qgemv
dims: {N: 8, K: 32, KB: 16, S: 4, B: 2}
inputs:
  q: {shape: [N, KB], dtype: int4}
  s: {shape: [N, S], dtype: bfloat16}
  z: {shape: [N, S], dtype: bfloat16}
  x: {shape: [K, B], dtype: bfloat16}
ops:
  - w = dequant(q, s, zero=z, group=8)
  - y = matmul(w, x)
outputs: [y]
"""


def test_spec_json_and_hash_keep_dequant():
    g = parse_spec(SPEC)
    assert str(g.tensors["w"]) == "bfloat16[8, 32]" and g.ops[0].inputs == ("q", "s", "z")
    back = from_json(to_json(g))
    assert str(back) == str(g) and graph_hash(back) == graph_hash(g)
    others = [SPEC.replace("group=8", "group=8, high_first=True"), SPEC.replace("zero=z, ", "")]
    others.append(SPEC.replace("group=8", "group=4").replace("S: 4", "S: 8"))
    assert len({graph_hash(g), *(graph_hash(parse_spec(text)) for text in others)}) == 4


@pytest.mark.parametrize(
    "edit,message",
    [
        (("group=8", "group=3"), "does not split into groups of 3"),
        (("group=8", "group=16"), "needs 2 scales, scale has 4"),
        (("group=8", "group=0"), "group must be >= 1"),
        (("group=8", "group=8.0"), "'group' must be int"),
        (("group=8", "group=True"), "'group' must be int"),
        (("zero=z, group=8", "group=8, high_first=1"), "'high_first' must be bool"),
        (("dtype: int4}", "dtype: int3}"), "bad dtype 'int3'"),
        (("z: {shape: [N, S]", "z: {shape: [N, K]"), "zero bfloat16\\[8, 32\\] must have the scale's type"),
        (("y = matmul(w, x)", "y = matmul(q, x)"), "only dequant reads those"),
        (("w = dequant(q, s", "w = dequant(s, s"), "q must be int8 or int4"),
        (("dtype: int4}", "dtype: int8}"), "needs 4 scales|a row of 16 values"),
    ],
)
def test_bad_dequant_specs_fail_in_one_line(edit, message):
    with pytest.raises(SpecError, match=message) as e:
        parse_spec(SPEC.replace(*edit))
    assert "\n" not in str(e.value)


def test_run_refuses_an_integer_input_of_another_dtype():
    g = parse_spec(SPEC)
    inputs = random_inputs(g)
    with pytest.raises(SuperoptError, match="'q' .* must be a torch.uint8 tensor"):
        superopt.run(g, inputs | {"q": inputs["q"].float()})


# --- verification of the dequant-fused GEMV, and its mutants --------------------------------------------------


def np_gemv(inputs: dict[str, torch.Tensor], bits: int, group: int) -> np.ndarray:
    """The program in float64, from numpy's dequant (no rounding: float64 throughout)."""
    values = np_values(inputs["q"].numpy(), bits, False).astype(np.float64)
    s = np.repeat(inputs["scale"].double().numpy(), group, -1)
    z = np.repeat(inputs["zero"].double().numpy(), group, -1) if "zero" in inputs else 0.0
    return ((values - z) * s) @ inputs["x"].double().numpy()


@pytest.mark.parametrize("q_dtype", ["int4", "int8"])
@pytest.mark.parametrize("zero", [True, False])
def test_fused_gemv_is_verified_and_computes_the_program(q_dtype, zero):
    program, fused = dequant_gemv(DEQUANT_DIMS, q_dtype, zero)
    result = verify(program, fused, seed=7)
    assert result.equivalent is True and result.method in ("tested", "proved"), result
    inputs = random_inputs(program, seed=1)
    want = np_gemv(inputs, 4 if q_dtype == "int4" else 8, DEQUANT_DIMS["G"])
    for graph in (program, fused):
        (got,) = superopt.run(graph, inputs, "float64")
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def _mutated(fused: superopt.KernelGraph, edit) -> superopt.KernelGraph:
    doc = copy.deepcopy(to_json(fused))
    block = doc["ops"][0]["block"]
    edit(block, next(op for op in block["ops"] if op["op"] == "dequant"))
    return from_json(doc)


def _wrong_group(block, dq):
    """Each iteration sees the whole row of scales, read as groups CHUNKS times smaller."""
    block["inputs"][1]["fmap"] = block["inputs"][2]["fmap"] = None
    dq["attrs"]["group"] //= DEQUANT_DIMS["CHUNKS"]


def _wrong_axis(block, dq):
    """The scale read transposed: its tile split along K by the grid and along N by the loop."""
    block["inputs"][1]["imap"], block["inputs"][1]["fmap"] = [1], 0


MUTANTS = {
    "wrong group size": _wrong_group,
    "swapped nibbles": lambda block, dq: dq["attrs"].update(high_first=True),
    "scale on the wrong axis": _wrong_axis,
    "missing zero point": lambda block, dq: dq["inputs"].pop(2),
}


@pytest.mark.parametrize("kind", sorted(MUTANTS))
def test_dequant_mutants_are_rejected(kind):
    program, fused = dequant_gemv(DEQUANT_DIMS, "int4")
    bad = _mutated(fused, MUTANTS[kind])
    assert clearly_different(program, bad)  # the float64 oracle agrees that it is wrong
    result = verify(program, bad, seed=11)
    assert result.equivalent is False and result.method == "tested", result


# --- Triton (under the interpreter), CUDA, cost ---------------------------------------------------------------


@pytest.mark.parametrize("high_first", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_triton_dequant_kernel_equals_the_reference_bit_for_bit(dtype, high_first):
    g = superopt.Graph("dq")
    q, s, z = g.input("q", (6, 40), "int4"), g.input("s", (6, 10), dtype), g.input("z", (6, 10), dtype)
    g.output(g.dequant(q, s, z, group=8, high_first=high_first))
    inputs = random_inputs(g, seed=3)
    (want,) = superopt.run(g, inputs)  # native: float32, rounded to the dtype
    (got,) = compile_triton(g)(*inputs.values())
    bits = torch.int32 if dtype == "float32" else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("q_dtype", ["int4", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_fused_gemv_matches_float64(q_dtype, dtype):
    dims = {"N": 64, "K": 256, "B": 2, "G": 32, "ROWS": 16, "CHUNKS": 4}
    program, fused = dequant_gemv(dims, q_dtype, zero=True, dtype=dtype, high_first=False)
    inputs = random_inputs(program, seed=5)
    want = np_gemv(inputs, 4 if q_dtype == "int4" else 8, dims["G"])
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    for graph in (fused, program):
        (got,) = compile_triton(graph)(*inputs.values())
        error = np.abs(got.double().numpy() - want).max() / np.abs(want).max()
        assert error < tolerance, (graph.ops[0].op, error)


def test_cost_counts_packed_weight_and_scale_bytes():
    dims = {"N": 4096, "K": 4096, "B": 1, "G": 128, "ROWS": 64, "CHUNKS": 16}
    device = get_device("h100")
    costs = {}
    for q_dtype in ("int4", "int8"):
        program, fused = dequant_gemv(dims, q_dtype, zero=True, dtype="bfloat16")
        scales = 2 * 4096 * (4096 // 128) * 2  # scale and zero, bf16
        vectors = (4096 + 4096) * 2  # x and y
        weight = 4096 * 4096 // (2 if q_dtype == "int4" else 1)
        assert floor(program, device).dram_bytes == weight + scales + vectors
        costs[q_dtype] = predict(fused, device)
        assert predict(program, device).us > costs[q_dtype].us  # the dequantized weight written and read back
    assert costs["int4"].dram_bytes < costs["int8"].dram_bytes


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("q_dtype,dtype", [("int4", "bfloat16"), ("int8", "float32")])
def test_cuda_dequant_compiles(tmp_path, q_dtype, dtype):
    program, _ = dequant_gemv(DEQUANT_DIMS, q_dtype, zero=True, dtype=dtype, high_first=q_dtype == "int4")
    function = emit_dequant(program, program.ops[0], "dequant_w")
    prelude = resources.files("superopt.kernels.megakernel").joinpath("prelude.cuh").read_text()
    kinds = "const unsigned char*" if q_dtype == "int4" else "const signed char*"
    element = "const u16*" if dtype == "bfloat16" else "const float*"
    kernel = (
        f'extern "C" __global__ void run({kinds} q, {element} s, {element} z, float* out) {{\n'
        f"  out[threadIdx.x] = dequant_w(q, s, z, blockIdx.x, threadIdx.x);\n}}\n"
    )
    src = tmp_path / "dequant.cu"
    constants = "#define NCONSUMERS 128\n"  # the megakernel's consumer threads, which the prelude's reductions use
    src.write_text(constants + prelude + "\n" + function + "\n" + kernel)
    done = subprocess.run(
        ["nvcc", "-arch=sm_90a", "-c", "-o", str(tmp_path / "dequant.o"), str(src)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
