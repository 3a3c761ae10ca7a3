"""superopt: a superoptimizer for tensor programs."""

from superopt.errors import IRError, SpecError, SuperoptError
from superopt.interpret import random_inputs, run
from superopt.ir import BlockGraph, Graph, KernelGraph, Tensor, thread_graphs
from superopt.ops import OPS, TensorType
from superopt.serialize import graph_hash
from superopt.spec import load

__version__ = "0.1.0"

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
    "TensorType",
    "random_inputs",
    "run",
    "thread_graphs",
]
