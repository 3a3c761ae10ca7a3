"""The megakernel's GEMV task bodies, lowered from the layer programs (the plan's verified winners).

A *stage* is what one GEMV task kind computes: a prologue over its whole input vector (norms, scaling by a norm
weight, whole-vector statistics), the GEMV of the vector it leaves with one or more weights (a task takes `tile`
rows of each), and an epilogue over the task's rows (biases, residuals, activations), written to one buffer.

A program is cut into stages by dataflow. A GEMV is a predefined matmul of a [1, k] value by a weight input
[k, n], or a graph-defined kernel whose block graph is one: its grid splits the weight's output dim (imap 1),
its forloop the reduction dim (fmap 0 of the weight, 1 of the vectors), the loop's ops elementwise on vector
tiles, its accumulators sums over the loop (accum_sum of the matmul, accum_*_last statistics of a vector).
A quantized weight (superopt.model.quantized_linear) is the GEMV `sum(mul(dequant(q, scale, zero), x), dim=2)`
of program inputs, its storage recorded (`Dequant`); its products are not rounded (as a matmul's: only the sum
rounds). Values computed from the program's inputs alone are prologue (`vector` or `scalar`); values computed
from a GEMV are epilogue (`row`); a row value another GEMV reads as its vector ends a stage (the buffer between
two task kinds). GEMVs of one vector by weights of one shape share a stage (gate and up). A loop-free
graph-defined kernel of elementwise ops is its ops on whole tensors, as for the epilogues' device functions
(kernels/cuda_codegen.py).

Re-tiled to the task: the grid becomes the task's tiles and the forloop one iteration over the whole reduction
dim (a task streams whole weight rows), which leaves the function unchanged: the loop ops are elementwise and
the accumulators are sums over it. Rounding is where the GPU backends put it: a kernel's outputs round to their
dtype, a graph-defined kernel's inner tiles stay float32 (as the Triton backend keeps them in registers), but the
GEMV's vector, which the GEMV reads in its own dtype (bf16, from shared memory). `run_stage` evaluates the steps
with the reference interpreter's rule tables (the CPU replay) and `emit_stage` writes them as CUDA (the task body
the GPU runs): the two interpretations of one stage.

Where a stage's inputs live and where it writes is the step's dataflow (`KINDS`): the workspace buffer each
program input is bound to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from superopt.errors import SuperoptError
from superopt.interpret import TorchEval, unpack_int4
from superopt.ir import KernelGraph, Op
from superopt.kernels.cuda_codegen import CUDA_EXPR
from superopt.kernels.megakernel.layout import NCONSUMERS
from superopt.kernels.taskgraph import MAX_TILE_ROWS, Gemv
from superopt.model import QuantizedWeight
from superopt.ops import ACCUMULATORS, DTYPES, OPS, TensorType

STATS = ("accum_rms_last", "accum_mean_last", "accum_sum_last")  # whole-vector statistics: a scalar each
SCALAR_SLOT = 48  # a stage's scalars live in red[48...] between its prologue and epilogue (see block_argmax)
MAX_SCALARS = 16


@dataclass(frozen=True)
class Kind:
    """A GEMV task kind of the step: the layer program (and which of its stages) it computes, its weights in the
    packing order of its tiles (kernels/megakernel/layout.py), where each program input is read from, and the
    buffer its output goes to (for a stage that ends inside the program, the buffer the next stage reads)."""

    name: str
    program: str
    stage: int
    weights: tuple[str, ...]
    sources: dict[str, str]
    output: str


# The step's GEMV task kinds, in the task graph's order (kernels/taskgraph.py). Sources: h_in is the layer's
# input (the token's embedding, scaled where the model scales it, for layer 0), attn the split-KV combine of the
# attention partials, hmlp_last the last layer's output; the rest are workspace buffers of the layer.
KINDS = (
    Kind("qkv", "attn_in", 0, ("wqkv",), {"h": "h_in", "gamma": "gin", "bqkv": "bqkv"}, "qkv"),
    Kind("oproj", "attn_out", 0, ("wo",), {"a": "attn", "h": "h_in"}, "hattn"),
    Kind("gateup", "mlp", 0, ("wg", "wu"), {"h": "hattn", "gamma": "gpost"}, "act"),
    Kind("down", "mlp", 1, ("wd",), {"h": "hattn", "": "act"}, "hmlp"),
    Kind("lmhead", "lm_head", 0, ("w",), {"h": "hmlp_last", "gamma": "gfinal"}, "logits"),
)
KIND = {k.name: k for k in KINDS}


@dataclass(frozen=True)
class Step:
    """One op of a stage on its values (named by the stage), with its result's kind and dtype."""

    op: Op
    kind: str  # vector (k elements), scalar, or row (one a task row)
    dtype: str


