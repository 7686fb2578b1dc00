"""Kernel throughput: matvec weight streaming (GB/s) against the machine's memory bandwidth, and
n_tok=32 matmul GFLOP/s, per quant type and per available ISA path.

Decode is a matrix-vector product per weight, bound by how fast weight bytes stream from memory, so
the headline number is GB/s of weight bytes next to a plain memory copy measured in the same run.

    python bench/kernels.py [--types Q4_0,Q4_K] [--threads N] [--isas avx2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gguf import GGMLQuantizationType as T  # noqa: E402

from ggufrun import native  # noqa: E402

DEFAULT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                 "IQ4_NL", "IQ4_XS", "MXFP4", "F16", "BF16", "F32"]
ROWS, COLS = 4096, 14336

# fp16 scale fields per block (offsets), set to moderate values so results stay finite
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                 "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def random_weights(name: str, rows: int, cols: int, rng) -> np.ndarray:
    n = rows * cols
    if name == "F32":
        return rng.standard_normal(n, dtype=np.float32).view(np.uint8)
    if name == "F16":
        return rng.standard_normal(n, dtype=np.float32).astype(np.float16).view(np.uint8)
    if name == "BF16":
        return (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    ts, bs = native.type_size(name), native.block_size(name)
    nb = n // bs
    blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    if name == "MXFP4":
        blocks[:, 0] = rng.integers(118, 128, size=nb, dtype=np.uint8)
    else:
        for off in SCALE_OFFSETS[name]:
            blocks[:, off:off + 2] = (rng.uniform(0.2, 1.0, size=nb) / 64).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return blocks.reshape(-1)


def memory_bandwidth_gbs(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Large numpy copy, counting the bytes read plus the bytes written."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_one(name: str, isa: str, w: np.ndarray, x1: np.ndarray, x32: np.ndarray, reps: int) -> dict:
    y1 = np.empty((1, ROWS), np.float32)
    y32 = np.empty((32, ROWS), np.float32)
    with native.force_isa(isa):
        native.matmul(w, name, ROWS, COLS, x1, out=y1)  # warm the pool and the pages
        t_vec = np.median([_timed(lambda: native.matmul(w, name, ROWS, COLS, x1, out=y1)) for _ in range(reps)])
        native.matmul(w, name, ROWS, COLS, x32, out=y32)
        t_mat = np.median([_timed(lambda: native.matmul(w, name, ROWS, COLS, x32, out=y32))
                           for _ in range(max(1, reps // 3))])
    return {"type": name, "isa": isa, "weight_mb": w.nbytes / 1e6, "matvec_ms": t_vec * 1e3,
            "matvec_gbs": w.nbytes / t_vec / 1e9, "n32_ms": t_mat * 1e3,
            "n32_gflops": 2.0 * ROWS * COLS * 32 / t_mat / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated quant types")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (0: physical cores)")
    ap.add_argument("--isas", default="", help="comma-separated ISA paths (default: all available)")
    ap.add_argument("--reps", type=int, default=10, help="matvec repetitions for SIMD paths")
    ap.add_argument("--scalar-reps", type=int, default=2, help="matvec repetitions for the scalar path")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    threads = native.set_threads(args.threads)
    isas = [i for i in (args.isas.split(",") if args.isas else native.available_isas())]
    for i in isas:
        if i not in native.available_isas():
            ap.error(f"ISA {i} not available (have {native.available_isas()})")
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    for t in types:
        native.type_size(t)  # raises for unknown/unsupported names

    bw = memory_bandwidth_gbs()
    print(f"# {platform.processor() or platform.machine()}, {threads} threads, ISAs {native.available_isas()}")
    print(f"# memory bandwidth (numpy copy, read+write): {bw:.1f} GB/s")
    print(f"# weights {ROWS} x {COLS}; matvec = n_tok 1, GFLOP/s at n_tok 32")
    head = f"{'type':<7} {'isa':<7} {'MB':>7} {'matvec ms':>10} {'GB/s':>7} {'/mem bw':>8} {'n32 ms':>9} {'GFLOP/s':>8}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, COLS), dtype=np.float32)
    x32 = rng.standard_normal((32, COLS), dtype=np.float32)
    results = []
    for name in types:
        w = random_weights(name, ROWS, COLS, rng)
        for isa in isas:
            r = bench_one(name, isa, w, x1, x32, args.scalar_reps if isa == "scalar" else args.reps)
            r["ratio_to_mem_bw"] = r["matvec_gbs"] / bw
            results.append(r)
            print(f"{name:<7} {isa:<7} {r['weight_mb']:7.1f} {r['matvec_ms']:10.2f} {r['matvec_gbs']:7.2f} "
                  f"{r['ratio_to_mem_bw']:8.2f} {r['n32_ms']:9.1f} {r['n32_gflops']:8.1f}", flush=True)
        del w
    if args.json:
        Path(args.json).write_text(json.dumps({"memory_bandwidth_gbs": bw, "threads": threads,
                                               "rows": ROWS, "cols": COLS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
