"""The mutation corpus of tests/test_verify_corpus.py (and the shrink tests): every example program and every
hand-written fused µGraph at small dims, the single mutations of a graph, and a mutant built from several."""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import torch
from graphs import dequant_gemv, import_fused
from hypothesis import strategies as st

import superopt
from superopt.errors import SuperoptError
from superopt.interpret import random_inputs, run
from superopt.serialize import from_json, to_json
from superopt.verification import check_signature

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MUTANTS = int(os.environ.get("SUPEROPT_VERIFY_MUTANTS", "100"))

# Small dims (distinct sizes, so a rewired operand or a wrong axis changes shapes or values visibly).
SPEC_DIMS = {
    "rmsnorm_linear": {"B": 2, "D": 8, "N": 6},
    "gated_mlp": {"B": 2, "D": 8, "N": 6},
    "lora": {"B": 2, "D": 8, "N": 6, "R": 3},
    "gqa": {"B": 2, "S": 3, "D": 2, "L": 8},
    "qknorm_gqa": {"B": 2, "S": 3, "D": 2, "L": 8},
    "mqa": {"B": 1, "S": 3, "D": 2, "L": 8},
    "ntrans": {"B": 2, "D": 8},
}
# The fused builders at dims where their tiling (constants shrunk) still gives several blocks and iterations.
FUSED_DIMS = {
    "rmsnorm_linear_bs1": {"B": 2, "D": 16, "N": 8},
    "gated_mlp": {"B": 2, "D": 16, "N": 8},
    "lora": {"B": 2, "D": 16, "N": 8, "R": 2},
    "gqa_bs1": {"B": 2, "S": 4, "D": 2, "L": 16},
    "qknorm_gqa_bs1": {"B": 2, "S": 4, "D": 2, "L": 16},
    "ntrans_bs1": {"B": 2, "D": 8},
}
# Distinct sizes; N = K / G and N / ROWS = CHUNKS, so that a scale read along the wrong axis is still well-formed.
DEQUANT_DIMS = {"N": 8, "K": 32, "B": 3, "G": 4, "ROWS": 4, "CHUNKS": 2}
SMALL_TILES = {"COLS": 2, "CHUNK": 4, "ROWS": 2, "ATTENTION_CHUNK": 2, "MIN_ITERS": 2, "COMBINE_ROWS": 1}

UNARY = ["exp", "silu", "gelu", "relu", "sigmoid", "sqrt", "rsqrt", "square", "neg"]
BINARY = ["add", "sub", "mul", "div"]
REDUCE = ["sum", "mean", "max"]
ACCUM = ["accum_sum", "accum_sum_last", "accum_mean_last", "accum_max", "accum_rms_last"]


def _fused_module():
    module = import_fused("examples_fused_for_verify")
    for name, value in SMALL_TILES.items():
        assert hasattr(module, name), f"examples/fused.py no longer defines {name}"
        setattr(module, name, value)
    return module


def _spec_dims(path: Path) -> dict[str, int]:
    family = next(f for f in SPEC_DIMS if path.stem.startswith(f))
    return SPEC_DIMS[family]


def sources() -> dict[str, superopt.KernelGraph]:
    """Every example program and every fused µGraph, at small dims, by name."""
    out = {f"spec:{p.stem}": superopt.load(p, dims=_spec_dims(p)) for p in sorted(EXAMPLES.glob("*.yaml"))}
    fused = _fused_module()
    builders = {}
    for name, builder in fused.FUSED.items():
        builders.setdefault(builder, name)
    for name in builders.values():
        out[f"fused:{name}"] = fused.build(name, FUSED_DIMS[name])
    for q_dtype in ("int4", "int8"):
        out[f"fused:dequant_gemv_{q_dtype}"] = dequant_gemv(DEQUANT_DIMS, q_dtype)[1]
    return out


SOURCES = sources()


# --- mutations on the JSON form -----------------------------------------------------------------------------
# An op is found by its output name (and, inside a block graph, the graph_def's first output), so that a
# mutation stays valid after another one inserted ops.

INSERTED = [("neg", {}), ("square", {}), ("exp", {}), ("sqrt", {}), ("relu", {}), ("gelu", {}), ("silu", {})]
INSERTED += [("sigmoid", {}), ("rsqrt", {}), ("mul_scalar", {"c": 2.0}), ("mul_scalar", {"c": -1.0})]
INSERTED += [("mul_scalar", {"c": 0.5}), ("add_scalar", {"c": 1.0}), ("add_scalar", {"c": 1e-6})]


