"""The megakernel with int8 and int4 weights, on the CPU: the quantized layer programs, their lowering (verified,
and its mutants rejected), the packed tiles, the replay against the reference decoder on the dequantized weights,
the emitted CUDA (nvcc, when present) and the command's --precision and --group."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from superopt.checkpoint import read_safetensors
from superopt.cli.main import main
from superopt.cli.megakernel_cmd import resolve_format, resolve_head
from superopt.errors import SuperoptError
from superopt.interpret import unpack_int4
from superopt.kernels import taskgraph
from superopt.kernels.megakernel import build_report, replay, report_lines, source
from superopt.kernels.megakernel.bodies import lower, lowered_programs
from superopt.kernels.megakernel.layout import pack_chunks, packed_weights, unpack_chunks
from superopt.kernels.megakernel.lowering import Stage
from superopt.model import (
    BF16,
    LM_HEAD,
    Decoder,
    Model,
    ProgramDecoder,
    WeightFormat,
    layer_programs,
    load_model,
    load_spec,
    quantize_model,
    stored_rows,
    weight_format,
)
from superopt.model_search import validate_lowering
from superopt.quant import dequantize
from superopt.serialize import graph_hash
from superopt.verification import verify

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PROMPT = [3, 17, 42, 7, 99]
FORMATS = {
    "int8": weight_format("int8"),
    "int4": weight_format("int4"),
    "int4-asymmetric": weight_format("int4", symmetric=False),
}


@pytest.fixture(scope="module")
def bf16_models() -> dict[str, Model]:
    return {name: load_model(MODELS / f"{name}.yaml") for name in ("tiny-llama", "tiny-qwen3")}


# --- the quantized model and its layer programs -------------------------------------------------------------


@pytest.mark.parametrize("label", ["int8", "int4-asymmetric"])
def test_layer_programs_dequantize_the_stored_weights_and_compute_the_model(
    label: str, bf16_models: dict[str, Model]
) -> None:
    """The projections' and the LM head's weight inputs are the stored tensors (int8 or int4 bytes, bf16 scales and
    zeros) and the programs dequantize them; the step run through them (ProgramDecoder) is the reference decoder
    on the dequantized weights. With the head kept bf16 its program is the bf16 one, matmul and all."""
    model = quantize_model(bf16_models["tiny-llama"], FORMATS[label])
    assert model.head_fmt == model.fmt
    progs = layer_programs(model.config, 16, model.fmt, model.head_fmt)
    mlp = progs["mlp"]
    assert [op.op for op in mlp.ops].count("dequant") == 3
    assert mlp.tensors["wd"].dtype == model.fmt.dtype and ("wd_zero" in mlp.inputs) == model.fmt.zero
    head = progs["lm_head"]
    assert [op.op for op in head.ops].count("dequant") == 1 and "matmul" not in {op.op for op in head.ops}
    assert head.tensors["w"].dtype == model.fmt.dtype and ("w_zero" in head.inputs) == model.fmt.zero
    wide = layer_programs(model.config, 16, model.fmt, BF16)["lm_head"]
    assert graph_hash(wide) == graph_hash(layer_programs(model.config, 16)["lm_head"])
    tokens, logits = Decoder(model, "bfloat16").generate(PROMPT[:3], 3)
    # teacher-forced: the unfused programs round each product of the dequantized weight and x to bf16 (the
    # interpreter's rounding of the mul op), so a near tie may go the other way
    _, plogits = ProgramDecoder(model, precision="native").generate(PROMPT[:3], 3, forced=tokens[3:])
    assert (plogits - logits).abs().max() <= 2**-4 * logits.abs().max()


def test_quantizing_at_load_keeps_the_rest_bf16_and_refuses_what_it_cannot(bf16_models: dict[str, Model]) -> None:
    base = bf16_models["tiny-llama"]
    model = quantize_model(base, FORMATS["int4"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert model.quant[name].q.dtype == torch.uint8 and model.quant[name].q.shape == (256, 256)
    # tiny-llama ties its embeddings: the gather reads the bf16 table, the LM head is a quantized copy of it
    assert base.config.tie_embeddings and model.quant[LM_HEAD].q.shape == (512, 128)
    embed = "model.embed_tokens.weight"
    assert torch.equal(model.w(embed), base.w(embed))
    head = model.quant[LM_HEAD]
    assert torch.equal(model.w(LM_HEAD), dequantize(head.q, head.scale, head.zero, 128))
    assert not torch.equal(model.w(LM_HEAD), base.w(LM_HEAD))
    wide = quantize_model(base, FORMATS["int4"], lm_head="bf16")
    assert wide.head_fmt == BF16 and LM_HEAD not in wide.quant and torch.equal(wide.w(LM_HEAD), base.w(LM_HEAD))
    assert quantize_model(model, FORMATS["int4"]) is model  # used as stored: nothing requantized
    kept = quantize_model(model, FORMATS["int4"], lm_head="bf16")  # the stored head run on its dequantized values
    assert kept.head_fmt == BF16 and torch.equal(kept.w(LM_HEAD), model.w(LM_HEAD))
    assert quantize_model(wide, FORMATS["int4"]) is wide  # a head stored bf16 stays bf16
    with pytest.raises(SuperoptError, match="would requantize"):
        quantize_model(model, FORMATS["int8"])
    with pytest.raises(SuperoptError, match="not a multiple of the group 96"):
        quantize_model(base, weight_format("int8", 96))


# --- tiles: the packed weights and what the GEMV reads back -------------------------------------------------


def test_a_quantized_chunk_holds_its_rows_then_their_scales_then_their_zeros(bf16_models: dict[str, Model]) -> None:
    model = quantize_model(bf16_models["tiny-llama"], FORMATS["int4-asymmetric"])
    tg = taskgraph.build(model.config, 8, 2, model.fmt)
    plan = tg.gemv["gateup"]
    data = packed_weights(model, tg)[("gateup", 1)]
    assert data.dtype == torch.uint8 and data.numel() == plan.tiles * plan.tile_bytes
    assert plan.chunk_bytes % 16 == 0 and tg.slot_bytes >= plan.chunk_bytes
    gate, up = stored_rows(model, 1, "wg"), stored_rows(model, 1, "wu")
    qrow, groups = plan.k // 2, plan.k // 128
    first = data[: plan.chunk_bytes]  # tile 0's first chunk: its gate rows (a tile holds gate rows, then up rows)
    rows = min(plan.chunk, plan.tile)
    assert torch.equal(first[: rows * qrow].view(rows, qrow), gate.q[:rows])
    scales = first[plan.chunk * qrow : plan.chunk * qrow + rows * 2 * groups].view(torch.bfloat16).view(rows, -1)
    assert torch.equal(scales, gate.scale[:rows])
    back = unpack_chunks(data.view(plan.tiles, plan.tile_bytes)[1], plan)  # tile 1: gate rows, then up rows
    lo, hi = plan.tile, 2 * plan.tile
    assert torch.equal(back.q[: plan.tile], gate.q[lo:hi]) and torch.equal(back.q[plan.tile :], up.q[lo:hi])
    assert back.zero is not None and gate.zero is not None and torch.equal(back.zero[: plan.tile], gate.zero[lo:hi])
    assert torch.equal(unpack_chunks(pack_chunks(gate, plan), plan).scale, gate.scale)


def test_quantized_formats_the_gemv_cannot_read_are_refused() -> None:
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    with pytest.raises(SuperoptError, match="not a multiple of 32"):
        taskgraph.build(cfg, 8, 2, WeightFormat(4, 16))  # a lane's 32 int4 weights would span two groups
    with pytest.raises(SuperoptError, match="not a multiple of the group 96"):
        taskgraph.build(cfg, 8, 2, WeightFormat(8, 96))


# --- the replay -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", FORMATS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_replay_equals_the_reference_decoder_on_the_dequantized_weights(
    name: str, label: str, bf16_models: dict[str, Model]
) -> None:
    """The task list over 8 SMs, its quantized GEMVs reading their tiles back from the packed bytes and scaling
    each group's integer dot product (as the GPU does), gives the bf16 reference decoder's tokens on the
    dequantized weights and its logits within bf16 rounding (the dequantized weights are not rounded to bf16 in
    the GEMV: one more rounding of each weight's worth)."""
    model = quantize_model(bf16_models[name], FORMATS[label])
    tg = taskgraph.build(model.config, 8, 2, model.fmt)  # the LM head in the projections' format too
    assert tg.head_fmt == model.head_fmt == model.fmt
    out = replay(model, tg, PROMPT, 5)
    tokens, logits = Decoder(model, "bfloat16").generate(PROMPT, 5)
    assert out.tokens == tokens
    assert (out.logits - logits).abs().max() <= 2**-5 * logits.abs().max()


def test_replay_with_the_lm_head_kept_bf16(bf16_models: dict[str, Model]) -> None:
    """--lm-head bf16: the projections int4, the head's tiles bf16 rows (the source is the one from before the
    head could be quantized); a task graph that packs a head the model does not store quantized is refused."""
    model = quantize_model(bf16_models["tiny-qwen3"], FORMATS["int4"], lm_head="bf16")
    tg = taskgraph.build(model.config, 8, 2, model.fmt, BF16)
    assert packed_weights(model, tg)[("lmhead", model.config.layers)].dtype == torch.bfloat16
    out = replay(model, tg, PROMPT, 5)
    tokens, logits = Decoder(model, "bfloat16").generate(PROMPT, 5)
    assert out.tokens == tokens and (out.logits - logits).abs().max() <= 2**-5 * logits.abs().max()
    with pytest.raises(SuperoptError, match="packs the LM head"):
        replay(model, taskgraph.build(model.config, 8, 2, model.fmt), PROMPT, 2)


def test_a_quantized_checkpoint_runs_as_stored(tmp_path: Path) -> None:
    """`superopt quantize --asymmetric` writes int4 with zeros: the megakernel's model keeps the file's bytes (no
    dequantize-requantize), its default precision is the checkpoint's, and the replay equals the reference."""
    result = CliRunner().invoke(
        main, ["quantize", str(MODELS / "tiny-llama.yaml"), "--bits", "4", "--asymmetric", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (spec,) = tmp_path.glob("*.yaml")
    model = load_model(spec)
    assert model.fmt == WeightFormat(4, 128, zero=True)
    stored, _ = read_safetensors(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(model.quant[name + ".weight"].q, stored[name + ".qweight"])
    assert model.head_fmt == model.fmt and torch.equal(model.quant[LM_HEAD].q, stored["lm_head.qweight"])
    out = replay(model, taskgraph.build(model.config, 8, 2, model.fmt), PROMPT, 4)
    assert out.tokens == Decoder(model, "bfloat16").generate(PROMPT, 4)[0]
    assert resolve_format(str(spec), model.fmt, None, None) == model.fmt  # the command's default precision
    assert resolve_format(str(spec), model.fmt, "bf16", None) == BF16  # its dequantized weights, as bf16
    assert resolve_head(model.fmt, model.head_fmt, "same") == model.fmt
    assert resolve_head(model.fmt, model.head_fmt, "bf16") == BF16
    again = CliRunner().invoke(main, ["megakernel", str(spec), "--emit", str(tmp_path), "--precision", "int8"])
    assert again.exit_code == 2 and "would requantize" in again.output and "Traceback" not in again.output


def test_a_quantized_checkpoint_without_a_quantized_head_keeps_it_bf16(tmp_path: Path) -> None:
    """`superopt quantize --lm-head bf16` stores no quantized head: the megakernel's head stays bf16 (quantizing
    it would requantize nothing, but the checkpoint is used as stored), by default and with --lm-head same."""
    result = CliRunner().invoke(
        main, ["quantize", str(MODELS / "tiny-llama.yaml"), "--bits", "8", "--lm-head", "bf16", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (spec,) = tmp_path.glob("*.yaml")
    model = load_model(spec)
    assert model.fmt == WeightFormat(8, 128) and model.head_fmt == BF16 and LM_HEAD not in model.weights
    assert resolve_head(model.fmt, model.head_fmt, "same") == BF16
    out = CliRunner().invoke(main, ["megakernel", str(spec), "--emit", str(tmp_path / "e"), "--offline"])
    assert out.exit_code == 0, out.output
    assert "weights: projections int8 g128; lmhead: bf16" in out.output
    assert (
        replay(model, taskgraph.build(model.config, 8, 2, model.fmt, BF16), PROMPT, 3).tokens
        == (Decoder(model, "bfloat16").generate(PROMPT, 3)[0])
    )


# --- translation validation: the lowering verified, its mutants rejected --------------------------------------


def _mutate(stage: Stage, unit: int, **changes: object) -> None:
    quant = stage.quant[unit]
    assert quant is not None
    stage.quant[unit] = dataclasses.replace(quant, **changes)


def _swap_scale_and_zero(s: Stage) -> None:
    quant = s.quant[0]
    assert quant is not None
    _mutate(s, 0, scale=quant.zero, zero=quant.scale)


def _scale_of_up_for_gate(s: Stage) -> None:
    up = s.quant[1]
    assert up is not None
    _mutate(s, 0, scale=up.scale)


MUTANTS: dict[str, tuple[str, str, Callable[[Stage], None]]] = {
    # the nibble order the GEMV reads: value 2j from the high nibble
    "swapped nibbles": ("qkv", "attn_in", lambda s: _mutate(s, 0, high_first=True)),
    # the gate's groups scaled by the up projection's scales
    "scale of the wrong weight": ("gateup", "mlp", _scale_of_up_for_gate),
    # the zero points read as scales and the scales as zero points
    "scale and zero swapped": ("oproj", "attn_out", _swap_scale_and_zero),
    # the zero point left out
    "no zero point": ("down", "mlp", lambda s: _mutate(s, 0, zero=None)),
    # the LM head's nibbles read in the other order, and its zero points left out
    "head: swapped nibbles": ("lmhead", "lm_head", lambda s: _mutate(s, 0, high_first=True)),
    "head: no zero point": ("lmhead", "lm_head", lambda s: _mutate(s, 0, zero=None)),
}


def test_the_quantized_lowering_is_verified_and_its_mutants_rejected() -> None:
    """The lowered programs (each stage's dequant, product and sum with the attributes the CUDA and the replay
    read) verify against the quantized layer programs; each mutant of the lowering (what a lowering bug would
    emit) is rejected, and the swapped nibble order shows in the emitted CUDA."""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    tg = taskgraph.build(cfg, 8, 2, FORMATS["int4-asymmetric"])
    verdicts = validate_lowering(tg, {})
    assert all(r.equivalent for r in verdicts.values()), verdicts
    for label, (kind, program, mutate) in MUTANTS.items():
        low = lower(tg)
        stage = low.bodies[kind]
        assert isinstance(stage, Stage) and stage.quant[0] is not None
        mutate(stage)
        verdict = verify(low.sources[program], lowered_programs(low)[program], seed=0)
        assert not verdict.equivalent, label
    low = lower(tg)
    assert "QuantW<4, 128, true, false>" in source(tg, "m", 32, 32)
    stage = low.bodies["qkv"]
    assert isinstance(stage, Stage)
    _mutate(stage, 0, high_first=True)
    assert stage.quant[0] is not None and stage.quant[0].cuda_type() == "QuantW<4, 128, true, true>"


def test_int8_lowering_is_verified() -> None:
    cfg = load_spec(MODELS / "tiny-qwen3.yaml").config
    verdicts = validate_lowering(taskgraph.build(cfg, 8, 2, FORMATS["int8"]), {})
    assert all(r.equivalent for r in verdicts.values()), verdicts


def test_bf16_task_bodies_are_unchanged_by_the_weight_format_parameter() -> None:
    """The bf16 GEMV is the format template's default: its calls name no format (the source, and so the
    machine code, is what it was)."""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    text = source(taskgraph.build(cfg, 132, fmt=BF16), "m", 32, 32)
    assert "gemv<256, RC_QKV>(t.xs" in text and "QuantW<" not in text.split("// The GEMV task bodies:")[1]


# --- the emitted CUDA -----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_emitted_quantized_cuda_compiles_for_sm90a(tmp_path: Path) -> None:
    """int8 and int4 (symmetric, and asymmetric: every path of the format) at Llama-3.2-1B's sizes, the LM head
    quantized too, compiled in parallel; no register spills."""
    cfg = load_spec(MODELS / "llama-3.2-1b.yaml").config

    def compile_one(label: str) -> subprocess.CompletedProcess:
        src = tmp_path / f"{label}.cu"
        text = source(taskgraph.build(cfg, 132, fmt=FORMATS[label]), "llama", 256, 256)
        assert "QuantW<" in text.split("void task_lmhead")[1].split("\n}\n")[0]
        src.write_text(text)
        cmd = ["nvcc", "-arch=sm_90a", "-std=c++17", "-c", "-Xptxas", "-v", "-o", str(src.with_suffix(".o")), str(src)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(FORMATS, pool.map(compile_one, FORMATS)))
    for label, proc in procs.items():
        assert proc.returncode == 0, (label, proc.stderr[-3000:])
        assert "0 bytes spill stores" in proc.stderr, label


# --- the command ----------------------------------------------------------------------------------------------


def test_the_build_report_states_each_projections_precision() -> None:
    """Per GEMV kind its weights' format (the LM head's the projections', or bf16 kept wide); the command writes
    the same report (--emit) and a line a kind. (The command itself is run on a quantized checkpoint above and
    with bad options below.)"""
    cfg = load_spec(MODELS / "tiny-llama.yaml").config
    int8 = "int8, symmetric (scale) a group of 64 input features"
    for head, described in ((None, int8), (BF16, "bf16")):
        tg = taskgraph.build(cfg, 16, fmt=weight_format("int8", 64), head=head)
        report = build_report(tg)
        weights = {k["kind"]: k.get("weights") for k in report}
        assert weights == {k: int8 for k in ("qkv", "oproj", "gateup", "down")} | {
            "lmhead": described,
            "attn": None,
            "argmax": None,
        }
        assert all("weights int8" in line for line in report_lines(report)[:1])
        text = source(tg, "m", 32, 32)
        assert "QuantW<8, 64, false, false>" in text
        lmhead = text.split("void task_lmhead")[1].split("\n}\n")[0]
        assert ("gemv<256, RC_LMHEAD, QuantW<8, 64, false, false>>" in lmhead) == (head is None)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--precision", "int5"], "Invalid value for '--precision'"),
        (["--precision", "int4", "--group", "0"], "Invalid value for '--group'"),
        (["--precision", "int4", "--group", "96"], "not a multiple of the group 96"),
        (["--precision", "int4", "--group", "16"], "group 16 is not a multiple of 32"),
        (["--group", "64"], "the precision is bf16"),
        (["--precision", "int4", "--lm-head", "int4"], "Invalid value for '--lm-head'"),
    ],
)
def test_a_bad_precision_or_group_is_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    args = ["megakernel", str(MODELS / "tiny-llama.yaml"), "--emit", str(tmp_path), "--offline", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and message in result.stderr


@pytest.mark.parametrize("flags, head", [([], "int4 g64"), (["--lm-head", "bf16"], "bf16")])
def test_the_command_quantizes_the_lm_head_unless_told_to_keep_it_bf16(
    tmp_path: Path, flags: list[str], head: str
) -> None:
    args = ["megakernel", str(MODELS / "tiny-qwen3.yaml"), "--emit", str(tmp_path), "--offline", "--sms", "8"]
    result = CliRunner().invoke(main, [*args, "--precision", "int4", "--group", "64", *flags])
    assert result.exit_code == 0, result.output
    assert f"weights: projections int4 g64; lmhead: {head}" in result.output
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert report["lm_head_weights"].startswith(head.split()[0])
    lmhead = next(k for k in report["kinds"] if k["kind"] == "lmhead")
    assert lmhead["weights"].startswith(head.split()[0])
    assert ("QuantW<4, 64" in (tmp_path / "megakernel.cu").read_text().split("void task_lmhead")[1]) == (head != "bf16")


def test_unpack_matches_the_documented_nibble_order() -> None:
    """What the lowering's replay reads (the IR's unpack) is what gemv.cuh documents: nibble e of a 32-bit
    little-endian word t is value 8t + e (8t + (e ^ 1) high first)."""
    word = torch.tensor([0x76543210], dtype=torch.int64)
    as_bytes = torch.tensor([(int(word) >> (8 * m)) & 255 for m in range(4)], dtype=torch.uint8)
    assert unpack_int4(as_bytes).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert unpack_int4(as_bytes, high_first=True).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("label", FORMATS)
def test_gpu_quantized_megakernel_equals_replay(label: str, bf16_models: dict[str, Model]) -> None:
    pytest.importorskip("cupy")
    from superopt.kernels.megakernel import GpuMegakernel, agrees_with_replay

    model = quantize_model(bf16_models["tiny-llama"], FORMATS[label])
    mk = GpuMegakernel(model)
    assert agrees_with_replay(mk.generate(PROMPT, 8), replay(model, mk.tg, PROMPT, 8), len(PROMPT))["ok"]
