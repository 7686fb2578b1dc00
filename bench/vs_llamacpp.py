"""ggufrun against llama.cpp on the same file, threads and context, measured alternately in one run.

    python bench/vs_llamacpp.py [-m smollm2-135m -m gemma3-270m -m step35-bench -m PATH.gguf] [-p 512]
                                [-n 128] [-t 2] [-r 3] [--rounds 2] [--act-precision 1|2] [--json OUT.json]

Each round runs `ggufrun bench` and bench/llamacpp_bench.py in fresh processes (so peak RSS is each
runtime's own) one after the other, so machine noise hits both alike; the table gives the ratio
ggufrun / llama.cpp of pp, tg (higher is better for ggufrun) and peak RSS (lower is better), the range
of the single runs, and the load average before and after (on a shared machine, read ratios with it).
`-p 0` or `-n 0` skips that metric.

`step35-bench` is models/step35_tiny.py's BENCH recipe at Q4_K_M (24 layers, hidden 1024, 64 experts
top 8; ~1.5 GB): ~/.cache/ggufrun/bench/step35-bench-Q4_K_M.gguf, written there on first use (minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--act-precision", type=int, choices=(1, 2), default=None,
                    help="ggufrun's activation precision (default: its own, 1); llama.cpp's is always 1")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from ggufrun.hub import resolve
    models = a.model or ["smollm2-135m", "gemma3-270m", "step35-bench"]
    common = ["-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads), "-r", str(a.reps)]
    ours_extra = ["--act-precision", str(a.act_precision)] if a.act_precision else []
    results = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for name in models:
        path = str(step35_bench() if name == "step35-bench" else resolve(name))
        ours, theirs = [], []
        for rnd in range(a.rounds):
            print(f"[{name}] round {rnd + 1}/{a.rounds}: ggufrun ...", file=sys.stderr, flush=True)
            ours.append(run_json([sys.executable, "-m", "ggufrun.cli", "bench", "-m", path, "--json", *common,
                                 *ours_extra]))
            print(f"[{name}] round {rnd + 1}/{a.rounds}: llama.cpp ...", file=sys.stderr, flush=True)
            theirs.append(run_json([sys.executable, str(HERE / "llamacpp_bench.py"), path, *common]))
        results[name] = {"ggufrun": ours, "llama.cpp": theirs}

    load_after = Path("/proc/loadavg").read_text().split()[:3]
    metrics = [m for m, n in ((f"pp{a.n_prompt}", a.n_prompt), (f"tg{a.n_gen}", a.n_gen)) if n]
    precision = results[models[0]]["ggufrun"][0].get("act_precision", "?") if models else "?"
    print(f"\nthreads {a.threads}; ggufrun act precision {precision}; load average {' '.join(load_before)} before, {' '.join(load_after)} after")
    print(f"{'model':<22} {'metric':<10} {'ggufrun':>12} {'llama.cpp':>12} {'ratio':>7}   runs (ggufrun | llama.cpp)")
    for name, r in results.items():
        for metric in metrics:
            ro = [x for run in r["ggufrun"] for x in run[metric]["runs"]]
            rt = [x for run in r["llama.cpp"] for x in run[metric]["runs"]]
            o, t = statistics.mean(ro), statistics.mean(rt)
            print(f"{name:<22} {metric:<10} {o:10.1f}/s {t:10.1f}/s {o / t:6.2f}x   {min(ro):.1f}-{max(ro):.1f} |"
                  f" {min(rt):.1f}-{max(rt):.1f}")
        o = max(run["peak_rss_bytes"] for run in r["ggufrun"]) / 2**20
        t = max(run["peak_rss_bytes"] for run in r["llama.cpp"]) / 2**20
        print(f"{name:<22} {'peak RSS':<10} {o:8.0f} MiB {t:8.0f} MiB {o / t:6.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "load_before": load_before,
                                            "load_after": load_after, "results": results}, indent=2))


def step35_bench() -> Path:
    """The BENCH step35 file, written by models/step35_tiny.py on first use."""
    path = Path.home() / ".cache" / "ggufrun" / "bench" / "step35-bench-Q4_K_M.gguf"
    if not path.exists():
        sys.path.insert(0, str(HERE.parent / "models"))
        import step35_tiny
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (models/step35_tiny.py BENCH, Q4_K_M) ...", file=sys.stderr, flush=True)
        step35_tiny.write_streamed(step35_tiny.BENCH, "Q4_K_M", path)
    return path


if __name__ == "__main__":
    main()
