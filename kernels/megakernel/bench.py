"""The megakernel beside its references and peers on a GPU: HF transformers' model on the same weights (tokens
teacher-forced, logits compared), the bf16 reference decoder, and the timings of HF eager, static cache,
torch.compile and a CUDA-graph torch decode in the same run (benchmarks/megakernel_bench.py drives it)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from superopt.errors import SuperoptError
from superopt.interpret import unpack_int4
from superopt.ir import KernelGraph
from superopt.kernels.megakernel.replay import Generation
from superopt.kernels.megakernel.runtime import GpuMegakernel, Hang, cuda_time_us, time_megakernel
from superopt.kernels.megakernel.source import build_report
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import LM_HEAD, Decoder, Model, QuantizedWeight, inv_freq, projection_names
from superopt.quant import quantize


def prompt_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """A seeded random prompt."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_model(model: Model) -> Any:
    """transformers' model of the config's type (LlamaForCausalLM, Qwen3ForCausalLM, ...) built from the config
    (nothing downloaded), on the GPU in bf16, with the model's weights loaded."""
    try:
        import transformers  # an optional dependency: only the comparison with HF's model needs it
    except ImportError:
        raise SuperoptError(
            "megakernel: transformers is not installed (it is needed only for the HF reference)"
        ) from None
    c = model.config
    fields = c.hf_fields()
    fields.pop("model_type")
    # A tied model whose LM head is quantized: HF's model unties it, its head the dequantized copy, its embedding
    # the bf16 table (as the megakernel computes).
    tied = c.tie_embeddings and "lm_head.weight" not in model.weights
    fields["tie_word_embeddings"] = tied
    fields |= {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "max_position_embeddings": 131072}
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[c.arch]
    # transformers 5 reads rope_parameters, 4 reads rope_theta and rope_scaling: give both.
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    config = cls_config(**fields)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        hf = cls_model(config)
    rotary = hf.model.rotary_emb
    freq = rotary.inv_freq.clone()  # float32; .to(bfloat16) would round it, which from_pretrained does not
    hf = hf.to(torch.bfloat16).eval()
    rotary.inv_freq = freq
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = freq
    missing, unexpected = hf.load_state_dict({k: v.to("cuda") for k, v in model.weights.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SuperoptError(f"megakernel: HF model weights do not match: missing {missing}, unexpected {unexpected}")
    if tied:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    freq = freq.cpu()
    if freq.shape != (c.head_dim // 2,) or not torch.allclose(freq, inv_freq(c), rtol=1e-5):
        raise SuperoptError(f"megakernel: transformers' RoPE frequencies differ from superopt's: {freq[:4].tolist()}")
    return hf


@torch.no_grad()
def teacher_forced_logits(hf: Any, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """HF's logits (float32) at each generated position, given exactly `tokens` as the sequence so far."""
    ids = torch.tensor([tokens[:-1]], device="cuda")
    return hf(ids).logits[0, prompt_len - 1 :].float().cpu()


def compare(tokens: list[int], logits: torch.Tensor, ref_logits: torch.Tensor, prompt_len: int) -> dict[str, Any]:
    """Greedy tokens and their logits against a reference's logits on the same sequence (teacher forcing). A
    token that is not the reference's argmax counts as a near tie when the reference's own margin between the
    two tokens is within twice the largest logit difference at that step."""
    gen = tokens[prompt_len:]
    ref_top = ref_logits.argmax(-1).tolist()
    diff = (logits - ref_logits).abs().amax(-1)
    flips = []
    for k, (tok, top) in enumerate(zip(gen, ref_top)):
        if tok != top:
            margin = float(ref_logits[k, top] - ref_logits[k, tok])
            flips.append(
                {"step": k, "token": tok, "ref_token": top, "ref_margin": margin, "max_logit_diff": float(diff[k])}
            )
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    return {
        "steps": len(gen),
        "argmax_agree": len(gen) - len(flips),
        "flips": flips,
        "all_explained": all(f["ref_margin"] <= 2 * f["max_logit_diff"] for f in flips),
        "logits_rel_error": rel,
        "max_logit_diff": float(diff.max()),
    }


def versus_reference_bf16(model: Model, out: Generation, prompt_len: int) -> dict[str, Any]:
    """`compare` against the bf16 reference decoder (superopt/model.py) teacher-forced on the generated tokens."""
    forced = Decoder(model, "bfloat16", "cuda").generate(
        out.tokens[:prompt_len], len(out.logits), forced=out.tokens[prompt_len:]
    )
    return compare(out.tokens, out.logits, forced[1], prompt_len)


def first_divergence(a: list[int], b: list[int], prompt_len: int) -> int | None:
    """The first generated step where two token sequences differ, or None."""
    for k, (x, y) in enumerate(zip(a[prompt_len:], b[prompt_len:])):
        if x != y:
            return k
    return None


@torch.no_grad()
def time_hf(hf: Any, prompt: list[int], new_tokens: int, mode: str) -> tuple[float, list[int]]:
    """HF generate's us per decode step ((t(N) - t(1)) / (N - 1): prefill excluded) and its greedy tokens.
    mode: eager (dynamic cache), static (static cache), compile (static cache, with generate's own
    torch.compile of the decoding forward, as transformers does by default for a static cache on a GPU)."""
    ids = torch.tensor([prompt], device="cuda")
    kw: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if mode != "eager":
        kw |= {"cache_implementation": "static", "disable_compile": mode == "static"}
    out = hf.generate(ids, max_new_tokens=new_tokens, **kw)  # warm-up (and compile)
    hf.generate(ids, max_new_tokens=1, **kw)
    one = cuda_time_us(lambda: hf.generate(ids, max_new_tokens=1, **kw))
    full = cuda_time_us(lambda: hf.generate(ids, max_new_tokens=new_tokens, **kw))
    return (full - one) / (new_tokens - 1), out[0].tolist()


# --- the CUDA-graph torch decode, and the quantized peers that run through it ---------------------------------
#
# gpt-fast's weight-only quantized linears in plain torch (torchao is not needed): each is a PeerLinear put in
# place of a projection's weight in superopt's reference decoder (`peer_decoder`), so F.linear(x, layer, bias)
# calls the layer and the rest of the step (norms, RoPE, attention, the KV cache) is the reference's own code.
# The layers are built from the weights the megakernel streams (Model.quant: the project's round-to-nearest
# quantizer, the same groups), only repacked.


class PeerUnavailable(SuperoptError):
    """A peer that cannot run here: an op this torch lacks or rejects, a size or group it does not take."""


class PeerLinear:
    """A linear layer's weight as a peer stores it. It is not a tensor: F.linear(x, layer, bias) dispatches here
    through __torch_function__ (a tensor-like object, which torch.compile traces) and returns layer(x) + bias."""

    n: int  # output features
    k: int  # input features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is not F.linear:
            return NotImplemented
        kwargs = kwargs or {}
        x, layer = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        y = layer(x)
        return y if bias is None else y + bias


class Int8Linear(PeerLinear):
    """gpt-fast's WeightOnlyInt8Linear: int8 weights q [n, k] with bf16 scales (and zero points). With one scale a
    row (per output channel, gpt-fast's quantization) it is gpt-fast's formula, F.linear(x, q.to(x.dtype)) *
    scales; with groups along k (the megakernel's format) the weight is dequantized as the IR's dequant does it,
    (q - zero) * scale in float32 rounded to x's dtype, into F.linear (inductor fuses the dequant into the GEMV's
    reduction under coordinate-descent tuning, as it fuses gpt-fast's .to(x.dtype))."""

    def __init__(self, qw: QuantizedWeight) -> None:
        if qw.q.dtype != torch.int8 or qw.q.dim() != 2:
            raise PeerUnavailable(f"int8 peer: needs int8 weights [n, k], got {qw.q.dtype}{list(qw.q.shape)}")
        self.q, self.scale, self.zero = qw.q, qw.scale, qw.zero
        self.n, self.k = qw.q.shape
        self.group = self.k // qw.scale.shape[-1]
        self.per_channel = self.zero is None and qw.scale.shape[-1] == 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return F.linear(x, self.q.to(x.dtype)) * self.scale[:, 0]
        v = self.q.view(self.n, -1, self.group).float()
        if self.zero is not None:
            v = v - self.zero.float()[..., None]
        return F.linear(x, (v * self.scale.float()[..., None]).to(x.dtype).view(self.n, self.k))


TINYGEMM_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm takes


def tinygemm_bytes(q: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """superopt's packed int4 bytes [n, k / 2] (signed nibbles v, value 2j in the low nibble unless high_first;
    superopt/quant.py) as tinygemm's: unsigned nibbles u = v + 8, value 2j in the high nibble (gpt-fast packs
    `w[:, ::2] << 4 | w[:, 1::2]`). v + 8 mod 16 is v XOR 8 in 4-bit two's complement, so a byte is its own two
    nibbles swapped (kept where high_first) XOR 0x88."""
    b = q.to(torch.int32)
    if not high_first:
        b = ((b & 15) << 4) | (b >> 4)
    return (b ^ 0x88).to(torch.uint8)


def tinygemm_values(q: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """The unsigned values u = v + 8 (0..15) of superopt's packed int4 bytes, int32 [n, k] (the older
    _convert_weight_to_int4pack's and the CPU one's input)."""
    b = tinygemm_bytes(q, high_first).to(torch.int32)
    return torch.stack([b >> 4, b & 15], -1).flatten(-2)


def tinygemm_scales_and_zeros(qw: QuantizedWeight) -> torch.Tensor:
    """tinygemm's qScaleAndZeros [k / group, n, 2] bf16 of a stored int4 weight. tinygemm dequantizes (u - 8) *
    scale + zero = v * scale + zero, so a symmetric weight has zero 0 (exact) and an asymmetric one (v - z) *
    scale has zero -z * scale, rounded to bf16 (not exact: the one place the peer's weights can differ)."""
    scale = qw.scale.to(torch.bfloat16)
    zero = torch.zeros_like(scale) if qw.zero is None else (-qw.zero.float() * qw.scale.float()).to(torch.bfloat16)
    return torch.stack([scale.T, zero.T], -1).contiguous()


class Int4Linear(PeerLinear):
    """gpt-fast's WeightOnlyInt4Linear: tinygemm's packed int4 weight (torch.ops.aten._convert_weight_to_int4pack)
    and _weight_int4pack_mm over bf16 x [..., k] (the CPU's _for_cpu ops on the CPU)."""

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, group: int, n: int, k: int, mm: Any) -> None:
        self.packed, self.scales_and_zeros, self.group, self.n, self.k, self.mm = packed, sz, group, n, k, mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mm(x.reshape(-1, self.k).to(torch.bfloat16), self.packed, self.group, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.n).to(x.dtype)


def _aten(name: str) -> Any:
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def int4pack_ops(device: torch.device) -> tuple[list[tuple[str, Any]], Any]:
    """This torch's tinygemm ops for `device`: the candidate inputs of the convert op (what it takes changed
    across versions: torch >= 2.5 on CUDA packs uint8 [n, k / 2], earlier int32 [n, k], the CPU op int32 [n, k]),
    each (name, convert(qw, high_first, inner_k_tiles)), and the mm op. PeerUnavailable where absent."""
    cpu = device.type == "cpu"
    convert = _aten("_convert_weight_to_int4pack_for_cpu" if cpu else "_convert_weight_to_int4pack")
    mm = _aten("_weight_int4pack_mm_for_cpu" if cpu else "_weight_int4pack_mm")
    if convert is None or mm is None:
        raise PeerUnavailable(f"int4 peer: torch {torch.__version__} has no tinygemm int4pack ops for {device.type}")

    def uint8(qw: QuantizedWeight, high_first: bool, tiles: int) -> torch.Tensor:
        return convert(tinygemm_bytes(qw.q, high_first).contiguous(), tiles)

    def int32(qw: QuantizedWeight, high_first: bool, tiles: int) -> torch.Tensor:
        return convert(tinygemm_values(qw.q, high_first).contiguous(), tiles)

    candidates = [("int32 [n, k]", int32)] if cpu else [("uint8 [n, k/2]", uint8), ("int32 [n, k]", int32)]
    return candidates, mm


def dequantized64(qw: QuantizedWeight, group: int, high_first: bool = False) -> torch.Tensor:
    """A stored weight's exact value in float64 [n, k]: (v - zero) * scale."""
    v = (unpack_int4(qw.q, high_first) if qw.q.dtype == torch.uint8 else qw.q).double()
    if qw.zero is not None:
        v = v - qw.zero.double().repeat_interleave(group, -1)
    return v * qw.scale.double().repeat_interleave(group, -1)


def check_linear(layer: PeerLinear, reference: torch.Tensor, tol: float = 0.01) -> float:
    """The relative error of a peer's layer on a seeded bf16 x [4, k] against x @ reference.T in float64; raises
    PeerUnavailable over `tol` (a wrong packing or nibble order gives errors of order one)."""
    gen = torch.Generator(device=reference.device).manual_seed(0)
    x = torch.randn(4, layer.k, generator=gen, device=reference.device).to(torch.bfloat16)
    want = x.double() @ reference.T
    err = float((layer(x).double() - want).norm() / want.norm())
    if not err <= tol:
        raise PeerUnavailable(f"relative error {err:.3g} against the dequantized weights")
    return err


def quantized_weights(model: Model) -> dict[str, QuantizedWeight]:
    """The model's quantized linear weights as the megakernel streams them (HF name -> stored)."""
    if not model.fmt.quantized or not model.quant:
        raise PeerUnavailable(f"{model.name}: its weights are not quantized ({model.fmt.describe()})")
    return dict(model.quant)


def int8_linears(model: Model) -> dict[str, PeerLinear]:
    """The int8 peer's layers on the model's own int8 weights (its groups, its scales)."""
    if model.fmt.bits != 8:
        raise PeerUnavailable(f"int8 peer: {model.name} is stored {model.fmt.describe()}")
    return {name: Int8Linear(qw) for name, qw in quantized_weights(model).items()}


def int8_per_channel_linears(model: Model, head: bool = True) -> dict[str, PeerLinear]:
    """gpt-fast's own int8 quantization of a bf16 model: one scale an output row (the project's quantizer with a
    group of the whole row), the projections' and (with `head`) the LM head's: not the megakernel's weights where
    its groups are shorter, so its tokens may differ."""
    if model.fmt.quantized:
        raise PeerUnavailable(f"int8 per-channel peer: needs the bf16 model, {model.name} is {model.fmt.describe()}")
    out: dict[str, PeerLinear] = {}
    for name in projection_names(model.config) + [LM_HEAD] * head:
        w = model.w(name)
        out[name] = Int8Linear(QuantizedWeight(*quantize(w, 8, w.shape[-1])))
    return out


def int4_linears(model: Model) -> dict[str, PeerLinear]:
    """The int4 peer's layers (tinygemm) on the model's own int4 weights, repacked. The convert op's input format
    is the first candidate (int4pack_ops) whose first layer reproduces the dequantized weights (check_linear);
    PeerUnavailable with the reasons where none does, or where the op, the group or a size is not supported."""
    fmt = model.fmt
    if fmt.bits != 4:
        raise PeerUnavailable(f"int4 peer: {model.name} is stored {fmt.describe()}")
    if fmt.group not in TINYGEMM_GROUPS:
        raise PeerUnavailable(f"int4 peer: tinygemm takes groups of {TINYGEMM_GROUPS}, not {fmt.group}")
    weights = quantized_weights(model)
    device = next(iter(weights.values())).q.device
    candidates, mm = int4pack_ops(device)
    out: dict[str, PeerLinear] = {}
    chosen: Any = None
    for name, qw in weights.items():
        n, k = qw.q.shape[0], 2 * qw.q.shape[1]
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if tiles is None or n % 8:
            raise PeerUnavailable(f"int4 peer: tinygemm needs k a multiple of 32 and n of 8; {name} is [{n}, {k}]")
        sz = tinygemm_scales_and_zeros(qw)
        if chosen is None:
            reasons = []
            for what, convert in candidates:
                try:
                    layer = Int4Linear(convert(qw, fmt.high_first, tiles), sz, fmt.group, n, k, mm)
                    check_linear(layer, dequantized64(qw, fmt.group, fmt.high_first))
                    chosen = convert
                    break
                except (RuntimeError, PeerUnavailable) as e:
                    reasons.append(f"{what}: {str(e).splitlines()[0][:200]}")
            if chosen is None:
                raise PeerUnavailable(f"int4 peer: torch {torch.__version__}'s int4pack ops: " + "; ".join(reasons))
        out[name] = Int4Linear(chosen(qw, fmt.high_first, tiles), sz, fmt.group, n, k, mm)
    return out


def peer_decoder(model: Model, linears: Mapping[str, PeerLinear], device: str | torch.device) -> Decoder:
    """The bf16 reference decoder (superopt/model.py) with the peer's layers in place of the weights they replace
    (HF names: a layer's projections, the LM head)."""
    dec = Decoder(model, "bfloat16", device)
    for name, layer in linears.items():
        parts = name.split(".")
        if name == LM_HEAD:
            dec.lm_head = layer  # type: ignore[assignment]
        elif len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
            dec.layers[int(parts[2])][parts[4]] = layer  # type: ignore[assignment]
        else:
            raise SuperoptError(f"peer_decoder: no linear weight '{name}'")
    return dec


@torch.no_grad()
def time_cuda_graph_decode(
    model: Model,
    prompt: list[int],
    new_tokens: int,
    linears: Mapping[str, PeerLinear] | None = None,
    compile_mode: str | None = None,
) -> tuple[float, list[int]]:
    """The reference decoder in bf16 (superopt/model.py), one step captured in a CUDA graph that also takes the
    argmax and advances the position; us per replayed step, and its greedy tokens.
    `linears`: a peer's layers in place of those weights (peer_decoder: the int8 and int4 peers).
    `compile_mode`: the step (argmax and position included) compiled by torch.compile in that mode, fullgraph,
    with inductor's coordinate-descent tuning as gpt-fast sets it, before the capture (as gpt-fast compiles
    decode_one_token; a mode with its own CUDA graphs, reduce-overhead, would nest inside ours)."""
    dec = peer_decoder(model, linears or {}, "cuda")
    tok = torch.tensor(prompt[0], device="cuda")
    pos = torch.tensor(0, device="cuda")
    for p in range(len(prompt) - 1):  # prefill, eagerly
        dec.step(torch.tensor(prompt[p], device="cuda"), torch.tensor(p, device="cuda"))
    tok.fill_(prompt[-1])
    pos.fill_(len(prompt) - 1)
    start_pos = len(prompt) - 1

    def step() -> None:
        tok.copy_(dec.step(tok, pos).argmax())
        pos.add_(1)

    run_step: Callable[[], None] = step
    tuning: Any = contextlib.nullcontext()
    if compile_mode is not None:
        importlib.import_module("torch._dynamo").reset()  # each peer compiles its own step (same code, other weights)
        run_step = torch.compile(step, mode=compile_mode, fullgraph=True)
        tuning = importlib.import_module("torch._inductor.config").patch(coordinate_descent_tuning=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    k_save, v_save = dec.k_cache.clone(), dec.v_cache.clone()
    graph = torch.cuda.CUDAGraph()
    with tuning:  # the capture too: no config of the compile's differs there
        with torch.cuda.stream(stream):
            for _ in range(1 if compile_mode is None else 3):
                run_step()  # warm-up (and compile) on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run_step()

    def restart() -> None:
        dec.k_cache.copy_(k_save)
        dec.v_cache.copy_(v_save)
        tok.fill_(prompt[-1])
        pos.fill_(start_pos)

    restart()
    out = []
    for _ in range(new_tokens):
        graph.replay()
        out.append(tok.clone())
    tokens = list(prompt) + [int(t) for t in out]

    def replays() -> None:
        for _ in range(new_tokens):
            graph.replay()

    return cuda_time_us(replays, 3, restart) / new_tokens, tokens


def precision_peers(base: Model, model: Model) -> dict[str, Callable[[], dict[str, PeerLinear]]]:
    """The peers of the megakernel at `model`'s precision (`base`: the same model in bf16), each a builder of its
    layers (peer_decoder; PeerUnavailable where it cannot run here): bf16, the torch decode itself; int8 on the
    same weights (int8_linears) and gpt-fast's own per-channel quantization of the bf16 weights
    (int8_per_channel_linears, the LM head quantized where the model's is); int4, tinygemm on the same weights."""
    if model.fmt.bits == 8:
        head = LM_HEAD in model.quant
        return {
            "torch_int8": lambda: int8_linears(model),
            "torch_int8_per_channel": lambda: int8_per_channel_linears(base, head),
        }
    if model.fmt.bits == 4:
        return {"torch_int4_tinygemm": lambda: int4_linears(model)}
    return {"torch_bf16": dict}


def step_weight_bytes(tg: TaskGraph) -> int:
    """Bytes of weights one decode step reads: bf16, the config's count (ModelConfig.weight_bytes); quantized
    weights, what the GEMV tasks stream (packed values with their scales and zeros: the projections' and the LM
    head's, or the bf16 LM head where it is kept wide) and the norm weights and the token's embedding row (a tied
    model's quantized LM head is streamed beside the bf16 table it gathers that row from)."""
    c = tg.config
    if not any(g.fmt.quantized for g in tg.gemv.values()):
        return c.weight_bytes()
    norms = 2 * (2 * c.layers + 1) * c.hidden + (4 * c.layers * c.head_dim if c.qk_norm else 0)
    return sum(t.weight_bytes for t in tg.tasks) + 2 * c.hidden + norms + 2 * c.qkv_rows * c.layers * c.qkv_bias


def kv_bytes(model: Model, prompt_len: int, new_tokens: int) -> int:
    """Bytes of the KV cache a step reads at the middle of the generated steps (bf16 k and v)."""
    c = model.config
    return 2 * 2 * c.layers * c.kv_heads * c.head_dim * (prompt_len + new_tokens // 2)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (1 GiB each way)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / (cuda_time_us(lambda: b.copy_(a), reps=11) * 1e-6)


def benchmark(
    model: Model,
    prompt_len: int = 32,
    new_tokens: int = 128,
    peers: bool = True,
    compile_peer: bool = True,
    log: Callable[[str], None] = print,
    trace: bool = False,
    programs: dict[str, KernelGraph] | None = None,
) -> dict[str, Any]:
    """Builds and runs the megakernel (its task bodies lowered from `programs`, the plan's winners; see
    `source`), checks its greedy tokens and logits against HF transformers (and the bf16 reference decoder), and
    times it beside the peers.
    Each phase catches its own failure and records it, so one that fails still leaves the others' results."""
    res: dict[str, Any] = {"model": model.name, "prompt_len": prompt_len, "new_tokens": new_tokens, "errors": {}}
    prompt = prompt_tokens(model.config.vocab, prompt_len, seed=0)
    state: dict[str, Any] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        try:
            out = fn()
            log(f"[{model.name}] {name}: ok ({time.time() - t0:.1f} s)")
            return out
        except Hang:
            raise
        except Exception as e:  # noqa: BLE001 (record the phase's failure, go on with the next)
            res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            log(f"[{model.name}] {name}: FAILED: {type(e).__name__}: {e}")
            return None

    def build() -> None:
        mk = state["mk"] = GpuMegakernel(model, programs=programs)
        res["resources"] = mk.resources
        res["tasks"] = len(mk.tg.tasks)
        res["weights"] = mk.tg.weights_summary() if mk.tg.mixed else mk.tg.fmt.describe()
        res["lm_head_weights"] = mk.tg.head_fmt.describe()
        res["weight_bytes"] = step_weight_bytes(mk.tg)
        res["build_report"] = build_report(mk.tg, programs=programs)

    def run() -> None:
        out = state["out"] = state["mk"].generate(prompt, new_tokens)
        res["tokens"] = out.tokens
        if not torch.isfinite(out.logits).all():
            raise SuperoptError("megakernel logits are not all finite")

    def reference() -> None:
        res["vs_reference_bf16"] = versus_reference_bf16(model, state["out"], prompt_len)

    def hf() -> None:
        state["hf"] = hf_model(model)
        ref = teacher_forced_logits(state["hf"], state["out"].tokens, prompt_len)
        res["vs_hf"] = compare(state["out"].tokens, state["out"].logits, ref, prompt_len)
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            greedy = state["hf"].generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        res["tokens_hf"] = greedy[0].tolist()
        res["first_divergence_vs_hf"] = first_divergence(res["tokens"], res["tokens_hf"], prompt_len)

    phase("build", build)
    if "mk" in state:
        phase("generate", run)
    if "out" in state:
        phase("reference_bf16", reference)
        phase("hf_teacher_forced", hf)
    timings: dict[str, float] = {}
    res["timings_us_per_step"] = timings
    if "out" in state:
        timings["megakernel"] = phase("time_megakernel", lambda: time_megakernel(state["mk"], prompt, new_tokens))
    state.pop("mk", None)
    if trace and "out" in state:

        def traced() -> dict[str, Any]:
            mk = GpuMegakernel(model, trace=True, programs=programs)
            mk.generate(prompt, new_tokens)
            return mk.trace_summary()

        res["trace"] = phase("trace", traced)
    torch.cuda.empty_cache()
    if peers:
        cg = phase("time_cuda_graph_decode", lambda: time_cuda_graph_decode(model, prompt, new_tokens))
        if cg:
            timings["torch_cuda_graph"], res["tokens_cuda_graph"] = cg
        if "hf" in state:
            modes = ["eager", "static"] + (["compile"] if compile_peer else [])
            for mode in modes:
                out = phase(f"time_hf_{mode}", functools.partial(time_hf, state["hf"], prompt, new_tokens, mode))
                if out:
                    timings[f"hf_{mode}"], res[f"tokens_hf_{mode}"] = out
    bw = phase("copy_bandwidth", copy_bandwidth)
    if bw:
        res["copy_bandwidth_GBps"] = bw / 1e9
        weights = res.get("weight_bytes", model.config.weight_bytes())  # the precision's, where it was built
        res["floor_us"] = (weights + kv_bytes(model, prompt_len, new_tokens)) / bw * 1e6
    res["floor_us_at_3TBps"] = res.get("weight_bytes", model.config.weight_bytes()) / 3.0e12 * 1e6
    return {k: v for k, v in res.items() if v is not None}


def timing_table(results: list[dict[str, Any]]) -> str:
    """A markdown table: us per step, tokens/s and the fraction of the bandwidth floor, per model and method."""
    lines = ["| model | method | us/step | tokens/s | floor/measured |", "|---|---|---|---|---|"]
    for r in results:
        floor = r.get("floor_us")
        for name, us in r.get("timings_us_per_step", {}).items():
            if us is None:
                continue
            frac = f"{floor / us:.2f}" if floor else "-"
            lines.append(f"| {r['model']} | {name} | {us:.1f} | {1e6 / us:.0f} | {frac} |")
    return "\n".join(lines)
