"""On-device timing: warm-up, L2 flushed before every run, CUDA-graph replay timed with CUDA events, median.

`bench` times a callable in this process. `measure_all` compiles, checks and times candidate µGraphs in order
in a subprocess (`python -m superopt.kernels.timing JOB OUT`) they share while they behave, so the process start
and CUDA set-up are paid once, not a candidate; a compile error, crash, hang or wrong result still costs only the
candidate it happens in and is recorded against it (the rest go on in a fresh process). `measure` is one
candidate. A `Worker` may be started before its job is known (the pipeline starts one as its search begins), so
that its torch import and CUDA set-up overlap the search; `measure_all(..., started=worker)` hands it the job. Each
timed candidate is checked on the GPU against the reference program evaluated in float64 on the same inputs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
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
    """One candidate's outcome: status is ok, compile_error, crash, timeout or wrong; `seconds`: the worker's
    wall time for it (compile, check, time; none where the worker gave no result)."""

    status: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    error_vs_tolerance: float | None = None
    message: str = ""
    seconds: float | None = None


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
PARENT_ENV = "SUPEROPT_TIMING_PARENT"  # the pid of the process that started a worker (it ends when that one goes)


class Worker:
    """One worker process, `command JOB OUT`, in its own temporary folder. Given `job`, JOB is written before it
    starts; without, it starts at once (importing torch, creating its CUDA context) and waits until `submit`
    writes JOB. `close` (also on leaving a `with`) kills it if it still runs and removes its folder; closing
    twice is harmless. The command must be the worker itself (or `exec` it): it watches its parent process."""

    def __init__(self, command: Sequence[str] = WORKER, job: dict[str, Any] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="superopt-timing-")
        folder = Path(self._tmp.name)
        self.job_path, self.out_path, self.err_path = folder / "job.json", folder / "results.jsonl", folder / "stderr"
        self.submitted = job is not None
        try:
            self.out_path.touch()
            if job is not None:
                self.job_path.write_text(json.dumps(job))
            with self.err_path.open("w") as err:  # the child holds its own copy
                self.proc = subprocess.Popen(
                    [*command, str(self.job_path), str(self.out_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=os.environ | {PARENT_ENV: str(os.getpid())},
                )
        except BaseException:
            self._tmp.cleanup()
            raise

    def submit(self, job: dict[str, Any]) -> None:
        """Hands the waiting worker its job (written whole, then renamed: it never reads half a job)."""
        if self.submitted:
            raise RuntimeError("this timing worker already has its job")
        part = self.job_path.with_name("job.json.part")
        part.write_text(json.dumps(job))
        os.replace(part, self.job_path)
        self.submitted = True

    def running(self) -> bool:
        return self.proc.poll() is None

    def waiting(self) -> bool:
        """Started without a job, not handed one yet, and still alive."""
        return not self.submitted and self.running()

    def kill(self) -> None:
        """Ends the process (if it still runs); its files stay until `close`."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    started: Worker | None = None,
) -> list[Measurement]:
    """Compiles, checks and times each candidate against `reference`, in order, in one worker process while they
    behave; never raises for a candidate's faults. A candidate with no result within `timeout_s` (its own part,
    the process start included for the first) is a timeout, one whose worker dies a crash, each recorded against
    it, and the rest go on in a fresh worker. At `deadline` (monotonic seconds) the candidate running is a
    timeout and the rest are skipped. `scale`: the inputs' scale (default: `input_scale(reference)`); `module_dir`:
    where generated modules go; `worker`: the command run as `worker JOB OUT`; `started`: a Worker started
    earlier without a job, which the first candidates then run in (one that died waiting is replaced by a fresh
    one). measure_all owns `started`: it is closed when measure_all returns or raises, used or not."""
    results: list[Measurement | None] = [None] * len(candidates)
    first = 0
    try:
        job = {
            "reference": to_json(reference),
            "seed": seed,
            "reps": reps,
            "backend": backend,
            "scale": scale,
            "module_dir": str(module_dir) if module_dir is not None else None,
        }
        while first < len(candidates) and time.monotonic() < deadline:
            rest = job | {"candidates": [to_json(c) for c in candidates[first:]]}
            if started is not None and started.waiting():
                started.submit(rest)
                w = started
            else:
                w = Worker(worker, rest)
            with w:
                first = _run_worker(w, first, results, deadline, timeout_s)
    finally:
        if started is not None:  # used (then closed already), died waiting, or never handed a job
            started.close()
    return [r or Measurement("skipped", message="not timed: the budget ended first") for r in results]


def _run_worker(w: Worker, first: int, results: list[Measurement | None], deadline: float, timeout_s: float) -> int:
    """Collects the results of worker `w`, which runs candidates first.. of `results`, until it ends or fails;
    the next candidate to run (in a fresh worker)."""
    done, lines, since = first, 0, time.monotonic()

    def collect() -> None:
        nonlocal done, lines, since
        finished = w.out_path.read_text().split("\n")[:-1]  # a line is complete once its newline is written
        for line in finished[lines:]:
            results[done] = Measurement(**json.loads(line))
            done, since = done + 1, time.monotonic()
        lines = len(finished)

    while w.running():
        collect()
        now = time.monotonic()
        if now >= deadline or now - since >= timeout_s:
            w.kill()
            collect()
            if done < len(results):
                why = f"no result within {timeout_s:g} s" if now < deadline else "the budget ended first"
                results[done] = Measurement("timeout", message=why)
            return done + 1 if now < deadline else len(results)
        time.sleep(POLL_S)
    collect()
    if done < len(results) and w.proc.returncode != CUDA_BROKEN:  # it died in candidate `done`
        results[done] = Measurement("crash", message=f"exit code {w.proc.returncode}: {w.err_path.read_text()[-2000:]}")
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


def warm_up() -> None:
    """What every candidate needs and none changes, done before the job comes: the CUDA context and Triton's
    driver. A failure here is left for the first candidate to meet and record."""
    try:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        import triton

        triton.runtime.driver.active.get_current_device()
    except Exception:  # noqa: BLE001 (recorded against the first candidate, which meets it again)
        pass


def main(argv: Sequence[str]) -> int:
    """The worker: set up, wait for JOB (written by Worker.submit), then each candidate of the job in order, its
    result (with the seconds it took here) a line of OUT as soon as it is known. It ends, without finishing, when
    the process that started it is gone (SIGKILLed, say): no one waits for the rest."""
    job_path, out_path = argv
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())  # taken at the start: the parent may be gone already

    def orphaned() -> bool:
        return os.getppid() != parent

    warm_up()
    while not Path(job_path).exists():
        if orphaned():
            return 0
        time.sleep(POLL_S)
    job = json.loads(Path(job_path).read_text())
    with Path(out_path).open("a") as out:
        for candidate in job["candidates"]:
            if orphaned():
                return 0
            start = time.monotonic()
            try:
                result = run_job(job | {"candidate": candidate})
            except Exception:  # noqa: BLE001 (a failure outside compile and check is still the candidate's crash)
                result = Measurement("crash", message=traceback.format_exc()[-2000:])
            result = replace(result, seconds=round(time.monotonic() - start, 3))
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
