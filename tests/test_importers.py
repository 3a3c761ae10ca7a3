"""Importers: an ONNX file exported by torch and a torch.export `.pt2` load as the same program as the YAML spec
(same canonical hash, so the same cache entry) and search like it; canonical forms; errors name the op."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import superopt
from superopt.cli.search_cmd import search_command
from superopt.errors import SpecError

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DIMS = {"B": 2, "D": 64, "N": 16}


class GatedMLP(torch.nn.Module):
    def forward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return F.silu(x @ w1) * (x @ w2)


class RMSNormLinear(torch.nn.Module):
    """rms_norm written out, as models often do."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) @ w


def args(*shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen).half() for s in shapes)


def export_onnx(module: torch.nn.Module, example: tuple, names: list[str], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=names, output_names=["o"])
    return path


def export_pt2(module: torch.nn.Module, example: tuple, path: Path) -> Path:
    torch.export.save(torch.export.export(module, example), str(path))
    return path


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    example = args((2, 64), (64, 16), (64, 16))
    return (
        superopt.load(EXAMPLES / "gated_mlp.yaml", dims=DIMS),
        export_onnx(GatedMLP(), example, ["x", "w1", "w2"], root / "gated_mlp.onnx"),
        export_pt2(GatedMLP(), example, root / "gated_mlp.pt2"),
    )


def test_onnx_and_pt2_load_as_the_yaml_program(gated):
    spec, onnx_file, pt2_file = gated
    for path in (onnx_file, pt2_file):
        graph = superopt.load(path)
        assert graph.inputs == ["x", "w1", "w2"] and [graph.tensors[n] for n in graph.inputs] == spec.input_types()
        assert superopt.graph_hash(graph) == superopt.graph_hash(spec), str(graph)
        inputs = superopt.random_inputs(graph, seed=1)
        assert torch.equal(superopt.run(graph, inputs, "float64")[0], superopt.run(spec, inputs, "float64")[0])


def test_onnx_and_pt2_search_like_the_yaml_spec(gated, tmp_path, monkeypatch):
    """The YAML spec searched once; the ONNX and .pt2 files are the same program: cache hits, same winner."""
    spec, onnx_file, pt2_file = gated
    monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(tmp_path))
    yaml_file = tmp_path / "gated_mlp.yaml"
    yaml_file.write_text(
        (EXAMPLES / "gated_mlp.yaml").read_text().replace("B: 8, D: 4096, N: 4096", "B: 2, D: 64, N: 16")
    )
    runner = CliRunner()
    first = runner.invoke(search_command, [str(yaml_file), "--budget", "2", "--progress", "none", "--json"])
    assert first.exit_code == 0, first.output
    flags = ["--budget", "2", "--preset", "gemv", "--require-hit"]  # the spec's preset, given on the command line
    again = runner.invoke(search_command, [str(onnx_file), str(pt2_file), *flags])
    assert again.exit_code == 0, again.output
    assert again.output.count("cache hit") == 2 and "cache: 2 hits, 0 misses" in again.output


def test_rms_norm_written_out_is_rms_norm(tmp_path):
    spec = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml", dims=DIMS)
    example = args((2, 64), (64, 16))
    pt2 = superopt.load(export_pt2(RMSNormLinear(), example, tmp_path / "r.pt2"))
    assert superopt.graph_hash(pt2) == superopt.graph_hash(spec), str(pt2)
    onnx_graph = superopt.load(export_onnx(RMSNormLinear(), example, ["x", "w"], tmp_path / "r.onnx"))
    assert [op.op for op in onnx_graph.ops] == ["rms_norm", "matmul"]  # 1/sqrt as ONNX writes it is rsqrt
    assert onnx_graph.ops[0].attrs["eps"] == pytest.approx(1e-6, rel=0.02)  # stored in float16 by the exporter


class LayerNormGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5), approximate="tanh")


def test_layer_norm_and_tanh_gelu_map_to_their_ops(tmp_path):
    example = args((2, 64), (64,), (64,))
    graph = superopt.load(export_pt2(LayerNormGelu(), example, tmp_path / "ln.pt2"))
    assert [op.op for op in graph.ops] == ["layer_norm", "mul", "add", "gelu_tanh"]
    inputs = dict(zip(graph.inputs, (x.double() for x in example)))
    (out,) = superopt.run(graph, inputs, "float64")
    torch.testing.assert_close(out, LayerNormGelu()(*inputs.values()), rtol=1e-9, atol=1e-9)


def test_linear_weight_becomes_its_transpose(tmp_path):
    layer = torch.nn.Linear(64, 16, bias=False).half()
    graph = superopt.load(export_pt2(layer, args((2, 64)), tmp_path / "linear.pt2"))
    assert graph.inputs == ["input", "weight_t"] and graph.tensors["weight_t"].shape == (64, 16)


def test_unsupported_ops_are_named(tmp_path):
    class Cumsum(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, 0) + 1

    example = args((4, 8))
    with pytest.raises(SpecError, match=r"c\.pt2: aten\.cumsum\.default has no IR op"):
        superopt.load(export_pt2(Cumsum(), example, tmp_path / "c.pt2"))
    with pytest.raises(SpecError, match=r"c\.onnx: node \d+ CumSum .*: CumSum has no IR op"):
        superopt.load(export_onnx(Cumsum(), example, ["x"], tmp_path / "c.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00 not a model")
    with pytest.raises(SpecError, match="junk.onnx: not an ONNX model"):
        superopt.load(tmp_path / "junk.onnx")
    with pytest.raises(SpecError, match="missing.pt2: cannot read"):
        superopt.load(tmp_path / "missing.pt2")


def test_argmax_is_left_to_torch(tmp_path):
    """torch's argmax gives int64 indices and the IR's float32 values, which torch code indexing with them cannot
    take: it is not mapped (superopt.optimize runs it in torch)."""

    class Greedy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.argmax(x, -1)

    with pytest.raises(SpecError, match=r"g\.pt2: aten\.argmax\.default has no IR op"):
        superopt.load(export_pt2(Greedy(), args((4, 8)), tmp_path / "g.pt2"))


def test_onnx_without_the_package_says_how_to_install(tmp_path, monkeypatch, gated):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(SpecError, match=r"needs the onnx package: pip install 'superopt\[onnx\]'"):
        superopt.load(gated[1])
