"""256-element super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K.

Quantizers reproduce llama.cpp's ``quantize_row_*_ref`` with the helpers
``make_qx_quants`` / ``make_q3_quants`` / ``make_qkx2_quants``; that is also
what ``quantize_q*_K`` run when no importance matrix is given. Q8_K is the
activation format paired with the K-quants in the CPU dot products.

Element order inside a super-block, as the dequantizers read it:

* Q2_K / Q3_K: element ``e`` sits in ``qs[32*(e//128) + e%32]`` at bit
  ``2*((e%128)//32)``; its 16-element scale is ``scales[e//16]``. Q3_K's high
  bit is bit ``e//32`` of ``hmask[e%32]`` (set means "no -4 offset").
* Q4_K / Q5_K: 32-element sub-block ``s = e//32`` lives in
  ``qs[32*(s//2) + e%32]``, low nibble for even ``s``; Q5_K's fifth bit is bit
  ``s`` of ``qh[e%32]``. Scales/mins are 6-bit, packed in 12 bytes (see
  :func:`_unpack_scale_min_k4`).
* Q6_K: in each 128-element half ``h``, quarter ``t = (e%128)//32`` is the
  low/high nibble (``t//2``) of ``ql[64*h + 32*(t%2) + e%32]`` and bits
  ``2t..2t+1`` of ``qh[32*h + e%32]``; scale ``scales[e//16]`` (int8).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ._scalar import F32, kernel, fp16_round, nearest_int, put_f16, put_f32
from .formats import QK_K, BlockFormat, register

GROUP_MAX_EPS = np.float32(1e-15)

Q2_K_LAYOUT = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2")])
Q3_K_LAYOUT = np.dtype([("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2")])
Q4_K_LAYOUT = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))])
Q5_K_LAYOUT = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (32,)),
                        ("qs", "u1", (128,))])
Q6_K_LAYOUT = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")])
Q8_K_LAYOUT = np.dtype([("d", "<f4"), ("qs", "i1", (256,)), ("bsums", "<i2", (16,))])


# ---------------------------------------------------------------- dequantize

def _two_bit_fields(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes -> (n, 256) 2-bit values in element order."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)).reshape(n, QK_K)


def _unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes -> eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7;
    bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of scale 4-7
    (low half) and min 4-7 (high half).
    """
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & np.uint8(63), (c & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=-1)
    mn = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, mn


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = blocks["d"].astype(np.float32).reshape(n, 1)
    dmin = blocks["dmin"].astype(np.float32).reshape(n, 1)
    sc = blocks["scales"]
    dl = (d * (sc & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _two_bit_fields(blocks["qs"]).astype(np.float32).reshape(n, 16, 16)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """12 packed bytes -> sixteen signed 6-bit scales (already minus 32)."""
    n = scales.shape[0]
    low = np.concatenate([scales[:, :8] & np.uint8(0x0F), scales[:, :8] >> np.uint8(4)], axis=-1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high = ((scales[:, 8:12].reshape(n, 1, 4) >> shifts) & np.uint8(3)).reshape(n, 16)
    return (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = blocks["d"].astype(np.float32).reshape(n, 1)
    dl = (d * _q3_k_scales(blocks["scales"]).astype(np.float32)).reshape(n, 16, 1)
    low = _two_bit_fields(blocks["qs"]).astype(np.int8)
    hbit = (blocks["hmask"].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    offset = ((hbit ^ np.uint8(1)) << np.uint8(2)).astype(np.int8).reshape(n, QK_K)
    q = (low - offset).astype(np.float32).reshape(n, 16, 16)
    return (dl * q).reshape(n, QK_K)


def _k4_scaled(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    d = blocks["d"].astype(np.float32).reshape(n, 1)
    dmin = blocks["dmin"].astype(np.float32).reshape(n, 1)
    sc, mn = _unpack_scale_min_k4(blocks["scales"])
    return (d * sc.astype(np.float32)).reshape(n, 8, 1), (dmin * mn.astype(np.float32)).reshape(n, 8, 1)


def _four_bit_fields(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32) nibbles by 32-element sub-block."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, 8, 32)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    dl, ml = _k4_scaled(blocks)
    q = _four_bit_fields(blocks["qs"]).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    dl, ml = _k4_scaled(blocks)
    hbit = (blocks["qh"].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    q = (_four_bit_fields(blocks["qs"]) | (hbit << np.uint8(4))).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = blocks["d"].astype(np.float32).reshape(n, 1)
    dl = (d * blocks["scales"].astype(np.float32)).reshape(n, 16, 1)
    ql = blocks["ql"].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, 2, 4, 32)
    qh = blocks["qh"].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(n, 2, 4, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (dl * q.astype(np.float32).reshape(n, 16, 16)).reshape(n, QK_K)


def dequantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    d = blocks["d"].astype(np.float32).reshape(-1, 1)
    return d * blocks["qs"].astype(np.float32)


# ------------------------------------------------------------ search helpers

@kernel
def make_qx_quants_rmse1(n, nmax, x, L):
    """make_qx_quants with rmse_type=1 and no importance weights: symmetric
    levels in [-nmax, nmax-1], weights x^2, scale refined over 18 trial
    inverse scales. Writes L (offset by nmax) and returns the scale."""
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(F32(-nmax) / vmax)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(F32(iscale * x[i]))))
        L[i] = l + nmax
        w = F32(x[i] * x[i])
        fl = F32(l)
        sumlx = F32(sumlx + F32(F32(w * x[i]) * fl))
        suml2 = F32(suml2 + F32(F32(w * fl) * fl))
    scale = F32(sumlx / suml2) if suml2 != 0 else F32(0.0)
    best = F32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = F32(-F32(F32(nmax) + F32(F32(0.1) * F32(step))) / vmax)
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(F32(iscale * x[i]))))
            w = F32(x[i] * x[i])
            fl = F32(l)
            sumlx = F32(sumlx + F32(F32(w * x[i]) * fl))
            suml2 = F32(suml2 + F32(F32(w * fl) * fl))
        if suml2 > 0 and F32(sumlx * sumlx) > F32(best * suml2):
            for i in range(n):
                l = nearest_int(F32(iscale * x[i]))
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = F32(sumlx / suml2)
            best = F32(scale * sumlx)
    return scale


@kernel
def make_q3_quants_rmse(n, nmax, x, L):
    """make_q3_quants with do_rmse: start from the max-based levels, then up
    to five passes of per-element coordinate descent on the weighted error."""
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = F32(F32(-nmax) / vmax)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(F32(iscale * x[i]))))
        L[i] = l
        w = F32(x[i] * x[i])
        fl = F32(l)
        sumlx = F32(sumlx + F32(F32(w * x[i]) * fl))
        suml2 = F32(suml2 + F32(F32(w * fl) * fl))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = F32(x[i] * x[i])
            fli = F32(L[i])
            slx = F32(sumlx - F32(F32(w * x[i]) * fli))
            if slx > 0:
                sl2 = F32(suml2 - F32(F32(w * fli) * fli))
                new_l = max(-nmax, min(nmax - 1, nearest_int(F32(F32(x[i] * sl2) / slx))))
                if new_l != L[i]:
                    fnl = F32(new_l)
                    slx = F32(slx + F32(F32(w * x[i]) * fnl))
                    sl2 = F32(sl2 + F32(F32(w * fnl) * fnl))
                    if sl2 > 0 and F32(F32(slx * slx) * suml2) > F32(F32(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return F32(sumlx / suml2) if suml2 > 0 else F32(0.0)


@kernel
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric levels 0..nmax with a min: weighted least squares over
    nstep+1 trial inverse scales. Writes L; returns (scale, -min)."""
    vmin = x[0]
    vmax = x[0]
    sum_w = weights[0]
    sum_x = F32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < vmin:
            vmin = x[i]
        if x[i] > vmax:
            vmax = x[i]
        w = weights[i]
        sum_w = F32(sum_w + w)
        sum_x = F32(sum_x + F32(w * x[i]))
    if vmin > 0:
        vmin = F32(0.0)
    if vmax == vmin:
        for i in range(n):
            L[i] = 0
        return F32(0.0), F32(-vmin)
    iscale = F32(F32(nmax) / F32(vmax - vmin))
    scale = F32(F32(1.0) / iscale)
    best_error = F32(0.0)
    for i in range(n):
        l = nearest_int(F32(iscale * F32(x[i] - vmin)))
        L[i] = max(0, min(nmax, l))
        diff = F32(F32(F32(scale * F32(L[i])) + vmin) - x[i])
        diff = abs(diff) if use_mad else F32(diff * diff)
        best_error = F32(best_error + F32(weights[i] * diff))
    if nstep < 1:
        return scale, F32(-vmin)
    for step in range(nstep + 1):
        iscale = F32(F32(F32(rmin + F32(rdelta * F32(step))) + F32(nmax)) / F32(vmax - vmin))
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(F32(iscale * F32(x[i] - vmin)))))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l = F32(sum_l + F32(w * fl))
            sum_l2 = F32(sum_l2 + F32(F32(w * fl) * fl))
            sum_xl = F32(sum_xl + F32(F32(w * fl) * x[i]))
        D = F32(F32(sum_w * sum_l2) - F32(sum_l * sum_l))
        if D > 0:
            this_scale = F32(F32(F32(sum_w * sum_xl) - F32(sum_x * sum_l)) / D)
            this_min = F32(F32(F32(sum_l2 * sum_x) - F32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = F32(sum_xl / sum_l2)
            cur_error = F32(0.0)
            for i in range(n):
                diff = F32(F32(F32(this_scale * F32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else F32(diff * diff)
                cur_error = F32(cur_error + F32(weights[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, F32(-vmin)


@kernel
def _scale_min_k4(j, packed):
    if j < 4:
        return packed[j] & 63, packed[j + 4] & 63
    return ((packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))


@kernel
def _pack_two_bit(out, b, off, L):
    for half in range(2):
        for l in range(32):
            j = 128 * half
            out[b, off + 32 * half + l] = np.uint8(
                L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6))


# ------------------------------------------------------------------ quantize

@kernel
def quantize_q2_k(x):
    nb = x.shape[0]
    out = np.zeros((nb, 84), dtype=np.uint8)  # scales@0 qs@16 d@80 dmin@82
    L = np.zeros(QK_K, dtype=np.int64)
    Lsub = np.zeros(16, dtype=np.int64)
    Laux = np.zeros(16, dtype=np.int64)
    weights = np.zeros(16, dtype=np.float32)
    scales = np.zeros(16, dtype=np.float32)
    mins = np.zeros(16, dtype=np.float32)
    q4scale = F32(15.0)
    for b in range(nb):
        xb = x[b]
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(16):
            xs = xb[16 * j:16 * j + 16]
            for l in range(16):
                weights[l] = abs(xs[l])
            s, m = make_qkx2_quants(16, 3, xs, weights, Lsub, Laux, F32(-0.5), F32(0.1), 15, True)
            scales[j] = s
            mins[j] = m
            for l in range(16):
                L[16 * j + l] = Lsub[l]
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        packed = np.zeros(16, dtype=np.int64)
        if max_scale > 0:
            iscale = F32(q4scale / max_scale)
            for j in range(16):
                packed[j] = nearest_int(F32(iscale * scales[j])) & 0xFF
            put_f16(out, b, 80, F32(max_scale / q4scale))
        if max_min > 0:
            iscale = F32(q4scale / max_min)
            for j in range(16):
                packed[j] = (packed[j] | (nearest_int(F32(iscale * mins[j])) << 4)) & 0xFF
            put_f16(out, b, 82, F32(max_min / q4scale))
        for j in range(16):
            out[b, j] = np.uint8(packed[j])
        d_all = fp16_round(F32(max_scale / q4scale)) if max_scale > 0 else F32(0.0)
        m_all = fp16_round(F32(max_min / q4scale)) if max_min > 0 else F32(0.0)
        for j in range(16):
            d = F32(d_all * F32(packed[j] & 0xF))
            if d == 0:
                continue
            dm = F32(m_all * F32(packed[j] >> 4))
            for ii in range(16):
                l = nearest_int(F32(F32(xb[16 * j + ii] + dm) / d))
                L[16 * j + ii] = max(0, min(3, l))
        _pack_two_bit(out, b, 16, L)
    return out


@kernel
def quantize_q3_k(x):
    nb = x.shape[0]
    out = np.zeros((nb, 110), dtype=np.uint8)  # hmask@0 qs@32 scales@96 d@108
    L = np.zeros(QK_K, dtype=np.int64)
    Lsub = np.zeros(16, dtype=np.int64)
    scales = np.zeros(16, dtype=np.float32)
    for b in range(nb):
        xb = x[b]
        max_scale = F32(0.0)
        amax = F32(0.0)
        for j in range(16):
            s = make_q3_quants_rmse(16, 4, xb[16 * j:16 * j + 16], Lsub)
            scales[j] = s
            for l in range(16):
                L[16 * j + l] = Lsub[l]
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        packed = np.zeros(12, dtype=np.int64)
        d_all = F32(0.0)
        if max_scale != 0:
            iscale = F32(F32(-32.0) / max_scale)
            for j in range(16):
                l = nearest_int(F32(iscale * scales[j]))
                l = ((l + 128) & 0xFF) - 128  # stored through an int8_t first
                l = max(-32, min(31, l)) + 32
                if j < 8:
                    packed[j] = l & 0xF
                else:
                    packed[j - 8] |= (l & 0xF) << 4
                packed[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
            d_all = F32(F32(1.0) / iscale)
        put_f16(out, b, 108, d_all)
        d_all = fp16_round(d_all)
        for j in range(12):
            out[b, 96 + j] = np.uint8(packed[j] & 0xFF)
        for j in range(16):
            lo = (packed[j] & 0xF) if j < 8 else ((packed[j - 8] & 0xFF) >> 4)
            sc = (lo | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
            d = F32(d_all * F32(sc))
            if d == 0:
                continue
            for ii in range(16):
                l = nearest_int(F32(xb[16 * j + ii] / d))
                L[16 * j + ii] = max(-4, min(3, l)) + 4
        for j in range(QK_K):
            if L[j] > 3:
                out[b, j % 32] |= np.uint8(1 << (j // 32))
                L[j] -= 4
        _pack_two_bit(out, b, 32, L)
    return out


@kernel
def _quantize_k4_family(x, nmax, rmin, nstep, with_high_bit):
    """Shared body of Q4_K (nmax 15) and Q5_K (nmax 31, extra qh bit)."""
    nb = x.shape[0]
    qs_off = 48 if with_high_bit else 16
    out = np.zeros((nb, 176 if with_high_bit else 144), dtype=np.uint8)
    L = np.zeros(QK_K, dtype=np.int64)
    Lsub = np.zeros(32, dtype=np.int64)
    Laux = np.zeros(32, dtype=np.int64)
    weights = np.zeros(32, dtype=np.float32)
    scales = np.zeros(8, dtype=np.float32)
    mins = np.zeros(8, dtype=np.float32)
    for b in range(nb):
        xb = x[b]
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(8):
            xs = xb[32 * j:32 * j + 32]
            sum_x2 = F32(0.0)
            for l in range(32):
                sum_x2 = F32(sum_x2 + F32(xs[l] * xs[l]))
            av_x = F32(np.sqrt(F32(sum_x2 / F32(32.0))))
            for l in range(32):
                weights[l] = F32(av_x + abs(xs[l]))
            s, m = make_qkx2_quants(32, nmax, xs, weights, Lsub, Laux, rmin, F32(0.1), nstep, False)
            scales[j] = s
            mins[j] = m
            for l in range(32):
                L[32 * j + l] = Lsub[l]
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        inv_scale = F32(F32(63.0) / max_scale) if max_scale > 0 else F32(0.0)
        inv_min = F32(F32(63.0) / max_min) if max_min > 0 else F32(0.0)
        packed = np.zeros(12, dtype=np.int64)
        for j in range(8):
            ls = min(63, nearest_int(F32(inv_scale * scales[j])) & 0xFF)
            lm = min(63, nearest_int(F32(inv_min * mins[j])) & 0xFF)
            if j < 4:
                packed[j] = ls
                packed[j + 4] = lm
            else:
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                packed[j - 4] |= (ls >> 4) << 6
                packed[j] |= (lm >> 4) << 6
        d_all = F32(max_scale / F32(63.0))
        m_all = F32(max_min / F32(63.0))
        put_f16(out, b, 0, d_all)
        put_f16(out, b, 2, m_all)
        d_all = fp16_round(d_all)
        m_all = fp16_round(m_all)
        for j in range(12):
            out[b, 4 + j] = np.uint8(packed[j] & 0xFF)
        for j in range(8):
            sc, mn = _scale_min_k4(j, packed)
            d = F32(d_all * F32(sc))
            if d == 0:
                continue
            dm = F32(m_all * F32(mn))
            for ii in range(32):
                l = nearest_int(F32(F32(xb[32 * j + ii] + dm) / d))
                L[32 * j + ii] = max(0, min(nmax, l))
        for chunk in range(4):
            n0 = 64 * chunk
            for l in range(32):
                l1 = L[n0 + l]
                l2 = L[n0 + l + 32]
                if with_high_bit:
                    if l1 > 15:
                        l1 -= 16
                        out[b, 16 + l] |= np.uint8(1 << (2 * chunk))
                    if l2 > 15:
                        l2 -= 16
                        out[b, 16 + l] |= np.uint8(2 << (2 * chunk))
                out[b, qs_off + 32 * chunk + l] = np.uint8((l1 | (l2 << 4)) & 0xFF)
    return out


@kernel
def quantize_q4_k(x):
    return _quantize_k4_family(x, 15, F32(-1.0), 20, False)


@kernel
def quantize_q5_k(x):
    return _quantize_k4_family(x, 31, F32(-0.5), 15, True)


@kernel
def quantize_q6_k(x):
    nb = x.shape[0]
    out = np.zeros((nb, 210), dtype=np.uint8)  # ql@0 qh@128 scales@192 d@208
    L = np.zeros(QK_K, dtype=np.int64)
    Lsub = np.zeros(16, dtype=np.int64)
    scales = np.zeros(16, dtype=np.float32)
    for b in range(nb):
        xb = x[b]
        max_scale = F32(0.0)
        max_abs_scale = F32(0.0)
        for ib in range(16):
            s = make_qx_quants_rmse1(16, 32, xb[16 * ib:16 * ib + 16], Lsub)
            scales[ib] = s
            for l in range(16):
                L[16 * ib + l] = Lsub[l]
            if abs(s) > max_abs_scale:
                max_abs_scale = abs(s)
                max_scale = s
        if max_abs_scale < GROUP_MAX_EPS:
            continue  # the block stays all zero bytes
        iscale = F32(F32(-128.0) / max_scale)
        put_f16(out, b, 208, F32(F32(1.0) / iscale))
        d_all = fp16_round(F32(F32(1.0) / iscale))
        sc8 = np.zeros(16, dtype=np.int64)
        for ib in range(16):
            v = min(127, nearest_int(F32(iscale * scales[ib])))
            sc8[ib] = ((v + 128) & 0xFF) - 128  # int8_t store
            out[b, 192 + ib] = np.uint8(v & 0xFF)
        for j in range(16):
            d = F32(d_all * F32(sc8[j]))
            if d == 0:
                continue
            for ii in range(16):
                l = nearest_int(F32(xb[16 * j + ii] / d))
                L[16 * j + ii] = max(-32, min(31, l)) + 32
        for half in range(2):
            j = 128 * half
            for l in range(32):
                q1 = L[j + l] & 0xF
                q2 = L[j + l + 32] & 0xF
                q3 = L[j + l + 64] & 0xF
                q4 = L[j + l + 96] & 0xF
                out[b, 64 * half + l] = np.uint8(q1 | (q3 << 4))
                out[b, 64 * half + l + 32] = np.uint8(q2 | (q4 << 4))
                out[b, 128 + 32 * half + l] = np.uint8(
                    (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                    | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))
    return out


@kernel
def quantize_q8_k(x):
    """quantize_row_q8_K_ref. For an all-zero block the reference leaves
    bsums unwritten; here they are zero."""
    nb = x.shape[0]
    out = np.zeros((nb, 292), dtype=np.uint8)  # d@0 (f32) qs@4 bsums@260 (i16)
    for b in range(nb):
        xb = x[b]
        vmax = F32(0.0)
        amax = F32(0.0)
        for j in range(QK_K):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                vmax = xb[j]
        if amax == 0:
            continue
        iscale = F32(F32(-127.0) / vmax)
        for g in range(16):
            total = 0
            for ii in range(16):
                v = min(127, nearest_int(F32(iscale * xb[16 * g + ii])))
                v = ((v + 128) & 0xFF) - 128
                out[b, 4 + 16 * g + ii] = np.uint8(v & 0xFF)
                total += v
            out[b, 260 + 2 * g] = np.uint8(total & 0xFF)
            out[b, 261 + 2 * g] = np.uint8((total >> 8) & 0xFF)
        put_f32(out, b, 0, F32(F32(1.0) / iscale))
    return out


Q2_K = register(BlockFormat(T.Q2_K, QK_K, Q2_K_LAYOUT, dequantize_q2_k, quantize_q2_k))
Q3_K = register(BlockFormat(T.Q3_K, QK_K, Q3_K_LAYOUT, dequantize_q3_k, quantize_q3_k))
Q4_K = register(BlockFormat(T.Q4_K, QK_K, Q4_K_LAYOUT, dequantize_q4_k, quantize_q4_k))
Q5_K = register(BlockFormat(T.Q5_K, QK_K, Q5_K_LAYOUT, dequantize_q5_k, quantize_q5_k))
Q6_K = register(BlockFormat(T.Q6_K, QK_K, Q6_K_LAYOUT, dequantize_q6_k, quantize_q6_k))
Q8_K = register(BlockFormat(T.Q8_K, QK_K, Q8_K_LAYOUT, dequantize_q8_k, quantize_q8_k))
