"""The analytic cost model: predicted microseconds of a µGraph on a DeviceSpec, to rank verified candidates.

Per kernel (every kernel op, predefined ones through their lowered block graphs):
- DRAM bytes: each block input is read once per block and iteration; an input not split along a grid axis is
  read again by every block along it (replication), unless it fits in its share of L2, which then serves the
  repeats. Outputs are written once.
- FLOPs: matmuls on tensor cores where codegen uses tl.dot (no dim of size 1), elsewhere on CUDA cores; other
  ops cost fp32 instructions per element (`OP_INSTRUCTIONS`). Work is counted on padded tiles, as executed.
- Occupancy: shared memory (dot operands, pipelined NUM_STAGES deep), registers (accumulator state and live
  tiles) and threads give the resident blocks per SM; a block that cannot fit makes the kernel infeasible.
- Time: the busiest SM's work (ceil(blocks / SMs) blocks: wave quantization) at its share of each rate;
  an SM reaches its bandwidth only with bandwidth x latency bytes in flight (its resident blocks' loads,
  NUM_STAGES iterations ahead, or all of an unrolled loop's), and a block streams each tile input at no more
  than BLOCK_STREAM_BYTES_PER_S. A kernel takes its largest term plus one memory latency per round of resident
  blocks (the pipeline filling); the graph sums kernels and adds one launch overhead per kernel.
The floor of a program is max(bytes of its inputs and outputs / bandwidth, its FLOPs / peak rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from superopt.ir import BlockGraph, KernelGraph
from superopt.kernels.device import DeviceSpec
from superopt.kernels.lower import lower, padded, sums_after_loop, unrolled
from superopt.ops import ACCUMULATORS, DTYPES, OPS, TensorType

# Achievable fractions of the datasheet peaks: on the lent H100, copies reach 3.0 of 3.35 TB/s and a bf16
# matmul about 800 of 989 TFLOP/s (measured there); on the H200 copies reach 4.19 of 4.8 TB/s, and the
# fastest weight-streaming GEMVs less (benchmarks/results/gemv_probe.md): 0.8 ranks the 235 candidates of
# sweep_h200.md best among 0.6-0.9.
DRAM_EFFICIENCY = 0.8
TENSOR_EFFICIENCY = 0.8
SM_BANDWIDTH_SHARE = 3.0  # one SM can draw up to 3x its even share of DRAM bandwidth
MEMORY_LATENCY_S = 1e-6  # loaded DRAM latency: an SM needs bandwidth x latency bytes in flight (Little's law)
# One block draws at most this from DRAM per tile it streams (an input loaded every iteration that no other
# block reads): the one-kernel GEMVs, one block of 4 warps an SM, ran at 15.7-16.1 GB/s a stream on the H100
# (benchmarks/results/sweep.md: rmsnorm_linear, 96 blocks, 36.5 us; gated_mlp, 64 blocks of two streams,
# 35.5 us) and 18-21 on the H200 (sweep_h200.md), under their share of the bandwidth (28-40): why split-K,
# several blocks an SM, wins (H200: 23.6 against 32.3 us for rmsnorm_linear_bs1). 18e9 ranks both sweeps'
# variants about as well as 25e9 did (Spearman 0.85 and 0.80 against 0.88 and 0.77), and ranks split-K ahead on
# the H100 too (rmsnorm_linear_bs1: 26.6 against 32.2 us; 25e9 put the one kernel at 24.0).
BLOCK_STREAM_BYTES_PER_S = 18e9
L2_SHARE = 0.5  # fraction of L2 a replicated input may occupy and still be served from it
NUM_STAGES = 3  # Triton's software pipelining depth for loads feeding tl.dot on sm_80+
LAST_DIM_SUMS = ("accum_sum_last", "accum_mean_last", "accum_rms_last")
SPILL_EXPONENT = 2  # H200: attention tiles estimated at 353 registers (255 and spills in ptxas) ran 1.2-1.3x slower
DRAM_SEGMENT = 128  # bytes: a tile row narrower than this wastes part of every DRAM burst it touches
ITERATION_US = 0.3  # a loop iteration's dependent chain per matmul in it (H100: ~0.3 us in the split-KV loop)
# ITERATION_US holds for a thread of up to this many registers; one holding more runs a proportionally longer
# chain (H200: attention with 128-row tiles, ~255 registers, ran 5-15% slower than with 64-row tiles; with any
# value from 128 to 240, mqa_bs1's fastest form is in the model's top 5 in each of three sweeps).
CHAIN_REGISTERS = 192
BASE_REGISTERS = 32  # per thread: indices, pointers, loop state
FLOPS_PER_INSTRUCTION = 2  # CUDA-core FLOP/s count an FMA as 2

# fp32 instructions per output element (per input element for reductions); the special-function unit runs
# at a quarter of the FMA rate, so exp, division and square roots cost about 4.
OP_INSTRUCTIONS: dict[str, float] = {
    "add": 1,
    "sub": 1,
    "mul": 1,
    "div": 4,
    "exp": 4,
    "silu": 7,
    "gelu": 10,
    "gelu_tanh": 10,
    "relu": 1,
    "sigmoid": 6,
    "sqrt": 4,
    "rsqrt": 4,
    "square": 1,
    "neg": 1,
    "mul_scalar": 1,
    "add_scalar": 1,
    "sum": 1,
    "max": 1,
    "argmax": 2,  # the max, and a select carrying its index
    "mean": 1,
    "rms_norm": 3,
    "layer_norm": 5,
    "rope": 3,
    "concat": 0,
    "dequant": 3,  # the value shifted out of its byte, less the zero, times the scale
    "accum_sum": 1,
    "accum_sum_last": 1,
    "accum_mean_last": 1,
    "accum_rms_last": 2,
    "accum_max": 1,
    "accum_rescaled_sum": 10,  # two exps and an FMA per element
}


def _numel(shape: tuple[int, ...], pad: bool) -> int:
    return math.prod(padded(s) if pad else s for s in shape)


def _flops_matmul(ins: list[TensorType], out: TensorType, pad: bool) -> tuple[float, float]:
    a, b = ins
    k = padded(a.shape[-1]) if pad else a.shape[-1]
    flops = 2.0 * _numel(out.shape, pad) * k
    on_tensor_cores = 1 not in (a.shape[-2], a.shape[-1], b.shape[-1])
    return (flops, 0.0) if on_tensor_cores else (0.0, flops)


def _flops_elementwise(name: str) -> Callable[[list[TensorType], TensorType, bool], tuple[float, float]]:
    def rule(ins: list[TensorType], out: TensorType, pad: bool) -> tuple[float, float]:
        # reductions and accumulators work per input element; the rest per output element
        shape = ins[0].shape if OPS[name].kind in ("reduce", "accum", "norm") else out.shape
        return 0.0, OP_INSTRUCTIONS[name] * FLOPS_PER_INSTRUCTION * _numel(shape, pad)

    return rule


# Per-op FLOP rules: rule(operand types, result type, padded) -> (tensor-core FLOPs, CUDA-core FLOPs).
FLOPS: dict[str, Callable[[list[TensorType], TensorType, bool], tuple[float, float]]] = {"matmul": _flops_matmul} | {
    name: _flops_elementwise(name) for name in OP_INSTRUCTIONS
}


@dataclass(frozen=True)
class KernelCost:
    blocks: int
    dram_bytes: float
    tensor_flops: float
    cuda_flops: float
    smem_bytes: int
    registers: int  # per thread
    resident_blocks: int  # per SM; 0 when a block does not fit
    memory_us: float
    tensor_us: float
    cuda_us: float
    latency_us: float  # the busiest SM's loop iterations, each a dependent chain
    fill_us: float  # a memory latency per round of resident blocks before their first tiles arrive

    @property
    def feasible(self) -> bool:
        return self.resident_blocks > 0

    @property
    def us(self) -> float:
        if not self.feasible:
            return math.inf
        return max(self.memory_us, self.tensor_us, self.cuda_us, self.latency_us) + self.fill_us


@dataclass(frozen=True)
class GraphCost:
    kernels: list[KernelCost]
    launch_us: float

    @property
    def us(self) -> float:
        """Predicted microseconds of the whole graph."""
        return sum(k.us for k in self.kernels) + self.launch_us

    @property
    def dram_bytes(self) -> float:
        return sum(k.dram_bytes for k in self.kernels)


def _work(block: BlockGraph) -> tuple[float, float, int, int]:
    """Per block: tensor-core and CUDA-core FLOPs, shared-memory bytes, fp32 values live per block."""
    tensor = cuda = 0.0
    smem = 0
    varying = {bi.name for bi in block.inputs if bi.fmap is not None}
    loaded = {bi.name for bi in block.inputs}
    state = live = 0
    staged: set[str] = set()
    for op in block.ops:
        ins = [block.tensors[i] for i in op.inputs]
        out = block.tensors[op.outputs[0]]
        in_loop = any(i in varying for i in op.inputs) or op.op in ACCUMULATORS
        if in_loop and op.op not in ACCUMULATORS:
            varying.add(op.outputs[0])
        runs = block.forloop_range if in_loop else 1
        t, c = FLOPS[op.op](ins, out, True)
        tensor, cuda = tensor + t * runs, cuda + c * runs
        if op.op == "matmul" and t:
            for name, ty in zip(op.inputs, ins):
                if name in staged:
                    continue
                staged.add(name)
                stages = NUM_STAGES if name in loaded and name in varying else 1
                smem += stages * _numel(ty.shape, True) * DTYPES[ty.dtype].bytes
        if op.op in ACCUMULATORS:
            elementwise = op.op in LAST_DIM_SUMS and sums_after_loop(ins[0].shape, block.block_size)
            kept = ins[0].shape if elementwise else out.shape
            state += _numel(kept, True) * (2 if op.op == "accum_rescaled_sum" else 1)
        live = max(live, _numel(out.shape, True) + sum(_numel(t.shape, True) for t in ins))
    return tensor, cuda, smem, state + live


def _burst_waste(tile: tuple[int, ...], source: TensorType) -> float:
    """How many bytes a tile's loads cost per useful byte: rows narrower than a DRAM segment waste the rest
    of it (measured on the H100: 32-byte rows run at about half the bandwidth of 128-byte rows)."""
    if tile[-1] == source.shape[-1]:
        return 1.0  # whole rows: consecutive rows are contiguous
    row = tile[-1] * DTYPES[source.dtype].bytes
    return math.sqrt(DRAM_SEGMENT / row) if row < DRAM_SEGMENT else 1.0


def kernel_cost(block: BlockGraph, device: DeviceSpec) -> KernelCost:
    """The predicted cost of one kernel running `block`."""
    blocks = math.prod(block.grid)
    dram = 0.0
    replication = {bi.name: math.prod(g for g, dim in zip(block.grid, bi.imap) if dim is None) for bi in block.inputs}
    for bi in block.inputs:
        size = bi.source.nbytes
        copies = replication[bi.name]
        size = size if copies == 1 or size <= L2_SHARE * device.l2_bytes else size * copies
        dram += size * _burst_waste(block.tensors[bi.name].shape, bi.source)
    dram += sum(block.output_type(o).nbytes for o in block.outputs)
    tensor, cuda, smem, live = _work(block)
    matmuls = sum(op.op == "matmul" for op in block.ops if not block.after_loop[op.outputs[0]])
    tensor, cuda = tensor * blocks, cuda * blocks

    threads = block.block_size
    registers = BASE_REGISTERS + math.ceil(live / threads)
    limits = [device.max_blocks_per_sm, device.max_threads_per_sm // threads]
    limits.append(device.regs_per_sm // (min(registers, device.max_regs_per_thread) * threads))
    if smem:
        limits.append(device.smem_per_sm // smem if smem <= device.smem_per_block else 0)
    resident = min(limits)

    per_sm = math.ceil(blocks / device.sm_count)  # blocks on the busiest SM
    rounds = math.ceil(per_sm / max(1, resident))  # of resident blocks, one after another
    share = per_sm / blocks  # of the kernel's work
    active = min(blocks, device.sm_count)
    bandwidth = dram_bandwidth(device)
    sm_bandwidth = min(bandwidth / active, SM_BANDWIDTH_SHARE * bandwidth / device.sm_count)
    tile_bytes = {
        bi.name: math.prod(block.tensors[bi.name].shape) * DTYPES[bi.source.dtype].bytes for bi in block.inputs
    }
    loop_bytes = sum(tile_bytes[bi.name] for bi in block.inputs if bi.fmap is not None)
    if unrolled(block):  # every iteration's loads issued at once, one memory latency for the whole loop
        ahead, chain = sum(tile_bytes.values()) + (block.forloop_range - 1) * loop_bytes, 1
    else:
        ahead = NUM_STAGES * loop_bytes if block.forloop_range > 1 else sum(tile_bytes.values())
        chain = block.forloop_range
    concurrent = max(1, min(resident, per_sm))  # blocks at once on the busiest SM
    streams = sum(bi.fmap is not None and replication[bi.name] == 1 for bi in block.inputs)
    sm_bandwidth = min(sm_bandwidth, concurrent * max(1, streams) * BLOCK_STREAM_BYTES_PER_S)
    sm_bandwidth *= min(1.0, concurrent * ahead / (sm_bandwidth * MEMORY_LATENCY_S))
    # registers beyond the cap go to local memory: every access to them is a round trip through L1/L2
    spill = max(1.0, registers / device.max_regs_per_thread) ** SPILL_EXPONENT
    dtype = next((bi.source.dtype for bi in block.inputs if not DTYPES[bi.source.dtype].integer), "float32")
    tensor_rate = device.tensor_flops[dtype] * TENSOR_EFFICIENCY / device.sm_count
    cuda_rate = device.cuda_core_flops["float32"] / device.sm_count
    return KernelCost(
        blocks=blocks,
        dram_bytes=dram,
        tensor_flops=tensor,
        cuda_flops=cuda,
        smem_bytes=smem,
        registers=registers,
        resident_blocks=resident,
        memory_us=dram * share / sm_bandwidth * spill * 1e6,
        tensor_us=tensor * share / tensor_rate * spill * 1e6,
        cuda_us=cuda * share / cuda_rate * spill * 1e6,
        latency_us=rounds * chain * ITERATION_US * max(1, matmuls) * max(1.0, registers / CHAIN_REGISTERS),
        fill_us=rounds * MEMORY_LATENCY_S * 1e6,
    )


def predict(graph: KernelGraph, device: DeviceSpec) -> GraphCost:
    """The predicted cost of running `graph` as one kernel per kernel op (math.inf if a kernel cannot fit)."""
    kernels = [kernel_cost(lower(graph, op), device) for op in graph.ops]
    return GraphCost(kernels, len(kernels) * device.launch_overhead_us)


@dataclass(frozen=True)
class Floor:
    """What no implementation beats: moving the program's inputs and outputs once, doing its FLOPs at peak."""

    dram_bytes: float
    tensor_flops: float
    cuda_flops: float
    memory_us: float
    compute_us: float

    @property
    def us(self) -> float:
        return max(self.memory_us, self.compute_us)


