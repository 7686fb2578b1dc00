/* Block layouts shared by every ISA source: each quantized format is defined exactly once here.
 *
 * The layouts are ggml's (they are what GGUF files contain); the size asserts pin them so a padding
 * change in one compiler can never silently shift a field. Everything here is plain C so the scalar,
 * AVX2, AVX-512 and NEON translation units agree on it.
 */
#ifndef GGUFRUN_BLOCKS_H
#define GGUFRUN_BLOCKS_H
#include <stdint.h>
#include <string.h>
#include "ggufrun.h"

#define GR_QK_SMALL 32   /* elements per block of the legacy and IQ4_NL/MXFP4 formats */
#define GR_QK_K     256  /* elements per K-quant super-block */

/* ggml type numbers (gguf.GGMLQuantizationType). */
enum {
    GR_T_F32 = 0, GR_T_F16 = 1, GR_T_Q4_0 = 2, GR_T_Q4_1 = 3, GR_T_Q5_0 = 6, GR_T_Q5_1 = 7,
    GR_T_Q8_0 = 8, GR_T_Q8_1 = 9, GR_T_Q2_K = 10, GR_T_Q3_K = 11, GR_T_Q4_K = 12, GR_T_Q5_K = 13,
    GR_T_Q6_K = 14, GR_T_Q8_K = 15, GR_T_IQ4_NL = 20, GR_T_IQ4_XS = 23, GR_T_BF16 = 30, GR_T_MXFP4 = 39,
    GR_T_SLOTS = 40
};

typedef uint16_t gr_half;  /* IEEE binary16 bits */

typedef struct { gr_half d; uint8_t qs[16]; } block_q4_0;
typedef struct { gr_half d, m; uint8_t qs[16]; } block_q4_1;
typedef struct { gr_half d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
typedef struct { gr_half d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
typedef struct { gr_half d; int8_t qs[32]; } block_q8_0;
/* Activation-only: s = d * sum(qs), rounded to fp16, lets Q4_1/Q5_1 fold their offset in per block. */
typedef struct { gr_half d, s; int8_t qs[32]; } block_q8_1;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; gr_half d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; gr_half d; } block_q3_K;
typedef struct { gr_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { gr_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; gr_half d; } block_q6_K;
/* Activation-only: float scale, and sums of each 16 quants so K-quant minimums cost one dot per block. */
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } block_q8_K;
typedef struct { gr_half d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { gr_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
typedef struct { uint8_t e; uint8_t qs[16]; } block_mxfp4;

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 layout");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 layout");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 layout");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
_Static_assert(sizeof(block_q8_1) == 36, "block_q8_1 layout");
_Static_assert(sizeof(block_q2_K) == 84, "block_q2_K layout");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K layout");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl layout");
_Static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs layout");
_Static_assert(sizeof(block_mxfp4) == 17, "block_mxfp4 layout");

/* Non-linear 4-bit codebooks. MXFP4's E2M1 values are stored doubled so they are integers; the
 * E8M0 scale is halved to compensate (see e8m0_to_float_half). */
static const int8_t gr_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const int8_t gr_kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float gr_bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t gr_float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Exact binary16 -> binary32 widening (every half is representable), subnormals included. */
static inline float gr_half_to_float(gr_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return gr_bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return gr_bits_to_float(sign);
        /* subnormal half: renormalise into a normal float */
        int shift = 0;
        while (!(man & 0x400)) { man <<= 1; shift++; }
        man &= 0x3ff;
        return gr_bits_to_float(sign | ((uint32_t)(113 - shift) << 23) | (man << 13));
    }
    return gr_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

/* binary32 -> binary16, round to nearest even, overflow to inf, NaN kept quiet: the same result as
 * F16C's vcvtps2ph with rounding mode 0, which is what ggml's x86 build uses. */
static inline gr_half gr_float_to_half(float f) {
    uint32_t x = gr_float_to_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (gr_half)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));  /* NaN */
    if (ax >= 0x477ff000u) return (gr_half)(sign | 0x7c00);  /* rounds past 65504: inf */
    if (ax < 0x38800000u) {
        /* result is subnormal or zero: value / 2^-24 rounded to an integer, ties to even */
        if (ax < 0x33000000u) return sign;  /* below half the smallest subnormal */
        uint32_t exp = ax >> 23, man = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - exp;  /* 14..24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (gr_half)(sign | q);
    }
    uint32_t q = ((ax >> 13) - (112u << 10));  /* rebias exponent, keep 10 mantissa bits */
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) q++;
    return (gr_half)(sign | q);
}

