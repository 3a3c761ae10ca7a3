"""The megakernel's attention task body, lowered from the layer programs qk_rope, kv_append and attention (or
their verified winners).

An attention task takes one KV head and one split of the positions the query attends (split-KV decode):

- qk_rope's steps run on each head row of the task (its q heads and its k head alike): an op of the program on
  the row, elementwise but for rms_norm (a warp's sum over the row) and rope (an element and its partner half a
  row away). v's row passes through.
- kv_append must append the new k and v after the cached positions (a concat along the position dim): the task
  of split 0 writes them at `pos` of the cache.
- attention must be softmax attention: scores s = f(q . k) by elementwise steps f (the scale, the mask's add, a
  soft cap), then exp(s - max s) / sum exp(s - max s) times v. The rule for that pattern is split-KV online
  softmax: each task writes the (max, sum, unnormalized output) of its positions and the O projection's
  prologue combines the splits (the max-shifted softmax's standard rewrite, exact in real arithmetic). The score
  steps f are generated; the mask input is the attended positions' mask (0 there, -inf elsewhere), so a task
  visits only attended positions and f sees the mask's 0.

Rounding: qk_rope's ops round as the program says (a predefined op to its dtype; a graph-defined winner's inner
tiles stay float32, its outputs round). The attention program is one fused kernel: its scores, probabilities and
sums stay float32, and its output rounds to its dtype where the splits are combined.

`run_attention_steps` evaluates the steps by the reference interpreter's rules (the CPU replay); `emit_attention`
writes them as the CUDA device functions attn_head and attn_score the attention skeleton (attention.cuh) calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph, Op
from superopt.kernels.cuda_codegen import CUDA_EXPR
from superopt.kernels.megakernel.lowering import Step, _expand_block, _expr, _literal, _round, run_steps
from superopt.model import ModelConfig
from superopt.ops import OPS, TensorType

# What qk_rope's and attention's inputs are bound to: the task's head rows (q's heads, then k), the q/k norm's
# weight (a row per head: q_norm's for q's heads, k_norm's for k's), the position's RoPE row; the cached and new
# k and v, and the attended positions' mask.
HEAD_INPUTS = ("qk", "gamma", "cos", "sin")
ATTENTION_INPUTS = ("q", "k", "v", "mask")
HEAD_OPS = ("rms_norm", "rope")  # the head steps' row ops; every other step is elementwise (CUDA_EXPR)


@dataclass
class AttentionBody:
    """The attention task's generated parts: `head`, qk_rope's steps on one head row (`head_out` the rotated
    row; reads the program inputs HEAD_INPUTS by name), and `score`, the attention program's steps from the score
    q . k (`score_in`) to the logits its softmax reads (`score_out`)."""

    head: list[Step]
    head_out: str
    score: list[Step]
    score_in: str
    score_out: str


def lower_attention(progs: dict[str, KernelGraph], cfg: ModelConfig) -> AttentionBody:
    """The attention task's body from the programs qk_rope, kv_append and attention in `progs`; SuperoptError
    naming the program and op it cannot lower."""
    head, head_out = _head_steps(progs["qk_rope"], cfg)
    _check_kv_append(progs["kv_append"], cfg)
    score, score_in, score_out = _score_steps(progs["attention"], cfg)
    return AttentionBody(head, head_out, score, score_in, score_out)


def _head_steps(graph: KernelGraph, cfg: ModelConfig) -> tuple[list[Step], str]:
    what = graph.name
    rows, d = cfg.heads + cfg.kv_heads, cfg.head_dim
    expected = {"qk": (rows, d), "gamma": (rows, d), "cos": (1, d), "sin": (1, d)}
    for n in graph.inputs:
        if n not in expected or graph.tensors[n].shape != expected[n]:
            raise SuperoptError(f"{what}: input '{n}' {list(graph.tensors[n].shape)} is none of the head rows "
                                f"{list(expected['qk'])}, the q/k norm weights or the RoPE row [1, {d}]")  # fmt: skip
    if ("gamma" in graph.inputs) != cfg.qk_norm:
        raise SuperoptError(f"{what}: reads a q/k norm weight the model {'lacks' if not cfg.qk_norm else 'has unread'}")
    if len(graph.outputs) != 1 or graph.tensors[graph.outputs[0]].shape != (rows, d):
        raise SuperoptError(f"{what}: its output is not the {rows} rotated head rows of {d}")
    steps: list[Step] = []
    alias: dict[str, str] = {}
    computed: set[str] = set()

    def name(t: str) -> str:
        return alias.get(t, t)

    def step(op: str, inputs: tuple[str, ...], attrs: dict, out: str, ty: TensorType, rounds: bool = True) -> None:
        inputs = tuple(name(i) for i in inputs)
        if op == "accum_sum":  # a loop-free block's output: its value, rounded to the output's dtype
            at = next((k for k, s in enumerate(steps) if s.op.outputs[0] == inputs[0]), None)
            if at is not None:
                steps[at] = Step(steps[at].op, "head", ty.dtype)
            alias[out] = inputs[0]
            return
        if op not in CUDA_EXPR and op not in HEAD_OPS:
            raise SuperoptError(f"{what}: op '{op}' has no rule on an attention task's head rows")
        if op in HEAD_OPS and inputs[0] not in computed | {"qk"}:
            raise SuperoptError(f"{what}: {op} of '{inputs[0]}', which is not a head row")
        if op == "rope" and inputs[1:] != ("cos", "sin"):
            raise SuperoptError(f"{what}: rope's cos and sin are not the position's RoPE row")
        computed.add(out)
        steps.append(Step(Op(op, inputs, (out,), dict(attrs)), "head", ty.dtype if rounds else "float32"))

    for op in graph.ops:
        if op.block is None:
            step(op.op, op.inputs, op.attrs, op.outputs[0], graph.tensors[op.outputs[0]])
            continue
        block = op.block
        # A block of whole rows (its grid over the head rows only) computes a row op as the whole program does.
        if any(bi.fmap is not None or any(m not in (None, 0) for m in bi.imap) for bi in block.inputs) or any(
            bo.omap != (0,) for bo in block.outputs
        ):
            raise SuperoptError(f"{what}: graph-defined op '{op.outputs[0]}' does not tile whole head rows")
        _expand_block(graph, op, alias, step)
    out = name(graph.outputs[0])
    if out not in computed:
        raise SuperoptError(f"{what}: its output is not computed from the head rows")
    return steps, out


def _check_kv_append(graph: KernelGraph, cfg: ModelConfig) -> None:
    """kv_append must put the new k and v after the cached positions: what the task's write at `pos` does."""
    what = graph.name
    nkv, d = cfg.kv_heads, cfg.head_dim
    ops = [(op.op, op.inputs, op.attrs.get("dim"), op.block) for op in graph.ops]
    k_cat = ("concat", ("k_cache", "k"), 2, None)
    v_cat = ("concat", ("v_cache", "v"), 1, None)
    if sorted(ops, key=str) != sorted([k_cat, v_cat], key=str) or len(graph.outputs) != 2:
        raise SuperoptError(f"{what}: is not the concat of the cached and the new k and v along the positions")
    shapes = {n: graph.tensors[n].shape for n in graph.inputs}
    context = shapes["k_cache"][-1] + 1
    if shapes != {"k_cache": (nkv, d, context - 1), "k": (nkv, d, 1),
                  "v_cache": (nkv, context - 1, d), "v": (nkv, 1, d)}:  # fmt: skip
        raise SuperoptError(f"{what}: its k and v are not {nkv} heads of {d} (k transposed)")


