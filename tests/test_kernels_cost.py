"""The device table and the cost model, against hand-derived numbers."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from graphs import import_fused

import superopt
from superopt.kernels import cost
from superopt.kernels.cost import FLOPS, floor, kernel_cost, predict
from superopt.kernels.device import DEVICES, detect, get_device, spec_for_name
from superopt.kernels.lower import UNROLL_LIMIT
from superopt.ops import missing_rules

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
H100 = get_device("h100")


fused = import_fused()


# --- devices ---------------------------------------------------------------------------------------------------


def test_device_table_lookups():
    assert set(DEVICES) == {"h100", "h200", "a100", "l4", "rtx4090"}
    assert get_device("H100") is DEVICES["h100"]
    assert (H100.sm_count, H100.l2_bytes, H100.smem_per_block) == (132, 50 * 2**20, 227 * 1024)
    assert H100.tensor_flops["float16"] == pytest.approx(989.4e12)
    h200 = get_device("h200")
    assert h200.dram_bytes_per_s > H100.dram_bytes_per_s and h200.tensor_flops == H100.tensor_flops
    for spec in DEVICES.values():
        assert spec.smem_per_block <= spec.smem_per_sm
        assert spec.max_threads_per_block <= spec.max_threads_per_sm
        assert set(spec.tensor_flops) == set(spec.cuda_core_flops) == {"float16", "bfloat16", "float32"}
        assert all(spec.tensor_flops[d] >= spec.cuda_core_flops[d] for d in spec.tensor_flops)


def test_unknown_device_lists_the_known():
    with pytest.raises(
        superopt.SuperoptError, match="unknown device 'v100' \\(known: h100, h200, a100, l4, rtx4090\\)"
    ):
        get_device("v100")


@pytest.mark.parametrize(
    "cuda_name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", None),  # other SM count and bandwidth than the SXM part
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-SXM4-40GB", None),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_cuda_device_names(cuda_name, key):
    assert spec_for_name(cuda_name) == (None if key is None else DEVICES[key])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_detect_without_gpu():
    assert detect() is None


# --- the cost model --------------------------------------------------------------------------------------------


def test_every_op_has_a_flop_rule():
    assert missing_rules(FLOPS) == ["graph_def"]


def test_argmax_writes_float32_indices_and_costs_a_select_more_than_max():
    """Greedy decoding's argmax over bf16 logits (8, 32768): one block a row reads it once (2 bytes an element)
    and writes a float32 index (4 bytes, where max writes 2); max and a select of the index per element (2
    instructions, FMA-counted 2 FLOPs each), plus the identity accum_sum of lowering per output element."""
    rows, vocab = 8, 32768
    kernels = {}
    for op in ("argmax", "max"):
        g = superopt.Graph(op)
        g.output(g.op(op, g.input("logits", (rows, vocab), "bfloat16"), dim=1))
        (kernels[op],) = predict(g, H100).kernels
    k = kernels["argmax"]
    assert k.blocks == rows and k.dram_bytes == rows * vocab * 2 + rows * 4
    assert kernels["max"].dram_bytes == rows * vocab * 2 + rows * 2
    assert k.cuda_flops == 2 * 2 * rows * vocab + 2 * rows
    assert kernels["max"].cuda_flops == 2 * rows * vocab + 2 * rows


def _matmul(m: int, k: int, n: int) -> superopt.KernelGraph:
    g = superopt.Graph("mm")
    g.output(g.matmul(g.input("x", (m, k)), g.input("w", (k, n))))
    return g


def test_plain_matmul_bytes_and_flops():
    # 64-wide tiles: a grid of 4 column blocks, each reading all of x (64 KB, which L2 serves after the first).
    (k,) = predict(_matmul(64, 512, 256), H100).kernels
    assert k.blocks == 4
    assert k.dram_bytes == 2 * (64 * 512 + 512 * 256 + 64 * 256)
    assert k.tensor_flops == 2 * 64 * 512 * 256
    # without L2, every column block reads x again
    (k,) = predict(_matmul(64, 512, 256), replace(H100, l2_bytes=0)).kernels
    assert k.dram_bytes == 2 * (4 * 64 * 512 + 512 * 256 + 64 * 256)


def _row_sums(rows: int, cols: int, grid: int, split: bool) -> superopt.KernelGraph:
    """Row sums of 2 * w, w (rows, cols) fp16: the grid splits w's rows, or each block reads all of w (and
    writes its own column of a (rows, grid) output)."""
    g = superopt.Graph("row_sums")
    w = g.input("w", (rows, cols))
    b = g.block_graph(grid=(grid,), forloop_range=8)
    wt = b.input(w, (0 if split else None,), fmap=1)
    b.output(b.accum_sum_last(b.mul_scalar(wt, 2.0)), omap=(0 if split else 1,))
    g.output(g.graph_def(b)[0])
    return g


def test_replication_multiplies_bytes_beyond_l2():
    rows, cols = 4096, 4096  # 32 MB: more than the H100's L2 share
    w_bytes = rows * cols * 2
    (split,) = predict(_row_sums(rows, cols, 4, split=True), H100).kernels
    (replicated,) = predict(_row_sums(rows, cols, 4, split=False), H100).kernels
    assert split.dram_bytes == w_bytes + rows * 2
    assert replicated.dram_bytes == 4 * w_bytes + rows * 4 * 2
    assert replicated.us > 3 * split.us


def test_fused_rmsnorm_linear_beats_unfused():
    for device in ("h100", "a100"):
        for name in ("rmsnorm_linear_bs1", "rmsnorm_linear_bs8"):
            spec = superopt.load(EXAMPLES / f"{name}.yaml")
            fused_cost = predict(fused.build(name), get_device(device))
            unfused_cost = predict(spec, get_device(device))
            assert len(unfused_cost.kernels) == 2 and len(fused_cost.kernels) == 1
            assert fused_cost.us < unfused_cost.us, (device, name)


def test_tiles_over_the_shared_memory_limit_are_infeasible():
    """The fused forms' tiles are the H100's best (3 stages of 64x256 + 2x256 fp16 = 120 KB of shared memory);
    an L4 gives a block at most 99 KB, so there the same µGraph cannot run."""
    (kernel,) = predict(fused.build("rmsnorm_linear_bs1"), get_device("l4")).kernels
    assert kernel.smem_bytes > get_device("l4").smem_per_block and not kernel.feasible
    assert predict(fused.build("rmsnorm_linear_bs1"), get_device("l4")).us == math.inf


def test_wave_quantization():
    """One block more than the SMs doubles the busiest SM's work; twice as many blocks take just as long."""

    def tensor_us(rows: int) -> float:
        g = _matmul(rows * 64, 256, 64)
        (k,) = predict(g, H100).kernels
        assert k.blocks == rows
        return k.tensor_us

    one_wave = tensor_us(132)
    assert tensor_us(133) == pytest.approx(2 * one_wave)
    assert tensor_us(264) == pytest.approx(2 * one_wave)


