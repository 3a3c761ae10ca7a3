"""Device specs: the published limits and peak rates of the GPUs superopt targets.

The cost model and the search read these (shared memory and threads bound the block graphs; bandwidth and
FLOP rates price them). Rates are datasheet peaks, dense (no 2:4 sparsity), tensor-core rates with float32
accumulation; the cost model applies its own achievable fractions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from superopt.errors import SuperoptError

KB = 1024
MB = 1024 * 1024
T = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sm_count: int
    smem_per_block: int  # bytes a block may use after opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)
    smem_per_sm: int  # bytes
    regs_per_sm: int  # 32-bit registers
    max_regs_per_thread: int
    max_threads_per_block: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    l2_bytes: int
    dram_bytes_per_s: float
    tensor_flops: dict[str, float] = field(hash=False)  # dtype -> dense FLOP/s on tensor cores (fp32 accumulate)
    cuda_core_flops: dict[str, float] = field(hash=False)  # dtype -> FLOP/s on CUDA cores (an FMA is 2)
    launch_overhead_us: float = 2.0  # one kernel boundary: launch, ramp-up and tail, as seen under CUDA graphs
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)


# Per-SM limits by compute capability: CUDA C++ Programming Guide, "Compute Capabilities", table
# "Technical Specifications per Compute Capability" (8.0: A100; 8.9: L4, RTX 4090; 9.0: H100, H200).
_SM80 = dict(smem_per_block=163 * KB, smem_per_sm=164 * KB, max_threads_per_sm=2048, max_blocks_per_sm=32)
_SM89 = dict(smem_per_block=99 * KB, smem_per_sm=100 * KB, max_threads_per_sm=1536, max_blocks_per_sm=24)
_SM90 = dict(smem_per_block=227 * KB, smem_per_sm=228 * KB, max_threads_per_sm=2048, max_blocks_per_sm=32)
_COMMON = dict(regs_per_sm=65536, max_regs_per_thread=255, max_threads_per_block=1024)

# H100 SXM5 rates: NVIDIA H100 Tensor Core GPU datasheet and "NVIDIA H100 Tensor Core GPU Architecture"
# whitepaper (v1.0x), table 3 (SXM5: 132 SMs, 50 MB L2, 3.35 TB/s HBM3; FP16/BF16 tensor 989.4 TFLOPS dense,
# TF32 494.7; FP32 66.9, FP16/BF16 non-tensor 133.8).
_H100_TENSOR = {"float16": 989.4 * T, "bfloat16": 989.4 * T, "float32": 494.7 * T}
_H100_CUDA = {"float16": 133.8 * T, "bfloat16": 133.8 * T, "float32": 66.9 * T}

DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec(
        name="h100",
        sm_count=132,
        **_SM90,
        **_COMMON,
        l2_bytes=50 * MB,
        dram_bytes_per_s=3.35 * T,
        tensor_flops=_H100_TENSOR,
        cuda_core_flops=_H100_CUDA,
    ),
    # H200 SXM: NVIDIA H200 Tensor Core GPU datasheet: the H100 SXM's GH100 die and rates, 141 GB HBM3e at
    # 4.8 TB/s; torch reports 60 MB of L2 on the lent H200 (device KINDS.md, 2026-10-28).
    "h200": DeviceSpec(
        name="h200",
        sm_count=132,
        **_SM90,
        **_COMMON,
        l2_bytes=60 * MB,
        dram_bytes_per_s=4.8 * T,
        tensor_flops=_H100_TENSOR,
        cuda_core_flops=_H100_CUDA,
    ),
    # A100 80GB SXM: NVIDIA A100 Tensor Core GPU datasheet and "NVIDIA A100 Tensor Core GPU Architecture"
    # whitepaper, table 1 (108 SMs, 40 MB L2, 2039 GB/s HBM2e; FP16/BF16 tensor 312 TFLOPS dense, TF32 156;
    # FP32 19.5, FP16 non-tensor 78, BF16 non-tensor 39).
    "a100": DeviceSpec(
        name="a100",
        sm_count=108,
        **_SM80,
        **_COMMON,
        l2_bytes=40 * MB,
        dram_bytes_per_s=2.039 * T,
        tensor_flops={"float16": 312 * T, "bfloat16": 312 * T, "float32": 156 * T},
        cuda_core_flops={"float16": 78 * T, "bfloat16": 39 * T, "float32": 19.5 * T},
    ),
    # L4: NVIDIA L4 Tensor Core GPU datasheet (FP16/BF16 tensor 242 TFLOPS with sparsity = 121 dense, TF32 60
    # dense, FP32 30.3, 300 GB/s GDDR6) and "NVIDIA Ada GPU Architecture" whitepaper (AD104: 58 SMs, 48 MB L2;
    # Ada's FP16 non-tensor rate equals its FP32 rate).
    "l4": DeviceSpec(
        name="l4",
        sm_count=58,
        **_SM89,
        **_COMMON,
        l2_bytes=48 * MB,
        dram_bytes_per_s=300e9,
        tensor_flops={"float16": 121 * T, "bfloat16": 121 * T, "float32": 60 * T},
        cuda_core_flops={"float16": 30.3 * T, "bfloat16": 30.3 * T, "float32": 30.3 * T},
    ),
    # RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix table (AD102 as shipped: 128 SMs, 72 MB L2,
    # 1008 GB/s GDDR6X; FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense, TF32 82.6; FP32 82.6).
    "rtx4090": DeviceSpec(
        name="rtx4090",
        sm_count=128,
        **_SM89,
        **_COMMON,
        l2_bytes=72 * MB,
        dram_bytes_per_s=1008e9,
        tensor_flops={"float16": 165.2 * T, "bfloat16": 165.2 * T, "float32": 82.6 * T},
        cuda_core_flops={"float16": 82.6 * T, "bfloat16": 82.6 * T, "float32": 82.6 * T},
    ),
}

# torch.cuda.get_device_name() substrings -> table key; the first match wins, so variants with other
# limits (H100 PCIe/NVL, A100 40GB/PCIe) are listed as None before the general pattern.
_NAME_PATTERNS: tuple[tuple[str, str | None], ...] = (
    ("H100 PCIe", None),
    ("H100 NVL", None),
    ("H100", "h100"),
    ("H200", "h200"),
    ("A100-PCIE", None),
    ("A100-SXM4-40GB", None),
    ("A100", "a100"),
    ("L40", None),
    ("L4", "l4"),
    ("RTX 4090", "rtx4090"),
)


def get_device(name: str) -> DeviceSpec:
    """The spec of a known device by its table name (case-insensitive)."""
    spec = DEVICES.get(name.lower())
    if spec is None:
        raise SuperoptError(f"unknown device '{name}' (known: {', '.join(DEVICES)})")
    return spec


def spec_for_name(device_name: str) -> DeviceSpec | None:
    """The table spec for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if not in the table."""
    for pattern, key in _NAME_PATTERNS:
        if pattern.lower() in device_name.lower():
            return None if key is None else DEVICES[key]
    return None


def detect() -> DeviceSpec | None:
    """The spec of the current CUDA device, or None without a GPU (or, with a warning, for a GPU not in the
    table). SM count and L2 size are read off the device, so a partitioned GPU is priced as it is."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    spec = spec_for_name(props.name)
    if spec is None:
        warnings.warn(f"no device spec for '{props.name}' (known: {', '.join(DEVICES)})", stacklevel=2)
        return None
    return replace(spec, sm_count=props.multi_processor_count, l2_bytes=getattr(props, "L2_cache_size", spec.l2_bytes))