/* ggml's fp32 -> bf16: round to nearest even, NaN forced quiet. */
static inline uint16_t gr_float_to_bf16(float f) {
    uint32_t u = gr_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}
static inline float gr_bf16_to_float(uint16_t b) { return gr_bits_to_float((uint32_t)b << 16); }

/* Half of 2^(e-127): the MXFP4 block scale, halved because the codebook is doubled. e < 2 lands in
 * the float subnormal range and is built from the mantissa bits. */
static inline float gr_e8m0_to_float_half(uint8_t e) {
    uint32_t bits = e < 2 ? (0x00200000u << e) : ((uint32_t)(e - 1) << 23);
    return gr_bits_to_float(bits);
}

/* Round to nearest, ties to even, for |v| < 2^22: adding 1.5*2^23 pushes the fraction out of the
 * mantissa under the default rounding mode. ggml rounds activations this way (nearest_int for Q8_K,
 * vroundps mode 0 for Q8_0/Q8_1 on x86), so every ISA path here uses it too. */
static inline int gr_round_even(float v) {
    float t = v + 12582912.f;
    return (int)(gr_float_to_bits(t) & 0x7fffff) - 0x400000;
}

/* The 6-bit scale and minimum j (0..7) of a Q4_K/Q5_K super-block. */
static inline void gr_k4_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The 16 signed 6-bit scales of a Q3_K super-block, offset removed. */
static inline void gr_q3k_scales(const uint8_t *s, int8_t out[16]) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? (s[j] & 0x0f) : (s[j - 8] >> 4);
        int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* The 8 signed 6-bit scales of an IQ4_XS super-block, offset removed. */
static inline int gr_iq4xs_scale(const block_iq4_xs *b, int j) {
    int lo = (b->scales_l[j / 2] >> (4 * (j & 1))) & 0x0f;
    int hi = (b->scales_h >> (2 * j)) & 3;
    return (lo | (hi << 4)) - 32;
}

/* ------------------------------------------------------------------------------------------------
 * Kernel tables. One per ISA; an ISA's init starts from the scalar table and overrides what it
 * accelerates, so a type without a SIMD kernel still works on every path.
 */
typedef void  (*gr_dequantize_fn)(const void *src, float *dst, int64_t n_blocks);
/* Dot product of one weight row (n elements) with one activation row already in the weight type's
 * activation format. */
typedef float (*gr_vec_dot_fn)(int64_t n, const void *w, const void *act);
/* Convert n floats into an activation format (n a multiple of its block size). */
typedef void  (*gr_quantize_act_fn)(const float *x, void *dst, int64_t n);
/* Two-term activations (act precision 2): dot(w, a1) + dot(w, a2) in one pass over the weight row,
 * a1 the activation and a2 its quantized residual, both in the weight type's activation format. */
typedef float (*gr_vec_dot2_fn)(int64_t n, const void *w, const void *a1, const void *a2);
/* n floats (a multiple of the format's block size) to activation terms in one pass: q1 = quantize(x)
 * into dst1 and, when dst2 is not NULL, q2 = quantize(x - deq(q1)) into dst2 (gr_act_residual's
 * rules, Q8_1's s2 from gr_q8_1_residual_sums), bit for bit what the separate steps give. When d is
 * not NULL (Q8_0/Q8_1), block k's scale and sum (as gr_act_panel_scales computes them) of q1 go to
 * d[k], s[k] and those of q2 to d[ld + k], s[ld + k]. NULL in a table: dispatch composes
 * quantize_act, gr_act_residual and gr_act_panel_scales. */
typedef void  (*gr_quantize_terms_fn)(const float *x, void *dst1, void *dst2, int64_t n, float *d, float *s, int64_t ld);

/* Prefill (several activation rows) runs register-tiled micro-kernels where an ISA has them for a type.
 * A thread packs a group of up to tile_rows weight rows into a panel (codes unpacked to bytes, scales
 * to floats or int16 vectors; the layout is private to the type's kernels), then multiplies the panel
 * against tiles of up to tile_acts activation rows, so each weight block is unpacked once per group
 * and each loaded activation block feeds tile_rows rows. An activation row is one term of one token:
 * with two terms, token t's rows are 2t and 2t+1 and the driver adds them. */
