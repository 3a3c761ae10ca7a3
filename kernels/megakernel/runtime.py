"""The megakernel on a GPU: compiled through CuPy (NVRTC) for the current device, run on torch's stream, its
resources checked (one CTA per SM must be resident), traced per task where asked, and timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels import taskgraph
from superopt.kernels.megakernel.layout import (
    NCONSUMERS,
    SMEM_PER_BLOCK,
    STAMP_NAMES,
    packed_weights,
    small_params,
    smem_plan,
    tables,
    workspace_layout,
)
from superopt.kernels.megakernel.replay import Generation
from superopt.kernels.megakernel.source import source
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import Model


class Hang(SuperoptError):
    """The kernel did not finish: the GPU stays busy with it."""


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
        sms = props.multi_processor_count
        self.tg = taskgraph.build(model.config, sms, kv_splits, model.fmt, model.head_fmt, model.mixed)
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
