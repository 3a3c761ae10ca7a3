"""The op table: every operator's name, arity, attributes and shape/dtype rule, defined once.

Each interpretation (reference evaluation, finite field, abstract expression, codegen, cost) keeps its own
rule table keyed by these names; `missing_rules` lists what a table does not cover.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from superopt.errors import IRError


@dataclass(frozen=True)
class DType:
    """One dtype of the IR, with each interpretation's name for it (one table, as the ops have)."""

    name: str  # the IR's
    bytes: int  # in device memory
    torch: torch.dtype  # the reference interpreter's and the importers'
    triton: str  # triton.language's type, in generated kernels
    triton_signature: str  # Triton's signature type (ahead-of-time compiles)
    cuda_round: str | None  # the CUDA emitter's rounding function to this dtype; None: not supported there
    epsilon: float  # machine epsilon (torch's default eps for rms_norm); 0 for the integer dtypes
    packed: int = 1  # values one element (one byte) holds: int4 packs two along the last dim

    @property
    def integer(self) -> bool:
        """Quantized weights: only dequant reads them (the IR computes in floats)."""
        return not self.torch.is_floating_point


# int8 holds one signed value a byte (torch.int8). An int4 tensor's IR shape counts bytes (its storage, a torch
# uint8 tensor): byte j of a row holds the signed 4-bit values 2j (bits 0-3) and 2j + 1 (bits 4-7), each in two's
# complement (-8..7), so a row of K values is K / 2 elements long. See dequant and docs/architecture.md.
DTYPES = {
    d.name: d
    for d in (
        DType("float16", 2, torch.float16, "tl.float16", "fp16", None, 2**-10),
        DType("bfloat16", 2, torch.bfloat16, "tl.bfloat16", "bf16", "rbf", 2**-7),
        DType("float32", 4, torch.float32, "tl.float32", "fp32", "", 2**-23),
        DType("int8", 1, torch.int8, "tl.int8", "i8", None, 0.0),
        DType("int4", 1, torch.uint8, "tl.uint8", "u8", None, 0.0, packed=2),
    )
}
TORCH_TO_IR = {d.torch: d.name for d in DTYPES.values() if d.packed == 1}  # a torch uint8 tensor is no int4 value