def _score_steps(graph: KernelGraph, cfg: ModelConfig) -> tuple[list[Step], str, str]:
    what = graph.name
    nkv, g, d = cfg.kv_heads, cfg.group, cfg.head_dim
    if any(op.block is not None for op in graph.ops):
        raise SuperoptError(f"{what}: a graph-defined attention winner has no lowering rule (split-KV softmax "
                            "lowers the program's ops)")  # fmt: skip
    shapes = {n: graph.tensors[n].shape for n in graph.inputs}
    if sorted(shapes) != sorted(ATTENTION_INPUTS) or shapes["q"] != (nkv, g, d):
        raise SuperoptError(f"{what}: its inputs are not q [{nkv}, {g}, {d}], k, v and the mask")
    n = shapes["k"][-1]
    if (shapes["k"], shapes["v"], shapes["mask"]) != ((nkv, d, n), (nkv, n, d), (1, 1, n)):
        raise SuperoptError(f"{what}: k, v and the mask are not {nkv} heads over {n} positions")
    prod = {op.outputs[0]: op for op in graph.ops}
    used: list[Op] = []

    def producer(v: str, op: str, over_positions: bool = False) -> Op:
        p = prod.get(v)
        if p is None or p.op != op or (over_positions and (p.attrs["dim"] not in (2, -1) or not p.attrs["keepdim"])):
            raise SuperoptError(f"{what}: '{v}' is not the {op} of softmax attention (exp(s - max s) / sum, times v)")
        used.append(p)
        return p

    if len(graph.outputs) != 1:
        raise SuperoptError(f"{what}: has {len(graph.outputs)} outputs, softmax attention one")
    last = prod.get(graph.outputs[0])
    if last is not None and last.op == "matmul":  # softmax(s) @ v
        probs, v = producer(graph.outputs[0], "matmul").inputs
        e, total = producer(probs, "div").inputs
    else:  # (exp(s - max s) @ v) / sum
        u, total = producer(graph.outputs[0], "div").inputs
        e, v = producer(u, "matmul").inputs
    if v != "v":
        raise SuperoptError(f"{what}: the probabilities multiply '{v}', not v")
    (shifted,) = producer(e, "exp").inputs
    if producer(total, "sum", True).inputs != (e,):
        raise SuperoptError(f"{what}: the softmax's denominator is not the sum of its numerator")
    s, top = producer(shifted, "sub").inputs
    if producer(top, "max", True).inputs != (s,):
        raise SuperoptError(f"{what}: the softmax's shift is not the max of its scores")
    chain: list[Op] = []
    at = s
    while at in prod and prod[at].op != "matmul":  # the elementwise steps back to q . k
        op = prod[at]
        on_chain = [i for i in op.inputs if i in prod]
        if (
            op.op not in CUDA_EXPR
            or not OPS[op.op].elementwise
            or len(on_chain) != 1
            or any(i not in prod and i != "mask" for i in op.inputs)
        ):
            raise SuperoptError(f"{what}: op '{op.op}' on the scores is not elementwise in them and the mask")
        chain.insert(0, op)
        at = on_chain[0]
    if at not in prod or prod[at].inputs != ("q", "k"):
        raise SuperoptError(f"{what}: the scores are not q . k")
    used += chain + [prod[at]]
    extra = [op.op for op in graph.ops if op not in used]
    if extra:
        raise SuperoptError(f"{what}: ops {extra} are outside softmax attention's pattern")
    return [Step(op, "score", "float32") for op in chain], at, s


