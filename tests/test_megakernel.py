"""The megakernel on the CPU: model specs and weights, the layer programs, the task graph and its dependency
analysis, the replay of the task list against the reference decoder, and the emitted CUDA (nvcc, when present).
The GPU run itself is benchmarks/megakernel_bench.py; one GPU test here runs where CUDA and CuPy are."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import superopt
from superopt.cli.megakernel_cmd import megakernel_command
from superopt.errors import SpecError, SuperoptError
from superopt.interpret import run
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import CUDA_EXPR, emit_elementwise
from superopt.kernels.megakernel import (
    SMEM_PER_BLOCK,
    STAMP_NAMES,
    Generation,
    GpuMegakernel,
    StaleRead,
    agrees_with_replay,
    bodies,
    build_report,
    critical_path,
    replay,
    report_lines,
    smem_plan,
    source,
    tables,
)
from superopt.kernels.megakernel.attention import AttentionBody, run_head, run_score
from superopt.kernels.megakernel.bodies import lower
from superopt.kernels.megakernel.lowering import KINDS, Stage, run_stage
from superopt.model import (
    Decoder,
    Model,
    apply_rope,
    layer_programs,
    load_model,
    load_spec,
    random_weights,
    rope_table,
)
from superopt.ops import OPS, missing_rules
from superopt.serialize import graph_hash

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PROMPT = [3, 17, 42, 7, 99]
TINY = ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-gemma", "tiny-mistral"]  # every architecture; tiny-qwen2's
# sizes no tile divides (hidden 96, 3 heads of 32, intermediate 200), tiny-mistral's window shorter than the prompt


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
    assert llama.weight_bytes() == pytest.approx(2.47e9, rel=0.01)  # docs/workloads.md: 2.47 GB read a step
    # An untied LM head: a step reads one row of the embedding table (Mistral-7B by hand: a layer's q, k, v, o,
    # gate, up, down and two norms; the LM head, the final norm and one embedding row).
    layer = 4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 14336 * 4096 + 2 * 4096
    assert load_spec(MODELS / "mistral-7b.yaml").config.weight_bytes() == 2 * (32 * layer + 32000 * 4096 + 2 * 4096)
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
    mask = torch.zeros(1, 1, 8, dtype=torch.float64)
    mask[..., 6:] = float("-inf")  # positions the step does not attend
    expect = torch.softmax(q @ k[:, :6].transpose(1, 2) / math.sqrt(c.head_dim), -1) @ v[:, :6]
    assert torch.allclose(f64("attention", q=q, k=k.transpose(1, 2), v=v, mask=mask), expect)
    kt = k.transpose(1, 2)  # the cached positions, then the new one
    k_all, v_all = run(
        progs["kv_append"],
        {"k_cache": kt[..., :7], "k": kt[..., 7:], "v_cache": v[:, :7], "v": v[:, 7:]},
        "float64",
    )
    assert torch.equal(k_all, kt) and torch.equal(v_all, v)
    wg, wu, wd = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    gpost = w[p + "post_attention_layernorm.weight"]
    y = rms(h, gpost)
    expect = h + (F.silu(y @ wg.T) * (y @ wu.T)) @ wd.T
    assert torch.allclose(f64("mlp", h=h, gamma=gpost[None], wg=wg.T, wu=wu.T, wd=wd.T), expect)
    qk = torch.randn(c.heads + c.kv_heads, c.head_dim, generator=gen, dtype=torch.float64)
    gq, gk = w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"]
    cos, sin = (t[5:6].double() for t in rope_table(c, 8))
    expect = apply_rope(torch.cat([rms(qk[: c.heads], gq), rms(qk[c.heads :], gk)]), cos, sin)
    cs = {"cos": torch.cat([cos, cos], -1), "sin": torch.cat([sin, sin], -1)}
    gamma = torch.cat([gq.expand(c.heads, -1), gk.expand(c.kv_heads, -1)])  # one row per head
    assert torch.allclose(f64("qk_rope", qk=qk, gamma=gamma, **cs), expect)


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


def test_gemv_tiles_spread_each_op_over_the_sms() -> None:
    """Llama-3.2-1B on 132 SMs, by hand: QKV's 3072 rows in 24-row tiles are 128 tasks of 96 KB, one an SM (32-row
    tiles put 128 KB on 96 SMs, 16-row tiles two tasks on 60 SMs); gate/up's 8192 outputs (two weight rows each,
    256 KB at most a task) in 32-output tiles, two rounds; every tile is whole 8-row chunks of 4 KB rows. Qwen3-0.6B's
    gate/up: 3072 outputs in 24-output tiles, 128 tasks of 96 KB."""
    llama = taskgraph.build(load_spec(MODELS / "llama-3.2-1b.yaml").config, 132)
    assert (llama.gemv["qkv"].tile, llama.gemv["qkv"].chunk, llama.gemv["qkv"].tiles) == (24, 8, 128)
    assert (llama.gemv["gateup"].tile, llama.gemv["gateup"].chunks) == (32, 8)
    qwen = taskgraph.build(load_spec(MODELS / "qwen3-0.6b.yaml").config, 132)
    assert (qwen.gemv["gateup"].tile, qwen.gemv["gateup"].tiles, qwen.gemv["gateup"].tile_bytes) == (24, 128, 98304)
    for g in [*llama.gemv.values(), *qwen.gemv.values()]:
        assert g.rows % g.tile == 0 and (g.tile * g.unit) % g.chunk == 0
        assert g.chunk_bytes <= taskgraph.SLOT_BYTES and g.tile_bytes <= taskgraph.TILE_BYTES


@pytest.mark.parametrize("spec, sms", [("llama-3.2-1b", 132), ("tiny-qwen3", 5)])
def test_schedule_spreads_each_op_instance(spec: str, sms: int) -> None:
    """All tiles of one op in one layer are waited for together, so an SM with two while another has none would
    stretch the phase: per instance, SMs' task counts differ by at most one."""
    tg = taskgraph.build(load_spec(MODELS / f"{spec}.yaml").config, sms)
    for op in taskgraph.OPS:
        for layer in {t.layer for t in tg.by_op(op)}:
            counts = [0] * sms
            for t in tg.by_op(op, layer):
                counts[t.sm] += 1
            assert max(counts) - min(counts) <= 1, (op, layer, counts)


