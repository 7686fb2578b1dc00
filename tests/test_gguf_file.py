"""The GGUF loader: every metadata type, zero-copy views, split files, and a clear error for bad input."""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggufrun.gguf_file import GGUFError, GGUFFile, split_paths


def write_small(path, *, n_tensors=3, extra_kv=None, version_patch=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int8("t.i8", -3)
    w.add_uint64("t.u64", 2**40)
    w.add_float64("t.f64", 0.125)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "bb", "", "日本"])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    rng = np.random.default_rng(0)
    for i in range(n_tensors):
        w.add_tensor(f"t{i}", rng.standard_normal((4, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small_file(tmp_path):
    return write_small(tmp_path / "m.gguf")


def test_metadata_of_every_type_and_views(small_file):
    with GGUFFile(small_file) as f:
        md = f.metadata
        assert md["GGUF.version"] == 3
        assert md["t.u32"] == 7 and md["t.i8"] == -3 and md["t.u64"] == 2**40
        assert md["t.f64"] == 0.125 and md["t.bool"] is True and md["t.str"] == "héllo ✓"
        assert md["t.arr_i32"] == [1, -2, 3]
        assert md["t.arr_str"] == ["a", "bb", "", "日本"]
        assert md["t.arr_nested"] == [[1, 2], [3]]
        assert f.arch == "llama"
        t = f.tensor("t1", (4, 32))
        assert t.shape == (4, 32) and t.qtype == gguf.GGMLQuantizationType.F32
        ref = gguf.GGUFReader(str(small_file)).get_tensor(1)
        np.testing.assert_array_equal(t.data.view(np.float32).reshape(4, 32), ref.data)
        # zero copy: the view shares memory with the mapping and is read-only
        assert not t.data.flags.writeable and not t.data.flags.owndata
        with pytest.raises(GGUFError, match=r"tensor 't1' has shape \[4, 32\], expected \[32, 4\]"):
            f.tensor("t1", (32, 4))
        with pytest.raises(GGUFError, match="missing tensor 'nope'"):
            f.tensor("nope")
        with pytest.raises(GGUFError, match="missing metadata key 'x.y'"):
            f.require("x.y")


def test_gguf_v2_is_read(tmp_path, small_file):
    # v2 and v3 share the layout for little-endian files; only the version field differs
    data = bytearray(small_file.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(data))
    with GGUFFile(p) as f:
        assert f.metadata["GGUF.version"] == 2 and len(f.tensor_infos) == 3


def test_alignment_key_is_honoured(tmp_path):
    p = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_custom_alignment(64)
    w.add_tensor("x", np.arange(64, dtype=np.float32))
    w.add_tensor("y", np.arange(8, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with GGUFFile(p) as f:
        assert f.tensor_infos["y"].offset % 64 == 0
        np.testing.assert_array_equal(f.tensor("y").data.view(np.float32), np.arange(8))


def _corrupt(tmp_path, small_file, name, mutate):
    data = bytearray(small_file.read_bytes())
    mutate(data)
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def _tensor_info_offset(data: bytes, name: str) -> int:
    i = data.index(name.encode())
    return i + len(name)  # right after the name: n_dims (u32), dims, type (u32), offset (u64)


def test_bad_magic(tmp_path, small_file):
    p = _corrupt(tmp_path, small_file, "bad.gguf", lambda d: d.__setitem__(slice(0, 4), b"GGML"))
    with pytest.raises(GGUFError, match=r"bad\.gguf: bad magic"):
        GGUFFile(p)


def test_unsupported_version(tmp_path, small_file):
    p = _corrupt(tmp_path, small_file, "v9.gguf", lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 9)))
    with pytest.raises(GGUFError, match="unsupported GGUF version 9"):
        GGUFFile(p)


def test_truncated_header_and_data(tmp_path, small_file):
    data = small_file.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:100])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated header"):
        GGUFFile(p)
    p.write_bytes(data[:-8])
    with pytest.raises(GGUFError, match=r"tensor 't2': data .* beyond the end of the file"):
        GGUFFile(p)
    p.write_bytes(data[:10])
    with pytest.raises(GGUFError, match="truncated header"):
        GGUFFile(p)


def test_unknown_tensor_type(tmp_path, small_file):
    def mutate(d):
        o = _tensor_info_offset(d, "t1") + 4 + 8 * 2
        d[o:o + 4] = struct.pack("<I", 77)
    with pytest.raises(GGUFError, match="tensor 't1': unknown tensor type 77"):
        GGUFFile(_corrupt(tmp_path, small_file, "q.gguf", mutate))


def test_duplicate_tensor_name(tmp_path, small_file):
    def mutate(d):
        i = d.index(b"t2", _tensor_info_offset(d, "t1"))
        d[i:i + 2] = b"t1"
    with pytest.raises(GGUFError, match="duplicate tensor name 't1'"):
        GGUFFile(_corrupt(tmp_path, small_file, "dup.gguf", mutate))


def test_misaligned_offset(tmp_path, small_file):
    def mutate(d):
        o = _tensor_info_offset(d, "t1") + 4 + 16 + 4
        off = struct.unpack_from("<Q", d, o)[0]
        d[o:o + 8] = struct.pack("<Q", off + 4)
    with pytest.raises(GGUFError, match="tensor 't1': data offset .* not aligned to 32"):
        GGUFFile(_corrupt(tmp_path, small_file, "mis.gguf", mutate))


def test_row_not_multiple_of_block(tmp_path, small_file):
    def mutate(d):
        o = _tensor_info_offset(d, "t0") + 4
        d[o:o + 8] = struct.pack("<Q", 33)                     # 33 elements per row ...
        d[o + 16:o + 20] = struct.pack("<I", 8)                # ... of Q8_0 (blocks of 32)
    with pytest.raises(GGUFError, match="tensor 't0': row of 33 elements is not a multiple of the Q8_0 block size 32"):
        GGUFFile(_corrupt(tmp_path, small_file, "blk.gguf", mutate))


def test_absurd_counts_fail_fast(tmp_path, small_file):
    p = _corrupt(tmp_path, small_file, "n.gguf", lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 2**60)))
    t = time.perf_counter()
    with pytest.raises(GGUFError, match="cannot fit"):
        GGUFFile(p)
    assert time.perf_counter() - t < 5.0  # a hang guard, not a benchmark