@dataclass(frozen=True)
class Dequant:
    """A GEMV's weight stored quantized: `dequant(q, scale, zero, group, high_first)` of the program's inputs (q
    [1, n, k] int8 or [1, n, k / 2] int4), multiplied by the vector and summed over k (model.quantized_linear)."""

    scale: str
    zero: str | None
    bits: int
    group: int
    high_first: bool

    def cuda_type(self) -> str:
        """The GEMV's weight format in gemv.cuh."""
        flags = f"{'true' if self.zero else 'false'}, {'true' if self.high_first else 'false'}"
        return f"QuantW<{self.bits}, {self.group}, {flags}>"


@dataclass
class Stage:
    """One GEMV stage of a program: `vectors` (program inputs, or the previous stage's output "") read whole,
    `rows` read at the task's rows, the prologue, `x` times each weight (`results`, one a unit), the epilogue,
    and the value written. `scalars`: prologue values the epilogue reads."""

    program: str
    k: int
    n: int
    x: str = ""
    weights: list[str] = field(default_factory=list)
    quant: list[Dequant | None] = field(default_factory=list)  # how each weight is stored (None: bf16 [k, n])
    results: list[str] = field(default_factory=list)
    result_dtypes: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    prologue: list[Step] = field(default_factory=list)
    epilogue: list[Step] = field(default_factory=list)
    scalars: list[str] = field(default_factory=list)
    output: str = ""
    argmax: str = ""  # the argmax of the output over its rows, a split reduction: each task's, then all tasks'


def _kind_of_op(op: str, operand_kinds: list[str]) -> str:
    if op in STATS:
        return "scalar"
    if OPS[op].kind == "norm":
        return "vector"
    return "vector" if "vector" in operand_kinds else "scalar"


