"""quant: block layouts, dequantizers (vs gguf-py) and quantizers (vs llama.cpp).

The llama.cpp checks run in two ways: ggml_quantize_chunk / from_float_ref
called directly in llama-cpp-python's libggml-base (every type, extreme
inputs), and end to end through llama_model_quantize on a tiny llama model
written with quant.write_gguf.
"""
from __future__ import annotations

import ctypes
import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import quant
from quant import _scalar

ALL_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q8_K",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"]
# Types gguf-py 0.19.0 can dequantize (it has no Q8_1 / Q8_K decoder).
GGUF_DEQUANT_TYPES = [t for t in ALL_TYPES if t not in ("Q8_1", "Q8_K")]
# Types gguf-py can quantize, and which we must then agree with.
GGUF_QUANT_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]
BLOCK_TYPES = [t for t in ALL_TYPES if t not in ("F32", "F16", "BF16")]

# binary16 bit patterns for scale fields: zeros, subnormals, normal extremes,
# ordinary values, inf and NaN.
F16_EXTREMES = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF,
                         0x3C00, 0xB800, 0x1234, 0x7C00, 0xFC00, 0x7E00], dtype=np.uint16)
E8M0_EXTREMES = np.array([0, 1, 2, 3, 126, 127, 128, 200, 253, 254, 255], dtype=np.uint8)


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with every scale-like field cycled through extremes."""
    fmt = quant.get_format(qtype)
    raw = rng.integers(0, 256, size=n_blocks * fmt.type_size, dtype=np.uint8)
    blocks = raw.view(fmt.layout)
    if fmt.block_size == 1:
        return raw
    for name in fmt.layout.names:
        dt = fmt.layout.fields[name][0]
        if dt == np.dtype("<f2"):
            bits = np.resize(F16_EXTREMES, n_blocks)
            blocks[name] = bits[rng.permutation(n_blocks)].view(np.float16)
        elif name == "e":
            blocks[name] = np.resize(E8M0_EXTREMES, n_blocks)
    return raw


def float_bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def distributions(rng: np.random.Generator, rows: int = 16, n: int = 512) -> dict[str, np.ndarray]:
    f = np.float32
    gauss = rng.standard_normal((rows, n)).astype(f)
    outliers = (rng.standard_normal((rows, n)) * 0.02).astype(f)
    outliers[rng.random((rows, n)) < 0.01] *= 300
    const = np.empty((4, n), f)
    const[0], const[1], const[2], const[3] = 0.37, -1.5, 1e-20, 7e-8
    block_scales = np.exp(rng.uniform(-40, 40, (rows, n // 16, 1))).repeat(16, 2).reshape(rows, n)
    return {
        "gauss": gauss,
        "heavy_tailed": rng.standard_t(2, (rows, n)).astype(f),
        "outliers": outliers,
        "zero": np.zeros((4, n), f),
        "const": const,
        "uniform_pos": rng.uniform(0, 1, (rows, n)).astype(f),
        "all_negative": -np.abs(gauss) - 3,
        "sparse": gauss * (rng.random((rows, n)) < 0.05),
        "integers": rng.integers(-8, 8, (rows, n)).astype(f),
        "halves": (rng.integers(-40, 40, (rows, n)) / 2).astype(f),
        "tiny": (gauss * 1e-6).astype(f),
        "fp16_subnormal_scales": (gauss * 6e-5).astype(f),
        "subnormal": (gauss * 1e-42).astype(f),
        "huge": (gauss * 1e37).astype(f),
        "mixed_block_scales": (gauss * block_scales).astype(f),
        "one_hot": np.where(np.arange(n) == 7, gauss, 0).astype(f),
    }


# ----------------------------------------------------------------- helpers API

def test_qtype_spellings_agree():
    for name in ALL_TYPES:
        t = T[name]
        assert quant.block_size(name) == quant.block_size(t) == quant.block_size(int(t))
        assert quant.type_size(name.lower()) == quant.type_size(t)


def test_sizes_match_ggml():
    expected = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
                "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 36),
                "Q8_K": (256, 292), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
                "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
                "MXFP4": (32, 17)}
    for name, (bs, ts) in expected.items():
        assert (quant.block_size(name), quant.type_size(name)) == (bs, ts), name
    assert quant.row_bytes("Q4_K", 4096) == 16 * 144
    assert quant.row_bytes(T.F16, 3) == 6


@pytest.mark.parametrize("bad", ["Q9_9", 12345, -1, "", None, 1.5])
def test_unknown_qtype_is_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="unknown GGML quantization type") as exc:
        quant.block_size(bad)
    assert repr(bad) in str(exc.value)


def test_known_but_unsupported_qtype_is_value_error():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quant.type_size("IQ2_XXS")


def test_non_multiple_of_block_size_is_value_error():
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        quant.row_bytes("Q4_K", 300)
    with pytest.raises(ValueError, match="not a multiple"):
        quant.quantize(np.zeros(48, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="not a multiple"):
        quant.dequantize(np.zeros(35, np.uint8), "Q8_0")


def test_shapes_and_input_kinds():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    q = quant.quantize(x, "Q8_0")
    assert q.dtype == np.uint8 and q.shape == (3, 2, 68)
    y = quant.dequantize(q, "Q8_0")
    assert y.dtype == np.float32 and y.shape == (3, 2, 64)
    flat = quant.dequantize(q.tobytes(), "Q8_0")
    assert flat.shape == (384,)
    np.testing.assert_array_equal(flat, y.reshape(-1))
    np.testing.assert_array_equal(quant.dequantize(memoryview(q.tobytes()), T.Q8_0), flat)
    # float64 input is converted to float32 first
    np.testing.assert_array_equal(quant.quantize(x.astype(np.float64), "Q8_0"), q)


def test_layouts_are_packed_ggml_structs():
    for name in ALL_TYPES:
        fmt = quant.get_format(name)
        assert fmt.layout.itemsize == fmt.type_size
        assert not fmt.layout.isalignedstruct


# --------------------------------------------------------------- float helpers

def test_fp16_encoder_matches_ieee_round_to_nearest_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    near_edges = np.concatenate([np.arange(0x33000000 - 64, 0x33000040, dtype=np.uint32),
                                 np.arange(0x387F0000, 0x38810000, 3, dtype=np.uint32),
                                 np.arange(0x477FE000, 0x47800010, dtype=np.uint32)])
    x = np.concatenate([bits, near_edges, near_edges | np.uint32(0x80000000)]).view(np.float32)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    got = _encode_fp16_all(x)
    assert np.array_equal(got, expected)


def _encode_fp16_all(x):
    from numba import njit

    @njit
    def run(a):
        out = np.empty(a.size, np.uint16)
        for i in range(a.size):
            out[i] = _scalar.fp32_to_fp16_bits(a[i])
        return out
    return run(x)


# ------------------------------------------------------------------ dequantize

@pytest.mark.parametrize("qtype", GGUF_DEQUANT_TYPES)
def test_dequantize_bit_exact_with_gguf(qtype):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    raw = random_blocks(qtype, 224, rng)
    ours = quant.dequantize(raw, qtype)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(raw, T[qtype])
    assert ours.shape == theirs.shape
    assert np.array_equal(float_bits(ours), float_bits(theirs))
    # and as rows of bytes
    rows = raw.reshape(4, -1)
    assert np.array_equal(float_bits(quant.dequantize(rows, qtype)), float_bits(ours).reshape(4, -1))


@pytest.mark.parametrize("qtype", ["Q8_1", "Q8_K"])
def test_dequantize_activation_formats(qtype):
    rng = np.random.default_rng(7)
    raw = random_blocks(qtype, 64, rng)
    blocks = raw.view(quant.get_format(qtype).layout)
    if qtype == "Q8_K":
        blocks["d"] = rng.standard_normal(64).astype(np.float32) * np.float32(1e-3)
    d = blocks["d"].astype(np.float64).reshape(-1, 1)
    with np.errstate(all="ignore"):
        expected = (d * blocks["qs"].astype(np.float64)).astype(np.float32)
    assert np.array_equal(float_bits(quant.dequantize(raw, qtype)), float_bits(expected).reshape(-1))


# -------------------------------------------------------------------- quantize

@pytest.mark.parametrize("qtype", GGUF_QUANT_TYPES)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(11)
    for name, x in distributions(rng).items():
        # gguf-py picks the block max with argmax, so a block of +-0.0 can get
        # the other zero sign than ggml's scan; ggml is the reference, so
        # compare on data without negative zeros.
        x = x + np.float32(0.0)
        with np.errstate(all="ignore"):
            theirs = gguf.quants.quantize(x, T[qtype])
        ours = quant.quantize(x, qtype)
        assert np.array_equal(ours, np.asarray(theirs).view(np.uint8).reshape(ours.shape)), name


ROUND_TRIP_BOUNDS = {  # relative RMS error on gaussian data
    "F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q8_1": 0.01, "Q8_K": 0.01,
    "Q6_K": 0.03, "Q5_K": 0.05, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_K": 0.1, "Q4_0": 0.12,
    "Q4_1": 0.12, "IQ4_NL": 0.12, "IQ4_XS": 0.12, "Q3_K": 0.2, "MXFP4": 0.2, "Q2_K": 0.4,
}


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_round_trip_error_bounded(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    y = quant.dequantize(quant.quantize(x, qtype), qtype)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel <= ROUND_TRIP_BOUNDS[qtype], rel
    # a zero tensor stays exactly zero
    z = quant.dequantize(quant.quantize(np.zeros(1024, np.float32), qtype), qtype)
    assert not np.any(z)


def test_q8_1_sum_field_and_q8_k_bsums():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(512).astype(np.float32)
    b1 = quant.quantize(x, "Q8_1").view(quant.get_format("Q8_1").layout)
    # s uses the float32 scale before its rounding to f16
    d = np.abs(x).reshape(-1, 32).max(axis=1) / np.float32(127)
    expected_s = b1["qs"].astype(np.int64).sum(1).astype(np.float32) * d
    assert np.array_equal(b1["s"], expected_s.astype(np.float16))
    bk = quant.quantize(x, "Q8_K").view(quant.get_format("Q8_K").layout)
    assert np.array_equal(bk["bsums"], bk["qs"].reshape(-1, 16, 16).astype(np.int64).sum(-1))
    assert np.all(np.abs(bk["qs"]) <= 127)


# ------------------------------------------------- llama.cpp, called directly

def _ggml_base() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    if loaded is not None:
        # the libllama llama_cpp loaded: its handle finds ggml's symbols among its dependencies, so no
        # second dlopen (one clean-clone CI run aborted inside that dlopen, late in the suite; not
        # reproduced). A wrapper of our own, so the argtypes set below stay off llama_cpp's object.
        lib = ctypes.CDLL(loaded._name, handle=loaded._handle)
    else:
        root = pathlib.Path(llama_cpp.__file__).parent
        libs = sorted(root.rglob("libggml-base.so*")) + sorted(root.rglob("libggml.so*"))
        if not libs:
            pytest.fail(f"llama_cpp is installed but no libggml-base.so under {root}")
        lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_reference_quantize(lib: ctypes.CDLL, qtype: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    t = T[qtype]
    out = np.zeros((rows, quant.row_bytes(t, n)), dtype=np.uint8)
    if qtype in ("Q8_1", "Q8_K"):
        # activation formats have no ggml_quantize_chunk case; call the exported row reference
        fn = getattr(lib, "quantize_row_q8_1_ref" if qtype == "Q8_1" else "quantize_row_q8_K_ref")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn(x.ctypes.data, out.ctypes.data, rows * n)
    else:
        written = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
        assert written == out.nbytes
    return out


LLAMA_QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q8_K", "Q2_K", "Q3_K",
                     "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4", "F16", "BF16"]


@pytest.mark.parametrize("qtype", LLAMA_QUANT_TYPES)
def test_quantize_bytes_equal_ggml_reference(qtype):
    lib = _ggml_base()
    rng = np.random.default_rng(1000 + int(T[qtype]))
    for name, x in distributions(rng).items():
        with np.errstate(all="ignore"):
            ours = quant.quantize(x, qtype)
        theirs = ggml_reference_quantize(lib, qtype, x)
        bad_rows = np.nonzero((ours != theirs).any(axis=1))[0]
        assert bad_rows.size == 0, f"{qtype} {name}: rows {bad_rows.tolist()} differ"


# ----------------------------------------- llama.cpp, through llama_model_quantize

# ggml type -> llama_ftype whose default tensor type it is
LLAMA_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11,
                "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "MXFP4": 38}

N_EMBD, N_FF, N_VOCAB = 256, 512, 64


def tiny_llama_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """numpy-order float32 weights of a 1-layer llama, each with its own value
    distribution; every 2-D row is 256 or 512 elements."""
    f = np.float32

    def gauss(r, c, s=0.05):
        return (rng.standard_normal((r, c)) * s).astype(f)

    heavy = (rng.standard_t(2, (N_EMBD, N_EMBD)) * 0.02).astype(f)
    outliers = gauss(N_EMBD, N_EMBD)
    outliers[rng.random(outliers.shape) < 0.005] *= 200
    with_flat_rows = gauss(N_FF, N_EMBD)
    with_flat_rows[::7] = 0.0
    with_flat_rows[3::7] = f(0.0123)
    with_flat_rows[5::7] = f(-2.5)
    mixed = gauss(N_FF, N_EMBD) * np.exp(rng.uniform(-6, 3, (N_FF, N_EMBD // 16, 1))).repeat(16, 2).reshape(N_FF, N_EMBD)
    return {
        "token_embd.weight": gauss(N_VOCAB, N_EMBD, 1.0),
        "output_norm.weight": (1 + gauss(1, N_EMBD)).reshape(N_EMBD),
        "output.weight": rng.uniform(-0.1, 0.1, (N_VOCAB, N_EMBD)).astype(f),
        "blk.0.attn_norm.weight": (1 + gauss(1, N_EMBD)).reshape(N_EMBD),
        "blk.0.attn_q.weight": gauss(N_EMBD, N_EMBD),
        "blk.0.attn_k.weight": heavy,
        "blk.0.attn_v.weight": outliers,
        "blk.0.attn_output.weight": np.abs(gauss(N_EMBD, N_EMBD)) + f(0.01),
        "blk.0.ffn_norm.weight": (1 + gauss(1, N_EMBD)).reshape(N_EMBD),
        "blk.0.ffn_gate.weight": with_flat_rows,
        "blk.0.ffn_up.weight": mixed.astype(f),
        "blk.0.ffn_down.weight": gauss(N_EMBD, N_FF, 0.02),
    }


def tiny_llama_metadata() -> dict:
    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    return {
        "general.name": "quant-test-llama",
        "llama.vocab_size": (N_VOCAB, U32),
        "llama.context_length": (128, U32),
        "llama.embedding_length": (N_EMBD, U32),
        "llama.block_count": (1, U32),
        "llama.feed_forward_length": (N_FF, U32),
        "llama.attention.head_count": (2, U32),
        "llama.attention.head_count_kv": (2, U32),
        "llama.rope.dimension_count": (N_EMBD // 2, U32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, F32),
        "general.file_type": (0, U32),
    }


@pytest.fixture(scope="module")
def tiny_llama_f32(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(2024)
    weights = tiny_llama_tensors(rng)
    path = tmp_path_factory.mktemp("llama") / "tiny-f32.gguf"
    quant.write_gguf(path, "llama", tiny_llama_metadata(), {k: (v, "F32") for k, v in weights.items()})
    return path, weights


def llama_quantize_file(src: pathlib.Path, dst: pathlib.Path, ftype: int) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for ftype {ftype}"


@pytest.mark.parametrize("qtype", list(LLAMA_FTYPES))
def test_quantize_bytes_equal_llama_model_quantize(qtype, tiny_llama_f32, tmp_path):
    src, weights = tiny_llama_f32
    dst = tmp_path / f"tiny-{qtype}.gguf"
    llama_quantize_file(src, dst, LLAMA_FTYPES[qtype])
    reader = gguf.GGUFReader(dst)
    seen = {}
    for t in reader.tensors:
        w = weights[t.name]
        seen[t.name] = t.tensor_type.name
        if w.ndim == 1:
            # llama.cpp never quantizes 1-D tensors (norms): they stay F32
            assert t.tensor_type == T.F32, t.name
            continue
        assert t.tensor_type == T[qtype], f"{t.name} became {t.tensor_type.name}"
        ours = quant.quantize(w, qtype)
        theirs = np.asarray(t.data).view(np.uint8).reshape(ours.shape)
        bad_rows = np.nonzero((ours != theirs).any(axis=1))[0]
        assert bad_rows.size == 0, f"{qtype} {t.name}: rows {bad_rows.tolist()} differ"
    assert set(seen) == set(weights)
