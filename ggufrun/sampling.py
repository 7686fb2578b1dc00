"""Token sampling, in llama.cpp's default order: penalties, top-k, top-p, min-p, temperature, draw.

Greedy (temperature <= 0) takes the arg-max of the penalised logits. A seed makes a run reproducible.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None

    def with_(self, **kw) -> "SamplerConfig":
        return replace(self, **kw)


GREEDY = SamplerConfig(temperature=0.0)


@dataclass
class Sampler:
    cfg: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.cfg.seed)
        self.history: list[int] = []

    def accept(self, token: int) -> None:
        self.history.append(token)

    @property
    def penalises(self) -> bool:
        """Whether penalise() can change logits (repetition, presence or frequency penalties are on)."""
        c = self.cfg
        return c.repeat_last_n != 0 and (c.repeat_penalty != 1.0 or bool(c.presence_penalty) or
                                         bool(c.frequency_penalty))

    def penalise(self, logits: np.ndarray) -> np.ndarray:
        c = self.cfg
        if not self.penalises or not self.history:
            return logits
        recent = self.history[-c.repeat_last_n:] if c.repeat_last_n > 0 else self.history
        counts = Counter(recent)
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float32)
        out = logits.copy()
        sel = out[ids]
        sel = np.where(sel <= 0, sel * c.repeat_penalty, sel / c.repeat_penalty)
        sel -= n * c.frequency_penalty + np.float32(c.presence_penalty)
        out[ids] = sel
        return out

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids and their probabilities after the filter chain (temperature > 0)."""
        c = self.cfg
        x = self.penalise(np.asarray(logits, dtype=np.float32))
        ids = np.arange(len(x))
        if 0 < c.top_k < len(x):
            ids = np.argpartition(-x, c.top_k - 1)[:c.top_k]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        vals = x[ids].astype(np.float64)
        p = np.exp(vals - vals[0])
        p /= p.sum()
        if c.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            ids, vals = ids[:keep], vals[:keep]
            p = p[:keep] / p[:keep].sum()
        if c.min_p > 0.0:
            keep = p >= c.min_p * p[0]
            ids, vals = ids[keep], vals[keep]
        z = vals / c.temperature
        p = np.exp(z - z[0])
        return ids, p / p.sum()

    def sample(self, logits: np.ndarray) -> int:
        if self.cfg.temperature <= 0:
            tok = int(np.argmax(self.penalise(np.asarray(logits, dtype=np.float32))))
        else:
            ids, p = self.distribution(logits)
            tok = int(ids[self.rng.choice(len(ids), p=p)])
        self.accept(tok)
        return tok
