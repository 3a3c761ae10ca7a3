"""Decoder models: specs, weights, the layer programs in the IR, and a pure-torch reference decoder.

A model spec is YAML with a `model:` section: the architecture fields of a Llama, Qwen3, Qwen2 (q/k/v biases),
Mistral (a sliding window) or Gemma (GeGLU, (1 + w) norms, a scaled embedding) under Hugging Face's names, or
the path of an HF `config.json` (relative to the spec). `weights:` names a safetensors file or folder of shards
(superopt/checkpoint.py: plain or quantized by `superopt quantize`; never downloaded);
without it the weights are random, seeded by `seed:`, bf16. Weights are kept under HF's parameter names, so the
same dict loads into transformers' model.

The layer programs (`layer_programs`) state each part of one decode step as a KernelGraph; identical layers
share one program (one hash). `superopt search MODEL.yaml` searches each once (superopt/model_search.py).
`ProgramDecoder` runs the step through them (or through their winners), the check that they are the model.

`Decoder` is the reference: one token per step over a static KV cache (static shapes, so it can also be
captured in a CUDA graph on a GPU). precision="bfloat16" rounds where HF's bf16 model rounds (each op's
result in bf16, fp32 accumulation and softmax); "float32" computes everything in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from superopt.checkpoint import QUANTIZATION, dequantized, quantized_names, read_safetensors
from superopt.errors import IRError, SpecError, SuperoptError, brief
from superopt.interpret import REFERENCE, TorchEval, rotate_half, run
from superopt.ir import MAX_DIM, KernelGraph, Op
from superopt.ops import TensorType
from superopt.quant import quantize
from superopt.spec import MAX_SEED, SEARCH_CHECKS, read_text, read_yaml

ARCHS = ("llama", "qwen3", "qwen2", "mistral", "gemma")
# HF's activation names -> the IR's op (gelu_pytorch_tanh and gelu_new are both the tanh approximation)
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
MODEL_SPEC_KEYS = ("name", "model", "weights", "seed", "max_seq", "search")
MAX_CONTEXT = 2**20  # KV-cache positions a spec may ask for (the cache is allocated whole)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture fields superopt needs, under short names; `from_hf` reads HF's names."""

    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_embeddings: bool = False
    act: str = "silu"  # the gated MLP's activation, as an IR op: silu, gelu or gelu_tanh
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` positions only

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head's dims of q and k, before the rotation."""
        return self.arch == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        """Qwen2: the q, k and v projections have biases (the o projection has none)."""
        return self.arch == "qwen2"

    @property
    def gemma(self) -> bool:
        """Gemma: RMSNorm weights stored as offsets (the scale is 1 + w, applied in float32) and the embedding
        multiplied by sqrt(hidden) rounded to the model's dtype."""
        return self.arch == "gemma"

    @classmethod
    def from_hf(cls, fields: dict[str, Any], where: str = "<model>") -> ModelConfig:
        """The config of HF config fields; SpecError naming the field for anything missing, of the wrong type or
        out of range (a config file is untrusted input)."""

        def get(key: str, default: Any = None, within: dict[str, Any] = fields) -> Any:
            if within.get(key) is not None:
                return within[key]
            if default is None:
                raise SpecError(f"{where}: model field '{key}' is missing")
            return default

        def count(key: str, default: Any = None) -> int:
            value = get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
                raise SpecError(f"{where}: model field '{key}' must be an integer in 1..{MAX_DIM}, got {brief(value)}")
            return value

        def positive(key: str, value: Any) -> float:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise SpecError(f"{where}: model field '{key}' must be a finite number > 0, got {brief(value)}")
            return float(value)

        arch = str(fields.get("model_type") or "").lower()
        if arch not in ARCHS:
            raise SpecError(
                f"{where}: model_type {brief(arch or 'missing')} is not supported (supported: {', '.join(ARCHS)})"
            )
        for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if fields.get(flag):
                raise SpecError(f"{where}: {flag}: true is not supported")
        # Gemma's MLP reads hidden_activation (falling back to the tanh approximation), the others hidden_act
        gemma_act = arch == "gemma" and fields.get("hidden_activation") is not None
        act_key = "hidden_activation" if gemma_act else "hidden_act"
        act_name = fields.get(act_key) or ("gelu_pytorch_tanh" if arch == "gemma" else "silu")
        if not isinstance(act_name, str) or act_name not in ACTIVATIONS:
            raise SpecError(
                f"{where}: {act_key} {brief(act_name)} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        window = fields.get("sliding_window") if arch == "mistral" else None
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise SpecError(f"{where}: model field 'sliding_window' must be a positive integer, got {brief(window)}")
        # transformers 5 moved rope_theta and rope_scaling into rope_parameters; accept both.
        rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise SpecError(f"{where}: model field 'rope_parameters' must be a mapping, got {brief(rope)}")
        theta = positive("rope_theta", fields.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind not in ("default", "llama3"):
            raise SpecError(f"{where}: rope type {brief(kind)} is not supported (default or llama3)")
        scaling = None
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {"rope_type": "llama3"} | {k: positive(k, get(k, within=rope)) for k in keys}
        heads, hidden = count("num_attention_heads"), count("hidden_size")
        cfg = cls(
            arch=arch,
            hidden=hidden,
            intermediate=count("intermediate_size"),
            layers=count("num_hidden_layers"),
            heads=heads,
            kv_heads=count("num_key_value_heads", heads),
            head_dim=count("head_dim", hidden // heads),
            vocab=count("vocab_size"),
            eps=positive("rms_norm_eps", get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(fields.get("tie_word_embeddings", arch == "gemma")),
            act=ACTIVATIONS[act_name],
            sliding_window=window,
        )
        if cfg.heads % cfg.kv_heads or cfg.head_dim % 2:
            raise SpecError(
                f"{where}: heads ({cfg.heads}) must be a multiple of kv heads ({cfg.kv_heads}), head_dim even"
            )
        return cfg

    def hf_fields(self) -> dict[str, Any]:
        """The config as HF's config.json fields (what transformers' LlamaConfig / Qwen3Config take)."""
        out: dict[str, Any] = {
            "model_type": self.arch,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": HF_ACTIVATION[self.act],
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.gemma:
            out["hidden_activation"] = HF_ACTIVATION[self.act]
        if self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            out["use_sliding_window"] = False
        return out

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter by its HF name."""
        h, d = self.hidden, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.heads * d, h),
                p + "self_attn.k_proj.weight": (self.kv_heads * d, h),
                p + "self_attn.v_proj.weight": (self.kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, self.heads * d),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            }
            if self.qkv_bias:
                rows = {"q": self.heads * d, "k": self.kv_heads * d, "v": self.kv_heads * d}
                shapes |= {p + f"self_attn.{n}_proj.bias": (r,) for n, r in rows.items()}
            if self.qk_norm:
                shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def weight_bytes(self) -> int:
        """Bytes of bf16 weights one decode step reads: all but the embedding table, of which it reads one row (a
        tied LM head is the embedding, read whole once)."""
        shapes = self.param_shapes()
        if not self.tie_embeddings:
            shapes["model.embed_tokens.weight"] = (1, self.hidden)
        return 2 * sum(math.prod(s) for s in shapes.values())


PRECISIONS = ("bf16", "int8", "int4")


@dataclass(frozen=True)
class WeightFormat:
    """How the projections' weights (q/k/v, o, gate, up, down) are stored: bf16, or int8 / int4 with one bf16 scale
    (and, asymmetric, one bf16 zero point) a group of `group` input features, int4 two values a byte (value 2j in
    the low nibble unless high_first), as the IR's dequant reads them. The LM head is stored in the same format
    unless it is kept bf16 (LM_HEADS, Model.head_fmt); the embedding and the norms are bf16 in every format (a
    tied model's embedding gather reads the bf16 table, its LM head GEMV a quantized copy)."""

    bits: int = 16
    group: int = 0
    zero: bool = False
    high_first: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def precision(self) -> str:
        return "bf16" if not self.quantized else f"int{self.bits}"

    @property
    def dtype(self) -> str:
        """The IR dtype of the stored weight."""
        return {16: "bfloat16", 8: "int8", 4: "int4"}[self.bits]

    def q_bytes(self, k: int) -> int:
        """Bytes of one stored row of k weights (without its scales)."""
        return k * self.bits // 8

    def row_bytes(self, k: int) -> int:
        """Bytes one row of k weights streams: the packed values, and their scales (and zeros), bf16 each."""
        if not self.quantized:
            return 2 * k
        return self.q_bytes(k) + (2 + 2 * self.zero) * (k // self.group)

    @property
    def short(self) -> str:
        """The format in a few characters: bf16, int4 g128, int8 g64 asym (asymmetric), ... hf (high nibble first)."""
        if not self.quantized:
            return "bf16"
        return f"int{self.bits} g{self.group}" + " asym" * self.zero + " hf" * self.high_first

    def describe(self) -> str:
        if not self.quantized:
            return "bf16"
        kind = "asymmetric (scale and zero point)" if self.zero else "symmetric (scale)"
        order = ", high nibble first" if self.high_first else ""
        return f"int{self.bits}, {kind} a group of {self.group} input features{order}"


BF16 = WeightFormat()
LM_HEADS = ("same", "bf16")  # the LM head's weights: the projections' format, or kept bf16
LM_HEAD = "lm_head.weight"
# The projections' GEMV task kinds (kernels/taskgraph.py GEMV_OPS less the LM head's, "lmhead"): the granularity
# at which `--precision auto` (superopt/precision.py) chooses a format, the same in every layer.
PROJECTION_KINDS = ("qkv", "oproj", "gateup", "down")


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight [out, in] as stored: q (int8 [out, in] or int4 bytes uint8 [out, in / 2]), scale [out,
    in / group] bf16 and zero (the same, or None)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


@dataclass
class Model:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names -> bf16 tensors (a quantized weight: its dequantized value)
    max_seq: int = 256  # KV-cache length
    fmt: WeightFormat = BF16  # the projections' storage, where `mixed` names none
    quant: dict[str, QuantizedWeight] = field(default_factory=dict)  # HF names -> as stored, where quantized
    # A format per projection kind (PROJECTION_KINDS and "lmhead"), where they differ (quantize_mixed)
    mixed: dict[str, WeightFormat] = field(default_factory=dict)

    def format_of(self, kind: str) -> WeightFormat:
        """How a projection kind's weights are stored (PROJECTION_KINDS; "lmhead": see head_fmt)."""
        return self.head_fmt if kind == "lmhead" else self.mixed.get(kind, self.fmt)

    @property
    def head_fmt(self) -> WeightFormat:
        """The LM head's storage: the projections' format (or its own, `mixed`) where it is stored quantized
        (`quant` holds it), else bf16."""
        return self.mixed.get("lmhead", self.fmt) if LM_HEAD in self.quant else BF16

    def w(self, name: str) -> torch.Tensor:
        """A weight by its HF name; a tied LM head is the embedding table, unless the head was quantized (then
        `weights` holds its dequantized copy, and the embedding stays as it was)."""
        if name == LM_HEAD and self.config.tie_embeddings and LM_HEAD not in self.weights:
            name = "model.embed_tokens.weight"
        return self.weights[name]


def projection_names(cfg: ModelConfig) -> list[str]:
    """The linear weights a quantized format stores quantized: each layer's attention and MLP projections."""
    return quantized_names({n: torch.empty(0) for n in cfg.param_shapes()})


def weight_format(precision: str, group: int = 128, symmetric: bool = True) -> WeightFormat:
    """The format of a precision name (bf16, int8, int4); SuperoptError for another or a bad group."""
    if precision not in PRECISIONS:
        raise SuperoptError(f"precision must be one of {', '.join(PRECISIONS)}, got {brief(precision)}")
    if precision == "bf16":
        return BF16
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise SuperoptError(f"group must be a positive integer, got {brief(group)}")
    return WeightFormat(int(precision[3:]), group, not symmetric)


def quantize_model(model: Model, fmt: WeightFormat, lm_head: str = "same") -> Model:
    """The model with its projections quantized to `fmt`, round to nearest (superopt/quant.py), and its LM head too
    unless `lm_head` is "bf16" (LM_HEADS): `quant` holds them as stored, `weights` their dequantized values (what
    the reference decoder and HF compute with; a tied model's embedding stays the bf16 table). A model already
    quantized is returned as it is if `fmt` is its format (nothing is requantized: an LM head it stores bf16 stays
    bf16; "bf16" runs a quantized head on its dequantized values), else refused; bf16 keeps the (dequantized)
    weights."""
    if lm_head not in LM_HEADS:
        raise SuperoptError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {brief(lm_head)}")
    if model.mixed and fmt.quantized:
        raise SuperoptError(
            f"{model.name}: its weights are stored in mixed precisions; {fmt.precision} would requantize"
        )
    if model.mixed:
        return Model(model.name, model.config, model.weights, model.max_seq)
    if fmt == model.fmt or not fmt.quantized:
        if fmt != model.fmt:
            return Model(model.name, model.config, model.weights, model.max_seq)
        if lm_head == "bf16" and LM_HEAD in model.quant:
            quant = {n: qw for n, qw in model.quant.items() if n != LM_HEAD}
            return Model(model.name, model.config, model.weights, model.max_seq, model.fmt, quant)
        return model
    if model.fmt.quantized:
        raise SuperoptError(
            f"{model.name}: its weights are stored {model.fmt.describe()}; {fmt.precision} would requantize them "
            f"(use --precision {model.fmt.precision} or a bf16 checkpoint)"
        )
    names = projection_names(model.config) + [LM_HEAD] * (lm_head == "same")
    weights, quant = _quantized(model, {name: fmt for name in names})
    return Model(model.name, model.config, weights, model.max_seq, fmt, quant)


def quantize_mixed(model: Model, formats: dict[str, WeightFormat]) -> Model:
    """The bf16 `model` with each projection kind's weights (PROJECTION_KINDS and "lmhead", by `formats`; a kind
    it leaves out stays bf16) quantized as quantize_model does, `mixed` recording the formats."""
    if model.fmt.quantized or model.mixed:
        raise SuperoptError(f"{model.name}: its weights are stored quantized; a mixed precision would requantize them")
    names = projection_names(model.config) + [LM_HEAD]
    weights, quant = _quantized(model, {n: formats.get(projection_kind(n), BF16) for n in names})
    return Model(model.name, model.config, weights, model.max_seq, BF16, quant, dict(formats))


def projection_kind(name: str) -> str:
    """The projection kind (PROJECTION_KINDS, or "lmhead") of a projection's HF weight name."""
    if name == LM_HEAD:
        return "lmhead"
    proj = name.removeprefix("model.layers.").split(".", 1)[1].removesuffix(".weight")
    return next(WEIGHT_KIND[w] for w, projs in PROGRAM_WEIGHTS.items() if proj in projs)


def quantized_weight(w: torch.Tensor, fmt: WeightFormat, what: str) -> QuantizedWeight:
    """A bf16 weight [out, in] quantized to `fmt`, round to nearest; SuperoptError naming `what` where its input
    features are not whole groups."""
    if w.shape[-1] % fmt.group:
        raise SuperoptError(f"{what} has {w.shape[-1]} input features, not a multiple of the group {fmt.group}")
    return QuantizedWeight(*quantize(w, fmt.bits, fmt.group, symmetric=not fmt.zero))


def _quantized(
    model: Model, formats: dict[str, WeightFormat]
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """The model's weights with those `formats` quantizes (by HF name) replaced by their dequantized values, and
    those as stored."""
    weights, quant = dict(model.weights), {}
    for name, fmt in formats.items():
        if fmt.quantized:
            quant[name] = quantized_weight(model.w(name), fmt, f"{model.name}: '{name}'")
            weights[name] = dequantized_weight(quant[name], fmt)
    return weights, quant


NATIVE = TorchEval("native")


def dequantized_weight(qw: QuantizedWeight, fmt: WeightFormat) -> torch.Tensor:
    """The IR's dequant of a stored weight, by the reference interpreter's rule, on the tensors' device (bit for
    bit superopt.quant.dequantize, without the copy to the CPU)."""
    names = ("q", "scale") + (("zero",) if qw.zero is not None else ())
    op = Op("dequant", names, ("w",), {"group": fmt.group, "high_first": fmt.high_first})
    args = [qw.q, qw.scale] + ([qw.zero] if qw.zero is not None else [])
    return NATIVE.op(op, args, TensorType((), "bfloat16"))


# --- weights ------------------------------------------------------------------------------------------------


def random_weights(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random bf16 weights. Projections are N(0, 1/fan_in), so every block adds about unit variance to
    the residual stream; embeddings are N(0, 0.02^2) (HF's init), small beside that, so a tied LM head does not
    make the model echo its input token; norm scales are N(1, 0.1^2), so the weighted norms are exercised
    (Gemma stores the scale minus 1); biases are N(0, 0.1^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen, device=device)
        elif len(shape) == 1:
            t = (0 if cfg.gemma else 1) + 0.1 * torch.randn(shape, generator=gen, device=device)
        elif "embed_tokens" in name:
            t = 0.02 * torch.randn(shape, generator=gen, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[1])
        out[name] = t.to(torch.bfloat16)
    return out


def load_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a folder of them (shards), or a torch .bin/.pt state dict; a quantized
    checkpoint's (superopt/checkpoint.py) dequantized."""
    return load_checkpoint(path, cfg)[0]


def _stored(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[WeightFormat, dict[str, QuantizedWeight]]:
    """A quantized checkpoint's format and its weights as stored (its metadata already checked by `dequantized`);
    BF16 and none for a plain file."""
    if QUANTIZATION not in metadata:
        return BF16, {}
    meta = json.loads(metadata[QUANTIZATION])
    fmt = WeightFormat(meta["bits"], meta["group"], not meta.get("symmetric", True), meta["high_first"])
    quant = {}
    for name in meta["weights"]:
        stem = str(name).removesuffix(".weight")
        quant[str(name)] = QuantizedWeight(
            tensors[f"{stem}.qweight"], tensors[f"{stem}.scales"], tensors.get(f"{stem}.qzeros")
        )
    return fmt, quant


def load_checkpoint(
    path: Path, cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor], WeightFormat, dict[str, QuantizedWeight]]:
    """`load_weights`' weights, and for a quantized checkpoint that stores every projection (projection_names)
    in one format, that format and the projections as stored, with the LM head where it stores it quantized too
    (else BF16 and none: the dequantized weights). A tied model's quantized LM head is a weight of its own
    (`lm_head.weight`, dequantized), beside the bf16 embedding."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{path}: no .safetensors files in this folder")
    else:
        files = [path]
    found: dict[str, torch.Tensor] = {}
    formats: set[WeightFormat] = set()
    quant: dict[str, QuantizedWeight] = {}
    for f in files:
        if not f.exists():
            raise SpecError(f"{f}: weights file not found")
        try:
            if f.suffix == ".safetensors":
                tensors, metadata = read_safetensors(f)
                found |= dequantized(tensors, metadata, f)
                fmt, stored = _stored(tensors, metadata)
                formats.add(fmt)
                quant |= stored
            else:
                found |= torch.load(f, map_location="cpu", weights_only=True)
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 (a hostile or truncated file fails in many ways: each is one line)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise SpecError(f"{f}: not a weights file superopt can read: {type(e).__name__}: {first}") from None
        if not all(isinstance(t, torch.Tensor) for t in found.values()):
            raise SpecError(f"{f}: not a state dict of tensors")
    shapes = cfg.param_shapes()
    if cfg.tie_embeddings:
        if LM_HEAD in quant:  # stored quantized: the head's own copy, the embedding gather keeps the bf16 table
            shapes[LM_HEAD] = (cfg.vocab, cfg.hidden)
        else:
            found.pop(LM_HEAD, None)
    missing = [n for n in shapes if n not in found]
    if missing:
        raise SpecError(f"{path}: {len(missing)} weights missing, e.g. '{missing[0]}'")
    for name, shape in shapes.items():
        if tuple(found[name].shape) != shape:
            raise SpecError(f"{path}: '{name}' has shape {list(found[name].shape)}, the config needs {list(shape)}")
    weights = {n: found[n].to(torch.bfloat16) for n in shapes}
    if len(formats) == 1 and sorted(set(quant) - {LM_HEAD}) == sorted(projection_names(cfg)):
        return weights, formats.pop(), quant
    return weights, BF16, {}


@dataclass
class ModelSpec:
    """A parsed model spec: what `load` needs, without the weights (enough to build and emit the kernel)."""

    name: str
    config: ModelConfig
    weights: Path | None = None
    seed: int = 0
    max_seq: int = 256
    search_settings: dict[str, Any] = field(default_factory=dict)  # the spec's `search:` section

    def load(self, device: str | torch.device = "cpu", fmt: WeightFormat | None = None, lm_head: str = "same") -> Model:
        """The model with its weights: read from `weights`, else random, drawn on `device` (fast on a GPU; the
        same seed gives the same weights on the same kind of device). `fmt`: the projections' format, `lm_head`
        the LM head's (quantize_model; None: the checkpoint's own, bf16 for random weights)."""
        if self.weights is not None:
            weights, stored, quant = load_checkpoint(self.weights, self.config)  # on the CPU, as read
            model = Model(self.name, self.config, weights, self.max_seq, stored, quant)
        else:
            model = Model(self.name, self.config, random_weights(self.config, self.seed, device), self.max_seq)
        return model if fmt is None else quantize_model(model, fmt, lm_head)


def _config_json(path: Path) -> Any:
    """An HF config.json's document, read as any spec is (size, UTF-8); SpecError if it is not JSON."""
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise SpecError(f"{path}: not an HF config.json: {type(e).__name__}: {str(e)[:100]}") from None


def _document(path: Path) -> Any:
    """A model spec's document: the YAML, or for an HF config.json, its fields as the `model` section."""
    if path.suffix != ".json":
        return read_yaml(read_text(path), str(path))[1]
    return {"name": path.parent.name if path.stem == "config" else path.stem, "model": _config_json(path)}


def is_model_spec(path: str | Path) -> bool:
    """Whether `path` is a model spec (YAML with a `model:` section) or an HF config.json (`model_type`), not a
    program; a file that cannot be read counts as a program, whose loader says what is wrong."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        return False
    try:
        doc = _document(path)
    except SpecError:
        return False
    fields = doc.get("model") if isinstance(doc, dict) else None
    if path.suffix == ".json":
        return isinstance(fields, dict) and "model_type" in fields and "format" not in fields
    return isinstance(doc, dict) and "model" in doc


def load_spec(path: str | Path) -> ModelSpec:
    """A model spec (YAML): `name`, `model` (HF config fields, or the path of a config.json relative to the
    spec), optional `weights` (a safetensors file or folder, relative to the spec), `seed`, `max_seq`, `search`
    (the search settings of its programs, as a program spec's); or an HF config.json itself. The file is read as
    any spec is (size, UTF-8, no YAML aliases, nesting), every field checked before use."""
    path = Path(path)
    doc = _document(path)
    if not isinstance(doc, dict) or "model" not in doc:
        raise SpecError(f"{path}: a model spec is a mapping with a 'model:' section")
    unknown = sorted(map(str, set(doc) - set(MODEL_SPEC_KEYS)))
    if unknown:
        raise SpecError(f"{path}: unknown key {brief(unknown[0])} (expected: {', '.join(MODEL_SPEC_KEYS)})")
    fields, where = doc["model"], str(path)
    if isinstance(fields, str):
        where = str(path.parent / fields)
        fields = _config_json(path.parent / fields)
    if not isinstance(fields, dict):
        raise SpecError(f"{path}: 'model' must be a mapping of HF config fields or the path of a config.json")
    seed, max_seq = doc.get("seed", 0), doc.get("max_seq", 256)
    for key, value, low, top in (("seed", seed, 0, MAX_SEED), ("max_seq", max_seq, 2, MAX_CONTEXT)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise SpecError(f"{path}: '{key}' must be an integer in {low}..{top}, got {brief(value)}")
    name = doc.get("name") or path.stem
    if not isinstance(name, str) or not name.isprintable() or len(name) > 200:
        raise SpecError(f"{path}: 'name' must be one printable line of at most 200 characters, got {brief(name)}")
    weights = doc.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise SpecError(f"{path}: 'weights' must be the path of a safetensors file or folder, got {brief(weights)}")
    search = doc.get("search") or {}
    if not isinstance(search, dict) or set(search) - set(SEARCH_CHECKS):
        raise SpecError(f"{path}: 'search' takes the keys: {', '.join(SEARCH_CHECKS)}")
    for key, value in search.items():
        try:
            SEARCH_CHECKS[key](value)
        except IRError as e:
            raise SpecError(f"{path}: search {key}: {e}") from None
    return ModelSpec(
        name,
        ModelConfig.from_hf(fields, where),
        path.parent / weights if weights else None,
        seed,
        max_seq,
        search,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """The model of a spec, with its weights (see ModelSpec.load)."""
    return load_spec(path).load(device)


# --- the layer programs in the IR ---------------------------------------------------------------------------


def layer_programs(
    cfg: ModelConfig,
    context: int = 16,
    fmt: WeightFormat = BF16,
    head: WeightFormat | None = None,
    mixed: dict[str, WeightFormat] | None = None,
) -> dict[str, KernelGraph]:
    """One decode step as KernelGraphs (batch 1, bf16), named by the part of the step they compute; identical
    layers share them. Linear weights are [in, out] (x @ w, the transpose of HF's layout). A quantized `fmt`
    (`linear`) makes each projection's weight the dequant of its stored inputs, and the LM head's where `head`
    (the LM head's format; None: `fmt`) is quantized: its inputs w, w_scale (and w_zero) as quantized_linear's.
    `mixed`: a format per projection kind (PROJECTION_KINDS, "lmhead") overriding `fmt` and `head`.

    embed_scale (Gemma): the embedded token times sqrt(hidden). attn_in: the input norm, weighted, and the fused
    QKV projection (with its bias, Qwen2). qk_rope: the rotary embedding of q's and k's heads (q/k norm first
    where the model has it: one gamma row per head, q_norm's for q's heads, k_norm's for k's), one cos/sin row
    for every head. kv_append: the new k and v after the cached ones. attention: GQA decode over the `context`
    positions of a static cache, `mask` added to the scores (0 where a position is attended, -inf elsewhere).
    attn_out: the O projection and the residual. mlp: the post-attention norm, the gated MLP and the residual.
    lm_head: the final norm, the LM head and the greedy token (the logits' argmax, the first of equal maxima).
    mlp_act and residual: the elementwise epilogues of the MLP and the projections, which the megakernel's GEMV
    tasks run."""
    h, d, i, nh, nkv, g = cfg.hidden, cfg.head_dim, cfg.intermediate, cfg.heads, cfg.kv_heads, cfg.group
    bf = "bfloat16"
    progs: dict[str, KernelGraph] = {}

    def norm(graph: KernelGraph, x: Any, gamma: Any) -> Any:
        return graph.mul(graph.rms_norm(x, eps=cfg.eps), graph.add_scalar(gamma, c=1.0) if cfg.gemma else gamma)

    formats = dict.fromkeys(PROJECTION_KINDS, fmt) | {"lmhead": fmt if head is None else head} | (mixed or {})
    head = formats["lmhead"]

    def linear(graph: KernelGraph, x: Any, name: str, k: int, n: int) -> Any:
        wf = formats[WEIGHT_KIND[name]]
        return (
            quantized_linear(graph, x, name, k, n, wf)
            if wf.quantized
            else graph.matmul(x, graph.input(name, (k, n), bf))
        )

    if cfg.gemma:
        p = KernelGraph("embed_scale")  # HF multiplies by sqrt(hidden) rounded to the model's dtype
        c = float(torch.tensor(math.sqrt(h), dtype=torch.bfloat16))
        p.output(p.mul_scalar(p.input("x", (1, h), bf), c=c))
        progs["embed_scale"] = p
    p = KernelGraph("attn_in")
    x, gamma = p.input("h", (1, h), bf), p.input("gamma", (1, h), bf)
    qkv = linear(p, norm(p, x, gamma), "wqkv", h, cfg.qkv_rows)
    p.output(p.add(qkv, p.input("bqkv", (1, cfg.qkv_rows), bf)) if cfg.qkv_bias else qkv)
    progs["attn_in"] = p
    p = KernelGraph("qk_rope")
    qk = p.input("qk", (nh + nkv, d), bf)
    if cfg.qk_norm:  # Qwen3: rms_norm over each head's dims, then the rotation
        qk = norm(p, qk, p.input("gamma", (nh + nkv, d), bf))
    p.output(p.rope(qk, p.input("cos", (1, d), bf), p.input("sin", (1, d), bf)))
    progs["qk_rope"] = p
    p = KernelGraph("kv_append")  # the new position's k and v after the cached ones (k is stored transposed)
    p.output(p.concat(p.input("k_cache", (nkv, d, context - 1), bf), p.input("k", (nkv, d, 1), bf), dim=2))
    p.output(p.concat(p.input("v_cache", (nkv, context - 1, d), bf), p.input("v", (nkv, 1, d), bf), dim=1))
    progs["kv_append"] = p
    p = KernelGraph("attention")
    q, k, v = p.input("q", (nkv, g, d), bf), p.input("k", (nkv, d, context), bf), p.input("v", (nkv, context, d), bf)
    s = p.add(p.mul_scalar(p.matmul(q, k), c=1.0 / math.sqrt(d)), p.input("mask", (1, 1, context), bf))
    e = p.exp(p.sub(s, p.max(s, dim=2, keepdim=True)))
    p.output(p.matmul(p.div(e, p.sum(e, dim=2, keepdim=True)), v))
    progs["attention"] = p
    p = KernelGraph("attn_out")
    a = p.input("a", (1, nh * d), bf)
    wo = linear(p, a, "wo", nh * d, h)
    p.output(p.add(p.input("h", (1, h), bf), wo))
    progs["attn_out"] = p
    p = KernelGraph("mlp")
    x, gamma = p.input("h", (1, h), bf), p.input("gamma", (1, h), bf)
    y = norm(p, x, gamma)
    act = p.mul(p.op(cfg.act, linear(p, y, "wg", h, i)), linear(p, y, "wu", h, i))
    p.output(p.add(x, linear(p, act, "wd", i, h)))
    progs["mlp"] = p
    p = KernelGraph("lm_head")
    if head.quantized:
        x, gamma = p.input("h", (1, h), bf), p.input("gamma", (1, h), bf)
        logits = quantized_linear(p, norm(p, x, gamma), "w", h, cfg.vocab, head)
    else:
        x, gamma, w = p.input("h", (1, h), bf), p.input("gamma", (1, h), bf), p.input("w", (h, cfg.vocab), bf)
        logits = p.matmul(norm(p, x, gamma), w)
    p.output(logits)
    p.output(p.argmax(logits, dim=1, keepdim=True))  # the greedy token
    progs["lm_head"] = p
    p = KernelGraph("mlp_act")
    p.output(p.mul(p.op(cfg.act, p.input("g", (1, i), bf)), p.input("u", (1, i), bf)))
    progs["mlp_act"] = p
    p = KernelGraph("residual")
    p.output(p.add(p.input("h", (1, h), bf), p.input("y", (1, h), bf)))
    progs["residual"] = p
    return progs


def quantized_linear(graph: KernelGraph, x: Any, name: str, k: int, n: int, fmt: WeightFormat) -> Any:
    """x [1, k] times a quantized linear weight stored [n, k] (HF's [out, in]: groups and packing along k, as
    dequant reads them): the inputs `name` ([1, n, k] int8 or [1, n, k / 2] int4), `name`_scale and, asymmetric,
    `name`_zero ([1, n, k / group], bf16); the product `sum(dequant(...) * x, dim=2)`, [1, n]: the IR has no
    transpose, so the GEMV of a row-major [out, in] weight is written as a broadcast product and a sum over in
    (the megakernel's lowering reads this pattern as its GEMV)."""
    q = graph.input(name, (1, n, fmt.q_bytes(k) if fmt.bits == 4 else k), fmt.dtype)
    params = [graph.input(f"{name}_{p}", (1, n, k // fmt.group), "bfloat16") for p in ("scale", "zero")[: 1 + fmt.zero]]
    w = graph.dequant(q, *params, group=fmt.group, high_first=fmt.high_first)
    return graph.sum(graph.mul(w, x), dim=2)


# --- RoPE ---------------------------------------------------------------------------------------------------


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies in float32, as transformers computes them (llama3 scaling included)."""
    d = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return freq
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rope_table(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim / 2] in bf16: HF computes them in float32 and casts to the model's dtype
    (its second half repeats the first)."""
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq(cfg)[None, :]
    return freqs.cos().to(torch.bfloat16), freqs.sin().to(torch.bfloat16)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the last dim, in x's dtype (each op rounds, as in HF)."""
    cos, sin = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


# --- the reference decoder ----------------------------------------------------------------------------------


def attended(cfg: ModelConfig, positions: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Which cache positions the query at `pos` attends: those up to it, within the sliding window if any."""
    mask = positions <= pos
    if cfg.sliding_window is not None:
        mask &= positions > pos - cfg.sliding_window
    return mask


class DecodeLoop:
    """Greedy decoding over a `step(token, pos) -> logits` (float32, [vocab]) that appends to its KV cache."""

    device: torch.device

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(
        self, prompt: list[int], new_tokens: int, forced: list[int] | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy decoding after `prompt`; returns all tokens and the logits of each generated position
        [new_tokens, vocab]. With `forced`, those tokens are fed instead of the argmax (teacher forcing)."""
        tokens = list(prompt)
        logits = []
        for pos in range(len(prompt) + new_tokens - 1):
            out = self.step(torch.tensor(tokens[pos], device=self.device), torch.tensor(pos, device=self.device))
            if pos + 1 >= len(prompt):
                logits.append(out)
                nxt = forced[pos + 1 - len(prompt)] if forced is not None else int(out.argmax())
                tokens.append(nxt)
        return tokens, torch.stack(logits).cpu()


class Decoder(DecodeLoop):
    """One decode step at a time over a static KV cache; every shape is static, so `step` can be captured in a
    CUDA graph (token and pos are 1-element device tensors updated in place)."""

    def __init__(self, model: Model, precision: str = "float32", device: str | torch.device = "cpu") -> None:
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        cfg = self.cfg = model.config
        self.dt = torch.float32 if precision == "float32" else torch.bfloat16
        self.max_seq = model.max_seq

        def w(name: str) -> torch.Tensor:
            return model.w(name).to(device=device, dtype=self.dt)

        self.embed, self.norm, self.lm_head = (
            w("model.embed_tokens.weight"),
            w("model.norm.weight"),
            w("lm_head.weight"),
        )
        self.layers = []
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            names = ["input_layernorm", "post_attention_layernorm"] + [f"self_attn.{n}_proj" for n in "qkvo"]
            names += [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
            names += ["self_attn.q_norm", "self_attn.k_norm"] if cfg.qk_norm else []
            layer = {n.split(".")[-1]: w(p + n + ".weight") for n in names}
            for n in "qkv":
                layer[f"{n}_bias"] = w(p + f"self_attn.{n}_proj.bias") if cfg.qkv_bias else None
            self.layers.append(layer)
        cos, sin = rope_table(cfg, self.max_seq)
        self.cos, self.sin = cos.to(device), sin.to(device)
        shape = (cfg.layers, cfg.kv_heads, self.max_seq, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dt, device=device)
        self.v_cache = torch.zeros(shape, dtype=self.dt, device=device)
        self.positions = torch.arange(self.max_seq, device=device)
        self.device = torch.device(device)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.cfg.eps)
        if self.cfg.gemma:  # the scale 1 + w, applied in float32, then rounded once
            return (normed * (1.0 + weight.float())).to(self.dt)
        return weight * normed.to(self.dt)

    def embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings [n, hidden] (scaled by sqrt(hidden) where the model does)."""
        x = self.embed.index_select(0, tokens)
        return x * torch.tensor(math.sqrt(self.cfg.hidden), dtype=self.dt) if self.cfg.gemma else x

    def qkv_heads(
        self, lw: dict[str, Any], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's q [..., heads, d], k and v [..., kv_heads, d] of x [..., hidden]: normed, projected, q and k
        normed where the model does, then rotated."""
        cfg, d = self.cfg, self.cfg.head_dim
        y = self.rms_norm(x, lw["input_layernorm"])
        lead = y.shape[:-1]
        q = F.linear(y, lw["q_proj"], lw["q_bias"]).view(*lead, cfg.heads, d)
        k = F.linear(y, lw["k_proj"], lw["k_bias"]).view(*lead, cfg.kv_heads, d)
        v = F.linear(y, lw["v_proj"], lw["v_bias"]).view(*lead, cfg.kv_heads, d)
        if cfg.qk_norm:
            q, k = self.rms_norm(q, lw["q_norm"]), self.rms_norm(k, lw["k_norm"])
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def after_attention(self, lw: dict[str, Any], x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input x and attention output a [..., heads * d]: the O projection and
        its residual, then the MLP and its residual."""
        x = x + F.linear(a, lw["o_proj"])
        y = self.rms_norm(x, lw["post_attention_layernorm"])
        act = REFERENCE[self.cfg.act]
        return x + F.linear(act(F.linear(y, lw["gate_proj"])) * F.linear(y, lw["up_proj"]), lw["down_proj"])

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (float32, [vocab]) after `token` at position `pos`; appends to the KV cache."""
        cfg, d = self.cfg, self.cfg.head_dim
        x = self.embedded(token.view(1))[0]
        cos, sin = self.cos.index_select(0, pos.view(1))[0], self.sin.index_select(0, pos.view(1))[0]
        mask = attended(cfg, self.positions, pos.view(1))
        for i, lw in enumerate(self.layers):
            q, k, v = self.qkv_heads(lw, x, cos, sin)
            self.k_cache[i].index_copy_(1, pos.view(1), k[:, None])
            self.v_cache[i].index_copy_(1, pos.view(1), v[:, None])
            qg = q.view(cfg.kv_heads, cfg.group, d).float()
            scores = (qg @ self.k_cache[i].float().transpose(1, 2)) / math.sqrt(d)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
            a = (probs @ self.v_cache[i].float()).to(self.dt).reshape(cfg.heads * d)
            x = self.after_attention(lw, x, a)
        return F.linear(self.rms_norm(x, self.norm), self.lm_head).float()


# A layer program's weight input -> the HF projections whose rows it stacks.
PROGRAM_WEIGHTS = {
    "wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "wo": ("self_attn.o_proj",),
    "wg": ("mlp.gate_proj",),
    "wu": ("mlp.up_proj",),
    "wd": ("mlp.down_proj",),
}
WEIGHT_KIND = {"wqkv": "qkv", "wo": "oproj", "wg": "gateup", "wu": "gateup", "wd": "down"}  # -> PROJECTION_KINDS


def linear_rows(model: Model, layer: int, name: str) -> torch.Tensor:
    """A layer program's weight input `name` (PROGRAM_WEIGHTS) as bf16 rows [n, k]: its projections' HF rows
    stacked (a quantized model's dequantized)."""
    return torch.cat([model.w(f"model.layers.{layer}.{proj}.weight") for proj in PROGRAM_WEIGHTS[name]])


def stored_rows(model: Model, layer: int, name: str) -> QuantizedWeight:
    """A layer program's weight input `name` (PROGRAM_WEIGHTS) of a quantized model as stored: its projections'
    rows stacked ([n, k] int8 or [n, k / 2] int4 bytes, scale and zero [n, k / group])."""
    parts = [model.quant[f"model.layers.{layer}.{proj}.weight"] for proj in PROGRAM_WEIGHTS[name]]
    zeros = [qw.zero for qw in parts if qw.zero is not None]
    zero = torch.cat(zeros) if zeros else None
    return QuantizedWeight(torch.cat([qw.q for qw in parts]), torch.cat([qw.scale for qw in parts]), zero)


def program_weight(model: Model, layer: int, name: str) -> dict[str, torch.Tensor]:
    """The layer program's inputs for weight `name` of a layer: bf16 [in, out] (the transpose of HF's rows), or a
    quantized model's stored tensors (`quantized_linear`'s inputs, [1, n, ...])."""
    if not model.format_of(WEIGHT_KIND[name]).quantized:
        return {name: linear_rows(model, layer, name).T}
    qw = stored_rows(model, layer, name)
    out = {name: qw.q[None], f"{name}_scale": qw.scale[None]}
    return out | ({f"{name}_zero": qw.zero[None]} if qw.zero is not None else {})


def head_inputs(model: Model) -> dict[str, torch.Tensor]:
    """The lm_head program's weight inputs: w bf16 [hidden, vocab], or the quantized head as stored (w, w_scale and
    w_zero, quantized_linear's inputs [1, vocab, ...])."""
    if not model.head_fmt.quantized:
        return {"w": model.w(LM_HEAD).T}
    qw = model.quant[LM_HEAD]
    return {"w": qw.q[None], "w_scale": qw.scale[None]} | ({"w_zero": qw.zero[None]} if qw.zero is not None else {})


class ProgramDecoder(DecodeLoop):
    """The decode step computed by its layer programs, each run by the reference interpreter: the programs of
    `layer_programs(cfg, max_seq)` by default, or graphs with the same inputs and outputs (the search's winners,
    which compute the same functions). Between them only memory moves: the token's embedding row, the views of
    the QKV projection's output, and the new k and v stored at the step's position of the static cache (the
    kv_append program's concatenation, at a position known only at run time). Its logits equal `Decoder`'s up
    to rounding: the check that the programs are the model. precision: "float64" or "native" (each op rounded
    to its tensor's dtype, bf16), as `superopt.interpret.run` takes."""

    def __init__(
        self, model: Model, programs: dict[str, KernelGraph] | None = None, precision: str = "float64"
    ) -> None:
        cfg = self.cfg = model.config
        progs = layer_programs(cfg, model.max_seq, model.fmt, model.head_fmt, model.mixed)
        self.programs = dict(progs) | (programs or {})
        self.precision, self.max_seq, self.device = precision, model.max_seq, torch.device("cpu")
        self.positions = torch.arange(self.max_seq)
        nh, nkv, d = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.embed = model.w("model.embed_tokens.weight")
        self.norm, self.lm_head = model.w("model.norm.weight")[None], head_inputs(model)
        self.layers = []
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            w = {n: model.w(p + n + ".weight") for n in ("input_layernorm", "post_attention_layernorm")}
            attn_in = {"gamma": w["input_layernorm"][None]} | program_weight(model, i, "wqkv")
            if cfg.qkv_bias:
                attn_in["bqkv"] = torch.cat([model.w(p + f"self_attn.{n}_proj.bias") for n in "qkv"])[None]
            rope = {}
            if cfg.qk_norm:
                q_norm, k_norm = model.w(p + "self_attn.q_norm.weight"), model.w(p + "self_attn.k_norm.weight")
                rope["gamma"] = torch.cat([q_norm.expand(nh, d), k_norm.expand(nkv, d)])
            self.layers.append(
                {
                    "attn_in": attn_in,
                    "qk_rope": rope,
                    "attn_out": program_weight(model, i, "wo"),
                    "mlp": {"gamma": w["post_attention_layernorm"][None]}
                    | program_weight(model, i, "wg")
                    | program_weight(model, i, "wu")
                    | program_weight(model, i, "wd"),
                }
            )
        cos, sin = rope_table(cfg, self.max_seq)
        self.cos, self.sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        dtype = torch.float64 if precision == "float64" else torch.bfloat16
        self.k_cache = torch.zeros(cfg.layers, nkv, d, self.max_seq, dtype=dtype)  # k transposed, as programs read it
        self.v_cache = torch.zeros(cfg.layers, nkv, self.max_seq, d, dtype=dtype)

    def call(self, name: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        return run(self.programs[name], inputs, self.precision)

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cfg, d, nh, nkv = self.cfg, self.cfg.head_dim, self.cfg.heads, self.cfg.kv_heads
        t, at = int(token), int(pos)
        x = self.embed[t][None]
        if cfg.gemma:
            (x,) = self.call("embed_scale", x=x)
        cos, sin = self.cos[at][None], self.sin[at][None]
        mask = torch.zeros(1, 1, self.max_seq).masked_fill(~attended(cfg, self.positions, pos), float("-inf"))
        for i, lw in enumerate(self.layers):
            (qkv,) = self.call("attn_in", h=x, **lw["attn_in"])
            qk, v = qkv[0, : (nh + nkv) * d].reshape(nh + nkv, d), qkv[0, (nh + nkv) * d :].reshape(nkv, d)
            (qk,) = self.call("qk_rope", qk=qk, cos=cos, sin=sin, **lw["qk_rope"])
            self.k_cache[i, :, :, at], self.v_cache[i, :, at] = qk[nh:], v
            q = qk[:nh].reshape(nkv, cfg.group, d)
            (a,) = self.call("attention", q=q, k=self.k_cache[i], v=self.v_cache[i], mask=mask)
            (x,) = self.call("attn_out", a=a.reshape(1, nh * d), h=x, **lw["attn_out"])
            (x,) = self.call("mlp", h=x, **lw["mlp"])
        logits, _ = self.call("lm_head", h=x, gamma=self.norm, **self.lm_head)  # and the token, its argmax
        return logits[0].float()
