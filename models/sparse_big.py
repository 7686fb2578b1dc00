"""Write a large sparse GGUF with many tensors, to measure what opening a file costs.

    python models/sparse_big.py OUT.gguf [--layers 45] [--experts 288] [--split-experts]

The tensor table is that of a Step-3.7-Flash-class MoE (per-layer attention, router, shared expert and
routed expert tensors in Q4_K/Q6_K), with --split-experts writing each expert as its own tensor so the
file holds 10,000+ tensors. Tensor data is never written: the file is extended with truncate, so it is
sparse (hundreds of GB apparent size, almost nothing on disk). Opening it must read only the header.
"""
from __future__ import annotations

import argparse
import os
import struct

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

ALIGN = 32


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: V, value) -> bytes:
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == V.STRING:
        return out + _str(value)
    fmt = {V.UINT32: "<I", V.FLOAT32: "<f", V.BOOL: "<?"}[vtype]
    return out + struct.pack(fmt, value)


def tensor_table(layers: int, experts: int, split_experts: bool, n_embd=4096, n_ff_exp=1280, n_vocab=128896):
    t = [("token_embd.weight", Q.Q4_K, (n_embd, n_vocab)), ("output_norm.weight", Q.F32, (n_embd,)),
         ("output.weight", Q.Q6_K, (n_embd, n_vocab))]
    for i in range(layers):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", Q.F32, (n_embd,)), (p + "attn_q.weight", Q.Q4_K, (n_embd, 64 * 128)),
              (p + "attn_k.weight", Q.Q4_K, (n_embd, 8 * 128)), (p + "attn_v.weight", Q.Q6_K, (n_embd, 8 * 128)),
              (p + "attn_output.weight", Q.Q4_K, (64 * 128, n_embd)), (p + "ffn_norm.weight", Q.F32, (n_embd,)),
              (p + "ffn_gate_inp.weight", Q.F32, (n_embd, experts)), (p + "exp_probs_b.bias", Q.F32, (experts,)),
              (p + "ffn_gate_shexp.weight", Q.Q4_K, (n_embd, n_ff_exp)),
              (p + "ffn_up_shexp.weight", Q.Q4_K, (n_embd, n_ff_exp)),
              (p + "ffn_down_shexp.weight", Q.Q6_K, (n_ff_exp, n_embd))]
        for kind, q, shape in (("gate", Q.Q4_K, (n_embd, n_ff_exp)), ("up", Q.Q4_K, (n_embd, n_ff_exp)),
                               ("down", Q.Q6_K, (n_ff_exp, n_embd))):
            if split_experts:
                t += [(p + f"ffn_{kind}_exps.{e}.weight", q, shape) for e in range(experts)]
            else:
                t.append((p + f"ffn_{kind}_exps.weight", q, shape + (experts,)))
    return t


def write(path: str, layers: int, experts: int, split_experts: bool) -> int:
    table = tensor_table(layers, experts, split_experts)
    kvs = [_kv("general.architecture", V.STRING, "step35-sparse-stress"),
           _kv("general.name", V.STRING, "sparse stress file (no weights)"),
           _kv("step35-sparse-stress.block_count", V.UINT32, layers),
           _kv("step35-sparse-stress.expert_count", V.UINT32, experts),
           _kv("step35-sparse-stress.expert_used_count", V.UINT32, 8)]
    infos, offset = [], 0
    for name, q, ne in table:
        block, size = GGML_QUANT_SIZES[q]
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * size
        infos.append(_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                     + struct.pack("<IQ", q, offset))
        offset += -(-nbytes // ALIGN) * ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(table), len(kvs)) + b"".join(kvs) + b"".join(infos)
    data_start = -(-len(header) // ALIGN) * ALIGN
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(data_start + offset)
    os.replace(tmp, path)
    return len(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=45)
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--split-experts", action="store_true")
    a = ap.parse_args()
    n = write(a.out, a.layers, a.experts, a.split_experts)
    st = os.stat(a.out)
    print(f"{a.out}: {n} tensors, {st.st_size / 2**30:.1f} GiB apparent, {st.st_blocks * 512 / 2**20:.1f} MiB on disk")


if __name__ == "__main__":
    main()
