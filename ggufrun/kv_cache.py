"""Per-layer key/value cache, preallocated for the context, float16 like llama.cpp's default.

Global-attention layers keep every position (slot = position). Sliding-window layers keep only a ring
of `window + max_batch` slots (slot = position mod ring): enough for every query of a batch to see its
whole window, and for a rollback of up to `max_batch` positions (speculative decoding) to find the
keys it needs still there. Attention masks by stored positions, so slot order never matters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMPTY_POS = np.int32(2**30)  # a position in the future of every query: an empty slot is always masked


@dataclass(frozen=True)
class LayerCacheSpec:
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    window: int = 0  # 0: global attention


class ContextFullError(ValueError):
    pass


class KVCache:
    def __init__(self, specs: list[LayerCacheSpec], n_ctx: int, max_batch: int):
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.n_past = 0
        self.specs = specs
        self.k, self.v, self.pos, self.ring = [], [], [], []
        for s in specs:
            cap = n_ctx if not s.window else min(n_ctx, s.window + max_batch)
            self.ring.append(cap < n_ctx)
            self.k.append(np.zeros((cap, s.n_head_kv, s.head_dim_k), dtype=np.float16))
            self.v.append(np.zeros((cap, s.n_head_kv, s.head_dim_v), dtype=np.float16))
            self.pos.append(np.full(cap, EMPTY_POS, dtype=np.int32))
        self.native: dict = {}  # layer -> native pointers to its k, v, pos arrays, made once (ops.AttentionBlock)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v))

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextFullError(f"context is full: {self.n_past} tokens cached + {n_new} new exceeds"
                                   f" n_ctx={self.n_ctx}")

    def slots(self, layer: int, positions: np.ndarray) -> tuple[np.ndarray, int]:
        """Where the keys and values of `positions` (int32) go in `layer` (rows of its k, v and pos
        arrays), and how many leading rows the batch attends over once they are there. The write is the
        caller's native call (ops.AttentionBlock)."""
        if self.ring[layer]:
            if len(positions) > self.max_batch:
                raise ValueError(f"batch of {len(positions)} exceeds the cache's max_batch {self.max_batch}")
            cap = self.k[layer].shape[0]
            return positions % np.int32(cap), cap
        return positions, int(positions[-1]) + 1

    def truncate(self, n: int) -> None:
        """Forget positions >= n (rollback of rejected speculative tokens, or /reset with n=0)."""
        if n > self.n_past:
            raise ValueError(f"cannot truncate to {n}: only {self.n_past} positions are cached")
        if n == 0:
            return self.reset()
        if n < self.n_past - self.max_batch and any(self.ring):
            # a ring layer may already have overwritten the keys positions < n need
            raise ValueError(f"cannot roll back {self.n_past - n} positions: sliding-window layers keep only"
                             f" {self.max_batch} positions of history beyond the window")
        # only positions n..n_past-1 were ever stored past n: their slots, not a scan of every layer's cache
        # (a speculative step rolls back a few positions of a 4096-slot cache)
        gone = np.arange(n, self.n_past, dtype=np.int32)
        for p, ring in zip(self.pos, self.ring):
            if ring:
                p[gone % np.int32(len(p))] = EMPTY_POS
            else:
                p[n:self.n_past] = EMPTY_POS
        self.n_past = n

    def reset(self) -> None:
        for p in self.pos:
            p.fill(EMPTY_POS)
        self.n_past = 0
