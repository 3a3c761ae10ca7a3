"""The pipeline, the one place that knows the order (DESIGN.md "Results and cache", "Ranking and code"):

cache lookup -> search (superopt.search_space, which verifies what it keeps) -> rank by the cost model ->
on a GPU: compile, check and time the top k (kernels/timing.py, each candidate in its own process) against torch
eager and torch.compile timed in the same run, and each time as a fraction of the program's floor;
without a GPU: run the best-ranked candidate's Triton code under the Triton interpreter against the reference
interpreter, and say that timing needs a GPU -> result JSON -> cache store.

The input program itself is always a candidate (verified by identity), so there is a winner even when the search
finds nothing within its budget, and measured time can prefer it to a fused candidate the model liked.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from superopt.cache import Cache, TrialLog, cache_key, now, versions
from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.serialize import from_json, graph_hash, to_json

MODES = ("search", "offline", "require-hit")
TOP_K = 5
# The Triton interpreter runs about 8 ms per block and loop iteration (numpy, one core); beyond this many the
# CPU check would take minutes, so it is skipped and says so.
INTERPRETER_MAX_STEPS = 2048
INTERPRETER_S_PER_STEP = 0.008
RECHECK_TESTS = 3  # finite-field tests that re-verify a cached winner on every hit (milliseconds)


@dataclass(frozen=True)
class Settings:
    """How to search: preset and seed change the answer (they are in the cache key); the budget bounds it."""

    preset: str | None = None
    budget_s: float = 120.0
    seed: int = 0
    prune: bool = True
    device: str | None = None  # a DeviceSpec name; None: the GPU present, else h100

    @classmethod
    def for_graph(cls, graph: KernelGraph, **overrides: Any) -> Settings:
        """The spec's `search:` section, then every override that is not None."""
        given = {**graph.search_settings, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**given)


def device_spec(name: str | None) -> Any:
    """The DeviceSpec to rank for: `name`, else the GPU present, else the H100."""
    from superopt.kernels.device import DEVICES, detect, get_device

    return get_device(name) if name else detect() or DEVICES["h100"]


def jsonable(x: Any) -> Any:
    """A JSON form of a verification record or search statistics (dataclasses, dicts, numbers, tensors)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf or nan
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"tensor{list(x.shape)}"
    return str(x)


@dataclass(eq=False)  # identity: ranked.index(c) finds c itself
class Ranked:
    """A candidate as the pipeline sees it: its µGraph, the model's time and, once tried, what happened."""

    graph: KernelGraph
    hash: str
    kernels: int
    predicted_us: float
    verify: Any
    source: str  # "program" (the input, op by op) or "search"
    trial: dict[str, Any] = field(default_factory=dict)  # status, measured_us, error_vs_tolerance, message


@dataclass
class Outcome:
    """status: hit (from the cache), searched, offline (no search: the unfused program), or miss (require-hit)."""

    status: str
    key: str
    result: dict[str, Any] | None
    note: str

    @property
    def winner(self) -> KernelGraph:
        if self.result is None:
            raise SuperoptError(f"no result for cache key {self.key[:16]}: {self.note}")
        return from_json(self.result["best"]["graph"], f"cache entry {self.key[:16]}")


def eager(graph: KernelGraph) -> Callable[..., Any]:
    """The program as torch code, one torch op per kernel op, in the graph's dtypes (the eager baseline)."""
    from superopt.interpret import REFERENCE

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


def trusted_winner(entry: dict[str, Any]) -> str | None:
    """Why a cached entry's winner must not be served (None if it may): it must compute the entry's program, whose
    hash the cache has matched to the key. The finite-field test decides as the search's verification did (proofs
    only upgrade "tested" to "proved"); what it leaves undecided the search would not have kept either."""
    from superopt.verify import verify  # z3 loads only when a cached winner is checked: `import superopt` stays fast

    program = from_json(entry["program"], f"cache entry {entry['key'][:16]}")
    winner = from_json(entry["best"]["graph"], f"cache entry {entry['key'][:16]}")
    try:
        result = verify(program, winner, tests=RECHECK_TESTS, prove=False)
    except Exception as e:  # noqa: BLE001 (an untrusted winner that breaks the verifier is refused, not fatal)
        return f"its winner cannot be checked against its program ({type(e).__name__}: {e})"
    if result.equivalent is not True:
        return "its winner does not compute its program: " + "; ".join(str(result).splitlines())
    return None


