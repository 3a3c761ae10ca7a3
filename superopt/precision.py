"""Precision chosen per projection kind: `superopt megakernel MODEL.yaml --precision auto --error-budget E`.

Calibration: the model's own bf16 reference decoder (superopt.model.Decoder) decodes a seeded random prompt of
`steps` tokens, and the vector entering each projection at each step is recorded: one row a step for each
layer's QKV projection (the normed layer input, which q, k and v share), O projection (the attention output),
gate/up projection (the normed residual) and down projection (the gated activation), and the LM head (the final
norm's output). The rows of layer l's projection kind p are X_lp [steps, in].

The error of a format f for that projection is the relative output error of its weight W_lp (the kind's HF
weights stacked: [out, in], bf16) quantized to f (round to nearest in groups of `group`, superopt.quant, as the
megakernel stores it) and dequantized (Wq, the IR's dequant), against W_lp itself, over the calibration rows, in
float64:

    err_f(l, p) = ||X_lp Wq^T - X_lp W_lp^T||_F / ||X_lp W_lp^T||_F

A kind's format is the fewest bits (int4, then int8) whose error is within the budget in every layer; where
neither is, bf16 (its error 0 by definition: it is the reference). The most sensitive kinds stay wider, and a
larger budget never picks more bits. The granularity is the projection kind, one format in every layer (the
megakernel's GEMV task kinds are one body and one tiling each); the report has every layer's errors. Seeded
weights and prompt give the same choice on the same kind of device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from superopt.errors import SuperoptError
from superopt.model import (
    BF16,
    LM_HEAD,
    PROGRAM_WEIGHTS,
    PROJECTION_KINDS,
    WEIGHT_KIND,
    Decoder,
    Model,
    WeightFormat,
    dequantized_weight,
    linear_rows,
    quantized_weight,
    weight_format,
)

CANDIDATES = ("int4", "int8")  # fewest bits first
CALIBRATION_STEPS = 16
METRIC = "||X Wq^T - X W^T||_F / ||X W^T||_F over the calibration rows X, float64"


class _Recorder(TorchFunctionMode):
    """Records the input of every F.linear whose weight is one of `keys` (by identity), one row a call."""

    def __init__(self, keys: dict[int, tuple[int, str]]) -> None:
        super().__init__()
        self.keys = keys
        self.rows: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in keys.values()}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.linear and id(args[1]) in self.keys:
            self.rows[self.keys[id(args[1])]].append(args[0].detach().reshape(-1).double())
        return func(*args, **(kwargs or {}))


def calibration_inputs(
    model: Model, steps: int = CALIBRATION_STEPS, seed: int = 0
) -> dict[tuple[int, str], torch.Tensor]:
    """The rows entering each projection kind of each layer (the LM head's: layer `config.layers`), [steps, in]
    float64, as the bf16 reference decoder computes them over a prompt of `steps` tokens drawn with `seed`."""
    cfg = model.config
    steps = min(steps, model.max_seq)
    device = model.w("model.embed_tokens.weight").device
    dec = Decoder(model, "bfloat16", device)
    # The first weight of each kind: its projections share their input, so one of them records it.
    first = {kind: next(w for w, k in WEIGHT_KIND.items() if k == kind) for kind in PROJECTION_KINDS}
    keys = {
        id(dec.layers[i][PROGRAM_WEIGHTS[first[kind]][0].split(".")[-1]]): (i, kind)
        for i in range(cfg.layers)
        for kind in PROJECTION_KINDS
    }
    keys[id(dec.lm_head)] = (cfg.layers, "lmhead")
    prompt = torch.randint(cfg.vocab, (steps,), generator=torch.Generator().manual_seed(seed)).tolist()
    recorder = _Recorder(keys)
    with torch.no_grad(), recorder:
        dec.generate(prompt, 1)  # a step a prompt token
    return {key: torch.stack(rows) for key, rows in recorder.rows.items()}


def kind_weight(model: Model, layer: int, kind: str) -> torch.Tensor:
    """A projection kind's bf16 weight rows [out, in] in a layer: its HF projections stacked (grouping is along
    `in`, so the stacked rows quantize as each projection's would)."""
    if kind == "lmhead":
        return model.w(LM_HEAD)
    return torch.cat([linear_rows(model, layer, w) for w, k in WEIGHT_KIND.items() if k == kind])


def relative_error(x: torch.Tensor, w: torch.Tensor, fmt: WeightFormat, what: str = "the weight") -> float:
    """err_f (the module's docstring): the output error of `w` [out, in] stored in `fmt` on the rows `x` [n, in],
    relative to its bf16 output, in float64; SuperoptError naming `what` where `fmt` cannot store it."""
    wq = dequantized_weight(quantized_weight(w, fmt, what), fmt).double()
    y = x.double() @ w.double().T
    return float((x.double() @ wq.T - y).norm() / y.norm())


def pick(errors: dict[str, float], budget: float, group: int) -> WeightFormat:
    """The fewest bits among CANDIDATES whose error (the largest over the layers) is within `budget`, else bf16."""
    within = [p for p in CANDIDATES if errors[p] <= budget]
    return weight_format(within[0], group) if within else BF16


@dataclass(frozen=True)
class Choice:
    """The formats chosen per projection kind, and each projection's errors (`errors[kind][layer][precision]`)."""

    budget: float
    group: int
    formats: dict[str, WeightFormat]
    errors: dict[str, list[dict[str, float]]]

    def to_json(self) -> dict[str, Any]:
        """The build report's "precision" section."""
        kinds = {
            kind: {"format": self.formats[kind].describe(), "layers": layers} for kind, layers in self.errors.items()
        }
        return {
            "mode": "auto",
            "granularity": "projection kind (one format in every layer)",
            "error_budget": self.budget,
            "group": self.group,
            "metric": METRIC,
            "kinds": kinds,
        }

    def lines(self) -> list[str]:
        """A line a kind: its format and its largest int4 and int8 errors over the layers."""
        out = [f"precision auto, error budget {self.budget:g}, group {self.group}:"]
        for kind, layers in self.errors.items():
            worst = {p: max(e[p] for e in layers) for p in CANDIDATES}
            errs = ", ".join(f"{p} {worst[p]:.3g}" for p in CANDIDATES)
            out.append(f"  {kind}: {self.formats[kind].short} (largest error: {errs})")
        return out


def choose_precision(
    model: Model, budget: float, group: int, lm_head: str = "same", steps: int = CALIBRATION_STEPS, seed: int = 0
) -> Choice:
    """Each projection kind's format for a bf16 `model` within the error `budget` (the module's docstring), int
    formats in groups of `group`; the LM head's too, unless `lm_head` is "bf16" (kept wide)."""
    if not budget > 0:
        raise SuperoptError(f"the error budget must be a positive number, got {budget}")
    if model.fmt.quantized or model.mixed:
        raise SuperoptError(
            f"{model.name}: its weights are stored {'mixed' if model.mixed else model.fmt.describe()}; --precision "
            "auto chooses among formats "
            "of bf16 weights (give a bf16 checkpoint)"
        )
    rows = calibration_inputs(model, steps, seed)
    formats: dict[str, WeightFormat] = {}
    errors: dict[str, list[dict[str, float]]] = {}
    for kind in PROJECTION_KINDS + ("lmhead",) * (lm_head == "same"):
        layers = range(model.config.layers) if kind != "lmhead" else [model.config.layers]
        errors[kind] = [
            {
                p: relative_error(
                    rows[(i, kind)], kind_weight(model, i, kind), weight_format(p, group), f"{model.name}: {kind}"
                )
                for p in CANDIDATES
            }
            for i in layers
        ]
        formats[kind] = pick({p: max(e[p] for e in errors[kind]) for p in CANDIDATES}, budget, group)
    return Choice(budget, group, {"lmhead": BF16} | formats, errors)
