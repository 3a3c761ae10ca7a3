"""The memory plan of a model larger than its device budget (`superopt megakernel MODEL.yaml --vram-budget GB`):
which weights stay resident, which stream each step from pinned host memory through a ring of device buffers,
how deep the ring is, and where the KV cache lives; and the step time that predicts.

What the device always holds: the megakernel's workspace (activations, logits, the RoPE table, and the norm
weights and biases, which live in it: small and read by every task of their layer). A quantized weight's
scales and zeros are packed into its chunks beside its values (layout.pack_chunks), so they stay or stream with
it. Then, where not everything fits:

- the embedding table goes to host memory first: a step gathers one row of it, which the loader can read from
  mapped host memory for 2 * hidden bytes (a bf16 table tied to the LM head is the head, read whole: it goes
  where the head goes, and its row is read from host memory only where the head streams);
- the KV cache stays on the device whole: a spilled block rides back in the ring, each slot growing by a
  layer's spilled blocks, so spilling saves device memory only where the layers outnumber the slots, and less
  than streaming a weight of the same bytes does;
- the layers, in the order a step reads them, then the LM head: each resident where it fits beside the ring,
  the rest streamed. Every byte streamed costs the same (it crosses the host link once a step), so the plan kept
  is the one predicted fastest among the prefixes of layers kept resident, with and without the head: fewest
  bytes streamed, then fewest copies;
- only where every weight streams and the KV cache still does not fit, the oldest positions' blocks of each
  layer spill to host memory and ride back for attention in their layer's ring slot.

The ring has `ring_depth` slots of `ring_slot_bytes`: a streamed layer's weights (with its spilled KV blocks),
the LM head in slot-sized pieces. While the kernel reads one slot, the copy engine fills the next: depth d keeps
the copy engine busy when the d - 1 copies ahead take longer than the kernel's read of a slot plus the hand-over
(`hop_us`: the copy's submission and the flag the kernel polls), d = 1 + ceil((read + hop) / copy), and no more
slots than the step has streamed copies. For a layer of hundreds of MB over PCIe that is 2 (double buffering).

The predicted step (at a full KV cache, max_seq positions): max(bytes from the host / host-to-device bandwidth,
bytes the step reads on the device / device bandwidth), the floor, plus a hop a host-to-device copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from superopt.errors import SuperoptError
from superopt.kernels.device import DEVICES
from superopt.kernels.megakernel.layout import workspace_layout
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import ModelConfig, WeightFormat, projection_kind, projection_names

# Pinned host-to-device copies over PCIe 5.0 x16 (64 GB/s raw a direction) typically reach about 50 GB/s. An
# assumption, not a measurement: --h2d-gbps gives the rate measured on the machine that will run the plan.
H2D_GBPS = 50.0
DRAM_GBPS = DEVICES["h100"].dram_bytes_per_s / 1e9
HOP_US = DEVICES["h100"].launch_overhead_us  # a copy handed over to the kernel costs about a kernel boundary
KV_BLOCK = 16  # positions a KV block: the paged cache's default block (superopt serve --block-size)
KV_BUFFERS = ("kcache", "vcache")  # the workspace's KV cache, which the plan places itself

RESIDENT, STREAMED, HOST = "resident", "streamed", "host"
NOT_RUNNABLE = "not supported yet: the megakernel's runtime does not read weights from host memory"


@dataclass(frozen=True)
class Part:
    """A weight the plan places: its name (`layer 3`, `lm_head`, `embedding`), its bytes on the device or in the
    ring, and where it lives (RESIDENT on the device, STREAMED each step through the ring, HOST: the embedding
    table, its row read from host memory)."""

    name: str
    bytes: int
    where: str


@dataclass(frozen=True)
class KvPlacement:
    """The KV cache at max_seq positions (bf16 k and v, `batch` sequences): `spilled_blocks` blocks of the oldest
    positions of each layer live in host memory and ride back in their layer's ring slot; the rest on the device."""

    bytes: int
    positions: int
    block: int
    spilled_blocks: int
    layers: int
    bytes_per_position: int  # of one layer, all sequences

    @property
    def spilled_positions(self) -> int:
        return self.spilled_blocks * self.block

    @property
    def spilled_bytes_per_layer(self) -> int:
        return self.spilled_positions * self.bytes_per_position

    @property
    def host_bytes(self) -> int:
        return self.layers * self.spilled_bytes_per_layer

    @property
    def device_bytes(self) -> int:
        return self.bytes - self.host_bytes


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    workspace_bytes: int  # the megakernel's workspace without its KV cache
    layers: tuple[Part, ...]
    head: Part
    embedding: Part | None  # None: tied bf16, the LM head is the table
    kv: KvPlacement
    ring_depth: int
    ring_slot_bytes: int
    host_bytes: int  # a step's bytes over the host-to-device link
    device_read_bytes: int  # a step's bytes read from device memory (resident weights, the ring, the KV cache)
    copies: int  # a step's host-to-device copies (and host reads), a hop each
    h2d_gbps: float
    dram_gbps: float
    hop_us: float

    @property
    def ring_bytes(self) -> int:
        return self.ring_depth * self.ring_slot_bytes

    @property
    def device_bytes(self) -> int:
        """What the plan allocates on the device."""
        parts = [*self.layers, self.head] + ([self.embedding] if self.embedding else [])
        resident = sum(p.bytes for p in parts if p.where == RESIDENT)
        return self.workspace_bytes + resident + self.kv.device_bytes + self.ring_bytes

    @property
    def streams(self) -> bool:
        """Whether a step reads anything from host memory (the runtime cannot run such a plan yet)."""
        return self.host_bytes > 0

    @property
    def floor_us(self) -> float:
        # 1 GB/s moves 1e3 bytes a microsecond
        return max(self.host_bytes / (self.h2d_gbps * 1e3), self.device_read_bytes / (self.dram_gbps * 1e3))

    @property
    def predicted_us(self) -> float:
        return self.floor_us + self.copies * self.hop_us

    def to_json(self) -> dict[str, Any]:
        def part(p: Part) -> dict[str, Any]:
            return {"where": p.where, "bytes": p.bytes}

        kv = self.kv
        return {
            "budget_bytes": self.budget_bytes,
            "device_bytes": self.device_bytes,
            "workspace_bytes": self.workspace_bytes,
            "layers": [{"layer": i} | part(p) for i, p in enumerate(self.layers)],
            "lm_head": part(self.head),
            "embedding": part(self.embedding) if self.embedding else "the LM head's table (tied)",
            "ring": {"depth": self.ring_depth, "slot_bytes": self.ring_slot_bytes, "bytes": self.ring_bytes},
            "kv_cache": {
                "bytes": kv.bytes,
                "positions": kv.positions,
                "block": kv.block,
                "device_bytes": kv.device_bytes,
                "host_bytes": kv.host_bytes,
                "spilled_positions_per_layer": kv.spilled_positions,
            },
            "per_step": {"host_bytes": self.host_bytes, "device_read_bytes": self.device_read_bytes},
            "copies_per_step": self.copies,
            "h2d_gbps": self.h2d_gbps,
            "dram_gbps": self.dram_gbps,
            "hop_us": self.hop_us,
            "floor_us": round(self.floor_us, 3),
            "predicted_us_per_step": round(self.predicted_us, 3),
            "gpu_run": NOT_RUNNABLE if self.streams else "supported: everything fits",
        }

    def lines(self) -> list[str]:
        """The plan as a short table."""
        out = [
            f"memory plan: budget {size(self.budget_bytes)}, host-to-device {self.h2d_gbps:g} GB/s, "
            f"device {self.dram_gbps:g} GB/s"
        ]
        row = "  {:<16} {:<9} {}"
        start = 0
        for i, p in enumerate(self.layers):  # consecutive layers placed alike on one line
            if i + 1 == len(self.layers) or self.layers[i + 1].where != p.where:
                name = f"layer {i}" if start == i else f"layers {start}-{i}"
                out.append(row.format(name, p.where, f"{i + 1 - start} x {size(p.bytes)}"))
                start = i + 1
        out.append(row.format("lm_head", self.head.where, size(self.head.bytes)))
        if self.embedding:
            note = " (a step reads the token's row from host memory)" if self.embedding.where == HOST else ""
            out.append(row.format("embedding", self.embedding.where, size(self.embedding.bytes) + note))
        kv = self.kv
        spill = f", {kv.spilled_positions} oldest of {kv.positions} a layer spilled to host" if kv.host_bytes else ""
        out.append(row.format("KV cache", "", f"{size(kv.device_bytes)} on the device{spill}"))
        ring = f"{self.ring_depth} x {size(self.ring_slot_bytes)}" if self.ring_depth else "none"
        out.append(row.format("ring", "", ring))
        out.append(row.format("workspace", "", size(self.workspace_bytes)))
        out.append(row.format("device total", "", f"{size(self.device_bytes)} of {size(self.budget_bytes)}"))
        out.append(
            f"  step: {self.predicted_us:.1f} us predicted, floor {self.floor_us:.1f} us ({size(self.host_bytes)} "
            f"from the host, {size(self.device_read_bytes)} read on the device, host copies {self.copies})"
        )
        out.append(f"  GPU run: {NOT_RUNNABLE if self.streams else 'supported'}")
        return out


