"""Where a decode step's time goes: native kernels by op class versus the Python driving them.

    python bench/profile.py [-m smollm2-135m] [-n 64] [-t THREADS] [--prompt 32] [--prefill 512]

Wraps every native entry point the model calls (ops.Linear and the ops functions) with a timer, decodes
n tokens one at a time, and prints per-token time by op class and by layer, and the Python overhead:
wall time minus time inside native calls. Timers cost ~0.3 us a call, which the overhead row includes.
--prefill N profiles one N-token prompt (n_batch chunks) instead: milliseconds per op class for it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import ggufrun  # noqa: E402
from ggufrun import ops  # noqa: E402

by_op: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
by_layer: dict[int, float] = defaultdict(float)
current_layer = [-1]


def timed(name, fn):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            dt = time.perf_counter() - t
            by_op[name] += dt
            calls[name] += 1
            by_layer[current_layer[0]] += dt
    return wrapper


def install() -> None:
    linear_call = ops.Linear.__call__

    def linear(self, x, out=None):
        name = "matmul " + self.name.split(".")[-2] if "." in self.name else "matmul"
        return timed(name, linear_call)(self, x, out)
    ops.Linear.__call__ = linear
    group_call = ops.LinearGroup.__call__

    def group(self, *args, **kw):
        names = "+".join(lin.name.split(".")[-2] for lin in self.linears)
        return timed("matmul " + names + (" (+norm)" if len(args) > 1 and args[1] is not None else ""),
                     group_call)(self, *args, **kw)
    ops.LinearGroup.__call__ = group
    block_call = ops.AttentionBlock.__call__

    def block(self, *args, **kw):
        return timed("attention block (+norm, residual)", block_call)(self, *args, **kw)
    ops.AttentionBlock.__call__ = block
    for mod_name in ("layers", "moe", "models.base", "models.llama", "models.gemma3", "models.step35"):
        mod = sys.modules.get(f"ggufrun.{mod_name}")
        if mod is None:
            continue
        if hasattr(mod, "ffn"):
            mod.ffn = timed("ffn gate+up+glu+down (+norm)", ops.ffn)
        if mod_name == "moe":  # (the classes, shared by every module that imports them: wrapped once)
            mod.ExpertStore.ffn = (lambda f: lambda self, *a, **k: timed("moe experts", f)(self, *a, **k))(
                mod.ExpertStore.ffn)
            mod.MoE.fused = (lambda f: lambda self, *a, **k: timed("moe layer (router, experts, shared)", f)(
                self, *a, **k))(mod.MoE.fused)
        for fn in ("rms_norm", "rope", "qk_norm_rope", "glu", "attention", "embed_rows"):
            if hasattr(mod, fn):
                setattr(mod, fn, timed(fn, getattr(ops, fn)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0, metavar="N", help="profile an N-token prompt instead")
    a = ap.parse_args()
    llm = ggufrun.load(a.model, n_threads=a.threads, n_ctx=max(a.prompt + a.n_gen, a.prefill) + 8)
    install()
    blocks = llm.model.blocks
    for i, b in enumerate(blocks):  # attribute time to layers
        call = type(b).__call__

        def layer_call(self, *args, _call=call, _i=i, **kw):
            current_layer[0] = _i
            try:
                return _call(self, *args, **kw)
            finally:
                current_layer[0] = -1
        b.__class__ = type(type(b).__name__, (type(b),), {"__call__": layer_call})

    rng = np.random.default_rng(0)
    if a.prefill:
        ids = rng.integers(0, llm.model.n_vocab, a.prefill).tolist()
        llm._eval(ids[:8])                  # warm-up: page in weights, spin up the pool
        llm.reset()
        by_op.clear(); calls.clear(); by_layer.clear()
        t = time.perf_counter()
        llm._eval(ids)
        wall = time.perf_counter() - t
        print(f"{llm.path}: prefill of {a.prefill} tokens, {a.prefill / wall:.1f} tokens/s, {1e3 * wall:.0f} ms")
        print(f"{'op class':<22} {'ms':>9} {'calls':>7} {'share':>7}")
        for name, s in sorted(by_op.items(), key=lambda kv: -kv[1]):
            print(f"{name:<22} {1e3 * s:9.1f} {calls[name]:7d} {100 * s / wall:6.1f}%")
        py = wall - sum(by_op.values())
        print(f"{'python (the rest)':<22} {1e3 * py:9.1f} {'':>7} {100 * py / wall:6.1f}%")
        return
    ids = rng.integers(0, llm.model.n_vocab, a.prompt + a.n_gen).tolist()
    llm._eval(ids[:a.prompt])
    by_op.clear(); calls.clear(); by_layer.clear()
    t = time.perf_counter()
    for tok in ids[a.prompt:]:
        llm._eval([tok])
    wall = time.perf_counter() - t
    n = a.n_gen
    native_total = sum(by_op.values())
    print(f"{llm.path}: {n} decode steps, {n / wall:.1f} tokens/s, {1e3 * wall / n:.2f} ms/token")
    print(f"{'op class':<22} {'ms/token':>9} {'calls/token':>12} {'share':>7}")
    for name, s in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"{name:<22} {1e3 * s / n:9.3f} {calls[name] / n:12.1f} {100 * s / wall:6.1f}%")
    py = wall - native_total
    print(f"{'python (the rest)':<22} {1e3 * py / n:9.3f} {'':>12} {100 * py / wall:6.1f}%")
    print(f"native calls per token: {sum(calls.values()) / n:.0f}; python overhead per call: "
          f"{1e6 * py / max(sum(calls.values()), 1):.1f} us")
    print("per layer (ms/token, native only): " + " ".join(f"{1e3 * by_layer[i] / n:.2f}" for i in range(len(blocks))))


if __name__ == "__main__":
    main()
