"""JSON form of graphs (block graphs included), and the canonical hash.

The JSON form keeps tensor names, so `from_json(to_json(g))` prints and serializes exactly as `g`. Output
types are not stored: loading rebuilds the graph through the builder, which re-derives and re-checks them.
The hash is a Merkle hash over the dataflow: it ignores tensor names and the order of independent ops, and
changes with any shape, dtype, attribute, map or grid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from superopt.errors import IRError, SpecError
from superopt.ir import BlockGraph, KernelGraph, Op

FORMAT = "superopt.graph/1"


def _attrs_json(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def _op_json(op: Op) -> dict[str, Any]:
    d: dict[str, Any] = {"op": op.op, "inputs": list(op.inputs), "outputs": list(op.outputs)}
    if op.attrs:
        d["attrs"] = _attrs_json(op.attrs)
    if op.block is not None:
        d["block"] = _block_json(op.block)
    return d


def _block_json(b: BlockGraph) -> dict[str, Any]:
    return {
        "grid": list(b.grid),
        "forloop_range": b.forloop_range,
        "block_size": b.block_size,
        "inputs": [{"name": i.name, "imap": list(i.imap), "fmap": i.fmap} for i in b.inputs],
        "ops": [_op_json(op) for op in b.ops],
        "outputs": [{"name": o.name, "omap": list(o.omap)} for o in b.outputs],
    }


def to_json(graph: KernelGraph) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": graph.name,
        "inputs": [
            {"name": n, "shape": list(graph.tensors[n].shape), "dtype": graph.tensors[n].dtype} for n in graph.inputs
        ],
        "ops": [_op_json(op) for op in graph.ops],
        "outputs": list(graph.outputs),
    }


def _get(d: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise IRError(f"{where}: missing '{key}'")
    if not isinstance(d[key], kind):
        raise IRError(f"{where}: '{key}' must be a {kind.__name__}")
    return d[key]


def _add_op(graph: KernelGraph | BlockGraph, d: Any, where: str) -> None:
    name = _get(d, "op", str, where)
    inputs = _get(d, "inputs", list, where)
    outputs = _get(d, "outputs", list, where)
    where = f"{where} ({name} -> {', '.join(map(str, outputs))})"
    try:
        if name == "graph_def" and isinstance(graph, KernelGraph):
            block = _block_from_json(graph, inputs, _get(d, "block", dict, "graph_def"), "block")
            graph.graph_def(block, inputs, outputs)
            return
        if len(outputs) != 1:
            raise IRError(f"{name} has one output, got {len(outputs)}")
        attrs = d.get("attrs", {})
        if not isinstance(attrs, dict):
            raise IRError("'attrs' must be an object")
        graph.op(name, *inputs, out=outputs[0], **attrs)
    except IRError as e:
        raise IRError(f"{where}: {e}") from None


def _block_from_json(graph: KernelGraph, sources: list[str], d: dict, where: str) -> BlockGraph:
    b = BlockGraph(_get(d, "grid", list, where), _get(d, "forloop_range", int, where), d.get("block_size", 128))
    inputs = _get(d, "inputs", list, where)
    if len(inputs) != len(sources):
        raise IRError(f"the block graph has {len(inputs)} inputs for {len(sources)} op inputs")
    for src, bi in zip(sources, inputs):
        b.input(
            graph.tensors[graph._name(src)],
            _get(bi, "imap", list, where),
            bi.get("fmap"),
            name=_get(bi, "name", str, where),
        )
    for k, op in enumerate(_get(d, "ops", list, where)):
        _add_op(b, op, f"block ops[{k}]")
    for bo in _get(d, "outputs", list, where):
        b.output(_get(bo, "name", str, where), _get(bo, "omap", list, where))
    return b


def from_json(doc: Any, source: str = "<json>") -> KernelGraph:
    """Rebuilds a graph from its JSON form; raises SpecError naming `source` and the op that is wrong."""
    try:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IRError(f'not a superopt graph (expected "format": "{FORMAT}")')
        g = KernelGraph(_get(doc, "name", str, "graph"))
        for k, t in enumerate(_get(doc, "inputs", list, "graph")):
            g.input(
                _get(t, "name", str, f"inputs[{k}]"),
                _get(t, "shape", list, f"inputs[{k}]"),
                _get(t, "dtype", str, f"inputs[{k}]"),
            )
        for k, op in enumerate(_get(doc, "ops", list, "graph")):
            _add_op(g, op, f"ops[{k}]")
        for name in _get(doc, "outputs", list, "graph"):
            g.output(name)
    except IRError as e:
        raise SpecError(f"{source}: {e}") from None
    return g


def dumps(graph: KernelGraph) -> str:
    return json.dumps(to_json(graph), indent=1) + "\n"


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Writes `text` (or bytes) to `path` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode a plain open() would
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def dump(graph: KernelGraph, path: str | os.PathLike) -> None:
    write_atomic(path, dumps(graph))


# --- canonical hash -----------------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _op_hashes(graph: KernelGraph | BlockGraph, h: dict[str, str]) -> None:
    for op in graph.ops:
        block = block_hash(op.block) if op.block is not None else None
        base = _digest(op.op, _attrs_json(op.attrs), [h[i] for i in op.inputs], block)
        for k, out in enumerate(op.outputs):
            h[out] = _digest(base, k)


def block_hash(b: BlockGraph) -> str:
    h = {
        bi.name: _digest("input", k, bi.source.shape, bi.source.dtype, bi.imap, bi.fmap)
        for k, bi in enumerate(b.inputs)
    }
    _op_hashes(b, h)
    return _digest("block", b.grid, b.forloop_range, b.block_size, [(h[o.name], o.omap) for o in b.outputs])


def graph_hash(graph: KernelGraph) -> str:
    """The canonical hash of a program or µGraph (hex sha256)."""
    h = {n: _digest("input", k, graph.tensors[n].shape, graph.tensors[n].dtype) for k, n in enumerate(graph.inputs)}
    _op_hashes(graph, h)
    signature = [(t.shape, t.dtype) for t in graph.input_types()]
    return _digest("graph", signature, [h[o] for o in graph.outputs])
