"""The megakernel on the CPU: model specs and weights, the layer programs, the task graph and its dependency
analysis, the replay of the task list against the reference decoder, and the emitted CUDA (nvcc, when present).
The GPU run itself is benchmarks/megakernel_bench.py; one GPU test here runs where CUDA and CuPy are."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from superopt.cli.megakernel_cmd import megakernel_command
from superopt.errors import SpecError, SuperoptError
from superopt.interpret import run
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import CUDA_EXPR, emit_elementwise
from superopt.kernels.megakernel import StaleRead, replay, source
from superopt.model import Decoder, Model, layer_programs, load_model, load_spec, random_weights
from superopt.ops import OPS, missing_rules

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PROMPT = [3, 17, 42, 7, 99]


@pytest.fixture(scope="module")
def llama() -> Model:
    return load_model(MODELS / "tiny-llama.yaml")


@pytest.fixture(scope="module")
def qwen() -> Model:
    return load_model(MODELS / "tiny-qwen3.yaml")


# --- specs and weights --------------------------------------------------------------------------------------


def test_specs_read_fields_and_config_json() -> None:
    llama, qwen = load_spec(MODELS / "llama-3.2-1b.yaml").config, load_spec(MODELS / "qwen3-0.6b.yaml").config
    assert (llama.hidden, llama.layers, llama.group, llama.rope_scaling["factor"]) == (2048, 16, 4, 32.0)
    assert llama.weight_bytes() == pytest.approx(2.47e9, rel=0.01)  # ANCHORS.md: 2.47 GB read a step
    assert (qwen.qk_norm, qwen.head_dim * qwen.heads, qwen.hidden) == (True, 2048, 1024)
    tiny = load_spec(MODELS / "tiny-qwen3.yaml")  # `model:` names an HF config.json
    assert (tiny.config.arch, tiny.config.tie_embeddings, tiny.seed) == ("qwen3", False, 1)


def test_spec_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("model: {model_type: gpt2, hidden_size: 8}\n")
    with pytest.raises(SpecError, match="gpt2.*not supported"):
        load_spec(bad)
    bad.write_text("model: {model_type: llama, hidden_size: 8}\n")
    with pytest.raises(SpecError, match="num_attention_heads.* missing"):
        load_spec(bad)


def test_random_weights_are_seeded(llama: Model) -> None:
    again = random_weights(llama.config, seed=0)
    other = random_weights(llama.config, seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(again[name], llama.weights[name]) and not torch.equal(other[name], llama.weights[name])
    assert set(again) == set(llama.config.param_shapes())


def test_safetensors_reader_without_the_package(tmp_path: Path, qwen: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A safetensors file written by hand (8-byte header length, JSON header, raw bf16) loads with the
    fallback reader even when the safetensors package is importable."""
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # force the fallback
    header, blobs, off = {}, [], 0
    for name, t in qwen.weights.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (tmp_path / "config.json").write_text((MODELS / "tiny-qwen3.json").read_text())
    (tmp_path / "m.yaml").write_text("model: config.json\nweights: model.safetensors\nmax_seq: 16\n")
    loaded = load_model(tmp_path / "m.yaml")
    assert all(torch.equal(loaded.weights[n], t) for n, t in qwen.weights.items())


# --- the layer programs -------------------------------------------------------------------------------------