def _program_candidate(graph: KernelGraph, device: Any) -> Ranked:
    from superopt.kernels.cost import predict

    return Ranked(
        graph, graph_hash(graph), len(graph.ops), predict(graph, device).us, {"method": "identity"}, "program"
    )


def _search(graph: KernelGraph, settings: Settings, device: Any, progress: str, log: TrialLog) -> tuple[list, Any]:
    from superopt.search_space import search  # the heavy part (z3): only when a search runs

    def found(c: Any) -> None:
        log.write(hash=c.hash, status="found", kernels=c.kernels, predicted_us=c.predicted_us, measured_us=None)

    result = search(
        graph,
        preset=settings.preset,
        budget_s=settings.budget_s,
        device=device.name,
        seed=settings.seed,
        prune=settings.prune,
        progress=progress,
        on_candidate=found,
    )
    ranked = [Ranked(c.graph, c.hash, c.kernels, c.predicted_us, c.verify, "search") for c in result.candidates]
    return ranked, result.stats


def interpreter_steps(graph: KernelGraph) -> int:
    """Block iterations of `graph` (grid size x loop range, summed over kernels): the interpreter's work."""
    from superopt.kernels.lower import lower

    return sum(math.prod(b.grid) * b.forloop_range for b in (lower(graph, op) for op in graph.ops))


def _check_on_cpu(
    program: KernelGraph, tried: Sequence[Ranked], seed: int, log: TrialLog, module_dir: Path | None
) -> Ranked:
    """The first of `tried` whose Triton code, run under the interpreter on seeded random inputs, matches the
    reference interpreter in float64 within its dtype's tolerance. A candidate too large to interpret runs on one
    chunk of its batch dims (verify/shrink.py: the chunk computes the same function as the whole); one still too
    large is taken as is."""
    from superopt.interpret import random_inputs, run
    from superopt.kernels import compile
    from superopt.kernels.timing import check, input_scale
    from superopt.verify.shrink import shrink

    for c in tried:
        reference, graph, shrunk = program, c.graph, ()
        if interpreter_steps(graph) > INTERPRETER_MAX_STEPS:
            reference, graph, shrunk = shrink(program, c.graph)
        steps = interpreter_steps(graph)
        if steps > INTERPRETER_MAX_STEPS:
            c.trial = {
                "status": "unchecked",
                "message": f"{steps} block iterations, about {steps * INTERPRETER_S_PER_STEP:.0f} s under the "
                "Triton interpreter: not run here (its verification record stands; a GPU run checks it)",
            }
        else:
            try:
                inputs = random_inputs(reference, seed, input_scale(reference, seed))
                outs = compile(graph, module_dir=module_dir)(*(inputs[n] for n in reference.inputs))
                exact, own = run(reference, inputs, "float64"), run(reference, inputs, "native")
                error = check(reference, outs, exact, own)
                c.trial = {"status": "ok" if error <= 1 else "wrong", "error_vs_tolerance": error}
                if shrunk:
                    c.trial["checked_on"] = "one chunk: " + "; ".join(shrunk)
            except Exception as e:  # noqa: BLE001 (a candidate's codegen failure is recorded against it)
                c.trial = {"status": "compile_error", "message": f"{type(e).__name__}: {e}"[:500]}
        log.write(hash=c.hash, status=c.trial["status"], predicted_us=c.predicted_us, measured_us=None)
        if c.trial["status"] in ("ok", "unchecked"):
            return c
    last = tried[-1].trial
    raise SuperoptError(
        f"{program.name}: no candidate, the unfused program included, ran correctly under the Triton interpreter "
        f"(the program: {last['status']} {last.get('message', '')})"
    )


def _bench_or_error(make: Callable[[], Callable[[], Any]], cuda_graph: bool) -> dict[str, Any]:
    from superopt.kernels.timing import bench

    try:
        fn = make()
        return {"status": "ok", "median_us": bench(fn, cuda_graph=cuda_graph).median_us}
    except Exception as e:  # noqa: BLE001 (a baseline that fails is reported, not fatal)
        return {"status": "error", "message": f"{type(e).__name__}: {e}"[:500]}


def _time_on_gpu(
    program: KernelGraph, tried: Sequence[Ranked], seed: int, log: TrialLog, module_dir: Path | None
) -> dict:
    """Times torch eager, torch.compile and the candidates `tried` in this run; returns the baselines."""
    from superopt.kernels.timing import input_scale, measure, random_device_inputs

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
    for c in tried:
        m = measure(c.graph, program, seed=seed, scale=scale, module_dir=module_dir)
        c.trial = {"status": m.status, "measured_us": m.median_us, "error_vs_tolerance": m.error_vs_tolerance}
        if m.message:
            c.trial["message"] = m.message
        log.write(hash=c.hash, status=m.status, predicted_us=c.predicted_us, measured_us=m.median_us)
    return baselines


