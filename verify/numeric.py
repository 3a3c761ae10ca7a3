"""Float checks: two graphs compared in float64, and the float gate (a candidate in its own dtypes against a
float64 reference).

Inputs are `superopt.random_inputs(graph, seed, scale)`, so any reported seed and scale reproduce the case.
The gate draws inputs only at magnitudes where the float64 reference keeps every intermediate value inside the
candidate's dtype range (with a margin): a program that overflows there is the program's own property, not the
candidate's. At those magnitudes, a candidate output that is NaN or infinite where the reference is finite
rejects it, and so does an error, relative to the output's largest magnitude, above the dtype's tolerance and
above 4 times the error of the reference program itself run in the same dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from superopt.interpret import TorchEval, random_inputs
from superopt.ir import KernelGraph
from superopt.ops import DTYPES, TensorType
from superopt.verification import batched

CLEAR = 1e-6  # a float64 difference above this, relative to the outputs' magnitude, is not rounding
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
SCALES = (1.0, 0.25, 1 / 16, 1 / 64, 1 / 256, 1 / 1024)
RANGE_MARGIN = 16.0


def outputs(graph: KernelGraph, inputs: dict[str, torch.Tensor], precision: str = "float64") -> list[torch.Tensor]:
    """graph's outputs on inputs (by name), in float64 or in its own dtypes ("native")."""
    ev = TorchEval(precision)
    return batched.evaluate(graph, [ev.cast(inputs[n], graph.tensors[n]) for n in graph.inputs], ev)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (inf where finiteness differs; positions non-finite in both are skipped)."""
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(x) & torch.isfinite(ref)
    if not bool((torch.isfinite(x) == torch.isfinite(ref)).all()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    scale = float(ref[finite].abs().max())
    diff = float((x[finite] - ref[finite]).abs().max())
    return diff / scale if scale > 0 else diff


@dataclass
class Difference:
    output: int
    seed: int
    scale: float
    error: float


def first_difference(
    a: KernelGraph, b: KernelGraph, seeds: range = range(3), scales: tuple = (1.0, 1e-3)
) -> tuple[Difference | None, float]:
    """The first clear float64 difference between a and b (same inputs by name) on random_inputs(a, seed, scale),
    and the largest relative difference seen."""
    largest = 0.0
    for seed in seeds:
        for scale in scales:
            inputs = random_inputs(a, seed, scale)
            for k, (x, y) in enumerate(zip(outputs(a, inputs), outputs(b, inputs))):
                error = relative_error(x, y)
                largest = max(largest, error)
                if error > CLEAR:
                    return Difference(k, seed, scale, error), largest
    return None, largest


class _Peak(TorchEval):
    """float64 evaluation that records the largest magnitude of any value computed."""

    def __init__(self) -> None:
        super().__init__("float64")
        self.peak = 0.0

    def cast(self, x: torch.Tensor, ty: TensorType) -> torch.Tensor:
        x = super().cast(x, ty)
        finite = x[torch.isfinite(x)]
        self.peak = max(self.peak, float(finite.abs().max()) if finite.numel() else 0.0)
        if finite.numel() < x.numel():
            self.peak = float("inf")
        return x


def peak(graph: KernelGraph, seed: int, scale: float) -> float:
    """The largest magnitude of any input or intermediate value of graph in float64."""
    ev = _Peak()
    inputs = random_inputs(graph, seed, scale)
    batched.evaluate(graph, [ev.cast(inputs[n], graph.tensors[n]) for n in graph.inputs], ev)
    return ev.peak


@dataclass
class GateResult:
    passed: bool
    reason: str
    error: float  # the largest relative error of the candidate at the magnitudes used
    scales: list[float]


def _range(graph: KernelGraph) -> float:
    floats = [DTYPES[t.dtype].torch for t in graph.tensors.values() if not DTYPES[t.dtype].integer]
    return min(torch.finfo(dtype).max for dtype in floats)


def float_gate(
    candidate: KernelGraph, reference: KernelGraph, seeds: range = range(3), magnitudes: int = 2
) -> GateResult:
    """Runs candidate in its own dtypes against reference in float64 on random_inputs(reference, seed, scale), at
    the `magnitudes` largest input scales where reference stays in range, for each seed."""
    limit = _range(candidate) / RANGE_MARGIN
    scales = [s for s in SCALES if all(peak(reference, seed, s) <= limit for seed in seeds)][:magnitudes]
    if not scales:
        return GateResult(
            False,
            f"the float64 reference leaves the dtype range at every input scale down to {SCALES[-1]}",
            float("inf"),
            [],
        )
    worst = 0.0
    for scale in scales:
        for seed in seeds:
            inputs = random_inputs(reference, seed, scale)
            exact = outputs(reference, inputs)
            mine = outputs(candidate, inputs, "native")
            theirs = outputs(reference, inputs, "native")
            for name, x, y, ref in zip(candidate.outputs, mine, theirs, exact):
                error = relative_error(x, ref)
                worst = max(worst, error)
                where = f"output {name} at seed {seed}, input scale {scale:g}"
                if not bool(torch.isfinite(x[torch.isfinite(ref)]).all()):
                    return GateResult(False, f"NaN or overflow in {where}", float("inf"), scales)
                own = relative_error(y, ref)  # the reference program's own error in its dtypes
                allowed = TOLERANCE[candidate.tensors[name].dtype]
                allowed = max(allowed, 4 * own) if own < float("inf") else allowed
                if error > allowed:
                    return GateResult(False, f"error {error:.3g} > {allowed:.3g} in {where}", worst, scales)
    return GateResult(True, "", worst, scales)
