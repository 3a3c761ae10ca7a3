"""Programs from ONNX models (`.onnx`, through the onnx package) and torch.export programs (`.pt2`), and the
torch-op-to-IR mapping superopt.optimize shares.

Each source op maps to IR ops through a rule (`ATEN`, `ONNX`); an op without one, or one whose arguments the IR
cannot express, raises Unsupported naming it. Mapped programs are then canonicalized, so a program reads the same
whichever way it was written down: mul(x, sigmoid(x)) is silu(x), mul(x, x) is square(x), and x * rsqrt(mean(x^2,
-1) + eps) or x / sqrt(mean(x^2, -1) + eps) is rms_norm(x, eps); ops no output needs are dropped. A torch module
exported through ONNX or torch.export thus loads as the same program (same graph_hash) as its YAML spec.

The IR has no constants: weights (ONNX initializers, a .pt2's parameters and lifted constants) become program
inputs under their own names; scalars fold into mul_scalar and add_scalar. A linear layer's weight becomes an
input holding its transpose (named `<weight>_t`; superopt.optimize passes `w.t()`), since the IR has no transpose;
so does any input whose last two dims the program swaps (transpose, t, permute), as attention's k in q @ k.T.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from superopt.errors import IRError, SpecError, SuperoptError
from superopt.ir import KernelGraph, identifier
from superopt.ops import DTYPES, TORCH_TO_IR, TensorType, infer, opdef


class Unsupported(SuperoptError):
    """A source op the IR cannot express; the message names it."""


@dataclass(frozen=True)
class Val:
    """A tensor value while a program is mapped, by name."""

    name: str


@dataclass
class Node:
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]
    out: str


def fresh_name(base: str, taken: Collection[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


@dataclass
class Builder:
    """Collects a program's inputs and IR ops under fresh value names, canonicalizes and emits a KernelGraph."""

    name: str
    inputs: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    types: dict[str, TensorType] = field(default_factory=dict)
    transposed: dict[str, str] = field(default_factory=dict)  # input holding a transpose -> the input it transposes

    def input(self, name: str, shape: Sequence[int], dtype: str) -> Val:
        name = fresh_name(identifier(name), self.types)
        if dtype not in ("float16", "bfloat16", "float32"):
            raise Unsupported(f"input '{name}' is {dtype}; the IR computes on float16, bfloat16 and float32")
        self.inputs.append(name)
        self.types[name] = TensorType(tuple(int(s) for s in shape), dtype)
        return Val(name)

    def add(self, op: str, *inputs: Any, **attrs: Any) -> Val:
        """Adds IR op `op`, checked by the op table's shape rule (IRError), with its dims made non-negative."""
        if not all(isinstance(v, Val) for v in inputs):
            raise Unsupported(f"{op}: an operand is not a tensor of the program")
        d = opdef(op, "kernel")
        bound = d.bind_attrs(attrs)
        ty = infer(d, [self.types[v.name] for v in inputs], bound)  # also normalizes bound["dim"]
        node = Node(op, tuple(v.name for v in inputs), bound, fresh_name(op, self.types))
        self.nodes.append(node)
        self.types[node.out] = ty
        return Val(node.out)

    def producer(self, v: Val) -> Node | None:
        return next((n for n in reversed(self.nodes) if n.out == v.name), None)

    def transpose_of(self, v: Any) -> Val:
        """An input holding input `v` with its last two dims swapped (a linear layer's weight, k in q @ k.T);
        one per input, however often the program transposes it."""
        if not isinstance(v, Val) or v.name not in self.inputs:
            raise Unsupported(
                "a transpose of a computed tensor: the IR has no transpose op (an input is read transposed)"
            )
        for t, source in self.transposed.items():
            if source == v.name:
                return Val(t)
        shape, dtype = self.types[v.name].shape, self.types[v.name].dtype
        t = self.input(f"{v.name}_t", shape[:-2] + (shape[-1], shape[-2]), dtype)
        self.transposed[t.name] = v.name
        return t

    def build(self, outputs: Sequence[Val], names: Sequence[str] | None = None) -> KernelGraph:
        """The KernelGraph computing `outputs` (renamed to `names`), canonicalized; IRError if the IR rejects it."""
        canonicalize(self.nodes, self.types)
        needed = {v.name for v in outputs}
        kept = []
        for node in reversed(self.nodes):
            if node.out in needed:
                kept.append(node)
                needed.update(node.inputs)
        if len({v.name for v in outputs}) != len(outputs) or any(v.name in self.inputs for v in outputs):
            raise Unsupported("an output is repeated or is a program input")
        g = KernelGraph(self.name)
        for n in self.inputs:
            if n in needed:
                g.input(n, self.types[n].shape, self.types[n].dtype)
        rename = {n: n for n in self.inputs}
        for v, name in zip(outputs, names or [v.name for v in outputs]):  # outputs first: they keep their names
            rename[v.name] = fresh_name(identifier(name), rename.values())
        for node in reversed(kept):
            rename.setdefault(node.out, fresh_name(node.out, rename.values()))
            g.op(node.op, *(rename[i] for i in node.inputs), out=rename[node.out], **node.attrs)
        for v in outputs:
            g.output(rename[v.name])
        return g