def size(n: int) -> str:
    """Bytes for a reader: 3.99 GB, 1.18 MB, 512 B (decimal units, as --vram-budget takes them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def weight_bytes(
    cfg: ModelConfig, fmt: WeightFormat, head: WeightFormat, mixed: dict[str, WeightFormat] | None = None
) -> tuple[list[int], int, int, int]:
    """Bytes of each layer's projections in `fmt` (packed values with their scales and zeros; `mixed`: a format
    per projection kind overriding it), of the LM head in `head`, of the embedding table (bf16; 0 where a bf16 head
    is tied to it: the head is the table, and a quantized head tied to it is a copy of its own) and of the norm
    weights and biases."""
    projections = set(projection_names(cfg))
    layers, small = [0] * cfg.layers, 0
    for name, shape in cfg.param_shapes().items():
        if name in projections:
            wf = (mixed or {}).get(projection_kind(name), fmt)
            layers[int(name.split(".")[2])] += shape[0] * wf.row_bytes(shape[1])
        elif len(shape) == 1:
            small += 2 * shape[0]
    table = 2 * cfg.vocab * cfg.hidden
    if cfg.tie_embeddings and not head.quantized:
        return layers, table, 0, small
    return layers, cfg.vocab * head.row_bytes(cfg.hidden), table, small


def workspace_bytes(tg: TaskGraph, max_seq: int, logit_slots: int) -> int:
    """The megakernel's workspace (layout.WORKSPACE) without its KV cache."""
    layout = workspace_layout(tg, max_seq, logit_slots)
    return max(off + n for off, n in layout.values()) - sum(layout[name][1] for name in KV_BUFFERS)


