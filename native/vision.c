/* Vision-encoder ops (ggufrun/vision/step3vl.py): non-causal multi-head attention over all patches of an
 * image, and ggml's float16-table quick-GELU.
 *
 * Attention: a ViT attends every patch to every patch (2704 of them for a 728-pixel overview), so the
 * scores are the bulk of the encoder's arithmetic. Work items are (head, tile of TQ queries), claimed
 * from a counter on the pool (a worker another process has descheduled is skipped, not waited for).
 * Each item computes its TQ x n scores with a register-blocked 6 x 16 kernel (keys packed transposed
 * per head, so 16 keys are two vector loads), takes an exact two-pass softmax per row (max, exp, sum:
 * the scores of one tile fit in L2, so no online rescaling is needed), then accumulates P V with the
 * same 6 x 16 blocking over the packed values. Keys are walked in chunks of KC so a chunk of K^T or V
 * is reused from L2 by every 6-query block of the tile. Everything is float32, as ggml's CPU attention
 * is for an F32 K/Q product without flash attention; scores are scaled after the dot product as
 * ggml_soft_max_ext does. The AVX2 path uses FMA and a polynomial expf (within 2 ulp); the portable
 * path is the same loops in plain C with expf.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "ggufrun.h"
#include "threadpool.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GR_X86 1
#endif

#define MR 6      /* queries per register block */
#define NR 16     /* keys (QK) or value columns (PV) per register block: two 8-float vectors */
#define TQ 24     /* queries per work item: 4 register blocks; TQ x n scores stay in L2 (260 KB at n=2704) */
#define KC 256    /* keys per chunk: a chunk of K^T or V (64 KB at d=64) is reused by the tile's 4 blocks */

static pthread_mutex_t vision_mutex = PTHREAD_MUTEX_INITIALIZER;

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

typedef struct {
    const float *q, *k, *v;
    int64_t q_stride, k_stride, v_stride, out_stride;   /* floats between consecutive tokens */
    float *out;
    int64_t n, n_head, d, n16, d16, n_tiles;
    float scale;
    int simd;
    float *kt, *vp;            /* per head: K^T (d, n16) and V (n16, d16), zero padded */
    float *scratch;            /* per thread: TQ x d16 queries, TQ x n16 scores, TQ x d16 output */
    atomic_llong next;
} vattn_task;

/* ---------------------------------------------------------------- portable kernels */

static void qk_block_scalar(const float *q, int64_t d, const float *kt, int64_t n16, float scale, float *s) {
    float acc[MR][NR] = {{0}};
    for (int64_t c = 0; c < d; c++)
        for (int r = 0; r < MR; r++) {
            const float a = q[r * d + c];
            for (int j = 0; j < NR; j++) acc[r][j] += a * kt[c * n16 + j];
        }
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) s[r * n16 + j] = acc[r][j] * scale;
}

static void pv_block_scalar(const float *p, int64_t n16, const float *v, int64_t d16, int64_t nk, float *o) {
    float acc[MR][NR];
    for (int r = 0; r < MR; r++) memcpy(acc[r], o + r * d16, sizeof(acc[r]));
    for (int64_t j = 0; j < nk; j++)
        for (int r = 0; r < MR; r++) {
            const float a = p[r * n16 + j];
            for (int c = 0; c < NR; c++) acc[r][c] += a * v[j * d16 + c];
        }
    for (int r = 0; r < MR; r++) memcpy(o + r * d16, acc[r], sizeof(acc[r]));
}

/* row -> exp(row - max(row[0:n])) for the first n values, 0 for the padding up to n16; returns the sum */
static float softmax_row_scalar(float *row, int64_t n, int64_t n16) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) m = row[j] > m ? row[j] : m;
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    for (int64_t j = n; j < n16; j++) row[j] = 0.0f;
    return sum;
}

/* ---------------------------------------------------------------- AVX2 kernels */
#ifdef GR_X86
#define AVX2_FN __attribute__((target("avx2,fma")))

