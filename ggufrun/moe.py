"""Mixture-of-experts feed-forward, shared by the MoE architectures.

Python decides, C computes: a layer -- router product, top-k choice, all selected experts of the batch
(gate, up, clamped SwiGLU, down, weighted sum, tokens grouped by expert so each active expert runs one
matrix product) and the shared expert -- is one native call, `gr_moe_block`; with an expert cache it
runs in steps (router, then `gr_moe_ffn` once the cache has placed the chosen experts).

Every access to routed experts goes through the ExpertStore: it owns the per-expert views (slices of
the mapped 3-D `ffn_*_exps` tensors, never copies; only the selected experts' bytes are read) and
counts how often each expert is used. With an ExpertCache attached (`store.cache`, see
expert_cache.py) the pointers are rewritten before each call so hot experts point into a resident
arena and cold ones are read on demand; without one every pointer is the mapped slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import native
from .gguf_file import GGUFError, GGUFFile, QTensor
from .ops import _INT32S, ACT_SILU, Linear, LinearGroup, _check, _f32, _from_buffer, ffn

_lib = native._load()
_ffi = native._ffi

GATING_SOFTMAX = _lib.GR_GATING_SOFTMAX   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*
GATING_SIGMOID = _lib.GR_GATING_SIGMOID


@dataclass
class _ExpertLayer:
    """One layer's routed experts: the three 3-D tensors and a pointer per expert into each."""
    gate: QTensor
    up: QTensor
    down: QTensor
    n_expert: int
    n_ff: int
    n_embd: int
    ptrs: tuple  # (gate, up, down) cffi `const void *[n_expert]` arrays
    keep: tuple  # the cffi buffers the pointers point into, alive as long as the pointers


class ExpertStore:
    """The routed experts of a model, by layer, with per-expert use counters."""

    def __init__(self, f: GGUFFile):
        self.file = f
        self.layers: dict[int, _ExpertLayer] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.tokens: dict[int, int] = {}
        self.cache = None  # an expert_cache.ExpertCache, which places experts before each call
        self.row_pieces: dict = {}  # il -> MoE.pieces: how many pieces of rows a call of n rows runs as

    def add_layer(self, il: int, prefix: str, n_expert: int, n_ff: int, n_embd: int) -> None:
        f = self.file
        gate = f.tensor(prefix + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd))
        up = f.tensor(prefix + "ffn_up_exps.weight", (n_expert, n_ff, n_embd))
        down = f.tensor(prefix + "ffn_down_exps.weight", (n_expert, n_embd, n_ff))
        ptrs, keep = [], []
        for t in (gate, up, down):
            stride = t.nbytes // n_expert
            base = _ffi.from_buffer("uint8_t[]", t.data)
            keep.append(base)
            arr = _ffi.new("void *[]", n_expert)
            for e in range(n_expert):
                arr[e] = base + e * stride
            ptrs.append(arr)
        self.layers[il] = _ExpertLayer(gate, up, down, n_expert, n_ff, n_embd, tuple(ptrs), tuple(keep))
        self.counts[il] = np.zeros(n_expert, dtype=np.int64)
        self.tokens[il] = 0

    def expert(self, il: int, e: int) -> tuple[QTensor, QTensor, QTensor]:
        """Expert e of layer il as three 2-D QTensors over its slice of the mapped file (no copy)."""
        L = self.layers[il]
        if not 0 <= e < L.n_expert:
            raise IndexError(f"layer {il} has {L.n_expert} experts, not {e}")
        out = []
        for t in (L.gate, L.up, L.down):
            stride = t.nbytes // L.n_expert
            out.append(QTensor(f"{t.name}[{e}]", t.qtype, t.shape[1:], t.data[e * stride:(e + 1) * stride]))
        return tuple(out)

    def expert_bytes(self, il: int) -> int:
        L = self.layers[il]
        return (L.gate.nbytes + L.up.nbytes + L.down.nbytes) // L.n_expert

    def record(self, il: int, ids: np.ndarray) -> None:
        counts = self.counts[il]
        if ids.size <= 32:   # a decode step's few choices (bincount's ~4 us a layer: 5% of a small model's step)
            for e in ids.ravel().tolist():
                counts[e] += 1
        else:
            counts += np.bincount(ids.ravel(), minlength=len(counts))
        self.tokens[il] += ids.shape[0]

    def reset_counts(self) -> None:
        for il in self.counts:
            self.counts[il][:] = 0
            self.tokens[il] = 0

    def ffn(self, il: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, limit: float) -> np.ndarray:
        """sum_k weights[:, k] * expert_{ids[:, k]}(x): one native call for the whole batch."""
        L = self.layers[il]
        self.record(il, ids)
        if self.cache is not None:
            self.cache.prepare(il, ids, x)
        return _ffn_call(L.gate.qtype, L.up.qtype, L.down.qtype, L.ptrs, L.n_expert, L.n_embd, L.n_ff, x, ids,
                         weights, limit)

    def stats(self) -> list[dict]:
        """Per layer: tokens routed, experts used at least once, the top experts with their share of
        the selections, and skew (the busiest expert's load over the mean load)."""
        out = []
        for il in sorted(self.counts):
            c = self.counts[il]
            total = int(c.sum())
            order = np.argsort(-c, kind="stable")
            mean = total / len(c) if total else 0.0
            out.append({"layer": il, "tokens": self.tokens[il], "used": int((c > 0).sum()), "n_expert": len(c),
                        "top": [(int(e), float(c[e] / total) if total else 0.0) for e in order[:8]],
                        "skew": float(c.max() / mean) if mean else 0.0})
        return out

    def report(self, top: int = 4) -> list[str]:
        lines = []
        for s in self.stats():
            tops = " ".join(f"#{e}:{share:.0%}" for e, share in s["top"][:top])
            lines.append(f"layer {s['layer']:>3}: {s['tokens']} tokens, {s['used']}/{s['n_expert']} experts used,"
                         f" skew {s['skew']:.2f}, top {tops}")
        return lines


