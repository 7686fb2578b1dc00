"""Reference GGUF block formats: layouts, dequantizers, llama.cpp-exact quantizers.

Public API::

    quant.dequantize(data, qtype) -> float32 array
    quant.quantize(x, qtype)      -> uint8 array
    quant.block_size(qtype), quant.type_size(qtype), quant.row_bytes(qtype, n)
    quant.write_gguf(path, arch, metadata, tensors, *, alignment=32, split_max_tensors=0)

``qtype`` is a gguf.GGMLQuantizationType, its int value, or its name ("Q4_K").
"""

from . import floats, legacy, kquants, nonlinear  # noqa: F401  (registers the formats)
from .api import block_size, dequantize, quantizable_types, quantize, row_bytes, type_size
from .formats import FORMATS, BlockFormat, get_format, resolve_qtype
from .writer import write_gguf

__all__ = [
    "FORMATS",
    "BlockFormat",
    "block_size",
    "dequantize",
    "get_format",
    "quantizable_types",
    "quantize",
    "resolve_qtype",
    "row_bytes",
    "type_size",
    "write_gguf",
]
