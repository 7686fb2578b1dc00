/* The attention half of a decoder block as one call (a MoE layer's FFN and an MTP head as others,
 * below): the ops a model file would otherwise drive from Python one call each -- projections with the
 * block's input norm folded in, biases, per-head norms and rope with the KV store, attention, the output
 * projection, an optional post-norm, the residual. Each step is the public function that is tested on
 * its own, called in the order the separate calls would run, so the result is the same bits; what the
 * call saves is the Python between them, ~30 us a layer (the wrappers' buffer allocations and pointer
 * conversions), about 8% of a SmolLM2 decode token. */
#include <stdlib.h>
#include <string.h>
#include "blocks.h"
#include "threadpool.h"

/* ---- attention ----
 * The rows go through in pieces (one, or one per thread): piece [t0, t1) keeps its projections at
 * buf + t0 * total, each projection's rows after the previous projection's (gr_matmul_multi's layout);
 * the attention outputs of all rows follow at buf + n_tok * total. */
typedef struct {
    const gr_attn_block *b;
    const float *x;
    int64_t n_tok, r0, n_kv, qd, kd, vd, od, total;
    const int32_t *pos, *slots;
    uint16_t *k_cache, *v_cache;
    int32_t *pos_cache;
    float *buf, *y;
} attn_rows;

static double attn_bytes(const void *layer, int64_t rows) {
    const gr_attn_block *b = layer;
    (void)rows;
    double n = (double)b->n_embd * (double)b->o_row_stride;
    for (int i = 0; i < b->n_proj; i++) n += gr_packed_bytes(b->qtypes[i], b->rows[i], b->n_embd);
    return n;
}

/* Rows [t0, t1): projections with the input norm folded in, biases, q/k norms and rope, and their keys,
 * values and positions into the cache. */
static int attn_store_rows(void *p, int64_t t0, int64_t t1) {
    const attn_rows *a = p;
    const gr_attn_block *b = a->b;
    const int64_t n = t1 - t0;
    float *q = a->buf + t0 * a->total, *k = q + n * a->qd, *v = k + n * a->kd;
    int rc = gr_matmul_multi(b->n_proj, b->qtypes, b->w, b->rows, b->n_embd, a->x + t0 * b->n_embd, n, b->in_norm,
                             b->eps, NULL, q);
    if (rc != GR_OK) return rc;
    float *outs[3] = {q, k, v};
    const int64_t dims[3] = {a->qd, a->kd, a->vd};
    for (int i = 0; i < 3; i++)
        if (b->bias[i])
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = 0; j < dims[i]; j++) outs[i][t * dims[i] + j] += b->bias[i][j];
    return gr_qk_norm_rope(q, k, a->pos + t0, n, b->n_head, b->n_head_kv, b->head_dim_k, b->q_norm, b->k_norm,
                           b->qk_eps, b->n_rot, b->rope_mode, b->rope_base, b->freq_scale, b->freq_factors, v,
                           b->head_dim_v, a->slots + t0, a->k_cache, a->v_cache, a->pos_cache);
}

/* The output rows (those from r0 on) of piece [t0, t1), once every row's keys are stored: attention
 * over the cache, the output projection, the post-norm and the residual. */
static int attn_output_rows(void *p, int64_t t0, int64_t t1) {
    const attn_rows *a = p;
    const gr_attn_block *b = a->b;
    const int64_t s = t0 > a->r0 ? t0 : a->r0, m = t1 - s;
    if (m <= 0) return GR_OK;
    const float *piece = a->buf + t0 * a->total;
    const float *q = piece + (s - t0) * a->qd;
    const float *gate = b->n_proj == 4 ? piece + (t1 - t0) * (a->qd + a->kd + a->vd) + (s - t0) * b->n_head : NULL;
    float *att = a->buf + a->n_tok * a->total + (s - a->r0) * a->od, *y = a->y + (s - a->r0) * b->n_embd;
    int rc = gr_attention(q, a->k_cache, a->v_cache, a->pos + s, a->pos_cache, att, m, b->n_head, b->n_head_kv,
                          a->n_kv, b->head_dim_k, b->head_dim_v, b->scale, b->window, 0.0f, gate);
    if (rc == GR_OK) rc = gr_matmul(b->o_qtype, b->o_w, b->n_embd, a->od, b->o_row_stride, att, m, y);
    if (rc != GR_OK) return rc;
    if (b->post_norm) gr_rms_norm(y, b->post_norm, y, m, b->n_embd, b->eps);
    for (int64_t i = 0; i < m * b->n_embd; i++) y[i] += a->x[s * b->n_embd + i];
    return GR_OK;
}

