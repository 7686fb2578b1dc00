"""`ggufrun info`: what a GGUF file is, and what it costs to run.

For a MoE file the interesting number is bytes read per token: always-active weights (attention,
dense and shared FFNs, norms, the output projection, one embedding row) plus the routed experts'
share (n_used / n_expert of each expert tensor). That is the "will it fit, how fast can it be" answer
for a Step-3.7-Flash-class file on a given memory bandwidth.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .gguf_file import GGUFFile
from .progress import human_bytes

ROUTED_RE = re.compile(r"\.ffn_(gate|up|down|gate_up)_exps\.")
HPARAM_KEYS = [
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.sliding_window", "rope.freq_base", "rope.freq_base_swa", "rope.dimension_count",
    "expert_count", "expert_used_count", "expert_shared_count", "expert_feed_forward_length",
    "expert_shared_feed_forward_length", "leading_dense_block_count", "nextn_predict_layers",
    "expert_gating_func", "expert_weights_scale", "expert_weights_norm",
]


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def describe(f: GGUFFile) -> dict[str, Any]:
    arch = f.arch
    md = f.metadata
    hp = {k: md[f"{arch}.{k}"] for k in HPARAM_KEYS if f"{arch}.{k}" in md}
    n_layer = md.get(f"{arch}.block_count", 0)
    n_nextn = md.get(f"{arch}.nextn_predict_layers", 0)
    n_expert = md.get(f"{arch}.expert_count", 0)
    n_used = md.get(f"{arch}.expert_used_count", 0)
    if isinstance(n_used, list):  # per layer: the bytes estimate takes the trunk's largest
        n_used = max(n_used)
    # llama.cpp's block_count includes the MTP (nextn) blocks appended after the trunk
    n_trunk = n_layer - n_nextn if 0 < n_nextn < n_layer else n_layer

    by_type: dict[str, int] = defaultdict(int)
    routed = always = mtp = embd = 0
    params = 0
    active_params = 0.0
    for name, t in f.tensor_infos.items():
        by_type[t.qtype.name] += t.nbytes
        n_el = 1
        for d in t.ne:
            n_el *= d
        params += n_el
        layer = _layer_of(name)
        if layer is not None and layer >= n_trunk and n_nextn:
            mtp += t.nbytes
            continue
        if ROUTED_RE.search(name):
            routed += t.nbytes
            if n_expert:
                active_params += n_el * n_used / n_expert
        elif name == "token_embd.weight":
            embd += t.nbytes
            if "output.weight" not in f.tensor_infos:
                active_params += n_el  # tied: the whole matrix is the output projection
        else:
            always += t.nbytes
            active_params += n_el
    tied = "output.weight" not in f.tensor_infos
    embd_row = embd // max(int(f.tensor_infos["token_embd.weight"].ne[-1]), 1) if "token_embd.weight" in f.tensor_infos else 0
    per_token = always + embd_row + (routed * n_used / n_expert if n_expert else 0) + (embd if tied else 0)

    tok = {
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": len(md.get("tokenizer.ggml.tokens", [])),
        "chat_template": "tokenizer.chat_template" in md,
    }
    out: dict[str, Any] = {
        "path": f.path,
        "architecture": arch,
        "name": md.get("general.name"),
        "gguf_version": md["GGUF.version"],
        "file_bytes": f.file_size,
        "tensor_count": len(f.tensor_infos),
        "parameters": params,
        "hparams": hp,
        "tokenizer": tok,
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "always_active_bytes": always + (embd if tied else 0),
        "embedding_bytes": embd,
        "routed_expert_bytes": routed,
        "mtp_bytes": mtp,
        "bytes_per_token": int(per_token),
        "active_parameters": int(active_params),
    }
    layout = _layer_layout(f, n_trunk) + ["mtp"] * (n_layer - n_trunk)
    if layout:
        out["layers"] = layout
    return out


def _layer_layout(f: GGUFFile, n_layer: int) -> list[str]:
    """One word per layer: dense / moe, and swa / global where the file marks sliding layers."""
    arch = f.arch
    pattern = f.metadata.get(f"{arch}.attention.sliding_window_pattern")
    kinds = []
    for i in range(n_layer):
        ffn = "moe" if f"blk.{i}.ffn_gate_exps.weight" in f.tensor_infos or f"blk.{i}.ffn_up_exps.weight" in f.tensor_infos else "dense"
        attn = ""
        if isinstance(pattern, list) and i < len(pattern):
            attn = "swa" if pattern[i] else "global"
        kinds.append(f"{ffn}/{attn}" if attn else ffn)
    return kinds if any(k.startswith("moe") or "/" in k for k in kinds) else []


def format_info(d: dict[str, Any]) -> str:
    lines = [
        f"file          {d['path']}",
        f"architecture  {d['architecture']}" + (f"  ({d['name']})" if d.get("name") else ""),
        f"size          {human_bytes(d['file_bytes'])} in {d['tensor_count']} tensors, GGUF v{d['gguf_version']},"
        f" {d['parameters'] / 1e9:.3f} B parameters",
        f"tokenizer     {d['tokenizer']['model']} (pre {d['tokenizer']['pre'] or '-'}), vocabulary {d['tokenizer']['vocab_size']},"
        f" chat template {'in file' if d['tokenizer']['chat_template'] else 'none (built-in used if known)'}",
        "hyper-parameters:",
    ]
    for k, v in d["hparams"].items():
        if isinstance(v, list) and len(v) > 8:
            v = f"{v[:8]}... ({len(v)} values)"
        lines.append(f"  {k:<36} {v}")
    lines.append("bytes by quant type:")
    for t, b in d["bytes_by_type"].items():
        lines.append(f"  {t:<8} {human_bytes(b):>12}  {100 * b / d['file_bytes']:5.1f}%")
    lines.append(f"always-active weights  {human_bytes(d['always_active_bytes'])}")
    if d["routed_expert_bytes"]:
        lines.append(f"routed experts         {human_bytes(d['routed_expert_bytes'])}")
    if d["mtp_bytes"]:
        lines.append(f"MTP (nextn) heads      {human_bytes(d['mtp_bytes'])}")
    lines.append(f"bytes read per token   {human_bytes(d['bytes_per_token'])}"
                 f"  ({d['active_parameters'] / 1e9:.3f} B active parameters)")
    if "layers" in d:
        counts: dict[str, int] = defaultdict(int)
        for k in d["layers"]:
            counts[k] += 1
        lines.append("layer layout           " + " ".join(d["layers"][:12]) + (" ..." if len(d["layers"]) > 12 else "")
                     + "  (" + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")")
    return "\n".join(lines)
