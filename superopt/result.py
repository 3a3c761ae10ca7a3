"""The result model: a candidate µGraph, how it was verified and tried, and a search result, each with one JSON
form (`to_json` / `from_json`, here and nowhere else).

`from_json` checks every field it reads (types, finite numbers, hashes that are those of the graphs they sit
beside), since results come back from caches and imports, which are untrusted: a document that fails is a
ResultError naming the field. What only a cache can check (its key) and what only the verifier can (that the
winner computes the program) are checked there (superopt/cache.py, superopt/pipeline.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from superopt.errors import SuperoptError, brief
from superopt.ir import KernelGraph
from superopt.serialize import from_json as graph_from_json
from superopt.serialize import graph_hash, to_json

RESULT_FORMAT = "superopt.result/1"
SOURCES = ("program", "search")  # the input program itself, or a µGraph the search found
BUDGETS = ("states", "time")  # the budgets that can cut a search: the enumeration's states, the wall clock
_HASH = re.compile(r"[0-9a-f]{64}")


class ResultError(SuperoptError):
    """A document that is not a well-formed result; the message names the field."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number_json(x: float | None) -> float | str | None:
    """JSON has no inf or nan: they are written as the strings "inf", "-inf", "nan"."""
    return x if x is None or math.isfinite(x) else str(x)


class _Doc:
    """An untrusted JSON object, read field by field; every read checks the field and names it when wrong."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise ResultError(f"{where} is {brief(doc)}, not an object")
        self.doc, self.where = doc, where

    def _get(self, key: str, test: Any, what: str, optional: bool) -> Any:
        """The field `key`, if `test` passes it; an optional field may be missing or null."""
        if self.doc.get(key) is None:
            if optional:
                return None
            if key not in self.doc:
                raise ResultError(f"{self.where}.{key} is missing")
        value = self.doc[key]
        if not test(value):
            raise ResultError(f"{self.where}.{key} is {brief(value)}, not {what}")
        return value

    def number(self, key: str) -> float:
        return float(self._get(key, _finite, "a finite number", False))

    def maybe_number(self, key: str) -> float | None:
        value = self._get(key, _finite, "a finite number", True)
        return None if value is None else float(value)

    def measure(self, key: str) -> float | None:
        """A measured number: missing, null, finite, or infinite (written as a string)."""
        value = self._get(key, lambda x: _finite(x) or x in ("inf", "-inf", "nan"), "a number", True)
        return None if value is None else float(value)

    def integer(self, key: str) -> int:
        return int(self._get(key, _integer, "an integer", False))

    def maybe_integer(self, key: str) -> int | None:
        value = self._get(key, _integer, "an integer", True)
        return None if value is None else int(value)

    def text(self, key: str) -> str:
        return str(self._get(key, lambda x: isinstance(x, str), "a string", False))

    def maybe_text(self, key: str) -> str | None:
        value = self._get(key, lambda x: isinstance(x, str), "a string", True)
        return None if value is None else str(value)

    def flag(self, key: str) -> bool:
        return bool(self._get(key, lambda x: isinstance(x, bool), "true or false", False))

    def hash(self, key: str) -> str:
        return str(self._get(key, lambda x: isinstance(x, str) and _HASH.fullmatch(x), "64 hex digits", False))

    def obj(self, key: str) -> _Doc:
        return _Doc(self._get(key, lambda x: True, "", False), f"{self.where}.{key}")

    def items(self, key: str) -> list[Any]:
        return list(self._get(key, lambda x: isinstance(x, list), "a list", False))

    def graph(self, key: str) -> KernelGraph:
        try:
            return graph_from_json(self._get(key, lambda x: True, "", False), f"{self.where}.{key}")
        except ResultError:
            raise
        except (SuperoptError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # crafted JSON
            raise ResultError(f"{type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Verification:
    """How a candidate was shown to compute the program: "identity" (it is the program), "proved" (z3), "tested"
    (`tests` finite-field tests, false-accept probability `bound`), or "numeric only"."""

    method: str
    tests: int = 0
    bound: float = 0.0
    seed: int | None = None
    checked: str = ""  # on what it was checked

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "tests": self.tests, "bound": self.bound}
        return out | ({"seed": self.seed} if self.seed is not None else {}) | {"checked": self.checked}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Verification:
        d = _Doc(doc, where)
        tests, bound = d.maybe_integer("tests") or 0, d.maybe_number("bound") or 0.0
        return cls(d.text("method"), tests, bound, d.maybe_integer("seed"), d.maybe_text("checked") or "")


IDENTITY = Verification("identity", checked="the input program itself")


@dataclass(frozen=True)
class Candidate:
    """A verified µGraph computing the program: its graph, hash, kernel launches, predicted time, verification
    record, and where it came from (the program itself, or the search)."""

    graph: KernelGraph
    hash: str
    kernels: int
    predicted_us: float
    verify: Verification
    source: str

    @classmethod
    def of(cls, graph: KernelGraph, predicted_us: float, verify: Verification, source: str) -> Candidate:
        return cls(graph, graph_hash(graph), len(graph.ops), predicted_us, verify, source)

    def to_json(self) -> dict[str, Any]:
        """The form search results are written in (benchmarks/search_bench.py): the µGraph with its numbers."""
        return {
            "hash": self.hash,
            "kernels": self.kernels,
            "predicted_us": round(self.predicted_us, 4),
            "verify": self.verify.to_json(),
            "source": self.source,
            "mugraph": to_json(self.graph),
        }


@dataclass(frozen=True)
class Trial:
    """What happened when a candidate was run: status ok, wrong, compile_error, crash, timeout, unchecked or
    skipped (the budget left no time to time it); its measured median (on a GPU), its error as a fraction of
    what it may be, and where it was checked."""

    status: str
    measured_us: float | None = None
    error_vs_tolerance: float | None = None
    checked_on: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        for key in ("measured_us", "error_vs_tolerance", "checked_on", "message"):
            if (value := getattr(self, key)) is not None:
                out[key] = _number_json(value) if isinstance(value, float) else value
        return out

    @classmethod
    def from_json(cls, d: _Doc) -> Trial | None:
        """The trial fields of a candidate's object, or None where it was not tried."""
        status = d.maybe_text("status")
        if status is None:
            return None
        measured, error = d.measure("measured_us"), d.measure("error_vs_tolerance")
        return cls(status, measured, error, d.maybe_text("checked_on"), d.maybe_text("message"))


