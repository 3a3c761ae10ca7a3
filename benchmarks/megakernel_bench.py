"""The megakernel on a GPU: by default Llama-3.2-1B and Qwen3-0.6B shapes (--models: any examples/models specs),
random bf16 weights, batch 1, 32-token prompt, 128 new tokens (docs/workloads.md, "Decoder models").

For each model it builds and runs the megakernel, then checks, each phase on its own (a failure is recorded and
the rest still runs):
  tiny check      the tiny test models (examples/models/tiny-*.yaml) on the GPU against the CPU replay of the
                  same task list: tokens equal up to the first bf16 near tie, logits within bf16 rounding
  correctness     the greedy tokens against transformers' model of the spec's type on the same weights
                  (LlamaForCausalLM, Qwen2ForCausalLM, ... built from the config; nothing downloaded),
                  teacher-forced on the megakernel's sequence: per step, the token is HF's argmax or a near tie
                  (HF's margin between the two tokens within twice the largest logit difference at that step); the
                  same against the bf16 reference decoder; and the first step where free-running HF greedy
                  decoding differs, if any
  timing          us per decode step (prefill excluded) of the megakernel, HF eager, HF with a static cache, HF
                  with a static cache and torch.compile (reduce-overhead), and a CUDA-graph-captured torch decode
                  (superopt's bf16 reference decoder), in the same run; the floor = weight (+ KV) bytes over the
                  measured copy bandwidth

    pip install -e . --no-deps --no-build-isolation      # once: superopt.kernels maps to kernels/
    python benchmarks/megakernel_bench.py --out results/megakernel

Writes OUT/megakernel.json (every number, the tokens, the build report, errors) and OUT/megakernel.md (the
table), and prints the table last.

With --precision bf16,int8,int4 (any of them, comma separated) it times each model at each precision instead,
in the same run: the projections' and the LM head's weights quantized at load (round to nearest, groups of
--group), the embedding bf16 (a tied model's gather reads the bf16 table, its LM head GEMV the quantized copy).
Per precision: us per step, the floor at that precision (the bytes its tasks stream: packed weights with their
scales, the LM head's included, plus the KV cache, over the measured copy bandwidth) and its
fraction, and against the bf16 megakernel teacher-forced on the same tokens, the logits' relative error and
how often its greedy token is the bf16 one (top-1 agreement). The tiny check then also runs each quantized
precision (and int4 asymmetric) against the CPU replay. Peers, in the same run, each decoding the same prompt
and number of tokens in superopt's torch decode step compiled by torch.compile (--peer-compile-mode; none with
--no-compile) and replayed in a CUDA graph, with gpt-fast's weight-only linears in plain torch
(kernels/megakernel/bench.py; torchao is not needed): bf16, the step as it is; int8, gpt-fast's
WeightOnlyInt8Linear on the megakernel's own int8 weights and groups (torch_int8) and gpt-fast's own
per-output-channel quantization of the bf16 weights (torch_int8_per_channel: fewer scales, other weights, so its
tokens may differ); int4, gpt-fast's WeightOnlyInt4Linear (tinygemm, aten._weight_int4pack_mm) on the
megakernel's int4 weights repacked (torch_int4_tinygemm; "unavailable: why" where this torch lacks the op or the
group). Per peer: us per step, the megakernel's us over the peer's (below 1: the megakernel is faster), its
tokens and the first step where they differ from the megakernel's. --no-peers times the megakernel alone.

    python benchmarks/megakernel_bench.py --out results/megakernel_quant --models llama-3.2-1b,qwen3-0.6b \
        --precision bf16,int8,int4 --group 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from superopt.cache import Cache
from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.megakernel import (
    GpuMegakernel,
    Hang,
    agrees_with_replay,
    benchmark,
    prompt_tokens,
    replay,
    time_megakernel,
    timing_table,
)
from superopt.kernels.megakernel.bench import (
    PeerUnavailable,
    copy_bandwidth,
    first_divergence,
    kv_bytes,
    precision_peers,
    step_weight_bytes,
    time_cuda_graph_decode,
)
from superopt.model import Model, WeightFormat, load_model, load_spec, quantize_model, weight_format
from superopt.model_search import search_model, unverified_lowering
from superopt.pipeline import Settings, device_spec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"


def run_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments every megakernel benchmark takes: where to write, which models, prompt and decode lengths."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="llama-3.2-1b,qwen3-0.6b")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    return ap


def start(out: Path) -> tuple[Callable[[str], None], dict[str, Any]]:
    """Exits (status 2) without a CUDA device; makes the output folder; a log that prints seconds since now; the
    results document's header."""
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - t0:6.1f}s {msg}", flush=True)

    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": [],
    }
    return log, doc


