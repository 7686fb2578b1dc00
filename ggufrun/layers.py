"""Blocks shared by the architectures: attention and the gated feed-forward network.

They are parameterised (norms, rope style, window, activation), never copied per architecture. Weights
are QTensors into the mapped file; small vectors (norm weights) are dequantized once at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFFile, QTensor
from .kv_cache import KVCache
from .ops import apply_rope, attention, gelu, linear, rms_norm, silu


def small(f: GGUFFile, name: str, shape: tuple[int, ...] | None = None, optional: bool = False) -> np.ndarray | None:
    """A small tensor (norm weight, bias) dequantized to float32 once."""
    if optional and name not in f:
        return None
    return f.tensor(name, shape).dequantize().reshape(shape if shape else -1)


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
        self.wq = f.tensor(prefix + "attn_q.weight", (q_dim, n_embd))
        self.wk = f.tensor(prefix + "attn_k.weight", (kv_dim, n_embd))
        self.wv = f.tensor(prefix + "attn_v.weight", (cfg.n_head_kv * cfg.head_dim_v, n_embd))
        self.wo = f.tensor(prefix + "attn_output.weight", (n_embd, cfg.n_head * cfg.head_dim_v))
        self.bq = small(f, prefix + "attn_q.bias", (q_dim,), optional=True)
        self.bk = small(f, prefix + "attn_k.bias", (kv_dim,), optional=True)
        self.bv = small(f, prefix + "attn_v.bias", (cfg.n_head_kv * cfg.head_dim_v,), optional=True)
        self.q_norm = small(f, prefix + "attn_q_norm.weight", (cfg.head_dim_k,), optional=True)
        self.k_norm = small(f, prefix + "attn_k_norm.weight", (cfg.head_dim_k,), optional=True)

    def __call__(self, x: np.ndarray, positions: np.ndarray, rope_cs: tuple[np.ndarray, np.ndarray],
                 cache: KVCache, layer: int) -> np.ndarray:
        c = self.cfg
        n = x.shape[0]
        q = linear(x, self.wq)
        k = linear(x, self.wk)
        v = linear(x, self.wv)
        if self.bq is not None:
            q += self.bq
        if self.bk is not None:
            k += self.bk
        if self.bv is not None:
            v += self.bv
        q = q.reshape(n, c.n_head, c.head_dim_k)
        k = k.reshape(n, c.n_head_kv, c.head_dim_k)
        v = v.reshape(n, c.n_head_kv, c.head_dim_v)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = rope_cs
        q = apply_rope(q, cos, sin, c.rope.mode)
        k = apply_rope(k, cos, sin, c.rope.mode)
        keys, values, key_pos = cache.store(layer, positions, k, v)
        out = attention(q, keys, values, positions, key_pos, c.scale, c.window)
        return linear(out, self.wo)


class GatedFFN:
    """down(act(gate(x)) * up(x)): SwiGLU (llama, step35) or GeGLU (gemma)."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, n_ff: int, act: str = "silu"):
        self.gate = f.tensor(prefix + "ffn_gate.weight", (n_ff, n_embd))
        self.up = f.tensor(prefix + "ffn_up.weight", (n_ff, n_embd))
        self.down = f.tensor(prefix + "ffn_down.weight", (n_embd, n_ff))
        self.act = {"silu": silu, "gelu": gelu}[act]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return linear(self.act(linear(x, self.gate)) * linear(x, self.up), self.down)

