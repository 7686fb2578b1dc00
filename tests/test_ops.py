"""native/ops.c against float64 numpy references, SIMD inner loops against the portable ones."""
from __future__ import annotations

import numpy as np
import pytest

from ggufrun import native, ops

rng = np.random.default_rng(0)


@pytest.fixture(params=[True, False], ids=["simd", "portable"])
def simd(request):
    ops._lib.gr_ops_simd(1 if request.param else 0)
    yield request.param
    ops._lib.gr_ops_simd(1)


def test_rms_norm():
    x = rng.standard_normal((5, 3, 64)).astype(np.float32) * 4
    w = rng.standard_normal(64).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6), want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(ops.rms_norm(x, None, 1e-6), want / w, rtol=2e-6, atol=1e-5)


def rope_ref(x, pos, n_rot, base, neox, freq_scale=1.0, ff=None):
    half = n_rot // 2
    theta = pos[:, None] * base ** (-2.0 * np.arange(half) / n_rot)
    if ff is not None:
        theta = theta / ff[:half]
    theta = theta * freq_scale
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    out = x.astype(np.float64).copy()
    a, b = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    out[..., a] = x[..., a] * c - x[..., b] * s
    out[..., b] = x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("mode", [ops.ROPE_NORM, ops.ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope(mode, n_rot):
    x = rng.standard_normal((6, 4, 64)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 2000, 4095], dtype=np.int32)
    ff = np.linspace(1, 8, n_rot // 2).astype(np.float32)
    for freq_scale, factors in ((1.0, None), (0.25, ff)):
        got = ops.rope(x.copy(), pos, n_rot, 10000.0, mode, freq_scale, factors)
        want = rope_ref(x, pos.astype(np.float64), n_rot, 10000.0, mode == ops.ROPE_NEOX, freq_scale, factors)
        # angles at position 4095 carry float32 rounding of ~4095 * 2^-24 rad
        np.testing.assert_allclose(got, want, atol=2e-3)
        np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # partial rotary: rest untouched


@pytest.mark.parametrize("act", [ops.ACT_SILU, ops.ACT_GELU])
@pytest.mark.parametrize("n", [13, 1000, 70000], ids=["tail", "vector", "pool"])
def test_glu_and_clamp(act, n, simd):
    g = (rng.standard_normal(n) * 5).astype(np.float32)
    g[:6] = [-200.0, -90.0, -30.0, 30.0, 90.0, 200.0]  # past the exponential's clamps, both signs
    u = (rng.standard_normal(n) * 5).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)

    def f(z):
        if act == ops.ACT_SILU:
            return z / (1 + np.exp(-z))
        # 0.5 z (1 + tanh(y)) as z / (1 + e^(-2y)): float64's 1 + tanh(y) cancels to 0 below y ~ -19
        with np.errstate(over="ignore"):
            return z / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * z * (1 + 0.044715 * z * z)))
    np.testing.assert_allclose(ops.glu(g.copy(), u, act), f(g64) * u64, rtol=1e-5, atol=1e-5)
    clamped = np.minimum(f(g64), 3.0) * np.clip(u64, -3.0, 3.0)  # llama.cpp caps after the activation
    np.testing.assert_allclose(ops.glu(g.copy(), u, act, clamp=3.0), clamped, rtol=1e-5, atol=1e-5)
    g[7] = np.nan
    assert np.isnan(ops.glu(g.copy(), u, act)[7])