@dataclass(frozen=True)
class Baseline:
    """A peer timed in the same run (torch eager, torch.compile): status ok, error or skipped (by the budget)."""

    status: str
    median_us: float | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status} | {k: v for k in ("median_us", "message") if (v := getattr(self, k)) is not None}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Baseline:
        d = _Doc(doc, where)
        return cls(d.text("status"), d.maybe_number("median_us"), d.maybe_text("message"))


@dataclass(frozen=True)
class Row:
    """One tried candidate in a result's table: its rank by the cost model and what its trial measured."""

    rank: int
    hash: str
    source: str
    kernels: int
    predicted_us: float
    trial: Trial | None = None
    speedups: dict[str, float] = field(default_factory=dict)  # over each baseline that ran
    fraction_of_floor: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "hash": self.hash, "source": self.source, "kernels": self.kernels}
        out |= {"predicted_us": _number_json(self.predicted_us)} | (self.trial.to_json() if self.trial else {})
        out |= {f"speedup_vs_{name}": x for name, x in self.speedups.items()}
        return out | ({"fraction_of_floor": self.fraction_of_floor} if self.fraction_of_floor is not None else {})

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Row:
        d = _Doc(doc, where)
        prefix = "speedup_vs_"
        speedups = {k[len(prefix) :]: d.number(k) for k in d.doc if k.startswith(prefix)}
        predicted = d.measure("predicted_us")
        if predicted is None:
            raise ResultError(f"{where}.predicted_us is missing")
        return cls(
            d.integer("rank"),
            d.text("hash"),
            d.text("source"),
            d.integer("kernels"),
            predicted,
            Trial.from_json(d),
            speedups,
            d.maybe_number("fraction_of_floor"),
        )


