/* Public entry points: argument checks, run-time ISA selection, activation quantization and the
 * threaded matmul driver. Kernels live in kernels_*.c; this file never touches SIMD itself.
 *
 * Every entry point takes one global mutex, so the library is safe to call from several Python
 * threads (calls run one after another; cffi releases the GIL while they run). A token-split call
 * (below) holds it for all its pieces, whose threads then call entry points without it. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "blocks.h"
#include "threadpool.h"
#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

static pthread_mutex_t api_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static gr_kernels tables[4];
static int isa_mask;
static int isa_current;
static int act_precision = 1;  /* gr_set_act_precision (llama.cpp's numerics by default); guarded by api_mutex */

/* A token-split task's threads (gr_pool_run_split) run entry points side by side under the one lock
 * their caller holds for the whole task (gr_split_rows): each thread has its own scratch, and nothing
 * else they touch is written while the lock is held. */
static void api_lock(void) { gr_lock_unless_split(&api_mutex); }
static void api_unlock(void) { gr_unlock_unless_split(&api_mutex); }

static void detect_isas(void) {
    gr_kernels_init_scalar(&tables[GR_ISA_SCALAR]);
    isa_mask = 1 << GR_ISA_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* __builtin_cpu_supports also checks that the OS saves the wide register state (XCR0). */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        gr_kernels_init_avx2(&tables[GR_ISA_AVX2]);
        isa_mask |= 1 << GR_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vnni")) {
            gr_kernels_init_avx512(&tables[GR_ISA_AVX512]);
            isa_mask |= 1 << GR_ISA_AVX512;
        }
    }
#elif defined(__aarch64__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) gr_kernels_init_neon_dotprod(&tables[GR_ISA_NEON]);
    else gr_kernels_init_neon(&tables[GR_ISA_NEON]);
    isa_mask |= 1 << GR_ISA_NEON;
#endif
    isa_current = GR_ISA_SCALAR;
    for (int i = 3; i >= 0; i--)
        if (isa_mask & (1 << i)) { isa_current = i; break; }
    /* GGUFRUN_ISA=scalar|avx2|avx512|neon pins a path for debugging, if it is available. */
    const char *pin = getenv("GGUFRUN_ISA");
    static const char *names[4] = {"scalar", "avx2", "avx512", "neon"};
    for (int i = 0; pin && i < 4; i++)
        if (strcmp(pin, names[i]) == 0 && (isa_mask & (1 << i))) isa_current = i;
}

static void ensure_init(void) { pthread_once(&init_once, detect_isas); }

int gr_isa_available(void) { ensure_init(); return isa_mask; }
int gr_isa_get(void) { ensure_init(); return isa_current; }

int gr_isa_set(int isa) {
    ensure_init();
    if (isa < 0 || isa > 3 || !(isa_mask & (1 << isa))) return GR_E_ISA;
    api_lock();
    isa_current = isa;
    api_unlock();
    return GR_OK;
}

int gr_set_act_precision(int p) {
    if (p != 1 && p != 2) return GR_E_ARG;
    api_lock();
    act_precision = p;
    api_unlock();
    return GR_OK;
}

int gr_get_act_precision(void) {
    api_lock();
    int p = act_precision;
    api_unlock();
    return p;
}

int gr_threads_set(int n) {
    api_lock();
    int r = gr_pool_set(n);
    api_unlock();
    return r;
}

int gr_threads_get(void) {
    api_lock();
    int r = gr_pool_threads();
    api_unlock();
    return r;
}

/* ---------------------------------------------------------------- geometry */

int gr_block_size(int qtype) {
    switch (qtype) {
    case GR_T_F32: case GR_T_F16: case GR_T_BF16: return 1;
    case GR_T_Q4_0: case GR_T_Q4_1: case GR_T_Q5_0: case GR_T_Q5_1: case GR_T_Q8_0: case GR_T_Q8_1:
    case GR_T_IQ4_NL: case GR_T_MXFP4: return 32;
    case GR_T_Q2_K: case GR_T_Q3_K: case GR_T_Q4_K: case GR_T_Q5_K: case GR_T_Q6_K: case GR_T_Q8_K:
    case GR_T_IQ4_XS: return 256;
    default: return 0;
    }
}

int gr_type_size(int qtype) {
    switch (qtype) {
    case GR_T_F32: return 4;
    case GR_T_F16: case GR_T_BF16: return 2;
    case GR_T_Q4_0: return sizeof(block_q4_0);
    case GR_T_Q4_1: return sizeof(block_q4_1);
    case GR_T_Q5_0: return sizeof(block_q5_0);
    case GR_T_Q5_1: return sizeof(block_q5_1);
    case GR_T_Q8_0: return sizeof(block_q8_0);
    case GR_T_Q8_1: return sizeof(block_q8_1);
    case GR_T_Q2_K: return sizeof(block_q2_K);
    case GR_T_Q3_K: return sizeof(block_q3_K);
    case GR_T_Q4_K: return sizeof(block_q4_K);
    case GR_T_Q5_K: return sizeof(block_q5_K);
    case GR_T_Q6_K: return sizeof(block_q6_K);
    case GR_T_Q8_K: return sizeof(block_q8_K);
    case GR_T_IQ4_NL: return sizeof(block_iq4_nl);
    case GR_T_IQ4_XS: return sizeof(block_iq4_xs);
    case GR_T_MXFP4: return sizeof(block_mxfp4);
    default: return 0;
    }
}

/* ggml's vec_dot_type pairing: the format activations are converted to for each weight type. */
int gr_act_type(int qtype) {
    switch (qtype) {
    case GR_T_F32: return GR_T_F32;
    case GR_T_F16: return GR_T_F16;
    case GR_T_BF16: return GR_T_BF16;
    case GR_T_Q4_0: case GR_T_Q5_0: case GR_T_Q8_0: case GR_T_IQ4_NL: case GR_T_MXFP4: return GR_T_Q8_0;
    case GR_T_Q4_1: case GR_T_Q5_1: return GR_T_Q8_1;
    case GR_T_Q2_K: case GR_T_Q3_K: case GR_T_Q4_K: case GR_T_Q5_K: case GR_T_Q6_K: case GR_T_IQ4_XS:
        return GR_T_Q8_K;
    default: return -1;
    }
}

int gr_vec_dot_type(int qtype) {
    int t = gr_act_type(qtype);
    return t < 0 ? GR_E_QTYPE : t;
}

static int64_t row_bytes(int qtype, int64_t n) { return n / gr_block_size(qtype) * gr_type_size(qtype); }

/* ---------------------------------------------------------------- dequantize */

int gr_dequantize(int qtype, const void *src, float *dst, int64_t n) {
    ensure_init();
    if (qtype < 0 || qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].dequantize[qtype]) return GR_E_QTYPE;
    int bs = gr_block_size(qtype);
    if (n <= 0 || n % bs) return GR_E_SHAPE;
    api_lock();
    tables[isa_current].dequantize[qtype](src, dst, n / bs);
    api_unlock();
    return GR_OK;
}

int gr_get_rows(int qtype, const void *table, int64_t n_rows, int64_t n_cols, const int32_t *ids, int64_t n,
                float *dst) {
    ensure_init();
    if (qtype < 0 || qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].dequantize[qtype]) return GR_E_QTYPE;
    const int bs = gr_block_size(qtype);
    if (!table || !ids || !dst || n <= 0 || n_rows <= 0) return GR_E_ARG;
    if (n_cols <= 0 || n_cols % bs) return GR_E_SHAPE;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= n_rows) return GR_E_ARG;
    const int64_t rb = row_bytes(qtype, n_cols);
    api_lock();
    for (int64_t i = 0; i < n; i++)
        tables[isa_current].dequantize[qtype]((const uint8_t *)table + ids[i] * rb, dst + i * n_cols, n_cols / bs);
    api_unlock();
    return GR_OK;
}

/* ---------------------------------------------------------------- activations */

int gr_quantize_activations(int act_qtype, const float *x, void *dst, int64_t n) {
    ensure_init();
    if (act_qtype < 0 || act_qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].quantize_act[act_qtype]) return GR_E_QTYPE;
    if (n <= 0 || n % gr_block_size(act_qtype)) return GR_E_SHAPE;
    api_lock();
    tables[isa_current].quantize_act[act_qtype](x, dst, n);
    api_unlock();
    return GR_OK;
}

