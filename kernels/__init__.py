"""Kernels: device specs, code generation, cost model, on-device timing."""
