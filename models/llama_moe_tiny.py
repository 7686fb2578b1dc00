"""Write a tiny Mixtral-style MoE in the `llama` architecture (random weights, SmolLM2's tokenizer).

    python models/llama_moe_tiny.py OUT.gguf [--quant F32|Q8_0|Q4_K]

Mixtral files keep the llama architecture and add `llama.expert_count` / `expert_used_count` and, per
layer, a softmax router `ffn_gate_inp` and 3-D `ffn_{gate,up,down}_exps` tensors; llama.cpp routes
with softmax over all experts, takes the top k and renormalises their weights.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant  # noqa: E402
from step35_tiny import tokenizer_metadata  # noqa: E402

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF, N_EXPERT, N_USED = 256, 3, 8, 2, 256, 8, 2


def write(path: str | Path, q: str = "F32", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n_vocab = len(tokenizer_metadata()["tokenizer.ggml.tokens"])

    def mat(rows, cols, gain=1.0, *lead):
        return (rng.standard_normal((*lead, rows, cols)) * (gain / math.sqrt(cols))).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    hd = N_EMBD // N_HEAD
    w = {"token_embd.weight": rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32),
         "output_norm.weight": norm(N_EMBD), "output.weight": mat(n_vocab, N_EMBD, 4.0)}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w |= {p + "attn_norm.weight": norm(N_EMBD), p + "attn_q.weight": mat(N_HEAD * hd, N_EMBD),
              p + "attn_k.weight": mat(N_HEAD_KV * hd, N_EMBD), p + "attn_v.weight": mat(N_HEAD_KV * hd, N_EMBD),
              p + "attn_output.weight": mat(N_EMBD, N_HEAD * hd, 0.7), p + "ffn_norm.weight": norm(N_EMBD),
              p + "ffn_gate_inp.weight": mat(N_EXPERT, N_EMBD, 2.0),
              p + "ffn_gate_exps.weight": mat(N_FF, N_EMBD, 1.0, N_EXPERT),
              p + "ffn_up_exps.weight": mat(N_FF, N_EMBD, 1.0, N_EXPERT),
              p + "ffn_down_exps.weight": mat(N_EMBD, N_FF, 0.5, N_EXPERT)}
    tensors = {k: (v, "F32" if v.ndim == 1 or q == "F32" or "ffn_gate_inp" in k else q) for k, v in w.items()}
    md = {"general.name": "tiny mixtral-style llama", "general.file_type": {"F32": 0, "Q8_0": 7, "Q4_K": 15}[q],
          "llama.context_length": 2048, "llama.embedding_length": N_EMBD, "llama.block_count": N_LAYER,
          "llama.feed_forward_length": N_FF, "llama.attention.head_count": N_HEAD,
          "llama.attention.head_count_kv": N_HEAD_KV, "llama.rope.freq_base": 10000.0,
          "llama.rope.dimension_count": hd, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.expert_count": N_EXPERT, "llama.expert_used_count": N_USED,
          "llama.vocab_size": n_vocab}
    md.update(tokenizer_metadata())
    quant.write_gguf(path, "llama", md, tensors)
    return Path(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--quant", default="F32", choices=["F32", "Q8_0", "Q4_K"])
    a = ap.parse_args()
    print(write(a.out, a.quant))
