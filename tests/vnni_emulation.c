/* The AVX-512 VNNI build of kernels_x86.inc, run on a CPU with AVX2 only: vpdpbusd is replaced by an
 * exact AVX2 emulation (four u8*s8 products added into each int32 lane, no saturation), so the code
 * that differs between the two builds -- the GR_USE_VNNI branches of the dot products, tiles and
 * gemv -- is exercised here although this machine cannot run AVX-512. Every type with tile/gemv
 * kernels is checked against the scalar vec_dot on the same quantized activations, one and two terms.
 * Built and run by tests/test_native.py; prints "vnni emulation: ok" on success. */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline __m256i emulated_dpbusd(__m256i acc, __m256i u, __m256i s) {
    const __m256i low_bytes = _mm256_set1_epi16(0x00ff);
    __m256i u_even = _mm256_and_si256(u, low_bytes), u_odd = _mm256_srli_epi16(u, 8);
    __m256i s_even = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), s_odd = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u_even, s_even), _mm256_madd_epi16(u_odd, s_odd)));
}
#undef _mm256_dpbusd_epi32
#define _mm256_dpbusd_epi32(acc, u, s) emulated_dpbusd(acc, u, s)
#define GR_USE_VNNI 1
#define GR_X86_INIT_NAME gr_kernels_init_vnni_emulated
#include "kernels_x86.inc"

/* dispatch.c links against the AVX-512 table; this CPU never selects it */
void gr_kernels_init_avx512(gr_kernels *k) { gr_kernels_init_vnni_emulated(k); }

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float next_gauss(void) {
    float s = 0.f;
    for (int i = 0; i < 4; i++) s += (float)(next_u32() % 20001) / 10000.f - 1.f;
    return s;
}

/* random blocks with moderate fp16 scales at the given byte offsets (-1 terminated) */
static void fill_weights(int t, uint8_t *w, int64_t n_blocks) {
    static const int o0[] = {0, -1}, o02[] = {0, 2, -1}, q6k[] = {208, -1};
    const int *offs = (t == GR_T_Q4_1 || t == GR_T_Q4_K || t == GR_T_Q5_K) ? o02 : t == GR_T_Q6_K ? q6k : o0;
    int ts = gr_type_size(t);
    for (int64_t b = 0; b < n_blocks; b++) {
        uint8_t *blk = w + b * ts;
        for (int i = 0; i < ts; i++) blk[i] = (uint8_t)next_u32();
        for (const int *o = offs; *o >= 0; o++) {
            float v = (0.2f + (float)(next_u32() % 800) / 1000.f) / 64.f * ((next_u32() & 1) ? 1.f : -1.f);
            gr_half h = gr_float_to_half(v);
            memcpy(blk + *o, &h, 2);
        }
    }
}

