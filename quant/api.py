"""Public entry points: dequantize, quantize and the size helpers."""

from __future__ import annotations

import numpy as np

from .formats import BlockFormat, QTypeLike, get_format


def block_size(qtype: QTypeLike) -> int:
    """Elements per block (1 for F32/F16/BF16)."""
    return get_format(qtype).block_size


def type_size(qtype: QTypeLike) -> int:
    """Bytes per block, as ggml's ggml_type_size (Q8_1 is 36 bytes, not
    gguf-py's stale 40)."""
    return get_format(qtype).type_size


def row_bytes(qtype: QTypeLike, n: int) -> int:
    """Bytes taken by ``n`` consecutive elements (ggml_row_size)."""
    fmt = get_format(qtype)
    _check_multiple(fmt, int(n))
    return int(n) // fmt.block_size * fmt.type_size


def _check_multiple(fmt: BlockFormat, n: int) -> None:
    if n % fmt.block_size != 0:
        raise ValueError(f"{fmt.name}: element count {n} is not a multiple of the block size {fmt.block_size}")


def _as_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return data.view(np.uint8) if data.dtype != np.uint8 else data
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def dequantize(data, qtype: QTypeLike) -> np.ndarray:
    """Decode GGUF tensor bytes to float32.

    ``data`` is bytes, a memoryview or a numpy array (viewed as uint8). A 1-D
    input gives a 1-D float32 array of all elements. An N-D uint8 input is
    treated as rows of bytes: the last axis (bytes per row) becomes elements
    per row, like gguf.quants.dequantize. The result never aliases ``data``.
    """
    fmt = get_format(qtype)
    raw = _as_bytes(data)
    lead = raw.shape[:-1] if raw.ndim > 1 else ()
    nbytes = raw.shape[-1] if raw.ndim else 0
    if nbytes % fmt.type_size != 0:
        raise ValueError(f"{fmt.name}: {nbytes} bytes per row is not a multiple of the "
                         f"type size {fmt.type_size}")
    blocks = np.ascontiguousarray(raw).reshape(-1).view(fmt.layout)
    # inf/NaN scales must decode exactly like ggml (inf*0 -> NaN), silently.
    with np.errstate(all="ignore"):
        values = fmt.dequantize_blocks(blocks).astype(np.float32, copy=False)
    return values.reshape(*lead, nbytes // fmt.type_size * fmt.block_size)


def quantize(x, qtype: QTypeLike) -> np.ndarray:
    """Encode float data with llama.cpp's reference quantizer (no importance
    matrix) and return uint8 bytes.

    The last axis holds the elements of a row and must be a multiple of the
    block size; it becomes bytes per row (so a 1-D input gives 1-D bytes).
    Input is converted to float32 first.
    """
    fmt = get_format(qtype)
    if fmt.quantize_blocks is None:
        raise ValueError(f"{fmt.name}: no reference quantizer implemented")
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    n = arr.shape[-1]
    _check_multiple(fmt, n)
    blocks = np.ascontiguousarray(arr).reshape(-1, fmt.block_size)
    out = fmt.quantize_blocks(blocks)
    return out.reshape(*arr.shape[:-1], n // fmt.block_size * fmt.type_size)


def quantizable_types() -> list:
    """Types for which :func:`quantize` is available."""
    from .formats import FORMATS
    return [t for t, f in FORMATS.items() if f.quantize_blocks is not None]
