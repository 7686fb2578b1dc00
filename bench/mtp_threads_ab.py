"""How the pool's settings move MTP's speed-up: token split on/off x idle spin, alternating in one process.

    python bench/mtp_threads_ab.py [-m models/step35-mtp-py-Q8_0.gguf] [--rounds 8] [--spins 100,1000]

The machine's speed drifts by tens of percent from one minute to the next, so separate runs cannot
show a few percent; here every setting decodes every prompt in every round, the order reversed on
alternate prompts, and each setting's MTP speed-up is its k = 3 speed over its own plain speed. The
settings are switched at run time (native.token_split, native.spin_us); greedy outputs must agree.
Prints, per setting, median tok/s of plain and k = 3 decoding and the geometric mean over prompts and
rounds of k = 3's speed-up.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtp_speedup import DEFAULT_MODEL, decode, prompts  # noqa: E402

import ggufrun  # noqa: E402
from ggufrun import native  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    ap.add_argument("-n", "--tokens", type=int, default=128)
    ap.add_argument("-p", "--prompts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--spins", default="100,1000", help="idle spin settings to compare, microseconds")
    a = ap.parse_args(argv)
    llm = ggufrun.load(a.model, n_threads=2)
    texts = [llm.tokenize(t) for t in prompts(a.prompts)]
    settings = list(itertools.product((False, True), [int(s) for s in a.spins.split(",")]))
    spin0 = native.spin_us()
    speed = {(s, k): [] for s in settings for k in (0, 3)}
    ratios = {s: [] for s in settings}
    try:
        for r in range(a.rounds):
            for i, ids in enumerate(texts):
                order = settings if (r + i) % 2 == 0 else settings[::-1]
                outs = set()
                for s in order:
                    split, spin = s
                    native.spin_us(spin)
                    with native.token_split(split):
                        tps = {}
                        for k in (0, 3):
                            out, tps[k], _ = decode(llm, ids, a.tokens, k)
                            outs.add(tuple(out) if not isinstance(out, str) else out)
                            speed[(s, k)].append(tps[k])
                    ratios[s].append(tps[3] / tps[0])
                if len(outs) != 1:
                    print(f"greedy outputs differ on prompt {i}", file=sys.stderr)
                    return 1
    finally:
        native.spin_us(spin0)
    print(f"{Path(a.model).name}: {len(texts)} prompts x {a.rounds} rounds, {a.tokens} tokens greedy")
    print("token split  spin us  plain tok/s  k=3 tok/s  k=3 speed-up (geomean)")
    for s in settings:
        print(f"{'on' if s[0] else 'off':>11}  {s[1]:>7}  {statistics.median(speed[(s, 0)]):>11.0f}"
              f"  {statistics.median(speed[(s, 3)]):>9.0f}  {statistics.geometric_mean(ratios[s]):>6.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
