"""MTP speculative decoding (ggufrun/mtp.py, LLM.generate(mtp=...)) on small step35 files.

Files come from models/step35_tiny.py: random-weight MTP heads (drafts almost never accepted: the
rollback path) and "echo" files built here, whose heads pass the token embedding through to the
trunk's output head while the trunk's blocks are scaled down, so drafts are often right (the accept
path). Greedy output must equal the no-MTP output token for token (F32 files: the batched verify is
bit-identical to single-token steps there); sampling is checked in distribution on synthetic p/q and
end to end for determinism and a first-tokens distribution test.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

import ggufrun  # noqa: E402
from ggufrun import native  # noqa: E402
from ggufrun.kv_cache import EMPTY_POS, KVCache  # noqa: E402
import quant  # noqa: E402
import step35_tiny  # noqa: E402
from ggufrun.mtp import (DraftController, ExpertReads, MTPStats, expected_tokens,  # noqa: E402
                         speculative_accept)
from ggufrun.sampling import Sampler, SamplerConfig  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived"]
N_GEN = 40


def write_echo(base: str, q: str, path: Path, gain: float) -> Path:
    """`base` with every block's residual branches scaled by `gain` and MTP heads that echo the token
    embedding into the trunk's output head (eh_proj = [I 0], enorm = 1, shared_head_norm = output_norm):
    at gain 0 the trunk's next token is a function of the current token alone and every draft is right."""
    cfg = replace(step35_tiny.CONFIGS[base], name=f"{base}-echo")
    w = step35_tiny.weights(cfg)
    E = cfg.n_embd
    for name in list(w):
        if name.endswith(("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")):
            w[name] = w[name] * np.float32(gain)
    for j in range(cfg.n_nextn):
        p = f"blk.{cfg.n_layer + j}.nextn."
        w[p + "eh_proj.weight"] = np.concatenate([np.eye(E), np.zeros((E, E))], 1).astype(np.float32)
        w[p + "enorm.weight"] = np.ones(E, np.float32)
        w[p + "shared_head_norm.weight"] = w["output_norm.weight"]
        w.pop(p + "shared_head_head.weight", None)
    tensors = {n: (a, step35_tiny.tensor_type(n, a.shape, q, cfg.block_count)) for n, a in w.items()}
    quant.write_gguf(path, step35_tiny.ARCH, step35_tiny.metadata(cfg, step35_tiny.FILE_TYPES[q]), tensors)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    return {"gqa": step35_tiny.write(step35_tiny.CONFIGS["gqa"], "F32", d / "gqa.gguf"),
            "wide-swa": step35_tiny.write(step35_tiny.CONFIGS["wide-swa"], "F32", d / "wide-swa.gguf"),
            "echo": write_echo("gqa", "F32", d / "echo.gguf", 0.15),
            "echo-q8": write_echo("mha-mqa", "Q8_0", d / "echo-q8.gguf", 0.15)}


@pytest.fixture(scope="module")
def llms(files):
    # drafts over the whole vocabulary: these random-weight files' outputs do not favour the first,
    # frequent ids the default draft vocabulary keeps (test_draft_vocabulary_* test that one)
    out = {k: ggufrun.load(str(p), n_ctx=256, n_batch=64) for k, p in files.items()}
    for llm in out.values():
        llm.mtp_vocab = 0
    return out


def greedy(llm, prompt, mtp, adaptive=False, n=N_GEN):
    llm.reset()
    llm.mtp_adaptive = adaptive
    ids = llm.tokenize(prompt)
    toks = []
    sampler = Sampler(SamplerConfig(temperature=0.0))
    for _ in llm.stream_tokens(ids, n, sampler, mtp=mtp):
        pass
    toks = sampler.history[len(ids):]
    return toks, llm.last_stats


# -- the math, in isolation -----------------------------------------------------------------------
def test_speculative_accept_preserves_the_target_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = np.array([0.1, 0.4, 0.0, 0.2, 0.1, 0.2])    # q puts mass where p has none, and misses token 2
    n = 40000
    out = np.empty(n, dtype=np.int64)
    acc = 0
    for i in range(n):
        d = int(rng.choice(6, p=q))
        ok, t = speculative_accept(p, q, d, rng)
        acc += ok
        out[i] = t
    freq = np.bincount(out, minlength=6) / n
    chi2 = n * sum((freq[i] - p[i]) ** 2 / p[i] for i in range(5))
    assert freq[5] == 0
    assert chi2 < 20.5, (freq, chi2)     # 4 dof, p ~ 4e-4
    # acceptance rate is sum(min(p, q)) = 0.55
    assert abs(acc / n - np.minimum(p, q).sum()) < 0.01


