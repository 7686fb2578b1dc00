"""The math of a transformer block as native calls: products with quantized weights, RMS norm, rotary
embedding, gated activations and attention over the float16 KV cache.

These are the hot path of every decode step, so they skip the argument checking of `native`'s
public functions: shapes are fixed when the model is built (the loader validated the file), and a
weight's pointer is taken once, at load. Activations are float32 arrays of shape (n_tokens, features).
"""
from __future__ import annotations

import numpy as np

from . import native
from .gguf_file import QTensor

ROPE_NORM = 0   # rotate adjacent pairs (x[2i], x[2i+1]): llama-family GGUFs (the converter permutes q/k)
ROPE_NEOX = 2   # rotate halves (x[i], x[i + n_rot/2]): gemma, qwen, step35, ...
ACT_SILU = 0
ACT_GELU = 1

_lib = native._load()
_ffi = native._ffi


_FLOATS = _ffi.typeof("float[]")
_INT32S = _ffi.typeof("int32_t[]")
_UINT16S = _ffi.typeof("uint16_t[]")
_BYTES = _ffi.typeof("uint8_t[]")


# ffi.from_buffer is a Python wrapper that re-parses its arguments; on the hot path (a dozen buffers per
# native call, ~500 per decoded token) call the backend with the types resolved once.
_from_buffer = getattr(getattr(_ffi, "_backend", None), "from_buffer", None) or (
    lambda t, b, writable=False: _ffi.from_buffer(t, b, writable))


def _f32(a: np.ndarray):
    return _from_buffer(_FLOATS, a, False)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        native._check(rc, what)


class Linear:
    """x @ W^T for a quantized W of shape (rows, cols), bound once to the weight's bytes."""

    __slots__ = ("name", "qtype", "rows", "cols", "stride", "_w", "_keep", "_what")

    def __init__(self, w: QTensor):
        self.name = w.name
        self.qtype = int(w.qtype)
        self.rows, self.cols = w.shape[-2], w.shape[-1]
        self.stride = native.row_bytes(w.qtype, self.cols)
        if self.stride * self.rows != w.nbytes:
            raise ValueError(f"tensor {w.name!r}: {w.nbytes} bytes do not hold {self.rows}x{self.cols} {w.qtype.name}")
        self._keep = w.data
        self._w = _ffi.from_buffer("uint8_t[]", w.data)
        self._what = f"matmul {self.name}"   # error context, built once: decode calls this ~100x a token

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, rows: int | None = None) -> np.ndarray:
        """`rows`: only W's first rows (each row's result has the same bits as in the whole product)."""
        n = x.shape[0]
        if rows is None:
            rows = self.rows
        elif not 1 <= rows <= self.rows:   # the native product would read past W
            raise ValueError(f"{self._what}: rows {rows} is outside 1..{self.rows}")
        if out is None:
            out = np.empty((n, rows), dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        _check(_lib.gr_matmul(self.qtype, self._w, rows, self.cols, self.stride, _f32(x), n, _f32(out)),
               self._what)
        return out


class LinearGroup:
    """Several Linear sharing one input, as one native call (gr_matmul_multi): for decode the input is
    quantized once and every row of every matrix is one pass of the thread pool. `norm` folds the
    RMS norm of the input into the same call. Outputs equal the separate Linear calls bit for bit."""

    __slots__ = ("linears", "cols", "n", "_total", "_qtypes", "_w", "_rows", "_bounds", "_what")

    def __init__(self, linears: list[Linear]):
        if not 1 <= len(linears) <= 8:
            raise ValueError(f"a LinearGroup takes 1 to 8 matrices, not {len(linears)}")
        cols = {lin.cols for lin in linears}
        if len(cols) != 1:
            raise ValueError(f"matrices {[lin.name for lin in linears]} do not share an input size: {sorted(cols)}")
        self.linears = list(linears)
        self.cols = cols.pop()
        self.n = len(linears)
        self._qtypes = _ffi.new("int[]", [lin.qtype for lin in linears])
        self._w = _ffi.new("void *[]", [lin._w for lin in linears])
        self._rows = _ffi.new("int64_t[]", [lin.rows for lin in linears])
        self._total = sum(lin.rows for lin in linears)
        bounds, off = [], 0
        for lin in linears:
            bounds.append((off, off + lin.rows, lin.rows))
            off += lin.rows
        self._bounds = bounds
        self._what = f"matmul {', '.join(lin.name for lin in linears)}"

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0,
                 x_normed: np.ndarray | None = None, out: np.ndarray | None = None) -> list[np.ndarray]:
        """[W_i @ rms_norm(x) * norm] (or of x itself without norm), as views of one buffer (`out`, if
        given: n_tokens * total rows float32), output i's block after output i-1's; x_normed, if given,
        receives the normed input."""
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty(n * self._total, dtype=np.float32) if out is None else out
        _check(_lib.gr_matmul_multi(self.n, self._qtypes, self._w, self._rows, self.cols, _f32(x), n,
                                    _ffi.NULL if norm is None else _f32(norm), eps,
                                    _ffi.NULL if x_normed is None else _f32(x_normed), _f32(y)),
               self._what)
        return [y[a * n:b * n].reshape(n, r) for a, b, r in self._bounds]


