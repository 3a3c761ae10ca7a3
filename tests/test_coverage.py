"""Programs written the way people write them, searched at small size with the preset chosen from their ops:
each gets a fused candidate with fewer kernels than the program, verified, whose Triton code (under the
interpreter) equals the torch function itself run in float64. Where no fused candidate exists, the result says
why, in one line, in the CLI and in the result JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import superopt
from superopt.cli.search_cmd import search_command
from superopt.importers import Unsupported, from_fx
from superopt.kernels.timing import check
from superopt.search_space import search
from superopt.spec import parse_spec

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def softmax(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def layer_norm(x, gamma, beta):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * gamma + beta


def linear_bias_gelu(x, w, b):
    return F.gelu(x @ w + b)


def relu_plus_one(x, w):
    return torch.relu(x @ w) + 1


def swiglu_residual(x, w1, w3, w2):
    return x + (F.silu(x @ w1) * (x @ w3)) @ w2


def rmsnorm_weight_linear(x, g, w):
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * g @ w


def sdpa_causal(q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask, dim=-1) @ v


def transpose_matmul(x, w, b):
    return torch.relu(x.transpose(0, 1) @ w + b)


# name: (function, input shapes), small
PROGRAMS: dict[str, tuple[Callable[..., torch.Tensor], tuple[tuple[int, ...], ...]]] = {
    "sdpa_causal": (sdpa_causal, ((2, 16, 8), (2, 16, 8), (2, 16, 8), (16, 16))),
    "softmax": (softmax, ((4, 32),)),
    "layer_norm": (layer_norm, ((4, 32), (32,), (32,))),
    "linear_bias_gelu": (linear_bias_gelu, ((4, 32), (32, 16), (16,))),
    "relu_plus_one": (relu_plus_one, ((4, 32), (32, 16))),
    "swiglu_residual": (swiglu_residual, ((4, 16), (16, 32), (16, 32), (32, 16))),
    "rmsnorm_weight_linear": (rmsnorm_weight_linear, ((4, 32), (32,), (32, 16))),
    "transpose_matmul": (transpose_matmul, ((32, 4), (32, 16), (16,))),
}


class _Module(torch.nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _capture(name: str) -> tuple[superopt.KernelGraph, dict[str, torch.Tensor], torch.Tensor]:
    """The program as torch.export and the importer map it (superopt.optimize's path), its inputs (fp16, seeded),
    and the function itself on those inputs in float64."""
    fn, shapes = PROGRAMS[name]
    gen = torch.Generator().manual_seed(0)
    args = tuple((torch.randn(s, generator=gen) * 0.5).half() for s in shapes)
    if fn is sdpa_causal:  # an additive causal mask, as HF builds it
        args = (*args[:3], torch.full(shapes[3], float("-inf")).triu(1).half())
    mapped = from_fx(torch.export.export(_Module(fn), args).graph, name)
    by_name = {f"args_{k}": a for k, a in enumerate(args)}
    inputs = {}
    for n in mapped.graph.inputs:
        node, transposed = mapped.origin[n]
        inputs[n] = by_name[node.name].transpose(-1, -2) if transposed else by_name[node.name]
    return mapped.graph, inputs, fn(*(a.double() for a in args))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_fuses(name):
    graph, inputs, want = _capture(name)
    result = search(graph, budget_s=60, progress="none")
    assert result.stats.preset == "program" and not result.stats.exhausted
    fused = [c for c in result.candidates if c.kernels < len(graph.ops)]
    assert fused and result.stats.unfused == "", result.stats.unfused
    best = fused[0]  # the best-ranked of them
    assert best.verify.method in ("proved", "tested")
    (got,) = superopt.compile(best.graph)(*(inputs[n] for n in graph.inputs))
    assert check(graph, [got], [want]) <= 1


def test_swiglu_residual_fuses_alike_for_every_seed():
    """The enumeration does not depend on the seed, nor on the wall clock where it ends within the budget; the
    seed draws the verification's tests, which accept the same candidates."""
    graph, _, _ = _capture("swiglu_residual")
    runs = [search(graph, budget_s=60, seed=seed, progress="none") for seed in (0, 1)]
    assert [c.hash for c in runs[0].candidates] == [c.hash for c in runs[1].candidates]


# --- why not fused --------------------------------------------------------------------------------------------

SOFTMAX_SPEC = """
name: softmax
dims: {B: 4, N: 32}
inputs: {x: {shape: [B, N]}}
ops:
  - m = max(x, dim=-1, keepdim=True)
  - e = exp(x - m)
  - o = e / sum(e, dim=-1, keepdim=True)
outputs: [o]
"""


def test_reason_names_the_op_the_preset_lacks(tmp_path):
    spec = tmp_path / "softmax.yaml"
    spec.write_text(SOFTMAX_SPEC)
    why = "op 'max' is not among the block ops of preset 'mlp' (matmul, mul, div, add, accum_sum)"
    runner = CliRunner()
    base = [str(spec), "--preset", "mlp", "--budget", "10", "--progress", "none", "--cache-dir", str(tmp_path)]
    out = runner.invoke(search_command, base)
    assert out.exit_code == 0, out.output
    assert f"no fused candidate: {why}\n" in out.output
    out = runner.invoke(search_command, [*base, "--json"])  # a cache hit: the stored result says it too
    assert json.loads(out.stdout)["search"]["unfused"] == why


def test_reason_for_a_program_of_one_op():
    graph = parse_spec("inputs: {x: {shape: [4, 8]}, w: {shape: [8, 4]}}\nops: ['o = x @ w']\noutputs: [o]\n")
    assert search(graph, budget_s=10, progress="none").stats.unfused == "the program is one kernel: nothing to fuse"


def test_a_transpose_of_a_computed_tensor_is_named():
    example = (torch.randn(4, 8), torch.randn(4, 8))
    exported = torch.export.export(_Module(lambda a, b: (a + b).transpose(0, 1) @ a), example)
    with pytest.raises(Unsupported, match="aten.transpose.int: a transpose of a computed tensor"):
        from_fx(exported.graph, "computed")
