"""llama: SmolLM2, Llama 2/3, Mistral, and Mixtral-style MoE files of the llama architecture."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf_file import GGUFFile
from ..kv_cache import LayerCacheSpec
from ..layers import Attention, AttentionConfig, GatedFFN, RopeConfig, small
from ..moe import GATING_SOFTMAX, ExpertStore, MoE, RouterConfig
from ..ops import ROPE_NORM
from .base import TransformerLM, hparam


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
    rope: RopeConfig
    n_expert: int = 0          # Mixtral-style MoE files of the llama architecture
    n_expert_used: int = 0
    expert_weights_scale: float = 1.0

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Params":
        n_embd = hparam(f, "embedding_length")
        n_head = hparam(f, "attention.head_count")
        head_dim = hparam(f, "attention.key_length", n_embd // n_head)
        n_vocab = hparam(f, "vocab_size", None) or len(f.require("tokenizer.ggml.tokens", list))
        scale_type = hparam(f, "rope.scaling.type", "none")
        factor = hparam(f, "rope.scaling.factor", 1.0)
        freq_scale = 1.0 / factor if scale_type == "linear" and factor else 1.0
        ff = f.maybe_tensor("rope_freqs.weight")
        rope = RopeConfig(n_rot=hparam(f, "rope.dimension_count", head_dim),
                          base=hparam(f, "rope.freq_base", 10000.0), mode=ROPE_NORM, freq_scale=freq_scale,
                          freq_factors=None if ff is None else tuple(ff.dequantize().tolist()))
        return cls(n_embd=n_embd, n_layer=hparam(f, "block_count"), n_head=n_head,
                   n_head_kv=hparam(f, "attention.head_count_kv", n_head), head_dim=head_dim,
                   n_ff=hparam(f, "feed_forward_length"), n_vocab=n_vocab,
                   norm_eps=hparam(f, "attention.layer_norm_rms_epsilon"), rope=rope,
                   n_expert=hparam(f, "expert_count", 0), n_expert_used=hparam(f, "expert_used_count", 0),
                   expert_weights_scale=hparam(f, "expert_weights_scale", 1.0))


class Block:
    def __init__(self, f: GGUFFile, i: int, p: Params, attn_cfg: AttentionConfig, experts: ExpertStore):
        pre = f"blk.{i}."
        self.eps = p.norm_eps
        self.attn_norm = small(f, pre + "attn_norm.weight", (p.n_embd,))
        self.attn = Attention(f, pre, p.n_embd, attn_cfg, norm=self.attn_norm, eps=p.norm_eps)
        self.ffn_norm = small(f, pre + "ffn_norm.weight", (p.n_embd,))
        if p.n_expert and pre + "ffn_gate_inp.weight" in f:
            # Mixtral: softmax router over all experts, top-k, weights renormalised over the chosen
            router = RouterConfig(p.n_expert, p.n_expert_used, GATING_SOFTMAX, norm_weights=True,
                                  weights_scale=p.expert_weights_scale)
            self.ffn = MoE(f, pre, i, experts, p.n_embd, p.n_ff, router)
        else:
            self.ffn = GatedFFN(f, pre, p.n_embd, p.n_ff, "silu")

    def __call__(self, x, positions, cache, i):
        # the norms are folded into the projection calls (bit for bit the separate rms_norm)
        h = self.attn(x, positions, cache, i)  # x + attention(rms_norm(x) * attn_norm)
        y = self.ffn(h, self.ffn_norm, self.eps)
        y += h
        return y


class Model(TransformerLM):
    def __init__(self, f: GGUFFile):
        p = self.params = Params.from_gguf(f)
        super().__init__(f, p.n_embd, p.n_vocab, p.norm_eps)
        self.attn_cfg = AttentionConfig(n_head=p.n_head, n_head_kv=p.n_head_kv, head_dim_k=p.head_dim,
                                        head_dim_v=p.head_dim, rope=p.rope, scale=1.0 / math.sqrt(p.head_dim))
        self.experts = ExpertStore(f)
        self.blocks = [Block(f, i, p, self.attn_cfg, self.experts) for i in range(p.n_layer)]

    def cache_specs(self):
        p = self.params
        return [LayerCacheSpec(p.n_head_kv, p.head_dim, p.head_dim)] * p.n_layer