static void quantize_terms(const gr_kernels *k, int act_type, const float *x, uint8_t *q1, uint8_t *q2, int64_t n,
                           float *d, float *s, int64_t ld);

int gr_quantize_activation_terms(int act_qtype, const float *x, void *dst, int64_t n) {
    ensure_init();
    if (act_qtype < 0 || act_qtype >= GR_T_SLOTS || act_qtype == GR_T_F32 || !tables[GR_ISA_SCALAR].quantize_act[act_qtype])
        return GR_E_QTYPE;
    if (n <= 0 || n % gr_block_size(act_qtype)) return GR_E_SHAPE;
    api_lock();
    uint8_t *q1 = dst;
    quantize_terms(&tables[isa_current], act_qtype, x, q1, q1 + row_bytes(act_qtype, n), n, NULL, NULL, 0);
    api_unlock();
    return GR_OK;
}

/* Scratch, grown on demand and kept between calls: quantized activations (scratch_reserve) and the
 * fused calls' intermediate floats (fscratch_reserve: normed input, gate/up/down outputs), apart so
 * matmul_locked may grow the first while the second is live. Per thread: a token-split task's threads
 * run their own calls side by side (gr_pool_run_split); freed when the thread ends. */
typedef struct { void *p; size_t size; } scratch_buf;
typedef struct { scratch_buf act, f; } thread_scratch;
static _Thread_local thread_scratch *my_scratch;
static pthread_key_t scratch_key;
static pthread_once_t scratch_key_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
    thread_scratch *t = p;
    free(t->act.p);
    free(t->f.p);
    free(t);
}

static void scratch_key_create(void) { pthread_key_create(&scratch_key, scratch_free); }

static thread_scratch *thread_scratch_get(void) {
    if (!my_scratch) {
        pthread_once(&scratch_key_once, scratch_key_create);
        thread_scratch *t = calloc(1, sizeof *t);
        if (!t) return NULL;
        pthread_setspecific(scratch_key, t);
        my_scratch = t;
    }
    return my_scratch;
}

/* b grown to at least n bytes, its contents dropped; NULL when out of memory. */
static void *scratch_grow(scratch_buf *b, size_t n) {
    if (n <= b->size) return b->p;
    size_t want = (n + 4095) & ~(size_t)4095;
    void *p = aligned_alloc(64, want);
    if (!p) return NULL;
    free(b->p);
    b->p = p;
    b->size = want;
    return p;
}

static uint8_t *scratch_reserve(size_t n) {
    thread_scratch *t = thread_scratch_get();
    return t ? scratch_grow(&t->act, n) : NULL;
}

static float *fscratch_reserve(size_t n_floats) {
    thread_scratch *t = thread_scratch_get();
    return t ? scratch_grow(&t->f, n_floats * sizeof(float)) : NULL;
}

#define QUANT_CHUNK 4096  /* elements per quantization work unit; a multiple of every block size */

/* The activation terms of n floats at x (see gr_quantize_terms_fn), from the table's fused function or
 * composed from the single-term quantizer and the shared residual helpers. */
static void quantize_terms(const gr_kernels *k, int act_type, const float *x, uint8_t *q1, uint8_t *q2, int64_t n,
                           float *d, float *s, int64_t ld) {
    if (k->quantize_terms[act_type]) { k->quantize_terms[act_type](x, q1, q2, n, d, s, ld); return; }
    k->quantize_act[act_type](x, q1, n);
    if (q2) {
        float r[QUANT_CHUNK];
        for (int64_t c = 0; c < n; c += QUANT_CHUNK) {  /* callers pass chunks; this keeps r bounded */
            int64_t len = n - c < QUANT_CHUNK ? n - c : QUANT_CHUNK;
            int64_t off = c / gr_block_size(act_type) * gr_type_size(act_type);
            gr_act_residual(act_type, x + c, q1 + off, r, len);
            k->quantize_act[act_type](r, q2 + off, len);
            if (act_type == GR_T_Q8_1) gr_q8_1_residual_sums(q1 + off, q2 + off, len);
        }
    }
    if (d) {
        gr_act_panel_scales(act_type, q1, 0, 0, n / 32, 0, 1, d, s, ld);
        if (q2) gr_act_panel_scales(act_type, q2, 0, 0, n / 32, 0, 1, d + ld, s + ld, ld);
    }
}

/* Activation rows: token t's term k (k < terms) at act + (t * terms + k) * act_row_bytes, so with two
 * terms the residual row directly follows its token's first row. */
typedef struct {
    const gr_kernels *k;
    const float *x;
    uint8_t *act;
    int64_t cols, n_tok, act_row_bytes, chunks_per_row;
    int act_type, act_block, act_type_size, terms;
    float *panel_d, *panel_s;  /* when the tiled path runs on a Q8_0/Q8_1 format: gr_act_panel's arrays */
    int64_t panel_ld;
    atomic_llong next_unit;
} quantize_task;

static void run_quantize(void *p, int ith, int nth) {
    quantize_task *q = p;
    (void)ith; (void)nth;
    for (;;) {
        int64_t u = atomic_fetch_add(&q->next_unit, 1);
        if (u >= q->n_tok * q->chunks_per_row) return;
        int64_t t = u / q->chunks_per_row, c0 = (u % q->chunks_per_row) * QUANT_CHUNK;
        int64_t len = q->cols - c0 < QUANT_CHUNK ? q->cols - c0 : QUANT_CHUNK;
        const float *x = q->x + t * q->cols + c0;
        uint8_t *q1 = q->act + t * q->terms * q->act_row_bytes + c0 / q->act_block * q->act_type_size;
        int64_t pd = t * q->terms * q->panel_ld + c0 / 32;
        quantize_terms(q->k, q->act_type, x, q1, q->terms == 2 ? q1 + q->act_row_bytes : NULL, len,
                       q->panel_d ? q->panel_d + pd : NULL, q->panel_s ? q->panel_s + pd : NULL, q->panel_ld);
    }
}

/* ---------------------------------------------------------------- matmul */

typedef struct {
    gr_vec_dot_fn dot;
    gr_vec_dot2_fn dot2;
    const uint8_t *w;
    const uint8_t *act;
    float *y;
    int64_t rows, cols, row_stride, n_tok, act_row_bytes;
    int64_t chunk_rows, token_tile;
    int terms;
    atomic_llong next_chunk;
} matmul_task;

/* One weight row times one activation row of `terms` terms (the second term's row follows the first):
 * the fused two-term dot where the type has one, else the terms summed in order. Every per-row path
 * (matmul, batched gemv, few-token MoE) goes through here, so they give the same bits. */
static inline float dot_act_row(gr_vec_dot_fn dot, gr_vec_dot2_fn dot2, int terms, int64_t cols, const uint8_t *wr,
                                const uint8_t *a, int64_t act_row_bytes) {
    if (terms == 1) return dot(cols, wr, a);
    if (dot2) return dot2(cols, wr, a, a + act_row_bytes);
    return dot(cols, wr, a) + dot(cols, wr, a + act_row_bytes);
}

static inline float dot_terms(const matmul_task *m, const uint8_t *wr, int64_t t) {
    return dot_act_row(m->dot, m->dot2, m->terms, m->cols, wr, m->act + t * m->terms * m->act_row_bytes,
                       m->act_row_bytes);
}

/* Threads claim contiguous row chunks; within a chunk each weight row is read from memory once and
 * reused from cache for a tile of tokens. Dynamic claiming keeps the split balanced when other
 * processes steal a core. */
static void run_matmul(void *p, int ith, int nth) {
    matmul_task *m = p;
    (void)ith; (void)nth;
    for (;;) {
        int64_t r0 = atomic_fetch_add(&m->next_chunk, 1) * m->chunk_rows;
        if (r0 >= m->rows) return;
        int64_t r1 = r0 + m->chunk_rows < m->rows ? r0 + m->chunk_rows : m->rows;
        for (int64_t t0 = 0; t0 < m->n_tok; t0 += m->token_tile) {
            int64_t t1 = t0 + m->token_tile < m->n_tok ? t0 + m->token_tile : m->n_tok;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *wr = m->w + r * m->row_stride;
                for (int64_t t = t0; t < t1; t++)
                    m->y[t * m->rows + r] = dot_terms(m, wr, t);
            }
        }
    }
}

/* ---------------------------------------------------------------- tiled matmul (prefill) */