def test_missing_file():
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile("/nonexistent/model.gguf")


def write_split(tmp_path, n_shards=3, tensors_per_shard=2):
    """A split model the way gguf-split lays it out: metadata in shard 1, split.* keys in each."""
    rng = np.random.default_rng(1)
    names, arrays = [], []
    for s in range(n_shards):
        p = tmp_path / f"model-{s + 1:05d}-of-{n_shards:05d}.gguf"
        w = gguf.GGUFWriter(str(p), "llama")
        w.add_uint16("split.no", s)
        w.add_uint16("split.count", n_shards)
        w.add_int32("split.tensors.count", n_shards * tensors_per_shard)
        for j in range(tensors_per_shard):
            a = rng.standard_normal((2, 32)).astype(np.float32)
            names.append(f"s{s}.t{j}")
            arrays.append(a)
            w.add_tensor(names[-1], a)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return tmp_path / f"model-00001-of-{n_shards:05d}.gguf", names, arrays


def test_split_model_loads_as_one(tmp_path):
    first, names, arrays = write_split(tmp_path)
    assert split_paths(first)[2].endswith("model-00003-of-00003.gguf")
    with GGUFFile(first) as f:
        assert list(f) == names
        for n, a in zip(names, arrays):
            np.testing.assert_array_equal(f.tensor(n).data.view(np.float32).reshape(2, 32), a)
        assert f.file_size == sum(os.path.getsize(p) for p in split_paths(first))


def test_split_missing_shard(tmp_path):
    first, _, _ = write_split(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.gguf")
    with pytest.raises(GGUFError, match="missing split shard 2 of 3: .*model-00002-of-00003.gguf"):
        GGUFFile(first)


def test_split_opened_at_later_shard(tmp_path):
    write_split(tmp_path)
    with pytest.raises(GGUFError, match="open the first shard"):
        GGUFFile(tmp_path / "model-00002-of-00003.gguf")


# -- fuzzing: truncated and mutated real files never crash, hang or return garbage silently ---------

@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory):
    return write_small(tmp_path_factory.mktemp("fuzz") / "seed.gguf").read_bytes()


def _open_or_clean_error(path):
    try:
        with GGUFFile(path) as f:
            # whatever opened must be internally consistent: every tensor inside the file
            for name in f:
                t = f.tensor(name)
                assert t.nbytes == f.tensor_infos[name].nbytes
    except GGUFError as e:
        assert str(path) in str(e)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations(tmp_path, fuzz_seed, data):
    buf = bytearray(fuzz_seed)
    header_end = len(buf) - 3 * 4 * 32 * 4  # mutate mostly the header: that is where parsing happens
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        i = data.draw(st.integers(0, header_end - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        buf = buf[:cut]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(buf))
    _open_or_clean_error(p)


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_truncated_real_files(tmp_path, request, fixture):
    src = request.getfixturevalue(fixture)
    size = os.path.getsize(src)
    with open(src, "rb") as fh:
        head = fh.read(4 << 20)
    rng = np.random.default_rng(0)
    for cut in list(rng.integers(0, len(head), 20)) + [size - 1]:
        p = tmp_path / "cut.gguf"
        if cut < len(head):
            p.write_bytes(head[:cut])
        else:
            with open(src, "rb") as fh, open(p, "wb") as out:
                out.write(fh.read(cut))
        with pytest.raises(GGUFError):
            GGUFFile(p)


def test_real_files_open(smollm2_path, gemma3_path):
    with GGUFFile(smollm2_path) as f:
        assert f.arch == "llama" and len(f.tensor_infos) == 272
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert f.tensor("blk.0.attn_q.weight", (576, 576)).qtype == gguf.GGMLQuantizationType.Q4_1
    with GGUFFile(gemma3_path) as f:
        assert f.arch == "gemma3" and len(f.tensor_infos) == 236
        assert f.tensor("token_embd.weight", (262144, 640)).nbytes == 262144 * 640 // 32 * 34


def test_opening_a_huge_many_tensor_file_touches_only_the_header(tmp_path):
    """A Step-3.7-Flash-shaped sparse file with 10,000+ tensors: opening reads the header, no tensor data."""
    import resource
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import sparse_big
    p = tmp_path / "big.gguf"
    n = sparse_big.write(str(p), layers=12, experts=288, split_experts=True)
    assert n > 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with GGUFFile(p) as f:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert len(f.tensor_infos) == n
        data_start = f.data_offset
        assert f.file_size > 30 * 2**30          # tens of GiB apparent, almost nothing on disk
    # page faults on the mapping: the header's pages, plus the parser's own heap growth
    assert faults * 4096 < data_start + 64 * 2**20, (faults, data_start)