def test_tables_leave_out_only_waits_met_earlier_in_the_step() -> None:
    """Every wait of a task is in its device wait list or in the list of a task before it on its SM (same step);
    an attention task's earlier-step waits come first and are its `early` count."""
    tg = taskgraph.build(load_spec(MODELS / "tiny-qwen3.yaml").config, 7, 2)
    descs, starts, waits = tables(tg, lambda t: 0)
    row = 0
    for ids in tg.sm_tasks:
        met: set[tuple[int, int]] = set()
        for i in ids:
            d = descs[16 * row : 16 * row + 16]
            row += 1
            emitted = [tuple(waits[4 * k : 4 * k + 4]) for k in range(d[7], d[7] + d[8])]
            assert all(w[1] == len(tg.counters[w[0]].producers) for w in emitted)
            met |= {(w[0], w[2]) for w in emitted}
            assert set(tg.tasks[i].waits) <= met
            early = d[13]
            if tg.tasks[i].op == "attn":
                assert all(w[2] > 0 for w in emitted[:early]) and all(w[2] == 0 for w in emitted[early:])
            else:
                assert early == 0
    assert sum(d for d in descs[8::16]) < sum(len(t.waits) for t in tg.tasks)  # something was left out


def test_shared_memory_plan() -> None:
    """Llama-3.2-1B by hand: 6 ring slots of 32 KB, barriers and reduction scratch (384 B), and one region, the
    larger of a GEMV's (x of 8192 bf16 and partial sums of 64 rows x 8 warps, 18432 B) and attention's (q, k, v and
    3 floats a q head, 1584 B, the RoPE row and q/k norm weights, 3 x 64 bf16, plus 64 cached positions of 352 B:
    k and v rows of 72 bf16 and 4 partial scores for each of 4 q heads: 24496 B): 221488 B. A head_dim that is not
    a multiple of 32 is refused by name."""
    cfg = load_spec(MODELS / "llama-3.2-1b.yaml").config
    tg = taskgraph.build(cfg, 132)
    plan = smem_plan(tg, 256)
    assert (plan["slots"], plan["kv_cap"], plan["bytes"]) == (6, 64, 6 * 32768 + 384 + 24496)
    assert smem_plan(tg, 256, 16)["bytes"] == 6 * 32768 + 384 + 18432
    assert smem_plan(tg, 40)["kv_cap"] == 16  # a split never holds more than ceil(40 / 4) positions
    with pytest.raises(SuperoptError, match="multiple of 8"):
        smem_plan(tg, 256, 12)
    with pytest.raises(SuperoptError, match="too many"):
        smem_plan(tg, 256, 4096)
    assert plan["bytes"] <= SMEM_PER_BLOCK
    with pytest.raises(SuperoptError, match="head_dim 48 is not a multiple of 32"):
        smem_plan(taskgraph.build(dataclasses.replace(cfg, head_dim=48), 132), 256)


