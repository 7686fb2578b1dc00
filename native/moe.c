/* Mixture-of-experts feed-forward: every selected expert of a batch in one call.
 *
 * gr_moe_route turns the router's logits into the token -> expert assignment with its weights (numpy
 * took ~100 us a layer for a decoded token's few hundred scores); gr_moe_ffn groups the tokens by expert, so each active expert does one
 * matrix-matrix product per weight (gate, up, down) over all the tokens that chose it, applies the
 * (optionally clamped) SwiGLU, and accumulates the weighted outputs. Products go through gr_matmul, so
 * the quant types, activation precision and threading are exactly those of every other matmul.
 * One token (decode) takes gr_moe_decode instead (dispatch.c): x quantized once, every selected expert's
 * gate and up rows in one pass of the pool, then every down in a second: two pool wake-ups instead of
 * three per expert, the same kernels and summation order, so the same bits.
 *
 * A few tokens (n_tok <= GR_MOE_FEW_TOKENS: an MTP verify, the draft heads' rows) take gr_moe_few
 * (dispatch.c): the same grouping and kernels, but every expert's gate and up in one pool pass and
 * every down in a second, so the same bits with two pool wake-ups instead of three per expert.
 *
 * Experts are addressed by pointer, one per expert per weight: the caller decides where an expert's
 * bytes live (a slice of the mapped 3-D tensor today, a resident copy for hot experts later). Only
 * the selected experts' bytes are read.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "blocks.h"

int gr_moe_ffn(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
               int down_qtype, const void *const *down_w, int64_t n_expert, int64_t n_embd, int64_t n_ff,
               const float *x, int64_t n_tok, int64_t n_used, const int32_t *ids, const float *weights,
               float limit, float *y) {
    if (n_expert <= 0 || n_embd <= 0 || n_ff <= 0 || n_tok <= 0 || n_used <= 0) return GR_E_SHAPE;
    int bs_g = gr_block_size(gate_qtype), bs_u = gr_block_size(up_qtype), bs_d = gr_block_size(down_qtype);
    if (!bs_g || !bs_u || !bs_d) return GR_E_QTYPE;
    if (n_embd % bs_g || n_embd % bs_u || n_ff % bs_d) return GR_E_SHAPE;
    const int64_t n_pairs = n_tok * n_used;
    for (int64_t i = 0; i < n_pairs; i++)
        if (ids[i] < 0 || ids[i] >= n_expert) return GR_E_ARG;
    if (gr_moe_decode_ok(gate_qtype, up_qtype, down_qtype, n_tok))
        return gr_moe_decode(gate_qtype, gate_w, up_qtype, up_w, down_qtype, down_w, n_embd, n_ff, x, n_used, ids,
                             weights, limit > 1e-6f ? limit : 0.0f, y);
    const int64_t gate_rb = n_embd / bs_g * gr_type_size(gate_qtype);
    const int64_t up_rb = n_embd / bs_u * gr_type_size(up_qtype);
    const int64_t down_rb = n_ff / bs_d * gr_type_size(down_qtype);

    /* Counting sort of the (token, slot) pairs by expert: order[] lists pair indices expert by expert. */
    int64_t *start = calloc((size_t)n_expert + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)n_pairs);
    int64_t max_rows = 0;
    if (!start || !order) { free(start); free(order); return GR_E_NOMEM; }
    for (int64_t i = 0; i < n_pairs; i++) start[ids[i] + 1]++;
    for (int64_t e = 0; e < n_expert; e++) {
        if (start[e + 1] > max_rows) max_rows = start[e + 1];
        start[e + 1] += start[e];
    }
    {
        int64_t *fill = malloc(sizeof(int64_t) * (size_t)n_expert);
        if (!fill) { free(start); free(order); return GR_E_NOMEM; }
        memcpy(fill, start, sizeof(int64_t) * (size_t)n_expert);
        for (int64_t i = 0; i < n_pairs; i++) order[fill[ids[i]]++] = i;
        free(fill);
    }
    /* A few tokens (an MTP verify, a draft head's rows): every expert in two pool passes (dispatch.c),
     * the products and sums below, bit for bit; larger batches keep one gr_matmul per product, whose
     * pool passes and activation quantizations are then a small part of the work. */
    if (gr_moe_few_ok(gate_qtype, up_qtype, down_qtype, n_tok, n_embd, n_ff)) {
        int32_t *sel = malloc(sizeof(int32_t) * (size_t)n_expert);
        int64_t *sel_start = malloc(sizeof(int64_t) * (size_t)(n_expert + 1));
        int rc = GR_E_NOMEM;
        if (sel && sel_start) {
            int64_t n_sel = 0;
            for (int64_t e = 0; e < n_expert; e++)
                if (start[e + 1] > start[e]) { sel[n_sel] = (int32_t)e; sel_start[n_sel++] = start[e]; }
            sel_start[n_sel] = n_pairs;
            rc = gr_moe_few(gate_qtype, gate_w, up_qtype, up_w, down_qtype, down_w, n_embd, n_ff, x, n_tok, n_used,
                            n_sel, sel, sel_start, order, weights, limit > 1e-6f ? limit : 0.0f, y);
        }
        free(sel); free(sel_start); free(start); free(order);
        return rc;
    }

    /* Scratch for the largest expert group: gathered inputs, gate, up, down outputs. */
    float *xs = malloc(sizeof(float) * (size_t)(max_rows * n_embd));
    float *g = malloc(sizeof(float) * (size_t)(max_rows * n_ff));
    float *u = malloc(sizeof(float) * (size_t)(max_rows * n_ff));
    float *d = malloc(sizeof(float) * (size_t)(max_rows * n_embd));
    int rc = GR_OK;
    if (!xs || !g || !u || !d) { rc = GR_E_NOMEM; goto done; }

    memset(y, 0, sizeof(float) * (size_t)(n_tok * n_embd));
    for (int64_t e = 0; e < n_expert; e++) {
        const int64_t n = start[e + 1] - start[e];
        if (!n) continue;
        const int64_t *pairs = order + start[e];
        for (int64_t r = 0; r < n; r++)
            memcpy(xs + r * n_embd, x + pairs[r] / n_used * n_embd, sizeof(float) * (size_t)n_embd);
        if ((rc = gr_matmul(gate_qtype, gate_w[e], n_ff, n_embd, gate_rb, xs, n, g)) != GR_OK) goto done;
        if ((rc = gr_matmul(up_qtype, up_w[e], n_ff, n_embd, up_rb, xs, n, u)) != GR_OK) goto done;
        gr_glu(g, u, g, n * n_ff, GR_ACT_SILU, limit > 1e-6f ? limit : 0.0f);
        if ((rc = gr_matmul(down_qtype, down_w[e], n_embd, n_ff, down_rb, g, n, d)) != GR_OK) goto done;
        /* experts are visited in id order, so a token's sum does not depend on the batch around it */
        gr_moe_add_weighted(y, d, pairs, n, weights, n_used, n_embd);
    }