def attention_ref(q, k, v, q_pos, k_pos, scale, window=0, softcap=0.0):
    n_q, n_head, dk = q.shape
    n_kv, n_head_kv, dv = v.shape
    g = n_head // n_head_kv
    out = np.zeros((n_q, n_head, dv))
    for i in range(n_q):
        for h in range(n_head):
            s = k[:, h // g].astype(np.float64) @ q[i, h].astype(np.float64) * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            d = q_pos[i] - k_pos
            vis = (d >= 0) & ((d < window) if window else True)
            if not vis.any():
                continue
            p = np.exp(s[vis] - s[vis].max())
            out[i, h] = (p / p.sum()) @ v[vis, h // g].astype(np.float64)
    return out.reshape(n_q, -1)


@pytest.mark.parametrize("n_head,n_head_kv,dk,dv", [(8, 8, 64, 64), (9, 3, 64, 64), (4, 1, 256, 256), (6, 2, 40, 24)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0)])
def test_attention(simd, n_head, n_head_kv, dk, dv, window, softcap):
    n_kv, n_q = 23, 4
    q = rng.standard_normal((n_q, n_head, dk)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, dk)).astype(np.float16)
    v = rng.standard_normal((n_kv, n_head_kv, dv)).astype(np.float16)
    k_pos = rng.permutation(n_kv).astype(np.int32)     # ring-buffer order: slots need not be sorted
    k_pos[3] = 2**30                                   # an empty slot (always in the future)
    q_pos = np.array([0, 9, 15, 22], dtype=np.int32)
    got = ops.attention(q, k, v, q_pos, k_pos, 0.125, window, softcap)
    want = attention_ref(q, k, v, q_pos, k_pos, 0.125, window, softcap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_attention_large_batch_uses_threads():
    # enough work to wake the pool; results must not depend on the split
    n_q, n_kv = 64, 128
    q = rng.standard_normal((n_q, 8, 64)).astype(np.float32)
    k = rng.standard_normal((n_kv, 2, 64)).astype(np.float16)
    v = rng.standard_normal((n_kv, 2, 64)).astype(np.float16)
    pos = np.arange(n_kv, dtype=np.int32)
    got = ops.attention(q, k, v, pos[-n_q:], pos, 0.125)
    np.testing.assert_allclose(got, attention_ref(q, k, v, pos[-n_q:], pos, 0.125), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n_head,n_head_kv", [(9, 3), (8, 2), (3, 1), (4, 4)])
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("slots", ["ordered", "ring with empty tail", "wrapped ring"])
def test_attention_query_bits_do_not_depend_on_batch_or_threads(simd, n_head, n_head_kv, window, slots):
    """A query's output is the same bits alone (decode) as in a batch (prefill, MTP verify), whatever the
    thread count and however many of a KV group's heads share a work item: speculative decoding relies
    on it to give exactly the tokens plain decoding gives."""
    n_kv, n_q, d = 300, 11, 64
    q = rng.standard_normal((n_q, n_head, d)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    v = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    k_pos = np.arange(n_kv, dtype=np.int32)
    q_pos = k_pos[-n_q:] - 3     # the last keys are in every query's future: masked
    if slots == "ring with empty tail":    # a sliding-window ring not yet full
        k_pos[-100:] = 2**30
        q_pos -= 100
    elif slots == "wrapped ring":          # slot = position mod capacity
        k_pos = np.roll(k_pos, 77)
    want = None
    for threads in (1, 2, 3):
        with native.threads(threads):
            batch = ops.attention(q, k, v, q_pos, k_pos, 0.125, window)
            alone = np.concatenate([ops.attention(q[i:i + 1], k, v, q_pos[i:i + 1], k_pos, 0.125, window)
                                    for i in range(n_q)])
            pairs = np.concatenate([ops.attention(q[i:i + 2], k, v, q_pos[i:i + 2], k_pos, 0.125, window)
                                    for i in range(1, n_q - 1, 2)])
        want = batch if want is None else want
        assert np.array_equal(batch, alone) and np.array_equal(batch, want), threads
        assert np.array_equal(batch[1:1 + len(pairs)], pairs), threads
    np.testing.assert_allclose(want, attention_ref(q, k, v, q_pos, k_pos, 0.125, window), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("norms", [True, False])
def test_qk_norm_rope_equals_the_separate_calls(simd, norms):
    """One call for the per-head norms and rope of q and k gives the bits of rms_norm and rope in turn."""
    n, n_head, n_head_kv, hd = 3, 4, 2, 64
    q = rng.standard_normal((n, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n, n_head_kv, hd)).astype(np.float32)
    qn, kn = (rng.standard_normal(hd).astype(np.float32) for _ in range(2)) if norms else (None, None)
    pos = np.array([5, 6, 900], dtype=np.int32)
    ff = np.linspace(1, 4, 16).astype(np.float32)
    want_q, want_k = q.copy(), k.copy()
    if norms:
        want_q, want_k = ops.rms_norm(want_q, qn, 1e-6), ops.rms_norm(want_k, kn, 1e-6)
    ops.rope(want_q, pos, 32, 10000.0, ops.ROPE_NEOX, 0.5, ff)
    ops.rope(want_k, pos, 32, 10000.0, ops.ROPE_NEOX, 0.5, ff)
    ops.qk_norm_rope(q, k, pos, qn, kn, 1e-6, 32, 10000.0, ops.ROPE_NEOX, 0.5, ff)
    assert np.array_equal(q.view(np.uint32), want_q.view(np.uint32))
    assert np.array_equal(k.view(np.uint32), want_k.view(np.uint32))
    with pytest.raises(ValueError, match="qk_norm_rope"):
        ops.qk_norm_rope(q, k, pos, qn, kn, 1e-6, 33, 10000.0, ops.ROPE_NEOX)  # odd n_rot


def test_qk_norm_rope_stores_keys_and_values_in_the_cache(simd):
    """The store in the same call: rows `slots` (a wrapped ring's, not consecutive) of the float16 caches
    get the rotated keys and the values rounded as numpy's astype(float16) does (ties to even, subnormals,
    overflow to inf), and the positions; no other row changes."""
    n, n_head, n_head_kv, hd, dv, cap = 3, 4, 2, 64, 40, 10
    q = rng.standard_normal((n, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n, n_head_kv, dv)).astype(np.float32)
    v[0, 0, :6] = [1e-6, -3e-8, 7e4, 2049.0, 2051.0, np.float32(1) + np.float32(2.0**-11)]  # subnormal, tie, inf
    pos = np.array([8, 9, 10], dtype=np.int32)
    slots = pos % np.int32(cap)   # 8, 9, 0
    kc, vc = np.full((cap, n_head_kv, hd), 7, np.float16), np.full((cap, n_head_kv, dv), 7, np.float16)
    pc = np.full(cap, -1, np.int32)
    want_q, want_k = q.copy(), k.copy()
    ops.qk_norm_rope(want_q, want_k, pos, None, None, 1e-6, 64, 10000.0, ops.ROPE_NEOX)
    ops.qk_norm_rope(q, k, pos, None, None, 1e-6, 64, 10000.0, ops.ROPE_NEOX, store=(v, slots, kc, vc, pc))
    assert np.array_equal(q, want_q) and np.array_equal(k, want_k)
    assert np.array_equal(kc[slots].view(np.uint16), want_k.astype(np.float16).view(np.uint16))
    with np.errstate(over="ignore"):   # 7e4 is past float16's range: inf, as intended
        want_v = v.astype(np.float16)
    assert np.array_equal(vc[slots].view(np.uint16), want_v.view(np.uint16))
    assert list(pc[slots]) == [8, 9, 10]
    rest = np.setdiff1d(np.arange(cap), slots)
    assert (kc[rest] == 7).all() and (vc[rest] == 7).all() and (pc[rest] == -1).all()


def test_qk_norm_rope_refuses_a_store_without_its_arrays():
    """Slots without the value rows or the cache arrays to write them to: an argument error, before q
    or k is touched."""
    q = np.ones((1, 2, 64), np.float32)
    k = np.ones((1, 1, 64), np.float32)
    v = np.ones((1, 1, 64), np.float32)
    pos = slots = np.zeros(1, np.int32)
    kc, vc = np.zeros((4, 1, 64), np.float16), np.zeros((4, 1, 64), np.float16)
    pc = np.zeros(4, np.int32)
    i32 = lambda a: ops._from_buffer(ops._INT32S, a, True)  # noqa: E731
    u16 = lambda a: ops._from_buffer(ops._UINT16S, a.view(np.uint16), True)  # noqa: E731
    NULL = ops._ffi.NULL
    for bad in [dict(v=NULL), dict(dv=0), dict(kc=NULL), dict(vc=NULL), dict(pc=NULL)]:
        a = {**dict(v=ops._f32(v), dv=64, kc=u16(kc), vc=u16(vc), pc=i32(pc)), **bad}
        rc = ops._lib.gr_qk_norm_rope(ops._f32(q), ops._f32(k), i32(pos), 1, 2, 1, 64, NULL, NULL, 1e-6, 64,
                                      ops.ROPE_NEOX, 10000.0, 1.0, NULL, a["v"], a["dv"], i32(slots), a["kc"],
                                      a["vc"], a["pc"])
        with pytest.raises(ValueError, match="qk_norm_rope: argument out of range"):
            native._check(rc, "qk_norm_rope")
        assert (q == 1).all() and (k == 1).all() and (pc == 0).all()


def route(logits, n_used, gating, bias=None, norm=False, scale=1.0):
    n, n_expert = logits.shape
    ids = np.empty((n, n_used), np.int32)
    w = np.empty((n, n_used), np.float32)
    rc = ops._lib.gr_moe_route(ops._f32(logits), n, n_expert, n_used, gating,
                               ops._ffi.NULL if bias is None else ops._f32(bias), int(norm), scale,
                               ops._from_buffer(ops._INT32S, ids, False), ops._f32(w))
    if rc:
        native._check(rc, "moe_route")
    return ids, w


def route_ref(logits, n_used, gating, bias=None, norm=False, scale=1.0):
    """llama.cpp's build_moe_ffn choice in float64: top n_used of prob + bias, ties to the lower id."""
    x = logits.astype(np.float64)
    if gating == 2:
        p = 1 / (1 + np.exp(-x))
    else:
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    sel = p + (0 if bias is None else bias.astype(np.float64))
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :n_used]
    w = np.take_along_axis(p, ids, -1)
    if norm:
        w = w / np.maximum(w.sum(-1, keepdims=True), 6.103515625e-5)
    return ids, w * scale


@pytest.mark.parametrize("gating", [1, 2])
@pytest.mark.parametrize("biased,norm,scale", [(False, False, 1.0), (True, True, 2.5), (False, True, 1.0)])
def test_moe_route_matches_the_reference(gating, biased, norm, scale):
    logits = rng.standard_normal((37, 64)).astype(np.float32) * 3
    bias = (rng.standard_normal(64) * 0.1).astype(np.float32) if biased else None
    ids, w = route(logits, 8, gating, bias, norm, scale)
    want_ids, want_w = route_ref(logits, 8, gating, bias, norm, scale)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, rtol=2e-6, atol=1e-7)


def test_moe_route_ties_go_to_the_lower_id_and_nan_ranks_last():
    logits = np.zeros((2, 6), np.float32)
    logits[0, [1, 4]] = 1.0          # a tie between experts 1 and 4 at the top, then ties among the rest
    logits[1, 0] = np.nan
    ids, w = route(logits, 3, 2)
    assert ids[0].tolist() == [1, 4, 0]
    assert ids[1].tolist() == [1, 2, 3]
    assert np.isfinite(w).all()
    with pytest.raises(ValueError, match="moe_route: .*size"):
        route(logits, 7, 2)          # more experts asked for than there are
    with pytest.raises(ValueError, match="moe_route: .*argument"):
        route(logits, 3, 3)          # a gating function that is neither softmax (1) nor sigmoid (2)


@pytest.mark.parametrize("n_q", [1, 5])
def test_attention_head_gate(simd, n_q):
    """step35's gate: head h of query i times sigmoid(gate[i, h]), the same bits as scaling afterwards."""
    n_kv, n_head, n_head_kv, d = 40, 6, 2, 64
    q = rng.standard_normal((n_q, n_head, d)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    v = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    gate = rng.standard_normal((n_q, n_head)).astype(np.float32) * 3
    k_pos = np.arange(n_kv, dtype=np.int32)
    plain = ops.attention(q, k, v, k_pos[-n_q:], k_pos, 0.125)
    gated = ops.attention(q, k, v, k_pos[-n_q:], k_pos, 0.125, gate=gate)
    sig = (1 / (1 + np.exp(-gate.astype(np.float64)))).astype(np.float32)
    np.testing.assert_allclose(gated, (plain.reshape(n_q, n_head, d) * sig[:, :, None]).reshape(n_q, -1),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16", "F32"])
def test_embed_rows_dequantizes_only_the_chosen_rows_and_names_a_bad_id(qtype):
    """embed_rows (gr_get_rows) gives the rows' bits as dequantizing them alone does, in the order asked,
    repeats included; an id outside the table is refused with the tensor's name and row count."""
    from gguf import GGMLQuantizationType as T
    from ggufrun.gguf_file import QTensor
    t = T[qtype]
    rows, cols = 37, 256
    rng = np.random.default_rng(int(t))
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == "F32":
        data = x.view(np.uint8).reshape(-1)
    elif qtype == "F16":
        data = x.astype(np.float16).view(np.uint8).reshape(-1)
    else:
        import quant
        data = quant.quantize(x, t).reshape(-1)
    w = QTensor("token_embd.weight", t, (rows, cols), data)
    ids = np.array([36, 0, 5, 5, 17])
    rb = native.row_bytes(t, cols)
    want = np.stack([native.dequantize(data[i * rb:(i + 1) * rb], t) for i in ids])
    assert np.array_equal(ops.embed_rows(w, ids), want)
    for bad in (37, -1):
        with pytest.raises(ValueError, match=f"'token_embd.weight': row {bad} is outside its 37 rows"):
            ops.embed_rows(w, np.array([3, bad]))
