"""superopt: a superoptimizer for tensor programs."""

from superopt.errors import IRError, SpecError, SuperoptError
from superopt.interpret import random_inputs, run
from superopt.ir import BlockGraph, Graph, KernelGraph, Tensor, thread_graphs
from superopt.ops import OPS, TensorType
from superopt.optimize import optimize  # the function, which shadows its module on purpose
from superopt.serialize import graph_hash
from superopt.spec import load

__version__ = "0.1.0"

# The heavier parts (triton, z3) load on first use, so `import superopt` stays fast.
_LAZY = {
    "compile": "superopt.kernels",
    "search": "superopt.search_space",
    "verify": "superopt.verify",
    "VerifyResult": "superopt.verify",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'superopt' has no attribute '{name}'")
    import importlib

    module = importlib.import_module(_LAZY[name])
    return module if name == "verify" else getattr(module, name)


__all__ = [
    "OPS",
    "BlockGraph",
    "Graph",
    "IRError",
    "KernelGraph",
    "SpecError",
    "SuperoptError",
    "Tensor",
    "graph_hash",
    "load",
    "optimize",
    "TensorType",
    "VerifyResult",
    "compile",
    "random_inputs",
    "run",
    "search",
    "thread_graphs",
    "verify",
]