AVX2_FN static void qk_block_avx2(const float *q, int64_t d, const float *kt, int64_t n16, float scale, float *s) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (int64_t c = 0; c < d; c++) {
        const __m256 b0 = _mm256_loadu_ps(kt + c * n16), b1 = _mm256_loadu_ps(kt + c * n16 + 8);
        __m256 a;
        a = _mm256_broadcast_ss(q + 0 * d + c); a00 = _mm256_fmadd_ps(a, b0, a00); a01 = _mm256_fmadd_ps(a, b1, a01);
        a = _mm256_broadcast_ss(q + 1 * d + c); a10 = _mm256_fmadd_ps(a, b0, a10); a11 = _mm256_fmadd_ps(a, b1, a11);
        a = _mm256_broadcast_ss(q + 2 * d + c); a20 = _mm256_fmadd_ps(a, b0, a20); a21 = _mm256_fmadd_ps(a, b1, a21);
        a = _mm256_broadcast_ss(q + 3 * d + c); a30 = _mm256_fmadd_ps(a, b0, a30); a31 = _mm256_fmadd_ps(a, b1, a31);
        a = _mm256_broadcast_ss(q + 4 * d + c); a40 = _mm256_fmadd_ps(a, b0, a40); a41 = _mm256_fmadd_ps(a, b1, a41);
        a = _mm256_broadcast_ss(q + 5 * d + c); a50 = _mm256_fmadd_ps(a, b0, a50); a51 = _mm256_fmadd_ps(a, b1, a51);
    }
    const __m256 vs = _mm256_set1_ps(scale);
#define ST(r, x0, x1) _mm256_storeu_ps(s + r * n16, _mm256_mul_ps(x0, vs)); \
                      _mm256_storeu_ps(s + r * n16 + 8, _mm256_mul_ps(x1, vs));
    ST(0, a00, a01) ST(1, a10, a11) ST(2, a20, a21) ST(3, a30, a31) ST(4, a40, a41) ST(5, a50, a51)
#undef ST
}

AVX2_FN static void pv_block_avx2(const float *p, int64_t n16, const float *v, int64_t d16, int64_t nk, float *o) {
#define LD(r) __m256 a##r##0 = _mm256_loadu_ps(o + r * d16), a##r##1 = _mm256_loadu_ps(o + r * d16 + 8);
    LD(0) LD(1) LD(2) LD(3) LD(4) LD(5)
#undef LD
    for (int64_t j = 0; j < nk; j++) {
        const __m256 b0 = _mm256_loadu_ps(v + j * d16), b1 = _mm256_loadu_ps(v + j * d16 + 8);
        __m256 a;
        a = _mm256_broadcast_ss(p + 0 * n16 + j); a00 = _mm256_fmadd_ps(a, b0, a00); a01 = _mm256_fmadd_ps(a, b1, a01);
        a = _mm256_broadcast_ss(p + 1 * n16 + j); a10 = _mm256_fmadd_ps(a, b0, a10); a11 = _mm256_fmadd_ps(a, b1, a11);
        a = _mm256_broadcast_ss(p + 2 * n16 + j); a20 = _mm256_fmadd_ps(a, b0, a20); a21 = _mm256_fmadd_ps(a, b1, a21);
        a = _mm256_broadcast_ss(p + 3 * n16 + j); a30 = _mm256_fmadd_ps(a, b0, a30); a31 = _mm256_fmadd_ps(a, b1, a31);
        a = _mm256_broadcast_ss(p + 4 * n16 + j); a40 = _mm256_fmadd_ps(a, b0, a40); a41 = _mm256_fmadd_ps(a, b1, a41);
        a = _mm256_broadcast_ss(p + 5 * n16 + j); a50 = _mm256_fmadd_ps(a, b0, a50); a51 = _mm256_fmadd_ps(a, b1, a51);
    }
#define ST(r) _mm256_storeu_ps(o + r * d16, a##r##0); _mm256_storeu_ps(o + r * d16 + 8, a##r##1);
    ST(0) ST(1) ST(2) ST(3) ST(4) ST(5)
#undef ST
}

