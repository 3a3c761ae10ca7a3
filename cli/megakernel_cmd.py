"""`superopt megakernel MODEL.yaml`: a decoder model as one persistent GPU kernel.

--emit DIR writes the generated CUDA source, the task graph (JSON) and the build report, and needs no GPU (the
task graph is built for the detected GPU's SM count, else --sms). On a GPU it builds the kernel, decodes
--new-tokens greedy tokens after a seeded random prompt, and checks the tokens and logits against the bf16
reference decoder on the same sequence; --bench adds the timing table beside HF transformers and a CUDA-graph
torch decode (kernels/megakernel/bench.py `benchmark`). A plan whose lowering to task bodies is not verified
equivalent is refused. --precision int8|int4 streams the projections' weights quantized (a bf16 checkpoint or
random weights quantized at load, round to nearest in groups of --group; a quantized checkpoint as stored) and
dequantizes them in registers; the LM head's weight is quantized the same way (a tied model's gather of the
token's embedding row keeps reading the bf16 table) unless --lm-head bf16 keeps it wide (a quantized checkpoint
that stores no quantized LM head keeps its head bf16). The build report says each GEMV kind's format
("lmhead: int4 g128").

--precision auto --error-budget E chooses a format per projection kind (QKV, O, gate/up, down and, unless
--lm-head bf16, the LM head; the same in every layer): the fewest bits whose relative output error against bf16,
measured on calibration rows from the bf16 reference decoder, stays within E in every layer (superopt/precision.py
defines the metric). The choice and every layer's int4 and int8 errors are printed and, with --emit, in
build_report.json ("precision").

--vram-budget GB plans the model within that much device memory (kernels/megakernel/memplan.py): which weights
stay resident, which stream each step from pinned host memory through a ring of device buffers, the ring's depth,
where the KV cache lives, and the step time predicted at --h2d-gbps. The plan is printed, and with --emit written
to build_report.json ("memory_plan"). The runtime does not stream yet: a plan that streams anything is not run
(without --emit, or with --bench, that is an error before any search); a plan where everything fits runs as
without a budget.
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
from superopt.kernels.device import DEVICES, detect
from superopt.kernels.megakernel import benchmark, build_report, report_lines, source, timing_table
from superopt.kernels.megakernel.memplan import H2D_GBPS, NOT_RUNNABLE, MemoryPlan, plan_memory, workspace_bytes
from superopt.model import (
    BF16,
    LM_HEADS,
    PRECISIONS,
    Model,
    ModelSpec,
    WeightFormat,
    load_spec,
    quantize_mixed,
    quantize_model,
    weight_format,
)
from superopt.model_search import search_model, unverified_lowering
from superopt.pipeline import SETTING_CHECKS
from superopt.precision import Choice, choose_precision
from superopt.serialize import write_atomic
from superopt.spec import check_positive_finite

H100_SMS = 132
MAX_SMS = 1024  # far above any GPU's; the task graph grows with it
DEFAULT_GROUP = 128


def resolve_format(where: str, stored: WeightFormat, precision: str | None, group: int | None) -> WeightFormat:
    """The projections' format: --precision (default: how the checkpoint stores them), bf16 weights quantized
    in groups of --group (default DEFAULT_GROUP); a quantized checkpoint's weights are used as stored, so another
    int precision or group is refused (it would requantize), and bf16 runs on their dequantized values."""
    if precision is None:
        precision = stored.precision
    if group is not None and precision == "bf16":
        raise SuperoptError(
            f"{where}: --group {group} quantizes, but the precision is bf16 (add --precision int8|int4)"
        )
    if precision == "bf16":
        return BF16
    if stored.quantized:
        if precision != stored.precision or group not in (None, stored.group):
            raise SuperoptError(
                f"{where}: its checkpoint stores the projections {stored.describe()}; --precision {precision}"
                f"{f' --group {group}' if group else ''} would requantize them (leave both out, or give a bf16 "
                "checkpoint)"
            )
        return stored
    return weight_format(precision, group or DEFAULT_GROUP)


def auto_precision(
    ms: ModelSpec, model: Model | None, budget: float | None, group: int | None, lm_head: str, device: str
) -> tuple[Model, Choice]:
    """--precision auto: the formats chosen per projection kind within --error-budget (superopt/precision.py), and
    the model quantized to them; the bf16 weights (the checkpoint's, else random, drawn on `device`)."""
    if budget is None:
        raise SuperoptError(f"{ms.name}: --precision auto needs --error-budget E (a relative output error, e.g. 0.05)")
    bf16 = model if model is not None else ms.load(device)
    choice = choose_precision(bf16, budget, group or DEFAULT_GROUP, lm_head)
    return quantize_mixed(bf16, choice.formats), choice


def resolve_head(fmt: WeightFormat, stored_head: WeightFormat | None, lm_head: str) -> WeightFormat:
    """The LM head's format: `fmt` (the projections') with --lm-head same, bf16 with --lm-head bf16 or bf16
    projections. `stored_head`: a quantized checkpoint's LM head as stored, used as stored where `fmt` is the
    checkpoint's format (bf16 where it stores none: nothing is requantized); None for bf16 weights (quantized at
    load with the projections)."""
    if lm_head == "bf16" or not fmt.quantized:
        return BF16
    return fmt if stored_head is None else stored_head


def memory_plan(
    name: str, tg: taskgraph.TaskGraph, max_seq: int, budget_gb: float | None, h2d_gbps: float | None, gpu: bool
) -> MemoryPlan | None:
    """The plan under --vram-budget (None without one), priced with this GPU's bandwidth and hop (an H100's
    without a GPU or for one not in the device table) and --h2d-gbps."""
    if budget_gb is None:
        if h2d_gbps is not None:
            raise SuperoptError(f"{name}: --h2d-gbps prices a memory plan: add --vram-budget GB")
        return None
    device = (detect() if gpu else None) or DEVICES["h100"]
    try:
        return plan_memory(
            tg.config,
            tg.fmt,
            tg.head_fmt,
            round(budget_gb * 1e9),
            max_seq,
            workspace_bytes(tg, max_seq, max_seq),  # the emitted source's logit slots: max_seq
            h2d_gbps=h2d_gbps or H2D_GBPS,
            dram_gbps=device.dram_bytes_per_s / 1e9,
            hop_us=device.launch_overhead_us,
            mixed=tg.mixed,
        )
    except SuperoptError as e:
        raise SuperoptError(f"{name}: --vram-budget {budget_gb:g} GB: {e}") from None


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
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS + ("auto",)),
    help="The projections' weights: bf16, or int8 / int4 with a bf16 scale a group, dequantized in registers "
    "(default: the checkpoint's own; bf16 for a bf16 checkpoint or random weights); auto: per projection kind, "
    "the fewest bits within --error-budget.",
)
@click.option(
    "--error-budget",
    type=Checked("error budget", float, check_positive_finite),
    help="With --precision auto: the largest relative output error (against bf16, on calibration inputs) a "
    "projection kind's format may have in any layer.",
)
@click.option(
    "--group",
    type=click.IntRange(1),
    help="Input features a scale where --precision quantizes bf16 weights (default 128; must divide each "
    "projection's input features).",
)
@click.option(
    "--lm-head",
    type=click.Choice(LM_HEADS),
    default="same",
    show_default=True,
    help="The LM head's weights: the projections' precision and group (same), or kept bf16.",
)
@click.option(
    "--vram-budget",
    type=Checked("budget", float, check_positive_finite),
    help="GB (10^9 bytes) of device memory: plan which weights stay resident and which stream from host memory "
    "(printed; in build_report.json with --emit). A plan that streams cannot run yet.",
)
@click.option(
    "--h2d-gbps",
    type=Checked("bandwidth", float, check_positive_finite),
    help=f"Host-to-device GB/s the memory plan predicts with (default {H2D_GBPS:g}; give the measured one).",
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
    precision: str | None,
    error_budget: float | None,
    group: int | None,
    lm_head: str,
    vram_budget: float | None,
    h2d_gbps: float | None,
    offline: bool,
    cache_dir: Path | None,
) -> None:
    """Build MODEL.yaml's decoder as one persistent kernel from its plan (cached, or searched now: see `superopt
    search MODEL.yaml`): emit it, or run and check it on the GPU."""
    ms = load_spec(spec)
    gpu = torch.cuda.is_available()
    n_sms = sms or (torch.cuda.get_device_properties(0).multi_processor_count if gpu else H100_SMS)
    model = ms.load() if ms.weights is not None else None  # a checkpoint says how its weights are stored
    choice = None
    if precision == "auto":
        model, choice = auto_precision(ms, model, error_budget, group, lm_head, "cuda" if gpu else "cpu")
        for line in choice.lines():
            click.echo(line)
        fmt, head = BF16, model.head_fmt
    elif error_budget is not None:
        raise SuperoptError(f"{ms.name}: --error-budget chooses formats: it needs --precision auto")
    else:
        fmt = resolve_format(str(spec), model.fmt if model is not None else BF16, precision, group)
        stored_head = model.head_fmt if model is not None and model.fmt.quantized else None
        head = resolve_head(fmt, stored_head, lm_head)
    mixed = choice.formats if choice is not None else None
    # before any search: what the megakernel cannot build
    tg = taskgraph.build(ms.config, n_sms, fmt=fmt, head=head, mixed=mixed)
    plan = memory_plan(ms.name, tg, ms.max_seq, vram_budget, h2d_gbps, gpu)
    if plan is not None:
        for line in plan.lines():
            click.echo(line)
        if plan.streams and (emit_dir is None or bench):
            raise SuperoptError(
                f"{ms.name}: the plan under --vram-budget {vram_budget:g} GB reads weights from host memory each "
                f"step; running it on the GPU is {NOT_RUNNABLE} (--emit DIR writes the plan)"
            )
    settings = settings_for(spec, ms.search_settings, {"budget_s": budget_s})
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    mode = "offline" if offline else "search"
    planned = search_model(ms, settings, Cache(cache_dir), mode, n_sms, "none", say, fmt, head, mixed)
    say(planned.note)
    why = unverified_lowering(planned)
    if why is not None:
        raise SuperoptError(f"{ms.name}: {why}")
    programs = planned.winners()
    results = {name: o.result for name, o in planned.programs.items() if o.result is not None}
    lowering = planned.lowering_json()
    if emit_dir is not None:
        weights = "mixed: per projection kind (precision)" if choice is not None else fmt.describe()
        report = {"model": ms.name, "plan": planned.key, "plan_status": planned.status, "weights": weights}
        report["lm_head_weights"] = head.describe()
        report["kinds"] = build_report(tg, results, programs, lowering if isinstance(lowering, dict) else None)
        if choice is not None:
            report["precision"] = choice.to_json()
        if plan is not None:
            report["memory_plan"] = plan.to_json()
        try:
            text = source(tg, ms.name, ms.max_seq, ms.max_seq, programs=programs)
            write_atomic(emit_dir / "megakernel.cu", text)
            write_atomic(emit_dir / "taskgraph.json", json.dumps(tg.to_json()))
            write_atomic(emit_dir / "build_report.json", json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise SuperoptError(f"{emit_dir}: cannot write: {e.strerror or e}") from None
        for line in report_lines(report["kinds"]):
            click.echo(line)
        click.echo(f"weights: {tg.weights_summary()}")
        click.echo(
            f"{ms.name}: {len(tg.tasks)} tasks a step on {n_sms} SMs, {len(tg.counters)} counters; "
            f"wrote {emit_dir}/megakernel.cu, taskgraph.json, build_report.json"
        )
        if plan is not None and plan.streams:
            say(f"{ms.name}: not run: the plan reads weights from host memory, {NOT_RUNNABLE}")
            return
        if not gpu:
            return
    if not gpu:
        raise SuperoptError("no CUDA GPU here: --emit DIR writes the kernel without one")
    if prompt_len + new_tokens - 1 > ms.max_seq:
        raise SuperoptError(f"{spec}: {prompt_len + new_tokens - 1} positions exceed max_seq {ms.max_seq}")
    if choice is None:
        model = quantize_model(model, fmt, lm_head) if model is not None else ms.load("cuda", fmt, lm_head)
    if any(g.fmt != model.format_of(op) for op, g in tg.gemv.items()):  # what was built and emitted is what runs
        raise SuperoptError(f"{ms.name}: the model's weights are not stored as the task graph packs them")
    say(f"weights: {tg.weights_summary()}")
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
