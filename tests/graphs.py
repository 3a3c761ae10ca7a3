"""Random programs for property tests, and an evaluator that runs them straight in torch.

A recipe is a list of steps (op, operand indices, attributes) over tensors numbered inputs first.
`build` turns it into a KernelGraph through the builder; `direct` evaluates it with torch expressions written
independently of superopt's rule table, so the interpreter can be checked against it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch
from hypothesis import strategies as st

import superopt

INPUT_SHAPES = [(4, 6), (4, 6), (6, 6)]
UNARY = ["exp", "silu", "gelu", "gelu_tanh", "relu", "sigmoid", "sqrt", "rsqrt", "square", "neg"]
BINARY = ["add", "sub", "mul", "div"]

DIRECT = {
    "exp": lambda x: math.e**x,
    "silu": lambda x: x / (1 + math.e ** (-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "sigmoid": lambda x: 1 / (1 + math.e ** (-x)),
    "sqrt": lambda x: x**0.5,
    "rsqrt": lambda x: 1 / x**0.5,
    "square": lambda x: x * x,
    "neg": lambda x: 0 - x,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "mul_scalar": lambda x, c: x * c,
    "add_scalar": lambda x, c: x + c,
    "sum": lambda x, dim, keepdim: torch.sum(x, dim, keepdim),
    "max": lambda x, dim, keepdim: torch.max(x, dim, keepdim).values,
    "mean": lambda x, dim, keepdim: torch.sum(x, dim, keepdim) / x.shape[dim],
    "matmul": lambda a, b: torch.einsum("ik,kj->ij", a, b),
    "rms_norm": lambda x, eps: x * (torch.sum(x * x, -1, keepdim=True) / x.shape[-1] + eps) ** -0.5,
    "layer_norm": lambda x, eps: (
        (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps) ** 0.5
    ),
    # HF's form: the halves of the last dim rotated, with signs
    "rope": lambda x, c, s: x * c + torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], -1) * s,
    "concat": lambda a, b, dim: torch.cat([a, b], dim),
}


def _shape_of(op: str, args: tuple[int, ...], attrs: dict, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    a = list(shapes[args[0]])
    if op in ("sum", "max", "mean"):
        if attrs["keepdim"]:
            a[attrs["dim"]] = 1
        else:
            del a[attrs["dim"]]
    elif op == "matmul":
        a[-1] = shapes[args[1]][-1]
    elif op == "concat":
        a[attrs["dim"]] += shapes[args[1]][attrs["dim"]]
    return tuple(a)


@st.composite
def recipes(draw: st.DrawFn, max_steps: int = 8) -> dict:
    """Elementwise ops, scalars, reductions, matmul, the norms, rope and concat over inputs (4, 6), (4, 6), (6, 6)."""
    shapes = list(INPUT_SHAPES)
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(["unary", "binary", "scalar", "reduce", "matmul", "norm", "rope", "concat"]))
        a = draw(st.sampled_from(range(len(shapes))))
        like_a = [i for i, s in enumerate(shapes) if s == shapes[a]]
        rank2 = len(shapes[a]) == 2
        if kind == "unary":
            step = (draw(st.sampled_from(UNARY)), (a,), {})
        elif kind == "binary":
            step = (draw(st.sampled_from(BINARY)), (a, draw(st.sampled_from(like_a))), {})
        elif kind == "scalar":
            step = (
                draw(st.sampled_from(["mul_scalar", "add_scalar"])),
                (a,),
                {"c": draw(st.sampled_from([0.5, -2.0]))},
            )
        elif kind == "reduce" and rank2:
            attrs = {"dim": draw(st.sampled_from([0, 1])), "keepdim": draw(st.booleans())}
            step = (draw(st.sampled_from(["sum", "max", "mean"])), (a,), attrs)
        elif kind == "matmul" and rank2 and shapes[a][1] == 6:
            square = [i for i, s in enumerate(shapes) if s == (6, 6)]
            step = ("matmul", (a, draw(st.sampled_from(square))), {})
        elif kind == "norm":
            step = (
                draw(st.sampled_from(["rms_norm", "layer_norm"])),
                (a,),
                {"eps": draw(st.sampled_from([1e-6, 1e-2]))},
            )
        elif kind == "rope" and shapes[a][-1] % 2 == 0:  # it rotates the halves of the last dim
            step = ("rope", (a, draw(st.sampled_from(like_a)), draw(st.sampled_from(like_a))), {})
        elif kind == "concat" and rank2:
            step = ("concat", (a, draw(st.sampled_from(like_a))), {"dim": draw(st.sampled_from([0, 1]))})
        else:
            continue
        steps.append(step)
        shapes.append(_shape_of(*step, shapes))
    if not steps:
        steps.append(("neg", (0,), {}))
        shapes.append(INPUT_SHAPES[0])
    n = len(INPUT_SHAPES)
    outputs = draw(st.lists(st.sampled_from(range(n, len(shapes))), min_size=1, max_size=2, unique=True))
    return {"steps": steps, "outputs": outputs}


def default_names(recipe: dict) -> list[str]:
    return [f"x{i}" for i in range(len(INPUT_SHAPES))] + [f"t{i}" for i in range(len(recipe["steps"]))]


def build(recipe: dict, dtype: str = "float32", names: list[str] | None = None, scale: int = 1) -> superopt.KernelGraph:
    """The recipe as a graph; `names` renames its tensors (inputs first, then one per step); `scale`
    multiplies every input dim (every op stays well-formed)."""
    names = names or default_names(recipe)
    g = superopt.Graph("random")
    ts = [g.input(names[i], [d * scale for d in s], dtype) for i, s in enumerate(INPUT_SHAPES)]
    for k, (op, args, attrs) in enumerate(recipe["steps"]):
        ts.append(g.op(op, *[ts[i] for i in args], out=names[len(INPUT_SHAPES) + k], **attrs))
    for i in recipe["outputs"]:
        g.output(ts[i])
    return g


def direct(recipe: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    vals = list(inputs)
    for op, args, attrs in recipe["steps"]:
        vals.append(DIRECT[op](*[vals[i] for i in args], **attrs))
    return [vals[i] for i in recipe["outputs"]]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def import_file(path: Path, name: str):
    """A script of the repository (an example, a benchmark) as a fresh module named `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def import_fused(name: str = "examples_fused"):
    """examples/fused.py as a fresh module (it is a script, not a package; callers may change its tile knobs)."""
    return import_file(EXAMPLES / "fused.py", name)


# Shrunk dims: each fused kernel still has several blocks and loop iterations, and each case runs in well under
# a second under the reference interpreter.
FUSED_SMALL = {
    "rmsnorm_linear_bs1": {"B": 2, "D": 512, "N": 128},
    "rmsnorm_linear_bs8": {"B": 5, "D": 1024, "N": 192},
    "gated_mlp": {"B": 4, "D": 512, "N": 128},
    "gqa_bs1": {"B": 2, "S": 128, "D": 8, "L": 512},
    "gqa_bs8": {"B": 3, "S": 64, "D": 4, "L": 1024},
    "qknorm_gqa_bs1": {"B": 2, "S": 128, "D": 8, "L": 512},
    "qknorm_gqa_bs8": {"B": 3, "S": 64, "D": 4, "L": 1024},
    "mqa_bs1": {"B": 1, "S": 128, "D": 8, "L": 512},
    "lora": {"B": 4, "D": 512, "N": 128, "R": 4},
    "ntrans_bs1": {"B": 3, "D": 64},
    "ntrans_bs8": {"B": 6, "D": 32},
}


def dequant_gemv(
    dims: dict[str, int],
    q_dtype: str = "int4",
    zero: bool = True,
    dtype: str = "float32",
    high_first: bool = False,
) -> tuple[superopt.KernelGraph, superopt.KernelGraph]:
    """A quantized GEMV, y = dequant(q, scale, zero, group=G) @ x for x [K, B] (a linear layer's [N, K] weight,
    groups and packing along K), and its fused µGraph: a grid of N / ROWS blocks, a loop over K in CHUNKS, each
    iteration dequantizing its tile of packed rows and multiplying it by its rows of x, accum_sum over the loop."""
    n, k, b, group, rows, chunks = (dims[d] for d in ("N", "K", "B", "G", "ROWS", "CHUNKS"))
    packed = 2 if q_dtype == "int4" else 1
    graphs = []
    for fused in (False, True):
        g = superopt.Graph("dequant_gemv")
        q = g.input("q", (n, k // packed), q_dtype)
        params = [g.input(name, (n, k // group), dtype) for name in ("scale", "zero")[: 1 + zero]]
        x = g.input("x", (k, b), dtype)
        if not fused:
            g.output(g.matmul(g.dequant(q, *params, group=group, high_first=high_first), x))
        else:
            blk = g.block_graph(grid=(n // rows,), forloop_range=chunks)
            tiles = [blk.input(t, imap=(0,), fmap=1) for t in (q, *params)]
            w = blk.dequant(*tiles, group=group, high_first=high_first)
            blk.output(blk.accum_sum(blk.matmul(w, blk.input(x, imap=(None,), fmap=0))), omap=(0,))
            g.output(g.graph_def(blk)[0])
        graphs.append(g)
    return graphs[0], graphs[1]