typedef struct {
    const uint8_t *act;         /* n_act activation rows of act_row_bytes, in the weight type's format */
    int64_t act_row_bytes;
    /* 32-element formats (Q8_0/Q8_1) only, as floats so kernels need no fp16 conversion: block k of
     * act row a has scale d[a * ld + k] and block sum s[a * ld + k] (Q8_0: d * sum(q), Q8_1: its s);
     * ld >= blocks + 8 and the 8 floats after each row's blocks are 0, so the decode kernels may load
     * 8 consecutive blocks' values from any block. */
    const float *d, *s;
    int64_t ld;
} gr_act_panel;

#define GR_GEMV_ACTS 4   /* activation rows one gemv call takes */
#define GR_GEMV_ROWS 4   /* rows one step of gemv_rows takes, when they are narrow */
/* Rows this narrow go four at a time in gemv_rows: a Q8_0 row of 4-8 blocks costs about half as much
 * (its fixed costs and accumulation latency shared); wider rows have their fixed costs covered, and
 * weights streamed from memory in four interleaved rows read slower (Q4_1 1536 columns 12 -> 5-6 GB/s,
 * Q8_0 576 columns 11-12 -> 8, one thread). */
#define GR_GEMV_NARROW_COLS 256

typedef struct {
    int tile_rows, tile_acts;   /* the full tile; tile_acts is even (both terms of a token in one tile) */
    size_t (*panel_bytes)(int64_t cols);
    void (*pack)(const uint8_t *w, int64_t row_stride, int nrows, int64_t cols, void *panel);
    /* c[i * nacts + j] = dot(panel row i, act row a0 + j) for i < nrows <= tile_rows, j < nacts <= tile_acts */
    void (*tile)(int nrows, int nacts, int64_t cols, const void *panel, const gr_act_panel *a, int64_t a0, float *c);
    /* Decode (a few tokens), weights read in place, one row per call: c[t] = sum over j < terms (1 or 2)
     * of dot(the row at w, act row a0 + t * terms + j), t < ntok, ntok * terms <= GR_GEMV_ACTS. A token's
     * result does not depend on ntok: batches that take these kernels give token-by-token bits. */
    void (*gemv)(int ntok, int terms, int64_t cols, const uint8_t *w, const gr_act_panel *a, int64_t a0, float *c);
    /* Optional (NULL: gemv row by row): rows 0..nrows-1 (row r at w + r * row_stride) times ntok tokens,
     * y[t * ldy + r], each the bits gemv gives that row: the row loop inside the kernel, so a row of a
     * few blocks pays no call, no result round trip through memory and (narrow rows, four at a time)
     * a quarter of the horizontal sums. */
    void (*gemv_rows)(int ntok, int terms, int64_t cols, const uint8_t *w, int64_t row_stride, int64_t nrows,
                      const gr_act_panel *a, int64_t a0, float *y, int64_t ldy);
} gr_gemm_ops;

typedef struct {
    gr_dequantize_fn dequantize[GR_T_SLOTS];
    gr_vec_dot_fn vec_dot[GR_T_SLOTS];
    gr_vec_dot2_fn vec_dot2[GR_T_SLOTS];          /* NULL: dispatch calls vec_dot twice */
    gr_quantize_act_fn quantize_act[GR_T_SLOTS];  /* indexed by activation type (F16, BF16, Q8_*) */
    gr_quantize_terms_fn quantize_terms[GR_T_SLOTS];  /* same index; NULL: composed from the above */
    gr_gemm_ops gemm[GR_T_SLOTS];                 /* tile == NULL: prefill uses vec_dot per (row, token) */
} gr_kernels;

void gr_kernels_init_scalar(gr_kernels *k);
void gr_kernels_init_avx2(gr_kernels *k);
void gr_kernels_init_avx512(gr_kernels *k);
void gr_kernels_init_neon(gr_kernels *k);
void gr_kernels_init_neon_dotprod(gr_kernels *k);

/* Geometry shared by dispatch and the kernels: block size, bytes per block, activation type. */
int gr_act_type(int qtype);

/* Act precision 2 (kernels_scalar.c, shared by every ISA so the two terms are the same bytes on all
 * paths). gr_act_residual: r = x - dequantized(q) for n floats quantized to act_type in q; a value
 * whose first term is not finite (f16 overflow) gets a zero residual, so the pair is no worse than the
 * single term. gr_q8_1_residual_sums: Q8_1's s carries its block's sum into the offset term m * s of
 * Q4_1/Q5_1, and the first term's s is rounded to fp16 (an error of 2^-12 of the block sum, larger than
 * everything else the second term leaves). So the second term's s is set to make s1 + s2 the exact sum
 * of both terms' dequantized values, fp16(d1*sum(q1) + d2*sum(q2) - s1), rather than fp16(d2*sum(q2)):
 * the offset then sees the same activations as the codes, and the error left is sum(w * (x - deq)). */
