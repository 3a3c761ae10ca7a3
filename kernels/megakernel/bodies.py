"""Each task kind's body, lowered from the plan's programs (the GEMV kinds' stages, lowering.py; attention's
steps, attention.py); and each lowering written back as a program (`lowered_programs`), which translation
validation (superopt/model_search.py) verifies against the program it was lowered from before a megakernel is
built from it.

A body is lowered from the plan's winner where the winner lowers, else from the layer program itself (which is
what the winner was verified against), and the report says why. A layer program that does not lower is a model
the megakernel cannot build: an error naming the task kind."""

from __future__ import annotations

from dataclasses import dataclass

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.megakernel.attention import AttentionBody, attention_graph, head_graph, lower_attention
from superopt.kernels.megakernel.lowering import KINDS, Stage, lower_kinds, stages_graph
from superopt.kernels.taskgraph import OPS, TaskGraph
from superopt.model import layer_programs

Body = Stage | AttentionBody

# The layer programs each task kind computes (superopt.model.layer_programs), from which its body is lowered.
TASK_PROGRAMS = {
    "qkv": ("embed_scale", "attn_in"),
    "attn": ("qk_rope", "kv_append", "attention"),
    "oproj": ("attn_out",),
    "gateup": ("mlp",),
    "down": ("mlp",),
    "lmhead": ("lm_head",),
    "argmax": ("lm_head",),
}


@dataclass
class Lowering:
    """Each task kind's body; the program each is lowered from, by layer program name (the winner, or the layer
    program where the winner does not lower); and, for those, why the winner did not."""

    bodies: dict[str, Body]
    sources: dict[str, KernelGraph]
    fallbacks: dict[str, str]


def _bodies(tg: TaskGraph, progs: dict[str, KernelGraph]) -> dict[str, Body | str]:
    """Each kind's body lowered from `progs`, or why it does not lower."""
    bodies: dict[str, Body | str] = dict(lower_kinds(progs, tg.gemv))
    try:
        bodies["attn"] = lower_attention(progs, tg.config)
    except SuperoptError as e:
        bodies["attn"] = str(e)
    lm = bodies["lmhead"]
    # The second half of lm_head's split argmax (the tasks' maxima combined), where its first half lowered.
    bodies["argmax"] = lm if isinstance(lm, Stage) else f"its first half, the LM head's, does not lower: {lm}"
    return bodies


def lower(tg: TaskGraph, programs: dict[str, KernelGraph] | None = None) -> Lowering:
    """The task bodies of `tg`'s kinds lowered from `programs` (the plan's winners by layer program name; default:
    the layer programs themselves), a winner that does not lower replaced by its layer program."""
    layer = layer_programs(tg.config, fmt=tg.fmt, head=tg.head_fmt, mixed=tg.mixed)
    sources = layer | (programs or {})
    fallbacks: dict[str, str] = {}
    bodies = _bodies(tg, sources)
    for kind, why in bodies.items():
        if isinstance(why, str):
            for name in TASK_PROGRAMS[kind]:
                if name in sources and sources[name] is not layer[name]:
                    sources[name] = layer[name]
                    fallbacks.setdefault(name, why)
    if fallbacks:
        bodies = _bodies(tg, sources)
    failed = next(((kind, why) for kind, why in bodies.items() if isinstance(why, str)), None)
    if failed is not None:
        raise SuperoptError(f"megakernel: the {failed[0]} task body does not lower from its layer program: {failed[1]}")
    return Lowering({k: bodies[k] for k in OPS}, sources, fallbacks)  # type: ignore[misc]


def lowered_programs(lowering: Lowering) -> dict[str, KernelGraph]:
    """Each program a body is lowered from, by name, as the lowering computes it: its stages as one program (a
    program is lowered whole: the MLP's two stages together), attention's head steps (qk_rope) and its softmax
    with the generated score steps (attention)."""
    out: dict[str, KernelGraph] = {}
    for name in dict.fromkeys(k.program for k in KINDS):
        kinds = sorted((k for k in KINDS if k.program == name), key=lambda k: k.stage)
        stages = [lowering.bodies[k.name] for k in kinds]
        out[name] = stages_graph(lowering.sources[name], stages)  # type: ignore[arg-type]
    attn = lowering.bodies["attn"]
    assert isinstance(attn, AttentionBody)
    out["qk_rope"] = head_graph(attn, lowering.sources["qk_rope"])
    out["attention"] = attention_graph(attn, lowering.sources["attention"])
    return out