/* exp(x) for x <= 0 (arguments are score - max): 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and
 * a degree-6 polynomial (Cephes expf's coefficients); below -87 the result flushes towards 2^-126,
 * which against the row's maximum term of 1 is no different from 0 at float precision. */
AVX2_FN static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2_FN static float softmax_row_avx2(float *row, int64_t n, int64_t n16) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float m = _mm_cvtss_f32(m4);
    for (; j < n; j++) m = row[j] > m ? row[j] : m;
    for (j = n; j < n16; j++) row[j] = m;   /* padding: exp(0) here, zeroed below, so the loop has no tail */
    const __m256 bm = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (j = 0; j < n16; j += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j), bm));
        _mm256_storeu_ps(row + j, e);
        if (j + 8 <= n) vs = _mm256_add_ps(vs, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float sum = _mm_cvtss_f32(s4);
    for (j = n / 8 * 8; j < n; j++) sum += row[j];
    for (j = n; j < n16; j++) row[j] = 0.0f;
    return sum;
}
#endif

/* ---------------------------------------------------------------- attention */

static void vattn_pack(void *arg, int ith, int nth) {
    vattn_task *a = arg;
    (void)ith; (void)nth;
    for (int64_t h; (h = atomic_fetch_add(&a->next, 1)) < a->n_head;) {
        float *kt = a->kt + h * a->d * a->n16, *vp = a->vp + h * a->n16 * a->d16;
        for (int64_t t = 0; t < a->n; t++) {
            const float *k = a->k + t * a->k_stride + h * a->d, *v = a->v + t * a->v_stride + h * a->d;
            for (int64_t c = 0; c < a->d; c++) kt[c * a->n16 + t] = k[c];
            memcpy(vp + t * a->d16, v, sizeof(float) * (size_t)a->d);
        }
    }
}

static void vattn_run(void *arg, int ith, int nth) {
    vattn_task *a = arg;
    (void)nth;
    const int64_t d = a->d, d16 = a->d16, n = a->n, n16 = a->n16;
    float *qb = a->scratch + (size_t)ith * (size_t)(TQ * (2 * d16 + n16));
    float *sc = qb + TQ * d16, *ob = sc + TQ * n16;
    float sums[TQ];
    for (int64_t item; (item = atomic_fetch_add(&a->next, 1)) < a->n_head * a->n_tiles;) {
        const int64_t h = item / a->n_tiles, t0 = item % a->n_tiles * TQ;
        const int64_t nq = n - t0 < TQ ? n - t0 : TQ, nb = (nq + MR - 1) / MR;
        const float *kt = a->kt + h * d * n16, *vp = a->vp + h * n16 * d16;
        /* the tile's queries, contiguous, rows past the last query zero (their results are dropped) */
        for (int64_t r = 0; r < nb * MR; r++) {
            if (r < nq) memcpy(qb + r * d, a->q + (t0 + r) * a->q_stride + h * d, sizeof(float) * (size_t)d);
            else memset(qb + r * d, 0, sizeof(float) * (size_t)d);
        }
        for (int64_t j0 = 0; j0 < n16; j0 += KC) {
            const int64_t j1 = j0 + KC < n16 ? j0 + KC : n16;
            for (int64_t b = 0; b < nb; b++)
                for (int64_t j = j0; j < j1; j += NR) {
#ifdef GR_X86
                    if (a->simd) qk_block_avx2(qb + b * MR * d, d, kt + j, n16, a->scale, sc + b * MR * n16 + j);
                    else
#endif
                    qk_block_scalar(qb + b * MR * d, d, kt + j, n16, a->scale, sc + b * MR * n16 + j);
                }
        }
        for (int64_t r = 0; r < nb * MR; r++) {
#ifdef GR_X86
            if (a->simd) sums[r] = softmax_row_avx2(sc + r * n16, n, n16);
            else
#endif
            sums[r] = softmax_row_scalar(sc + r * n16, n, n16);
        }
        memset(ob, 0, sizeof(float) * (size_t)(nb * MR * d16));
        for (int64_t j0 = 0; j0 < n16; j0 += KC) {
            const int64_t nk = (j0 + KC < n16 ? j0 + KC : n16) - j0;
            for (int64_t b = 0; b < nb; b++)
                for (int64_t c = 0; c < d16; c += NR) {
#ifdef GR_X86
                    if (a->simd) pv_block_avx2(sc + b * MR * n16 + j0, n16, vp + j0 * d16 + c, d16, nk, ob + b * MR * d16 + c);
                    else
#endif
                    pv_block_scalar(sc + b * MR * n16 + j0, n16, vp + j0 * d16 + c, d16, nk, ob + b * MR * d16 + c);
                }
        }
        for (int64_t r = 0; r < nq; r++) {
            const float inv = 1.0f / sums[r];
            float *o = a->out + (t0 + r) * a->out_stride + h * d;
            for (int64_t c = 0; c < d; c++) o[c] = ob[r * d16 + c] * inv;
        }
    }
}

