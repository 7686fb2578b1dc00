"""Scalar float32 primitives shared by the numba quantizers.

llama.cpp's reference quantizers are plain C on float32 without FMA
contraction, so byte equality needs every intermediate rounded to float32 in
the same order. Numba promotes ``int * float32`` to float64, so callers must
wrap integers in ``F32(...)``; these helpers only take and return float32 or
int values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

F32 = np.float32

# error_model="numpy": float division by zero gives inf/NaN as in C instead of
# raising; fastmath stays off so no reassociation or FMA contraction.
kernel = njit(cache=True, error_model="numpy")


@kernel
def fp32_to_fp16_bits(f):
    """IEEE binary16 bits of float32 ``f``, round-to-nearest-even.

    Same results as ggml's GGML_FP32_TO_FP16 (NaN becomes sign|0x7e00).
    """
    w = np.uint32(F32(f).view(np.uint32))
    sign = np.uint32((w >> np.uint32(16)) & np.uint32(0x8000))
    a = w & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return sign | np.uint32(0x7E00)
    # 65520 (0x477ff000) is the halfway point between 65504 and 2^16; ties go
    # to the even neighbour 2^16, which is out of range.
    if a >= np.uint32(0x477FF000):
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):  # normal half (>= 2^-14)
        lsb = (a >> np.uint32(13)) & np.uint32(1)
        r = (a + np.uint32(0xFFF) + lsb) >> np.uint32(13)
        return sign | (r - np.uint32(112 << 10))
    e = a >> np.uint32(23)
    if e < np.uint32(102):  # below 2^-25: rounds to zero
        return sign
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e  # units of the half subnormal step 2^-24
    q = m >> shift
    rem = m & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (q & np.uint32(1)) != 0):
        q += np.uint32(1)
    return sign | q


@kernel
def fp16_bits_to_fp32(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        v = F32(m) * F32(5.9604644775390625e-08)  # exact: m < 2^10, step 2^-24
        return -v if sign != 0 else v
    if e == 31:
        bits = sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    else:
        bits = sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    return np.uint32(bits).view(np.float32)


@kernel
def fp16_round(f):
    """float32 value that ``f`` has after a trip through binary16."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


@kernel
def nearest_int(f):
    """ggml's nearest_int: the 1.5*2^23 magic-number trick, kept bit-for-bit
    (including its garbage for |f| > 2^22, which clamps later absorb)."""
    v = F32(F32(f) + F32(12582912.0))
    return np.int64(v.view(np.uint32) & np.uint32(0x7FFFFF)) - 0x400000


@kernel
def round_half_away(f):
    """C roundf on float32, as an int."""
    t = np.trunc(F32(f))
    if abs(F32(f) - t) >= F32(0.5):
        t = t + (F32(1.0) if f > 0 else F32(-1.0))
    return np.int64(t)


@kernel
def put_u16(out, row, off, v):
    out[row, off] = np.uint8(v & 0xFF)
    out[row, off + 1] = np.uint8((v >> 8) & 0xFF)


@kernel
def put_f16(out, row, off, f):
    put_u16(out, row, off, fp32_to_fp16_bits(f))


@kernel
def put_f32(out, row, off, f):
    bits = F32(f).view(np.uint32)
    for k in range(4):
        out[row, off + k] = np.uint8((bits >> np.uint32(8 * k)) & np.uint32(0xFF))


@kernel
def get_f16(out, row, off):
    return fp16_bits_to_fp32(np.uint32(out[row, off]) | (np.uint32(out[row, off + 1]) << np.uint32(8)))


@kernel
def c_float_to_int32(f):
    """C float->int conversion as x86 cvttss2si does it (out of range ->
    INT_MIN), used where llama.cpp casts possibly out-of-range floats."""
    if not (f > F32(-2147483648.0) and f < F32(2147483648.0)):
        return np.int64(-2147483648)
    return np.int64(np.trunc(F32(f)))
