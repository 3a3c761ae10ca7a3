"""Each task kind's body: lowered from the plan's programs (the GEMV kinds' stages, lowering.py; attention's
steps, attention.py) or the hand-written template, and why."""

from __future__ import annotations

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.megakernel.attention import AttentionBody, lower_attention
from superopt.kernels.megakernel.lowering import KINDS, Stage, lower_kinds
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
    bodies["argmax"] = "the argmax over the LM head's tiles is hand-written"
    return bodies