# --- the replay's interpretation ----------------------------------------------------------------------------


def run_head(body: AttentionBody, rows: torch.Tensor, gamma: torch.Tensor | None, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """qk_rope's steps on head `rows` [heads, d] (float32 holding bf16), `gamma` their norm weights [heads, d],
    `cos`, `sin` the position's RoPE row [1, d]; the rotated rows in float32."""
    env = {"qk": rows, "cos": cos, "sin": sin} | ({"gamma": gamma} if gamma is not None else {})
    run_steps(body.head, env)
    return env[body.head_out].float()


def run_score(body: AttentionBody, scores: torch.Tensor) -> torch.Tensor:
    """The score steps on q . k [heads, positions] at attended positions (the mask's 0 there), float32."""
    env = {body.score_in: scores, "mask": torch.zeros(1, scores.shape[-1])}
    run_steps(body.score, env)
    return env[body.score_out].float()


# --- the GPU's interpretation: CUDA -----------------------------------------------------------------------------


def emit_attention(body: AttentionBody) -> str:
    """`attn_head(r, g, cst, row)`: the head steps on one head's row, a lane's elements d = lane + 32 i in r
    (`g` its norm weight row, `cst` the RoPE row: cos then sin, HD / 2 each, whose halves the full row repeats;
    `row`: the head's scratch row in shared memory, where a RoPE pair spans two lanes); `attn_score(s)`: the
    score steps on one score."""
    lines = [
        "// attention's head and score steps, generated by kernels/megakernel/attention.py from qk_rope and",
        "// attention.",
        "__device__ __forceinline__ void attn_head(float (&r)[HD / 32], const u16* g, const u16* cst, float* row) {",
        "  constexpr int E = HD / 32;",
        "  const int lane = threadIdx.x & 31;",
        "  (void)g;",
        "  (void)row;",
    ]

    def each(*body: str, indent: str = "  ") -> list[str]:
        """A loop over the lane's elements i, d = lane + 32 i."""
        inner = [f"{indent}  {b}" for b in body]
        if len(body) == 1:
            return [f"{indent}#pragma unroll", f"{indent}for (int i = 0; i < E; ++i)", *inner]
        return [f"{indent}#pragma unroll", f"{indent}for (int i = 0; i < E; ++i) {{", *inner, f"{indent}}}"]

    names = {
        "qk": "r[i]",
        "gamma": "bf2f(g[lane + 32 * i])",
        "cos": "bf2f(cst[(lane + 32 * i) % (HD / 2)])",
        "sin": "bf2f(cst[HD / 2 + (lane + 32 * i) % (HD / 2)])",
    }
    for n, s in enumerate(body.head):
        x = names[s.op.inputs[0]]
        lines.append(f"  float h{n}[E];")
        if s.op.op == "rms_norm":
            eps = _literal(s.op.attrs.get("eps", 0.0))
            lines += [f"  float q{n} = 0.f;", *each(f"q{n} += {x} * {x};")]
            lines.append(f"  const float w{n} = rsqrtf(warp_sum(q{n}) / HD + {eps});")
            lines += each(f"h{n}[i] = {_round(s.dtype)}({x} * w{n});")
        elif s.op.op == "rope":  # x cos + rotate_half(x) sin: the partner d + HD / 2 (mod HD) is in this lane
            xi = x.replace("[i]", "[{}]")  # where E is even, else it meets this element in the head's row
            lines += [
                "  if constexpr (E % 2) {",
                "    __syncwarp();",
                *each(f"row[lane + 32 * i] = {x};", indent="    "),
            ]
            lines += ["    __syncwarp();", "  }"]
            lines += each(
                "const int d = lane + 32 * i;",
                f"const float c = {names['cos']}, s = {names['sin']};",
                "const float p = E % 2 ? (d < HD / 2 ? -row[d + HD / 2] : row[d - HD / 2])",
                f"                     : (i < E / 2 ? -{xi.format('i + E / 2')} : {xi.format('i - E / 2')});",
                f"h{n}[i] = {_round(s.dtype)}({x} * c + p * s);",
            )
            lines.append("  if constexpr (E % 2) __syncwarp();  // every pair is read before the row is rewritten")
        else:
            lines += each(f"h{n}[i] = {_expr(s, names, lambda v: names[v])};")
        names[s.op.outputs[0]] = f"h{n}[i]"
    lines += [*each(f"r[i] = {names[body.head_out]};"), "}"]
    lines.append("__device__ __forceinline__ float attn_score(float s) {")
    score = {body.score_in: "s", "mask": "0.0f"}
    for n, s in enumerate(body.score):
        mask = "  // the mask: 0 at every position a task visits" if "mask" in s.op.inputs else ""
        lines.append(f"  const float s{n} = {_expr(s, score, lambda v: score[v])};{mask}")
        score[s.op.outputs[0]] = f"s{n}"
    lines += [f"  return {score[body.score_out]};", "}"]
    return "\n".join(lines) + "\n"


# --- the lowering as programs: what translation validation compares with qk_rope and attention ------------------


def head_graph(body: AttentionBody, program: KernelGraph) -> KernelGraph:
    """The head steps as a kernel graph over qk_rope's inputs (every head row at once)."""
    g = KernelGraph(program.name)
    env: dict[str, Any] = {n: g.input(n, program.tensors[n].shape, program.tensors[n].dtype) for n in program.inputs}
    for s in body.head:
        env[s.op.outputs[0]] = g.op(s.op.op, *(env[i] for i in s.op.inputs), **s.op.attrs)
    g.output(env[body.head_out])
    return g


def attention_graph(body: AttentionBody, program: KernelGraph) -> KernelGraph:
    """Softmax attention with the body's score steps, over the attention program's inputs: what the split-KV rule
    computes, written as the program's ops."""
    g = KernelGraph(program.name)
    env: dict[str, Any] = {n: g.input(n, program.tensors[n].shape, program.tensors[n].dtype) for n in program.inputs}
    env[body.score_in] = g.matmul(env["q"], env["k"])
    for s in body.score:
        env[s.op.outputs[0]] = g.op(s.op.op, *(env[i] for i in s.op.inputs), **s.op.attrs)
    s = env[body.score_out]
    e = g.exp(g.sub(s, g.max(s, dim=2, keepdim=True)))
    g.output(g.matmul(g.div(e, g.sum(e, dim=2, keepdim=True)), env["v"]))
    return g
