"""Native kernel library: dequantization, activation quantization and matmul against references.

- dequantize: bit-exact with gguf.quants.dequantize on random raw blocks (random bytes give huge,
  subnormal, zero, inf and NaN fp16 scales). NaN positions must agree; every other element must have
  identical bits (so -0.0 vs 0.0 counts as a difference).
- activation quantization (Q8_0/Q8_1/Q8_K/F16/BF16): bit-exact with numpy re-implementations of
  ggml's x86 CPU backend, written here from its semantics.
- matmul: against a float64 reference built from the dequantized weights and the activations after a
  quantize->dequantize round trip through the weight type's Q8 partner. The only differences left are
  float32 rounding of per-block scale products and of the running sums, so the tolerance is
  RTOL * sum(|w|*|x|), with the offset terms of Q4_1/Q5_1/Q2_K/Q4_K/Q5_K counted separately because
  the kernels add them as a separate product that can be larger than the weight itself.
  These run at act precision 1 (llama.cpp's numerics; the autouse fixture sets it).
- act precision 2 (two-term activations): the same round-trip check with both terms rebuilt in numpy,
  and the error against the exact float64 product of the dequantized weights with the unquantized
  activations, which must be at least 100x below act precision 1's.
- prefill tiles and decode kernels (gemv): a batch must agree with one token at a time and with the
  references, bit for bit with any other batch containing the same token, for any thread count; the
  AVX-512 VNNI variant runs under an exact AVX2 emulation of vpdpbusd where the CPU lacks it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ggufrun import native

ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K,
             T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4]
ISAS = ["scalar", "avx2", "avx512", "neon"]
AVAILABLE = native.available_isas()
SIMD_ISAS = [i for i in ISAS if i != "scalar"]

# Float32 rounding of block-scale products and of the running sums, relative to the magnitude of the
# summed terms. Measured worst case over all types and paths at 4096 columns is about 1e-7 (a couple of
# float32 ulps); 2e-6 leaves a 20x margin for other shapes and summation orders and is still far below
# the >1e-3 error that a wrong block, scale, nibble or offset produces.
RTOL = 2e-6

# Byte offsets of the fp16 scale fields (set to sane values for matmul tests) and of the quant bytes
# (zeroed to isolate the offset term of types with minimums), per block.
SCALE_OFFSETS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
                 T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}
QUANT_RANGES = {T.Q4_1: [(4, 20)], T.Q5_1: [(4, 24)], T.Q2_K: [(16, 80)], T.Q4_K: [(16, 144)],
                T.Q5_K: [(16, 176)]}


def skip_unless(isa):
    if isa not in AVAILABLE:
        pytest.skip(f"{isa} path not available on this CPU/build (have {AVAILABLE})")


@pytest.fixture(autouse=True)
def restore_isa_threads_and_precision():
    """Every test starts at act precision 1 (llama.cpp's numerics); the two-term tests opt in to 2."""
    isa, threads, precision = native.isa(), native.get_threads(), native.get_act_precision()
    native.set_act_precision(1)
    yield
    native.force_isa(isa)
    native.set_threads(threads)
    native.set_act_precision(precision)


def raw_blocks(qtype, n_blocks, rng):
    return rng.integers(0, 256, size=n_blocks * native.type_size(qtype), dtype=np.uint8)


def sane_blocks(qtype, n_elems, rng):
    """Random valid blocks whose scales are moderate, so matmul results are finite and meaningful."""
    if qtype == T.F32:
        return rng.standard_normal(n_elems).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal(n_elems).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        return gq.quantize(rng.standard_normal(n_elems).astype(np.float32), T.BF16).view(np.uint8).ravel()
    ts = native.type_size(qtype)
    nb = n_elems // native.block_size(qtype)
    blocks = raw_blocks(qtype, nb, rng).reshape(nb, ts)
    if qtype == T.MXFP4:
        blocks[:, 0] = rng.integers(118, 128, size=nb)  # E8M0 exponents around 2^-6 .. 2^0
    else:
        for off in SCALE_OFFSETS[qtype]:
            scales = (rng.uniform(0.2, 1.0, size=nb) * rng.choice([-1, 1], size=nb) / 64).astype(np.float16)
            blocks[:, off:off + 2] = scales.view(np.uint8).reshape(nb, 2)
    return blocks.ravel()


def reference_dequantize(data, qtype):
    with np.errstate(all="ignore"):
        return np.asarray(gq.dequantize(data, qtype), dtype=np.float32).ravel()


def assert_same_floats(got, want):
    assert got.shape == want.shape
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), f"NaN positions differ at {np.flatnonzero(nan_got != nan_want)[:8]}"
    g, w = got[~nan_got].view(np.uint32), want[~nan_want].view(np.uint32)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, f"{bad.size} elements differ, first at {bad[:4]}: {got[~nan_got][bad[:4]]} vs {want[~nan_want][bad[:4]]}"


# ------------------------------------------------------------------------------------------ dequantize

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_bit_exact_on_random_raw_blocks(qtype, isa):
    skip_unless(isa)
    native.force_isa(isa)
    rng = np.random.default_rng(int(qtype) * 7 + ISAS.index(isa))
    n_blocks = 4096 if native.block_size(qtype) == 1 else (96 if native.block_size(qtype) == 256 else 512)
    data = raw_blocks(qtype, n_blocks, rng)
    assert_same_floats(native.dequantize(data, qtype), reference_dequantize(data, qtype))


def test_dequantize_accepts_bytes_memoryview_names_and_numbers():
    rng = np.random.default_rng(1)
    data = sane_blocks(T.Q4_K, 512, rng)
    want = reference_dequantize(data, T.Q4_K)
    for buf in (data, data.tobytes(), memoryview(data.tobytes()), bytearray(data.tobytes())):
        for qt in (T.Q4_K, int(T.Q4_K), "Q4_K", "q4_k"):
            assert_same_floats(native.dequantize(buf, qt), want)
    two_d = data.reshape(2, -1)  # rows of a table, as embed lookups pass them
    assert_same_floats(native.dequantize(two_d, T.Q4_K), want)


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        native.dequantize(np.zeros(143, np.uint8), T.Q4_K)
    with pytest.raises(ValueError, match="multiple"):
        native.dequantize(np.zeros(0, np.uint8), T.Q4_0)
    with pytest.raises(ValueError, match="no native kernels"):
        native.dequantize(np.zeros(66, np.uint8), T.IQ2_XXS)
    with pytest.raises(ValueError, match="unknown"):
        native.dequantize(np.zeros(18, np.uint8), "Q4_9")
    with pytest.raises(TypeError, match="uint8"):
        native.dequantize(np.zeros(8, np.float32), T.Q4_0)
    with pytest.raises(ValueError, match="contiguous"):
        native.dequantize(np.zeros(72, np.uint8)[::2], T.Q4_0)
    with pytest.raises(TypeError):
        native.dequantize([1, 2, 3], T.Q4_0)


# ---------------------------------------------------------------- activation formats (numpy references)

