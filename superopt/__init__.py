"""superopt: a superoptimizer for tensor programs."""

from superopt.cache import package_version
from superopt.capture import optimize
from superopt.errors import IRError, SpecError, SuperoptError
from superopt.interpret import random_inputs, run
from superopt.ir import BlockGraph, Graph, KernelGraph, Tensor, thread_graphs
from superopt.kernels import compile
from superopt.ops import OPS, TensorType
from superopt.search_space import search
from superopt.serialize import graph_hash
from superopt.spec import load
from superopt.verification import VerifyResult, verify

__version__ = package_version("superopt")

__all__ = [
    "OPS",
    "BlockGraph",
    "Graph",
    "IRError",
    "KernelGraph",
    "SpecError",
    "SuperoptError",
    "Tensor",
    "TensorType",
    "VerifyResult",
    "compile",
    "graph_hash",
    "load",
    "optimize",
    "random_inputs",
    "run",
    "search",
    "thread_graphs",
    "verify",
]
