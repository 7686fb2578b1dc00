"""Plain float element types: F32, F16, BF16 (block size 1)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .formats import BlockFormat, register


def _dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks["v"].astype(np.float32, copy=True).reshape(-1, 1)


def _quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1, 4)


def _dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks["v"].astype(np.float32).reshape(-1, 1)


def _quantize_f16(x: np.ndarray) -> np.ndarray:
    # numpy's float32->float16 cast is round-to-nearest-even (overflow -> inf), like ggml's.
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks["v"].astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(-1, 1)


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaNs forced quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).ravel()
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = ((u.astype(np.uint64) + (np.uint64(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16))
    quiet_nan = (u >> np.uint32(16)) | np.uint32(64)
    bits = np.where(is_nan, quiet_nan, rounded).astype(np.uint16)
    return bits.view(np.uint8).reshape(-1, 2)


F32_FORMAT = register(BlockFormat(T.F32, 1, np.dtype([("v", "<f4")]), _dequantize_f32, _quantize_f32))
F16_FORMAT = register(BlockFormat(T.F16, 1, np.dtype([("v", "<f2")]), _dequantize_f16, _quantize_f16))
BF16_FORMAT = register(BlockFormat(T.BF16, 1, np.dtype([("v", "<u2")]), _dequantize_bf16, _quantize_bf16))
