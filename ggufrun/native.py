"""Binding to the native kernel library (native/build/libggufrun.so) through cffi's ABI mode.

Python decides, C computes: every argument is checked here (types, sizes, contiguity) before a raw
pointer crosses the boundary, so the C side never reads or writes out of bounds. Buffers are passed
zero-copy with ``ffi.from_buffer``; the library keeps no pointer after a call returns.

cffi releases the GIL for the duration of each C call, so other Python threads keep running while a
matmul executes. The library serialises its own entry points with a mutex: concurrent calls from
several threads are safe but run one after another, each using the whole thread pool.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
from cffi import FFI
from gguf import GGMLQuantizationType

_REPO = Path(__file__).resolve().parent.parent
_NATIVE_DIR = _REPO / "native"
_LIB_PATH = _NATIVE_DIR / "build" / "libggufrun.so"

_ISA_NAMES = ("scalar", "avx2", "avx512", "neon")
# ggufrun.h's return codes
GR_E_QTYPE, GR_E_SHAPE, GR_E_ISA, GR_E_NOMEM, GR_E_ARG = -1, -2, -3, -4, -5
_ERRORS = {GR_E_QTYPE: "quant type not supported", GR_E_SHAPE: "bad shape or size",
           GR_E_ISA: "ISA path not available", GR_E_NOMEM: "out of memory for the activation scratch buffer",
           GR_E_ARG: "argument out of range"}
ACT_PRECISIONS = (1, 2)

# Types with native kernels; gguf's enum names them.
SUPPORTED_TYPES = tuple(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"))
# Activation formats gr_quantize_activations produces.
ACTIVATION_TYPES = tuple(GGMLQuantizationType[n] for n in ("F16", "BF16", "Q8_0", "Q8_1", "Q8_K"))


def _header_cdefs() -> str:
    """cffi declarations from native/ggufrun.h itself, so the header stays the one contract: its
    prototypes, and its integer #defines (cffi accepts `#define NAME 123`)."""
    text = re.sub(r"/\*.*?\*/", " ", (_NATIVE_DIR / "ggufrun.h").read_text(), flags=re.S)
    decls = []
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"#define\s+(GR_\w+)\s+(-?\d+)\s*$", s)
        if m:
            decls.append(f"#define {m.group(1)} {m.group(2)}")
        elif s and not s.startswith("#"):
            decls.append(s)
    return "\n".join(decls)


def _sources_newer_than_library() -> bool:
    if not _LIB_PATH.exists():
        return True
    built = _LIB_PATH.stat().st_mtime
    for p in _NATIVE_DIR.iterdir():
        if p.suffix in (".c", ".h", ".inc") or p.name == "Makefile":
            if p.stat().st_mtime > built:
                return True
    return False


_load_lock = threading.Lock()
_ffi = FFI()
_lib = None