void gr_act_residual(int act_type, const float *x, const void *q, float *r, int64_t n);
void gr_q8_1_residual_sums(const void *q1, void *q2, int64_t n);
/* Fill gr_act_panel's d and s for blocks [k0, k1) of activation rows [a0, a1) of a Q8_0 or Q8_1
 * activation buffer. */
void gr_act_panel_scales(int act_type, const uint8_t *act, int64_t act_row_bytes, int64_t k0, int64_t k1,
                         int64_t a0, int64_t a1, float *d, float *s, int64_t ld);

/* gr_moe_ffn's one-token path (dispatch.c): all selected experts batched over one pool pass per weight
 * kind. gr_moe_decode_ok says whether it applies (one token, decode kernels for all three types). */
int gr_moe_decode(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
                  int down_qtype, const void *const *down_w, int64_t n_embd, int64_t n_ff, const float *x,
                  int64_t n_used, const int32_t *ids, const float *weights, float clamp, float *y);
int gr_moe_decode_ok(int gate_qtype, int up_qtype, int down_qtype, int64_t n_tok);
/* gr_moe_ffn's few-token path (dispatch.c), where gr_moe_few_ok: the n_sel distinct experts sel[]
 * (ascending) with their pairs order[start[e] .. start[e + 1]) (pair index = token * n_used + slot,
 * ascending within an expert; start[n_sel] = n_tok * n_used); gate/up of all in one pool pass, down of
 * all in a second, each on the kernels gr_matmul picks for its group, so the same bits. */
#define GR_MOE_FEW_TOKENS 8

/* y[token of pair] += weights[pair] * d[r] for the n expert outputs d[r] of pairs[r] (pair index =
 * token * n_used + slot): the one place an MoE path adds its weighted expert outputs, so the batched
 * and few-token paths add in the same order and give the same bits. */
static inline void gr_moe_add_weighted(float *y, const float *d, const int64_t *pairs, int64_t n,
                                       const float *weights, int64_t n_used, int64_t n_embd) {
    for (int64_t r = 0; r < n; r++) {
        const float wt = weights[pairs[r]];
        float *yt = y + pairs[r] / n_used * n_embd;
        const float *dr = d + r * n_embd;
        for (int64_t c = 0; c < n_embd; c++) yt[c] += wt * dr[c];
    }
}
/* ops.c's mutex held or released around a token-split run (dispatch.c, gr_split_rows, which takes its
 * own API mutex first), whose threads then call entry points without them (threadpool.h). */
void gr_ops_hold(int hold);

/* Token split (dispatch.c; its users: block.c, gr_ffn). gr_split_pieces: the pieces to split n_tok rows
 * into for a layer whose weights for a piece of `rows` rows are piece_bytes(layer, rows) bytes: the
 * pool's threads (at most one row each), or 1 (no split: too many rows, weights too large, one thread,
 * split off, or already inside a piece). gr_split_rows: fn over rows [0, n) in `pieces` pieces side by
 * side on the pool (claimed, so a late thread's piece runs on another), or in one call here when pieces
 * is 1; the first error. */
typedef int (*gr_rows_fn)(void *ctx, int64_t t0, int64_t t1);
/* piece g of n rows in `pieces`: rows [gr_piece_start(g), gr_piece_start(g + 1)) */
static inline int64_t gr_piece_start(int64_t n, int pieces, int g) { return n * g / pieces; }
int gr_split_pieces(int64_t n_tok, double (*piece_bytes)(const void *layer, int64_t rows), const void *layer);
int gr_split_rows(gr_rows_fn fn, void *ctx, int64_t n, int pieces);
double gr_packed_bytes(int qtype, int64_t rows, int64_t cols);   /* rows x cols of a packed type */
/* a gated FFN's gate, up (n_ff x n_embd) and down (n_embd x n_ff) weights */
double gr_ffn_bytes(int gate_qtype, int up_qtype, int down_qtype, int64_t n_embd, int64_t n_ff);

int gr_moe_few_ok(int gate_qtype, int up_qtype, int down_qtype, int64_t n_tok, int64_t n_embd, int64_t n_ff);
int gr_moe_few(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
               int down_qtype, const void *const *down_w, int64_t n_embd, int64_t n_ff, const float *x,
               int64_t n_tok, int64_t n_used, int64_t n_sel, const int32_t *sel, const int64_t *start,
               const int64_t *order, const float *weights, float clamp, float *y);

#endif