def test_large_copy_runs_at_bandwidth():
    g = superopt.Graph("copy")
    g.output(g.mul_scalar(g.input("x", (16384, 8192)), 1.0))
    (k,) = predict(g, H100).kernels
    assert k.dram_bytes == 2 * 16384 * 8192 * 2
    assert k.memory_us == pytest.approx(k.dram_bytes / (H100.dram_bytes_per_s * cost.DRAM_EFFICIENCY) * 1e6, rel=0.01)


def _gemv(blocks: int, chunks: int) -> superopt.KernelGraph:
    """x (16, 4096) @ w (4096, 64 * blocks): block n streams w's 64 columns n in `chunks` iterations."""
    g = superopt.Graph("gemv")
    x, w = g.input("x", (16, 4096)), g.input("w", (4096, 64 * blocks))
    b = g.block_graph(grid=(blocks,), forloop_range=chunks)
    b.output(b.accum_sum(b.matmul(b.input(x, (None,), fmap=1), b.input(w, (1,), fmap=0))), omap=(1,))
    g.output(g.graph_def(b)[0])
    return g


def test_a_block_streams_its_tiles_at_a_limited_rate():
    """96 blocks of a GEMV, one an SM: w's tiles (the stream only its block reads; x, which every block reads,
    comes from L2) arrive at BLOCK_STREAM_BYTES_PER_S, under the 96 SMs' share of the bandwidth."""
    (k,) = predict(_gemv(96, 16), H100).kernels
    w_bytes = 4096 * 64 * 2
    assert H100.dram_bytes_per_s * cost.DRAM_EFFICIENCY / 96 > cost.BLOCK_STREAM_BYTES_PER_S
    assert k.memory_us == pytest.approx(k.dram_bytes / 96 / cost.BLOCK_STREAM_BYTES_PER_S * 1e6)
    assert k.dram_bytes == 96 * w_bytes + 16 * 4096 * 2 + 16 * 64 * 96 * 2