def _build() -> None:
    cmd = ["make", "-C", str(_NATIVE_DIR)]
    try:
        # an advisory lock so two processes importing at once do not run make over each other
        (_NATIVE_DIR / "build").mkdir(exist_ok=True)
        with open(_NATIVE_DIR / "build" / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot build the native library: `{' '.join(cmd)}` failed ({e})") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the native library failed: `{' '.join(cmd)}` exited with {proc.returncode}\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def _load():
    """The loaded library; builds it first (once) when missing or older than its sources."""
    global _lib
    if _lib is not None:
        return _lib
    with _load_lock:
        if _lib is None:
            if _sources_newer_than_library():
                _build()
            _ffi.cdef(_header_cdefs())
            lib = _ffi.dlopen(str(_LIB_PATH))
            env = os.environ.get("GGUFRUN_ACT_PRECISION", "").strip()
            if env:
                if env not in ("1", "2"):
                    raise ValueError(f"GGUFRUN_ACT_PRECISION must be 1 or 2, got {env!r}")
                lib.gr_set_act_precision(int(env))
            _lib = lib
    return _lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def qtype_of(qtype) -> GGMLQuantizationType:
    """A GGMLQuantizationType from the enum, its integer value, or its name ("Q4_K", "q4_k")."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        try:
            return GGMLQuantizationType(int(qtype))
        except ValueError:
            raise ValueError(f"unknown ggml quant type number {int(qtype)}") from None
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml quant type name {qtype!r}") from None
    raise TypeError(f"quant type must be a GGMLQuantizationType, int or str, not {type(qtype).__name__}")


def _supported(qtype) -> GGMLQuantizationType:
    t = qtype_of(qtype)
    if t not in SUPPORTED_TYPES:
        raise ValueError(f"quant type {t.name} has no native kernels (supported: "
                         f"{', '.join(s.name for s in SUPPORTED_TYPES)})")
    return t


def _with_geometry(qtype) -> GGMLQuantizationType:
    """Weight types and the activation-only formats (Q8_1, Q8_K) both have a known block geometry."""
    t = qtype_of(qtype)
    return t if t in ACTIVATION_TYPES else _supported(t)


def block_size(qtype) -> int:
    """Elements per block (1 for F32/F16/BF16)."""
    return int(_load().gr_block_size(int(_with_geometry(qtype))))


def type_size(qtype) -> int:
    """Bytes per block."""
    return int(_load().gr_type_size(int(_with_geometry(qtype))))


def row_bytes(qtype, n: int) -> int:
    bs, ts = block_size(qtype), type_size(qtype)
    if n % bs:
        raise ValueError(f"{qtype_of(qtype).name}: {n} elements is not a multiple of the block size {bs}")
    return n // bs * ts


_RAW_DTYPES = {
    GGMLQuantizationType.F32: (np.float32,),
    GGMLQuantizationType.F16: (np.float16,),
    GGMLQuantizationType.BF16: (np.uint16, np.int16),
}


def _byte_buffer(data, qtype: GGMLQuantizationType, what: str):
    """A read-only cffi view of data's bytes, and its length; data is not copied."""
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.uint8, np.int8) and data.dtype.type not in _RAW_DTYPES.get(qtype, ()):
            raise TypeError(f"{what}: expected uint8 bytes of {qtype.name} blocks"
                            + (f" or a {_RAW_DTYPES[qtype][0].__name__} array" if qtype in _RAW_DTYPES else "")
                            + f", got a {data.dtype} array")
        if not data.flags.c_contiguous:
            raise ValueError(f"{what}: array must be C-contiguous (use np.ascontiguousarray)")
        return _ffi.from_buffer("uint8_t[]", data), data.nbytes
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise ValueError(f"{what}: buffer must be contiguous")
        return _ffi.from_buffer("uint8_t[]", mv), mv.nbytes
    raise TypeError(f"{what}: expected bytes, bytearray, memoryview or a numpy array, got {type(data).__name__}")


def dequantize(data, qtype) -> np.ndarray:
    """All elements of data (whole blocks of qtype) as a 1-D float32 array, bit-exact with
    gguf.quants.dequantize."""
    lib = _load()
    t = _supported(qtype)
    buf, nbytes = _byte_buffer(data, t, "dequantize data")
    ts, bs = type_size(t), block_size(t)
    if nbytes == 0 or nbytes % ts:
        raise ValueError(f"dequantize: {nbytes} bytes is not a positive multiple of the {t.name} "
                         f"block size ({ts} bytes)")
    n = nbytes // ts * bs
    out = np.empty(n, dtype=np.float32)
    _check(lib.gr_dequantize(int(t), buf, _ffi.from_buffer("float[]", out), n), f"dequantize {t.name}")
    return out


def vec_dot_type(qtype) -> GGMLQuantizationType:
    """The activation format matmul quantizes x to for weights of qtype (ggml's vec_dot_type)."""
    t = _supported(qtype)
    return GGMLQuantizationType(_load().gr_vec_dot_type(int(t)))


