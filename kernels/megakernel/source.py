"""The megakernel's CUDA C++ source: the constants of a model and task graph, the workspace accessors, the device
prelude, the embedding's scale generated from its layer program (kernels/cuda_codegen.py), the GEMV helpers, the
task bodies lowered from the plan's winners (lowering.py: the GEMVs; attention.py: attention's steps), the
attention skeleton and the persistent kernel (the .cuh files beside this module); and the build report, which
says per task kind which layer programs it computes, and which program its body is lowered from: the winner, or
the layer program where the winner does not lower, and why."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from superopt.ir import KernelGraph, identifier
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import emit_elementwise
from superopt.kernels.megakernel.attention import AttentionBody, emit_attention
from superopt.kernels.megakernel.bodies import TASK_PROGRAMS, lower
from superopt.kernels.megakernel.layout import NCONSUMERS, STAMP_NAMES, WORKSPACE, smem_plan, workspace_layout
from superopt.kernels.megakernel.lowering import KIND, Stage, emit_stage
from superopt.kernels.taskgraph import TaskGraph
from superopt.result import Result
from superopt.serialize import graph_hash


@cache
def cuda(name: str) -> str:
    """The CUDA source file `name`.cuh of this package: prelude (types, bf16, memory ordering, counters), gemv
    (the GEMV over the weight ring and the vectors it reads), attention (the split-KV attention skeleton) or
    kernel (the persistent kernel and its loader)."""
    return resources.files(__package__).joinpath(f"{name}.cuh").read_text()


def source(
    tg: TaskGraph,
    name: str,
    max_seq: int,
    logit_slots: int,
    trace: bool = False,
    kv_cap: int | None = None,
    programs: dict[str, KernelGraph] | None = None,
) -> str:
    """The whole CUDA C++ source of the megakernel for a model (its name, KV-cache length) and task graph;
    `trace` records each task's STAMP_NAMES times (%globaltimer, ns) in the last step; attention holds `kv_cap`
    cached positions in shared memory (None: as many as fit, see smem_plan). `programs`: the layer programs'
    verified search winners by name (superopt/model_search.py; default: the layer programs themselves), from which
    the task bodies are lowered (bodies.lower)."""
    c = tg.config
    lay = workspace_layout(tg, max_seq, logit_slots)
    sp = smem_plan(tg, max_seq, kv_cap)
    lowering = lower(tg, programs)
    progs = lowering.sources
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
        "SLOT": tg.slot_bytes,
        "NSLOTS": sp["slots"],
        "XS_ELEMS": sp["xs_elems"],
        "STAMPS": len(STAMP_NAMES),
        "WINDOW": c.sliding_window or 0,  # attends the last WINDOW positions (0: all)
    }
    consts |= {f"RC_{op.upper()}": g.chunk for op, g in tg.gemv.items()}
    lines = [f"// superopt megakernel: {identifier(name)} ({c.arch}), {tg.n_sms} SMs, {len(tg.tasks)} tasks a step"]
    lines += [f"constexpr int {k} = {v};" for k, v in consts.items()]
    flags = {"QK_NORM": c.qk_norm, "EMBED_SCALE": "embed_scale" in progs}
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
    if "embed_scale" in progs:
        lines.append("// The embedding's scale, generated from its layer program by kernels/cuda_codegen.py:")
        lines.append(emit_elementwise(progs["embed_scale"], "embed_scale"))
    else:
        lines.append("__device__ __forceinline__ float embed_scale(float x) { return x; }  // (no embed_scale)")
    lines.append(cuda("gemv"))
    attn = lowering.bodies["attn"]
    assert isinstance(attn, AttentionBody)
    lines.append(emit_attention(attn))
    lines.append(cuda("attention"))
    lines.append("// The GEMV task bodies:")
    for kind in KIND:
        stage = lowering.bodies[kind]
        assert isinstance(stage, Stage)
        lines.append(emit_stage(KIND[kind], stage))
    lines.append(cuda("kernel"))
    return "\n".join(lines)


def build_report(
    tg: TaskGraph,
    results: dict[str, Result] | None = None,
    programs: dict[str, KernelGraph] | None = None,
    lowering: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per task kind: its tasks and tiling, the layer programs it computes with their hashes, and, from the
    plan's `results` (each program's search result, by name), each program's winner, verification and predicted
    time; `weights`: a GEMV kind's weight format (tg.fmt for the projections, tg.head_fmt for the LM head);
    `lowered_from`: the program its body is lowered from (`programs`, the winners, as `source` lowers them:
    "winner", or "program" and why the winner does not lower); `lowering`: each program's lowering verified
    against it (model_search.validate_lowering, as JSON)."""
    low = lower(tg, programs)
    rows = []
    for op in taskgraph.OPS:
        plan = tg.gemv.get(op)
        row: dict[str, Any] = {"kind": op, "tasks": len(tg.by_op(op))}
        if plan is not None:
            row["tiling"] = {"rows": plan.tile, "k": plan.k, "chunks": plan.chunks, "chunk_bytes": plan.chunk_bytes}
            row["weights"] = plan.fmt.describe()  # the LM head's: the projections' format, or bf16 kept wide
        computes = []
        for name in (n for n in TASK_PROGRAMS[op] if n in low.sources):
            result = (results or {}).get(name)
            entry: dict[str, Any] = {
                "program": name,
                "program_hash": result.program_hash if result is not None else graph_hash(low.sources[name]),
                "lowered_from": "program" if name in low.fallbacks or name not in (programs or {}) else "winner",
            }
            if name in low.fallbacks:
                entry["winner_not_lowered"] = low.fallbacks[name]
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
            if name in (lowering or {}):
                entry["lowering_verification"] = (lowering or {})[name]
            computes.append(entry)
        row["computes"] = computes
        body = low.bodies[op]
        row["body"] = "generated"  # every kind's body is lowered from a program
        if op == "argmax":
            row["generated_from"] = "lm_head's argmax: the LM head tasks' maxima combined"
        elif isinstance(body, Stage):
            kind = KIND[op]
            row["generated_from"] = f"{kind.program} (stage {kind.stage})" + (
                ", embed_scale" if op == "qkv" and "embed_scale" in low.sources else ""
            )
        else:
            row["generated_from"] = "qk_rope (head steps), kv_append, attention (score steps; split-KV softmax)"
        rows.append(row)
    return rows


def report_lines(report: list[dict[str, Any]]) -> list[str]:
    """The build report, a line a task kind."""
    lines = []
    for row in report:
        t = row.get("tiling")
        tiling = f", {t['rows']} rows of {t['k']} a task in {t['chunks']} chunk(s)" if t else ""
        tiling += f", weights {row['weights']}" if "weights" in row else ""
        names = []
        for c in row["computes"]:
            what = (
                f"{c.get('winner_hash', c['program_hash'])[:12]}, {c['verification']['method']}"
                if "verification" in c
                else f"{c['program_hash'][:12]}, not searched"
            )
            if "winner_not_lowered" in c:
                what += f"; lowered from the program: the winner does not lower: {c['winner_not_lowered']}"
            names.append(f"{c['program']} ({what})")
        lines.append(
            f"{row['kind']}: {row['tasks']} tasks{tiling}; computes {', '.join(names)}; "
            f"body generated from {row['generated_from']}"
        )
    return lines