def test_trace_summary_splits_each_task_into_phases() -> None:
    """A hand-made trace of the tiny model's last step (ns, in descriptor order): every task starts at 1000 ns
    times its id and spends 100 ns waiting, 200 in its prologue, 300 for weights, 400 computing, 500 in its
    epilogue; the summary's per-op means are those, and a layer spans its first QKV task's met to its last down
    task's done."""
    mk = GpuMegakernel.__new__(GpuMegakernel)  # the trace arithmetic needs no GPU: only the graph and the stamps
    mk.tg = taskgraph.build(load_spec(MODELS / "tiny-llama.yaml").config, 4)
    order = [i for ids in mk.tg.sm_tasks for i in ids]
    steps = [0, 100, 200, 300, 400, 500]
    mk.trace = torch.tensor([1000 * (i + 1) + sum(steps[: k + 1]) for i in order for k in range(len(STAMP_NAMES))])
    summary = mk.trace_summary()
    for op in taskgraph.OPS:
        assert summary[op] == {
            "wait_us": 0.1,
            "prologue_us": 0.2,
            "weights_us": 0.3,
            "compute_us": 0.4,
            "epilogue_us": 0.5,
        }
    assert summary["step_us"] == pytest.approx((1000 * (len(order) - 1) + 1500) / 1e3)
    for layer, span in enumerate(summary["layer_span_us"]):
        first = min(t.id for t in mk.tg.by_op("qkv", layer))
        last = max(t.id for t in mk.tg.by_op("down", layer))
        assert span == pytest.approx(round((1000 * (last - first) + 1400) / 1e3, 1))