int main(void) {
    static const int types[] = {GR_T_Q4_0, GR_T_Q4_1, GR_T_Q5_0, GR_T_Q8_0, GR_T_Q4_K, GR_T_Q5_K, GR_T_Q6_K};
    enum { ROWS = 21, COLS = 1024, N_TOK = 3 };
    gr_kernels scalar, vnni;
    gr_kernels_init_scalar(&scalar);
    gr_kernels_init_vnni_emulated(&vnni);
    float *x = malloc(sizeof(float) * N_TOK * COLS), *deq = malloc(sizeof(float) * COLS);
    float *ax = malloc(sizeof(float) * 2 * N_TOK * COLS);
    for (int i = 0; i < N_TOK * COLS; i++) x[i] = next_gauss() * ((i % 97) == 0 ? 20.f : 1.f);
    uint8_t *w = malloc((size_t)ROWS * COLS * 2);
    int failures = 0;
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        int t = types[ti], at = gr_act_type(t);
        int64_t rb = COLS / gr_block_size(t) * gr_type_size(t), arb = COLS / gr_block_size(at) * gr_type_size(at);
        fill_weights(t, w, ROWS * COLS / gr_block_size(t));
        /* two terms per token, rows 2t and 2t+1, as gr_matmul lays them out */
        uint8_t *act = malloc((size_t)arb * 2 * N_TOK);
        int64_t ld = COLS / 32 + 8;
        float *pd = calloc((size_t)(2 * N_TOK) * ld, sizeof(float)), *ps = calloc((size_t)(2 * N_TOK) * ld, sizeof(float));
        for (int tok = 0; tok < N_TOK; tok++) {
            if (gr_quantize_activation_terms(at, x + tok * COLS, act + 2 * tok * arb, COLS) != GR_OK) return 2;
        }
        if (at == GR_T_Q8_0 || at == GR_T_Q8_1) gr_act_panel_scales(at, act, arb, 0, COLS / 32, 0, 2 * N_TOK, pd, ps, ld);
        gr_act_panel ap = {act, arb, pd, ps, ld};
        /* |activation| per element, for the tolerance */
        for (int a = 0; a < 2 * N_TOK; a++) {
            if (at == GR_T_Q8_K) {
                const block_q8_K *b = (const block_q8_K *)(act + a * arb);
                for (int c = 0; c < COLS; c++) ax[a * COLS + c] = fabsf(b[c / 256].d * (float)b[c / 256].qs[c % 256]);
            } else {
                for (int64_t k = 0; k < COLS / 32; k++)
                    for (int j = 0; j < 32; j++) {
                        const uint8_t *b = act + a * arb + k * gr_type_size(at);
                        gr_half h; memcpy(&h, b, 2);
                        ax[a * COLS + 32 * k + j] = fabsf(gr_half_to_float(h) * (float)((const int8_t *)b)[gr_type_size(at) - 32 + j]);
                    }
            }
        }
        const gr_gemm_ops *g = &vnni.gemm[t];
        void *panel = aligned_alloc(64, (g->panel_bytes(COLS) + 63) / 64 * 64);
        for (int r0 = 0; r0 < ROWS; r0 += 8) {
            int nr = ROWS - r0 < 8 ? ROWS - r0 : 8;
            const uint8_t *wr = w + r0 * rb;
            float ref[8][2 * N_TOK], mag[8][2 * N_TOK];
            for (int i = 0; i < nr; i++) {
                scalar.dequantize[t](wr + i * rb, deq, COLS / gr_block_size(t));
                for (int a = 0; a < 2 * N_TOK; a++) {
                    ref[i][a] = scalar.vec_dot[t](COLS, wr + i * rb, act + a * arb);
                    double m = 0;
                    for (int c = 0; c < COLS; c++) m += fabs((double)deq[c]) * ax[a * COLS + c];
                    mag[i][a] = (float)(3 * m + 1e-6);
                }
            }
            /* tiles: all activation rows at once, and a tile of 3 */
            float c[64];
            g->pack(wr, rb, nr, COLS, panel);
            for (int a0 = 0, na; a0 < 2 * N_TOK; a0 += na) {
                na = a0 == 0 ? 3 : 2 * N_TOK - a0 < g->tile_acts ? 2 * N_TOK - a0 : g->tile_acts;
                g->tile(nr, na, COLS, panel, &ap, a0, c);
                for (int i = 0; i < nr; i++)
                    for (int j = 0; j < na; j++)
                        if (!(fabsf(c[i * na + j] - ref[i][a0 + j]) <= 1e-5f * mag[i][a0 + j])) {
                            printf("type %d tile row %d act %d: %g vs scalar %g\n", t, r0 + i, a0 + j, c[i * na + j], ref[i][a0 + j]);
                            failures++;
                        }
            }
            /* gemv: one row against 1..GR_GEMV_ACTS / terms tokens of one term and of both */
            for (int i = 0; i < nr; i++)
                for (int terms = 1; terms <= 2; terms++)
                    for (int ntok = 1; ntok * terms <= GR_GEMV_ACTS; ntok++)
                        for (int a0 = 0; a0 + ntok * terms <= 2 * N_TOK; a0 += terms) {
                            g->gemv(ntok, terms, COLS, wr + i * rb, &ap, a0, c);
                            for (int tok = 0; tok < ntok; tok++) {
                                const int a = a0 + tok * terms;
                                float want = ref[i][a] + (terms == 2 ? ref[i][a + 1] : 0.f);
                                float tol = 1e-5f * (mag[i][a] + (terms == 2 ? mag[i][a + 1] : 0.f));
                                if (!(fabsf(c[tok] - want) <= tol)) {
                                    printf("type %d gemv row %d act %d of %d tokens, terms %d: %g vs scalar %g\n", t,
                                           r0 + i, a, ntok, terms, c[tok], want);
                                    failures++;
                                }
                            }
                        }
        }
        free(panel); free(act); free(pd); free(ps);
    }
    if (failures) { printf("vnni emulation: %d failures\n", failures); return 1; }
    printf("vnni emulation: ok\n");
    return 0;
}
