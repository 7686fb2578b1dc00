/* AArch64 NEON kernels. Built twice: plain ARMv8-A (int8 dots via vmull_s8 + pairwise add) and with
 * -march=armv8.2-a+dotprod -DGR_NEON_DOTPROD (vdotq_s32); dispatch.c picks by HWCAP_ASIMDDP.
 * Types without a kernel here keep the scalar reference from the table this starts from.
 *
 * Overflow: vmull_s8 products are at most 128*128, well inside int16, and are widened pairwise to
 * int32 right away, so both variants compute the same exact integer sums.
 */
#if defined(__aarch64__)
#include <arm_neon.h>
#include "blocks.h"

static inline int32x4_t dot_s8_acc(int32x4_t acc, int8x16_t a, int8x16_t b) {
#ifdef GR_NEON_DOTPROD
    return vdotq_s32(acc, a, b);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
#endif
}

static inline int dot32(int8x16_t a0, int8x16_t a1, const int8_t *y) {
    int32x4_t acc = dot_s8_acc(vdupq_n_s32(0), a0, vld1q_s8(y));
    return vaddvq_s32(dot_s8_acc(acc, a1, vld1q_s8(y + 16)));
}

static inline float h2f(gr_half h) {
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/* 16 bytes -> low nibbles (elements 0..15) and high nibbles (16..31). */
static inline void unpack_nibbles(const uint8_t *qs, uint8x16_t *lo, uint8x16_t *hi) {
    uint8x16_t v = vld1q_u8(qs);
    *lo = vandq_u8(v, vdupq_n_u8(0x0f));
    *hi = vshrq_n_u8(v, 4);
}

/* Byte k of the result (k < 16) is 0xff if bit (first + k) of bits is set. */
static inline uint8x16_t bits_to_bytes16(uint32_t bits, int first) {
    static const uint8_t bit_in_byte[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t b = vcombine_u8(vdup_n_u8((uint8_t)(bits >> first)), vdup_n_u8((uint8_t)(bits >> (first + 8))));
    return vtstq_u8(b, vld1q_u8(bit_in_byte));
}

static float vec_dot_q8_0_neon(int64_t n, const void *w, const void *a) {
    const block_q8_0 *x = w, *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++)
        s += h2f(x[i].d) * h2f(y[i].d) * (float)dot32(vld1q_s8(x[i].qs), vld1q_s8(x[i].qs + 16), y[i].qs);
    return s;
}

static float vec_dot_q4_0_neon(int64_t n, const void *w, const void *a) {
    const block_q4_0 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint8x16_t lo, hi;
        unpack_nibbles(x[i].qs, &lo, &hi);
        int8x16_t l = vsubq_s8(vreinterpretq_s8_u8(lo), vdupq_n_s8(8));
        int8x16_t h = vsubq_s8(vreinterpretq_s8_u8(hi), vdupq_n_s8(8));
        s += h2f(x[i].d) * h2f(y[i].d) * (float)dot32(l, h, y[i].qs);
    }
    return s;
}

static float vec_dot_q4_1_neon(int64_t n, const void *w, const void *a) {
    const block_q4_1 *x = w;
    const block_q8_1 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint8x16_t lo, hi;
        unpack_nibbles(x[i].qs, &lo, &hi);
        int sumi = dot32(vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), y[i].qs);
        s += h2f(x[i].d) * h2f(y[i].d) * (float)sumi + h2f(x[i].m) * h2f(y[i].s);
    }
    return s;
}

static float vec_dot_q5_0_neon(int64_t n, const void *w, const void *a) {
    const block_q5_0 *x = w;
    const block_q8_0 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh; memcpy(&qh, x[i].qh, 4);
        uint8x16_t lo, hi;
        unpack_nibbles(x[i].qs, &lo, &hi);
        /* a clear fifth bit means nibble - 16: or 0xf0 into the byte */
        lo = vorrq_u8(lo, vbicq_u8(vdupq_n_u8(0xf0), bits_to_bytes16(qh, 0)));
        hi = vorrq_u8(hi, vbicq_u8(vdupq_n_u8(0xf0), bits_to_bytes16(qh, 16)));
        s += h2f(x[i].d) * h2f(y[i].d) * (float)dot32(vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), y[i].qs);
    }
    return s;
}

static float vec_dot_q5_1_neon(int64_t n, const void *w, const void *a) {
    const block_q5_1 *x = w;
    const block_q8_1 *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh; memcpy(&qh, x[i].qh, 4);
        uint8x16_t lo, hi;
        unpack_nibbles(x[i].qs, &lo, &hi);
        lo = vorrq_u8(lo, vandq_u8(vdupq_n_u8(0x10), bits_to_bytes16(qh, 0)));
        hi = vorrq_u8(hi, vandq_u8(vdupq_n_u8(0x10), bits_to_bytes16(qh, 16)));
        int sumi = dot32(vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), y[i].qs);
        s += h2f(x[i].d) * h2f(y[i].d) * (float)sumi + h2f(x[i].m) * h2f(y[i].s);
    }
    return s;
}