/* Batches of up to this many tokens take the decode kernels (gemv), more take the register tiles. A
 * gemv call unpacks each weight block once for all its tokens, and a token's bits do not depend on the
 * others: so an MTP verify (the sampled token and up to 3 drafts) gives exactly the logits decoding one
 * token at a time would, and its greedy output is the plain loop's at either act precision. Up to 4
 * tokens, a gemv pass also costs about what packing panels would. */
#ifndef GEMV_MAX_TOKENS
#define GEMV_MAX_TOKENS 4
#endif
static int use_tiles(const gr_gemm_ops *ops, int64_t n_tok) { return ops->tile && n_tok > GEMV_MAX_TOKENS; }
/* Activation rows of one work unit: as many as fit this budget (they are reread for every panel). */
#define GEMM_ACT_BUDGET (192 * 1024)
/* Columns are split into chunks of this many elements (a multiple of every block size) when there are
 * more: a panel of 8 rows x 14336 K-quant columns is 160 KiB and would leave room for only a few
 * activation rows per pack; per chunk the panel stays in L1/L2 and a unit holds dozens of rows. */
#ifndef GEMM_K_CHUNK
#define GEMM_K_CHUNK 4096
#endif

typedef struct {
    const gr_gemm_ops *ops;
    const uint8_t *w;
    gr_act_panel ap;
    float *y;
    uint8_t *panels;
    size_t panel_stride;
    int64_t rows, cols, row_stride, n_act;
    int64_t unit_rows, unit_acts, row_units, n_units;
    int64_t k_chunk, w_block, w_type_size, a_block, a_type_size;
    float *sums;        /* per thread: tile_rows x unit_acts partial sums over column chunks */
    size_t sums_stride; /* floats */
    int terms;
    atomic_llong next_unit;
} gemm_task;

static void store_tile(const gemm_task *g, int64_t r, int64_t a, int nr, int na, const float *c, int ldc) {
    for (int i = 0; i < nr; i++) {
        if (g->terms == 1) {
            for (int j = 0; j < na; j++) g->y[(a + j) * g->rows + r + i] = c[i * ldc + j];
        } else {  /* a and na are even: both terms of each token are here */
            for (int j = 0; j < na; j += 2) g->y[(a + j) / 2 * g->rows + r + i] = c[i * ldc + j] + c[i * ldc + j + 1];
        }
    }
}

/* Work units are (row range, activation range) pairs claimed dynamically, activation-range major so
 * the threads share one range of activations in cache while they sweep the rows. Within a unit each
 * group of tile_rows rows is packed once and multiplied against every tile of the unit's activations. */
static void run_gemm(void *p, int ith, int nth) {
    gemm_task *g = p;
    (void)nth;
    void *panel = g->panels + (size_t)ith * g->panel_stride;
    const int R = g->ops->tile_rows, T = g->ops->tile_acts;
    float c[64];
    for (;;) {
        int64_t u = atomic_fetch_add(&g->next_unit, 1);
        if (u >= g->n_units) return;
        int64_t r0 = (u % g->row_units) * g->unit_rows, a0 = (u / g->row_units) * g->unit_acts;
        int64_t r1 = r0 + g->unit_rows < g->rows ? r0 + g->unit_rows : g->rows;
        int64_t a1 = a0 + g->unit_acts < g->n_act ? a0 + g->unit_acts : g->n_act;
        for (int64_t r = r0; r < r1; r += R) {
            int nr = r1 - r < R ? (int)(r1 - r) : R;
            const uint8_t *wr = g->w + r * g->row_stride;
            if (g->cols <= g->k_chunk) {
                g->ops->pack(wr, g->row_stride, nr, g->cols, panel);
                for (int64_t a = a0; a < a1; a += T) {
                    int na = a1 - a < T ? (int)(a1 - a) : T;
                    g->ops->tile(nr, na, g->cols, panel, &g->ap, a, c);
                    store_tile(g, r, a, nr, na, c, na);
                }
                continue;
            }
            /* column chunks: partial sums per (row, activation row) of the unit, added in chunk order */
            float *sums = g->sums + (size_t)ith * g->sums_stride;
            const int64_t ld = a1 - a0;
            for (int64_t k0 = 0; k0 < g->cols; k0 += g->k_chunk) {
                int64_t len = g->cols - k0 < g->k_chunk ? g->cols - k0 : g->k_chunk;
                g->ops->pack(wr + k0 / g->w_block * g->w_type_size, g->row_stride, nr, len, panel);
                gr_act_panel ap = g->ap;
                ap.act += k0 / g->a_block * g->a_type_size;
                if (ap.d) { ap.d += k0 / 32; ap.s += k0 / 32; }
                for (int64_t a = a0; a < a1; a += T) {
                    int na = a1 - a < T ? (int)(a1 - a) : T;
                    g->ops->tile(nr, na, len, panel, &ap, a, c);
                    for (int i = 0; i < nr; i++)
                        for (int j = 0; j < na; j++) {
                            float *dst = &sums[i * ld + (a - a0) + j];
                            *dst = k0 == 0 ? c[i * na + j] : *dst + c[i * na + j];
                        }
                }
            }
            store_tile(g, r, a0, nr, (int)ld, sums, (int)ld);
        }
    }
}

/* Decode: threads claim chunks of rows of one or more matrices (gemv_job) that share activations. */
static int64_t act_panel_ld(int64_t cols) { return (cols / 32 + 8 + 15) & ~(int64_t)15; }

/* One matrix of a batch: rows x cols of qtype at w (packed rows) times activation set ap. */
typedef struct {
    const gr_gemm_ops *ops;   /* ops->gemv, or vec_dot/vec_dot2 per row where the type has none */
    gr_vec_dot_fn dot;
    gr_vec_dot2_fn dot2;
    const uint8_t *w;
    int64_t rows, cols, row_stride;
    const gr_act_panel *ap;
    int terms;
    float *y;                 /* n_tok rows of `rows` floats */
    int64_t chunk_rows, chunk0, chunk1;  /* its chunks in the batch's numbering: [chunk0, chunk1) */
} gemv_job;

typedef struct {
    const gemv_job *jobs;
    int n_jobs;
    int64_t n_tok, n_chunks;
    atomic_llong next_chunk;
} gemv_batch;

/* Rows [r0, r1) of job g times its activation tokens [a0, a0 + n_tok); token t's outputs at
 * g->y + t * g->rows. Each row is multiplied against every token while it is in L1. */
static void gemv_job_rows(const gemv_job *g, int64_t r0, int64_t r1, int64_t a0, int64_t n_tok) {
    if (g->ops->gemv) {
        const int64_t step = GR_GEMV_ACTS / g->terms;
        if (g->ops->gemv_rows) {   /* the same bits, the row loop in the kernel */
            for (int64_t t = 0; t < n_tok; t += step)
                g->ops->gemv_rows(n_tok - t < step ? (int)(n_tok - t) : (int)step, g->terms, g->cols,
                                  g->w + r0 * g->row_stride, g->row_stride, r1 - r0, g->ap, (a0 + t) * g->terms,
                                  g->y + t * g->rows + r0, g->rows);
            return;
        }
        float c[GR_GEMV_ACTS];
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t t = 0; t < n_tok; t += step) {
                const int nt = n_tok - t < step ? (int)(n_tok - t) : (int)step;
                g->ops->gemv(nt, g->terms, g->cols, g->w + r * g->row_stride, g->ap, (a0 + t) * g->terms, c);
                for (int i = 0; i < nt; i++) g->y[(t + i) * g->rows + r] = c[i];
            }
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = g->w + r * g->row_stride;
        for (int64_t t = 0; t < n_tok; t++)
            g->y[t * g->rows + r] = dot_act_row(g->dot, g->dot2, g->terms, g->cols, wr,
                                                g->ap->act + (a0 + t) * g->terms * g->ap->act_row_bytes,
                                                g->ap->act_row_bytes);
    }
}

static void run_gemv_batch(void *p, int ith, int nth) {
    gemv_batch *b = p;
    (void)ith; (void)nth;
    int j = 0;
    for (;;) {
        const int64_t ch = atomic_fetch_add(&b->next_chunk, 1);
        if (ch >= b->n_chunks) return;
        while (ch >= b->jobs[j].chunk1) j++;  /* a thread's claims only grow, so j only moves forward */
        const gemv_job *g = &b->jobs[j];
        const int64_t r0 = (ch - g->chunk0) * g->chunk_rows;
        gemv_job_rows(g, r0, r0 + g->chunk_rows < g->rows ? r0 + g->chunk_rows : g->rows, 0, b->n_tok);
    }
}