def ref_q8_0(x):
    """ggml x86 quantize_row_q8_0: d = amax/127 as fp16, codes round_even(x * (127/amax))."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv).astype(np.int8)
    return d.astype(np.float16), d, q


def ref_q8_0_bytes(x):
    d16, _, q = ref_q8_0(x)
    return np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1).ravel()


def ref_q8_1_bytes(x):
    d16, d, q = ref_q8_0(x)
    s = (d * q.astype(np.int32).sum(axis=1, keepdims=True).astype(np.float32)).astype(np.float16)
    return np.concatenate([d16.view(np.uint8), s.view(np.uint8), q.view(np.uint8)], axis=1).ravel()


def ref_q8_k(x):
    """ggml quantize_row_q8_K_ref: iscale = -127/max(signed value of largest |x|), codes
    min(127, round_even(iscale*x)), d = 1/iscale as float32, bsums over 16."""
    b = x.reshape(-1, 256).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(len(b)), idx][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        q = np.minimum(127, np.rint(iscale * b)).astype(np.int8)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return d, q


def ref_q8_k_bytes(x):
    d, q = ref_q8_k(x)
    bsums = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1).ravel()


ACT_REFS = {
    T.Q8_0: ref_q8_0_bytes,
    T.Q8_1: ref_q8_1_bytes,
    T.Q8_K: ref_q8_k_bytes,
    T.F16: lambda x: x.astype(np.float16).view(np.uint8),
    T.BF16: lambda x: gq.quantize(x, T.BF16).view(np.uint8).ravel(),
}


def activation_samples(rng, n):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, size=n))).astype(np.float32)
    x[:256] = 0.0                                          # an all-zero block
    x[256:512] = rng.integers(-3, 4, size=256) * 0.5       # exact halves: rounding ties
    x[512:768] = rng.standard_normal(256).astype(np.float32) * 1e-30  # tiny values
    return x


@pytest.mark.parametrize("act", list(ACT_REFS), ids=lambda t: t.name)
@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_bit_exact(act, isa):
    skip_unless(isa)
    native.force_isa(isa)
    x = activation_samples(np.random.default_rng(int(act)), 4096)
    got, want = native.quantize_activations(x, act), ACT_REFS[act](x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} bytes differ, first at {bad[:8]}"


def test_vec_dot_types_follow_ggml():
    expect = {T.F32: T.F32, T.F16: T.F16, T.BF16: T.BF16, T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0,
              T.IQ4_NL: T.Q8_0, T.MXFP4: T.Q8_0, T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1}
    for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
        expect[t] = T.Q8_K
    assert {t: native.vec_dot_type(t) for t in ALL_TYPES} == expect


# ------------------------------------------------------------------------------------------- matmul

def roundtrip_activations(x, act):
    """x as the kernels see it after quantization, in float64; plus Q8_1's per-block s values."""
    if act == T.F32:
        return x.astype(np.float64), None
    if act == T.F16:
        return x.astype(np.float16).astype(np.float64), None
    if act == T.BF16:
        return gq.dequantize(gq.quantize(x, T.BF16), T.BF16).astype(np.float64).reshape(x.shape), None
    if act in (T.Q8_0, T.Q8_1):
        d16, d, q = ref_q8_0(x.ravel())
        xq = (d16.astype(np.float64) * q).reshape(x.shape)
        s = (d * q.astype(np.int32).sum(axis=1, keepdims=True).astype(np.float32)).astype(np.float16)
        return xq, s.astype(np.float64).reshape(x.shape[0], -1)
    d, q = ref_q8_k(x.ravel())
    return (d.astype(np.float64) * q).reshape(x.shape), None


def offset_terms(w_bytes, qtype, rows, cols):
    """Per-element offset part of the dequantized weights (m of Q4_1/Q5_1, -dmin*m of K-quants), found
    by dequantizing a copy with the quant bits zeroed. None for types without one."""
    if qtype not in QUANT_RANGES:
        return None
    ts = native.type_size(qtype)
    b = w_bytes.reshape(-1, ts).copy()
    for lo, hi in QUANT_RANGES[qtype]:
        b[:, lo:hi] = 0
    return reference_dequantize(b.ravel(), qtype).astype(np.float64).reshape(rows, cols)


def reference_matmul(w_bytes, qtype, rows, cols, x):
    """float64 y and the magnitude of its summed terms (for the tolerance)."""
    w = reference_dequantize(w_bytes, qtype).astype(np.float64).reshape(rows, cols)
    act = native.vec_dot_type(qtype)
    xq, s = roundtrip_activations(x, act)
    off = offset_terms(w_bytes, qtype, rows, cols)
    if act == T.Q8_1:
        # the kernels add m * s per block with s = fp16(d * sum(q)) rather than m * sum(d16 * q)
        m = off.reshape(rows, cols // 32, 32)[:, :, 0]
        y = xq @ (w - off).T + s @ m.T
    else:
        y = xq @ w.T
    mag = np.abs(xq) @ np.abs(w).T
    if off is not None:
        mag += 2 * (np.abs(xq) @ np.abs(off).T)
    return y, mag


def check_matmul(qtype, rows, cols, n_tok, rng, isa=None):
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    if isa:
        native.force_isa(isa)
    y = native.matmul(w, qtype, rows, cols, x)
    ref, mag = reference_matmul(w, qtype, rows, cols, x)
    err = np.abs(y - ref)
    worst = np.unravel_index(np.argmax(err / (mag + 1e-30)), err.shape)
    assert np.all(err <= RTOL * mag + 1e-30), (
        f"{qtype.name} {rows}x{cols} n={n_tok}: y={y[worst]} ref={ref[worst]} mag={mag[worst]}")
    return w, x, y


def cols_for(qtype):
    """A multiple of 256, and for 32-element blocks also one that is not."""
    bs = native.block_size(qtype)
    return [512, 352] if bs in (1, 32) else [512]


MATMUL_CASES = [(t, c) for t in ALL_TYPES for c in cols_for(t)]


@pytest.mark.parametrize("qtype,cols", MATMUL_CASES, ids=[f"{t.name}-{c}" for t, c in MATMUL_CASES])
@pytest.mark.parametrize("isa", ISAS)
def test_matmul_matches_float64_reference(qtype, cols, isa):
    skip_unless(isa)
    rng = np.random.default_rng(int(qtype) * 1000 + cols)
    for n_tok in (1, 3, 17):
        check_matmul(qtype, 37, cols, n_tok, rng, isa=isa)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_simd_matmul_matches_scalar(qtype, isa):
    """Same integer sums, different float summation order: equal to RTOL of the term magnitude."""
    skip_unless(isa)
    rng = np.random.default_rng(int(qtype) + 99)
    rows, cols = 19, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    with native.force_isa("scalar"):
        y_scalar = native.matmul(w, qtype, rows, cols, x)
    with native.force_isa(isa):
        y_simd = native.matmul(w, qtype, rows, cols, x)
    _, mag = reference_matmul(w, qtype, rows, cols, x)
    assert np.all(np.abs(y_simd - y_scalar) <= RTOL * mag)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.Q6_K, T.F16])
def test_thread_count_does_not_change_results(qtype):
    rng = np.random.default_rng(5)
    rows, cols = 301, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((17, cols)).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        assert native.set_threads(n) == n
        assert native.get_threads() == n
        results.append(native.matmul(w, qtype, rows, cols, x))
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_pool_spin_setting_reads_and_sets():
    """native.spin_us: how long an idle pool thread spins before sleeping (1000 us unless GGUFRUN_SPIN_US
    says otherwise), read without changing it, set at run time, the previous value returned."""
    import os
    old = native.spin_us()
    if "GGUFRUN_SPIN_US" not in os.environ:
        assert old == 1000
    try:
        assert native.spin_us(250) == old
        assert native.spin_us() == 250
        assert native.spin_us(-5) == 250 and native.spin_us() == 0   # negative: do not spin
        m = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
        x = np.ones((1, 256), np.float32)
        assert np.allclose(native.matmul(m.tobytes(), T.F32, 64, 256, x)[0], m.sum(1), rtol=1e-4, atol=1e-4)
    finally:
        native.spin_us(old)


