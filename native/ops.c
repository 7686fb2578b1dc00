/* Transformer ops around the matmuls: RMS norm, rotary embedding, gated activations, attention over
 * a float16 KV cache. Each is one call per layer from Python, so a decode step costs a handful of
 * native calls per layer instead of dozens of numpy ones.
 *
 * Numerics follow llama.cpp's CPU backend where it is exact (RMS norm sums in double, rope angles by
 * repeated float multiplication) and are exact where llama.cpp approximates (the GELU is computed, not
 * looked up in a float16 table; attention probabilities stay float32 instead of being rounded to f16).
 *
 * The inner loops have an AVX2/F16C variant selected once at run time from CPUID, beside the portable
 * C they are checked against. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "blocks.h"
#include "threadpool.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GR_X86 1
#endif

static pthread_mutex_t ops_mutex = PTHREAD_MUTEX_INITIALIZER;

/* Held by a token-split run's caller (dispatch.c, gr_split_rows) for all its pieces, whose threads
 * then skip it (gr_lock_unless_split). */
void gr_ops_hold(int hold) {
    if (hold) pthread_mutex_lock(&ops_mutex);
    else pthread_mutex_unlock(&ops_mutex);
}

/* dot(q, k) over n with k in f16, and acc += w * v over n with v in f16 */
typedef float (*dot_f16_fn)(const float *q, const uint16_t *k, int64_t n);
typedef void (*axpy_f16_fn)(float *acc, float w, const uint16_t *v, int64_t n);
typedef void (*scale_fn)(float *acc, float s, int64_t n);

static float dot_f16_scalar(const float *q, const uint16_t *k, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += q[i] * gr_half_to_float(k[i]);
    return s;
}
static void axpy_f16_scalar(float *acc, float w, const uint16_t *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += w * gr_half_to_float(v[i]);
}
static void scale_scalar(float *acc, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] *= s;
}

#ifdef GR_X86
__attribute__((target("avx2,fma,f16c")))
static float dot_f16_avx2(const float *q, const uint16_t *k, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 8))), a1);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), a0);
    a0 = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float r = _mm_cvtss_f32(s);
    for (; i < n; i++) r += q[i] * _cvtsh_ss(k[i]);
    return r;
}
__attribute__((target("avx2,fma,f16c")))
static void axpy_f16_avx2(float *acc, float w, const uint16_t *v, int64_t n) {
    __m256 vw = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(vw, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i))),
                                                  _mm256_loadu_ps(acc + i)));
    for (; i < n; i++) acc[i] += w * _cvtsh_ss(v[i]);
}
__attribute__((target("avx2,fma")))
static void scale_avx2(float *acc, float s, int64_t n) {
    __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), vs));
    for (; i < n; i++) acc[i] *= s;
}
#endif

static dot_f16_fn dot_f16 = dot_f16_scalar;
static axpy_f16_fn axpy_f16 = axpy_f16_scalar;
static int attn_tiled;  /* gr_attention runs the AVX2 tiled kernel (attention_tiled) */
static scale_fn scale_f32 = scale_scalar;
static pthread_once_t ops_once = PTHREAD_ONCE_INIT;

/* float32 -> float16 rows for the KV cache, rounding to nearest even (as numpy's astype and F16C do) */
typedef void (*to_half_fn)(const float *x, uint16_t *h, int64_t n);
static void to_half_scalar(const float *x, uint16_t *h, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = gr_float_to_half(x[i]);
}
#ifdef GR_X86
__attribute__((target("avx2,fma,f16c")))
static void to_half_avx2(const float *x, uint16_t *h, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    to_half_scalar(x + i, h + i, n - i);
}
#endif
static to_half_fn to_half = to_half_scalar;

/* out = act(gate) * up (clamped): gated activations, defined with the other ops below */
typedef void (*glu_fn)(const float *gate, const float *up, float *out, int64_t n, int act, float clamp);
static void glu_scalar(const float *gate, const float *up, float *out, int64_t n, int act, float clamp);
#ifdef GR_X86
__attribute__((target("avx2,fma")))
static void glu_avx2(const float *gate, const float *up, float *out, int64_t n, int act, float clamp);
#endif
static glu_fn glu_rows = glu_scalar;

