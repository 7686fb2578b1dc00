"""A float64 reference forward: the function a GGUF file defines, computed exactly.

Weights are dequantized with gguf-py (independent of ggufrun's kernels) and every product is float64,
activations unquantized. This is what both ggufrun and llama.cpp approximate; the parity tests hold
ggufrun's distance to it to be no larger than llama.cpp's.
"""
from __future__ import annotations

import math
from functools import lru_cache

import gguf
import numpy as np


class Weights:
    def __init__(self, path: str):
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.md = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("tokenizer.")}
        self.arch = self.md["general.architecture"]

    def hp(self, key, default=None):
        return self.md.get(f"{self.arch}.{key}", default)

    @lru_cache(maxsize=None)
    def get(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(a, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])

    def has(self, name: str) -> bool:
        return name in self.tensors


def rms_norm(x, w, eps):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def rope(x, pos, n_rot, base, neox, freq_scale=1.0):
    """x: (T, H, D). Rotates the first n_rot features."""
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot)
    theta = pos[:, None].astype(np.float64) * inv[None, :] * freq_scale
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * c - b * s
        out[..., half:n_rot] = a * s + b * c
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * c - b * s
        out[..., 1:n_rot:2] = a * s + b * c
    return out


def attend(q, k, v, scale, window=0):
    T, H, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    out = np.empty((T, H, v.shape[2]))
    i = np.arange(T)
    diff = i[:, None] - i[None, :]
    mask = diff < 0
    if window:
        mask |= diff >= window
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T * scale
        s[mask] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h] = p @ v[:, h // g]
    return out.reshape(T, -1)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(W: Weights, tokens) -> np.ndarray:
    """float64 logits (T, n_vocab) for `tokens` as one fresh sequence."""
    tokens = np.asarray(tokens)
    T = len(tokens)
    pos = np.arange(T)
    arch = W.arch
    n_embd = W.hp("embedding_length")
    n_layer = W.hp("block_count")
    n_head = W.hp("attention.head_count")
    n_head_kv = W.hp("attention.head_count_kv", n_head)
    hd = W.hp("attention.key_length", n_embd // n_head)
    n_rot = W.hp("rope.dimension_count", hd)
    eps = W.hp("attention.layer_norm_rms_epsilon")
    base = W.hp("rope.freq_base", 10000.0)
    gemma = arch == "gemma3"
    x = W.get("token_embd.weight")[tokens]
    if gemma:
        x = x * math.sqrt(n_embd)
        window = W.hp("attention.sliding_window", 0)
    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, W.get(p + "attn_norm.weight"), eps)
        q = (h @ W.get(p + "attn_q.weight").T).reshape(T, n_head, hd)
        k = (h @ W.get(p + "attn_k.weight").T).reshape(T, n_head_kv, hd)
        v = (h @ W.get(p + "attn_v.weight").T).reshape(T, n_head_kv, hd)
        if gemma:
            q = rms_norm(q, W.get(p + "attn_q_norm.weight"), eps)
            k = rms_norm(k, W.get(p + "attn_k_norm.weight"), eps)
            swa = window > 0 and il % 6 < 5
            b = 10000.0 if swa else base
            q, k = rope(q, pos, n_rot, b, True), rope(k, pos, n_rot, b, True)
            a = attend(q, k, v, 1.0 / math.sqrt(hd), window if swa else 0) @ W.get(p + "attn_output.weight").T
            x = x + rms_norm(a, W.get(p + "post_attention_norm.weight"), eps)
            h = rms_norm(x, W.get(p + "ffn_norm.weight"), eps)
            m = (gelu(h @ W.get(p + "ffn_gate.weight").T) * (h @ W.get(p + "ffn_up.weight").T)) @ W.get(p + "ffn_down.weight").T
            x = x + rms_norm(m, W.get(p + "post_ffw_norm.weight"), eps)
        else:
            q, k = rope(q, pos, n_rot, base, False), rope(k, pos, n_rot, base, False)
            x = x + attend(q, k, v, 1.0 / math.sqrt(hd)) @ W.get(p + "attn_output.weight").T
            h = rms_norm(x, W.get(p + "ffn_norm.weight"), eps)
            m = (silu(h @ W.get(p + "ffn_gate.weight").T) * (h @ W.get(p + "ffn_up.weight").T)) @ W.get(p + "ffn_down.weight").T
            x = x + m
    x = rms_norm(x, W.get("output_norm.weight"), eps)
    out = W.get("output.weight") if W.has("output.weight") else W.get("token_embd.weight")
    return x @ out.T