def _activation_input(x, act_qtype, what: str):
    """The checks both activation quantizers make: (lib, format, float32 x, bytes of one term)."""
    lib = _load()
    t = qtype_of(act_qtype)
    if t not in ACTIVATION_TYPES:
        raise ValueError(f"activation format must be one of {', '.join(a.name for a in ACTIVATION_TYPES)}, "
                         f"not {t.name}")
    x = _float32_input(x, f"{what} x")
    bs, ts = lib.gr_block_size(int(t)), lib.gr_type_size(int(t))
    if x.size == 0 or x.size % bs:
        raise ValueError(f"{what}: {x.size} elements is not a positive multiple of {bs}")
    return lib, t, x, x.size // bs * ts


def quantize_activations(x: np.ndarray, act_qtype) -> np.ndarray:
    """x (float32, size a multiple of the format's block size) in activation format act_qtype (F16,
    BF16, Q8_0, Q8_1, Q8_K) as uint8 bytes: exactly what matmul feeds its dot products."""
    lib, t, x, nbytes = _activation_input(x, act_qtype, "quantize_activations")
    out = np.empty(nbytes, dtype=np.uint8)
    _check(lib.gr_quantize_activations(int(t), _ffi.from_buffer("float[]", x), _ffi.from_buffer("uint8_t[]", out),
                                       x.size), f"quantize_activations {t.name}")
    return out


def quantize_activation_terms(x: np.ndarray, act_qtype) -> tuple[np.ndarray, np.ndarray]:
    """The two terms matmul feeds its dot products at act precision 2, as uint8 bytes of act_qtype
    blocks: q1 = quantize_activations(x), and q2 = the same format's quantization of the residual
    x - dequantize(q1) (for Q8_1 with s values completing the exact sum of both terms)."""
    lib, t, x, nbytes = _activation_input(x, act_qtype, "quantize_activation_terms")
    out = np.empty(2 * nbytes, dtype=np.uint8)
    _check(lib.gr_quantize_activation_terms(int(t), _ffi.from_buffer("float[]", x),
                                            _ffi.from_buffer("uint8_t[]", out), x.size),
           f"quantize_activation_terms {t.name}")
    half = out.size // 2
    return out[:half], out[half:]