static int simd_ok(void) {
#ifdef GR_X86
    __builtin_cpu_init();
    return gr_isa_get() != GR_ISA_SCALAR && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int gr_vision_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                        int64_t v_stride, float *out, int64_t out_stride, int64_t n, int64_t n_head, int64_t d,
                        float scale) {
    if (n <= 0 || n_head <= 0 || d <= 0) return GR_E_SHAPE;
    if (q_stride < n_head * d || k_stride < n_head * d || v_stride < n_head * d || out_stride < n_head * d)
        return GR_E_ARG;
    const int64_t n16 = round_up(n, NR), d16 = round_up(d, NR);
    pthread_mutex_lock(&vision_mutex);
    const int nth = gr_pool_threads();
    /* calloc: the padding keys (K^T columns, V rows) and value columns past d must be zero */
    float *packed = calloc((size_t)(n_head * (d * n16 + n16 * d16)), sizeof(float));
    float *scratch = malloc(sizeof(float) * (size_t)nth * (size_t)(TQ * (2 * d16 + n16)));
    if (!packed || !scratch) {
        free(packed); free(scratch);
        pthread_mutex_unlock(&vision_mutex);
        return GR_E_NOMEM;
    }
    vattn_task a = {q, k, v, q_stride, k_stride, v_stride, out_stride, out, n, n_head, d, n16, d16,
                    (n + TQ - 1) / TQ, scale, simd_ok(), packed, packed + n_head * d * n16, scratch, 0};
    /* a single small image is still ~n^2 d multiply-adds per head: worth the pool above a few tiles */
    const int use = n * n * n_head * d >= 200000 ? nth : 1;
    atomic_init(&a.next, 0);
    gr_pool_run_dynamic(vattn_pack, &a, use);
    atomic_store(&a.next, 0);
    gr_pool_run_dynamic(vattn_run, &a, use);
    free(packed);
    free(scratch);
    pthread_mutex_unlock(&vision_mutex);
    return GR_OK;
}

/* ---------------------------------------------------------------- quick-GELU through float16 */

/* float -> float16 bits, round to nearest even (F16C's and numpy's rounding), for the table and the
 * portable path */
static uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    u &= 0x7fffffff;
    uint16_t o;
    if (u >= (143u << 23)) o = u > (255u << 23) ? 0x7e00 : 0x7c00;       /* >= 65536 or NaN/inf */
    else if (u < (113u << 23)) {                                         /* float16 subnormal or zero */
        float a;
        memcpy(&a, &u, 4);
        a += 0.5f;                                                      /* aligns the bits, rounding */
        uint32_t b;
        memcpy(&b, &a, 4);
        o = (uint16_t)(b - 0x3f000000u);
    } else {
        const uint32_t odd = (u >> 13) & 1;
        u += ((uint32_t)(15 - 127) << 23) + 0xfff + odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | sign);
}

