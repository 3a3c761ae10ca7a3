"""The megakernel's CUDA C++ source: the constants of a model and task graph, the workspace accessors, the device
prelude, the elementwise device functions generated from the layer programs (kernels/cuda_codegen.py), the
hand-written templates, the task bodies lowered from the plan's winners (lowering.py: the GEMVs; attention.py:
attention's steps), the attention skeleton and the persistent kernel (the .cuh files beside this module); and
the build report, which says per task kind which layer programs it computes and whether its body is generated or
a template, and why."""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from typing import Any

from superopt.ir import KernelGraph, identifier
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import emit_elementwise
from superopt.kernels.megakernel.attention import AttentionBody, emit_attention
from superopt.kernels.megakernel.bodies import task_bodies
from superopt.kernels.megakernel.layout import NCONSUMERS, STAMP_NAMES, WORKSPACE, smem_plan, workspace_layout
from superopt.kernels.megakernel.lowering import KIND, Stage, emit_stage
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import layer_programs
from superopt.result import Result
from superopt.serialize import graph_hash


@cache
def cuda(name: str) -> str:
    """The CUDA source file `name`.cuh of this package: prelude (types, bf16, memory ordering, counters),
    templates (the hand-written task bodies), attention (the split-KV attention skeleton) or kernel (the persistent
    kernel and its loader)."""
    return resources.files(__package__).joinpath(f"{name}.cuh").read_text()


def source(
    tg: TaskGraph,
    name: str,
    max_seq: int,
    logit_slots: int,
    trace: bool = False,
    kv_cap: int | None = None,
    programs: dict[str, KernelGraph] | None = None,
    templates: bool = False,
) -> str:
    """The whole CUDA C++ source of the megakernel for a model (its name, KV-cache length) and task graph;
    `trace` records each task's STAMP_NAMES times (%globaltimer, ns) in the last step; attention holds `kv_cap`
    cached positions in shared memory (None: as many as fit, see smem_plan). `programs`: the layer programs'
    verified search winners by name (superopt/model_search.py; default: the layer programs themselves), from which
    the GEMV task bodies are lowered (kernels/megakernel/lowering.py) where their stages lower; `templates`: the
    hand-written bodies instead (the baseline)."""
    c = tg.config
    lay = workspace_layout(tg, max_seq, logit_slots)
    sp = smem_plan(tg, max_seq, kv_cap)
    progs = layer_programs(c) | (programs or {})
    consts = {
        "HID": c.hidden,
        "INTER": c.intermediate,
        "NH": c.heads,
        "NKV": c.kv_heads,
        "HD": c.head_dim,
        "GRP": c.group,
        "QKV": c.qkv_rows,
        "VOCAB": c.vocab,
        "NLAYER": c.layers,
        "SPLITS": tg.kv_splits,
        "MAXSEQ": max_seq,
        "LOGIT_SLOTS": logit_slots,
        "LM_TILES": tg.gemv["lmhead"].tiles,
        "NCONSUMERS": NCONSUMERS,
        "KV_CAP": sp["kv_cap"],
        "PART_HEAD": taskgraph.PART_HEAD,
        "PART": tg.buffers["part.0"],
        "SLOT": taskgraph.SLOT_BYTES,
        "NSLOTS": sp["slots"],
        "XS_ELEMS": sp["xs_elems"],
        "STAMPS": len(STAMP_NAMES),
        "WINDOW": c.sliding_window or 0,  # attends the last WINDOW positions (0: all)
    }
    consts |= {f"RC_{op.upper()}": g.chunk for op, g in tg.gemv.items()}
    lines = [f"// superopt megakernel: {identifier(name)} ({c.arch}), {tg.n_sms} SMs, {len(tg.tasks)} tasks a step"]
    lines += [f"constexpr int {k} = {v};" for k, v in consts.items()]
    lines += [
        f"constexpr float EPS = {c.eps!r}f;",
        f"constexpr float SCALE = {1 / math.sqrt(c.head_dim)!r}f;",
    ]
    flags = {"QK_NORM": c.qk_norm, "QKV_BIAS": c.qkv_bias, "GEMMA_NORM": c.gemma, "EMBED_SCALE": "embed_scale" in progs}
    flags["TRACE"] = trace
    lines += [f"constexpr bool {k} = {'true' if v else 'false'};" for k, v in flags.items()]
    lines += [f"constexpr unsigned long long OFF_{k.upper()} = {off};" for k, (off, _) in lay.items()]
    lines.append(cuda("prelude"))
    for name, buf in WORKSPACE.items():
        args = "unsigned char* ws" + (f", {buf.params}" if buf.params else "")
        add = f" + {buf.offset}" if buf.offset else ""
        ty = buf.ctype
        lines.append(
            f"__device__ __forceinline__ {ty}* ws_{name}({args}) {{ return ({ty}*)(ws + OFF_{name.upper()}){add}; }}"
        )
    lines.append("// Epilogues generated from the layer programs (superopt/model.py) by kernels/cuda_codegen.py:")
    lines.append(emit_elementwise(progs["residual"], "residual"))
    lines.append(emit_elementwise(progs["mlp_act"], "mlp_act"))
    if "embed_scale" in progs:
        lines.append(emit_elementwise(progs["embed_scale"], "embed_scale"))
    else:
        lines.append("__device__ __forceinline__ float embed_scale(float x) { return x; }  // (no embed_scale)")
    lines.append(cuda("templates"))
    bodies = task_bodies(tg, progs, templates)
    why = "--templates" if templates else "not lowered"
    attn = bodies["attn"]
    lines.append(emit_attention(attn) if isinstance(attn, AttentionBody) else "\n".join((
        f"__device__ __forceinline__ void attn_head(float (&r)[HD / 32], const u16* g, const u16* cst, float* row) "
        f"{{ template_attn_head(r, g, cst, row); }}  // {why}",
        f"__device__ __forceinline__ float attn_score(float s) {{ return template_attn_score(s); }}  // {why}",
    )))  # fmt: skip
    lines.append(cuda("attention"))
    lines.append("// The GEMV task bodies:")
    for kind in KIND:
        stage = bodies[kind]
        body = f"{{ template_{kind}(t, chunk); }}  // {why}"
        lines.append(emit_stage(KIND[kind], stage) if isinstance(stage, Stage) else
                     f"__device__ __forceinline__ void task_{kind}(const GemvTask& t, u32& chunk) {body}")  # fmt: skip
    lines.append(cuda("kernel"))
    return "\n".join(lines)


