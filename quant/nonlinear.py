"""Codebook formats: IQ4_NL, IQ4_XS (non-uniform int8 grid) and MXFP4 (e2m1
values with a shared power-of-two e8m0 scale).

IQ4_NL / IQ4_XS quantizers reproduce what ``ggml_quantize_chunk`` writes
without an importance matrix, i.e. ``quantize_iq4_nl`` / ``quantize_iq4_xs``
(7 scale refinement tries each way). Note ``quantize_row_iq4_nl_ref`` runs a
different search (ntry=-1); model files never go through it, so it is not
reproduced. Both use element ``j`` of each 32-element sub-block in the low
nibble of ``qs[j]`` (``j < 16``) or the high nibble of ``qs[j-16]``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ._scalar import F32, kernel, c_float_to_int32, nearest_int, put_f16
from .formats import QK_K, BlockFormat, register

GROUP_MAX_EPS = np.float32(1e-15)

IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
# e2m1 magnitudes doubled, so that the e8m0 "half" scale below is exact.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)

IQ4_NL_LAYOUT = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
# scales_h: two high bits per sub-block; scales_l: a nibble per sub-block.
IQ4_XS_LAYOUT = np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", (4,)), ("qs", "u1", (128,))])
MXFP4_LAYOUT = np.dtype([("e", "u1"), ("qs", "u1", (16,))])


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(n, 16*k) bytes -> (n, 32*k) nibbles, per 16 bytes: low nibbles then high."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """2^(e-128) as float32, i.e. half the e8m0 scale (ggml_e8m0_to_fp32_half)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------- dequantize