def test_speculative_accept_when_draft_equals_target_always_accepts():
    rng = np.random.default_rng(1)
    p = np.array([0.7, 0.2, 0.1])
    assert all(speculative_accept(p, p, int(rng.choice(3, p=p)), rng)[0] for _ in range(2000))


def test_acceptance_bookkeeping_and_expected_tokens():
    s = MTPStats(3)
    s.record(3, 0)   # d1 rejected
    s.record(3, 2)   # d1, d2 accepted, d3 rejected
    s.record(3, 3)
    s.record(1, 1)
    s.record(0, 0)
    assert s.drafted == [4, 2, 2] and s.accepted == [3, 2, 1]   # a draft after a rejection is not checked
    assert s.acceptance() == [0.75, 1.0, 0.5]
    assert s.k_hist == [1, 1, 0, 3] and s.steps == 5 and s.draft_steps == 4
    assert "6/8 drafts accepted" in s.summary()
    assert expected_tokens([1.0, 1.0, 1.0], 3) == 4.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1.75)
    assert expected_tokens([0.5], 0) == 1.0


def run_controller(alpha, cost, steps=600, seed=0):
    """Simulate: drafts accepted with probability alpha[i]; a step with k drafts costs cost(k)."""
    rng = np.random.default_rng(seed)
    c = DraftController(len(alpha))
    used = Counter()
    for _ in range(steps):
        k = c.choose()
        n_acc = 0
        while n_acc < k and rng.random() < alpha[n_acc]:
            n_acc += 1
        c.update(k, n_acc, cost(k) * (1 + 0.05 * rng.standard_normal()))
        used[k] += 1
    return used


def test_controller_switches_drafting_off_when_it_does_not_pay():
    used = run_controller([0.02, 0.02, 0.02], lambda k: 1.0 + 0.4 * k)
    assert used[0] > 0.9 * 600, used
    # and picks the longest draft when drafts are nearly free and usually right
    used = run_controller([0.9, 0.9, 0.9], lambda k: 1.0 + 0.05 * k)
    assert used[3] > 0.9 * 600, used
    # a middle ground: only the first head is good
    used = run_controller([0.9, 0.1, 0.1], lambda k: 1.0 + 0.2 * k)
    assert used[1] > 0.8 * 600, used


def test_controller_ignores_steps_slowed_by_other_processes():
    """One step in five takes 2-6x its cost (another process held the core): the choice must follow
    the costs, not the spikes."""
    rng = np.random.default_rng(9)

    def spiky(per_draft):
        def cost(k):
            return (1.0 + per_draft * k) * (rng.uniform(2, 6) if rng.random() < 0.2 else 1.0)
        return cost
    used = run_controller([0.2, 0.2, 0.2], spiky(0.4))   # drafting does not pay: 1.2 tokens for 1.4x the cost
    assert used[0] > 0.85 * 600, used
    used = run_controller([0.9, 0.9, 0.9], spiky(0.2))   # it pays at every length, most at k = 3
    assert used[3] > 0.85 * 600, used


def test_controller_lets_a_rarely_offered_position_follow_the_one_before_it():
    """Position 3 is offered only when k = 3 runs. After unlucky k = 3 steps (position 3 rejected)
    the controller runs k = 2, which never offers position 3 again: its estimate must come
    back with the text's acceptance at position 2 (times their long-run ratio), not stay at those few
    offers until the next exploration, hundreds of steps later."""
    c = DraftController(3)
    for _ in range(300):
        c.update(3, 3, 1.0)   # every draft accepted: the long-run ratio of position 3 to 2 is ~1
    for _ in range(10):
        c.update(3, 2, 1.0)   # then position 3 rejected ten times running
    assert c.alpha()[2] < 0.65
    for _ in range(80):
        c.update(2, 2, 1.0)   # k = 2, both drafts accepted
    a = c.alpha()
    assert a[1] > 0.95 and a[2] > 0.85, a
    # the other way: where position 2 is really poor (the ratio learned low), it stays poor unoffered
    c = DraftController(3)
    rng = np.random.default_rng(1)
    for _ in range(200):
        c.update(3, 1 + int(rng.random() < 0.1), 1.0)   # position 1 always accepted, position 2 10%
    for _ in range(80):
        c.update(1, 1, 1.0)
    assert c.alpha()[1] < 0.3, c.alpha()