def test_concurrent_calls_from_python_threads_are_serialised_and_correct():
    """cffi releases the GIL, so several Python threads can be inside the library at once; each call
    must still see the whole pool and its own activations (decode, prefill and F16 paths)."""
    import threading
    rng = np.random.default_rng(8)
    cases = []
    for qtype, n_tok in ((T.Q4_K, 1), (T.Q4_0, 9), (T.F16, 3), (T.Q4_1, 33)):
        w = sane_blocks(qtype, 64 * 512, rng)
        x = rng.standard_normal((n_tok, 512)).astype(np.float32)
        cases.append((qtype, w, x, native.matmul(w, qtype, 64, 512, x)))
    native.set_threads(2)
    failures = []

    def worker(i):
        for r in range(40):
            qtype, w, x, want = cases[(i + r) % len(cases)]
            if not np.array_equal(native.matmul(w, qtype, 64, 512, x), want):
                failures.append((i, r, qtype.name))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_matmul_vector_shapes_out_and_row_stride():
    rng = np.random.default_rng(11)
    rows, cols, qtype = 23, 256, T.Q4_K
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    y1 = native.matmul(w, qtype, rows, cols, x)
    assert y1.shape == (rows,)
    y2 = native.matmul(w, qtype, rows, cols, x[None, :])
    assert y2.shape == (1, rows) and np.array_equal(y1, y2[0])
    out = np.full((1, rows), np.nan, np.float32)
    assert native.matmul(w, qtype, rows, cols, x[None, :], out=out) is out and np.array_equal(out, y2)
    # rows padded to a larger stride, padding filled with garbage the kernel must not read
    rb = native.row_bytes(qtype, cols)
    padded = np.full((rows, rb + 40), 0xff, np.uint8)
    padded[:, :rb] = w.reshape(rows, rb)
    y3 = native.matmul(padded, qtype, rows, cols, x, row_stride=rb + 40)
    assert np.array_equal(y1, y3)
    # the last row needs only rb bytes, not a full stride
    y4 = native.matmul(padded.ravel()[:(rows - 1) * (rb + 40) + rb], qtype, rows, cols, x, row_stride=rb + 40)
    assert np.array_equal(y1, y4)


def test_matmul_rejects_bad_arguments():
    rows, cols, qtype = 4, 256, T.Q8_0
    w = np.zeros(rows * native.row_bytes(qtype, cols), np.uint8)
    x = np.zeros((2, cols), np.float32)
    with pytest.raises(ValueError, match="needs"):
        native.matmul(w[:-1], qtype, rows, cols, x)
    with pytest.raises(ValueError, match="multiple"):
        native.matmul(w, qtype, rows, cols - 16, x[:, :-16])
    with pytest.raises(ValueError, match="expected"):
        native.matmul(w, qtype, rows, cols, np.zeros((2, cols + 32), np.float32))
    with pytest.raises(TypeError, match="float32"):
        native.matmul(w, qtype, rows, cols, x.astype(np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.matmul(w, qtype, rows, cols, np.zeros((cols, 2), np.float32).T)
    with pytest.raises(ValueError, match="row_stride"):
        native.matmul(w, qtype, rows, cols, x, row_stride=10)
    with pytest.raises(ValueError, match="out"):
        native.matmul(w, qtype, rows, cols, x, out=np.zeros((2, rows + 1), np.float32))
    with pytest.raises(TypeError, match="out"):
        native.matmul(w, qtype, rows, cols, x, out=np.zeros((2, rows), np.float64))
    with pytest.raises(ValueError, match="positive"):
        native.matmul(w, qtype, 0, cols, x)
    with pytest.raises(ValueError, match="no native kernels"):
        native.matmul(w, T.Q8_K, rows, cols, x)
    with pytest.raises(ValueError, match="1-D"):
        native.matmul(w, qtype, rows, cols, np.zeros((1, 2, cols), np.float32))


def test_isa_selection():
    assert AVAILABLE[0] == "scalar"
    assert native.isa() in AVAILABLE
    with native.force_isa("scalar"):
        assert native.isa() == "scalar"
    assert native.isa() == AVAILABLE[-1]
    missing = [i for i in ISAS if i not in AVAILABLE]
    for name in missing:
        with pytest.raises(ValueError, match="not available"):
            native.force_isa(name)
    with pytest.raises(ValueError, match="unknown ISA"):
        native.force_isa("sse9")


# ----------------------------------------------------------------- tiled prefill (n_tok > 1) path

TILED_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# the last column count of each is above the driver's column chunk (4096): partial sums over chunks
TILED_CASES = [(t, c) for t in TILED_TYPES for c in ([352, 1024, 4448] if native.block_size(t) == 32 else [256, 1280, 4608])]


@pytest.mark.parametrize("qtype,cols", TILED_CASES, ids=[f"{t.name}-{c}" for t, c in TILED_CASES])
@pytest.mark.parametrize("precision", [1, 2])
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_tiled_matmul_matches_the_per_token_path(qtype, cols, precision, isa):
    """Several tokens go through the register-tiled kernels (8-row panels x activation-row tiles); one
    token at a time through the decode kernels (gemv). Rows and tokens that fill no whole tile, padded row strides
    and both precisions must agree to float rounding, and a token's result must not depend on which
    other tokens share its batch (bit for bit: each output comes from one tile lane). Batches of up to
    4 tokens take the decode kernels, several tokens a call, and give the one-at-a-time bits exactly
    (what makes an MTP verify lossless)."""
    skip_unless(isa)
    native.force_isa(isa)
    native.set_act_precision(precision)
    rng = np.random.default_rng(int(qtype) * 100 + cols + precision)
    rows = 45  # 5 full panels and one of 5 rows
    rb = native.row_bytes(qtype, cols)
    w = sane_blocks(qtype, rows * cols, rng)
    padded = np.full((rows, rb + 18), 0xff, np.uint8)  # an odd stride, filled with garbage
    padded[:, :rb] = w.reshape(rows, rb)
    x = rng.standard_normal((19, cols)).astype(np.float32)
    x[:, :2] *= 25
    y = native.matmul(padded, qtype, rows, cols, x, row_stride=rb + 18)
    per_token = np.stack([native.matmul(w, qtype, rows, cols, x[t]) for t in range(len(x))])
    ref, mag = (reference_matmul_two_terms if precision == 2 else reference_matmul)(w, qtype, rows, cols, x)
    assert np.all(np.abs(y - per_token) <= RTOL * mag), f"worst {np.max(np.abs(y - per_token) / mag):.2e}"
    assert np.all(np.abs(y - ref) <= RTOL * mag), f"worst vs reference {np.max(np.abs(y - ref) / mag):.2e}"
    for n in (5, 11):
        assert np.array_equal(native.matmul(w, qtype, rows, cols, x[:n]), y[:n]), f"first {n} tokens differ"
    assert np.array_equal(native.matmul(w, qtype, rows, cols, x[7:]), y[7:])
    for n in (2, 3, 4):
        few = native.matmul(padded, qtype, rows, cols, x[3:3 + n], row_stride=rb + 18)
        assert np.array_equal(few, per_token[3:3 + n]), f"a batch of {n} differs from one token at a time"


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K])
@pytest.mark.parametrize("precision", [1, 2])
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_decode_rows_in_groups_give_each_row_alone(qtype, precision, isa):
    """A decode product takes narrow rows four at a time (gemv_rows) so their fixed costs and
    accumulation chains are shared; each row's result must be the bits it gets alone (a one-row matrix),
    whatever group, chunk, thread or batch took it: rows 1 to 9 blocks wide (9: past the four-row
    width), a count that leaves a remainder, a padded stride, 1 and 2 threads, batches of 1 to 4 tokens."""
    skip_unless(isa)
    native.force_isa(isa)
    native.set_act_precision(precision)
    rng = np.random.default_rng(int(qtype) + 10 * precision)
    bs = native.block_size(qtype)
    for nb in ((1, 2, 3, 6, 9) if bs == 32 else (1, 2)):
        cols, rows = nb * bs, 23
        rb = native.row_bytes(qtype, cols)
        w = sane_blocks(qtype, rows * cols, rng).reshape(rows, rb)
        padded = np.full((rows, rb + 6), 0xff, np.uint8)
        padded[:, :rb] = w
        x = rng.standard_normal((4, cols)).astype(np.float32)
        alone = np.stack([np.concatenate([native.matmul(w[r], qtype, 1, cols, x[t:t + 1])[0] for r in range(rows)])
                          for t in range(4)])
        reference = reference_matmul_two_terms if precision == 2 else reference_matmul
        ref, mag = reference(w.reshape(-1), qtype, rows, cols, x)
        assert np.all(np.abs(alone - ref) <= RTOL * mag)
        for threads in (1, 2):
            native.set_threads(threads)
            for n in (1, 2, 3, 4):
                got = native.matmul(padded, qtype, rows, cols, x[:n], row_stride=rb + 6)
                assert np.array_equal(got, alone[:n]), f"{nb} blocks, {threads} threads, {n} tokens"


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_K])
def test_tiled_matmul_large_batches_and_thread_counts(qtype):
    """Enough tokens and columns for several activation ranges per matmul (the driver splits them to fit
    cache), with results independent of the thread count."""
    rng = np.random.default_rng(int(qtype) + 3)
    rows, cols, n_tok = 67, 6144, 200
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    for precision in (1, 2):
        native.set_act_precision(precision)
        results = []
        for n in (1, 2, 3):
            native.set_threads(n)
            results.append(native.matmul(w, qtype, rows, cols, x))
        assert all(np.array_equal(results[0], r) for r in results[1:])
        ref, mag = (reference_matmul_two_terms if precision == 2 else reference_matmul)(w, qtype, rows, cols, x)
        assert np.all(np.abs(results[0] - ref) <= RTOL * mag)


