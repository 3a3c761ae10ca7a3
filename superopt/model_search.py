"""`superopt search MODEL.yaml`: a decoder's decode step searched as programs, and the plan its megakernel is
built from.

The step is cut into layer programs (superopt.model.layer_programs: norms, projections, the rotary embedding, the
KV append, attention, residuals, the MLP, the final norm and LM head); identical layers share one program. Each
goes through the pipeline like any program: a cache hit, or a search whose verified winner is stored. The plan
ties them together: the model's config, each program's cache key and winner, and the SMs its task graph is
scheduled for. It is stored under the model's key (the config, the programs' keys, the SM count), so that
`--require-hit` and `--offline` work for a model as for a program, and CI reuses a plan. A plan read back is
checked as a result is: its fields, its key recomputed, and each program's entry read through the cache (which
re-verifies every winner); a plan whose programs are not all cached, with the winners it names, is a miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from superopt.cache import Cache, cache_key, now, versions
from superopt.errors import SuperoptError, brief
from superopt.ir import KernelGraph
from superopt.kernels import taskgraph
from superopt.kernels.megakernel.bodies import lower, lowered_programs
from superopt.kernels.taskgraph import TaskGraph
from superopt.model import BF16, ModelConfig, ModelSpec, WeightFormat, layer_programs
from superopt.pipeline import MODES, Outcome, Settings, device_spec, optimize_program, trusted_winner
from superopt.result import Result, ResultError
from superopt.serialize import graph_hash
from superopt.verification.check import VerifyResult, verify

PLAN_FORMAT = "superopt.model-plan/1"


def preset_for(graph: KernelGraph) -> str:
    """The preset a layer program is searched with, by its ops: attention (a softmax and matmuls), mlp (matmuls
    and their epilogues), norm (rows: norms, rotary embeddings, elementwise ops)."""
    ops = {op.op for op in graph.ops}
    if {"exp", "max", "matmul"} <= ops:
        return "attention"
    return "mlp" if ops & {"matmul", "dequant"} else "norm"  # a quantized projection is a GEMV too


@dataclass(frozen=True)
class ProgramPlan:
    """One layer program of a plan: its name (the part of the step), its cache key, and its winner's hash."""

    name: str
    key: str
    program_hash: str
    winner_hash: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelPlan:
    """What a model's megakernel is built from: its config (HF's fields), the layer programs' cache entries and
    winners, and the SMs its task graph is scheduled for."""

    name: str
    config: dict[str, Any]
    n_sms: int
    programs: tuple[ProgramPlan, ...]
    key: str
    created: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "config": self.config,
            "n_sms": self.n_sms,
            "programs": [p.to_json() for p in self.programs],
            "key": self.key,
            "created": self.created,
        }


