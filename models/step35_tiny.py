"""Write small step35 (Step-3.5/3.7-Flash architecture) GGUFs with random weights.

    python models/step35_tiny.py OUT_DIR [--config NAME ...] [--quant F32 F16 Q8_0 Q4_K_M MXFP4 ...] [--check]

The files carry exactly the metadata keys and tensor names llama.cpp's converter (conversion/step3.py)
writes for the real model, so everything that loads these loads a converted real file unchanged:
leading dense blocks then MoE blocks (router, selection bias, routed experts as 3-D tensors, shared
expert), per-layer head / KV-head counts that differ between global and sliding layers, a per-layer
sliding pattern, separate rope bases, partial rotary on global layers (llama.cpp rotates half the head
there), optional llama3 rope factors, the per-head attention gate, q/k norms, per-layer clamped SwiGLU
and `nextn_predict_layers` MTP blocks appended at blk.{n_layer + i}. The tokenizer is SmolLM2's real
BPE vocabulary, so llama.cpp and ggufrun tokenize text the same way.

Weight scales keep activations O(1) through the residual stream, router scores spread (sigmoid
probabilities from ~0.1 to ~0.9) so routing uses many experts, and clamps bite on a few percent of
activations so the clamp path is exercised.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quant  # noqa: E402
from ggufrun.gguf_file import GGUFFile  # noqa: E402

ARCH = "step35"
SMOLLM2 = Path.home() / ".cache" / "ggufrun" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
GATING_SOFTMAX = 1


@dataclass(frozen=True)
class Config:
    name: str
    n_layer: int = 5                    # trunk layers (block_count = n_layer + n_nextn)
    n_dense: int = 1                    # leading dense blocks
    n_nextn: int = 3                    # MTP blocks appended after the trunk
    n_embd: int = 256
    head_dim: int = 64
    n_head: int = 4                     # global-attention layers
    n_head_kv: int = 2
    n_head_swa: int = 8                 # sliding-window layers
    n_head_kv_swa: int = 2
    window: int = 32
    swa: tuple[bool, ...] = (False, True, True, True, False)   # trunk layers; MTP blocks are global
    n_ff: int = 512                     # dense blocks
    n_expert: int = 16
    n_used: int = 4
    n_ff_exp: int = 256
    n_ff_shexp: int = 256
    rope_base: float = 5_000_000.0
    rope_base_swa: float = 10_000.0
    llama3_rope: bool = False           # rope_freqs.weight for global layers
    gating: int | None = GATING_SIGMOID  # None: key absent (step35 defaults to sigmoid)
    weights_norm: bool = True
    weights_scale: float = 3.0
    clamp_exp: tuple[float, ...] = ()   # per trunk layer; () writes no key
    clamp_shexp: tuple[float, ...] = ()
    shared_head: bool = False           # nextn.shared_head_head per MTP block (else the trunk's output)
    nextn_moe: bool = True              # MTP blocks MoE like the trunk (False: dense, n_ff wide)
    eps: float = 1e-5
    seed: int = 0

    @property
    def block_count(self) -> int:
        return self.n_layer + self.n_nextn

    def is_swa(self, i: int) -> bool:
        return i < self.n_layer and self.swa[i]

    def is_moe(self, i: int) -> bool:
        return i >= self.n_dense and (self.nextn_moe or i < self.n_layer)

    def heads(self, i: int) -> tuple[int, int]:
        return (self.n_head_swa, self.n_head_kv_swa) if self.is_swa(i) else (self.n_head, self.n_head_kv)


CONFIGS = {c.name: c for c in (
    # grouped-query on both layer kinds, more heads on sliding layers (like the real model), llama3 rope
    Config("gqa", llama3_rope=True, clamp_exp=(0, 1.5, 0, 2.0, 1.5), clamp_shexp=(1.5, 0, 1.5, 0, 2.0)),
    # multi-head global layers, multi-query sliding layers, no gating key, unnormalised weights
    Config("mha-mqa", n_head=4, n_head_kv=4, n_head_swa=4, n_head_kv_swa=1, window=24,
           swa=(True, True, False, True, True), n_expert=8, n_used=2, gating=None, weights_norm=False,
           weights_scale=1.0, clamp_exp=(1.5,) * 5, seed=1),
    # wider sliding layers (12 heads of 64: a 768-wide q), two dense lead blocks, 32 experts top 8
    Config("wide-swa", n_layer=6, n_dense=2, n_head=4, n_head_kv=4, n_head_swa=12, n_head_kv_swa=4,
           window=16, swa=(False, True, True, False, True, True), n_expert=32, n_used=8,
           rope_base=1_000_000.0, clamp_exp=(0, 0, 1.5, 1.5, 0, 1.5), clamp_shexp=(0, 0, 0, 2.0, 2.0, 0),
           seed=2),
    # per-MTP-block shared heads present, softmax gating, global layers with GQA 8/2
    Config("shared-head", n_head=8, n_head_kv=2, n_head_swa=4, n_head_kv_swa=4, window=32,
           swa=(True, False, True, True, False), gating=GATING_SOFTMAX, weights_norm=True, weights_scale=1.0,
           shared_head=True, llama3_rope=True, clamp_exp=(0, 2.0, 2.0, 2.0, 2.0), seed=3),
)}

# Benchmark-sized configs (not in CONFIGS: each file is ~1.45 GB and takes minutes to write; see
# write_streamed). The shape of the earlier llama.cpp measurement: 24 layers, hidden 1024, 64 experts
# top 8, expert FFN 512; one leading dense block, sliding layers three in four as in the real model.
BENCH = Config("bench", n_layer=24, n_dense=1, n_nextn=0, n_embd=1024, head_dim=128, n_head=8, n_head_kv=2,
               n_head_swa=8, n_head_kv_swa=2, window=512, swa=tuple(i % 4 != 3 for i in range(24)),
               n_ff=2048, n_expert=64, n_used=8, n_ff_exp=512, n_ff_shexp=512, seed=7)

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M", "MXFP4")


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low: float = 1.0, high: float = 4.0,
                        orig_ctx: int = 64) -> np.ndarray:
    """The factors the converter writes: computed over the global layers' rotary dims (half the head),
    padded with 1.0 to head_dim / 2 entries. A tiny original context makes every band occur."""
    rot = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    low_wl, high_wl = orig_ctx / low, orig_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (orig_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1.0 - s) / factor + s))
    out += [1.0] * (head_dim // 2 - len(out))
    return np.array(out, dtype=np.float32)


@lru_cache(maxsize=1)
def tokenizer_metadata() -> dict:
    with GGUFFile(SMOLLM2) as f:
        md = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.") and k != "tokenizer.chat_template"}
    md["tokenizer.ggml.token_type"] = (md["tokenizer.ggml.token_type"], GGUFValueType.INT32)
    return md


def weights(cfg: Config) -> dict[str, np.ndarray]:
    """Float32 weights, numpy shape order (rows, cols); 3-D expert tensors are (n_expert, rows, cols)."""
    rng = np.random.default_rng(cfg.seed)
    n_vocab = len(tokenizer_metadata()["tokenizer.ggml.tokens"])
    E, hd = cfg.n_embd, cfg.head_dim

    def mat(rows, cols, gain=1.0, *lead):
        return (rng.standard_normal((*lead, rows, cols)) * (gain / math.sqrt(cols))).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((n_vocab, E)).astype(np.float32),
         "output_norm.weight": norm(E),
         # logits with a spread of ~4: peaked enough that top-1 means something, not one-hot
         "output.weight": mat(n_vocab, E, 4.0)}
    if cfg.llama3_rope:
        w["rope_freqs.weight"] = llama3_rope_factors(hd, cfg.rope_base)
    for i in range(cfg.block_count):
        p = f"blk.{i}."
        H, Hkv = cfg.heads(i)
        w[p + "attn_norm.weight"] = norm(E)
        w[p + "attn_q.weight"] = mat(H * hd, E)
        w[p + "attn_k.weight"] = mat(Hkv * hd, E)
        w[p + "attn_v.weight"] = mat(Hkv * hd, E)
        w[p + "attn_q_norm.weight"] = norm(hd)
        w[p + "attn_k_norm.weight"] = norm(hd)
        w[p + "attn_gate.weight"] = mat(H, E, 2.0)
        w[p + "attn_output.weight"] = mat(E, H * hd, 0.7)
        w[p + "ffn_norm.weight"] = norm(E)
        if not cfg.is_moe(i):
            w[p + "ffn_gate.weight"] = mat(cfg.n_ff, E)
            w[p + "ffn_up.weight"] = mat(cfg.n_ff, E)
            w[p + "ffn_down.weight"] = mat(E, cfg.n_ff, 0.7)
        else:
            # router logits ~N(0, 1.5^2): sigmoid scores spread over (0.05, 0.95)
            w[p + "ffn_gate_inp.weight"] = mat(cfg.n_expert, E, 1.5)
            w[p + "exp_probs_b.bias"] = (0.2 * rng.standard_normal(cfg.n_expert)).astype(np.float32)
            w[p + "ffn_gate_exps.weight"] = mat(cfg.n_ff_exp, E, 1.0, cfg.n_expert)
            w[p + "ffn_up_exps.weight"] = mat(cfg.n_ff_exp, E, 1.0, cfg.n_expert)
            w[p + "ffn_down_exps.weight"] = mat(E, cfg.n_ff_exp, 0.5, cfg.n_expert)
            w[p + "ffn_gate_shexp.weight"] = mat(cfg.n_ff_shexp, E)
            w[p + "ffn_up_shexp.weight"] = mat(cfg.n_ff_shexp, E)
            w[p + "ffn_down_shexp.weight"] = mat(E, cfg.n_ff_shexp, 0.5)
        if i >= cfg.n_layer:
            w[p + "nextn.eh_proj.weight"] = mat(E, 2 * E)
            w[p + "nextn.enorm.weight"] = norm(E)
            w[p + "nextn.hnorm.weight"] = norm(E)
            w[p + "nextn.shared_head_norm.weight"] = norm(E)
            if cfg.shared_head:
                w[p + "nextn.shared_head_head.weight"] = mat(n_vocab, E, 4.0)
    return w


def metadata(cfg: Config, file_type: int, tokenizer: dict | None = None) -> dict:
    """`tokenizer`: tokenizer.* keys to write instead of SmolLM2's (a recipe's own vocabulary)."""
    n_all = cfg.block_count
    heads = [cfg.heads(i) for i in range(n_all)]

    def pad(values):  # per trunk layer -> per block, MTP blocks unclamped (as the converter pads)
        return [float(v) for v in values] + [0.0] * cfg.n_nextn

    md = {
        "general.name": f"step35-tiny-{cfg.name}",
        "general.file_type": file_type,
        "step35.block_count": n_all,
        "step35.context_length": 4096,
        "step35.embedding_length": cfg.n_embd,
        "step35.feed_forward_length": cfg.n_ff,
        "step35.attention.head_count": [h for h, _ in heads],
        "step35.attention.head_count_kv": [k for _, k in heads],
        "step35.rope.freq_base": cfg.rope_base,
        "step35.rope.freq_base_swa": cfg.rope_base_swa,
        "step35.attention.layer_norm_rms_epsilon": cfg.eps,
        "step35.expert_count": cfg.n_expert,
        "step35.expert_used_count": cfg.n_used,
        "step35.attention.key_length": cfg.head_dim,
        "step35.attention.value_length": cfg.head_dim,
        "step35.attention.sliding_window": cfg.window,
        "step35.attention.sliding_window_pattern": [cfg.is_swa(i) for i in range(n_all)],
        "step35.expert_feed_forward_length": cfg.n_ff_exp,
        "step35.expert_shared_feed_forward_length": cfg.n_ff_shexp,
        "step35.expert_weights_scale": cfg.weights_scale,
        "step35.expert_weights_norm": cfg.weights_norm,
        "step35.leading_dense_block_count": cfg.n_dense,
        "step35.moe_every_n_layers": 1,
        "step35.nextn_predict_layers": cfg.n_nextn,
    }
    if cfg.gating is not None:
        md["step35.expert_gating_func"] = cfg.gating
    if cfg.clamp_exp:
        md["step35.swiglu_clamp_exp"] = pad(cfg.clamp_exp)
    if cfg.clamp_shexp:
        md["step35.swiglu_clamp_shexp"] = pad(cfg.clamp_shexp)
    if cfg.n_nextn == 0:
        del md["step35.nextn_predict_layers"]
    md.update(tokenizer_metadata() if tokenizer is None else tokenizer)
    return md


# llama_ftype numbers for general.file_type
FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15, "MXFP4": 38}


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's rule for which layers of a Q4_K_M file get Q6_K attn_v / ffn_down
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], q: str, n_layer_all: int) -> str:
    """The quant type of one tensor in a file of mix `q`: norms, biases, rope factors and the router stay
    F32 (llama.cpp's quantizer never quantizes 1-D tensors or ffn_gate_inp)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    if q in ("F32", "F16", "BF16", "Q8_0", "Q6_K"):
        return q
    if q == "MXFP4":  # like gpt-oss files: routed experts MXFP4, everything else Q8_0
        return "MXFP4" if "_exps." in name else "Q8_0"
    assert q == "Q4_K_M", q
    if name == "output.weight" or name.endswith("nextn.shared_head_head.weight"):
        return "Q6_K"
    il = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if (name.endswith("attn_v.weight") or ".ffn_down" in name) and _use_more_bits(il, n_layer_all):
        return "Q6_K"
    return "Q4_K"


def write(cfg: Config, q: str, path: str | Path, w: dict[str, np.ndarray] | None = None,
          tokenizer: dict | None = None) -> Path:
    """A file of mix `q`: random weights(cfg), or given float32 arrays `w` (names and shapes as weights()
    makes them, e.g. a trained model's) with their own tokenizer.* keys."""
    given = w is not None
    w = w if given else weights(cfg)
    tensors = {}
    for name, arr in w.items():
        t = tensor_type(name, arr.shape, q, cfg.block_count)
        if t != "F32" and arr.shape[-1] % quant.block_size(t):
            t = "Q8_0" if arr.shape[-1] % 32 == 0 else "F16"
        tensors[name] = (arr, t)
    md = metadata(cfg, FILE_TYPES[q], tokenizer)
    if given:
        md["general.name"] = cfg.name
    quant.write_gguf(path, ARCH, md, tensors)
    return Path(path)


def zipf_router(cfg: Config, layer: int, zipf_beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Router weight and selection bias with skewed expert popularity.

    Experts are given a random popularity rank r = 1..n_expert per layer and a selection bias
    -zipf_beta * ln(r): selection is sigmoid(score) + bias, so the bias gap between rank 1 and rank r grows
    like the log of the rank, which makes the selection frequency fall off roughly as a power of the
    rank (a Zipf-like law, as routing traces of real MoE models show within one context). The router
    weight gain is 1.0 rather than 1.5, so scores still vary by token (routing stays input dependent and
    predictable from the hidden state) but the bias decides which experts are hot.
    """
    rng = np.random.default_rng((cfg.seed, layer, 1))
    w = (rng.standard_normal((cfg.n_expert, cfg.n_embd)) / math.sqrt(cfg.n_embd)).astype(np.float32)
    rank = rng.permutation(cfg.n_expert) + 1
    return w, (-zipf_beta * np.log(rank)).astype(np.float32)


def write_streamed(cfg: Config, q: str, path: str | Path, zipf_beta: float = 0.0, _payloads: dict | None = None) -> Path:
    """Write a large file tensor by tensor: each tensor is drawn from its own seeded generator and
    quantized at once, so peak memory is the quantized file plus one float tensor (the float weights of
    the benchmark config are ~10 GB). zipf_beta > 0 replaces the routers with zipf_router's. `_payloads`
    (a dict) caches quantized tensors between calls, so a random and a skewed file that share everything
    but the routers are quantized once."""
    n_vocab = len(tokenizer_metadata()["tokenizer.ggml.tokens"])
    E, hd = cfg.n_embd, cfg.head_dim
    cache = _payloads if _payloads is not None else {}
    specs: dict[str, tuple] = {}
    for i in range(cfg.block_count):
        p = f"blk.{i}."
        H, Hkv = cfg.heads(i)
        specs.update({p + "attn_norm.weight": ("norm", E), p + "attn_q.weight": ("mat", H * hd, E, 1.0),
                      p + "attn_k.weight": ("mat", Hkv * hd, E, 1.0), p + "attn_v.weight": ("mat", Hkv * hd, E, 1.0),
                      p + "attn_q_norm.weight": ("norm", hd), p + "attn_k_norm.weight": ("norm", hd),
                      p + "attn_gate.weight": ("mat", H, E, 2.0), p + "attn_output.weight": ("mat", E, H * hd, 0.7),
                      p + "ffn_norm.weight": ("norm", E)})
        if not cfg.is_moe(i):
            specs.update({p + "ffn_gate.weight": ("mat", cfg.n_ff, E, 1.0), p + "ffn_up.weight": ("mat", cfg.n_ff, E, 1.0),
                          p + "ffn_down.weight": ("mat", E, cfg.n_ff, 0.7)})
            continue
        X, F, S = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
        specs.update({p + "ffn_gate_inp.weight": ("router", i), p + "exp_probs_b.bias": ("bias", i),
                      p + "ffn_gate_exps.weight": ("mat", F, E, 1.0, X), p + "ffn_up_exps.weight": ("mat", F, E, 1.0, X),
                      p + "ffn_down_exps.weight": ("mat", E, F, 0.5, X),
                      p + "ffn_gate_shexp.weight": ("mat", S, E, 1.0), p + "ffn_up_shexp.weight": ("mat", S, E, 1.0),
                      p + "ffn_down_shexp.weight": ("mat", E, S, 0.5)})
    specs = {"token_embd.weight": ("mat", n_vocab, E, math.sqrt(E)), "output_norm.weight": ("norm", E),
             "output.weight": ("mat", n_vocab, E, 4.0), **specs}
    tensors = {}
    for k, (name, spec) in enumerate(specs.items()):
        rng = np.random.default_rng((cfg.seed, k))
        kind = spec[0]
        if kind == "norm":
            tensors[name] = ((1.0 + 0.1 * rng.standard_normal(spec[1])).astype(np.float32), "F32")
        elif kind in ("router", "bias"):
            if zipf_beta > 0:
                w, b = zipf_router(cfg, spec[1], zipf_beta)
            else:
                w = (rng.standard_normal((cfg.n_expert, E)) * (1.5 / math.sqrt(E))).astype(np.float32)
                b = (0.2 * np.random.default_rng((cfg.seed, k, 2)).standard_normal(cfg.n_expert)).astype(np.float32)
            tensors[name] = (w if kind == "router" else b, "F32")
        else:
            rows, cols, gain = spec[1:4]
            shape = (spec[4], rows, cols) if len(spec) > 4 else (rows, cols)
            t = tensor_type(name, shape, q, cfg.block_count)
            key = (cfg, q, name)
            if key not in cache:
                # per expert: the float copy of a 3-D tensor is 64x one expert
                lead = shape[0] if len(shape) == 3 else 1
                parts = [quant.quantize((rng.standard_normal(shape[-2:]) * (gain / math.sqrt(cols))).astype(np.float32), t)
                         for _ in range(lead)]
                cache[key] = np.concatenate([np.ascontiguousarray(x).reshape(-1) for x in parts])
            tensors[name] = (cache[key], t, shape)
    md = metadata(cfg, FILE_TYPES[q])
    md["general.name"] = f"step35-{cfg.name}" + (f"-zipf{zipf_beta:g}" if zipf_beta > 0 else "")
    quant.write_gguf(path, ARCH, md, tensors)
    return Path(path)


def check_llama_cpp(path: Path, text: str = "The quick brown fox jumps over the lazy dog. " * 4) -> dict:
    """Load in llama.cpp, evaluate a prompt, and report routing health from our own forward."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode())
    llm.eval(ids)
    scores = np.array(llm.scores[:len(ids)])
    llm.close()
    assert np.isfinite(scores).all(), "llama.cpp produced non-finite logits"
    return {"tokens": len(ids), "logit_std": float(scores.std()), "top1": int(scores[-1].argmax())}


def routing_report(path: Path, text: str = "The quick brown fox jumps over the lazy dog. " * 8) -> list[str]:
    import ggufrun
    llm = ggufrun.load(str(path), n_ctx=512)
    llm.logits(llm.tokenize(text))
    return llm.model.experts.report(top=4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--config", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--quant", nargs="*", default=["F32"], choices=QUANTS)
    ap.add_argument("--check", action="store_true", help="load each file in llama.cpp and print routing stats")
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for c in a.config:
        for q in a.quant:
            p = write(CONFIGS[c], q, out / f"step35-tiny-{c}-{q}.gguf")
            print(p, f"{p.stat().st_size / 1e6:.1f} MB")
            if a.check:
                print("  llama.cpp:", check_llama_cpp(p))
                for line in routing_report(p):
                    print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