# ------------------------------------------------------------- act precision 2 (two-term activations)

def residual_terms(x, act):
    """The two activation terms gr_matmul builds at act precision 2, rebuilt in numpy: the float64
    values of q1 and q2 (q2 = the same format's quantization of x - deq(q1), in float32 as the C code
    computes it), and for Q8_1 the per-block s1 + s2, with s2 = fp16(sum(deq(q1) + deq(q2)) - s1)."""
    x = x.astype(np.float32)
    if act == T.F32:  # never quantized: one exact term
        return x.astype(np.float64), np.zeros(x.shape), None
    if act == T.F16:
        d1 = x.astype(np.float16).astype(np.float32)
    elif act == T.BF16:
        d1 = gq.dequantize(gq.quantize(x, T.BF16), T.BF16).astype(np.float32).reshape(x.shape)
    elif act in (T.Q8_0, T.Q8_1):
        d16, _, q = ref_q8_0(x.ravel())
        d1 = (d16.astype(np.float32) * q.astype(np.float32)).reshape(x.shape)
    else:
        d, q = ref_q8_k(x.ravel())
        d1 = (d * q.astype(np.float32)).reshape(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.where(np.isfinite(d1), x - d1, np.float32(0)).astype(np.float32)
    xq1, s1 = roundtrip_activations(x, act)
    xq2, _ = roundtrip_activations(r, act)
    s = None
    if act == T.Q8_1:
        sums = (xq1 + xq2).reshape(x.shape[0], -1, 32).sum(axis=2)
        s2 = (sums - s1).astype(np.float32).astype(np.float16).astype(np.float64)
        s = s1 + s2
    return xq1, xq2, s


def reference_matmul_two_terms(w_bytes, qtype, rows, cols, x):
    w = reference_dequantize(w_bytes, qtype).astype(np.float64).reshape(rows, cols)
    act = native.vec_dot_type(qtype)
    xq1, xq2, s = residual_terms(x, act)
    off = offset_terms(w_bytes, qtype, rows, cols)
    if act == T.Q8_1:
        m = off.reshape(rows, cols // 32, 32)[:, :, 0]
        y = (xq1 + xq2) @ (w - off).T + s @ m.T
    else:
        y = (xq1 + xq2) @ w.T
    mag = (np.abs(xq1) + np.abs(xq2)) @ np.abs(w).T
    if off is not None:
        mag += 2 * (np.abs(xq1) + np.abs(xq2)) @ np.abs(off).T
    return y, mag


def residual_bytes(x, act):
    """q2's bytes, from numpy: the float32 residual x - deq(q1) as the C code computes it (0 where
    deq(q1) is not finite), quantized by the same reference; Q8_1's s replaced by fp16(d1*sum(q1) +
    d2*sum(q2) - s1)."""
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        q1 = ACT_REFS[act](x)
    if act in (T.F16, T.BF16):
        deq = gq.dequantize(q1.view(np.uint8), act).astype(np.float32).ravel()
    elif act in (T.Q8_0, T.Q8_1):
        bs = 34 if act == T.Q8_0 else 36
        b = q1.reshape(-1, bs)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        deq = (d * b[:, bs - 32:].view(np.int8).astype(np.float32)).ravel()
    else:
        b = q1.reshape(-1, 292)
        d = b[:, :4].copy().view(np.float32)
        deq = (d * b[:, 4:260].view(np.int8).astype(np.float32)).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.where(np.isfinite(deq), x - deq, np.float32(0)).astype(np.float32)
        r = np.where(np.abs(r) <= np.finfo(np.float32).max, r, np.float32(0)).astype(np.float32)
    with np.errstate(over="ignore"):
        q2 = ACT_REFS[act](r)
    if act == T.Q8_1:
        b1, b2 = q1.reshape(-1, 36), q2.reshape(-1, 36).copy()
        d1 = b1[:, :2].copy().view(np.float16).astype(np.float64)
        d2 = b2[:, :2].copy().view(np.float16).astype(np.float64)
        s1 = b1[:, 2:4].copy().view(np.float16).astype(np.float64)
        total = d1 * b1[:, 4:].view(np.int8).sum(axis=1, keepdims=True) + d2 * b2[:, 4:].view(np.int8).sum(axis=1, keepdims=True)
        s2 = np.where(np.isfinite(s1), (total - s1).astype(np.float32).astype(np.float16), np.float16(0))
        b2[:, 2:4] = s2.view(np.uint8)
        q2 = b2.ravel()
    return q1, q2


@pytest.mark.parametrize("act", list(ACT_REFS), ids=lambda t: t.name)
@pytest.mark.parametrize("isa", ISAS)
def test_activation_terms_bit_exact(act, isa):
    skip_unless(isa)
    native.force_isa(isa)
    x = activation_samples(np.random.default_rng(int(act) + 40), 4096)
    if act == T.Q8_K:
        x[:256] = 1.0  # ggml leaves an all-zero Q8_K block's bsums unwritten; keep the reference simple
    x[1024:1056] = 70000.0  # F16 overflows to inf: a zero residual, not inf - inf
    with np.errstate(over="ignore"):
        got1, got2 = native.quantize_activation_terms(x, act)
    want1, want2 = residual_bytes(x, act)
    assert np.array_equal(got1, native.quantize_activations(x, act))
    for got, want, name in ((got1, want1, "q1"), (got2, want2, "q2")):
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"{name}: {bad.size} bytes differ, first at {bad[:8]}"


@pytest.mark.parametrize("qtype,cols", MATMUL_CASES, ids=[f"{t.name}-{c}" for t, c in MATMUL_CASES])
@pytest.mark.parametrize("isa", ISAS)
def test_two_term_matmul_matches_its_float64_reference(qtype, cols, isa):
    """Act precision 2 computes exactly W.q1 + W.q2 with the residual term defined above."""
    skip_unless(isa)
    rng = np.random.default_rng(int(qtype) * 1000 + cols + 7)
    native.force_isa(isa)
    native.set_act_precision(2)
    for n_tok in (1, 3, 17):
        w = sane_blocks(qtype, 37 * cols, rng)
        x = rng.standard_normal((n_tok, cols)).astype(np.float32)
        x[:, :3] *= 40  # a few outlier channels, as real activations have
        y = native.matmul(w, qtype, 37, cols, x)
        ref, mag = reference_matmul_two_terms(w, qtype, 37, cols, x)
        err = np.abs(y - ref)
        assert np.all(err <= RTOL * mag + 1e-30), f"worst {np.max(err / mag):.2e} (n_tok {n_tok})"


def error_against_exact(w, qtype, rows, cols, x):
    """max over outputs of |y - exact| / sum|w||x|, exact = float64 dequantized W times unquantized x."""
    wd = reference_dequantize(w, qtype).astype(np.float64).reshape(rows, cols)
    exact = x.astype(np.float64) @ wd.T
    mag = np.abs(x.astype(np.float64)) @ np.abs(wd).T
    return float(np.max(np.abs(native.matmul(w, qtype, rows, cols, x) - exact) / mag))


# Measured worst output (31 rows x 8 tokens, 1024 columns), as a fraction of sum|w||x|:
#   Gaussian activations: precision 1 3.3e-5 (F16), 2.2e-4 (BF16), 7e-4..1.8e-3 (Q8 formats);
#                         precision 2 2.6e-8 (F16), 3.0e-7 (BF16), 2.7e-6..5.4e-6 (Q8 formats).
#   6 outlier channels x30: precision 1 7.2e-5 (F16) .. 1.2e-2 (K-quants, whose 256-element Q8_K blocks
#                         share one scale with the outlier); precision 2 9.4e-8 .. 7.1e-5.
# The ratio is 148..1285 per type (Q8 formats ~250); the bounds below leave 2.8x margin.
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("outliers", [False, True], ids=["gauss", "outliers"])
def test_two_terms_are_100x_closer_to_the_exact_product(qtype, outliers):
    rng = np.random.default_rng(int(qtype) + 500 * outliers)
    rows, cols = 31, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((8, cols)).astype(np.float32)
    if outliers:
        x[:, rng.choice(cols, 6, replace=False)] *= 30
    with native.act_precision(1):
        err1 = error_against_exact(w, qtype, rows, cols, x)
    with native.act_precision(2):
        err2 = error_against_exact(w, qtype, rows, cols, x)
    if qtype == T.F32:  # F32 activations are never quantized: both are float32 rounding only
        assert err1 == err2 and err2 < RTOL
        return
    assert err1 > 1e-5, f"precision 1 suspiciously exact ({err1:.2e}): are activations quantized?"
    assert err2 * 100 <= err1, f"precision 2 error {err2:.2e} is not 100x below precision 1's {err1:.2e}"
    assert err2 < (2e-4 if outliers else 1.5e-5)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_two_terms_on_quantized_weights_and_shifted_activations(qtype):
    """Real quantized weights (Q4_1's m is then about -8 d, the case where the offset term m * s
    dominates) and activations with a nonzero mean: both terms' s must add up to the dequantized sum,
    or precision 2 gains only 3-8x here instead of 100x+."""
    rng = np.random.default_rng(int(qtype) + 77)
    rows, cols = 64, 1024
    w = gq.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype).view(np.uint8).ravel()
    x = (rng.standard_normal((8, cols)) + 1.0).astype(np.float32)
    with native.act_precision(1):
        err1 = error_against_exact(w, qtype, rows, cols, x)
    with native.act_precision(2):
        err2 = error_against_exact(w, qtype, rows, cols, x)
    assert err2 * 100 <= err1, f"precision 2 error {err2:.2e} vs precision 1 {err1:.2e}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_two_term_simd_matmul_matches_scalar(qtype, isa):
    skip_unless(isa)
    rng = np.random.default_rng(int(qtype) + 199)
    rows, cols = 19, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    native.set_act_precision(2)
    with native.force_isa("scalar"):
        y_scalar = native.matmul(w, qtype, rows, cols, x)
    with native.force_isa(isa):
        y_simd = native.matmul(w, qtype, rows, cols, x)
    _, mag = reference_matmul_two_terms(w, qtype, rows, cols, x)
    assert np.all(np.abs(y_simd - y_scalar) <= RTOL * mag)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K, T.BF16])