def test_critical_path_follows_what_each_task_waited_for() -> None:
    """A simulated step of the tiny model on 4 SMs (ns): each SM runs its tasks in order, a task's dependencies
    are met 50 ns after its last producer is done (at once if that was before it started), and its phases take
    100, 200, 300 and 400 ns. The critical path ends at the task done last; each link's trigger is the producer or
    SM predecessor done last; a producer hands over in exactly 50 ns, the SM's own predecessor in 0-50; the
    links add up to the step; and the path runs through every layer in order to the LM head and the argmax."""
    mk = GpuMegakernel.__new__(GpuMegakernel)
    mk.tg = tg = taskgraph.build(load_spec(MODELS / "tiny-llama.yaml").config, 4)
    stamps: dict[int, list[int]] = {}
    running: dict[int, int] = {}  # SM -> its last task so far
    for t in tg.tasks:  # ids are a topological order, and each SM's list is in id order
        start = stamps[running[t.sm]][-1] if t.sm in running else 0
        met = max([start] + [stamps[p][-1] + 50 for p in t.deps])
        stamps[t.id] = [start, met, met + 100, met + 300, met + 600, met + 1000]
        running[t.sm] = t.id
    mk.trace = torch.tensor([v for ids in tg.sm_tasks for i in ids for v in stamps[i]])
    path = critical_path(tg, mk.trace_rows())
    done = {i: s[-1] for i, s in stamps.items()}
    assert path[-1]["task"] == max(done, key=done.get) and path[-1]["op"] == "argmax"
    before = {i: ids[k - 1] for ids in tg.sm_tasks for k, i in enumerate(ids) if k}
    for a, b in zip(path, path[1:]):
        inputs = tg.tasks[b["task"]].deps + ([before[b["task"]]] if b["task"] in before else [])
        assert a["task"] == max(inputs, key=done.get)
        if a["task"] in tg.tasks[b["task"]].deps:
            assert b["handover_us"] == pytest.approx(0.05)
        else:
            assert 0 <= b["handover_us"] <= 0.05
    for link in path:
        assert [link[f"{p}_us"] for p in ("prologue", "weights", "compute", "epilogue")] == pytest.approx(
            [0.1, 0.2, 0.3, 0.4]
        )
    total = sum(x["handover_us"] + 1.0 for x in path)
    assert total == pytest.approx((done[path[-1]["task"]] - stamps[path[0]["task"]][1]) / 1e3)
    layers = [x["layer"] for x in path]
    assert layers == sorted(layers) and set(layers) == set(range(tg.config.layers + 1))
    assert {"qkv", "attn", "oproj", "gateup", "down", "lmhead"} <= {x["op"] for x in path}
    assert mk.trace_summary()["critical_path"]["argmax"]["tasks"] == 1


def test_agreement_with_the_replay_allows_only_near_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    tokens = [0, 1] + logits.argmax(-1).tolist()
    cpu = Generation(tokens, logits)
    assert agrees_with_replay(Generation(tokens, logits + 1e-3), cpu, 2) == {
        "ok": True,
        "first_flip": None,
        "max_logit_diff": pytest.approx(1e-3, rel=1e-4),
    }
    assert not agrees_with_replay(Generation(tokens, logits + 0.5), cpu, 2)["ok"]  # beyond bf16 rounding
    # Step 1's two best logits 0.01 apart, and the GPU's 0.02 off: a near tie that rounding decides.
    tied = logits.clone()
    best, second = tied[1].topk(2).indices.tolist()
    tied[1, second] = tied[1, best] - 0.01
    cpu = Generation(tokens, tied)
    flipped = Generation(tokens[:3] + [second, 5, 5], tied + 0.02 * F.one_hot(torch.tensor(second), 10))
    expected = {"ok": True, "first_flip": 1, "max_logit_diff": pytest.approx(0.02, rel=1e-4)}
    assert agrees_with_replay(flipped, cpu, 2) == expected
    # The same flip where the replay's margin is 0.5: not a tie.
    tied[1, second] = tied[1, best] - 0.5
    assert not agrees_with_replay(flipped, Generation(tokens, tied), 2)["ok"]


def test_check_rejects_a_missing_wait(llama: Model) -> None:
    tg = taskgraph.build(llama.config, 8, 2)
    victim = tg.by_op("down", 1)[0]
    victim.waits = [w for w in victim.waits if tg.tasks[tg.counters[w[0]].producers[0]].op != "gateup"]
    with pytest.raises(SuperoptError, match=f"task {victim.id} .*does not wait"):
        taskgraph.check(tg)


# --- the replay ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_replay_matches_the_reference_decoder(name: str) -> None:
    """The task list, interleaved over 8 SMs (adversarially and at random), over two launches, its bodies
    lowered from the layer programs, gives the bf16 reference decoder's tokens and
    logits (the programs round where HF rounds, so equal up to float32 summation order and a bias rounded before
    its add), and stays within bf16 error of the float32 reference on the same sequence."""
    model = load_model(MODELS / f"{name}.yaml")
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


