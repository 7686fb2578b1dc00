"""Expert placement under a memory limit: ggufrun (expert cache) vs llama.cpp (mapping), both inside a
memory cgroup limited to half the model file.

    sudo .venv/bin/python bench/placement.py [--dir /tmp/ggufrun-placement] [-n 32] [-t 2] [--limit-frac 0.5]

Writes two step35 Q4_K_M files with models/step35_tiny.py's BENCH recipe (24 layers, hidden 1024, 64
experts top 8, ~1.45 GB): routing as random weights give it, and Zipf-skewed routing (selection bias
-0.12 * ln(rank); see step35_tiny.zipf_router). Each runtime runs in a fresh subprocess, unlimited and
then inside a cgroup v1 memory group (memory.limit_in_bytes = file size * limit-frac; page cache counts
against it). Limited runs start cold (the file's page cache dropped with posix_fadvise DONTNEED);
unlimited runs start with the file read into the page cache, their steady state. Same prompt, same threads, greedy decoding; the table gives decode tokens/s, the cgroup's peak
usage, and for ggufrun the expert cache's hit rate, bytes read per token and prefetch accuracy, and
whether each limited run's tokens equal its unlimited run's. A third ggufrun run under the limit starts
warm: from expert statistics (--expert-stats-file) saved by an unlimited run over a different text.

llama.cpp runs from its mapping (use_extra_bufts=False: otherwise it repacks K-quants into anonymous
memory and is OOM-killed under the limit). ggufrun gets --mem-budget = the limit minus a margin for the
page cache of the interpreter's own libraries, which the cgroup also charges.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PROMPT = ("The committee met on a grey Tuesday morning to decide what the village should do about the old mill,"
          " whose wheel had not turned in forty years and whose roof now leaked onto the grain")
# the warm-start statistics come from another text, so a warm run is not told the answer
STATS_PROMPT = ("In the spring of that year the harbour froze for the last time, and the fishermen, who had"
                " waited three weeks for the ice to break, began to mend their nets on the quay")
ZIPF_BETA = 0.12
LIB_MARGIN = 32 << 20   # shared-library pages the cgroup charges beyond ggufrun's own reserve


# -- workers: one runtime, one run, JSON on stdout ------------------------------------------------------------

def worker_ggufrun(a) -> dict:
    sys.path.insert(0, str(ROOT))
    import ggufrun
    t0 = time.perf_counter()
    kw = {} if a.mem_budget is None else {"mem_budget": a.mem_budget, "prefetch": not a.no_prefetch}
    if a.stats_in:
        kw["expert_stats_file"] = a.stats_in
    llm = ggufrun.load(a.model, n_threads=a.threads, n_ctx=a.ctx, **kw)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(STATS_PROMPT if a.stats_out else PROMPT)
    toks = []
    t1 = time.perf_counter()
    logits, _ = llm._prefill(ids)
    prompt_s = time.perf_counter() - t1
    if llm.expert_cache is not None:
        llm.expert_cache.reset_stats()   # decode only
    t2 = time.perf_counter()
    for i in range(a.n_gen):
        tok = int(logits[-1].argmax())
        toks.append(tok)
        if i + 1 < a.n_gen:
            logits = llm._eval([tok])
    dec_s = time.perf_counter() - t2
    out = {"tokens": toks, "decode_tps": (a.n_gen - 1) / dec_s, "prompt_s": prompt_s, "load_s": load_s,
           "n_prompt": len(ids), "anon_bytes": _anon_bytes()}
    if llm.expert_cache is not None:
        c = llm.expert_cache
        out["cache"] = {**c.stats.summary(), "slots": c.n_slots, "cache_bytes": c.capacity_bytes,
                        "n_experts": sum(L.n_expert for L in c.layers.values()), "direct": all(c.reader.direct)}
        out["plan"] = llm.placement.lines()
    if a.stats_out:
        llm.save_expert_stats(a.stats_out)
    return out


def worker_llamacpp(a) -> dict:
    import llama_cpp
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp_bench import keep_weights_mapped
    keep_weights_mapped()
    t0 = time.perf_counter()
    # n_batch 64: llama-cpp-python keeps an n_batch x n_vocab float array and llama.cpp a compute buffer
    # sized by the batch; at 512 those alone put it over a 733 MiB limit (OOM-killed)
    llm = llama_cpp.Llama(a.model, n_ctx=a.ctx, n_batch=64, n_ubatch=64, n_threads=a.threads,
                          n_threads_batch=a.threads, use_mmap=True, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(PROMPT.encode())
    n_vocab = llm.n_vocab()

    def last_logits():  # llm.scores is only filled with logits_all; the context's buffer has the last row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    t1 = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - t1
    toks = []
    t2 = time.perf_counter()
    for i in range(a.n_gen):
        tok = int(np.argmax(last_logits()))
        toks.append(tok)
        if i + 1 < a.n_gen:
            llm.eval([tok])
    dec_s = time.perf_counter() - t2
    return {"tokens": toks, "decode_tps": (a.n_gen - 1) / dec_s, "prompt_s": prompt_s, "load_s": load_s,
            "n_prompt": len(ids), "anon_bytes": _anon_bytes()}


def _anon_bytes() -> int:
    """RssAnon: what the process holds outside file mappings (a repacking llama.cpp holds the model)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the driver -----------------------------------------------------------------------------------------------