def test_two_term_results_do_not_depend_on_thread_count(qtype):
    rng = np.random.default_rng(6)
    rows, cols = 301, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((17, cols)).astype(np.float32)
    native.set_act_precision(2)
    results = []
    for n in (1, 2):
        native.set_threads(n)
        results.append(native.matmul(w, qtype, rows, cols, x))
    assert np.array_equal(results[0], results[1])


def test_act_precision_setting():
    assert native.get_act_precision() == 1  # set by the autouse fixture
    native.set_act_precision(2)
    assert native.get_act_precision() == 2
    with native.act_precision(1) as p:
        assert p == 1 and native.get_act_precision() == 1
    assert native.get_act_precision() == 2
    with pytest.raises(RuntimeError):
        with native.act_precision(1):
            raise RuntimeError("restored even on error")
    assert native.get_act_precision() == 2
    for bad in (0, 3, -1, True, 1.0, "2", None):
        with pytest.raises(ValueError, match="1 or 2"):
            native.set_act_precision(bad)
    assert native.get_act_precision() == 2
    assert native._load().gr_set_act_precision(3) == native._load().GR_E_ARG
    # precision changes results only where activations are quantized
    rng = np.random.default_rng(3)
    w, x = sane_blocks(T.Q4_K, 8 * 256, rng), rng.standard_normal((2, 256)).astype(np.float32)
    y2 = native.matmul(w, T.Q4_K, 8, 256, x)
    with native.act_precision(1):
        assert not np.array_equal(native.matmul(w, T.Q4_K, 8, 256, x), y2)
    wf = sane_blocks(T.F32, 8 * 256, rng)
    with native.act_precision(1):
        yf1 = native.matmul(wf, T.F32, 8, 256, x)
    assert np.array_equal(native.matmul(wf, T.F32, 8, 256, x), yf1)


def test_act_precision_default_and_environment_variable():
    code = "from ggufrun import native; print(native.get_act_precision())"
    repo = str(Path(__file__).resolve().parent.parent)
    def run(value):
        env = {k: v for k, v in os.environ.items() if k != "GGUFRUN_ACT_PRECISION"}
        if value is not None:
            env["GGUFRUN_ACT_PRECISION"] = value
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
    assert run(None).stdout.strip() == "1"
    assert run("2").stdout.strip() == "2"
    assert run("1").stdout.strip() == "1"
    assert run(" 2 ").stdout.strip() == "2"
    bad = run("3")
    assert bad.returncode != 0 and "GGUFRUN_ACT_PRECISION must be 1 or 2" in bad.stderr


# --------------------------------------------------- llama.cpp's own CPU kernels as the oracle

def _ggml_cpu_library():
    """llama.cpp's libggml-cpu from the installed llama_cpp package (or $GGUFRUN_GGML_CPU_LIB)."""
    path = os.environ.get("GGUFRUN_GGML_CPU_LIB")
    if not path:
        try:
            import llama_cpp
        except ImportError:
            pytest.skip("llama_cpp (the oracle) is not installed; scripts/build_oracle.sh installs it")
        found = sorted(Path(llama_cpp.__file__).parent.rglob("libggml-cpu*.so*"))
        if not found:
            pytest.skip("llama_cpp has no libggml-cpu shared library")
        path = str(found[0])
    from cffi import FFI
    ffi = FFI()
    ffi.cdef("""
        typedef void (*ggml_from_float_t)(const float *x, void *y, int64_t k);
        typedef void (*ggml_vec_dot_t)(int n, float *s, size_t bs, const void *x, size_t bx,
                                       const void *y, size_t by, int nrc);
        struct ggml_type_traits_cpu { ggml_from_float_t from_float; ggml_vec_dot_t vec_dot;
                                      int vec_dot_type; int64_t nrows; };
        const struct ggml_type_traits_cpu *ggml_get_type_traits_cpu(int type);
        void ggml_cpu_init(void);
    """)
    # RTLD_GLOBAL so libggml-cpu resolves libggml-base from its own directory's already-loaded copy
    base = sorted(Path(path).parent.glob("libggml-base.so*"))
    keep = [ffi.dlopen(str(base[0]), ffi.RTLD_GLOBAL)] if base else []
    lib = ffi.dlopen(path)
    lib.ggml_cpu_init()
    return ffi, lib, keep


