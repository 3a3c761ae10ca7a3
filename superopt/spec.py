"""Program specs (YAML; README.md, "Quickstart") and `load` for specs and JSON graphs.

Op lines are parsed with `ast` and read through a whitelist: assignments of calls to ops of the table, tensor
and dim names, number constants, lists of those, and the operators + - * / @ as sugar for add, sub, mul
(mul_scalar with a number), div and matmul. A spec never runs code. Every error names file:line and the op line.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from superopt import importers
from superopt.errors import IRError, SpecError
from superopt.ir import MAX_DIM, KernelGraph, Tensor
from superopt.ops import DTYPES, OPS
from superopt.serialize import from_json

SPEC_KEYS = ("name", "dims", "inputs", "ops", "outputs", "search")
MAX_FILE_BYTES = 64 * 2**20  # a spec or JSON graph is text of a few KB; anything larger is not one
MAX_SEED = 2**63 - 1  # seeds reach torch.Generator.manual_seed, which takes a signed 64-bit integer


def check_positive_finite(value: Any) -> float:
    """`value` as a float; IRError unless it is a finite number > 0 (a budget, a scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise IRError(f"expected a finite number > 0, got {value!r}")
    return float(value)


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise IRError(f"expected an integer seed in 0..2^63-1, got {value!r}")
    return value


MAX_STATES = 10**12  # far beyond any search's reach: a larger states budget is a typo


def check_states(value: Any) -> int:
    """A states budget: a whole number in 1..MAX_STATES."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STATES:
        raise IRError(f"expected a whole number of states in 1..10^12, got {value!r}")
    return value


def check_name(value: Any) -> str:
    """A preset's or a device's name: a non-empty string (whether such a preset or device exists is checked by
    the pipeline's Settings, which knows them)."""
    if not isinstance(value, str) or not value.isidentifier():
        raise IRError(f"expected a name, got {value!r}")
    return value


# The `search:` section's keys and what a spec can check of them (superopt.pipeline.Settings checks the rest).
SEARCH_CHECKS = {
    "preset": check_name,
    "budget_s": check_positive_finite,
    "states": check_states,
    "device": check_name,
    "seed": check_seed,
}

_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.MatMult: "matmul"}
_SCALAR_BINOPS = {ast.Add: ("add_scalar", 1.0), ast.Sub: ("add_scalar", -1.0), ast.Mult: ("mul_scalar", 1.0)}


@dataclass
class _Where:
    """Where a spec error is: the file, and the YAML line of each part."""

    path: str
    lines: dict[tuple, int]

    def error(self, key: tuple, msg: str) -> SpecError:
        line = self.lines.get(key) or self.lines.get(key[:1]) or 1
        return SpecError(f"{self.path}:{line}: {msg}")


def _line_table(node: yaml.Node) -> dict[tuple, int]:
    """1-based line of each top-level key's value and of each item under it: (key,), (key, item)."""
    lines: dict[tuple, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        key = k.value
        lines[(key,)] = k.start_mark.line + 1
        if isinstance(v, yaml.SequenceNode):
            for i, item in enumerate(v.value):
                lines[(key, i)] = item.start_mark.line + 1
        elif isinstance(v, yaml.MappingNode):
            for kk, _ in v.value:
                lines[(key, kk.value)] = kk.start_mark.line + 1
    return lines


class _OpLine:
    """Builds one op line into the graph through the whitelist."""

    def __init__(self, graph: KernelGraph, dims: dict[str, int]) -> None:
        self.graph, self.dims = graph, dims

    def statement(self, text: str) -> None:
        try:
            tree = ast.parse(text.strip(), mode="exec")
        except SyntaxError as e:
            raise IRError(f"syntax error: {e.msg}") from None
        except ValueError as e:  # a number of more digits than Python converts
            raise IRError(str(e)) from None
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign):
            raise IRError("expected one assignment 'name = op(...)'")
        stmt = tree.body[0]
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise IRError("the left side must be one new tensor name")
        try:
            result = self.expr(stmt.value, stmt.targets[0].id)
        except RecursionError:
            raise IRError("the expression is nested too deeply") from None
        if not isinstance(result, Tensor):
            raise IRError("the right side must compute a tensor")

    def expr(self, node: ast.AST, out: str | None = None) -> Any:
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise IRError(f"only calls of superopt ops are allowed, not '{ast.unparse(node.func)}'")
            name = node.func.id
            if name not in OPS or "kernel" not in OPS[name].levels or name == "graph_def":
                raise IRError(f"unknown op '{name}'")
            args = [self.expr(a) for a in node.args]
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:
                    raise IRError("'**' is not allowed")
                kwargs[kw.arg] = self.expr(kw.value)
            return self.graph.op(name, *args, out=out, **kwargs)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = self.expr(node.left), self.expr(node.right)
            scalar_op = _SCALAR_BINOPS.get(type(node.op))
            if scalar_op and isinstance(a, Tensor) != isinstance(b, Tensor):
                op, sign = scalar_op
                if isinstance(a, Tensor):
                    return self.graph.op(op, a, c=sign * b, out=out)
                if op == "mul_scalar":
                    return self.graph.op(op, b, c=a, out=out)
                return self.graph.op("add_scalar", self.graph.op("neg", b) if sign < 0 else b, c=a, out=out)
            return self.graph.op(_BINOPS[type(node.op)], a, b, out=out)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = self.expr(node.operand)
            if isinstance(v, tuple):
                raise IRError(f"'{ast.unparse(node)}' negates a list")
            return self.graph.op("neg", v, out=out) if isinstance(v, Tensor) else -v
        if isinstance(node, ast.Name):
            if node.id in self.graph.tensors:
                return Tensor(self.graph, node.id)
            if node.id in self.dims:
                return self.dims[node.id]
            raise IRError(f"unknown name '{node.id}' (not an input, a computed tensor or a dim)")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return tuple(self.expr(e) for e in node.elts)
        raise IRError(f"'{ast.unparse(node)}' is not allowed in an op line")


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a few lines of nested aliases (a "billion laughs") expand into a document too
    large to walk or print, and a spec has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a spec", mark)
        return super().compose_node(parent, index)


def read_yaml(text: str, path: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the document of YAML `text`; SpecError naming path:line if it is
    not YAML, uses aliases, or nests too deeply."""
    loader = None
    try:
        loader = _SpecLoader(text)  # its reader refuses characters YAML does not allow (NUL, say) here
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SpecError(f"{path}:{line}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise SpecError(f"{path}: bad YAML value: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: Path) -> str:
    """The UTF-8 text of a spec or JSON graph; SpecError if it cannot be read, is binary or is too large."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(f"{path}: larger than the {MAX_FILE_BYTES >> 20} MB limit for a spec or graph file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None


def _dim(value: Any, dims: dict[str, int]) -> int:
    if isinstance(value, str):
        if value not in dims:
            raise IRError(f"unknown dim '{value}'")
        return dims[value]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IRError(f"a shape entry must be a dim name or a positive integer, got {value!r}")
    return value


def parse_spec(text: str, path: str = "<spec>", dims: dict[str, int] | None = None) -> KernelGraph:
    """A KernelGraph from the text of a YAML spec; `dims` overrides the spec's dims by name."""
    root, doc = read_yaml(text, path)
    where = _Where(path, _line_table(root) if root is not None else {})
    if not isinstance(doc, dict):
        raise where.error((), "a spec is a mapping with keys " + ", ".join(SPEC_KEYS))
    for key in doc:
        if key == "model":
            raise where.error((key,), "model specs (a 'model:' section) are not supported yet")
        if key not in SPEC_KEYS:
            raise where.error((key,), f"unknown key '{key}' (expected: {', '.join(SPEC_KEYS)})")
    for key in ("inputs", "ops", "outputs"):
        if key not in doc:
            raise where.error((), f"the spec has no '{key}'")

    spec_dims = doc.get("dims") or {}
    if not isinstance(spec_dims, dict):
        raise where.error(("dims",), "'dims' must map names to positive integers")
    for name, size in spec_dims.items():
        if (
            not isinstance(name, str)
            or not name.isidentifier()
            or isinstance(size, bool)
            or not isinstance(size, int)
            or not 1 <= size <= MAX_DIM
        ):
            raise where.error(
                ("dims", name), f"dim {name!r}: expected a name and an integer in 1..{MAX_DIM}, got {size!r}"
            )
    for name in dims or {}:
        if name not in spec_dims:
            raise SpecError(f"{path}: cannot override dim '{name}': the spec has no such dim")
    all_dims = {**spec_dims, **(dims or {})}

    graph = KernelGraph(str(doc.get("name") or Path(path).stem))
    inputs = doc["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        raise where.error(("inputs",), "'inputs' must map names to {shape: [...], dtype: ...}")
    for name, t in inputs.items():
        try:
            if not isinstance(t, dict) or set(t) - {"shape", "dtype"} or not isinstance(t.get("shape"), list):
                raise IRError(f"expected {{shape: [dims...], dtype: {'|'.join(DTYPES)}}}")
            graph.input(str(name), [_dim(s, all_dims) for s in t["shape"]], t.get("dtype", "float16"))
        except IRError as e:
            raise where.error(("inputs", name), f"input '{name}': {e}") from None

    ops = doc["ops"]
    if not isinstance(ops, list):
        raise where.error(("ops",), "'ops' must be a list of lines 'name = op(...)'")
    builder = _OpLine(graph, all_dims)
    for i, line in enumerate(ops):
        try:
            if not isinstance(line, str):
                raise IRError("an op line must be a string 'name = op(...)'")
            builder.statement(line)
        except IRError as e:
            raise where.error(("ops", i), f"op '{line}': {e}") from None

    outputs = doc["outputs"]
    if not isinstance(outputs, list) or not outputs:
        raise where.error(("outputs",), "'outputs' must be a non-empty list of tensor names")
    for i, name in enumerate(outputs):
        if not isinstance(name, str) or name not in graph.tensors:
            raise where.error(("outputs", i), f"output '{name}' is never computed")
        try:
            graph.output(name)
        except IRError as e:
            raise where.error(("outputs", i), str(e)) from None

    search = doc.get("search") or {}
    if not isinstance(search, dict) or set(search) - set(SEARCH_CHECKS):
        raise where.error(("search",), f"'search' takes the keys: {', '.join(SEARCH_CHECKS)}")
    for key, value in search.items():
        try:
            SEARCH_CHECKS[key](value)
        except IRError as e:
            raise where.error(("search", key), f"search {key}: {e}") from None
    graph.search_settings = search
    return graph


def load(path: str | Path, dims: dict[str, int] | None = None) -> KernelGraph:
    """A program spec (.yaml/.yml), a graph in JSON form (.json), or a model to import (.onnx, .pt2: see
    superopt/importers.py); `dims` overrides a spec's dims."""
    path = Path(path)
    if path.suffix in (".onnx", ".pt2"):
        if dims:
            raise SpecError(f"{path}: dims can be overridden only in YAML specs")
        return importers.load(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise SpecError(f"{path}: unknown file type '{path.suffix}' (expected .yaml, .yml, .json, .onnx or .pt2)")
    text = read_text(path)
    if path.suffix in (".yaml", ".yml"):
        return parse_spec(text, str(path), dims)
    if dims:
        raise SpecError(f"{path}: dims can be overridden only in YAML specs")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}:{e.lineno}: JSON syntax error: {e.msg}") from None
    except RecursionError:
        raise SpecError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise SpecError(f"{path}: bad JSON value: {e}") from None
    return from_json(doc, str(path))