/* The AVX2/F16C inner loops if `on` and the CPU has them, else the portable ones; returns which. */
static int select_simd(int on) {
#ifdef GR_X86
    if (on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        dot_f16 = dot_f16_avx2; axpy_f16 = axpy_f16_avx2; scale_f32 = scale_avx2; to_half = to_half_avx2;
        glu_rows = glu_avx2;
        attn_tiled = 1;
        return 1;
    }
#endif
    (void)on;
    dot_f16 = dot_f16_scalar; axpy_f16 = axpy_f16_scalar; scale_f32 = scale_scalar; to_half = to_half_scalar;
    glu_rows = glu_scalar;
    attn_tiled = 0;
    return 0;
}

static void ops_init(void) {
#ifdef GR_X86
    __builtin_cpu_init();
#endif
    select_simd(gr_isa_get() != GR_ISA_SCALAR);
}

int gr_ops_simd(int on) {
    pthread_once(&ops_once, ops_init);
    pthread_mutex_lock(&ops_mutex);
    const int simd = select_simd(on);
    pthread_mutex_unlock(&ops_mutex);
    return simd;
}

/* ---------------------------------------------------------------- RMS norm */

int gr_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps) {
    if (n_rows <= 0 || dim <= 0) return GR_E_SHAPE;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        double sum = 0.0;  /* like ggml: squares summed in double */
        for (int64_t i = 0; i < dim; i++) sum += (double)(xr[i] * xr[i]);
        const float scale = 1.0f / sqrtf((float)(sum / (double)dim) + eps);
        if (w) for (int64_t i = 0; i < dim; i++) yr[i] = (xr[i] * scale) * w[i];
        else for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * scale;
    }
    return GR_OK;
}

/* ---------------------------------------------------------------- rotary embedding */

