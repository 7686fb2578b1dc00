/* ggufrun native kernel library: the C side of the Python/C boundary.
 *
 * Python decides, C computes. Every entry point takes raw pointers into memory Python owns (mapped file
 * views, numpy arrays) and never keeps them after returning. Quant types use ggml's numbering
 * (gguf.GGMLQuantizationType): F32=0 F16=1 Q4_0=2 Q4_1=3 Q5_0=6 Q5_1=7 Q8_0=8 Q8_1=9 Q2_K=10 Q3_K=11
 * Q4_K=12 Q5_K=13 Q6_K=14 Q8_K=15 IQ4_NL=20 IQ4_XS=23 BF16=30 MXFP4=39.
 *
 * Return values: 0 on success, negative on error (GR_E_*). Errors are argument errors the Python side
 * should have caught; they exist so a bad call never reads out of bounds.
 */
#ifndef GGUFRUN_H
#define GGUFRUN_H
#include <stddef.h>
#include <stdint.h>

#define GR_OK 0
#define GR_E_QTYPE -1   /* quant type not supported by this entry point */
#define GR_E_SHAPE -2   /* element count not a multiple of the block size, or non-positive size */
#define GR_E_ISA   -3   /* requested ISA path not available on this CPU / build */
#define GR_E_NOMEM -4   /* scratch allocation for the quantized activations failed */
#define GR_E_ARG   -5   /* an argument outside its documented range */

/* ISA paths, best last. gr_isa_available() is a bitmask of (1 << GR_ISA_x). */
#define GR_ISA_SCALAR 0
#define GR_ISA_AVX2   1
#define GR_ISA_AVX512 2
#define GR_ISA_NEON   3

int  gr_isa_available(void);
int  gr_isa_get(void);           /* the path in use: best available unless forced */
int  gr_isa_set(int isa);        /* force a path (tests); GR_E_ISA if unavailable */

/* Thread pool: persistent workers, created on first use or by gr_threads_set. */
int  gr_threads_set(int n);      /* n <= 0: physical core count */
int  gr_threads_get(void);

/* Block geometry, for the Python side to validate sizes with. */
int  gr_block_size(int qtype);   /* elements per block, 0 if unknown */
int  gr_type_size(int qtype);    /* bytes per block, 0 if unknown */

/* Dequantize n elements (a multiple of the block size) of type qtype at src into dst (float32). */
int  gr_dequantize(int qtype, const void *src, float *dst, int64_t n);
/* Rows ids[0..n) of an (n_rows, n_cols) qtype matrix of packed rows at table (an embedding), dequantized
 * into dst (n, n_cols): only those rows' bytes are read. GR_E_ARG for an id outside [0, n_rows). */
int  gr_get_rows(int qtype, const void *table, int64_t n_rows, int64_t n_cols, const int32_t *ids, int64_t n,
                 float *dst);

/* y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tok, r < rows.
 * W: rows rows of cols elements of qtype, row r at w + r * row_stride bytes (row_stride >= cols / block *
 * type_size). x: n_tok rows of cols floats (contiguous). y: n_tok rows of rows floats (contiguous).
 * Activations are quantized the way ggml pairs them with the weight type (Q8_0, Q8_1, Q8_K, F16, BF16,
 * F32) and products use integer dot products; how many terms carry the activations is set by
 * gr_set_act_precision. Work is split over the thread pool; the caller's thread participates. */
int  gr_matmul(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride,
               const float *x, int64_t n_tok, float *y);

/* Activation precision of gr_matmul, process-wide (default 2).
 * 1: one term, exactly llama.cpp's CPU backend: results match it to float rounding, and carry its
 *    activation quantization error (about 1/254 of each block's largest value for the Q8 formats).
 * 2: two terms: x is quantized (q1), the residual x - q1 is quantized again in the same format (q2), and
 *    y = W.q1 + W.q2 through the same integer kernels in one pass over each weight row. The activation
 *    error shrinks by the format's resolution again (~1/250 for Q8, ~1/2000 for F16, ~1/250 for BF16),
 *    for twice the integer work. F32 activations are unaffected.
 * Returns GR_E_ARG for any other value. */
int  gr_set_act_precision(int p);
int  gr_get_act_precision(void);

/* The activation format gr_matmul pairs with qtype (ggml's vec_dot_type), or GR_E_QTYPE. */
int  gr_vec_dot_type(int qtype);

/* Convert n floats (a multiple of the format's block size) into activation format act_qtype (F16, BF16,
 * Q8_0, Q8_1 or Q8_K) exactly as gr_matmul does internally: lets tests check the bytes against a
 * reference, and callers reuse a quantized activation. dst holds n / block * type_size bytes. */
