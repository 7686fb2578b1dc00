"""gemma3: interleaved sliding-window and global attention, q/k norms, pre and post norms, GeGLU."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..gguf_file import GGUFFile
from ..kv_cache import LayerCacheSpec
from ..layers import Attention, AttentionConfig, GatedFFN, RopeConfig, small
from ..ops import ROPE_NEOX, rms_norm
from .base import TransformerLM, hparam, per_layer

SWA_PATTERN = 6            # every 6th layer is global unless the file says otherwise
SWA_ROPE_BASE = 10000.0    # local layers' rope base unless rope.freq_base_swa is given


@dataclass(frozen=True)
class Params:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    norm_eps: float
    window: int
    is_swa: tuple[bool, ...]
    rope_global: RopeConfig
    rope_local: RopeConfig
    attn_scale: float
    final_softcap: float

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Params":
        n_embd = hparam(f, "embedding_length")
        n_layer = hparam(f, "block_count")
        n_head = hparam(f, "attention.head_count")
        head_dim = hparam(f, "attention.key_length", n_embd // n_head)
        window = hparam(f, "attention.sliding_window", 0)
        pattern = hparam(f, "attention.sliding_window_pattern", SWA_PATTERN)
        if isinstance(pattern, list):
            is_swa = tuple(bool(x) for x in per_layer(pattern, n_layer, "sliding_window_pattern", f))
        else:
            is_swa = tuple(window > 0 and (pattern == 0 or i % pattern < pattern - 1) for i in range(n_layer))
        n_rot = hparam(f, "rope.dimension_count", head_dim)
        scale_type = hparam(f, "rope.scaling.type", "none")
        factor = hparam(f, "rope.scaling.factor", 1.0)
        freq_scale = 1.0 / factor if scale_type == "linear" and factor else 1.0
        n_vocab = len(f.require("tokenizer.ggml.tokens", list))
        # the 27B model scales queries by n_embd / n_head instead of the head size
        attn_scale = 1.0 / math.sqrt(n_embd / n_head if n_layer == 62 else head_dim)
        return cls(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=hparam(f, "attention.head_count_kv", n_head), head_dim=head_dim,
                   n_ff=hparam(f, "feed_forward_length"), n_vocab=n_vocab,
                   norm_eps=hparam(f, "attention.layer_norm_rms_epsilon"), window=window, is_swa=is_swa,
                   rope_global=RopeConfig(n_rot, hparam(f, "rope.freq_base", 10000.0), ROPE_NEOX, freq_scale),
                   rope_local=RopeConfig(n_rot, hparam(f, "rope.freq_base_swa", SWA_ROPE_BASE), ROPE_NEOX),
                   attn_scale=attn_scale, final_softcap=hparam(f, "final_logit_softcapping", 0.0))


class Block:
    def __init__(self, f: GGUFFile, i: int, p: Params, attn_cfg: AttentionConfig):
        pre = f"blk.{i}."
        self.eps = p.norm_eps
        self.attn_norm = small(f, pre + "attn_norm.weight", (p.n_embd,))
        self.attn_post_norm = small(f, pre + "post_attention_norm.weight", (p.n_embd,))
        self.attn = Attention(f, pre, p.n_embd, attn_cfg, norm=self.attn_norm, eps=p.norm_eps,
                              post_norm=self.attn_post_norm)
        self.ffn_norm = small(f, pre + "ffn_norm.weight", (p.n_embd,))
        self.ffn = GatedFFN(f, pre, p.n_embd, p.n_ff, "gelu")
        self.ffn_post_norm = small(f, pre + "post_ffw_norm.weight", (p.n_embd,))

    def __call__(self, x, positions, cache, i):
        # the pre-norms are folded into the projection calls (bit for bit the separate rms_norm)
        h = self.attn(x, positions, cache, i)  # x + rms_norm(attention(rms_norm(x) * attn_norm)) * attn_post_norm
        m = self.ffn(h, self.ffn_norm, self.eps)
        return h + rms_norm(m, self.ffn_post_norm, self.eps)


class Model(TransformerLM):
    def __init__(self, f: GGUFFile):
        p = self.params = Params.from_gguf(f)
        super().__init__(f, p.n_embd, p.n_vocab, p.norm_eps)
        self.embed_scale = math.sqrt(p.n_embd)
        self.final_softcap = p.final_softcap
        self.blocks = []
        for i in range(p.n_layer):
            cfg = AttentionConfig(n_head=p.n_head, n_head_kv=p.n_head_kv, head_dim_k=p.head_dim,
                                  head_dim_v=p.head_dim, rope=p.rope_local if p.is_swa[i] else p.rope_global, scale=p.attn_scale,
                                  window=p.window if p.is_swa[i] else 0, norm_eps=p.norm_eps)
            self.blocks.append(Block(f, i, p, cfg))

    def cache_specs(self):
        p = self.params
        return [LayerCacheSpec(p.n_head_kv, p.head_dim, p.head_dim, p.window if p.is_swa[i] else 0)
                for i in range(p.n_layer)]