def _ffn_call(gq, uq, dq, ptrs, n_expert, n_embd, n_ff, x, ids, weights, limit) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    n_tok, n_used = ids.shape
    y = np.empty((n_tok, n_embd), dtype=np.float32)
    _check(_lib.gr_moe_ffn(int(gq), ptrs[0], int(uq), ptrs[1], int(dq), ptrs[2], n_expert, n_embd, n_ff,
                           _f32(x), n_tok, n_used, _from_buffer(_INT32S, ids, False), _f32(weights), float(limit),
                           _f32(y)), "moe_ffn")
    return y


class SwiGLU:
    """down(swiglu(gate(x), up(x))) with llama.cpp's optional clamp: the shared expert and dense FFNs of
    MoE models, as one native call (gr_ffn, which clamps as gr_moe_ffn does: limits <= 1e-6 mean none)."""

    def __init__(self, f: GGUFFile, prefix: str, suffix: str, n_embd: int, n_ff: int, limit: float = 0.0):
        self.gate = Linear(f.tensor(f"{prefix}ffn_gate{suffix}.weight", (n_ff, n_embd)))
        self.up = Linear(f.tensor(f"{prefix}ffn_up{suffix}.weight", (n_ff, n_embd)))
        self.down = Linear(f.tensor(f"{prefix}ffn_down{suffix}.weight", (n_embd, n_ff)))
        self.n_embd, self.n_ff, self.limit = n_embd, n_ff, limit
        self._clamp = limit if limit > 1e-6 else 0.0

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        return ffn(self.gate, self.up, self.down, x, ACT_SILU, self._clamp, norm, eps)


@dataclass(frozen=True)
class RouterConfig:
    n_expert: int
    n_used: int
    gating: int = GATING_SOFTMAX
    norm_weights: bool = False
    weights_scale: float = 1.0


class Router:
    """Expert choice as llama.cpp's build_moe_ffn makes it: scores = gating(W x); the top n_used of
    scores + selection bias are chosen; their weights come from the unbiased scores, normalised to sum
    to one if the file says so, then scaled."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, cfg: RouterConfig):
        self.cfg = cfg
        self.w = Linear(f.tensor(prefix + "ffn_gate_inp.weight", (cfg.n_expert, n_embd)))
        self._normed = LinearGroup([self.w])  # the same product with the block's norm folded in
        b = f.maybe_tensor(prefix + "exp_probs_b.bias", (cfg.n_expert,))
        self.bias = None if b is None else b.dequantize().reshape(-1).astype(np.float32)
        self._scale = 1.0 if cfg.weights_scale == 0.0 else float(cfg.weights_scale)
        if cfg.gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise GGUFError(f"{f.path}: expert gating function {cfg.gating} is not supported"
                            f" (1 softmax, 2 sigmoid)")
        if not 1 <= cfg.n_used <= cfg.n_expert:
            raise GGUFError(f"{f.path}: {f.arch}.expert_used_count is {cfg.n_used}, expected 1 to"
                            f" {f.arch}.expert_count ({cfg.n_expert})")

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0,
                 x_normed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights) for x, or for rms_norm(x) * norm, which then goes to x_normed too."""
        c = self.cfg
        logits = self.w(x) if norm is None else self._normed(x, norm, eps, x_normed)[0]
        n = logits.shape[0]
        ids = np.empty((n, c.n_used), dtype=np.int32)
        w = np.empty((n, c.n_used), dtype=np.float32)
        _check(_lib.gr_moe_route(_f32(logits), n, c.n_expert, c.n_used, c.gating,
                                 _ffi.NULL if self.bias is None else _f32(self.bias), int(c.norm_weights),
                                 self._scale, _from_buffer(_INT32S, ids, False), _f32(w)), "moe_route")
        return ids, w