/* Chunks a thread claims of a gemv batch. Each claim moves the shared counter's cache line between
 * cores (120-470 ns a round trip between this VM's two), and each chunk starts its rows' streams anew:
 * the trained step35's 4-token verify (192- and 128-row matrices) ran 2-7% more tokens a second at 4
 * than at 8, measured alternating in one process; plain decoding did not change. */
#define GEMV_CHUNKS_PER_THREAD 4

/* Fill job j's kernel fields and chunking for a pool of `parallel` threads, in a batch of jobs with
 * batch_rows rows in all; returns its chunk count. Chunks are sized by the batch, not the job: a thread
 * claims a long run of consecutive rows (a whole expert matrix of a MoE layer's 16 gate and up jobs)
 * instead of 1/16 of every matrix, so the hardware prefetchers see long streams (step35 BENCH's experts,
 * 288-430 KB a matrix: 32-row chunks, at 8 chunks a thread, streamed at ~10 GB/s). */
static int64_t gemv_job_init(const gr_kernels *k, gemv_job *g, int qtype, const void *w, int64_t rows, int64_t cols,
                             const gr_act_panel *ap, int terms, float *y, int parallel, int64_t batch_rows,
                             int64_t chunk0) {
    g->ops = &k->gemm[qtype];
    g->dot = k->vec_dot[qtype];
    g->dot2 = k->vec_dot2[qtype];
    g->w = w;
    g->rows = rows; g->cols = cols; g->row_stride = row_bytes(qtype, cols);
    g->ap = ap; g->terms = terms; g->y = y;
    int64_t chunk = batch_rows / ((int64_t)parallel * GEMV_CHUNKS_PER_THREAD);
    if (g->ops->gemv) { chunk = chunk < 16 ? 16 : chunk; chunk = (chunk + 7) & ~(int64_t)7; }
    else chunk = chunk < 4 ? 4 : chunk;
    g->chunk_rows = chunk;
    g->chunk0 = chunk0;
    g->chunk1 = chunk0 + (rows + chunk - 1) / chunk;
    return g->chunk1 - chunk0;
}

static void gemv_batch_run(const gemv_job *jobs, int n_jobs, int64_t n_tok, int parallel) {
    gemv_batch b = {jobs, n_jobs, n_tok, jobs[n_jobs - 1].chunk1, 0};
    atomic_init(&b.next_chunk, 0);
    gr_pool_run_dynamic(run_gemv_batch, &b, parallel);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static int matmul_check(int qtype, int64_t rows, int64_t cols, int64_t row_stride, int64_t n_tok) {
    if (qtype < 0 || qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].vec_dot[qtype]) return GR_E_QTYPE;
    int bs = gr_block_size(qtype);
    if (rows <= 0 || cols <= 0 || n_tok <= 0 || cols % bs || row_stride < row_bytes(qtype, cols)) return GR_E_SHAPE;
    return GR_OK;
}

static int matmul_locked(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride,
                         const float *x, int64_t n_tok, float *y);

int gr_matmul(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride,
              const float *x, int64_t n_tok, float *y) {
    ensure_init();
    int rc = matmul_check(qtype, rows, cols, row_stride, n_tok);
    if (rc != GR_OK) return rc;
    api_lock();
    rc = matmul_locked(qtype, w, rows, cols, row_stride, x, n_tok, y);
    api_unlock();
    return rc;
}

/* Threads for a pass of `work` multiply-adds: below this much work a wake-up of the pool costs more
 * than it saves, and the pass runs on the calling thread. */
static int pool_share(double work, int nth) { return work >= 65536.0 ? nth : 1; }

/* gr_matmul with api_mutex held and arguments checked. */
static int matmul_locked(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride,
                         const float *x, int64_t n_tok, float *y) {
    const gr_kernels *k = &tables[isa_current];
    const int bs = gr_block_size(qtype);
    int nth = gr_pool_threads();
    int act_type = gr_act_type(qtype);
    int parallel = pool_share((double)rows * (double)cols * (double)n_tok, nth);

    /* F32 activations are used as they are; every other format carries act_precision terms. */
    int terms = act_type == GR_T_F32 ? 1 : act_precision;
    int64_t n_act = n_tok * terms;
    const gr_gemm_ops *ops = &k->gemm[qtype];
    int tiled = use_tiles(ops, n_tok);
    int use_gemv = !tiled && ops->gemv;
    const uint8_t *act;
    int64_t act_row_bytes = cols * 4;
    size_t act_bytes = 0, panel_arrays = 0, panel_stride = 0;
    int64_t panel_ld = 0;
    if (act_type != GR_T_F32) {
        act_row_bytes = row_bytes(act_type, cols);
        act_bytes = align64((size_t)(act_row_bytes * n_act));
    }
    if ((tiled || use_gemv) && (act_type == GR_T_Q8_0 || act_type == GR_T_Q8_1)) {
        panel_ld = act_panel_ld(cols);
        panel_arrays = align64((size_t)n_act * (size_t)panel_ld * sizeof(float));
    }
    int64_t k_chunk = cols, unit_acts = 0;
    size_t sums_stride = 0;
    if (tiled) {
        int64_t T = ops->tile_acts;
        if (cols > GEMM_K_CHUNK) k_chunk = GEMM_K_CHUNK;
        unit_acts = GEMM_ACT_BUDGET / row_bytes(act_type, k_chunk) / T * T;
        if (unit_acts < T) unit_acts = T;
        if (unit_acts > n_act) unit_acts = (n_act + T - 1) / T * T;
        panel_stride = align64(ops->panel_bytes(k_chunk));
        if (k_chunk < cols) sums_stride = (size_t)ops->tile_rows * (size_t)unit_acts;
    }
    size_t sums_bytes = align64(sums_stride * sizeof(float));
    uint8_t *buf = scratch_reserve(64 + act_bytes + 2 * panel_arrays + (size_t)nth * (panel_stride + sums_bytes));
    if (!buf) return GR_E_NOMEM;
    float *panel_d = panel_arrays ? (float *)(buf + act_bytes) : NULL;
    float *panel_s = panel_arrays ? (float *)(buf + act_bytes + panel_arrays) : NULL;
    if (act_type == GR_T_F32) {
        act = (const uint8_t *)x;
        act_row_bytes = cols * 4;
    } else {
        quantize_task q = {k, x, buf, cols, n_tok, act_row_bytes,
                           (cols + QUANT_CHUNK - 1) / QUANT_CHUNK, act_type, gr_block_size(act_type),
                           gr_type_size(act_type), terms, panel_d, panel_s, panel_ld, 0};
        atomic_init(&q.next_unit, 0);
        gr_pool_run_dynamic(run_quantize, &q, n_tok * cols * terms >= 4 * QUANT_CHUNK ? parallel : 1);
        act = buf;
        if (panel_d)  /* the zero tail after each row's blocks (see gr_act_panel) */
            for (int64_t a = 0; a < n_act; a++)
                for (int64_t k = cols / 32; k < panel_ld; k++) panel_d[a * panel_ld + k] = panel_s[a * panel_ld + k] = 0.f;
    }

    if (tiled) {
        gemm_task g = {0};
        g.ops = ops;
        g.w = w;
        g.ap.act = act; g.ap.act_row_bytes = act_row_bytes;
        g.ap.d = panel_d; g.ap.s = panel_s; g.ap.ld = panel_ld;
        g.y = y;
        g.panels = buf + act_bytes + 2 * panel_arrays;
        g.panel_stride = panel_stride;
        g.sums = (float *)(g.panels + (size_t)nth * panel_stride);
        g.sums_stride = sums_bytes / sizeof(float);
        g.k_chunk = k_chunk;
        g.w_block = bs; g.w_type_size = gr_type_size(qtype);
        g.a_block = gr_block_size(act_type); g.a_type_size = gr_type_size(act_type);
        g.rows = rows; g.cols = cols; g.row_stride = row_stride; g.n_act = n_act; g.terms = terms;
        int64_t R = ops->tile_rows, ua = unit_acts;
        int64_t act_units = (n_act + ua - 1) / ua;
        /* ~8 units per thread for balance when the rows allow it */
        int64_t want_row_units = ((int64_t)parallel * 8 + act_units - 1) / act_units;
        int64_t ur = (rows + want_row_units - 1) / want_row_units;
        ur = (ur + R - 1) / R * R;
        g.unit_rows = ur; g.unit_acts = ua;
        g.row_units = (rows + ur - 1) / ur;
        g.n_units = g.row_units * act_units;
        atomic_init(&g.next_unit, 0);
        gr_pool_run_dynamic(run_gemm, &g, parallel);
        return GR_OK;
    }
    if (use_gemv) {
        const gr_act_panel ap = {act, act_row_bytes, panel_d, panel_s, panel_ld};
        gemv_job job;
        gemv_job_init(k, &job, qtype, w, rows, cols, &ap, terms, y, parallel, rows, 0);
        job.row_stride = row_stride;   /* gr_matmul's rows may be further apart than packed */
        gemv_batch_run(&job, 1, n_tok, parallel);
        return GR_OK;
    }

    matmul_task m = {0};
    m.dot = k->vec_dot[qtype];
    m.dot2 = k->vec_dot2[qtype];
    m.terms = terms;
    m.w = w; m.act = act; m.y = y;
    m.rows = rows; m.cols = cols; m.row_stride = row_stride; m.n_tok = n_tok; m.act_row_bytes = act_row_bytes;
    /* ~8 chunks per thread for balance, at least 4 rows so chunk bookkeeping stays negligible. */
    int64_t chunk = rows / ((int64_t)parallel * 8);
    m.chunk_rows = chunk < 4 ? 4 : chunk;
    /* tokens per tile: keep the tile's activations within ~256 KiB of cache */
    int64_t tile = (256 * 1024) / (act_row_bytes * terms);
    m.token_tile = tile < 1 ? 1 : tile;
    atomic_init(&m.next_chunk, 0);
    gr_pool_run_dynamic(run_matmul, &m, parallel);
    return GR_OK;
}

