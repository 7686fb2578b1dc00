"""GGUF files: metadata, tensor infos and zero-copy tensor views over a read-only memory map.

Opening a file costs O(metadata): the header, key/values and tensor infos are parsed, every tensor's
extent is checked against the file, and no tensor data is read. Tensor bytes are numpy views into the
mapping; the page cache decides what is resident.

The loader validates a file completely before model code touches it (shapes, types, offsets, bounds),
so model code may trust what it gets. Every problem is a GGUFError naming the file and the key or
tensor at fault.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8   # metadata arrays of arrays; deeper is corrupt, not clever

SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


class GGUFError(ValueError):
    """A GGUF file that cannot be used as it is; the message names the file and what is wrong."""


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ValueError(f"{n} elements is not a multiple of the {qtype.name} block size {block}")
    return n // block * size


@dataclass(frozen=True)
class QTensor:
    """A weight as the model code sees it: quant type, shape and the bytes, wherever they live.

    `shape` is in numpy order (slowest first): a GGUF matrix with ne = [cols, rows] has shape
    (rows, cols). Rows are contiguous and `row_bytes` long.
    """
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, read-only view

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.shape[-1])

    def dequantize(self) -> np.ndarray:
        """Float32 copy of the whole tensor. For small tensors (norms, biases) only: the point of
        this runtime is never to hold a dequantized copy of a big weight."""
        from . import native
        return native.dequantize(self.data, self.qtype).reshape(self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Bytes of rows [start, stop) of the last two dimensions flattened: a view, no copy."""
        rb = self.row_bytes
        return self.data[start * rb: stop * rb]


@dataclass
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]      # ggml order: fastest first
    offset: int              # absolute offset in its shard
    nbytes: int
    shard: int


