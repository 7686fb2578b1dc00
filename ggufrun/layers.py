"""Blocks shared by the architectures: attention and the gated feed-forward network.

They are parameterised (norms, rope style, window, activation), never copied per architecture. Weights
are Linear bindings of QTensors in the mapped file; small vectors (norm weights) are dequantized once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .ops import ACT_GELU, ACT_SILU, Linear, attention, glu, rms_norm, rope


def small(f: GGUFFile, name: str, shape: tuple[int, ...] | None = None, optional: bool = False) -> np.ndarray | None:
    """A small tensor (norm weight, bias) dequantized to float32 once."""
    if optional and name not in f:
        return None
    return np.ascontiguousarray(f.tensor(name, shape).dequantize().reshape(shape if shape else -1))


@dataclass(frozen=True)
class RopeConfig:
    n_rot: int
    base: float
    mode: int
    freq_scale: float = 1.0
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class AttentionConfig:
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    rope: RopeConfig
    scale: float
    window: int = 0          # sliding window in tokens, 0 for global attention
    norm_eps: float = 1e-6   # for per-head q/k norms


class Attention:
    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, cfg: AttentionConfig):
        self.cfg = cfg
        q_dim, kv_dim = cfg.n_head * cfg.head_dim_k, cfg.n_head_kv * cfg.head_dim_k
        v_dim = cfg.n_head_kv * cfg.head_dim_v
        self.wq = Linear(f.tensor(prefix + "attn_q.weight", (q_dim, n_embd)))
        self.wk = Linear(f.tensor(prefix + "attn_k.weight", (kv_dim, n_embd)))
        self.wv = Linear(f.tensor(prefix + "attn_v.weight", (v_dim, n_embd)))
        self.wo = Linear(f.tensor(prefix + "attn_output.weight", (n_embd, cfg.n_head * cfg.head_dim_v)))
        self.bq = small(f, prefix + "attn_q.bias", (q_dim,), optional=True)
        self.bk = small(f, prefix + "attn_k.bias", (kv_dim,), optional=True)
        self.bv = small(f, prefix + "attn_v.bias", (v_dim,), optional=True)
        self.q_norm = small(f, prefix + "attn_q_norm.weight", (cfg.head_dim_k,), optional=True)
        self.k_norm = small(f, prefix + "attn_k_norm.weight", (cfg.head_dim_k,), optional=True)
        r = cfg.rope
        self.freq_factors = None if r.freq_factors is None else np.array(r.freq_factors, dtype=np.float32)

    def qkv(self, x: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projected, normed and rotated queries and keys, and values, shaped per head."""
        c, n = self.cfg, x.shape[0]
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.bq is not None:
            q += self.bq
        if self.bk is not None:
            k += self.bk
        if self.bv is not None:
            v += self.bv
        q = q.reshape(n, c.n_head, c.head_dim_k)
        k = k.reshape(n, c.n_head_kv, c.head_dim_k)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, c.norm_eps)
        r = c.rope
        rope(q, positions, r.n_rot, r.base, r.mode, r.freq_scale, self.freq_factors)
        rope(k, positions, r.n_rot, r.base, r.mode, r.freq_scale, self.freq_factors)
        return q, k, v.reshape(n, c.n_head_kv, c.head_dim_v)

    def __call__(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        q, k, v = self.qkv(x, positions)
        keys, values, key_pos = cache.store(layer, positions, k, v)
        return self.wo(attention(q, keys, values, positions, key_pos, self.cfg.scale, self.cfg.window))


class GatedFFN:
    """down(act(gate(x)) * up(x)): SwiGLU (llama, step35) or GeGLU (gemma)."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, n_ff: int, act: str = "silu", clamp: float = 0.0,
                 suffix: str = ""):
        self.gate = Linear(f.tensor(f"{prefix}ffn_gate{suffix}.weight", (n_ff, n_embd)))
        self.up = Linear(f.tensor(f"{prefix}ffn_up{suffix}.weight", (n_ff, n_embd)))
        self.down = Linear(f.tensor(f"{prefix}ffn_down{suffix}.weight", (n_embd, n_ff)))
        self.act = {"silu": ACT_SILU, "gelu": ACT_GELU}[act]
        self.clamp = clamp

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.down(glu(self.gate(x), self.up(x), self.act, self.clamp))