def _ops(doc: dict, where: tuple) -> tuple[list, dict]:
    """The op list named by `where` (() for the kernel graph, (graph_def output,) for its block graph) and the
    dict holding its outputs."""
    if not where:
        return doc["ops"], doc
    block = next(op for op in doc["ops"] if op["op"] == "graph_def" and op["outputs"][0] == where[0])["block"]
    return block["ops"], block


def _find(doc: dict, where: tuple, out: str) -> tuple[list, int]:
    ops, _ = _ops(doc, where)
    return ops, next(i for i, op in enumerate(ops) if op["outputs"][0] == out)


def _types(graph: superopt.KernelGraph, where: tuple, out: str) -> tuple[dict, list[str]]:
    """Tensor types of the graph holding op `out`, and the names defined before that op there."""
    if not where:
        k = next(i for i, op in enumerate(graph.ops) if op.outputs[0] == out)
        return graph.tensors, list(graph.inputs) + [o for op in graph.ops[:k] for o in op.outputs]
    block = next(op.block for op in graph.ops if op.op == "graph_def" and op.outputs[0] == where[0])
    k = next(i for i, op in enumerate(block.ops) if op.outputs[0] == out)
    return block.tensors, [bi.name for bi in block.inputs] + [op.outputs[0] for op in block.ops[:k]]