def planned_programs(
    name: str, cache_dir: Path | None, budget: float | None, device: str
) -> tuple[dict[str, KernelGraph] | None, str]:
    """The winners of the model's cached plan (as `superopt search MODEL --device DEVICE --cache-dir DIR` stored
    it, with the same versions of torch and triton: they are part of the key; re-verified as the cache reads
    them), and what they are; without a cache folder, None: the layer programs themselves. A plan that is not
    cached is an error (nothing is searched here)."""
    if cache_dir is None:
        return None, "the layer programs (no plan)"
    spec = load_spec(MODELS / f"{name}.yaml")
    settings = Settings.merged(spec.search_settings, budget_s=budget, device=device)
    planned = search_model(spec, settings, Cache(cache_dir), "require-hit", device_spec(device).sm_count)
    if planned.status != "hit":
        raise RuntimeError(f"{name}: {planned.note}")
    why = unverified_lowering(planned)
    if why is not None:
        raise RuntimeError(f"{name}: {why}")
    return planned.winners(), f"plan {planned.key[:16]} (hit, its lowering verified)"


def tiny_check(
    log: Callable[[str], None], plans: Callable[[str], tuple[Any, str]], formats: dict[str, WeightFormat] | None = None
) -> dict:
    """The tiny models on the GPU against the CPU replay of the same task list (same SM count): the task bodies
    lowered from the plan's winners (`plans`), also with one KV split over cached positions 8 at a time
    (attention's chunk loop); tokens equal up to the first bf16 near tie, logits within bf16 rounding
    (megakernel.agrees_with_replay). `formats`: quantized weight formats to check as well, by label (the layer
    programs' bodies: a plan is for bf16 weights), on the models whose sizes their group divides."""
    out: dict[str, Any] = {}
    variants = {"default": {}, "splits1_cap8": {"kv_splits": 1, "kv_cap": 8}}
    for name in sorted(p.stem for p in MODELS.glob("tiny-*.yaml")):
        base = load_model(MODELS / f"{name}.yaml")
        prompt = prompt_tokens(base.config.vocab, 6, seed=1)
        try:
            programs, what = plans(name)
        except RuntimeError as e:  # no plan for this software: record it, check the rest
            out[f"{name}/programs"] = f"error: {e}"
            continue
        out[f"{name}/programs"] = what
        cases = [(label, kw, base, programs) for label, kw in variants.items()]
        for label, fmt in (formats or {}).items():
            try:
                cases.append((label, {}, quantize_model(base, fmt), None))
            except SuperoptError as e:  # a size the group does not divide (tiny-qwen2's 96)
                out[f"{name}/{label}"] = {"skipped": str(e)}
        for label, kw, model, programs in cases:
            try:
                mk = GpuMegakernel(model, programs=programs, **kw)
                gpu = mk.generate(prompt, 20)
                cpu = replay(model, mk.tg, prompt, 20, programs=programs)
                out[f"{name}/{label}"] = agrees_with_replay(gpu, cpu, len(prompt))
                out[f"{name}/{label}"]["tokens"] = gpu.tokens
                log(f"[tiny] {name} {label}: {out[f'{name}/{label}']}")
            except Hang as e:
                print(f"[tiny] {name}: {e}", flush=True)
                os._exit(3)
            except Exception as e:  # noqa: BLE001 (record and go on)
                out[f"{name}/{label}"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"[tiny] {name} {label}: FAILED: {traceback.format_exc()[-1500:]}")
    return out