int gr_rope(float *x, const int32_t *pos, int64_t n_tok, int64_t n_head, int64_t head_dim, int n_rot,
            int mode, float base, float freq_scale, const float *freq_factors) {
    if (n_tok <= 0 || n_head <= 0 || n_rot <= 0 || n_rot > head_dim || n_rot % 2) return GR_E_SHAPE;
    const int half = n_rot / 2;
    const float theta_scale = powf(base, -2.0f / (float)n_rot);
    float cs[2 * 512];
    float *cache = n_rot <= 1024 ? cs : malloc(sizeof(float) * (size_t)n_rot);
    if (!cache) return GR_E_NOMEM;
    for (int64_t t = 0; t < n_tok; t++) {
        /* angles as ggml builds them: theta_i = p * theta_scale^i by repeated float multiplication */
        float theta = (float)pos[t];
        for (int i = 0; i < half; i++) {
            const float ff = freq_factors ? freq_factors[i] : 1.0f;
            const float th = freq_scale * (theta / ff);
            cache[2 * i] = cosf(th);
            cache[2 * i + 1] = sinf(th);
            theta *= theta_scale;
        }
        for (int64_t h = 0; h < n_head; h++) {
            float *v = x + (t * n_head + h) * head_dim;
            for (int i = 0; i < half; i++) {
                const float c = cache[2 * i], s = cache[2 * i + 1];
                const int a = mode == GR_ROPE_NEOX ? i : 2 * i;
                const int b = mode == GR_ROPE_NEOX ? i + half : 2 * i + 1;
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
    if (cache != cs) free(cache);
    return GR_OK;
}

/* Per-head RMS norms (optional) then rotary embedding of q and k, in place, then (slots != NULL) the
 * keys and values stored in the KV cache: the separate calls' arithmetic in one crossing of the
 * Python/C boundary, which a decode step makes once per layer for all of it. */
int gr_qk_norm_rope(float *q, float *k, const int32_t *pos, int64_t n_tok, int64_t n_head, int64_t n_head_kv,
                    int64_t head_dim, const float *q_norm, const float *k_norm, float eps, int n_rot, int mode,
                    float base, float freq_scale, const float *freq_factors, const float *v, int64_t head_dim_v,
                    const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache, int32_t *pos_cache) {
    if (n_tok <= 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0) return GR_E_SHAPE;
    if (slots && (!v || head_dim_v <= 0 || !k_cache || !v_cache || !pos_cache)) return GR_E_ARG;
    pthread_once(&ops_once, ops_init);
    int rc;
    if (q_norm && (rc = gr_rms_norm(q, q_norm, q, n_tok * n_head, head_dim, eps)) != GR_OK) return rc;
    if (k_norm && (rc = gr_rms_norm(k, k_norm, k, n_tok * n_head_kv, head_dim, eps)) != GR_OK) return rc;
    if ((rc = gr_rope(q, pos, n_tok, n_head, head_dim, n_rot, mode, base, freq_scale, freq_factors)) != GR_OK) return rc;
    if ((rc = gr_rope(k, pos, n_tok, n_head_kv, head_dim, n_rot, mode, base, freq_scale, freq_factors)) != GR_OK)
        return rc;
    if (slots) {
        const int64_t kr = n_head_kv * head_dim, vr = n_head_kv * head_dim_v;
        for (int64_t t = 0; t < n_tok; t++) {
            const int64_t s = slots[t];
            to_half(k + t * kr, k_cache + s * kr, kr);
            to_half(v + t * vr, v_cache + s * vr, vr);
            pos_cache[s] = pos[t];
        }
    }
    return GR_OK;
}

/* ---------------------------------------------------------------- gated activations */

static inline float silu_f(float x) { return x / (1.0f + expf(-x)); }
static inline float gelu_f(float x) {
    const float c = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(c * x * (1.0f + 0.044715f * x * x)));
}

/* clamp > 0: Step-3.5's clamped SwiGLU as llama.cpp builds it: the activated gate is capped from
 * above at clamp (after the activation), up is clipped to [-clamp, clamp]. */
static void glu_scalar(const float *gate, const float *up, float *out, int64_t n, int act, float clamp) {
    for (int64_t i = 0; i < n; i++) {
        float a = act == GR_ACT_GELU ? gelu_f(gate[i]) : silu_f(gate[i]), u = up[i];
        if (clamp > 0.0f) {
            a = a > clamp ? clamp : a;
            u = u > clamp ? clamp : (u < -clamp ? -clamp : u);
        }
        out[i] = a * u;
    }
}

#ifdef GR_X86
/* e^x = 2^n e^r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (error < 1e-8 relative, within a
 * few ulps of expf); x below -87.3 (attention's masked scores are -inf) gives exactly 0, x above 88 is
 * taken as 88 (the activations divide by 1 + e^x: any x that large gives 0 either way). */
__attribute__((target("avx2,fma")))
static inline __m256 exp_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* SiLU x / (1 + e^-x); GELU's 0.5 x (1 + tanh(y)) written as x / (1 + e^(-2y)), the same function with
 * one exponential and no tanh. */
__attribute__((target("avx2,fma")))
static inline __m256 glu8_avx2(__m256 g, __m256 u, int act, float clamp) {
    __m256 z;
    if (act == GR_ACT_GELU) {
        const __m256 g2 = _mm256_mul_ps(g, g);
        z = _mm256_mul_ps(g, _mm256_fmadd_ps(g2, _mm256_set1_ps(-2.0f * 0.7978845608028654f * 0.044715f),
                                             _mm256_set1_ps(-2.0f * 0.7978845608028654f)));
    } else {
        z = _mm256_sub_ps(_mm256_setzero_ps(), g);
    }
    __m256 a = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(z)));
    if (clamp > 0.0f) {
        const __m256 c = _mm256_set1_ps(clamp);
        a = _mm256_min_ps(a, c);
        u = _mm256_max_ps(_mm256_min_ps(u, c), _mm256_sub_ps(_mm256_setzero_ps(), c));
    }
    return _mm256_mul_ps(a, u);
}

__attribute__((target("avx2,fma")))
static void glu_avx2(const float *gate, const float *up, float *out, int64_t n, int act, float clamp) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, glu8_avx2(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i), act, clamp));
    if (i < n) {  /* the tail through a padded vector, so every element gets the same formula */
        float g[8] = {0}, u[8] = {0}, o[8];
        memcpy(g, gate + i, sizeof(float) * (size_t)(n - i));
        memcpy(u, up + i, sizeof(float) * (size_t)(n - i));
        _mm256_storeu_ps(o, glu8_avx2(_mm256_loadu_ps(g), _mm256_loadu_ps(u), act, clamp));
        memcpy(out + i, o, sizeof(float) * (size_t)(n - i));
    }
}
#endif

