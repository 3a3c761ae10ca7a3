"""The reference decoder's step, batched: B sequences, each at its own position and length, in one step.

Each sequence brings a chunk of tokens (one when it decodes, up to the prefill budget when its prompt is fed) and
its block table; the chunks' tokens are stacked, so every projection and the MLP are [T, hidden] GEMMs over all
of them, and attention runs per sequence over its own positions in the paged cache (causal within its chunk).
The step returns the logits after each chunk's last token.

The arithmetic is superopt.model.Decoder's, op for op: its weights (cast to the same precision), its RMSNorm,
RoPE tables and mask, so a sequence decodes to the tokens it decodes to alone (float32: up to the order of
float32 sums, which GEMMs and GEMVs take differently; bf16: up to near ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from superopt.model import Decoder, Model, attended, rope_table
from superopt.serve.kv import PagedKVCache


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a step: `tokens` at positions start .. start + len(tokens) - 1, and `slots`, the
    cache slot of each of its positions 0 .. start + len(tokens) - 1 (PagedKVCache.slots)."""

    tokens: list[int]
    start: int
    slots: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class BatchedDecoder:
    def __init__(self, model: Model, cache: PagedKVCache, context: int, precision: str = "float32") -> None:
        # The reference decoder holds the weights in `precision` and its norm; its own static KV cache is not
        # used here (the paged one is), so it is built for one position.
        self.ref = Decoder(replace(model, max_seq=1), precision)
        self.cfg, self.dt, self.cache, self.context = model.config, self.ref.dt, cache, context
        self.cos, self.sin = rope_table(self.cfg, context)

    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feeds every chunk's tokens, appending their k and v to the cache; returns the logits (float32,
        [len(chunks), vocab]) after each chunk's last token."""
        ref = self.ref
        tokens = torch.tensor([t for c in chunks for t in c.tokens])
        pos = torch.cat([torch.arange(c.start, c.end) for c in chunks])
        new_slots = torch.cat([c.slots[c.start :] for c in chunks])
        x = ref.embedded(tokens)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [T, 1, d / 2]: the same for every head
        for i, lw in enumerate(ref.layers):
            q, k, v = ref.qkv_heads(lw, x, cos, sin)
            self.cache.write(i, new_slots, k, v)
            a = torch.cat(
                [self.attend(i, part, c) for part, c in zip(q.split([len(c.tokens) for c in chunks]), chunks)]
            )
            x = ref.after_attention(lw, x, a)
        last = torch.tensor([c.end - c.start for c in chunks]).cumsum(0) - 1
        return F.linear(ref.rms_norm(x[last], ref.norm), ref.lm_head).float()

    def attend(self, layer: int, q: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """GQA of one chunk's queries q [n, heads, d] over its sequence's cached positions 0 .. chunk.end - 1,
        each query attending what the reference's mask lets it (causal, the sliding window); [n, heads * d]."""
        cfg, d, n = self.cfg, self.cfg.head_dim, len(chunk.tokens)
        k, v = self.cache.read(layer, chunk.slots)  # [L, kv_heads, d]
        # rows (query, group member) of each kv head, as the reference's [kv_heads, group, d] with n queries
        qg = q.view(n, cfg.kv_heads, cfg.group, d).transpose(0, 1).reshape(cfg.kv_heads, n * cfg.group, d).float()
        scores = (qg @ k.float().permute(1, 2, 0)) / math.sqrt(d)
        mask = attended(cfg, torch.arange(chunk.end), torch.arange(chunk.start, chunk.end)[:, None])
        probs = torch.softmax(scores.masked_fill(~mask.repeat_interleave(cfg.group, 0), float("-inf")), -1)
        out = (probs @ v.float().transpose(0, 1)).to(self.dt)
        return out.view(cfg.kv_heads, n, cfg.group, d).transpose(0, 1).reshape(n, cfg.heads * d)
