"""The megakernel's data: the workspace (one table: each buffer's size and its device accessor), the shared-memory
plan, the device tables of tasks and waits, and the weights packed per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from superopt.errors import SuperoptError
from superopt.kernels import taskgraph
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import LM_HEAD, Model, QuantizedWeight, linear_rows, rope_table, stored_rows

NCONSUMERS = 256  # 8 consumer warps; one more warp loads weights

SMEM_PER_BLOCK = 227 * 1024  # H100/H200 opt-in limit; the runtime reads the device's

OP_CODES = {op: i for i, op in enumerate(taskgraph.OPS)}

# A task descriptor: op, layer, tile, row0, nrows, head, split, wait_off, wait_cnt, sig0, sig1, nchunks, chunk_bytes,
# early (the waits to meet before the op's prefetch), and the weight tile's address (low and high 32 bits).
DESC_INTS = 16

# What a traced launch records per task (%globaltimer, ns): see the kernel's `stamp` calls. For attention,
# "prologue" is q, k and v loaded, normed and rotated, and "weights" the first chunk of the KV cache in shared memory.
STAMP_NAMES = ("start", "met", "prologue", "weights", "computed", "done")


@dataclass(frozen=True)
class Buffer:
    """One buffer of the workspace: its element type in the kernel, its accessor's C++ parameters and the element
    offset they select (a layer's part, a KV head's), and how many elements it holds."""

    ctype: str
    params: str
    offset: str
    count: Callable[[TaskGraph, int, int], int]  # (task graph, KV-cache length, logit slots) -> elements


CTYPE_BYTES = {"u16": 2, "int": 4, "float": 4}


def _per_layer(ctype: str, row: str, elements: Callable[[TaskGraph], int]) -> Buffer:
    """A buffer of one row a layer: `elements` in a row, the C++ constant `row` of that count."""
    return Buffer(ctype, "int l", f"(u64)l * {row}", lambda tg, m, s: tg.config.layers * elements(tg))


def _whole(ctype: str, elements: Callable[[TaskGraph, int, int], int]) -> Buffer:
    return Buffer(ctype, "", "", elements)


# The workspace, one table: each buffer's size (workspace_layout) and its device accessor ws_<name> (source).
WORKSPACE: dict[str, Buffer] = {
    "state": _whole("int", lambda tg, m, s: 4),  # u64 steps run so far, i32 position, i32 prompt length
    "tokens": _whole("int", lambda tg, m, s: m + 1),
    "qkv": _per_layer("u16", "QKV", lambda tg: tg.config.qkv_rows),
    "part": _per_layer("float", "PART", lambda tg: tg.buffers["part.0"]),  # attention's split-KV partials
    "hattn": _per_layer("u16", "HID", lambda tg: tg.config.hidden),
    "act": _per_layer("u16", "INTER", lambda tg: tg.config.intermediate),
    "hmlp": _per_layer("u16", "HID", lambda tg: tg.config.hidden),
    **{
        name: Buffer(
            "u16",
            "int l, int kv",
            "((u64)l * NKV + kv) * MAXSEQ * HD",
            lambda tg, m, s: tg.config.layers * tg.config.kv_heads * m * tg.config.head_dim,
        )
        for name in ("kcache", "vcache")
    },
    "logits": _whole("float", lambda tg, m, s: s * tg.config.vocab),
    "lmval": _whole("float", lambda tg, m, s: tg.gemv["lmhead"].tiles),
    "lmidx": _whole("int", lambda tg, m, s: tg.gemv["lmhead"].tiles),
    "bqkv": _per_layer("u16", "QKV", lambda tg: tg.config.qkv_rows * tg.config.qkv_bias),  # Qwen2's q/k/v biases
    "gin": _per_layer("u16", "HID", lambda tg: tg.config.hidden),
    "gpost": _per_layer("u16", "HID", lambda tg: tg.config.hidden),
    "gq": _per_layer("u16", "HD", lambda tg: tg.config.head_dim),
    "gk": _per_layer("u16", "HD", lambda tg: tg.config.head_dim),
    "gfinal": _whole("u16", lambda tg, m, s: tg.config.hidden),
    "cos": _whole("u16", lambda tg, m, s: m * tg.config.head_dim // 2),
    "sin": _whole("u16", lambda tg, m, s: m * tg.config.head_dim // 2),
}


def workspace_layout(tg: TaskGraph, max_seq: int, logit_slots: int) -> dict[str, tuple[int, int]]:
    """Byte offset and size of each device buffer in the one workspace allocation (256-byte aligned)."""
    out, off = {}, 0
    for name, buf in WORKSPACE.items():
        size = CTYPE_BYTES[buf.ctype] * buf.count(tg, max_seq, logit_slots)
        out[name] = (off, size)
        off += (size + 255) // 256 * 256
    return out


def smem_plan(tg: TaskGraph, max_seq: int, kv_cap: int | None = None) -> dict[str, int]:
    """Shared memory: the weight ring and its barriers, reduction scratch, then one region that a GEMV task uses
    for x (the widest input) and row partial sums and an attention task for q, k, v, the RoPE row and q/k norm
    weights, and KV_CAP cached positions with four partial scores a q head each. As many ring slots as fit (at most
    8) with room for 16 positions; then as many positions as fit (at most 64, and no more than a split can have),
    unless `kv_cap` says how many."""
    c = tg.config
    if c.head_dim % 32:
        raise SuperoptError(
            f"megakernel: head_dim {c.head_dim} is not a multiple of 32 (attention gives each lane of a warp a "
            "whole number of a head's elements)"
        )
    xs_elems = max(g.k for g in tg.gemv.values())
    gemv = 2 * xs_elems + 4 * 8 * max(g.tile * g.unit for g in tg.gemv.values())  # partial sums: 8 warps a row
    attn = 4 * ((c.group + 2) * c.head_dim + 3 * c.group) + 2 * 3 * c.head_dim  # and cos, sin, q/k norm weights
    per_position = 2 * 2 * (c.head_dim + 8) + 4 * 4 * c.group  # padded k and v rows, 4 partial scores a q head
    fixed = 16 * 8 + 256  # two mbarriers a slot (8 slots at most), reduction scratch
    slot = tg.slot_bytes
    slots = min(8, (SMEM_PER_BLOCK - 1024 - fixed - max(gemv, attn + 16 * per_position)) // slot)
    if slots < 2:
        raise SuperoptError("megakernel: shared memory leaves fewer than 2 ring slots")
    room = SMEM_PER_BLOCK - 1024 - fixed - slots * slot - attn
    split_len = -(-max_seq // tg.kv_splits)
    kv_cap = kv_cap or min(64, room // per_position, -(-split_len // 8) * 8) // 8 * 8
    if kv_cap % 8 or kv_cap * per_position > room:
        raise SuperoptError(f"megakernel: {kv_cap} cached positions in shared memory: not a multiple of 8 or too many")
    region = max(gemv, attn + kv_cap * per_position)
    return {
        "slots": slots,
        "kv_cap": kv_cap,
        "xs_elems": xs_elems,
        "bytes": slots * slot + fixed + region,
    }


def tables(tg: TaskGraph, weight_ptr: Callable[[taskgraph.Task], int]) -> tuple[list[int], list[int], list[int]]:
    """The device tables: task descriptors in SM order, each SM's first task, and wait entries. An attention
    task's waits on earlier steps come first, so it can prefetch the KV cache before waiting for this step. A task
    leaves out the waits the SM's earlier tasks of the step already met (the next tile of an op waits for
    nothing): under load each acquire load costs a microsecond."""
    descs, starts, waits = [], [0], []
    for ids in tg.sm_tasks:
        met: set[tuple[int, int]] = set()
        for i in ids:
            t = tg.tasks[i]
            if len(t.signals) > 2:
                raise SuperoptError(f"megakernel: task {t.id} signals {len(t.signals)} counters (at most 2)")
            sig = t.signals + [-1] * (2 - len(t.signals))
            plan = tg.gemv.get(t.op)
            ptr = weight_ptr(t) if plan else 0
            order = sorted(set(t.waits) - met, key=lambda w: (w[1] == 0, w))
            met |= set(t.waits)
            early = sum(offset > 0 for _, offset in order) if t.op == "attn" else 0
            row = [OP_CODES[t.op], t.layer, t.tile, t.row0, t.nrows, t.head, t.split, len(waits) // 4, len(order)]
            row += sig + [plan.chunks if plan else 0, plan.chunk_bytes if plan else 0, early]
            row += [_i32(ptr & 0xFFFFFFFF), _i32(ptr >> 32)]
            descs += row
            for c, offset in order:
                waits += [c, len(tg.counters[c].producers), offset, 0]
        starts.append(len(descs) // DESC_INTS)
    return descs, starts, waits


def _i32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def packed_weights(model: Model, tg: TaskGraph) -> dict[tuple[str, int], torch.Tensor]:
    """Each GEMV op's weights per layer, tile t holding the rows of task t: QKV stacks q, k and v; gate/up tiles
    hold their gate rows, then their up rows. bf16: one contiguous [rows * unit, k] tensor. Quantized (the op's
    plan's fmt: tg.fmt for the projections, tg.head_fmt for the LM head): bytes, each chunk its rows' packed
    values, then their scales, then their zeros (pack_chunks), so each of the loader's bulk copies brings a
    chunk's weights with what dequantizes them. A tied model's quantized LM head is its own copy (the embedding
    gather reads the bf16 table)."""
    c = tg.config
    out = {}
    for i in range(c.layers):
        for op, names in (("qkv", ("wqkv",)), ("oproj", ("wo",)), ("gateup", ("wg", "wu")), ("down", ("wd",))):
            plan = tg.gemv[op]
            if plan.fmt.quantized:
                out[(op, i)] = pack_chunks(_tile_order([stored_rows(model, i, n) for n in names], plan), plan)
            else:
                out[(op, i)] = _tile_order([linear_rows(model, i, n) for n in names], plan)
    head = tg.gemv["lmhead"]
    if head.fmt.quantized:
        if model.head_fmt != head.fmt:
            raise SuperoptError(
                f"megakernel: the task graph packs the LM head {head.fmt.describe()}, the model stores it "
                f"{model.head_fmt.describe()}"
            )
        out[("lmhead", c.layers)] = pack_chunks(model.quant[LM_HEAD], head)
    else:
        out[("lmhead", c.layers)] = model.w(LM_HEAD)
    return {k: v.contiguous() for k, v in out.items()}


def _tile_order(units: list[Any], plan: taskgraph.Gemv) -> Any:
    """Rows of one weight (or a QuantizedWeight's tensors) a unit, in the tiles' order: each tile's rows of the
    first unit, then its rows of the second (gate, up)."""
    if isinstance(units[0], QuantizedWeight):
        parts = [[getattr(u, f) for u in units] for f in ("q", "scale", "zero")]
        q, scale, zero = (None if p[0] is None else _tile_order(p, plan) for p in parts)
        assert q is not None and scale is not None
        return QuantizedWeight(q, scale, zero)
    if len(units) == 1:
        return units[0]
    return torch.stack([u.reshape(plan.tiles, plan.tile, -1) for u in units], 1).reshape(-1, units[0].shape[-1])


def _sections(plan: taskgraph.Gemv) -> list[tuple[str, int, int]]:
    """A quantized chunk's sections: (field, byte offset, bytes a row): the packed values, scales, zeros."""
    fmt, k = plan.fmt, plan.k
    out = [("q", 0, fmt.q_bytes(k)), ("scale", plan.chunk * fmt.q_bytes(k), 2 * (k // fmt.group))]
    if fmt.zero:
        out.append(("zero", out[1][1] + plan.chunk * out[1][2], out[1][2]))
    return out


def pack_chunks(qw: QuantizedWeight, plan: taskgraph.Gemv) -> torch.Tensor:
    """A quantized weight's rows (in tile order) as the ring streams them: uint8, chunk after chunk of
    plan.chunk_bytes, each chunk's rows' packed values, then their scales (bf16), then their zeros, then zero
    padding to a whole 16-byte vector."""
    n = qw.q.shape[0]
    nchunks = n // plan.chunk
    out = torch.zeros(nchunks, plan.chunk_bytes, dtype=torch.uint8, device=qw.q.device)
    for field, off, row in _sections(plan):
        t = getattr(qw, field).contiguous().view(torch.uint8).reshape(nchunks, plan.chunk * row)
        out[:, off : off + plan.chunk * row] = t
    return out.reshape(-1)


def unpack_chunks(data: torch.Tensor, plan: taskgraph.Gemv) -> QuantizedWeight:
    """pack_chunks' bytes (whole chunks) back as rows: what a task's GEMV reads from its ring slots."""
    chunks = data.view(-1, plan.chunk_bytes)
    fields: dict[str, torch.Tensor] = {}
    for field, off, row in _sections(plan):
        raw = chunks[:, off : off + plan.chunk * row].reshape(-1, row)
        fields[field] = (
            raw.view(torch.bfloat16) if field != "q" else raw.view(torch.int8 if plan.fmt.bits == 8 else torch.uint8)
        )
    return QuantizedWeight(fields["q"], fields["scale"], fields.get("zero"))


def small_params(model: Model) -> dict[str, torch.Tensor]:
    """Norm weights and the RoPE table, as they are laid out in the workspace (bf16)."""
    c = model.config
    layer = [f"model.layers.{i}." for i in range(c.layers)]
    out = {
        "gin": torch.stack([model.w(p + "input_layernorm.weight") for p in layer]),
        "gpost": torch.stack([model.w(p + "post_attention_layernorm.weight") for p in layer]),
        "gfinal": model.w("model.norm.weight"),
    }
    if c.qkv_bias:
        out["bqkv"] = torch.stack([torch.cat([model.w(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) for p in layer])
    if c.qk_norm:
        out["gq"] = torch.stack([model.w(p + "self_attn.q_norm.weight") for p in layer])
        out["gk"] = torch.stack([model.w(p + "self_attn.k_norm.weight") for p in layer])
    out["cos"], out["sin"] = rope_table(c, model.max_seq)
    return out