/* A prefill's activations (n_tok * n_ff: 786k for SmolLM2's 512 tokens) are split over the pool; a
 * decode step's few thousand stay on the calling thread. */
#define GLU_CHUNK 8192
typedef struct { const float *gate, *up; float *out; int64_t n; int act; float clamp; atomic_llong next; } glu_task;
static void glu_run(void *p, int ith, int nth) {
    glu_task *t = p;
    (void)ith; (void)nth;
    for (int64_t c; (c = atomic_fetch_add(&t->next, 1) * GLU_CHUNK) < t->n;)
        glu_rows(t->gate + c, t->up + c, t->out + c, t->n - c < GLU_CHUNK ? t->n - c : GLU_CHUNK, t->act, t->clamp);
}

int gr_glu(const float *gate, const float *up, float *out, int64_t n, int act, float clamp) {
    if (n <= 0) return GR_E_SHAPE;
    pthread_once(&ops_once, ops_init);
    if (n < 4 * GLU_CHUNK || gr_pool_threads() < 2) {
        glu_rows(gate, up, out, n, act, clamp);
        return GR_OK;
    }
    glu_task t = {gate, up, out, n, act, clamp, 0};
    atomic_init(&t.next, 0);
    gr_pool_run_dynamic(glu_run, &t, gr_pool_threads());
    return GR_OK;
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    const float *q;
    const uint16_t *k, *v;
    const int32_t *q_pos, *k_pos;
    float *out;
    int64_t n_q, n_head, n_head_kv, n_kv, dk, dv;
    int64_t k_stride, v_stride;   /* elements between consecutive cache slots */
    float scale, softcap;
    int window;
    const float *gate;            /* NULL, or (n_q, n_head): each head's output times sigmoid(gate) */
    float *scratch;               /* per thread: dv accumulators + n_kv scores */
    atomic_llong next_item;       /* (query, head) items are claimed, so any subset of threads finishes */
} attn_task;

/* One (query, head) at a time with a running max so the probabilities never need a second pass over
 * the keys; masked keys are skipped, not added as -inf. */
static void run_attention(void *p, int ith, int nth) {
    attn_task *a = p;
    (void)nth;
    const int64_t group = a->n_head / a->n_head_kv;
    float *acc = a->scratch + (size_t)ith * (size_t)(a->dv + a->n_kv);
    float *scores = acc + a->dv;
    for (int64_t item; (item = atomic_fetch_add(&a->next_item, 1)) < a->n_q * a->n_head;) {
        const int64_t i = item / a->n_head, h = item % a->n_head, hk = h / group;
        const float *q = a->q + (i * a->n_head + h) * a->dk;
        const int32_t qp = a->q_pos[i];
        float m = -INFINITY;
        int64_t n_vis = 0;
        for (int64_t j = 0; j < a->n_kv; j++) {
            const int32_t d = qp - a->k_pos[j];
            if (d < 0 || (a->window && d >= a->window)) { scores[j] = NAN; continue; }
            float s = dot_f16(q, a->k + j * a->k_stride + hk * a->dk, a->dk) * a->scale;
            if (a->softcap > 0.0f) s = a->softcap * tanhf(s / a->softcap);
            scores[j] = s;
            if (s > m) m = s;
            n_vis++;
        }
        float *o = a->out + (i * a->n_head + h) * a->dv;
        memset(acc, 0, sizeof(float) * (size_t)a->dv);
        if (n_vis == 0) { memset(o, 0, sizeof(float) * (size_t)a->dv); continue; }
        float sum = 0.0f;
        for (int64_t j = 0; j < a->n_kv; j++) {
            if (isnan(scores[j])) continue;
            const float e = expf(scores[j] - m);
            sum += e;
            axpy_f16(acc, e, a->v + j * a->v_stride + hk * a->dv, a->dv);
        }
        const float inv = 1.0f / sum;
        for (int64_t c = 0; c < a->dv; c++) o[c] = acc[c] * inv;
        if (a->gate) {
            const float g = 1.0f / (1.0f + expf(-a->gate[i * a->n_head + h]));
            for (int64_t c = 0; c < a->dv; c++) o[c] *= g;
        }
    }
}