# --- GEMV task bodies lowered from the layer programs ------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_every_gemv_kind_lowers_and_its_stage_computes_its_program(name: str) -> None:
    """Each GEMV kind's stage, run as one task over all its rows (lowering.run_stage), against the reference
    interpreter running the layer program in float64: within bf16 rounding. The MLP's two stages chain through
    the activation buffer."""
    model = load_model(MODELS / f"{name}.yaml")
    cfg = model.config
    progs = layer_programs(cfg)
    tg = taskgraph.build(cfg, 8, 2)
    stages = lower(tg).bodies
    assert all(isinstance(stages[k.name], Stage) for k in KINDS), stages
    gen = torch.Generator().manual_seed(1)

    def weight_rows(shape: tuple[int, ...]) -> torch.Tensor:  # scaled so the GEMV's outputs are near 1
        return (torch.randn(shape, generator=gen) / shape[0] ** 0.5).to(torch.bfloat16)

    for program in ("attn_in", "attn_out", "lm_head", "mlp"):
        graph = progs[program]
        inputs = {n: torch.randn(graph.tensors[n].shape, generator=gen).to(torch.bfloat16) for n in graph.inputs}
        weights = {w for k in KINDS if k.program == program for w in k.weights}
        inputs |= {n: weight_rows(graph.tensors[n].shape) for n in weights}
        expected = run(graph, inputs, "float64")[0]  # (lm_head's second output, its argmax, is the token)
        value: dict[str, torch.Tensor] = {}
        for kind in (k for k in KINDS if k.program == program):
            st = stages[kind.name]
            assert isinstance(st, Stage)
            vectors = {v: (inputs[v] if v else value[""]).float().reshape(1, -1) for v in st.vectors}
            rows = {v: inputs[v].float().reshape(1, -1) for v in st.rows}
            value[""] = run_stage(st, vectors, rows, [inputs[w].float().T for w in st.weights])
        got = value[""]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 2**-6 * expected.abs().max(), (name, program)


def test_a_winner_that_does_not_lower_gives_way_to_its_layer_program_and_the_report_says_why() -> None:
    """attn_in with its weight scaled inside the program (the GEMV's weight is not a program input): the qkv
    body is lowered from the layer program instead, the build report says why, the others from their winners;
    lm_head without its argmax (the step needs the next token): the LM head and argmax bodies likewise."""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    p = superopt.Graph("attn_in")
    x, gamma = p.input("h", (1, cfg.hidden), "bfloat16"), p.input("gamma", (1, cfg.hidden), "bfloat16")
    w = p.input("wqkv", (cfg.hidden, cfg.qkv_rows), "bfloat16")
    p.output(p.matmul(p.mul(p.rms_norm(x, eps=cfg.eps), gamma), p.mul_scalar(w, c=1.0)))
    lm = superopt.Graph("lm_head")
    h, g = lm.input("h", (1, cfg.hidden), "bfloat16"), lm.input("gamma", (1, cfg.hidden), "bfloat16")
    lm.output(lm.matmul(lm.mul(lm.rms_norm(h, eps=cfg.eps), g), lm.input("w", (cfg.hidden, cfg.vocab), "bfloat16")))
    progs = layer_programs(cfg)
    winners = {"attn_in": p, "lm_head": lm, "mlp": progs["mlp"]}
    tg = taskgraph.build(cfg, 8, 2)
    low = lower(tg, winners)
    assert low.sources["attn_in"] is not p and low.sources["lm_head"] is not lm and low.sources["mlp"] is winners["mlp"]
    assert "'mul_scalar' is not a [k, n] program input" in low.fallbacks["attn_in"]
    assert "the step needs the next token" in low.fallbacks["lm_head"]
    report = {r["kind"]: r for r in build_report(tg, programs=winners)}
    assert all(r["body"] == "generated" for r in report.values())
    (qkv,) = (c for c in report["qkv"]["computes"] if c["program"] == "attn_in")
    assert qkv["lowered_from"] == "program" and "mul_scalar" in qkv["winner_not_lowered"]
    assert report["gateup"]["computes"][0]["lowered_from"] == "winner"
    assert "the winner does not lower" in report_lines(list(report.values()))[0]
    assert source(tg, "t", 32, 32, programs=winners) == source(tg, "t", 32, 32, programs={"mlp": progs["mlp"]})


