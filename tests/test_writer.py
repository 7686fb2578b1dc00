"""quant.write_gguf: metadata and tensors round trip through gguf.GGUFReader,
split files as gguf-split names and tags them, and failures leave no file."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V

import quant
import quant.writer as writer_module


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f


def read_value(f):
    """Decode a reader field from its raw parts (GGUFReader.contents() flattens
    nested arrays). parts = [key length, key bytes, value type, value parts...]."""
    def decode(i, vtype):
        if vtype == V.ARRAY:
            itype, n = V(int(f.parts[i][0])), int(f.parts[i + 1][0])
            i += 2
            out = []
            for _ in range(n):
                v, i = decode(i, itype)
                out.append(v)
            return out, i
        if vtype == V.STRING:
            return bytes(f.parts[i + 1]).decode("utf-8"), i + 2
        return f.parts[i].tolist()[0], i + 1

    value, end = decode(3, f.types[0])
    assert end == len(f.parts)
    return value


METADATA = {
    "general.name": "round-trip",
    "test.u32": 7,
    "test.negative": -5,
    "test.big": 2**40,
    "test.huge_unsigned": 2**63 + 5,
    "test.float": 0.25,
    "test.bool": True,
    "test.false": False,
    "test.ints": [1, 2, 3],
    "test.signed_ints": [-1, 2],
    "test.floats": [0.5, -1.5],
    "test.strings": ["a", "bé", ""],
    "test.bools": [True, False],
    "test.nested": [[1, 2], [3]],
    "test.nested_strings": [["x"], ["y", "z"]],
    "test.deeper": [[[0.5]], [[1.5, 2.5], [-1.0]]],
    "test.forced_u8": (200, V.UINT8),
    "test.forced_i16": (-300, V.INT16),
    "test.forced_f64": (0.1, V.FLOAT64),
    "test.forced_u64": (3, V.UINT64),
    "test.forced_array_elems": ([1, 2, 3], V.INT64),
    "test.numpy_scalar": np.int32(9),
    "test.numpy_array": np.array([1.5, 2.5], dtype=np.float32),
}

EXPECTED = {  # key -> (GGUF type, element type or None, value read back)
    "general.name": (V.STRING, None, "round-trip"),
    "test.u32": (V.UINT32, None, 7),
    "test.negative": (V.INT32, None, -5),
    "test.big": (V.INT64, None, 2**40),
    "test.huge_unsigned": (V.UINT64, None, 2**63 + 5),
    "test.float": (V.FLOAT32, None, 0.25),
    "test.bool": (V.BOOL, None, True),
    "test.false": (V.BOOL, None, False),
    "test.ints": (V.ARRAY, V.UINT32, [1, 2, 3]),
    "test.signed_ints": (V.ARRAY, V.INT32, [-1, 2]),
    "test.floats": (V.ARRAY, V.FLOAT32, [0.5, -1.5]),
    "test.strings": (V.ARRAY, V.STRING, ["a", "bé", ""]),
    "test.bools": (V.ARRAY, V.BOOL, [True, False]),
    "test.nested": (V.ARRAY, V.ARRAY, [[1, 2], [3]]),
    "test.nested_strings": (V.ARRAY, V.ARRAY, [["x"], ["y", "z"]]),
    "test.deeper": (V.ARRAY, V.ARRAY, [[[0.5]], [[1.5, 2.5], [-1.0]]]),
    "test.forced_u8": (V.UINT8, None, 200),
    "test.forced_i16": (V.INT16, None, -300),
    "test.forced_f64": (V.FLOAT64, None, 0.1),
    "test.forced_u64": (V.UINT64, None, 3),
    "test.forced_array_elems": (V.ARRAY, V.INT64, [1, 2, 3]),
    "test.numpy_scalar": (V.UINT32, None, 9),
    "test.numpy_array": (V.ARRAY, V.FLOAT32, [1.5, 2.5]),
}


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "meta.gguf"
    quant.write_gguf(path, "testarch", METADATA, {"t": (np.zeros(4, np.float32), "F32")})
    r = GGUFReader(path)
    assert field(r, "general.architecture").contents() == "testarch"
    for key, (vtype, sub, value) in EXPECTED.items():
        f = field(r, key)
        assert f.types[0] == vtype, key
        if sub is not None:
            assert f.types[1] == sub, key
        assert read_value(f) == value, key
    assert r.get_field("general.alignment") is None  # default alignment is implicit


TENSORS_F32 = {  # name -> (numpy shape, qtype)
    "plain.f32": ((3, 5), "F32"),
    "vec.f32": ((7,), "F32"),
    "half.f16": ((4, 6), "F16"),
    "brain.bf16": ((2, 8), "BF16"),
    "q8.weight": ((6, 64), "Q8_0"),
    "q4.weight": ((3, 512), "Q4_K"),
    "q6.experts": ((2, 3, 256), "Q6_K"),
    "q5.weight": ((2, 256), "Q5_1"),
    "mx.weight": ((4, 32), "MXFP4"),
}


def _float_tensors(rng):
    return {name: (rng.standard_normal(shape).astype(np.float32), qtype)
            for name, (shape, qtype) in TENSORS_F32.items()}


def test_tensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _float_tensors(rng)
    raw_src = rng.standard_normal((5, 256)).astype(np.float32)
    tensors["prequantized.weight"] = (quant.quantize(raw_src, "IQ4_XS"), T.IQ4_XS, (5, 256))
    path = tmp_path / "tensors.gguf"
    assert quant.write_gguf(path, "testarch", {}, tensors) == [path]
    r = GGUFReader(path)
    assert [t.name for t in r.tensors] == list(tensors)
    for t in r.tensors:
        spec = tensors[t.name]
        qtype = T[spec[1]] if isinstance(spec[1], str) else spec[1]
        shape = spec[0].shape if len(spec) == 2 else spec[2]
        assert t.tensor_type == qtype, t.name
        assert list(t.shape) == list(reversed(shape)), t.name  # GGUF ne order
        assert t.data_offset % 32 == 0
        expected_bytes = quant.quantize(spec[0], qtype) if len(spec) == 2 else spec[0]
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(got, np.asarray(expected_bytes).reshape(-1)), t.name
        decoded = quant.dequantize(got, qtype).reshape(shape)
        if qtype == T.F32:
            np.testing.assert_array_equal(decoded, spec[0])
        elif len(spec) == 2:
            assert np.abs(decoded - spec[0]).max() < 0.5 * np.abs(spec[0]).max()


def test_custom_alignment(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "aligned.gguf"
    quant.write_gguf(path, "testarch", {}, _float_tensors(rng), alignment=128)
    r = GGUFReader(path)
    assert field(r, "general.alignment").contents() == 128
    assert all(t.data_offset % 128 == 0 for t in r.tensors)
    with pytest.raises(ValueError, match="power of two"):
        quant.write_gguf(tmp_path / "bad.gguf", "testarch", {}, {}, alignment=48)


def test_split_files_like_gguf_split(tmp_path):
    rng = np.random.default_rng(2)
    tensors = _float_tensors(rng)  # 9 tensors -> 4 + 4 + 1
    path = tmp_path / "model.gguf"
    written = quant.write_gguf(path, "testarch", {"general.name": "split"}, tensors, split_max_tensors=4)
    names = [f"model-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing at model.gguf, no .tmp
    seen = []
    for i, p in enumerate(written):
        r = GGUFReader(p)
        assert field(r, "split.no").types[0] == V.UINT16 and field(r, "split.no").contents() == i
        assert field(r, "split.count").types[0] == V.UINT16 and field(r, "split.count").contents() == 3
        tc = field(r, "split.tensors.count")
        assert tc.types[0] == V.INT32 and tc.contents() == len(tensors)
        assert len(r.tensors) == (4 if i < 2 else 1)
        assert (r.get_field("general.name") is not None) == (i == 0)  # metadata in shard 1 only
        seen += [t.name for t in r.tensors]
    assert seen == list(tensors)


def test_single_shard_when_under_limit(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "small.gguf"
    tensors = dict(list(_float_tensors(rng).items())[:2])
    assert quant.write_gguf(path, "testarch", {}, tensors, split_max_tensors=4) == [path]
    assert GGUFReader(path).get_field("split.count") is None


def test_bad_tensor_writes_nothing(tmp_path):
    path = tmp_path / "bad.gguf"
    tensors = {"ok": (np.ones((2, 32), np.float32), "Q8_0"), "bad": (np.ones((2, 33), np.float32), "Q8_0")}
    with pytest.raises(ValueError, match="'bad'.*not a multiple"):
        quant.write_gguf(path, "testarch", {}, tensors)
    with pytest.raises(ValueError, match="bytes given"):
        quant.write_gguf(path, "testarch", {}, {"raw": (np.zeros(10, np.uint8), "Q8_0", (1, 32))})
    with pytest.raises(ValueError, match="float data expected"):
        quant.write_gguf(path, "testarch", {}, {"ints": (np.zeros((1, 32), np.int32), "Q8_0")})
    with pytest.raises(ValueError, match="mixed element types"):
        quant.write_gguf(path, "testarch", {"x": [1, "a"]}, {})
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_no_file_and_keeps_old_one(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"previous contents")

    def failing_fsync(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(writer_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        quant.write_gguf(path, "testarch", {}, _float_tensors(rng))
    assert path.read_bytes() == b"previous contents"
    with pytest.raises(OSError, match="disk on fire"):
        quant.write_gguf(tmp_path / "split.gguf", "testarch", {}, _float_tensors(rng), split_max_tensors=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_failure_while_writing_tensor_data(tmp_path, monkeypatch):
    """An exception after the header and some tensor bytes are on disk."""
    rng = np.random.default_rng(5)
    path = tmp_path / "model.gguf"
    calls = {"n": 0}
    real = writer_module.GGUFWriter.write_padding

    def flaky_padding(self, fp, n, align=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("interrupted")
        return real(self, fp, n, align)

    monkeypatch.setattr(writer_module.GGUFWriter, "write_padding", flaky_padding)
    with pytest.raises(RuntimeError, match="interrupted"):
        quant.write_gguf(path, "testarch", {}, _float_tensors(rng))
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_loads_split_files(tmp_path):
    """llama.cpp's loader finds the shards by name and reassembles the model."""
    pytest.importorskip("llama_cpp")
    from test_quant import llama_quantize_file, tiny_llama_metadata, tiny_llama_tensors

    weights = tiny_llama_tensors(np.random.default_rng(6))
    shards = quant.write_gguf(tmp_path / "tiny.gguf", "llama", tiny_llama_metadata(),
                              {k: (v, "F32") for k, v in weights.items()}, split_max_tensors=5)
    assert len(shards) == 3
    merged = tmp_path / "merged-q8.gguf"
    llama_quantize_file(shards[0], merged, 7)  # Q8_0
    r = GGUFReader(merged)
    assert sorted(t.name for t in r.tensors) == sorted(weights)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    assert np.array_equal(np.asarray(t.data).view(np.uint8), quant.quantize(weights[t.name], "Q8_0"))
