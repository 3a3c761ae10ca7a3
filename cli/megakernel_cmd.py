"""`superopt megakernel MODEL.yaml`: a decoder model as one persistent GPU kernel.

--emit DIR writes the generated CUDA source, the task graph (JSON) and the build report, and needs no GPU (the
task graph is built for the detected GPU's SM count, else --sms). On a GPU it builds the kernel, decodes
--new-tokens greedy tokens after a seeded random prompt, and checks the tokens and logits against the bf16
reference decoder on the same sequence; --bench adds the timing table beside HF transformers and a CUDA-graph
torch decode (kernels/megakernel/bench.py `benchmark`). A plan whose lowering to task bodies is not verified
equivalent is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from superopt.cache import Cache
from superopt.cli.errors import Checked, Folder, reports_errors
from superopt.cli.search_cmd import settings_for
from superopt.errors import SuperoptError
from superopt.kernels import taskgraph
from superopt.kernels.megakernel import benchmark, build_report, report_lines, source, timing_table
from superopt.model import load_spec
from superopt.model_search import search_model, unverified_lowering
from superopt.pipeline import SETTING_CHECKS
from superopt.serialize import write_atomic

H100_SMS = 132
MAX_SMS = 1024  # far above any GPU's; the task graph grows with it


@click.command("megakernel")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--prompt-len", type=click.IntRange(2), default=32, show_default=True, help="Tokens of the seeded random prompt."
)
@click.option("--new-tokens", type=click.IntRange(2), default=128, show_default=True, help="Greedy tokens to generate.")
@click.option("--bench", is_flag=True, help="Time it beside HF eager, static cache, torch.compile, CUDA graphs.")
@click.option("--emit", "emit_dir", type=Folder(), help="Write source and graph.")
@click.option(
    "--sms",
    type=click.IntRange(1, MAX_SMS),
    default=None,
    help="SMs to schedule for with --emit (default: this GPU's, or 132).",
)
@click.option(
    "--budget",
    "budget_s",
    type=Checked("budget", float, SETTING_CHECKS["budget_s"]),
    help="Search time per layer program where the plan is not cached (default: the spec's, else 120).",
)
@click.option("--offline", is_flag=True, help="Never search: without a cached plan, the unfused layer programs.")
@click.option("--cache-dir", type=Folder(), help="Cache folder (default: $SUPEROPT_CACHE_DIR or ~/.cache/superopt).")
@reports_errors
def megakernel_command(
    spec: Path,
    prompt_len: int,
    new_tokens: int,
    bench: bool,
    emit_dir: Path | None,
    sms: int | None,
    budget_s: float | None,
    offline: bool,
    cache_dir: Path | None,
) -> None:
    """Build MODEL.yaml's decoder as one persistent kernel from its plan (cached, or searched now: see `superopt
    search MODEL.yaml`): emit it, or run and check it on the GPU."""
    ms = load_spec(spec)
    gpu = torch.cuda.is_available()
    n_sms = sms or (torch.cuda.get_device_properties(0).multi_processor_count if gpu else H100_SMS)
    tg = taskgraph.build(ms.config, n_sms)  # before any search: says what the megakernel cannot build
    settings = settings_for(spec, ms.search_settings, {"budget_s": budget_s})
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    planned = search_model(ms, settings, Cache(cache_dir), "offline" if offline else "search", n_sms, "none", say)
    say(planned.note)
    why = unverified_lowering(planned)
    if why is not None:
        raise SuperoptError(f"{ms.name}: {why}")
    programs = planned.winners()
    results = {name: o.result for name, o in planned.programs.items() if o.result is not None}
    lowering = planned.lowering_json()
    if emit_dir is not None:
        report = {"model": ms.name, "plan": planned.key, "plan_status": planned.status}
        report["kinds"] = build_report(tg, results, programs, lowering if isinstance(lowering, dict) else None)
        try:
            text = source(tg, ms.name, ms.max_seq, ms.max_seq, programs=programs)
            write_atomic(emit_dir / "megakernel.cu", text)
            write_atomic(emit_dir / "taskgraph.json", json.dumps(tg.to_json()))
            write_atomic(emit_dir / "build_report.json", json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise SuperoptError(f"{emit_dir}: cannot write: {e.strerror or e}") from None
        for line in report_lines(report["kinds"]):
            click.echo(line)
        click.echo(
            f"{ms.name}: {len(tg.tasks)} tasks a step on {n_sms} SMs, {len(tg.counters)} counters; "
            f"wrote {emit_dir}/megakernel.cu, taskgraph.json, build_report.json"
        )
        if not gpu:
            return
    if not gpu:
        raise SuperoptError("no CUDA GPU here: --emit DIR writes the kernel without one")
    if prompt_len + new_tokens - 1 > ms.max_seq:
        raise SuperoptError(f"{spec}: {prompt_len + new_tokens - 1} positions exceed max_seq {ms.max_seq}")
    model = ms.load("cuda")
    res = benchmark(model, prompt_len, new_tokens, bench, bench, say, programs=programs)
    click.echo(f"tokens: {res.get('tokens', [])[prompt_len:]}")
    for key in ("vs_reference_bf16", "vs_hf"):
        if key in res:
            v = res[key]
            click.echo(
                f"{key}: argmax agrees {v['argmax_agree']}/{v['steps']} (near ties explained: {v['all_explained']}), "
                f"logits rel error {v['logits_rel_error']:.2e}"
            )
    if bench:
        click.echo(timing_table([res]))
    if res["errors"]:
        raise SuperoptError(f"{ms.name}: failed phases: {', '.join(res['errors'])}")
