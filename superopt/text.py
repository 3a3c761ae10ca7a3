"""Readable forms of a graph: the text form (one op a line, diffable) and a DOT file for graphviz."""

from __future__ import annotations

from typing import Any

from superopt.ir import BlockGraph, KernelGraph, Op, thread_graphs


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return repr(v)


def _fmt_call(op: str, args: list[str], attrs: dict[str, Any]) -> str:
    return f"{op}({', '.join(args + [f'{k}={_fmt_value(v)}' for k, v in attrs.items()])})"


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
    lines.append(f"{indent}return " + ", ".join(f"{o.name} (omap={_fmt_value(o.omap)})" for o in block.outputs))
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


def _dot_id(*parts: object) -> str:
    return '"' + ":".join(str(p) for p in parts) + '"'


def to_dot(graph: KernelGraph) -> str:
    """A graphviz DOT rendering: tensors as ellipses, ops as boxes, each graph-defined op as a cluster."""
    lines = [f"digraph {_dot_id(graph.name)} {{", "  rankdir=TB;", '  node [fontname="monospace"];']

    def tensor(prefix: str, g: KernelGraph | BlockGraph, name: str) -> str:
        lines.append(f'  {_dot_id(prefix, name)} [label="{name}\\n{g.tensors[name]}", shape=ellipse];')
        return _dot_id(prefix, name)

    def op_node(prefix: str, i: int, op: Op, g: KernelGraph | BlockGraph) -> None:
        label = "\\n".join([op.op] + [f"{k}={_fmt_value(v)}" for k, v in op.attrs.items()])
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
            label = f"imap={_fmt_value(bi.imap)} fmap={bi.fmap}"
            lines.append(f'  {_dot_id("k", src)} -> {tensor(prefix, b, bi.name)} [label="{label}"];')
        for j, bop in enumerate(b.ops):
            op_node(prefix, j, bop, b)
        lines.append("  }")
        for out_name, bo in zip(op.outputs, b.outputs):
            lines.append(
                f'  {_dot_id(prefix, bo.name)} -> {tensor("k", graph, out_name)} [label="omap={_fmt_value(bo.omap)}"];'
            )
    for name in graph.outputs:
        lines.append(f"  {_dot_id('k', name)} [peripheries=2];")
    lines.append("}")
    return "\n".join(lines) + "\n"