# --- canonical forms --------------------------------------------------------------------------------------------


def canonicalize(nodes: list[Node], types: dict[str, TensorType]) -> None:
    """Rewrites in place, each node into its canonical op (see the module doc); dead nodes are left to build()."""
    made = {n.out: n for n in nodes}

    def producer(name: str, op: str, **attrs: Any) -> Node | None:
        n = made.get(name)
        return n if n is not None and n.op == op and all(n.attrs.get(k) == v for k, v in attrs.items()) else None

    def rms_eps(x: str, denominator: Node | None) -> float | None:
        """eps if `denominator` is sqrt or rsqrt of mean(square(x), -1, keepdim) + eps."""
        shifted = denominator and producer(denominator.inputs[0], "add_scalar")
        mean = shifted and producer(shifted.inputs[0], "mean", keepdim=True)
        square = mean and producer(mean.inputs[0], "square")
        if square and square.inputs[0] == x and mean.attrs["dim"] == len(types[x].shape) - 1:
            return shifted.attrs["c"]
        return None

    for n in nodes:
        if n.op == "mul" and n.inputs[0] == n.inputs[1]:
            n.op, n.inputs, n.attrs = "square", n.inputs[:1], {}
        elif n.op == "mul":
            for x, other in (n.inputs, n.inputs[::-1]):
                if (s := producer(other, "sigmoid")) and s.inputs[0] == x:
                    n.op, n.inputs, n.attrs = "silu", (x,), {}
                    break
                if (eps := rms_eps(x, producer(other, "rsqrt"))) is not None:
                    n.op, n.inputs, n.attrs = "rms_norm", (x,), {"eps": eps}
                    break
        elif n.op == "div" and (eps := rms_eps(n.inputs[0], producer(n.inputs[1], "sqrt"))) is not None:
            n.op, n.inputs, n.attrs = "rms_norm", n.inputs[:1], {"eps": eps}