def test_controller_follows_acceptance_that_changes_and_restarts_exploring_per_generation():
    """Acceptance is a decayed estimate: after 300 steps of useless drafts (off), text that drafts well
    turns drafting back on within a couple of exploration intervals, and the other way round."""
    rng = np.random.default_rng(5)
    c = DraftController(3)
    cost = lambda k: 1.0 + 0.1 * k   # noqa: E731

    def run(alpha, steps):
        used = []
        for _ in range(steps):
            k = c.choose()
            n_acc = 0
            while n_acc < k and rng.random() < alpha:
                n_acc += 1
            c.update(k, n_acc, cost(k))
            used.append(k)
        return used
    assert Counter(run(0.02, 300)[-100:])[0] > 90
    c.start()   # a new generation: exploration restarts at the short interval
    used = run(0.9, 200)
    assert Counter(used[-100:])[3] > 90, Counter(used)
    assert Counter(run(0.02, 300)[-100:])[0] > 90
    c.start(1)   # a generation capped at one draft: the estimates stay, k never exceeds the cap
    used = run(0.9, 100)
    assert max(used) == 1 and Counter(used[-50:])[1] > 45


# -- greedy: identical output, token for token ----------------------------------------------------
@pytest.mark.parametrize("model", ["gqa", "wide-swa", "echo"])
def test_greedy_output_identical_with_mtp(llms, model):
    llm = llms[model]
    assert llm.mtp_heads == 3
    for prompt in PROMPTS:
        ref, st0 = greedy(llm, prompt, 0)
        assert st0.mtp is None and len(ref) == N_GEN
        ref_tokens = list(llm.tokens)
        for k in (1, 2, 3):
            got, st = greedy(llm, prompt, k)
            assert got == ref, (model, prompt, k)
            # forced k: every step drafted k, but the last few (no drafts past max_tokens)
            assert st.mtp.k_hist[k] >= st.mtp.steps - k > 0
            # the cache ends where the plain loop's does (last token not evaluated)
            assert llm.tokens == ref_tokens and llm.cache.n_past == len(ref_tokens)
            if model == "echo":
                assert st.mtp.accepted[0] > 0, st.mtp.summary()


def prefilled(model, prompt, max_batch=8):
    cache = model.new_cache(128, max_batch)
    for i in range(0, len(prompt), max_batch):
        model.forward(prompt[i:i + max_batch], cache)
    return cache


@pytest.mark.parametrize("base,q", [("gqa", "Q8_0"), ("wide-swa", "Q4_K_M")])
def test_verify_batch_logits_equal_token_by_token_bit_for_bit(tmp_path, base, q):
    """A verify batch (the sampled token and up to 3 drafts) takes the decode kernels, a few tokens a
    call, and every other op of the trunk treats rows alone: at either act precision its logits are
    exactly those of its tokens decoded one at a time, so greedy MTP output cannot part from the plain
    loop's even at a near-tie (quantized files: the F32 ones above take no integer kernels)."""
    llm = ggufrun.load(step35_tiny.write(step35_tiny.CONFIGS[base], q, tmp_path / f"{base}-{q}.gguf"), n_threads=2)
    m = llm.model
    prompt = llm.tokenize(PROMPTS[1] * 3)   # past the sliding window: the ring has wrapped
    batch = [5, 17, 99, 3]
    for precision in (1, 2):
        with native.act_precision(precision):
            for n in (2, 3, 4):
                cache = prefilled(m, prompt)
                together = m.forward(batch[:n], cache, all_logits=True)
                cache = prefilled(m, prompt)
                one_by_one = np.concatenate([m.forward([t], cache) for t in batch[:n]])
                np.testing.assert_array_equal(together, one_by_one, err_msg=f"precision {precision}, {n} tokens")


