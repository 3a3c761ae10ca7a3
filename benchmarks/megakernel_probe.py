"""Megakernel tuning probe: variants of each model's megakernel (KV splits) built and timed in one run, each checked
against the bf16 reference decoder, and one traced step per model with every task's wait, prologue and run times.

The `unsafe_*` variants size what a dependency hop costs: the consumer op's tasks do not wait for the producer
op of their layer (`DROPPED`), so they read data their step may not have written. Their tokens are wrong by
construction; only their time means something: what fusing the two ops into one task could save at most.

First the tiny models on the GPU against the CPU replay (megakernel_bench.tiny_check).

    python benchmarks/megakernel_probe.py --out results/megakernel_probe

Writes OUT/probe.json (timings, token agreement, trace summaries), OUT/trace_MODEL.json (per task: id, SM, op,
layer, start, dependencies met, prologue done, done, in us) and OUT/probe.md (the table, printed last).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from megakernel_bench import run_arguments, start, tiny_check

from superopt.kernels import taskgraph
from superopt.kernels.megakernel import (
    GpuMegakernel,
    Hang,
    prompt_tokens,
    time_megakernel,
    versus_reference_bf16,
)
from superopt.model import load_model

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
VARIANTS = {
    "default": {},
    "splits1": {"kv_splits": 1},
    "splits2": {"kv_splits": 2},
    "splits8": {"kv_splits": 8},
}
DROPPED = {
    "unsafe_down_skips_gateup": [("down", "gateup")],
    "unsafe_oproj_skips_attn": [("oproj", "attn")],
    "unsafe_both": [("down", "gateup"), ("oproj", "attn")],
}


BUILD = taskgraph.build


def without_waits(dropped: list[tuple[str, str]]) -> Callable[..., taskgraph.TaskGraph]:
    """taskgraph.build, then each (consumer, producer) in `dropped`: the consumer op's tasks stop waiting for the
    producer op's (sizing only: see the module doc)."""

    def build(*args: Any, **kw: Any) -> taskgraph.TaskGraph:
        tg = BUILD(*args, **kw)
        for consumer, producer in dropped:
            for t in tg.by_op(consumer):
                t.waits = [w for w in t.waits if tg.tasks[tg.counters[w[0]].producers[0]].op != producer]
        return tg

    return build


def main(argv: list[str]) -> int:
    ap = run_arguments(__doc__)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join([*VARIANTS, *DROPPED])}")
    args = ap.parse_args(argv)
    log, doc = start(args.out)
    try:
        doc["tiny"] = tiny_check(log, lambda name: (None, "the layer programs (no plan)"))
        for name in args.models.split(","):
            model = load_model(MODELS / f"{name}.yaml", device="cuda")
            prompt = prompt_tokens(model.config.vocab, args.prompt_len, seed=0)
            for label in args.variants.split(","):
                if label in DROPPED:
                    taskgraph.build = without_waits(DROPPED[label])  # type: ignore[assignment]
                try:
                    mk = GpuMegakernel(model, **VARIANTS.get(label, {}))
                finally:
                    taskgraph.build = BUILD
                out = mk.generate(prompt, args.new_tokens)
                us = time_megakernel(mk, prompt, args.new_tokens)
                row = {"model": name, "variant": label, "us_per_step": us, "resources": mk.resources}
                if label not in DROPPED:  # their tokens mean nothing (and may not be tokens: NaN logits)
                    row["vs_reference_bf16"] = versus_reference_bf16(model, out, args.prompt_len)
                doc["results"].append(row)
                log(f"[{name}] {label}: {us:.1f} us/step, {row.get('vs_reference_bf16', '(unsafe)')}, {mk.resources}")
                del mk
            mk = GpuMegakernel(model, trace=True)
            mk.generate(prompt, args.new_tokens)
            summary = mk.trace_summary()
            doc[f"trace_{name}"] = summary
            (args.out / f"trace_{name}.json").write_text(json.dumps(mk.trace_rows()))
            log(f"[{name}] trace: {json.dumps(summary)}")
            del mk, model
            torch.cuda.empty_cache()
    except Hang as e:
        log(str(e))
        (args.out / "probe.json").write_text(json.dumps(doc, indent=1))
        os._exit(3)
    (args.out / "probe.json").write_text(json.dumps(doc, indent=1))
    lines = ["| model | variant | us/step | argmax = bf16 reference | flips near ties |", "|---|---|---|---|---|"]
    for r in doc["results"]:
        vs = r.get("vs_reference_bf16", {"argmax_agree": "-", "steps": "-", "all_explained": "- (unsafe)"})
        row = [r["model"], r["variant"], f"{r['us_per_step']:.1f}", f"{vs['argmax_agree']}/{vs['steps']}"]
        lines.append("| " + " | ".join(row + [str(vs["all_explained"])]) + " |")
    table = f"{doc['device']}, {doc['date']}, torch {doc['torch']}\n\n" + "\n".join(lines)
    (args.out / "probe.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
