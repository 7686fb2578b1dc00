"""A float64 reference forward for step35, written from llama.cpp's graph and independent of ggufrun.

Weights are dequantized with gguf-py; every product is float64 and activations are never quantized.
What it encodes (llama.cpp src/models/step35.cpp, build_moe_ffn, build_ffn):
  - global layers rotate half of rope.dimension_count (default: the head size), NEOX style, with
    rope_freqs.weight factors; sliding layers rotate rope.dimension_count_swa (default: the unhalved
    count) with rope.freq_base_swa, no factors, and see keys with 0 <= q_pos - k_pos < window;
  - q/k RMS norms per head, then rope; each head's attention output times sigmoid(attn_gate(x));
  - MoE: scores = sigmoid (or softmax) of the router; top-k of scores + exp_probs_b; weights are the
    unbiased scores of the chosen, normalised if expert_weights_norm, times expert_weights_scale;
    plus the shared expert. Clamped SwiGLU where the per-layer limit > 1e-6: up clipped to
    [-L, L], silu(gate) clipped above at L. Dense layers use the shared-expert limit.
"""
from __future__ import annotations

import math

import numpy as np

from reference import Weights, attend, rms_norm  # float64 helpers, ggufrun-free


def rope_neox(x, pos, n_rot, base, freq_scale=1.0, factors=None):
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot) * freq_scale
    if factors is not None:
        inv = inv / np.asarray(factors[:half], dtype=np.float64)
    theta = pos[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    a, b = x[..., :half], x[..., half:n_rot]
    out[..., :half] = a * c - b * s
    out[..., half:n_rot] = a * s + b * c
    return out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def swiglu(g, u, limit):
    a = g * sigmoid(g)
    if limit > 1e-6:
        return np.minimum(a, limit) * np.clip(u, -limit, limit)
    return a * u


def per_layer(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def forward(W: Weights, tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    T = len(tokens)
    pos = np.arange(T)
    hp = W.hp
    n_all = hp("block_count")
    n_layer = n_all - hp("nextn_predict_layers", 0)
    n_embd = hp("embedding_length")
    heads = per_layer(hp("attention.head_count"), n_all)
    heads_kv = per_layer(hp("attention.head_count_kv", heads), n_all)
    hd = hp("attention.key_length", n_embd // heads[0])
    eps = hp("attention.layer_norm_rms_epsilon")
    window = hp("attention.sliding_window")
    swa = [bool(v) for v in hp("attention.sliding_window_pattern")]
    n_rot = hp("rope.dimension_count", hd)
    n_rot_swa = hp("rope.dimension_count_swa", n_rot)
    base, base_swa = hp("rope.freq_base", 10000.0), hp("rope.freq_base_swa", 10000.0)
    factor = hp("rope.scaling.factor", 0.0)
    factors = W.get("rope_freqs.weight") if W.has("rope_freqs.weight") else None
    n_used = per_layer(hp("expert_used_count", 0), n_all)
    gating = hp("expert_gating_func", 2) or 2
    norm_w = bool(hp("expert_weights_norm", False))
    w_scale = float(hp("expert_weights_scale", 0.0)) or 1.0
    clamp_exp = per_layer(hp("swiglu_clamp_exp", 0.0), n_all)
    clamp_shexp = per_layer(hp("swiglu_clamp_shexp", 0.0), n_all)

    x = W.get("token_embd.weight")[tokens]
    for il in range(n_layer):
        p = f"blk.{il}."
        H, Hkv = heads[il], heads_kv[il]
        h = rms_norm(x, W.get(p + "attn_norm.weight"), eps)
        q = (h @ W.get(p + "attn_q.weight").T).reshape(T, H, hd)
        k = (h @ W.get(p + "attn_k.weight").T).reshape(T, Hkv, hd)
        v = (h @ W.get(p + "attn_v.weight").T).reshape(T, Hkv, hd)
        if W.has(p + "attn_q_norm.weight"):
            q = rms_norm(q, W.get(p + "attn_q_norm.weight"), eps)
        if W.has(p + "attn_k_norm.weight"):
            k = rms_norm(k, W.get(p + "attn_k_norm.weight"), eps)
        if swa[il]:
            q, k = rope_neox(q, pos, n_rot_swa, base_swa), rope_neox(k, pos, n_rot_swa, base_swa)
        else:
            fs = 1.0 / factor if factor else 1.0
            q = rope_neox(q, pos, n_rot // 2, base, fs, factors)
            k = rope_neox(k, pos, n_rot // 2, base, fs, factors)
        a = attend(q, k, v, 1.0 / math.sqrt(hd), window if swa[il] else 0).reshape(T, H, hd)
        if W.has(p + "attn_gate.weight"):
            a = a * sigmoid(h @ W.get(p + "attn_gate.weight").T)[:, :, None]
        x = x + a.reshape(T, -1) @ W.get(p + "attn_output.weight").T
        h = rms_norm(x, W.get(p + "ffn_norm.weight"), eps)
        if W.has(p + "ffn_gate_inp.weight"):
            logits = h @ W.get(p + "ffn_gate_inp.weight").T
            if gating == 2:
                probs = sigmoid(logits)
            else:
                e = np.exp(logits - logits.max(-1, keepdims=True))
                probs = e / e.sum(-1, keepdims=True)
            sel = probs + W.get(p + "exp_probs_b.bias") if W.has(p + "exp_probs_b.bias") else probs
            ids = np.argsort(-sel, axis=-1, kind="stable")[:, :n_used[il]]
            wts = np.take_along_axis(probs, ids, -1)
            if norm_w:
                wts = wts / np.maximum(wts.sum(-1, keepdims=True), 6.103515625e-5)
            wts = wts * w_scale
            G, U, D = (W.get(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
            m = np.zeros_like(h)
            for t in range(T):
                for e, w in zip(ids[t], wts[t]):
                    m[t] += w * (D[e] @ swiglu(G[e] @ h[t], U[e] @ h[t], clamp_exp[il]))
            if W.has(p + "ffn_gate_shexp.weight"):
                m += swiglu(h @ W.get(p + "ffn_gate_shexp.weight").T, h @ W.get(p + "ffn_up_shexp.weight").T,
                            clamp_shexp[il]) @ W.get(p + "ffn_down_shexp.weight").T
        else:
            m = swiglu(h @ W.get(p + "ffn_gate.weight").T, h @ W.get(p + "ffn_up.weight").T,
                       clamp_shexp[il]) @ W.get(p + "ffn_down.weight").T
        x = x + m
    x = rms_norm(x, W.get("output_norm.weight"), eps)
    out = W.get("output.weight") if W.has("output.weight") else W.get("token_embd.weight")
    return x @ out.T