int gr_attention_block(const gr_attn_block *b, const float *x, int64_t n_tok, int64_t n_out, const int32_t *pos,
                       const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache, int32_t *pos_cache,
                       int64_t n_kv, float *y) {
    if (!b || !x || !pos || !slots || !k_cache || !v_cache || !pos_cache || (n_out && !y) || b->n_proj < 3 ||
        b->n_proj > 4 || n_out < 0 || n_out > n_tok)
        return GR_E_ARG;
    const int64_t qd = b->n_head * b->head_dim_k, kd = b->n_head_kv * b->head_dim_k;
    const int64_t vd = b->n_head_kv * b->head_dim_v, od = b->n_head * b->head_dim_v;
    if (n_tok <= 0 || n_kv <= 0 || b->rows[0] != qd || b->rows[1] != kd || b->rows[2] != vd ||
        (b->n_proj == 4 && b->rows[3] != b->n_head))
        return GR_E_SHAPE;
    const int64_t total = qd + kd + vd + (b->n_proj == 4 ? b->n_head : 0);
    attn_rows a = {b, x, n_tok, n_tok - n_out, n_kv, qd, kd, vd, od, total, pos, slots, k_cache, v_cache, pos_cache,
                   NULL, y};
    if (!(a.buf = malloc(sizeof(float) * (size_t)(n_tok * (total + od))))) return GR_E_NOMEM;
    const int pieces = gr_split_pieces(n_tok, attn_bytes, b);
    int rc = gr_split_rows(attn_store_rows, &a, n_tok, pieces);
    if (rc == GR_OK && n_out) {
        /* the last n_out rows go on (a query's attention does not depend on the others of its batch, nor
         * a row's products on the other rows); the rows before only stored their keys and values */
        const int64_t last = gr_piece_start(n_tok, pieces, pieces - 1);   /* the last piece's first row */
        if (last > a.r0) rc = gr_split_rows(attn_output_rows, &a, n_tok, pieces);   /* output rows in two+ */
        else rc = attn_output_rows(&a, last, n_tok);
    }
    free(a.buf);
    return rc;
}

/* ---- MoE ---- */
typedef struct {
    const gr_moe_layer *b;
    const float *x, *norm_w;
    float eps;
    int32_t *ids;
    float *weights, *y;
} moe_rows;

static double moe_bytes(const void *layer, int64_t rows) {
    const gr_moe_layer *b = layer;
    int64_t n_sel = rows * b->n_used < b->n_expert ? rows * b->n_used : b->n_expert;
    double n = gr_packed_bytes(b->router_qtype, b->n_expert, b->n_embd) +
               (double)n_sel * gr_ffn_bytes(b->gate_qtype, b->up_qtype, b->down_qtype, b->n_embd, b->n_ff);
    if (b->shared_n_ff > 0)
        n += gr_ffn_bytes(b->shared_qtypes[0], b->shared_qtypes[1], b->shared_qtypes[2], b->n_embd, b->shared_n_ff);
    return n;
}

/* Rows [t0, t1): the router product with the norm folded in (which also hands back the normed input),
 * the top-k choice, the routed experts and the shared expert. */