int  gr_quantize_activations(int act_qtype, const float *x, void *dst, int64_t n);

/* The two terms gr_matmul uses at act precision 2, as two consecutive rows in dst (2 * n / block *
 * type_size bytes): q1 = the above, q2 = the same format's quantization of x - deq(q1) (0 where deq(q1)
 * is not finite); for Q8_1, q2's s values are fp16(d1*sum(q1) + d2*sum(q2) - s1), so s1 + s2 is the
 * exact sum of both terms' values. */
int  gr_quantize_activation_terms(int act_qtype, const float *x, void *dst, int64_t n);

/* Several matrices applied to the same input: y_i = W_i x for i < n_mat (1..8), W_i rows[i] packed rows of
 * cols elements of qtypes[i] at w[i]. With norm_w not NULL, x is first replaced by rms_norm(x) * norm_w
 * (gr_rms_norm's arithmetic, eps), which is also copied to x_normed when that is not NULL. y holds the
 * outputs one after another: output i is n_tok rows of rows[i] floats at y + n_tok * (rows[0] + ... +
 * rows[i-1]). Each output is bit for bit what gr_matmul gives; for decode (as few tokens as gr_matmul's
 * gemv kernels take) the input is quantized once per activation format and all rows of all matrices are
 * one pass of the thread pool. */
int  gr_matmul_multi(int n_mat, const int *qtypes, const void *const *w, const int64_t *rows, int64_t cols,
                     const float *x, int64_t n_tok, const float *norm_w, float eps, float *x_normed, float *y);

/* Dense gated feed-forward network in one call: y = down(act(gate(x')) * up(x')), act and clamp as
 * gr_glu, x' = x or (norm_w not NULL) rms_norm(x) * norm_w. gate/up: n_ff packed rows of n_embd
 * elements, down: n_embd rows of n_ff. x, y: (n_tok, n_embd) float32. Gate and up share one
 * quantization of x' and one pool pass for decode; results equal the separate calls bit for bit. */
int  gr_ffn(int gate_qtype, const void *gate_w, int up_qtype, const void *up_w, int down_qtype, const void *down_w,
            int64_t n_embd, int64_t n_ff, const float *x, int64_t n_tok, const float *norm_w, float eps,
            int act, float clamp, float *y);

/* ---- ops ---- (native/ops.c: the element-wise and attention math around the matmuls) */
#define GR_ROPE_NORM 0   /* rotate adjacent pairs (llama-family GGUFs) */
#define GR_ROPE_NEOX 2   /* rotate the two halves of the rotated dimensions */
#define GR_ACT_SILU 0
#define GR_ACT_GELU 1

int  gr_ops_simd(int on);  /* 1: AVX2/F16C inner loops where the CPU has them (default); 0: portable C */
/* y[r] = x[r] / rms(x[r]) * w (w may be NULL), rows of dim floats; y may alias x. */
int  gr_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps);
/* In place on x (n_tok, n_head, head_dim): rotate the first n_rot dims of each head by pos[t]. */
int  gr_rope(float *x, const int32_t *pos, int64_t n_tok, int64_t n_head, int64_t head_dim, int n_rot,
             int mode, float base, float freq_scale, const float *freq_factors);
/* q (n_tok, n_head, head_dim) and k (n_tok, n_head_kv, head_dim) in place: each head RMS-normed with q_norm /
 * k_norm (head_dim weights; NULL: no norm) as gr_rms_norm, then rotated as gr_rope; the same bits as those
 * calls one by one. With slots (else NULL), token t's key, its value v[t] (n_head_kv x head_dim_v) and
 * pos[t] are then stored at row slots[t] of the float16 caches k_cache, v_cache and of pos_cache
 * (rounded to nearest even). */
int  gr_qk_norm_rope(float *q, float *k, const int32_t *pos, int64_t n_tok, int64_t n_head, int64_t n_head_kv,
                     int64_t head_dim, const float *q_norm, const float *k_norm, float eps, int n_rot, int mode,
                     float base, float freq_scale, const float *freq_factors, const float *v, int64_t head_dim_v,
                     const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache, int32_t *pos_cache);
/* out = act(gate) * up over n floats; clamp > 0 caps act(gate) at clamp and clips up to [-clamp, clamp]. */
int  gr_glu(const float *gate, const float *up, float *out, int64_t n, int act, float clamp);
/* Causal attention of n_q queries (n_q, n_head, dk) over n_kv cached slots of float16 keys
 * (n_kv, n_head_kv, dk) and values (n_kv, n_head_kv, dv) at positions k_pos; a key is visible when
 * 0 <= q_pos - k_pos (< window if window > 0). out: (n_q, n_head, dv). softcap > 0 caps the scores.
 * gate: NULL, or (n_q, n_head) floats: head h of query i is then scaled by sigmoid(gate[i, h]) (step35). */
