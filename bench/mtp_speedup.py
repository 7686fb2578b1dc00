"""MTP speculative decoding on the trained step35 model: acceptance and decode speed-up, measured.

    python bench/mtp_speedup.py [-m models/step35-mtp-py-Q8_0.gguf] [-n 128] [--rounds 3] [--json out/mtp_speedup.json]

Prompts are the openings of modules held out of the model's training (models/step35_mtp_train.py
HOLDOUT; tests/data/mtp_heldout.txt keeps a copy). For each prompt and round, greedy decoding runs
without MTP and with it (fixed k = 1, 2, 3, and the adaptive controller), alternating in the same
process so machine load hits all variants alike; decode tokens/s is generated tokens over decode
time (prompt processing excluded). Every MTP run's text is checked equal to the plain run's. Drafts
range over the default draft vocabulary (mtp.default_draft_vocab: here the first 1024 of 4096 ids),
but k3-allids' over every id.

Also printed: acceptance per draft position (fixed k = 3: position i's rate is conditional on drafts
< i accepted), and where a step's time goes: a 1-token trunk step, a (k+1)-token verify, one head call
and the vocabulary projection, timed in isolation at the prompt's position.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ggufrun  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "step35-mtp-py-Q8_0.gguf"
HELDOUT = ROOT / "tests" / "data" / "mtp_heldout.txt"


def prompts(n: int) -> list[str]:
    """Snippets of held-out modules, separated in the data file by lines of '#' * 8."""
    text = HELDOUT.read_text(encoding="utf-8")
    parts = [p.strip("\n") + "\n" for p in text.split("\n" + "#" * 8 + "\n") if p.strip()]
    return parts[:n]


def decode(llm, ids, n, k, adaptive=False, vocab=None):
    llm.mtp_adaptive = adaptive
    llm.mtp_vocab = vocab
    llm.reset()
    out = llm.generate(ids, max_tokens=n, temperature=0.0, mtp=k)
    s = llm.last_stats
    return out, s.generated_tokens / s.generate_seconds, s


def degenerate(text: str) -> bool:
    """A continuation that is one short line repeated (a weak model's loop): drafting it is trivial,
    so its acceptance says little about the heads."""
    lines = [l for l in text.splitlines() if l.strip()]
    return len(lines) >= 8 and len(set(lines)) <= 2


def timeit(fn, reps=20):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def step_costs(llm, ids) -> dict:
    """Median seconds of each piece of a decode step, at the end of `ids`."""
    m = llm.model
    llm.reset()
    llm.generate(ids, max_tokens=1, temperature=0.0, mtp=3)   # prefill, records the heads' inputs
    d = llm._mtp_drafter()
    P = llm.cache.n_past
    cache = llm.cache
    tok = ids[-1]
    out = {}

    def trunk(n):
        def f():
            m.forward_hidden(np.array(real[:n]), cache)
            cache.truncate(P)
        return f
    # distinct real tokens: one token repeated would route every row to the same experts and make a
    # verify look as cheap as a one-token step (MoE rows are grouped by expert)
    real = llm.tokenize(prompts(2)[1])
    for n in (1, 2, 3, 4):
        out[f"trunk_{n}tok"] = timeit(trunk(n))
    # routed-expert bytes a verify of n tokens reads (each distinct expert of a layer once)
    from ggufrun.mtp import ExpertReads
    for n in (1, 2, 4):
        with ExpertReads(m.experts) as er:
            m.forward_hidden(np.array(real[:n]), cache)
            cache.truncate(P)
        out[f"expert_bytes_{n}tok"] = er.bytes
    h = np.zeros((1, m.n_embd), np.float32)
    out["vocab_logits_1row"] = timeit(lambda: m.logits(h))
    for j, head in enumerate(m.nextn):
        c = d.caches[j]
        d.catch_up(j, llm.tokens, P)

        def f(head=head, c=c, j=j):
            rows = j + 1
            head.forward(np.array(real[:rows]), np.zeros((rows, m.n_embd), np.float32),
                         np.arange(P, P + rows, dtype=np.int32), c)
            c.truncate(P)
        out[f"head{j}_call_{j + 1}rows"] = timeit(f)

    def draft3():
        d.draft(llm.tokens, tok, 3)   # greedy: the chain in one native call, as decoding drafts
        for c in d.caches:
            c.truncate(min(c.n_past, P))
    out["draft_k3"] = timeit(draft3)
    vocab, d.draft_vocab = d.draft_vocab, m.n_vocab
    out["draft_k3_allids"] = timeit(draft3)
    d.draft_vocab = vocab
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("-p", "--prompts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", default=str(ROOT / "out" / "mtp_speedup.json"))
    a = ap.parse_args(argv)
    llm = ggufrun.load(a.model, n_threads=a.threads, n_ctx=1024)
    # drafts over the default draft vocabulary (the first quarter of the ids), but k3-allids: any id
    variants = [("plain", 0, False, None), ("k1", 1, False, None), ("k2", 2, False, None), ("k3", 3, False, None),
                ("k3-allids", 3, False, 0), ("adaptive", 3, True, None)]
    rates = {v[0]: [] for v in variants}
    acc = {v[0]: [[0, 0] for _ in range(3)] for v in variants}
    ok = True
    sample = None
    per_prompt = {}
    load0 = os.getloadavg()
    t_start = time.time()
    for r in range(a.rounds):
        for pi, text in enumerate(prompts(a.prompts)):
            ids = llm.tokenize(text)
            ref = None
            order = variants if r % 2 == 0 else variants[::-1]
            results = {}
            for name, k, adaptive, vocab in order:
                out, tps, s = decode(llm, ids, a.tokens, k, adaptive, vocab)
                results[name] = out
                rates[name].append(tps)
                if s.mtp is not None:
                    for i in range(len(s.mtp.drafted)):
                        acc[name][i][0] += s.mtp.accepted[i]
                        acc[name][i][1] += s.mtp.drafted[i]
            ref = results["plain"]
            per_prompt.setdefault(pi, {"degenerate": degenerate(ref), "rates": {}})
            for name in results:
                per_prompt[pi]["rates"].setdefault(name, []).append(rates[name][-1])
            for name, out in results.items():
                if out != ref:
                    ok = False
                    print(f"MISMATCH: {name} differs from plain on prompt {pi}", file=sys.stderr)
            if sample is None:
                sample = (text, ref)
    load1 = os.getloadavg()
    costs = step_costs(llm, llm.tokenize(prompts(1)[0]))
    plain = statistics.median(rates["plain"])
    rep = {"model": a.model, "tokens": a.tokens, "prompts": a.prompts, "rounds": a.rounds,
           "loadavg_start": load0, "loadavg_end": load1, "seconds": time.time() - t_start,
           "identical_greedy": ok, "step_costs_s": costs, "variants": {}}
    print(f"{a.model}: {a.prompts} held-out prompts x {a.rounds} rounds, {a.tokens} tokens greedy,"
          f" load {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"{'variant':<10} {'tok/s (median)':>14} {'speed-up':>9}  acceptance per draft position")
    for name, *_ in variants:
        med = statistics.median(rates[name])
        a_pos = [x / n if n else None for x, n in acc[name]]
        rep["variants"][name] = {"tok_s_median": med, "tok_s_all": rates[name], "speedup": med / plain,
                                 "acceptance": a_pos, "accepted_drafted": acc[name]}
        acc_s = " ".join("-" if v is None else f"{v:.0%}" for v in a_pos) if name != "plain" else ""
        print(f"{name:<10} {med:>14.1f} {med / plain:>8.2f}x  {acc_s}")
    print("per prompt: k3 and adaptive speed-up over plain (median of rounds); * = degenerate continuation")
    for pi, pp in sorted(per_prompt.items()):
        med = {n: statistics.median(v) for n, v in pp["rates"].items()}
        pp["speedup_k3"] = med["k3"] / med["plain"]
        pp["speedup_adaptive"] = med["adaptive"] / med["plain"]
        print(f"  prompt {pi}{'*' if pp['degenerate'] else ' '} k3 {pp['speedup_k3']:.2f}x adaptive {pp['speedup_adaptive']:.2f}x")
    rep["per_prompt"] = per_prompt
    good = [pp for pp in per_prompt.values() if not pp["degenerate"]]
    if good:
        print(f"non-degenerate prompts ({len(good)}): median speed-up k3"
              f" {statistics.median(pp['speedup_k3'] for pp in good):.2f}x, adaptive"
              f" {statistics.median(pp['speedup_adaptive'] for pp in good):.2f}x")
    print("step costs (ms, median):", ", ".join(f"{k} {v * 1e3:.2f}" for k, v in costs.items() if "bytes" not in k))
    print("routed expert bytes read:", ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in costs.items() if "bytes" in k))
    print("greedy with MTP identical to plain:", ok)
    print("sample (prompt end | continuation):")
    print(sample[0][-200:] + "|" + sample[1])
    rep["sample"] = {"prompt_tail": sample[0][-200:], "continuation": sample[1]}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