# The layer programs each task kind computes (superopt.model.layer_programs), from which their bodies are lowered
# (bodies.task_bodies).
TASK_PROGRAMS = {
    "qkv": ("embed_scale", "attn_in"),
    "attn": ("qk_rope", "kv_append", "attention"),
    "oproj": ("attn_out",),
    "gateup": ("mlp",),
    "down": ("mlp",),
    "lmhead": ("lm_head",),
    "argmax": ("lm_head",),
}


def build_report(
    tg: TaskGraph,
    results: dict[str, Result] | None = None,
    programs: dict[str, KernelGraph] | None = None,
    templates: bool = False,
    lowering: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per task kind: its tasks and tiling, the layer programs it computes with their hashes, and, from the
    plan's `results` (each program's search result, by name), each program's winner, verification and predicted
    time; `body`: "generated" (lowered from `programs`, the winners, as `source` lowers them) or "template",
    and why; `lowering`: each program's lowering verified against it (model_search.validate_lowering, as JSON),
    in the rows whose body is generated from it."""
    progs = layer_programs(tg.config) | (programs or {})
    bodies = task_bodies(tg, progs, templates)
    rows = []
    for op in taskgraph.OPS:
        plan = tg.gemv.get(op)
        row: dict[str, Any] = {"kind": op, "tasks": len(tg.by_op(op))}
        if plan is not None:
            row["tiling"] = {"rows": plan.tile, "k": plan.k, "chunks": plan.chunks, "chunk_bytes": plan.chunk_bytes}
        computes = []
        for name in (n for n in TASK_PROGRAMS[op] if n in progs):
            result = (results or {}).get(name)
            entry: dict[str, Any] = {
                "program": name,
                "program_hash": result.program_hash if result is not None else graph_hash(progs[name]),
            }
            if result is not None:
                entry |= {
                    "winner_hash": result.best.hash,
                    "winner_kernels": result.best.kernels,
                    "verification": result.best.verify.to_json(),
                    "predicted_us": result.best.predicted_us,
                    "measured_us": result.best_trial.measured_us if result.best_trial else None,
                    "fraction_of_floor": result.floor_us / result.best.predicted_us
                    if result.best.predicted_us
                    else None,
                }
            if name in (lowering or {}) and not isinstance(bodies[op], str):
                entry["lowering_verification"] = (lowering or {})[name]
            computes.append(entry)
        row["computes"] = computes
        body = bodies[op]
        row["body"] = "template" if isinstance(body, str) else "generated"
        if op == "argmax" and isinstance(body, Stage):
            row["generated_from"] = "lm_head (its argmax: the LM head tasks' maxima combined)"
        elif isinstance(body, Stage):
            kind = KIND[op]
            row["generated_from"] = f"{kind.program} (stage {kind.stage})"
            if op == "qkv" and "embed_scale" in progs:
                row["generated_from"] += ", embed_scale"
        elif isinstance(body, AttentionBody):
            row["generated_from"] = "qk_rope (head steps), kv_append, attention (score steps; split-KV softmax)"
        else:
            row["template_reason"] = body
        rows.append(row)
    return rows


def report_lines(report: list[dict[str, Any]]) -> list[str]:
    """The build report, a line a task kind."""
    lines = []
    for row in report:
        t = row.get("tiling")
        tiling = f", {t['rows']} rows of {t['k']} a task in {t['chunks']} chunk(s)" if t else ""
        names = ", ".join(
            f"{c['program']} ({c.get('winner_hash', c['program_hash'])[:12]}, {c['verification']['method']})"
            if "verification" in c
            else f"{c['program']} ({c['program_hash'][:12]}, not searched)"
            for c in row["computes"]
        )
        why = f" from {row['generated_from']}" if row["body"] == "generated" else f" ({row['template_reason']})"
        lines.append(f"{row['kind']}: {row['tasks']} tasks{tiling}; computes {names}; "
                     f"body: {row['body']}{why}")  # fmt: skip
    return lines