static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        float f = (float)m * 0x1p-24f;        /* exact: subnormals are m * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) bits = sign | 0x7f800000 | (m << 13);
    else bits = sign | ((e + 127 - 15) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ggml's table: for every float16 input, float16(x * (1 / (1 + expf(-1.702 x)))), stored widened */
static float gelu_quick_table[1 << 16];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;
static void gelu_table_init(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float x = f16_to_f32((uint16_t)i);
        gelu_quick_table[i] = f16_to_f32(f32_to_f16(x * (1.0f / (1.0f + expf(-1.702f * x)))));
    }
}

typedef struct { const float *x; float *y; int64_t n; int simd; atomic_llong next; } gelu_task;
#define GELU_CHUNK 16384

#ifdef GR_X86
__attribute__((target("avx2,f16c")))
static void gelu_chunk_avx2(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(y + i, _mm256_i32gather_ps(gelu_quick_table, _mm256_cvtepu16_epi32(h), 4));
    }
    for (; i < n; i++) y[i] = gelu_quick_table[f32_to_f16(x[i])];
}
#endif

static void gelu_run(void *arg, int ith, int nth) {
    gelu_task *g = arg;
    (void)ith; (void)nth;
    for (int64_t c; (c = atomic_fetch_add(&g->next, 1) * GELU_CHUNK) < g->n;) {
        const int64_t m = g->n - c < GELU_CHUNK ? g->n - c : GELU_CHUNK;
#ifdef GR_X86
        if (g->simd) { gelu_chunk_avx2(g->x + c, g->y + c, m); continue; }
#endif
        for (int64_t i = 0; i < m; i++) g->y[c + i] = gelu_quick_table[f32_to_f16(g->x[c + i])];
    }
}

int gr_vision_gelu_quick_f16(const float *x, float *y, int64_t n) {
    if (n <= 0) return GR_E_SHAPE;
    pthread_once(&gelu_once, gelu_table_init);
    pthread_mutex_lock(&vision_mutex);
    int simd = 0;
#ifdef GR_X86
    __builtin_cpu_init();
    simd = gr_isa_get() != GR_ISA_SCALAR && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    gelu_task g = {x, y, n, simd, 0};
    atomic_init(&g.next, 0);
    gr_pool_run_dynamic(gelu_run, &g, n >= 4 * GELU_CHUNK ? gr_pool_threads() : 1);
    pthread_mutex_unlock(&vision_mutex);
    return GR_OK;
}

/* ---------------------------------------------------------------- weight products over many patches */

/* y = x W^T + b for thousands of patch rows at once, W float16 or float32. gr_matmul's F16 path is a
 * dot product per (token, row), built for the few tokens of decode: on an encoder's 2704 x 384 by 2240
 * product it reaches ~55 GFLOP/s on two Zen 3 cores. Here W is first widened to float32 panels of 16
 * rows (wp[panel][col][16], one parallel pass), x rounded into a padded copy; then each work item runs
 * the attention's 6 x 16 FMA kernel for one panel over one chunk of x's rows. Items go chunk-major and
 * a chunk is sized to ~256 KB, so it stays in L2 while the panels stream past it: panel-major order
 * re-read all of x from memory per panel, which for the 24 MB input of an overview's ffn_down halved
 * the speed. Numerics are gr_matmul's at act precision 1 (which the encoder always runs at): for F16
 * weights x is rounded to float16 (ggml's vec_dot_type for F16), the products are exact in float32 and
 * summed in float32, in another order (a few float32 ulps apart); the bias is added after the sum. */
#define QT_F32 0
#define QT_F16 1

typedef struct {
    const void *w;
    int qtype;
    int64_t rows, cols, row_stride, n, n6, n_panels, tb, n_chunks;
    const float *x, *bias;
    float *xr, *y, *wp;        /* xr: x rounded, n6 rows (zero padded); wp: all panels, zero padded */
    int simd;
    atomic_llong next;
} vmm_task;

