/* Scalar reference kernels: the definition of every format's dequantization and dot product.
 *
 * Dequantization reproduces gguf.quants.dequantize bit for bit, so the float operations and their
 * order below mirror it (e.g. Q4_K is (d*sc)*q - (dmin*m), two roundings, never fused: the Makefile
 * builds with -ffp-contract=off). Dot products follow ggml's CPU backend: activations are quantized to
 * the weight type's partner format and the inner sums are exact integers; only the per-block scale
 * products and the running float sum round.
 */
#include <math.h>
#include <stddef.h>
#include "blocks.h"

/* ---------------------------------------------------------------- dequantization (bit-exact) */

static void dequantize_f32(const void *src, float *dst, int64_t n) { memcpy(dst, src, (size_t)n * 4); }

static void dequantize_f16(const void *src, float *dst, int64_t n) {
    const gr_half *h = src;
    for (int64_t i = 0; i < n; i++) dst[i] = gr_half_to_float(h[i]);
}

static void dequantize_bf16(const void *src, float *dst, int64_t n) {
    const uint16_t *b = src;
    for (int64_t i = 0; i < n; i++) dst[i] = gr_bf16_to_float(b[i]);
}

static void dequantize_q4_0(const void *src, float *dst, int64_t nb) {
    const block_q4_0 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((b->qs[j] & 15) - 8);
            dst[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
        }
    }
}

static void dequantize_q4_1(const void *src, float *dst, int64_t nb) {
    const block_q4_1 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d), m = gr_half_to_float(b->m);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(b->qs[j] & 15) + m;
            dst[j + 16] = d * (float)(b->qs[j] >> 4) + m;
        }
    }
}

static void dequantize_q5_0(const void *src, float *dst, int64_t nb) {
    const block_q5_0 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d);
        uint32_t qh; memcpy(&qh, b->qh, 4);
        for (int j = 0; j < 16; j++) {
            int lo = (b->qs[j] & 15) | (((qh >> j) & 1) << 4);
            int hi = (b->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            dst[j] = d * (float)(lo - 16);
            dst[j + 16] = d * (float)(hi - 16);
        }
    }
}

static void dequantize_q5_1(const void *src, float *dst, int64_t nb) {
    const block_q5_1 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d), m = gr_half_to_float(b->m);
        uint32_t qh; memcpy(&qh, b->qh, 4);
        for (int j = 0; j < 16; j++) {
            int lo = (b->qs[j] & 15) | (((qh >> j) & 1) << 4);
            int hi = (b->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            dst[j] = d * (float)lo + m;
            dst[j + 16] = d * (float)hi + m;
        }
    }
}

static void dequantize_q8_0(const void *src, float *dst, int64_t nb) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d);
        for (int j = 0; j < 32; j++) dst[j] = (float)b->qs[j] * d;
    }
}

static void dequantize_q2_k(const void *src, float *dst, int64_t nb) {
    const block_q2_K *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d), dmin = gr_half_to_float(b->dmin);
        for (int e = 0; e < 256; e++) {
            /* element e: byte (e/128)*32 + e%32, bit pair (e/32)%4; scale group e/16 */
            int q = (b->qs[(e / 128) * 32 + (e % 32)] >> (2 * ((e / 32) % 4))) & 3;
            uint8_t sc = b->scales[e / 16];
            float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
            dst[e] = dl * (float)q - ml;
        }
    }
}

static void dequantize_q3_k(const void *src, float *dst, int64_t nb) {
    const block_q3_K *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d);
        int8_t sc[16];
        gr_q3k_scales(b->scales, sc);
        for (int e = 0; e < 256; e++) {
            int lo = (b->qs[(e / 128) * 32 + (e % 32)] >> (2 * ((e / 32) % 4))) & 3;
            int high_set = (b->hmask[e % 32] >> (e / 32)) & 1;
            float dl = d * (float)sc[e / 16];
            dst[e] = dl * (float)(lo - (high_set ? 0 : 4));
        }
    }
}

