"""A paged KV cache: one pool of fixed-size blocks shared by every sequence, and a block table per sequence.

The pool is two tensors, k and v, [layers, blocks * block_size, kv_heads, head_dim]: a cache *slot* is a row of
it, block b holding slots b * block_size .. (b + 1) * block_size - 1. A sequence's block table lists its blocks in
position order, so position p lives in slot table[p // block_size] * block_size + p % block_size; the blocks of
one sequence need not be adjacent, so finished sequences leave no holes that a longer one cannot use.

A sequence reserves the blocks for all the positions it may reach (its prompt and max_tokens) when it is
admitted, and gives them all back when it finishes or is cancelled: a running sequence never runs out of blocks,
so nothing is ever preempted, and a request that does not fit waits in the queue (superopt/serve/scheduler.py).
"""

from __future__ import annotations

import torch

from superopt.model import ModelConfig


def default_blocks(max_batch: int, context: int, block_size: int) -> int:
    """A pool that holds max_batch sequences of the whole context: then only the slots bound the batch."""
    return max_batch * -(-context // block_size)


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, blocks: int, block_size: int, dtype: torch.dtype) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"the pool needs at least one block of one slot, got {blocks} x {block_size}")
        self.blocks, self.block_size = blocks, block_size
        shape = (cfg.layers, blocks * block_size, cfg.kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        # A stack, lowest block on top: which blocks a sequence gets depends only on the order of admissions and
        # releases, so a run is reproducible.
        self._free = list(range(blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, seq: int, positions: int) -> bool:
        """Reserves blocks for `positions` positions of sequence `seq`; False (and nothing reserved) if the pool
        has too few free blocks."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq} already holds blocks")
        need = self.blocks_for(positions)
        if need > len(self._free):
            return False
        self._tables[seq] = [self._free.pop() for _ in range(need)]
        return True

    def release(self, seq: int) -> None:
        """Returns every block of `seq` to the pool (nothing if it holds none)."""
        self._free.extend(reversed(self._tables.pop(seq, [])))

    def table(self, seq: int) -> list[int]:
        return list(self._tables[seq])

    def slots(self, seq: int, length: int) -> torch.Tensor:
        """The slots of positions 0 .. length - 1 of `seq` (int64 [length])."""
        pos = torch.arange(length)
        table = torch.tensor(self._tables[seq], dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k and v ([n, kv_heads, head_dim]) of one layer at `slots` ([n])."""
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of one layer at `slots`, [n, kv_heads, head_dim] each."""
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)
