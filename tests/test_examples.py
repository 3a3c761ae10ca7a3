"""The example specs: docs/workloads.md's workloads at its shapes, computing the programs torch writes for them; and the
hand-fused µGraphs of examples/fused.py, which must equal their specs and their committed JSON forms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from graphs import FUSED_SMALL, import_fused

import superopt
from superopt.serialize import graph_hash

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


fused = import_fused()

# docs/workloads.md's table, fp16: the input shapes of each workload in order, and the output shape.
SHAPES = {
    "rmsnorm_linear_bs1": ({"x": (2, 4096), "w": (4096, 6144)}, (2, 6144)),
    "rmsnorm_linear_bs8": ({"x": (16, 4096), "w": (4096, 6144)}, (16, 6144)),
    "gated_mlp": ({"x": (8, 4096), "w1": (4096, 4096), "w2": (4096, 4096)}, (8, 4096)),
    "gqa_bs1": ({"q": (2, 256, 64), "k": (2, 64, 4096), "v": (2, 4096, 64)}, (2, 256, 64)),
    "gqa_bs8": ({"q": (16, 256, 64), "k": (16, 64, 4096), "v": (16, 4096, 64)}, (16, 256, 64)),
    "qknorm_gqa_bs1": ({"q": (2, 256, 64), "k": (2, 64, 4096), "v": (2, 4096, 64)}, (2, 256, 64)),
    "qknorm_gqa_bs8": ({"q": (16, 256, 64), "k": (16, 64, 4096), "v": (16, 4096, 64)}, (16, 256, 64)),
    "mqa_bs1": ({"q": (1, 1024, 64), "k": (1, 64, 4096), "v": (1, 4096, 64)}, (1, 1024, 64)),
    "lora": ({"x": (16, 256), "w": (256, 4096), "a": (256, 16), "b": (16, 4096)}, (16, 4096)),
    "ntrans_bs1": ({"h": (8, 4096), "x": (8, 4096), "alpha": (8, 4096)}, (8, 4096)),
    "ntrans_bs8": ({"h": (64, 4096), "x": (64, 4096), "alpha": (64, 4096)}, (64, 4096)),
}


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(q @ k)
    return (e / e.sum(-1, keepdim=True)) @ v


# Each workload's program written in torch, the inputs in spec order.
TORCH = {
    "rmsnorm_linear": lambda x, w: _rms(x) @ w,
    "gated_mlp": lambda x, w1, w2: F.silu(x @ w1) * (x @ w2),
    "gqa": _attention,
    "qknorm_gqa": lambda q, k, v: _attention(_rms(q), k, _rms(v)),
    "mqa": _attention,
    "lora": lambda x, w, a, b: x @ w + (x @ a) @ b,
    "ntrans": lambda h, x, alpha: _rms(x + alpha * (_rms(h) + x)),
}


def _family(name: str) -> str:
    return name.removesuffix("_bs1").removesuffix("_bs8")


def _signature(g: superopt.KernelGraph) -> tuple:
    return [(n, g.tensors[n]) for n in g.inputs], [g.tensors[n] for n in g.outputs]


def _run(g: superopt.KernelGraph, seed: int) -> list[torch.Tensor]:
    # Inputs at 0.5 sigma keep the attention examples' unscaled exp small.
    return superopt.run(g, superopt.random_inputs(g, seed=seed, scale=0.5), precision="float64")


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype == torch.float64
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-9, f"relative error {rel}"


def test_every_example_spec_is_listed():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_spec_has_anchor_shapes(name):
    g = superopt.load(EXAMPLES / f"{name}.yaml")
    inputs, output = SHAPES[name]
    assert g.name == name
    assert [(n, g.tensors[n].shape, g.tensors[n].dtype) for n in g.inputs] == [
        (n, s, "float16") for n, s in inputs.items()
    ]
    assert [(g.tensors[o].shape, g.tensors[o].dtype) for o in g.outputs] == [(output, "float16")]
    assert g.search_settings["budget_s"] == 120


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_spec_computes_the_torch_program(name):
    g = superopt.load(EXAMPLES / f"{name}.yaml", dims=FUSED_SMALL[name])
    inputs = superopt.random_inputs(g, seed=1, scale=0.5)
    (got,) = superopt.run(g, inputs, precision="float64")
    want = TORCH[_family(name)](*(inputs[n].double() for n in g.inputs))
    _assert_close(got, want)


def test_fused_forms_cover_the_fusable_examples():
    assert sorted(fused.FUSED) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_fused_equals_spec(name):
    spec = superopt.load(EXAMPLES / f"{name}.yaml", dims=FUSED_SMALL[name])
    graph = fused.build(name, FUSED_SMALL[name])
    assert _signature(graph) == _signature(spec)
    blocks = [op.block for op in graph.ops if op.block is not None]
    assert blocks and all(math.prod(b.grid) > 1 for b in blocks), "a degenerate tiling"
    assert any(b.forloop_range > 1 for b in blocks) or name.startswith("ntrans"), "no loop to check"
    for seed in (0, 1):
        (got,), (want,) = _run(graph, seed), _run(spec, seed)
        _assert_close(got, want)


@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_fused_full_size_matches_spec_signature(name):
    assert _signature(fused.build(name)) == _signature(superopt.load(EXAMPLES / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_committed_json_is_the_builders_graph(name):
    loaded = superopt.load(EXAMPLES / "fused" / f"{name}.json")
    built = fused.build(name)
    assert loaded.name == name
    assert graph_hash(loaded) == graph_hash(built)


def test_tile_rule():
    assert [fused.pow2_tile(n, 16) for n in (6144, 48, 12, 7, 1)] == [16, 16, 4, 1, 1]
    # One wave of at most 132 blocks, at least MIN_ITERS = 2 loop iterations per block.
    assert fused.kv_splits(8, 64) == 16
    assert fused.kv_splits(64, 64) == 2
    assert fused.kv_splits(16, 64) == 8
    assert fused.kv_splits(4, 8) == 4
    assert fused.kv_splits(200, 64) == 1