int  gr_attention(const float *q, const uint16_t *k, const uint16_t *v, const int32_t *q_pos,
                  const int32_t *k_pos, float *out, int64_t n_q, int64_t n_head, int64_t n_head_kv,
                  int64_t n_kv, int64_t dk, int64_t dv, float scale, int window, float softcap,
                  const float *gate);

/* ---- block ---- (native/block.c: the attention half of a decoder block in one call) */
/* What a layer's attention is: the projections of its input (q, k, v and, with n_proj 4, a per-head
 * output gate, gr_attention's gate: step35), given as gr_matmul_multi takes them, with the block's input
 * RMS norm (in_norm, or NULL) and its eps; q/k/v biases (or NULL); per-head q/k norms and rope as
 * gr_qk_norm_rope takes them; gr_attention's scale and window; the output projection (n_embd rows of
 * n_head * head_dim_v, o_row_stride bytes a row); post_norm (or NULL): an RMS norm of the projected
 * output before the residual (gemma3), with eps. */
typedef struct {
    int n_proj;
    int qtypes[4];
    const void *w[4];
    int64_t rows[4];
    int64_t n_embd;
    const float *in_norm;
    float eps;
    const float *bias[3];
    int64_t n_head, n_head_kv, head_dim_k, head_dim_v;
    const float *q_norm, *k_norm;
    float qk_eps;
    int n_rot, rope_mode;
    float rope_base, freq_scale;
    const float *freq_factors;
    float scale;
    int window;
    int o_qtype;
    const void *o_w;
    int64_t o_row_stride;
    const float *post_norm;
} gr_attn_block;
/* y = x + post_norm(attn_output(attention(...))) for x (n_tok, n_embd) at positions pos: the chain of
 * gr_matmul_multi, bias adds, gr_qk_norm_rope (storing this batch's keys, values and positions at rows
 * `slots` of the layer's caches), gr_attention over the first n_kv cache rows, gr_matmul, gr_rms_norm and
 * the residual add, the same bits as those calls one by one. Only the last n_out rows (0..n_tok) go past
 * the cache store: y gets n_out rows, the bits those rows have in a full batch (the rows before only
 * store keys and values, which is all an MTP head's catch-up and staircase rows need). y must not
 * overlap x. */
int  gr_attention_block(const gr_attn_block *b, const float *x, int64_t n_tok, int64_t n_out, const int32_t *pos,
                        const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache, int32_t *pos_cache,
                        int64_t n_kv, float *y);

/* A MoE layer's FFN: the router (n_expert rows of n_embd, router_qtype) and gr_moe_route's choice
 * (gating, bias or NULL, norm_weights, weights_scale), the routed experts as gr_moe_ffn takes them,
 * and a shared expert (shared_n_ff > 0: gate, up, down as gr_ffn takes them, SiLU, shared_clamp). */
typedef struct {
    int64_t n_embd, n_expert, n_used, n_ff;
    int router_qtype;
    const void *router_w;
    int gating;
    const float *bias;
    int norm_weights;
    float weights_scale;
    int gate_qtype, up_qtype, down_qtype;
    const void *const *gate_w;
    const void *const *up_w;
    const void *const *down_w;
    float limit;
    int64_t shared_n_ff;
    int shared_qtypes[3];
    const void *shared_w[3];
    float shared_clamp;
} gr_moe_layer;
/* y = moe(x') + shared(x'), x' = x or (norm_w not NULL) rms_norm(x) * norm_w, for x (n_tok, n_embd):
 * gr_matmul_multi of the router with the norm folded in, gr_moe_route into ids and weights (n_tok,
 * n_used: the choice, for the caller's statistics), gr_moe_ffn, gr_ffn of the shared expert, the sum;
 * the same bits as those calls one by one. y must not overlap x. */
int  gr_moe_block(const gr_moe_layer *b, const float *x, int64_t n_tok, const float *norm_w, float eps,
                  int32_t *ids, float *weights, float *y);
/* Token split (dispatch.c; used by block.c and gr_ffn): a batch of 2..4 rows through a layer whose
 * weights are small runs as pieces of whole rows, one per pool thread, each piece's calls on its thread
 * alone -- the same bits, fewer pool passes. gr_moe_block_pieces: the pieces gr_moe_block splits n_tok
 * rows into (1: none; each piece reads its own rows' experts). gr_set_token_split(0) turns the split off
 * (tests, A/B runs); returns the old setting. */
