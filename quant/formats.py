"""Registry of GGUF block formats and qtype name resolution.

Every format is declared exactly once, in the module of its family
(``floats``, ``legacy``, ``kquants``, ``nonlinear``), as a :class:`BlockFormat`
holding its byte layout and its reference (de)quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256

QTypeLike = Union[GGMLQuantizationType, int, str]


@dataclass(frozen=True)
class BlockFormat:
    qtype: GGMLQuantizationType
    block_size: int
    # Packed (unaligned) structured dtype of one block; field order and sizes
    # are ggml's C struct. itemsize is the type size in bytes.
    layout: np.dtype
    # (n_blocks,) array of ``layout`` -> (n_blocks, block_size) float32.
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]
    # (n_blocks, block_size) C-contiguous float32 -> (n_blocks, type_size) uint8.
    # None where no reference quantizer is implemented.
    quantize_blocks: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def type_size(self) -> int:
        return self.layout.itemsize

    @property
    def name(self) -> str:
        return self.qtype.name


FORMATS: dict[GGMLQuantizationType, BlockFormat] = {}


def register(fmt: BlockFormat) -> BlockFormat:
    if fmt.qtype in FORMATS:
        raise RuntimeError(f"block format {fmt.name} registered twice")
    FORMATS[fmt.qtype] = fmt
    return fmt


def resolve_qtype(qtype: QTypeLike) -> GGMLQuantizationType:
    """Accept a GGMLQuantizationType, its integer value, or its name
    (case-insensitive, e.g. "Q4_K"); anything else is a ValueError."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, (bool, np.bool_)):
        raise ValueError(f"unknown GGML quantization type: {qtype!r}")
    if isinstance(qtype, (int, np.integer)):
        try:
            return GGMLQuantizationType(int(qtype))
        except ValueError:
            raise ValueError(f"unknown GGML quantization type: {qtype!r}") from None
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML quantization type: {qtype!r}") from None
    raise ValueError(f"unknown GGML quantization type: {qtype!r}")


def get_format(qtype: QTypeLike) -> BlockFormat:
    t = resolve_qtype(qtype)
    fmt = FORMATS.get(t)
    if fmt is None:
        raise ValueError(f"GGML type {t.name} is not supported by quant "
                         f"(supported: {', '.join(f.name for f in FORMATS.values())})")
    return fmt
