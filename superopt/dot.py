"""A graph as a DOT file for graphviz (the text form is `str(graph)`, superopt.ir)."""

from __future__ import annotations

from superopt.ir import BlockGraph, KernelGraph, Op, format_value


def _dot_id(*parts: object) -> str:
    return '"' + ":".join(str(p) for p in parts) + '"'


def to_dot(graph: KernelGraph) -> str:
    """A graphviz DOT rendering: tensors as ellipses, ops as boxes, each graph-defined op as a cluster."""
    lines = [f"digraph {_dot_id(graph.name)} {{", "  rankdir=TB;", '  node [fontname="monospace"];']

    def tensor(prefix: str, g: KernelGraph | BlockGraph, name: str) -> str:
        lines.append(f'  {_dot_id(prefix, name)} [label="{name}\\n{g.tensors[name]}", shape=ellipse];')
        return _dot_id(prefix, name)

    def op_node(prefix: str, i: int, op: Op, g: KernelGraph | BlockGraph) -> None:
        label = "\\n".join([op.op] + [f"{k}={format_value(v)}" for k, v in op.attrs.items()])
        node = _dot_id(prefix, "op", i)
        lines.append(f'  {node} [label="{label}", shape=box];')
        for name in op.inputs:
            lines.append(f"  {_dot_id(prefix, name)} -> {node};")
        for name in op.outputs:
            lines.append(f"  {node} -> {tensor(prefix, g, name)};")

    for name in graph.inputs:
        tensor("k", graph, name)
    for i, op in enumerate(graph.ops):
        if op.block is None:
            op_node("k", i, op, graph)
            continue
        b, prefix = op.block, f"b{i}"
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f'  label="graph_def grid={list(b.grid)} forloop_range={b.forloop_range}";')
        for src, bi in zip(op.inputs, b.inputs):
            label = f"imap={format_value(bi.imap)} fmap={bi.fmap}"
            lines.append(f'  {_dot_id("k", src)} -> {tensor(prefix, b, bi.name)} [label="{label}"];')
        for j, bop in enumerate(b.ops):
            op_node(prefix, j, bop, b)
        lines.append("  }")
        for out_name, bo in zip(op.outputs, b.outputs):
            edge = f"{_dot_id(prefix, bo.name)} -> {tensor('k', graph, out_name)}"
            lines.append(f'  {edge} [label="omap={format_value(bo.omap)}"];')
    for name in graph.outputs:
        lines.append(f"  {_dot_id('k', name)} [peripheries=2];")
    lines.append("}")
    return "\n".join(lines) + "\n"