int  gr_moe_block_pieces(const gr_moe_layer *b, int64_t n_tok);
int  gr_set_token_split(int on);
/* How long (us) an idle pool thread spins before it sleeps (GGUFRUN_SPIN_US at start, 1000 by default);
 * us >= 0 sets it, us < 0 only reads it. Returns the value before the call. */
int  gr_pool_spin_us(int us);

/* An MTP (nextn) head of step35, as llama.cpp's DECODER_MTP graph runs it: the embedding table (n_vocab
 * packed rows of n_embd) and the enorm/hnorm weights, eh_proj (n_embd rows of 2 n_embd), the head's
 * decoder layer -- its attention half, then ffn_norm and either a MoE layer (moe) or a dense SwiGLU
 * (ffn_qtypes/ffn_w: gate, up, down as gr_ffn takes them, n_ff, ffn_clamp) -- and the vocabulary
 * projection (head: n_vocab rows of n_embd) after head_norm, all RMS norms with eps. */
typedef struct {
    int64_t n_embd, n_vocab;
    int embd_qtype;
    const void *embd;
    const float *enorm, *hnorm;
    float eps;
    int eh_qtype;
    const void *eh_w;
    const gr_attn_block *attn;
    const float *ffn_norm;
    const gr_moe_layer *moe;
    int ffn_qtypes[3];
    const void *ffn_w[3];
    int64_t n_ff;
    float ffn_clamp;
    const float *head_norm;
    int head_qtype;
    const void *head_w;
} gr_mtp_head;
/* n_tok rows of a head at positions pos (its one-layer KV cache as gr_attention_block takes it): row t
 * pairs token tokens[t] with the hidden state h_prev[t] (n_embd floats) of the position before;
 * x = eh_proj(concat(rms_norm(embd[token]) * enorm, rms_norm(h_prev) * hnorm)), h = x + attention,
 * h_out = h + ffn(rms_norm(h) * ffn_norm): the next head's h input. Every row stores its keys and values;
 * only the last n_out rows (0..n_tok) go on: h_out gets n_out rows, logits (n_logits floats, or NULL for
 * none) the last one's head(rms_norm(h_out) * head_norm) over the first n_logits ids (1..n_vocab: a draft
 * may be confined to the most frequent ids, which come first in merge or score order, at a fraction of
 * the whole projection's bytes, as FR-Spec does), ids/weights (n_out * n_used) a MoE FFN's
 * choice (NULL for a dense one). gr_get_rows, gr_rms_norm, gr_matmul, gr_attention_block, gr_moe_block
 * or gr_ffn and gr_matmul_multi in turn: the bits of those calls one by one. */
int  gr_mtp_head_forward(const gr_mtp_head *m, const int32_t *tokens, const float *h_prev, int64_t n_tok,
                         int64_t n_out, const int32_t *pos, const int32_t *slots, uint16_t *k_cache, uint16_t *v_cache,
                         int32_t *pos_cache, int64_t n_kv, int32_t *ids, float *weights, float *h_out,
                         int64_t n_logits, float *logits);

/* One head of a greedy draft chain (gr_mtp_draft_greedy): the head, its one-layer KV cache (n_slots rows;
 * ring: slot = position mod n_slots, a sliding window's ring, else slot = position), the first position
 * its call carries (start <= n_past: committed rows start..n_past-1 the head has not seen yet ride along)
 * and, for a MoE head, where its last row's expert choice goes (n_used each; NULL for a dense head). */
typedef struct {
    const gr_mtp_head *head;
    uint16_t *k_cache, *v_cache;
    int32_t *pos_cache;
    int64_t n_slots;
    int32_t ring;
    int64_t start;
    int32_t *ids;
    float *weights;
} gr_mtp_chain_head;
/* Greedy drafting with chained heads in one call: head i runs rows at positions start_i..n_past+i --
 * committed rows (tokens[p - tokens_from], h_hist[p-1], zeros for p = 0; tokens_from <= every start),
 * then (id_last, h_hist[n_past-1]), then (draft m, head m-1's last output row) for m = 1..i -- and the
 * arg-max of its logits over ids 0..n_logits-1 (the first maximum, as numpy's argmax) is drafts[i]. Each call is gr_mtp_head_forward
 * with n_out = 1 (only the last row's output is used): the bits of the heads called one by one. h_hist:
 * the trunk's pre-norm hidden states of positions 0..n_past-1 (n_embd floats each). The caches keep the
 * rows written (the caller rolls the draft rows back). */
