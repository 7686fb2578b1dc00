"""The Python API: `ggufrun.load(path)` and the LLM it returns.

    llm = ggufrun.load("smollm2-135m")              # a path, a registry name or an hf:// URL
    ids = llm.tokenize("Hello")
    logits = llm.logits(ids)                         # (len(ids), n_vocab), a fresh sequence
    print(llm.generate("Once upon a time", max_tokens=32, temperature=0))
    for piece in llm.generate("Hi", stream=True): ...

The LLM keeps one sequence in its KV cache and reuses the longest common prefix between calls, so a
chat that resends its history only evaluates the new turn.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from . import models, native
from .gguf_file import GGUFFile
from .hub import resolve
from .kv_cache import ContextFullError
from .mtp import DraftController, MTPDrafter, MTPStats, default_draft_vocab, dense, speculative_accept
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    cached_tokens: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    stop_reason: str = ""
    mtp: MTPStats | None = None   # speculative decoding with the MTP heads, when it ran

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        # the first generated token comes out of the prompt pass; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.generate_seconds if self.generate_seconds else 0.0


@dataclass
class LLM:
    path: str
    file: GGUFFile
    model: object
    tokenizer: Tokenizer
    n_ctx: int
    n_batch: int
    cache: object = None
    tokens: list[int] = field(default_factory=list)   # what the KV cache holds, in order
    last_stats: GenerationStats = field(default_factory=GenerationStats)
    expert_cache: object = None       # expert_cache.ExpertCache when loaded with a budget
    placement: object = None          # expert_cache.Plan it was sized by
    loaded_expert_stats: dict | None = None  # layer -> (counts, tokens) from --expert-stats-file
    mmproj: object = None             # vision.Encoder when loaded with an mmproj (images in prompts)

    def save_expert_stats(self, path: str | os.PathLike) -> None:
        """Save routed-expert use (what was loaded plus this session's) for a warm start next time."""
        from .expert_cache import save_stats
        experts = getattr(self.model, "experts", None)
        if experts is None or not experts.layers:
            raise ValueError(f"{self.path}: the model has no routed experts; there are no expert statistics to save")
        save_stats(path, experts, self.loaded_expert_stats)

    def close(self) -> None:
        if self.expert_cache is not None:
            self.expert_cache.close()
    mtp: int | None = None        # default draft length; None: every MTP head of the file, 0: off
    mtp_adaptive: bool = True     # let measured acceptance and step cost pick k per step (<= mtp)
    mtp_vocab: int | None = None  # drafts are ids < mtp_vocab; None: mtp.default_draft_vocab, 0: any id

    def __post_init__(self):
        self.cache = self.model.new_cache(self.n_ctx, self.n_batch)
        self._drafter: MTPDrafter | None = None
        self._draft_ctl: DraftController | None = None   # shared by generations (see DraftController)
        self._image_rows: dict[int, np.ndarray] = {}   # placeholder id (< 0) -> embedding row
        self._image_embd: dict[int, object] = {}       # image key -> ImageEmbeddings (a few, LRU)

    @property
    def mtp_heads(self) -> int:
        """MTP heads the file carries (and this runtime can draft with)."""
        return len(getattr(self.model, "nextn", ()))

    def _mtp_k(self, mtp: int | None) -> int:
        k = self.mtp if mtp is None else mtp
        k = self.mtp_heads if k is None else int(k)
        if k < 0:
            raise ValueError(f"mtp must be >= 0, not {k}")
        return min(k, self.mtp_heads, max(self.n_batch - 1, 0))

    def _mtp_drafter(self) -> MTPDrafter:
        if self._drafter is None:
            self._drafter = MTPDrafter(self.model, self.n_ctx, self.n_batch)
        n_vocab = self.model.n_vocab
        v = self.mtp_vocab
        self._drafter.draft_vocab = default_draft_vocab(n_vocab) if v is None else min(v, n_vocab) if v else n_vocab
        return self._drafter

    # -- text <-> ids -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def tokenize_with_images(self, text: str, images: Sequence = (), add_special: bool = True,
                             parse_special: bool = True) -> list[int]:
        """Token ids of a prompt with images (paths, bytes, PIL images or RGB arrays), one per
        vision.MARKER in the text (none: the images go first). Image positions hold placeholder ids
        below zero, keyed by the image's pixels; generate() and logits_with_images() take such ids.
        Each image is encoded once and kept for later prompts (a chat resends its history)."""
        from .vision import load_image
        from .vision.prompt import build, image_key, image_of
        if images and self.mmproj is None:
            raise ValueError("images need a vision projector: load with mmproj=PATH (--mmproj)")
        pairs = []
        for i, src in enumerate(images):
            what = None if isinstance(src, (str, os.PathLike)) else f"image {i + 1}"
            pixels = load_image(src, what)
            key = image_key(pixels)
            emb = self._image_embd.pop(key, None) or self.mmproj.encode_image(pixels)
            self._image_embd[key] = emb                        # most recent last
            while len(self._image_embd) > 8:
                self._image_embd.pop(next(iter(self._image_embd)))
            pairs.append((pixels, emb))
        p = build(self.tokenizer, text, pairs, add_special=add_special, parse_special=parse_special)
        self._image_rows.update(p.rows)
        # keep the rows of the images still kept (the cache of 8), not of every image ever seen
        self._image_rows = {pid: r for pid, r in self._image_rows.items() if image_of(pid) in self._image_embd}
        return p.ids

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template renders it (the file's, or a built-in)."""
        from .chat_template import for_model, render
        tk = self.tokenizer
        return render(for_model(self.file.metadata), messages, add_generation_prompt=add_generation_prompt,
                      bos_token=tk.token_text(tk.bos_id) if tk.bos_id is not None else "",
                      eos_token=tk.token_text(tk.eos_id) if tk.eos_id is not None else "")

    # -- evaluation -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []
        if self._drafter is not None:
            self._drafter.reset()

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextFullError(f"prompt of {n} tokens is longer than the context (n_ctx={self.n_ctx});"
                                   f" load with a larger n_ctx or shorten the prompt")

    def _batches(self, ids: Sequence[int], run) -> list:
        """run(chunk) on `ids` in batches of n_batch, appending each to the cached sequence; their results."""
        out = []
        for start in range(0, len(ids), self.n_batch):
            chunk = list(ids[start:start + self.n_batch])
            try:
                out.append(run(chunk))
            finally:
                # a forward interrupted midway leaves n_past where it was: keep `tokens` in step
                self.tokens = self.tokens[:self.cache.n_past] + chunk[:max(0, self.cache.n_past - len(self.tokens))]
        return out

    def _eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the cached sequence in batches of n_batch; logits of the last (or all) positions."""
        if self._drafter is not None:   # positions evaluated here get no recorded hidden state
            self._drafter.truncate(self.cache.n_past)

        def run(chunk):
            if min(chunk) < 0:   # image rows: the whole batch as embeddings, text and image together
                return self.model.forward_embd(self._embed_mixed(chunk), self.cache, all_logits=all_logits)
            return self.model.forward(np.array(chunk), self.cache, all_logits=all_logits)

        out = self._batches(ids, run)
        return np.concatenate(out) if all_logits else out[-1]

    def _embed_mixed(self, chunk: list[int]) -> np.ndarray:
        """Input embeddings of a batch holding image placeholder ids (< 0) among token ids."""
        ids = np.array(chunk, dtype=np.int64)
        img = ids < 0
        x = np.empty((len(ids), self.model.n_embd), dtype=np.float32)
        if (~img).any():
            x[~img] = self.model.embed(ids[~img])
        try:
            x[img] = np.stack([self._image_rows[int(t)] for t in ids[img]])
        except KeyError as e:
            raise ValueError(f"image placeholder id {e.args[0]} has no embedding: build prompts with images"
                             f" through tokenize_with_images()") from None
        return x

    def _eval_hidden(self, ids: Sequence[int], heads: int = 0) -> np.ndarray:
        """_eval for MTP: also records the trunk's hidden state of every position, and brings MTP heads
        0..heads-1 up to date over them, as llama.cpp's MTP path does in prompt processing: a head
        otherwise catches up over the whole prompt in the first decode step that uses it (~5 ms a
        head for 300 tokens of the trained model, a twentieth of a 128-token generation)."""
        d = self._mtp_drafter()
        d.truncate(self.cache.n_past)

        def run(chunk):
            p0 = self.cache.n_past
            h = self.model.forward_hidden(np.array(chunk), self.cache)
            d.record(p0, h)
            return h

        logits = self.model.logits(self._batches(ids, run)[-1][-1:])
        for j in range(min(heads, d.n_heads)):
            d.catch_up(j, self.tokens, d.n_hist)
        return logits

    def _prefill(self, ids: Sequence[int], mtp: int = 0) -> tuple[np.ndarray, int]:
        """Bring the cache to `ids`, reusing the common prefix; returns (last logits, reused count).
        mtp > 0: the first `mtp` MTP heads are brought up to date too."""
        self._check_fits(len(ids))
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # evaluate at least one token to get logits
        if mtp:   # the heads need the trunk's hidden states of every reused position
            common = min(common, self._mtp_drafter().n_hist)
        try:
            self.cache.truncate(common)
            self.tokens = self.tokens[:common]
        except ValueError:
            self.reset()
            common = 0
        if mtp:
            return self._eval_hidden(ids[common:], mtp), common
        return self._eval(ids[common:]), common

    def logits_with_images(self, text: str, images: Sequence, add_special: bool = True) -> np.ndarray:
        """logits() of a prompt with images (see tokenize_with_images): (n_positions, n_vocab)."""
        return self.logits(self.tokenize_with_images(text, images, add_special=add_special))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of `ids` as a fresh sequence: float32 (len(ids), n_vocab)."""
        ids = list(ids)
        if not ids:
            raise ValueError("logits() needs at least one token")
        self._check_fits(len(ids))
        self.reset()
        return self._eval(ids, all_logits=True)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, *, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                 stop: Sequence[str] = (), stream: bool = False, add_special: bool = True, mtp: int | None = None,
                 images: Sequence = ()):
        """Complete `prompt` (text or token ids). Returns the text, or with stream=True an iterator of
        text pieces as they are decoded. `mtp`: at most this many tokens drafted per step by the file's
        MTP heads (None: the LLM's default, every head; 0: off); output is unchanged by it (greedy: token
        for token; sampling: in distribution). `images`: paths, bytes, PIL images or RGB arrays, one per
        vision.MARKER in a text prompt (or all in front); needs an mmproj."""
        cfg = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, seed=seed)
        if images:
            if not isinstance(prompt, str):
                raise ValueError("images go with a text prompt (token-id prompts from tokenize_with_images"
                                 " already hold them)")
            ids = self.tokenize_with_images(prompt, images, add_special=add_special)
        else:
            ids = self.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else list(prompt)
        it = self.stream_tokens(ids, max_tokens, Sampler(cfg), stop=stop, mtp=mtp)
        return it if stream else "".join(it)

    def stream_tokens(self, ids: Sequence[int], max_tokens: int, sampler: Sampler,
                      stop: Sequence[str] = (), mtp: int | None = None) -> Iterator[str]:
        """The decode loop: yields text pieces; statistics land in `last_stats`."""
        stats = self.last_stats = GenerationStats()
        if not ids:
            raise ValueError("generation needs a non-empty prompt")
        k_max = self._mtp_k(mtp)
        if k_max and min(ids) < 0:
            k_max = 0   # the MTP heads embed the token at each position; image rows have none
        if k_max:
            stats.mtp = MTPStats(k_max)
        for t in ids[-sampler.cfg.repeat_last_n:] if sampler.cfg.repeat_last_n > 0 else ids:
            if t >= 0:   # image rows are not tokens the penalties could apply to
                sampler.history.append(t)
        t0 = time.perf_counter()
        logits, reused = self._prefill(ids, mtp=k_max)
        stats.cached_tokens = reused
        stats.prompt_tokens = len(ids) - reused
        stats.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            if k_max:
                yield from self._stream_mtp(logits, max_tokens, sampler, stop, k_max, stats)
            else:
                yield from self._text_pieces(self._plain_tokens(logits, sampler, max_tokens, stats), stats, stop)
        finally:
            stats.generate_seconds = time.perf_counter() - t1

    def _plain_tokens(self, logits, sampler, max_tokens, stats):
        """Sample a token, then evaluate it for the next logits (only if the consumer asks for more)."""
        for i in range(max_tokens):
            tok = sampler.sample(logits[-1])
            yield tok
            if i + 1 < max_tokens:
                if self.cache.n_past + 1 > self.n_ctx:
                    stats.stop_reason = "context"
                    return
                logits = self._eval([tok])

    def _text_pieces(self, tokens, stats, stop: Sequence[str]) -> Iterator[str]:
        """Tokens to streamed text: stops at end-of-generation tokens and at any `stop` string (which is
        not emitted), holds back partial UTF-8 characters; counts tokens and the stop reason."""
        decoder = self.tokenizer.stream_decoder()
        text_so_far = ""
        stats.stop_reason = "length"
        for tok in tokens:
            stats.generated_tokens += 1
            if tok in self.tokenizer.eog_ids:
                stats.stop_reason = "eos"
                break
            piece = decoder.feed(tok)
            if not piece:
                continue
            if stop:
                text_so_far += piece
                hit = next((s for s in stop if s in text_so_far), None)
                if hit is not None:
                    stats.stop_reason = "stop"
                    keep = text_so_far.index(hit) - (len(text_so_far) - len(piece))
                    if keep > 0:
                        yield piece[:keep]
                    return
            yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # -- speculative decoding with the MTP heads ----------------------------------------------------
    def _stream_mtp(self, logits, max_tokens, sampler, stop, k_max, stats) -> Iterator[str]:
        """The decode loop's text with MTP drafting as the token source, then the rollback of drafts the
        consumer did not take."""
        gen = self._mtp_tokens(logits, sampler, k_max, max_tokens, stats)
        last_pos = None

        def tokens():
            nonlocal last_pos
            for tok, pos in gen:
                last_pos = pos
                yield tok
        try:
            yield from self._text_pieces(tokens(), stats, stop)
        finally:
            gen.close()
            # accepted drafts past the last token taken are dropped: the cache ends where the plain
            # loop's would (the last generated token not evaluated)
            if last_pos is not None and self.cache.n_past > last_pos:
                self.cache.truncate(last_pos)
                self.tokens = self.tokens[:last_pos]
                self._mtp_drafter().truncate(last_pos)

    def _mtp_tokens(self, logits, sampler, k_max, max_tokens, stats):
        """Yields (token, position): draft with the heads, verify in one trunk batch, keep the accepted
        prefix and the trunk's own next token, roll back the rest."""
        if max_tokens <= 0:
            return
        d = self._mtp_drafter()
        ctl = self._draft_ctl
        if ctl is None or ctl.k_max != self.mtp_heads:
            ctl = self._draft_ctl = DraftController(self.mtp_heads)
        ctl.adaptive = self.mtp_adaptive
        ctl.start(k_max)
        greedy = sampler.cfg.temperature <= 0
        n_vocab = self.model.n_vocab
        # adaptive: the default draft vocabulary gives way to the whole one where the text leaves it
        limit = d.draft_vocab
        auto_vocab = self.mtp_adaptive and self.mtp_vocab is None and limit < n_vocab
        if auto_vocab and ctl.vocab_wide:
            d.draft_vocab = n_vocab

        def pick(lg):
            if greedy:
                return int(np.argmax(sampler.penalise(lg))), None
            cand, q = sampler.distribution(lg)
            return int(cand[sampler.rng.choice(len(cand), p=q)]), dense(cand, q, n_vocab)

        tok = sampler.sample(logits[-1])
        n_out = 1
        yield tok, self.cache.n_past
        while n_out < max_tokens:
            t0 = time.perf_counter()
            P = self.cache.n_past
            if P + 1 > self.n_ctx:
                stats.stop_reason = "context"
                return
            k = max(0, min(ctl.choose(), self.n_ctx - P - 1, max_tokens - n_out - 1))
            d.catchup_seconds = 0.0
            # greedy without penalties: the heads' arg-max, the chain in one native call
            drafts, qs = d.draft(self.tokens, tok, k, None if greedy and not sampler.penalises else pick) \
                if k else ([], [])
            batch = [tok] + drafts
            h = self.model.forward_hidden(np.array(batch), self.cache)
            self.tokens = self.tokens[:P] + batch
            d.record(P, h)
            rows = self.model.logits(h)
            out, n_acc = [], 0
            for j, dj in enumerate(drafts):
                if greedy:
                    t = sampler.sample(rows[j])
                    ok = t == dj
                else:
                    cand, p = sampler.distribution(rows[j])
                    ok, t = speculative_accept(dense(cand, p, n_vocab), qs[j], dj, sampler.rng)
                    sampler.accept(t)
                out.append(t)
                if not ok:
                    break
                n_acc += 1
            else:
                out.append(sampler.sample(rows[len(drafts)]))
            keep = P + 1 + n_acc          # id_last and the accepted drafts
            if keep < self.cache.n_past:
                self.cache.truncate(keep)
                self.tokens = self.tokens[:keep]
                d.truncate(keep)
            ctl.update(k, n_acc, time.perf_counter() - t0 - d.catchup_seconds)
            if auto_vocab:
                d.draft_vocab = n_vocab if ctl.note_tokens(out, limit) else limit
            stats.mtp.draft_vocab = d.draft_vocab if d.draft_vocab < n_vocab else None
            stats.mtp.record(k, n_acc)
            for j, t in enumerate(out):
                tok = t
                n_out += 1
                yield t, P + 1 + j
                if n_out >= max_tokens:
                    return

