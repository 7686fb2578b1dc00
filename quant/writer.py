"""Write GGUF files (optionally split like llama.cpp's gguf-split) atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from .api import quantize, row_bytes
from .formats import get_format

_INT_RANGES = (
    (GGUFValueType.UINT32, 0, 2**32 - 1),
    (GGUFValueType.INT32, -(2**31), 2**31 - 1),
    (GGUFValueType.INT64, -(2**63), 2**63 - 1),
    (GGUFValueType.UINT64, 0, 2**64 - 1),
)


def _int_type(values: list[int]) -> GGUFValueType:
    """Narrowest of UINT32, INT32, INT64, UINT64 holding every value.

    UINT32 comes first because llama.cpp reads most integer hyperparameters
    (context_length, block_count, ...) as u32 and rejects other types."""
    lo, hi = min(values), max(values)
    for vtype, tmin, tmax in _INT_RANGES:
        if tmin <= lo and hi <= tmax:
            return vtype
    raise ValueError(f"integer metadata value out of 64-bit range: {lo}..{hi}")


def _scalar_type(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        return _int_type([int(value)])
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING
    raise ValueError(f"unsupported metadata value type {type(value).__name__}")


def _element_type(items: list) -> GGUFValueType:
    if all(isinstance(v, (list, tuple)) for v in items):
        return GGUFValueType.ARRAY
    kinds = {_scalar_type(v) for v in items}
    if kinds <= {GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64}:
        return _int_type([int(v) for v in items])
    if len(kinds) != 1:
        raise ValueError(f"mixed element types in metadata array: {sorted(k.name for k in kinds)}")
    return kinds.pop()


def _normalise(value: Any) -> Any:
    """numpy scalars/arrays -> python values so GGUFWriter can pack them."""
    if isinstance(value, np.ndarray):
        return [_normalise(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    """A value may be ``(value, GGUFValueType)`` to force its type; for a list
    the forced type is the element type (ARRAY itself means "infer")."""
    forced: GGUFValueType | None = None
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType)):
        value, forced = value
    value = _normalise(value)
    if isinstance(value, list):
        if not value:
            raise ValueError(f"metadata {key!r}: empty arrays cannot be typed")
        sub = forced if forced not in (None, GGUFValueType.ARRAY) else _element_type(value)
        writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=sub)
        return
    vtype = forced if forced is not None else _scalar_type(value)
    if vtype == GGUFValueType.ARRAY:
        raise ValueError(f"metadata {key!r}: ARRAY forced on a non-list value")
    writer.add_key_value(key, value, vtype)


def _tensor_payload(name: str, spec: tuple) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
    """-> (uint8 bytes, qtype, numpy-order shape)."""
    if len(spec) == 2:
        data, qtype = spec
        fmt = get_format(qtype)
        arr = np.asarray(data)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"tensor {name!r}: float data expected, got {arr.dtype} "
                             f"(pass (bytes, qtype, shape) for pre-quantized data)")
        if arr.ndim == 0:
            raise ValueError(f"tensor {name!r}: scalar tensors are not supported")
        try:
            raw = quantize(arr, fmt.qtype)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        return np.ascontiguousarray(raw).reshape(-1), fmt.qtype, tuple(arr.shape)
    if len(spec) == 3:
        data, qtype, shape = spec
        fmt = get_format(qtype)
        shape = tuple(int(s) for s in shape)
        raw = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(-1)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        expected = rows * row_bytes(fmt.qtype, shape[-1])
        if raw.size != expected:
            raise ValueError(f"tensor {name!r}: {raw.size} bytes given, {fmt.name} shape {shape} "
                             f"needs {expected}")
        return raw, fmt.qtype, shape
    raise ValueError(f"tensor {name!r}: expected (array, qtype) or (bytes, qtype, shape)")


def shard_paths(path: str | os.PathLike, n_shards: int) -> list[Path]:
    """llama.cpp's split naming: NAME-00001-of-00003.gguf (NAME = path minus .gguf)."""
    p = Path(path)
    if n_shards <= 1:
        return [p]
    stem = p.name[:-5] if p.name.endswith(".gguf") else p.name
    return [p.with_name(f"{stem}-{i + 1:05d}-of-{n_shards:05d}.gguf") for i in range(n_shards)]


class _TmpNamedWriter(GGUFWriter):
    """GGUFWriter that opens ``<final name>.tmp`` instead of the final names."""

    def format_shard_names(self, path: Path) -> list[Path]:
        return [Path(str(p) + ".tmp") for p in shard_paths(path, len(self.tensors))]


def write_gguf(path: str | os.PathLike, arch: str, metadata: Mapping[str, Any],
               tensors: Mapping[str, tuple], *, alignment: int = 32,
               split_max_tensors: int = 0) -> list[Path]:
    """Write a GGUF model file and return the path(s) written.

    metadata: key -> value; ints become UINT32 when they fit (else INT32,
      INT64, UINT64), floats FLOAT32, bools BOOL, str STRING, lists ARRAY
      (nested allowed; inner lists take gguf-py's element typing, int ->
      INT32). ``(value, GGUFValueType.X)`` forces the type (the element type,
      for a list). ``general.architecture`` comes from ``arch``.
    tensors: name -> ``(float array, qtype)``, quantized with
      :func:`quant.quantize`, or ``(uint8 bytes, qtype, shape)`` already
      encoded. Shapes are numpy order: (rows, cols) becomes GGUF ne=[cols, rows].
    split_max_tensors: when > 0, write NAME-0000i-of-0000K.gguf shards of at
      most that many tensors, with split.no / split.count / split.tensors.count
      as gguf-split writes them (full metadata in the first shard only).

    Each file is written to ``<name>.tmp``, fsynced, then renamed; on any error
    the temporaries are removed and no file appears at the final path(s).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    writer = _TmpNamedWriter(os.fspath(path), arch, split_max_tensors=int(split_max_tensors))
    if alignment != 32:
        writer.add_custom_alignment(alignment)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        _add_metadata(writer, key, value)
    for name, spec in tensors.items():
        raw, qtype, shape = _tensor_payload(name, spec)
        # Handed over as int8: for uint8 input GGUFWriter re-derives the shape
        # from gguf-py's size table, whose Q8_1 entry (40 bytes) is not ggml's.
        writer.add_tensor(name, raw.view(np.int8), raw_shape=shape, raw_dtype=qtype)

    final_paths = shard_paths(path, len(writer.tensors))
    tmp_paths = [Path(str(p) + ".tmp") for p in final_paths]
    try:
        writer.write_header_to_file(Path(path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        for tmp, final in zip(tmp_paths, final_paths):
            os.replace(tmp, final)
    except BaseException:
        writer.close()
        for tmp in tmp_paths:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    _fsync_dir(final_paths[0].parent)
    return final_paths


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
