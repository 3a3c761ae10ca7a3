"""On-device timing: warm-up, L2 flushed before every run, CUDA-graph replay timed with CUDA events, median.

`bench` times a callable in this process. `measure_all` compiles, checks and times candidate µGraphs in order
in a subprocess (`python -m superopt.kernels.timing JOB OUT`) they share while they behave, so the process start
and CUDA set-up are paid once, not a candidate; a compile error, crash, hang or wrong result still costs only the
candidate it happens in and is recorded against it (the rest go on in a fresh process). `measure` is one
candidate. Each timed candidate is checked on the GPU against the reference program evaluated in float64 on the
same inputs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from superopt.interpret import TorchEval, evaluate, random_inputs
from superopt.ir import KernelGraph
from superopt.kernels import compile
from superopt.serialize import from_json, to_json

# Normwise relative error ||out - ref|| / ||ref|| allowed per dtype (METHOD.md's ranges: fp16 operands with
# fp32 accumulation land near 1e-3; bf16 between 1e-3 and 1e-2).
TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-4}
OWN_ERROR_FACTOR = 4  # a candidate may be this much less accurate than the program run op by op in its dtypes
INPUT_SCALE = 0.5  # the largest scale tried; `input_scale` halves it until the program stays in range
L2_FLUSH_BYTES = 256 * 1024 * 1024  # more than any current GPU's L2


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    runs: int


def bench(fn: Callable[[], Any], reps: int = 100, warmup: int = 10, cuda_graph: bool = True) -> Timing:
    """Times `fn` on the current CUDA device: `warmup` calls, then `reps` timed runs, each after the L2 is
    flushed (a write larger than L2), each timed with its own pair of events; under `cuda_graph`, `fn` is
    captured once and each run is one replay, so launch gaps inside `fn` shrink as they would in a model."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if cuda_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture needs a side stream; warm it up on that stream first
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times))


def reference_outputs(
    reference: KernelGraph, inputs: Sequence[torch.Tensor], precision: str = "float64"
) -> list[torch.Tensor]:
    """The reference program evaluated in float64 (or, "native", in its own dtypes, op by op) on the inputs'
    device (the GPU, for timed candidates)."""
    cast = [x.to(torch.float64) for x in inputs] if precision == "float64" else list(inputs)
    return evaluate(reference, cast, TorchEval(precision))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; infinite if anything is not finite."""
    out = out.to(torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(
    graph: KernelGraph,
    outs: torch.Tensor | Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    own: Sequence[torch.Tensor] = (),
) -> float:
    """The worst output's error as a fraction of what it may be (<= 1 passes): its dtype's tolerance, or
    OWN_ERROR_FACTOR times the error of `own`, the reference program run op by op in its own dtypes, where that
    is larger. A candidate is held to the dtype, not to more than the program itself can do in it: one output of
    silu(x @ w1) * (x @ w2) in float16, say, where silu's tail turns rounding into a large relative error."""
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs  # a peer's single output, returned bare
    worst = 0.0
    for k, (name, out, ref) in enumerate(zip(graph.outputs, outs, refs)):
        allowed = TOLERANCE[graph.tensors[name].dtype]
        if k < len(own):
            allowed = max(allowed, OWN_ERROR_FACTOR * relative_error(own[k], ref))
        worst = max(worst, relative_error(out, ref) / allowed)
    return worst


@dataclass(frozen=True)
class Measurement:
    """One candidate's outcome: status is ok, compile_error, crash, timeout or wrong."""

    status: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    error_vs_tolerance: float | None = None
    message: str = ""


def input_scale(graph: KernelGraph, seed: int = 0, largest: float = INPUT_SCALE) -> float:
    """The largest scale (halving from `largest`) at which every value the program computes, in float64, stays
    below 1/4 of its dtype's maximum: timing inputs must keep the float64 reference itself representable (the
    attention examples take an unscaled exp, which overflows fp16 at unit-variance inputs)."""

    class InRange(TorchEval):
        fits = True

        def cast(self, x: torch.Tensor, ty) -> torch.Tensor:
            if x.numel() and x.abs().max() >= torch.finfo(getattr(torch, ty.dtype)).max / 4:
                self.fits = False
            return super().cast(x, ty)

    scale = largest
    for _ in range(10):
        inputs, in_range = random_inputs(graph, seed=seed, scale=scale), InRange("float64")
        evaluate(graph, [inputs[n].double() for n in graph.inputs], in_range)
        if in_range.fits:
            break
        scale /= 2
    return scale


def random_device_inputs(graph: KernelGraph, seed: int, scale: float = INPUT_SCALE) -> dict[str, torch.Tensor]:
    return {name: x.cuda() for name, x in random_inputs(graph, seed=seed, scale=scale).items()}


