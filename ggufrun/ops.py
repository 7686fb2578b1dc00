"""The element-wise and attention math of a transformer block, as llama.cpp's CPU backend computes it.

Weights never pass through here: products with quantized weights are `linear` (native matmul on the
mapped bytes). Activations are float32 arrays of shape (n_tokens, features).
"""
from __future__ import annotations

import math

import numpy as np

from . import native
from .gguf_file import QTensor

ROPE_NORM = 0   # rotate adjacent pairs (x[2i], x[2i+1]): llama-family GGUFs (converter permutes q/k)
ROPE_NEOX = 2   # rotate halves (x[i], x[i + n_rot/2]): gemma, qwen, step35, ...


def linear(x: np.ndarray, w: QTensor, out: np.ndarray | None = None) -> np.ndarray:
    """x (n, cols) @ W^T for a quantized W of shape (rows, cols)."""
    rows, cols = w.shape[-2], w.shape[-1]
    return native.matmul(w.data, w.qtype, rows, cols, x, out=out)


def embed_rows(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of an embedding matrix, dequantized; only those rows' bytes are touched."""
    rb = w.row_bytes
    table = w.data.reshape(w.shape[0], rb)
    picked = np.ascontiguousarray(table[np.asarray(ids, dtype=np.int64)])
    return native.dequantize(picked, w.qtype).reshape(len(ids), w.shape[1])


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMS norm over the last axis; `weight` broadcasts over it (per-head norms pass (..., head_dim))."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    y = x * (1.0 / np.sqrt(ms + np.float32(eps))).astype(np.float32)
    return y * weight if weight is not None else y


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation, as ggml_gelu computes it."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_GELU_C * x * (np.float32(1.0) + np.float32(0.044715) * x * x)))


def rope_cache(positions: np.ndarray, n_rot: int, base: float, freq_scale: float = 1.0,
               freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape (n_tokens, n_rot/2) for each position.

    ggml builds theta by repeated float32 multiplication by base^(-2/n_rot), not by pow per index;
    doing the same keeps positions thousands of tokens in within float rounding of llama.cpp.
    """
    half = n_rot // 2
    theta_scale = np.float32(base ** (-2.0 / n_rot))
    steps = np.full(half, theta_scale, dtype=np.float32)
    steps[0] = np.float32(1.0)
    powers = np.cumprod(steps, dtype=np.float32)             # theta_scale^i, accumulated in float32
    theta = positions.astype(np.float32)[:, None] * powers[None, :]
    if freq_factors is not None:
        theta = theta / freq_factors[None, :half].astype(np.float32)
    theta = theta * np.float32(freq_scale)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: int) -> np.ndarray:
    """Rotate the first 2*cos.shape[1] features of each head. x: (n_tokens, n_heads, head_dim)."""
    half = cos.shape[1]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = x.copy()
    if mode == ROPE_NEOX:
        x0 = x[..., :half]
        x1 = x[..., half:2 * half]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:2 * half] = x0 * s + x1 * c
    else:
        x0 = x[..., 0:2 * half:2]
        x1 = x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = x0 * c - x1 * s
        out[..., 1:2 * half:2] = x0 * s + x1 * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              scale: float, window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """Causal multi-head attention with grouped KV heads.

    q: (n_q, n_head, d); k: (n_kv_tok, n_head_kv, d); v: (n_kv_tok, n_head_kv, dv); positions give
    causality: key j is visible to query i when k_pos[j] <= q_pos[i] and, with a sliding window,
    q_pos[i] - k_pos[j] < window (llama.cpp's LLAMA_SWA_TYPE_STANDARD). Returns (n_q, n_head * dv).
    """
    n_q, n_head, d = q.shape
    n_kv_tok, n_head_kv, dv = v.shape
    group = n_head // n_head_kv
    # (n_head_kv, group, n_q, d) x (n_head_kv, d, n_kv_tok) -> (n_head_kv, group, n_q, n_kv_tok)
    qh = q.reshape(n_q, n_head_kv, group, d).transpose(1, 2, 0, 3)
    kh = k.astype(np.float32).transpose(1, 2, 0)
    scores = np.matmul(qh, kh[:, None]) * np.float32(scale)
    if softcap:
        scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
    diff = q_pos[:, None] - k_pos[None, :]
    masked = diff < 0
    if window:
        masked |= diff >= window
    scores[..., masked] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    vh = v.astype(np.float32).transpose(1, 0, 2)                  # (n_head_kv, n_kv_tok, dv)
    out = np.matmul(scores, vh[:, None])                          # (n_head_kv, group, n_q, dv)
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(n_q, n_head * dv)