#ifdef GR_X86
__attribute__((target("avx2,f16c")))
static int64_t round_f16_avx2(const float *src, float *dst, int64_t n) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT)));
    return c;
}
__attribute__((target("avx2,f16c")))
static void widen_f16_avx2(const uint16_t *src, float *dst, int64_t n) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + c))));
    for (; c < n; c++) dst[c] = f16_to_f32(src[c]);
}
#endif

/* items 0..n_panels-1 widen a panel; items n_panels.. round a row of x */
static void vmm_prepare(void *arg, int ith, int nth) {
    vmm_task *a = arg;
    (void)ith; (void)nth;
    const int64_t cols = a->cols;
    float buf[256];
    for (int64_t item; (item = atomic_fetch_add(&a->next, 1)) < a->n_panels + a->n6;) {
        if (item < a->n_panels) {
            float *wp = a->wp + item * cols * NR;   /* W rows 16 item.. as wp[c][16]; calloc'd padding */
            for (int64_t r = 0, r0 = item * NR; r < NR && r0 + r < a->rows; r++) {
                const char *src = (const char *)a->w + (r0 + r) * a->row_stride;
                for (int64_t c0 = 0; c0 < cols; c0 += 256) {
                    const int64_t m = cols - c0 < 256 ? cols - c0 : 256;
                    if (a->qtype == QT_F32) memcpy(buf, (const float *)src + c0, sizeof(float) * (size_t)m);
#ifdef GR_X86
                    else if (a->simd) widen_f16_avx2((const uint16_t *)src + c0, buf, m);
#endif
                    else for (int64_t c = 0; c < m; c++) buf[c] = f16_to_f32(((const uint16_t *)src)[c0 + c]);
                    for (int64_t c = 0; c < m; c++) wp[(c0 + c) * NR + r] = buf[c];
                }
            }
            continue;
        }
        const int64_t t = item - a->n_panels;
        float *dst = a->xr + t * cols;
        if (t >= a->n) { memset(dst, 0, sizeof(float) * (size_t)cols); continue; }
        const float *src = a->x + t * cols;
        if (a->qtype == QT_F32) { memcpy(dst, src, sizeof(float) * (size_t)cols); continue; }
        int64_t c = 0;
#ifdef GR_X86
        if (a->simd) c = round_f16_avx2(src, dst, cols);
#endif
        for (; c < cols; c++) dst[c] = f16_to_f32(f32_to_f16(src[c]));
    }
}

static void vmm_run(void *arg, int ith, int nth) {
    vmm_task *a = arg;
    (void)ith; (void)nth;
    const int64_t cols = a->cols;
    float tmp[MR * NR];
    for (int64_t item; (item = atomic_fetch_add(&a->next, 1)) < a->n_panels * a->n_chunks;) {
        const int64_t p = item % a->n_panels, r0 = p * NR, nr = a->rows - r0 < NR ? a->rows - r0 : NR;
        const float *wp = a->wp + p * cols * NR;
        const int64_t t0 = item / a->n_panels * a->tb, t1 = t0 + a->tb < a->n6 ? t0 + a->tb : a->n6;
        for (int64_t t = t0; t < t1; t += MR) {
#ifdef GR_X86
            if (a->simd) qk_block_avx2(a->xr + t * cols, cols, wp, NR, 1.0f, tmp);
            else
#endif
            qk_block_scalar(a->xr + t * cols, cols, wp, NR, 1.0f, tmp);   /* the scale 1.0f is exact */
            for (int64_t i = 0; i < MR && t + i < a->n; i++) {
                float *dst = a->y + (t + i) * a->rows + r0;
                if (a->bias) for (int64_t r = 0; r < nr; r++) dst[r] = tmp[i * NR + r] + a->bias[r0 + r];
                else memcpy(dst, tmp + i * NR, sizeof(float) * (size_t)nr);
            }
        }
    }
}