@pytest.fixture(scope="module")
def ggml_cpu():
    return _ggml_cpu_library()


@pytest.mark.parametrize("act", [T.Q8_0, T.Q8_1, T.Q8_K, T.F16, T.BF16], ids=lambda t: t.name)
def test_activation_quantization_matches_llama_cpp(ggml_cpu, act):
    ffi, lib, _ = ggml_cpu
    rng = np.random.default_rng(int(act) + 7)
    # no all-zero Q8_K block: ggml leaves its bsums unwritten there
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-6, 6, size=4096))).astype(np.float32)
    x[256:512] = rng.integers(-3, 4, size=256) * 0.5
    ours = native.quantize_activations(x, act)
    theirs = np.zeros_like(ours)
    lib.ggml_get_type_traits_cpu(int(act)).from_float(ffi.from_buffer("float[]", x), ffi.from_buffer(theirs), x.size)
    bad = np.flatnonzero(ours != theirs)
    assert bad.size == 0, f"{bad.size} bytes differ from llama.cpp, first at {bad[:8]}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_llama_cpp_vec_dot(ggml_cpu, qtype):
    ffi, lib, _ = ggml_cpu
    rng = np.random.default_rng(int(qtype) + 31)
    rows, cols = 9, 1024
    w = sane_blocks(qtype, rows * cols, rng)
    x = rng.standard_normal((6, cols)).astype(np.float32)  # 6 tokens: the tiled prefill path where it exists
    ours = native.matmul(w, qtype, rows, cols, x)
    traits = lib.ggml_get_type_traits_cpu(int(qtype))
    act_type = native.vec_dot_type(qtype)
    assert traits.vec_dot_type == int(act_type)
    rb = native.row_bytes(qtype, cols)
    theirs = np.zeros_like(ours)
    out = ffi.new("float *")
    for t in range(x.shape[0]):
        if act_type == T.F32:
            act = x[t].copy()
        else:
            act = np.zeros(native.row_bytes(act_type, cols), np.uint8)
            lib.ggml_get_type_traits_cpu(int(act_type)).from_float(ffi.from_buffer("float[]", x[t].copy()),
                                                                   ffi.from_buffer(act), cols)
        for r in range(rows):
            traits.vec_dot(cols, out, 0, ffi.from_buffer(w[r * rb:(r + 1) * rb]), 0, ffi.from_buffer(act), 0, 1)
            theirs[t, r] = out[0]
    _, mag = reference_matmul(w, qtype, rows, cols, x)
    err = np.abs(ours - theirs)
    assert np.all(err <= RTOL * mag), f"worst relative difference {np.max(err / mag):.2e}"


# ------------------------------------------------------- AVX-512 VNNI code paths, emulated on AVX2