#ifdef GR_X86
/* ---- the AVX2 tiled kernel: an item is a block of qb queries times nr heads of one KV group. Each block
 * of 8 keys (then values) is converted from f16 once and used by all qb * nr rows; a row's 8 scores are
 * one register-blocked micro-kernel (8 accumulators, transposed sums); exp is a vector polynomial. Keys
 * are visited only in the range some query of the block can see when the slots hold ascending positions
 * (global layers, a ring that has not wrapped), so causal prefill does half the products. */

typedef struct {
    attn_task t;
    int64_t qb, nr;               /* queries and heads per item */
    int64_t per_thread;           /* scratch floats per thread */
    int sorted;                   /* k_pos ascending: key ranges by binary search */
} tiled_task;

__attribute__((target("avx2,fma")))
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma")))
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* 8 f16 rows (n of them real, the rest zero) of d elements each, at src + t * stride, to dst[t * d] */
__attribute__((target("avx2,fma,f16c")))
static void rows8_to_f32(float *dst, const uint16_t *src, int64_t stride, int n, int64_t d) {
    for (int t = 0; t < 8; t++)
        for (int64_t c = 0; c < d; c += 8)
            _mm256_storeu_ps(dst + t * d + c, t < n ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + t * stride + c)))
                                                  : _mm256_setzero_ps());
}

/* the 8 dot products of q with rows kf[t * d], in key order in one register */
__attribute__((target("avx2,fma")))
static inline __m256 dot8(const float *q, const float *kf, int64_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < d; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + c);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 0 * d + c), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 1 * d + c), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 2 * d + c), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 3 * d + c), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 4 * d + c), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 5 * d + c), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 6 * d + c), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kf + 7 * d + c), a7);
    }
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

static int64_t first_at_least(const int32_t *a, int64_t n, int64_t v) {
    int64_t lo = 0, hi = n;
    while (lo < hi) { const int64_t mid = (lo + hi) / 2; if (a[mid] < v) lo = mid + 1; else hi = mid; }
    return lo;
}

