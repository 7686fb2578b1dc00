"""Blocks shared by the architectures: attention and the gated feed-forward network.

They are parameterised (norms, rope style, window, activation), never copied per architecture. Weights
are Linear bindings of QTensors in the mapped file; small vectors (norm weights) are dequantized once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .ops import ACT_GELU, ACT_SILU, Linear, LinearGroup, attention, ffn, qk_norm_rope


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
        self.set_projections()

    def set_projections(self, extra: tuple[Linear, ...] = ()) -> None:
        """q, k, v (and `extra` matrices of the same input, e.g. step35's head gate) as one native call."""
        self.proj = LinearGroup([self.wq, self.wk, self.wv, *extra])
        self._rows = sum(lin.rows for lin in self.proj.linears)

    def qkv(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, layer: int, norm: np.ndarray | None = None,
            eps: float = 0.0):
        """Projected, normed and rotated queries shaped per head, the keys and values to attend over (this
        batch's stored in `cache` first), and the outputs of the extra projections. `norm`: the block's
        input RMS norm, folded into the projection call."""
        c, n = self.cfg, x.shape[0]
        buf = np.empty(n * self._rows, dtype=np.float32)
        q, k, v, *extra = self.proj(x, norm, eps, out=buf)
        if self.bq is not None:
            q += self.bq
        if self.bk is not None:
            k += self.bk
        if self.bv is not None:
            v += self.bv
        r = c.rope
        q = q.reshape(n, c.n_head, c.head_dim_k)
        k = k.reshape(n, c.n_head_kv, c.head_dim_k)
        # q and k are views of buf: normed (gemma3, step35), rotated in place and stored with v, in one call
        slots, arrays, attend = cache.slots(layer, positions)
        qk_norm_rope(q, k, positions, self.q_norm, self.k_norm, c.norm_eps, r.n_rot, r.base, r.mode, r.freq_scale,
                     self.freq_factors, (v.reshape(n, c.n_head_kv, c.head_dim_v), slots, *arrays))
        return (q, *attend, *extra)

    def __call__(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, layer: int,
                 norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        q, keys, values, key_pos = self.qkv(x, positions, cache, layer, norm, eps)
        return self.wo(attention(q, keys, values, positions, key_pos, self.cfg.scale, self.cfg.window))


class GatedFFN:
    """down(act(gate(x)) * up(x)): SwiGLU (llama, step35) or GeGLU (gemma), optionally clamped (step35),
    as one native call (gr_ffn) that can fold in the block's RMS norm of x."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, n_ff: int, act: str = "silu", clamp: float = 0.0,
                 suffix: str = ""):
        self.gate = Linear(f.tensor(f"{prefix}ffn_gate{suffix}.weight", (n_ff, n_embd)))
        self.up = Linear(f.tensor(f"{prefix}ffn_up{suffix}.weight", (n_ff, n_embd)))
        self.down = Linear(f.tensor(f"{prefix}ffn_down{suffix}.weight", (n_embd, n_ff)))
        self.act = {"silu": ACT_SILU, "gelu": ACT_GELU}[act]
        self.clamp = clamp

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        return ffn(self.gate, self.up, self.down, x, self.act, self.clamp, norm, eps)