def program_stages(graph: KernelGraph) -> list[Stage]:
    """The GEMV stages of `graph` in order; SuperoptError naming the op it cannot lower."""
    what = graph.name
    kinds: dict[str, str] = {n: "input" for n in graph.inputs}
    types: dict[str, TensorType] = {n: graph.tensors[n] for n in graph.inputs}
    owner: dict[str, int] = {}  # row value -> its stage
    defs: dict[str, Step] = {}  # vector and scalar values -> the step computing them
    stages: list[Stage] = []
    alias: dict[str, str] = {}
    declared: dict[str, str] = {}  # a kernel's inner tiles: their dtype in the IR (they compute in float32)

    def name(t: str) -> str:
        return alias.get(t, t)

    dequants: dict[str, tuple[str, Dequant]] = {}  # a dequantized weight -> its q input and how it is stored
    products: dict[str, tuple[str, str]] = {}  # dequantized weight * vector -> (the vector, the weight)

    def gemv(x: str, weight: str, out: str, dtype: str, quant: Dequant | None = None) -> None:
        if quant is not None:
            n, k = types[weight].shape[1], types[weight].shape[2] * DTYPES[types[weight].dtype].packed
        elif kinds.get(weight) != "input" or len(types[weight].shape) != 2:
            raise SuperoptError(f"{what}: a matmul's weight '{weight}' is not a [k, n] program input")
        else:
            k, n = types[weight].shape
        if x in defs and x in declared:  # the GEMV reads its vector in its dtype (bf16, from shared memory)
            defs[x] = Step(defs[x].op, defs[x].kind, declared[x])
        if kinds[x] == "row":  # a GEMV result read whole: the stage that wrote it ends with it
            prev = stages[owner[x]]
            if prev.output and prev.output != x:
                raise SuperoptError(f"{what}: stage {owner[x]} would write two values ('{prev.output}', '{x}')")
            prev.output = x
            x_name = ""
        else:
            x_name = x
        if math.prod(types[x].shape) != k:
            raise SuperoptError(f"{what}: matmul of '{x}' {list(types[x].shape)} by '{weight}' is not a GEMV")
        stage = next((s for s in stages if s.x == x_name and s.n == n and s.k == k and not s.output), None)
        if stage is None:
            stage = Stage(graph.name, k, n, x_name)
            if x_name == "":
                stage.vectors.append("")
            stages.append(stage)
        stage.weights.append(weight)
        stage.quant.append(quant)
        stage.results.append(out)
        stage.result_dtypes.append(dtype)
        kinds[out], types[out], owner[out] = "row", TensorType((1, n), dtype), stages.index(stage)

    def round_to(v: str, dtype: str) -> None:
        """Value v, a kernel's output, rounds to `dtype`."""
        if v in defs:
            defs[v] = Step(defs[v].op, defs[v].kind, dtype)
            return
        if kinds.get(v) != "row":
            raise SuperoptError(f"{what}: a kernel output '{v}' is a program input")
        stage = stages[owner[v]]
        if v in stage.results:
            stage.result_dtypes[stage.results.index(v)] = dtype
        else:
            at = next(k for k, s in enumerate(stage.epilogue) if s.op.outputs[0] == v)
            stage.epilogue[at] = Step(stage.epilogue[at].op, "row", dtype)

    def quantized_gemv(op: str, inputs: tuple[str, ...], attrs: dict, out: str, ty: TensorType) -> bool:
        """The quantized GEMV's three ops (model.quantized_linear): dequant of program inputs, its product with
        a [1, k] vector, the sum over k of that product, which is the GEMV."""
        if op == "dequant":
            if any(kinds.get(i) != "input" for i in inputs) or types[inputs[0]].shape[:1] != (1,) or len(ty.shape) != 3:
                raise SuperoptError(f"{what}: a dequant of values that are not [1, n, k] program inputs")
            zero = inputs[2] if len(inputs) > 2 else None
            bits = 4 if types[inputs[0]].dtype == "int4" else 8
            dequants[out] = (inputs[0], Dequant(inputs[1], zero, bits, attrs["group"], attrs["high_first"]))
            types[out] = ty
            return True
        if op == "mul" and inputs[0] in dequants and inputs[1] not in dequants:
            if math.prod(types[inputs[1]].shape) != ty.shape[-1] or len(types[inputs[1]].shape) != 2:
                raise SuperoptError(f"{what}: a dequantized weight times '{inputs[1]}', not a [1, k] vector")
            products[out] = (inputs[1], inputs[0])
            return True
        if op == "sum" and inputs[0] in products:
            if attrs["dim"] not in (2, -1) or attrs["keepdim"]:
                raise SuperoptError(f"{what}: a sum of a dequantized weight's product not over its k")
            x, w = products.pop(inputs[0])
            q, quant = dequants[w]
            gemv(x, q, out, ty.dtype, quant)
            return True
        return False

    def step(op: str, inputs: tuple[str, ...], attrs: dict, out: str, ty: TensorType, rounds: bool = True) -> None:
        inputs = tuple(name(i) for i in inputs)
        if not rounds:
            declared[out] = ty.dtype
            ty = TensorType(ty.shape, "float32")
        if op == "matmul":
            gemv(inputs[0], inputs[1], out, ty.dtype)
            return
        if quantized_gemv(op, inputs, attrs, out, ty):
            return
        if any(i in dequants or i in products for i in inputs):
            raise SuperoptError(f"{what}: a dequantized weight is read by '{op}', not as a GEMV's weight")
        if op == "accum_sum":
            round_to(inputs[0], ty.dtype)
            alias[out] = inputs[0]
            return
        if op not in CUDA_EXPR and op not in STATS and op not in ("rms_norm", "argmax"):
            raise SuperoptError(f"{what}: op '{op}' has no rule in a GEMV task's prologue or epilogue")
        operand = [kinds[i] for i in inputs]
        types[out] = ty
        lowered = Op(op, inputs, (out,), dict(attrs))
        if op == "argmax":  # over the GEMV's output dim: the task's rows, then all tasks'
            stage = stages[owner[inputs[0]]] if operand == ["row"] else None
            if stage is None or attrs["dim"] not in (1, -1) or stage.argmax:
                raise SuperoptError(f"{what}: an argmax of GEMV results is one over their output dim")
            if stage.output and stage.output != inputs[0]:
                raise SuperoptError(f"{what}: the argmax of '{inputs[0]}', which its stage does not write")
            stage.output, stage.argmax, kinds[out] = inputs[0], out, "token"
            return
        if "row" in operand:
            stage_ids = {owner[i] for i in inputs if kinds[i] == "row"}
            if len(stage_ids) != 1 or OPS[op].kind not in ("unary", "binary", "scalar"):
                raise SuperoptError(f"{what}: op '{op}' on GEMV results is not elementwise over one stage's rows")
            stages[stage_ids.pop()].epilogue.append(Step(lowered, "row", ty.dtype))
            kinds[out], owner[out] = "row", owner[next(i for i in inputs if kinds[i] == "row")]
            return
        kind = _kind_of_op(op, ["vector" if k == "input" and math.prod(types[i].shape) > 1 else k
                                for k, i in zip(operand, inputs)])  # fmt: skip
        kinds[out] = kind
        defs[out] = Step(lowered, kind, ty.dtype)

    for op in graph.ops:
        if op.block is None:
            step(op.op, op.inputs, op.attrs, op.outputs[0], graph.tensors[op.outputs[0]])
            continue
        _expand_block(graph, op, alias, step)
        for o in op.outputs:
            types[o] = graph.tensors[o]
    for stage in stages:
        _close(stage, defs, kinds, types, what)
    for out in (name(o) for o in graph.outputs if kinds.get(name(o)) != "token"):
        if kinds.get(out) != "row":
            raise SuperoptError(f"{what}: output '{out}' is not computed by a GEMV stage")
        stage = stages[owner[out]]
        if stage.output and stage.output != out:
            raise SuperoptError(f"{what}: a stage writes both '{stage.output}' and '{out}'")
        stage.output = out
    for i, stage in enumerate(stages):
        if not stage.output:
            raise SuperoptError(f"{what}: stage {i}'s results reach no output")
        for s in stage.epilogue:
            for v in s.op.inputs:
                if kinds[v] == "input" and v not in stage.rows:
                    if math.prod(types[v].shape) != stage.n:
                        raise SuperoptError(f"{what}: '{v}' {list(types[v].shape)} is not one value a row")
                    stage.rows.append(v)
                elif kinds[v] == "scalar" and v not in stage.scalars:
                    stage.scalars.append(v)
                elif kinds[v] == "vector":
                    raise SuperoptError(f"{what}: the epilogue of stage {i} reads the whole vector '{v}'")
        if len(stage.scalars) > MAX_SCALARS:
            raise SuperoptError(f"{what}: stage {i} keeps {len(stage.scalars)} scalars (at most {MAX_SCALARS})")
    return stages


