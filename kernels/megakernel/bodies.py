"""Each task kind's body: lowered from the plan's programs (the GEMV kinds' stages, lowering.py; attention's
steps, attention.py) or the hand-written template, and why; and each lowering written back as a program
(`lowered_programs`), which translation validation (superopt/model_search.py) verifies against the program it
was lowered from before a megakernel is built from it."""

from __future__ import annotations

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.megakernel.attention import AttentionBody, attention_graph, head_graph, lower_attention
from superopt.kernels.megakernel.lowering import KINDS, Stage, lower_kinds, stages_graph
from superopt.kernels.taskgraph import TaskGraph

Body = Stage | AttentionBody | str  # a string: why the kind's body is its template


def task_bodies(tg: TaskGraph, progs: dict[str, KernelGraph], templates: bool = False) -> dict[str, Body]:
    """Each task kind's body lowered from its programs in `progs` (winners or the layer programs), or why it is
    a template (`templates`: all of them, the baseline the generated bodies are timed against)."""
    if templates:
        return {k: "--templates: the hand-written body" for k in [*(k.name for k in KINDS), "attn", "argmax"]}
    bodies: dict[str, Body] = dict(lower_kinds(progs, tg.gemv))
    try:
        bodies["attn"] = lower_attention(progs, tg.config)
    except SuperoptError as e:
        bodies["attn"] = str(e)
    lm = bodies["lmhead"]
    # The second half of lm_head's split argmax (the tasks' maxima combined), where its first half lowered.
    bodies["argmax"] = lm if isinstance(lm, Stage) else f"its first half, the LM head's, is not lowered: {lm}"
    return bodies


def lowered_programs(tg: TaskGraph, progs: dict[str, KernelGraph]) -> dict[str, KernelGraph]:
    """Each program some generated body is lowered from, by name, as the lowering computes it: its stages as one
    program (a program is lowered whole or not at all: the MLP's two stages together), attention's head steps
    (qk_rope) and its softmax with the generated score steps (attention)."""
    bodies = task_bodies(tg, progs)
    out: dict[str, KernelGraph] = {}
    for name in dict.fromkeys(k.program for k in KINDS):
        kinds = sorted((k for k in KINDS if k.program == name), key=lambda k: k.stage)
        stages = [bodies[k.name] for k in kinds]
        if all(isinstance(s, Stage) for s in stages):
            out[name] = stages_graph(progs[name], stages)  # type: ignore[arg-type]
    attn = bodies["attn"]
    if isinstance(attn, AttentionBody):
        out["qk_rope"] = head_graph(attn, progs["qk_rope"])
        out["attention"] = attention_graph(attn, progs["attention"])
    return out