/* ---------------------------------------------------------------- batched decode
 *
 * A decode step multiplies one token by several matrices that share an input (q/k/v, gate/up, the
 * selected experts): one gr_matmul each would quantize the same activations again and wake the pool
 * once per matrix. Here the activations are quantized once per format and every row of every matrix
 * is one pool of work: threads claim chunks of rows across the matrices. The kernels, the terms and
 * the per-row summation are gr_matmul's, so each output equals its gr_matmul bit for bit. */

/* One activation set: n_tok rows of cols floats at x, prepared in the format act_type. */
typedef struct {
    int act_type, terms;
    const float *x;
    int64_t cols;
    gr_act_panel ap;   /* filled by acts_prepare */
} act_set;

static size_t act_set_bytes(const act_set *a, int64_t n_tok) {
    if (a->act_type == GR_T_F32) return 0;
    size_t n = align64((size_t)(row_bytes(a->act_type, a->cols) * n_tok * a->terms));
    if (a->act_type == GR_T_Q8_0 || a->act_type == GR_T_Q8_1)
        n += 2 * align64((size_t)(n_tok * a->terms * act_panel_ld(a->cols)) * sizeof(float));
    return n;
}

/* Quantize every set into buf (sum of act_set_bytes), filling each set's panel, as gr_matmul does. */
static void acts_prepare(const gr_kernels *k, act_set *sets, int n_sets, int64_t n_tok, uint8_t *buf, int nth) {
    for (int i = 0; i < n_sets; i++) {
        act_set *a = &sets[i];
        if (a->act_type == GR_T_F32) {
            a->ap = (gr_act_panel){(const uint8_t *)a->x, a->cols * 4, NULL, NULL, 0};
            continue;
        }
        const int64_t rb = row_bytes(a->act_type, a->cols), n_act = n_tok * a->terms;
        const size_t act_bytes = align64((size_t)(rb * n_act));
        float *pd = NULL, *ps = NULL;
        int64_t ld = 0;
        if (a->act_type == GR_T_Q8_0 || a->act_type == GR_T_Q8_1) {
            ld = act_panel_ld(a->cols);
            pd = (float *)(buf + act_bytes);
            ps = pd + align64((size_t)(n_act * ld) * sizeof(float)) / sizeof(float);
        }
        quantize_task q = {k, a->x, buf, a->cols, n_tok, rb, (a->cols + QUANT_CHUNK - 1) / QUANT_CHUNK, a->act_type,
                           gr_block_size(a->act_type), gr_type_size(a->act_type), a->terms, pd, ps, ld, 0};
        atomic_init(&q.next_unit, 0);
        gr_pool_run_dynamic(run_quantize, &q, n_tok * a->cols * a->terms >= 4 * QUANT_CHUNK ? nth : 1);
        if (pd)
            for (int64_t r = 0; r < n_act; r++)
                for (int64_t b = a->cols / 32; b < ld; b++) pd[r * ld + b] = ps[r * ld + b] = 0.f;
        a->ap = (gr_act_panel){buf, rb, pd, ps, ld};
        buf += act_set_bytes(a, n_tok);
    }
}

/* The batched path is for decode: as many tokens as gr_matmul would give its gemv kernels. */
static int is_decode(int qtype, int64_t n_tok) {
    return !use_tiles(&tables[isa_current].gemm[qtype], n_tok);
}

#define MULTI_MAX 8

/* y_i = W_i x for the decode path: the formats the matrices pair with are quantized once each. */
static int multi_decode_locked(int n_mat, const int *qtypes, const void *const *w, const int64_t *rows,
                               int64_t cols, const float *x, int64_t n_tok, float *const *y) {
    const gr_kernels *k = &tables[isa_current];
    const int nth = gr_pool_threads();
    act_set sets[MULTI_MAX];
    int set_of[MULTI_MAX], n_sets = 0;
    double work = 0;
    for (int i = 0; i < n_mat; i++) {
        int at = gr_act_type(qtypes[i]), s = 0;
        while (s < n_sets && sets[s].act_type != at) s++;
        if (s == n_sets) sets[n_sets++] = (act_set){at, at == GR_T_F32 ? 1 : act_precision, x, cols, {0}};
        set_of[i] = s;
        work += (double)rows[i] * (double)cols * (double)n_tok;
    }
    size_t bytes = 64;
    for (int s = 0; s < n_sets; s++) bytes += act_set_bytes(&sets[s], n_tok);
    uint8_t *buf = scratch_reserve(bytes);
    if (!buf) return GR_E_NOMEM;
    const int parallel = pool_share(work, nth);
    acts_prepare(k, sets, n_sets, n_tok, buf, parallel);
    gemv_job jobs[MULTI_MAX];
    int64_t c0 = 0, batch_rows = 0;
    for (int i = 0; i < n_mat; i++) batch_rows += rows[i];
    for (int i = 0; i < n_mat; i++)
        c0 += gemv_job_init(k, &jobs[i], qtypes[i], w[i], rows[i], cols, &sets[set_of[i]].ap, sets[set_of[i]].terms,
                            y[i], parallel, batch_rows, c0);
    gemv_batch_run(jobs, n_mat, n_tok, parallel);
    return GR_OK;
}

/* matmul_check for a matrix of packed rows (row stride = the row's bytes). */
static int packed_check(int qtype, int64_t rows, int64_t cols, int64_t n_tok) {
    if (qtype < 0 || qtype >= GR_T_SLOTS || !gr_block_size(qtype)) return GR_E_QTYPE;
    if (cols <= 0) return GR_E_SHAPE;
    return matmul_check(qtype, rows, cols, row_bytes(qtype, cols), n_tok);
}

/* x, or rms_norm(x) * norm_w in fscratch[0 .. n_tok * cols) when norm_w is given. */
static const float *normed_input(const float *x, int64_t n_tok, int64_t cols, const float *norm_w, float eps) {
    if (!norm_w) return x;
    float *xn = fscratch_reserve((size_t)(n_tok * cols));
    if (!xn) return NULL;
    gr_rms_norm(x, norm_w, xn, n_tok, cols, eps);
    return xn;
}