def test_echo_file_accepts_and_steps_advance_several_tokens(llms):
    llm = llms["echo"]
    _, st = greedy(llm, PROMPTS[1], 3)
    acc = st.mtp.acceptance()
    assert acc[0] > 0.5, st.mtp.summary()
    # fewer verify steps than tokens: accepted drafts came out of single trunk passes
    assert st.mtp.steps < N_GEN - 1 - st.mtp.accepted_total // 2


def test_draft_vocabulary_confines_drafts_and_keeps_greedy_output(llms):
    """Drafts over the first N ids only (the heads' projection computes those rows): every draft is below
    N, in the one-call chain and, with penalties on, one head at a time; the output stays the plain one."""
    llm = llms["echo"]
    llm.mtp_adaptive = False   # draft every step: these random heads would switch an adaptive k off
    d = llm._mtp_drafter()
    seen = []
    d.draft = lambda *a, orig=d.draft: (lambda r: (seen.extend(r[0]), r)[1])(orig(*a))
    try:
        for penalty in (1.0, 1.3):
            outs = []
            for mtp, vocab in ((0, 0), (3, 0), (3, 2000)):
                llm.mtp_vocab = vocab
                llm.reset()
                outs.append(list(llm.stream_tokens(llm.tokenize(PROMPTS[1]), 16,
                                                   Sampler(SamplerConfig(temperature=0.0, repeat_penalty=penalty)),
                                                   mtp=mtp)))
                if vocab:
                    assert seen and max(seen) < vocab, seen
                    assert d.draft_vocab == vocab
                seen.clear()
            assert outs[0] == outs[1] == outs[2], penalty
    finally:
        del d.draft
        llm.mtp_vocab = 0


def test_draft_vocabulary_default_widens_where_the_text_leaves_it(llms):
    """The default draft vocabulary (a quarter of the ids, at least 1024) holds while committed text
    stays inside it, and gives way to the whole vocabulary once over 5% falls outside (a random-weight
    file's output: ids all over its vocabulary), back under 2.5%."""
    from ggufrun.mtp import DraftController, default_draft_vocab
    assert default_draft_vocab(4096) == 1024 and default_draft_vocab(49152) == 12288
    assert default_draft_vocab(500) == 500
    c = DraftController(3)
    assert not c.note_tokens([5, 2000], 1024)          # too few tokens seen to judge
    assert c.note_tokens([5, 6, 7, 8, 9, 3000], 1024)   # 2 of 8 outside
    assert c.note_tokens([5] * 40, 1024)                # ~4% outside: stays wide (hysteresis)
    assert not c.note_tokens([5] * 60, 1024)            # under 2.5%: back to the draft vocabulary
    llm = llms["echo"]
    try:
        llm.mtp_vocab, llm._draft_ctl = None, None
        greedy(llm, PROMPTS[1], 3, adaptive=True)
        d = llm._drafter
        assert llm._draft_ctl.vocab_wide and d.draft_vocab == llm.model.n_vocab
        llm.mtp_adaptive = False   # a fixed setting: the default vocabulary, not widened
        llm.generate(PROMPTS[1], max_tokens=8, temperature=0.0, mtp=3)
        assert d.draft_vocab == default_draft_vocab(llm.model.n_vocab)
        with pytest.raises(ValueError, match=f"draft vocabulary 0 is outside 1..{llm.model.n_vocab}"):
            d.draft_vocab = 0
    finally:
        llm.mtp_vocab, llm._draft_ctl = 0, None


def test_rollback_leaves_trunk_and_head_caches_as_a_fresh_run(llms):
    """After a speculative generation (rejections on ring layers included), the trunk's next logits and
    the heads' next drafts equal those of a fresh sequence prefilled with the same tokens."""
    for model in ("wide-swa", "echo"):
        llm = llms[model]
        greedy(llm, PROMPTS[1], 3)
        toks = list(llm.tokens)
        nxt = 42
        d = llm._mtp_drafter()
        drafts_after, _ = d.draft(toks, nxt, 3, lambda lg: (int(np.argmax(lg)), None))
        lg_after = llm._eval_hidden([nxt])
        llm.reset()
        llm._eval_hidden(toks)
        drafts_fresh, _ = llm._mtp_drafter().draft(list(llm.tokens), nxt, 3, lambda lg: (int(np.argmax(lg)), None))
        lg_fresh = llm._eval_hidden([nxt])
        np.testing.assert_array_equal(lg_after, lg_fresh)
        assert drafts_after == drafts_fresh