def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    return d * IQ4_NL_VALUES[_nibbles32(blocks["qs"])].astype(np.float32)


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = blocks["d"].astype(np.float32).reshape(n, 1)
    low = blocks["scales_l"].reshape(n, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)
    low = (low & np.uint8(0x0F)).reshape(n, 8)
    high = (blocks["scales_h"].reshape(n, 1) >> (2 * np.arange(8, dtype=np.uint16))) & np.uint16(3)
    ls = (low | (high.astype(np.uint8) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = (d * ls.astype(np.float32)).reshape(n, 8, 1)
    q = IQ4_NL_VALUES[_nibbles32(blocks["qs"])].astype(np.float32).reshape(n, 8, 32)
    return (dl * q).reshape(n, QK_K)


def dequantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    d = e8m0_to_fp32_half(blocks["e"]).reshape(-1, 1)
    return d * MXFP4_VALUES[_nibbles32(blocks["qs"])].astype(np.float32)


# ------------------------------------------------------------------ quantize

@kernel
def best_index_int8(values, x):
    """Index of the codebook entry nearest to x (ties to the lower one),
    by bisection over the sorted int8 codebook, as best_index_int8."""
    n = values.shape[0]
    if x <= F32(values[0]):
        return 0
    if x >= F32(values[n - 1]):
        return n - 1
    lo = 0
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < F32(values[mid]):
            hi = mid
        else:
            lo = mid
    return hi - 1 if F32(x - F32(values[hi - 1])) < F32(F32(values[hi]) - x) else hi


@kernel
def _iq4_super_block(x, values, L, sub_scales, ntry):
    """quantize_row_iq4_nl_impl without importance weights for one super-block
    of len(x) elements in 32-element sub-blocks. Fills L (codebook indices) and
    returns (d as float32, packed 6-bit sub-block scales or -1 when there is a
    single sub-block)."""
    n = x.shape[0]
    nsub = n // 32
    max_scale = F32(0.0)
    amax_scale = F32(0.0)
    v0 = np.int64(values[0])
    for ib in range(nsub):
        xb = x[32 * ib:32 * ib + 32]
        amax = F32(0.0)
        vmax = F32(0.0)
        for j in range(32):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                vmax = xb[j]
        if amax < GROUP_MAX_EPS:
            sub_scales[ib] = F32(0.0)
            continue
        d = F32(F32(-vmax) / F32(v0)) if ntry > 0 else F32(vmax / F32(v0))
        inv = F32(F32(1.0) / d)
        sumqx = F32(0.0)
        sumq2 = F32(0.0)
        for j in range(32):
            l = best_index_int8(values, F32(inv * xb[j]))
            L[32 * ib + j] = l
            q = F32(values[l])
            w = F32(xb[j] * xb[j])
            sumqx = F32(sumqx + F32(F32(w * q) * xb[j]))
            sumq2 = F32(sumq2 + F32(F32(w * q) * q))
        d = F32(sumqx / sumq2) if sumq2 > 0 else F32(0.0)
        best = F32(d * sumqx)
        for itry in range(-ntry, ntry + 1):
            inv = F32(F32(itry + v0) / vmax)
            sumqx = F32(0.0)
            sumq2 = F32(0.0)
            for j in range(32):
                l = best_index_int8(values, F32(inv * xb[j]))
                q = F32(values[l])
                w = F32(xb[j] * xb[j])
                sumqx = F32(sumqx + F32(F32(w * q) * xb[j]))
                sumq2 = F32(sumq2 + F32(F32(w * q) * q))
            if sumq2 > 0 and F32(sumqx * sumqx) > F32(best * sumq2):
                d = F32(sumqx / sumq2)
                best = F32(d * sumqx)
        sub_scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nsub == 1:
        d0 = sub_scales[0]
        if ntry > 0:
            inv = F32(F32(1.0) / d0) if d0 != 0 else F32(0.0)
            for j in range(n):
                L[j] = best_index_int8(values, F32(inv * x[j]))
        return d0, -1
    d = F32(-max_scale / F32(32.0))
    inv = F32(F32(1.0) / d) if d != 0 else F32(0.0)
    packed = 0  # 6-bit scale per sub-block, sub-block ib at bits 6*ib
    for ib in range(nsub):
        l = max(-32, min(31, nearest_int(F32(inv * sub_scales[ib]))))
        dl = F32(d * F32(l))
        idl = F32(F32(1.0) / dl) if dl != 0 else F32(0.0)
        for j in range(32):
            L[32 * ib + j] = best_index_int8(values, F32(idl * x[32 * ib + j]))
        packed |= (l + 32) << (6 * ib)
    return d, packed


@kernel
def _pack_nibbles32(out, b, off, L, n):
    for i in range(n // 32):
        for j in range(16):
            out[b, off + 16 * i + j] = np.uint8(L[32 * i + j] | (L[32 * i + 16 + j] << 4))


@kernel
def quantize_iq4_nl(x):
    nb = x.shape[0]
    out = np.zeros((nb, 18), dtype=np.uint8)
    L = np.zeros(32, dtype=np.int64)
    sub_scales = np.zeros(1, dtype=np.float32)
    values = IQ4_NL_VALUES
    for b in range(nb):
        d, _ = _iq4_super_block(x[b], values, L, sub_scales, 7)
        put_f16(out, b, 0, d)
        _pack_nibbles32(out, b, 2, L, 32)
    return out


@kernel
def quantize_iq4_xs(x):
    nb = x.shape[0]
    out = np.zeros((nb, 136), dtype=np.uint8)  # d@0 scales_h@2 scales_l@4 qs@8
    L = np.zeros(QK_K, dtype=np.int64)
    sub_scales = np.zeros(8, dtype=np.float32)
    values = IQ4_NL_VALUES
    for b in range(nb):
        d, packed = _iq4_super_block(x[b], values, L, sub_scales, 7)
        put_f16(out, b, 0, d)
        scales_h = 0
        for ib in range(8):
            ls = (packed >> (6 * ib)) & 63
            out[b, 4 + ib // 2] |= np.uint8((ls & 0xF) << (4 * (ib % 2)))
            scales_h |= (ls >> 4) << (2 * ib)
        out[b, 2] = np.uint8(scales_h & 0xFF)
        out[b, 3] = np.uint8((scales_h >> 8) & 0xFF)
        _pack_nibbles32(out, b, 8, L, QK_K)
    return out


@kernel
def _e8m0_half_scalar(e):
    if e < 2:
        return np.uint32(np.uint32(0x00200000) << np.uint32(e)).view(np.float32)
    return np.uint32(np.uint32(e - 1) << np.uint32(23)).view(np.float32)


@kernel
def quantize_mxfp4(x):
    nb = x.shape[0]
    out = np.zeros((nb, 17), dtype=np.uint8)
    values = MXFP4_VALUES
    for b in range(nb):
        amax = F32(0.0)
        for j in range(32):
            if amax < abs(x[b, j]):
                amax = abs(x[b, j])
        e = 0
        if amax > 0:
            # floorf(log2f(amax)) - 2 + 127, cast to uint8 through int
            lg = F32(np.log2(np.float64(amax)))
            e = c_float_to_int32(F32(F32(np.floor(lg) - F32(2.0)) + F32(127.0))) & 0xFF
        d = _e8m0_half_scalar(e)
        out[b, 0] = np.uint8(e)
        for j in range(16):
            lo = 0
            hi = 0
            for half in range(2):
                v = x[b, j + 16 * half]
                best = 0
                best_err = abs(F32(F32(F32(values[0]) * d) - v))
                for i in range(1, 16):
                    err = abs(F32(F32(F32(values[i]) * d) - v))
                    if err < best_err:
                        best = i
                        best_err = err
                if half == 0:
                    lo = best
                else:
                    hi = best
            out[b, 1 + j] = np.uint8(lo | (hi << 4))
    return out


IQ4_NL = register(BlockFormat(T.IQ4_NL, 32, IQ4_NL_LAYOUT, dequantize_iq4_nl, quantize_iq4_nl))
IQ4_XS = register(BlockFormat(T.IQ4_XS, QK_K, IQ4_XS_LAYOUT, dequantize_iq4_xs, quantize_iq4_xs))
MXFP4 = register(BlockFormat(T.MXFP4, 32, MXFP4_LAYOUT, dequantize_mxfp4, quantize_mxfp4))