def _close(stage: Stage, defs: dict[str, Step], kinds: dict[str, str], types: dict, what: str) -> None:
    """The stage's prologue: the steps its x and its epilogue's scalars need, in program order; its vectors."""
    need: set[str] = set()
    stack = [stage.x] + [v for s in stage.epilogue for v in s.op.inputs if kinds.get(v) == "scalar"]
    while stack:
        v = stack.pop()
        if v in need or v == "":
            continue
        need.add(v)
        if v in defs:
            stack.extend(defs[v].op.inputs)
    stage.prologue = [s for v, s in defs.items() if v in need]
    for v in sorted(need - set(defs), key=list(kinds).index):
        if math.prod(types[v].shape) != stage.k:
            raise SuperoptError(f"{what}: the prologue reads '{v}' {list(types[v].shape)}, not {stage.k} elements")
        stage.vectors.append(v)


def _expand_block(graph: KernelGraph, op: Op, alias: dict[str, str], step: Callable[..., None]) -> None:
    """A graph-defined kernel as steps on whole values: a GEMV-form block graph re-tiled to one iteration, or a
    loop-free elementwise one."""
    block = op.block
    assert block is not None
    what = f"{graph.name}: graph-defined op '{op.outputs[0]}'"
    gemv_form = any(bop.op == "matmul" for bop in block.ops)
    if gemv_form:
        if len(block.grid) != 1 or any(bo.omap != (1,) for bo in block.outputs):
            raise SuperoptError(f"{what}: a GEMV block graph has one grid axis over the output's dim 1")
        for bi in block.inputs:
            ok = (bi.imap == (1,) and bi.fmap in (0, None)) or (bi.imap == (None,) and bi.fmap == 1)
            if not ok or len(bi.source.shape) != 2:
                raise SuperoptError(f"{what}: input '{bi.name}' is tiled neither as a vector nor as weight rows")
    elif block.forloop_range != 1:
        raise SuperoptError(f"{what}: a block graph with a loop and no matmul is not a GEMV task")
    prefix = op.outputs[0]
    alias |= {bi.name: alias.get(src, src) for bi, src in zip(block.inputs, op.inputs)}
    for bop in block.ops:
        result = bop.outputs[0]
        ty = block.tensors[result]
        outputs = [out for bo, out in zip(block.outputs, op.outputs) if bo.name == result]
        if bop.op == "accum_sum":  # re-tiled to one iteration: the identity (rounding a kernel output)
            alias[result] = alias.get(bop.inputs[0], bop.inputs[0])
            if outputs:
                step("accum_sum", (alias[result],), {}, outputs[0], ty)
            continue
        if bop.op == "argmax":  # a tile's index, not the row's
            raise SuperoptError(f"{what}: an argmax inside a block graph has no GEMV lowering")
        if bop.op in ACCUMULATORS and bop.op not in STATS:
            raise SuperoptError(f"{what}: accumulator '{bop.op}' is not a sum over the GEMV's reduction")
        alias[result] = outputs[0] if outputs else f"{prefix}.{result}"
        if not gemv_form:
            shape = graph.tensors[prefix].shape
        elif ty.shape[-1] > 1:  # a vector tile is one iteration's part of the vector; a row tile a block's rows
            shape = (1, ty.shape[-1] * (block.grid[0] if block.after_loop[result] else block.forloop_range))
        else:
            shape = ty.shape
        # A kernel's outputs round to their dtype; its inner tiles stay float32 (in registers, as the Triton
        # backend keeps them), but for a GEMV's vector, which rounds to its own dtype (see `gemv`).
        step(bop.op, bop.inputs, bop.attrs, alias[result], TensorType(shape, ty.dtype), outputs != [])
    alias |= {out: alias.get(bo.name, bo.name) for bo, out in zip(block.outputs, op.outputs)}


