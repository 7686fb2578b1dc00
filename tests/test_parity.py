"""Logit parity with llama.cpp, and with the exact function the file defines, on the real models.

llama.cpp is not one fixed answer: its batched and token-by-token paths disagree with each other (and
with the exact float64 forward) because quantizing activations to 8 bits is chaotic over 30 layers: a
rounding-level change anywhere moves the logits by as much as the quantization itself. ggufrun carries
activations as two 8-bit terms (native act precision 2), which puts it within ~5e-7 mean KL of the
exact function, so its distance to llama.cpp is llama.cpp's own error. Over 600 positions of each of
two texts (prose with code and numbers; plain prose) it is held to:
  - against llama.cpp's batched and token-by-token paths: mean KL <= 5e-3 and top-1 agreement >= 96%,
    except where llama.cpp itself is further than that from the exact function on the text: then no
    further from llama.cpp than the exact function is (KL within 2%, top-1 at least as high). Measured
    here: llama.cpp's batched path agrees with the exact function on 95.3% of positions of both texts
    for SmolLM2 and is 5.0e-3 KL from it on Gemma 3, while its own batched and token-by-token paths agree
    with each other on only 93.7-96.2% of positions;
  - against the float64 reference: mean KL no larger than llama.cpp's own;
Our own token-by-token path is checked against our batched one in test_api.py.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import reference

llama_cpp = pytest.importorskip("llama_cpp")
import ggufrun  # noqa: E402
from ggufrun import native  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def two_term_activations():
    """The bounds here are act precision 2's (ggufrun ~exact; the default, 1, is llama.cpp's own
    numerics, another realisation of its rounding, checked against its greedy tokens where a test says
    so), set before the module's fixtures compute any logits."""
    with native.act_precision(2):
        yield

N_POS = 600
TEXTS = {"prose+code": "parity_text.txt", "prose": "parity_prose.txt"}
RESULTS = Path(os.environ.get("GGUFRUN_RESULTS", Path(__file__).parent.parent / "out")) / "parity.json"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """KL(p || q) per position, and top-1 agreement."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)), "max_kl": float(kl.max()),
            "top1": float(np.mean(p_logits.argmax(-1) == q_logits.argmax(-1)))}


def llama_cpp_logits(path: str, ids: list[int], token_by_token: bool) -> np.ndarray:
    n_batch = 1 if token_by_token else 512
    llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 2)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def _record(name: str, figures: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[name] = figures
    RESULTS.write_text(json.dumps(data, indent=2))


@functools.lru_cache(maxsize=1)
def _weights(path: str) -> reference.Weights:
    """float64 weights of one model, kept while its texts run (the params are ordered by model)."""
    return reference.Weights(path)


@pytest.fixture(scope="module", params=[(m, t) for m in ("smollm2_path", "gemma3_path") for t in TEXTS],
                ids=lambda p: f"{p[0].replace('_path', '')}-{p[1]}")
def runs(request):
    model, text = request.param
    path = request.getfixturevalue(model)
    llm = ggufrun.load(path, n_ctx=1024)
    ids = llm.tokenize((Path(__file__).parent / "data" / TEXTS[text]).read_text())[:N_POS]
    assert len(ids) == N_POS
    ours = llm.logits(ids)
    lcpp_batch = llama_cpp_logits(path, ids, token_by_token=False)
    lcpp_step = llama_cpp_logits(path, ids, token_by_token=True)
    ref = reference.forward(_weights(path), ids)
    figures = {
        "llama.cpp batched || ggufrun": compare(lcpp_batch, ours),
        "llama.cpp token-by-token || ggufrun": compare(lcpp_step, ours),
        "llama.cpp batched || llama.cpp token-by-token": compare(lcpp_batch, lcpp_step),
        "float64 || ggufrun": compare(ref, ours),
        "float64 || llama.cpp batched": compare(ref, lcpp_batch),
        "float64 || llama.cpp token-by-token": compare(ref, lcpp_step),
    }
    name = f"{model.replace('_path', '')} {text}"
    _record(name, figures)
    print(f"\n{name}: " + json.dumps(figures, indent=1))
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("lcpp", ["llama.cpp batched", "llama.cpp token-by-token"])
def test_agrees_with_llama_cpp(runs, lcpp):
    f = runs[f"{lcpp} || ggufrun"]
    exact = runs[f"float64 || {lcpp}"]  # llama.cpp's own distance to the function the file defines
    assert f["mean_kl"] <= max(5e-3, 1.02 * exact["mean_kl"]), (f, exact)
    assert f["top1"] >= min(0.96, exact["top1"]), (f, exact)


@pytest.mark.slow
def test_closer_to_exact_than_llama_cpp(runs):
    ours = runs["float64 || ggufrun"]["mean_kl"]
    assert ours <= runs["float64 || llama.cpp batched"]["mean_kl"], runs
    assert ours <= runs["float64 || llama.cpp token-by-token"]["mean_kl"], runs
