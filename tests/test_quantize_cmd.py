"""`superopt quantize`: the checkpoint and spec it writes, read back by every model command, and hostile
checkpoints refused with one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from superopt.checkpoint import QUANTIZATION, read_safetensors, write_safetensors
from superopt.cli.main import main
from superopt.errors import SpecError
from superopt.kernels import taskgraph
from superopt.kernels.megakernel import replay
from superopt.model import Decoder, load_model
from superopt.quant import dequantize, quantize

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PROMPT = [3, 1, 4, 1, 5, 9]


def quantized(tmp_path: Path, *flags: str) -> Path:
    result = CliRunner().invoke(main, ["quantize", str(MODELS / "tiny-llama.yaml"), *flags, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (spec,) = tmp_path.glob("*.yaml")
    return spec


@pytest.mark.parametrize("flags", [("--bits", "4", "--group", "64"), ("--bits", "8", "--group", "32", "--asymmetric")])
def test_the_written_spec_holds_the_quantized_weights_bit_for_bit(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """Every layer projection reads back as quantize -> dequant of the original (computed here, independently of
    the command); the embedding and norms exactly as they were; the reference decoder on the quantized model stays
    within the quantization's error of the bf16 one."""
    spec = quantized(tmp_path, *flags)
    original, back = load_model(MODELS / "tiny-llama.yaml"), load_model(spec)
    bits, group, symmetric = int(flags[1]), int(flags[3]), "--asymmetric" not in flags
    projections = [n for n in original.weights if ".self_attn." in n or ".mlp." in n]
    assert len(projections) == 7 * original.config.layers
    for name, w in original.weights.items():
        if name in projections:
            q, scale, zero = quantize(w, bits, group, symmetric)
            assert torch.equal(back.weights[name], dequantize(q, scale, zero, group))
            assert not torch.equal(back.weights[name], w)
        else:
            assert torch.equal(back.weights[name], w)
    tokens, want = Decoder(original, "float32").generate(PROMPT, 4)
    _, got = Decoder(back, "float32").generate(PROMPT, 4, forced=tokens[len(PROMPT) :])  # the same sequence
    rel = float((got - want).norm() / want.norm())
    assert rel < (0.5 if bits == 4 else 0.05)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])  # tied embeddings, and an LM head of its own
def test_the_lm_head_is_quantized_unless_kept_bf16(tmp_path: Path, name: str) -> None:
    """By default the LM head is stored quantized as lm_head.qweight / .scales (a tied model's a copy of the
    embedding table, which stays bf16 for the token's gather); --lm-head bf16 stores it as it was."""
    original = load_model(MODELS / f"{name}.yaml")
    for lm_head in ("same", "bf16"):
        out = tmp_path / lm_head
        result = CliRunner().invoke(
            main, ["quantize", str(MODELS / f"{name}.yaml"), "--bits", "4", "--lm-head", lm_head, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        tensors, meta = read_safetensors(out / "model.safetensors")
        listed = json.loads(meta[QUANTIZATION])["weights"]
        assert ("lm_head.weight" in listed) == ("lm_head.qweight" in tensors) == (lm_head == "same")
        assert "lm_head.weight" not in tensors or lm_head == "bf16"
        (spec,) = out.glob("*.yaml")
        back = load_model(spec)
        embed = "model.embed_tokens.weight"
        assert torch.equal(back.w(embed), original.w(embed))
        if lm_head == "same":
            q, scale, zero = quantize(original.w("lm_head.weight"), 4, 128)
            assert torch.equal(back.w("lm_head.weight"), dequantize(q, scale, zero, 128))
            assert back.head_fmt == back.fmt and torch.equal(back.quant["lm_head.weight"].q, q)
        else:
            assert torch.equal(back.w("lm_head.weight"), original.w("lm_head.weight")) and not back.head_fmt.quantized


def test_the_megakernel_replay_of_a_quantized_model_is_the_reference_decoder_on_its_weights(tmp_path: Path) -> None:
    """The task list, replayed on the quantized spec, gives the bf16 reference decoder's tokens on the same
    (dequantized) weights."""
    model = load_model(quantized(tmp_path, "--bits", "4", "--group", "64"))
    out = replay(model, taskgraph.build(model.config, 8, 2), PROMPT, 6)
    tokens, logits = Decoder(model, "bfloat16").generate(PROMPT, 6)
    assert out.tokens == tokens
    assert (out.logits - logits).abs().max() <= 2**-6 * logits.abs().max()


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8),
        "c": torch.arange(6, dtype=torch.uint8),
        "d": torch.zeros(0, 4),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and json.loads(raw[8 : 8 + n])["b"]["dtype"] == "I8"
    back, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and back.keys() == tensors.keys()
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_bad_options_are_one_line_exit_2(tmp_path: Path) -> None:
    for flags, message in [
        (["--bits", "3"], "'3' is not one of '8', '4'"),
        (["--bits", "4", "--group", "100"], "not a multiple of --group 100"),
        (["--bits", "4", "--group", "0"], "--group"),
    ]:
        args = ["quantize", str(MODELS / "tiny-llama.yaml"), *flags, "--out", str(tmp_path / "o")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()


def _rewrite(path: Path, edit: object) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)  # type: ignore[operator]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _drop_scales(h: dict) -> None:
    del h["model.layers.0.mlp.up_proj.scales"]


def _bits_16(h: dict) -> None:
    h["__metadata__"][QUANTIZATION] = json.dumps(json.loads(h["__metadata__"][QUANTIZATION]) | {"bits": 16})


def _past_the_end(h: dict) -> None:
    h["model.layers.0.mlp.up_proj.scales"]["data_offsets"][1] += 1 << 30


def _qweight_as_float(h: dict) -> None:
    h["model.layers.1.self_attn.o_proj.qweight"]["dtype"] = "F16"
    h["model.layers.1.self_attn.o_proj.qweight"]["shape"][-1] //= 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_scales, "has no model.layers.0.mlp.up_proj.qweight or model.layers.0.mlp.up_proj.scales"),
        (_bits_16, "metadata is malformed"),
        (_past_the_end, "disagree"),
        (_qweight_as_float, "not int4's storage"),
    ],
)
def test_hostile_quantized_checkpoints_are_refused_naming_the_file(tmp_path: Path, edit: object, message: str) -> None:
    spec = quantized(tmp_path, "--bits", "4", "--group", "64")
    _rewrite(tmp_path / "model.safetensors", edit)
    with pytest.raises(SpecError, match=message) as e:
        load_model(spec)
    assert "model.safetensors" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_a_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    spec = quantized(tmp_path, "--bits", "8", "--group", "64")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SpecError, match="model.safetensors: its header says"):
        load_model(spec)