static void dequantize_q4_k(const void *src, float *dst, int64_t nb) {
    const block_q4_K *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d), dmin = gr_half_to_float(b->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            gr_k4_scale_min(b->scales, j, &sc, &mn);
            float dl = d * (float)sc, ml = dmin * (float)mn;
            const uint8_t *q = b->qs + (j / 2) * 32;
            int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) dst[j * 32 + l] = dl * (float)((q[l] >> shift) & 15) - ml;
        }
    }
}

static void dequantize_q5_k(const void *src, float *dst, int64_t nb) {
    const block_q5_K *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d), dmin = gr_half_to_float(b->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            gr_k4_scale_min(b->scales, j, &sc, &mn);
            float dl = d * (float)sc, ml = dmin * (float)mn;
            const uint8_t *q = b->qs + (j / 2) * 32;
            int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) {
                int v = ((q[l] >> shift) & 15) | (((b->qh[l] >> j) & 1) << 4);
                dst[j * 32 + l] = dl * (float)v - ml;
            }
        }
    }
}

/* Q6_K element e's 6-bit code (0..63): low nibble from ql, two high bits from qh. */
static inline int q6k_code(const block_q6_K *b, int e) {
    int half = e / 128, r = e % 128, quarter = r / 32, l = r % 32;
    const uint8_t *ql = b->ql + half * 64, *qh = b->qh + half * 32;
    int lo = (quarter & 1) ? ql[l + 32] : ql[l];
    lo = (quarter & 2) ? (lo >> 4) : (lo & 15);
    int hi = (qh[l] >> (2 * quarter)) & 3;
    return lo | (hi << 4);
}

static void dequantize_q6_k(const void *src, float *dst, int64_t nb) {
    const block_q6_K *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d);
        for (int e = 0; e < 256; e++) {
            float dl = d * (float)b->scales[e / 16];
            dst[e] = dl * (float)(q6k_code(b, e) - 32);
        }
    }
}

static void dequantize_iq4_nl(const void *src, float *dst, int64_t nb) {
    const block_iq4_nl *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_half_to_float(b->d);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)gr_kvalues_iq4nl[b->qs[j] & 15];
            dst[j + 16] = d * (float)gr_kvalues_iq4nl[b->qs[j] >> 4];
        }
    }
}

static void dequantize_iq4_xs(const void *src, float *dst, int64_t nb) {
    const block_iq4_xs *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 256) {
        float d = gr_half_to_float(b->d);
        for (int j = 0; j < 8; j++) {
            float dl = d * (float)gr_iq4xs_scale(b, j);
            const uint8_t *q = b->qs + 16 * j;
            for (int l = 0; l < 16; l++) {
                dst[32 * j + l] = dl * (float)gr_kvalues_iq4nl[q[l] & 15];
                dst[32 * j + l + 16] = dl * (float)gr_kvalues_iq4nl[q[l] >> 4];
            }
        }
    }
}

static void dequantize_mxfp4(const void *src, float *dst, int64_t nb) {
    const block_mxfp4 *b = src;
    for (int64_t i = 0; i < nb; i++, b++, dst += 32) {
        float d = gr_e8m0_to_float_half(b->e);
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)gr_kvalues_mxfp4[b->qs[j] & 15];
            dst[j + 16] = d * (float)gr_kvalues_mxfp4[b->qs[j] >> 4];
        }
    }
}

/* ---------------------------------------------------------------- activation quantization */

static void quantize_act_f16(const float *x, void *dst, int64_t n) {
    gr_half *h = dst;
    for (int64_t i = 0; i < n; i++) h[i] = gr_float_to_half(x[i]);
}

static void quantize_act_bf16(const float *x, void *dst, int64_t n) {
    uint16_t *b = dst;
    for (int64_t i = 0; i < n; i++) b[i] = gr_float_to_bf16(x[i]);
}

