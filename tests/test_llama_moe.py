"""Mixtral-style MoE in the llama architecture against llama.cpp on files models/ writes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import llama_moe_tiny  # noqa: E402

import ggufrun  # noqa: E402

TEXT = (Path(__file__).parent / "data" / "parity_prose.txt").read_text()


def kl_per_position(p_logits, q_logits):
    def lsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = lsm(p_logits), lsm(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("q,max_median_kl,min_top1", [("F32", 1e-4, 0.98), ("Q8_0", 2e-3, 0.90)])
def test_mixtral_style_llama_matches_llama_cpp(tmp_path, q, max_median_kl, min_top1):
    path = str(llama_moe_tiny.write(tmp_path / f"moe-{q}.gguf", q))
    llm = ggufrun.load(path, n_ctx=512)
    ids = llm.tokenize(TEXT)[:200]
    ours = llm.logits(ids)
    ref = llama_cpp.Llama(path, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    ref.eval(ids)
    theirs = np.array(ref.scores[:len(ids)], dtype=np.float32)
    ref.close()
    kl = kl_per_position(theirs, ours)
    top1 = float(np.mean(theirs.argmax(-1) == ours.argmax(-1)))
    print(f"\nmixtral-style llama {q}: median KL {np.median(kl):.2e}, mean {kl.mean():.2e}, top-1 {top1:.3f}")
    assert np.median(kl) <= max_median_kl and top1 >= min_top1
    # routing went through the expert store: every layer used several experts
    stats = llm.model.experts.stats()
    assert len(stats) == llama_moe_tiny.N_LAYER
    assert all(layer["used"] >= 4 and layer["tokens"] == len(ids) for layer in stats), stats