def lower_kinds(progs: dict[str, KernelGraph], gemv: dict[str, Gemv]) -> dict[str, Stage | str]:
    """Each GEMV task kind's stage, lowered from its layer program in `progs` (a winner or the program itself)
    and checked against the task graph's tiling of the kind (`gemv`), or why it does not lower."""
    by_program: dict[str, list[Stage] | str] = {}
    out: dict[str, Stage | str] = {}
    for kind in KINDS:
        if kind.program not in by_program:
            try:
                by_program[kind.program] = program_stages(progs[kind.program])
            except SuperoptError as e:
                by_program[kind.program] = str(e)
        stages = by_program[kind.program]
        try:
            out[kind.name] = _bind(kind, stages, gemv[kind.name])
        except SuperoptError as e:
            out[kind.name] = str(e)
    return out


def _bind(kind: Kind, stages: list[Stage] | str, plan: Gemv) -> Stage:
    if isinstance(stages, str):
        raise SuperoptError(stages)
    what = f"{kind.program} (task kind {kind.name})"
    if len(stages) <= kind.stage:
        raise SuperoptError(f"{what}: has {len(stages)} GEMV stage(s), the task graph expects {kind.stage + 1}")
    stage = stages[kind.stage]
    if sorted(stage.weights) != sorted(kind.weights):
        raise SuperoptError(f"{what}: its GEMV multiplies by {stage.weights}, not the weights {list(kind.weights)}")
    order = [stage.weights.index(w) for w in kind.weights]  # units in the tiles' packing order
    stage.weights = [stage.weights[u] for u in order]
    stage.quant = [stage.quant[u] for u in order]
    stage.results = [stage.results[u] for u in order]
    stage.result_dtypes = [stage.result_dtypes[u] for u in order]
    packed = [(d.bits, d.group, d.zero is not None, d.high_first) if d else (16, 0, False, False) for d in stage.quant]
    fmt = plan.fmt
    if any(p != (fmt.bits, fmt.group, fmt.zero, fmt.high_first) for p in packed):
        raise SuperoptError(f"{what}: its weights are stored as {packed}, the task graph packs them {fmt.describe()}")
    if (stage.k, stage.n, len(stage.weights)) != (plan.k, plan.rows, plan.unit):
        raise SuperoptError(
            f"{what}: a GEMV of {stage.n} rows of {stage.k} x {len(stage.weights)}, the task graph tiles "
            f"{plan.rows} rows of {plan.k} x {plan.unit}"
        )
    unbound = [v for v in stage.vectors + stage.rows if v not in kind.sources]
    if unbound:
        raise SuperoptError(f"{what}: reads {unbound}, which the step does not bind to a buffer")
    if any(kind.sources[v] == "attn" for v in stage.rows) or (
        stage.prologue and any(kind.sources[v] == "attn" for v in stage.vectors)
    ):
        raise SuperoptError(f"{what}: the attention output is read only as the GEMV's vector itself")
    if any(s.op.outputs[0] == stage.x and s.dtype != "bfloat16" for s in stage.prologue):
        raise SuperoptError(f"{what}: the GEMV's vector is not bfloat16")
    if (kind.output == "logits") != bool(stage.argmax):
        want = "the next token: the argmax of its logits" if kind.output == "logits" else "no argmax"
        raise SuperoptError(f"{what}: the step needs {want}")
    return stage


# --- the replay's interpretation: the reference interpreter's rules ---------------------------------------------


def run_stage(
    stage: Stage,
    vectors: dict[str, torch.Tensor],
    rows: dict[str, torch.Tensor],
    weights: list[torch.Tensor | QuantizedWeight],
) -> torch.Tensor:
    """One task of the stage: `vectors` [1, k] and `rows` [1, task rows] by name, `weights` a unit: [task rows,
    k], or a quantized unit's stored rows (what its ring chunks hold: layout.unpack_chunks); each step by the
    reference interpreter's rule for its op, rounded to its dtype. The written value, [1, task rows], in
    float32."""
    env = dict(vectors) | dict(rows)
    run_steps(stage.prologue, env)
    x = env[stage.x]
    for name, w, quant, dtype in zip(stage.results, weights, stage.quant, stage.result_dtypes):
        y = quantized_dot(w, quant, x.float()) if isinstance(w, QuantizedWeight) else x.float() @ w.float().T
        env[name] = NATIVE.cast(y, TensorType((), dtype))
    run_steps(stage.epilogue, env)
    return env[stage.output].float()