int gr_matmul_multi(int n_mat, const int *qtypes, const void *const *w, const int64_t *rows, int64_t cols,
                    const float *x, int64_t n_tok, const float *norm_w, float eps, float *x_normed, float *y) {
    ensure_init();
    if (n_mat < 1 || n_mat > MULTI_MAX) return GR_E_ARG;
    for (int i = 0; i < n_mat; i++) {
        int rc = packed_check(qtypes[i], rows[i], cols, n_tok);
        if (rc != GR_OK) return rc;
    }
    api_lock();
    int rc = GR_OK;
    const float *xin = normed_input(x, n_tok, cols, norm_w, eps);
    if (!xin) { api_unlock(); return GR_E_NOMEM; }
    if (x_normed && norm_w) memcpy(x_normed, xin, sizeof(float) * (size_t)(n_tok * cols));
    float *ys[MULTI_MAX];
    int all_decode = 1;
    int64_t off = 0;
    for (int i = 0; i < n_mat; i++) {
        ys[i] = y + off * n_tok;
        off += rows[i];
        all_decode &= is_decode(qtypes[i], n_tok);
    }
    if (all_decode) rc = multi_decode_locked(n_mat, qtypes, w, rows, cols, xin, n_tok, ys);
    else
        for (int i = 0; i < n_mat && rc == GR_OK; i++)
            rc = matmul_locked(qtypes[i], w[i], rows[i], cols, row_bytes(qtypes[i], cols), xin, n_tok, ys[i]);
    api_unlock();
    return rc;
}

/* ---- token split ----
 * A verify batch (the sampled token and up to three drafts) through a small layer is mostly fixed
 * costs: each of the layer's ~8 products, its quantizations and its attention is a pass of the pool
 * whose wake-up, work claims and cross-core traffic take longer than the pass's share of arithmetic
 * (on the trained MTP model, a 4-token step on two threads took 1.70 ms against 1.96 on one). Such a
 * layer instead gives each thread whole tokens: every thread runs the layer's calls for its own rows,
 * alone, and the threads meet once per phase (once for a MoE layer; twice for attention, whose queries
 * need every row's keys stored first). Every row takes the kernels it takes in any batch of up to
 * GEMV_MAX_TOKENS (decode kernels, rows alone), so the bits do not depend on the split.
 * Only where the weights a thread reads are small: there they come from cache, and reading them on both
 * cores costs less than the passes saved; a large layer (the 198B model's experts, megabytes each) is
 * read once, its rows shared between the threads, its experts once per batch. */
#define SPLIT_MAX_TOKENS GEMV_MAX_TOKENS
#define SPLIT_MAX_BYTES (512 * 1024)    /* weights one thread reads for its rows: about a core's L2 */

static atomic_int split_on = 1;

int gr_set_token_split(int on) { return atomic_exchange(&split_on, on != 0); }

int gr_split_pieces(int64_t n_tok, double (*piece_bytes)(const void *, int64_t), const void *layer) {
    if (n_tok < 2 || n_tok > SPLIT_MAX_TOKENS || !atomic_load(&split_on) || gr_pool_in_split()) return 1;
    int64_t n = gr_pool_threads();
    if (n < 2) return 1;
    if (n > n_tok) n = n_tok;
    return piece_bytes(layer, (n_tok + n - 1) / n) <= SPLIT_MAX_BYTES ? (int)n : 1;
}

typedef struct {
    gr_rows_fn fn;
    void *ctx;
    int64_t n;
    int pieces;
    atomic_int next, rc;
} split_run;

static void run_pieces(void *p, int ith, int nth) {
    split_run *s = p;
    (void)ith; (void)nth;
    for (int g; (g = atomic_fetch_add(&s->next, 1)) < s->pieces;) {
        int rc = s->fn(s->ctx, gr_piece_start(s->n, s->pieces, g), gr_piece_start(s->n, s->pieces, g + 1));
        int ok = GR_OK;
        if (rc != GR_OK) atomic_compare_exchange_strong(&s->rc, &ok, rc);
    }
}

int gr_split_rows(gr_rows_fn fn, void *ctx, int64_t n, int pieces) {
    if (pieces <= 1) return fn(ctx, 0, n);
    split_run s = {.fn = fn, .ctx = ctx, .n = n, .pieces = pieces};
    atomic_init(&s.next, 0);
    atomic_init(&s.rc, GR_OK);
    pthread_mutex_lock(&api_mutex);   /* then ops.c's: that order everywhere */
    gr_ops_hold(1);
    gr_pool_run_split(run_pieces, &s);
    gr_ops_hold(0);
    pthread_mutex_unlock(&api_mutex);
    return atomic_load(&s.rc);
}

double gr_packed_bytes(int qtype, int64_t rows, int64_t cols) {
    /* not a type: never split, so the call itself reports it */
    return gr_block_size(qtype) > 0 ? (double)rows * (double)row_bytes(qtype, cols) : HUGE_VAL;
}

double gr_ffn_bytes(int gate_qtype, int up_qtype, int down_qtype, int64_t n_embd, int64_t n_ff) {
    return gr_packed_bytes(gate_qtype, n_ff, n_embd) + gr_packed_bytes(up_qtype, n_ff, n_embd) +
           gr_packed_bytes(down_qtype, n_embd, n_ff);
}

/* gr_ffn's arguments, for its token split: a piece of rows is the same call on those rows */
typedef struct {
    int qtypes[3];
    const void *w[3];
    int64_t n_embd, n_ff;
    const float *x, *norm_w;
    float eps, clamp;
    int act;
    float *y;
} ffn_call;

static double ffn_bytes(const void *p, int64_t rows) {
    const ffn_call *f = p;
    (void)rows;
    return gr_ffn_bytes(f->qtypes[0], f->qtypes[1], f->qtypes[2], f->n_embd, f->n_ff);
}

static int ffn_rows(void *p, int64_t t0, int64_t t1) {
    const ffn_call *f = p;
    return gr_ffn(f->qtypes[0], f->w[0], f->qtypes[1], f->w[1], f->qtypes[2], f->w[2], f->n_embd, f->n_ff,
                  f->x + t0 * f->n_embd, t1 - t0, f->norm_w, f->eps, f->act, f->clamp, f->y + t0 * f->n_embd);
}

int gr_ffn(int gate_qtype, const void *gate_w, int up_qtype, const void *up_w, int down_qtype, const void *down_w,
           int64_t n_embd, int64_t n_ff, const float *x, int64_t n_tok, const float *norm_w, float eps,
           int act, float clamp, float *y) {
    ensure_init();
    int rc;
    if ((rc = packed_check(gate_qtype, n_ff, n_embd, n_tok)) != GR_OK) return rc;
    if ((rc = packed_check(up_qtype, n_ff, n_embd, n_tok)) != GR_OK) return rc;
    if ((rc = packed_check(down_qtype, n_embd, n_ff, n_tok)) != GR_OK) return rc;
    if (act != GR_ACT_SILU && act != GR_ACT_GELU) return GR_E_ARG;
    {   /* a few rows through a small FFN: pieces of rows side by side (the token split, above) */
        ffn_call f = {{gate_qtype, up_qtype, down_qtype}, {gate_w, up_w, down_w}, n_embd, n_ff, x, norm_w, eps,
                      clamp, act, y};
        const int pieces = gr_split_pieces(n_tok, ffn_bytes, &f);
        if (pieces > 1) return gr_split_rows(ffn_rows, &f, n_tok, pieces);
    }
    api_lock();
    const size_t nx = norm_w ? (size_t)(n_tok * n_embd) : 0, nf = (size_t)(n_tok * n_ff);
    float *f = fscratch_reserve(nx + 2 * nf);
    if (!f) { api_unlock(); return GR_E_NOMEM; }
    const float *xin = x;
    if (norm_w) { gr_rms_norm(x, norm_w, f, n_tok, n_embd, eps); xin = f; }
    float *g = f + nx, *u = g + nf;
    if (is_decode(gate_qtype, n_tok) && is_decode(up_qtype, n_tok)) {
        const int qt[2] = {gate_qtype, up_qtype};
        const void *ws[2] = {gate_w, up_w};
        const int64_t rs[2] = {n_ff, n_ff};
        float *ys[2] = {g, u};
        rc = multi_decode_locked(2, qt, ws, rs, n_embd, xin, n_tok, ys);
    } else {
        rc = matmul_locked(gate_qtype, gate_w, n_ff, n_embd, row_bytes(gate_qtype, n_embd), xin, n_tok, g);
        if (rc == GR_OK) rc = matmul_locked(up_qtype, up_w, n_ff, n_embd, row_bytes(up_qtype, n_embd), xin, n_tok, u);
    }
    if (rc == GR_OK) {
        gr_glu(g, u, g, (int64_t)nf, act, clamp);
        rc = matmul_locked(down_qtype, down_w, n_embd, n_ff, row_bytes(down_qtype, n_ff), g, n_tok, y);
    }
    api_unlock();
    return rc;
}