def test_each_round_of_resident_blocks_fills_its_pipeline():
    """A memory latency per round of blocks an SM runs one after another: 132 blocks fit in one round,
    but more blocks than fit at once on the busiest SM take another."""
    (one,) = predict(_gemv(132, 64), H100).kernels
    assert one.resident_blocks >= 1 and one.fill_us == pytest.approx(cost.MEMORY_LATENCY_S * 1e6)
    blocks = 132 * (one.resident_blocks + 1)
    (two,) = predict(_gemv(blocks, 64), H100).kernels
    assert two.resident_blocks == one.resident_blocks
    assert two.fill_us == pytest.approx(2 * cost.MEMORY_LATENCY_S * 1e6)
    assert two.us == pytest.approx(max(two.memory_us, two.tensor_us, two.cuda_us, two.latency_us) + two.fill_us)


def test_block_that_does_not_fit_is_infeasible():
    g = superopt.Graph("huge")
    x, w = g.input("x", (512, 4096)), g.input("w", (4096, 512))
    b = g.block_graph(grid=(1,), forloop_range=16)  # 512 x 256 and 256 x 512 fp16 tiles, pipelined 3 deep
    b.output(b.accum_sum(b.matmul(b.input(x, (None,), fmap=1), b.input(w, (None,), fmap=0))), omap=(None,))
    g.output(g.graph_def(b)[0])
    (k,) = predict(g, H100).kernels
    assert k.smem_bytes == cost.NUM_STAGES * 2 * (512 * 256 * 2) > H100.smem_per_block
    assert not k.feasible and k.us == math.inf and predict(g, H100).us == math.inf


@pytest.mark.parametrize("splits", [16, 32])
def test_short_loop_without_matmul_is_unrolled_into_one_latency(splits):
    """A combine loop (sum of partials over splits) up to UNROLL_LIMIT iterations issues all its loads at once:
    one iteration's latency; a longer one waits ITERATION_US per iteration."""
    g = superopt.Graph("combine")
    b = g.block_graph(grid=(1,), forloop_range=splits)
    b.output(b.accum_sum(b.input(g.input("partials", (splits * 16, 64)), (None,), fmap=0)), omap=(None,))
    g.output(g.graph_def(b)[0])
    (k,) = predict(g, H100).kernels
    chain = 1 if splits <= UNROLL_LIMIT else splits
    assert k.latency_us == pytest.approx(chain * cost.ITERATION_US)


@pytest.mark.parametrize("rows", [8, 256])
def test_a_thread_with_more_registers_runs_a_longer_chain(rows):
    """A 32-iteration loop (not unrolled) of exp and accum_sum over (rows, 128) tiles: its latency is 32 iteration
    chains, each longer by registers / CHAIN_REGISTERS where the estimate exceeds it (a thread holds the sum's
    state and exp's operand and result: 3 x 128 values a row over 128 threads; 800 registers at 256 rows)."""
    g = superopt.Graph("sum_exp")
    b = g.block_graph(grid=(1,), forloop_range=32)
    b.output(b.accum_sum(b.exp(b.input(g.input("x", (rows, 128 * 32)), (None,), fmap=1))), omap=(None,))
    g.output(g.graph_def(b)[0])
    (k,) = predict(g, H100).kernels
    assert k.registers == cost.BASE_REGISTERS + 3 * max(16, rows)
    stretch = max(1.0, k.registers / cost.CHAIN_REGISTERS)
    assert (stretch > 1) == (rows == 256)
    assert k.latency_us == pytest.approx(32 * cost.ITERATION_US * stretch)


def test_launches_add_overhead():
    g = superopt.Graph("chain")
    x = g.input("x", (8, 64))
    g.output(g.exp(g.neg(x)))
    p = predict(g, H100)
    assert p.launch_us == 2 * H100.launch_overhead_us
    assert p.us == pytest.approx(sum(k.us for k in p.kernels) + p.launch_us)


def test_floor_of_a_program():
    spec = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml")
    f = floor(spec, H100)
    bytes_ = 2 * (2 * 4096 + 4096 * 6144 + 2 * 6144)
    assert f.dram_bytes == bytes_
    assert f.memory_us == pytest.approx(bytes_ / 3.35e12 * 1e6)
    assert f.tensor_flops == 2 * 2 * 4096 * 6144
    assert f.us == f.memory_us > f.compute_us  # memory-bound, as docs/workloads.md says
    # and the fused form's prediction stays above it
    assert predict(fused.build("rmsnorm_linear_bs1"), H100).us > f.us


def test_kernel_cost_of_a_predefined_op_is_its_lowering():
    from superopt.kernels.lower import lower

    g = _matmul(64, 512, 256)
    assert predict(g, H100).kernels[0] == kernel_cost(lower(g, g.ops[0]), H100)