static int moe_block_rows(void *p, int64_t t0, int64_t t1) {
    const moe_rows *m = p;
    const gr_moe_layer *b = m->b;
    const int64_t n_embd = b->n_embd, n = t1 - t0;
    const float *x = m->x + t0 * n_embd;
    int32_t *ids = m->ids + t0 * b->n_used;
    float *weights = m->weights + t0 * b->n_used, *y = m->y + t0 * n_embd;
    float *buf = malloc(sizeof(float) * (size_t)(n * (2 * n_embd + b->n_expert)));
    if (!buf) return GR_E_NOMEM;
    float *xn = buf, *shared = xn + n * n_embd, *logits = shared + n * n_embd;
    const int64_t rows = b->n_expert;
    int rc = gr_matmul_multi(1, &b->router_qtype, &b->router_w, &rows, n_embd, x, n, m->norm_w, m->eps,
                             m->norm_w ? xn : NULL, logits);
    const float *xin = m->norm_w ? xn : x;
    if (rc == GR_OK)
        rc = gr_moe_route(logits, n, b->n_expert, b->n_used, b->gating, b->bias, b->norm_weights, b->weights_scale,
                          ids, weights);
    if (rc == GR_OK)
        rc = gr_moe_ffn(b->gate_qtype, b->gate_w, b->up_qtype, b->up_w, b->down_qtype, b->down_w, b->n_expert,
                        n_embd, b->n_ff, xin, n, b->n_used, ids, weights, b->limit, y);
    if (rc == GR_OK && b->shared_n_ff > 0) {
        rc = gr_ffn(b->shared_qtypes[0], b->shared_w[0], b->shared_qtypes[1], b->shared_w[1], b->shared_qtypes[2],
                    b->shared_w[2], n_embd, b->shared_n_ff, xin, n, NULL, 0.0f, GR_ACT_SILU, b->shared_clamp, shared);
        if (rc == GR_OK)
            for (int64_t i = 0; i < n * n_embd; i++) y[i] += shared[i];
    }
    free(buf);
    return rc;
}

/* A MoE layer's FFN as one call: each piece of rows (all of them, or one per thread, see token split)
 * through the public functions a model file would call, in that order, so the result is their bits. */
int gr_moe_block(const gr_moe_layer *b, const float *x, int64_t n_tok, const float *norm_w, float eps,
                 int32_t *ids, float *weights, float *y) {
    if (!b || !x || !ids || !weights || !y || n_tok <= 0) return GR_E_ARG;
    moe_rows m = {b, x, norm_w, eps, ids, weights, y};
    return gr_split_rows(moe_block_rows, &m, n_tok, gr_split_pieces(n_tok, moe_bytes, b));
}

int gr_moe_block_pieces(const gr_moe_layer *b, int64_t n_tok) {
    if (!b || n_tok <= 0) return GR_E_ARG;
    return gr_split_pieces(n_tok, moe_bytes, b);
}

/* An MTP head's rows in one call (the draft's hot path: three heads a step, each otherwise a dozen
 * Python-driven calls, ~0.1 ms a head of the trained model's ~0.3). */
int gr_mtp_head_forward(const gr_mtp_head *m, const int32_t *tokens, const float *h_prev, int64_t n_tok,
                        int64_t n_out, const int32_t *pos, const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache,
                        int32_t *pos_cache, int64_t n_kv, int32_t *ids, float *weights, float *h_out,
                        int64_t n_logits, float *logits) {
    if (!m || !m->attn || !tokens || !h_prev || n_out < 0 || n_out > n_tok ||
        (n_out && (!h_out || (m->moe && (!ids || !weights)))) || (logits && (n_logits < 1 || n_logits > m->n_vocab)))
        return GR_E_ARG;
    if (n_tok <= 0 || m->n_embd <= 0 || m->attn->n_embd != m->n_embd || (m->moe && m->moe->n_embd != m->n_embd))
        return GR_E_SHAPE;
    const int64_t d = m->n_embd;
    float *buf = malloc(sizeof(float) * (size_t)(n_tok * 5 * d));
    if (!buf) return GR_E_NOMEM;
    float *e = buf, *x2 = e + n_tok * d, *x = x2 + 2 * n_tok * d, *h = x + n_tok * d;
    int rc = gr_get_rows(m->embd_qtype, m->embd, m->n_vocab, d, tokens, n_tok, e);
    for (int64_t t = 0; t < n_tok && rc == GR_OK; t++) {   /* concat(enorm(e), hnorm(h_prev)), row by row */
        rc = gr_rms_norm(e + t * d, m->enorm, x2 + t * 2 * d, 1, d, m->eps);
        if (rc == GR_OK) rc = gr_rms_norm(h_prev + t * d, m->hnorm, x2 + t * 2 * d + d, 1, d, m->eps);
    }
    if (rc == GR_OK) {
        const int64_t eh_stride = 2 * d / gr_block_size(m->eh_qtype) * gr_type_size(m->eh_qtype);
        rc = gr_matmul(m->eh_qtype, m->eh_w, d, 2 * d, eh_stride, x2, n_tok, x);
    }
    if (rc == GR_OK) rc = gr_attention_block(m->attn, x, n_tok, n_out, pos, slots, k_cache, v_cache, pos_cache, n_kv, h);
    if (rc == GR_OK && n_out) {
        if (m->moe) rc = gr_moe_block(m->moe, h, n_out, m->ffn_norm, m->eps, ids, weights, h_out);
        else rc = gr_ffn(m->ffn_qtypes[0], m->ffn_w[0], m->ffn_qtypes[1], m->ffn_w[1], m->ffn_qtypes[2], m->ffn_w[2],
                         d, m->n_ff, h, n_out, m->ffn_norm, m->eps, GR_ACT_SILU, m->ffn_clamp, h_out);
    }
    if (rc == GR_OK && n_out) {
        for (int64_t i = 0; i < n_out * d; i++) h_out[i] += h[i];
        if (logits)
            rc = gr_matmul_multi(1, &m->head_qtype, &m->head_w, &n_logits, d, h_out + (n_out - 1) * d, 1,
                                 m->head_norm, m->eps, NULL, logits);
    }
    free(buf);
    return rc;
}

