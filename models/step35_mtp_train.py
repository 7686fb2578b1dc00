"""Train a small step35 model with three MTP heads on Python's standard library, and write its GGUF.

Two stages, two environments: torch is a dependency of this recipe only, never of the runtime.

    # 1. train (torch, CPU, one thread; ~45 minutes)
    python3 -m venv ~/.cache/ggufrun/train-venv
    ~/.cache/ggufrun/train-venv/bin/pip install torch==2.13.0 numpy tokenizers
    ~/.cache/ggufrun/train-venv/bin/python models/step35_mtp_train.py train --minutes 45 \\
        --out ~/.cache/ggufrun/mtp-train
    # 2. write + verify (the project's .venv: ggufrun, quant/, llama-cpp-python)
    .venv/bin/python models/step35_mtp_train.py write ~/.cache/ggufrun/mtp-train/ckpt.npz --out models/

`train` builds the corpus (every .py file of the standard library outside the test suites, which
includes pydoc_data/topics.py, the language reference's text; the modules in HOLDOUT are kept out for
evaluation), trains a byte-level BPE of VOCAB tokens on it with the GPT-2 pre-tokenizer (written as
tokenizer.ggml.pre = "gpt-2", which llama.cpp and ggufrun both implement), and trains the model for a
wall-clock budget. It saves float32 weights under their GGUF names, the config, the tokenizer, the
losses and torch's own logits and MTP drafts on held-out text (ckpt.npz).

`write` turns the checkpoint into GGUFs through models/step35_tiny.py (its Config, metadata and
tensor-type rules; quant.write_gguf), then checks them: ggufrun's float32 logits against torch's, the
heads' drafts (ggufrun's MTPDrafter) against torch's, llama.cpp's logits and tokenization against
ours; and it writes the quantized file that is committed.

The forward here is the step35 function as ggufrun/models/step35.py and llama.cpp's step35 graph
compute it: RMS norms (eps 1e-5), per-head q/k RMS norms, NeoX rope over half the head on global
layers (base 1e6) and over the whole head on sliding layers (base 1e4, window WINDOW), a sigmoid
gate per head on the attention output, SwiGLU clamped at the per-layer limits, sigmoid routing whose
selection adds the bias but whose weights come from the plain scores, normalised and scaled.

MTP heads are trained for exactly the inputs drafting gives them (ggufrun/mtp.py, llama.cpp's chained
heads): head j at position q takes (g_j[q-1], token q), where g_0 is the trunk's pre-norm hidden state
and g_{j+1} is head j's output, and predicts token q+1. Its attention sees, at inference, keys that the
same head computed at different chain levels: position q-s (s <= j) from level j-s (the rows drafted in
this step), and every earlier position from level 0 (the entries caught up from the trunk's states).
`head_forward` computes that staircase of key levels for every query at once, so training sees what
drafting sees.

Load balancing is auxiliary-loss-free (DeepSeek-V3): after each step each MoE layer's selection bias
moves by BIAS_RATE towards under-used experts. The rate is small on purpose: it prevents collapse but
leaves the popularity skew that real routers show.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
from step35_tiny import Config  # noqa: E402  (numpy and gguf only: fine in either environment)

VOCAB = 4096
EOT = "<|endoftext|>"
WINDOW = 64
# modules held out of training: evaluation text for the losses, acceptance and tests
HOLDOUT = ("json", "email", "http", "argparse.py", "csv.py", "textwrap.py", "heapq.py", "fractions.py",
           "statistics.py", "shlex.py")
SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3")

CONFIG = Config(
    "step35-mtp-py", n_layer=12, n_dense=1, n_nextn=3, n_embd=192, head_dim=64,
    n_head=3, n_head_kv=1, n_head_swa=3, n_head_kv_swa=1, window=WINDOW,
    swa=tuple(i % 4 != 3 for i in range(12)),       # three sliding layers to one global, as the real model
    n_ff=512, n_expert=16, n_used=2, n_ff_exp=128, n_ff_shexp=192,
    rope_base=1_000_000.0, rope_base_swa=10_000.0, weights_norm=True, weights_scale=1.0,
    clamp_exp=(0.0,) + (7.0,) * 11, clamp_shexp=(0.0,) + (16.0,) * 11,
    nextn_moe=False, eps=1e-5, seed=0)

BIAS_RATE = 5e-4
# strings whose tokenization by the training tokenizer, ggufrun and llama.cpp must agree
SAMPLES = ("def f(x):\n    return x ** 2  # square\n\n\nclass A(B):\n\tpass\n",
           "    '''Docstring with 'quotes' and\t tabs\n'''", "x = [1, 22, 333, 4444, 55555]\n",
           "h\u00e9llo w\u00f6rld \u2014 \u00fcn\u00efcode \u2713 \u65e5\u672c", "  \n\n   leading and trailing   ",
           "I'll say it's ok, they've done; we'd\r\n  if __name__ == '__main__':\n        main()\n")
MIN_WEIGHT_SUM = 6.103515625e-5   # llama.cpp's lower clamp of the routing weight sum


# ---------------------------------------------------------------------------------------------------
# corpus and tokenizer
# ---------------------------------------------------------------------------------------------------
def stdlib_files(root: Path) -> tuple[list[Path], list[Path]]:
    train, held = [], []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        (held if rel.parts[0] in HOLDOUT else train).append(p)
    return train, held


def read_texts(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer: the regex llama.cpp selects for tokenizer.ggml.pre = "gpt-2"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def gguf_tokenizer(tok_json: str) -> dict:
    """tokenizer.* keys for a byte-level BPE saved by the `tokenizers` package."""
    from gguf import GGUFValueType
    m = json.loads(tok_json)["model"]
    vocab = m["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    if any(t is None for t in tokens):
        raise ValueError("tokenizer vocabulary ids are not contiguous")
    merges = [" ".join(x) if isinstance(x, list) else x for x in m["merges"]]
    eot = vocab[EOT]
    types = [3 if t == EOT else 1 for t in tokens]    # control, normal
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": (types, GGUFValueType.INT32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": eot, "tokenizer.ggml.eos_token_id": eot,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}


# ---------------------------------------------------------------------------------------------------
# the model in torch (names and shapes are the GGUF's: Linear weights (rows = out, cols = in))
# ---------------------------------------------------------------------------------------------------
def init_weights(cfg: Config, n_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    E, hd = cfg.n_embd, cfg.head_dim
    out_gain = 1.0 / math.sqrt(2 * (cfg.n_layer + 1))   # residual branches scaled down with depth

    def mat(rows, cols, gain=1.0, *lead):
        return (rng.standard_normal((*lead, rows, cols)) * (gain / math.sqrt(cols))).astype(np.float32)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    w = {"token_embd.weight": rng.standard_normal((n_vocab, E)).astype(np.float32),
         "output_norm.weight": ones(E), "output.weight": mat(n_vocab, E, 0.5)}
    for i in range(cfg.block_count):
        p = f"blk.{i}."
        H, Hkv = cfg.heads(i)
        w[p + "attn_norm.weight"] = ones(E)
        w[p + "attn_q.weight"] = mat(H * hd, E)
        w[p + "attn_k.weight"] = mat(Hkv * hd, E)
        w[p + "attn_v.weight"] = mat(Hkv * hd, E)
        w[p + "attn_q_norm.weight"] = ones(hd)
        w[p + "attn_k_norm.weight"] = ones(hd)
        w[p + "attn_gate.weight"] = mat(H, E, 0.5)
        w[p + "attn_output.weight"] = mat(E, H * hd, out_gain)
        w[p + "ffn_norm.weight"] = ones(E)
        if not cfg.is_moe(i):
            w[p + "ffn_gate.weight"] = mat(cfg.n_ff, E)
            w[p + "ffn_up.weight"] = mat(cfg.n_ff, E)
            w[p + "ffn_down.weight"] = mat(E, cfg.n_ff, out_gain)
        else:
            w[p + "ffn_gate_inp.weight"] = mat(cfg.n_expert, E, 1.0)
            w[p + "exp_probs_b.bias"] = np.zeros(cfg.n_expert, dtype=np.float32)   # a buffer, not trained
            w[p + "ffn_gate_exps.weight"] = mat(cfg.n_ff_exp, E, 1.0, cfg.n_expert)
            w[p + "ffn_up_exps.weight"] = mat(cfg.n_ff_exp, E, 1.0, cfg.n_expert)
            w[p + "ffn_down_exps.weight"] = mat(E, cfg.n_ff_exp, out_gain, cfg.n_expert)
            w[p + "ffn_gate_shexp.weight"] = mat(cfg.n_ff_shexp, E)
            w[p + "ffn_up_shexp.weight"] = mat(cfg.n_ff_shexp, E)
            w[p + "ffn_down_shexp.weight"] = mat(E, cfg.n_ff_shexp, out_gain)
        if i >= cfg.n_layer:
            w[p + "nextn.eh_proj.weight"] = mat(E, 2 * E)
            w[p + "nextn.enorm.weight"] = ones(E)
            w[p + "nextn.hnorm.weight"] = ones(E)
            w[p + "nextn.shared_head_norm.weight"] = ones(E)
    return w


def build_torch_model(cfg: Config, weights: dict[str, np.ndarray]):
    import torch
    import torch.nn.functional as F

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps) * w

    def rope(x, n_rot, base):
        """NeoX rotation of the first n_rot features of each head; x (B, H, T, D)."""
        T = x.shape[2]
        half = n_rot // 2
        inv = base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / n_rot)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = ang.cos().float(), ang.sin().float()
        a, b = x[..., :half], x[..., half:n_rot]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., n_rot:]], -1)

    def swiglu(x, g, u, d, clamp):
        a, b = F.silu(x @ g.T), x @ u.T
        if clamp > 0:
            a, b = a.clamp(max=clamp), b.clamp(-clamp, clamp)
        return (a * b) @ d.T

    class Step35(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.names = list(weights)
            self.params = torch.nn.ParameterDict()
            for n, a in weights.items():
                if n.endswith("exp_probs_b.bias"):
                    self.register_buffer(n.replace(".", "__"), torch.from_numpy(a.copy()))
                else:
                    self.params[n.replace(".", "__")] = torch.nn.Parameter(torch.from_numpy(a.copy()))
            self.expert_counts = {i: torch.zeros(cfg.n_expert, dtype=torch.float64)
                                  for i in range(cfg.block_count) if cfg.is_moe(i)}
            self.count_experts = False

        def w(self, name):
            k = name.replace(".", "__")
            return self.params[k] if k in self.params else getattr(self, k)

        def state(self) -> dict[str, np.ndarray]:
            return {n: self.w(n).detach().numpy().astype(np.float32).copy() for n in self.names}

        # -- attention pieces --------------------------------------------------------------------
        def qkv(self, i, xa):
            p, (H, Hkv), D = f"blk.{i}.", cfg.heads(i), cfg.head_dim
            B, T, _ = xa.shape
            q = (xa @ self.w(p + "attn_q.weight").T).view(B, T, H, D).transpose(1, 2)
            k = (xa @ self.w(p + "attn_k.weight").T).view(B, T, Hkv, D).transpose(1, 2)
            v = (xa @ self.w(p + "attn_v.weight").T).view(B, T, Hkv, D).transpose(1, 2)
            q, k = rms(q, self.w(p + "attn_q_norm.weight")), rms(k, self.w(p + "attn_k_norm.weight"))
            if cfg.is_swa(i):
                q, k = rope(q, D, cfg.rope_base_swa), rope(k, D, cfg.rope_base_swa)
            else:   # llama.cpp halves the rotary dimensions of step35's global layers
                q, k = rope(q, D // 2, cfg.rope_base), rope(k, D // 2, cfg.rope_base)
            return q, k, v

        def attn_out(self, i, xa, o):
            """Per-head sigmoid gate, then the output projection; o (B, H, T, D)."""
            p, H = f"blk.{i}.", cfg.heads(i)[0]
            B, _, T, D = o.shape
            o = o * torch.sigmoid(xa @ self.w(p + "attn_gate.weight").T).transpose(1, 2)[..., None]
            return o.transpose(1, 2).reshape(B, T, H * D) @ self.w(p + "attn_output.weight").T

        def ffn(self, i, x):
            p = f"blk.{i}."
            clamp_sh = cfg.clamp_shexp[i] if i < len(cfg.clamp_shexp) else 0.0
            if not cfg.is_moe(i):
                return swiglu(x, self.w(p + "ffn_gate.weight"), self.w(p + "ffn_up.weight"),
                              self.w(p + "ffn_down.weight"), clamp_sh)
            B, T, E = x.shape
            xf = x.reshape(-1, E)
            probs = torch.sigmoid(xf @ self.w(p + "ffn_gate_inp.weight").T)
            ids = torch.topk(probs.detach() + self.w(p + "exp_probs_b.bias"), cfg.n_used, dim=-1).indices
            wts = probs.gather(1, ids)
            if cfg.weights_norm:
                wts = wts / wts.sum(-1, keepdim=True).clamp(min=MIN_WEIGHT_SUM)
            wts = wts * cfg.weights_scale
            if self.count_experts or self.training:
                self.expert_counts[i] += torch.bincount(ids.reshape(-1), minlength=cfg.n_expert).double()
            y = torch.zeros_like(xf)
            g, u, d = (self.w(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
            clamp = cfg.clamp_exp[i] if i < len(cfg.clamp_exp) else 0.0
            for e in range(cfg.n_expert):
                rows, slot = (ids == e).nonzero(as_tuple=True)
                if len(rows):
                    y = y.index_add(0, rows, swiglu(xf[rows], g[e], u[e], d[e], clamp) * wts[rows, slot, None])
            y = y + swiglu(xf, self.w(p + "ffn_gate_shexp.weight"), self.w(p + "ffn_up_shexp.weight"),
                           self.w(p + "ffn_down_shexp.weight"), clamp_sh)
            return y.view(B, T, E)

        # -- trunk -------------------------------------------------------------------------------
        def trunk(self, tokens):
            """Pre-norm hidden states (B, T, E) after the last trunk block."""
            x = self.w("token_embd.weight")[tokens]
            T = tokens.shape[1]
            pos = torch.arange(T)
            causal = pos[:, None] >= pos[None, :]
            swa_mask = causal & (pos[:, None] - pos[None, :] < cfg.window)
            for i in range(cfg.n_layer):
                p = f"blk.{i}."
                xa = rms(x, self.w(p + "attn_norm.weight"))
                q, k, v = self.qkv(i, xa)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=swa_mask if cfg.is_swa(i) else causal,
                                                   enable_gqa=True)
                h = x + self.attn_out(i, xa, o)
                x = h + self.ffn(i, rms(h, self.w(p + "ffn_norm.weight")))
            return x

        def logits(self, h, norm="output_norm.weight"):
            return rms(h, self.w(norm)) @ self.w("output.weight").T

        # -- MTP heads ---------------------------------------------------------------------------
        def head_forward(self, j, tokens, levels):
            """Head j over every position, its keys at the chain levels drafting gives them (module
            docstring). levels[l] = g_l (B, T, E); returns g_{j+1}, the head's pre-norm output."""
            il = cfg.n_layer + j
            p = f"blk.{il}."
            B, T = tokens.shape
            e = rms(self.w("token_embd.weight")[tokens], self.w(p + "nextn.enorm.weight"))
            xs, ks, vs = [], [], []
            for lvl in range(j + 1):
                h_prev = torch.cat([torch.zeros_like(levels[lvl][:, :1]), levels[lvl][:, :-1]], 1)
                x = torch.cat([e, rms(h_prev, self.w(p + "nextn.hnorm.weight"))], -1) @ self.w(p + "nextn.eh_proj.weight").T
                xa = rms(x, self.w(p + "attn_norm.weight"))
                q, k, v = self.qkv(il, xa)
                H, Hkv = cfg.heads(il)
                xs.append((x, xa, q))
                ks.append(k.repeat_interleave(H // Hkv, dim=1))
                vs.append(v.repeat_interleave(H // Hkv, dim=1))
            x, xa, q = xs[j]
            scale = 1.0 / math.sqrt(cfg.head_dim)
            s = (q @ ks[0].transpose(-1, -2)) * scale            # every key from level 0 ...
            if j:                                                # ... except keys q-off, off < j: level j-off
                diag_mask = torch.zeros(T, T, dtype=torch.bool)
                stair = torch.zeros_like(s)
                for off in range(j):
                    d = (q[:, :, off:] * ks[j - off][:, :, :T - off]).sum(-1) * scale
                    stair = stair + torch.diag_embed(d, offset=-off)
                    diag_mask |= torch.diag(torch.ones(T - off, dtype=torch.bool), -off)
                s = torch.where(diag_mask, stair, s)
            pos = torch.arange(T)
            s = s.masked_fill(~(pos[:, None] >= pos[None, :]), float("-inf"))
            a = torch.softmax(s, -1)
            o = (a.masked_fill(diag_mask, 0.0) if j else a) @ vs[0]
            for off in range(j):
                dg = torch.diagonal(a, offset=-off, dim1=-2, dim2=-1)   # (B, H, T - off)
                o = o + F.pad(dg[..., None] * vs[j - off][:, :, :T - off], (0, 0, off, 0))
            h = x + self.attn_out(il, xa, o)
            return h + self.ffn(il, rms(h, self.w(p + "ffn_norm.weight")))

        def forward(self, tokens):
            """Trunk logits and each head's logits, all aligned to predict token t+1 at position t."""
            g = [self.trunk(tokens)]
            out = [self.logits(g[0])]
            for j in range(cfg.n_nextn):
                g.append(self.head_forward(j, tokens, g))
                out.append(self.logits(g[-1], f"blk.{cfg.n_layer + j}.nextn.shared_head_norm.weight"))
            return out

    return Step35()


def torch_drafts(model, prefix: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """What drafting from `prefix` (its last token is id_last, not yet seen by the trunk) proposes: head j
    runs on prefix + the j drafts so far, and its logits at the last position give draft j+1."""
    import torch
    drafts, rows = [], []
    with torch.no_grad():
        for j in range(n):
            seq = torch.tensor([prefix + drafts])
            g = [model.trunk(seq)]
            for jj in range(j + 1):
                g.append(model.head_forward(jj, seq, g))
            lg = model.logits(g[-1][:, -1], f"blk.{CONFIG.n_layer + j}.nextn.shared_head_norm.weight")[0]
            rows.append(lg.numpy().copy())
            drafts.append(int(lg.argmax()))
    return drafts, rows


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
def corpus(stdlib: str, tok=None):
    """(train files, held-out files, train ids, held-out ids, tokenizer): the tokenizer is trained on the
    training files unless one is given (the checkpoint's, for `distill`)."""
    root = Path(stdlib)
    train_files, held_files = stdlib_files(root)
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    t0 = time.time()
    if tok is None:
        tok = train_tokenizer(train_texts)
    eot = tok.token_to_id(EOT)
    print(f"corpus: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), {len(held_files)}"
          f" held-out ({sum(map(len, held_texts)) / 1e6:.1f} MB); tokenizer {tok.get_vocab_size()} in"
          f" {time.time() - t0:.0f} s", flush=True)

    def stream(texts):
        ids = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eot)
        return np.array(ids, dtype=np.int64)

    train_ids, held_ids = stream(train_texts), stream(held_texts)
    print(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}", flush=True)
    return train_files, held_files, train_ids, held_ids, tok


def batch(ids, r, B, T):
    import torch
    starts = r.integers(0, len(ids) - T - 1, B)
    return torch.from_numpy(np.stack([ids[s:s + T + 1] for s in starts]))


def losses(model, x):
    """Cross-entropy against the text of the trunk and of each head, and each head's agreement with the
    trunk: the share of positions where its arg-max is the trunk's (what greedy drafting needs)."""
    import torch
    outs = model(x[:, :-1])
    y = x[:, 1:]
    ce = [torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1)) for o in outs]
    top = outs[0].argmax(-1)
    return ce, [float((o.argmax(-1) == top).float().mean()) for o in outs[1:]]


def evaluate(model, held_ids, n_batches, B, T):
    """Mean held-out (losses, agreements) over n_batches fixed batches."""
    import torch
    model.eval()
    r = np.random.default_rng(1234)
    ce, agree = np.zeros(1 + CONFIG.n_nextn), np.zeros(CONFIG.n_nextn)
    with torch.no_grad():
        for _ in range(n_batches):
            c, g = losses(model, batch(held_ids, r, B, T))
            ce += [float(l) for l in c]
            agree += g
    model.train()
    return ce / n_batches, agree / n_batches


def lr_schedule(a, opt):
    """Until the wall-clock budget (or --steps) is spent: sets and yields each step's learning rate, a
    linear warm-up, then a cosine to a tenth over the budget."""
    start = time.time()
    for step in itertools.count():
        frac = (time.time() - start) / (a.minutes * 60)
        if frac >= 1.0 or (a.steps and step >= a.steps):
            return
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        yield lr


def train(a) -> int:
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cfg = CONFIG
    train_files, held_files, train_ids, held_ids, tok = corpus(a.stdlib)
    model = build_torch_model(cfg, init_weights(cfg, tok.get_vocab_size(), a.seed))
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(a.seed)
    T, B = a.seq, a.batch
    moe_layers = [i for i in range(cfg.n_layer) if cfg.is_moe(i)]

    start = time.time()
    step, ema = 0, None
    log = []
    last_ckpt = start
    for lr in lr_schedule(a, opt):
        for c in model.expert_counts.values():
            c.zero_()
        ls, _ = losses(model, batch(train_ids, rng, B, T))
        loss = ls[0] + a.mtp_weight * sum(ls[1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():   # aux-loss-free balancing: nudge the selection bias towards idle experts
            for i in moe_layers:
                c = model.expert_counts[i]
                b = model.w(f"blk.{i}.exp_probs_b.bias")
                b += BIAS_RATE * torch.sign(c.mean() - c).float()
        cur = np.array([float(l.detach()) for l in ls])
        ema = cur if ema is None else 0.98 * ema + 0.02 * cur
        step += 1
        if step % a.log_every == 0:
            el = time.time() - start
            rec = {"step": step, "s": round(el), "lr": lr, "train": [round(float(v), 4) for v in ema]}
            if step % (a.log_every * 5) == 0:
                rec["held"] = [round(float(v), 4) for v in evaluate(model, held_ids, 4, B, T)[0]]
            log.append(rec)
            print(json.dumps(rec), f"{step * B * T / el:.0f} tok/s", flush=True)
        if time.time() - last_ckpt > 600:
            save(out / "ckpt.npz", model, cfg, tok, log, None, None)
            last_ckpt = time.time()

    final = {"train_ema": ema.tolist(), "steps": step, "tokens": step * B * T, "seconds": time.time() - start,
             "tokens_train": int(len(train_ids)), "tokens_held": int(len(held_ids)),
             "files_train": len(train_files), "files_held": len(held_files)}
    finish(out / "ckpt.npz", model, tok, log, final, held_ids, B, T)
    return 0


def distill(a) -> int:
    """Self-distillation of the MTP heads on a trained checkpoint, the trunk frozen (its text unchanged).
    Drafting is judged by agreement with the trunk, not with the text: head j at position q is trained
    towards the trunk's own next-token distribution at q (soft cross-entropy, i.e. KL to the trunk), on
    the same inputs and chained key levels as in `train`."""
    import torch
    from tokenizers import Tokenizer
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    z, meta, cfg, w = load_ckpt(Path(a.ckpt).expanduser())
    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(meta["tokenizer"])
    train_files, held_files, train_ids, held_ids, _ = corpus(a.stdlib, tok)
    model = build_torch_model(cfg, w)
    head_prefixes = tuple(f"blk.{cfg.n_layer + j}." for j in range(cfg.n_nextn))
    trained = []
    for name in model.names:
        k = name.replace(".", "__")
        if k in model.params:
            p = model.params[k]
            p.requires_grad_(name.startswith(head_prefixes))
            if p.requires_grad:
                trained.append((name, p))
    decay = [p for n, p in trained if p.dim() >= 2]
    no_decay = [p for n, p in trained if p.dim() < 2]
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    print(f"distilling {len(trained)} head tensors ({sum(p.numel() for p in params) / 1e6:.2f} M parameters);"
          f" trunk frozen", flush=True)
    rng = np.random.default_rng(a.seed + 1)
    T, B = a.seq, a.batch
    held0 = evaluate(model, held_ids, 8, 8, T)
    print("held-out before (losses; agreement with the trunk):", held0[0].round(4).tolist(), held0[1].round(4).tolist(),
          flush=True)
    start = time.time()
    step, ema = 0, None
    log = list(meta["log"])
    for lr in lr_schedule(a, opt):
        x = batch(train_ids, rng, B, T)[:, :-1]
        with torch.no_grad():
            levels = [model.trunk(x)]
            teacher = torch.softmax(model.logits(levels[0]), -1)
        kls = []
        for j in range(cfg.n_nextn):
            levels.append(model.head_forward(j, x, levels))
            logp = torch.log_softmax(model.logits(levels[-1], f"{head_prefixes[j]}nextn.shared_head_norm.weight"), -1)
            kls.append(-(teacher * logp).sum(-1).mean())
        loss = sum(kls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        cur = np.array([float(l.detach()) for l in kls])
        ema = cur if ema is None else 0.95 * ema + 0.05 * cur
        step += 1
        if step % a.log_every == 0:
            el = time.time() - start
            rec = {"distill_step": step, "s": round(el), "lr": lr, "soft_ce": [round(float(v), 4) for v in ema]}
            if step % (a.log_every * 5) == 0:
                ce, agree = evaluate(model, held_ids, 4, 8, T)
                rec["held"], rec["agree"] = [round(float(v), 4) for v in ce], [round(float(v), 4) for v in agree]
            log.append(rec)
            print(json.dumps(rec), f"{step * B * T / el:.0f} tok/s", flush=True)
    final = dict(meta["final"] or {})
    final["distill"] = {"steps": step, "tokens": step * B * T, "seconds": time.time() - start, "lr": a.lr,
                        "soft_ce_ema": ema.tolist() if ema is not None else None,
                        "held_before": held0[0].tolist(), "agree_before": held0[1].tolist()}
    finish(out / "ckpt.npz", model, tok, log, final, held_ids, 8, T)
    return 0


def finish(path: Path, model, tok, log, final: dict, held_ids, B, T) -> None:
    """Final held-out figures, expert popularity, torch's reference answers for `write`; save."""
    import torch
    cfg = CONFIG
    held, agree = evaluate(model, held_ids, 32, B, T)
    print("final held-out losses (trunk, heads):", [round(float(v), 4) for v in held],
          "heads' agreement with the trunk:", [round(float(v), 4) for v in agree], flush=True)
    # expert popularity on held-out text, trunk MoE layers
    moe_layers = [i for i in range(cfg.n_layer) if cfg.is_moe(i)]
    model.eval()
    for c in model.expert_counts.values():
        c.zero_()
    model.count_experts = True
    r = np.random.default_rng(99)
    with torch.no_grad():
        for _ in range(8):
            model.trunk(batch(held_ids, r, B, T)[:, :-1])
    model.count_experts = False
    popularity = {i: (model.expert_counts[i] / model.expert_counts[i].sum()).tolist() for i in moe_layers}
    # torch's own answers on held-out text, for `write` to compare ggufrun and llama.cpp with
    ref_ids = held_ids[1000:1000 + 160].tolist()
    with torch.no_grad():
        ref_logits = model.logits(model.trunk(torch.tensor([ref_ids])))[0].numpy()
    ref_drafts = {P: torch_drafts(model, ref_ids[:P + 1], cfg.n_nextn) for P in (20, 70, 130)}
    final = dict(final, held=held.tolist(), agree=agree.tolist(), popularity=popularity)
    save(path, model, cfg, tok, log, final, (ref_ids, ref_logits, ref_drafts))
    print("saved", path, flush=True)


def save(path: Path, model, cfg, tok, log, final, ref) -> None:
    arrays = {"w:" + n: a for n, a in model.state().items()}
    meta = {"config": asdict(cfg), "tokenizer": tok.to_str(), "log": log, "final": final,
            "samples": {t: tok.encode(t).ids for t in SAMPLES}}
    if ref is not None:
        ids, logits, drafts = ref
        arrays["ref_ids"] = np.array(ids, dtype=np.int64)
        arrays["ref_logits"] = logits.astype(np.float32)
        for P, (d, rows) in drafts.items():
            arrays[f"ref_draft:{P}"] = np.array(d, dtype=np.int64)
            arrays[f"ref_draft_logits:{P}"] = np.stack(rows).astype(np.float32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# write + verify (project .venv; no torch)
# ---------------------------------------------------------------------------------------------------
def load_ckpt(path):
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    c = meta["config"]
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    w = {k[2:]: z[k] for k in z.files if k.startswith("w:")}
    return z, meta, cfg, w


def kl(p_logits, q_logits):
    """Mean KL(p || q) over rows."""
    def logsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(p_logits), logsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def write(a) -> int:
    import ggufrun
    import step35_tiny
    z, meta, cfg, w = load_ckpt(Path(a.ckpt).expanduser())
    tok_md = gguf_tokenizer(meta["tokenizer"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    f32 = step35_tiny.write(cfg, "F32", tmp / f"{cfg.name}-F32.gguf", w, tok_md)
    report = {"ok": True}
    if "ref_ids" in z.files:
        ids = z["ref_ids"].tolist()
        ref = z["ref_logits"]
        llm = ggufrun.load(str(f32), n_ctx=512)
        ours = llm.logits(ids)
        report["f32_vs_torch"] = {"max_abs": float(np.abs(ours - ref).max()), "kl": kl(ref, ours),
                                  "top1": float((ours.argmax(-1) == ref.argmax(-1)).mean())}
        from ggufrun.mtp import MTPDrafter
        drafts = {}
        for k in z.files:
            if k.startswith("ref_draft:"):
                P = int(k.split(":")[1])
                d = MTPDrafter(llm.model, 512, 64)
                h = llm.model.forward_hidden(np.array(ids[:P]), llm.model.new_cache(512, 512))
                d.record(0, h)
                got_rows = []

                def pick(lg):
                    got_rows.append(lg.copy())
                    return int(np.argmax(lg)), None
                got, _ = d.draft(ids[:P], ids[P], cfg.n_nextn, pick)
                want = z[k].tolist()
                drafts[P] = {"ours": got, "torch": want,
                             "head_kl": [kl(r[None], g[None]) for r, g in zip(z[f"ref_draft_logits:{P}"], got_rows)]}
                report["ok"] &= got == want
        report["drafts"] = drafts
        report["ok"] &= report["f32_vs_torch"]["top1"] == 1.0
        # llama.cpp on the same file: logits and tokenization
        import llama_cpp
        lc = llama_cpp.Llama(str(f32), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
        lc.eval(ids)
        theirs = np.array(lc.scores[:len(ids)])
        report["llamacpp_vs_torch"] = {"kl": kl(ref, theirs), "top1": float((theirs.argmax(-1) == ref.argmax(-1)).mean())}
        report["llamacpp_vs_ours"] = {"kl": kl(theirs, ours), "top1": float((theirs.argmax(-1) == ours.argmax(-1)).mean())}
        mism = 0
        for text, want in meta["samples"].items():
            a_ids = llm.tokenize(text, add_special=False)
            b_ids = lc.tokenize(text.encode(), add_bos=False, special=False)
            mism += not (a_ids == b_ids == want)
            if llm.detokenize(a_ids) != text:
                mism += 1
        report["tokenizer_mismatches"] = mism
        report["ok"] &= mism == 0
        lc.close()
    for q in a.quant:
        p = step35_tiny.write(cfg, q, out / f"{cfg.name}-{q}.gguf", w, tok_md)
        report[f"size_{q}_MB"] = p.stat().st_size / 1e6
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    def training_loop(name, help, out, minutes, lr, warmup):
        """The options train and distill share (a wall-clock budget, batches, a warmed-up cosine lr)."""
        p = sub.add_parser(name, help=help)
        p.add_argument("--out", default=out)
        p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
        p.add_argument("--minutes", type=float, default=minutes)
        p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the time budget)")
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--seq", type=int, default=256)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--warmup", type=int, default=warmup)
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        return p
    t = training_loop("train", "train (needs torch, tokenizers)", "~/.cache/ggufrun/mtp-train", 45.0, 3e-3, 60)
    t.add_argument("--mtp-weight", type=float, default=0.5)
    d = training_loop("distill", "self-distil the MTP heads of a checkpoint, trunk frozen (needs torch)",
                      "~/.cache/ggufrun/mtp-distill", 40.0, 1e-3, 20)
    d.add_argument("ckpt")
    d.add_argument("--threads", type=int, default=2)
    wr = sub.add_parser("write", help="write and verify the GGUFs (project venv)")
    wr.add_argument("ckpt")
    wr.add_argument("--out", default=str(ROOT / "models"))
    wr.add_argument("--tmp", default="/tmp/step35-mtp")
    wr.add_argument("--quant", nargs="*", default=["Q8_0"])
    a = ap.parse_args(argv)
    return {"train": train, "distill": distill, "write": write}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
