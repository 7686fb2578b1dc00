"""llama.cpp's own MTP drafts on a step35 file, next to ggufrun's, position by position on held-out text.

    python bench/llamacpp_mtp.py [-m models/step35-mtp-py-Q8_0.gguf] [--positions 200] [--json out/llamacpp_mtp.json]

llama-cpp-python 0.3.36 exposes the MTP context type (llama_context_params.ctx_type), load_mtp, the
extended batch API and llama_process, but not the four calls its speculative driver needs
(llama_set_embeddings_nextn, llama_get_embeddings_nextn[_ith], llama_set_nextn_layer_offset): they
live in the staging header src/llama-ext.h and the shared library exports them with C++ (mangled)
names only. ctypes can still call them by those names, which is what this script does; it then
reproduces common/speculative.cpp's draft-mtp driver in chained-heads mode (step35): a target
context with unmasked nextn embeddings, an MTP context on the same model (ctx_other = target), the
catch-up pass per head over (token p, target h of p - 1), and per draft step the draft region reset
and re-decoded under head i.

Teacher-forced over the text: at each position P the committed tokens are text[:P] and id_last is
text[P]; both engines draft three tokens. Reported: how often llama.cpp's and ggufrun's drafts agree per
draft position, and head 1's acceptance for each engine (its draft equals the trunk's arg-max at P).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ggufrun  # noqa: E402
from ggufrun.mtp import MTPDrafter  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "step35-mtp-py-Q8_0.gguf"
HELDOUT = ROOT / "tests" / "data" / "mtp_heldout.txt"

_MANGLED = {
    "set_embeddings_nextn": ("_Z26llama_set_embeddings_nextnP13llama_contextbb",
                             [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None),
    "get_embeddings_nextn": ("_Z26llama_get_embeddings_nextnP13llama_context",
                             [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)),
    "get_embeddings_nextn_ith": ("_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
                                 [ctypes.c_void_p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)),
    "set_nextn_layer_offset": ("_Z28llama_set_nextn_layer_offsetP13llama_contexti",
                               [ctypes.c_void_p, ctypes.c_int32], None),
}


class LlamaCppMTP:
    """Target and MTP contexts on one llama.cpp model, driven as common/speculative.cpp drives them."""

    def __init__(self, path: str, n_ctx: int = 1024):
        import llama_cpp as L
        self.L = L
        lib = L.llama_cpp._lib
        self.f = {}
        for name, (sym, args, res) in _MANGLED.items():
            try:
                fn = getattr(lib, sym)
            except AttributeError as e:
                raise RuntimeError(f"libllama does not export {name} (as {sym}): this llama.cpp cannot run MTP") from e
            fn.argtypes, fn.restype = args, res
            self.f[name] = fn
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.load_mtp = True
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_heads = L.llama_model_n_layer_nextn(self.model)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

        def params(mtp):
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
            cp.n_threads = cp.n_threads_batch = 1
            if mtp:
                cp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
                cp.n_rs_seq = 0
                cp.ctx_other = self.tgt
            return cp
        self.tgt = L.llama_init_from_model(self.model, params(False))
        self.dft = L.llama_init_from_model(self.model, params(True))
        if not self.tgt or not self.dft:
            raise RuntimeError("llama.cpp could not create the target / MTP contexts")
        self.f["set_embeddings_nextn"](self.tgt, True, False)
        self.f["set_embeddings_nextn"](self.dft, True, True)
        self.batch_t = L.llama_batch_ext_init(self.tgt)
        self.batch_d = L.llama_batch_ext_init(self.dft)
        self._keep = []

    def _fill(self, batch, rows):
        """rows: (token, pos, h or None, output)"""
        L = self.L
        L.llama_batch_ext_clear(batch)
        self._keep = []
        for tok, pos, h, out in rows:
            idx = L.llama_batch_ext_add_token(batch, 0, int(tok))
            assert idx >= 0, idx
            p = (ctypes.c_int32 * 4)(int(pos), 0, 0, 0)
            self._keep.append(p)
            L.llama_batch_ext_set_pos(batch, idx, p)
            if h is not None:
                a = np.ascontiguousarray(h, dtype=np.float32)
                self._keep.append(a)
                e = L.llama_embd(a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
                assert L.llama_batch_ext_set_embd_token(batch, idx, e)
            if out:
                L.llama_batch_ext_set_output_logits(batch, idx, True)

    def target(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate a fresh sequence in the target: (logits, pre-norm hidden) of every position."""
        L = self.L
        L.llama_memory_seq_rm(L.llama_get_memory(self.tgt), 0, 0, -1)
        self._fill(self.batch_t, [(t, p, None, True) for p, t in enumerate(tokens)])
        rc = L.llama_process(self.tgt, L.LLAMA_PROCESS_TYPE_DECODE, self.batch_t)
        assert rc == 0, rc
        n = len(tokens)
        logits = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self.tgt, i), (self.n_vocab,)).copy()
                           for i in range(n)])
        h = np.ctypeslib.as_array(self.f["get_embeddings_nextn"](self.tgt), (n, self.n_embd)).copy()
        return logits, h

    def catch_up(self, tokens, h, start: int, end: int) -> None:
        """process(): rows (token p, h[p - 1]) for p in start..end-1 into every head's layer."""
        L = self.L
        zero = np.zeros(self.n_embd, np.float32)
        rows = [(tokens[p], p, h[p - 1] if p else zero, False) for p in range(start, end)]
        mem = L.llama_get_memory(self.dft)
        for head in range(self.n_heads):
            L.llama_memory_seq_rm(mem, 0, start, -1)
            self.f["set_nextn_layer_offset"](self.dft, head)
            self._fill(self.batch_d, rows)
            rc = L.llama_process(self.dft, L.LLAMA_PROCESS_TYPE_DECODE, self.batch_d)
            assert rc == 0, rc
        self.f["set_nextn_layer_offset"](self.dft, 0)

    def draft(self, id_last: int, pos0: int, h_last: np.ndarray, k: int) -> list[int]:
        """draft-mtp's chained heads from (id_last at pos0, target h of pos0 - 1)."""
        L = self.L
        mem = L.llama_get_memory(self.dft)
        chain_h, toks, out = [h_last], [id_last], []
        for i in range(k):
            L.llama_memory_seq_rm(mem, 0, pos0, -1)
            self.f["set_nextn_layer_offset"](self.dft, i)
            n = len(toks)
            self._fill(self.batch_d, [(toks[t], pos0 + t, chain_h[t], t == n - 1) for t in range(n)])
            rc = L.llama_process(self.dft, L.LLAMA_PROCESS_TYPE_DECODE, self.batch_d)
            assert rc == 0, rc
            lg = np.ctypeslib.as_array(L.llama_get_logits_ith(self.dft, n - 1), (self.n_vocab,))
            d = int(np.argmax(lg))
            hr = np.ctypeslib.as_array(self.f["get_embeddings_nextn_ith"](self.dft, n - 1), (self.n_embd,)).copy()
            out.append(d)
            toks.append(d)
            chain_h.append(hr)
        self.f["set_nextn_layer_offset"](self.dft, 0)
        return out

    def close(self):
        L = self.L
        L.llama_batch_ext_free(self.batch_t)
        L.llama_batch_ext_free(self.batch_d)
        L.llama_free(self.dft)
        L.llama_free(self.tgt)
        L.llama_model_free(self.model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--positions", type=int, default=200)
    ap.add_argument("--start", type=int, default=16, help="first drafting position (context before it)")
    ap.add_argument("--json", default=str(ROOT / "out" / "llamacpp_mtp.json"))
    a = ap.parse_args(argv)
    llm = ggufrun.load(a.model, n_ctx=1024)
    text = HELDOUT.read_text(encoding="utf-8")
    ids = llm.tokenize(text)[:a.start + a.positions + 1]
    N = len(ids)

    lc = LlamaCppMTP(a.model)
    k = lc.n_heads
    lc_logits, lc_h = lc.target(ids)
    lc.catch_up(ids, lc_h, 0, a.start)

    model = llm.model
    h = model.forward_hidden(np.array(ids), model.new_cache(1024, 1024))
    our_logits = model.logits(h)
    d = MTPDrafter(model, 1024, 64)
    d.record(0, h)

    agree = np.zeros(k)
    acc = {"llama.cpp": 0, "ggufrun": 0}
    n = 0
    chain_agree = 0
    for P in range(a.start, N - 1):
        theirs = lc.draft(ids[P], P, lc_h[P - 1], k)
        lc.catch_up(ids, lc_h, P, P + 1)     # what process() would do once the trunk verified id_last
        ours, _ = d.draft(ids[:P], ids[P], k, lambda lg: (int(np.argmax(lg)), None))
        agree += [x == y for x, y in zip(ours, theirs)]
        chain_agree += ours == theirs
        acc["llama.cpp"] += theirs[0] == int(np.argmax(lc_logits[P]))
        acc["ggufrun"] += ours[0] == int(np.argmax(our_logits[P]))
        n += 1
    lc.close()
    rep = {"model": a.model, "positions": n, "draft_agreement_per_position": (agree / n).tolist(),
           "all_three_agree": chain_agree / n,
           "head1_acceptance_teacher_forced": {e: v / n for e, v in acc.items()},
           "trunk_top1_agreement": float((lc_logits[:N].argmax(-1) == our_logits.argmax(-1)).mean())}
    print(json.dumps(rep, indent=1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