def test_layer_programs_compute_the_decoder_blocks(qwen: Model) -> None:
    """Each IR program, run by the reference interpreter in float64, against the same block written in torch."""
    c, w = qwen.config, {k: v.double() for k, v in qwen.weights.items()}
    progs = layer_programs(c, context=8)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, c.hidden, generator=gen, dtype=torch.float64)
    p = "model.layers.0."

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + c.eps) * g

    def f64(prog: str, **inputs: torch.Tensor) -> torch.Tensor:
        return run(progs[prog], inputs, "float64")[0]

    gin = w[p + "input_layernorm.weight"]
    wqkv = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.allclose(f64("attn_in", h=h, gamma=gin[None], wqkv=wqkv.T), rms(h, gin) @ wqkv.T)
    q = torch.randn(c.kv_heads, c.group, c.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(c.kv_heads, 8, c.head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(c.kv_heads, 8, c.head_dim, generator=gen, dtype=torch.float64)
    expect = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c.head_dim), -1) @ v
    assert torch.allclose(f64("attention", q=q, k=k.transpose(1, 2), v=v), expect)
    wg, wu, wd = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    gpost = w[p + "post_attention_layernorm.weight"]
    y = rms(h, gpost)
    expect = h + (F.silu(y @ wg.T) * (y @ wu.T)) @ wd.T
    assert torch.allclose(f64("mlp", h=h, gamma=gpost[None], wg=wg.T, wu=wu.T, wd=wd.T), expect)
    qn = torch.randn(c.heads + c.kv_heads, c.head_dim, generator=gen, dtype=torch.float64)
    gq = w[p + "self_attn.q_norm.weight"]
    assert torch.allclose(f64("qk_norm", q=qn, gamma=gq[None]), rms(qn, gq))


def test_elementwise_emitter_rounds_each_op() -> None:
    progs = layer_programs(load_spec(MODELS / "tiny-llama.yaml").config)
    code = emit_elementwise(progs["mlp_act"], "mlp_act")
    assert "__device__ __forceinline__ float mlp_act(float in0, float in1)" in code
    assert code.count("rbf(") == 2  # silu and mul, each rounded to bf16 as the interpreter's native mode does
    with pytest.raises(SuperoptError, match="not elementwise"):
        emit_elementwise(progs["attn_in"], "f")


def test_cuda_emitter_covers_every_elementwise_op() -> None:
    assert [n for n in missing_rules(CUDA_EXPR) if OPS[n].elementwise] == []


# --- the task graph -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, sms", [("tiny-llama", 8), ("tiny-qwen3", 5), ("tiny-llama", 132)])
def test_task_graph_dependencies(spec: str, sms: int) -> None:
    """Recomputed independently of taskgraph's analysis: the dependency graph is acyclic and every consumer
    waits, through counters whose targets equal their producer counts, for every task writing what it reads."""
    tg = taskgraph.build(load_spec(MODELS / f"{spec}.yaml").config, sms, 2)
    g = nx.DiGraph()
    g.add_nodes_from(t.id for t in tg.tasks)
    producers = {c.id: set(c.producers) for c in tg.counters}
    for c in tg.counters:
        assert sum(c.id in tg.tasks[p].signals for p in c.producers) == len(c.producers)
    for t in tg.tasks:
        waited = set().union(*(producers[c] for c, off in t.waits if off == 0))
        for r in t.reads:
            writers = {u.id for u in tg.tasks for w in u.writes if w.overlaps(r)}
            assert writers, f"nobody writes what task {t.id} reads"
            if not r.prev:
                assert writers <= waited, f"task {t.id} ({t.op}) misses {writers - waited}"
                g.add_edges_from((u, t.id) for u in writers)
            else:  # earlier steps' data: the task waits for the previous step's last task, or descends from one
                assert (tg.sink.signals[0], 1) in t.waits or t.deps
    assert nx.is_directed_acyclic_graph(g)
    assert nx.ancestors(g, tg.sink.id) == set(range(len(tg.tasks) - 1))
    assert sorted(i for ids in tg.sm_tasks for i in ids) == list(range(len(tg.tasks)))
    assert {op for op in taskgraph.OPS} == {t.op for t in tg.tasks}


def test_check_rejects_a_missing_wait(llama: Model) -> None:
    tg = taskgraph.build(llama.config, 8, 2)
    victim = tg.by_op("down", 1)[0]
    victim.waits = [w for w in victim.waits if tg.tasks[tg.counters[w[0]].producers[0]].op != "gateup"]
    with pytest.raises(SuperoptError, match=f"task {victim.id} .*does not wait"):
        taskgraph.check(tg)