class _Cursor:
    """Bounds-checked little-endian reader over the mapped header."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)
        self.raw = buf.obj if isinstance(buf.obj, (bytes, mmap.mmap)) else buf  # slicing mmap yields bytes

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated header: {what} needs {n} bytes at offset {self.pos},"
                            f" file has {self.size}")

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what + " (length)")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # keep the bytes recoverable (token pieces can be partial UTF-8 in some converters)
            return raw.decode("utf-8", errors="surrogateescape")


def _read_value(cur: _Cursor, vtype_raw: int, key: str, depth: int = 0) -> Any:
    try:
        vtype = GGUFValueType(vtype_raw)
    except ValueError:
        raise GGUFError(f"{cur.path}: key {key!r}: unknown metadata value type {vtype_raw}") from None
    if vtype == GGUFValueType.STRING:
        return cur.string(f"key {key!r} string value")
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return cur.unpack(fmt, struct.calcsize(fmt), f"key {key!r} value")
    # array
    if depth >= MAX_ARRAY_NESTING:
        raise GGUFError(f"{cur.path}: key {key!r}: arrays nested deeper than {MAX_ARRAY_NESTING}")
    item_raw = cur.u32(f"key {key!r} array item type")
    count = cur.u64(f"key {key!r} array length")
    try:
        item = GGUFValueType(item_raw)
    except ValueError:
        raise GGUFError(f"{cur.path}: key {key!r}: unknown array item type {item_raw}") from None
    if item in _SCALAR_DTYPES:
        dt = np.dtype(_SCALAR_DTYPES[item]).newbyteorder("<")
        cur.need(count * dt.itemsize, f"key {key!r} array of {count} {item.name}")
        arr = np.frombuffer(cur.buf, dtype=dt, count=count, offset=cur.pos).copy()
        cur.pos += count * dt.itemsize
        if item == GGUFValueType.BOOL:
            return [bool(x) for x in arr]
        return arr.tolist()
    # every element needs at least 8 bytes (a string length or an array header): reject absurd counts
    # up front rather than looping over a corrupt 2**63
    cur.need(count * 8, f"key {key!r} array of {count} {item.name}")
    if item == GGUFValueType.STRING:
        return _read_string_array(cur, count, key)
    return [_read_value(cur, item_raw, f"{key}[{i}]", depth + 1) for i in range(count)]


def _read_string_array(cur: _Cursor, count: int, key: str) -> list[str]:
    # the hot case: 50k-260k vocabulary strings; a tight loop over the buffer, not _read_value per item
    buf, pos, size = cur.buf, cur.pos, cur.size
    raw = cur.raw
    unpack = _U64.unpack_from
    out = [None] * count
    for i in range(count):
        n = unpack(buf, pos)[0] if pos + 8 <= size else -1
        end = pos + 8 + n
        if n < 0 or end > size:
            cur.pos = pos
            cur.need(8, f"key {key!r} item {i} (length)")
            cur.pos = pos + 8
            cur.need(n, f"key {key!r} item {i}")
        try:
            out[i] = raw[pos + 8:end].decode("utf-8")
        except UnicodeDecodeError:
            out[i] = raw[pos + 8:end].decode("utf-8", errors="surrogateescape")
        pos = end
    cur.pos = pos
    return out


_U64 = struct.Struct("<Q")


class _Shard:
    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise GGUFError(f"{path}: no such file") from None
        except OSError as e:
            raise GGUFError(f"{path}: cannot open: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if self.size < 24:
            os.close(self.fd)
            raise GGUFError(f"{path}: truncated header: {self.size} bytes, a GGUF header needs at least 24")
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self.map)
        self.array = np.frombuffer(self.map, dtype=np.uint8)

    def close(self) -> None:
        self.array = None
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # numpy views handed out are still alive; the mapping goes with them
        os.close(self.fd)


def _parse_shard(shard: _Shard, shard_no: int, tensors: dict[str, TensorInfo]) -> tuple[dict[str, Any], int]:
    path = shard.path
    cur = _Cursor(shard.view, path)
    magic = bytes(shard.view[0:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: unsupported GGUF version {version}, this reader supports {SUPPORTED_VERSIONS}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each kv needs >= 12 bytes and each tensor info >= 28: reject counts the file cannot hold
    if n_kv * 12 + n_tensors * 28 > shard.size:
        raise GGUFError(f"{path}: truncated header: {n_kv} metadata keys and {n_tensors} tensors"
                        f" cannot fit in {shard.size} bytes")
    metadata: dict[str, Any] = {"GGUF.version": version}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise GGUFError(f"{path}: duplicate metadata key {key!r}")
        vtype = cur.u32(f"key {key!r} value type")
        metadata[key] = _read_value(cur, vtype, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: key 'general.alignment' = {alignment!r}: expected a power of two")

    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor info #{i} name")
        n_dims = cur.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r}: {n_dims} dimensions, expected 1..{MAX_DIMS}")
        cur.need(8 * n_dims + 12, f"tensor {name!r} info")
        ne = struct.unpack_from(f"<{n_dims}Q", shard.view, cur.pos)
        cur.pos += 8 * n_dims
        qraw = cur.u32(f"tensor {name!r} type")
        rel = cur.u64(f"tensor {name!r} offset")
        try:
            qtype = GGMLQuantizationType(qraw)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r}: unknown tensor type {qraw}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFError(f"{path}: tensor {name!r}: tensor type {qtype.name} has no block layout")
        if any(d <= 0 for d in ne):
            raise GGUFError(f"{path}: tensor {name!r}: shape {list(ne)} has a non-positive dimension")
        n_el = 1
        for d in ne:
            n_el *= d
        if n_el >= 2**62:
            raise GGUFError(f"{path}: tensor {name!r}: shape {list(ne)} is too large")
        block, tsize = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise GGUFError(f"{path}: tensor {name!r}: row of {ne[0]} elements is not a multiple of the"
                            f" {qtype.name} block size {block}")
        if rel % alignment:
            raise GGUFError(f"{path}: tensor {name!r}: data offset {rel} is not aligned to {alignment}")
        if name in tensors or name in seen:
            raise GGUFError(f"{path}: duplicate tensor name {name!r}")
        seen.add(name)
        infos.append(TensorInfo(name, qtype, tuple(ne), rel, n_el // block * tsize, shard_no))

    data_start = -(-cur.pos // alignment) * alignment
    for t in infos:
        t.offset += data_start
        if t.offset + t.nbytes > shard.size:
            raise GGUFError(f"{path}: tensor {t.name!r}: data [{t.offset}, {t.offset + t.nbytes}) lies beyond"
                            f" the end of the file ({shard.size} bytes): truncated file")
        tensors[t.name] = t
    return metadata, data_start


def split_paths(path: str | os.PathLike) -> list[str]:
    """The shard paths of a split model named NAME-0000K-of-0000N.gguf, or [path] for a single file."""
    p = str(path)
    m = SPLIT_RE.match(p)
    if not m:
        return [p]
    count = int(m["count"])
    return [f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


class GGUFFile:
    """One model, possibly split over several shards, opened read-only and memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.tensor_infos: dict[str, TensorInfo] = {}
        self._shards: list[_Shard] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        first = _Shard(self.path)
        self._shards.append(first)
        self.metadata, self.data_offset = _parse_shard(first, 0, self.tensor_infos)
        count = self.metadata.get("split.count", 1)
        if count > 1:
            if self.metadata.get("split.no", 0) != 0:
                raise GGUFError(f"{self.path}: this is shard {self.metadata['split.no'] + 1} of a split model;"
                                f" open the first shard (-00001-of-{count:05d}.gguf)")
            paths = split_paths(self.path)
            if len(paths) != count:
                raise GGUFError(f"{self.path}: key 'split.count' says {count} shards but the file name does"
                                f" not follow NAME-00001-of-{count:05d}.gguf")
            for no, p in enumerate(paths[1:], start=1):
                if not os.path.exists(p):
                    raise GGUFError(f"{self.path}: missing split shard {no + 1} of {count}: {p}")
                shard = _Shard(p)
                self._shards.append(shard)
                md, _ = _parse_shard(shard, no, self.tensor_infos)
                if md.get("split.no") != no or md.get("split.count") != count:
                    raise GGUFError(f"{p}: keys split.no/split.count = {md.get('split.no')}/{md.get('split.count')},"
                                    f" expected {no}/{count}")
            expected = self.metadata.get("split.tensors.count")
            if expected is not None and expected != len(self.tensor_infos):
                raise GGUFError(f"{self.path}: key 'split.tensors.count' = {expected} but the shards hold"
                                f" {len(self.tensor_infos)} tensors")

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, types: type | tuple[type, ...] | None = None) -> Any:
        """A metadata value that must be there (and of the given python types)."""
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        v = self.metadata[key]
        if types is not None and not isinstance(v, types):
            raise GGUFError(f"{self.path}: key {key!r} = {v!r}: expected {types}")
        return v

    # -- tensors ----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensor_infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensor_infos)

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> QTensor:
        """The named tensor as a zero-copy QTensor; `shape` (numpy order) is checked if given."""
        t = self.tensor_infos.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        np_shape = tuple(reversed(t.ne))
        if shape is not None:
            want = tuple(shape)
            # trailing unit dimensions are not stored consistently by converters
            if np_shape != want and tuple(d for d in np_shape if d != 1) != tuple(d for d in want if d != 1):
                raise GGUFError(f"{self.path}: tensor {name!r} has shape {list(np_shape)}, expected {list(want)}")
            np_shape = want
        data = self._shards[t.shard].array[t.offset:t.offset + t.nbytes]
        return QTensor(name, t.qtype, np_shape, data)

    def maybe_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> QTensor | None:
        return self.tensor(name, shape) if name in self.tensor_infos else None

    @property
    def file_size(self) -> int:
        return sum(s.size for s in self._shards)

    def close(self) -> None:
        for s in self._shards:
            s.close()
        self._shards = []

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(Path(path))
