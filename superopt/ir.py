"""The µGraph IR: kernel graphs of kernel ops, graph-defined ops holding block graphs, and thread graphs.

A graph keeps its tensors by name (`tensors`), its ops in topological order (`ops`), and its inputs and outputs
by name. Graphs are built through the builder methods (one per op of the table, generated below), which check
every op as it is added: a graph that exists is well-formed. See docs/architecture.md, "The IR".
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from superopt.errors import IRError
from superopt.ops import ACCUMULATORS, DTYPES, OPS, TensorType, infer, opdef


@dataclass
class Op:
    """One op: `op` names its entry in the op table; `block` is set for graph-defined ops."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    block: BlockGraph | None = None


@dataclass(frozen=True)
class Tensor:
    """A handle to a named tensor of a graph, returned by the builder methods."""

    graph: _GraphBase = field(repr=False, compare=False)
    name: str

    @property
    def type(self) -> TensorType:
        return self.graph.tensors[self.name]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype


TensorLike = Tensor | str

# Sizes beyond these are mistakes, not programs: refused when a tensor is defined, before anything is allocated
# or searched (a dim is a CUDA grid's x limit; a tensor of 2^40 elements is 2 TB in float16).
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**40


def identifier(text: str, prefix: str = "t", limit: int = 64) -> str:
    """`text` made safe to paste into generated source (Python, Triton, CUDA C++) and into a file name: ASCII
    letters, digits and '_' only (any other character becomes '_'), at most `limit` characters, and `prefix_` in
    front of an empty name, a leading digit or a Python keyword. The one way a name from a file reaches code."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in text)[:limit]
    return name if name and not name[0].isdigit() and not keyword.iskeyword(name) else f"{prefix}_{name}"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise IRError(f"bad dtype '{dtype}' (expected one of: {', '.join(DTYPES)})")
    return dtype


class _GraphBase:
    """What kernel and block graphs share: named tensors, ops in order, fresh names, the op builder."""

    level = ""

    def __init__(self) -> None:
        self.tensors: dict[str, TensorType] = {}
        self.ops: list[Op] = []

    def _name(self, t: TensorLike) -> str:
        name = t.name if isinstance(t, Tensor) else t
        if isinstance(t, Tensor) and t.graph is not self:
            raise IRError(f"tensor '{name}' belongs to another graph")
        if not isinstance(name, str) or name not in self.tensors:
            raise IRError(f"unknown tensor '{name}'")
        return name

    def _define(self, name: str | None, prefix: str, ty: TensorType) -> str:
        if name is None:
            name, n = prefix, 0
            while name in self.tensors:
                n += 1
                name = f"{prefix}_{n}"
        elif not isinstance(name, str) or not name.isidentifier():
            raise IRError(f"bad tensor name {name!r}")
        elif name in self.tensors:
            raise IRError(f"tensor name '{name}' is already defined")
        self._check_type(name, ty)
        self.tensors[name] = ty
        return name

    def _check_type(self, name: str, ty: TensorType) -> None:
        if any(d > MAX_DIM for d in ty.shape) or math.prod(ty.shape) > MAX_ELEMENTS:
            raise IRError(
                f"tensor '{name}' of shape {list(ty.shape)} is too large "
                f"(limits: {MAX_DIM} a dim, 2^40 = {MAX_ELEMENTS} elements a tensor)"
            )

    def op(self, name: str, *args: Any, out: str | None = None, **attrs: Any) -> Tensor:
        """Adds predefined op `name`: its tensor operands first, then its attributes (positional or keyword)."""
        d = opdef(name, self.level)
        n_tensors = d.arity
        while n_tensors < min(len(args), d.arity + len(d.optional)) and (
            isinstance(args[n_tensors], (Tensor, str)) or args[n_tensors] is None
        ):
            n_tensors += 1  # optional operands given by position (None: left out)
        if len(args) < n_tensors or any(not isinstance(a, (Tensor, str)) for a in args[: d.arity]):
            raise IRError(f"{name} takes {d.arity_text} tensor operand(s), got {_count_tensors(args)}")
        extra = args[n_tensors:]
        if any(isinstance(a, Tensor) for a in extra) or None in args[d.arity : n_tensors - 1]:
            raise IRError(f"{name} takes {d.arity_text} tensor operand(s), got {_count_tensors(args)}")
        given = [a for a in args[:n_tensors] if a is not None]
        for key in d.optional[n_tensors - d.arity :]:  # the others by name, in order; None leaves one out
            value = attrs.pop(key, None)
            if value is None:
                break
            given.append(value)
        if len(extra) > len(d.attrs):
            raise IRError(f"{name} takes at most {len(d.attrs)} argument(s) after its tensors, got {len(extra)}")
        for (key, _), value in zip(d.attrs, extra):
            if key in attrs:
                raise IRError(f"{name}: argument '{key}' given twice")
            attrs[key] = value
        inputs = tuple(self._name(a) for a in given)
        try:
            bound = d.bind_attrs(attrs)
        except OverflowError:  # an integer too large for a float attribute
            raise IRError(f"{name}: an argument is too large") from None
        _check_numbers(name, bound)
        ty = infer(d, [self.tensors[i] for i in inputs], bound)
        self._check_operands(name, inputs)
        out_name = self._define(out, name, ty)
        self.ops.append(Op(name, inputs, (out_name,), bound))
        self._after_op(self.ops[-1])
        return Tensor(self, out_name)

    def _check_operands(self, op: str, inputs: tuple[str, ...]) -> None:
        pass

    def _after_op(self, op: Op) -> None:
        pass

    def producers(self) -> dict[str, Op]:
        return {o: op for op in self.ops for o in op.outputs}

    def consumers(self) -> dict[str, list[Op]]:
        users: dict[str, list[Op]] = {name: [] for name in self.tensors}
        for op in self.ops:
            for i in dict.fromkeys(op.inputs):
                users[i].append(op)
        return users


def _check_numbers(op: str, attrs: dict[str, Any]) -> None:
    """Float attributes must be finite, eps positive: inf or a non-positive eps would compute nan silently."""
    for key, value in attrs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise IRError(f"{op}: argument '{key}' must be finite, got {value!r}")
    if "eps" in attrs and attrs["eps"] <= 0:
        raise IRError(f"{op}: eps must be > 0, got {attrs['eps']!r}")


def _count_tensors(args: Iterable[Any]) -> int:
    return sum(isinstance(a, (Tensor, str)) for a in args)


def _install_builder_methods(cls: type, level: str) -> None:
    """One builder method per op of `level` in the table: `g.matmul(a, b)`, `g.rms_norm(x, eps=1e-6)`, ..."""
    for name, d in OPS.items():
        if level in d.levels and d.kind != "graph_def":

            def method(self: _GraphBase, *args: Any, _op: str = name, **kw: Any) -> Tensor:
                return self.op(_op, *args, **kw)

            method.__name__ = name
            method.__doc__ = d.doc
            setattr(cls, name, method)


# --- block graphs -------------------------------------------------------------------------------------------


@dataclass
class BlockInput:
    """A block input: `source` is the kernel tensor's type; `imap[a]` is the dim grid axis a splits (None:
    every block sees all of it); `fmap` is the dim split across the forloop's iterations (None: the same tile
    every iteration)."""

    name: str
    source: TensorType
    imap: tuple[int | None, ...]
    fmap: int | None


@dataclass
class BlockOutput:
    """A block output: `omap[a]` is the dim of the kernel tensor along which grid axis a concatenates."""

    name: str
    omap: tuple[int | None, ...]


def _check_map(what: str, entries: Iterable[int | None], rank: int) -> None:
    seen = set()
    for a, d in enumerate(entries):
        if d is None:
            continue
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < rank:
            raise IRError(f"{what}: grid axis {a} maps to dim {d!r}, not a dim of a rank-{rank} tensor")
        if d in seen:
            raise IRError(f"{what}: two grid axes map to dim {d}")
        seen.add(d)


def tile_shape(
    what: str,
    source: tuple[int, ...],
    grid: tuple[int, ...],
    imap: tuple[int | None, ...],
    fmap: int | None,
    forloop_range: int,
) -> tuple[int, ...]:
    """The shape of one block's tile in one loop iteration; raises IRError where a dim does not divide."""
    shape = list(source)
    for axis, dim in enumerate(imap):
        if dim is not None:
            if shape[dim] % grid[axis]:
                raise IRError(
                    f"{what}: dim {dim} of size {shape[dim]} is not divisible by grid axis {axis} (size {grid[axis]})"
                )
            shape[dim] //= grid[axis]
    if fmap is not None:
        if shape[fmap] % forloop_range:
            raise IRError(
                f"{what}: dim {fmap} of size {shape[fmap]} per block is not divisible by the forloop range "
                f"{forloop_range}"
            )
        shape[fmap] //= forloop_range
    return tuple(shape)