TRAINED = Path(__file__).resolve().parent.parent / "models" / "step35-mtp-py-Q8_0.gguf"


@pytest.mark.parametrize("model", ["gqa", "echo-q8", "trained"])
def test_a_head_in_one_call_equals_its_steps(llms, model):
    """NextN.forward (the draft's one native call, gr_mtp_head_forward) gives the bits of the last row of
    hidden() and of logits() called step by step, and NextN.store (a catch-up: keys and values only)
    writes the KV rows hidden() writes; forward hands its row's MoE choice to the expert store. MoE heads
    (gqa, F32: every batch size bit for bit), Q8_0 dense ones (echo-q8, a trained file), batches of 1 to
    5 rows after each other."""
    llm = ggufrun.load(str(TRAINED), n_ctx=256) if model == "trained" else llms[model]
    m = llm.model
    rng = np.random.default_rng(3)
    for head in m.nextn:
        caches = [KVCache([head.cache_spec], 64, 8) for _ in range(3)]
        recorded = [[], []]
        store = m.mtp_experts
        p = 0
        for n in (5, 1, 3, 2, 4):
            toks = rng.integers(0, m.n_vocab, n)
            h_prev = rng.standard_normal((n, m.n_embd)).astype(np.float32)
            pos = np.arange(p, p + n, dtype=np.int32)
            out = []
            for way, cache in enumerate(caches[:2]):
                store.record = lambda il, ids, way=way: recorded[way].append((il, np.array(ids)))
                try:
                    if way == 0:
                        h = head.hidden(toks, h_prev, pos, cache)
                        out.append((h[-1:], head.logits(h[-1:])[0]))
                    else:   # odd batches: the logits of the first 100 ids only (a draft vocabulary)
                        out.append(head.forward(toks, h_prev, pos, cache, 100 if n % 2 else None))
                finally:
                    del store.record
            assert out[1][0].shape == (1, m.n_embd) and len(out[1][1]) == (100 if n % 2 else m.n_vocab)
            # the first rows of the projection alone (an expert-cached MoE head's draft) give their bits
            assert np.array_equal(head.logits(out[0][0], 100)[0], out[0][1][:100])
            out[0] = (out[0][0], out[0][1][:len(out[1][1])])
            if n <= 4 or model == "gqa":
                assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1]), (head.il, n)
            else:   # hidden() runs the last row's FFN in a batch of 5: quantized products of more than 4
                # tokens take register tiles, which sum in another order than the decode kernels
                np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-4, atol=1e-4)
            store.record = lambda il, ids: pytest.fail("store() ran an FFN")
            try:
                assert head.store(toks, h_prev, pos, caches[2]) is None
            finally:
                del store.record
            assert caches[0].n_past == caches[1].n_past == caches[2].n_past == p + n
            p += n
        for c in caches[1:]:
            for a, b in zip(caches[0].k + caches[0].v + caches[0].pos, c.k + c.v + c.pos):
                assert np.array_equal(a, b)
        assert len(recorded[0]) == len(recorded[1]) == (5 if m.params.is_moe[head.il] else 0)
        assert all(a[0] == b[0] and np.array_equal(a[1][-1:], b[1]) for a, b in zip(*recorded))
    if model == "gqa":
        assert all(m.params.is_moe[h.il] for h in m.nextn)
        head = m.nextn[0]
        with pytest.raises(ValueError, match=f"mtp head blk.{head.il}"):
            head.forward(np.array([m.n_vocab]), np.zeros((1, m.n_embd), np.float32), np.array([0], np.int32),
                         KVCache([head.cache_spec], 64, 8))
        for bad in (0, m.n_vocab + 1):
            with pytest.raises(ValueError, match=f"mtp head blk.{head.il}: n_logits {bad} is outside 1..{m.n_vocab}"):
                head.forward(np.array([1]), np.zeros((1, m.n_embd), np.float32), np.array([0], np.int32),
                             KVCache([head.cache_spec], 64, 8), bad)
            # the native call refuses the count on its own (it would write past the logits)
            with pytest.raises(ValueError, match=f"mtp head blk.{head.il}: argument out of range"):
                head._call(np.array([1]), np.zeros((1, m.n_embd), np.float32), np.array([0], np.int32),
                           KVCache([head.cache_spec], 64, 8), 1, bad)


