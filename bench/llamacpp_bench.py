"""llama.cpp's side of bench/vs_llamacpp.py: pp and tg tokens/s through llama-cpp-python, measured the way
`ggufrun bench` measures ggufrun (random token ids, empty cache, mean of repetitions), JSON on stdout.

    python bench/llamacpp_bench.py MODEL.gguf -p 512 -n 128 -t 2 -r 3 [--no-repack]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np


def keep_weights_mapped() -> None:
    """Make every later Llama() load with use_extra_bufts=False, so llama.cpp computes from its mapping
    instead of repacking K-quants into anonymous memory. Llama() swallows unknown keyword arguments,
    use_extra_bufts among them, so the flag goes into the default parameters it starts from."""
    import llama_cpp
    import llama_cpp.llama_cpp as low
    default_params = low.llama_model_default_params

    def no_repack():
        p = default_params()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = llama_cpp.llama_model_default_params = no_repack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("--no-repack", action="store_true", help="use_extra_bufts=False: run from the mapping")
    a = ap.parse_args()
    import llama_cpp
    if a.no_repack:
        keep_weights_mapped()
    llm = llama_cpp.Llama(a.model, n_ctx=max(a.ctx_size, a.n_prompt + a.n_gen + 8), n_batch=512, n_ubatch=512,
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    out = {"model": os.path.basename(a.model), "threads": a.threads, "runtime": "llama.cpp " + llama_cpp.__version__}

    def timed(fn) -> float:
        llm.reset()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    if a.n_prompt:
        ids = rng.integers(0, vocab, a.n_prompt).tolist()
        timed(lambda: llm.eval(ids[:8]))
        runs = [a.n_prompt / timed(lambda: llm.eval(ids)) for _ in range(a.reps)]
        out[f"pp{a.n_prompt}"] = {"mean": statistics.mean(runs), "std": statistics.pstdev(runs), "runs": runs}
    if a.n_gen:
        ids = rng.integers(0, vocab, a.n_gen).tolist()

        def decode():
            for t in ids:
                llm.eval([t])
        timed(lambda: llm.eval(ids[:4]))
        runs = [a.n_gen / timed(decode) for _ in range(a.reps)]
        out[f"tg{a.n_gen}"] = {"mean": statistics.mean(runs), "std": statistics.pstdev(runs), "runs": runs}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
