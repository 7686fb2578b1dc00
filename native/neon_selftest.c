/* Cross-compiled by `make neon-check` and run under qemu-aarch64: every type's NEON matmul against
 * the scalar reference on random blocks with moderate scales. Prints "neon selftest: ok" on success.
 * Tolerance: the paths share exact integer block sums and differ only in float summation order, so
 * 1e-5 of a bound on the summed terms' magnitude (3 * max|w| of the row * sum|x|) is ample. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "blocks.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float next_gauss(void) {
    float s = 0.f;
    for (int i = 0; i < 4; i++) s += (float)(next_u32() % 20001) / 10000.f - 1.f;
    return s;
}

/* byte offsets of fp16 scale fields, -1 terminated */
static const int *scale_offsets(int t) {
    static const int o0[] = {0, -1}, o02[] = {0, 2, -1}, q2k[] = {80, 82, -1}, q3k[] = {108, -1}, q6k[] = {208, -1};
    switch (t) {
    case GR_T_Q4_1: case GR_T_Q5_1: case GR_T_Q4_K: case GR_T_Q5_K: return o02;
    case GR_T_Q2_K: return q2k;
    case GR_T_Q3_K: return q3k;
    case GR_T_Q6_K: return q6k;
    default: return o0;
    }
}

static void fill_weights(int t, uint8_t *w, int64_t n_elems) {
    int bs = gr_block_size(t), ts = gr_type_size(t);
    if (t == GR_T_F32 || t == GR_T_F16 || t == GR_T_BF16) {
        for (int64_t i = 0; i < n_elems; i++) {
            float v = next_gauss();
            if (t == GR_T_F32) memcpy(w + 4 * i, &v, 4);
            else { uint16_t h = t == GR_T_F16 ? gr_float_to_half(v) : gr_float_to_bf16(v); memcpy(w + 2 * i, &h, 2); }
        }
        return;
    }
    for (int64_t b = 0; b < n_elems / bs; b++) {
        uint8_t *blk = w + b * ts;
        for (int i = 0; i < ts; i++) blk[i] = (uint8_t)next_u32();
        if (t == GR_T_MXFP4) { blk[0] = (uint8_t)(118 + next_u32() % 10); continue; }
        for (const int *o = scale_offsets(t); *o >= 0; o++) {
            gr_half h = gr_float_to_half((0.2f + (float)(next_u32() % 800) / 1000.f) / 64.f * ((next_u32() & 1) ? 1.f : -1.f));
            memcpy(blk + *o, &h, 2);
        }
    }
}

int main(void) {
    static const int types[] = {GR_T_F32, GR_T_F16, GR_T_BF16, GR_T_Q4_0, GR_T_Q4_1, GR_T_Q5_0, GR_T_Q5_1, GR_T_Q8_0,
                                GR_T_Q2_K, GR_T_Q3_K, GR_T_Q4_K, GR_T_Q5_K, GR_T_Q6_K, GR_T_IQ4_NL, GR_T_IQ4_XS, GR_T_MXFP4};
    const int64_t rows = 13, cols = 1024, n_tok = 3;
    if (!(gr_isa_available() & (1 << GR_ISA_NEON))) { printf("neon selftest: NEON path not available\n"); return 1; }
    gr_threads_set(2);
    int failures = 0;
    float *x = malloc(sizeof(float) * n_tok * cols), *deq = malloc(sizeof(float) * rows * cols);
    float *y_scalar = malloc(sizeof(float) * n_tok * rows), *y_neon = malloc(sizeof(float) * n_tok * rows);
    uint8_t *w = malloc((size_t)rows * cols * 4);
    for (int64_t i = 0; i < n_tok * cols; i++) x[i] = next_gauss();
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        int t = types[ti];
        int64_t row_bytes = cols / gr_block_size(t) * gr_type_size(t);
        fill_weights(t, w, rows * cols);
        gr_isa_set(GR_ISA_SCALAR);
        gr_dequantize(t, w, deq, rows * cols);
        gr_matmul(t, w, rows, cols, row_bytes, x, n_tok, y_scalar);
        gr_isa_set(GR_ISA_NEON);
        float *deq_neon = malloc(sizeof(float) * rows * cols);
        gr_dequantize(t, w, deq_neon, rows * cols);
        if (memcmp(deq, deq_neon, sizeof(float) * rows * cols) != 0) { printf("dequantize type %d differs\n", t); failures++; }
        free(deq_neon);
        gr_matmul(t, w, rows, cols, row_bytes, x, n_tok, y_neon);
        for (int64_t tok = 0; tok < n_tok; tok++)
            for (int64_t r = 0; r < rows; r++) {
                double wmax = 0, xsum = 0;
                for (int64_t c = 0; c < cols; c++) {
                    wmax = fmax(wmax, fabs(deq[r * cols + c]));
                    xsum += fabs(x[tok * cols + c]);
                }
                double err = fabs((double)y_neon[tok * rows + r] - y_scalar[tok * rows + r]);
                if (!(err <= 1e-5 * 3 * wmax * xsum)) {
                    printf("type %d row %lld tok %lld: neon %g scalar %g\n", t, (long long)r, (long long)tok,
                           y_neon[tok * rows + r], y_scalar[tok * rows + r]);
                    failures++;
                }
            }
    }
    if (failures) { printf("neon selftest: %d failures\n", failures); return 1; }
    printf("neon selftest: ok\n");
    return 0;
}