def ring_depth(slot: int, copies: int, h2d_gbps: float, dram_gbps: float, hop_us: float) -> int:
    """Slots that keep the copy engine busy (see the module's docstring), at most `copies`."""
    copy_us, read_us = slot / (h2d_gbps * 1e3), slot / (dram_gbps * 1e3)
    return min(copies, 1 + math.ceil((read_us + hop_us) / copy_us))


def plan_memory(
    cfg: ModelConfig,
    fmt: WeightFormat,
    head: WeightFormat,
    budget_bytes: int,
    max_seq: int,
    workspace: int,
    batch: int = 1,
    h2d_gbps: float = H2D_GBPS,
    dram_gbps: float = DRAM_GBPS,
    hop_us: float = HOP_US,
    kv_block: int = KV_BLOCK,
    mixed: dict[str, WeightFormat] | None = None,
) -> MemoryPlan:
    """The plan for `cfg`'s weights (projections in `fmt`, the LM head in `head`, `mixed` a format per projection
    kind overriding them), a KV cache of `max_seq` positions for each of `batch` sequences and the megakernel's
    `workspace` bytes (workspace_bytes) within `budget_bytes` of device memory (the module's docstring says how).
    SuperoptError, one line, where the budget is below the smallest working set: the workspace, the ring and the KV
    cache's minimum."""
    if min(budget_bytes, max_seq, batch, kv_block, h2d_gbps, dram_gbps) <= 0 or hop_us < 0:
        raise SuperoptError("memory plan: the budget, max_seq, batch, KV block and bandwidths must be > 0")
    layer_bytes, head_bytes, table, small = weight_bytes(cfg, fmt, head, mixed)
    per_position = batch * 2 * cfg.kv_heads * cfg.head_dim * 2  # k and v, bf16, of one layer
    kv = KvPlacement(cfg.layers * max_seq * per_position, max_seq, kv_block, 0, cfg.layers, per_position)
    row = 2 * cfg.hidden  # the embedding row a step gathers
    # A step reads every weight and the whole KV cache; of a table of its own, one row (a bf16 table tied to the
    # head is read with the head).
    read = sum(layer_bytes) + head_bytes + small + (row if table else 0) + kv.bytes

    def placed(resident: int, head_where: str, embed_where: str, kv: KvPlacement) -> MemoryPlan:
        """The plan with the first `resident` layers resident: its ring, the bytes and copies a step moves."""
        layers = tuple(Part(f"layer {i}", b, RESIDENT if i < resident else STREAMED) for i, b in enumerate(layer_bytes))
        streamed = layer_bytes[resident:]
        # A slot holds a layer (and its spilled KV blocks); a head that streams alone needs no slot larger than it.
        slot = min(max(layer_bytes), max(streamed or [head_bytes]))
        pieces = -(-head_bytes // slot) if head_where == STREAMED else 0
        slot += kv.spilled_bytes_per_layer
        copies = len(streamed) + pieces
        depth = ring_depth(slot, copies, h2d_gbps, dram_gbps, hop_us) if copies else 0
        # The token's row comes from host memory where the table lives there: its own, or a tied head streamed.
        host_row = embed_where == HOST if table else head_where == STREAMED
        host = sum(streamed) + head_bytes * (pieces > 0) + kv.host_bytes + row * host_row
        # A spilled layer's KV blocks are a copy of their own; a row read from the host is a hop too.
        hops = copies + cfg.layers * (kv.spilled_blocks > 0) + host_row
        return MemoryPlan(
            budget_bytes,
            workspace,
            layers,
            Part("lm_head", head_bytes, head_where),
            Part("embedding", table, embed_where) if table else None,
            kv,
            depth,
            slot if depth else 0,
            host,
            read - row * (table > 0 and host_row),  # a row read from the host is not read on the device
            hops,
            h2d_gbps,
            dram_gbps,
            hop_us,
        )

    everything = placed(cfg.layers, RESIDENT, RESIDENT, kv)
    if everything.device_bytes <= budget_bytes:
        return everything
    plans = [placed(n, where, HOST, kv) for n in range(cfg.layers, -1, -1) for where in (RESIDENT, STREAMED)]
    fitting = [p for p in plans if p.device_bytes <= budget_bytes]
    if fitting:  # the first of the fastest: the most layers resident
        return min(fitting, key=lambda p: p.predicted_us)
    # Every weight streams and the KV cache does not fit whole: the oldest blocks of each layer spill, the
    # newest block at least staying on the device.
    spills = [placed(0, STREAMED, HOST, replace(kv, spilled_blocks=s)) for s in range(1, -(-max_seq // kv_block))]
    for plan in spills:
        if plan.device_bytes <= budget_bytes:
            return plan
    least = min([plans[-1], *spills], key=lambda p: p.device_bytes)
    raise SuperoptError(
        f"a device budget of {size(budget_bytes)} is below the smallest working set, {size(least.device_bytes)} "
        f"({size(least.device_bytes - budget_bytes)} short): the workspace {size(workspace)}, the ring "
        f"{least.ring_depth} x {size(least.ring_slot_bytes)} and the KV cache's minimum "
        f"{size(least.kv.device_bytes)} on the device, with every weight streamed"
    )