# --- torch (ATen) ----------------------------------------------------------------------------------------------


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _arith(op: str) -> Callable[..., Val]:
    """add, sub, mul, div of two tensors or a tensor and a number (folded into add_scalar or mul_scalar)."""

    def rule(b: Builder, a: Any, c: Any, alpha: Any = 1) -> Val:
        if alpha != 1:
            raise Unsupported(f"{op} with alpha={alpha}")
        if isinstance(a, Val) and isinstance(c, Val):
            return b.add(op, a, c)
        if isinstance(a, Val) and _scalar(c):
            scaled = {"add": ("add_scalar", c), "sub": ("add_scalar", -c), "mul": ("mul_scalar", c)}
            if op == "div":
                scaled["div"] = ("mul_scalar", 1.0 / c)
            return b.add(scaled[op][0], a, c=float(scaled[op][1]))
        if _scalar(a) and isinstance(c, Val) and op in ("add", "mul"):
            return b.add(f"{op}_scalar", c, c=float(a))
        if _scalar(a) and isinstance(c, Val) and op == "sub":
            return b.add("add_scalar", b.add("neg", c), c=float(a))
        root = _scalar(a) and op == "div" and isinstance(c, Val) and b.producer(c)
        if root and root.op == "sqrt":  # a / sqrt(y) = a * rsqrt(y): how ONNX writes rsqrt
            r = b.add("rsqrt", Val(root.inputs[0]))
            return r if a == 1 else b.add("mul_scalar", r, c=float(a))
        raise Unsupported(f"{op} of {type(a).__name__} and {type(c).__name__}")

    return rule


def _unary(op: str) -> Callable[..., Val]:
    return lambda b, x: b.add(op, x)


