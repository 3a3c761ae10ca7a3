"""Presets: how much of the µGraph space a search explores, and which ops it may use.

Like Mirage's search configurations, a preset restricts the space to what a family of programs needs: budgets
(kernel ops, graph-defined ops, ops per block graph, states), block inputs and outputs, grid axes, whether a
block graph loops, whether a grid axis may split a reduced dim (partial results that a later kernel combines, as
split-K GEMVs and split-KV attention do), and the block ops tried. The wall-clock budget is search()'s
`budget_s`. Function ops (exp, silu, sqrt, ...) are further kept only where the program computes that function,
since no other tensor can be part of its abstract expression. A program whose spec names no preset gets one
made from its own ops (`for_program`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.ops import OPS

ELEMENTWISE = (
    *("add", "sub", "mul", "div", "exp", "silu", "gelu", "gelu_tanh", "relu", "sigmoid", "sqrt", "rsqrt"),
    *("square", "neg"),
)


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    kernel_ops: int  # kernel launches in a candidate
    graph_defs: int  # graph-defined kernels among them
    block_ops: int  # ops in one block graph (the implicit accum_sum of a loop-free block not counted)
    block_inputs: int
    block_outputs: int
    grid_axes: int
    loops: str  # "required" | "optional" | "never": whether a block graph has a forloop
    split_reductions: bool  # a grid axis may split a reduced dim
    # a grid axis may take an upstream kernel's blocks along its class, to read the copies of a partial they wrote
    # one per block (split-K's mean squares); off where no program needs it, as each is a choice more per kernel
    tied_axes: bool = False
    block_op_names: tuple[str, ...]
    description: str
    max_states: int = 20_000_000  # the search's states budget where the settings give none (--states)
    deepen: bool = True  # enumerate plans of more kernels also where fewer compute the program

    @property
    def allow_no_loop(self) -> bool:
        return self.loops != "required"

    @property
    def allow_loop(self) -> bool:
        return self.loops != "never"


# A GEMV's one kernel: the megakernel's layer programs are searched with it (superopt/model_search.py), and its
# task bodies lower one-kernel winners.
_MLP = Preset(
    name="mlp",
    kernel_ops=2,
    graph_defs=1,
    block_ops=6,
    block_inputs=3,
    block_outputs=1,
    grid_axes=1,
    loops="required",
    split_reductions=False,
    block_op_names=(
        "matmul",
        "mul",
        "div",
        "add",
        "silu",
        "gelu",
        "relu",
        "sigmoid",
        "accum_sum",
        "accum_rms_last",
    ),  # fmt: skip
    description="one graph-defined kernel: one grid axis, a loop over a reduction dim, matmuls and an epilogue",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _MLP,
        # mlp's space and split-K: a grid axis over the reduction dim as well, partial products (and partial mean
        # squares, for a norm before the matmul) written per slice, a second graph-defined kernel combining them
        # (it adds a norm's eps and takes the root by hand)
        replace(
            _MLP,
            name="gemv",
            graph_defs=2,
            block_outputs=2,
            grid_axes=2,
            split_reductions=True,
            tied_axes=True,
            block_op_names=(*_MLP.block_op_names, "square", "add_scalar", "sqrt", "accum_mean_last"),
            description="a GEMV: mlp's one kernel, or split-K (a grid axis over the reduction dim too: partial "
            "products and mean squares per slice) and a kernel combining the slices",
        ),
        Preset(
            name="lora",
            kernel_ops=2,
            graph_defs=1,
            block_ops=5,
            block_inputs=4,
            block_outputs=1,
            grid_axes=1,
            loops="required",
            split_reductions=False,
            block_op_names=("matmul", "concat", "add", "accum_sum"),
            description="one graph-defined kernel over up to four inputs: matmuls, concatenation, accumulation",
        ),
        Preset(
            name="attention",
            kernel_ops=4,
            graph_defs=2,
            block_ops=5,
            block_inputs=3,
            block_outputs=2,
            grid_axes=3,
            loops="required",
            split_reductions=True,
            block_op_names=("matmul", "exp", "div", "accum_sum", "accum_sum_last"),
            description="up to two graph-defined kernels (split-KV: partial sums, then a combine kernel), three grid "
            "axes",
        ),
        Preset(
            name="attention_norm",
            kernel_ops=4,
            graph_defs=2,
            block_ops=7,
            block_inputs=3,
            block_outputs=2,
            grid_axes=3,
            loops="required",
            split_reductions=True,
            block_op_names=("matmul", "exp", "div", "rms_norm", "accum_sum", "accum_sum_last"),
            description="attention whose operands are rms-normalized (qk-norm): the norms on the tiles, up to seven "
            "block ops",
        ),
        Preset(
            name="norm",
            kernel_ops=2,
            graph_defs=1,
            block_ops=5,
            block_inputs=3,
            block_outputs=1,
            grid_axes=1,
            loops="never",
            split_reductions=False,
            block_op_names=("add", "sub", "mul", "div", "rms_norm", "layer_norm", "rope"),
            description="one graph-defined kernel without a loop: whole rows per block, elementwise ops, norms and "
            "rotary embeddings",
        ),
        Preset(
            name="default",
            kernel_ops=3,
            graph_defs=1,
            block_ops=5,
            block_inputs=3,
            block_outputs=1,
            grid_axes=2,
            loops="optional",
            split_reductions=True,
            block_op_names=(
                "matmul",
                *ELEMENTWISE,
                "rms_norm",
                "concat",
                "accum_sum",
                "accum_sum_last",
                "accum_rms_last",
            ),  # fmt: skip
            description="one graph-defined kernel with up to two grid axes, a loop or none, any op",
        ),
    )
}

FUNCTION_OF = {  # op -> the function it puts in an abstract expression
    "exp": "exp", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu", "sigmoid": "sigmoid",
    "sqrt": "sqrt", "rsqrt": "sqrt", "rms_norm": "sqrt", "layer_norm": "sqrt", "accum_rms_last": "sqrt",
    "max": "max", "accum_max": "max", "accum_rescaled_sum": "max",
}  # fmt: skip


def get_preset(name: str | None) -> Preset:
    preset = PRESETS.get(name or "default")
    if preset is None:
        raise SuperoptError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return preset


# What a block graph may compute a program op as, besides the op itself: a row norm split over a loop (its rms
# accumulated, the division after the loop), a hand-written norm (x * rsqrt(mean(x * x) + eps)) as the one op,
# a matmul's partial products summed over the loop.
ALSO_AS = {
    "rms_norm": ("accum_rms_last", "div"),
    "sqrt": ("rms_norm", "layer_norm"),
    "rsqrt": ("rms_norm", "layer_norm"),
    "matmul": ("accum_sum",),
}
MAX_BLOCK_OPS = 9  # as many as attention with a scale and a mask has; past this the block DFS takes minutes
MAX_BLOCK_INPUTS = 4  # attention's q, k, v and mask; each more multiplies the kernel-level choices


def for_program(graph: KernelGraph) -> Preset:
    """The preset of a program that names none, from its ops: its own ops (and what ALSO_AS computes them as) in
    block graphs as large as the program (up to MAX_BLOCK_OPS), over its inputs (up to MAX_BLOCK_INPUTS), a grid
    axis per output dim (up to two); a loop only where a matmul contracts, since a row a reduction or norm reads
    whole is a block's whole row; a second kernel only where one cannot compute the program."""
    ops = tuple(dict.fromkeys(op.op for op in graph.ops))
    names = tuple(dict.fromkeys(n for op in ops if "block" in OPS[op].levels for n in (op, *ALSO_AS.get(op, ()))))
    return Preset(
        name="program",
        kernel_ops=2,
        graph_defs=2,
        block_ops=min(len(graph.ops), MAX_BLOCK_OPS),
        block_inputs=min(len(graph.inputs), MAX_BLOCK_INPUTS),
        block_outputs=len(graph.outputs),
        grid_axes=min(2, max(len(graph.tensors[o].shape) for o in graph.outputs)),
        loops="optional" if "matmul" in ops else "never",
        split_reductions=False,
        block_op_names=names,
        description="the program's own ops: " + ", ".join(names),
        deepen=False,
    )


# Ops tried only where the program has one of these: abstract expressions forget signs, so sub would repeat every
# add; and forget indices, so rope (x * cos + rotate_half(x) * sin) would pass for any x * cos + x * sin.
ONLY_IF_PROGRAM_HAS = {"sub": {"sub", "neg"}, "rope": {"rope"}}


def usable(ops: tuple[str, ...], functions: set[str], program_ops: set[str]) -> tuple[str, ...]:
    """The ops whose function, if any, the program computes, and those of ONLY_IF_PROGRAM_HAS it asks for."""
    keep = functions | {""}
    wanted = {op: ONLY_IF_PROGRAM_HAS.get(op) for op in ops}
    return tuple(
        op for op in ops if FUNCTION_OF.get(op, "") in keep and (wanted[op] is None or program_ops & wanted[op])
    )