def run_job(job: dict[str, Any]) -> Measurement:
    """Compiles, checks and times one candidate in this process (the worker side of `measure_all`)."""
    candidate = from_json(job["candidate"])
    reference = from_json(job["reference"])
    scale = job.get("scale") or input_scale(reference, job["seed"])
    try:
        compiled = compile(candidate, job.get("backend", "triton"), job.get("module_dir"))
        compiled(**random_device_inputs(candidate, job["seed"], scale))
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (whatever fails here is the candidate's compile error)
        return Measurement("compile_error", message=f"{type(e).__name__}: {e}"[:2000])
    worst = 0.0
    # Deterministic mode makes torch.empty fill with NaN, so an output element the kernel does not write fails
    # the check; two seeds, so the candidate computes the same function on fresh inputs.
    torch.use_deterministic_algorithms(True)
    try:
        for seed in (job["seed"] + 1, job["seed"] + 2):
            inputs = random_device_inputs(candidate, seed, scale)
            outs = compiled(**inputs)
            args = [inputs[n] for n in reference.inputs]
            refs, own = reference_outputs(reference, args), reference_outputs(reference, args, "native")
            worst = max(worst, check(candidate, outs, refs, own))
    finally:
        torch.use_deterministic_algorithms(False)
    if worst > 1:
        return Measurement("wrong", error_vs_tolerance=worst, message="output differs from the reference")
    timing = bench(lambda: compiled(**inputs), reps=job.get("reps", 100), cuda_graph=job.get("cuda_graph", True))
    return Measurement("ok", timing.median_us, timing.p20_us, timing.p80_us, worst)


WORKER = (sys.executable, "-m", "superopt.kernels.timing")
CUDA_BROKEN = 3  # a worker's exit code after a candidate left the CUDA context unusable (its result written)
POLL_S = 0.02


def measure_all(
    candidates: Sequence[KernelGraph],
    reference: KernelGraph,
    deadline: float = float("inf"),
    timeout_s: float = 120.0,
    seed: int = 0,
    reps: int = 100,
    backend: str = "triton",
    scale: float | None = None,
    module_dir: Path | None = None,
    worker: Sequence[str] = WORKER,
) -> list[Measurement]:
    """Compiles, checks and times each candidate against `reference`, in order, in one worker process while they
    behave; never raises for a candidate's faults. A candidate with no result within `timeout_s` (its own part,
    the process start included for the first) is a timeout, one whose worker dies a crash, each recorded against
    it, and the rest go on in a fresh worker. At `deadline` (monotonic seconds) the candidate running is a
    timeout and the rest are skipped. `scale`: the inputs' scale (default: `input_scale(reference)`); `module_dir`:
    where generated modules go; `worker`: the command run as `worker JOB OUT`."""
    results: list[Measurement | None] = [None] * len(candidates)
    job = {
        "reference": to_json(reference),
        "seed": seed,
        "reps": reps,
        "backend": backend,
        "scale": scale,
        "module_dir": str(module_dir) if module_dir is not None else None,
    }
    first = 0
    while first < len(candidates) and time.monotonic() < deadline:
        first = _run_worker(candidates, first, job, results, deadline, timeout_s, worker)
    return [r or Measurement("skipped", message="not timed: the budget ended first") for r in results]


def _run_worker(
    candidates: Sequence[KernelGraph],
    first: int,
    job: dict[str, Any],
    results: list[Measurement | None],
    deadline: float,
    timeout_s: float,
    worker: Sequence[str],
) -> int:
    """Runs candidates[first:] in one worker until it ends or fails; fills their results; the next to run."""
    with tempfile.TemporaryDirectory(prefix="superopt-timing-") as tmp:
        job_path, out_path, err_path = Path(tmp) / "job.json", Path(tmp) / "results.jsonl", Path(tmp) / "stderr"
        job_path.write_text(json.dumps(job | {"candidates": [to_json(c) for c in candidates[first:]]}))
        out_path.touch()
        done, lines = first, 0
        with err_path.open("w") as err:
            proc = subprocess.Popen([*worker, str(job_path), str(out_path)], stdout=subprocess.DEVNULL, stderr=err)
            since = time.monotonic()

            def collect() -> None:
                nonlocal done, lines, since
                finished = out_path.read_text().split("\n")[:-1]  # a line is complete once its newline is written
                for line in finished[lines:]:
                    results[done] = Measurement(**json.loads(line))
                    done, since = done + 1, time.monotonic()
                lines = len(finished)

            try:
                while proc.poll() is None:
                    collect()
                    now = time.monotonic()
                    if now >= deadline or now - since >= timeout_s:
                        proc.kill()
                        proc.wait()
                        collect()
                        if done < len(candidates):
                            why = f"no result within {timeout_s:g} s" if now < deadline else "the budget ended first"
                            results[done] = Measurement("timeout", message=why)
                        return done + 1 if now < deadline else len(candidates)
                    time.sleep(POLL_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            collect()
        if done < len(candidates) and proc.returncode != CUDA_BROKEN:  # it died in candidate `done`
            message = f"exit code {proc.returncode}: {err_path.read_text()[-2000:]}"
            results[done] = Measurement("crash", message=message)
            return done + 1
        return done


def measure(
    candidate: KernelGraph,
    reference: KernelGraph,
    timeout_s: float = 120.0,
    seed: int = 0,
    reps: int = 100,
    backend: str = "triton",
    scale: float | None = None,
    module_dir: Path | None = None,
) -> Measurement:
    """measure_all of one candidate."""
    return measure_all([candidate], reference, float("inf"), timeout_s, seed, reps, backend, scale, module_dir)[0]


def main(argv: Sequence[str]) -> int:
    """The worker: each candidate of the job in order, its result a line of OUT as soon as it is known."""
    job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())
    with Path(out_path).open("a") as out:
        for candidate in job["candidates"]:
            try:
                result = run_job(job | {"candidate": candidate})
            except Exception:  # noqa: BLE001 (a failure outside compile and check is still the candidate's crash)
                result = Measurement("crash", message=traceback.format_exc()[-2000:])
            out.write(json.dumps(asdict(result)) + "\n")
            out.flush()
            if result.status != "ok":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 (a fault that poisoned this context: the rest need a new one)
                    return CUDA_BROKEN
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