REQUIRED = object()  # marks an attribute without a default


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Its bytes in device memory."""
        return math.prod(self.shape) * DTYPES[self.dtype].bytes

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class OpDef:
    """One operator. `kind` groups ops that share rules; `levels` says where the op may appear."""

    name: str
    arity: int
    kind: str  # unary | binary | scalar | reduce | matmul | norm | rope | concat | dequant | accum | graph_def
    attrs: tuple[tuple[str, Any], ...] = ()  # (name, default or REQUIRED), in positional order
    levels: frozenset[str] = frozenset({"kernel", "block"})
    doc: str = ""
    dtype: str | None = None  # the result's dtype where the op fixes it (argmax's indices); None: the operands'
    optional: tuple[str, ...] = ()  # tensor operands after the `arity` required ones that may be left out (by name)

    @property
    def elementwise(self) -> bool:
        return self.kind in ("unary", "binary", "scalar")

    @property
    def arity_text(self) -> str:
        return f"{self.arity} to {self.arity + len(self.optional)}" if self.optional else str(self.arity)

    def bind_attrs(self, given: dict[str, Any]) -> dict[str, Any]:
        """Checks names and types of attributes, fills defaults; raises IRError naming what is wrong."""
        known = dict(self.attrs)
        for key in given:
            if key not in known:
                expected = ", ".join(known) or "none"
                raise IRError(f"unknown keyword '{key}' for {self.name} (expected: {expected})")
        out = {}
        for key, default in self.attrs:
            if key in given:
                out[key] = _check_attr(self.name, key, given[key], default)
            elif default is REQUIRED:
                raise IRError(f"{self.name} needs the argument '{key}'")
            else:
                out[key] = default
        return out


ATTR_TYPES = {"dim": int, "keepdim": bool, "eps": float, "c": float, "group": int, "high_first": bool}


def _check_attr(op: str, key: str, value: Any, default: Any) -> Any:
    want = ATTR_TYPES[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise IRError(f"{op}: argument '{key}' must be {want.__name__}, got {value!r}")
    if want is float and value != value:
        raise IRError(f"{op}: argument '{key}' is NaN")
    return value


# --- shape/dtype rules --------------------------------------------------------------------------------------


def _same_dtype(op: str, types: list[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        raise IRError(f"{op}: operand dtypes differ: {', '.join(str(t) for t in types)}")
    return types[0].dtype


def broadcast_shapes(op: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            raise IRError(f"{op}: shapes {list(a)} and {list(b)} do not broadcast (dim -{i}: {x} vs {y})")
        out.append(max(x, y) if 1 in (x, y) else x)
    return tuple(reversed(out))


def normalize_dim(op: str, dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise IRError(f"{op}: dim {dim} is out of range for a tensor of rank {rank}")
    return dim % rank


def _infer_unary(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    return ins[0]


def _infer_binary(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    return TensorType(broadcast_shapes(op.name, ins[0].shape, ins[1].shape), _same_dtype(op.name, ins))


def _infer_reduce(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    shape = list(ins[0].shape)
    dim = attrs["dim"]
    if attrs["keepdim"]:
        shape[dim] = 1
    else:
        del shape[dim]
    return TensorType(tuple(shape), op.dtype or ins[0].dtype)


def _infer_matmul(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    a, b = ins
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise IRError(f"matmul: operands need rank >= 2, got {list(a.shape)} and {list(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise IRError(f"matmul: inner dims differ: {list(a.shape)} @ {list(b.shape)} ({a.shape[-1]} vs {b.shape[-2]})")
    batch = broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), _same_dtype(op.name, ins))


def _infer_concat(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    a, b = ins
    dim = attrs["dim"]
    if len(a.shape) != len(b.shape) or any(x != y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i != dim):
        raise IRError(f"concat: shapes {list(a.shape)} and {list(b.shape)} differ outside dim {dim}")
    shape = list(a.shape)
    shape[dim] += b.shape[dim]
    return TensorType(tuple(shape), _same_dtype(op.name, ins))


def _infer_rope(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    x, cos, sin = ins
    if not x.shape or x.shape[-1] % 2:
        raise IRError(f"rope: the rotated dim must be even, got {list(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if broadcast_shapes(op.name, x.shape, t.shape) != x.shape:
            raise IRError(f"rope: {name} {list(t.shape)} does not broadcast to x {list(x.shape)}")
    _same_dtype(op.name, ins)
    return x


def _infer_dequant(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    q, scale = ins[0], ins[1]
    group = attrs["group"]
    if not DTYPES[q.dtype].integer:
        raise IRError(f"dequant: q must be int8 or int4, got {q}")
    if DTYPES[scale.dtype].integer:
        raise IRError(f"dequant: scale must be a float tensor, got {scale}")
    if len(ins) == 3 and ins[2] != scale:
        raise IRError(f"dequant: zero {ins[2]} must have the scale's type {scale}")
    if attrs["high_first"] and q.dtype != "int4":
        raise IRError("dequant: high_first orders the two values of an int4 byte; q is int8")
    if group < 1:
        raise IRError(f"dequant: group must be >= 1, got {group}")
    values = q.shape[-1] * DTYPES[q.dtype].packed
    if len(scale.shape) != len(q.shape) or scale.shape[:-1] != q.shape[:-1]:
        raise IRError(f"dequant: scale {list(scale.shape)} and q {list(q.shape)} differ outside the last dim")
    if values % group:
        raise IRError(f"dequant: a row of {values} values does not split into groups of {group}")
    if values // group != scale.shape[-1]:
        raise IRError(
            f"dequant: a row of {values} values in groups of {group} needs {values // group} scales, "
            f"scale has {scale.shape[-1]}"
        )
    return TensorType(q.shape[:-1] + (values,), scale.dtype)


def _infer_accum(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    if op.name == "accum_rescaled_sum":
        x, m = ins
        if broadcast_shapes(op.name, x.shape, m.shape) != x.shape:
            raise IRError(f"accum_rescaled_sum: scale {list(m.shape)} does not broadcast to {list(x.shape)}")
        _same_dtype(op.name, ins)
        return x
    x = ins[0]
    if op.name in ("accum_sum", "accum_max"):
        return x
    return TensorType(x.shape[:-1] + (1,), x.dtype)  # the *_last accumulators reduce the last dim


INFER: dict[str, Callable[[OpDef, list[TensorType], dict], TensorType]] = {
    "unary": _infer_unary,
    "scalar": _infer_unary,
    "norm": _infer_unary,
    "binary": _infer_binary,
    "reduce": _infer_reduce,
    "matmul": _infer_matmul,
    "rope": _infer_rope,
    "concat": _infer_concat,
    "dequant": _infer_dequant,
    "accum": _infer_accum,
}


def infer(op: OpDef, ins: list[TensorType], attrs: dict) -> TensorType:
    """The output type of a predefined op; raises IRError naming the problem."""
    if not op.arity <= len(ins) <= op.arity + len(op.optional):
        raise IRError(f"{op.name} takes {op.arity_text} tensor operand(s), got {len(ins)}")
    if op.kind != "dequant":
        for t in ins:
            if DTYPES[t.dtype].integer:
                raise IRError(f"{op.name}: operand {t} is an integer tensor; only dequant reads those")
    if op.kind in ("reduce", "concat"):
        rank = len(ins[0].shape)
        attrs["dim"] = normalize_dim(op.name, attrs["dim"], rank)
    return INFER[op.kind](op, ins, attrs)


# --- the table ----------------------------------------------------------------------------------------------

_DIM = (("dim", REQUIRED), ("keepdim", False))


def _table(*defs: OpDef) -> dict[str, OpDef]:
    return {d.name: d for d in defs}


OPS: dict[str, OpDef] = _table(
    OpDef("matmul", 2, "matmul", doc="a @ b, batched over leading dims"),
    *(OpDef(n, 2, "binary", doc=f"torch.{n}, broadcasting") for n in ("add", "sub", "mul", "div")),
    *(
        OpDef(n, 1, "unary", doc=f"elementwise {n}")
        for n in ("exp", "silu", "gelu", "relu", "sigmoid", "sqrt", "rsqrt", "square", "neg")
    ),
    OpDef("gelu_tanh", 1, "unary", doc="gelu's tanh approximation (torch's approximate='tanh')"),
    OpDef("mul_scalar", 1, "scalar", (("c", REQUIRED),), doc="x * c"),
    OpDef("add_scalar", 1, "scalar", (("c", REQUIRED),), doc="x + c"),
    OpDef("sum", 1, "reduce", _DIM, doc="sum over dim"),
    OpDef("max", 1, "reduce", _DIM, doc="max over dim (values only)"),
    OpDef(
        "argmax",
        1,
        "reduce",
        _DIM,
        doc="torch.argmax over dim: the index of the first of equal maxima, as a float32 value whatever the "
        "operand's dtype (the IR's dtypes are floats; float32 holds every index below 2^24 exactly); the shape is "
        "max's. Inside a block graph it indexes the tile. With a NaN along dim the index is backend-defined (the "
        "reference takes the first NaN, as torch does), as max's value is",
        dtype="float32",
    ),
    OpDef("mean", 1, "reduce", _DIM, doc="mean over dim"),
    OpDef("rms_norm", 1, "norm", (("eps", 1e-6),), doc="x / sqrt(mean(x^2, -1) + eps), no weight"),
    OpDef(
        "layer_norm",
        1,
        "norm",
        (("eps", 1e-5),),
        doc="(x - mean(x, -1)) / sqrt(var(x, -1) + eps), the biased variance, no weight or bias",
    ),
    OpDef(
        "rope",
        3,
        "rope",
        doc="x * cos + rotate_half(x) * sin over the last dim (HF's rotary embedding; rotate_half(x) = "
        "[-x2, x1] for the halves x1, x2 of the last dim; cos and sin broadcast to x)",
    ),
    OpDef("concat", 2, "concat", (("dim", REQUIRED),), doc="torch.cat([a, b], dim)"),
    OpDef(
        "dequant",
        2,
        "dequant",
        (("group", REQUIRED), ("high_first", False)),
        optional=("zero",),
        doc="dequant(q, scale, zero=None, group=G): quantized weights as floats. q is int8 [..., N, K] or int4 "
        "[..., N, K / 2] (two signed values a byte, value 2j in the low nibble of byte j, unless high_first); "
        "scale, and zero if given, are one float dtype, shape [..., N, K / G]: value k of a row is "
        "(q_k - zero_{k // G}) * scale_{k // G}, the difference and the product in float32, then rounded to "
        "scale's dtype, the result's; zero=None is zero 0 (symmetric). The result is [..., N, K], groups and "
        "packing along the last dim: a linear layer's [out, in] weight, read by matmul(w, x) for x [in, M]",
    ),
    OpDef("graph_def", -1, "graph_def", levels=frozenset({"kernel"}), doc="a kernel whose body is a block graph"),
    *(
        OpDef(n, 1, "accum", attrs, levels=frozenset({"block"}), doc=doc)
        for n, attrs, doc in (
            ("accum_sum", (), "sum over loop iterations"),
            ("accum_sum_last", (), "sum over loop iterations and the tile's last dim (kept, size 1)"),
            ("accum_mean_last", (), "accum_sum_last / (iterations * tile's last dim)"),
            ("accum_rms_last", (("eps", 1e-6),), "sqrt(accum_mean_last(x^2) + eps)"),
            ("accum_max", (), "elementwise max over loop iterations"),
        )
    ),
    OpDef(
        "accum_rescaled_sum",
        2,
        "accum",
        levels=frozenset({"block"}),
        doc="sum_i x_i * exp(m_i - max_j m_j): online softmax's rescaled sum; m broadcasts to x",
    ),
)

ACCUMULATORS = frozenset(n for n, d in OPS.items() if d.kind == "accum")


def opdef(name: str, level: str = "kernel") -> OpDef:
    d = OPS.get(name)
    if d is None:
        raise IRError(f"unknown op '{name}'")
    if level not in d.levels:
        raise IRError(f"op '{name}' is not allowed in a {level} graph")
    return d


def missing_rules(table: dict[str, Any], level: str | None = None) -> list[str]:
    """The ops (of `level`, or all) that an interpretation's rule table does not cover."""
    return sorted(n for n, d in OPS.items() if (level is None or level in d.levels) and n not in table)