class BlockGraph(_GraphBase):
    """What one thread block of a graph-defined op computes.

    Tiles before an accumulator are per loop iteration; accumulators combine the iterations; ops after them
    (the epilogue) run once per block. Every path from a block input to a block output passes exactly one
    accumulator: `after_loop` records, per tile, which side of the accumulators it is on.
    """

    level = "block"

    def __init__(self, grid: Iterable[int], forloop_range: int = 1, block_size: int = 128) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.forloop_range = forloop_range
        self.block_size = block_size
        if not 1 <= len(self.grid) <= 3 or any(
            isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.grid
        ):
            raise IRError(f"grid must have 1 to 3 positive axes, got {list(self.grid)}")
        if isinstance(forloop_range, bool) or not isinstance(forloop_range, int) or forloop_range < 1:
            raise IRError(f"forloop_range must be a positive integer, got {forloop_range!r}")
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, int)
            or not (32 <= block_size <= 1024 and block_size % 32 == 0)
        ):
            raise IRError(f"block_size must be a multiple of 32 in [32, 1024], got {block_size!r}")
        self.inputs: list[BlockInput] = []
        self.outputs: list[BlockOutput] = []
        self.after_loop: dict[str, bool] = {}
        self.sources: list[Tensor | None] = []  # builder convenience: the kernel tensors given to input()

    def input(
        self, source: Tensor | TensorType, imap: Iterable[int | None], fmap: int | None = None, name: str | None = None
    ) -> Tensor:
        """A block input tiling kernel tensor `source` (a handle, or just its type) by imap and fmap."""
        ty = source.type if isinstance(source, Tensor) else source
        what = f"block input {len(self.inputs)}"
        imap = tuple(imap)
        if len(imap) != len(self.grid):
            raise IRError(f"{what}: imap has {len(imap)} entries for a grid of {len(self.grid)} axes")
        _check_map(f"{what} imap", imap, len(ty.shape))
        if fmap is not None:
            _check_map(f"{what} fmap", (fmap,), len(ty.shape))
        tile = tile_shape(what, ty.shape, self.grid, imap, fmap, self.forloop_range)
        prefix = f"{source.name}_tile" if isinstance(source, Tensor) else "in"
        tile_name = self._define(name, prefix, TensorType(tile, ty.dtype))
        self.inputs.append(BlockInput(tile_name, ty, imap, fmap))
        self.after_loop[tile_name] = False
        self.sources.append(source if isinstance(source, Tensor) else None)
        return Tensor(self, tile_name)

    def output(self, t: TensorLike, omap: Iterable[int | None]) -> None:
        name = self._name(t)
        omap = tuple(omap)
        what = f"block output {len(self.outputs)} ({name})"
        if len(omap) != len(self.grid):
            raise IRError(f"{what}: omap has {len(omap)} entries for a grid of {len(self.grid)} axes")
        _check_map(f"{what} omap", omap, len(self.tensors[name].shape))
        for axis, (size, dim) in enumerate(zip(self.grid, omap)):
            if size > 1 and dim is None:
                raise IRError(f"{what}: omap misses grid axis {axis} of size {size}; blocks would overwrite each other")
        if not self.after_loop[name]:
            raise IRError(f"{what}: the path from the block inputs to '{name}' passes no accumulator")
        self.outputs.append(BlockOutput(name, omap))

    def output_type(self, out: BlockOutput) -> TensorType:
        tile = self.tensors[out.name]
        shape = list(tile.shape)
        for size, dim in zip(self.grid, out.omap):
            if dim is not None:
                shape[dim] *= size
        return TensorType(tuple(shape), tile.dtype)

    def _check_operands(self, op: str, inputs: tuple[str, ...]) -> None:
        sides = {self.after_loop[i] for i in inputs}
        if op in ACCUMULATORS:
            if True in sides:
                raise IRError(f"{op}: its operand already passed an accumulator; a path may pass only one")
        elif len(sides) > 1:
            before = [i for i in inputs if not self.after_loop[i]]
            raise IRError(
                f"{op}: mixes tiles from inside the loop ({', '.join(before)}) with tiles after an accumulator; "
                "every path from a block input to an output passes exactly one accumulator"
            )

    def _after_op(self, op: Op) -> None:
        self.after_loop[op.outputs[0]] = op.op in ACCUMULATORS or any(self.after_loop[i] for i in op.inputs)