/* Q8_0 as ggml's x86 build makes it: d = amax/127 stored as fp16, but the multiplier is 127/amax
 * computed in float (not 1/d), and the rounding is to nearest even. */
static void quantize_act_q8_0(const float *x, void *dst, int64_t n) {
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        y[i].d = gr_float_to_half(d);
        for (int j = 0; j < 32; j++) y[i].qs[j] = (int8_t)gr_round_even(x[j] * id);
    }
}

/* Q8_1: Q8_0 plus s = fp16(d * sum(q)), with d the unrounded float scale. */
static void quantize_act_q8_1(const float *x, void *dst, int64_t n) {
    block_q8_1 *y = dst;
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = gr_round_even(x[j] * id);
            y[i].qs[j] = (int8_t)q;
            sum += q;
        }
        y[i].d = gr_float_to_half(d);
        y[i].s = gr_float_to_half(d * (float)sum);
    }
}

/* Q8_K: the scale is -127/max where max is the signed value of largest magnitude (first one on ties),
 * so that value maps to exactly -127 and nothing reaches -128; d is stored as a float 1/iscale. */
static void quantize_act_q8_k(const float *x, void *dst, int64_t n) {
    block_q8_K *y = dst;
    for (int64_t i = 0; i < n / 256; i++, x += 256) {
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < 256; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        float iscale = -127.f / max;
        for (int j = 0; j < 256; j++) {
            int v = gr_round_even(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
        y[i].d = 1.f / iscale;
    }
}

/* ---------------------------------------------------------------- two-term activations */

static inline float finite_or_zero(float v) { return fabsf(v) <= 3.402823466e38f ? v : 0.f; }

void gr_act_residual(int act_type, const float *x, const void *q, float *r, int64_t n) {
    switch (act_type) {
    case GR_T_F16: {
        const gr_half *h = q;
        for (int64_t i = 0; i < n; i++) {
            float v = gr_half_to_float(h[i]);
            r[i] = isfinite(v) ? finite_or_zero(x[i] - v) : 0.f;
        }
        break;
    }
    case GR_T_BF16: {
        const uint16_t *b = q;
        for (int64_t i = 0; i < n; i++) {
            float v = gr_bf16_to_float(b[i]);
            r[i] = isfinite(v) ? finite_or_zero(x[i] - v) : 0.f;
        }
        break;
    }
    case GR_T_Q8_0: case GR_T_Q8_1: {
        /* block_q8_1 is block_q8_0 with s inserted after d; only d and qs are read here */
        const uint8_t *b = q;
        size_t bsize = act_type == GR_T_Q8_0 ? sizeof(block_q8_0) : sizeof(block_q8_1);
        size_t qs_off = act_type == GR_T_Q8_0 ? offsetof(block_q8_0, qs) : offsetof(block_q8_1, qs);
        for (int64_t i = 0; i < n / 32; i++, b += bsize) {
            gr_half dh; memcpy(&dh, b, 2);
            float d = gr_half_to_float(dh);
            const int8_t *qs = (const int8_t *)(b + qs_off);
            for (int j = 0; j < 32; j++) r[32 * i + j] = finite_or_zero(x[32 * i + j] - d * (float)qs[j]);
        }
        break;
    }
    case GR_T_Q8_K: {
        const block_q8_K *b = q;
        for (int64_t i = 0; i < n / 256; i++)
            for (int j = 0; j < 256; j++) r[256 * i + j] = finite_or_zero(x[256 * i + j] - b[i].d * (float)b[i].qs[j]);
        break;
    }
    default:
        memset(r, 0, (size_t)n * sizeof *r);
    }
}

void gr_q8_1_residual_sums(const void *q1, void *q2, int64_t n) {
    const block_q8_1 *a = q1;
    block_q8_1 *b = q2;
    for (int64_t i = 0; i < n / 32; i++) {
        /* d * q is exact in double, and so are these sums of 32 of them */
        int sum1 = 0, sum2 = 0;
        for (int j = 0; j < 32; j++) { sum1 += a[i].qs[j]; sum2 += b[i].qs[j]; }
        double total = (double)gr_half_to_float(a[i].d) * sum1 + (double)gr_half_to_float(b[i].d) * sum2;
        float s1 = gr_half_to_float(a[i].s);
        b[i].s = isfinite(s1) ? gr_float_to_half((float)(total - (double)s1)) : 0;
    }
}

void gr_act_panel_scales(int act_type, const uint8_t *act, int64_t act_row_bytes, int64_t k0, int64_t k1,
                         int64_t a0, int64_t a1, float *d, float *s, int64_t ld) {
    for (int64_t a = a0; a < a1; a++) {
        const uint8_t *row = act + a * act_row_bytes;
        for (int64_t k = k0; k < k1; k++) {
            if (act_type == GR_T_Q8_1) {
                const block_q8_1 *b = (const block_q8_1 *)row + k;
                d[a * ld + k] = gr_half_to_float(b->d);
                s[a * ld + k] = gr_half_to_float(b->s);
            } else {
                const block_q8_0 *b = (const block_q8_0 *)row + k;
                int sum = 0;
                for (int j = 0; j < 32; j++) sum += b->qs[j];
                float dk = gr_half_to_float(b->d);
                d[a * ld + k] = dk;
                s[a * ld + k] = dk * (float)sum;  /* exact: 11 x 13 significant bits */
            }
        }
    }
}

/* ---------------------------------------------------------------- dot products */

static float vec_dot_f32(int64_t n, const void *w, const void *a) {
    const float *x = w, *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

static float vec_dot_f16(int64_t n, const void *w, const void *a) {
    const gr_half *x = w, *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += gr_half_to_float(x[i]) * gr_half_to_float(y[i]);
    return s;
}

static float vec_dot_bf16(int64_t n, const void *w, const void *a) {
    const uint16_t *x = w, *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += gr_bf16_to_float(x[i]) * gr_bf16_to_float(y[i]);
    return s;
}

static float vec_dot_q4_0(int64_t n, const void *w, const void *a) {
    const block_q4_0 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += ((x[i].qs[j] & 15) - 8) * y[i].qs[j] + ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi;
    }
    return s;
}

static float vec_dot_q4_1(int64_t n, const void *w, const void *a) {
    const block_q4_1 *x = w;
    const block_q8_1 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += (x[i].qs[j] & 15) * y[i].qs[j] + (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi
           + gr_half_to_float(x[i].m) * gr_half_to_float(y[i].s);
    }
    return s;
}

static float vec_dot_q5_0(int64_t n, const void *w, const void *a) {
    const block_q5_0 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh; memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            int lo = ((x[i].qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16;
            int hi = ((x[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += lo * y[i].qs[j] + hi * y[i].qs[j + 16];
        }
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi;
    }
    return s;
}

static float vec_dot_q5_1(int64_t n, const void *w, const void *a) {
    const block_q5_1 *x = w;
    const block_q8_1 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh; memcpy(&qh, x[i].qh, 4);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            int lo = (x[i].qs[j] & 15) | (((qh >> j) & 1) << 4);
            int hi = (x[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            sumi += lo * y[i].qs[j] + hi * y[i].qs[j + 16];
        }
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi
           + gr_half_to_float(x[i].m) * gr_half_to_float(y[i].s);
    }
    return s;
}

static float vec_dot_q8_0(int64_t n, const void *w, const void *a) {
    const block_q8_0 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 32; j++) sumi += x[i].qs[j] * y[i].qs[j];
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi;
    }
    return s;
}

static float vec_dot_iq4_nl(int64_t n, const void *w, const void *a) {
    const block_iq4_nl *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += gr_kvalues_iq4nl[x[i].qs[j] & 15] * y[i].qs[j] + gr_kvalues_iq4nl[x[i].qs[j] >> 4] * y[i].qs[j + 16];
        s += gr_half_to_float(x[i].d) * gr_half_to_float(y[i].d) * (float)sumi;
    }
    return s;
}

static float vec_dot_mxfp4(int64_t n, const void *w, const void *a) {
    const block_mxfp4 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += gr_kvalues_mxfp4[x[i].qs[j] & 15] * y[i].qs[j] + gr_kvalues_mxfp4[x[i].qs[j] >> 4] * y[i].qs[j + 16];
        s += gr_half_to_float(y[i].d) * gr_e8m0_to_float_half(x[i].e) * (float)sumi;
    }
    return s;
}

/* K-quants: sum over a super-block = d*dy * sum_j(scale_j * isum_j) - dmin*dy * sum_j(min_j * bsum_j),
 * the second term using the activation's precomputed 16-element sums. */

static float vec_dot_q2_k(int64_t n, const void *w, const void *a) {
    const block_q2_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0, msum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) {
                int e = 16 * g + l;
                int q = (x[i].qs[(e / 128) * 32 + (e % 32)] >> (2 * ((e / 32) % 4))) & 3;
                gs += q * y[i].qs[e];
            }
            isum += (x[i].scales[g] & 15) * gs;
            msum += (x[i].scales[g] >> 4) * y[i].bsums[g];
        }
        float dall = y[i].d * gr_half_to_float(x[i].d), dmin = y[i].d * gr_half_to_float(x[i].dmin);
        s += dall * (float)isum - dmin * (float)msum;
    }
    return s;
}

