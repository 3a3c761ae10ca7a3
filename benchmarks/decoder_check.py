"""The reference decoder of each architecture against HF transformers' model of that type, on a GPU.

For each model spec (default: the tiny Qwen2, Gemma and Mistral test models and Qwen2.5-0.5B, Gemma-2B and
Mistral-7B at real size, random bf16 weights), superopt's bf16 reference decoder (superopt/model.py, the function
the layer programs are checked against) decodes greedily after a seeded prompt; transformers' model built from
the same config with the same weights (nothing downloaded) is teacher-forced on that sequence. Per step the token
must be HF's argmax or a bf16 near tie (HF's own margin between the two tokens within twice the largest logit
difference at that step); the logits' relative error and the first step where free-running HF greedy decoding
differs are recorded. No timing: this checks the definition of the model, not a kernel.

    pip install -e . --no-deps --no-build-isolation
    python benchmarks/decoder_check.py --out results/decoder_check

Writes OUT/decoder_check.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from superopt.kernels.megakernel import prompt_tokens
from superopt.kernels.megakernel.bench import compare, first_divergence, hf_model, teacher_forced_logits
from superopt.model import Decoder, load_model

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
DEFAULT = "tiny-qwen2,tiny-gemma,tiny-mistral,qwen2.5-0.5b,gemma-2b,mistral-7b"


def check(name: str, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    model = load_model(MODELS / f"{name}.yaml", device="cuda")
    prompt_len = min(prompt_len, model.max_seq // 3)  # the tiny models' caches are short
    new_tokens = min(new_tokens, model.max_seq - prompt_len)
    prompt = prompt_tokens(model.config.vocab, prompt_len, seed=0)
    tokens, logits = Decoder(model, "bfloat16", "cuda").generate(prompt, new_tokens)
    hf = hf_model(model)
    result = compare(tokens, logits, teacher_forced_logits(hf, tokens, prompt_len), prompt_len)
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        greedy = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0].tolist()
    result["first_divergence_vs_hf"] = first_divergence(tokens, greedy, prompt_len)
    result |= {"model": name, "arch": model.config.arch, "prompt_len": prompt_len}
    result["weight_GB"] = model.config.weight_bytes() / 1e9
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import transformers  # needed for the reference: fail here, before any model is built

    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": [],
    }
    for name in args.models.split(","):
        t0 = time.time()
        try:
            r = check(name, args.prompt_len, args.new_tokens)
        except Exception as e:  # noqa: BLE001 (record the model's failure, go on with the next)
            r = {"model": name, "error": f"{type(e).__name__}: {e}"[:2000]}
            print(traceback.format_exc()[-2000:], flush=True)
        r["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({k: v for k, v in r.items() if k != "flips"}), flush=True)
        doc["results"].append(r)
        (args.out / "decoder_check.json").write_text(json.dumps(doc, indent=1))
        torch.cuda.empty_cache()
    print(f"\n{doc['device']}, torch {doc['torch']}, transformers {doc['transformers']}, {doc['date']}")
    print("| model | arch | steps | argmax = HF | flips near ties | logits rel err | HF greedy diverges at |")
    print("|---|---|---|---|---|---|---|")
    for r in doc["results"]:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        print(
            f"| {r['model']} | {r['arch']} | {r['steps']} | {r['argmax_agree']} | {r['all_explained']} | "
            f"{r['logits_rel_error']:.2e} | {r['first_divergence_vs_hf']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