def load(path: str | os.PathLike | None = None, n_threads: int | None = None, n_ctx: int = DEFAULT_N_CTX,
         n_batch: int = DEFAULT_N_BATCH, *, expert_cache: int | str | None = None, mem_budget: int | str | None = None,
         expert_stats_file: str | os.PathLike | None = None, prefetch: bool = True, mlock: bool = False,
         direct_io: bool = True, mmproj: str | os.PathLike | None = None) -> LLM:
    """Open a model (path, registry name or URL; None: the default model) for inference.

    Expert placement (MoE models): `expert_cache` (bytes or a size such as "600M") keeps that many bytes
    of hot routed experts resident and reads the rest on demand; `mem_budget` derives the cache from a
    total (always-active weights, KV cache and a runtime reserve first). `expert_stats_file`, if it
    exists, seeds the cache (the most used experts are read at load); save with save_expert_stats.
    `mmproj`: a vision projector GGUF (step3vl) whose embeddings feed this model: images in prompts.
    """
    resolved = str(resolve(path))
    native.set_threads(n_threads or 0)
    f = GGUFFile(resolved)
    model = models.build(f)
    tok = Tokenizer.from_metadata(f.metadata)
    llm = LLM(path=resolved, file=f, model=model, tokenizer=tok, n_ctx=n_ctx, n_batch=n_batch)
    if mmproj is not None:
        from .gguf_file import GGUFError
        from .vision import load_mmproj
        llm.mmproj = load_mmproj(os.fspath(mmproj))
        if llm.mmproj.params.n_embd_out != model.n_embd:
            raise GGUFError(f"{mmproj}: the projector outputs {llm.mmproj.params.n_embd_out}-wide embeddings but"
                            f" {resolved} has n_embd {model.n_embd}: not this model's mmproj")
    experts = getattr(model, "experts", None)
    if expert_stats_file is not None and os.path.exists(expert_stats_file) and experts is not None and experts.layers:
        from .expert_cache import load_stats
        llm.loaded_expert_stats = load_stats(expert_stats_file, experts)
    if expert_cache is not None or mem_budget is not None:
        from .expert_cache import ExpertCache, parse_size, plan, seed_scores
        if experts is None or not experts.layers:
            raise ValueError(f"{resolved}: --expert-cache/--mem-budget place routed experts, and this model has none")
        p = plan(f, mem_budget=None if mem_budget is None else parse_size(mem_budget),
                 expert_cache=None if expert_cache is None else parse_size(expert_cache),
                 kv_bytes=llm.cache.nbytes)
        mtp_experts = getattr(model, "mtp_experts", None)
        more = [mtp_experts] if mtp_experts is not None and mtp_experts.layers else []
        cache = ExpertCache(experts, p.cache_bytes, prefetch=prefetch, mlock=mlock, direct_io=direct_io,
                            more_stores=more)
        cache.attach_prefetch(model)
        if llm.loaded_expert_stats:
            seed_scores(cache, llm.loaded_expert_stats)
            cache.warm({il: c for il, (c, _) in llm.loaded_expert_stats.items()})
        for st in cache.stores:
            st.cache = cache
        llm.expert_cache, llm.placement = cache, p
    return llm