/* gr_moe_ffn for one token (moe.c checked the arguments): every distinct selected expert's gate and
 * up rows in one pool pass over one quantization of x, the clamped SwiGLU, then every expert's down
 * rows in a second pass; the weighted sum in expert-id order, as the grouped path adds it, so the
 * result is the same bits. GR_ACT_SILU only, as gr_moe_ffn. */
int gr_moe_decode(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
                  int down_qtype, const void *const *down_w, int64_t n_embd, int64_t n_ff, const float *x,
                  int64_t n_used, const int32_t *ids, const float *weights, float clamp, float *y) {
    ensure_init();
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)n_used);
    act_set *sets = malloc(sizeof(act_set) * (size_t)(n_used + 2));
    gemv_job *jobs = malloc(sizeof(gemv_job) * (size_t)(2 * n_used));
    if (!sel || !sets || !jobs) { free(sel); free(sets); free(jobs); return GR_E_NOMEM; }
    int n_sel = 0;  /* distinct ids, ascending (insertion sort: n_used is a handful) */
    for (int64_t i = 0; i < n_used; i++) {
        int32_t e = ids[i];
        int j = 0;
        while (j < n_sel && sel[j] < e) j++;
        if (j < n_sel && sel[j] == e) continue;
        memmove(sel + j + 1, sel + j, sizeof(int32_t) * (size_t)(n_sel - j));
        sel[j] = e;
        n_sel++;
    }
    api_lock();
    const gr_kernels *k = &tables[isa_current];
    const int nth = gr_pool_threads();
    int rc = GR_OK;
    float *f = fscratch_reserve((size_t)n_sel * (size_t)(2 * n_ff + n_embd));
    if (!f) { rc = GR_E_NOMEM; goto done; }
    float *g = f, *u = g + n_sel * n_ff, *d = u + n_sel * n_ff;
    const int parallel = pool_share((double)n_sel * (double)n_ff * (double)n_embd, nth);

    /* gate and up of every selected expert, from x quantized once per activation format */
    const int at_g = gr_act_type(gate_qtype), at_u = gr_act_type(up_qtype), at_d = gr_act_type(down_qtype);
    int n_sets = 0;
    sets[n_sets++] = (act_set){at_g, at_g == GR_T_F32 ? 1 : act_precision, x, n_embd, {0}};
    if (at_u != at_g) sets[n_sets++] = (act_set){at_u, at_u == GR_T_F32 ? 1 : act_precision, x, n_embd, {0}};
    size_t bytes = 0, bytes_down;
    for (int s = 0; s < n_sets; s++) bytes += act_set_bytes(&sets[s], 1);
    {   /* the down inputs reuse the same scratch afterwards: room for the larger of the two phases */
        act_set a = {at_d, at_d == GR_T_F32 ? 1 : act_precision, NULL, n_ff, {0}};
        bytes_down = act_set_bytes(&a, 1) * (size_t)n_sel;
    }
    bytes = (bytes > bytes_down ? bytes : bytes_down) + 64;
    uint8_t *buf = scratch_reserve(bytes);
    if (!buf) { rc = GR_E_NOMEM; goto done; }
    acts_prepare(k, sets, n_sets, 1, buf, parallel);
    int64_t c0 = 0;
    for (int e = 0; e < n_sel; e++) {
        c0 += gemv_job_init(k, &jobs[2 * e], gate_qtype, gate_w[sel[e]], n_ff, n_embd, &sets[0].ap, sets[0].terms,
                            g + e * n_ff, parallel, 2 * n_sel * n_ff, c0);
        const act_set *su = &sets[n_sets - 1];
        c0 += gemv_job_init(k, &jobs[2 * e + 1], up_qtype, up_w[sel[e]], n_ff, n_embd, &su->ap, su->terms,
                            u + e * n_ff, parallel, 2 * n_sel * n_ff, c0);
    }
    gemv_batch_run(jobs, 2 * n_sel, 1, parallel);
    gr_glu(g, u, g, n_sel * n_ff, GR_ACT_SILU, clamp);

    /* down of every selected expert, each from its own activations */
    for (int e = 0; e < n_sel; e++)
        sets[e] = (act_set){at_d, at_d == GR_T_F32 ? 1 : act_precision, g + e * n_ff, n_ff, {0}};
    acts_prepare(k, sets, n_sel, 1, buf, parallel);
    c0 = 0;
    for (int e = 0; e < n_sel; e++)
        c0 += gemv_job_init(k, &jobs[e], down_qtype, down_w[sel[e]], n_embd, n_ff, &sets[e].ap, sets[e].terms,
                            d + e * n_embd, parallel, n_sel * n_embd, c0);
    gemv_batch_run(jobs, n_sel, 1, parallel);

    memset(y, 0, sizeof(float) * (size_t)n_embd);
    for (int e = 0; e < n_sel; e++)
        for (int64_t i = 0; i < n_used; i++) {
            if (ids[i] != sel[e]) continue;
            const float wt = weights[i];
            const float *dr = d + e * n_embd;
            for (int64_t c = 0; c < n_embd; c++) y[c] += wt * dr[c];
        }
done:
    api_unlock();
    free(sel); free(sets); free(jobs);
    return rc;
}

/* Whether gr_moe_ffn may take gr_moe_decode for this many tokens. */
int gr_moe_decode_ok(int gate_qtype, int up_qtype, int down_qtype, int64_t n_tok) {
    ensure_init();
    api_lock();
    const int q[3] = {gate_qtype, up_qtype, down_qtype};
    int ok = n_tok == 1;
    for (int i = 0; i < 3 && ok; i++)
        ok = q[i] >= 0 && q[i] < GR_T_SLOTS && tables[GR_ISA_SCALAR].vec_dot[q[i]] && is_decode(q[i], 1);
    api_unlock();
    return ok;
}

/* ---------------------------------------------------------------- few-token MoE (MTP verify, draft heads)
 *
 * gr_moe_ffn for a handful of tokens (moe.c sorted the (token, slot) pairs by expert and checked the
 * arguments): a gr_matmul per expert and weight would wake the pool and quantize activations three
 * times per distinct expert (a 4-token verify on 16 experts top-2: ~20 passes per layer). Here every
 * pair's x row is quantized in one go, the gate and up rows of every distinct expert run in one pool
 * pass (each expert's bytes read once, for all the tokens that chose it), then the clamped SwiGLU, one
 * quantization of its rows, and every down in a second pass. Each product takes the kernels gr_matmul
 * would pick for its expert's group (register tiles above GEMV_MAX_TOKENS tokens, decode
 * kernels below), on the same activation bytes, and tile lanes and gemv rows do not depend on what
 * else is in the pass, so the result is the per-expert path's, bit for bit. */

/* One expert's product: rows x cols at w times activation rows [a0 * terms, (a0 + n) * terms) of ap;
 * output token t at y + t * rows. Chunks of chunk_rows rows (a multiple of tile_rows when tiled). */
typedef struct {
    gemv_job j;
    int64_t a0, n;
    int tiled;
} few_job;

typedef struct {
    const few_job *jobs;
    int64_t n_chunks;
    uint8_t *panels;       /* per thread: one packed panel of the widest tiled job */
    size_t panel_stride;
    atomic_llong next_chunk;
} few_batch;

