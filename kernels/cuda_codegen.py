"""The CUDA C++ emitter: the rule table of elementwise ops, and device functions generated from elementwise IR
programs and from search winners whose block graphs are loop-free and elementwise (the megakernel's epilogues),
and from a dequant op (one weight element from its packed bytes and its group's scale and zero).

What it emits compiles with NVRTC without a single #include, beside the megakernel's prelude (bf16 as raw bits:
rbf rounds to it; kernels/megakernel/prelude.cuh), so the same text builds through CuPy at run time and through
`nvcc -arch=sm_90a` in CI.

Rounding follows the reference interpreter's "native" semantics, which are also where Hugging Face's bf16 models
round: every op computes in float32 and rounds its result to its tensor's dtype.
"""

from __future__ import annotations

from superopt.errors import SuperoptError
from superopt.ir import BlockGraph, KernelGraph, Op
from superopt.ops import DTYPES, OPS

# The CUDA emitter's rule table: an elementwise op -> a C++ float expression of its operands {0}, {1} and {c}.
CUDA_EXPR: dict[str, str] = {
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "exp": "expf({0})",
    "silu": "{0} / (1.0f + expf(-{0}))",
    "gelu": "0.5f * {0} * (1.0f + erff({0} * 0.70710678118654752f))",
    "gelu_tanh": "0.5f * {0} * (1.0f + tanhf(0.7978845608028654f * ({0} + 0.044715f * {0} * {0} * {0})))",
    "relu": "fmaxf({0}, 0.0f)",
    "sigmoid": "1.0f / (1.0f + expf(-{0}))",
    "sqrt": "sqrtf({0})",
    "rsqrt": "rsqrtf({0})",
    "square": "{0} * {0}",
    "neg": "-{0}",
    "mul_scalar": "{0} * {c}",
    "add_scalar": "{0} + {c}",
}


Step = tuple[str, tuple[str, ...], dict, str, str]  # (op, operand names, attributes, result name, result dtype)


def elementwise_steps(graph: KernelGraph) -> tuple[list[Step], list[str]]:
    """The program's element-wise computation as steps in order, and the names its outputs have among them. A
    graph-defined op (a search winner) is lowered by its block graph: without a loop, each block op on
    tiles is the same op on their elements, and the loop-free block's accum_sum is the identity; its outputs take
    the names of the kernel op's. Anything else is a SuperoptError naming the op."""
    steps = []
    alias: dict[str, str] = {}

    def name(t: str) -> str:
        return alias.get(t, t)

    def step(op: str, inputs: tuple[str, ...], attrs: dict, out: str, dtype: str) -> None:
        if op not in CUDA_EXPR or not OPS[op].elementwise:
            raise SuperoptError(f"{graph.name}: op '{op}' is not elementwise; the CUDA emitter cannot inline it")
        steps.append((op, tuple(name(i) for i in inputs), attrs, out, dtype))

    for op in graph.ops:
        if op.block is None:
            step(op.op, op.inputs, op.attrs, op.outputs[0], graph.tensors[op.outputs[0]].dtype)
            continue
        block = op.block
        if block.forloop_range != 1:
            raise SuperoptError(f"{graph.name}: a graph-defined op with a loop is not elementwise")
        alias |= {bi.name: name(src) for bi, src in zip(block.inputs, op.inputs)}
        for bop in block.ops:
            result = bop.outputs[0]
            if bop.op == "accum_sum":
                alias[result] = name(bop.inputs[0])
            else:
                alias[result] = f"{op.outputs[0]}.{result}"
                step(bop.op, bop.inputs, bop.attrs, alias[result], block.tensors[result].dtype)
        alias |= {out: name(bo.name) for bo, out in zip(block.outputs, op.outputs)}
    return steps, [name(o) for o in graph.outputs]


def emit_elementwise(graph: KernelGraph, name: str) -> str:
    """A `__device__ float name(float in0, ...)` computing one element of an elementwise program (or of a search
    winner for one: see elementwise_steps): one argument per graph input (its value, already in the input's
    dtype), each op rounded to its dtype, as the reference interpreter rounds."""
    if len(graph.outputs) != 1:
        raise SuperoptError(f"{graph.name}: an elementwise device function has one output, not {len(graph.outputs)}")
    args = {n: f"in{i}" for i, n in enumerate(graph.inputs)}
    lines = []
    steps, (result,) = elementwise_steps(graph)
    for k, (op, inputs, attrs, out, dtype) in enumerate(steps):
        if DTYPES[dtype].cuda_round is None:
            raise SuperoptError(f"{graph.name}: dtype {dtype} is not supported by the CUDA emitter (bfloat16, float32)")
        c = f"{float(attrs['c'])!r}f" if "c" in attrs else ""
        expr = CUDA_EXPR[op].format(*(args[i] for i in inputs), c=c)
        args[out] = f"t{k}"
        lines.append(f"  const float t{k} = {DTYPES[dtype].cuda_round}({expr});")
    params = ", ".join(f"float {args[n]}" for n in graph.inputs)
    body = "\n".join(lines)
    return f"__device__ __forceinline__ float {name}({params}) {{\n{body}\n  return {args[result]};\n}}\n"


def emit_dequant(graph: KernelGraph | BlockGraph, op: Op, name: str) -> str:
    """A `__device__ float name(q, scale[, zero], long row, long k)` computing value k of row `row` of dequant op
    `op` of `graph` (rows: every dim but the last, flattened; operands contiguous): q's int8 value or its int4
    byte's nibble (k % 2 picks the low or high one, swapped where high_first), less the group's zero, times its
    scale, in float32, rounded to the result's dtype as the reference interpreter rounds."""
    q, scale = (graph.tensors[i] for i in op.inputs[:2])
    out = DTYPES[scale.dtype]
    if out.cuda_round is None:
        raise SuperoptError(f"dequant: dtype {scale.dtype} is not supported by the CUDA emitter (bfloat16, float32)")
    group, values = op.attrs["group"], q.shape[-1] * DTYPES[q.dtype].packed
    element = "u16" if scale.dtype == "bfloat16" else "float"  # bf16 as raw bits (the prelude's bf2f)
    read = "bf2f({0}[g])" if scale.dtype == "bfloat16" else "{0}[g]"
    params = ["const unsigned char* q" if q.dtype == "int4" else "const signed char* q", f"const {element}* scale"]
    params += [f"const {element}* zero"] * (len(op.inputs) == 3)
    if q.dtype == "int4":
        shift = "(1 - k % 2) * 4" if op.attrs["high_first"] else "(k % 2) * 4"
        value = f"((((int)q[row * {q.shape[-1]}L + k / 2] >> ({shift})) & 15) ^ 8) - 8"  # 4-bit two's complement
    else:
        value = f"(int)q[row * {values}L + k]"
    shifted = f"(float)v - {read.format('zero')}" if len(op.inputs) == 3 else "(float)v"
    lines = [
        f"__device__ __forceinline__ float {name}({', '.join(params)}, long row, long k) {{",
        f"  const int v = {value};",
        f"  const long g = row * {values // group}L + k / {group};",
        f"  return {out.cuda_round}(({shifted}) * {read.format('scale')});",
        "}",
    ]
    return "\n".join(lines) + "\n"