def _reduce(op: str) -> Callable[..., Val]:
    def rule(b: Builder, x: Val, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Val:
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if len(dims) != 1 or dtype is not None:
            raise Unsupported(f"{op} over {len(dims) or 'all'} dims" + (" with a dtype" if dtype is not None else ""))
        return b.add(op, x, dim=dims[0], keepdim=bool(keepdim))

    return rule


def _pow(b: Builder, x: Val, p: Any) -> Val:
    ops = {2: "square", 0.5: "sqrt", -0.5: "rsqrt"}
    if not _scalar(p) or p not in ops:
        raise Unsupported(f"pow with exponent {p!r} (the IR has x^2, x^0.5 and x^-0.5)")
    return b.add(ops[p], x)


def _rms_norm(b: Builder, x: Val, shape: Any, weight: Any = None, eps: Any = None) -> Val:
    if len(shape) != 1:
        raise Unsupported("rms_norm over more than the last dim")
    if eps is None:  # torch's default: the dtype's machine epsilon
        eps = DTYPES[b.types[x.name].dtype].epsilon
    y = b.add("rms_norm", x, eps=float(eps))
    return b.add("mul", y, weight) if weight is not None else y


def _layer_norm(
    b: Builder, x: Val, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5, *rest: Any
) -> Val:
    if len(shape) != 1:
        raise Unsupported("layer_norm over more than the last dim")
    y = b.add("layer_norm", x, eps=float(eps))
    y = b.add("mul", y, weight) if weight is not None else y
    return b.add("add", y, bias) if bias is not None else y


def _linear(b: Builder, x: Val, w: Val, bias: Any = None) -> Val:
    y = b.add("matmul", x, b.transpose_of(w))
    return b.add("add", y, bias) if bias is not None else y


def _softmax(b: Builder, x: Val, dim: int, *flags: Any) -> Val:
    if any(flags) and flags != (None,):
        raise Unsupported("softmax with a dtype change")
    e = b.add("exp", b.add("sub", x, b.add("max", x, dim=dim, keepdim=True)))
    return b.add("div", e, b.add("sum", e, dim=dim, keepdim=True))


def _gelu(b: Builder, x: Val, approximate: str = "none") -> Val:
    ops = {"none": "gelu", "tanh": "gelu_tanh"}
    if approximate not in ops:
        raise Unsupported(f"gelu(approximate='{approximate}') (the IR has the exact gelu and gelu_tanh)")
    return b.add(ops[approximate], x)


def _transpose(b: Builder, x: Val, d0: int, d1: int) -> Val:
    rank = len(b.types[x.name].shape)
    if sorted((d0 % rank, d1 % rank)) != [rank - 2, rank - 1]:
        raise Unsupported(f"transpose of dims {d0} and {d1} of a rank-{rank} tensor (only the last two)")
    return b.transpose_of(x)


def _permute(b: Builder, x: Val, dims: Sequence[int]) -> Val:
    rank = len(b.types[x.name].shape)
    if [d % rank for d in dims] != [*range(rank - 2), rank - 1, rank - 2]:
        raise Unsupported(f"permute{tuple(dims)} (only one that swaps the last two dims)")
    return b.transpose_of(x)


def _cat(b: Builder, tensors: Sequence[Val], dim: int = 0) -> Val:
    out = tensors[0]
    for t in tensors[1:]:
        out = b.add("concat", out, t, dim=dim)
    return out


ATEN: dict[str, Callable[..., Val]] = {
    **{f"aten.{op}.Tensor": _arith(op) for op in ("add", "sub", "mul", "div")},
    **{f"aten.{op}.Scalar": _arith(op) for op in ("add", "sub", "mul", "div")},
    "aten.rsub.Scalar": lambda b, x, c, alpha=1: _arith("sub")(b, c, x, alpha),
    **{f"aten.{op}.default": _unary(op) for op in ("exp", "silu", "relu", "sigmoid", "sqrt", "rsqrt", "neg", "square")},
    "aten.gelu.default": _gelu,
    **{f"aten.{op}.default": lambda b, x, y: b.add("matmul", x, y) for op in ("matmul", "mm", "bmm")},
    "aten.linear.default": _linear,
    "aten.rms_norm.default": _rms_norm,
    "aten.layer_norm.default": _layer_norm,
    "aten.sum.dim_IntList": _reduce("sum"),
    "aten.mean.dim": _reduce("mean"),
    "aten.amax.default": _reduce("max"),
    # aten.argmax is left to torch: its int64 indices would come back as the IR argmax's float32 values, which
    # the torch code around a replaced part (indexing, embedding lookups) cannot take.
    "aten.pow.Tensor_Scalar": _pow,
    "aten.cat.default": _cat,
    "aten.transpose.int": _transpose,
    "aten.t.default": lambda b, x: _transpose(b, x, -2, -1),
    "aten.permute.default": _permute,
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    **{f"aten.{op}.default": lambda b, x, *rest, **kw: x for op in ("clone", "alias", "detach", "contiguous")},
}


def aten_dtype(val: Any) -> str:
    dtype = getattr(val, "dtype", None)
    return TORCH_TO_IR.get(dtype, str(dtype if dtype is not None else type(val).__name__))


def map_aten(b: Builder, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Val:
    """Maps one ATen call whose tensor arguments are already Vals; raises Unsupported naming it."""
    name = str(target)
    rule = ATEN.get(name)
    if rule is None:
        raise Unsupported(f"{name} has no IR op")
    try:
        return rule(b, *args, **kwargs)
    except TypeError as e:  # an overload's argument the rule does not take
        raise Unsupported(f"{name}: {e}") from None
    except (Unsupported, IRError) as e:
        raise Unsupported(f"{name}: {e}") from None


def check_node(node: Any) -> None:
    """Raises Unsupported (or IRError) unless FX node `node`, an ATen call, maps to the IR with its operands as
    the program's inputs."""
    b = Builder("probe")
    env = {}
    for a in node.all_input_nodes:
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"{node.target}: operand '{a.name}' is not a tensor")
        env[a] = b.input(a.name, tuple(val.shape), aten_dtype(val))
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
    out = map_aten(b, node.target, args, kwargs)
    if out.name not in b.inputs:  # an identity op (clone) has nothing to build
        b.build([out])


@dataclass
class FxProgram:
    """A mapped FX graph: the program, and for each of its inputs the FX node it reads and whether it reads that
    node's transpose (a linear layer's weight)."""

    graph: KernelGraph
    origin: dict[str, tuple[Any, bool]]


def from_fx(graph: Any, name: str, input_name: Callable[[Any], str] = lambda node: node.name) -> FxProgram:
    """The program of an FX graph of ATen ops whose nodes carry meta["val"]: its placeholders (and get_attr
    weights) are the program's inputs, the output node's values its outputs. Raises Unsupported naming the first
    op without an IR form."""
    b = Builder(name)
    env: dict[Any, Any] = {}

    def value(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a not in env:
                val = a.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    raise Unsupported(f"input '{a.name}' is not a tensor")
                env[a] = b.input(input_name(a), tuple(val.shape), aten_dtype(val))
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(value(x) for x in a)
        return a

    outputs: list[Any] = []
    for node in graph.nodes:
        if node.op == "call_function":
            env[node] = map_aten(b, node.target, value(node.args), {k: value(v) for k, v in node.kwargs.items()})
        elif node.op == "output":
            outputs = list(torch.utils._pytree.tree_leaves(node.args[0]))
        elif node.op in ("placeholder", "get_attr") and node.users:
            value(node)
    try:
        program = b.build([value(o) for o in outputs], [o.name for o in outputs])
    except IRError as e:
        raise Unsupported(f"the mapped program is ill-formed: {e}") from None
    origin = {v.name: (node, False) for node, v in env.items() if isinstance(v, Val) and v.name in b.inputs}
    origin |= {t: (origin[w][0], True) for t, w in b.transposed.items()}
    return FxProgram(program, origin)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences log records and warnings while torch reads a file: for a bad .pt2, torch.export.load logs a
    15-line traceback before it raises, and superopt reports the error it raises, in one line."""
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_pt2(path: str | Path) -> KernelGraph:
    """The program of a torch.export program saved with torch.export.save (.pt2)."""
    path = Path(path)
    try:
        with _quiet():
            ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a file that is not a .pt2)
        raise SpecError(f"{path}: not a torch.export program: {_first_line(e)}") from None
    names = {}
    for spec in ep.graph_signature.input_specs:
        names[spec.arg.name] = spec.target or spec.arg.name  # weights under their state_dict names
    try:
        return from_fx(ep.graph, path.stem, lambda n: names.get(n.name, n.name)).graph
    except Unsupported as e:
        raise SpecError(f"{path}: {e}") from None


# --- ONNX -------------------------------------------------------------------------------------------------------

ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def _onnx_reduce(op: str) -> Callable[..., Val]:
    def rule(b: Builder, args: list[Any], attrs: dict[str, Any]) -> Val:
        axes = attrs.get("axes", args[1] if len(args) > 1 else None)  # an attribute before opset 18, then an input
        if axes is None or len(axes) != 1:
            raise Unsupported(f"{op} over {'all' if axes is None else len(axes)} axes")
        return b.add(op, args[0], dim=int(axes[0]), keepdim=bool(attrs.get("keepdims", 1)))

    return rule


def _onnx_binary(op: str) -> Callable[..., Val]:
    return lambda b, args, attrs: _arith(op)(b, *args)


def _onnx_unary(op: str) -> Callable[..., Val]:
    return lambda b, args, attrs: b.add(op, args[0])


def _onnx_gemm(b: Builder, args: list[Any], attrs: dict[str, Any]) -> Val:
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise Unsupported("Gemm with transA, alpha or beta")
    y = b.add("matmul", args[0], b.transpose_of(args[1]) if attrs.get("transB", 0) else args[1])
    return b.add("add", y, args[2]) if len(args) > 2 and args[2] is not None else y


ONNX: dict[str, Callable[[Builder, list[Any], dict[str, Any]], Val]] = {
    "MatMul": lambda b, args, attrs: b.add("matmul", *args),
    "Gemm": _onnx_gemm,
    **{name: _onnx_binary(op) for name, op in (("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div"))},
    **{name: _onnx_unary(op) for name, op in (("Exp", "exp"), ("Relu", "relu"), ("Sigmoid", "sigmoid"))},
    **{name: _onnx_unary(op) for name, op in (("Sqrt", "sqrt"), ("Neg", "neg"), ("Gelu", "gelu"))},
    "Pow": lambda b, args, attrs: _pow(b, *args),
    "ReduceSum": _onnx_reduce("sum"),
    "ReduceMean": _onnx_reduce("mean"),
    "ReduceMax": _onnx_reduce("max"),  # ArgMax is not mapped: int64 indices, as aten.argmax's
    "Concat": lambda b, args, attrs: _cat(b, args, attrs["axis"]),
    "Softmax": lambda b, args, attrs: _softmax(b, args[0], attrs.get("axis", -1)),
    "Identity": lambda b, args, attrs: args[0],
}


def load_onnx(path: str | Path) -> KernelGraph:
    """The program of an ONNX model: its graph inputs and initializers (weights) are the program's inputs, except
    constants of one element, which fold into scalar ops. Needs the onnx package (`pip install superopt[onnx]`)."""
    path = Path(path)
    try:
        import onnx  # an optional dependency (the onnx extra): only ONNX files need it
        from onnx import helper, numpy_helper
    except ImportError:
        raise SpecError(f"{path}: reading ONNX models needs the onnx package: pip install 'superopt[onnx]'") from None
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 (protobuf's errors for a file that is not a model)
        raise SpecError(f"{path}: not an ONNX model: {_first_line(e)}") from None
    graph = model.graph
    if not graph.output:  # an empty file parses as an empty model
        raise SpecError(f"{path}: not an ONNX model: its graph has no outputs")
    b = Builder(identifier(path.stem))
    env: dict[str, Any] = {}
    inits = {t.name: t for t in graph.initializer}
    consts = {name: numpy_helper.to_array(t) for name, t in inits.items()}

    def tensor_input(name: str, shape: Sequence[int], elem: int) -> None:
        if elem not in ONNX_DTYPES:
            raise Unsupported(f"input '{name}' has ONNX element type {elem}")
        env[name] = b.input(name, shape, ONNX_DTYPES[elem])

    try:
        for vi in graph.input:
            if vi.name in consts:
                continue
            if not vi.type.tensor_type.HasField("shape"):
                raise Unsupported(f"input '{vi.name}' has no shape; export with static shapes")
            dims = vi.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                raise Unsupported(f"input '{vi.name}' has a dynamic dim; export with static shapes")
            tensor_input(vi.name, [d.dim_value for d in dims], vi.type.tensor_type.elem_type)
        for k, node in enumerate(graph.node):
            where = f"node {k} {node.op_type} '{node.name}'"
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
                continue
            args = []
            for name in node.input:
                if name in env or not name:
                    args.append(env.get(name))
                elif name in consts and node.op_type.startswith("Reduce"):
                    args.append(consts[name].reshape(-1).tolist())  # axes
                elif name in consts and consts[name].size == 1 and node.op_type not in ("Gemm", "MatMul"):
                    args.append(consts[name].item())
                elif name in inits:
                    tensor_input(name, list(inits[name].dims), inits[name].data_type)
                    args.append(env[name])
                else:
                    raise Unsupported(f"{where}: input '{name}' is not computed before it")
            rule = ONNX.get(node.op_type)
            if rule is None:
                raise Unsupported(f"{where}: {node.op_type} has no IR op")
            try:
                env[node.output[0]] = rule(b, args, attrs)
            except Unsupported as e:
                raise Unsupported(f"{where}: {e}") from None
        return b.build([env[o.name] for o in graph.output], [o.name for o in graph.output])
    except (Unsupported, IRError) as e:
        raise SpecError(f"{path}: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a node without its inputs, outputs or attributes
        raise SpecError(f"{path}: malformed ONNX graph: {_first_line(e)}") from None


def load(path: str | Path) -> KernelGraph:
    """An imported program by suffix: .onnx or .pt2."""
    path = Path(path)
    loaders = {".onnx": load_onnx, ".pt2": load_pt2}
    if path.suffix not in loaders:
        raise SpecError(f"{path}: not an importable model (expected .onnx or .pt2)")
    if not path.exists():
        raise SpecError(f"{path}: cannot read: No such file or directory")
    return loaders[path.suffix](path)