def _float32_input(x, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{what}: expected dtype float32, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{what}: array must be C-contiguous (use np.ascontiguousarray)")
    return x


def matmul(w_bytes, qtype, rows: int, cols: int, x: np.ndarray, out: np.ndarray | None = None,
           row_stride: int | None = None) -> np.ndarray:
    """y = x @ W.T for a quantized weight W of shape (rows, cols) stored row-major in w_bytes.

    x: float32 (n, cols) -> returns (n, rows); x of shape (cols,) -> returns (rows,).
    Activations are quantized the way ggml's CPU backend pairs them with qtype, and the dot products
    are integer where ggml's are. At act precision 1 the result matches llama.cpp to float rounding; at
    2 (the default) the activations carry a second, residual term and their error is ~100x smaller
    (see set_act_precision).
    row_stride: bytes between weight rows (default: packed rows). out: optional float32 C-contiguous
    array of the result's shape, written in place and returned.
    """
    lib = _load()
    t = _supported(qtype)
    rows, cols = int(rows), int(cols)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"matmul: rows and cols must be positive, got rows={rows} cols={cols}")
    rb = row_bytes(t, cols)
    stride = rb if row_stride is None else int(row_stride)
    if stride < rb:
        raise ValueError(f"matmul: row_stride {stride} is less than the {rb} bytes of a {t.name} row of {cols}")
    wbuf, nbytes = _byte_buffer(w_bytes, t, "matmul weights")
    need = (rows - 1) * stride + rb
    if nbytes < need:
        raise ValueError(f"matmul: weights hold {nbytes} bytes, a {rows}x{cols} {t.name} matrix with row "
                         f"stride {stride} needs {need}")
    x = _float32_input(x, "matmul x")
    if x.ndim == 1:
        if x.shape[0] != cols:
            raise ValueError(f"matmul: x has {x.shape[0]} elements, expected cols={cols}")
        n_tok, out_shape = 1, (rows,)
    elif x.ndim == 2:
        if x.shape[1] != cols:
            raise ValueError(f"matmul: x has shape {x.shape}, expected (n, {cols})")
        n_tok, out_shape = x.shape[0], (x.shape[0], rows)
    else:
        raise ValueError(f"matmul: x must be 1-D (cols,) or 2-D (n, cols), got shape {x.shape}")
    if out is None:
        out = np.empty(out_shape, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32:
            raise TypeError("matmul: out must be a float32 numpy array")
        if out.shape != out_shape:
            raise ValueError(f"matmul: out has shape {out.shape}, expected {out_shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("matmul: out must be C-contiguous and writeable")
    if n_tok == 0:
        return out
    _check(lib.gr_matmul(int(t), wbuf, rows, cols, stride, _ffi.from_buffer("float[]", x), n_tok,
                         _ffi.from_buffer("float[]", out)), f"matmul {t.name}")
    return out


def set_act_precision(p: int) -> None:
    """How many terms carry matmul activations (process-wide):

    1: one term (the default), quantized exactly as llama.cpp's CPU backend does (Q8_0/Q8_1/Q8_K/F16/BF16),
       so results match llama.cpp to float rounding, including its activation quantization error.
    2: two terms: the residual x - q1 of the first quantization is quantized again and
       both are multiplied through the same integer kernels in one pass over the weights; the
       activation error is ~100x smaller for twice the integer work.

    The environment variable GGUFRUN_ACT_PRECISION=1|2 sets it when the library loads.
    """
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or int(p) not in ACT_PRECISIONS:
        raise ValueError(f"act precision must be 1 or 2, got {p!r}")
    _check(_load().gr_set_act_precision(int(p)), "set_act_precision")


def get_act_precision() -> int:
    return int(_load().gr_get_act_precision())


@contextlib.contextmanager
def act_precision(p: int) -> Iterator[int]:
    """Temporarily run matmuls at act precision p (1 or 2); restores the previous setting on exit."""
    previous = get_act_precision()
    set_act_precision(p)
    try:
        yield p
    finally:
        set_act_precision(previous)


def set_threads(n: int) -> int:
    """Size the worker pool (n <= 0: one thread per physical core). Returns the count in effect."""
    return int(_load().gr_threads_set(int(n)))


def get_threads() -> int:
    return int(_load().gr_threads_get())


def available_isas() -> list[str]:
    """ISA paths this CPU and build support, best last (always starts with "scalar")."""
    mask = _load().gr_isa_available()
    return [name for i, name in enumerate(_ISA_NAMES) if mask & (1 << i)]


def isa() -> str:
    """The ISA path in use."""
    return _ISA_NAMES[_load().gr_isa_get()]


def _set_isa(name: str) -> None:
    if name not in _ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; known: {', '.join(_ISA_NAMES)}")
    if _load().gr_isa_set(_ISA_NAMES.index(name)) != 0:
        raise ValueError(f"ISA {name!r} is not available on this CPU/build (available: {', '.join(available_isas())})")


class force_isa(contextlib.AbstractContextManager):
    """Pin the kernel path: ``force_isa("scalar")`` switches immediately; used as a context manager it
    restores the previous path on exit."""

    def __init__(self, name: str):
        self._previous = isa()
        _set_isa(name)

    def __exit__(self, *exc) -> None:
        _set_isa(self._previous)


def best_isa() -> str:
    return available_isas()[-1]


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Temporarily run with n threads."""
    previous = get_threads()
    try:
        yield set_threads(n)
    finally:
        set_threads(previous)


@contextlib.contextmanager
def token_split(on: bool) -> Iterator[bool]:
    """Temporarily allow (True, the default) or forbid the token split: a batch of 2-4 rows through a
    small layer runs as whole rows per pool thread (native/dispatch.c); the bits are the same either way."""
    previous = bool(_load().gr_set_token_split(int(bool(on))))
    try:
        yield bool(on)
    finally:
        _load().gr_set_token_split(int(previous))


def spin_us(us: int | None = None) -> int:
    """How long (microseconds) an idle pool thread spins before it sleeps; sets it when us is given
    (GGUFRUN_SPIN_US sets the start value). Returns the value before the call."""
    return int(_load().gr_pool_spin_us(-1 if us is None else max(0, int(us))))


if os.environ.get("GGUFRUN_NATIVE_EAGER"):
    _load()
