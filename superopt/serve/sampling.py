"""The next token from a sequence's logits: greedy at temperature 0, else temperature and top-p (nucleus)
sampling from the sequence's own generator, so a seeded request draws the same tokens whatever it is batched
with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (the first of equal maxima, as the reference decoder takes it)
    top_p: float = 1.0


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from float32 logits [vocab]."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, -1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short of it
        before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[before >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