int  gr_mtp_draft_greedy(const gr_mtp_chain_head *heads, int n_heads, const int32_t *tokens, int64_t tokens_from,
                         int64_t n_past, int32_t id_last, const float *h_hist, int64_t n_logits, int32_t *drafts);

/* ---- moe ---- (native/moe.c: all selected experts of a batch in one call) */
/* y[t] = sum_k weights[t*n_used+k] * down_e(swiglu(gate_e(x[t]), up_e(x[t]))), e = ids[t*n_used+k].
 * gate_w/up_w/down_w: one pointer per expert (n_expert of each) to its packed rows: gate and up are
 * n_ff rows of n_embd elements, down n_embd rows of n_ff, of the given quant types. Tokens are grouped
 * by expert so each active expert runs one matrix product per weight over its tokens (gr_matmul).
 * limit > 1e-6 clamps as llama.cpp does: up to [-limit, limit], silu(gate) from above at limit.
 * x: (n_tok, n_embd), y: (n_tok, n_embd), both float32. GR_E_ARG if an id is outside [0, n_expert). */
int  gr_moe_ffn(int gate_qtype, const void *const *gate_w, int up_qtype, const void *const *up_w,
                int down_qtype, const void *const *down_w, int64_t n_expert, int64_t n_embd, int64_t n_ff,
                const float *x, int64_t n_tok, int64_t n_used, const int32_t *ids, const float *weights,
                float limit, float *y);

/* Router logits (n_tok, n_expert) -> ids and weights (n_tok, n_used), llama.cpp's build_moe_ffn choice:
 * gating GR_GATING_SOFTMAX or GR_GATING_SIGMOID probabilities; the n_used largest of probability + bias
 * (bias: n_expert floats or NULL), descending, ties to the lower id; weights = their probabilities,
 * divided by their sum (at least 2^-14) if norm, times scale. */
#define GR_GATING_SOFTMAX 1
#define GR_GATING_SIGMOID 2
int  gr_moe_route(const float *logits, int64_t n_tok, int64_t n_expert, int64_t n_used, int gating,
                  const float *bias, int norm, float scale, int32_t *ids, float *weights);

/* ---- vision ---- (native/vision.c: the image encoder's ops, ggufrun/vision/) */
/* Non-causal softmax attention of n tokens over themselves, n_head heads of d floats: token t's head h
 * is at q + t * q_stride + h * d (likewise k, v, out; strides in floats, >= n_head * d, so q/k/v may be
 * views into one fused qkv buffer). out = softmax(scale * q k^T) v per head, float32 throughout. */
int  gr_vision_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                         int64_t v_stride, float *out, int64_t out_stride, int64_t n, int64_t n_head, int64_t d,
                         float scale);
/* y = quick-GELU(x) as ggml's CPU backend computes it: x rounded to float16, looked up in a table of
 * float16(x * 1 / (1 + expf(-1.702 x))); y may alias x. */
int  gr_vision_gelu_quick_f16(const float *x, float *y, int64_t n);

/* y = x W^T (+ bias) for many rows of x (a vision encoder's patches): W rows x cols of F32 (0) or F16 (1),
 * row r at w + r * row_stride bytes; x (n, cols), y (n, rows) float32; bias (rows) or NULL. gr_matmul's
 * numerics at act precision 1 (x rounded to float16 for F16 weights), summed in another order; a
 * register-blocked kernel for n in the thousands. GR_E_QTYPE for other types. */
int  gr_vision_matmul(int qtype, const void *w, int64_t rows, int64_t cols, int64_t row_stride, const float *x,
                      int64_t n, const float *bias, float *y);

/* Rotate adjacent pairs in place: for token t < n, head h < n_head, pair p < d / 2 of the head at
 * x + t * stride + h * d, (x[2p], x[2p+1]) by the angle whose cosine and sine are cos_t / sin_t[t * d/2 + p]
 * (products rounded one by one: a * c - b * s, a * s + b * c). The step3vl 2-D rope puts the column's
 * angles in the first d/4 pairs and the row's in the rest. */
int  gr_vision_rope_pairs(float *x, int64_t stride, int64_t n, int64_t n_head, int64_t d, const float *cos_t,
                          const float *sin_t);

/* y = (x - mean) / sqrt(var + eps) * w + b per row of dim floats (w, b may be NULL; y may alias x):
 * ggml_norm's arithmetic (sums in double, mean, variance and scale rounded to float), then * w and + b. */
int  gr_vision_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t n_rows, int64_t dim,
                          float eps);

#endif