def test_a_layer_program_that_does_not_lower_is_a_model_the_megakernel_refuses(monkeypatch: Any) -> None:
    """With no lowerable program to fall back to, building says which task kind and why, in one line."""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    tg = taskgraph.build(cfg, 8, 2)
    progs = layer_programs(cfg)
    lm = superopt.Graph("lm_head")
    h, g = lm.input("h", (1, cfg.hidden), "bfloat16"), lm.input("gamma", (1, cfg.hidden), "bfloat16")
    lm.output(lm.matmul(lm.mul(lm.rms_norm(h, eps=cfg.eps), g), lm.input("w", (cfg.hidden, cfg.vocab), "bfloat16")))
    monkeypatch.setattr(bodies, "layer_programs", lambda c, **kw: progs | {"lm_head": lm})
    with pytest.raises(SuperoptError, match="the lmhead task body does not lower from its layer program: .*next token"):
        lower(tg)


# --- attention's body lowered from qk_rope, kv_append and attention ------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_attention_lowers_and_its_steps_compute_the_programs(name: str) -> None:
    """qk_rope's head steps on every head row (attention.run_head) against the reference interpreter running
    qk_rope in float64; the score steps at the attended positions, normalized and times v as the split-KV rule
    computes them, against the attention program with its mask (-inf past the query's position) in float64:
    within bf16 rounding."""
    cfg = load_spec(MODELS / f"{name}.yaml").config
    progs = layer_programs(cfg)
    body = lower(taskgraph.build(cfg, 8, 2)).bodies["attn"]
    assert isinstance(body, AttentionBody), body
    gen = torch.Generator().manual_seed(2)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(torch.bfloat16)

    qk = progs["qk_rope"]
    cos, sin = (torch.cat([t[5], t[5]])[None] for t in rope_table(cfg, 8))
    inputs = {n: rand(qk.tensors[n].shape) for n in qk.inputs} | {"cos": cos, "sin": sin}
    (expected,) = run(qk, inputs, "float64")
    gamma = inputs["gamma"].float() if cfg.qk_norm else None
    got = run_head(body, inputs["qk"].float(), gamma, cos.float(), sin.float())
    assert (got - expected).abs().max() <= 2**-6 * expected.abs().max(), name
    att = progs["attention"]
    q, k, v = (rand(att.tensors[n].shape) for n in "qkv")
    n, seen = att.tensors["k"].shape[-1], 11  # the query at position 10 attends 0..10
    mask = torch.full((1, 1, n), -math.inf).index_fill(2, torch.arange(seen), 0.0).to(torch.bfloat16)
    (expected,) = run(att, {"q": q, "k": k, "v": v, "mask": mask}, "float64")
    scores = run_score(body, q.float() @ k.float()[..., :seen])
    got = torch.softmax(scores, -1) @ v.float()[:, :seen]
    assert (got - expected).abs().max() <= 2**-6 * expected.abs().max(), name


def test_attention_winners_that_do_not_lower_give_way_to_the_layer_programs_and_say_why() -> None:
    """A softmax without its max shift and a q/k step with no rule on head rows: the attention body is lowered
    from the layer programs; the build report says why."""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    tg = taskgraph.build(cfg, 8, 2)
    progs = layer_programs(cfg)
    att = progs["attention"]
    p = superopt.Graph("attention")
    q, k, v, mask = (p.input(n, att.tensors[n].shape, "bfloat16") for n in ("q", "k", "v", "mask"))
    e = p.exp(p.add(p.mul_scalar(p.matmul(q, k), c=0.125), mask))
    p.output(p.matmul(p.div(e, p.sum(e, dim=2, keepdim=True)), v))
    report = {r["kind"]: r for r in build_report(tg, programs={"attention": p})}
    (entry,) = (c for c in report["attn"]["computes"] if c["program"] == "attention")
    assert entry["lowered_from"] == "program" and "is not the sub of softmax attention" in entry["winner_not_lowered"]
    rope = superopt.Graph("qk_rope")
    x = rope.input("qk", (cfg.heads + cfg.kv_heads, cfg.head_dim), "bfloat16")
    cs, sn = (rope.input(n, (1, cfg.head_dim), "bfloat16") for n in ("cos", "sin"))
    rope.output(rope.rope(rope.mul(x, rope.max(x, dim=1, keepdim=True)), cs, sn))
    low = lower(tg, {"qk_rope": rope})
    assert graph_hash(low.sources["qk_rope"]) == graph_hash(progs["qk_rope"])
    assert "op 'max' has no rule on an attention task's head rows" in low.fallbacks["qk_rope"]