_install_builder_methods(BlockGraph, "block")


def thread_graphs(block: BlockGraph) -> list[tuple[int, ...]]:
    """The thread graphs of a block graph, as sorted op indices (groups of two or more ops).

    An elementwise op joins its consumer's thread graph when that consumer is elementwise too, is its only
    consumer, and its result is not a block output: each group is a tree of elementwise ops whose inner results
    never leave registers. Formed by rule, not searched.
    """
    users = block.consumers()
    outputs = {o.name for o in block.outputs}
    index = {id(op): i for i, op in enumerate(block.ops)}
    root = list(range(len(block.ops)))
    for i in reversed(range(len(block.ops))):  # consumers come later, so their root is known first
        op = block.ops[i]
        out = op.outputs[0]
        if OPS[op.op].elementwise and out not in outputs and len(users[out]) == 1:
            nxt = index[id(users[out][0])]
            if OPS[block.ops[nxt].op].elementwise:
                root[i] = root[nxt]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(root):
        groups.setdefault(r, []).append(i)
    return sorted(tuple(g) for g in groups.values() if len(g) > 1)


# --- kernel graphs ------------------------------------------------------------------------------------------


class KernelGraph(_GraphBase):
    """A DAG of kernel ops over device tensors; each op is one kernel launch."""

    level = "kernel"

    def __init__(self, name: str = "graph") -> None:
        super().__init__()
        if not name.isprintable():  # it is printed (show, validate, search); a control character or a lone
            raise IRError(f"bad graph name {name!r}")  # surrogate would break the line or the output encoding
        self.name = name
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.search_settings: dict[str, Any] = {}  # a spec's optional `search:` section; not part of the program

    def input(self, name: str, shape: Iterable[int], dtype: str = "float16") -> Tensor:
        shape = tuple(shape)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise IRError(f"input '{name}': shape must be positive integers, got {list(shape)}")
        ty = TensorType(shape, check_dtype(dtype))
        self.inputs.append(self._define(name, name, ty))
        return Tensor(self, name)

    def _check_type(self, name: str, ty: TensorType) -> None:
        if not ty.shape:
            raise IRError(f"tensor '{name}' has rank 0; scalars are not supported (give it shape [1])")
        super()._check_type(name, ty)

    def output(self, t: TensorLike) -> None:
        name = self._name(t)
        if name in self.outputs:
            raise IRError(f"tensor '{name}' is already an output")
        self.outputs.append(name)

    def block_graph(self, grid: Iterable[int], forloop_range: int = 1, block_size: int = 128) -> BlockGraph:
        """A new block graph, to fill through its builder methods and then pass to `graph_def`."""
        return BlockGraph(grid, forloop_range, block_size)

    def graph_def(
        self, block: BlockGraph, inputs: Iterable[TensorLike] | None = None, outs: Iterable[str] | None = None
    ) -> list[Tensor]:
        """Adds a graph-defined op running `block`; its inputs default to the tensors given to block.input()."""
        if inputs is None and None in block.sources:
            raise IRError("graph_def: the block graph's inputs were given as types; pass inputs=[...]")
        given = [t for t in block.sources if t is not None] if inputs is None else list(inputs)
        names = tuple(self._name(t) for t in given)
        if len(names) != len(block.inputs):
            raise IRError(f"graph_def: the block graph has {len(block.inputs)} inputs, got {len(names)} tensors")
        for i, (name, bi) in enumerate(zip(names, block.inputs)):
            if self.tensors[name] != bi.source:
                raise IRError(
                    f"graph_def: input {i} '{name}' is {self.tensors[name]}, the block graph expects {bi.source}"
                )
        if not block.outputs:
            raise IRError("graph_def: the block graph has no outputs")
        out_names = list(outs) if outs is not None else [None] * len(block.outputs)
        if len(out_names) != len(block.outputs):
            raise IRError(f"graph_def: {len(out_names)} output names for {len(block.outputs)} block outputs")
        outputs = tuple(self._define(n, "graph_def", block.output_type(o)) for n, o in zip(out_names, block.outputs))
        self.ops.append(Op("graph_def", names, outputs, {}, block))
        return [Tensor(self, o) for o in outputs]

    def input_types(self) -> list[TensorType]:
        return [self.tensors[n] for n in self.inputs]

    def __str__(self) -> str:
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<KernelGraph {self.name}: {len(self.inputs)} inputs, {len(self.ops)} ops, {len(self.outputs)} outputs>"


