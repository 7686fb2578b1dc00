"""Prompts with images: where each image's embeddings go in the token sequence.

Text holds one MARKER per image (llama.cpp's mtmd default marker, so prompts are interchangeable). Each
text part is tokenized on its own without specials (BOS once, in front, if the vocabulary adds it),
and each image expands to the layout llama.cpp's mtmd uses for step3vl:

    <patch_start> crop <patch_end> ... [<patch_newline> between grid rows] <im_start> overview <im_end>

Image positions carry placeholder ids below zero, one per embedding row, derived from a hash of the
image's pixels: two prompts share a prefix only where they share the same images (so the KV cache is
never reused across different images), and `rows` maps each placeholder to its embedding.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .step3vl import ImageEmbeddings

MARKER = "<__media__>"
STEP3_TOKENS = ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")
_ROW_BITS = 24                 # rows per image < 16M


def image_key(pixels: np.ndarray) -> int:
    """A 38-bit key of an image's decoded pixels (shape included)."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return int.from_bytes(h.digest()[:5], "little") >> 2


def placeholder_ids(key: int, n: int) -> list[int]:
    base = 1 + (key << _ROW_BITS)
    return [-(base + j) for j in range(n)]


def image_of(pid: int) -> int:
    """The image key of a placeholder id."""
    return (-pid - 1) >> _ROW_BITS


@dataclass
class MultimodalPrompt:
    ids: list[int] = field(default_factory=list)        # image rows < 0
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    n_image_tokens: int = 0


def special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for t in STEP3_TOKENS:
        tid = tokenizer.token_id(t)
        if tid is None:
            raise ValueError(f"the text model's vocabulary has no {t!r} token: step3vl images need a Step3 "
                             f"text model (one whose tokenizer has {', '.join(STEP3_TOKENS)})")
        out[t] = tid
    return out


def build(tokenizer, text: str, images: list[tuple[np.ndarray, ImageEmbeddings]], add_special: bool = True,
          parse_special: bool = True) -> MultimodalPrompt:
    """`images`: (decoded pixels, embeddings) per MARKER in `text`, in order. With no MARKER in the text,
    the images go first (as llama.cpp's mtmd-cli places them)."""
    n_markers = text.count(MARKER)
    if images and n_markers == 0:
        text = MARKER * len(images) + text
        n_markers = len(images)
    if n_markers != len(images):
        raise ValueError(f"the prompt has {n_markers} image markers ({MARKER}) but {len(images)} images were given")
    sp = special_ids(tokenizer) if images else {}
    out = MultimodalPrompt()
    if add_special and tokenizer.add_bos:
        out.ids.append(tokenizer.bos_id)
    parts = text.split(MARKER)
    for i, part in enumerate(parts):
        if part:
            out.ids += tokenizer.encode(part, add_special=False, parse_special=parse_special)
        if i < len(images):
            pixels, emb = images[i]
            pids = iter(placeholder_ids(image_key(pixels), emb.n_tokens))

            def put(block: np.ndarray) -> None:
                for row in block:
                    pid = next(pids)
                    out.ids.append(pid)
                    out.rows[pid] = row
                out.n_image_tokens += len(block)

            for y in range(emb.grid_y):
                for x in range(emb.grid_x):
                    out.ids.append(sp["<patch_start>"])
                    put(emb.crops[y * emb.grid_x + x])
                    out.ids.append(sp["<patch_end>"])
                if y != emb.grid_y - 1:
                    out.ids.append(sp["<patch_newline>"])
            out.ids.append(sp["<im_start>"])
            put(emb.overview)
            out.ids.append(sp["<im_end>"])
    if add_special and tokenizer.add_eos:
        out.ids.append(tokenizer.eos_id)
    return out