def program_flops(graph: KernelGraph) -> tuple[float, float]:
    """Tensor-core and CUDA-core FLOPs of `graph`'s ops on real (unpadded) shapes; block ops count per block
    and iteration they run."""
    tensor = cuda = 0.0
    for op in graph.ops:
        if op.block is None:
            t, c = FLOPS[op.op]([graph.tensors[i] for i in op.inputs], graph.tensors[op.outputs[0]], False)
            tensor, cuda = tensor + t, cuda + c
            continue
        b = op.block
        blocks = math.prod(b.grid)
        for bop in b.ops:
            runs = b.forloop_range if not b.after_loop[bop.outputs[0]] or bop.op in ACCUMULATORS else 1
            t, c = FLOPS[bop.op]([b.tensors[i] for i in bop.inputs], b.tensors[bop.outputs[0]], False)
            tensor, cuda = tensor + t * runs * blocks, cuda + c * runs * blocks
    return tensor, cuda


def dram_bandwidth(device: DeviceSpec) -> float:
    """Bytes a second a kernel can move through the device's memory (its peak times DRAM_EFFICIENCY)."""
    return device.dram_bytes_per_s * DRAM_EFFICIENCY


def floor(graph: KernelGraph, device: DeviceSpec) -> Floor:
    """The floor of `graph`'s program at the device's peak rates (use a spec with measured rates to compare
    with measured times)."""
    names = list(dict.fromkeys(graph.inputs + graph.outputs))
    dram = sum(graph.tensors[n].nbytes for n in names)
    tensor, cuda = program_flops(graph)
    dtype = next(
        (graph.tensors[n].dtype for n in graph.inputs if not DTYPES[graph.tensors[n].dtype].integer), "float32"
    )
    compute = max(tensor / device.tensor_flops[dtype], cuda / device.cuda_core_flops["float32"])
    return Floor(dram, tensor, cuda, dram / device.dram_bytes_per_s * 1e6, compute * 1e6)