def ffn(gate: Linear, up: Linear, down: Linear, x: np.ndarray, act: int, clamp: float = 0.0,
        norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """down(act(gate(x')) * up(x')) in one native call (gr_ffn), x' = x or rms_norm(x) * norm; equal bit
    for bit to the separate calls."""
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty((n, down.rows), dtype=np.float32)
    _check(_lib.gr_ffn(gate.qtype, gate._w, up.qtype, up._w, down.qtype, down._w, down.rows, gate.rows, _f32(x), n,
                       _ffi.NULL if norm is None else _f32(norm), eps, act, clamp, _f32(y)), f"ffn {down.name}")
    return y


class AttentionBlock:
    """A layer's attention half, y = x + post_norm(attention(x)), as one native call (gr_attention_block):
    the projections (with the block's input norm folded in), biases, q/k norms, rope, the KV store, the
    attention, the output projection and the residual, the same bits as calling them one by one. The
    weights, norms and shapes are bound once here; a call passes only the tokens and where they go."""

    __slots__ = ("_desc", "_keep", "n_embd", "_what")

    def __init__(self, proj: LinearGroup, wo: Linear, *, n_head: int, n_head_kv: int, head_dim_k: int,
                 head_dim_v: int, scale: float, window: int, n_rot: int, rope_mode: int, rope_base: float,
                 freq_scale: float, freq_factors: np.ndarray | None, biases=(None, None, None),
                 q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None, qk_eps: float = 0.0,
                 in_norm: np.ndarray | None = None, post_norm: np.ndarray | None = None, eps: float = 0.0):
        def ptr(a):
            return _ffi.NULL if a is None else _f32(a)
        lins = proj.linears
        self._keep = (proj, wo, biases, q_norm, k_norm, freq_factors, in_norm, post_norm)
        self._desc = _ffi.new("gr_attn_block *", {
            "n_proj": len(lins), "qtypes": [lin.qtype for lin in lins], "w": [lin._w for lin in lins],
            "rows": [lin.rows for lin in lins], "n_embd": proj.cols, "in_norm": ptr(in_norm), "eps": eps,
            "bias": [ptr(b) for b in biases], "n_head": n_head, "n_head_kv": n_head_kv, "head_dim_k": head_dim_k,
            "head_dim_v": head_dim_v, "q_norm": ptr(q_norm), "k_norm": ptr(k_norm), "qk_eps": qk_eps,
            "n_rot": n_rot, "rope_mode": rope_mode, "rope_base": rope_base, "freq_scale": freq_scale,
            "freq_factors": ptr(freq_factors), "scale": scale, "window": window, "o_qtype": wo.qtype,
            "o_w": wo._w, "o_row_stride": wo.stride, "post_norm": ptr(post_norm)})
        self.n_embd = proj.cols
        self._what = f"attention block {wo.name}"

    def __call__(self, x: np.ndarray, positions: np.ndarray, cache, layer: int) -> np.ndarray:
        """x (n, n_embd) at `positions` (int32) of `cache`'s layer `layer`; returns x + attention."""
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((n, self.n_embd), dtype=np.float32)
        _check(_lib.gr_attention_block(self._desc, _f32(x), n, n, *cache_args(cache, layer, positions), _f32(y)),
               self._what)
        return y


def cache_args(cache, layer: int, positions: np.ndarray) -> tuple:
    """The KV-cache arguments of the block calls for tokens at `positions` (int32) of `cache`'s layer:
    positions, slots, keys, values, key positions, rows to attend over."""
    slots, n_kv = cache.slots(layer, positions)
    pos_ptr = _from_buffer(_INT32S, positions, False)
    return (pos_ptr, pos_ptr if slots is positions else _from_buffer(_INT32S, slots, False),
            *cache_arrays(cache, layer), n_kv)


def cache_arrays(cache, layer: int) -> tuple:
    """Native pointers to `cache`'s keys, values and key positions of `layer`: the arrays never move, so
    the pointers are made once."""
    arrays = cache.native.get(layer)
    if arrays is None:
        arrays = cache.native[layer] = (_from_buffer(_UINT16S, cache.k[layer].view(np.uint16), True),
                                        _from_buffer(_UINT16S, cache.v[layer].view(np.uint16), True),
                                        _from_buffer(_INT32S, cache.pos[layer], True))
    return arrays


def embed_rows(w: QTensor, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of an embedding matrix, dequantized; only those rows' bytes are touched."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    n_rows, n_cols = w.shape[0], w.shape[1]
    out = np.empty((len(ids), n_cols), dtype=np.float32)
    rc = _lib.gr_get_rows(int(w.qtype), _from_buffer(_BYTES, w.data, False), n_rows, n_cols,
                          _from_buffer(_INT32S, ids, False), len(ids), _f32(out))
    if rc == native.GR_E_ARG:   # an id outside the table
        bad = int(ids[(ids < 0) | (ids >= n_rows)][0])
        raise ValueError(f"tensor {w.name!r}: row {bad} is outside its {n_rows} rows")
    _check(rc, f"embed rows of {w.name}")
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMS norm over the last axis, times `weight` (which spans the last axis: per-head norms pass
    (n, n_head, head_dim) with a head_dim weight)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    dim = x.shape[-1]
    _check(_lib.gr_rms_norm(_f32(x), _ffi.NULL if weight is None else _f32(weight), _f32(y),
                            x.size // dim, dim, eps), "rms_norm")
    return y


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, mode: int, freq_scale: float = 1.0,
         freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotate, in place, the first n_rot features of each head of x (n_tokens, n_head, head_dim)."""
    n, n_head, head_dim = x.shape
    _check(_lib.gr_rope(_f32(x), _from_buffer(_INT32S, positions, False), n, n_head, head_dim, n_rot, mode,
                        base, freq_scale, _ffi.NULL if freq_factors is None else _f32(freq_factors)), "rope")
    return x


def qk_norm_rope(q: np.ndarray, k: np.ndarray, positions: np.ndarray, q_norm: np.ndarray | None,
                 k_norm: np.ndarray | None, eps: float, n_rot: int, base: float, mode: int, freq_scale: float = 1.0,
                 freq_factors: np.ndarray | None = None, store: tuple | None = None) -> None:
    """In place on contiguous q (n, n_head, head_dim) and k (n, n_head_kv, head_dim): per-head RMS norms
    (None: none), then rope; one native call, the same bits as rms_norm and rope in turn. store: None, or
    (v, slots, k_cache, v_cache, pos_cache) to write the keys, v (n, n_head_kv, head_dim_v) and positions
    into rows `slots` of a layer's cache arrays (KVCache.slots) in the same call."""
    n, n_head, head_dim = q.shape
    if store is None:
        v = slots = kc = vc = pc = _ffi.NULL
        dv = 0
    else:
        v_arr, slots_arr, kc_arr, vc_arr, pc_arr = store
        dv = v_arr.shape[-1]
        v, slots = _f32(v_arr), _from_buffer(_INT32S, slots_arr, False)
        kc = _from_buffer(_UINT16S, kc_arr.view(np.uint16), True)
        vc = _from_buffer(_UINT16S, vc_arr.view(np.uint16), True)
        pc = _from_buffer(_INT32S, pc_arr, True)
    _check(_lib.gr_qk_norm_rope(_f32(q), _f32(k), _from_buffer(_INT32S, positions, False), n, n_head, k.shape[1],
                                head_dim, _ffi.NULL if q_norm is None else _f32(q_norm),
                                _ffi.NULL if k_norm is None else _f32(k_norm), eps, n_rot, mode, base, freq_scale,
                                _ffi.NULL if freq_factors is None else _f32(freq_factors), v, dv, slots, kc, vc, pc),
           "qk_norm_rope")


def glu(gate: np.ndarray, up: np.ndarray, act: int, clamp: float = 0.0) -> np.ndarray:
    """act(gate) * up, in gate's memory."""
    _check(_lib.gr_glu(_f32(gate), _f32(up), _f32(gate), gate.size, act, clamp), "glu")
    return gate


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              scale: float, window: int = 0, softcap: float = 0.0, gate: np.ndarray | None = None) -> np.ndarray:
    """Causal multi-head attention with grouped KV heads over float16 keys and values.

    q: (n_q, n_head, dk) float32; k: (n_kv, n_head_kv, dk) and v: (n_kv, n_head_kv, dv) float16;
    key j is visible to query i when 0 <= q_pos[i] - k_pos[j] (< window with a sliding window,
    llama.cpp's LLAMA_SWA_TYPE_STANDARD). gate: None, or (n_q, n_head) float32 (C-contiguous): each
    head's output is scaled by sigmoid(gate) (step35). Returns (n_q, n_head * dv) float32.
    """
    n_q, n_head, dk = q.shape
    n_kv, n_head_kv, dv = v.shape
    out = np.empty((n_q, n_head * dv), dtype=np.float32)
    _check(_lib.gr_attention(_f32(q), _from_buffer(_UINT16S, k.view(np.uint16), False),
                             _from_buffer(_UINT16S, v.view(np.uint16), False),
                             _from_buffer(_INT32S, q_pos, False), _from_buffer(_INT32S, k_pos, False),
                             _f32(out), n_q, n_head, n_head_kv, n_kv, dk, dv, scale, window, softcap,
                             _ffi.NULL if gate is None else _f32(gate)), "attention")
    return out
