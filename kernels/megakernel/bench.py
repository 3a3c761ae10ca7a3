"""The megakernel beside its references and peers on a GPU: HF transformers' model on the same weights (tokens
teacher-forced, logits compared), the bf16 reference decoder, and the timings of HF eager, static cache,
torch.compile and a CUDA-graph torch decode in the same run (benchmarks/megakernel_bench.py drives it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.megakernel.replay import Generation
from superopt.kernels.megakernel.runtime import GpuMegakernel, Hang, cuda_time_us, time_megakernel
from superopt.kernels.megakernel.source import build_report
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import Decoder, Model, inv_freq


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


@torch.no_grad()
def time_cuda_graph_decode(model: Model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """The reference decoder in bf16 (superopt/model.py), one step captured in a CUDA graph that also takes the
    argmax and advances the position; us per replayed step, and its greedy tokens."""
    dec = Decoder(model, "bfloat16", "cuda")
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

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    k_save, v_save = dec.k_cache.clone(), dec.v_cache.clone()
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

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
    us = cuda_time_us(lambda: [graph.replay() for _ in range(new_tokens)], 3, restart) / new_tokens
    return us, tokens


def step_weight_bytes(tg: TaskGraph) -> int:
    """Bytes of weights one decode step reads: bf16, the config's count (ModelConfig.weight_bytes); quantized
    weights, what the GEMV tasks stream (packed values with their scales and zeros: the projections' and the LM
    head's, or the bf16 LM head where it is kept wide) and the norm weights and the token's embedding row (a tied
    model's quantized LM head is streamed beside the bf16 table it gathers that row from)."""
    c = tg.config
    if not tg.fmt.quantized and not tg.head_fmt.quantized:
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
        res["weights"] = mk.tg.fmt.describe()
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
                out = phase(f"time_hf_{mode}", lambda mode=mode: time_hf(state["hf"], prompt, new_tokens, mode))
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
