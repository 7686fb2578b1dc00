/* Public entry points: argument checks, run-time ISA selection, activation quantization and the
 * threaded matmul driver. Kernels live in kernels_*.c; this file never touches SIMD itself.
 *
 * Every entry point takes one global mutex, so the library is safe to call from several Python
 * threads (calls run one after another; cffi releases the GIL while they run). */
#define _GNU_SOURCE
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
static int act_precision = 2;  /* gr_set_act_precision; guarded by api_mutex */

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
    pthread_mutex_lock(&api_mutex);
    isa_current = isa;
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}

int gr_set_act_precision(int p) {
    if (p != 1 && p != 2) return GR_E_ARG;
    pthread_mutex_lock(&api_mutex);
    act_precision = p;
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}

int gr_get_act_precision(void) {
    pthread_mutex_lock(&api_mutex);
    int p = act_precision;
    pthread_mutex_unlock(&api_mutex);
    return p;
}

int gr_threads_set(int n) {
    pthread_mutex_lock(&api_mutex);
    int r = gr_pool_set(n);
    pthread_mutex_unlock(&api_mutex);
    return r;
}

int gr_threads_get(void) {
    pthread_mutex_lock(&api_mutex);
    int r = gr_pool_threads();
    pthread_mutex_unlock(&api_mutex);
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
    pthread_mutex_lock(&api_mutex);
    tables[isa_current].dequantize[qtype](src, dst, n / bs);
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}

/* ---------------------------------------------------------------- activations */

int gr_quantize_activations(int act_qtype, const float *x, void *dst, int64_t n) {
    ensure_init();
    if (act_qtype < 0 || act_qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].quantize_act[act_qtype]) return GR_E_QTYPE;
    if (n <= 0 || n % gr_block_size(act_qtype)) return GR_E_SHAPE;
    pthread_mutex_lock(&api_mutex);
    tables[isa_current].quantize_act[act_qtype](x, dst, n);
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}

static void quantize_terms(const gr_kernels *k, int act_type, const float *x, uint8_t *q1, uint8_t *q2, int64_t n,
                           float *d, float *s, int64_t ld);

int gr_quantize_activation_terms(int act_qtype, const float *x, void *dst, int64_t n) {
    ensure_init();
    if (act_qtype < 0 || act_qtype >= GR_T_SLOTS || act_qtype == GR_T_F32 || !tables[GR_ISA_SCALAR].quantize_act[act_qtype])
        return GR_E_QTYPE;
    if (n <= 0 || n % gr_block_size(act_qtype)) return GR_E_SHAPE;
    pthread_mutex_lock(&api_mutex);
    uint8_t *q1 = dst;
    quantize_terms(&tables[isa_current], act_qtype, x, q1, q1 + row_bytes(act_qtype, n), n, NULL, NULL, 0);
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}

/* Scratch for quantized activations, grown on demand and kept between calls (guarded by api_mutex). */
static uint8_t *scratch;
static size_t scratch_size;

static uint8_t *scratch_reserve(size_t n) {
    if (n <= scratch_size) return scratch;
    size_t want = (n + 4095) & ~(size_t)4095;
    uint8_t *p = aligned_alloc(64, want);
    if (!p) return NULL;
    free(scratch);
    scratch = p;
    scratch_size = want;
    return scratch;
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

static inline float dot_terms(const matmul_task *m, const uint8_t *wr, int64_t t) {
    const uint8_t *a = m->act + t * m->terms * m->act_row_bytes;
    if (m->terms == 1) return m->dot(m->cols, wr, a);
    if (m->dot2) return m->dot2(m->cols, wr, a, a + m->act_row_bytes);
    return m->dot(m->cols, wr, a) + m->dot(m->cols, wr, a + m->act_row_bytes);
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

/* The tiled path needs this many activation rows (tokens x terms) to beat the decode kernels (gemv):
 * below it, packing a panel costs more than the tiles save. */
#ifndef GEMM_MIN_ACTS
#define GEMM_MIN_ACTS 4
#endif
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

/* Decode: threads claim chunks of rows; each group of gemv_rows rows is multiplied against every
 * token while it is in L1. */
typedef struct {
    const gr_gemm_ops *ops;
    const uint8_t *w;
    gr_act_panel ap;
    float *y;
    int64_t rows, cols, row_stride, n_tok, chunk_rows;
    int terms;
    atomic_llong next_chunk;
} gemv_task;

static void run_gemv(void *p, int ith, int nth) {
    gemv_task *g = p;
    (void)ith; (void)nth;
    const int R = g->ops->gemv_rows;
    float c[16];
    for (;;) {
        int64_t r0 = atomic_fetch_add(&g->next_chunk, 1) * g->chunk_rows;
        if (r0 >= g->rows) return;
        int64_t r1 = r0 + g->chunk_rows < g->rows ? r0 + g->chunk_rows : g->rows;
        for (int64_t r = r0; r < r1; r += R) {
            int nr = r1 - r < R ? (int)(r1 - r) : R;
            for (int64_t t = 0; t < g->n_tok; t++) {
                g->ops->gemv(nr, g->terms, g->cols, g->w + r * g->row_stride, g->row_stride, &g->ap, t * g->terms, c);
                for (int i = 0; i < nr; i++) g->y[t * g->rows + r + i] = c[i];
            }
        }
    }
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

int gr_matmul(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride,
              const float *x, int64_t n_tok, float *y) {
    ensure_init();
    if (qtype < 0 || qtype >= GR_T_SLOTS || !tables[GR_ISA_SCALAR].vec_dot[qtype]) return GR_E_QTYPE;
    int bs = gr_block_size(qtype);
    if (rows <= 0 || cols <= 0 || n_tok <= 0 || cols % bs || row_stride < row_bytes(qtype, cols)) return GR_E_SHAPE;

    pthread_mutex_lock(&api_mutex);
    const gr_kernels *k = &tables[isa_current];
    int nth = gr_pool_threads();
    int act_type = gr_act_type(qtype);
    /* Below this much work a wake-up of the pool costs more than it saves. */
    int parallel = (double)rows * (double)cols * (double)n_tok >= 65536.0 ? nth : 1;

    /* F32 activations are used as they are; every other format carries act_precision terms. */
    int terms = act_type == GR_T_F32 ? 1 : act_precision;
    int64_t n_act = n_tok * terms;
    const gr_gemm_ops *ops = &k->gemm[qtype];
    int tiled = ops->tile && n_act >= GEMM_MIN_ACTS;
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
        panel_ld = (cols / 32 + 8 + 15) & ~(int64_t)15;
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
    if (!buf) { pthread_mutex_unlock(&api_mutex); return GR_E_NOMEM; }
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
        pthread_mutex_unlock(&api_mutex);
        return GR_OK;
    }
    if (use_gemv) {
        gemv_task g = {0};
        g.ops = ops;
        g.w = w;
        g.ap.act = act; g.ap.act_row_bytes = act_row_bytes;
        g.ap.d = panel_d; g.ap.s = panel_s; g.ap.ld = panel_ld;
        g.y = y;
        g.rows = rows; g.cols = cols; g.row_stride = row_stride; g.n_tok = n_tok; g.terms = terms;
        int64_t chunk = rows / ((int64_t)parallel * 8);
        chunk = chunk < 16 ? 16 : chunk;
        g.chunk_rows = (chunk + 7) & ~(int64_t)7;
        atomic_init(&g.next_chunk, 0);
        gr_pool_run_dynamic(run_gemv, &g, parallel);
        pthread_mutex_unlock(&api_mutex);
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
    pthread_mutex_unlock(&api_mutex);
    return GR_OK;
}