def quantized_dot(w: QuantizedWeight, quant: Dequant | None, x: torch.Tensor) -> torch.Tensor:
    """x [1, k] times the stored rows, as the GPU computes it (gemv.cuh's QuantW): each group's dot product of
    the integer values with x, less the zero times the group's sum of x, times the scale, in float32; the
    dequantized weights are never rounded (the IR's dequant rounds each to bf16: one rounding a weight, inside
    the GEMV's own error). The values are read as `quant` says (the nibble order, the group)."""
    assert quant is not None
    values = unpack_int4(w.q, quant.high_first) if quant.bits == 4 else w.q.to(torch.int64)
    n, k = values.shape
    groups = values.float().view(n, k // quant.group, quant.group)
    xg = x.view(1, k // quant.group, quant.group)
    dots = (groups * xg).sum(-1)
    if w.zero is not None:
        dots = dots - w.zero.float() * xg.sum(-1)
    return (dots * w.scale.float()).sum(-1)[None]


NATIVE = TorchEval("native")


def run_steps(steps: list[Step], env: dict[str, torch.Tensor]) -> None:
    """Each step on the values in `env` by the reference interpreter's rule for its op, rounded to its dtype."""
    for s in steps:
        args, ty = [env[i] for i in s.op.inputs], TensorType((), s.dtype)
        accumulates = s.op.op in ACCUMULATORS
        env[s.op.outputs[0]] = NATIVE.accumulate(s.op, [args], ty) if accumulates else NATIVE.op(s.op, args, ty)


# --- the GPU's interpretation: CUDA ---------------------------------------------------------------------------

# A source's pointer in a task body (`t` is the task's GemvTask), and whether the model's embedding scale applies
# to it (the layer input of layer 0 is the token's embedding row).
CUDA_SOURCES = {
    "h_in": ("layer_input(t.ws, t.embed, t.layer, t.pos)", "EMBED_SCALE && t.layer == 0"),
    "gin": ("ws_gin(t.ws, t.layer)", ""),
    "gpost": ("ws_gpost(t.ws, t.layer)", ""),
    "gfinal": ("ws_gfinal(t.ws)", ""),
    "bqkv": ("ws_bqkv(t.ws, t.layer)", ""),
    "hattn": ("ws_hattn(t.ws, t.layer)", ""),
    "act": ("ws_act(t.ws, t.layer)", ""),
    "hmlp_last": ("ws_hmlp(t.ws, NLAYER - 1)", ""),
}
CUDA_OUTPUTS = {
    "qkv": "ws_qkv(t.ws, t.layer)",
    "hattn": "ws_hattn(t.ws, t.layer)",
    "act": "ws_act(t.ws, t.layer)",
    "hmlp": "ws_hmlp(t.ws, t.layer)",
}


def _literal(x: object) -> str:
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise SuperoptError(f"a constant {v} has no CUDA literal")
    return f"{v!r}f"


def emit_stage(kind: Kind, stage: Stage) -> str:
    """The task body `task_<kind>(const GemvTask& t, u32& chunk)` computing one task of the stage: the row
    operands' loads (issued first, their latency under the GEMV's), the prologue over the whole vector (skipped
    where the SM's previous task computed it: `t.fresh`), the GEMV over the weight ring, the epilogue a row,
    and the write."""
    if MAX_TILE_ROWS > NCONSUMERS:
        raise SuperoptError(f"megakernel: a task's {MAX_TILE_ROWS} rows exceed its {NCONSUMERS} consumer threads")
    k, plan_rc = stage.k, f"RC_{kind.name.upper()}"
    names: dict[str, str] = {}  # stage value -> C++ name (never a name from the program: it may be anything)
    lines = [
        f"// {kind.name}: stage {kind.stage} of the layer program {kind.program}, generated by"
        " kernels/megakernel/lowering.py.",
        f"__device__ __forceinline__ void task_{kind.name}(const GemvTask& t, u32& chunk) {{",
        "  const int tid = threadIdx.x;",
        "  const bool row = tid < t.nrows;",
    ]
    for j, v in enumerate(stage.rows):
        ptr, embedded = CUDA_SOURCES[kind.sources[v]]
        names[v] = f"r{j}"
        lines.append(f"  float r{j} = row ? ldcgbf({ptr} + t.row0 + tid) : 0.f;")
        if embedded:
            lines.append(f"  if ({embedded}) r{j} = embed_scale(r{j});")
    lines.append("  if (t.fresh) {")
    lines += ["    " + line for line in _prologue(kind, stage, names)]
    lines.append("  }")
    for j, v in enumerate(stage.scalars):
        names[v] = f"t.red[{SCALAR_SLOT + j}]"
    lines.append("  stamp(t.tr, 2);")
    # The weight format is a template argument only where the weights are quantized: the bf16 bodies' source
    # is what it was before quantized formats existed.
    fmt = f", {stage.quant[0].cuda_type()}" if stage.quant[0] else ""
    call = f"gemv<{k}, {plan_rc}{fmt}>(t.xs, t.ring, t.full, t.empty, chunk, t.nchunks, t.keep, t.part, t.tr);"
    lines.append("  " + call)
    body = []
    for u, (res, dtype) in enumerate(zip(stage.results, stage.result_dtypes)):
        names[res] = f"m{u}"
        at = f"{u} * t.nrows + tid" if u else "tid"
        body.append(f"const float m{u} = {_round(dtype)}(gemv_row<{k}, {plan_rc}{fmt}>(t.part, {at}));")
    for n, s in enumerate(stage.epilogue):
        names[s.op.outputs[0]] = f"e{n}"
        body.append(f"const float e{n} = {_expr(s, names, lambda v: names[v])};")
    y = names[stage.output]
    if stage.argmax:  # the task's part of the split argmax; the argmax task combines the tasks' (lm_head's)
        lines += ["  float best = -3.0e38f;", "  int arg = 0x7fffffff;", "  if (row) {"]
        lines += ["    " + b for b in body]
        lines += [
            f"    ws_logits(t.ws)[(u64)(t.pos % LOGIT_SLOTS) * VOCAB + t.row0 + tid] = {y};",
            f"    best = {y};",
            "    arg = t.row0 + tid;",
            "  }",
            "  block_argmax(best, arg, t.red);",
            "  if (tid == 0) { ws_lmval(t.ws)[t.tile] = best; ws_lmidx(t.ws)[t.tile] = arg; }",
        ]
    else:
        lines += ["  if (row) {"] + ["    " + b for b in body]
        lines += [f"    {CUDA_OUTPUTS[kind.output]}[t.row0 + tid] = f2bf({y});", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _round(dtype: str) -> str:
    r = DTYPES[dtype].cuda_round
    if r is None:
        raise SuperoptError(f"dtype {dtype} is not supported by the CUDA emitter (bfloat16, float32)")
    return r


def _expr(s: Step, names: dict[str, str], operand: Callable[[str], str]) -> str:
    """An elementwise step as a rounded C++ float expression of its operands."""
    attrs = s.op.attrs
    c = _literal(attrs["c"]) if "c" in attrs else ""
    return f"{_round(s.dtype)}({CUDA_EXPR[s.op.op].format(*map(operand, s.op.inputs), c=c)})"


def _prologue(kind: Kind, stage: Stage, names: dict[str, str]) -> list[str]:
    """The prologue's lines: the GEMV's vector into shared memory (t.xs, bf16) and the scalars the epilogue
    reads into t.red. A thread holds elements 8 * (tid + i * NCONSUMERS) + e of every vector value."""
    k = stage.k
    src = {v: kind.sources[v] for v in stage.vectors}
    if not stage.prologue and not stage.scalars:  # x is the vector itself
        where = src[stage.x]
        if where == "attn":
            return ["combine_to_smem(ws_part(t.ws, t.layer), t.xs);"]
        ptr, embedded = CUDA_SOURCES[where]
        if not embedded:
            return [f"copy_to_smem<{k}>({ptr}, t.xs);"]
    per = f"Slice<{k}>::PER"
    loop = f"for (int i = 0; i < {per}; ++i)"
    each = f"#pragma unroll\n{loop}\n#pragma unroll\nfor (int e = 0; e < 8; ++e)"
    valid = f"(int)threadIdx.x + i * NCONSUMERS < {k // 8}"
    lines = []
    lines += [f"Slice<{k}> l{j};" for j in range(len(stage.vectors))]
    for j, v in enumerate(stage.vectors):  # every load issued before any is used: one L2 round trip
        lines.append(f"l{j}.load({CUDA_SOURCES[src[v]][0]});")
    for j, v in enumerate(stage.vectors):
        names[v] = f"v{j}[i][e]"
        lines.append(f"float v{j}[{per}][8];")
        embedded = CUDA_SOURCES[src[v]][1]
        value = f"embed_scale(elem(l{j}.v[i], e))" if embedded else f"elem(l{j}.v[i], e)"
        if embedded:
            lines.append(f"const bool emb{j} = {embedded};")
            value = f"emb{j} ? {value} : elem(l{j}.v[i], e)"
        lines += [*each.split("\n"), f"  v{j}[i][e] = {value};"]
    sums = 0
    for n, s in enumerate(stage.prologue):
        out = s.op.outputs[0]
        if s.op.op in STATS or s.op.op == "rms_norm":
            (x,) = s.op.inputs
            term = names[x] if s.op.op in ("accum_sum_last", "accum_mean_last") else f"{names[x]} * {names[x]}"
            if sums:
                lines.append("consumers_sync();  // the reduction scratch is free again")
            sums += 1
            lines += [f"float q{n} = 0.f;", *each.split("\n"), f"  if ({valid}) q{n} += {term};"]
            lines.append(f"const float p{n} = block_sum(q{n}, t.red);")
            eps = _literal(s.op.attrs.get("eps", 0.0))
            if s.op.op == "rms_norm":
                lines.append(f"const float w{n} = rsqrtf(p{n} / {k} + {eps});")
                names[out] = f"x{n}[i][e]"
                lines += [f"float x{n}[{per}][8];", *each.split("\n")]
                lines.append(f"  x{n}[i][e] = {_round(s.dtype)}({names[x]} * w{n});")
                continue
            total = {"accum_rms_last": f"sqrtf(p{n} / {k} + {eps})", "accum_mean_last": f"p{n} / {k}"}
            lines.append(f"const float x{n} = {_round(s.dtype)}({total.get(s.op.op, f'p{n}')});")
            names[out] = f"x{n}"
        elif s.kind == "scalar":
            lines.append(f"const float x{n} = {_expr(s, names, lambda v: names[v])};")
            names[out] = f"x{n}"
        else:
            lines += [f"float x{n}[{per}][8];", *each.split("\n")]
            lines.append(f"  x{n}[i][e] = {_expr(s, names, lambda v: names[v])};")
            names[out] = f"x{n}[i][e]"
    for j, v in enumerate(stage.scalars):
        lines.append(f"if (threadIdx.x == 0) t.red[{SCALAR_SLOT + j}] = {names[v]};")
    x = names[stage.x].removesuffix("[i][e]")
    lines += [
        "#pragma unroll",
        loop,
        f"  if ({valid}) ((V4*)t.xs)[threadIdx.x + i * NCONSUMERS] = pack8({x}[i]);",
        "consumers_sync();",
    ]
    return lines


# --- the lowering as a program: what translation validation compares with the program it was lowered from ------

# A whole-vector statistic as predefined ops on the vector [1, k] (the accumulators are block-level ops).
STAT_OPS: dict[str, Callable[..., Any]] = {
    "accum_sum_last": lambda g, x: g.sum(x, dim=1, keepdim=True),
    "accum_mean_last": lambda g, x: g.mean(x, dim=1, keepdim=True),
    "accum_rms_last": lambda g, x, eps: g.sqrt(g.add_scalar(g.mean(g.square(x), dim=1, keepdim=True), c=eps)),
}


def stages_graph(program: KernelGraph, stages: list[Stage]) -> KernelGraph:
    """A program's stages (program_stages, in order) as one kernel graph of predefined ops over its inputs: each
    stage's prologue on whole vectors, its GEMVs, its epilogue on whole rows. Equivalent to `program` exactly when
    the cut into stages and the re-tiling of a graph-defined winner kept its function."""
    g = KernelGraph(program.name)
    env: dict[str, Any] = {n: g.input(n, program.tensors[n].shape, program.tensors[n].dtype) for n in program.inputs}

    def emit(s: Step) -> None:
        args = [env[i] for i in s.op.inputs]
        if s.op.op in STAT_OPS:
            env[s.op.outputs[0]] = STAT_OPS[s.op.op](g, *args, **s.op.attrs)
        else:
            env[s.op.outputs[0]] = g.op(s.op.op, *args, **s.op.attrs)

    for at, stage in enumerate(stages):
        for s in stage.prologue:
            emit(s)
        for res, w, quant in zip(stage.results, stage.weights, stage.quant):
            if quant is None:
                env[res] = g.matmul(env[stage.x], env[w])
                continue
            params = [env[quant.scale]] + ([env[quant.zero]] if quant.zero else [])
            weight = g.dequant(env[w], *params, group=quant.group, high_first=quant.high_first)
            env[res] = g.sum(g.mul(weight, env[stage.x]), dim=2)
        for s in stage.epilogue:
            emit(s)
        env[""] = env[stage.output]
        if at + 1 == len(stages) or "" not in stages[at + 1].vectors:  # not read by the next stage: an output
            g.output(env[stage.output])
        if stage.argmax:
            g.output(g.argmax(env[stage.output], dim=1, keepdim=True))
    return g
