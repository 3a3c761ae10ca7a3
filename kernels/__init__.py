"""Kernels: device specs, code generation, cost model, on-device timing."""

from pathlib import Path

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.device import DEVICES, DeviceSpec, detect, get_device
from superopt.kernels.triton_codegen import CompiledGraph, compile_triton

BACKENDS = {"triton": compile_triton}


def compile(graph: KernelGraph, backend: str = "triton", module_dir: str | Path | None = None) -> CompiledGraph:
    """`graph` as GPU kernels: a callable taking torch tensors and returning the tuple of outputs (see
    CompiledGraph). Generated modules are written to `module_dir` (default: the default cache's kernel folder,
    `Cache().kernel_dir`)."""
    if backend not in BACKENDS:
        raise SuperoptError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[backend](graph, Path(module_dir) if module_dir is not None else None)


__all__ = ["DEVICES", "CompiledGraph", "DeviceSpec", "compile", "detect", "get_device"]