@pytest.mark.parametrize("model", ["gqa", "wide-swa", "echo-q8", "trained"])
def test_greedy_chain_in_one_call_equals_the_heads_one_by_one(llms, model):
    """draft(pick=None) -- the greedy chain as one native call, gr_mtp_draft_greedy -- proposes the
    tokens the heads called one by one with an arg-max pick propose, leaves the same KV rows, and hands
    MoE heads' choices to the expert store: draft lengths 1 to 3, steps that accept 0 to 3 tokens (so
    heads carry 1 to 4 committed rows), MoE heads (gqa), sliding-window heads (wide-swa), Q8_0."""
    from ggufrun.mtp import MTPDrafter
    llm = ggufrun.load(str(TRAINED), n_ctx=256) if model == "trained" else llms[model]
    m = llm.model
    llm.reset()
    prompt = llm.tokenize(PROMPTS[1])
    h = m.forward_hidden(np.array(prompt), llm.cache)
    ways = [MTPDrafter(m, llm.n_ctx, llm.n_batch) for _ in range(2)]
    recorded = [[], []]
    for d in ways:
        d.record(0, h)
    tokens, id_last = list(prompt), 42
    rng = np.random.default_rng(5)
    store = m.mtp_experts
    for step in range(8):
        k = 1 + step % 3
        vocab = m.n_vocab if step < 4 else 700   # then drafts confined to the first 700 ids
        out = []
        for way, d in enumerate(ways):
            d.draft_vocab = vocab
            store.record = lambda il, ids, way=way: recorded[way].append((il, np.array(ids)))
            try:
                out.append(d.draft(tokens, id_last, k, None if way == 0 else lambda lg: (int(np.argmax(lg)), None)))
            finally:
                del store.record
        assert out[0] == out[1] and max(out[0][0]) < vocab, (step, out)
        for c0, c1 in zip(*(d.caches for d in ways)):
            assert c0.n_past == c1.n_past
            for a, b in zip(c0.k + c0.v + c0.pos, c1.k + c1.v + c1.pos):
                assert np.array_equal(a, b), step
        # the trunk takes id_last and some of the drafts (a random accept count)
        take = [id_last] + out[0][0][:int(rng.integers(0, k + 1))]
        h = m.forward_hidden(np.array(take), llm.cache)
        for d in ways:
            d.record(len(tokens), h)
        tokens += take
        id_last = int(rng.integers(0, m.n_vocab))
    assert len(recorded[0]) == len(recorded[1])
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(*recorded))
    assert (len(recorded[0]) > 0) == any(m.params.is_moe[hd.il] for hd in m.nextn)
    # a failing chain (an id outside the vocabulary) names itself and leaves the heads' caches as before
    d = ways[0]
    before = [(c.n_past, c.pos[0].copy()) for c in d.caches]
    with pytest.raises(ValueError, match=f"mtp draft chain at position {len(tokens)} .id_last {m.n_vocab}."):
        d.draft(tokens, m.n_vocab, 3)
    for c, (n, pos) in zip(d.caches, before):
        assert c.n_past <= n and np.array_equal(c.pos[0][:c.n_past], pos[:c.n_past])
    # so does a draft vocabulary outside 1..n_vocab that reaches the native chain (the setter refuses it)
    for bad in (0, m.n_vocab + 1):
        d._draft_vocab = bad
        with pytest.raises(ValueError, match=f"mtp draft chain at position {len(tokens)} .id_last 1.: argument out"):
            d.draft(tokens, 1, 3)
        for c, (n, pos) in zip(d.caches, before):
            assert c.n_past <= n and np.array_equal(c.pos[0][:c.n_past], pos[:c.n_past])
        assert (c.pos[0][c.n_past:] == EMPTY_POS).all() or c.ring[0]
    with pytest.raises(ValueError, match="cannot draft at"):
        d.draft(tokens + [1, 2], 3, 2)
    assert d.draft(tokens, 3, 0) == ([], [])