class MoE:
    """Routed experts (through the store) plus an optional always-on shared expert."""

    def __init__(self, f: GGUFFile, prefix: str, il: int, store: ExpertStore, n_embd: int, n_ff_exp: int,
                 router: RouterConfig, limit_exp: float = 0.0, shared: SwiGLU | None = None):
        self.il = il
        self.store = store
        self.router = Router(f, prefix, n_embd, router)
        store.add_layer(il, prefix, router.n_expert, n_ff_exp, n_embd)
        self.limit = limit_exp
        self.shared = shared
        L, r = store.layers[il], self.router
        sh = (shared.gate, shared.up, shared.down) if shared is not None else ()
        self._keep = (r.bias, L.ptrs)
        self._layer = _ffi.new("gr_moe_layer *", {
            "n_embd": n_embd, "n_expert": router.n_expert, "n_used": router.n_used, "n_ff": n_ff_exp,
            "router_qtype": r.w.qtype, "router_w": r.w._w, "gating": router.gating,
            "bias": _ffi.NULL if r.bias is None else _f32(r.bias), "norm_weights": int(router.norm_weights),
            "weights_scale": r._scale, "gate_qtype": int(L.gate.qtype), "up_qtype": int(L.up.qtype),
            "down_qtype": int(L.down.qtype), "gate_w": L.ptrs[0], "up_w": L.ptrs[1], "down_w": L.ptrs[2],
            "limit": float(limit_exp), "shared_n_ff": shared.n_ff if shared is not None else 0,
            "shared_qtypes": [lin.qtype for lin in sh] or [0, 0, 0], "shared_w": [lin._w for lin in sh] or
            [_ffi.NULL] * 3, "shared_clamp": shared._clamp if shared is not None else 0.0})
        self._what = f"moe {prefix}"
        store.row_pieces[il] = self.pieces

    def pieces(self, n_tok: int) -> int:
        """The pieces of rows a call of n_tok rows runs as: 1 (every distinct expert of the batch read
        once), or, for 2-4 rows through a layer small enough to stay in cache, one piece of whole rows per
        pool thread, each reading its own rows' experts (the token split, native/dispatch.c). Staged calls
        (an expert cache) are never split."""
        if self.store.cache is not None:
            return 1
        return int(_lib.gr_moe_block_pieces(self._layer, int(n_tok)))

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """moe(x') + shared(x'), x' = x or rms_norm(x) * norm."""
        if self.store.cache is None:
            return self.fused(x, norm, eps)
        return self.staged(x, norm, eps)

    def fused(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """The whole layer in one native call (gr_moe_block): router with the norm folded in, top-k,
        routed experts, shared expert; the choice comes back for the store's statistics."""
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        c = self.router.cfg
        ids = np.empty((n, c.n_used), dtype=np.int32)
        w = np.empty((n, c.n_used), dtype=np.float32)
        y = np.empty((n, x.shape[1]), dtype=np.float32)
        _check(_lib.gr_moe_block(self._layer, _f32(x), n, _ffi.NULL if norm is None else _f32(norm), eps,
                                 _from_buffer(_INT32S, ids, True), _f32(w), _f32(y)), self._what)
        self.store.record(self.il, ids)
        return y

    def staged(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """The same in steps, for an expert cache, which places the chosen experts before they run."""
        if norm is not None:  # the norm rides on the router's call, which hands back the normed input
            xn = np.empty_like(x, dtype=np.float32)
            ids, w = self.router(x, norm, eps, xn)
            x = xn
        else:
            ids, w = self.router(x)
        y = self.store.ffn(self.il, x, ids, w, self.limit)
        if self.shared is not None:
            y += self.shared(x)
        return y
