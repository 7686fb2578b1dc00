"""What every decoder-only architecture shares: embeddings in, blocks, norm, logits out.

An architecture file defines its hyper-parameters (a dataclass read from metadata), its block, and a
Model subclass saying how they compose; this base runs them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..gguf_file import GGUFError, GGUFFile
from ..kv_cache import KVCache, LayerCacheSpec
from ..layers import small
from ..ops import Linear, embed_rows, rms_norm

_REQUIRED = object()


def hparam(f: GGUFFile, key: str, default: Any = _REQUIRED, arch: str | None = None) -> Any:
    """`{arch}.{key}` from the file's metadata; missing and no default is a GGUFError naming the key."""
    full = f"{arch or f.arch}.{key}"
    if full in f.metadata:
        return f.metadata[full]
    if default is _REQUIRED:
        raise GGUFError(f"{f.path}: missing metadata key {full!r}")
    return default


def per_layer(value: Any, n_layer: int, key: str, f: GGUFFile) -> list:
    """Keys like head_count may be one number or one per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) < n_layer:
            raise GGUFError(f"{f.path}: key {key!r} has {len(value)} entries, expected {n_layer}")
        return list(value[:n_layer])
    return [value] * n_layer


class TransformerLM:
    """Token embedding -> blocks -> output norm -> output projection."""

    embed_scale: float = 1.0
    final_softcap: float = 0.0

    def __init__(self, f: GGUFFile, n_embd: int, n_vocab: int, norm_eps: float):
        self.file = f
        self.n_embd = n_embd
        self.n_vocab = n_vocab
        self.norm_eps = norm_eps
        self.tok_embd = f.tensor("token_embd.weight", (n_vocab, n_embd))
        self.output_norm = small(f, "output_norm.weight", (n_embd,))
        # tied embeddings: files without output.weight reuse token_embd
        self.output = Linear(f.maybe_tensor("output.weight", (n_vocab, n_embd)) or self.tok_embd)
        self.blocks: list = []

    # -- to be given by the architecture ----------------------------------------------------------
    def cache_specs(self) -> list[LayerCacheSpec]:
        raise NotImplementedError

    # -- shared forward ---------------------------------------------------------------------------
    def new_cache(self, n_ctx: int, max_batch: int) -> KVCache:
        return KVCache(self.cache_specs(), n_ctx, max_batch)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = embed_rows(self.tok_embd, tokens)
        if self.embed_scale != 1.0:
            x *= np.float32(self.embed_scale)
        return x

    def hidden(self, x: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        for i, block in enumerate(self.blocks):
            x = block(x, positions, cache, i)
        return x

    def logits(self, h: np.ndarray) -> np.ndarray:
        y = self.output(rms_norm(h, self.output_norm, self.norm_eps))
        if self.final_softcap:
            y = np.float32(self.final_softcap) * np.tanh(y / np.float32(self.final_softcap))
        return y

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at the next positions of `cache`; logits for the last (or every) position."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        cache.check_room(n)
        positions = np.arange(cache.n_past, cache.n_past + n, dtype=np.int32)
        h = self.hidden(self.embed(tokens), positions, cache)
        cache.n_past += n
        return self.logits(h if all_logits else h[-1:])

    def forward_embd(self, x: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """forward() from input embeddings (n, n_embd) instead of token ids: prompts with image rows,
        which enter the trunk exactly where token embeddings would."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_embd or len(x) == 0:
            raise ValueError(f"forward_embd() needs (n >= 1, {self.n_embd}) embeddings, got {x.shape}")
        cache.check_room(len(x))
        positions = np.arange(cache.n_past, cache.n_past + len(x), dtype=np.int32)
        h = self.hidden(x, positions, cache)
        cache.n_past += len(x)
        return self.logits(h if all_logits else h[-1:])