__attribute__((target("avx2,fma,f16c")))
static void run_attention_tiled(void *p, int ith, int nth) {
    tiled_task *tt = p;
    attn_task *a = &tt->t;
    (void)nth;
    const int64_t group = a->n_head / a->n_head_kv, nr = tt->nr, qb = tt->qb, dk = a->dk, dv = a->dv;
    const int64_t per_group = group / nr, n_qblk = (a->n_q + qb - 1) / qb;
    const int64_t n_items = n_qblk * a->n_head_kv * per_group;
    float *kv = a->scratch + (size_t)ith * (size_t)tt->per_thread;   /* 8 keys or values as f32 */
    float *o = kv + 8 * (dk > dv ? dk : dv);                          /* rows x dv */
    float *sc = o + qb * nr * dv;                                     /* rows x (keys of the range) */
    float inv[qb * nr];
    __m256 mx[qb * nr];
    for (int64_t item; (item = atomic_fetch_add(&a->next_item, 1)) < n_items;) {
        const int64_t ib = item / (a->n_head_kv * per_group), rest = item % (a->n_head_kv * per_group);
        const int64_t hk = rest / per_group, h0 = hk * group + (rest % per_group) * nr;
        const int64_t i0 = ib * qb, nq = a->n_q - i0 < qb ? a->n_q - i0 : qb, rows = nq * nr;
        int32_t pmin = a->q_pos[i0], pmax = pmin;
        for (int64_t i = 1; i < nq; i++) {
            if (a->q_pos[i0 + i] < pmin) pmin = a->q_pos[i0 + i];
            if (a->q_pos[i0 + i] > pmax) pmax = a->q_pos[i0 + i];
        }
        int64_t j0 = 0, j1 = a->n_kv;
        if (tt->sorted) {
            j1 = first_at_least(a->k_pos, a->n_kv, (int64_t)pmax + 1);
            if (a->window) j0 = first_at_least(a->k_pos, j1, (int64_t)pmin - a->window + 1);
            /* blocks start at multiples of 8 whatever the batch, so key j always sums in lane j % 8: a
             * query's bits do not depend on the queries it shares an item with */
            j0 &= ~(int64_t)7;
        }
        const int64_t len = (j1 - j0 + 7) & ~(int64_t)7;
        for (int64_t r = 0; r < rows; r++) mx[r] = _mm256_set1_ps(-INFINITY);
        /* scores, masked to -inf */
        for (int64_t jb = j0; jb < j1; jb += 8) {
            const int n = j1 - jb < 8 ? (int)(j1 - jb) : 8;
            int32_t kp[8];
            for (int t = 0; t < 8; t++) kp[t] = t < n ? a->k_pos[jb + t] : INT32_MAX;
            const __m256i kpv = _mm256_loadu_si256((const __m256i *)kp);
            __m256i vis[qb];
            int any = 0;
            for (int64_t i = 0; i < nq; i++) {
                const __m256i d = _mm256_sub_epi32(_mm256_set1_epi32(a->q_pos[i0 + i]), kpv);
                vis[i] = _mm256_cmpgt_epi32(d, _mm256_set1_epi32(-1));
                if (a->window) vis[i] = _mm256_and_si256(vis[i], _mm256_cmpgt_epi32(_mm256_set1_epi32(a->window), d));
                any |= !_mm256_testz_si256(vis[i], vis[i]);
            }
            if (!any) {   /* empty ring slots, keys outside every query's window: nothing to compute */
                for (int64_t r = 0; r < rows; r++) _mm256_storeu_ps(sc + r * len + (jb - j0), _mm256_set1_ps(-INFINITY));
                continue;
            }
            rows8_to_f32(kv, a->k + jb * a->k_stride + hk * dk, a->k_stride, n, dk);
            for (int64_t i = 0; i < nq; i++) {
                for (int64_t r = 0; r < nr; r++) {
                    const int64_t row = i * nr + r;
                    __m256 s = _mm256_mul_ps(dot8(a->q + ((i0 + i) * a->n_head + h0 + r) * dk, kv, dk),
                                             _mm256_set1_ps(a->scale));
                    if (a->softcap > 0.0f) {
                        float f[8];
                        _mm256_storeu_ps(f, s);
                        for (int t = 0; t < 8; t++) f[t] = a->softcap * tanhf(f[t] / a->softcap);
                        s = _mm256_loadu_ps(f);
                    }
                    s = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, _mm256_castsi256_ps(vis[i]));
                    _mm256_storeu_ps(sc + row * len + (jb - j0), s);
                    mx[row] = _mm256_max_ps(mx[row], s);
                }
            }
        }
        /* probabilities (unnormalised) and their sums; a row that sees no key gets zeros */
        for (int64_t r = 0; r < rows; r++) {
            const float m = hmax8(mx[r]);
            float *sr = sc + r * len;
            if (m == -INFINITY) {
                memset(sr, 0, sizeof(float) * (size_t)len);
                inv[r] = 0.0f;
                continue;
            }
            __m256 sum = _mm256_setzero_ps();
            const __m256 mv = _mm256_set1_ps(m);
            for (int64_t j = 0; j < len; j += 8) {
                const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
                _mm256_storeu_ps(sr + j, e);
                sum = _mm256_add_ps(sum, e);
            }
            inv[r] = 1.0f / hsum8(sum);
        }
        /* weighted values */
        memset(o, 0, sizeof(float) * (size_t)(rows * dv));
        for (int64_t jb = j0; jb < j1; jb += 8) {
            const int n = j1 - jb < 8 ? (int)(j1 - jb) : 8;
            uint32_t live = 0;   /* rows (at most 32) for which some key of the block has a nonzero probability, as bits */
            for (int64_t r = 0; r < rows; r++)
                if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(sc + r * len + (jb - j0)), _mm256_setzero_ps(),
                                                     _CMP_NEQ_OQ)))
                    live |= 1u << r;
            if (!live) continue;   /* every key of the block masked (or underflowed) for every row */
            rows8_to_f32(kv, a->v + jb * a->v_stride + hk * dv, a->v_stride, n, dv);
            for (int64_t r = 0; r < rows; r++) {
                const float *e = sc + r * len + (jb - j0);
                if (!(live >> r & 1u)) continue;
                float *orow = o + r * dv;
                for (int64_t c = 0; c < dv; c += 8) {
                    __m256 acc = _mm256_loadu_ps(orow + c);
                    for (int t = 0; t < 8; t++)
                        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(e + t), _mm256_loadu_ps(kv + t * dv + c), acc);
                    _mm256_storeu_ps(orow + c, acc);
                }
            }
        }
        for (int64_t i = 0; i < nq; i++)
            for (int64_t r = 0; r < nr; r++) {
                const int64_t row = i * nr + r;
                float *out = a->out + ((i0 + i) * a->n_head + h0 + r) * dv;
                const __m256 s = _mm256_set1_ps(inv[row]);
                for (int64_t c = 0; c < dv; c += 8)
                    _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(o + row * dv + c), s));
                if (a->gate) {
                    const __m256 g = _mm256_set1_ps(1.0f / (1.0f + expf(-a->gate[(i0 + i) * a->n_head + h0 + r])));
                    for (int64_t c = 0; c < dv; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_loadu_ps(out + c), g));
                }
            }
    }
}

