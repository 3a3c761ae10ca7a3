"""The megakernel's static task graph: one decode step at tile granularity, its dependencies, counters and the
per-SM schedule.

A task is (op, layer, tile). It reads and writes element ranges (`Region`) of named activation buffers; every
buffer of one step is written once per step (per-layer buffers), so a dependency is a read of a range some task
of the same step writes. Reads marked `prev` (the token, the KV cache of earlier positions) read what earlier
steps wrote: every task descends from a task that waits for the previous step's last task (the argmax), and
that task descends from every task of its step, so step s+1 starts only after step s is done with every buffer.

Counters: a consumer that reads every tile of an op waits on that op's aggregate counter; one that reads some
tiles waits on those tiles' own counters. Each producer adds 1 to each counter it belongs to, once per step, and
nothing is ever reset: at global step g (counting from the first launch) a wait is satisfied when its counter
reaches (g + 1 - step_offset) * producers. Tasks run in one global topological order (their ids), each SM
running its own tasks in that order, so the earliest unfinished task can always run: no deadlock.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from superopt.errors import SuperoptError
from superopt.model import BF16, ModelConfig, WeightFormat

TILE_BYTES = 256 * 1024  # the most weight bytes one task streams
MAX_TILE_ROWS = 256  # a GEMV task's outputs, at most one a consumer thread
SLOT_BYTES = 32 * 1024  # one ring chunk of shared memory
TASK_OVERHEAD_BYTES = 16 * 1024  # a task's fixed cost (waits, prologue, barriers) in bytes of weight streaming
VECTOR = 8  # a GEMV row is read in 16-byte vectors of 8 bf16 (the last lanes of a row masked where it is short)
PART_HEAD = 4  # an attention partial: max, sum and two unused floats, so the outputs after them are 16-byte aligned

GEMV_OPS = ("qkv", "oproj", "gateup", "down", "lmhead")
OPS = ("qkv", "attn", "oproj", "gateup", "down", "lmhead", "argmax")


@dataclass(frozen=True)
class Region:
    buffer: str
    lo: int
    hi: int
    prev: bool = False  # written by earlier steps

    def overlaps(self, other: Region) -> bool:
        return self.buffer == other.buffer and self.lo < other.hi and other.lo < self.hi


@dataclass(frozen=True)
class Gemv:
    """A GEMV op's tiling: `rows` outputs of length-`k` dot products, `unit` weight rows per output (2 for
    gate/up, whose tiles hold the gate rows then the up rows), `tile` outputs per task, `chunk` weight rows per
    shared-memory ring chunk, the weights stored in `fmt`. A quantized chunk holds its rows' packed values, then
    their scales, then (asymmetric) their zeros, padded to whole 16-byte vectors (the bulk copy's unit)."""

    op: str
    k: int
    rows: int
    unit: int
    tile: int
    chunk: int
    fmt: WeightFormat = BF16

    @property
    def tiles(self) -> int:
        return self.rows // self.tile

    @property
    def chunks(self) -> int:
        return self.tile * self.unit // self.chunk

    @property
    def chunk_bytes(self) -> int:
        return -(-self.chunk * self.fmt.row_bytes(self.k) // 16) * 16

    @property
    def tile_bytes(self) -> int:
        return self.chunks * self.chunk_bytes


def check_format(op: str, k: int, fmt: WeightFormat) -> None:
    """SuperoptError unless a quantized GEMV over k can be read as the GEMV reads it: whole groups a row, a row's
    packed values whole 16-byte vectors, and each vector (a lane's load: 16 int8 or 32 int4 weights) inside one
    group, so a lane applies one scale to its vector's partial sum."""
    if not fmt.quantized:
        return
    per_vector = 128 // fmt.bits
    if k % fmt.group:
        raise SuperoptError(f"megakernel: {op} reduces over {k} inputs, not a multiple of the group {fmt.group}")
    if fmt.group % per_vector:
        raise SuperoptError(
            f"megakernel: group {fmt.group} is not a multiple of {per_vector} (a lane reads {per_vector} "
            f"int{fmt.bits} weights of one group at a time)"
        )


def plan_gemv(op: str, k: int, rows: int, unit: int, n_sms: int, fmt: WeightFormat = BF16) -> Gemv:
    """The tile that spreads the op's weights most evenly over the SMs: fewest bytes on the busiest SM, counting
    each of its tasks' fixed cost (TASK_OVERHEAD_BYTES); ties to fewer, larger tasks. A tile divides `rows`,
    streams at most TILE_BYTES, and holds whole chunks, each the most rows (a power of two) a ring slot takes."""
    if k % VECTOR:
        raise SuperoptError(f"megakernel: {op} reduces over {k} elements, not a multiple of {VECTOR}")
    check_format(op, k, fmt)
    row_bytes = fmt.row_bytes(k)
    if row_bytes > SLOT_BYTES:
        raise SuperoptError(f"megakernel: {op} rows of {k} elements do not fit a {SLOT_BYTES}-byte ring slot")
    # As many rows as fill a slot with their values; a quantized chunk's scales (and zeros) come on top (1.6-6%
    # more: the ring's slots grow to the largest chunk, TaskGraph.slot_bytes), so that each bulk copy still
    # moves a whole slot of weights: the loader keeps one copy in flight, and a chunk cut to fit the scales
    # (31 rows of 32: the next power of two down) would halve the bytes in flight.
    chunk = 1 << (SLOT_BYTES // fmt.q_bytes(k)).bit_length() - 1
    best = None
    for tile in range(1, min(rows, MAX_TILE_ROWS) + 1):
        weight_rows = tile * unit
        if rows % tile or weight_rows * row_bytes > TILE_BYTES or weight_rows % min(chunk, weight_rows):
            continue
        rounds = -(-(rows // tile) // n_sms)
        key = (rounds * (weight_rows * row_bytes + TASK_OVERHEAD_BYTES), -tile)
        best = min(best or key, key)
    if best is None:
        raise SuperoptError(f"megakernel: {op} has no tile of whole {chunk}-row chunks within {TILE_BYTES} bytes")
    tile = -best[1]
    return Gemv(op, k, rows, unit, tile, min(chunk, tile * unit), fmt)


@dataclass
class Task:
    id: int
    op: str
    layer: int
    tile: int
    row0: int = 0  # first output row (GEMV ops) or 0
    nrows: int = 0  # output rows (GEMV ops)
    head: int = 0  # attention: KV head
    split: int = 0  # attention: KV-length split
    reads: tuple[Region, ...] = ()
    writes: tuple[Region, ...] = ()
    weight_bytes: int = 0
    deps: list[int] = field(default_factory=list)  # same-step producers, by id
    prev_deps: list[int] = field(default_factory=list)  # producers in earlier steps
    waits: list[tuple[int, int]] = field(default_factory=list)  # (counter, step_offset)
    signals: list[int] = field(default_factory=list)
    sm: int = -1

    @property
    def cost(self) -> int:
        return self.weight_bytes + TASK_OVERHEAD_BYTES


@dataclass
class Counter:
    id: int
    producers: tuple[int, ...]
    name: str


@dataclass
class TaskGraph:
    config: ModelConfig
    n_sms: int
    kv_splits: int
    gemv: dict[str, Gemv]
    buffers: dict[str, int]  # name -> elements
    fmt: WeightFormat = BF16  # the projections' weights (the LM head's: gemv["lmhead"].fmt, head_fmt)
    mixed: dict[str, WeightFormat] = field(default_factory=dict)  # a format per GEMV op overriding fmt and head
    tasks: list[Task] = field(default_factory=list)
    counters: list[Counter] = field(default_factory=list)
    sm_tasks: list[list[int]] = field(default_factory=list)

    @property
    def head_fmt(self) -> WeightFormat:
        """The LM head's weights: `fmt`, or bf16 where the head is kept wide."""
        return self.gemv["lmhead"].fmt

    def weights_summary(self) -> str:
        """The GEMV ops' formats in a line: the projections' and the LM head's, or each op's where they are mixed."""
        ops = [f"{op} {g.fmt.short}" for op, g in self.gemv.items() if op != "lmhead"]
        projections = ", ".join(ops) if self.mixed else f"projections {self.fmt.short}"
        return f"{projections}; lmhead: {self.head_fmt.short}"

    @property
    def slot_bytes(self) -> int:
        """A ring slot: the largest chunk (SLOT_BYTES for bf16 weights)."""
        return max([SLOT_BYTES] + [g.chunk_bytes for g in self.gemv.values()])

    @property
    def sink(self) -> Task:
        return self.tasks[-1]

    def by_op(self, op: str, layer: int | None = None) -> list[Task]:
        return [t for t in self.tasks if t.op == op and (layer is None or t.layer == layer)]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "n_sms": self.n_sms,
            "kv_splits": self.kv_splits,
            "gemv": {k: asdict(v) | {"fmt": v.fmt.precision} for k, v in self.gemv.items()},
            "weights": "mixed: per GEMV op (gemv.fmt)" if self.mixed else self.fmt.describe(),
            "lm_head_weights": self.head_fmt.describe(),
            "buffers": self.buffers,
            "counters": [{"id": c.id, "name": c.name, "producers": list(c.producers)} for c in self.counters],
            "tasks": [
                {
                    "id": t.id,
                    "op": t.op,
                    "layer": t.layer,
                    "tile": t.tile,
                    "rows": [t.row0, t.row0 + t.nrows],
                    "head": t.head,
                    "split": t.split,
                    "sm": t.sm,
                    "weight_bytes": t.weight_bytes,
                    "reads": [[r.buffer, r.lo, r.hi, r.prev] for r in t.reads],
                    "writes": [[r.buffer, r.lo, r.hi] for r in t.writes],
                    "deps": t.deps,
                    "waits": [list(w) for w in t.waits],
                    "signals": t.signals,
                }
                for t in self.tasks
            ],
            "sm_tasks": self.sm_tasks,
        }


def default_kv_splits(cfg: ModelConfig, n_sms: int) -> int:
    """Enough attention tasks to spread over a quarter of the SMs, at most 8 splits."""
    splits = 1
    while splits < 8 and cfg.kv_heads * splits * 2 <= max(1, n_sms // 4):
        splits *= 2
    return splits


def build(
    cfg: ModelConfig,
    n_sms: int,
    kv_splits: int | None = None,
    fmt: WeightFormat = BF16,
    head: WeightFormat | None = None,
    mixed: dict[str, WeightFormat] | None = None,
) -> TaskGraph:
    """The task graph of one decode step, analysed and scheduled over `n_sms` SMs, the projections' weights
    stored in `fmt`, the LM head's in `head` (None: `fmt`; BF16 keeps the head wide); `mixed`: a format per GEMV
    op (`--precision auto`) overriding both, each op's tiles planned for its own format."""
    if n_sms < 1:
        raise SuperoptError(f"megakernel: needs at least one SM, got {n_sms}")
    splits = kv_splits or default_kv_splits(cfg, n_sms)
    h, d, nh, nkv, g, L = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.group, cfg.layers
    formats = dict.fromkeys(GEMV_OPS, fmt) | {"lmhead": fmt if head is None else head} | (mixed or {})
    gemv = {
        "qkv": plan_gemv("qkv", h, cfg.qkv_rows, 1, n_sms, formats["qkv"]),
        "oproj": plan_gemv("oproj", nh * d, h, 1, n_sms, formats["oproj"]),
        "gateup": plan_gemv("gateup", h, cfg.intermediate, 2, n_sms, formats["gateup"]),
        "down": plan_gemv("down", cfg.intermediate, h, 1, n_sms, formats["down"]),
        "lmhead": plan_gemv("lmhead", h, cfg.vocab, 1, n_sms, formats["lmhead"]),
    }
    part = splits * nkv * g * (PART_HEAD + d)  # per (split, kv head, q head): max, sum, pad, d unnormalized outputs
    buffers = {"token": 1, "logits": cfg.vocab, "lmpart": 2 * gemv["lmhead"].tiles}  # (value, index) a tile
    for i in range(L):
        buffers |= {f"qkv.{i}": cfg.qkv_rows, f"part.{i}": part, f"kv.{i}": nkv}
        buffers |= {f"hattn.{i}": h, f"act.{i}": cfg.intermediate, f"hmlp.{i}": h}
    tg = TaskGraph(cfg, n_sms, splits, gemv, buffers, fmt, dict(mixed or {}))

    def add(op: str, layer: int, tile: int, reads: list[Region], writes: list[Region], **kw: Any) -> None:
        tg.tasks.append(Task(len(tg.tasks), op, layer, tile, reads=tuple(reads), writes=tuple(writes), **kw))

    def tiles(op: str, layer: int, reads: Any, out: str) -> None:
        plan = gemv[op]
        for t in range(plan.tiles):
            lo, hi = t * plan.tile, (t + 1) * plan.tile
            add(
                op,
                layer,
                t,
                reads(lo, hi),
                [Region(out, lo, hi)],
                row0=lo,
                nrows=plan.tile,
                weight_bytes=plan.tile_bytes,
            )

    for i in range(L):
        h_in = (
            (lambda lo, hi: Region("token", 0, 1, prev=True))
            if i == 0
            else (lambda lo, hi, i=i: Region(f"hmlp.{i - 1}", lo, hi))
        )
        tiles("qkv", i, lambda lo, hi, h_in=h_in: [h_in(0, h)], f"qkv.{i}")
        for kv in range(nkv):
            q = Region(f"qkv.{i}", kv * g * d, (kv + 1) * g * d)
            k = Region(f"qkv.{i}", (nh + kv) * d, (nh + kv + 1) * d)
            v = Region(f"qkv.{i}", (nh + nkv + kv) * d, (nh + nkv + kv + 1) * d)
            for j in range(splits):
                # Split 0 appends this position's K and V; every split reads earlier positions only (this one
                # comes from qkv), so the append and the reads touch different elements of the cache.
                row = g * (PART_HEAD + d)
                out = Region(f"part.{i}", (j * nkv + kv) * row, (j * nkv + kv + 1) * row)
                writes = [out] + ([Region(f"kv.{i}", kv, kv + 1)] if j == 0 else [])
                add(
                    "attn",
                    i,
                    kv * splits + j,
                    [q, k, v, Region(f"kv.{i}", kv, kv + 1, prev=True)],
                    writes,
                    head=kv,
                    split=j,
                )
        tiles("oproj", i, lambda lo, hi, h_in=h_in, i=i: [Region(f"part.{i}", 0, part), h_in(lo, hi)], f"hattn.{i}")
        tiles("gateup", i, lambda lo, hi, i=i: [Region(f"hattn.{i}", 0, h)], f"act.{i}")
        tiles(
            "down",
            i,
            lambda lo, hi, i=i: [Region(f"act.{i}", 0, cfg.intermediate), Region(f"hattn.{i}", lo, hi)],
            f"hmlp.{i}",
        )
    plan = gemv["lmhead"]
    for t in range(plan.tiles):
        lo, hi = t * plan.tile, (t + 1) * plan.tile
        reads, writes = [Region(f"hmlp.{L - 1}", 0, h)], [Region("logits", lo, hi), Region("lmpart", 2 * t, 2 * t + 2)]
        add("lmhead", L, t, reads, writes, row0=lo, nrows=plan.tile, weight_bytes=plan.tile_bytes)
    add("argmax", L, 0, [Region("lmpart", 0, 2 * plan.tiles)], [Region("token", 0, 1)])
    _analyse(tg)
    _plan_counters(tg)
    _schedule(tg)
    check(tg)
    return tg


def _analyse(tg: TaskGraph) -> None:
    """Fills each task's same-step and earlier-step producers from the regions it reads."""
    writers: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # buffer -> (lo, hi, task), sorted by lo
    for t in tg.tasks:
        for w in t.writes:
            writers[w.buffer].append((w.lo, w.hi, t.id))
    for name, spans in writers.items():
        spans.sort()
        for (_, hi, a), (lo2, hi2, b) in zip(spans, spans[1:]):
            if lo2 < hi:
                raise SuperoptError(f"megakernel: tasks {a} and {b} both write {name}[{lo2}:{min(hi, hi2)}]")
    starts = {name: [lo for lo, _, _ in spans] for name, spans in writers.items()}
    for t in tg.tasks:
        deps, prev = set(), set()
        for r in t.reads:
            spans = writers[r.buffer]
            k = max(0, bisect.bisect_right(starts.get(r.buffer, []), r.lo) - 1)
            end = r.lo
            while k < len(spans) and spans[k][0] < r.hi:
                lo, hi, u = spans[k]
                if hi > r.lo:
                    if lo > end:
                        break
                    end = max(end, hi)
                    (prev if r.prev else deps).add(u)
                k += 1
            if end < r.hi:
                raise SuperoptError(
                    f"megakernel: task {t.id} ({t.op}) reads {r.buffer}[{end}:{r.hi}], which no task writes"
                )
        if deps and max(deps) >= t.id:
            raise SuperoptError(f"megakernel: task {t.id} ({t.op}) reads what task {max(deps)} writes later")
        t.deps, t.prev_deps = sorted(deps), sorted(prev)


def op_instances(tg: TaskGraph) -> dict[tuple[str, int], list[Task]]:
    """The tasks of each (op, layer), in id order: an op instance, whose consumers wait for all of it together."""
    out: dict[tuple[str, int], list[Task]] = defaultdict(list)
    for t in tg.tasks:
        out[(t.op, t.layer)].append(t)
    return out


def _plan_counters(tg: TaskGraph) -> None:
    """Aggregate counters where a consumer reads all tiles of an op, per-tile counters elsewhere; earlier-step
    reads wait for the previous step's sink."""
    instance = {key: [t.id for t in tasks] for key, tasks in op_instances(tg).items()}
    counters: dict[tuple, Counter] = {}

    def counter(key: tuple, producers: list[int], name: str) -> int:
        if len(producers) == 1:  # one producer: its own counter is also its op's aggregate
            key, name = ("task", producers[0]), f"{tg.tasks[producers[0]].op}.{producers[0]}"
        if key not in counters:
            counters[key] = Counter(len(counters), tuple(producers), name)
            for p in producers:
                tg.tasks[p].signals.append(counters[key].id)
        return counters[key].id

    sink = tg.tasks[-1].id
    for t in tg.tasks:
        by_inst: dict[tuple[str, int], list[int]] = defaultdict(list)
        for d in t.deps:
            by_inst[(tg.tasks[d].op, tg.tasks[d].layer)].append(d)
        for key, ids in by_inst.items():
            if ids == instance[key]:
                t.waits.append((counter(("op", *key), ids, f"{key[0]}.{key[1]}"), 0))
            else:
                t.waits.extend((counter(("task", i), [i], f"{key[0]}.{i}"), 0) for i in ids)
        if t.prev_deps or not t.deps:  # reads the previous step's results, or starts the step
            t.waits.append((counter(("task", sink), [sink], f"argmax.{sink}"), 1))
    tg.counters = sorted(counters.values(), key=lambda c: c.id)


def _schedule(tg: TaskGraph) -> None:
    """Each op instance (an op's tasks in one layer, which its consumers wait for together) in rounds of one task
    an SM, each round to the SMs with the least work so far (ties: the lowest SM): no SM runs a second task of an
    instance while another runs none, and the work evens out over the instances."""
    load = [0] * tg.n_sms
    tg.sm_tasks = [[] for _ in range(tg.n_sms)]
    for tasks in op_instances(tg).values():
        for k in range(0, len(tasks), tg.n_sms):
            batch = tasks[k : k + tg.n_sms]
            for t, sm in zip(batch, sorted(range(tg.n_sms), key=lambda s: (load[s], s))):
                t.sm = sm
                load[sm] += t.cost
    for t in tg.tasks:
        tg.sm_tasks[t.sm].append(t.id)


def ancestors(tg: TaskGraph, task: int) -> set[int]:
    """Every task the given task depends on within its step, transitively."""
    seen: set[int] = set()
    stack = [task]
    while stack:
        for d in tg.tasks[stack.pop()].deps:
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen


def check(tg: TaskGraph) -> None:
    """Raises SuperoptError unless: ids are a topological order (no cycles); every task waits, through its
    counters, for every same-step task it reads from, with targets equal to the counters' producer counts; the
    sink descends from every task; every task that reads earlier steps' data or starts a step waits for the
    previous sink; each SM's list is in topological order."""
    by_id = {c.id: c for c in tg.counters}
    for t in tg.tasks:
        if any(d >= t.id for d in t.deps):
            raise SuperoptError(f"megakernel: task {t.id} depends on a later task: not a topological order")
        covered = {p for c, off in t.waits if off == 0 for p in by_id[c].producers}
        missing = set(t.deps) - covered
        if missing:
            raise SuperoptError(f"megakernel: task {t.id} ({t.op}) does not wait for tasks {sorted(missing)}")
        if (t.prev_deps or not t.deps) and (tg.sink.signals[0], 1) not in t.waits:
            raise SuperoptError(f"megakernel: task {t.id} ({t.op}) does not wait for the previous step")
    for c in tg.counters:
        for p in c.producers:
            if c.id not in tg.tasks[p].signals:
                raise SuperoptError(f"megakernel: task {p} does not signal counter {c.name}")
    signalled = defaultdict(int)
    for t in tg.tasks:
        for c in t.signals:
            signalled[c] += 1
    for c in tg.counters:
        if signalled[c.id] != len(c.producers):
            raise SuperoptError(f"megakernel: counter {c.name} is signalled {signalled[c.id]} times a step")
    if len(ancestors(tg, tg.sink.id)) != len(tg.tasks) - 1:
        raise SuperoptError("megakernel: some task is not an ancestor of the step's last task")
    for sm, ids in enumerate(tg.sm_tasks):
        if ids != sorted(ids) or any(tg.tasks[i].sm != sm for i in ids):
            raise SuperoptError(f"megakernel: SM {sm}'s task list is not in topological order")
