"""The trained step35 model with three MTP heads (models/step35-mtp-py-Q8_0.gguf, written by
models/step35_mtp_train.py): drafting is lossless, the heads really predict, and llama.cpp agrees on
the trunk.

Prompts are openings of standard-library modules held out of training (tests/data/mtp_heldout.txt).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ggufrun
from ggufrun import native

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "step35-mtp-py-Q8_0.gguf"
HELDOUT = Path(__file__).parent / "data" / "mtp_heldout.txt"
N_GEN = 40
# head 1's acceptance over the held-out prompts below; measured on the committed file at k = 1: see
# models/README.md (bench/mtp_speedup.py). A random head accepts ~1/4096; the floor leaves a wide margin.
HEAD1_FLOOR = 0.35


def prompts(n: int) -> list[str]:
    text = HELDOUT.read_text(encoding="utf-8")
    return [p.strip("\n") + "\n" for p in text.split("\n" + "#" * 8 + "\n") if p.strip()][:n]


@pytest.fixture(scope="module")
def llm():
    assert MODEL.exists(), f"{MODEL} is missing: run models/step35_mtp_train.py (see models/README.md)"
    return ggufrun.load(str(MODEL), n_ctx=512)


def test_file_has_three_heads_and_real_tokenizer(llm):
    assert llm.mtp_heads == 3
    assert llm.tokenizer.pre == "gpt-2"
    text = "def f(x):\n    return x + 1\n"
    assert llm.detokenize(llm.tokenize(text, add_special=False)) == text


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identical_with_and_without_mtp(llm, k):
    for text in prompts(3):
        ids = llm.tokenize(text)
        llm.reset()
        plain = llm.generate(ids, max_tokens=N_GEN, temperature=0.0, mtp=0)
        llm.mtp_adaptive = False
        try:
            llm.reset()
            spec = llm.generate(ids, max_tokens=N_GEN, temperature=0.0, mtp=k)
            stats = llm.last_stats.mtp
        finally:
            llm.mtp_adaptive = True
        assert spec == plain, (k, text[:40])
        assert stats.k_hist[k] >= stats.steps - k      # really drafted k per step (less only at the end)
        # and with the cache reused from the previous generation (prefix reuse + head catch-up)
        again = llm.generate(ids, max_tokens=N_GEN, temperature=0.0, mtp=k)
        assert again == plain


def test_head1_acceptance_well_above_chance(llm):
    accepted = drafted = 0
    llm.mtp_adaptive = False
    try:
        for text in prompts(4):
            llm.reset()
            llm.generate(llm.tokenize(text), max_tokens=N_GEN, temperature=0.0, mtp=1)
            s = llm.last_stats.mtp
            accepted += s.accepted[0]
            drafted += s.drafted[0]
    finally:
        llm.mtp_adaptive = True
    assert drafted >= 4 * (N_GEN // 2 - 1)
    assert accepted / drafted >= HEAD1_FLOOR, (accepted, drafted)


def test_trunk_greedy_matches_llama_cpp(llm):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llm.model
    for text in prompts(2):
        prompt = llm.tokenize(text)
        # llama.cpp rounds activations to 8 bits before each quantized product; at act precision 1 we
        # do the same, so a near-tie cannot fall differently through rounding alone
        with native.act_precision(1):
            cache = model.new_cache(512, 512)
            logits = model.forward(np.array(prompt), cache)
            ours = []
            for _ in range(N_GEN):
                tok = int(np.argmax(logits[-1]))
                ours.append(tok)
                logits = model.forward(np.array([tok]), cache)
        lc = llama_cpp.Llama(str(MODEL), n_ctx=512, n_batch=64, n_ubatch=64, logits_all=True, verbose=False,
                             n_threads=1)
        lc.eval(prompt)
        theirs = []
        for _ in range(N_GEN):
            tok = int(np.argmax(lc.scores[lc.n_tokens - 1]))
            theirs.append(tok)
            lc.eval([tok])
        lc.close()
        assert ours == theirs, text[:40]