static int attention_tiled(attn_task *a, int nth) {
    const int64_t group = a->n_head / a->n_head_kv;
    /* heads per item: the whole group (at most 16), fewer when that leaves a thread idle */
    int64_t nr = 1;
    for (int64_t d = group < 16 ? group : 16; d >= 1; d--)
        if (group % d == 0) { nr = d; break; }
    while (nr > 1 && a->n_q * a->n_head_kv * (group / nr) < nth) {
        int64_t d = nr - 1;
        while (group % d) d--;
        nr = d;
    }
    /* queries per item: share each converted key among more rows while every thread keeps ~4 items */
    int64_t qb = 1;
    while (qb * 2 * nr <= 32 && (a->n_q + 2 * qb - 1) / (2 * qb) * a->n_head_kv * (group / nr) >= 4 * nth) qb *= 2;
    /* non-decreasing: a ring that has not wrapped ends in empty slots, all at the same future position */
    int sorted = 1;
    for (int64_t j = 1; j < a->n_kv && sorted; j++) sorted = a->k_pos[j] >= a->k_pos[j - 1];
    const int64_t per_thread = 8 * (a->dk > a->dv ? a->dk : a->dv) + qb * nr * (a->dv + a->n_kv + 8);
    float *scratch = aligned_alloc(64, ((size_t)per_thread * (size_t)nth * sizeof(float) + 63) & ~(size_t)63);
    if (!scratch) return GR_E_NOMEM;
    tiled_task t = {*a, qb, nr, per_thread, sorted};
    t.t.scratch = scratch;
    atomic_init(&t.t.next_item, 0);
    gr_pool_run_dynamic(run_attention_tiled, &t, nth);
    free(scratch);
    return GR_OK;
}
#endif

int gr_attention(const float *q, const uint16_t *k, const uint16_t *v, const int32_t *q_pos,
                 const int32_t *k_pos, float *out, int64_t n_q, int64_t n_head, int64_t n_head_kv,
                 int64_t n_kv, int64_t dk, int64_t dv, float scale, int window, float softcap, const float *gate) {
    pthread_once(&ops_once, ops_init);
    if (n_q <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv || n_kv <= 0 || dk <= 0 || dv <= 0)
        return GR_E_SHAPE;
    gr_lock_unless_split(&ops_mutex);
    /* below a few hundred thousand multiply-adds a pool wake-up costs more than it saves */
    const double work = (double)n_q * (double)n_head * (double)n_kv * (double)(dk + dv);
    const int nth = work >= 2e5 ? gr_pool_threads() : 1;
    attn_task a = {q, k, v, q_pos, k_pos, out, n_q, n_head, n_head_kv, n_kv, dk, dv,
                   n_head_kv * dk, n_head_kv * dv, scale, softcap, window, gate, NULL, 0};
    atomic_init(&a.next_item, 0);
    int rc = GR_OK;
#ifdef GR_X86
    if (attn_tiled && dk % 8 == 0 && dv % 8 == 0)
        rc = attention_tiled(&a, nth);
    else
#endif
    if (!(a.scratch = malloc(sizeof(float) * (size_t)(dv + n_kv) * (size_t)nth))) {
        rc = GR_E_NOMEM;
    } else {
        /* claimed work: a worker descheduled by another process is skipped, not waited for */
        gr_pool_run_dynamic(run_attention, &a, nth);
        free(a.scratch);
    }
    gr_unlock_unless_split(&ops_mutex);
    return rc;
}