int gr_vision_matmul(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride, const float *x,
                     int64_t n, const float *bias, float *y) {
    if (qtype != QT_F32 && qtype != QT_F16) return GR_E_QTYPE;
    if (rows <= 0 || cols <= 0 || n <= 0) return GR_E_SHAPE;
    if (row_stride < cols * (qtype == QT_F32 ? 4 : 2)) return GR_E_ARG;
    const int64_t n6 = round_up(n, MR), n_panels = round_up(rows, NR) / NR;
    /* rows of x per item: ~256 KB of them (half of a Zen 3 L2), 4 to 32 register blocks */
    int64_t tb = 65536 / cols / MR * MR;
    tb = tb < 4 * MR ? 4 * MR : tb > 32 * MR ? 32 * MR : tb;
    pthread_mutex_lock(&vision_mutex);
    const int nth = gr_pool_threads();
    float *xr = malloc(sizeof(float) * (size_t)(n6 * cols));
    float *wp = calloc((size_t)(n_panels * NR * cols), sizeof(float));
    if (!xr || !wp) {
        free(xr); free(wp);
        pthread_mutex_unlock(&vision_mutex);
        return GR_E_NOMEM;
    }
    int simd = 0;
#ifdef GR_X86
    __builtin_cpu_init();
    simd = simd_ok() && __builtin_cpu_supports("f16c");
#endif
    vmm_task a = {w, qtype, rows, cols, row_stride, n, n6, n_panels, tb, (n6 + tb - 1) / tb,
                  x, bias, xr, y, wp, simd, 0};
    const int use = (double)n * (double)rows * (double)cols >= 2e5 ? nth : 1;
    atomic_init(&a.next, 0);
    gr_pool_run_dynamic(vmm_prepare, &a, use);
    atomic_store(&a.next, 0);
    gr_pool_run_dynamic(vmm_run, &a, use);
    free(xr);
    free(wp);
    pthread_mutex_unlock(&vision_mutex);
    return GR_OK;
}

/* ---------------------------------------------------------------- 2-D rotary, in place */

int gr_vision_rope_pairs(float *x, int64_t stride, int64_t n, int64_t n_head, int64_t d, const float *cos_t,
                         const float *sin_t) {
    if (n <= 0 || n_head <= 0 || d <= 0 || d % 2) return GR_E_SHAPE;
    if (stride < n_head * d) return GR_E_ARG;
    const int64_t half = d / 2;
    for (int64_t t = 0; t < n; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < n_head; h++) {
            float *v = x + t * stride + h * d;
            /* numpy's a * c - b * s, a * s + b * c: each product rounded (no FMA contraction here) */
            for (int64_t p = 0; p < half; p++) {
                const float a = v[2 * p], b = v[2 * p + 1];
                v[2 * p] = a * c[p] - b * s[p];
                v[2 * p + 1] = a * s[p] + b * c[p];
            }
        }
    }
    return GR_OK;
}

/* ---------------------------------------------------------------- layer norm */

/* ggml_norm's arithmetic (then ggml_mul and ggml_add, one rounding each): the sum in double, the mean
 * rounded to float, x - mean in float, its float squares summed in double, scale 1 / sqrtf(var + eps) */
int gr_vision_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t n_rows, int64_t dim,
                         float eps) {
    if (n_rows <= 0 || dim <= 0) return GR_E_SHAPE;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        double sum = 0.0;
        for (int64_t i = 0; i < dim; i++) sum += xr[i];
        const float mean = (float)sum / (float)dim;
        double sum2 = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            const float v = xr[i] - mean;
            yr[i] = v;
            sum2 += (double)(v * v);
        }
        const float scale = 1.0f / sqrtf((float)(sum2 / (double)dim) + eps);
        for (int64_t i = 0; i < dim; i++) yr[i] *= scale;
        if (w) for (int64_t i = 0; i < dim; i++) yr[i] *= w[i];
        if (b) for (int64_t i = 0; i < dim; i++) yr[i] += b[i];
    }
    return GR_OK;
}
