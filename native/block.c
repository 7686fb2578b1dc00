/* The attention half of a decoder block as one call: the ops a model file would otherwise drive from
 * Python one call each -- projections with the block's input norm folded in, biases, per-head norms and
 * rope with the KV store, attention, the output projection, an optional post-norm, the residual. Each step
 * is the public function that is tested on its own, called in the order the separate calls would run, so
 * the result is the same bits; what the call saves is the Python between them, ~30 us a layer (the
 * wrappers' buffer allocations and pointer conversions), about 8% of a SmolLM2 decode token. */
#include <stdlib.h>
#include "ggufrun.h"

int gr_attention_block(const gr_attn_block *b, const float *x, int64_t n_tok, const int32_t *pos,
                       const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache, int32_t *pos_cache,
                       int64_t n_kv, float *y) {
    if (!b || !x || !pos || !slots || !k_cache || !v_cache || !pos_cache || !y || b->n_proj < 3 || b->n_proj > 4)
        return GR_E_ARG;
    const int64_t qd = b->n_head * b->head_dim_k, kd = b->n_head_kv * b->head_dim_k;
    const int64_t vd = b->n_head_kv * b->head_dim_v, od = b->n_head * b->head_dim_v;
    if (n_tok <= 0 || n_kv <= 0 || b->rows[0] != qd || b->rows[1] != kd || b->rows[2] != vd ||
        (b->n_proj == 4 && b->rows[3] != b->n_head))
        return GR_E_SHAPE;
    const int64_t total = qd + kd + vd + (b->n_proj == 4 ? b->n_head : 0);
    float *buf = malloc(sizeof(float) * (size_t)(n_tok * (total + od)));
    if (!buf) return GR_E_NOMEM;
    /* gr_matmul_multi's layout: each projection's n_tok rows after the previous projection's */
    float *q = buf, *k = q + n_tok * qd, *v = k + n_tok * kd, *att = buf + n_tok * total;
    float *gate = b->n_proj == 4 ? v + n_tok * vd : NULL;
    int rc = gr_matmul_multi(b->n_proj, b->qtypes, b->w, b->rows, b->n_embd, x, n_tok, b->in_norm, b->eps, NULL, buf);
    if (rc != GR_OK) goto done;
    float *outs[3] = {q, k, v};
    const int64_t dims[3] = {qd, kd, vd};
    for (int i = 0; i < 3; i++)
        if (b->bias[i])
            for (int64_t t = 0; t < n_tok; t++)
                for (int64_t j = 0; j < dims[i]; j++) outs[i][t * dims[i] + j] += b->bias[i][j];
    rc = gr_qk_norm_rope(q, k, pos, n_tok, b->n_head, b->n_head_kv, b->head_dim_k, b->q_norm, b->k_norm, b->qk_eps,
                         b->n_rot, b->rope_mode, b->rope_base, b->freq_scale, b->freq_factors, v, b->head_dim_v, slots,
                         k_cache, v_cache, pos_cache);
    if (rc != GR_OK) goto done;
    rc = gr_attention(q, k_cache, v_cache, pos, pos_cache, att, n_tok, b->n_head, b->n_head_kv, n_kv, b->head_dim_k,
                      b->head_dim_v, b->scale, b->window, 0.0f, gate);
    if (rc != GR_OK) goto done;
    rc = gr_matmul(b->o_qtype, b->o_w, b->n_embd, od, b->o_row_stride, att, n_tok, y);
    if (rc != GR_OK) goto done;
    if (b->post_norm) gr_rms_norm(y, b->post_norm, y, n_tok, b->n_embd, b->eps);
    for (int64_t i = 0; i < n_tok * b->n_embd; i++) y[i] += x[i];
done:
    free(buf);
    return rc;
}
