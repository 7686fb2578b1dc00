"""32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.

Quantizers follow llama.cpp's ``quantize_row_*_ref`` (which is also what
``ggml_quantize_chunk`` runs for these types when no importance matrix is
given). Element ``j`` of a 4-bit block lives in the low nibble of ``qs[j]``
for ``j < 16`` and in the high nibble of ``qs[j - 16]`` otherwise; the fifth
bit of element ``j`` (Q5_x) is bit ``j`` of the little-endian ``qh`` word.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ._scalar import F32, kernel, put_f16, round_half_away
from .formats import BlockFormat, register

QK = 32

Q4_0_LAYOUT = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])
Q4_1_LAYOUT = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (QK // 2,))])
Q5_0_LAYOUT = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (QK // 2,))])
Q5_1_LAYOUT = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (QK // 2,))])
Q8_0_LAYOUT = np.dtype([("d", "<f2"), ("qs", "i1", (QK,))])
# s = d * sum(qs), precomputed for the q4_1/q5_1 dot products.
Q8_1_LAYOUT = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", (QK,))])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values, low nibbles first."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n,) uint32 -> (n, 32) uint8 holding 0x10 where bit j is set."""
    bits = (qh.reshape(-1, 1) >> np.arange(QK, dtype=np.uint32)) & np.uint32(1)
    return (bits.astype(np.uint8) << np.uint8(4))


# ---------------------------------------------------------------- dequantize
# Each mirrors dequantize_row_* in ggml-quants.c: an integer level times the
# float32 scale (plus the float32 min for the _1 variants).