static float vec_dot_codebook(int64_t n, const uint8_t *blocks, size_t block_bytes, size_t qs_offset,
                              const int8_t table[16], const block_q8_0 *y, int is_mxfp4) {
    int8x16_t tbl = vld1q_s8(table);
    float s = 0.f;
    for (int64_t i = 0; i < n / 32; i++) {
        const uint8_t *b = blocks + i * block_bytes;
        uint8x16_t lo, hi;
        unpack_nibbles(b + qs_offset, &lo, &hi);
        int sumi = dot32(vqtbl1q_s8(tbl, lo), vqtbl1q_s8(tbl, hi), y[i].qs);
        gr_half hd;
        memcpy(&hd, b, 2);
        float dw = is_mxfp4 ? gr_e8m0_to_float_half(b[0]) : h2f(hd);
        s += dw * h2f(y[i].d) * (float)sumi;
    }
    return s;
}

static float vec_dot_iq4_nl_neon(int64_t n, const void *w, const void *a) {
    return vec_dot_codebook(n, w, sizeof(block_iq4_nl), 2, gr_kvalues_iq4nl, a, 0);
}

static float vec_dot_mxfp4_neon(int64_t n, const void *w, const void *a) {
    return vec_dot_codebook(n, w, sizeof(block_mxfp4), 1, gr_kvalues_mxfp4, a, 1);
}

static float vec_dot_q4_k_neon(int64_t n, const void *w, const void *a) {
    const block_q4_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0, msum = 0;
        for (int j2 = 0; j2 < 4; j2++) {
            uint8_t sc0, mn0, sc1, mn1;
            gr_k4_scale_min(x[i].scales, 2 * j2, &sc0, &mn0);
            gr_k4_scale_min(x[i].scales, 2 * j2 + 1, &sc1, &mn1);
            uint8x16_t q0 = vld1q_u8(x[i].qs + 32 * j2), q1 = vld1q_u8(x[i].qs + 32 * j2 + 16);
            const int8_t *yq = y[i].qs + 64 * j2;
            int lo = dot32(vreinterpretq_s8_u8(vandq_u8(q0, vdupq_n_u8(0x0f))),
                           vreinterpretq_s8_u8(vandq_u8(q1, vdupq_n_u8(0x0f))), yq);
            int hi = dot32(vreinterpretq_s8_u8(vshrq_n_u8(q0, 4)), vreinterpretq_s8_u8(vshrq_n_u8(q1, 4)), yq + 32);
            isum += sc0 * lo + sc1 * hi;
            msum += mn0 * (y[i].bsums[4 * j2] + y[i].bsums[4 * j2 + 1]) + mn1 * (y[i].bsums[4 * j2 + 2] + y[i].bsums[4 * j2 + 3]);
        }
        s += y[i].d * h2f(x[i].d) * (float)isum - y[i].d * h2f(x[i].dmin) * (float)msum;
    }
    return s;
}

static float vec_dot_q6_k_neon(int64_t n, const void *w, const void *a) {
    const block_q6_K *x = w;
    const block_q8_K *y = a;
    float s = 0.f;
    for (int64_t i = 0; i < n / 256; i++) {
        int isum = 0;
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = x[i].ql + 64 * half, *qh = x[i].qh + 32 * half;
            for (int c = 0; c < 2; c++) {  /* 16-byte column c of the 32-byte rows */
                uint8x16_t l0 = vld1q_u8(ql + 16 * c), l1 = vld1q_u8(ql + 32 + 16 * c), h = vld1q_u8(qh + 16 * c);
                uint8x16_t m4 = vdupq_n_u8(0x0f), m3 = vdupq_n_u8(3);
                uint8x16_t code[4] = {
                    vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(h, m3), 4)),
                    vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 2), m3), 4)),
                    vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 4), m3), 4)),
                    vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(h, 6), 4)),
                };
                for (int r = 0; r < 4; r++) {
                    int e0 = 128 * half + 32 * r + 16 * c;
                    int8x16_t v = vsubq_s8(vreinterpretq_s8_u8(code[r]), vdupq_n_s8(32));
                    isum += x[i].scales[e0 / 16] * vaddvq_s32(dot_s8_acc(vdupq_n_s32(0), v, vld1q_s8(y[i].qs + e0)));
                }
            }
        }
        s += h2f(x[i].d) * y[i].d * (float)isum;
    }
    return s;
}

#ifdef GR_NEON_DOTPROD
void gr_kernels_init_neon_dotprod(gr_kernels *k)
#else
void gr_kernels_init_neon(gr_kernels *k)
#endif
{
    gr_kernels_init_scalar(k);
    k->vec_dot[GR_T_Q8_0] = vec_dot_q8_0_neon;
    k->vec_dot[GR_T_Q4_0] = vec_dot_q4_0_neon;
    k->vec_dot[GR_T_Q4_1] = vec_dot_q4_1_neon;
    k->vec_dot[GR_T_Q5_0] = vec_dot_q5_0_neon;
    k->vec_dot[GR_T_Q5_1] = vec_dot_q5_1_neon;
    k->vec_dot[GR_T_IQ4_NL] = vec_dot_iq4_nl_neon;
    k->vec_dot[GR_T_MXFP4] = vec_dot_mxfp4_neon;
    k->vec_dot[GR_T_Q4_K] = vec_dot_q4_k_neon;
    k->vec_dot[GR_T_Q6_K] = vec_dot_q6_k_neon;
}
#endif
