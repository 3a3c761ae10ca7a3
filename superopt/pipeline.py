"""The pipeline, the one place that knows the order:

cache lookup -> search (superopt.search_space, which verifies what it keeps) -> rank by the cost model ->
on a GPU: compile, check and time the top k, best predicted first (kernels/timing.py: one worker process, started
as the search starts so that its torch import and CUDA set-up overlap it) against torch eager and torch.compile
timed in the same run, and each time as a fraction of the program's floor;
without a GPU: run the best-ranked candidate's Triton code under the Triton interpreter against the reference
interpreter, and say that timing needs a GPU -> Result -> cache store.

The input program itself is always a candidate (verified by identity), so there is a winner even when the search
finds nothing within its budget, and measured time can prefer it to a fused candidate the model liked.

The wall budget (`Settings.budget_s`) bounds all of it per program, from the cache lookup to the stored result:
the search gets SEARCH_SHARE of it (on a GPU SEARCH_SHARE_GPU, and no more than leaves the time to time one
candidate after it: `_search_s`), and whatever the search leaves goes to the checks after it, which run only what
fits: an interpreter run whose estimated time exceeds what is left, the candidates' timing with less than one
candidate's estimated time left (`candidate_s`; the worker times them in order: kernels/timing.py's measure_all;
the deadline ends it), or torch.compile with less than COMPILE_MIN_S, is skipped and says so. The timing worker
is killed on every way out of `optimize_program`, an exception's included. Each stage stops at its deadline, so
the whole ends within the budget up to one step's overrun. A result records which budgets cut it (`Result.cut`);
the cache serves an uncut (exhaustive) result for any budget, and searches again where a budget that cut the
stored one is larger now.
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
from superopt.kernels.timing import (
    WORKER,
    Measurement,
    Worker,
    bench,
    check,
    input_scale,
    measure_all,
    random_device_inputs,
)
from superopt.kernels.triton_codegen import use_interpreter
from superopt.result import Baseline, Candidate, Result, Row, Trial
from superopt.search_space import program_candidate, search
from superopt.search_space.api import search_preset
from superopt.search_space.presets import PRESETS
from superopt.spec import SEARCH_CHECKS, check_name
from superopt.verification import verify
from superopt.verification.shrink import shrink

MODES = ("search", "offline", "require-hit")
TOP_K = 5
# The Triton interpreter runs 2.5 to 5 ms per block and loop iteration (numpy, one core; measured on a busy 2-core
# machine); beyond this many the CPU check would take longer than most searches, so it is skipped and says so.
INTERPRETER_MAX_STEPS = 2048
INTERPRETER_S_PER_STEP = 0.005
INTERPRETER_START_S = 0.25  # generating and loading one candidate's module, the references (at most 0.2 s here)
RECHECK_TESTS = 3  # finite-field tests that re-verify a cached winner on every hit (milliseconds)
# Of the wall budget: the search's share, without and with a GPU; the rest is for checking, compiling and timing.
SEARCH_SHARE, SEARCH_SHARE_GPU = 0.85, 0.5
END_S = 0.05  # of the budget, kept for what follows the last deadline (the result, the cache write)
# Estimates (seconds, one H100) of what timing needs: the worker's start (torch import, CUDA context; it runs
# beside the search, so it costs the budget only where the search is shorter), this process's eager baseline after
# the search (CUDA set-up, the inputs, the timing), and one candidate's compile, check and timing in a started
# worker, until this process has measured some (`candidate_s`).
WORKER_START_S = 6.0
EAGER_S = 3.0
MEASURE_MIN_S = 5.0
MEASURED_KEPT = 16  # the per-candidate times `candidate_s` takes the largest of: the last this many timed
TIMING_WORKER = WORKER  # the command the timing worker runs as (tests put a fake one here)
MEASURE_TIMEOUT_S = 120.0  # the most one candidate's timing may take
COMPILE_MIN_S = 20.0  # torch.compile's baseline (inductor, in this process: it cannot be stopped) needs this


def on_gpu() -> bool:
    """Whether candidates are timed here (a CUDA GPU is present) rather than checked under the interpreter."""
    return torch.cuda.is_available()


_measured_s: list[float] = []  # wall seconds of the candidates timed in this process, the last MEASURED_KEPT


def candidate_s() -> float:
    """What timing one candidate (compile, check, time) in a started worker takes: the longest of the last
    MEASURED_KEPT that timed correctly in this process, else the estimate MEASURE_MIN_S."""
    return max(_measured_s[-MEASURED_KEPT:], default=MEASURE_MIN_S)


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
    """How to search: preset and seed change the answer (they are in the cache key); the budgets bound it: the
    wall budget in seconds, and the states budget of the enumeration (None: the preset's max_states), a count
    that ends it at the same place on any machine."""

    preset: str | None = None
    budget_s: float = 120.0
    seed: int = 0
    prune: bool = True
    device: str | None = None  # a DeviceSpec name; None: the GPU present, else h100
    states: int | None = None
    ray: str | None = None  # a Ray cluster's address to search on: where it runs, not what it finds (not stored)

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


def interpreted(program: KernelGraph, graph: KernelGraph) -> tuple[KernelGraph, KernelGraph, tuple[str, ...], int]:
    """What the CPU check runs of candidate `graph` of `program`: the reference, the graph (one chunk of each
    where the whole is too large to interpret), how they were chunked, and the block iterations of the graph."""
    reference, shrunk = program, ()
    if interpreter_steps(graph) > INTERPRETER_MAX_STEPS:
        reference, graph, shrunk = shrink(program, graph)
    return reference, graph, shrunk, interpreter_steps(graph)


def _check_on_cpu(
    program: KernelGraph,
    tried: Sequence[Candidate],
    seed: int,
    log: TrialLog,
    module_dir: Path | None,
    deadline: float,
) -> tuple[Candidate, dict[str, Trial], bool]:
    """The first of `tried` whose Triton code, run under the interpreter on seeded random inputs, matches the
    reference interpreter in float64 within its dtype's tolerance, the trials up to it, and whether the deadline
    (monotonic seconds) cut a check. A candidate too large to interpret runs on one chunk of its batch dims
    (verification/shrink.py: the chunk computes the same function as the whole); one still too large, or whose
    run would end past the deadline, is taken as is."""
    use_interpreter()
    trials: dict[str, Trial] = {}
    cut = False
    for c in tried:
        reference, graph, shrunk, steps = interpreted(program, c.graph)
        estimate, left = INTERPRETER_START_S + steps * INTERPRETER_S_PER_STEP, deadline - time.monotonic()
        if steps > INTERPRETER_MAX_STEPS:
            trial = Trial(
                "unchecked",
                message=f"{steps} block iterations, about {steps * INTERPRETER_S_PER_STEP:.0f} s under the Triton "
                "interpreter: not run here (its verification record stands; a GPU run checks it)",
            )
        elif estimate > left:
            cut = True
            trial = Trial(
                "unchecked",
                message=f"about {estimate:.0f} s under the Triton interpreter, {max(left, 0):.0f} s left of the "
                "budget: not run (its verification record stands; a larger budget or a GPU run checks it)",
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
            return c, trials, cut
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
    program: KernelGraph,
    tried: Sequence[Candidate],
    seed: int,
    log: TrialLog,
    module_dir: Path | None,
    deadline: float,
    started: Worker | None = None,
) -> tuple[dict[str, Baseline], dict[str, Trial], bool]:
    """Times torch eager, the candidates `tried` (in their order) and torch.compile in this run, as far as the
    deadline (monotonic seconds) allows: the baselines, the trials, and whether the deadline skipped any.
    `started`: a timing worker started earlier, waiting for its job (closed here, used or not)."""
    scale = input_scale(program, seed)
    inputs = random_device_inputs(program, seed, scale)
    args = [inputs[n] for n in program.inputs]
    fn = eager(program)

    def compiled() -> Callable[[], Any]:
        c = fresh_compile(fn)
        return lambda: c(*args)

    def skipped(needs: float) -> str | None:
        left = deadline - time.monotonic()
        return f"not timed: {max(left, 0):.0f} s left of the budget, {needs:g} s needed" if left < needs else None

    # as benchmarks/peers.py times them: eager launched from Python (milliseconds), torch.compile in a CUDA graph
    baselines = {"eager": _bench_or_error(lambda: lambda: fn(*args), cuda_graph=False)}
    why = skipped(round(candidate_s(), 1))
    if why is None:
        graphs = [c.graph for c in tried]
        measured = measure_all(
            graphs,
            program,
            deadline,
            MEASURE_TIMEOUT_S,
            seed,
            scale=scale,
            module_dir=module_dir,
            worker=TIMING_WORKER,
            started=started,
        )
        _measured_s.extend(m.seconds for m in measured if m.status == "ok" and m.seconds is not None)
        del _measured_s[:-MEASURED_KEPT]
    else:
        if started is not None:
            started.close()
        measured = [Measurement("skipped", message=why)] * len(tried)
    trials = {}
    for c, m in zip(tried, measured):
        trials[c.hash] = Trial(m.status, m.median_us, m.error_vs_tolerance, message=m.message or None)
        log.write(hash=c.hash, status=m.status, predicted_us=c.predicted_us, measured_us=m.median_us, s=m.seconds)
    why = skipped(COMPILE_MIN_S)
    baselines["torch.compile"] = (
        Baseline("skipped", message=why) if why is not None else _bench_or_error(compiled, cuda_graph=True)
    )
    cut = any(t.status == "skipped" for t in trials.values()) or why is not None
    return baselines, trials, cut


def _row(c: Candidate, rank: int, trial: Trial | None, baselines: dict[str, Baseline], floor_us: float) -> Row:
    us = trial.measured_us if trial is not None else None
    if not us:
        return Row(rank, c.hash, c.source, c.kernels, c.predicted_us, trial)
    speedups = {name: base.median_us / us for name, base in baselines.items() if base.median_us is not None}
    return Row(rank, c.hash, c.source, c.kernels, c.predicted_us, trial, speedups, floor_us / us)


def _search_s(graph: KernelGraph, budget_s: float) -> float:
    """The search's part of a program's wall budget. On a GPU SEARCH_SHARE_GPU of it, but no more than leaves
    the time to time the best-ranked candidate after the search (the eager baseline, then one candidate in the
    worker started beside the search), where the budget holds the worker's start and that at all; without a GPU,
    what is left after the interpreter check of a winner like the program (its own check's estimate, at most
    half the budget), so that a small budget still checks the winner."""
    if on_gpu():
        usable, after = (1 - END_S) * budget_s, EAGER_S + candidate_s()
        if WORKER_START_S + after > usable:  # too small to time even one candidate: the search keeps its share
            return SEARCH_SHARE_GPU * budget_s
        return min(SEARCH_SHARE_GPU * budget_s, usable - after)
    steps = interpreted(graph, graph)[3]
    check_s = INTERPRETER_START_S + steps * INTERPRETER_S_PER_STEP if steps <= INTERPRETER_MAX_STEPS else 0.0
    return min(SEARCH_SHARE * budget_s, (1 - END_S) * budget_s - min(check_s, budget_s / 2))


def stale(stored: Result, budget_s: float, states: int) -> str | None:
    """Why a search with these budgets may find more than the stored result did (None: it may not): a budget
    that cut the stored search is larger now. A result no budget cut (an exhaustive search) is final."""
    if "time" in stored.cut and stored.settings["budget_s"] < budget_s:
        return f"was cut by its budget of {stored.settings['budget_s']:g} s < {budget_s:g} s"
    if "states" in stored.cut and (stored.settings.get("states") or 0) < states:
        return f"was cut by its states budget of {stored.settings.get('states') or 0} < {states}"
    return None


def optimize_program(
    graph: KernelGraph,
    settings: Settings | None = None,
    cache: Cache | None = None,
    mode: str = "search",
    progress: str = "auto",
    top_k: int = TOP_K,
    say: Callable[[str], None] = lambda line: None,
) -> Outcome:
    """Finds (or looks up) the fastest verified µGraph for `graph`, within `settings.budget_s` of wall time.

    mode "search": a cache hit, else a search whose result is stored (a stored result that a budget cut is
    searched again, and upgraded, where that budget is larger now; see `stale`); "offline": never searches, a
    miss gives the unfused program; "require-hit": a miss gives status "miss" and no result. `say` receives
    one-line progress notes."""
    clock = time.monotonic()
    if mode not in MODES:
        raise SuperoptError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    settings = settings or Settings.for_graph(graph)
    device = device_spec(settings.device)
    states = settings.states if settings.states is not None else search_preset(graph, settings.preset).max_states
    key = cache_key(graph, dataclasses.asdict(settings), device.name)
    stored = cache.get(key, trusted_winner) if cache is not None else None
    if stored is not None:
        why = stale(stored, settings.budget_s, states) if mode == "search" else None
        if why is None:
            how = "an exhaustive" if not stored.cut else f"a {stored.settings['budget_s']:g} s"
            note = f"cache hit {key[:16]} ({how} search of {stored.created})"
            return Outcome("hit", key, stored, note, graph)
        say(f"cached result {key[:16]} {why}: searching again")
    if mode == "require-hit":
        return Outcome("miss", key, None, f"cache miss {key[:16]} (--require-hit: no search)")

    started = time.time()
    deadline = clock + (1 - END_S) * settings.budget_s
    searching = mode == "search"
    log = TrialLog(cache if searching else None, key)
    worker = None
    try:
        # the timing worker, started now so that its torch import and CUDA set-up run beside the search; closed
        # on every way out (and by measure_all, which hands it its job, as soon as the timing ends)
        worker = Worker(TIMING_WORKER) if on_gpu() else None
        stats, cut = None, set()
        if searching:

            def found(c: Candidate) -> None:
                log.write(hash=c.hash, status="found", kernels=c.kernels, predicted_us=c.predicted_us, measured_us=None)

            searched = search(
                graph,
                preset=settings.preset,
                budget_s=max(_search_s(graph, settings.budget_s) - (time.monotonic() - clock), 0.0),
                device=device.name,
                seed=settings.seed,
                prune=settings.prune,
                progress=progress,
                on_candidate=found,
                states=states,
                ray=settings.ray,
            )
            candidates, stats, cut = searched.candidates, searched.stats.to_json(), set(searched.stats.cut)
        else:
            candidates = [program_candidate(graph, device)]
        # by the model; the program first among equals
        ranked = sorted(candidates, key=lambda c: (c.predicted_us, c.source != "program"))
        kernel_dir = cache.kernel_dir if cache is not None else None
        floor_us = floor(graph, device).us
        evaluated = _evaluate(graph, ranked, settings.seed, floor_us, top_k, log, kernel_dir, deadline, worker)
        best, best_trial, rows, baselines, evaluation_cut = evaluated
    finally:
        if worker is not None:
            worker.close()
        log.close()
    result = Result(
        name=graph.name,
        program=graph,
        settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "ray"}
        | {"device": device.name, "states": states},
        device=device.name,
        gpu=torch.cuda.get_device_name() if on_gpu() else None,
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
        cut=tuple(sorted(cut | ({"time"} if evaluation_cut else set()))),
    )
    if not searching:
        note = f"cache miss {key[:16]}: offline, so the unfused program, no search"
        return Outcome("offline", key, result, note, graph)
    put = cache is not None and cache.put(result)
    where = f"; stored in {cache.path(key)}" if put else ""
    how = "exhaustive" if not result.cut else "cut by the " + " and ".join(result.cut) + " budget"
    note = f"searched in {result.seconds:g} s ({how}): {len(ranked)} candidates, the unfused program included{where}"
    return Outcome("searched", key, result, note, graph)


def _evaluate(
    program: KernelGraph,
    ranked: list[Candidate],
    seed: int,
    floor_us: float,
    top_k: int,
    log: TrialLog,
    module_dir: Path | None,
    deadline: float,
    started: Worker | None = None,
) -> tuple[Candidate, Trial | None, tuple[Row, ...], dict[str, Baseline], bool]:
    """Picks the winner (by measured time on a GPU, by the model and an interpreter check without) by the
    deadline (monotonic seconds): the winner, its trial, the rows of the candidates tried, the baselines timed,
    and whether the deadline cut a check or a timing. Kernel modules go to `module_dir`; `started`: the timing
    worker started beside the search (on a GPU)."""
    # the top k by the model, best predicted first (timed in this order), and the unfused program as the
    # fallback that is always correct
    tried = ranked[:top_k] + [c for c in ranked[top_k:] if c.source == "program"]
    if on_gpu():
        baselines, trials, cut = _time_on_gpu(program, tried, seed, log, module_dir, deadline, started)
        timed = [c for c in tried if trials[c.hash].status == "ok"]
        unfused = next(c for c in tried if c.source == "program")
        best = min(timed, key=lambda c: trials[c.hash].measured_us) if timed else unfused
    else:
        baselines = {}
        best, trials, cut = _check_on_cpu(program, tried, seed, log, module_dir, deadline)
    rows = tuple(_row(c, ranked.index(c), trials.get(c.hash), baselines, floor_us) for c in tried)
    return best, trials.get(best.hash), rows, baselines, cut