def test_an_idle_head_catches_up_apart_and_timed(llms):
    """A head far behind the trunk (after a prompt, or left unused by the controller) catches up in
    calls of its own, timed in catchup_seconds, which the controller does not charge to the step's
    draft length; the draft call carries only the few committed rows a step leaves behind."""
    llm = llms["echo"]
    llm.reset()
    llm._eval_hidden(llm.tokenize(PROMPTS[1] * 2))
    d = llm._mtp_drafter()
    rows = []
    head = d.heads[2]
    # the rows of each call: catch-up runs store() (keys and values), the draft forward()
    head.store = lambda t, h, p, c, orig=head.store: (rows.append(len(t)), orig(t, h, p, c))[1]
    head.forward = lambda t, h, p, c, *a, orig=head.forward: (rows.append(len(t)), orig(t, h, p, c, *a))[1]
    try:
        pick = lambda lg: (int(np.argmax(lg)), None)  # noqa: E731
        d.catchup_seconds = 0.0
        drafts, _ = d.draft(list(llm.tokens), 42, 3, pick)
        assert d.catchup_seconds > 0 and len(rows) >= 2 and rows[-1] <= d.n_heads + 1 + 3, rows
        llm._eval_hidden([42, drafts[0]])   # the next step: two committed rows behind
        rows.clear()
        d.catchup_seconds = 0.0
        d.draft(list(llm.tokens), drafts[1], 3, pick)
        assert d.catchup_seconds == 0.0 and rows == [2 + 3], rows
    finally:
        del head.store, head.forward


def test_prompt_processing_brings_the_drafting_heads_up_to_date(llms):
    """A prompt prefilled for MTP with at most k drafts leaves heads 0..k-1 caught up over it (as
    llama.cpp's MTP prompt processing does), so the first decode step carries no catch-up; the rest
    stay lazy; drafts equal those of heads that caught up in the step."""
    llm = llms["echo"]
    ids = llm.tokenize(PROMPTS[1])
    pick = lambda lg: (int(np.argmax(lg)), None)  # noqa: E731
    llm.reset()
    llm._eval_hidden(ids)                   # the heads left to catch up in the first draft
    d = llm._mtp_drafter()
    assert [c.n_past for c in d.caches] == [0, 0, 0]
    drafts_lazy, _ = d.draft(list(llm.tokens), 42, 2, pick)
    llm.reset()
    llm._prefill(ids, mtp=2)
    d = llm._mtp_drafter()
    assert [c.n_past for c in d.caches] == [len(ids), len(ids), 0]
    d.catchup_seconds = 0.0
    drafts_eager, _ = d.draft(list(llm.tokens), 42, 2, pick)
    assert d.catchup_seconds == 0.0
    assert drafts_eager == drafts_lazy


def test_prefix_reuse_and_switching_mtp_on_and_off(llms):
    llm = llms["echo"]
    ref, _ = greedy(llm, PROMPTS[0], 0)
    llm.reset()
    llm.mtp_adaptive = False
    sampler = Sampler(SamplerConfig(temperature=0.0))
    ids = llm.tokenize(PROMPTS[0])
    list(llm.stream_tokens(ids, 10, sampler, mtp=0))          # plain turn: no hidden states recorded
    s2 = Sampler(SamplerConfig(temperature=0.0))
    list(llm.stream_tokens(ids, N_GEN, s2, mtp=2))              # reuses no more than the heads can use
    assert s2.history[len(ids):] == ref
    s3 = Sampler(SamplerConfig(temperature=0.0))
    list(llm.stream_tokens(ids, N_GEN, s3, mtp=3))              # reuses the prefix and its hidden states
    assert s3.history[len(ids):] == ref and llm.last_stats.cached_tokens == len(ids) - 1


def test_generate_api(llms):
    llm = llms["echo"]
    llm.mtp_adaptive = True
    text0 = llm.generate(PROMPTS[0], max_tokens=24, temperature=0, mtp=0)
    assert llm.last_stats.mtp is None
    text = llm.generate(PROMPTS[0], max_tokens=24, temperature=0)   # on by default: the file has heads
    assert llm.last_stats.mtp is not None and llm.last_stats.mtp.k_max == 3
    assert text == text0
    ctl = llm._draft_ctl
    steps = ctl.step
    assert llm.generate(PROMPTS[0], max_tokens=24, temperature=0, mtp=2) == text0
    assert llm.last_stats.generated_tokens == 24
    # one controller for every generation (what it learned carries over), capped per generation
    assert llm._draft_ctl is ctl and ctl.step > steps and ctl.cap == 2
    with pytest.raises(ValueError, match="mtp must be >= 0, not -1"):
        llm.generate(PROMPTS[0], max_tokens=4, mtp=-1)
    # stop strings and max_tokens cut in the middle of an accepted run
    for n in (1, 2, 5):
        assert llm.generate(PROMPTS[0], max_tokens=n, temperature=0, mtp=3) == \
            llm.generate(PROMPTS[0], max_tokens=n, temperature=0, mtp=0)