def teacher_forced(mk: GpuMegakernel, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """The megakernel's logits at each generated position of `tokens` (after `prompt_len`), fed exactly those
    tokens: all but the last as the prompt, every step's logits kept (LOGIT_SLOTS is the KV-cache length)."""
    mk.reset(tokens[:-1])
    mk.launch(len(tokens) - 1)
    mk.wait()
    return mk.result(prompt_len, len(tokens) - prompt_len).logits


def time_peers(
    base: Model,
    model: Model,
    prompt: list[int],
    new_tokens: int,
    row: dict[str, Any],
    compile_mode: str | None,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """The precision's peers (bench.precision_peers), each timed by bench.time_cuda_graph_decode on the same prompt
    and number of new tokens, beside the megakernel's `row`: us per step, the megakernel's us over the peer's, its
    tokens and their first divergence from the megakernel's; "unavailable" with the reason where the peer cannot
    run here, "error" where it failed."""
    out: dict[str, dict[str, Any]] = {}
    prompt_len = len(prompt)
    for peer, build in precision_peers(base, model).items():
        res: dict[str, Any] = {"compile_mode": compile_mode}
        out[peer] = res
        t0 = time.time()
        try:
            us, tokens = time_cuda_graph_decode(model, prompt, new_tokens, build(), compile_mode)
        except PeerUnavailable as e:
            res["unavailable"] = str(e)
            log(f"[{model.name}] {row['precision']} {peer}: unavailable: {e}")
            continue
        except Exception as e:  # noqa: BLE001 (record and go on with the next peer)
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"[{model.name}] {row['precision']} {peer}: FAILED: {traceback.format_exc()[-1500:]}")
            continue
        finally:
            torch.cuda.empty_cache()
        res |= {"us_per_step": us, "tokens": tokens, "seconds": time.time() - t0}
        if "us_per_step" in row:
            res["megakernel_over_peer"] = row["us_per_step"] / us
        if "tokens" in row:
            res["first_divergence_vs_megakernel"] = first_divergence(row["tokens"], tokens, prompt_len)
        log(
            f"[{model.name}] {row['precision']} {peer}: {us:.1f} us/step, megakernel/peer "
            f"{res.get('megakernel_over_peer', float('nan')):.2f}, tokens first differ from the megakernel's at "
            f"step {res.get('first_divergence_vs_megakernel')} ({res['seconds']:.1f} s)"
        )
    return out


def precision_sweep(
    name: str,
    precisions: list[str],
    group: int,
    prompt_len: int,
    new_tokens: int,
    log: Callable[[str], None],
    peers: bool = True,
    compile_mode: str | None = "max-autotune-no-cudagraphs",
) -> list[dict[str, Any]]:
    """One model (random weights at its real size, drawn on the GPU) at each precision: built, run, timed; its
    floor at that precision (the weight bytes its tasks stream, bench.step_weight_bytes, and the KV cache, over the
    copy bandwidth); its logits against the bf16 megakernel's on its own tokens (teacher-forced); with `peers`,
    the precision's peers timed in the same run (time_peers; `compile_mode`: their torch.compile mode, None for
    none), after the megakernel's weights are freed."""
    spec = load_spec(MODELS / f"{name}.yaml")
    base = spec.load("cuda")
    prompt = prompt_tokens(base.config.vocab, prompt_len, seed=0)
    bw = copy_bandwidth()
    reference = GpuMegakernel(base)  # bf16: what each precision is compared with
    rows = []
    model = mk = None
    for precision in precisions:
        row: dict[str, Any] = {"model": name, "precision": precision, "copy_bandwidth_GBps": bw / 1e9}
        try:
            t0 = time.time()
            model = quantize_model(base, weight_format(precision, group))
            mk = reference if precision == "bf16" else GpuMegakernel(model)
            row["weights"] = model.fmt.describe()
            row["resources"] = mk.resources
            out = mk.generate(prompt, new_tokens)
            row["us_per_step"] = time_megakernel(mk, prompt, new_tokens)
            row["streamed_bytes"] = step_weight_bytes(mk.tg) + kv_bytes(model, prompt_len, new_tokens)
            row["floor_us"] = row["streamed_bytes"] / bw * 1e6
            row["fraction_of_floor"] = row["floor_us"] / row["us_per_step"]
            ref = teacher_forced(reference, out.tokens, prompt_len)
            row["logits_rel_error_vs_bf16"] = float((out.logits - ref).norm() / ref.norm())
            agree = ref.argmax(-1) == torch.tensor(out.tokens[prompt_len:])
            row["top1_agreement_vs_bf16"] = float(agree.float().mean())
            row["tokens"] = out.tokens
            log(
                f"[{name}] {precision}: {row['us_per_step']:.1f} us/step, floor {row['floor_us']:.1f} us "
                f"({row['fraction_of_floor']:.2f}), logits rel error vs bf16 {row['logits_rel_error_vs_bf16']:.2e}, "
                f"top-1 agreement {row['top1_agreement_vs_bf16']:.3f} ({time.time() - t0:.1f} s)"
            )
        except Hang:
            raise
        except Exception as e:  # noqa: BLE001 (record and go on with the next precision)
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"[{name}] {precision}: FAILED: {traceback.format_exc()[-1500:]}")
        if peers and model is not None:
            mk = None  # the megakernel's copy of the weights freed before the peers build theirs
            torch.cuda.empty_cache()
            row["peers"] = time_peers(base, model, prompt, new_tokens, row, compile_mode, log)
        rows.append(row)
        model = mk = None  # this precision's weights and kernel freed before the next is built (8B: 16 GB each)
        torch.cuda.empty_cache()
    return rows