def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Cgroup:
    """A cgroup v1 memory group; processes join it from preexec_fn."""

    def __init__(self, name: str, limit: int):
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        self.write("memory.limit_in_bytes", limit)
        self.limit = limit

    def write(self, key: str, value) -> None:
        (self.path / key).write_text(str(value))

    def read(self, key: str) -> int:
        return int((self.path / key).read_text())

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reset_peak(self) -> None:
        self.write("memory.max_usage_in_bytes", 0)
        try:
            self.write("memory.force_empty", 0)  # drop what earlier runs left charged (page cache)
        except OSError:
            pass

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def warm_file_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass


def run_worker(runtime: str, model: Path, a, cg: Cgroup | None, mem_budget: int | None, timeout: float,
               stats_in: Path | None = None, stats_out: Path | None = None) -> dict:
    # limited runs start cold (the file cannot stay cached under the limit anyway); unlimited runs start
    # with the whole file in the page cache, their steady state
    if cg is not None:
        drop_file_cache(model)
    else:
        warm_file_cache(model)
    cmd = [sys.executable, __file__, "--worker", runtime, "--model", str(model), "-n", str(a.n_gen),
           "-t", str(a.threads), "--ctx", str(a.ctx)]
    if mem_budget is not None:
        cmd += ["--mem-budget", str(mem_budget)]
    if a.no_prefetch:
        cmd += ["--no-prefetch"]
    if stats_in is not None:
        cmd += ["--stats-in", str(stats_in)]
    if stats_out is not None:
        cmd += ["--stats-out", str(stats_out)]
    if cg is not None:
        cg.reset_peak()
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cg.join if cg else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    out = {"error": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"}
    if r.returncode == 0:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    out["loadavg_after"] = float(Path("/proc/loadavg").read_text().split()[0])  # others share the machine
    if cg is not None:
        out["peak_bytes"] = cg.read("memory.max_usage_in_bytes")
        out["limit_hits"] = cg.read("memory.failcnt")   # times usage hit the limit (reclaim), not kills
        oom = dict(line.split() for line in (cg.path / "memory.oom_control").read_text().splitlines())
        out["oom_kills"] = int(oom.get("oom_kill", 0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ggufrun", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mem-budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stats-in", help=argparse.SUPPRESS)
    ap.add_argument("--stats-out", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="/tmp/ggufrun-placement", help="where the model files are written")
    ap.add_argument("-n", "--n-gen", type=int, default=48)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--limit-frac", type=float, default=0.5, help="cgroup limit as a fraction of the file size")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--only", choices=["random", "zipf"], action="append", help="run only these models")
    ap.add_argument("--skip-unlimited-llama", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    if a.worker:
        fn = worker_ggufrun if a.worker == "ggufrun" else worker_llamacpp
        print(json.dumps(fn(a)))
        return 0

    sys.path.insert(0, str(ROOT / "models"))
    sys.path.insert(0, str(ROOT))
    import step35_tiny
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    files = {"random": d / "step35-bench-Q4_K_M.gguf", "zipf": d / f"step35-bench-zipf{ZIPF_BETA:g}-Q4_K_M.gguf"}
    payloads: dict = {}
    for kind, path in files.items():
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr, flush=True)
            step35_tiny.write_streamed(step35_tiny.BENCH, "Q4_K_M", path, zipf_beta=ZIPF_BETA if kind == "zipf" else 0.0,
                                       _payloads=payloads)
    payloads.clear()
    print(f"machine: {os.cpu_count()} cpus; {Path('/proc/loadavg').read_text().split()[:3]} load at start",
          file=sys.stderr)
    results = {}
    for kind in a.only or list(files):
        path = files[kind]
        size = path.stat().st_size
        limit = int(size * a.limit_frac)
        cg = Cgroup(f"ggufrun-placement-{os.getpid()}", limit)
        try:
            res = {"file_bytes": size, "limit_bytes": limit}
            for runtime in ("ggufrun", "llama.cpp"):
                for limited in (False, True):
                    if runtime == "llama.cpp" and not limited and a.skip_unlimited_llama:
                        continue
                    label = f"{kind} {runtime} {'limited' if limited else 'unlimited'}"
                    print(f"[{label}] ...", file=sys.stderr, flush=True)
                    budget = limit - LIB_MARGIN if (limited and runtime == "ggufrun") else None
                    r = run_worker(runtime, path, a, cg if limited else None, budget, a.timeout)
                    res[f"{runtime} {'limited' if limited else 'unlimited'}"] = r
                    print(f"[{label}] {json.dumps({k: v for k, v in r.items() if k not in ('tokens', 'plan')})}",
                          file=sys.stderr, flush=True)
            # warm start: expert statistics saved by an unlimited run over another text, then a limited run
            stats = d / f"{path.stem}.expert-stats.json"
            print(f"[{kind} ggufrun stats run on another text] ...", file=sys.stderr, flush=True)
            run_worker("ggufrun", path, replace_n(a, 64), None, None, a.timeout, stats_out=stats)
            print(f"[{kind} ggufrun limited, warm start] ...", file=sys.stderr, flush=True)
            r = run_worker("ggufrun", path, a, cg, limit - LIB_MARGIN, a.timeout, stats_in=stats)
            res["ggufrun limited warm"] = r
            print(f"[{kind} ggufrun limited, warm start] "
                  f"{json.dumps({k: v for k, v in r.items() if k not in ('tokens', 'plan')})}", file=sys.stderr, flush=True)
            results[kind] = res
        finally:
            cg.remove()
    print_table(results, a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


def replace_n(a, n_gen: int):
    b = argparse.Namespace(**vars(a))
    b.n_gen = n_gen
    return b


def print_table(results: dict, a) -> None:
    mb = 1 / 2**20
    print(f"\ndecode {a.n_gen} tokens, {a.threads} threads, greedy; limit = {a.limit_frac:g} x file size (cgroup v1)")
    print(f"{'model':<8} {'runtime':<10} {'memory':<20} {'decode t/s':>10} {'peak MiB':>9} {'same out':>8}"
          f" {'hit rate':>8} {'MiB/token':>9} {'pf recall':>9} {'pf prec':>8}")
    for kind, res in results.items():
        for runtime in ("ggufrun", "llama.cpp"):
            ref = res.get(f"{runtime} unlimited", {}).get("tokens")
            for limited in (False, True, "warm"):
                key = f"{runtime} {'unlimited' if not limited else 'limited' if limited is True else 'limited warm'}"
                r = res.get(key)
                if r is None:
                    continue
                mem = f"limit {res['limit_bytes'] * mb:.0f} MiB" if limited else "unlimited"
                if limited == "warm":
                    mem += " warm"
                if "error" in r:
                    print(f"{kind:<8} {runtime:<10} {mem:<20} {r['error']}")
                    continue
                same = "-" if not limited or ref is None else ("yes" if r["tokens"] == ref else "NO")
                peak = f"{r['peak_bytes'] * mb:9.0f}" if "peak_bytes" in r else f"{'-':>9}"
                c = r.get("cache")
                extra = (f" {c['hit_rate']:8.1%} {c['bytes_per_token'] * mb:9.1f} {c['prefetch_recall']:9.1%}"
                         f" {c['prefetch_precision']:8.1%}") if c else ""
                print(f"{kind:<8} {runtime:<10} {mem:<20} {r['decode_tps']:10.2f} {peak} {same:>8}{extra}")
        g, l = res.get("ggufrun limited", {}), res.get("llama.cpp limited", {})
        if "decode_tps" in g and "decode_tps" in l:
            w = res.get("ggufrun limited warm", {})
            print(f"{kind:<8} ggufrun / llama.cpp under the limit: {g['decode_tps'] / l['decode_tps']:.1f}x cold"
                  + (f", {w['decode_tps'] / l['decode_tps']:.1f}x with a warm start" if "decode_tps" in w else ""))
        gu, lu = res.get("ggufrun unlimited", {}), res.get("llama.cpp unlimited", {})
        if "tokens" in gu and "tokens" in lu:
            n = next((i for i, (x, y) in enumerate(zip(gu["tokens"], lu["tokens"])) if x != y), len(gu["tokens"]))
            print(f"{kind:<8} ggufrun and llama.cpp agree on the first {n} of {len(gu['tokens'])} greedy tokens")
        if "plan" in g:
            print(f"{kind:<8} ggufrun's plan under the limit:", *g["plan"], sep="\n  ")


if __name__ == "__main__":
    sys.exit(main())