def test_greedy_drafts_see_the_penalties_the_trunk_samples_with(llms):
    """Greedy decoding drafts in one native call (pick None) unless repetition penalties are on: then the
    heads' logits are penalised like the trunk's, one head at a time (same output either way)."""
    llm = llms["echo"]
    llm.mtp_adaptive = False   # draft every step
    d = llm._mtp_drafter()
    picks = []
    d.draft = lambda *a, orig=d.draft: (picks.append(a[3]), orig(*a))[1]
    try:
        outs = []
        for penalty in (1.0, 1.3):
            picks.clear()
            llm.reset()
            ids = llm.tokenize(PROMPTS[1])
            outs.append([list(llm.stream_tokens(ids, 16, Sampler(SamplerConfig(temperature=0.0, repeat_penalty=penalty)),
                                                mtp=mtp)) for mtp in (0, 3)])
            assert picks and all((p is None) == (penalty == 1.0) for p in picks), (penalty, picks)
        assert all(a == b for a, b in outs)
    finally:
        del d.draft


# -- sampling ---------------------------------------------------------------------------------------
def test_sampling_with_mtp_is_seeded_and_keeps_the_distribution(llms):
    llm = llms["echo-q8"]
    llm.mtp_adaptive = False
    kw = dict(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    a = llm.generate(PROMPTS[0], max_tokens=16, seed=7, mtp=3, **kw)
    b = llm.generate(PROMPTS[0], max_tokens=16, seed=7, mtp=3, **kw)
    assert a == b and llm.last_stats.mtp.accepted_total > 0
    # the first three tokens' joint distribution with and without MTP (two-sample chi-square on the
    # second and third tokens given the first, pooled)
    ids = llm.tokenize(PROMPTS[0])
    n = 150
    samples = {}
    for mtp in (0, 3):
        c = Counter()
        for s in range(n):
            sampler = Sampler(SamplerConfig(seed=1000 * mtp + s, **kw))
            list(llm.stream_tokens(ids, 3, sampler, mtp=mtp))
            c[tuple(sampler.history[len(ids):])] += 1
        samples[mtp] = c
    keys = [k for k in set(samples[0]) | set(samples[3]) if samples[0][k] + samples[3][k] >= 8]
    chi2 = sum((samples[0][k] - samples[3][k]) ** 2 / (samples[0][k] + samples[3][k]) for k in keys)
    dof = max(len(keys) - 1, 1)
    assert chi2 < dof + 4 * np.sqrt(2 * dof), (chi2, dof, samples)


# -- expert reads ---------------------------------------------------------------------------------
def test_verify_batch_reads_each_expert_once(llms):
    """A 4-token verify reads each distinct expert of a layer once: fewer bytes than 4 single steps, and
    exactly (distinct experts) x (expert size)."""
    llm = llms["wide-swa"]
    m = llm.model
    ids = llm.tokenize(PROMPTS[1])
    llm.reset()
    llm._eval_hidden(ids)
    P = llm.cache.n_past
    with ExpertReads(m.experts) as one:
        m.forward_hidden(np.array([11]), llm.cache)
    llm.cache.truncate(P)
    with ExpertReads(m.experts) as four:
        m.forward_hidden(np.array([11, 12, 13, 14]), llm.cache)
    llm.cache.truncate(P)
    singles = 0
    for t in (11, 12, 13, 14):
        with ExpertReads(m.experts) as r:
            m.forward_hidden(np.array([t]), llm.cache)
        singles += r.bytes
    llm.cache.truncate(P)
    p = m.params
    n_moe = sum(p.is_moe[:p.n_layer])
    assert one.experts == n_moe * p.n_used[0] and one.calls == n_moe
    assert one.bytes < four.bytes < singles
    assert four.experts <= n_moe * min(4 * p.n_used[0], p.n_expert)
