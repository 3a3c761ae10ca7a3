"""The pipeline, the one place that knows the order:

cache lookup -> search (superopt.search_space, which verifies what it keeps) -> rank by the cost model ->
on a GPU: compile, check and time the top k (kernels/timing.py, each candidate in its own process) against torch
eager and torch.compile timed in the same run, and each time as a fraction of the program's floor;
without a GPU: run the best-ranked candidate's Triton code under the Triton interpreter against the reference
interpreter, and say that timing needs a GPU -> Result -> cache store.

The input program itself is always a candidate (verified by identity), so there is a winner even when the search
finds nothing within its budget, and measured time can prefer it to a fused candidate the model liked.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from superopt.cache import Cache, TrialLog, cache_key, now, versions
from superopt.errors import IRError, SuperoptError
from superopt.interpret import REFERENCE, random_inputs, run
from superopt.ir import KernelGraph, rename_inputs
from superopt.kernels import compile
from superopt.kernels.cost import floor
from superopt.kernels.device import DEVICES, DeviceSpec, detect, get_device
from superopt.kernels.lower import lower
from superopt.kernels.timing import bench, check, input_scale, measure, random_device_inputs
from superopt.kernels.triton_codegen import use_interpreter
from superopt.result import Baseline, Candidate, Result, Row, Trial
from superopt.search_space import program_candidate, search
from superopt.search_space.presets import PRESETS
from superopt.spec import SEARCH_CHECKS, check_name
from superopt.verification import verify
from superopt.verification.shrink import shrink

MODES = ("search", "offline", "require-hit")
TOP_K = 5
# The Triton interpreter runs about 8 ms per block and loop iteration (numpy, one core); beyond this many the
# CPU check would take minutes, so it is skipped and says so.
INTERPRETER_MAX_STEPS = 2048
INTERPRETER_S_PER_STEP = 0.008
RECHECK_TESTS = 3  # finite-field tests that re-verify a cached winner on every hit (milliseconds)


def check_device(value: Any) -> str:
    if check_name(value).lower() not in DEVICES:
        raise IRError(f"expected a device name ({', '.join(DEVICES)}), got {value!r}")
    return value


def check_preset(value: Any) -> str:
    if check_name(value) not in PRESETS:
        raise IRError(f"expected a preset name ({', '.join(PRESETS)}), got {value!r}")
    return value


# Every setting a spec's `search:` section or `superopt search` may give, and its check.
SETTING_CHECKS = SEARCH_CHECKS | {"device": check_device, "preset": check_preset}


@dataclass(frozen=True)
class Settings:
    """How to search: preset and seed change the answer (they are in the cache key); the budget bounds it."""

    preset: str | None = None
    budget_s: float = 120.0
    seed: int = 0
    prune: bool = True
    device: str | None = None  # a DeviceSpec name; None: the GPU present, else h100

    def __post_init__(self) -> None:
        for key, checked in SETTING_CHECKS.items():
            value = getattr(self, key)
            if value is not None:
                try:
                    checked(value)
                except IRError as e:
                    raise SuperoptError(f"search {key}: {e}") from None

    @classmethod
    def merged(cls, given: dict[str, Any], **overrides: Any) -> Settings:
        """A spec's `search:` section (`given`), then every override that is not None."""
        return cls(**{**given, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def for_graph(cls, graph: KernelGraph, **overrides: Any) -> Settings:
        """The graph's spec's `search:` section, then every override that is not None."""
        return cls.merged(graph.search_settings, **overrides)


def device_spec(name: str | None) -> DeviceSpec:
    """The DeviceSpec to rank for: `name`, else the GPU present, else the H100."""
    return get_device(name) if name else detect() or DEVICES["h100"]


@dataclass
class Outcome:
    """status: hit (from the cache), searched, offline (no search: the unfused program), or miss (require-hit)."""

    status: str
    key: str
    result: Result | None
    note: str
    program: KernelGraph | None = None  # the program asked for: the winner takes its name and input names

    @property
    def winner(self) -> KernelGraph:
        if self.result is None:
            raise SuperoptError(f"no result for cache key {self.key[:16]}: {self.note}")
        best = self.result.best.graph
        if self.program is None:
            return best
        return rename_inputs(best, self.program.inputs, self.program.name)


def eager(graph: KernelGraph) -> Callable[..., Any]:
    """The program as torch code, one torch op per kernel op, in the graph's dtypes (the eager baseline)."""

    def program(*args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env = dict(zip(graph.inputs, args))
        for op in graph.ops:
            env[op.outputs[0]] = REFERENCE[op.op](*(env[i] for i in op.inputs), **op.attrs)
        outs = tuple(env[o] for o in graph.outputs)
        return outs[0] if len(outs) == 1 else outs

    return program


def fresh_compile(program: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """torch.compile with dynamo's caches cleared: every `eager` program shares one code object, and past
    dynamo's recompile limit a later one would silently run eagerly."""
    torch._dynamo.reset()
    return torch.compile(program, dynamic=False, **options)


def trusted_winner(result: Result) -> str | None:
    """Why a cached result's winner must not be served (None if it may): it must compute the result's program,
    whose hash the cache has matched to the key. The finite-field test decides as the search's verification did
    (proofs only upgrade "tested" to "proved"); what it leaves undecided the search would not have kept either."""
    try:
        verdict = verify(result.program, result.best.graph, tests=RECHECK_TESTS, prove=False)
    except Exception as e:  # noqa: BLE001 (an untrusted winner that breaks the verifier is refused, not fatal)
        return f"its winner cannot be checked against its program ({type(e).__name__}: {e})"
    if verdict.equivalent is not True:
        return "its winner does not compute its program: " + "; ".join(str(verdict).splitlines())
    return None


def interpreter_steps(graph: KernelGraph) -> int:
    """Block iterations of `graph` (grid size x loop range, summed over kernels): the interpreter's work."""
    return sum(math.prod(b.grid) * b.forloop_range for b in (lower(graph, op) for op in graph.ops))


def _check_on_cpu(
    program: KernelGraph, tried: Sequence[Candidate], seed: int, log: TrialLog, module_dir: Path | None
) -> tuple[Candidate, dict[str, Trial]]:
    """The first of `tried` whose Triton code, run under the interpreter on seeded random inputs, matches the
    reference interpreter in float64 within its dtype's tolerance, and the trials up to it. A candidate too large
    to interpret runs on one chunk of its batch dims (verification/shrink.py: the chunk computes the same
    function as the whole); one still too large is taken as is."""
    use_interpreter()
    trials: dict[str, Trial] = {}
    for c in tried:
        reference, graph, shrunk = program, c.graph, ()
        if interpreter_steps(graph) > INTERPRETER_MAX_STEPS:
            reference, graph, shrunk = shrink(program, c.graph)
        steps = interpreter_steps(graph)
        if steps > INTERPRETER_MAX_STEPS:
            trial = Trial(
                "unchecked",
                message=f"{steps} block iterations, about {steps * INTERPRETER_S_PER_STEP:.0f} s under the Triton "
                "interpreter: not run here (its verification record stands; a GPU run checks it)",
            )
        else:
            try:
                inputs = random_inputs(reference, seed, input_scale(reference, seed))
                outs = compile(graph, module_dir=module_dir)(*(inputs[n] for n in reference.inputs))
                exact, own = run(reference, inputs, "float64"), run(reference, inputs, "native")
                error = check(reference, outs, exact, own)
                where = "one chunk: " + "; ".join(shrunk) if shrunk else None
                trial = Trial("ok" if error <= 1 else "wrong", error_vs_tolerance=error, checked_on=where)
            except Exception as e:  # noqa: BLE001 (a candidate's codegen failure is recorded against it)
                trial = Trial("compile_error", message=f"{type(e).__name__}: {e}"[:500])
        trials[c.hash] = trial
        log.write(hash=c.hash, status=trial.status, predicted_us=c.predicted_us, measured_us=None)
        if trial.status in ("ok", "unchecked"):
            return c, trials
    raise SuperoptError(
        f"{program.name}: no candidate, the unfused program included, ran correctly under the Triton interpreter "
        f"(the program: {trial.status} {trial.message or ''})"
    )


def _bench_or_error(make: Callable[[], Callable[[], Any]], cuda_graph: bool) -> Baseline:
    try:
        fn = make()
        return Baseline("ok", bench(fn, cuda_graph=cuda_graph).median_us)
    except Exception as e:  # noqa: BLE001 (a baseline that fails is reported, not fatal)
        return Baseline("error", message=f"{type(e).__name__}: {e}"[:500])


def _time_on_gpu(
    program: KernelGraph, tried: Sequence[Candidate], seed: int, log: TrialLog, module_dir: Path | None
) -> tuple[dict[str, Baseline], dict[str, Trial]]:
    """Times torch eager, torch.compile and the candidates `tried` in this run: the baselines and the trials."""
    scale = input_scale(program, seed)
    inputs = random_device_inputs(program, seed, scale)
    args = [inputs[n] for n in program.inputs]
    fn = eager(program)

    def compiled() -> Callable[[], Any]:
        c = fresh_compile(fn)
        return lambda: c(*args)

    baselines = {  # as benchmarks/peers.py times them: eager launched from Python, torch.compile in a CUDA graph
        "eager": _bench_or_error(lambda: lambda: fn(*args), cuda_graph=False),
        "torch.compile": _bench_or_error(compiled, cuda_graph=True),
    }
    trials = {}
    for c in tried:
        m = measure(c.graph, program, seed=seed, scale=scale, module_dir=module_dir)
        trials[c.hash] = Trial(m.status, m.median_us, m.error_vs_tolerance, message=m.message or None)
        log.write(hash=c.hash, status=m.status, predicted_us=c.predicted_us, measured_us=m.median_us)
    return baselines, trials


def _row(c: Candidate, rank: int, trial: Trial | None, baselines: dict[str, Baseline], floor_us: float) -> Row:
    us = trial.measured_us if trial is not None else None
    if not us:
        return Row(rank, c.hash, c.source, c.kernels, c.predicted_us, trial)
    speedups = {name: base.median_us / us for name, base in baselines.items() if base.median_us is not None}
    return Row(rank, c.hash, c.source, c.kernels, c.predicted_us, trial, speedups, floor_us / us)


def optimize_program(
    graph: KernelGraph,
    settings: Settings | None = None,
    cache: Cache | None = None,
    mode: str = "search",
    progress: str = "auto",
    top_k: int = TOP_K,
    say: Callable[[str], None] = lambda line: None,
) -> Outcome:
    """Finds (or looks up) the fastest verified µGraph for `graph`.

    mode "search": a cache hit, else a search whose result is stored (a stored result with a smaller budget is
    searched again and upgraded); "offline": never searches, a miss gives the unfused program; "require-hit": a
    miss gives status "miss" and no result. `say` receives one-line progress notes."""
    if mode not in MODES:
        raise SuperoptError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    settings = settings or Settings.for_graph(graph)
    device = device_spec(settings.device)
    key = cache_key(graph, dataclasses.asdict(settings), device.name)
    stored = cache.get(key, trusted_winner) if cache is not None else None
    if stored is not None:
        budget = stored.settings["budget_s"]
        if mode != "search" or budget >= settings.budget_s:
            note = f"cache hit {key[:16]} (a {budget:g} s search of {stored.created})"
            return Outcome("hit", key, stored, note, graph)
        say(f"cached result {key[:16]} has a budget of {budget:g} s < {settings.budget_s:g} s: searching again")
    if mode == "require-hit":
        return Outcome("miss", key, None, f"cache miss {key[:16]} (--require-hit: no search)")

    started = time.time()
    searching = mode == "search"
    log = TrialLog(cache if searching else None, key)
    try:
        stats = None
        if searching:

            def found(c: Candidate) -> None:
                log.write(hash=c.hash, status="found", kernels=c.kernels, predicted_us=c.predicted_us, measured_us=None)

            searched = search(
                graph,
                preset=settings.preset,
                budget_s=settings.budget_s,
                device=device.name,
                seed=settings.seed,
                prune=settings.prune,
                progress=progress,
                on_candidate=found,
            )
            candidates, stats = searched.candidates, searched.stats.to_json()
        else:
            candidates = [program_candidate(graph, device)]
        # by the model; the program first among equals
        ranked = sorted(candidates, key=lambda c: (c.predicted_us, c.source != "program"))
        kernel_dir = cache.kernel_dir if cache is not None else None
        floor_us = floor(graph, device).us
        best, best_trial, rows, baselines = _evaluate(graph, ranked, settings.seed, floor_us, top_k, log, kernel_dir)
    finally:
        log.close()
    result = Result(
        name=graph.name,
        program=graph,
        settings=dataclasses.asdict(settings) | {"device": device.name},
        device=device.name,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        versions=versions(),
        floor_us=floor_us,
        best=best,
        best_trial=best_trial,
        candidates=rows,
        candidates_total=len(ranked),
        baselines=baselines,
        key=key,
        created=now(),
        seconds=round(time.time() - started, 2),
        search=stats,
    )
    if not searching:
        note = f"cache miss {key[:16]}: offline, so the unfused program, no search"
        return Outcome("offline", key, result, note, graph)
    put = cache is not None and cache.put(result)
    where = f"; stored in {cache.path(key)}" if put else ""
    note = f"searched in {result.seconds:g} s: {len(ranked)} candidates, the unfused program included{where}"
    return Outcome("searched", key, result, note, graph)


def _evaluate(
    program: KernelGraph,
    ranked: list[Candidate],
    seed: int,
    floor_us: float,
    top_k: int,
    log: TrialLog,
    module_dir: Path | None,
) -> tuple[Candidate, Trial | None, tuple[Row, ...], dict[str, Baseline]]:
    """Picks the winner (by measured time on a GPU, by the model and an interpreter check without): the winner,
    its trial, the rows of the candidates tried and the baselines timed. Kernel modules go to `module_dir`."""
    # the top k by the model, and the unfused program as the fallback that is always correct
    tried = ranked[:top_k] + [c for c in ranked[top_k:] if c.source == "program"]
    if torch.cuda.is_available():
        baselines, trials = _time_on_gpu(program, tried, seed, log, module_dir)
        timed = [c for c in tried if trials[c.hash].status == "ok"]
        unfused = next(c for c in tried if c.source == "program")
        best = min(timed, key=lambda c: trials[c.hash].measured_us) if timed else unfused
    else:
        baselines = {}
        best, trials = _check_on_cpu(program, tried, seed, log, module_dir)
    rows = tuple(_row(c, ranked.index(c), trials.get(c.hash), baselines, floor_us) for c in tried)
    return best, trials.get(best.hash), rows, baselines
