"""The megakernel's CPU replay: the same task list as the GPU runs, the per-SM lists interleaved under the
counter protocol (an adversarial order by default: the latest runnable task first), each task body in torch with
the kernel's rounding (the bodies through the reference interpreter of the programs they are lowered from),
and every read checked against the step that wrote its elements, so a missing wait shows up as a stale read."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from superopt.errors import SuperoptError
from superopt.interpret import TorchEval, evaluate
from superopt.ir import KernelGraph, Op
from superopt.kernels import taskgraph
from superopt.kernels.megakernel.attention import AttentionBody, run_head, run_score
from superopt.kernels.megakernel.bodies import lower
from superopt.kernels.megakernel.layout import packed_weights, small_params, unpack_chunks
from superopt.kernels.megakernel.lowering import KIND, Stage, run_stage
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import Model, QuantizedWeight
from superopt.ops import TensorType

INDEX = TensorType((), "float32")  # an argmax's result


def rbf(x: torch.Tensor) -> torch.Tensor:
    """Rounds float32 values to bf16 and back (the kernel's f2bf/bf2f)."""
    return x.to(torch.bfloat16).float()


class StaleRead(SuperoptError):
    """A task read data not yet written in its step: a dependency the counters do not enforce."""


@dataclass
class Generation:
    tokens: list[int]
    logits: torch.Tensor  # [generated positions, vocab]: the logits each generated token came from


def replay(
    model: Model,
    tg: TaskGraph,
    prompt: list[int],
    new_tokens: int,
    seed: int | None = None,
    launches: int = 2,
    programs: dict[str, KernelGraph] | None = None,
) -> Generation:
    """Runs the task list on the CPU: prefill and generation as decode steps over `launches` launches, the SMs
    interleaved under the counter protocol (seed None: always the runnable task latest in the step, so a
    consumer runs as soon as its waits allow; else a seeded random runnable SM). Raises StaleRead for a read of
    data its step has not written, SuperoptError for a deadlock. The tasks run the bodies lowered from `programs`
    (the winners the source was emitted from, as `source` lowers them) by the reference interpreter's rules
    (lowering.run_stage, attention.run_head and run_score)."""
    c = tg.config
    steps_total = len(prompt) + new_tokens - 1
    if steps_total > model.max_seq:
        raise SuperoptError(f"megakernel: {steps_total} positions exceed the KV cache ({model.max_seq})")
    for op, plan in tg.gemv.items():  # bf16 tasks run on a quantized model's dequantized weights
        if plan.fmt.quantized and plan.fmt != model.format_of(op):
            what = "the LM head" if op == "lmhead" else f"the {op} projections"
            raise SuperoptError(
                f"replay: the task graph packs {what} {plan.fmt.describe()}, the model stores them "
                f"{model.format_of(op).describe()}"
            )
    packed = packed_weights(model, tg)
    weights = {k: v if tg.gemv[k[0]].fmt.quantized else v.float() for k, v in packed.items()}
    small = {k: v.float() for k, v in small_params(model).items()}
    embed = model.w("model.embed_tokens.weight").float()
    lowering = lower(tg, programs)
    bodies, progs = lowering.bodies, lowering.sources
    native = TorchEval("native")
    buf = {name: torch.zeros(size) for name, size in tg.buffers.items()}
    written = {name: torch.full((size,), -1) for name, size in tg.buffers.items()}
    kcache = torch.zeros(c.layers, c.kv_heads, model.max_seq, c.head_dim)
    vcache = torch.zeros_like(kcache)
    kv_step = torch.full(kcache.shape[:3], -1)
    tokens = list(prompt) + [0] * new_tokens
    logits = torch.zeros(new_tokens, c.vocab)
    counters = [0] * len(tg.counters)
    rng = random.Random(seed)

    def check_read(r: taskgraph.Region, g: int, pos: int) -> None:
        """Same-step reads need this step's data; the token needs the previous step's; the KV cache needs each
        earlier position written at its own step (per element, which the per-head region does not resolve)."""
        if r.buffer.startswith("kv."):
            seen = kv_step[int(r.buffer[3:]), r.lo, :pos]
            ok = bool((seen == torch.arange(pos)).all())
        else:
            ok = bool((written[r.buffer][r.lo : r.hi] == (g - 1 if r.prev else g)).all())
        if not ok:
            raise StaleRead(f"replay: step {g} reads {r.buffer}[{r.lo}:{r.hi}] before it is written")

    def write(name: str, lo: int, values: torch.Tensor, g: int) -> None:
        buf[name][lo : lo + len(values)] = values
        written[name][lo : lo + len(values)] = g

    def epilogue(name: str, *args: torch.Tensor) -> torch.Tensor:
        return evaluate(progs[name], [a.to(torch.bfloat16) for a in args], native)[0].float()

    def combined(i: int) -> torch.Tensor:
        """The split-KV combine of layer i's attention partials: the attention output, in bf16."""
        part = buf[f"part.{i}"].view(tg.kv_splits, c.heads, taskgraph.PART_HEAD + c.head_dim)
        w = torch.exp(part[:, :, 0] - part[:, :, 0].amax(0))
        outs = part[:, :, taskgraph.PART_HEAD :]
        return rbf((outs * w[..., None]).sum(0) / (part[:, :, 1] * w).sum(0)[:, None]).reshape(-1)

    def source(name: str, i: int, h_in: torch.Tensor) -> torch.Tensor:
        """lowering.KINDS's sources of layer i, as the kernel's CUDA_SOURCES read them."""
        if name == "h_in":
            return h_in
        if name == "attn":
            return combined(i)
        if name == "hmlp_last":
            return buf[f"hmlp.{c.layers - 1}"]
        if name in ("hattn", "act"):
            return buf[f"{name}.{i}"]
        return small[name] if name == "gfinal" else small[name][i]

    def generated(t: taskgraph.Task, stage: Stage, g: int, h_in: torch.Tensor) -> None:
        kind, plan, i = KIND[t.op], tg.gemv[t.op], t.layer
        vectors = {v: source(kind.sources[v], i, h_in)[None] for v in stage.vectors}
        rows = {v: source(kind.sources[v], i, h_in)[None, t.row0 : t.row0 + t.nrows] for v in stage.rows}
        units: list[torch.Tensor | QuantizedWeight]
        if plan.fmt.quantized:  # the task's chunks, read back as the GPU reads its ring slots
            tile = unpack_chunks(weights[(t.op, t.layer)].view(plan.tiles, plan.tile_bytes)[t.tile], plan)
            units = [QuantizedWeight(*_rows(tile, u * t.nrows, (u + 1) * t.nrows)) for u in range(plan.unit)]
        else:
            w = weights[(t.op, t.layer)].view(plan.tiles, plan.tile * plan.unit, plan.k)[t.tile]
            units = [w[u * t.nrows : (u + 1) * t.nrows] for u in range(plan.unit)]
        y = run_stage(stage, vectors, rows, units)[0]
        if stage.argmax:  # this task's part of the split argmax: its rows' maximum and its index
            write("logits", t.row0, y, g)
            k = int(native.op(Op("argmax", ("y",), ("k",), {"dim": 0, "keepdim": False}), [y], INDEX))
            write("lmpart", 2 * t.tile, torch.tensor([y[k], float(t.row0 + k)]), g)
        else:
            write(f"{kind.output}.{i}", t.row0, y, g)

    def run(t: taskgraph.Task, g: int, pos: int) -> None:
        for r in t.reads:
            check_read(r, g, pos)
        i, d = t.layer, c.head_dim
        if i == 0:
            h_in = epilogue("embed_scale", embed[tokens[pos]]) if c.gemma else embed[tokens[pos]]
        else:
            h_in = buf[f"hmlp.{i - 1}"]  # the LM head's (layer L): the last layer's output
        if t.op in KIND:
            generated(t, bodies[t.op], g, h_in)  # type: ignore[arg-type]
        elif t.op == "attn":
            qkv, kv, grp = buf[f"qkv.{i}"], t.head, c.group
            q = qkv[kv * grp * d : (kv + 1) * grp * d].view(grp, d)
            k = qkv[(c.heads + kv) * d : (c.heads + kv + 1) * d]
            v = qkv[(c.heads + c.kv_heads + kv) * d : (c.heads + c.kv_heads + kv + 1) * d]
            cs, sn = small["cos"][pos], small["sin"][pos]
            body = bodies["attn"]
            assert isinstance(body, AttentionBody)
            # qk_rope's steps on the q heads and k, the rows of the program; the halves of a RoPE row repeat
            gamma = torch.stack([*[small["gq"][i]] * grp, small["gk"][i]]) if c.qk_norm else None
            heads = run_head(body, torch.cat([q, k[None]]), gamma, torch.cat([cs, cs])[None], torch.cat([sn, sn])[None])
            q, k = heads[:grp], heads[grp]
            if t.split == 0:
                kcache[i, kv, pos], vcache[i, kv, pos], kv_step[i, kv, pos] = k, v, g
            first = max(0, pos + 1 - c.sliding_window) if c.sliding_window else 0
            n = pos + 1 - first
            per = -(-n // tg.kv_splits)
            p0 = first + min(n, t.split * per)
            p1 = min(pos + 1, p0 + per)
            keys = torch.cat([kcache[i, kv, :pos], k[None]])[p0:p1]
            vals = torch.cat([vcache[i, kv, :pos], v[None]])[p0:p1]
            out = torch.zeros(grp, taskgraph.PART_HEAD + d)  # max, sum, pad, outputs
            out[:, 0] = -1e30
            if p1 > p0:
                s = run_score(body, q @ keys.T)
                out[:, 0] = s.amax(-1)
                e = torch.exp(s - out[:, :1])
                out[:, 1], out[:, taskgraph.PART_HEAD :] = e.sum(-1), e @ vals
            write(f"part.{i}", (t.split * c.kv_heads + kv) * out.numel(), out.reshape(-1), g)
        else:  # argmax over the tiles' maxima: the lowest index among equal values
            vals, idx = buf["lmpart"][0::2], buf["lmpart"][1::2]
            token = int(idx[vals == vals.max()].min())
            write("token", 0, torch.tensor([float(token)]), g)
            if pos + 1 >= len(prompt):
                tokens[pos + 1] = token
                logits[pos + 1 - len(prompt)] = buf["logits"]  # what the host reads back after the step

    # Launch boundaries: the steps split into `launches` launches, each running the SM lists from the top.
    bounds = [round(steps_total * k / launches) for k in range(launches + 1)]
    for first, last in zip(bounds, bounds[1:]):
        where = [[first if ids else last, 0] for ids in tg.sm_tasks]  # each SM's (global step, index in its list)
        while True:
            ready = []
            for sm, (g, k) in enumerate(where):
                if g == last:
                    continue
                t = tg.tasks[tg.sm_tasks[sm][k]]
                if all(counters[cid] >= (g + 1 - off) * len(tg.counters[cid].producers) for cid, off in t.waits):
                    ready.append((g, t.id, sm))
            if not ready:
                if all(g == last for g, _ in where):
                    break
                raise SuperoptError("replay: deadlock: no SM can run its next task")
            g, tid, sm = max(ready) if seed is None else rng.choice(ready)
            run(tg.tasks[tid], g, g)
            for cid in tg.tasks[tid].signals:
                counters[cid] += 1
            where[sm][1] += 1
            if where[sm][1] == len(tg.sm_tasks[sm]):
                where[sm] = [g + 1, 0]
    return Generation(tokens, logits)


def _rows(w: QuantizedWeight, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return w.q[lo:hi], w.scale[lo:hi], None if w.zero is None else w.zero[lo:hi]


def agrees_with_replay(gpu: Generation, cpu: Generation, prompt_len: int) -> dict[str, Any]:
    """The GPU's tokens and logits against the CPU replay's: logits within a bf16 ulp of the largest up to and at
    the first token that differs (both computed from the same sequence), and there the replay's own margin between
    the two tokens within twice the largest logit difference, a bf16 near tie that float summation order decides;
    after it the sequences differ, so nothing after it is compared."""
    n = len(cpu.logits)
    flip = next((i for i in range(n) if gpu.tokens[prompt_len + i] != cpu.tokens[prompt_len + i]), None)
    upto = n if flip is None else flip + 1
    diff = float((gpu.logits[:upto] - cpu.logits[:upto]).abs().max())
    ok = diff <= 2**-6 * float(cpu.logits[:upto].abs().max())
    if flip is not None:
        mine, theirs = gpu.tokens[prompt_len + flip], cpu.tokens[prompt_len + flip]
        ok = ok and float(cpu.logits[flip, theirs] - cpu.logits[flip, mine]) <= 2 * diff
    return {"ok": ok, "first_flip": flip, "max_logit_diff": diff}