# --- the replay ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_replay_matches_the_reference_decoder(name: str, request: pytest.FixtureRequest) -> None:
    """The task list, interleaved over 8 SMs (adversarially and at random), over two launches, gives the bf16
    reference decoder's tokens and logits (same rounding points, so equal up to float32 summation order), and
    stays within bf16 error of the float32 reference on the same sequence."""
    model = request.getfixturevalue(name)
    tg = taskgraph.build(model.config, 8, 2)
    out = replay(model, tg, PROMPT, 8)
    shuffled = replay(model, tg, PROMPT, 8, seed=3, launches=3)
    assert shuffled.tokens == out.tokens and torch.equal(shuffled.logits, out.logits)
    tokens, logits = Decoder(model, "bfloat16").generate(PROMPT, 8)
    assert out.tokens == tokens
    assert (out.logits - logits).abs().max() <= 2**-6 * logits.abs().max()  # a bf16 ulp at the largest logit
    _, exact = Decoder(model, "float32").generate(PROMPT, 8, forced=out.tokens[len(PROMPT) :])
    assert ((out.logits - exact).norm() / exact.norm()) < 5e-2
    assert len(set(out.tokens[len(PROMPT) :])) > 2  # the random model does not just echo a token


def test_replay_detects_a_missing_wait(llama: Model) -> None:
    """Drop the O projection's wait on attention: the replay runs it as soon as its other waits allow and reads
    attention partials its step has not written."""
    tg = taskgraph.build(llama.config, 8, 2)
    for t in tg.by_op("oproj", 0):
        t.waits = [w for w in t.waits if tg.tasks[tg.counters[w[0]].producers[0]].op != "attn"]
    with pytest.raises(StaleRead, match="part.0"):
        replay(llama, tg, PROMPT, 2)


# --- CUDA source and CLI ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen3"])
def test_emitted_cuda_compiles_for_sm90a(spec: str, tmp_path: Path) -> None:
    ms = load_spec(MODELS / f"{spec}.yaml")
    src = tmp_path / "mk.cu"
    src.write_text(source(taskgraph.build(ms.config, 132), ms.name, ms.max_seq, ms.max_seq))
    proc = subprocess.run(
        ["nvcc", "-arch=sm_90a", "-c", "-Xptxas", "-v", "-o", str(tmp_path / "mk.o"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 bytes spill stores" in proc.stderr  # registers: none spilled to local memory


def test_cli_emit_writes_source_graph_and_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        megakernel_command, [str(MODELS / "tiny-qwen3.yaml"), "--emit", str(tmp_path), "--sms", "16"]
    )
    assert result.exit_code == 0, result.output
    graph = json.loads((tmp_path / "taskgraph.json").read_text())
    assert graph["n_sms"] == 16 and len(graph["tasks"]) == sum(len(ids) for ids in graph["sm_tasks"])
    assert 'extern "C" __global__' in (tmp_path / "megakernel.cu").read_text()
    assert "argmax has no IR op" in (tmp_path / "build_report.txt").read_text()
    if not torch.cuda.is_available():
        result = CliRunner().invoke(megakernel_command, [str(MODELS / "tiny-qwen3.yaml")])
        assert result.exit_code == 2 and "no CUDA GPU" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_megakernel_equals_replay(llama: Model) -> None:
    pytest.importorskip("cupy")
    from superopt.kernels.megakernel import GpuMegakernel

    mk = GpuMegakernel(llama)
    gpu = mk.generate(PROMPT, 8)
    cpu = replay(llama, mk.tg, PROMPT, 8)
    assert gpu.tokens == cpu.tokens
    assert (gpu.logits - cpu.logits).abs().max() <= 2**-6 * cpu.logits.abs().max()
