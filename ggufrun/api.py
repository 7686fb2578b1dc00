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

    def __post_init__(self):
        self.cache = self.model.new_cache(self.n_ctx, self.n_batch)

    # -- text <-> ids -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

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

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextFullError(f"prompt of {n} tokens is longer than the context (n_ctx={self.n_ctx});"
                                   f" load with a larger n_ctx or shorten the prompt")

    def _eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the cached sequence in batches of n_batch; logits of the last (or all) positions."""
        out = []
        for start in range(0, len(ids), self.n_batch):
            chunk = list(ids[start:start + self.n_batch])
            try:
                out.append(self.model.forward(np.array(chunk), self.cache, all_logits=all_logits))
            finally:
                # a forward interrupted midway leaves n_past where it was: keep `tokens` in step
                self.tokens = self.tokens[:self.cache.n_past] + chunk[:max(0, self.cache.n_past - len(self.tokens))]
        return np.concatenate(out) if all_logits else out[-1]

    def _prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to `ids`, reusing the common prefix; returns (last logits, reused count)."""
        self._check_fits(len(ids))
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # evaluate at least one token to get logits
        try:
            self.cache.truncate(common)
            self.tokens = self.tokens[:common]
        except ValueError:
            self.reset()
            common = 0
        return self._eval(ids[common:]), common

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
                 stop: Sequence[str] = (), stream: bool = False, add_special: bool = True):
        """Complete `prompt` (text or token ids). Returns the text, or with stream=True an iterator of
        text pieces as they are decoded."""
        cfg = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, seed=seed)
        ids = self.tokenize(prompt, add_special=add_special) if isinstance(prompt, str) else list(prompt)
        it = self.stream_tokens(ids, max_tokens, Sampler(cfg), stop=stop)
        return it if stream else "".join(it)

    def stream_tokens(self, ids: Sequence[int], max_tokens: int, sampler: Sampler,
                      stop: Sequence[str] = ()) -> Iterator[str]:
        """The decode loop: yields text pieces; statistics land in `last_stats`."""
        stats = self.last_stats = GenerationStats()
        if not ids:
            raise ValueError("generation needs a non-empty prompt")
        for t in ids[-sampler.cfg.repeat_last_n:] if sampler.cfg.repeat_last_n > 0 else ids:
            sampler.history.append(t)
        t0 = time.perf_counter()
        logits, reused = self._prefill(ids)
        stats.cached_tokens = reused
        stats.prompt_tokens = len(ids) - reused
        stats.prompt_seconds = time.perf_counter() - t0
        decoder = self.tokenizer.stream_decoder()
        text_so_far = ""
        t1 = time.perf_counter()
        stats.stop_reason = "length"
        try:
            for i in range(max_tokens):
                tok = sampler.sample(logits[-1])
                stats.generated_tokens += 1
                if tok in self.tokenizer.eog_ids:
                    stats.stop_reason = "eos"
                    break
                piece = decoder.feed(tok)
                if piece:
                    if stop:
                        text_so_far += piece
                        hit = next((s for s in stop if s in text_so_far), None)
                        if hit is not None:
                            stats.stop_reason = "stop"
                            keep = text_so_far.index(hit) - (len(text_so_far) - len(piece))
                            if keep > 0:
                                yield piece[:keep]
                            break
                    yield piece
                if i + 1 < max_tokens:
                    if self.cache.n_past + 1 > self.n_ctx:
                        stats.stop_reason = "context"
                        break
                    logits = self._eval([tok])
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            stats.generate_seconds = time.perf_counter() - t1


def load(path: str | os.PathLike | None = None, n_threads: int | None = None, n_ctx: int = DEFAULT_N_CTX,
         n_batch: int = DEFAULT_N_BATCH) -> LLM:
    """Open a model (path, registry name or URL; None: the default model) for inference."""
    resolved = str(resolve(path))
    native.set_threads(n_threads or 0)
    f = GGUFFile(resolved)
    model = models.build(f)
    tok = Tokenizer.from_metadata(f.metadata)
    return LLM(path=resolved, file=f, model=model, tokenizer=tok, n_ctx=n_ctx, n_batch=n_batch)
