"""ggufrun against llama.cpp on the same file, threads and context, measured alternately in one run.

    python bench/vs_llamacpp.py [-m smollm2-135m -m gemma3-270m -m PATH.gguf] [-p 512] [-n 128] [-t 2] [-r 3]
                                [--rounds 2] [--json OUT.json]

Each round runs `ggufrun bench` and bench/llamacpp_bench.py in fresh processes (so peak RSS is each
runtime's own) one after the other, so machine noise hits both alike; the table gives the ratio
ggufrun / llama.cpp of pp, tg (higher is better for ggufrun) and peak RSS (lower is better).
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
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from ggufrun.hub import resolve
    models = a.model or ["smollm2-135m", "gemma3-270m"]
    common = ["-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads), "-r", str(a.reps)]
    results = {}
    for name in models:
        path = str(resolve(name))
        ours, theirs = [], []
        for rnd in range(a.rounds):
            print(f"[{name}] round {rnd + 1}/{a.rounds}: ggufrun ...", file=sys.stderr, flush=True)
            ours.append(run_json([sys.executable, "-m", "ggufrun.cli", "bench", "-m", path, "--json", *common]))
            print(f"[{name}] round {rnd + 1}/{a.rounds}: llama.cpp ...", file=sys.stderr, flush=True)
            theirs.append(run_json([sys.executable, str(HERE / "llamacpp_bench.py"), path, *common]))
        results[name] = {"ggufrun": ours, "llama.cpp": theirs}

    pp, tg = f"pp{a.n_prompt}", f"tg{a.n_gen}"
    print(f"\n{'model':<22} {'metric':<10} {'ggufrun':>12} {'llama.cpp':>12} {'ratio':>7}")
    for name, r in results.items():
        for metric in (pp, tg):
            o = statistics.mean(x for run in r["ggufrun"] for x in run[metric]["runs"])
            t = statistics.mean(x for run in r["llama.cpp"] for x in run[metric]["runs"])
            print(f"{name:<22} {metric:<10} {o:10.1f}/s {t:10.1f}/s {o / t:6.2f}x")
        o = max(run["peak_rss_bytes"] for run in r["ggufrun"]) / 2**20
        t = max(run["peak_rss_bytes"] for run in r["llama.cpp"]) / 2**20
        print(f"{name:<22} {'peak RSS':<10} {o:8.0f} MiB {t:8.0f} MiB {o / t:6.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
