"""search(graph): the µGraph search end to end.

1. Enumerate symbolic plans (enumerator.py) by iterative deepening on the kernel count, each depth's first-level
   choices spread over a process pool (merged in order, so a pool finds what one process finds).
2. Size them for the device (instantiate.py): best sizes under its limits by the cost model, plans taken in
   order of a lower bound on their cost, so sizing stops once no remaining plan can enter the top ranks.
3. Verify the fastest: the finite-field check (superopt.verification) of the plan's small instance against the
   program at the same dims, until KEEP candidates are accepted.
4. Rank by kernels.cost.predict. The input program is always a candidate (so there is always an answer).

Two budgets bound it. The wall budget covers all of it: enumeration stops at ENUMERATE_SHARE of it, sizing at
SIZE_SHARE, verification at its end. The states budget bounds the enumeration by a count that is the same on
any machine and for any number of workers (_enumerate). `stats.cut` names the budgets that cut a stage; where
none did, the search was exhaustive and a larger budget would find nothing more. The result is deterministic
for a seed wherever the wall budget does not cut the search.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.cost import predict
from superopt.kernels.device import DeviceSpec, get_device
from superopt.ops import OPS
from superopt.result import IDENTITY, Candidate, Verification
from superopt.search_space.cluster import ChoicePool, connect, verified
from superopt.search_space.enumerator import Choice, Counts, Found, Plan, Problem, Searcher, make_problem
from superopt.search_space.instantiate import Sizer, concrete, resize, small_env
from superopt.search_space.presets import Preset, for_program, get_preset, usable
from superopt.serialize import graph_hash
from superopt.verification import verify

KEEP = 16  # verified candidates reported, besides the input program
SIZED = 2 * KEEP  # sizing goes on until this many plans beat every remaining lower bound
ENUMERATE_SHARE, SIZE_SHARE = 0.75, 0.9  # of the wall budget
# A pool's start (fork, each worker's problem) and end take a few tenths of a second: a shorter search runs in one
# process (which finds what a pool finds).
POOL_MIN_S = 5.0


@dataclass
class SearchStats:
    preset: str = ""
    device: str = ""
    workers: int = 1
    depth: int = 0  # the deepest kernel count enumerated completely
    exhausted: bool = False  # the wall or states budget cut the enumeration
    cut: list[str] = field(default_factory=list)  # the budgets that cut any stage: "states", "time"; none: exhaustive
    states_limit: int = 0  # the states budget
    states: int = 0  # search states (kernel and block level; a memoized block graph counts the states it took)
    pruned_abstract: int = 0  # op results no expression equivalent to the program's can contain
    pruned_limits: int = 0  # size choices beyond the device's grid, threads, shared memory or occupancy
    pruned_shape: int = 0  # op results whose shapes or splits do not line up
    pruned_redundant: int = 0  # tiles abstractly equal to one already in their block graph
    plans: int = 0  # distinct symbolic µGraphs computing the program's abstract expression
    sized: int = 0  # plans given sizes for the device
    rejected: int = 0  # sized candidates that failed verification
    candidates: int = 0  # reported, the input program included
    seconds: float = 0.0
    seconds_enumerate: float = 0.0
    seconds_size: float = 0.0
    unfused: str = ""  # why no candidate has fewer kernels than the program ("" where one has)

    @property
    def pruned(self) -> int:
        return self.pruned_abstract + self.pruned_limits

    def to_json(self) -> dict[str, Any]:
        return {"pruned": self.pruned, **asdict(self)}


@dataclass
class SearchResult:
    candidates: list[Candidate]  # best first
    stats: SearchStats = field(default_factory=SearchStats)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_json() for c in self.candidates],
            "stats": self.stats.to_json(),
            "ranked_by": f"kernels.cost.predict on {self.stats.device} (analytic, microseconds)",
        }


# --- progress -----------------------------------------------------------------------------------------------------


class Progress:
    """States, pruned and plans as the search goes: a tqdm bar, plain lines every few seconds, JSON lines, or
    nothing; on stderr."""

    def __init__(self, mode: str, name: str) -> None:
        if mode not in ("auto", "bar", "plain", "json", "none"):
            raise SuperoptError(f"progress must be auto, bar, plain, json or none, got {mode!r}")
        self.mode = ("bar" if sys.stderr.isatty() else "plain") if mode == "auto" else mode
        self.name, self.last, self.bar = name, 0.0, None
        if self.mode == "bar":
            self.bar = tqdm(desc=f"search {name}", unit=" states", file=sys.stderr, leave=False)

    def update(self, stage: str, stats: SearchStats, force: bool = False) -> None:
        now = time.monotonic()
        fields = {"stage": stage, "states": stats.states, "pruned": stats.pruned, "plans": stats.plans}
        fields["candidates"] = stats.candidates
        if self.bar is not None:
            self.bar.update(stats.states - self.bar.n)
            self.bar.set_postfix(fields, refresh=False)
        elif self.mode != "none" and (force or now - self.last >= 2.0):
            if self.mode == "json":
                print(json.dumps({"search": self.name, **fields}), file=sys.stderr, flush=True)
            else:
                print(f"search {self.name}: " + ", ".join(f"{k} {v}" for k, v in fields.items()), file=sys.stderr)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- enumeration, in one process or a pool ---------------------------------------------------------------------------

_WORKER: Searcher | None = None


def _worker_init(graph: KernelGraph, preset: Preset, prune: bool, deadline: float) -> None:
    global _WORKER
    _WORKER = Searcher(make_problem(graph), preset, deadline=deadline, prune=prune)


def _worker_run(job: tuple[int, Choice, int]) -> Found:
    assert _WORKER is not None
    return _WORKER.run(*job)


class _ProcessPool:
    """The enumeration's choices on this machine's processes, each with its own Searcher."""

    def __init__(self, workers: int, graph: KernelGraph, preset: Preset, prune: bool, deadline: float) -> None:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        self._pool = context.Pool(workers, _worker_init, (graph, preset, prune, deadline))

    def imap(self, jobs: list[tuple[int, Choice, int]]) -> Iterator[Found]:
        return self._pool.imap(_worker_run, jobs)

    def terminate(self) -> None:
        self._pool.terminate()


def _enumerate(
    problem: Problem,
    preset: Preset,
    prune: bool,
    deadline: float,
    states: int,
    workers: int,
    stats: SearchStats,
    bar: Progress,
    ray: bool = False,
) -> list[Plan]:
    """Plans of 1, 2, ... kernels, each depth complete before the next; stops at the deadline, at `states`
    states, or past the first depth with plans where the preset does not deepen.

    The states budget is one count over the whole enumeration, in its canonical order (depth by depth, each
    depth's first-level choices in order): what one process walking that order would find before its count
    reaches `states`. Each choice runs on its own, limited to what is left of the budget at its depth; merged in
    order, a choice's plans are kept while the states of the choices before it and its own count so far stay
    under that; the first choice that reaches it is the last. A choice's count does not depend on the process
    that ran it (Searcher), so the plans are the same for any number of workers and any machine speed. `ray`:
    the workers are actors of the Ray cluster this process joined (search_space/cluster.py)."""
    plans: dict[tuple, Plan] = {}
    total = Counts()
    depth = 1

    def report(counts: Counts) -> None:
        for name in ("states", "pruned_abstract", "pruned_shape", "pruned_redundant"):
            setattr(stats, name, getattr(total, name) + getattr(counts, name))
        stats.plans = len(plans)
        bar.update(f"enumerate {depth} kernels", stats)

    def collect(found: Found, left: int) -> str:
        """Merges one choice's run, `left` states being left of the budget before it; the budget that cut it."""
        for plan, at in zip(found.plans, found.at):
            if at < left:
                plans.setdefault(plan.key(), plan)
        cut = "states" if found.counts.states >= left else found.cut
        found.counts.states = min(found.counts.states, left)
        total.add(found.counts)
        report(Counts())
        return cut

    searcher = Searcher(problem, preset, deadline=deadline, prune=prune, on_state=report)
    pool: ChoicePool | _ProcessPool | None = None
    if ray:
        pool = ChoicePool(problem.graph, preset, prune, deadline, workers)
    elif workers > 1:
        pool = _ProcessPool(workers, problem.graph, preset, prune, deadline)
    try:
        for depth in range(1, preset.kernel_ops + 1):
            roots, cuts = searcher.roots(depth), set()
            at_depth = states - total.states  # what the budget leaves this depth's choices, each run alone
            if pool is None:
                for root in roots:
                    cuts.add(collect(searcher.run(depth, root, states - total.states), states - total.states))
                    if any(cuts):
                        break
            else:  # past the deadline the choices still to come stop at once, with what they found before it
                for found in pool.imap([(depth, r, at_depth) for r in roots]):
                    cuts.add(collect(found, states - total.states))
                    if "states" in cuts:
                        break  # the choices after this one are past the budget's end
            cuts.discard("")
            if cuts:
                stats.exhausted = True
                stats.cut = sorted(cuts)
                break
            stats.depth = depth
            if plans and not preset.deepen:
                break
    finally:
        if pool is not None:
            pool.terminate()
    return list(plans.values())


def _size(plans: list[Plan], sizer: Sizer, deadline: float, stats: SearchStats, bar: Progress) -> list[tuple]:
    """(predicted us, plan, sizes) of the plans that fit, fastest first; plans are taken in order of their lower
    bounds until SIZED of them beat every bound left, or the deadline passes (a cut)."""
    sized: list[tuple[float, int, Plan, dict[str, int]]] = []
    top: list[float] = []  # a max-heap (negated) of the SIZED fastest
    for bound, k in sorted((sizer.lower_bound(p), k) for k, p in enumerate(plans)):
        if len(top) == SIZED and bound >= -top[0]:
            break
        if time.monotonic() > deadline:
            stats.cut = sorted({*stats.cut, "time"})
            break
        best = sizer.best(plans[k])
        stats.sized += 1
        stats.pruned_limits = sizer.rejected
        bar.update("size", stats)
        if best is not None:
            sized.append((best[0], k, plans[k], best[1]))
            heapq.heappush(top, -best[0])
            if len(top) > SIZED:
                heapq.heappop(top)
    sized.sort(key=lambda x: (x[0], len(x[2].ops), x[1]))
    return [(us, plan, env) for us, _, plan, env in sized]


def verify_plan(problem: Problem, plan: Plan, seed: int) -> Verification | None:
    """The finite-field check of the plan's small instance against the program at the same dims: its record,
    or None where it is not equivalent."""
    env = small_env(problem, plan)
    small = resize(problem, env)
    result = verify(small, concrete(problem, plan, env), seed=seed)
    if result.equivalent is not True:
        return None
    inputs = ", ".join(f"{n}{list(small.tensors[n].shape)}" for n in small.inputs)
    checked = f"the same µGraph structure at small sizes (inputs {inputs}; grid axes and loops 2)"
    return Verification(result.method, result.tests, result.bound, result.seed, checked)


def why_unfused(problem: Problem, preset: Preset, stats: SearchStats, plans: int, sized: int, rejected: int) -> str:
    """One line on why no candidate has fewer kernels than the program, given how many such plans the
    enumeration found, how many fit the device and how many failed verification: the first of a one-op
    program, verification, device limits, the budget, an op the preset's block graphs lack, the preset's block
    size."""
    graph = problem.graph
    n = len(graph.ops)
    if n == 1:
        return "the program is one kernel: nothing to fuse"
    if rejected:
        return (
            f"all {rejected} fused plans tried failed verification (their abstract expressions match the "
            "program's, their values do not)"
        )
    if sized:
        return f"none of the {sized} fused plans that fit the device was verified within the budget"
    if plans:
        return f"none of the {plans} fused plans fits the device ({stats.device}: grid, threads, shared memory)"
    if stats.exhausted:
        return (
            f"the budget ended the enumeration at {stats.depth + 1} kernels after {stats.states} states, before "
            "any fused plan"
        )
    ops = tuple(dict.fromkeys(op.op for op in graph.ops))
    block_ops = usable(preset.block_op_names, problem.target.functions, set(ops))
    for op in ops:
        if "block" not in OPS[op].levels:
            return f"op '{op}' has no block-graph form"
        if op not in block_ops:
            return f"op '{op}' is not among the block ops of preset '{preset.name}' ({', '.join(block_ops)})"
    if n > preset.block_ops:
        return (
            f"the program's {n} ops exceed the {preset.block_ops} ops per block graph of preset '{preset.name}', "
            f"and no split into up to {preset.kernel_ops} kernels computes it"
        )
    return f"no µGraph of preset '{preset.name}' ({preset.description}) computes the program"


def program_candidate(graph: KernelGraph, device: DeviceSpec) -> Candidate:
    """The input program itself as a candidate: verified by identity, ranked by the cost model like the rest."""
    return Candidate.of(graph, predict(graph, device).us, IDENTITY, "program")


def search_preset(graph: KernelGraph, preset: str | None = None) -> Preset:
    """The preset a search of `graph` uses: `preset`, else the spec's `search: {preset}`, else one made from the
    program's ops (for_program)."""
    named = preset or graph.search_settings.get("preset")
    return get_preset(named) if named else for_program(graph)


def search(
    graph: KernelGraph,
    preset: str | None = None,
    budget_s: float = 120.0,
    device: str = "h100",
    seed: int = 0,
    workers: int | None = None,
    prune: bool = True,
    progress: str = "auto",
    on_candidate: Callable[[Candidate], None] | None = None,
    states: int | None = None,
    ray: str | None = None,
) -> SearchResult:
    """Verified µGraphs computing `graph`, ranked by predicted time on `device`, best first (see module doc).
    `preset` as search_preset picks it; `states` bounds the enumeration's count of states (default: the preset's
    max_states); `workers` defaults to the CPU count (one under a budget of POOL_MIN_S); `prune=False` turns off
    abstract-expression pruning (for tests: the space grows fast). `on_candidate` sees each candidate as it is
    accepted. Where no candidate has fewer kernels than the program, `stats.unfused` says why; `stats.cut` names
    the budgets that cut the search (none: it was exhaustive). `ray`: the address of a Ray cluster to enumerate
    and verify on (search_space/cluster.py; `workers` then defaults to its CPU count), which finds the same."""
    start = time.monotonic()
    spec = get_device(device)
    chosen = search_preset(graph, preset)
    limit = states if states is not None else chosen.max_states
    problem = make_problem(graph)
    if ray is not None:
        workers = workers or connect(ray)
    workers = workers or ((os.cpu_count() or 1) if budget_s >= POOL_MIN_S else 1)
    stats = SearchStats(preset=chosen.name, device=spec.name, workers=max(1, workers), states_limit=limit)
    bar = Progress(progress, graph.name)
    accept = on_candidate or (lambda c: None)
    try:
        deadline = start + ENUMERATE_SHARE * budget_s
        plans = _enumerate(problem, chosen, prune, deadline, limit, stats.workers, stats, bar, ray is not None)
        stats.seconds_enumerate = round(time.monotonic() - start, 3)
        sized = _size(plans, Sizer(problem, spec), start + SIZE_SHARE * budget_s, stats, bar)
        stats.seconds_size = round(time.monotonic() - start - stats.seconds_enumerate, 3)

        candidates = [program_candidate(graph, spec)]
        accept(candidates[0])
        seen = {candidates[0].hash}
        rejected_fused = 0
        unique = []  # (plan, graph, hash) of each distinct sized µGraph, in rank order
        for _, plan, env in sized:
            found = concrete(problem, plan, env)
            h = graph_hash(found)
            if h not in seen:
                seen.add(h)
                unique.append((plan, found, h))
        jobs = [(plan, seed * 1_000_003 + int(h[:8], 16)) for plan, _, h in unique]
        records = (
            verified(graph, jobs, stats.workers) if ray is not None else (verify_plan(problem, *job) for job in jobs)
        )
        for plan, found, h in unique:
            if len(candidates) > KEEP:
                break
            if time.monotonic() > start + budget_s:
                stats.cut = sorted({*stats.cut, "time"})
                break
            record = next(records)
            if record is None:
                stats.rejected += 1
                rejected_fused += len(plan.ops) < len(graph.ops)
                continue
            candidates.append(Candidate(found, h, len(found.ops), predict(found, spec).us, record, "search"))
            accept(candidates[-1])
            stats.candidates = len(candidates)
            bar.update("verify", stats)
        records.close()  # on a cluster: cancels the verifications no longer wanted
        candidates.sort(key=lambda c: (c.predicted_us, c.kernels, c.hash))
        stats.candidates = len(candidates)
        if all(c.kernels >= len(graph.ops) for c in candidates):
            fused = sum(len(p.ops) < len(graph.ops) for p in plans)
            fused_sized = sum(len(p.ops) < len(graph.ops) for _, p, _ in sized)
            stats.unfused = why_unfused(problem, chosen, stats, fused, fused_sized, rejected_fused)
        stats.seconds = round(time.monotonic() - start, 3)
        bar.update("done", stats, force=True)
    finally:
        bar.close()
    return SearchResult(candidates, stats)
