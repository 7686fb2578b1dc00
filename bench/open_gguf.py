"""What opening a GGUF costs: wall time and resident memory, on a Step-3.7-Flash-shaped sparse file.

    python bench/open_gguf.py [--layers 45] [--experts 288] [--split-experts]

Writes the file with models/sparse_big.py into a temporary folder (sparse: ~100+ GiB apparent, a few
MiB on disk), then opens it in a fresh process and reports open time, RSS before/after and minor page
faults (the pages the parser touched).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import resource, sys, time
def rss():
    with open('/proc/self/status') as fh:
        return int(next(l for l in fh if l.startswith('VmRSS')).split()[1]) * 1024
from ggufrun.gguf_file import GGUFFile
r0, f0 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
f = GGUFFile(sys.argv[1])
dt = time.perf_counter() - t
r1, f1 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(f"{len(f.tensor_infos)} tensors, {f.file_size / 2**30:.1f} GiB: opened in {dt * 1000:.0f} ms;"
      f" RSS {r0 / 2**20:.1f} -> {r1 / 2**20:.1f} MiB; {f1 - f0} minor page faults; header {f.data_offset / 2**20:.2f} MiB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=45)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--split-experts", action="store_true", help="one tensor per expert: 10,000+ tensors")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "models"))
    import sparse_big
    with tempfile.TemporaryDirectory() as d:
        p = str(Path(d) / "sparse.gguf")
        sparse_big.write(p, a.layers, a.experts, a.split_experts)
        subprocess.run([sys.executable, "-c", PROBE, p], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