int gr_mtp_draft_greedy(const gr_mtp_chain_head *heads, int n_heads, const int32_t *tokens, int64_t tokens_from,
                        int64_t n_past, int32_t id_last, const float *h_hist, int64_t n_logits, int32_t *drafts) {
    if (!heads || n_heads <= 0 || n_past < 0 || (n_past && !h_hist) || !drafts || !heads[0].head ||
        n_logits < 1 || n_logits > heads[0].head->n_vocab)
        return GR_E_ARG;
    int64_t max_rows = 0;
    for (int i = 0; i < n_heads; i++) {
        const gr_mtp_chain_head *c = &heads[i];
        if (!c->head || c->start < 0 || c->start > n_past || c->n_slots <= 0 ||
            (c->start < n_past && (!tokens || c->start < tokens_from)))
            return GR_E_ARG;
        if (!c->ring && n_past + i >= c->n_slots) return GR_E_ARG;   /* checked before any head writes */
        if (c->head->n_embd != heads[0].head->n_embd || c->head->n_vocab != heads[0].head->n_vocab) return GR_E_SHAPE;
        if (n_past - c->start + i + 1 > max_rows) max_rows = n_past - c->start + i + 1;
    }
    const int64_t d = heads[0].head->n_embd;
    /* per row: token, position, slot, h in; then the chain's outputs (each head's last row) and logits */
    int32_t *ibuf = malloc(sizeof(int32_t) * (size_t)(3 * max_rows));
    float *fbuf = malloc(sizeof(float) * (size_t)(max_rows * d + (int64_t)n_heads * d + n_logits));
    int rc = ibuf && fbuf ? GR_OK : GR_E_NOMEM;
    int32_t *toks = ibuf, *pos = toks + max_rows, *slots = pos + max_rows;
    float *h_in = fbuf, *chain = h_in + max_rows * d, *logits = chain + n_heads * d;
    for (int i = 0; i < n_heads && rc == GR_OK; i++) {
        const gr_mtp_chain_head *c = &heads[i];
        const int64_t n = n_past - c->start + i + 1;
        for (int64_t r = 0; r < n; r++) {
            const int64_t p = c->start + r;
            pos[r] = (int32_t)p;
            slots[r] = (int32_t)(c->ring ? p % c->n_slots : p);
            float *h = h_in + r * d;
            if (p < n_past) toks[r] = tokens[p - tokens_from];
            else toks[r] = p == n_past ? id_last : drafts[p - n_past - 1];
            if (p <= n_past) {
                if (p == 0) memset(h, 0, sizeof(float) * (size_t)d);
                else memcpy(h, h_hist + (p - 1) * d, sizeof(float) * (size_t)d);
            } else {
                memcpy(h, chain + (p - n_past - 1) * d, sizeof(float) * (size_t)d);
            }
        }
        rc = gr_mtp_head_forward(c->head, toks, h_in, n, 1, pos, slots, c->k_cache, c->v_cache, c->pos_cache,
                                 c->ring ? c->n_slots : n_past + i + 1, c->ids, c->weights, chain + (int64_t)i * d,
                                 n_logits, logits);
        if (rc != GR_OK) break;
        int64_t best = 0;
        for (int64_t j = 1; j < n_logits; j++)
            if (logits[j] > logits[best]) best = j;
        drafts[i] = (int32_t)best;
    }
    free(ibuf);
    free(fbuf);
    return rc;
}
