"""The megakernel benchmark's quantized peers (kernels/megakernel/bench.py), on the CPU: gpt-fast's weight-only
int8 and int4 linears written in plain torch, built from the weights the megakernel streams (the project's
quantizer, the same groups). Each layer against x @ W in float64 with W dequantized here by hand; tinygemm's
nibble order against bytes worked out by hand; and a tiny model's peer decode against the reference decoder on
the dequantized weights. No CUDA graph and no torch.compile here: the GPU run is benchmarks/megakernel_bench.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from superopt.kernels.megakernel import agrees_with_replay
from superopt.kernels.megakernel.bench import (
    Int4Linear,
    Int8Linear,
    PeerLinear,
    PeerUnavailable,
    int4_linears,
    int4pack_ops,
    int8_linears,
    int8_per_channel_linears,
    peer_decoder,
    precision_peers,
    tinygemm_bytes,
    tinygemm_scales_and_zeros,
    tinygemm_values,
)
from superopt.kernels.megakernel.replay import Generation
from superopt.model import LM_HEAD, Decoder, Model, QuantizedWeight, load_model, quantize_model, weight_format
from superopt.quant import pack_int4, quantize

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
PROMPT = [3, 17, 42, 7, 99]


def _cpu_int4pack() -> bool:
    try:
        int4pack_ops(torch.device("cpu"))
    except PeerUnavailable:
        return False
    return True


CPU_INT4 = _cpu_int4pack()
needs_cpu_int4 = pytest.mark.skipif(not CPU_INT4, reason=f"torch {torch.__version__} has no CPU int4pack ops")


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return {name: load_model(MODELS / f"{name}.yaml") for name in ("tiny-llama", "tiny-qwen3")}


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)


def activations(k: int, rows: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def exact(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The stored weight's exact value in float64, by hand: int4 bytes split into their nibbles (value 2j low,
    4-bit two's complement), (v - zero) * scale over each group of consecutive input features."""
    if bits == 4:
        b = q.to(torch.int64)
        v = torch.stack([b & 15, b >> 4], -1).flatten(-2)
        v = torch.where(v >= 8, v - 16, v)
    else:
        v = q.to(torch.int64)
    n, k = v.shape
    groups = scale.shape[-1]
    v = v.double().view(n, groups, k // groups)
    if zero is not None:
        v = v - zero.double()[..., None]
    return (v * scale.double()[..., None]).view(n, k)


def within_bf16(layer: PeerLinear, w: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """The layer's largest error on x against x @ w.T in float64, and the bound it must stay within: bf16 rounding
    of the weights' products and of the result, 2^-8 of sum |x| |w| (random sums are far inside it)."""
    want = x.double() @ w.T
    bound = 2**-8 * float((x.double().abs() @ w.abs().T).max())
    return float((layer(x).double() - want).abs().max()), bound


# --- int8 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_linear_is_the_dequantized_product(group: int, symmetric: bool) -> None:
    """The int8 peer's layer on the project's quantizer's output, one scale a row (group 256 = k: gpt-fast's
    per-channel formula F.linear(x, q) * scale) or in groups, is x @ W within bf16 rounding, W the stored weight's
    exact value; a layer whose scales are moved one group along is not."""
    w = weight(48, 256, seed=group)
    q, scale, zero = quantize(w, 8, group, symmetric=symmetric)
    layer = Int8Linear(QuantizedWeight(q, scale, zero))
    assert layer.per_channel == (group == 256 and symmetric)
    x = activations(256)
    err, bound = within_bf16(layer, exact(q, scale, zero, 8), x)
    assert err <= bound, (err, bound)
    assert layer(x[0]).shape == (48,)  # the decoder's vectors
    if group < 256:
        moved = Int8Linear(QuantizedWeight(q, scale.roll(1, -1), zero))
        assert within_bf16(moved, exact(q, scale, zero, 8), x)[0] > 4 * bound


def test_int8_per_channel_is_gpt_fast_formula() -> None:
    """Per channel the layer is F.linear(x, q.to(bf16)) * scale, both rounded in bf16, as gpt-fast computes it."""
    w = weight(40, 128, seed=3)
    q, scale, _ = quantize(w, 8, 128)
    x = activations(128)
    want = (x @ q.to(torch.bfloat16).T) * scale[:, 0]
    assert torch.equal(Int8Linear(QuantizedWeight(q, scale, None))(x), want)


# --- int4: tinygemm's packing ---------------------------------------------------------------------------------


def test_tinygemm_nibbles_by_hand() -> None:
    """superopt packs signed nibbles, value 2j low: (-8, 7) -> 0x78, (0, -1) -> 0xF0, (3, -5) -> 0xB3. tinygemm
    (gpt-fast's `w[:, ::2] << 4 | w[:, 1::2]` on u = v + 8) wants value 2j high and unsigned: (0, 15) -> 0x0F,
    (8, 7) -> 0x87, (11, 3) -> 0xB3."""
    v = torch.tensor([[-8, 7, 0, -1, 3, -5]])
    ours = pack_int4(v)
    assert ours.tolist() == [[0x78, 0xF0, 0xB3]]
    assert tinygemm_bytes(ours).tolist() == [[0x0F, 0x87, 0xB3]]
    assert tinygemm_values(ours).tolist() == [[0, 15, 8, 7, 11, 3]]
    high = pack_int4(v, high_first=True)
    assert high.tolist() == [[0x87, 0x0F, 0x3B]]
    assert tinygemm_bytes(high, high_first=True).tolist() == [[0x0F, 0x87, 0xB3]]


def test_tinygemm_packing_of_every_byte() -> None:
    """Every byte's two values, unpacked from tinygemm's bytes, are the signed values plus 8 in order."""
    v = torch.stack([torch.arange(-8, 8).repeat_interleave(16), torch.arange(-8, 8).repeat(16)], -1).view(1, -1)
    assert torch.equal(tinygemm_values(pack_int4(v)), (v + 8).to(torch.int32))
    b = tinygemm_bytes(pack_int4(v)).to(torch.int64)
    assert torch.equal(torch.stack([b >> 4, b & 15], -1).flatten(-2), v + 8)


def test_tinygemm_scales_and_zeros() -> None:
    """[k / group, n, 2]: the scales, and zero -z * scale (0 where symmetric), so (u - 8) * s + zero = (v - z) s."""
    w = weight(16, 128, seed=5)
    q, scale, zero = quantize(w, 4, 32, symmetric=False)
    assert zero is not None
    sz = tinygemm_scales_and_zeros(QuantizedWeight(q, scale, zero))
    assert sz.shape == (4, 16, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 0], scale.T)
    assert torch.equal(sz[..., 1], (-zero.float() * scale.float()).to(torch.bfloat16).T)
    q, scale, _ = quantize(w, 4, 64)
    assert not tinygemm_scales_and_zeros(QuantizedWeight(q, scale, None))[..., 1].any()


@needs_cpu_int4
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_through_the_cpu_int4pack_op(group: int, symmetric: bool) -> None:
    """The int4 peer's layer (the CPU's _convert_weight_to_int4pack_for_cpu and _weight_int4pack_mm_for_cpu) is
    x @ W within bf16 rounding, W the stored weight's exact value; the same bytes with their nibbles in the
    other order are not."""
    n, k = 64, 256
    w = weight(n, k, seed=group + symmetric)
    q, scale, zero = quantize(w, 4, group, symmetric=symmetric)
    cfg = load_model(MODELS / "tiny-llama.yaml").config
    stored = {"w": QuantizedWeight(q, scale, zero)}  # int4_linears reads only the stored weights
    model = Model("one", cfg, {}, 32, weight_format("int4", group, symmetric), stored)
    (layer,) = int4_linears(model).values()
    assert isinstance(layer, Int4Linear) and (layer.n, layer.k) == (n, k)
    x = activations(k)
    ref = exact(q, scale, zero, 4)
    err, bound = within_bf16(layer, ref, x)
    assert err <= bound, (err, bound)
    assert layer(x[0]).shape == (n,)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    swapped = tinygemm_values(q, high_first=True).contiguous()  # the nibbles read the wrong way round
    wrong = Int4Linear(convert(swapped, 2), layer.scales_and_zeros, group, n, k, layer.mm)
    assert within_bf16(wrong, ref, x)[0] > 4 * bound


def test_int4_peer_is_unavailable_not_a_crash(models: dict[str, Model]) -> None:
    """A group tinygemm does not take, or weights that are not int4, give PeerUnavailable with the reason."""
    with pytest.raises(PeerUnavailable, match="groups of"):
        int4_linears(quantize_model(models["tiny-llama"], weight_format("int4", 16)))
    with pytest.raises(PeerUnavailable, match="int4 peer"):
        int4_linears(quantize_model(models["tiny-llama"], weight_format("int8", 32)))
    with pytest.raises(PeerUnavailable, match="int8 peer"):
        int8_linears(models["tiny-llama"])


# --- a tiny model's peer decode -------------------------------------------------------------------------------


def decode(dec: Decoder, new_tokens: int = 16, forced: list[int] | None = None) -> Generation:
    return Generation(*dec.generate(PROMPT, new_tokens, forced=forced))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_int8_peer_decode_is_the_reference_decoder(name: str, models: dict[str, Model]) -> None:
    """The int8 peer on the megakernel's int8 weights (groups of 64, the LM head too) decodes exactly what the
    bf16 reference decoder computes on the dequantized weights: its dequant is the IR's, bit for bit."""
    model = quantize_model(models[name], weight_format("int8", 64))
    linears = int8_linears(model)
    assert set(linears) == set(model.quant) and LM_HEAD in linears
    ref = decode(Decoder(model, "bfloat16"))
    got = decode(peer_decoder(model, linears, "cpu"))
    assert got.tokens == ref.tokens
    assert torch.equal(got.logits, ref.logits)


def forced_agrees(dec: Decoder, ref: Generation, rel: float) -> None:
    """Teacher-forced on the reference's tokens: the logits' relative error within `rel`, and each step's argmax
    the reference's, or a near tie (the reference's margin between the two within twice that step's largest
    logit difference)."""
    forced = decode(dec, forced=ref.tokens[len(PROMPT) :])
    assert float((forced.logits - ref.logits).norm() / ref.logits.norm()) <= rel
    diff = (forced.logits - ref.logits).abs().amax(-1)
    for step, (mine, theirs) in enumerate(zip(forced.logits.argmax(-1).tolist(), ref.logits.argmax(-1).tolist())):
        assert mine == theirs or float(ref.logits[step, theirs] - ref.logits[step, mine]) <= 2 * float(diff[step])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_int8_per_channel_peer_decode(name: str, models: dict[str, Model]) -> None:
    """gpt-fast's own per-channel int8 quantization of the bf16 model decodes as the reference decoder on those
    weights dequantized, within bf16 rounding (it rounds the unscaled sum, then the scaled one; the random tiny
    models amplify that to about 1.5% of the logits), teacher-forced; and a layer whose rows have each other's
    scales does not."""
    base = models[name]
    linears = int8_per_channel_linears(base)
    assert set(linears) == set(quantize_model(base, weight_format("int8", 64)).quant)
    weights = dict(base.weights)
    for hf_name, layer in linears.items():
        assert isinstance(layer, Int8Linear) and layer.per_channel
        weights[hf_name] = exact(layer.q, layer.scale, None, 8).to(torch.bfloat16)
    ref = decode(Decoder(Model(base.name, base.config, weights, base.max_seq), "bfloat16"))
    forced_agrees(peer_decoder(base, linears, "cpu"), ref, 3e-2)
    wrong = dict(linears)
    down = "model.layers.1.mlp.down_proj.weight"
    layer = linears[down]
    assert isinstance(layer, Int8Linear)
    wrong[down] = Int8Linear(QuantizedWeight(layer.q, layer.scale.roll(1, 0), None))
    with pytest.raises(AssertionError):
        forced_agrees(peer_decoder(base, wrong, "cpu"), ref, 3e-2)


@needs_cpu_int4
@pytest.mark.parametrize(("name", "group"), [("tiny-llama", 32), ("tiny-llama", 128), ("tiny-qwen3", 64)])
def test_int4_peer_decode_is_the_reference_decoder(name: str, group: int, models: dict[str, Model]) -> None:
    """The int4 peer (tinygemm on the CPU) on the megakernel's int4 weights decodes as the bf16 reference decoder
    on the dequantized weights: tokens equal up to the first bf16 near tie (agrees_with_replay's rule), and
    teacher-forced on the reference's tokens (forced_agrees)."""
    model = quantize_model(models[name], weight_format("int4", group))
    linears = int4_linears(model)
    assert set(linears) == set(model.quant)
    ref = decode(Decoder(model, "bfloat16"))
    got = decode(peer_decoder(model, linears, "cpu"))
    check = agrees_with_replay(got, ref, len(PROMPT))
    assert check["ok"], check
    forced_agrees(peer_decoder(model, linears, "cpu"), ref, 3e-2)


def test_peers_of_each_precision(models: dict[str, Model]) -> None:
    """bf16 has the plain torch decode, int8 the same-weights and the per-channel peers, int4 tinygemm."""
    base = models["tiny-llama"]
    assert list(precision_peers(base, base)) == ["torch_bf16"]
    assert precision_peers(base, base)["torch_bf16"]() == {}
    int8 = quantize_model(base, weight_format("int8", 128))
    assert list(precision_peers(base, int8)) == ["torch_int8", "torch_int8_per_channel"]
    int4 = quantize_model(base, weight_format("int4", 128))
    assert list(precision_peers(base, int4)) == ["torch_int4_tinygemm"]
