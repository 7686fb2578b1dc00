"""Blocks shared by the architectures: attention and the gated feed-forward network.

They are parameterised (norms, rope style, window, activation), never copied per architecture. Weights
are Linear bindings of QTensors in the mapped file; small vectors (norm weights) are dequantized once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .ops import ACT_GELU, ACT_SILU, AttentionBlock, Linear, LinearGroup, ffn


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
    """x + attention(x), as one native call (ops.AttentionBlock): `norm` is the block's input RMS norm
    (folded into the projections), `post_norm` an RMS norm of the attention output before the residual
    (gemma3), `gate` a projection of the same input whose sigmoid scales each head's output (step35)."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, cfg: AttentionConfig, norm: np.ndarray | None = None,
                 eps: float = 0.0, post_norm: np.ndarray | None = None, gate: Linear | None = None):
        self.cfg = cfg
        q_dim, kv_dim = cfg.n_head * cfg.head_dim_k, cfg.n_head_kv * cfg.head_dim_k
        v_dim = cfg.n_head_kv * cfg.head_dim_v
        self.wq = Linear(f.tensor(prefix + "attn_q.weight", (q_dim, n_embd)))
        self.wk = Linear(f.tensor(prefix + "attn_k.weight", (kv_dim, n_embd)))
        self.wv = Linear(f.tensor(prefix + "attn_v.weight", (v_dim, n_embd)))
        self.wo = Linear(f.tensor(prefix + "attn_output.weight", (n_embd, cfg.n_head * cfg.head_dim_v)))
        self.gate = gate
        biases = tuple(small(f, prefix + f"attn_{w}.bias", (d,), optional=True)
                       for w, d in (("q", q_dim), ("k", kv_dim), ("v", v_dim)))
        r = cfg.rope
        # q, k, v (and the gate, which reads the same input) in one projection call
        proj = LinearGroup([self.wq, self.wk, self.wv] + ([gate] if gate is not None else []))
        self.block = AttentionBlock(
            proj, self.wo, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim_k=cfg.head_dim_k,
            head_dim_v=cfg.head_dim_v, scale=cfg.scale, window=cfg.window, n_rot=r.n_rot, rope_mode=r.mode,
            rope_base=r.base, freq_scale=r.freq_scale,
            freq_factors=None if r.freq_factors is None else np.array(r.freq_factors, dtype=np.float32),
            biases=biases, q_norm=small(f, prefix + "attn_q_norm.weight", (cfg.head_dim_k,), optional=True),
            k_norm=small(f, prefix + "attn_k_norm.weight", (cfg.head_dim_k,), optional=True), qk_eps=cfg.norm_eps,
            in_norm=norm, post_norm=post_norm, eps=eps)

    def __call__(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """x + attention over `cache`'s layer `layer`, this batch's keys and values stored there first."""
        return self.block(x, positions, cache, layer)


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
