"""The megakernel: a whole decoder model's decode steps in one persistent GPU kernel, and its CPU replay.

One CTA per SM (grid = SM count; the compiled kernel's registers and shared memory are checked to fit one CTA
per SM, so every CTA is resident and no spinner waits on a CTA that cannot start). Each CTA has 8 consumer warps
that run its task list (kernels/taskgraph.py) in topological order, N decode steps per launch, and one loader
warp that streams the weights of its upcoming tasks through a ring of shared-memory slots with the bulk copy
engine (cp.async.bulk, completing on mbarriers, evict-first in L2), one chunk in flight at a time. Weights depend
on nothing, so the loader runs ahead across tasks and steps while the consumers wait on their dependency
counters: the next tasks' weights arrive during every wait. Likewise an attention task copies the KV cache of
earlier positions into shared memory (cp.async) before it waits for this step's q, k and v.

Counters are u64, only ever incremented (after the CTA's barrier, one thread's red.release.gpu adds) and waited
on with ld.acquire.gpu in asm volatile spins; a task leaves out the waits its SM already met earlier in the step.
Activations other SMs wrote are read with ld.global.cg (L2, never a stale L1 line). Targets scale with the
global step, which lives on the device (state: steps run so far, position, prompt length) and which the last task
of a launch advances: nothing is reset inside a launch or between launches, so a CUDA-graph replay continues
where the last launch stopped.
Prefill runs as decode steps whose argmax is not written while the next position is still inside the prompt;
the argmax task writes the greedy token, so N steps need no host round trip.

Task bodies: the GEMV tiles, attention (with the rotary embedding and the KV append), the split-KV combine and
argmax are hand-written templates (kernels/cuda_codegen.py); the elementwise epilogues (residual add,
silu(gate) * up) are generated from the plan's verified winners for those layer programs (superopt/model_search.py;
the emitter lowers elementwise programs and loop-free block graphs of elementwise ops). `build_report` says which,
per task kind, with each program's winner and verification.

`replay` runs the same task list on the CPU: the per-SM lists interleaved under the same counter protocol (an
adversarial order by default: the latest runnable task first), each task body in torch with the kernel's rounding,
and every read checked against the step that wrote its elements, so a missing wait shows up as a stale read.

On a GPU, `GpuMegakernel` compiles the source through CuPy (NVRTC) and runs it on torch's stream (with
trace=True each task's STAMP_NAMES times in the last step are recorded);
`benchmark` checks it against HF transformers and the bf16 reference decoder and times it beside them
(benchmarks/megakernel_bench.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from superopt.errors import SuperoptError
from superopt.interpret import TorchEval, evaluate
from superopt.ir import KernelGraph, identifier
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import PRELUDE, TEMPLATES, emit_elementwise
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import Decoder, Model, inv_freq, layer_programs, rope_table
from superopt.result import Result
from superopt.serialize import graph_hash

NCONSUMERS = 256  # 8 consumer warps; one more warp loads weights
SMEM_PER_BLOCK = 227 * 1024  # H100/H200 opt-in limit; the runtime reads the device's
OP_CODES = {op: i for i, op in enumerate(taskgraph.OPS)}
# A task descriptor: op, layer, tile, row0, nrows, head, split, wait_off, wait_cnt, sig0, sig1, nchunks, chunk_bytes,
# early (the waits to meet before the op's prefetch), and the weight tile's address (low and high 32 bits).
DESC_INTS = 16
# What a traced launch records per task (%globaltimer, ns): see the kernel's `stamp` calls. For attention,
# "prologue" is q, k and v loaded, normed and rotated, and "weights" the first chunk of the KV cache in shared memory.
STAMP_NAMES = ("start", "met", "prologue", "weights", "computed", "done")


def rbf(x: torch.Tensor) -> torch.Tensor:
    """Rounds float32 values to bf16 and back (the kernel's f2bf/bf2f)."""
    return x.to(torch.bfloat16).float()


# --- the workspace and the source ---------------------------------------------------------------------------


def workspace_layout(tg: TaskGraph, max_seq: int, logit_slots: int) -> dict[str, tuple[int, int]]:
    """Byte offset and size of each device buffer in the one workspace allocation (256-byte aligned)."""
    c = tg.config
    L, h, d = c.layers, c.hidden, c.head_dim
    sizes = {
        "state": 16,  # u64 steps run so far, i32 position, i32 prompt length
        "tokens": 4 * (max_seq + 1),
        "qkv": 2 * L * c.qkv_rows,
        "part": 4 * L * tg.buffers["part.0"],
        "hattn": 2 * L * h,
        "act": 2 * L * c.intermediate,
        "hmlp": 2 * L * h,
        "kcache": 2 * L * c.kv_heads * max_seq * d,
        "vcache": 2 * L * c.kv_heads * max_seq * d,
        "logits": 4 * logit_slots * c.vocab,
        "lmval": 4 * tg.gemv["lmhead"].tiles,
        "lmidx": 4 * tg.gemv["lmhead"].tiles,
        "gin": 2 * L * h,
        "gpost": 2 * L * h,
        "gq": 2 * L * d,
        "gk": 2 * L * d,
        "gfinal": 2 * h,
        "cos": 2 * max_seq * d // 2,
        "sin": 2 * max_seq * d // 2,
    }
    out, off = {}, 0
    for name, size in sizes.items():
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
    if c.head_dim % 64:
        raise SuperoptError(
            f"megakernel: head_dim {c.head_dim} is not a multiple of 64 (attention keeps each RoPE pair in one lane)"
        )
    xs_elems = max(g.k for g in tg.gemv.values())
    gemv = 2 * xs_elems + 4 * 8 * max(g.tile * g.unit for g in tg.gemv.values())  # partial sums: 8 warps a row
    attn = 4 * ((c.group + 2) * c.head_dim + 3 * c.group) + 2 * 3 * c.head_dim  # and cos, sin, q/k norm weights
    per_position = 2 * 2 * (c.head_dim + 8) + 4 * 4 * c.group  # padded k and v rows, 4 partial scores a q head
    fixed = 16 * 8 + 256  # two mbarriers a slot (8 slots at most), reduction scratch
    slots = min(8, (SMEM_PER_BLOCK - 1024 - fixed - max(gemv, attn + 16 * per_position)) // taskgraph.SLOT_BYTES)
    if slots < 2:
        raise SuperoptError("megakernel: shared memory leaves fewer than 2 ring slots")
    room = SMEM_PER_BLOCK - 1024 - fixed - slots * taskgraph.SLOT_BYTES - attn
    split_len = -(-max_seq // tg.kv_splits)
    kv_cap = kv_cap or min(64, room // per_position, -(-split_len // 8) * 8) // 8 * 8
    if kv_cap % 8 or kv_cap * per_position > room:
        raise SuperoptError(f"megakernel: {kv_cap} cached positions in shared memory: not a multiple of 8 or too many")
    region = max(gemv, attn + kv_cap * per_position)
    return {
        "slots": slots,
        "kv_cap": kv_cap,
        "xs_elems": xs_elems,
        "bytes": slots * taskgraph.SLOT_BYTES + fixed + region,
    }


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
    verified search winners by name (superopt/model_search.py), whose bodies are generated where the CUDA
    emitter lowers them (default: the layer programs themselves)."""
    c = tg.config
    lay = workspace_layout(tg, max_seq, logit_slots)
    sp = smem_plan(tg, max_seq, kv_cap)
    progs = programs or layer_programs(c)
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
        "SLOT": taskgraph.SLOT_BYTES,
        "NSLOTS": sp["slots"],
        "XS_ELEMS": sp["xs_elems"],
        "STAMPS": len(STAMP_NAMES),
    }
    consts |= {f"RC_{op.upper()}": g.chunk for op, g in tg.gemv.items()}
    lines = [f"// superopt megakernel: {identifier(name)} ({c.arch}), {tg.n_sms} SMs, {len(tg.tasks)} tasks a step"]
    lines += [f"constexpr int {k} = {v};" for k, v in consts.items()]
    lines += [
        f"constexpr float EPS = {c.eps!r}f;",
        f"constexpr float SCALE = {1 / math.sqrt(c.head_dim)!r}f;",
        f"constexpr bool QK_NORM = {'true' if c.qk_norm else 'false'};",
        f"constexpr bool TRACE = {'true' if trace else 'false'};",
    ]
    lines += [f"constexpr unsigned long long OFF_{k.upper()} = {off};" for k, (off, _) in lay.items()]
    lines.append(PRELUDE)
    accessors = {
        "tokens": ("int", "", ""),
        "qkv": ("u16", "int l", "(u64)l * QKV"),
        "part": ("float", "int l", f"(u64)l * {tg.buffers['part.0']}"),
        "hattn": ("u16", "int l", "(u64)l * HID"),
        "act": ("u16", "int l", "(u64)l * INTER"),
        "hmlp": ("u16", "int l", "(u64)l * HID"),
        "kcache": ("u16", "int l, int kv", "((u64)l * NKV + kv) * MAXSEQ * HD"),
        "vcache": ("u16", "int l, int kv", "((u64)l * NKV + kv) * MAXSEQ * HD"),
        "logits": ("float", "", ""),
        "lmval": ("float", "", ""),
        "lmidx": ("int", "", ""),
        "gin": ("u16", "int l", "(u64)l * HID"),
        "gpost": ("u16", "int l", "(u64)l * HID"),
        "gq": ("u16", "int l", "(u64)l * HD"),
        "gk": ("u16", "int l", "(u64)l * HD"),
        "gfinal": ("u16", "", ""),
        "cos": ("u16", "", ""),
        "sin": ("u16", "", ""),
    }
    for name, (ty, params, offset) in accessors.items():
        args = "unsigned char* ws" + (f", {params}" if params else "")
        add = f" + {offset}" if offset else ""
        lines.append(
            f"__device__ __forceinline__ {ty}* ws_{name}({args}) {{ return ({ty}*)(ws + OFF_{name.upper()}){add}; }}"
        )
    lines.append("// Epilogues generated from the layer programs (superopt/model.py) by kernels/cuda_codegen.py:")
    lines.append(emit_elementwise(progs["residual"], "residual"))
    lines.append(emit_elementwise(progs["mlp_act"], "mlp_act"))
    lines.append(TEMPLATES)
    lines.append(KERNEL)
    return "\n".join(lines)


KERNEL = r"""
enum { OP_QKV, OP_ATTN, OP_OPROJ, OP_GATEUP, OP_DOWN, OP_LMHEAD, OP_ARGMAX };
enum { D_OP, D_LAYER, D_TILE, D_ROW0, D_NROWS, D_HEAD, D_SPLIT, D_WAIT_OFF, D_WAIT_CNT, D_SIG0, D_SIG1, D_NCHUNKS,
       D_CHUNK_BYTES, D_EARLY, D_WLO, D_WHI };

// The residual stream entering a layer: the token's embedding row for layer 0.
__device__ __forceinline__ const u16* layer_input(unsigned char* ws, const u16* embed, int layer, int pos) {
  if (layer > 0) return ws_hmlp(ws, layer - 1);
  const int tok = min(max(ldcgi(ws_tokens(ws) + pos), 0), VOCAB - 1);
  return embed + (u64)tok * HID;
}

// The loader: every chunk of every task's weights, in the order the consumers use them, one ring slot each,
// marked evict-first in L2: read once a step, they should not push out the activations, KV cache and counters
// (1-2% a step on the H200). Prefetching the chunks past the ring into L2 as well (cp.async.bulk.prefetch.L2), a
// fixed distance ahead or only while attention and the O projection wait, evict-last or not, cost 4-52% instead.
// One chunk in flight an SM (the next is issued when the last has landed) still streams at the copy bandwidth,
// and keeps the memory system's queues short: a task's release fence waits for the SM's loads in flight, and
// every counter and activation crosses those queues. Likewise a task whose chunks all fit the ring frees their
// slots only after its signal, so the loader has nothing in flight during the fence. On the H200, one in flight
// instead of up to six took 6% off a step; freeing after the signal 2-5% more (two in flight: Llama 1% better
// and Qwen3 7% worse).
__device__ __forceinline__ const unsigned char* weight_chunk(const int* d, int c) {
  const unsigned char* w = (const unsigned char*)((u64)(u32)d[D_WLO] | ((u64)(u32)d[D_WHI] << 32));
  return w + (u64)c * (u32)d[D_CHUNK_BYTES];
}
__device__ void load_weights(const int* tasks, int first, int last, int steps, unsigned char* ring, u64* full,
                             u64* empty) {
  const u64 policy = l2_evict_first();
  u32 chunk = 0;
  for (int s = 0; s < steps; ++s)
    for (int t = first; t < last; ++t) {
      const int* d = tasks + t * 16;
      for (int c = 0; c < d[D_NCHUNKS]; ++c, ++chunk) {
        const int slot = chunk % NSLOTS;
        if (chunk >= NSLOTS) mbar_wait(&empty[slot], (chunk / NSLOTS - 1) & 1);
        if (chunk >= 1) mbar_wait(&full[(chunk - 1) % NSLOTS], ((chunk - 1) / NSLOTS) & 1);  // one load in flight
        mbar_expect_tx(&full[slot], d[D_CHUNK_BYTES]);
        bulk_load(ring + slot * SLOT, weight_chunk(d, c), d[D_CHUNK_BYTES], &full[slot], policy);
      }
    }
}

// Waits (the consumer threads, one entry each) for entries lo..hi of a task's wait list at global step g.
__device__ __forceinline__ void wait_for(const u64* counters, const int* w, int lo, int hi, u64 g) {
  for (int i = lo + threadIdx.x; i < hi; i += NCONSUMERS) {
    const u64 target = (g + 1 - (u64)w[4 * i + 2]) * (u64)w[4 * i + 1];
    while (ld_acquire(counters + w[4 * i]) < target) {}
  }
}

extern "C" __global__ void __launch_bounds__(NCONSUMERS + 32, 1)
megakernel(unsigned char* ws, const u16* embed, const int* tasks, const int* sm_start, const int* waits,
           u64* counters, int steps, u64* trace) {
  extern __shared__ V4 smem4[];
  unsigned char* smem = (unsigned char*)smem4;
  const int first = sm_start[blockIdx.x], last = sm_start[blockIdx.x + 1];
  if (first == last) return;
  unsigned char* ring = smem;
  u64* full = (u64*)(smem + NSLOTS * SLOT);
  u64* empty = full + NSLOTS;
  float* red = (float*)(empty + NSLOTS);
  u16* xs = (u16*)(red + 64);  // one region: a GEMV's x and partial sums, or attention's scratch
  float* part = (float*)(xs + XS_ELEMS);
  float* scratch = (float*)xs;
  if (threadIdx.x == 0) {
    for (int i = 0; i < NSLOTS; ++i) { mbar_init(&full[i], 1); mbar_init(&empty[i], NCONSUMERS / 32); }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x >= NCONSUMERS) {
    if (threadIdx.x == NCONSUMERS) load_weights(tasks, first, last, steps, ring, full, empty);
    return;
  }
  const int tid = threadIdx.x;
  int* state = (int*)(ws + OFF_STATE);
  const u64 epoch = ldcg64((const u64*)state);
  const int pos0 = ldcgi(state + 2), prompt_len = ldcgi(state + 3);
  u32 chunk = 0;
  for (int s = 0; s < steps; ++s) {
    const u64 g = epoch + s;
    const int pos = pos0 + s;
    int prev = -1;  // the previous task's (op, layer) this step: same input vector, so x in smem is still valid
    for (int t = first; t < last; ++t) {
      const int* d = tasks + t * 16;
      const u32 chunk0 = chunk;
      // The launch's last step is traced: start, dependencies met, prologue done, weights in shared memory,
      // computed, done.
      u64* const tr = TRACE && s == steps - 1 && tid == 0 ? trace + STAMPS * t : nullptr;
      stamp(tr, 0);
      const int early = d[D_EARLY];
      wait_for(counters, waits + 4 * d[D_WAIT_OFF], 0, early, g);
      if (d[D_OP] == OP_ATTN) {  // the KV cache earlier steps wrote is ready: fetch it while q, k, v are not
        consumers_sync();
        attention_prefetch(ws, d[D_LAYER], d[D_HEAD], d[D_SPLIT], pos, scratch);
      }
      wait_for(counters, waits + 4 * d[D_WAIT_OFF], early, d[D_WAIT_CNT], g);
      consumers_sync();
      if (TRACE && tr) tr[1] = tr[2] = tr[3] = tr[4] = globaltimer();
      const int layer = d[D_LAYER], row0 = d[D_ROW0], nrows = d[D_NROWS], nchunks = d[D_NCHUNKS];
      const bool keep = nchunks <= NSLOTS;  // free the task's slots after its signal (see the loader)
      const bool fresh = d[D_OP] * 1024 + layer != prev;
      prev = d[D_OP] * 1024 + layer;
      switch (d[D_OP]) {
        case OP_QKV: {
          if (fresh) norm_to_smem<HID>(layer_input(ws, embed, layer, pos), ws_gin(ws, layer), xs, red);
          stamp(tr, 2);
          gemv<HID, RC_QKV>(xs, ring, full, empty, chunk, nchunks, keep, part, tr);
          for (int r = tid; r < nrows; r += NCONSUMERS)
            ws_qkv(ws, layer)[row0 + r] = f2bf(gemv_row<HID, RC_QKV>(part, r));
          break;
        }
        case OP_ATTN:
          attention(ws, layer, d[D_HEAD], d[D_SPLIT], pos, scratch, tr);
          stamp(tr, 4);
          break;
        case OP_OPROJ: {
          const float res = tid < nrows ? ldcgbf(layer_input(ws, embed, layer, pos) + row0 + tid) : 0.f;
          if (fresh) combine_to_smem(ws_part(ws, layer), xs);
          stamp(tr, 2);
          gemv<NH * HD, RC_OPROJ>(xs, ring, full, empty, chunk, nchunks, keep, part, tr);
          if (tid < nrows)
            ws_hattn(ws, layer)[row0 + tid] = f2bf(residual(res, rbf(gemv_row<NH * HD, RC_OPROJ>(part, tid))));
          break;
        }
        case OP_GATEUP: {
          if (fresh) norm_to_smem<HID>(ws_hattn(ws, layer), ws_gpost(ws, layer), xs, red);
          stamp(tr, 2);
          gemv<HID, RC_GATEUP>(xs, ring, full, empty, chunk, nchunks, keep, part, tr);
          for (int r = tid; r < nrows; r += NCONSUMERS) {
            const float gate = rbf(gemv_row<HID, RC_GATEUP>(part, r));
            const float up = rbf(gemv_row<HID, RC_GATEUP>(part, nrows + r));
            ws_act(ws, layer)[row0 + r] = f2bf(mlp_act(gate, up));
          }
          break;
        }
        case OP_DOWN: {
          const float res = tid < nrows ? ldcgbf(ws_hattn(ws, layer) + row0 + tid) : 0.f;
          if (fresh) copy_to_smem<INTER>(ws_act(ws, layer), xs);
          stamp(tr, 2);
          gemv<INTER, RC_DOWN>(xs, ring, full, empty, chunk, nchunks, keep, part, tr);
          if (tid < nrows)
            ws_hmlp(ws, layer)[row0 + tid] = f2bf(residual(res, rbf(gemv_row<INTER, RC_DOWN>(part, tid))));
          break;
        }
        case OP_LMHEAD: {
          if (fresh) norm_to_smem<HID>(ws_hmlp(ws, NLAYER - 1), ws_gfinal(ws), xs, red);
          stamp(tr, 2);
          gemv<HID, RC_LMHEAD>(xs, ring, full, empty, chunk, nchunks, keep, part, tr);
          float* logits = ws_logits(ws) + (u64)(pos % LOGIT_SLOTS) * VOCAB;
          float best = -3.0e38f;
          int arg = 0x7fffffff;
          for (int r = tid; r < nrows; r += NCONSUMERS) {
            const float y = rbf(gemv_row<HID, RC_LMHEAD>(part, r));
            logits[row0 + r] = y;
            if (better(y, row0 + r, best, arg)) { best = y; arg = row0 + r; }
          }
          block_argmax(best, arg, red);
          if (tid == 0) { ws_lmval(ws)[d[D_TILE]] = best; ws_lmidx(ws)[d[D_TILE]] = arg; }
          break;
        }
        case OP_ARGMAX: {
          float best = -3.0e38f;
          int arg = 0x7fffffff;
          constexpr int PER = (LM_TILES + NCONSUMERS - 1) / NCONSUMERS;
          float v[PER];
          int a[PER];
#pragma unroll
          for (int k = 0; k < PER; ++k) {  // every load issued before any is used: one L2 round trip
            const int i = min(tid + k * NCONSUMERS, LM_TILES - 1);  // a repeated tile cannot change the argmax
            v[k] = ldcgf(ws_lmval(ws) + i);
            a[k] = ldcgi(ws_lmidx(ws) + i);
          }
#pragma unroll
          for (int k = 0; k < PER; ++k)
            if (better(v[k], a[k], best, arg)) { best = v[k]; arg = a[k]; }
          block_argmax(best, arg, red);
          if (tid == 0) {
            if (pos + 1 >= prompt_len) ws_tokens(ws)[pos + 1] = arg;
            if (s == steps - 1) {  // every CTA read the state before its first task, which precedes this one
              *(u64*)state = epoch + steps;
              state[2] = pos0 + steps;
            }
          }
          break;
        }
      }
      consumers_sync();
      if (tid == 0) {
        if (d[D_SIG0] >= 0) signal(counters + d[D_SIG0]);
        if (d[D_SIG1] >= 0) signal(counters + d[D_SIG1]);
        if (keep)  // the slots the task's GEMV kept, freed only now: see the loader
          for (u32 c = chunk0; c < chunk; ++c) mbar_arrive_count(&empty[c % NSLOTS], NCONSUMERS / 32);
        stamp(tr, 5);
      }
    }
  }
}
"""


# The layer programs each task kind computes (superopt.model.layer_programs), and which of them its body is
# generated from: the rest of its body is a hand-written template (kernels/cuda_codegen.py).
TASK_PROGRAMS = {
    "qkv": ("attn_in",),
    "attn": ("qk_rope", "kv_append", "attention"),
    "oproj": ("attn_out", "residual"),
    "gateup": ("mlp", "mlp_act"),
    "down": ("mlp", "residual"),
    "lmhead": ("lm_head",),
    "argmax": (),
}
GENERATED = {"oproj": "residual", "gateup": "mlp_act", "down": "residual"}  # epilogues from the winners


def build_report(tg: TaskGraph, results: dict[str, Result] | None = None) -> list[dict[str, Any]]:
    """Per task kind: its tasks and tiling, the layer programs it computes with their hashes, and, from the
    plan's `results` (each program's search result, by name), each program's winner, verification and predicted
    time; `body` says whether the task's code is generated from a winner or a template (with the part that is)."""
    progs = layer_programs(tg.config)
    rows = []
    for op in taskgraph.OPS:
        plan = tg.gemv.get(op)
        row: dict[str, Any] = {"kind": op, "tasks": len(tg.by_op(op))}
        if plan is not None:
            row["tiling"] = {"rows": plan.tile, "k": plan.k, "chunks": plan.chunks, "chunk_bytes": plan.chunk_bytes}
        computes = []
        for name in TASK_PROGRAMS[op]:
            entry: dict[str, Any] = {"program": name, "program_hash": graph_hash(progs[name])}
            result = (results or {}).get(name)
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
            computes.append(entry)
        row["computes"] = computes
        generated = GENERATED.get(op)
        row["body"] = "template"
        row["generated_part"] = f"epilogue '{generated}'" if generated else None
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
        part = f"; generated: {row['generated_part']}" if row["generated_part"] else ""
        lines.append(f"{row['kind']}: {row['tasks']} tasks{tiling}; computes {names or 'the argmax'}; "
                     f"body: {row['body']}{part}")  # fmt: skip
    return lines


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
    """Each GEMV op's weights, one contiguous [rows * unit, k] tensor per layer whose tile t is the rows of task
    t: QKV stacks q, k and v; gate/up tiles hold their gate rows, then their up rows."""
    c = tg.config
    out = {}
    for i in range(c.layers):
        p = f"model.layers.{i}."
        out[("qkv", i)] = torch.cat([model.w(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[("oproj", i)] = model.w(p + "self_attn.o_proj.weight")
        plan = tg.gemv["gateup"]
        gate, up = (model.w(p + f"mlp.{n}_proj.weight").view(plan.tiles, plan.tile, c.hidden) for n in ("gate", "up"))
        out[("gateup", i)] = torch.stack([gate, up], 1).reshape(2 * c.intermediate, c.hidden)
        out[("down", i)] = model.w(p + "mlp.down_proj.weight")
    out[("lmhead", c.layers)] = model.w("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def small_params(model: Model) -> dict[str, torch.Tensor]:
    """Norm weights and the RoPE table, as they are laid out in the workspace (bf16)."""
    c = model.config
    layer = [f"model.layers.{i}." for i in range(c.layers)]
    out = {
        "gin": torch.stack([model.w(p + "input_layernorm.weight") for p in layer]),
        "gpost": torch.stack([model.w(p + "post_attention_layernorm.weight") for p in layer]),
        "gfinal": model.w("model.norm.weight"),
    }
    if c.qk_norm:
        out["gq"] = torch.stack([model.w(p + "self_attn.q_norm.weight") for p in layer])
        out["gk"] = torch.stack([model.w(p + "self_attn.k_norm.weight") for p in layer])
    out["cos"], out["sin"] = rope_table(c, model.max_seq)
    return out


# --- the CPU replay -----------------------------------------------------------------------------------------


class Hang(SuperoptError):
    """The kernel did not finish: the GPU stays busy with it."""


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
    data its step has not written, SuperoptError for a deadlock. The generated bodies run `programs` (the
    winners the source was emitted from) through the reference interpreter, as `source` lowers them."""
    c = tg.config
    steps_total = len(prompt) + new_tokens - 1
    if steps_total > model.max_seq:
        raise SuperoptError(f"megakernel: {steps_total} positions exceed the KV cache ({model.max_seq})")
    weights = {k: v.float() for k, v in packed_weights(model, tg).items()}
    small = {k: v.float() for k, v in small_params(model).items()}
    embed = model.w("model.embed_tokens.weight").float()
    progs = programs or layer_programs(c)
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

    def norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return rbf(gamma * rbf(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + c.eps)))

    def tile_rows(t: taskgraph.Task, x: torch.Tensor) -> torch.Tensor:
        plan = tg.gemv[t.op]
        w = weights[(t.op, t.layer)].view(plan.tiles, plan.tile * plan.unit, plan.k)[t.tile]
        return w @ x

    def epilogue(name: str, *args: torch.Tensor) -> torch.Tensor:
        return evaluate(progs[name], [a.to(torch.bfloat16) for a in args], native)[0].float()

    def run(t: taskgraph.Task, g: int, pos: int) -> None:
        for r in t.reads:
            check_read(r, g, pos)
        i, d, hd = t.layer, c.head_dim, c.head_dim // 2
        h_in = embed[tokens[pos]] if i == 0 else None
        if t.op == "qkv":
            x = h_in if i == 0 else buf[f"hmlp.{i - 1}"]
            write(f"qkv.{i}", t.row0, rbf(tile_rows(t, norm(x, small["gin"][i]))), g)
        elif t.op == "attn":
            qkv, kv, grp = buf[f"qkv.{i}"], t.head, c.group
            q = qkv[kv * grp * d : (kv + 1) * grp * d].view(grp, d)
            k = qkv[(c.heads + kv) * d : (c.heads + kv + 1) * d]
            v = qkv[(c.heads + c.kv_heads + kv) * d : (c.heads + c.kv_heads + kv + 1) * d]
            if c.qk_norm:
                q, k = norm(q, small["gq"][i]), norm(k, small["gk"][i])
            cs, sn = small["cos"][pos], small["sin"][pos]

            def rope(x: torch.Tensor) -> torch.Tensor:
                x1, x2 = x[..., :hd], x[..., hd:]
                return torch.cat([rbf(rbf(x1 * cs) - rbf(x2 * sn)), rbf(rbf(x2 * cs) + rbf(x1 * sn))], -1)

            q, k = rope(q), rope(k)
            if t.split == 0:
                kcache[i, kv, pos], vcache[i, kv, pos], kv_step[i, kv, pos] = k, v, g
            n = pos + 1
            per = -(-n // tg.kv_splits)
            p0, p1 = t.split * per, min(n, t.split * per + per)
            keys = torch.cat([kcache[i, kv, :pos], k[None]])[p0:p1]
            vals = torch.cat([vcache[i, kv, :pos], v[None]])[p0:p1]
            out = torch.zeros(grp, taskgraph.PART_HEAD + d)  # max, sum, pad, outputs
            out[:, 0] = -1e30
            if p1 > p0:
                s = (q @ keys.T) * (1 / math.sqrt(d))
                out[:, 0] = s.amax(-1)
                e = torch.exp(s - out[:, :1])
                out[:, 1], out[:, taskgraph.PART_HEAD :] = e.sum(-1), e @ vals
            write(f"part.{i}", (t.split * c.kv_heads + kv) * out.numel(), out.reshape(-1), g)
        elif t.op == "oproj":
            part = buf[f"part.{i}"].view(tg.kv_splits, c.heads, taskgraph.PART_HEAD + d)
            w = torch.exp(part[:, :, 0] - part[:, :, 0].amax(0))
            outs = part[:, :, taskgraph.PART_HEAD :]
            a = rbf((outs * w[..., None]).sum(0) / (part[:, :, 1] * w).sum(0)[:, None]).reshape(-1)
            x = h_in if i == 0 else buf[f"hmlp.{i - 1}"]
            res = x[t.row0 : t.row0 + t.nrows]
            write(f"hattn.{i}", t.row0, epilogue("residual", res, rbf(tile_rows(t, a))), g)
        elif t.op == "gateup":
            y = rbf(tile_rows(t, norm(buf[f"hattn.{i}"], small["gpost"][i])))
            write(f"act.{i}", t.row0, epilogue("mlp_act", y[: t.nrows], y[t.nrows :]), g)
        elif t.op == "down":
            y = rbf(tile_rows(t, buf[f"act.{i}"]))
            write(f"hmlp.{i}", t.row0, epilogue("residual", buf[f"hattn.{i}"][t.row0 : t.row0 + t.nrows], y), g)
        elif t.op == "lmhead":
            y = rbf(tile_rows(t, norm(buf[f"hmlp.{c.layers - 1}"], small["gfinal"])))
            write("logits", t.row0, y, g)
            k = int(y.argmax())  # the first of equal maxima
            write("lmpart", 2 * t.tile, torch.tensor([y[k], float(t.row0 + k)]), g)
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


# --- the GPU runtime (CuPy, NVRTC) --------------------------------------------------------------------------


class GpuMegakernel:
    """The megakernel compiled for the current CUDA device, with the model's weights and a workspace on it."""

    def __init__(
        self,
        model: Model,
        kv_splits: int | None = None,
        logit_slots: int | None = None,
        trace: bool = False,
        kv_cap: int | None = None,
        programs: dict[str, KernelGraph] | None = None,
    ) -> None:
        import cupy  # an optional dependency (the gpu extra): only a GPU run needs it

        if not torch.cuda.is_available():
            raise SuperoptError("megakernel: no CUDA device")
        self.cupy, self.np = cupy, np
        props = torch.cuda.get_device_properties(0)
        self.model = model
        self.tg = taskgraph.build(model.config, props.multi_processor_count, kv_splits)
        self.logit_slots = logit_slots or model.max_seq
        self.src = source(self.tg, model.name, model.max_seq, self.logit_slots, trace, kv_cap, programs)
        self.plan = smem_plan(self.tg, model.max_seq, kv_cap)
        dev = torch.device("cuda")
        self.weights = {k: v.to(dev) for k, v in packed_weights(model, self.tg).items()}
        self.embed = model.w("model.embed_tokens.weight").to(dev)
        self.layout = workspace_layout(self.tg, model.max_seq, self.logit_slots)
        end = max(off + size for off, size in self.layout.values())
        self.ws = torch.zeros(end, dtype=torch.uint8, device=dev)
        for name, t in small_params(model).items():
            off, size = self.layout[name]
            self.ws[off : off + size] = t.contiguous().view(-1).view(torch.uint8).to(dev)

        def weight_ptr(t: taskgraph.Task) -> int:
            plan = self.tg.gemv[t.op]
            return self.weights[(t.op, t.layer)].data_ptr() + t.tile * plan.tile_bytes

        descs, starts, waits = tables(self.tg, weight_ptr)
        self.tasks = torch.tensor(descs, dtype=torch.int32, device=dev)
        self.starts = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.waits = torch.tensor(waits or [0], dtype=torch.int32, device=dev)
        self.counters = torch.zeros(len(self.tg.counters), dtype=torch.int64, device=dev)
        self.trace = torch.zeros(len(STAMP_NAMES) * len(self.tg.tasks) if trace else 1, dtype=torch.int64, device=dev)
        module = cupy.RawModule(code=self.src, options=("-std=c++17",))
        self.fn = module.get_function("megakernel")
        self.fn.max_dynamic_shared_size_bytes = self.plan["bytes"]
        self.resources = self._check_resources(props)

    def _check_resources(self, props: Any) -> dict[str, int]:
        """One CTA per SM must be resident, or the spinning CTAs wait forever for one that never starts."""
        attrs = self.fn.attributes
        threads = NCONSUMERS + 32
        regs = attrs["num_regs"]
        regs_per_warp = -(-regs * 32 // 256) * 256
        smem = attrs["shared_size_bytes"] + self.plan["bytes"]
        limit = getattr(props, "shared_memory_per_block_optin", SMEM_PER_BLOCK)
        if regs_per_warp * (threads // 32) > getattr(props, "regs_per_multiprocessor", 65536) or smem > limit:
            raise SuperoptError(f"megakernel: one CTA does not fit an SM ({regs} registers/thread, {smem} B shared)")
        blocks = self.cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.fn.kernel.ptr, threads, self.plan["bytes"]
        )
        if blocks < 1:
            raise SuperoptError("megakernel: the driver reports no resident CTA per SM")
        return {
            "registers": regs,
            "local_bytes": attrs["local_size_bytes"],
            "shared_bytes": smem,
            "ctas_per_sm": blocks,
        }

    def reset(self, prompt: list[int]) -> None:
        """A new sequence: the prompt's tokens, position 0. The step count (the counters' epoch) carries on."""
        off, _ = self.layout["tokens"]
        toks = torch.tensor(prompt, dtype=torch.int32, device=self.ws.device)
        self.ws[off : off + 4 * len(prompt)] = toks.view(torch.uint8)
        st = self.layout["state"][0]
        self.ws[st + 8 : st + 16] = torch.tensor([0, len(prompt)], dtype=torch.int32, device=self.ws.device).view(
            torch.uint8
        )

    def launch(self, steps: int) -> None:
        """`steps` decode steps in one launch, on torch's current stream."""
        np = self.np
        ptr = np.uint64
        args = (
            ptr(self.ws.data_ptr()),
            ptr(self.embed.data_ptr()),
            ptr(self.tasks.data_ptr()),
            ptr(self.starts.data_ptr()),
            ptr(self.waits.data_ptr()),
            ptr(self.counters.data_ptr()),
            np.int32(steps),
            ptr(self.trace.data_ptr()),
        )
        stream = self.cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            self.fn((self.tg.n_sms,), (NCONSUMERS + 32,), args, shared_mem=self.plan["bytes"])

    def trace_rows(self) -> list[list[Any]]:
        """From a traced launch, per task of the last step: id, SM, op, layer, then its STAMP_NAMES times (us from
        the step's first start; a stamp a task does not have equals the one before it)."""
        tr = self.trace.view(-1, len(STAMP_NAMES)).cpu().double()
        t0 = float(tr[:, 0].min())
        order = [i for ids in self.tg.sm_tasks for i in ids]  # trace rows are in descriptor (SM) order
        rows = []
        for k, i in enumerate(order):
            t = self.tg.tasks[i]
            rows.append([i, t.sm, t.op, t.layer] + [round((float(v) - t0) / 1e3, 3) for v in tr[k]])
        return sorted(rows)

    def trace_summary(self) -> dict[str, Any]:
        """From a traced launch: per op, the mean time (us) from each stamp to the next (wait: start to
        dependencies met; prologue: to the GEMV's input in shared memory (attention: q, k, v ready); weights: to
        its first weight chunk (attention: KV cache chunk) in shared memory; compute: to the sums done; epilogue: to
        done); the step's span; each layer's span from its first QKV task's dependencies met to its last down task
        done; and per op, the tasks on the step's critical path (critical_path) with their mean hand-over and
        phases."""
        rows = self.trace_rows()
        col = {name: 4 + k for k, name in enumerate(STAMP_NAMES)}
        out: dict[str, Any] = {"step_us": max(r[col["done"]] for r in rows)}
        phases = ("wait", "prologue", "weights", "compute", "epilogue")
        for op in taskgraph.OPS:
            mine = [r for r in rows if r[2] == op]
            out[op] = {
                f"{p}_us": round(sum(r[5 + k] - r[4 + k] for r in mine) / len(mine), 2) for k, p in enumerate(phases)
            }
        spans = []
        for layer in range(self.tg.config.layers):
            first = min(r[col["met"]] for r in rows if r[2] == "qkv" and r[3] == layer)
            last = max(r[col["done"]] for r in rows if r[2] == "down" and r[3] == layer)
            spans.append(round(last - first, 1))
        out["layer_span_us"] = spans
        path = critical_path(self.tg, rows)
        out["critical_path"] = {
            op: {
                "tasks": len(links),
                **{k: round(sum(x[k] for x in links) / len(links), 2) for k in links[0] if k.endswith("_us")},
            }
            for op in taskgraph.OPS
            if (links := [x for x in path if x["op"] == op])
        }
        return out

    def generate(self, prompt: list[int], new_tokens: int) -> Generation:
        """Prefill (one launch) then `new_tokens` greedy tokens (one launch); tokens and their logits."""
        if len(prompt) + new_tokens - 1 > self.model.max_seq:
            raise SuperoptError(f"megakernel: {len(prompt) + new_tokens - 1} positions exceed the KV cache")
        self.reset(prompt)
        if len(prompt) > 1:
            self.launch(len(prompt) - 1)
        self.launch(new_tokens)
        self.wait()
        return self.result(len(prompt), new_tokens)

    def wait(self, timeout_s: float = 120.0) -> None:
        """Waits for the launches so far; raises Hang if they do not finish in time (a kernel that deadlocked
        keeps the GPU busy: nothing after it on this device can run)."""
        done = torch.cuda.Event()
        done.record()
        deadline = time.time() + timeout_s
        while not done.query():
            if time.time() > deadline:
                raise Hang(f"megakernel: no result after {timeout_s:g} s (a deadlock?)")
            time.sleep(0.01)

    def result(self, prompt_len: int, new_tokens: int) -> Generation:
        off, _ = self.layout["tokens"]
        tokens = self.ws[off : off + 4 * (prompt_len + new_tokens)].view(torch.int32).tolist()
        off, _ = self.layout["logits"]
        logits = self.ws[off : off + 4 * self.logit_slots * self.model.config.vocab].view(torch.float32)
        logits = logits.view(self.logit_slots, -1)
        rows = [(p % self.logit_slots) for p in range(prompt_len - 1, prompt_len + new_tokens - 1)]
        return Generation(tokens, logits[rows].cpu())


# --- outside references and timing (GPU) --------------------------------------------------------------------


def prompt_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """A seeded random prompt."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_model(model: Model) -> Any:
    """transformers' LlamaForCausalLM / Qwen3ForCausalLM built from the config (nothing downloaded), on the GPU in
    bf16, with the model's weights loaded."""
    try:
        import transformers  # an optional dependency: only the comparison with HF's model needs it
    except ImportError:
        raise SuperoptError(
            "megakernel: transformers is not installed (it is needed only for the HF reference)"
        ) from None
    c = model.config
    fields = c.hf_fields()
    fields.pop("model_type")
    fields |= {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "max_position_embeddings": 131072}
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[c.arch]
    # transformers 5 reads rope_parameters, 4 reads rope_theta and rope_scaling: give both.
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    config = cls_config(**fields)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        hf = cls_model(config)
    rotary = hf.model.rotary_emb
    freq = rotary.inv_freq.clone()  # float32; .to(bfloat16) would round it, which from_pretrained does not
    hf = hf.to(torch.bfloat16).eval()
    rotary.inv_freq = freq
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = freq
    missing, unexpected = hf.load_state_dict({k: v.to("cuda") for k, v in model.weights.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SuperoptError(f"megakernel: HF model weights do not match: missing {missing}, unexpected {unexpected}")
    if c.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    freq = freq.cpu()
    if freq.shape != (c.head_dim // 2,) or not torch.allclose(freq, inv_freq(c), rtol=1e-5):
        raise SuperoptError(f"megakernel: transformers' RoPE frequencies differ from superopt's: {freq[:4].tolist()}")
    return hf


@torch.no_grad()
def teacher_forced_logits(hf: Any, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """HF's logits (float32) at each generated position, given exactly `tokens` as the sequence so far."""
    ids = torch.tensor([tokens[:-1]], device="cuda")
    return hf(ids).logits[0, prompt_len - 1 :].float().cpu()


def compare(tokens: list[int], logits: torch.Tensor, ref_logits: torch.Tensor, prompt_len: int) -> dict[str, Any]:
    """Greedy tokens and their logits against a reference's logits on the same sequence (teacher forcing). A
    token that is not the reference's argmax counts as a near tie when the reference's own margin between the
    two tokens is within twice the largest logit difference at that step."""
    gen = tokens[prompt_len:]
    ref_top = ref_logits.argmax(-1).tolist()
    diff = (logits - ref_logits).abs().amax(-1)
    flips = []
    for k, (tok, top) in enumerate(zip(gen, ref_top)):
        if tok != top:
            margin = float(ref_logits[k, top] - ref_logits[k, tok])
            flips.append(
                {"step": k, "token": tok, "ref_token": top, "ref_margin": margin, "max_logit_diff": float(diff[k])}
            )
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    return {
        "steps": len(gen),
        "argmax_agree": len(gen) - len(flips),
        "flips": flips,
        "all_explained": all(f["ref_margin"] <= 2 * f["max_logit_diff"] for f in flips),
        "logits_rel_error": rel,
        "max_logit_diff": float(diff.max()),
    }


def versus_reference_bf16(model: Model, out: Generation, prompt_len: int) -> dict[str, Any]:
    """`compare` against the bf16 reference decoder (superopt/model.py) teacher-forced on the generated tokens."""
    forced = Decoder(model, "bfloat16", "cuda").generate(
        out.tokens[:prompt_len], len(out.logits), forced=out.tokens[prompt_len:]
    )
    return compare(out.tokens, out.logits, forced[1], prompt_len)


def first_divergence(a: list[int], b: list[int], prompt_len: int) -> int | None:
    """The first generated step where two token sequences differ, or None."""
    for k, (x, y) in enumerate(zip(a[prompt_len:], b[prompt_len:])):
        if x != y:
            return k
    return None


def critical_path(tg: TaskGraph, rows: list[list[Any]]) -> list[dict[str, Any]]:
    """The chain of tasks that set a traced step's length (trace_rows), first to last. From the task done last,
    each link goes back to its trigger: of the task before it on its SM and its same-step producers, the one done
    last. A link: the task, its hand-over (dependencies met less its trigger's done: a signal's latency, or the
    SM's own hand-over) and its phases (trace_summary's); the links add up to the last done less the first met."""
    col = {name: 4 + k for k, name in enumerate(STAMP_NAMES)}
    before = {i: ids[k - 1] for ids in tg.sm_tasks for k, i in enumerate(ids) if k}
    phases = ("prologue", "weights", "compute", "epilogue")
    path, task = [], max(range(len(rows)), key=lambda i: rows[i][col["done"]])
    while task is not None:
        row, t = rows[task], tg.tasks[task]
        inputs = t.deps + ([before[task]] if task in before else [])
        last = max(inputs, key=lambda p: rows[p][col["done"]], default=None)
        handover = row[col["met"]] - rows[last][col["done"]] if last is not None else 0.0
        stamps = row[col["met"] :]  # met, prologue, weights, computed, done
        link = {"task": task, "op": t.op, "layer": t.layer, "handover_us": round(handover, 3)}
        link |= {f"{p}_us": round(stamps[k + 1] - stamps[k], 3) for k, p in enumerate(phases)}
        path.append(link)
        task = last
    return path[::-1]


def cuda_time_us(fn: Callable[[], Any], reps: int = 3, setup: Callable[[], Any] | None = None) -> float:
    """The median time of `fn` over `reps` runs (each after `setup`, untimed), with CUDA events."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def time_megakernel(mk: GpuMegakernel, prompt: list[int], new_tokens: int, reps: int = 5) -> float:
    """us per decode step: one launch of `new_tokens` steps after the prefill (prefill excluded)."""

    def prefill() -> None:
        mk.reset(prompt)
        mk.launch(len(prompt) - 1)

    return cuda_time_us(lambda: mk.launch(new_tokens), reps, prefill) / new_tokens


@torch.no_grad()
def time_hf(hf: Any, prompt: list[int], new_tokens: int, mode: str) -> tuple[float, list[int]]:
    """HF generate's us per decode step ((t(N) - t(1)) / (N - 1): prefill excluded) and its greedy tokens.
    mode: eager (dynamic cache), static (static cache), compile (static cache, with generate's own
    torch.compile of the decoding forward, as transformers does by default for a static cache on a GPU)."""
    ids = torch.tensor([prompt], device="cuda")
    kw: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if mode != "eager":
        kw |= {"cache_implementation": "static", "disable_compile": mode == "static"}
    out = hf.generate(ids, max_new_tokens=new_tokens, **kw)  # warm-up (and compile)
    hf.generate(ids, max_new_tokens=1, **kw)
    one = cuda_time_us(lambda: hf.generate(ids, max_new_tokens=1, **kw))
    full = cuda_time_us(lambda: hf.generate(ids, max_new_tokens=new_tokens, **kw))
    return (full - one) / (new_tokens - 1), out[0].tolist()


@torch.no_grad()
def time_cuda_graph_decode(model: Model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """The reference decoder in bf16 (superopt/model.py), one step captured in a CUDA graph that also takes the
    argmax and advances the position; us per replayed step, and its greedy tokens."""
    dec = Decoder(model, "bfloat16", "cuda")
    tok = torch.tensor(prompt[0], device="cuda")
    pos = torch.tensor(0, device="cuda")
    for p in range(len(prompt) - 1):  # prefill, eagerly
        dec.step(torch.tensor(prompt[p], device="cuda"), torch.tensor(p, device="cuda"))
    tok.fill_(prompt[-1])
    pos.fill_(len(prompt) - 1)
    start_pos = len(prompt) - 1

    def step() -> None:
        tok.copy_(dec.step(tok, pos).argmax())
        pos.add_(1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    k_save, v_save = dec.k_cache.clone(), dec.v_cache.clone()
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def restart() -> None:
        dec.k_cache.copy_(k_save)
        dec.v_cache.copy_(v_save)
        tok.fill_(prompt[-1])
        pos.fill_(start_pos)

    restart()
    out = []
    for _ in range(new_tokens):
        graph.replay()
        out.append(tok.clone())
    tokens = list(prompt) + [int(t) for t in out]
    us = cuda_time_us(lambda: [graph.replay() for _ in range(new_tokens)], 3, restart) / new_tokens
    return us, tokens


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (1 GiB each way)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / (cuda_time_us(lambda: b.copy_(a), reps=11) * 1e-6)


def benchmark(
    model: Model,
    prompt_len: int = 32,
    new_tokens: int = 128,
    peers: bool = True,
    compile_peer: bool = True,
    log: Callable[[str], None] = print,
    trace: bool = False,
    programs: dict[str, KernelGraph] | None = None,
) -> dict[str, Any]:
    """Builds and runs the megakernel (from `programs`, the plan's winners; see `source`), checks its greedy
    tokens and logits against HF transformers (and the bf16 reference decoder), and times it beside the peers.
    Each phase catches its own failure and records it, so one that fails still leaves the others' results."""
    res: dict[str, Any] = {"model": model.name, "prompt_len": prompt_len, "new_tokens": new_tokens, "errors": {}}
    prompt = prompt_tokens(model.config.vocab, prompt_len, seed=0)
    state: dict[str, Any] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        try:
            out = fn()
            log(f"[{model.name}] {name}: ok ({time.time() - t0:.1f} s)")
            return out
        except Hang:
            raise
        except Exception as e:  # noqa: BLE001 (record the phase's failure, go on with the next)
            res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            log(f"[{model.name}] {name}: FAILED: {type(e).__name__}: {e}")
            return None

    def build() -> None:
        mk = state["mk"] = GpuMegakernel(model, programs=programs)
        res["resources"] = mk.resources
        res["tasks"] = len(mk.tg.tasks)
        res["build_report"] = build_report(mk.tg)

    def run() -> None:
        out = state["out"] = state["mk"].generate(prompt, new_tokens)
        res["tokens"] = out.tokens
        if not torch.isfinite(out.logits).all():
            raise SuperoptError("megakernel logits are not all finite")

    def reference() -> None:
        res["vs_reference_bf16"] = versus_reference_bf16(model, state["out"], prompt_len)

    def hf() -> None:
        state["hf"] = hf_model(model)
        ref = teacher_forced_logits(state["hf"], state["out"].tokens, prompt_len)
        res["vs_hf"] = compare(state["out"].tokens, state["out"].logits, ref, prompt_len)
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            greedy = state["hf"].generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        res["tokens_hf"] = greedy[0].tolist()
        res["first_divergence_vs_hf"] = first_divergence(res["tokens"], res["tokens_hf"], prompt_len)

    phase("build", build)
    if "mk" in state:
        phase("generate", run)
    if "out" in state:
        phase("reference_bf16", reference)
        phase("hf_teacher_forced", hf)
    timings: dict[str, float] = {}
    res["timings_us_per_step"] = timings
    if "out" in state:
        timings["megakernel"] = phase("time_megakernel", lambda: time_megakernel(state["mk"], prompt, new_tokens))
    state.pop("mk", None)
    if trace and "out" in state:

        def traced() -> dict[str, Any]:
            mk = GpuMegakernel(model, trace=True, programs=programs)
            mk.generate(prompt, new_tokens)
            return mk.trace_summary()

        res["trace"] = phase("trace", traced)
    torch.cuda.empty_cache()
    if peers:
        cg = phase("time_cuda_graph_decode", lambda: time_cuda_graph_decode(model, prompt, new_tokens))
        if cg:
            timings["torch_cuda_graph"], res["tokens_cuda_graph"] = cg
        if "hf" in state:
            modes = ["eager", "static"] + (["compile"] if compile_peer else [])
            for mode in modes:
                out = phase(f"time_hf_{mode}", lambda mode=mode: time_hf(state["hf"], prompt, new_tokens, mode))
                if out:
                    timings[f"hf_{mode}"], res[f"tokens_hf_{mode}"] = out
    bw = phase("copy_bandwidth", copy_bandwidth)
    if bw:
        res["copy_bandwidth_GBps"] = bw / 1e9
        kv = (
            2 * 2 * model.config.layers * model.config.kv_heads * model.config.head_dim * (prompt_len + new_tokens // 2)
        )
        res["floor_us"] = (model.config.weight_bytes() + kv) / bw * 1e6
    res["floor_us_at_3TBps"] = model.config.weight_bytes() / 3.0e12 * 1e6
    return {k: v for k, v in res.items() if v is not None}


def timing_table(results: list[dict[str, Any]]) -> str:
    """A markdown table: us per step, tokens/s and the fraction of the bandwidth floor, per model and method."""
    lines = ["| model | method | us/step | tokens/s | floor/measured |", "|---|---|---|---|---|"]
    for r in results:
        floor = r.get("floor_us")
        for name, us in r.get("timings_us_per_step", {}).items():
            if us is None:
                continue
            frac = f"{floor / us:.2f}" if floor else "-"
            lines.append(f"| {r['model']} | {name} | {us:.1f} | {1e6 / us:.0f} | {frac} |")
    return "\n".join(lines)