def test_a_fused_qk_rope_winner_lowers_with_its_inner_tiles_in_float32() -> None:
    """Qwen3's q/k norm as the search finds it (one loop-free block over whole head rows: rms_norm, the weight,
    its output rounded), then RoPE: verified equal to the program, lowered to the same ops, the norm's result
    unrounded, and its head steps within bf16 of the program's."""
    cfg = load_spec(MODELS / "tiny-qwen3.yaml").config
    program = layer_programs(cfg)["qk_rope"]
    rows, d = cfg.heads + cfg.kv_heads, cfg.head_dim
    g = superopt.Graph("qk_rope")
    x, w = g.input("qk", (rows, d), "bfloat16"), g.input("gamma", (rows, d), "bfloat16")
    cs, sn = g.input("cos", (1, d), "bfloat16"), g.input("sin", (1, d), "bfloat16")
    b = g.block_graph(grid=(rows,), forloop_range=1)
    xt, wt = b.input(x, imap=(0,)), b.input(w, imap=(0,))
    b.output(b.accum_sum(b.mul(wt, b.rms_norm(xt, eps=cfg.eps))), omap=(0,))
    (normed,) = g.graph_def(b)
    g.output(g.rope(normed, cs, sn))
    assert superopt.verify(program, g).equivalent
    tg = taskgraph.build(cfg, 8, 2)
    low = lower(tg, {"qk_rope": g})
    assert low.sources["qk_rope"] is g
    body = low.bodies["attn"]
    assert isinstance(body, AttentionBody)
    assert [(s.op.op, s.dtype) for s in body.head] == [("rms_norm", "float32"), ("mul", "bfloat16"),
                                                        ("rope", "bfloat16")]  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    heads, gamma = (torch.randn(rows, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    cos, sin = (torch.cat([t[3], t[3]])[None] for t in rope_table(cfg, 8))
    (expected,) = run(program, {"qk": heads, "gamma": gamma, "cos": cos, "sin": sin}, "float64")
    got = run_head(body, heads.float(), gamma.float(), cos.float(), sin.float())
    assert (got - expected).abs().max() <= 2**-6 * expected.abs().max()


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
@pytest.mark.parametrize("spec", TINY)
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
    """--offline: no search, the unfused layer programs (tests/test_model_search.py builds from a searched plan)."""
    args = [str(MODELS / "tiny-qwen3.yaml"), "--emit", str(tmp_path), "--sms", "16", "--offline"]
    result = CliRunner().invoke(megakernel_command, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    graph = json.loads((tmp_path / "taskgraph.json").read_text())
    assert graph["n_sms"] == 16 and len(graph["tasks"]) == sum(len(ids) for ids in graph["sm_tasks"])
    assert 'extern "C" __global__' in (tmp_path / "megakernel.cu").read_text()
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert report["plan_status"] == "offline" and [k["kind"] for k in report["kinds"]] == list(taskgraph.OPS)
    assert all(c["verification"]["method"] == "identity" for k in report["kinds"] for c in k["computes"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_megakernel_equals_replay(llama: Model) -> None:
    pytest.importorskip("cupy")
    from superopt.kernels.megakernel import GpuMegakernel

    mk = GpuMegakernel(llama)
    assert agrees_with_replay(mk.generate(PROMPT, 8), replay(llama, mk.tg, PROMPT, 8), len(PROMPT))["ok"]