done:
    free(xs); free(g); free(u); free(d);
    free(start); free(order);
    return rc;
}

/* llama.cpp's build_moe_ffn choice: probabilities (softmax over the experts, or one sigmoid per expert),
 * the n_used largest of probability + bias (ties to the lower expert id; NaN ranks last), their unbiased
 * probabilities as weights, normalised to sum to one if norm (a sum below 2^-14 counts as 2^-14, ggml's
 * clamp), times scale. */
int gr_moe_route(const float *logits, int64_t n_tok, int64_t n_expert, int64_t n_used, int gating,
                 const float *bias, int norm, float scale, int32_t *ids, float *weights) {
    if (n_tok <= 0 || n_expert <= 0 || n_used <= 0 || n_used > n_expert) return GR_E_SHAPE;
    if (gating != GR_GATING_SOFTMAX && gating != GR_GATING_SIGMOID) return GR_E_ARG;
    float *p = malloc(sizeof(float) * (size_t)n_expert);
    if (!p) return GR_E_NOMEM;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *l = logits + t * n_expert;
        if (gating == GR_GATING_SIGMOID) {
            for (int64_t e = 0; e < n_expert; e++) p[e] = 1.0f / (1.0f + expf(-l[e]));
        } else {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t e = 0; e < n_expert; e++) if (l[e] > mx) mx = l[e];
            for (int64_t e = 0; e < n_expert; e++) sum += (p[e] = expf(l[e] - mx));
            for (int64_t e = 0; e < n_expert; e++) p[e] /= sum;
        }
        /* insertion into the sorted top n_used: a later expert goes after an equal earlier one */
        int32_t *top = ids + t * n_used;
        float *w = weights + t * n_used;   /* the selection scores while sorting, weights after */
        int64_t count = 0;
        for (int64_t e = 0; e < n_expert; e++) {
            float v = bias ? p[e] + bias[e] : p[e];
            if (isnan(v)) v = -INFINITY;
            if (count == n_used && !(v > w[n_used - 1])) continue;
            int64_t pos = count < n_used ? count++ : n_used - 1;
            while (pos > 0 && v > w[pos - 1]) { w[pos] = w[pos - 1]; top[pos] = top[pos - 1]; pos--; }
            w[pos] = v; top[pos] = (int32_t)e;
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < n_used; k++) sum += (w[k] = p[top[k]]);
        const float div = sum < 6.103515625e-5f ? 6.103515625e-5f : sum;
        for (int64_t k = 0; k < n_used; k++) {
            if (norm) w[k] /= div;
            w[k] *= scale;
        }
    }
    free(p);
    return GR_OK;
}