_install_builder_methods(KernelGraph, "kernel")

Graph = KernelGraph


# --- the text form: one op a line, a person can read and diff it -----------------------------------------


def rename_inputs(graph: KernelGraph, names: list[str], name: str) -> KernelGraph:
    """`graph` named `name`, its inputs renamed, in order, to `names`; another tensor keeps its name unless one
    of `names` takes it. A result is stored under a name-blind hash, so a cached winner serves every program with
    that hash, whatever the program calls its inputs."""
    if len(names) != len(graph.inputs):
        raise IRError(f"{graph.name}: {len(graph.inputs)} inputs, {len(names)} names given")
    mapping = dict(zip(graph.inputs, names))
    taken = set(names)
    for t in graph.tensors:
        if t not in mapping:
            new, k = t, 0
            while new in taken:
                k += 1
                new = f"{t}_{k}"
            mapping[t] = new
            taken.add(new)
    out = KernelGraph(name)
    out.tensors = {mapping[t]: ty for t, ty in graph.tensors.items()}
    out.inputs = [mapping[t] for t in graph.inputs]
    out.outputs = [mapping[t] for t in graph.outputs]
    out.ops = [
        Op(op.op, tuple(mapping[t] for t in op.inputs), tuple(mapping[t] for t in op.outputs), op.attrs, op.block)
        for op in graph.ops
    ]
    return out


