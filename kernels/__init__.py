"""Kernels: device specs, code generation, cost model, on-device timing."""

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.device import DEVICES, DeviceSpec, detect, get_device
from superopt.kernels.triton_codegen import CompiledGraph, compile_triton

BACKENDS = {"triton": compile_triton}


def compile(graph: KernelGraph, backend: str = "triton") -> CompiledGraph:
    """`graph` as GPU kernels: a callable taking and returning torch tensors (see CompiledGraph)."""
    if backend not in BACKENDS:
        raise SuperoptError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[backend](graph)


__all__ = ["DEVICES", "CompiledGraph", "DeviceSpec", "compile", "detect", "get_device"]
