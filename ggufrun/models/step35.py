"""step35: Step-3.5/3.7-Flash. Hybrid sliding-window/global attention with per-layer head counts,
partial rotary on global layers, q/k norms and a per-head sigmoid gate on the attention output; leading
dense blocks, then MoE blocks (sigmoid routing with a selection bias, a shared expert, clamped SwiGLU).

`block_count` counts the MTP (nextn) blocks appended at blk.{n_layer + i}; the trunk is the first
block_count - nextn_predict_layers blocks. The trunk never runs the MTP blocks (speculative drafting
does); their tensors may be present or not.

Semantics follow llama.cpp's step35 graph: global layers rotate half of rope.dimension_count (default
the head size) and use rope_freqs.weight if present; sliding layers rotate rope.dimension_count_swa
(default the unhalved count) with base rope.freq_base_swa and no rope factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf_file import GGUFError, GGUFFile
from ..kv_cache import LayerCacheSpec
from ..layers import Attention, AttentionConfig, RopeConfig, small
from ..moe import GATING_SIGMOID, MoE, ExpertStore, RouterConfig, SwiGLU
from ..ops import ROPE_NEOX, Linear, cache_args, embed_rows, rms_norm
from ..ops import _check, _f32, _ffi, _from_buffer, _INT32S, _lib
from .base import TransformerLM, hparam, per_layer

SWA_ROPE_BASE = 10000.0   # llama.cpp's default when rope.freq_base_swa is absent


@dataclass(frozen=True)
class Params:
    n_embd: int
    n_layer: int              # trunk blocks
    n_nextn: int              # MTP blocks after the trunk
    n_head: tuple[int, ...]   # per block, MTP blocks included
    n_head_kv: tuple[int, ...]
    head_dim: int
    head_dim_v: int
    n_vocab: int
    norm_eps: float
    window: int
    is_swa: tuple[bool, ...]
    rope_global: RopeConfig
    rope_swa: RopeConfig
    n_ff: tuple[int, ...]
    is_moe: tuple[bool, ...]
    n_expert: int
    n_used: tuple[int, ...]
    n_ff_exp: int
    n_ff_shexp: int
    gating: int
    weights_norm: bool
    weights_scale: float
    clamp_exp: tuple[float, ...]
    clamp_shexp: tuple[float, ...]

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Params":
        n_all = hparam(f, "block_count")
        n_nextn = hparam(f, "nextn_predict_layers", 0)
        if not 0 <= n_nextn < n_all:
            raise GGUFError(f"{f.path}: key 'step35.nextn_predict_layers' = {n_nextn} leaves no trunk of"
                            f" {n_all} blocks")
        n_layer = n_all - n_nextn
        n_embd = hparam(f, "embedding_length")

        def arr(key, default=None):
            v = hparam(f, key) if default is None else hparam(f, key, default)
            return tuple(per_layer(v, n_all, f"step35.{key}", f))

        n_head = arr("attention.head_count")
        n_head_kv = arr("attention.head_count_kv", list(n_head))
        head_dim = hparam(f, "attention.key_length", n_embd // n_head[0])
        pattern = hparam(f, "attention.sliding_window_pattern")
        if not isinstance(pattern, list):
            raise GGUFError(f"{f.path}: key 'step35.attention.sliding_window_pattern' must be a per-layer array")
        is_swa = tuple(bool(v) for v in per_layer(pattern, n_all, "step35.attention.sliding_window_pattern", f))
        n_rot = hparam(f, "rope.dimension_count", head_dim)
        factor = hparam(f, "rope.scaling.factor", 0.0) or hparam(f, "rope.scale_linear", 0.0)
        ff = f.maybe_tensor("rope_freqs.weight")
        rope_global = RopeConfig(n_rot // 2, hparam(f, "rope.freq_base", 10000.0), ROPE_NEOX,
                                 1.0 / factor if factor else 1.0,
                                 None if ff is None else tuple(ff.dequantize().reshape(-1).tolist()))
        rope_swa = RopeConfig(hparam(f, "rope.dimension_count_swa", n_rot),
                              hparam(f, "rope.freq_base_swa", SWA_ROPE_BASE), ROPE_NEOX)
        is_moe = tuple(f"blk.{i}.ffn_gate_inp.weight" in f for i in range(n_all))
        any_moe = any(is_moe)
        return cls(
            n_embd=n_embd, n_layer=n_layer, n_nextn=n_nextn, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, head_dim_v=hparam(f, "attention.value_length", head_dim),
            n_vocab=len(f.require("tokenizer.ggml.tokens", list)),
            norm_eps=hparam(f, "attention.layer_norm_rms_epsilon"),
            window=hparam(f, "attention.sliding_window"), is_swa=is_swa,
            rope_global=rope_global, rope_swa=rope_swa,
            n_ff=arr("feed_forward_length", 0), is_moe=is_moe,
            n_expert=hparam(f, "expert_count") if any_moe else 0,
            n_used=arr("expert_used_count") if any_moe else (0,) * n_all,
            n_ff_exp=hparam(f, "expert_feed_forward_length") if any_moe else 0,
            n_ff_shexp=hparam(f, "expert_shared_feed_forward_length", 0),
            gating=hparam(f, "expert_gating_func", GATING_SIGMOID) or GATING_SIGMOID,
            weights_norm=bool(hparam(f, "expert_weights_norm", False)),
            weights_scale=float(hparam(f, "expert_weights_scale", 0.0)) or 1.0,
            clamp_exp=arr("swiglu_clamp_exp", 0.0), clamp_shexp=arr("swiglu_clamp_shexp", 0.0))

    def attention_config(self, i: int) -> AttentionConfig:
        return AttentionConfig(n_head=self.n_head[i], n_head_kv=self.n_head_kv[i], head_dim_k=self.head_dim,
                               head_dim_v=self.head_dim_v, rope=self.rope_swa if self.is_swa[i] else self.rope_global,
                               scale=1.0 / math.sqrt(self.head_dim), window=self.window if self.is_swa[i] else 0,
                               norm_eps=self.norm_eps)


class Block:
    def __init__(self, f: GGUFFile, i: int, p: Params, experts: ExpertStore):
        pre = f"blk.{i}."
        self.eps = p.norm_eps
        self.attn_norm = small(f, pre + "attn_norm.weight", (p.n_embd,))
        # each head's output scaled by sigmoid(attn_gate(x)) before attn_output, when the file has the gate
        g = f.maybe_tensor(pre + "attn_gate.weight", (p.n_head[i], p.n_embd))
        self.attn = Attention(f, pre, p.n_embd, p.attention_config(i), norm=self.attn_norm, eps=p.norm_eps,
                              gate=None if g is None else Linear(g))
        self.ffn_norm = small(f, pre + "ffn_norm.weight", (p.n_embd,))
        if p.is_moe[i]:
            shared = None
            if p.n_ff_shexp:
                shared = SwiGLU(f, pre, "_shexp", p.n_embd, p.n_ff_shexp, p.clamp_shexp[i])
            router = RouterConfig(p.n_expert, p.n_used[i], p.gating, p.weights_norm, p.weights_scale)
            self.ffn = MoE(f, pre, i, experts, p.n_embd, p.n_ff_exp, router, p.clamp_exp[i], shared)
        else:
            if not p.n_ff[i]:
                raise GGUFError(f"{f.path}: block {i} is dense but key 'step35.feed_forward_length' is missing")
            # llama.cpp applies the shared-expert clamp to every SwiGLU FFN of the layer, dense ones too
            self.ffn = SwiGLU(f, pre, "", p.n_embd, p.n_ff[i], p.clamp_shexp[i])

    def __call__(self, x, positions, cache, i):
        # the norms are folded into the projection calls (bit for bit the separate rms_norm)
        h = self.attn(x, positions, cache, i)  # x + attention(rms_norm(x) * attn_norm)
        y = self.ffn(h, self.ffn_norm, self.eps)
        y += h
        return y


class NextN:
    """One MTP (nextn) head, as llama.cpp's step35 DECODER_MTP graph runs it: the previous position's
    pre-norm hidden state h and the embedding e of the token at this position give
    x = eh_proj(concat(enorm(e), hnorm(h))) (embedding half first), then the block's own full decoder
    layer (attention over this head's own KV cache, dense or MoE FFN); its output is the next h, and
    rms_norm(shared_head_norm or output_norm) then shared_head_head (or the trunk's output) the logits."""

    def __init__(self, f: GGUFFile, il: int, p: Params, experts: ExpertStore, model: "Model"):
        pre = f"blk.{il}.nextn."
        self.il = il
        self.n_embd = p.n_embd
        self.eps = p.norm_eps
        self.eh_proj = Linear(f.tensor(pre + "eh_proj.weight", (p.n_embd, 2 * p.n_embd)))
        self.enorm = small(f, pre + "enorm.weight", (p.n_embd,))
        self.hnorm = small(f, pre + "hnorm.weight", (p.n_embd,))
        self.embd = f.maybe_tensor(pre + "embed_tokens.weight", (p.n_vocab, p.n_embd)) or model.tok_embd
        self.head_norm = small(f, pre + "shared_head_norm.weight", (p.n_embd,), optional=True)
        if self.head_norm is None:
            self.head_norm = model.output_norm
        head = f.maybe_tensor(pre + "shared_head_head.weight", (p.n_vocab, p.n_embd))
        self.head = Linear(head) if head is not None else model.output
        self.block = Block(f, il, p, experts)
        self.cache_spec = LayerCacheSpec(p.n_head_kv[il], p.head_dim, p.head_dim_v, p.window if p.is_swa[il] else 0)
        self._bind(p)

    def _bind(self, p: Params) -> None:
        """The head as one native call's description (gr_mtp_head_forward), bound once like the blocks."""
        b, ffn = self.block, self.block.ffn
        dense = not isinstance(ffn, MoE)
        self._n_used = 0 if dense else ffn.router.cfg.n_used
        self._keep = (self.embd, self.enorm, self.hnorm, b.ffn_norm, self.head_norm, self.eh_proj, self.head, ffn)
        self._desc = _ffi.new("gr_mtp_head *", {
            "n_embd": p.n_embd, "n_vocab": p.n_vocab, "embd_qtype": int(self.embd.qtype),
            "embd": _ffi.from_buffer("uint8_t[]", self.embd.data), "enorm": _f32(self.enorm),
            "hnorm": _f32(self.hnorm), "eps": self.eps, "eh_qtype": self.eh_proj.qtype, "eh_w": self.eh_proj._w,
            "attn": b.attn.block._desc, "ffn_norm": _f32(b.ffn_norm), "moe": _ffi.NULL if dense else ffn._layer,
            "ffn_qtypes": [ffn.gate.qtype, ffn.up.qtype, ffn.down.qtype] if dense else [0, 0, 0],
            "ffn_w": [ffn.gate._w, ffn.up._w, ffn.down._w] if dense else [_ffi.NULL] * 3,
            "n_ff": ffn.n_ff if dense else 0, "ffn_clamp": ffn._clamp if dense else 0.0,
            "head_norm": _f32(self.head_norm), "head_qtype": self.head.qtype, "head_w": self.head._w})
        self._what = f"mtp head blk.{self.il}"

    @property
    def chains_natively(self) -> bool:
        """gr_mtp_head_forward can run this head (a MoE head with an expert cache runs in steps)."""
        ffn = self.block.ffn
        return not (isinstance(ffn, MoE) and ffn.store.cache is not None)

    def hidden(self, tokens: np.ndarray, h_prev: np.ndarray, positions: np.ndarray, cache) -> np.ndarray:
        """Rows (token at p, trunk-or-head hidden state of p - 1) at `positions` of this head's one-layer
        cache; returns the block outputs (pre-norm), which are also the next head's h input."""
        e = embed_rows(self.embd, np.asarray(tokens, dtype=np.int64))
        x = np.concatenate([rms_norm(e, self.enorm, self.eps), rms_norm(h_prev, self.hnorm, self.eps)], axis=1)
        cache.check_room(len(tokens))
        y = self.block(self.eh_proj(x), positions, cache, 0)
        cache.n_past = int(positions[-1]) + 1
        return y

    def logits(self, h: np.ndarray, n_logits: int | None = None) -> np.ndarray:
        """The vocabulary projection of h's rows, of its first n_logits ids (None: all)."""
        return self.head(rms_norm(h, self.head_norm, self.eps), rows=n_logits)

    def forward(self, tokens: np.ndarray, h_prev: np.ndarray, positions: np.ndarray, cache,
                n_logits: int | None = None) -> tuple:
        """hidden()'s last row and its logits() in one native call: (block output (1, n_embd), logits), the
        same bits. The rows before the last only store their keys and values: all a draft needs of them.
        n_logits: only the logits of ids 0..n_logits-1 (a draft vocabulary; None: all). (A MoE head with
        an expert cache runs the steps: the cache places the chosen experts first.)"""
        n_logits = self.head.rows if n_logits is None else int(n_logits)
        if not 1 <= n_logits <= self.head.rows:
            raise ValueError(f"{self._what}: n_logits {n_logits} is outside 1..{self.head.rows}")
        if not self.chains_natively:
            h = self.hidden(tokens, h_prev, positions, cache)[-1:]
            return h, self.logits(h, n_logits)[0]
        return self._call(tokens, h_prev, positions, cache, 1, n_logits)

    def store(self, tokens: np.ndarray, h_prev: np.ndarray, positions: np.ndarray, cache) -> None:
        """Only the keys and values of these rows into this head's cache (a catch-up over committed
        positions: nothing reads the rows' outputs), the bits hidden() stores."""
        if not self.chains_natively:
            self.hidden(tokens, h_prev, positions, cache)
        else:
            self._call(tokens, h_prev, positions, cache, 0, 0)

    def _call(self, tokens, h_prev, positions, cache, n_out: int, n_logits: int):
        ffn = self.block.ffn
        n = len(tokens)
        cache.check_room(n)
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        h_prev = np.ascontiguousarray(h_prev, dtype=np.float32)
        h = np.empty((n_out, self.n_embd), dtype=np.float32)
        logits = np.empty(n_logits, dtype=np.float32) if n_out else None
        choice = ()
        if self._n_used and n_out:   # a MoE FFN's choice comes back for the store's statistics
            choice = (np.empty((n_out, self._n_used), dtype=np.int32), np.empty((n_out, self._n_used), dtype=np.float32))
        _check(_lib.gr_mtp_head_forward(self._desc, _from_buffer(_INT32S, tokens, False), _f32(h_prev), n, n_out,
                                        *cache_args(cache, 0, positions),
                                        _from_buffer(_INT32S, choice[0], True) if choice else _ffi.NULL,
                                        _f32(choice[1]) if choice else _ffi.NULL, _f32(h) if n_out else _ffi.NULL,
                                        n_logits, _f32(logits) if n_out else _ffi.NULL), self._what)
        if choice:
            ffn.store.record(ffn.il, choice[0])
        cache.n_past = int(positions[-1]) + 1
        return (h, logits) if n_out else None


class Model(TransformerLM):
    def __init__(self, f: GGUFFile):
        p = self.params = Params.from_gguf(f)
        super().__init__(f, p.n_embd, p.n_vocab, p.norm_eps)
        self.experts = ExpertStore(f)
        self.blocks = [Block(f, i, p, self.experts) for i in range(p.n_layer)]
        # MTP heads, when the file carries their tensors (llama.cpp probes the first block's eh_proj)
        # (their routed experts in a store of their own: trunk expert statistics and placement stay the trunk's)
        self.nextn = []
        self.mtp_experts = ExpertStore(f)
        if p.n_nextn and f"blk.{p.n_layer}.nextn.eh_proj.weight" in f:
            self.nextn = [NextN(f, p.n_layer + j, p, self.mtp_experts, self) for j in range(p.n_nextn)]

    def forward_hidden(self, tokens: np.ndarray, cache) -> np.ndarray:
        """Like forward(), but returns the trunk's pre-norm hidden state of every position (what the MTP
        heads take as h); logits(h) gives their logits."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        cache.check_room(len(tokens))
        positions = np.arange(cache.n_past, cache.n_past + len(tokens), dtype=np.int32)
        h = self.hidden(self.embed(tokens), positions, cache)
        cache.n_past += len(tokens)
        return h

    def cache_specs(self):
        p = self.params
        return [LayerCacheSpec(p.n_head_kv[i], p.head_dim, p.head_dim_v, p.window if p.is_swa[i] else 0)
                for i in range(p.n_layer)]