def format_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return repr(v)


def _fmt_call(op: str, args: list[str], attrs: dict[str, Any]) -> str:
    return f"{op}({', '.join(args + [f'{k}={format_value(v)}' for k, v in attrs.items()])})"


def _fmt_op(graph: KernelGraph | BlockGraph, op: Op) -> str:
    targets = ", ".join(f"{o}: {graph.tensors[o]}" for o in op.outputs)
    return f"{targets} = {_fmt_call(op.op, list(op.inputs), op.attrs)}"


def format_block(block: BlockGraph, sources: tuple[str, ...], indent: str) -> list[str]:
    """The body of a graph-defined op: inputs, loop ops, then the epilogue after a marker line."""
    lines = [
        f"{indent}{bi.name}: {block.tensors[bi.name]} = "
        + _fmt_call("input", [src], {"imap": bi.imap, "fmap": bi.fmap})
        for src, bi in zip(sources, block.inputs)
    ]
    in_loop = [op for op in block.ops if not any(block.after_loop[i] for i in op.inputs)]
    epilogue = [op for op in block.ops if any(block.after_loop[i] for i in op.inputs)]
    lines += [indent + _fmt_op(block, op) for op in in_loop]
    if epilogue:
        lines.append(f"{indent}# after the loop")
        lines += [indent + _fmt_op(block, op) for op in epilogue]
    for chain in thread_graphs(block):
        lines.append(f"{indent}# thread graph: {', '.join(block.ops[i].outputs[0] for i in chain)}")
    lines.append(f"{indent}return " + ", ".join(f"{o.name} (omap={format_value(o.omap)})" for o in block.outputs))
    return lines


def format_graph(graph: KernelGraph) -> str:
    params = ", ".join(f"{n}: {graph.tensors[n]}" for n in graph.inputs)
    lines = [f"def {graph.name}({params}):"]
    for op in graph.ops:
        if op.block is None:
            lines.append("    " + _fmt_op(graph, op))
            continue
        b = op.block
        head = _fmt_call(
            "graph_def", list(op.inputs), {"grid": b.grid, "forloop_range": b.forloop_range, "block_size": b.block_size}
        )
        targets = ", ".join(f"{o}: {graph.tensors[o]}" for o in op.outputs)
        lines.append(f"    {targets} = {head}:")
        lines += format_block(b, op.inputs, "        ")
    lines.append("    return " + ", ".join(graph.outputs))
    return "\n".join(lines)