static float vec_dot_q3_k(int64_t n, const void *w, const void *a) {
    const block_q3_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int8_t sc[16];
        gr_q3k_scales(x[i].scales, sc);
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) {
                int e = 16 * g + l;
                int lo = (x[i].qs[(e / 128) * 32 + (e % 32)] >> (2 * ((e / 32) % 4))) & 3;
                int high_set = (x[i].hmask[e % 32] >> (e / 32)) & 1;
                gs += (lo - (high_set ? 0 : 4)) * y[i].qs[e];
            }
            isum += sc[g] * gs;
        }
        s += gr_half_to_float(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

static float vec_dot_q4_k(int64_t n, const void *w, const void *a) {
    const block_q4_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            gr_k4_scale_min(x[i].scales, j, &sc, &mn);
            const uint8_t *q = x[i].qs + (j / 2) * 32;
            int shift = 4 * (j & 1), js = 0;
            for (int l = 0; l < 32; l++) js += ((q[l] >> shift) & 15) * y[i].qs[32 * j + l];
            isum += sc * js;
            msum += mn * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        float dall = y[i].d * gr_half_to_float(x[i].d), dmin = y[i].d * gr_half_to_float(x[i].dmin);
        s += dall * (float)isum - dmin * (float)msum;
    }
    return s;
}