def single_mutations(graph: superopt.KernelGraph) -> list[tuple]:
    """Every single mutation of graph, as (kind, where, op output name, argument)."""
    doc = to_json(graph)
    out: list[tuple] = []
    places = [((), op) for op in doc["ops"]]
    places += [((op["outputs"][0],), bop) for op in doc["ops"] if op["op"] == "graph_def" for bop in op["block"]["ops"]]
    for where, op in places:
        key = op["outputs"][0]
        if op["op"] == "graph_def":
            block = op["block"]
            for a in range(len(block["grid"])):
                out += [("grid", (key,), None, (a, f)) for f in (2, 0.5)]
            out += [("forloop", (key,), None, f) for f in (2, 0.5)]
            pairs = list(itertools.combinations(range(len(block["grid"])), 2))
            out += [("imap_swap", (key,), None, (k, ab)) for k in range(len(block["inputs"])) for ab in pairs]
            out += [("omap_swap", (key,), None, (k, ab)) for k in range(len(block["outputs"])) for ab in pairs]
            for k, bi in enumerate(block["inputs"]):
                rank = len(graph.tensors[op["inputs"][k]].shape)
                for a in range(len(bi["imap"])):
                    out += [("imap", (key,), None, (k, a, d)) for d in [None, *range(rank)] if d != bi["imap"][a]]
                out += [("fmap", (key,), None, (k, d)) for d in [None, *range(rank)] if d != bi["fmap"]]
            for k, bo in enumerate(block["outputs"]):
                for a in range(len(bo["omap"])):
                    out += [("omap", (key,), None, (k, a, d)) for d in range(4) if d != bo["omap"][a]]
            continue
        tensors, before = _types(graph, where, key)
        name, ins = op["op"], op["inputs"]
        if len(ins) == 2:
            out.append(("swap", where, key, None))
        for s, current in enumerate(ins):
            out += [("rewire", where, key, (s, t)) for t in before if t != current and tensors[t] == tensors[current]]
            out += [("insert", where, key, (s, k)) for k in range(len(INSERTED))]
        for family in (UNARY, BINARY, REDUCE, ACCUM):
            if name in family:
                out += [("rename", where, key, other) for other in family if other != name]
        attrs = op.get("attrs", {})
        if "dim" in attrs:
            rank = len(tensors[ins[0]].shape)
            out += [("attr", where, key, ("dim", d)) for d in range(rank) if d != attrs["dim"]]
        if "keepdim" in attrs:
            out.append(("attr", where, key, ("keepdim", not attrs["keepdim"])))
        if "high_first" in attrs:  # dequant: the other nibble of each int4 byte
            out.append(("attr", where, key, ("high_first", not attrs["high_first"])))
        if "group" in attrs:
            out += [("attr", where, key, ("group", g)) for g in (2 * attrs["group"], attrs["group"] // 2) if g]
        for attr in ("c", "eps"):
            if attr in attrs:
                value = attrs[attr]
                out += [
                    ("attr", where, key, (attr, v)) for v in (0.0, 2 * value, -value, value + 1, 1e-2) if v != value
                ]
        if len(ins) == 1 and tensors[ins[0]] == tensors[key]:
            out.append(("bypass", where, key, None))
    if len(doc["outputs"]) > 1:
        out.append(("swap_outputs", (), None, None))
    return out


def _fresh(doc: dict) -> str:
    names = set(json.dumps(doc).split('"'))
    return next(f"mutated_{n}" for n in range(len(names) + 1) if f"mutated_{n}" not in names)


def apply(doc: dict, mutation: tuple) -> None:
    kind, where, key, arg = mutation
    if kind in ("grid", "forloop", "imap", "fmap", "omap", "imap_swap", "omap_swap"):
        block = _ops(doc, where)[1]
        if kind.endswith("_swap"):
            k, (a, b) = arg
            maps = block["inputs"][k]["imap"] if kind == "imap_swap" else block["outputs"][k]["omap"]
            maps[a], maps[b] = maps[b], maps[a]
        elif kind == "grid":
            block["grid"][arg[0]] = int(block["grid"][arg[0]] * arg[1])
        elif kind == "forloop":
            block["forloop_range"] = int(block["forloop_range"] * arg)
        elif kind == "omap":
            block["outputs"][arg[0]]["omap"][arg[1]] = arg[2]
        elif kind == "fmap":
            block["inputs"][arg[0]]["fmap"] = arg[1]
        else:
            block["inputs"][arg[0]]["imap"][arg[1]] = arg[2]
        return
    if kind == "swap_outputs":
        doc["outputs"].reverse()
        return
    ops, k = _find(doc, where, key)
    target = ops[k]
    if kind == "swap":
        target["inputs"].reverse()
    elif kind == "rewire":
        target["inputs"][arg[0]] = arg[1]
    elif kind == "insert":
        op, attrs = INSERTED[arg[1]]
        name = _fresh(doc)
        ops.insert(k, {"op": op, "inputs": [target["inputs"][arg[0]]], "outputs": [name], "attrs": dict(attrs)})
        target["inputs"][arg[0]] = name
    elif kind == "rename":
        target["op"] = arg
    elif kind == "attr":
        target.setdefault("attrs", {})[arg[0]] = arg[1]
    elif kind == "bypass":
        src, dst = target["inputs"][0], key
        for later in ops[k + 1 :]:
            later["inputs"] = [src if i == dst else i for i in later["inputs"]]
        outputs = _ops(doc, where)[1]["outputs"]
        for j, o in enumerate(outputs):
            if isinstance(o, dict) and o["name"] == dst:
                o["name"] = src
            elif o == dst:
                outputs[j] = src


def mutant(graph: superopt.KernelGraph, mutations: list[tuple]) -> superopt.KernelGraph | None:
    """graph with the mutations applied, or None where the result is ill-formed or changes the signature."""
    doc = copy.deepcopy(to_json(graph))
    try:
        for m in mutations:
            apply(doc, m)
        result = from_json(doc)
        check_signature(graph, result)
    except (SuperoptError, StopIteration):  # ill-formed, or an op a former mutation bypassed away
        return None
    return result


# --- the independent oracle: the reference interpreter in float64 --------------------------------------------


def clearly_different(a: superopt.KernelGraph, b: superopt.KernelGraph) -> bool:
    for seed in range(3):
        for scale in (1.0, 1e-3):
            inputs = random_inputs(a, seed, scale)
            for x, y in zip(run(a, inputs, "float64"), run(b, inputs, "float64")):
                if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
                    return True
                x, y = torch.nan_to_num(x, 0.0, 0.0, 0.0), torch.nan_to_num(y, 0.0, 0.0, 0.0)
                magnitude = max(float(x.abs().max()), float(y.abs().max()), 1e-300)
                if float((x - y).abs().max()) > 1e-6 * magnitude:
                    return True
    return False


def mutation_lists(graph: superopt.KernelGraph) -> st.SearchStrategy:
    valid = [m for m in single_mutations(graph) if mutant(graph, [m]) is not None]
    return st.lists(st.sampled_from(valid), min_size=1, max_size=3)