def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    q = _nibbles(blocks["qs"]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    m = blocks["m"].astype(np.float32).reshape(-1, 1)
    return d * _nibbles(blocks["qs"]).astype(np.float32) + m


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    q = (_nibbles(blocks["qs"]) | _fifth_bits(blocks["qh"])).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    m = blocks["m"].astype(np.float32).reshape(-1, 1)
    q = _nibbles(blocks["qs"]) | _fifth_bits(blocks["qh"])
    return d * q.astype(np.float32) + m


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    return d * blocks["qs"].astype(np.float32)


def dequantize_q8_1(blocks: np.ndarray) -> np.ndarray:
    # s is redundant (derived from d and qs), so it does not enter the values.
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    return d * blocks["qs"].astype(np.float32)


# ------------------------------------------------------------------ quantize

@kernel
def _absmax_signed(x, b):
    """(amax, the signed value that attains it first), as the _0 formats pick."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(x.shape[1]):
        v = x[b, j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return amax, vmax


@kernel
def _min_max(x, b):
    vmin = F32(3.4028234663852886e38)
    vmax = F32(-3.4028234663852886e38)
    for j in range(x.shape[1]):
        v = x[b, j]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
    return vmin, vmax


@kernel
def _put_qh(out, b, off, qh):
    for k in range(4):
        out[b, off + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@kernel
def quantize_q4_0(x):
    nb = x.shape[0]
    out = np.zeros((nb, 18), dtype=np.uint8)
    for b in range(nb):
        _, vmax = _absmax_signed(x, b)
        d = F32(vmax / F32(-8.0))
        inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
        put_f16(out, b, 0, d)
        for j in range(QK // 2):
            # (int8_t)(v*id + 8.5f): truncation, then clamp to 15
            q0 = min(15, np.int64(F32(F32(x[b, j] * inv) + F32(8.5))))
            q1 = min(15, np.int64(F32(F32(x[b, j + 16] * inv) + F32(8.5))))
            out[b, 2 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))
    return out


@kernel
def quantize_q4_1(x):
    nb = x.shape[0]
    out = np.zeros((nb, 20), dtype=np.uint8)
    for b in range(nb):
        vmin, vmax = _min_max(x, b)
        d = F32(F32(vmax - vmin) / F32(15.0))
        inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
        put_f16(out, b, 0, d)
        put_f16(out, b, 2, vmin)
        for j in range(QK // 2):
            q0 = min(15, np.int64(F32(F32(F32(x[b, j] - vmin) * inv) + F32(0.5))))
            q1 = min(15, np.int64(F32(F32(F32(x[b, j + 16] - vmin) * inv) + F32(0.5))))
            out[b, 4 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))
    return out


@kernel
def quantize_q5_0(x):
    nb = x.shape[0]
    out = np.zeros((nb, 22), dtype=np.uint8)
    for b in range(nb):
        _, vmax = _absmax_signed(x, b)
        d = F32(vmax / F32(-16.0))
        inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
        put_f16(out, b, 0, d)
        qh = np.uint32(0)
        for j in range(QK // 2):
            q0 = min(31, np.int64(F32(F32(x[b, j] * inv) + F32(16.5))))
            q1 = min(31, np.int64(F32(F32(x[b, j + 16] * inv) + F32(16.5))))
            out[b, 6 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
            qh |= np.uint32((q1 >> 4) & 1) << np.uint32(j + 16)
        _put_qh(out, b, 2, qh)
    return out


@kernel
def quantize_q5_1(x):
    nb = x.shape[0]
    out = np.zeros((nb, 24), dtype=np.uint8)
    for b in range(nb):
        vmin, vmax = _min_max(x, b)
        d = F32(F32(vmax - vmin) / F32(31.0))
        inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
        put_f16(out, b, 0, d)
        put_f16(out, b, 2, vmin)
        qh = np.uint32(0)
        for j in range(QK // 2):
            # (uint8_t)(v + 0.5f): no clamp in the reference
            q0 = np.int64(F32(F32(F32(x[b, j] - vmin) * inv) + F32(0.5))) & 0xFF
            q1 = np.int64(F32(F32(F32(x[b, j + 16] - vmin) * inv) + F32(0.5))) & 0xFF
            out[b, 8 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
            qh |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
            qh |= np.uint32((q1 >> 4) & 1) << np.uint32(j + 16)
        _put_qh(out, b, 4, qh)
    return out


@kernel
def _q8_scale(x, b):
    amax = F32(0.0)
    for j in range(x.shape[1]):
        a = abs(x[b, j])
        amax = amax if amax > a else a  # C MAX(amax, fabsf(v))
    d = F32(amax / F32(127.0))
    inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    return d, inv


@kernel
def quantize_q8_0(x):
    nb = x.shape[0]
    out = np.zeros((nb, 34), dtype=np.uint8)
    for b in range(nb):
        d, inv = _q8_scale(x, b)
        put_f16(out, b, 0, d)
        for j in range(QK):
            out[b, 2 + j] = np.uint8(round_half_away(F32(x[b, j] * inv)) & 0xFF)
    return out


@kernel
def quantize_q8_1(x):
    nb = x.shape[0]
    out = np.zeros((nb, 36), dtype=np.uint8)
    for b in range(nb):
        d, inv = _q8_scale(x, b)
        put_f16(out, b, 0, d)
        total = 0
        for j in range(QK):
            q = round_half_away(F32(x[b, j] * inv))
            # the int8 store wraps before the sum reads it back
            q = ((q + 128) & 0xFF) - 128
            out[b, 4 + j] = np.uint8(q & 0xFF)
            total += q
        put_f16(out, b, 2, F32(F32(total) * d))
    return out


Q4_0 = register(BlockFormat(T.Q4_0, QK, Q4_0_LAYOUT, dequantize_q4_0, quantize_q4_0))
Q4_1 = register(BlockFormat(T.Q4_1, QK, Q4_1_LAYOUT, dequantize_q4_1, quantize_q4_1))
Q5_0 = register(BlockFormat(T.Q5_0, QK, Q5_0_LAYOUT, dequantize_q5_0, quantize_q5_0))
Q5_1 = register(BlockFormat(T.Q5_1, QK, Q5_1_LAYOUT, dequantize_q5_1, quantize_q5_1))
Q8_0 = register(BlockFormat(T.Q8_0, QK, Q8_0_LAYOUT, dequantize_q8_0, quantize_q8_0))
Q8_1 = register(BlockFormat(T.Q8_1, QK, Q8_1_LAYOUT, dequantize_q8_1, quantize_q8_1))