def _row(c: Ranked, rank: int, baselines: dict, floor_us: float) -> dict[str, Any]:
    row = {"rank": rank, "hash": c.hash, "source": c.source, "kernels": c.kernels, "predicted_us": c.predicted_us}
    row.update(jsonable(c.trial))
    us = c.trial.get("measured_us")
    if us:
        for name, base in baselines.items():
            if base.get("status") == "ok":
                row[f"speedup_vs_{name}"] = base["median_us"] / us
        row["fraction_of_floor"] = floor_us / us
    return row


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
    if not (math.isfinite(settings.budget_s) and settings.budget_s >= 0):
        raise SuperoptError(f"{graph.name}: the search budget must be a finite number of seconds >= 0")
    device = device_spec(settings.device)
    key = cache_key(graph, dataclasses.asdict(settings), device.name)
    stored = cache.get(key, trusted_winner) if cache is not None else None
    if stored is not None:
        budget = stored["settings"]["budget_s"]
        if mode != "search" or budget >= settings.budget_s:
            return Outcome("hit", key, stored, f"cache hit {key[:16]} (a {budget:g} s search of {stored['created']})")
        say(f"cached result {key[:16]} has a budget of {budget:g} s < {settings.budget_s:g} s: searching again")
    if mode == "require-hit":
        return Outcome("miss", key, None, f"cache miss {key[:16]} (--require-hit: no search)")

    started = time.time()
    searching = mode == "search"
    log = TrialLog(cache if searching else None, key)
    try:
        ranked, stats = [_program_candidate(graph, device)], None
        if searching:
            found, stats = _search(graph, settings, device, progress, log)
            ranked += [c for c in found if c.hash != ranked[0].hash]
        ranked.sort(key=lambda c: c.predicted_us)
        kernel_dir = cache.kernel_dir if cache is not None else None
        result = _evaluate(graph, ranked, settings, device, top_k, log, kernel_dir)
    finally:
        log.close()
    result.update(key=key, search=jsonable(stats), seconds=round(time.time() - started, 2))
    if not searching:
        return Outcome("offline", key, result, f"cache miss {key[:16]}: offline, so the unfused program, no search")
    stored = cache is not None and cache.put(result)
    where = f"; stored in {cache.path(key)}" if stored else ""
    note = f"searched in {result['seconds']:g} s: {len(ranked)} candidates, the unfused program included{where}"
    return Outcome("searched", key, result, note)


def _evaluate(
    program: KernelGraph,
    ranked: list[Ranked],
    settings: Settings,
    device: Any,
    top_k: int,
    log: TrialLog,
    module_dir: Path | None,
) -> dict[str, Any]:
    """Picks the winner (by measured time on a GPU, by the model and an interpreter check without) and builds the
    result JSON. Generated kernel modules go to `module_dir` (the cache's kernel folder)."""
    from superopt.kernels.cost import floor

    floor_us = floor(program, device).us
    gpu = torch.cuda.is_available()
    # the top k by the model, and the unfused program as the fallback that is always correct
    tried = ranked[:top_k] + [c for c in ranked[top_k:] if c.source == "program"]
    if gpu:
        baselines = _time_on_gpu(program, tried, settings.seed, log, module_dir)
        timed = [c for c in tried if c.trial.get("status") == "ok"]
        unfused = next(c for c in tried if c.source == "program")
        best = min(timed, key=lambda c: c.trial["measured_us"]) if timed else unfused
    else:
        baselines = {}
        best = _check_on_cpu(program, tried, settings.seed, log, module_dir)
    rows = [_row(c, ranked.index(c), baselines, floor_us) for c in tried]
    return {
        "format": "superopt.result/1",
        "created": now(),
        "name": program.name,
        "program": to_json(program),
        "program_hash": graph_hash(program),
        "settings": dataclasses.asdict(settings) | {"device": device.name},
        "device": device.name,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "versions": versions(),
        "measured": gpu,
        "floor_us": floor_us,
        "baselines": baselines,
        "best": {
            "graph": to_json(best.graph),
            "hash": best.hash,
            "source": best.source,
            "kernels": best.kernels,
            "predicted_us": best.predicted_us,
            "verify": jsonable(best.verify),
            **jsonable(best.trial),
        },
        "candidates": rows,
        "candidates_total": len(ranked),
    }
