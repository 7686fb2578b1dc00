"""Tokenizer parity with llama.cpp (llama-cpp-python as the oracle) on the real models and a corpus.

The oracle calls are the ones llama-cpp-python's Llama.tokenize/detokenize are built on (llama_tokenize,
llama_detokenize, llama_token_to_piece), made on vocab-only model loads kept for the whole module.
"""
from __future__ import annotations

import ctypes
import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ggufrun.gguf_file import GGUFFile
from ggufrun.tokenizer import SUPPORTED_PRE_TOKENIZERS, Tokenizer, TokenAttr, _category_of_codepoints

CORPUS = json.loads((Path(__file__).parent / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
FLAG_COMBOS = [(True, True), (True, False), (False, True), (False, False)]   # (add_special, parse_special)


class Oracle:
    """llama.cpp's tokenizer for one GGUF file, loaded vocab-only."""

    def __init__(self, path: str):
        import llama_cpp
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode()
        cap = len(raw) + 8
        buf = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.lib.llama_token * max(1, len(ids)))(*ids)
        cap = 64 + 16 * len(ids)
        buf = ctypes.create_string_buffer(cap)
        n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        return buf.raw[:n]

    def piece(self, tid: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(512)
        n = self.lib.llama_token_to_piece(self.vocab, tid, buf, 512, 0, special)
        assert n >= 0
        return buf.raw[:n]


_oracles: dict[str, Oracle] = {}
_metadata: dict[str, dict] = {}


def oracle_for(path) -> Oracle:
    pytest.importorskip("llama_cpp")
    key = str(path)
    if key not in _oracles:
        _oracles[key] = Oracle(key)
    return _oracles[key]


def metadata_of(path) -> dict:
    key = str(path)
    if key not in _metadata:
        _metadata[key] = GGUFFile(key).metadata
    return _metadata[key]


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return Tokenizer.from_metadata(metadata_of(smollm2_path))


@pytest.fixture(scope="module")
def gemma3(gemma3_path) -> Tokenizer:
    return Tokenizer.from_metadata(metadata_of(gemma3_path))


def mismatches(tok: Tokenizer, oracle: Oracle, texts, combos=FLAG_COMBOS):
    bad = []
    for add_special, parse_special in combos:
        for text in texts:
            want = oracle.tokenize(text, add_special, parse_special)
            got = tok.encode(text, add_special=add_special, parse_special=parse_special)
            if got != want:
                bad.append((text, add_special, parse_special, got, want))
    return bad


def describe(bad) -> str:
    lines = [f"{len(bad)} mismatches"]
    for text, add_special, parse_special, got, want in bad[:8]:
        lines.append(f"  {text!r} add_special={add_special} parse_special={parse_special}\n"
                     f"    got  {got}\n    want {want}")
    return "\n".join(lines)


# -- the corpus itself --------------------------------------------------------------------------------

def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) == len(CORPUS)
    joined = "".join(CORPUS)
    assert "" in CORPUS
    for needle in ("<|im_start|>", "<start_of_turn>", "\t", "\n\n", "  ", "'s", "😀", "中", "ع", "न", "\u00a0", "def "):
        assert needle in joined, needle
    assert any(s.startswith(" ") for s in CORPUS) and any(s.endswith(" ") for s in CORPUS)
    assert any(len(s) > 15 and s.isdigit() for s in CORPUS)


# -- token ids against llama.cpp ------------------------------------------------------------------------

def test_smollm2_token_ids_match_llama_cpp(smollm2, smollm2_path):
    bad = mismatches(smollm2, oracle_for(smollm2_path), CORPUS)
    assert not bad, describe(bad)


def test_gemma3_token_ids_match_llama_cpp(gemma3, gemma3_path):
    bad = mismatches(gemma3, oracle_for(gemma3_path), CORPUS)
    assert not bad, describe(bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_random_text_matches_llama_cpp(smollm2, gemma3, smollm2_path, gemma3_path, text):
    for tok, path in ((smollm2, smollm2_path), (gemma3, gemma3_path)):
        bad = mismatches(tok, oracle_for(path), [text], combos=[(True, True), (False, False)])
        assert not bad, describe(bad)


# -- special ids, attributes, end-of-generation --------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_special_token_ids_match_llama_cpp(which, request):
    tok = request.getfixturevalue(which)
    o = oracle_for(request.getfixturevalue(f"{which}_path"))
    lib, vocab = o.lib, o.vocab

    def ours(tid):
        return -1 if tid is None else tid

    assert tok.vocab_size == lib.llama_vocab_n_tokens(vocab)
    assert ours(tok.bos_id) == lib.llama_vocab_bos(vocab)
    assert ours(tok.eos_id) == lib.llama_vocab_eos(vocab)
    assert ours(tok.eot_id) == lib.llama_vocab_eot(vocab)
    assert ours(tok.pad_id) == lib.llama_vocab_pad(vocab)
    assert tok.add_bos == lib.llama_vocab_get_add_bos(vocab)
    assert tok.add_eos == lib.llama_vocab_get_add_eos(vocab)
    assert tok.eog_ids == {i for i in range(tok.vocab_size) if lib.llama_vocab_is_eog(vocab, i)}
    control = [i for i in range(tok.vocab_size) if lib.llama_vocab_is_control(vocab, i)]
    assert control == [i for i in range(tok.vocab_size) if tok.token_attr(i) & TokenAttr.CONTROL]
    mismatched_attrs = [i for i in range(tok.vocab_size) if tok.token_attr(i) != lib.llama_vocab_get_attr(vocab, i)]
    assert not mismatched_attrs, [(i, tok.token_text(i)) for i in mismatched_attrs[:10]]


def test_expected_special_tokens_of_the_real_models(smollm2, gemma3):
    # pinned facts about the two files, independent of the oracle
    assert (smollm2.kind, smollm2.pre, smollm2.add_bos) == ("gpt2", "smollm", False)
    assert smollm2.token_text(smollm2.eos_id) == "<|im_end|>"
    assert smollm2.token_id("<|im_end|>") in smollm2.eog_ids
    assert smollm2.encode("<|im_start|>user", add_special=False) == [smollm2.token_id("<|im_start|>"), 4093]
    assert (gemma3.kind, gemma3.add_bos, gemma3.vocab_size) == ("llama", True, 262144)
    assert gemma3.token_text(gemma3.bos_id) == "<bos>"
    assert gemma3.token_id("<end_of_turn>") == gemma3.eot_id
    assert {gemma3.eos_id, gemma3.eot_id} <= gemma3.eog_ids
    assert gemma3.encode("") == [gemma3.bos_id] and gemma3.encode("", add_special=False) == []


# -- decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_every_token_piece_matches_llama_cpp(which, request):
    tok = request.getfixturevalue(which)
    o = oracle_for(request.getfixturevalue(f"{which}_path"))
    bad = [i for i in range(tok.vocab_size) if tok.token_to_piece(i, True) != o.piece(i, True)]
    assert not bad, [(i, tok.token_text(i), tok.token_to_piece(i), o.piece(i, True)) for i in bad[:5]]
    # without special rendering only non-normal tokens can change; check all of those and a stride of the rest
    ids = [i for i in range(tok.vocab_size) if tok.token_attr(i) != TokenAttr.NORMAL or i % 16 == 0]
    bad = [i for i in ids if tok.token_to_piece(i, False) != o.piece(i, False)]
    assert not bad, [(i, tok.token_text(i), tok.token_to_piece(i, False), o.piece(i, False)) for i in bad[:5]]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_decode_matches_llama_cpp_detokenize(which, request):
    tok = request.getfixturevalue(which)
    o = oracle_for(request.getfixturevalue(f"{which}_path"))
    bad = []
    for text in CORPUS:
        ids = tok.encode(text)
        for skip_special in (False, True):
            want = o.detokenize(ids, remove_special=False, unparse_special=not skip_special)
            if tok.decode(ids, skip_special=skip_special) != want.decode("utf-8", errors="replace"):
                bad.append((text, skip_special))
        for remove_special, unparse_special in ((True, False), (True, True)):
            if tok.detokenize(ids, remove_special, unparse_special) != o.detokenize(ids, remove_special, unparse_special):
                bad.append((text, remove_special, unparse_special))
    assert not bad, bad[:10]


def test_decode_round_trips_plain_text(smollm2, gemma3):
    for text in ("Hello, world! It's 2024.", "日本語 😀 naïve", "  two spaces\n\ttab"):
        assert smollm2.decode(smollm2.encode(text)) == text
        assert gemma3.decode(gemma3.encode(text), skip_special=True) == text


def test_clean_spaces_follows_llama_cpp_rules():
    from ggufrun.tokenizer import _clean_up_spaces
    assert _clean_up_spaces(b"Hello , world !") == b"Hello, world!"
    assert _clean_up_spaces(b"a ' b") == b"a'b"
    assert _clean_up_spaces(b"it 's he 'll we 're I 'm you 've don 't") == b"it's he 'll we're I'm you've don 't"
    assert _clean_up_spaces(b"") == b""


def test_stream_decoder_holds_back_partial_characters(smollm2, gemma3):
    for tok in (smollm2, gemma3):
        text = "Emoji 😀 and 中文 done"
        ids = tok.encode(text, add_special=False)
        dec = tok.stream_decoder()
        chunks = [dec.feed(i) for i in ids] + [dec.flush()]
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)
    # a character split over byte tokens: nothing comes out until its last byte arrives
    ids = smollm2.encode("😀", add_special=False)
    assert len(ids) > 1
    dec = smollm2.stream_decoder()
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "😀"


def test_stream_decoder_skip_special(smollm2):
    ids = smollm2.encode("<|im_start|>hi<|im_end|>")
    dec = smollm2.stream_decoder(skip_special=True)
    assert "".join(dec.feed_many(ids)) == "hi"


# -- other pre-tokenizers, via vocab-only files that reuse SmolLM2's vocabulary --------------------------

REQUIRED_PRE_TYPES = ["llama-bpe", "qwen2", "deepseek-v3", "gpt-2", "default", "smollm"]
# every distinct split llama.cpp implements, named by one pre value that selects it
PRE_TYPES = ["llama-bpe", "qwen2", "deepseek-v3", "gpt-2", "default", "smollm", "qwen35", "deepseek-llm",
             "deepseek-coder", "falcon", "starcoder", "jais-2", "spark2_5", "youtu", "poro-chat", "viking",
             "tekken", "chameleon", "gpt-4o", "granite-embed-multi-97m", "tiny_aya", "bailingmoe", "seed-coder",
             "ufakzeka", "afmoe", "laguna", "exaone-moe", "minicpm5", "chatglm-bpe", "command-r"]


def vocab_only_gguf(md: dict, pre: str) -> bytes:
    """A GGUF holding only SmolLM2's tokenizer keys, with tokenizer.ggml.pre = pre."""
    import gguf
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_string("general.name", "smollm2-vocab")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(md["tokenizer.ggml.tokens"])
        w.add_token_types(md["tokenizer.ggml.token_type"])
        w.add_token_merges(md["tokenizer.ggml.merges"])
        w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


@pytest.fixture(scope="module")
def pre_type_files(smollm2_path, tmp_path_factory):
    """One vocab-only file per pre value. GGUFWriter runs once; the others swap the pre string's bytes (a
    length-prefixed string in the key/value section, with nothing after it that depends on offsets)."""
    md = metadata_of(smollm2_path)
    placeholder = "pre-value-placeholder"
    template = vocab_only_gguf(md, placeholder)
    encoded = len(placeholder).to_bytes(8, "little") + placeholder.encode()
    assert template.count(encoded) == 1
    folder = tmp_path_factory.mktemp("pre_types")
    files = {}
    for pre in PRE_TYPES:
        files[pre] = folder / f"{pre}.gguf"
        files[pre].write_bytes(template.replace(encoded, len(pre).to_bytes(8, "little") + pre.encode()))
    return files


@pytest.mark.parametrize("pre", PRE_TYPES)
def test_pre_tokenizer_matches_llama_cpp(pre, pre_type_files):
    path = pre_type_files[pre]
    tok = Tokenizer.from_metadata(metadata_of(path))
    assert tok.pre == pre
    o = oracle_for(path)
    assert tok.add_bos == o.lib.llama_vocab_get_add_bos(o.vocab)
    # the add_special/parse_special handling is the same for every pre value (the real-model tests cover
    # it); llama.cpp's regex engine is slow, so the less common splits get every other corpus string
    texts = CORPUS if pre in REQUIRED_PRE_TYPES else CORPUS[::2]
    bad = mismatches(tok, o, texts, combos=[(True, True)])
    assert not bad, describe(bad)
    wrong_decode = [t for t in texts if tok.detokenize(tok.encode(t), False, True) != o.detokenize(tok.encode(t), False, True)]
    assert not wrong_decode, wrong_decode[:5]


def test_pre_types_under_test_cover_every_split_llama_cpp_has():
    from ggufrun.tokenizer import _PRE_TOKENIZERS, _SPLITS
    assert set(PRE_TYPES) <= set(SUPPORTED_PRE_TOKENIZERS)
    assert {_PRE_TOKENIZERS[p].split for p in PRE_TYPES} == set(_SPLITS)
    assert set(REQUIRED_PRE_TYPES) <= set(PRE_TYPES)


# -- metadata errors ----------------------------------------------------------------------------------------

def test_missing_or_malformed_keys_are_named(smollm2_path):
    md = metadata_of(smollm2_path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        broken = {k: v for k, v in md.items() if k != key}
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            Tokenizer.from_metadata(broken)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*'sentencepiece2'.*gpt2, llama"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "sentencepiece2"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre.*'no-such-pre'.*llama-bpe.*qwen2.*smollm"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.tokens"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.tokens": "not a list"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.token_type"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.token_type": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.bos_token_id"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.bos_token_id": "1"})