@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_vnni_kernels_under_avx2_emulation(tmp_path):
    """The AVX-512 build differs from the AVX2 one in its GR_USE_VNNI branches (vpdpbusd instead of
    vpmaddubsw + vpmaddwd). Where the CPU has no AVX-512, tests/vnni_emulation.c compiles that build
    with an exact AVX2 emulation of vpdpbusd and checks its tiles and gemv against the scalar kernels."""
    if "avx2" not in AVAILABLE:
        pytest.skip("needs an AVX2 CPU to run the emulation")
    native._load()  # the library's objects (built with it) supply dispatch and the scalar reference
    exe = tmp_path / "vnni_emulation"
    # (ops.o: the fused calls in dispatch.o use its norm and activations)
    objs = [str(NATIVE_DIR / "build" / f) for f in ("dispatch.o", "threadpool.o", "kernels_scalar.o", "kernels_avx2.o",
                                                     "ops.o")]
    build = subprocess.run(["gcc", "-O1", "-std=gnu11", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c",
                            f"-I{NATIVE_DIR}", "-o", str(exe), str(Path(__file__).resolve().parent / "vnni_emulation.c"),
                            *objs, "-lm", "-pthread"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "vnni emulation: ok" in run.stdout, run.stdout[-3000:] + run.stderr


# ------------------------------------------------------------------ NEON, cross-compiled, under qemu

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
def test_neon_matches_scalar_under_qemu():
    build = subprocess.run(["make", "-s", "-C", str(NATIVE_DIR), "neon-check"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "neon selftest: ok" in build.stdout, build.stdout + build.stderr


# ------------------------------------------------------------------------------------------ fused decode calls

def _qtensor(qtype, rows, cols, rng, name="w"):
    from ggufrun.gguf_file import QTensor
    return QTensor(name, qtype, (rows, cols), sane_blocks(qtype, rows * cols, rng))


MULTI_SETS = [  # shared activation formats, mixed formats, and types decoded with and without gemv kernels
    [T.Q4_1, T.Q4_1, T.Q4_1], [T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K], [T.Q8_0, T.Q4_1, T.F16, T.Q5_1],
    [T.Q2_K, T.IQ4_NL, T.F32, T.BF16, T.Q4_0], [T.Q5_K]]


@pytest.mark.parametrize("qtypes", MULTI_SETS, ids=lambda ts: "+".join(t.name for t in ts))
@pytest.mark.parametrize("precision", [1, 2])
def test_matmul_multi_equals_separate_matmuls(qtypes, precision):
    """gr_matmul_multi (one quantization per format, one pool pass for decode) gives each matrix's
    gr_matmul result bit for bit, with and without the folded RMS norm, on 1 and 2 threads."""
    from ggufrun import ops
    native.set_act_precision(precision)
    rng = np.random.default_rng(len(qtypes) * 7 + precision)
    cols = 512
    lins = [ops.Linear(_qtensor(t, rows, cols, rng, f"m{i}")) for i, (t, rows) in
            enumerate(zip(qtypes, (96, 40, 72, 24, 8)))]
    group = ops.LinearGroup(lins)
    norm = rng.standard_normal(cols).astype(np.float32)
    for threads in (1, 2):
        native.set_threads(threads)
        for n_tok in (1, 2, 3, 6):  # decode (gemv) and prefill (tiled) sizes at both precisions
            x = (rng.standard_normal((n_tok, cols)) * 3).astype(np.float32)
            for w in (None, norm):
                xin = x if w is None else ops.rms_norm(x, w, 1e-5)
                got_normed = np.full_like(x, np.nan)
                got = group(x, w, 1e-5, got_normed)
                for lin, g in zip(lins, got):
                    assert_same_floats(g, lin(xin))
                if w is not None:
                    assert_same_floats(got_normed, xin)


@pytest.mark.parametrize("types", [(T.Q4_1, T.Q4_1, T.Q4_1), (T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.Q5_1, T.F16)],
                         ids=lambda ts: "+".join(t.name for t in ts))
@pytest.mark.parametrize("precision", [1, 2])
def test_ffn_equals_its_steps(types, precision):
    """gr_ffn = down(glu(gate(x'), up(x'))) with x' = rms_norm(x) * w, bit for bit, GELU/SiLU and clamp."""
    from ggufrun import ops
    native.set_act_precision(precision)
    rng = np.random.default_rng(int(types[0]) + precision)
    n_embd, n_ff = 256, 512
    gate, up = (ops.Linear(_qtensor(types[i], n_ff, n_embd, rng)) for i in (0, 1))
    down = ops.Linear(_qtensor(types[2], n_embd, n_ff, rng))
    norm = rng.standard_normal(n_embd).astype(np.float32)
    for n_tok in (1, 2, 9):
        x = (rng.standard_normal((n_tok, n_embd)) * 2).astype(np.float32)
        for act, clamp in ((ops.ACT_SILU, 0.0), (ops.ACT_GELU, 0.0), (ops.ACT_SILU, 0.05)):
            for w in (None, norm):
                xin = x if w is None else ops.rms_norm(x, w, 1e-6)
                want = down(ops.glu(gate(xin), up(xin), act, clamp))
                assert_same_floats(ops.ffn(gate, up, down, x, act, clamp, w, 1e-6), want)


@pytest.mark.parametrize("precision", [1, 2])
def test_moe_one_token_path_equals_grouped_sum(precision):
    """gr_moe_ffn on one token (all experts batched) = the per-expert products summed in expert-id
    order, bit for bit, repeated ids included."""
    from ggufrun import moe, ops
    native.set_act_precision(precision)
    rng = np.random.default_rng(11 + precision)
    n_expert, n_embd, n_ff = 6, 256, 256
    experts = [(_qtensor(T.Q4_K, n_ff, n_embd, rng), _qtensor(T.Q4_K, n_ff, n_embd, rng),
                _qtensor(T.Q6_K, n_embd, n_ff, rng)) for _ in range(n_expert)]
    bufs = [[_ffi_buf(t[k]) for t in experts] for k in range(3)]
    ptrs = [native._ffi.new("void *[]", b) for b in bufs]
    for ids, limit in (([4, 1, 3], 0.0), ([2, 5, 2, 0], 0.02)):
        x = rng.standard_normal((1, n_embd)).astype(np.float32)
        wts = rng.uniform(0.1, 1.0, (1, len(ids))).astype(np.float32)
        got = moe._ffn_call(T.Q4_K, T.Q4_K, T.Q6_K, ptrs, n_expert, n_embd, n_ff, x,
                            np.array([ids], dtype=np.int32), wts, limit)
        want = np.zeros(n_embd, dtype=np.float32)
        for e in sorted(set(ids)):
            g, u, d = (ops.Linear(t) for t in experts[e])
            h = d(ops.glu(g(x), u(x), ops.ACT_SILU, limit))[0]
            for k, e2 in enumerate(ids):
                if e2 == e:
                    want += wts[0, k] * h
        assert_same_floats(got[0], want)


@pytest.mark.parametrize("precision", [1, 2])
def test_moe_few_tokens_equal_the_per_expert_products(precision):
    """gr_moe_ffn on 2..8 tokens (gr_moe_few: every expert's gate and up in one pool pass, every down
    in a second) = one gr_matmul per expert and weight over the tokens that chose it, SwiGLU, and the
    weighted sum in expert-id order, bit for bit: groups on the tiled kernels and on the decode ones,
    repeated experts across tokens, an expert twice in one token, gate and up in different activation
    formats, a type without decode kernels (F16), the clamp; 9 tokens (the per-expert path itself)
    checks the reference."""
    from ggufrun import moe, ops
    native.set_act_precision(precision)
    rng = np.random.default_rng(21 + precision)
    n_expert, n_embd, n_ff = 7, 256, 512
    for gq, uq, dq in ((T.Q4_K, T.Q8_0, T.Q6_K), (T.Q8_0, T.Q8_0, T.F16)):
        experts = [(_qtensor(gq, n_ff, n_embd, rng), _qtensor(uq, n_ff, n_embd, rng),
                    _qtensor(dq, n_embd, n_ff, rng)) for _ in range(n_expert)]
        ptrs = [native._ffi.new("void *[]", [_ffi_buf(t[k]) for t in experts]) for k in range(3)]
        for n_tok, n_used, limit in ((2, 2, 0.0), (3, 3, 0.02), (4, 2, 0.0), (8, 2, 0.0), (5, 1, 0.0), (9, 2, 0.0)):
            x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
            ids = rng.integers(0, n_expert, (n_tok, n_used)).astype(np.int32)
            ids[0, -1] = ids[0, 0]                 # one token picks an expert twice
            ids[-1, 0] = ids[1, 0] = ids[0, 0]     # and two more share it: a group of 4 pairs
            wts = rng.uniform(0.1, 1.0, (n_tok, n_used)).astype(np.float32)
            got = moe._ffn_call(gq, uq, dq, ptrs, n_expert, n_embd, n_ff, x, ids, wts, limit)
            want = np.zeros((n_tok, n_embd), dtype=np.float32)
            for e in sorted(set(ids.ravel().tolist())):
                pairs = np.flatnonzero(ids.ravel() == e)
                xe = x[pairs // n_used]
                g, u, d = experts[e]
                h = ops.glu(native.matmul(g.data, gq, n_ff, n_embd, xe), native.matmul(u.data, uq, n_ff, n_embd, xe),
                            ops.ACT_SILU, limit)
                de = native.matmul(d.data, dq, n_embd, n_ff, h)
                for r, pr in enumerate(pairs):
                    want[pr // n_used] += wts.ravel()[pr] * de[r]
            assert_same_floats(got, want)


def _ffi_buf(t):
    b = native._ffi.from_buffer("uint8_t[]", t.data)
    _ffi_buf.keep.append(b)
    return b


_ffi_buf.keep = []


def test_fused_calls_reject_bad_arguments():
    from ggufrun import ops
    rng = np.random.default_rng(3)
    a, b = ops.Linear(_qtensor(T.Q4_0, 32, 64, rng)), ops.Linear(_qtensor(T.Q4_0, 32, 96, rng))
    with pytest.raises(ValueError, match="share an input size"):
        ops.LinearGroup([a, b])
    with pytest.raises(ValueError, match="1 to 8"):
        ops.LinearGroup([a] * 9)
    lib = native._load()
    x = np.zeros(64, dtype=np.float32)
    y = np.zeros(64, dtype=np.float32)
    f = native._ffi
    qt, w, rows = f.new("int[]", [99]), f.new("void *[]", [a._w]), f.new("int64_t[]", [32])
    assert lib.gr_matmul_multi(1, qt, w, rows, 64, f.from_buffer("float[]", x), 1, f.NULL, 0.0, f.NULL,
                               f.from_buffer("float[]", y)) == lib.GR_E_QTYPE
    assert lib.gr_matmul_multi(0, qt, w, rows, 64, f.from_buffer("float[]", x), 1, f.NULL, 0.0, f.NULL,
                               f.from_buffer("float[]", y)) == lib.GR_E_ARG
    with pytest.raises(ValueError, match="ffn"):  # act 7 is no activation
        ops.ffn(a, a, ops.Linear(_qtensor(T.Q4_0, 64, 32, rng)), x.reshape(1, 64), 7)
    for bad in (0, 33):   # Linear's first rows: within W's
        with pytest.raises(ValueError, match=f"matmul .*: rows {bad} is outside 1..32"):
            a(x.reshape(1, 64), rows=bad)



def test_block_calls_refuse_bad_descriptions():
    """gr_attention_block and gr_moe_block check what they are given before they compute: a projection
    whose rows do not match the heads is a shape error, an out-of-range projection count, a missing
    array or no tokens an argument error, a step's own refusal (an unknown router type) comes back
    as it is; the KV cache is left untouched."""
    from ggufrun import ops
    from ggufrun.kv_cache import KVCache, LayerCacheSpec
    rng = np.random.default_rng(4)
    f = native._ffi
    lib = native._load()
    q, k, v = (ops.Linear(_qtensor(T.Q8_0, rows, 64, rng, name)) for name, rows in (("q", 64), ("k", 32), ("v", 32)))
    wo = ops.Linear(_qtensor(T.Q8_0, 64, 64, rng, "o"))
    kw = dict(n_head_kv=1, head_dim_k=32, head_dim_v=32, scale=0.125, window=0, n_rot=32, rope_mode=ops.ROPE_NEOX,
              rope_base=10000.0, freq_scale=1.0, freq_factors=None)
    cache = KVCache([LayerCacheSpec(1, 32, 32)], n_ctx=16, max_batch=4)
    x, pos = np.ones((1, 64), np.float32), np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="attention block o: bad shape or size"):  # 64 q rows are 2 heads, not 3
        ops.AttentionBlock(ops.LinearGroup([q, k, v]), wo, n_head=3, **kw)(x, pos, cache, 0)
    block = ops.AttentionBlock(ops.LinearGroup([q, k, v]), wo, n_head=2, **kw)
    block._desc.n_proj = 5
    with pytest.raises(ValueError, match="attention block o: argument out of range"):
        block(x, pos, cache, 0)
    assert (cache.pos[0] == cache.pos[0][0]).all() and not cache.k[0].any()
    block._desc.n_proj = 3
    y = np.zeros((1, 64), np.float32)
    i32 = lambda a: f.from_buffer("int32_t[]", a)  # noqa: E731
    rc = lib.gr_attention_block(block._desc, f.from_buffer("float[]", x), 1, 1, i32(pos), i32(pos), f.NULL, f.NULL,
                                i32(cache.pos[0]), 1, f.from_buffer("float[]", y))
    with pytest.raises(ValueError, match="argument out of range"):
        native._check(rc, "attention block")
    for n_out in (-1, 2):   # output rows outside 0..n_tok
        rc = lib.gr_attention_block(block._desc, f.from_buffer("float[]", x), 1, n_out, i32(pos), i32(pos),
                                    f.from_buffer("uint16_t[]", cache.k[0].view(np.uint16)),
                                    f.from_buffer("uint16_t[]", cache.v[0].view(np.uint16)), i32(cache.pos[0]), 1,
                                    f.from_buffer("float[]", y))
        assert rc == native.GR_E_ARG, n_out

    router = ops.Linear(_qtensor(T.F32, 4, 64, rng, "router"))
    layer = f.new("gr_moe_layer *", {"n_embd": 64, "n_expert": 4, "n_used": 2, "n_ff": 32, "router_qtype": 99,
                                     "router_w": router._w, "gating": lib.GR_GATING_SOFTMAX, "weights_scale": 1.0})
    ids, w = np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32)
    args = (f.from_buffer("float[]", x), 1, f.NULL, 0.0, i32(ids), f.from_buffer("float[]", w),
            f.from_buffer("float[]", y))
    with pytest.raises(ValueError, match="moe: quant type not supported"):
        native._check(lib.gr_moe_block(layer, *args), "moe")
    with pytest.raises(ValueError, match="moe: argument out of range"):  # no tokens
        native._check(lib.gr_moe_block(layer, args[0], 0, *args[2:]), "moe")

ATTN_CONFIGS = {  # what each architecture's attention asks of gr_attention_block
    "llama": dict(n_head=4, n_head_kv=2, dk=32, dv=32, mode=0, window=0),
    "qwen-biases": dict(n_head=4, n_head_kv=1, dk=32, dv=32, mode=2, window=0, biases=True),
    "gemma3-swa": dict(n_head=4, n_head_kv=2, dk=32, dv=32, mode=2, window=6, qk_norm=True, post_norm=True),
    "step35-gated": dict(n_head=4, n_head_kv=2, dk=64, dv=32, mode=2, window=5, qk_norm=True, gate=True,
                         n_rot=32, freq_factors=True),
}


@pytest.mark.parametrize("cfg", ATTN_CONFIGS.values(), ids=ATTN_CONFIGS.keys())
def test_attention_block_equals_its_steps(cfg):
    """gr_attention_block gives x + post_norm(wo(attention(...))) and the cache writes of the separate
    calls (projections with the folded norm, biases, q/k norm + rope + store, attention, output
    projection, post-norm, residual) bit for bit: decode and batches, a sliding-window ring that wraps."""
    from ggufrun import ops
    from ggufrun.kv_cache import KVCache, LayerCacheSpec
    rng = np.random.default_rng(5)
    n_embd, nh, nkv, dk, dv = 64, cfg["n_head"], cfg["n_head_kv"], cfg["dk"], cfg["dv"]
    n_rot = cfg.get("n_rot", dk)
    lins = [ops.Linear(_qtensor(T.Q8_0, rows, n_embd, rng, name)) for name, rows in
            (("q", nh * dk), ("k", nkv * dk), ("v", nkv * dv))]
    if cfg.get("gate"):
        lins.append(ops.Linear(_qtensor(T.Q4_0, nh, n_embd, rng, "gate")))
    wo = ops.Linear(_qtensor(T.Q4_0, n_embd, nh * dv, rng, "o"))
    vec = lambda n: (rng.standard_normal(n) * 0.5 + 1).astype(np.float32)  # noqa: E731
    biases = tuple(vec(lin.rows) for lin in lins[:3]) if cfg.get("biases") else (None, None, None)
    qn, kn = (vec(dk), vec(dk)) if cfg.get("qk_norm") else (None, None)
    post = vec(n_embd) if cfg.get("post_norm") else None
    ff = np.linspace(1, 4, n_rot // 2).astype(np.float32) if cfg.get("freq_factors") else None
    in_norm, eps, scale, base, fs = vec(n_embd), 1e-5, 1 / np.sqrt(dk), 10000.0, 0.5
    block = ops.AttentionBlock(ops.LinearGroup(lins), wo, n_head=nh, n_head_kv=nkv, head_dim_k=dk, head_dim_v=dv,
                               scale=scale, window=cfg["window"], n_rot=n_rot, rope_mode=cfg["mode"], rope_base=base,
                               freq_scale=fs, freq_factors=ff, biases=biases, q_norm=qn, k_norm=kn, qk_eps=1e-6,
                               in_norm=in_norm, post_norm=post, eps=eps)
    cache = KVCache([LayerCacheSpec(nkv, dk, dv, cfg["window"])], n_ctx=64, max_batch=7)
    ref_k, ref_v, ref_pos = cache.k[0].copy(), cache.v[0].copy(), cache.pos[0].copy()
    n_past = 0
    for n in (5, 1, 7, 1, 3, 1):  # the window-5/6 rings (12-13 slots) wrap
        x = (rng.standard_normal((n, n_embd)) * 2).astype(np.float32)
        pos = np.arange(n_past, n_past + n, dtype=np.int32)
        got = block(x, pos, cache, 0)

        q, k, v, *gate = ops.LinearGroup(lins)(x, in_norm, eps)
        for out, b in zip((q, k, v), biases):
            if b is not None:
                out += b
        q, k = q.reshape(n, nh, dk), k.reshape(n, nkv, dk)
        slots, n_kv = cache.slots(0, pos)
        ops.qk_norm_rope(q, k, pos, qn, kn, 1e-6, n_rot, base, cfg["mode"], fs, ff,
                         (v.reshape(n, nkv, dv), slots, ref_k, ref_v, ref_pos))
        a = ops.attention(q, ref_k[:n_kv], ref_v[:n_kv], pos, ref_pos[:n_kv], scale, cfg["window"],
                          gate=gate[0] if gate else None)
        o = wo(a)
        if post is not None:
            o = ops.rms_norm(o, post, eps)
        assert_same_floats(got, x + o)
        np.testing.assert_array_equal(cache.k[0].view(np.uint16), ref_k.view(np.uint16))
        np.testing.assert_array_equal(cache.v[0].view(np.uint16), ref_v.view(np.uint16))
        np.testing.assert_array_equal(cache.pos[0], ref_pos)
        n_past += n