static void run_few(void *p, int ith, int nth) {
    few_batch *b = p;
    (void)nth;
    float c[64];
    int j = 0;
    for (;;) {
        const int64_t ch = atomic_fetch_add(&b->next_chunk, 1);
        if (ch >= b->n_chunks) return;
        while (ch >= b->jobs[j].j.chunk1) j++;  /* claims only grow, so j only moves forward */
        const few_job *fj = &b->jobs[j];
        const gemv_job *g = &fj->j;
        const int64_t r0 = (ch - g->chunk0) * g->chunk_rows;
        const int64_t r1 = r0 + g->chunk_rows < g->rows ? r0 + g->chunk_rows : g->rows;
        if (fj->tiled) {  /* as run_gemm for one unit of all the job's activation rows, cols <= GEMM_K_CHUNK */
            void *panel = b->panels + (size_t)ith * b->panel_stride;
            const int R = g->ops->tile_rows, T = g->ops->tile_acts;
            const int64_t A0 = fj->a0 * g->terms, A1 = (fj->a0 + fj->n) * g->terms;
            for (int64_t r = r0; r < r1; r += R) {
                int nr = r1 - r < R ? (int)(r1 - r) : R;
                g->ops->pack(g->w + r * g->row_stride, g->row_stride, nr, g->cols, panel);
                for (int64_t a = A0; a < A1; a += T) {
                    int na = A1 - a < T ? (int)(A1 - a) : T;
                    g->ops->tile(nr, na, g->cols, panel, g->ap, a, c);
                    for (int i = 0; i < nr; i++) {
                        if (g->terms == 1) {
                            for (int jj = 0; jj < na; jj++) g->y[(a - A0 + jj) * g->rows + r + i] = c[i * na + jj];
                        } else {  /* A0 and T are even: both terms of a token are in this tile */
                            for (int jj = 0; jj < na; jj += 2)
                                g->y[(a - A0 + jj) / 2 * g->rows + r + i] = c[i * na + jj] + c[i * na + jj + 1];
                        }
                    }
                }
            }
            continue;
        }
        gemv_job_rows(g, r0, r1, fj->a0, fj->n);
    }
}

/* Job for n activation rows from a0 of ap; returns its chunk count (numbered from chunk0). */
static int64_t few_job_init(const gr_kernels *k, few_job *f, int qtype, const void *w, int64_t rows, int64_t cols,
                            const gr_act_panel *ap, int terms, int64_t a0, int64_t n, float *y, int parallel,
                            int64_t batch_rows, int64_t chunk0) {
    gemv_job_init(k, &f->j, qtype, w, rows, cols, ap, terms, y, parallel, batch_rows, chunk0);
    f->a0 = a0; f->n = n;
    f->tiled = use_tiles(&k->gemm[qtype], n);  /* matmul_locked's choice for n tokens */
    if (f->tiled) {
        const int64_t R = k->gemm[qtype].tile_rows;
        int64_t chunk = rows / ((int64_t)parallel * 8);
        chunk = (chunk + R - 1) / R * R;
        f->j.chunk_rows = chunk < R ? R : chunk;
        f->j.chunk1 = chunk0 + (rows + f->j.chunk_rows - 1) / f->j.chunk_rows;
    }
    return f->j.chunk1 - chunk0;
}

static size_t few_panel_bytes(const gr_kernels *k, int qtype, int64_t cols) {
    return k->gemm[qtype].tile ? align64(k->gemm[qtype].panel_bytes(cols)) : 0;
}

static void few_run(const few_job *jobs, int64_t n_chunks, uint8_t *panels, size_t panel_stride, int parallel) {
    few_batch b = {jobs, n_chunks, panels, panel_stride, 0};
    atomic_init(&b.next_chunk, 0);
    gr_pool_run_dynamic(run_few, &b, parallel);
}

int gr_moe_few_ok(int gate_qtype, int up_qtype, int down_qtype, int64_t n_tok, int64_t n_embd, int64_t n_ff) {
    /* tiled jobs run without column chunks, as matmul_locked does up to GEMM_K_CHUNK columns */
    return n_tok >= 1 && n_tok <= GR_MOE_FEW_TOKENS && n_embd <= GEMM_K_CHUNK && n_ff <= GEMM_K_CHUNK &&
           gr_moe_decode_ok(gate_qtype, up_qtype, down_qtype, 1);
}

int gr_moe_few(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
               int down_qtype, const void *const *down_w, int64_t n_embd, int64_t n_ff, const float *x,
               int64_t n_tok, int64_t n_used, int64_t n_sel, const int32_t *sel, const int64_t *start,
               const int64_t *order, const float *weights, float clamp, float *y) {
    ensure_init();
    const int64_t n_pairs = start[n_sel];
    few_job *jobs = malloc(sizeof(few_job) * (size_t)(2 * n_sel));
    if (!jobs) return GR_E_NOMEM;
    api_lock();
    const gr_kernels *k = &tables[isa_current];
    const int nth = gr_pool_threads();
    int rc = GR_OK;
    float *f = fscratch_reserve((size_t)n_pairs * (size_t)(2 * n_ff + 2 * n_embd));
    if (!f) { rc = GR_E_NOMEM; goto done; }
    /* pair r (in expert order) has its x at row r of xs, gate/up outputs at row r of g/u, down at d */
    float *xs = f, *g = xs + n_pairs * n_embd, *u = g + n_pairs * n_ff, *d = u + n_pairs * n_ff;
    for (int64_t r = 0; r < n_pairs; r++)
        memcpy(xs + r * n_embd, x + order[r] / n_used * n_embd, sizeof(float) * (size_t)n_embd);
    const int parallel = pool_share((double)n_pairs * (double)n_ff * (double)n_embd, nth);

    const int at_g = gr_act_type(gate_qtype), at_u = gr_act_type(up_qtype), at_d = gr_act_type(down_qtype);
    act_set sets[2];
    int n_sets = 0;
    sets[n_sets++] = (act_set){at_g, at_g == GR_T_F32 ? 1 : act_precision, xs, n_embd, {0}};
    if (at_u != at_g) sets[n_sets++] = (act_set){at_u, at_u == GR_T_F32 ? 1 : act_precision, xs, n_embd, {0}};
    act_set down_set = {at_d, at_d == GR_T_F32 ? 1 : act_precision, g, n_ff, {0}};
    size_t bytes = 0, bytes_down = act_set_bytes(&down_set, n_pairs);
    for (int s = 0; s < n_sets; s++) bytes += act_set_bytes(&sets[s], n_pairs);
    if (bytes_down > bytes) bytes = bytes_down;  /* the phases reuse the scratch in turn */
    size_t panel_stride = few_panel_bytes(k, gate_qtype, n_embd), pb;
    if ((pb = few_panel_bytes(k, up_qtype, n_embd)) > panel_stride) panel_stride = pb;
    if ((pb = few_panel_bytes(k, down_qtype, n_ff)) > panel_stride) panel_stride = pb;
    uint8_t *buf = scratch_reserve(64 + bytes + (size_t)nth * panel_stride);
    if (!buf) { rc = GR_E_NOMEM; goto done; }
    uint8_t *panels = buf + bytes;

    /* gate and up of every distinct expert over its pairs' rows */
    acts_prepare(k, sets, n_sets, n_pairs, buf, parallel);
    const act_set *su = &sets[n_sets - 1];
    int64_t c0 = 0;
    for (int64_t e = 0; e < n_sel; e++) {
        const int64_t s0 = start[e], n = start[e + 1] - start[e];
        c0 += few_job_init(k, &jobs[2 * e], gate_qtype, gate_w[sel[e]], n_ff, n_embd, &sets[0].ap, sets[0].terms,
                           s0, n, g + s0 * n_ff, parallel, 2 * n_sel * n_ff, c0);
        c0 += few_job_init(k, &jobs[2 * e + 1], up_qtype, up_w[sel[e]], n_ff, n_embd, &su->ap, su->terms,
                           s0, n, u + s0 * n_ff, parallel, 2 * n_sel * n_ff, c0);
    }
    few_run(jobs, c0, panels, panel_stride, parallel);
    gr_glu(g, u, g, n_pairs * n_ff, GR_ACT_SILU, clamp);

    /* down of every expert over its pairs' rows */
    acts_prepare(k, &down_set, 1, n_pairs, buf, parallel);
    c0 = 0;
    for (int64_t e = 0; e < n_sel; e++) {
        const int64_t s0 = start[e], n = start[e + 1] - start[e];
        c0 += few_job_init(k, &jobs[e], down_qtype, down_w[sel[e]], n_embd, n_ff, &down_set.ap, down_set.terms,
                           s0, n, d + s0 * n_embd, parallel, n_sel * n_embd, c0);
    }
    few_run(jobs, c0, panels, panel_stride, parallel);

    /* weighted sum in expert-id order, pairs in index order within an expert: gr_moe_ffn's order */
    memset(y, 0, sizeof(float) * (size_t)(n_tok * n_embd));
    gr_moe_add_weighted(y, d, order, n_pairs, weights, n_used, n_embd);
done:
    api_unlock();
    free(jobs);
    return rc;
}
