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

Task bodies are lowered from the plan's verified winners for their layer programs (bodies.py; a winner that does
not lower gives way to its layer program, and the build report says why): the GEMV tiles (QKV, O projection,
gate/up, down, LM head) by lowering.py, each a stage of its program (prologue over the whole vector, the GEMV over
the ring, epilogue over the task's rows); attention's head steps (q/k norm, the rotary embedding) and score steps
from qk_rope and the attention program (attention.py), around the split-KV softmax of attention.cuh (the rule of
softmax attention; the O projection's prologue combines the splits); the argmax task combines the LM-head tasks'
maxima (lm_head's argmax as a split reduction). `build_report` says, per task kind, which programs its body is
lowered from, with each program's winner and verification, and a GEMV kind's weight format.

Quantized weights (the task graph's `fmt`, int8 or int4 with bf16 group scales and zeros; the LM head's `head_fmt`,
the same or bf16): the layer programs dequantize their weight inputs, the lowering reads dequant, product and sum
as the stage's GEMV, each chunk of a task's tile carries its rows' packed values, scales and zeros
(layout.pack_chunks), and gemv.cuh's QuantW dequantizes in registers (docs/architecture.md, "Quantized tasks").

`replay` runs the same task list on the CPU: the per-SM lists interleaved under the same counter protocol (an
adversarial order by default: the latest runnable task first), each task body with the kernel's rounding (the
generated ones by the reference interpreter's rules, lowering.run_steps), and every read checked against the
step that wrote its elements, so a missing wait shows up as a stale read.

`memplan.plan_memory` plans a model larger than a device budget (`--vram-budget`): the weights resident or
streamed from host memory through a ring of device buffers, the ring's depth, the KV cache's placement, the
predicted step; the runtime does not stream yet, so only a plan where everything fits runs.

On a GPU, `GpuMegakernel` compiles the source through CuPy (NVRTC) and runs it on torch's stream (with
trace=True each task's STAMP_NAMES times in the last step are recorded);
`benchmark` checks it against HF transformers and the bf16 reference decoder and times it beside them
(benchmarks/megakernel_bench.py).
"""

from superopt.kernels.megakernel.bench import benchmark, prompt_tokens, timing_table, versus_reference_bf16
from superopt.kernels.megakernel.layout import SMEM_PER_BLOCK, STAMP_NAMES, WORKSPACE, smem_plan, tables
from superopt.kernels.megakernel.replay import Generation, StaleRead, agrees_with_replay, replay
from superopt.kernels.megakernel.runtime import GpuMegakernel, Hang, critical_path, time_megakernel
from superopt.kernels.megakernel.source import build_report, report_lines, source

__all__ = [
    "SMEM_PER_BLOCK",
    "STAMP_NAMES",
    "WORKSPACE",
    "Generation",
    "GpuMegakernel",
    "Hang",
    "StaleRead",
    "agrees_with_replay",
    "benchmark",
    "build_report",
    "critical_path",
    "prompt_tokens",
    "replay",
    "report_lines",
    "smem_plan",
    "source",
    "tables",
    "time_megakernel",
    "timing_table",
    "versus_reference_bf16",
]