def test_missing_pre_falls_back_to_default_like_llama_cpp(smollm2_path):
    md = {k: v for k, v in metadata_of(smollm2_path).items() if k != "tokenizer.ggml.pre"}
    assert Tokenizer.from_metadata(md).pre == "default"


# -- Unicode classes ----------------------------------------------------------------------------------------

def test_unicode_classes_are_llama_cpp_s_not_the_regex_module_s():
    table = _category_of_codepoints()
    assert len(table) == 0x110000
    cls = {c: chr(table[ord(c)]) for c in "aZ5 \t!$\u00e9\u0663\u0301\u4e2d\U0001f600\ue000"}
    assert cls == {"a": "L", "Z": "L", "5": "N", " ": "Z", "\t": "C", "!": "P", "$": "S", "\u00e9": "L",
                   "\u0663": "N", "\u0301": "M", "\u4e2d": "L", "\U0001f600": "S", "\ue000": "C"}
    # assigned in Unicode 15.1 (in llama.cpp's tables) ...
    assert chr(table[0x2FFC]) == "S" and chr(table[0x2EBF0]) == "L"
    # ... but not what came later, which the installed regex module may already know
    assert chr(table[0x1C89]) == "U" and chr(table[0x0558]) == "U"


# -- speed ------------------------------------------------------------------------------------------------

def test_encoding_ten_thousand_tokens_of_prose_is_fast(smollm2, gemma3):
    rng = random.Random(7)
    words = " ".join(CORPUS[:40]).split()
    prose = " ".join(rng.choice(words) + rng.choice(["", "", ",", "."]) for _ in range(9000))
    for tok in (smollm2, gemma3):
        tok._word_cache.clear()
        start = time.perf_counter()
        ids = tok.encode(prose)
        elapsed = time.perf_counter() - start
        assert len(ids) >= 10000
        assert elapsed < 1.0, f"{tok!r}: {len(ids)} tokens took {elapsed:.2f}s"
