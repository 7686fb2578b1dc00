"""MTP (multi-token prediction) speculative decoding for models with nextn heads (step35).

Drafting follows llama.cpp's step35 MTP graph and its `draft-mtp` speculative driver (chained heads):

  - every MTP head j has its own one-layer KV cache. For each committed position p it holds the entry
    computed from (trunk pre-norm hidden state of p - 1, token at p) (zeros for p = 0); llama.cpp's
    process() writes these for every batch the trunk evaluates, for all heads. Here prompt processing
    brings the heads a generation may draft with up to date (api.LLM._eval_hidden); after that a head
    catches up lazily, from the recorded trunk hidden states, when it is next used (a head left unused
    by the adaptive draft length costs nothing while it is).
  - a draft from the last committed position P - 1 and the token `id_last` at P (sampled, not yet
    evaluated by the trunk) runs head 0 on the row (h_trunk[P-1], id_last) -> d1 and h0; head 1 on
    the rows (h_trunk[P-1], id_last), (h0, d1) at P, P+1 -> d2 and h1; head i on i + 1 rows, where row
    t >= 1 pairs the previous head's output h_{t-1} with d_t. Each step re-runs the draft region under
    the next head (its own layer and KV), exactly as llama.cpp's chain_heads mode does.
  - the trunk verifies [id_last, d1..dk] in one batched forward; the longest accepted prefix plus the
    trunk's own next token are kept; rejected positions are rolled back in the trunk cache and in the
    heads' caches (which keep only position P: the committed (h_trunk[P-1], id_last) entry).

Acceptance: greedy keeps a draft iff it equals the trunk's (penalised) arg-max; with temperature > 0 a
draft d drawn from q is kept with probability min(1, p(d)/q(d)), else the token is drawn from the
normalised residual max(0, p - q), and after k acceptances one more token is drawn from p: the output
distribution is exactly p (Leviathan et al. 2023; Chen et al. 2023).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCache
from .ops import _FLOATS, _INT32S, _check, _f32, _ffi, _from_buffer, _lib, cache_arrays


# -- the accept / resample math -------------------------------------------------------------------
def dense(ids: np.ndarray, p: np.ndarray, n_vocab: int) -> np.ndarray:
    out = np.zeros(n_vocab, dtype=np.float64)
    out[ids] = p
    return out


def speculative_accept(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """One speculative-sampling decision over dense distributions p (target) and q (draft, from which
    `draft` was drawn): (True, draft) with probability min(1, p/q), else (False, a token drawn from
    norm(max(0, p - q)))."""
    qd = q[draft]
    if qd > 0 and rng.random() * qd < p[draft]:   # u < p/q without dividing
        return True, draft
    r = np.maximum(p - q, 0.0)
    s = r.sum()
    if s <= 0:   # p == q up to rounding: a rejection had probability ~0; p is the residual's limit
        r, s = p, p.sum()
    return False, int(rng.choice(len(r), p=r / s))


def expected_tokens(alpha: list[float], k: int) -> float:
    """Tokens per verify step with k drafts, if draft i is accepted with probability alpha[i] given the
    earlier ones were: 1 + sum_j prod_{i<=j} alpha_i."""
    e, run = 1.0, 1.0
    for i in range(k):
        run *= alpha[i]
        e += run
    return e


def default_draft_vocab(n_vocab: int) -> int:
    """How many ids a draft may propose unless told: the first quarter of the vocabulary, at least 1024.
    A head's vocabulary projection is its largest product (the trained model's: 0.8 MB of a head's 1.3),
    and text concentrates on few ids, which BPE and SentencePiece vocabularies number first (merge or
    score order); FR-Spec (Zhao et al. 2025) drafts over the most frequent quarter of Llama-3's. A token
    outside is never drafted, which costs acceptance, never correctness: the trunk verifies every draft."""
    return min(n_vocab, max(1024, n_vocab // 4))


# -- statistics -----------------------------------------------------------------------------------
@dataclass
class MTPStats:
    k_max: int = 0
    steps: int = 0                                    # verify steps (drafting or not)
    draft_steps: int = 0                              # steps that drafted at least one token
    drafted: list[int] = field(default_factory=list)  # per draft position: drafts checked (the earlier accepted)
    accepted: list[int] = field(default_factory=list)  # per draft position: drafts accepted
    k_hist: list[int] = field(default_factory=list)   # per k: steps run with that draft length
    draft_vocab: int | None = None                    # drafts were ids < draft_vocab at the end (None: any)

    def __post_init__(self):
        n = self.k_max
        self.drafted = self.drafted or [0] * n
        self.accepted = self.accepted or [0] * n
        self.k_hist = self.k_hist or [0] * (n + 1)

    def record(self, k: int, n_accepted: int) -> None:
        self.steps += 1
        self.k_hist[k] += 1
        if k:
            self.draft_steps += 1
        for i in range(min(k, n_accepted + 1)):   # drafts past the first rejection are never checked
            self.drafted[i] += 1
            if i < n_accepted:
                self.accepted[i] += 1

    def acceptance(self) -> list[float | None]:
        """Per draft position: accepted / offered (conditional on the earlier drafts being accepted)."""
        return [a / d if d else None for a, d in zip(self.accepted, self.drafted)]

    @property
    def accepted_total(self) -> int:
        return sum(self.accepted)

    def summary(self) -> str:
        acc = " ".join(f"{a:.0%}" if a is not None else "-" for a in self.acceptance())
        drafted = sum(self.drafted)
        rate = f"{self.accepted_total / drafted:.0%}" if drafted else "-"
        ks = " ".join(f"k{k}:{n}" for k, n in enumerate(self.k_hist) if n)
        vocab = f"; drafts among ids < {self.draft_vocab}" if self.draft_vocab else ""
        return (f"mtp: {self.steps} steps ({ks}), {self.accepted_total}/{drafted} drafts accepted ({rate});"
                f" per position {acc}{vocab}")


# -- the draft-length controller ------------------------------------------------------------------
class DraftController:
    """Picks k per step to maximise expected tokens per second.

    Acceptance per position is a decayed ratio accepted/offered (each offer weighs DECAY times the
    next one, so the estimate follows the text: a doctest drafts worse than prose), with a weak prior,
    and the cost of a step with k drafts is the lower quartile of its last COST_SAMPLES measured step
    times (on a shared machine a step now and then takes several times its cost, when another process
    holds the core: an average followed those spikes and picked k at random under load, and even a
    median is thrown off by five slow steps in nine, after which the cheaper k is not re-measured for
    a while). A k without a measurement is tried once; afterwards the best k wins, and the other draft
    lengths are re-measured on a back-off schedule (every 16 steps, doubling up to every 512 while the
    choice holds), so a switched-off MTP costs under a percent and a switched-on one notices when
    acceptance drops.

    One controller serves every generation of an LLM (api.LLM keeps it, k_max = the file's heads):
    step costs are the model's and the machine's, not the prompt's, and 128 tokens are too few to learn
    them and the acceptance from scratch each time (the cold start alone made a badly drafted prompt
    0.85x). Generations with a fixed k (adaptive False) measure too. A new generation sets its cap on k
    and, where the best k is below it, restarts the back-off, so new text is re-explored soon (start())."""

    PRIOR = (1.0, 2.0)   # a Beta(1, 1)-ish prior: alpha starts at 0.5 (later positions: alpha())
    DECAY = 0.95         # an offer's weight after the next: ~20 offers of memory per position
    RATIO_DECAY = 0.995  # alpha(): ~200 offers of memory for the ratio of one position to the one before
    COST_SAMPLES = 9
    VOCAB_DECAY = 0.99   # note_tokens: ~100 committed tokens of memory
    VOCAB_WIDEN = 0.05

    def __init__(self, k_max: int, adaptive: bool = True):
        self.k_max = k_max
        self.cap = k_max      # this generation's longest draft (start())
        self.adaptive = adaptive
        self.acc = [0.0] * k_max
        self.off = [0.0] * k_max
        # per position i >= 1, long-run counts on steps drafting past i: accepted and offered at i, and
        # at i - 1; alpha() takes the ratio of the two acceptances
        self.ratio_counts = [[0.0, 0.0, 0.0, 0.0] for _ in range(k_max)]
        self.cost: list[float | None] = [None] * (k_max + 1)
        self.times: list[list[float]] = [[] for _ in range(k_max + 1)]   # the last step times per k
        self.last_seen = [0] * (k_max + 1)
        self.step = 0
        self.interval = 16
        self.next_explore = 16
        self.best = k_max
        self.v_seen = self.v_outside = 0.0   # note_tokens' decayed counts
        self.v_count = 0
        self.vocab_wide = False

    def start(self, cap: int | None = None) -> None:
        """A new generation drafting at most `cap` tokens (None: k_max): what was learned stays; longer
        draft lengths than the best are re-measured soon (new text may draft better). Shorter ones keep
        their back-off: every step offers their draft positions, so acceptance tells on them without
        exploring, and their step costs are the machine's, not the text's (exploring them anew each
        generation cost ~1.5% of a 40-step generation that drafts the longest k anyway)."""
        self.cap = self.k_max if cap is None else max(0, min(cap, self.k_max))
        if self.best < self.cap:
            self.interval = 16
            self.next_explore = self.step + 16

    def alpha(self) -> list[float]:
        """Acceptance per draft position. Position i > 0 leans on position i - 1: its prior is the
        estimate of i - 1 times their long-run ratio (from steps that drafted past i), and its own counts
        fade while steps draft fewer than i + 1 tokens (position 0's do not: a switched-off MTP must not
        drift back to its prior and switch itself on; exploration re-measures it). So a position offered
        only when its k is explored follows the text through the position before it, instead of holding
        the few offers of the last exploration for the hundreds of steps until the next (one unlucky
        offer kept k = 3, the best on the trained model, at k = 2 for whole generations)."""
        a0, n0 = self.PRIOR
        out = [(self.acc[0] + a0) / (self.off[0] + n0)] if self.k_max else []
        for i in range(1, self.k_max):
            ra, ro, pa, po = self.ratio_counts[i]
            ratio = ((ra + a0) / (ro + n0)) / ((pa + a0) / (po + n0))
            prior = min(1.0, out[-1] * ratio)
            out.append((self.acc[i] + prior * n0) / (self.off[i] + n0))
        return out

    def choose(self) -> int:
        self.step += 1
        if not self.adaptive or self.cap == 0:
            return self.cap
        for k in range(self.cap, -1, -1):
            if self.cost[k] is None:
                return k
        alpha = self.alpha()
        best = max(range(self.cap + 1), key=lambda k: expected_tokens(alpha, k) / self.cost[k])
        if best != self.best:
            self.interval = 16
        self.best = best
        if self.step >= self.next_explore:
            self.next_explore = self.step + self.interval
            self.interval = min(self.interval * 2, 512)
            stale = min((k for k in range(self.cap + 1) if k != best), key=lambda k: self.last_seen[k])
            return stale
        return best

    def note_tokens(self, ids, limit: int) -> bool:
        """Committed ids against a draft vocabulary of ids < limit; returns whether drafts should range
        over the whole vocabulary instead: once over 5% of the recent text (~100 tokens) falls outside
        it (a language, or a vocabulary, whose frequent ids are not the first), until under 2.5%."""
        for t in ids:
            self.v_seen = self.v_seen * self.VOCAB_DECAY + 1
            self.v_outside = self.v_outside * self.VOCAB_DECAY + (t >= limit)
        self.v_count += len(ids)
        if self.v_count >= 8:
            rate = self.v_outside / self.v_seen
            self.vocab_wide = rate > self.VOCAB_WIDEN or (self.vocab_wide and rate >= self.VOCAB_WIDEN / 2)
        return self.vocab_wide

    def update(self, k: int, n_accepted: int, seconds: float) -> None:
        for i in range(min(k, n_accepted + 1)):
            self.off[i] = self.off[i] * self.DECAY + 1
            self.acc[i] = self.acc[i] * self.DECAY + (i < n_accepted)
        for i in range(max(k, 1), self.k_max):   # positions this k could not offer: their counts fade
            self.off[i] *= self.DECAY
            self.acc[i] *= self.DECAY
        for i in range(1, min(k, n_accepted + 2)):   # i against i - 1, on steps that could offer both
            c, d = self.ratio_counts[i], self.RATIO_DECAY
            if n_accepted >= i:
                c[0], c[1] = c[0] * d + (n_accepted > i), c[1] * d + 1
            c[2], c[3] = c[2] * d + (n_accepted >= i), c[3] * d + 1
        t = self.times[k]
        t.append(seconds)
        del t[:-self.COST_SAMPLES]
        self.cost[k] = sorted(t)[len(t) // 4]
        self.last_seen[k] = self.step


# -- the drafter ----------------------------------------------------------------------------------
class MTPDrafter:
    """The MTP heads of a model, their KV caches and the trunk hidden states they are fed."""

    def __init__(self, model, n_ctx: int, max_batch: int, draft_vocab: int | None = None):
        self.heads = list(model.nextn)
        if not self.heads:
            raise ValueError("the model has no MTP heads")
        self.n_embd = model.n_embd
        self.n_vocab = model.n_vocab
        self.draft_vocab = draft_vocab
        self.max_batch = max_batch
        self.caches = [KVCache([h.cache_spec], n_ctx, max_batch) for h in self.heads]
        self.h_hist = np.zeros((min(n_ctx, 1024), self.n_embd), dtype=np.float32)
        self.n_hist = 0   # trunk hidden states recorded for positions 0..n_hist-1
        # seconds draft() spent bringing heads that sat unused up to date: work owed by earlier steps,
        # which the draft-length controller must not charge to this step's k (else a head left idle
        # looks dear, is left idle longer, and its next use costs more still)
        self.catchup_seconds = 0.0
        self._chain = None   # gr_mtp_chain_head[n_heads], made on the first greedy draft

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def draft_vocab(self) -> int:
        """Drafts are ids 0..draft_vocab-1 (the heads compute only those logits); n_vocab: any id."""
        return self._draft_vocab

    @draft_vocab.setter
    def draft_vocab(self, n: int | None) -> None:
        n = self.n_vocab if n is None else int(n)
        if not 1 <= n <= self.n_vocab:
            raise ValueError(f"draft vocabulary {n} is outside 1..{self.n_vocab} (the model's vocabulary)")
        self._draft_vocab = n

    def reset(self) -> None:
        self.n_hist = 0
        for c in self.caches:
            c.reset()

    def truncate(self, n: int) -> None:
        """Forget everything at positions >= n (trunk rollback or a new prompt)."""
        self.n_hist = min(self.n_hist, n)
        for c in self.caches:
            if c.n_past > n:
                try:
                    c.truncate(n)
                except ValueError:   # a ring layer lost the history: rebuild this head from scratch
                    c.reset()

    def record(self, start: int, h: np.ndarray) -> None:
        """Trunk hidden states of positions start..start+len(h)-1."""
        if start > self.n_hist:
            raise ValueError(f"hidden states for positions {self.n_hist}..{start - 1} were never recorded")
        end = start + len(h)
        if end > len(self.h_hist):
            grown = np.zeros((max(end, 2 * len(self.h_hist)), self.n_embd), dtype=np.float32)
            grown[:self.n_hist] = self.h_hist[:self.n_hist]
            self.h_hist = grown
        self.h_hist[start:end] = h
        self.n_hist = end
        self.truncate(end)

    def _h_prev(self, start: int, end: int) -> np.ndarray:
        """h inputs for positions start..end-1: the trunk's state at p - 1 (zeros for p = 0)."""
        if start == 0:
            return np.concatenate([np.zeros((1, self.n_embd), np.float32), self.h_hist[:end - 1]])
        return self.h_hist[start - 1:end - 1]

    def catch_up(self, j: int, tokens, upto: int) -> None:
        """Bring head j's cache to committed positions 0..upto-1."""
        c = self.caches[j]
        if upto > self.n_hist:
            raise ValueError(f"head {j} cannot catch up to {upto}: trunk hidden states end at {self.n_hist}")
        while c.n_past < upto:
            s = c.n_past
            e = min(upto, s + self.max_batch)
            self.heads[j].store(np.asarray(tokens[s:e]), self._h_prev(s, e), np.arange(s, e, dtype=np.int32), c)

    def draft(self, tokens, id_last: int, k: int, pick=None) -> tuple[list[int], list]:
        """Up to k tokens after `id_last` (at position len(tokens)), chaining the heads. `pick(logits)`
        returns (token, q) for one head's logits: q is the draft distribution (None for greedy). pick None:
        greedy arg-max, the whole chain in one native call (the same drafts as the heads called one by one,
        without the Python between them: ~0.15 ms a step of ~2)."""
        P = len(tokens)
        k = min(k, self.n_heads)
        if k <= 0:
            return [], []
        # committed rows a head has not seen yet (the drafts accepted last step) ride in the same call as
        # its draft rows: one block evaluation per head per step, not two. Rows are independent but for
        # causal attention, so this equals catching up first. A head further behind (unused for a while)
        # catches up apart, timed apart.
        starts = []
        for i in range(k):
            c = self.caches[i]
            if c.n_past > P:
                c.truncate(P)
            s = max(c.n_past, P - min(self.n_heads + 1, self.max_batch - (i + 1)))
            if c.n_past < s:
                t0 = time.perf_counter()
                self.catch_up(i, tokens, s)
                self.catchup_seconds += time.perf_counter() - t0
            starts.append(s)
        if pick is None and all(h.chains_natively for h in self.heads[:k]):
            drafts, qs = self._draft_native(tokens, id_last, starts), [None] * k
        else:
            pick = pick or (lambda lg: (int(np.argmax(lg)), None))
            drafts, qs = self._draft_steps(tokens, id_last, starts, pick)
        # row P of every head that ran is the committed (h_trunk[P-1], id_last) entry; rows past it held
        # head-chained states, which the trunk's own hidden states replace on catch-up
        for i in range(k):
            if self.caches[i].n_past > P + 1:
                self.caches[i].truncate(P + 1)
        return drafts, qs

    def _draft_steps(self, tokens, id_last: int, starts: list[int], pick) -> tuple[list[int], list]:
        """The chain one head call at a time, each head's token chosen by pick."""
        P = len(tokens)
        chain_h = [self.h_hist[P - 1] if P else np.zeros(self.n_embd, np.float32)]
        toks = [id_last]
        drafts, qs = [], []
        for i, s in enumerate(starts):
            rows_t = np.concatenate([np.asarray(tokens[s:P], dtype=np.int64), np.array(toks, dtype=np.int64)])
            rows_h = np.concatenate([self._h_prev(s, P), np.stack(chain_h)]) if s < P else np.stack(chain_h)
            hs, logits = self.heads[i].forward(rows_t, rows_h, np.arange(s, P + i + 1, dtype=np.int32),
                                               self.caches[i], self._draft_vocab)
            if len(logits) < self.n_vocab:   # ids past the draft vocabulary: never picked, never sampled
                logits = np.concatenate([logits, np.full(self.n_vocab - len(logits), -np.inf, np.float32)])
            tok, q = pick(logits)
            drafts.append(tok)
            qs.append(q)
            chain_h.append(hs[-1])
            toks.append(tok)
        return drafts, qs

    def _draft_native(self, tokens, id_last: int, starts: list[int]) -> list[int]:
        """The greedy chain as one gr_mtp_draft_greedy call."""
        P, k = len(tokens), len(starts)
        if P > self.n_hist:
            raise ValueError(f"cannot draft at {P}: trunk hidden states end at {self.n_hist}")
        if self._chain is None:
            self._chain = _ffi.new("gr_mtp_chain_head[]", self.n_heads)
            self._chain_keep = []
            for i, (h, c) in enumerate(zip(self.heads, self.caches)):
                e = self._chain[i]
                e.head = h._desc
                e.k_cache, e.v_cache, e.pos_cache = cache_arrays(c, 0)
                e.n_slots, e.ring = c.k[0].shape[0], c.ring[0]
                if h._n_used:   # a MoE head's choice (its last row's) comes back for the store's statistics
                    ids = np.empty((1, h._n_used), dtype=np.int32)
                    w = np.empty((1, h._n_used), dtype=np.float32)
                    e.ids, e.weights = _from_buffer(_INT32S, ids, True), _from_buffer(_FLOATS, w, True)
                    self._chain_keep.append((i, ids, w))
        first = min(starts)
        for i, s in enumerate(starts):
            self.caches[i].check_room(P + i + 1 - self.caches[i].n_past)
            self._chain[i].start = s
        committed = np.asarray(tokens[first:P], dtype=np.int32)
        drafts = np.empty(k, dtype=np.int32)
        rc = _lib.gr_mtp_draft_greedy(self._chain, k, _from_buffer(_INT32S, committed, False), first, P, int(id_last),
                                      _f32(self.h_hist), self._draft_vocab, _from_buffer(_INT32S, drafts, True))
        if rc:   # rows some heads wrote before the failure: forget them, as if those heads had not run
            for i, s in enumerate(starts):
                c = self.caches[i]
                c.n_past = P + i + 1
                c.truncate(s)
            _check(rc, f"mtp draft chain at position {P} (id_last {id_last})")
        for i, ids, _ in self._chain_keep:
            if i < k:
                h = self.heads[i]
                h.block.ffn.store.record(h.il, ids[:1])   # the one row that ran the FFN
        for i in range(k):
            self.caches[i].n_past = P + i + 1
        return drafts.tolist()


# -- measuring expert reads -----------------------------------------------------------------------
class ExpertReads:
    """Counts the routed-expert bytes the MoE layers read while active: each native MoE call reads every
    distinct selected expert of its layer once (gr_moe_ffn groups tokens by expert), or, where the token
    split runs the call as pieces of rows (a few rows through a small layer, MoE.pieces), every distinct
    expert of each piece once."""

    def __init__(self, store):
        self.store = store
        self.bytes = 0
        self.calls = 0
        self.experts = 0

    def __enter__(self):
        orig = self.store.record
        self._wrapped = "record" in vars(self.store)   # someone else's wrapper, put back on exit
        self._orig = orig

        def record(il, ids):
            split = self.store.row_pieces.get(il)
            g = split(len(ids)) if split else 1
            n = sum(len(np.unique(ids[len(ids) * i // g:len(ids) * (i + 1) // g])) for i in range(g))
            self.experts += n
            self.bytes += n * self.store.expert_bytes(il)
            self.calls += 1
            return orig(il, ids)
        self.store.record = record
        return self

    def __exit__(self, *exc):
        if self._wrapped:
            self.store.record = self._orig
        else:
            del self.store.record   # back to the class's method
        return False

