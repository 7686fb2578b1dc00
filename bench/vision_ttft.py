"""Image time-to-first-token: an image prompt against a text prompt of the same token count, in ggufrun
and in llama.cpp's mtmd, on the same files and threads.

    python bench/vision_ttft.py [--dir DIR] [--size 900x600] [--quant F16] [-t 2] [-r 3] [--n-batch 512]
                                [--json OUT.json]

Files: models/step3vl_tiny.py's text model and its BENCH_VISION mmproj (the real patch size, 728-pixel
overview and 504-pixel crops; width 384, 8 layers: the real encoder is 1536 wide with 47 layers), written
to DIR on first use. TTFT is from the call to the first sampled token with nothing cached: for images it
is decode-free (RGB in) preprocessing + encoding + the prompt's prefill; for text, the prefill. Each
engine runs in its own process (ggufrun's idle pool workers slow a llama.cpp in the same process), one
after the other per repetition; the best of the repetitions is reported, with the load average.
llama.cpp evaluates the chunks with mtmd_helper_eval_chunks at the same n_batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))
sys.path.insert(0, str(HERE.parent / "tests"))

PROMPT = "Describe this picture in detail: <__media__> Start with the main subject."


def picture(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 17.0) + np.cos(yy / 11.0)) * 60 + 128
    img = np.stack([base + rng.integers(-30, 30, (h, w)), 255 - base, base / 2 + 40], -1)
    return np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))


def files(d: Path, quant: str) -> tuple[Path, Path]:
    import step3vl_tiny as T
    d.mkdir(parents=True, exist_ok=True)
    text, mm = d / "step35-tiny-vl-F32.gguf", d / f"mmproj-step3vl-bench-{quant}.gguf"
    if not text.exists():
        T.write_text("F32", text)
    if not mm.exists():
        T.write_mmproj(T.BENCH_VISION, quant, mm)
    return text, mm


def filler_ids(tokenize, n: int) -> list[int]:
    ids = tokenize("The quick brown fox jumps over the lazy dog. " * (n // 8 + 2))
    return ids[:n]


def run_ggufrun(text: Path, mm: Path, h: int, w: int, threads: int, n_batch: int) -> dict:
    import ggufrun
    llm = ggufrun.load(str(text), n_threads=threads, n_ctx=8192, n_batch=n_batch, mmproj=mm)
    img = picture(h, w)
    llm._image_embd.clear()
    t0 = time.perf_counter()
    pp = llm.mmproj.preprocess(img)
    t1 = time.perf_counter()
    for e in pp.entries:
        llm.mmproj.encode(e)
    t2 = time.perf_counter()
    llm._image_embd.clear()
    llm.reset()
    t3 = time.perf_counter()
    out = llm.generate(PROMPT, images=[img], max_tokens=1, temperature=0)   # everything, cold
    ttft_image = time.perf_counter() - t3
    n = llm.last_stats.prompt_tokens
    ids = filler_ids(lambda s: llm.tokenize(s, add_special=False), n)
    llm.reset()
    t4 = time.perf_counter()
    llm.generate(ids, max_tokens=1, temperature=0)
    ttft_text = time.perf_counter() - t4
    return {"engine": "ggufrun", "tokens": n, "image_tokens": sum(llm.mmproj.n_tokens(*e.shape[1:]) for e in pp.entries),
            "entries": len(pp.entries), "preprocess_s": t1 - t0, "encode_s": t2 - t1,
            "ttft_image_s": ttft_image, "ttft_text_s": ttft_text, "first": out}


def run_llamacpp(text: Path, mm: Path, h: int, w: int, threads: int, n_batch: int) -> dict:
    import llama_cpp
    from mtmd_oracle import CHUNK_IMAGE, Mtmd
    o = Mtmd(text, mm, n_threads=threads, flash_attn=-1, n_ctx=8192, n_batch=n_batch)  # its default (auto)
    img = picture(h, w)
    t0 = time.perf_counter()
    _, n = o.logits_after(PROMPT, [img])
    ttft_image = time.perf_counter() - t0
    n_img = sum(c.n_tokens for c in o.chunks(PROMPT, [img], encode=False) if c.kind == CHUNK_IMAGE)
    vocab = llama_cpp.llama_model_get_vocab(o.model)

    def tokenize(s: str) -> list[int]:
        buf = (llama_cpp.llama_token * (4 * len(s) + 16))()
        k = llama_cpp.llama_tokenize(vocab, s.encode(), len(s.encode()), buf, len(buf), False, True)
        return list(buf[:k])
    ids = filler_ids(tokenize, n)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 8192, n_batch, n_batch
    cparams.n_threads = cparams.n_threads_batch = threads
    lctx = llama_cpp.llama_init_from_model(o.model, cparams)
    t1 = time.perf_counter()
    for s in range(0, len(ids), n_batch):
        part = ids[s:s + n_batch]
        arr = (llama_cpp.llama_token * len(part))(*part)   # kept alive until the decode
        batch = llama_cpp.llama_batch_get_one(arr, len(part))
        if llama_cpp.llama_decode(lctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
    llama_cpp.llama_get_logits_ith(lctx, -1)
    ttft_text = time.perf_counter() - t1
    llama_cpp.llama_free(lctx)
    o.close()
    return {"engine": "llama.cpp", "tokens": n, "image_tokens": n_img, "ttft_image_s": ttft_image, "ttft_text_s": ttft_text}


def child(a) -> None:
    text, mm = Path(a.text), Path(a.mmproj)
    fn = run_ggufrun if a.child == "ggufrun" else run_llamacpp
    print(json.dumps(fn(text, mm, a.h, a.w, a.threads, a.n_batch)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "ggufrun" / "bench"))
    ap.add_argument("--size", default="900x600", help="image WIDTHxHEIGHT")
    ap.add_argument("--quant", default="F16", choices=["F32", "F16"])
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--child", choices=["ggufrun", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--mmproj", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.w, a.h = (int(v) for v in a.size.lower().split("x"))
    if a.child:
        return child(a)
    text, mm = files(Path(a.dir), a.quant)
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {"ggufrun": [], "llama.cpp": []}
    for _ in range(a.reps):
        for eng in runs:
            cmd = [sys.executable, __file__, "--child", eng, "--text", str(text), "--mmproj", str(mm), "--size", a.size,
                   "-t", str(a.threads), "--n-batch", str(a.n_batch)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{eng} failed:\n{r.stderr[-3000:]}")
            runs[eng].append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = {e: min(rs, key=lambda r: r["ttft_image_s"]) | {"ttft_text_s": min(r["ttft_text_s"] for r in rs)}
            for e, rs in runs.items()}
    res = {"image": a.size, "mmproj": str(mm), "threads": a.threads, "n_batch": a.n_batch, "reps": a.reps,
           "loadavg_before": load0, "loadavg_after": os.getloadavg(), "best": best}
    g, l = best["ggufrun"], best["llama.cpp"]
    print(f"image {a.size}, {g['tokens']} prompt tokens ({g['image_tokens']} image rows, {g['entries']} encoder"
          f" entries), {a.threads} threads, n_batch {a.n_batch}, best of {a.reps}")
    print(f"  ggufrun   image TTFT {g['ttft_image_s']:.2f}s (preprocess {g['preprocess_s']:.2f}s, encode"
          f" {g['encode_s']:.2f}s) | text TTFT, same token count {g['ttft_text_s']:.2f}s")
    print(f"  llama.cpp image TTFT {l['ttft_image_s']:.2f}s | text TTFT {l['ttft_text_s']:.2f}s")
    print(f"  load average before {load0[0]:.2f}, after {res['loadavg_after'][0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
