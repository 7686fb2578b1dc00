"""`ggufrun bench`: prompt processing and generation speed, the way llama-bench measures them.

pp N: N prompt tokens evaluated from an empty cache in n_batch chunks, logits for the last one.
tg N: N tokens decoded one at a time from an empty cache.
Each is repeated and reported as mean and standard deviation of tokens/s; peak RSS is the process's.
Token ids are drawn at random from the vocabulary, as llama-bench does, so text does not matter.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(llm, n_prompt: int, n_gen: int, reps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = llm.model.n_vocab
    out: dict = {"model": os.path.basename(llm.path), "threads": None, "n_ctx": llm.n_ctx, "n_batch": llm.n_batch}
    from . import native
    out["threads"] = native.get_threads()
    out["isa"] = native.isa()
    out["act_precision"] = native.get_act_precision()

    def timed(fn) -> float:
        llm.reset()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    if n_prompt:
        ids = rng.integers(0, vocab, n_prompt).tolist()
        llm._eval(ids[:8])                      # warm-up: page in weights, spin up the pool
        runs = [n_prompt / timed(lambda: llm._eval(ids)) for _ in range(reps)]
        out[f"pp{n_prompt}"] = {"mean": statistics.mean(runs), "std": statistics.pstdev(runs), "runs": runs}
    if n_gen:
        ids = rng.integers(0, vocab, n_gen).tolist()

        def decode():
            for t in ids:
                llm._eval([t])
        llm.reset()
        llm._eval(ids[:4])
        runs = [n_gen / timed(decode) for _ in range(reps)]
        out[f"tg{n_gen}"] = {"mean": statistics.mean(runs), "std": statistics.pstdev(runs), "runs": runs}
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def format_result(r: dict) -> str:
    from .progress import human_bytes
    lines = [f"{r['model']}  threads={r['threads']} isa={r['isa']} act_precision={r['act_precision']}"
             f" n_ctx={r['n_ctx']} n_batch={r['n_batch']}"]
    for k, v in r.items():
        if k.startswith(("pp", "tg")) and isinstance(v, dict):
            lines.append(f"  {k:<8} {v['mean']:9.2f} ± {v['std']:.2f} tokens/s")
    lines.append(f"  peak RSS {human_bytes(r['peak_rss_bytes'])}")
    return "\n".join(lines)


def main_from_args(a) -> int:
    from . import api
    llm = api.load(a.model, n_threads=a.threads, n_ctx=max(a.ctx_size, a.n_prompt + a.n_gen + 8))
    r = measure(llm, a.n_prompt, a.n_gen, a.reps)
    print(json.dumps(r) if a.json else format_result(r))
    sys.stdout.flush()
    return 0