def precision_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of precision_sweep's rows: the megakernel's line per model and precision, then its peers'
    (megakernel/peer: the megakernel's us over the peer's, below 1 where the megakernel is faster; floor/measured
    against the megakernel's floor at that precision; tokens: the first step where the peer's differ from the
    megakernel's, "=" where none does)."""
    lines = [
        "| model | precision | method | us/step | floor us | floor/measured | megakernel/peer "
        "| logits rel err vs bf16 | top-1 vs bf16 | tokens vs megakernel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "us_per_step" not in r:
            lines.append(f"| {r['model']} | {r['precision']} | megakernel | error: {r.get('error', '')[:80]} |||||||")
        else:
            lines.append(
                f"| {r['model']} | {r['precision']} | megakernel | {r['us_per_step']:.1f} | {r['floor_us']:.1f} | "
                f"{r['fraction_of_floor']:.2f} | | {r['logits_rel_error_vs_bf16']:.2e} | "
                f"{r['top1_agreement_vs_bf16']:.3f} | |"
            )
        for peer, p in r.get("peers", {}).items():
            head = f"| {r['model']} | {r['precision']} | {peer} |"
            if "us_per_step" not in p:
                why = f"unavailable: {p['unavailable']}" if "unavailable" in p else f"error: {p.get('error', '')}"
                lines.append(f"{head} {why[:120]} |||||||")
                continue
            floor = f"{r['floor_us'] / p['us_per_step']:.2f}" if "floor_us" in r else ""
            ratio = f"{p['megakernel_over_peer']:.2f}" if "megakernel_over_peer" in p else ""
            div = p.get("first_divergence_vs_megakernel", "")
            lines.append(f"{head} {p['us_per_step']:.1f} | | {floor} | {ratio} | | | {'=' if div is None else div} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = run_arguments(__doc__)
    ap.add_argument("--no-peers", action="store_true", help="time only the megakernel")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (its compile is slow)")
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--trace", action="store_true", help="also run a traced kernel: per-op wait and run times")
    ap.add_argument("--cache-dir", type=Path, help="the plans' cache (default: the layer programs, no plan)")
    ap.add_argument("--budget", type=float, default=None, help="the --budget the plans were searched with")
    ap.add_argument("--device", default="h100", help="the --device the plans were searched for")
    ap.add_argument(
        "--precision",
        help="comma list of bf16, int8, int4: time each model at each precision, with its peers (see the docstring)",
    )
    ap.add_argument(
        "--peer-compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode of the --precision peers' step (its CUDA graph is captured here; --no-compile: none)",
    )
    ap.add_argument("--group", type=int, default=128, help="input features a scale where --precision quantizes")
    args = ap.parse_args(argv)
    precisions = args.precision.split(",") if args.precision else []
    for p in precisions:
        weight_format(p, args.group)  # a bad name or group fails here, before any GPU work

    def plans(name: str) -> tuple[dict[str, KernelGraph] | None, str]:
        return planned_programs(name, args.cache_dir, args.budget, args.device)

    log, doc = start(args.out)
    try:
        import transformers

        doc["transformers"] = transformers.__version__
    except ImportError:
        doc["transformers"] = None
    if not args.no_tiny:
        formats = {p: weight_format(p, args.group) for p in precisions if p != "bf16"}
        if "int4" in formats:
            formats["int4_asymmetric"] = weight_format("int4", args.group, symmetric=False)
        doc["tiny"] = tiny_check(log, plans, formats)
    if precisions:
        doc["precision"] = []
        mode = None if args.no_compile else args.peer_compile_mode
        doc["peer_compile_mode"] = None if args.no_peers else mode
        for name in args.models.split(","):
            try:
                doc["precision"] += precision_sweep(
                    name, precisions, args.group, args.prompt_len, args.new_tokens, log, not args.no_peers, mode
                )
            except Hang as e:
                doc["precision"].append({"model": name, "error": f"hang: {e}"})
                (args.out / "megakernel.json").write_text(json.dumps(doc, indent=1))
                log(f"[{name}] {e}")
                os._exit(3)
            (args.out / "megakernel.json").write_text(json.dumps(doc, indent=1))
        table = precision_table(doc["precision"])
        (args.out / "megakernel.md").write_text(f"{doc['device']}, {doc['date']}\n\n{table}\n")
        print(table)
        return 0
    model = None
    for name in args.models.split(","):
        try:
            programs, what = plans(name)
            log(f"[{name}] task bodies from {what}")
            model = load_model(MODELS / f"{name}.yaml", device="cuda")
            peers, compile_peer = not args.no_peers, not args.no_compile
            r = benchmark(model, args.prompt_len, args.new_tokens, peers, compile_peer, log, args.trace, programs)
            r["programs"] = what
        except Hang as e:  # the GPU is stuck with the kernel: save what there is and leave
            doc["results"].append({"model": name, "errors": {"hang": str(e)}})
            (args.out / "megakernel.json").write_text(json.dumps(doc, indent=1))
            log(f"[{name}] {e}")
            os._exit(3)
        except Exception as e:  # noqa: BLE001
            r = {"model": name, "errors": {"load": f"{type(e).__name__}: {e}"}}
            log(f"[{name}] FAILED: {traceback.format_exc()[-1500:]}")
        doc["results"].append(r)
        (args.out / "megakernel.json").write_text(json.dumps(doc, indent=1))
        model = None  # the weights go before the next model's load
        torch.cuda.empty_cache()
    table = timing_table(doc["results"])
    (args.out / "megakernel.md").write_text(f"{doc['device']}, {doc['date']}\n\n{table}\n")
    for r in doc["results"]:
        for key in ("vs_hf", "vs_reference_bf16"):
            if key in r:
                v = r[key]
                log(
                    f"[{r['model']}] {key}: argmax agrees {v['argmax_agree']}/{v['steps']}, flips explained "
                    f"{v['all_explained']}, logits rel error {v['logits_rel_error']:.2e}, flips {v['flips'][:3]}"
                )
        if "first_divergence_vs_hf" in r:
            log(f"[{r['model']}] free-running vs HF greedy: first divergence at step {r['first_divergence_vs_hf']}")
        if r.get("trace"):
            log(f"[{r['model']}] trace: {json.dumps(r['trace'])}")
        for phase, err in r.get("errors", {}).items():
            log(f"[{r['model']}] error in {phase}: {err[:300]}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
