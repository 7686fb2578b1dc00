"""Kernel throughput: matvec weight streaming (GB/s) against the machine's memory bandwidth, and
prefill matmul GFLOP/s, per quant type, ISA path and activation precision.

Decode is a matrix-vector product per weight, bound by how fast weight bytes stream from memory, so
its headline number is GB/s of weight bytes next to a plain memory copy measured in the same run.
Prefill (n_tok > 1) is compute bound: GFLOP/s (2 * rows * cols * n_tok per matmul) for the SmolLM2
shapes (576x1536, 1536x576, 49152x576: rows x cols), 640x2048 and 4096x14336, at n_tok 32 and 512;
a shape whose columns are not a multiple of the type's block size is skipped.

    python bench/kernels.py [--types Q4_0,Q4_K] [--threads N] [--isas avx2] [--precisions 1,2]
                            [--no-decode] [--no-prefill] [--shapes 576x1536,...] [--ntoks 32,512]
                            [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
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
# prefill: the SmolLM2-135M matmul shapes (ffn_down, ffn_up/gate, output), Gemma-3-270M's ffn_down (its
# K-quant shape; 576 columns are not a multiple of 256) and an 8B-class ffn_down
PREFILL_TYPES = ["Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "Q5_K"]
PREFILL_SHAPES = [(576, 1536), (1536, 576), (49152, 576), (640, 2048), (4096, 14336)]

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


def _precision(p: int):
    """native.act_precision(p), or a no-op at p=1 for a library from before act precision existed."""
    if hasattr(native, "act_precision"):
        return native.act_precision(p)
    if p != 1:
        raise SystemExit("this build of ggufrun has no act precision setting; use --precisions 1")
    return contextlib.nullcontext()


def _best_time(fn, reps: int, budget_s: float = 2.0) -> float:
    """Minimum over up to reps timed calls, stopping early once budget_s is spent (after a warm-up)."""
    fn()
    times, spent = [], 0.0
    while len(times) < reps and (spent < budget_s or not times):
        times.append(_timed(fn))
        spent += times[-1]
    return min(times)


def bench_decode(name: str, isa: str, p: int, w: np.ndarray, rows: int, cols: int, x1: np.ndarray, reps: int) -> dict:
    y1 = np.empty((1, rows), np.float32)
    with native.force_isa(isa), _precision(p):
        t = _best_time(lambda: native.matmul(w, name, rows, cols, x1, out=y1), reps)
    return {"kind": "decode", "type": name, "isa": isa, "precision": p, "rows": rows, "cols": cols,
            "weight_mb": w.nbytes / 1e6, "ms": t * 1e3, "gbs": w.nbytes / t / 1e9}


def bench_prefill(name: str, isa: str, p: int, w: np.ndarray, rows: int, cols: int, x: np.ndarray, reps: int) -> dict:
    y = np.empty((x.shape[0], rows), np.float32)
    with native.force_isa(isa), _precision(p):
        t = _best_time(lambda: native.matmul(w, name, rows, cols, x, out=y), reps)
    return {"kind": "prefill", "type": name, "isa": isa, "precision": p, "rows": rows, "cols": cols,
            "n_tok": x.shape[0], "ms": t * 1e3, "gflops": 2.0 * rows * cols * x.shape[0] / t / 1e9}


def _shape(text: str) -> tuple[int, int]:
    r, c = text.lower().split("x")
    return int(r), int(c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated quant types (decode)")
    ap.add_argument("--prefill-types", default=",".join(PREFILL_TYPES), help="comma-separated quant types (prefill)")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (0: physical cores)")
    ap.add_argument("--isas", default="", help="comma-separated ISA paths (default: all available for decode, "
                                               "the best one for prefill)")
    ap.add_argument("--precisions", default="1,2", help="act precisions to measure")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions for SIMD paths")
    ap.add_argument("--scalar-reps", type=int, default=2, help="timed repetitions for the scalar path")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in PREFILL_SHAPES), help="prefill rows x cols")
    ap.add_argument("--ntoks", default="32,512", help="prefill token counts")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    threads = native.set_threads(args.threads)
    isas = [i for i in (args.isas.split(",") if args.isas else native.available_isas())]
    for i in isas:
        if i not in native.available_isas():
            ap.error(f"ISA {i} not available (have {native.available_isas()})")
    precisions = [int(p) for p in args.precisions.split(",")]
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    prefill_types = [t.strip().upper() for t in args.prefill_types.split(",") if t.strip()]
    for t in types + prefill_types:
        native.type_size(t)  # raises for unknown/unsupported names

    results = []
    rng = np.random.default_rng(0)
    print(f"# {platform.processor() or platform.machine()}, {threads} threads, ISAs {native.available_isas()}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    bw = None
    if not args.no_decode:
        bw = memory_bandwidth_gbs()
        print(f"# memory bandwidth (numpy copy, read+write): {bw:.1f} GB/s")
        print(f"# decode: matvec (n_tok 1) of {ROWS} x {COLS} weights, GB/s of weight bytes")
        head = f"{'type':<7} {'isa':<7} {'MB':>7}" + "".join(f" {'p' + str(p) + ' ms':>8} {'GB/s':>6} {'/bw':>5}" for p in precisions)
        print(head)
        print("-" * len(head))
        x1 = rng.standard_normal((1, COLS), dtype=np.float32)
        for name in types:
            w = random_weights(name, ROWS, COLS, rng)
            for isa in isas:
                line = f"{name:<7} {isa:<7} {w.nbytes / 1e6:7.1f}"
                for p in precisions:
                    r = bench_decode(name, isa, p, w, ROWS, COLS, x1, args.scalar_reps if isa == "scalar" else args.reps)
                    r["ratio_to_mem_bw"] = r["gbs"] / bw
                    results.append(r)
                    line += f" {r['ms']:8.2f} {r['gbs']:6.2f} {r['ratio_to_mem_bw']:5.2f}"
                print(line, flush=True)
            del w
    if not args.no_prefill:
        isa = args.isas.split(",")[-1] if args.isas else native.best_isa()
        shapes = [_shape(s) for s in args.shapes.split(",")]
        ntoks = [int(n) for n in args.ntoks.split(",")]
        print(f"# prefill GFLOP/s on {isa} (shape rows x cols; p = act precision)")
        cols_head = [f"n{n} p{p}" for n in ntoks for p in precisions]
        head = f"{'type':<7} {'shape':<11}" + "".join(f" {c:>9}" for c in cols_head)
        print(head)
        print("-" * len(head))
        xs = {}
        for name in prefill_types:
            for rows, cols in shapes:
                if cols % native.block_size(name):
                    continue  # K-quants need a multiple of 256 columns
                w = random_weights(name, rows, cols, rng)
                line = f"{name:<7} {f'{rows}x{cols}':<11}"
                for n in ntoks:
                    if (n, cols) not in xs:
                        xs[(n, cols)] = rng.standard_normal((n, cols), dtype=np.float32)
                    for p in precisions:
                        r = bench_prefill(name, isa, p, w, rows, cols, xs[(n, cols)], 3)
                        results.append(r)
                        line += f" {r['gflops']:9.1f}"
                print(line, flush=True)
                del w
    if args.json:
        Path(args.json).write_text(json.dumps({"memory_bandwidth_gbs": bw, "threads": threads,
                                               "load_average": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