@dataclass(frozen=True)
class Result:
    """A search result: the program, the winning candidate (with its trial), the candidates tried, the
    baselines timed beside them, and what it was searched with and on (the fields of the cache's key)."""

    name: str
    program: KernelGraph
    settings: dict[str, Any]  # superopt.pipeline.Settings as JSON, its device resolved
    device: str  # the DeviceSpec ranked for
    gpu: str | None  # the GPU timed on, if any
    versions: dict[str, str]
    floor_us: float
    best: Candidate
    best_trial: Trial | None
    candidates: tuple[Row, ...]
    candidates_total: int
    baselines: dict[str, Baseline]
    key: str
    created: str
    seconds: float
    search: dict[str, Any] | None = None  # the search's statistics (search_space.SearchStats), as JSON
    # The budgets (BUDGETS) that cut the search or its checks; none: exhaustive, the answer a larger budget gives.
    # A result that does not say (written before results did) counts as cut by the wall clock.
    cut: tuple[str, ...] = ("time",)

    @property
    def exhaustive(self) -> bool:
        return not self.cut

    @property
    def measured(self) -> bool:
        """Timed on a GPU (else ranked by the cost model and checked under the Triton interpreter)."""
        return self.gpu is not None

    @property
    def program_hash(self) -> str:
        return graph_hash(self.program)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "format": RESULT_FORMAT,
            "created": self.created,
            "name": self.name,
            "program": to_json(self.program),
            "program_hash": self.program_hash,
            "settings": dict(self.settings),
            "device": self.device,
            "gpu": self.gpu,
            "versions": dict(self.versions),
            "measured": self.measured,
            "floor_us": self.floor_us,
            "baselines": {name: b.to_json() for name, b in self.baselines.items()},
            "best": {
                "graph": to_json(best.graph),
                "hash": best.hash,
                "source": best.source,
                "kernels": best.kernels,
                "predicted_us": best.predicted_us,
                "verify": best.verify.to_json(),
            }
            | (self.best_trial.to_json() if self.best_trial else {}),
            "candidates": [row.to_json() for row in self.candidates],
            "candidates_total": self.candidates_total,
            "key": self.key,
            "search": dict(self.search) if self.search is not None else None,
            "cut": list(self.cut),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Result:
        """The result a JSON document holds; ResultError naming the first field that is wrong. Its hashes must
        be its graphs' and a winner from the "program" must be the program."""
        if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
            raise ResultError(f'not a superopt result (expected "format": "{RESULT_FORMAT}")')
        d = _Doc(doc, "result")
        s = d.obj("settings")
        settings = {
            "preset": s.maybe_text("preset"),
            "budget_s": s.number("budget_s"),
            "seed": s.integer("seed"),
            "prune": s.flag("prune"),
            "device": s.text("device"),
            "states": s.maybe_integer("states"),
        }
        versions = d.obj("versions")
        b = d.obj("best")
        verify = Verification.from_json(b.obj("verify").doc, "result.best.verify")
        best = Candidate(
            b.graph("graph"), b.hash("hash"), b.integer("kernels"), b.number("predicted_us"), verify, b.text("source")
        )
        program = d.graph("program")
        if d.hash("program_hash") != graph_hash(program):
            raise ResultError("its program_hash is not the hash of its program")
        if best.hash != graph_hash(best.graph):
            raise ResultError("its winner's hash is not the hash of its winner graph")
        if best.source not in SOURCES:
            raise ResultError(f"result.best.source is {brief(best.source)}, not one of {', '.join(SOURCES)}")
        if best.source == "program" and best.hash != graph_hash(program):
            raise ResultError('its winner claims to be the program ("source": "program") but is another graph')
        search = doc.get("search")
        if search is not None and not isinstance(search, dict):
            raise ResultError(f"result.search is {brief(search)}, not an object")
        cut = tuple(d.items("cut")) if "cut" in doc else ("time",)
        if any(c not in BUDGETS for c in cut) or len(set(cut)) != len(cut):
            raise ResultError(
                f"result.cut is {brief(doc['cut'])}, not a list of distinct budgets ({', '.join(BUDGETS)})"
            )
        return cls(
            name=d.text("name"),
            program=program,
            settings=settings,
            device=d.text("device"),
            gpu=d.maybe_text("gpu"),
            versions={k: versions.text(k) for k in versions.doc},
            floor_us=d.number("floor_us"),
            best=best,
            best_trial=Trial.from_json(b),
            candidates=tuple(Row.from_json(r, f"result.candidates[{k}]") for k, r in enumerate(d.items("candidates"))),
            candidates_total=d.integer("candidates_total"),
            baselines={n: Baseline.from_json(x, f"result.baselines.{n}") for n, x in d.obj("baselines").doc.items()},
            key=d.hash("key"),
            created=d.text("created"),
            seconds=d.number("seconds"),
            search=search,
            cut=cut,
        )