static float vec_dot_q5_k(int64_t n, const void *w, const void *a) {
    const block_q5_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            gr_k4_scale_min(x[i].scales, j, &sc, &mn);
            const uint8_t *q = x[i].qs + (j / 2) * 32;
            int shift = 4 * (j & 1), js = 0;
            for (int l = 0; l < 32; l++) {
                int v = ((q[l] >> shift) & 15) | (((x[i].qh[l] >> j) & 1) << 4);
                js += v * y[i].qs[32 * j + l];
            }
            isum += sc * js;
            msum += mn * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        float dall = y[i].d * gr_half_to_float(x[i].d), dmin = y[i].d * gr_half_to_float(x[i].dmin);
        s += dall * (float)isum - dmin * (float)msum;
    }
    return s;
}

static float vec_dot_q6_k(int64_t n, const void *w, const void *a) {
    const block_q6_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0;
        for (int g = 0; g < 16; g++) {
            int gs = 0;
            for (int l = 0; l < 16; l++) gs += (q6k_code(&x[i], 16 * g + l) - 32) * y[i].qs[16 * g + l];
            isum += x[i].scales[g] * gs;
        }
        s += gr_half_to_float(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

static float vec_dot_iq4_xs(int64_t n, const void *w, const void *a) {
    const block_iq4_xs *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0;
        for (int j = 0; j < 8; j++) {
            const uint8_t *q = x[i].qs + 16 * j;
            const int8_t *yq = y[i].qs + 32 * j;
            int js = 0;
            for (int l = 0; l < 16; l++)
                js += gr_kvalues_iq4nl[q[l] & 15] * yq[l] + gr_kvalues_iq4nl[q[l] >> 4] * yq[l + 16];
            isum += gr_iq4xs_scale(&x[i], j) * js;
        }
        s += gr_half_to_float(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

/* ---------------------------------------------------------------- table */

/* F32/F16/BF16 dequantizers take an element count; the block formats take a block count. Dispatch
 * passes n / block_size, and the plain float types have block size 1, so both read the same. */
void gr_kernels_init_scalar(gr_kernels *k) {
    memset(k, 0, sizeof *k);
    k->dequantize[GR_T_F32] = dequantize_f32;
    k->dequantize[GR_T_F16] = dequantize_f16;
    k->dequantize[GR_T_BF16] = dequantize_bf16;
    k->dequantize[GR_T_Q4_0] = dequantize_q4_0;
    k->dequantize[GR_T_Q4_1] = dequantize_q4_1;
    k->dequantize[GR_T_Q5_0] = dequantize_q5_0;
    k->dequantize[GR_T_Q5_1] = dequantize_q5_1;
    k->dequantize[GR_T_Q8_0] = dequantize_q8_0;
    k->dequantize[GR_T_Q2_K] = dequantize_q2_k;
    k->dequantize[GR_T_Q3_K] = dequantize_q3_k;
    k->dequantize[GR_T_Q4_K] = dequantize_q4_k;
    k->dequantize[GR_T_Q5_K] = dequantize_q5_k;
    k->dequantize[GR_T_Q6_K] = dequantize_q6_k;
    k->dequantize[GR_T_IQ4_NL] = dequantize_iq4_nl;
    k->dequantize[GR_T_IQ4_XS] = dequantize_iq4_xs;
    k->dequantize[GR_T_MXFP4] = dequantize_mxfp4;

    k->vec_dot[GR_T_F32] = vec_dot_f32;
    k->vec_dot[GR_T_F16] = vec_dot_f16;
    k->vec_dot[GR_T_BF16] = vec_dot_bf16;
    k->vec_dot[GR_T_Q4_0] = vec_dot_q4_0;
    k->vec_dot[GR_T_Q4_1] = vec_dot_q4_1;
    k->vec_dot[GR_T_Q5_0] = vec_dot_q5_0;
    k->vec_dot[GR_T_Q5_1] = vec_dot_q5_1;
    k->vec_dot[GR_T_Q8_0] = vec_dot_q8_0;
    k->vec_dot[GR_T_Q2_K] = vec_dot_q2_k;
    k->vec_dot[GR_T_Q3_K] = vec_dot_q3_k;
    k->vec_dot[GR_T_Q4_K] = vec_dot_q4_k;
    k->vec_dot[GR_T_Q5_K] = vec_dot_q5_k;
    k->vec_dot[GR_T_Q6_K] = vec_dot_q6_k;
    k->vec_dot[GR_T_IQ4_NL] = vec_dot_iq4_nl;
    k->vec_dot[GR_T_IQ4_XS] = vec_dot_iq4_xs;
    k->vec_dot[GR_T_MXFP4] = vec_dot_mxfp4;

    k->quantize_act[GR_T_F16] = quantize_act_f16;
    k->quantize_act[GR_T_BF16] = quantize_act_bf16;
    k->quantize_act[GR_T_Q8_0] = quantize_act_q8_0;
    k->quantize_act[GR_T_Q8_1] = quantize_act_q8_1;
    k->quantize_act[GR_T_Q8_K] = quantize_act_q8_k;
}