def plan_key(config: ModelConfig, program_keys: list[str], n_sms: int) -> str:
    """The key of a model's plan: its config, its programs' cache keys (their settings, device and versions among
    them) and the SM count."""
    parts = [PLAN_FORMAT, config.hf_fields(), program_keys, n_sms, versions()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_plan(doc: Any, key: str, program_keys: dict[str, str], cache: Cache) -> tuple[ModelPlan, dict[str, Result]]:
    """The plan a stored document holds, with its programs' results, if it is well formed, its key is `key` and
    the one its config, programs and SM count make, its programs are the model's (`program_keys`: each layer
    program's name and cache key, in order), and each is cached (re-verified) with the winner it names; else
    ResultError saying why."""
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise ResultError(f'not a model plan (expected "format": "{PLAN_FORMAT}")')
    try:
        config = ModelConfig.from_hf(doc["config"], "plan.config")
        programs = tuple(ProgramPlan(**p) for p in doc["programs"])
        plan = ModelPlan(str(doc["name"]), doc["config"], int(doc["n_sms"]), programs, doc["key"], str(doc["created"]))
    except (KeyError, TypeError, ValueError, SuperoptError) as e:
        raise ResultError(f"a malformed plan ({type(e).__name__}: {brief(str(e))})") from None
    if plan.key != key or plan_key(config, [p.key for p in programs], plan.n_sms) != key:
        raise ResultError("its key is not the one its config, programs and SM count make")
    if [(p.name, p.key) for p in programs] != list(program_keys.items()):
        raise ResultError("its programs are not the model's layer programs")
    results = {}
    for p in programs:
        result = cache.get(p.key, trusted_winner)
        if result is None or result.best.hash != p.winner_hash or result.program_hash != p.program_hash:
            raise ResultError(f"its program '{brief(p.name)}' is not cached with the winner it names")
        results[p.name] = result
    return plan, results


@dataclass
class ModelOutcome:
    """status: hit (the plan from the cache), searched, offline (unfused programs, nothing stored) or miss
    (require-hit); `programs` holds each layer program's outcome by name (empty on a miss); `lowering` each
    program's lowering to task bodies verified against it (`validate_lowering`), or why there is none."""

    status: str
    key: str
    plan: ModelPlan | None
    programs: dict[str, Outcome]
    note: str
    lowering: dict[str, VerifyResult] | str = "no plan"

    def winners(self) -> dict[str, KernelGraph]:
        return {name: o.winner for name, o in self.programs.items()}

    def lowering_json(self) -> dict[str, Any] | str:
        """The lowering's verification per program (the verdict, method, tests, false-accept bound, seed)."""
        if isinstance(self.lowering, str):
            return self.lowering
        return {
            name: {"equivalent": r.equivalent, "method": r.method, "tests": r.tests, "bound": r.bound, "seed": r.seed}
            | ({"reason": r.reason} if r.reason else {})
            for name, r in self.lowering.items()
        }


def validate_lowering(tg: TaskGraph, programs: dict[str, KernelGraph], seed: int = 0) -> dict[str, VerifyResult]:
    """Translation validation: each program a task body is lowered from (the plan's winner, else the layer
    program), written back as a program by the lowering itself (bodies.lowered_programs), verified against it.
    The re-tiling of a winner and the cut into stages are checked for this plan, not argued in general."""
    low = lower(tg, programs)
    return {name: verify(low.sources[name], lowered, seed=seed) for name, lowered in lowered_programs(low).items()}


def unverified_lowering(outcome: ModelOutcome) -> str | None:
    """Why a megakernel must not be built from the outcome's generated bodies, or None."""
    if isinstance(outcome.lowering, str):
        return outcome.lowering
    bad = [f"{name}: {str(r).splitlines()[0]}" for name, r in outcome.lowering.items() if not r.equivalent]
    return f"the lowering to task bodies is not verified equivalent for {'; '.join(bad)}" if bad else None


def program_settings(graph: KernelGraph, settings: Settings) -> Settings:
    return dataclasses.replace(settings, preset=settings.preset or preset_for(graph))


def search_model(
    spec: ModelSpec,
    settings: Settings,
    cache: Cache | None,
    mode: str = "search",
    n_sms: int = 132,
    progress: str = "auto",
    say: Callable[[str], None] = lambda line: None,
    fmt: WeightFormat = BF16,
    head: WeightFormat | None = None,
    mixed: dict[str, WeightFormat] | None = None,
) -> ModelOutcome:
    """The plan of `spec`'s decode step: from the cache, or each layer program through the pipeline (searched
    where it misses) and the plan stored. mode as for optimize_program; the settings apply to every program, a
    preset chosen per program (`preset_for`) where they name none. `fmt`: the projections' weight format (the
    layer programs of a quantized model dequantize their weights: a plan of their own), `head` the LM head's (None:
    `fmt`), `mixed` a format per projection kind overriding both (`--precision auto`). The winners' lowering to the
    megakernel's task bodies is validated each time (`validate_lowering`), for a plan read back as for a new one."""
    programs = layer_programs(spec.config, spec.max_seq, fmt, head, mixed)
    outcome = _plan(spec, settings, cache, mode, n_sms, progress, say, programs)
    if outcome.programs:
        try:
            tg = taskgraph.build(spec.config, n_sms, fmt=fmt, head=head, mixed=mixed)
            outcome.lowering = validate_lowering(tg, outcome.winners())
        except SuperoptError as e:
            outcome.lowering = f"no megakernel: {brief(str(e))}"
    return outcome


def _plan(
    spec: ModelSpec,
    settings: Settings,
    cache: Cache | None,
    mode: str,
    n_sms: int,
    progress: str,
    say: Callable[[str], None],
    programs: dict[str, KernelGraph],
) -> ModelOutcome:
    if mode not in MODES:
        raise SuperoptError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    device = device_spec(settings.device)
    per_program = {name: program_settings(g, settings) for name, g in programs.items()}
    keys = {name: cache_key(g, dataclasses.asdict(per_program[name]), device.name) for name, g in programs.items()}
    key = plan_key(spec.config, list(keys.values()), n_sms)
    stored = cache.get_plan(key, lambda doc: read_plan(doc, key, keys, cache)) if cache is not None else None
    if stored is not None:
        plan, results = stored
        outcomes = {
            p.name: Outcome("hit", p.key, results[p.name], f"cache hit {p.key[:16]}", programs[p.name])
            for p in plan.programs
        }
        return ModelOutcome("hit", key, plan, outcomes, f"plan hit {key[:16]} ({len(programs)} programs)")
    if mode == "require-hit":
        return ModelOutcome("miss", key, None, {}, f"plan miss {key[:16]} (--require-hit: no search)")
    outcomes = {}
    for name, graph in programs.items():
        say(f"-- {spec.name}: {name} ({graph_hash(graph)[:12]})")
        outcomes[name] = optimize_program(graph, per_program[name], cache, mode, progress, say=say)
        say(outcomes[name].note)
    plan = ModelPlan(
        name=spec.name,
        config=spec.config.hf_fields(),
        n_sms=n_sms,
        programs=tuple(
            ProgramPlan(name, o.key, graph_hash(programs[name]), graph_hash(o.winner)) for name, o in outcomes.items()
        ),
        key=key,
        created=now(),
    )
    if mode == "offline":
        return ModelOutcome("offline", key, plan, outcomes, f"plan miss {key[:16]}: offline, the unfused programs")
    if cache is not None:
        cache.put_plan(key, plan.to_json())
    where = f"; stored in {cache.plan_path(key)}" if cache is not None else ""
    return ModelOutcome("searched", key, plan, outcomes, f"planned {len(programs)} programs{where}")
