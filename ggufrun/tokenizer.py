"""Tokenizers built from GGUF metadata whose token ids are identical to llama.cpp's.

Two model kinds are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

* ``gpt2``: byte-level BPE. The text is split into words by the pre-tokenizer that
  ``tokenizer.ggml.pre`` selects, each word is mapped byte by byte onto printable code points (the GPT-2
  byte alphabet) and merged by merge rank.
* ``llama``: SentencePiece-style BPE over scores (Gemma, Llama 1/2, Mistral v1...): spaces become U+2581,
  the highest-scoring adjacent pair is merged first, pieces that are no token fall back to ``<0xXX>`` bytes.

Before either runs, special tokens (control, user-defined, unknown types) are cut out of the text, the way
llama.cpp's ``tokenizer_st_partition`` does it: longest token text first, with the lstrip/rstrip
attributes applied. User-defined tokens are always cut out; control tokens only when ``parse_special``.

Where llama.cpp differs from the Hugging Face tokenizers (its own Unicode category tables, its regex
engine's ASCII-only ``\\s``, its decode-time space cleanup), this module follows llama.cpp.
"""
from __future__ import annotations

import codecs
import heapq
from collections.abc import Mapping
from typing import Iterable, Iterator

import regex

__all__ = ["Tokenizer", "StreamDecoder", "SUPPORTED_MODELS", "SUPPORTED_PRE_TOKENIZERS", "TokenAttr"]


class TokenAttr:
    """llama.cpp's per-token attribute bits (llama_token_attr)."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# GGUF tokenizer.ggml.token_type values (llama_token_type) and the attribute each one starts with
_TOKEN_TYPE_TO_ATTR = {
    0: TokenAttr.UNDEFINED, 1: TokenAttr.NORMAL, 2: TokenAttr.UNKNOWN, 3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED, 5: TokenAttr.UNUSED, 6: TokenAttr.BYTE,
}

# ---------------------------------------------------------------------------------------------------
# Unicode classes as llama.cpp sees them
#
# llama.cpp classifies code points with its own tables (generated from UnicodeData.txt, version 15.1)
# rather than with a regex engine's \p{..}. Newer Unicode versions (and so newer `regex` releases)
# assign characters that llama.cpp still treats as unassigned, and that changes how text splits.
# The table below is the general-category class of every code point at that version, run-length
# encoded: a class letter (U unassigned, N number, L letter, Z separator, M mark, P punctuation,
# S symbol, C other/control) followed by the run length in base 36.
# ---------------------------------------------------------------------------------------------------
_UNICODE_CATEGORY_RUNS = (
    "CwZ1P3S1P6S1P4NaP2S3P2LqP3S1P1S1LqP1S1P1S1CxZ1P1S5P1S2L1P1S1C1S4N2S1L1P2S1N1L1P1N3P1LnS1LvS1LcqS"
    "4LcSeL5S7L1S1L1ShM34L5S1L2U2L4P1L1U4S2L1P1L3U1L1U1LkU1L2bS1L3vS1M7L4mU1L12U2L1P6L15P2U2S3U1M19P1"
    "M1P1M2P1M2P1M1U8LrU4L4P2UbC6S3P2S1P2S2MbP1C1P3L17MlNaP4L2M1L2rP1L1M7C1S1M6L2M2S1M4L2NaL3S2L1PeU1"
    "C1L1M1LuMrU2L2hMbL1UeNaLxM9L2S1P3L1U2M1S2LmM4L1M9L1M3L1M5U2PfU1LpM3U2P1U1LbU5LoS1L6U1C2U6M8L16Mo"
    "C1MxL1iM3L1MiL1M7LaM2P2NaP1LgM3U1L8U2L2U2LmU1L7U1L1U3L4U2M1L1M7U2M2U2M3L1U8M1U4L2U1L3M2U2NaL2S2N"
    "6S2L1P1M1U2M3U1L6U4L2U2LmU1L7U1L2U1L2U1L2U2M1U1M5U4M2U2M3U3M1U7L4U1L1U7NaM2L3M1P1UaM3U1L9U1L3U1L"
    "mU1L7U1L2U1L5U2M1L1M8U1M3U1M3U2L1UfL2M2U2NaP1S1U7L1M6U1M3U1L8U2L2U2LmU1L7U1L2U1L5U2M1L1M7U2M2U2M"
    "3U7M3U4L2U1L3M2U2NaS1L1N6UaM1L1U1L6U3L3U1L4U3L2U1L1U1L2U3L2U3L3U3LcU4M5U3M3U1M4U2L1U6M1UeNdS8U5M"
    "5L8U1L3U1LnU1LgU2M1L1M7U1M3U1M4U7M2U1L3U2L1U2L2M2U2NaU7P1N7S1L1M3P1L8U1L3U1LnU1LaU1L5U2M1L1M7U1M"
    "3U1M4U7M2U6L2U1L2M2U2NaU1L2M1UcM4L9U1L3U1L15M2L1M7U1M3U1M4L1S1U4L3M1N7L3M2U2NjS1L6U1M3U1LiU3LoU1"
    "L9U1L1U2L7U3M1U4M6U1M1U1M8U6NaU2M2P1UcL1cM1L2M7U4S1L7M8P1NaP2U11L2U1L1U1L5U1LoU1L1U1LaM1L2M9L1U2"
    "L5U1L1U1M7U1NaU2L4UwL1S3PfS1P1S3M2S6NkS1M1S1M1S1M1P4M2L8U1L10U4MkP1M2L5MbU1M10U1S8M1S6U1S2P5S4P2"
    "U11L17MkL1NaP6L6M4L4M3L1M3L2M7L3M4LdMcL1M1NaM4S2L12U1L1U5L1U2L17P1L99U1L4U2L7U1L1U1L4U2L15U1L4U2"
    "LxU1L4U2L7U1L1U1L4U2LfU1L1lU1L4U2L1vU2M3P9NkU3LgSaU6L2eU2L6U2P1Lh8S1P1LhZ1LqP2U3L23P3N3L8U7LiM4U"
    "9LjM3P2U9LiM2UcLdU1L3U1M2UcL1gMwP3L1P3S1L1M1U2NaU6NaU6PbM3C1M1NaU6L2hU7L5M2LyM1L1U5L1yUaLvU1McU4"
    "McU4S1U3P2NaLuU2L5UbL18U4LqU6NbU3SyLnM5U2P2L1hMaU1MtU2M1NaU6NaU6P7L1P6U2MvU1dM5L1bMhL8U3NaP7SaM9"
    "S9P2U1M3LuMdL2NaL18MeU8P4L10MkU3P5NaU3L3NaL10P2L9U7L17U2L3P8U8M3P1MlL4M1L6M1L2M3L1U5L5cM1sL7qU2L"
    "6U2L12U2L6U2L8U1L1U1L1U1L1U1LvU2L1hU1L7S1L1S3L3U1L7S3L4U2L6U1S3LdS3U2L3U1L7S2U1ZbC5PoZ2C5Z1PkS1P"
    "dS1PcZ1C5U1CaN1L1U2N6S3P2L1NaS3P2U1LdU3SxUfMxUfS2L1S4L1S2LaS1L1S3L5S6L1S1L1S1L1S1L4S1LbS2L4S5L5S"
    "4L1S1N1fL2N5S2U4SagP4StP2S70UpSbUlN1oS26NmSh4PeNuS1dP2SvPaSb7PmS1rP4SwP2SaeU2SwU1S2xL6dS6L4M3L2U"
    "5P4N1P2L12U1L1U5L1U2L1kU7L1P1UeM1LnU9L7U1L7U1L7U1L7U1L7U1L7U1L7U1L7U1MwP1bL1PwS2PcUySqU1S2hUcS5y"
    "UqSgZ1P3S1L2N1PaS2PcS1N9M6P1L5S2N3L2P1S2U1L2eU2M2S2L3P1L2iP1L4U5L17U1L2mU1S2N4SaLwS10UbS1LgSvU1N"
    "aSuN8S1NfSwNaS13NfS8wL534S1sLh3hU3S1jU9L1aP2L7hP3LgNaL2UkL1bM4P1MaP1LvM2L1yNaM2P6U8SnL9S2L2vS2L1"
    "sU5L2U1L1U1L5UoLgM1L3M1L4M1LnM5S4M1U3N6S4U6L1gP4U8M2L1eMiU8P2NaU6MiL6P3L1P1L2M1NaLsM8P2LnMdUbP1L"
    "tU3M4L1bMePdU1L1NaU4P2L5M1LaNaL5U1L15MeU9L3M1L8M2U2NaU2P4LnS3L1M3L1eM1L1M3L2M2L5M2L1M1L1UoL3P2Lb"
    "M5P2L3M2UaL6U2L6U2L6U9L7U1L7U1L17S1LeS2U4L37M8P1M2U2NaU6L8mcUcLnU4L1dU4C6ioLa6U2L2yU12L7UcL5U5L1"
    "M1LaS1LdU1L5U1L1U1L2U1L2U1L30ShUgLa3P2SgL1sU2L1iU7S1UwLcS4MgPaU6MgPzU1PeS1P1S3U1P1S1P2U4L5U1L3rU"
    "2C1U1P3S1P6S1P4NaP2S3P2LqP3S1P1S1LqP1S1P1S1P7L2hU3L6U2L6U2L6U2L3U3S7U1S7UaC3S2U2LcU1LqU1LjU1L2U1"
    "LfU2LeUyL3fU5P3U4N19U3S9N1lShN2S3U1SdU3S1U1bS19M1U3mLtU3L1dUfM1NrU4LwN4U9LkN1L8N1U5L12M5U5LuU1P1"
    "L10U4L8P1N5U16L4eU2NaU6L10U4L10U4L14U8L1gUbP1LbU1LfU1L7U1L2U1LbU1LfU1L7U1L2U1vL8nU9LmUaL8UoL6U1L"
    "16U1L9U1xL6U2L1U1L18U1L2U3L1U2LnU1P1N8LnS2N7LvU8N9U1cLjU1L2U5N5LmN6U3P1LqU5P1U1sL1kU4N2L2NgU2N1a"
    "L1M3U1M2U5M4L4U1L3U1LtU2M3U4M1N9U7P9U7LtN2P1LtN3UwL8S1LsM2U4N5P7U9L1iU3P7LmU2N8LjU5N8LiU7P4UcN7U"
    "28L21U1jL1fUdL1fU7N6L10M4U8NaU86NvU1L16U1M2P1U2L2U23M3LtNaL1U8LmMbN4P5UmLiM4P4U12LlN7UkLnU9M3L1h"
    "MfP7U4NuM1L2M2L1U9M4L19MbP2C1P4M1UaC1U2LpU7NaU6M3L10MeU1NaP4L1M2L1U8LzM1P2L1U9M3L1cMeL4P4M4P1M2N"
    "aL1P1L1P3U1NkUbLiU1LpMcP6M1L2M1U1qL7U1L1U1L4U1LfU1LaP1U6L1bMcU5NaU6M4U1L8U2L2U2LmU1L7U1L2U1L5U1M"
    "2L1M7U2M2U2M3U2L1U6M1U5L5M2U2M7U3M5U3vL1hMiL4P5NaP2U1P1M1L3UuL1cMkL2P1L1U8NaU4mL1bM7U2M9PnL4M2Uy"
    "L1cMhP3L1UbNaU6PdUjL17MdL1P1U6NaU1iLrU2MfU4NcP3S1L7U55L18MfP1U2sL1sNjUcL8U2L1U2L8U1L2U1LoM6U1M2U"
    "2M4L1M1L1M2P3U9NaU1yL8U2L13M7U2M7L1P1L1M1UrL1MaL14M7L1M4P8M1U8L1MbL1aMgP3L1P5UdL21U7PaU6uL9U1L11"
    "M8U1M8L1P5UaNtU3P2LuU2MmU1MeU21L7U1L2U1L12M6U3M1U1M2U1M7L1M1U8NaU6L6U1L2U1LwM5U1M2U1M5L1U7NaU8mL"
    "jM4P2U7M2L1M1LdU1LyM7U3M5PdNaU2eL1UfNlStUdP1LpmU2uN33U1P5UbL5gU218L2pP2UdLtsCgM1L6MfU33eLg7U6ntL"
    "ftU7LvU1NaU4P2L27U1NaU6LuU2M5P1UaL1cM7P5S4L4P1S1UaNaU1N7U1LlU5LjUj4L1sNnP4U2tL23U4M1L1M1jU7M4LdU"
    "1sL2P1L1M1UbM2UeL4qgU8LyeU16L9U6w7L4U1L7U1L2U1L83UfL1UtL3U2L1UeL4U8Lb0U1s4L2zU5LdU3L9U7LaU2S1M2P"
    "1C4U3mkM1aU2MnU9S38U1oS6uUaS13U2S1oM5S3M6C8M8S2M7SuM4S1pUlS1uM3S1U3eNkUcNkUcS2fU9NpU3rL2dU1L1zU1"
    "L2U2L1U2L2U2L4U1LcU1L1U1L7U1L1tU1L4U2L8U1L7U1LsU1L4U1L5U1L1U3L7U1L9gU2LpS1LpS1LvS1LpS1LvS1LpS1Lv"
    "S1LpS1LvS1LpS1L8U2N1eSe8M1jS4M1eS8M1SeM1S2P5UfM5U1MfUuoLvU6L6U5xM7U1MhU2M7U1M2U1M5U5L1qUxM1U34L1"
    "9U3M7L7U2NaU4L1S1U8wLuM1UhL18M4NaU5S1UcwLsM4NaUkmL7U1L4U1L2U1LfU1L5hU2N9M7U15L1wM7L1U4NaU4P2UltN"
    "1nS1N3S1N4U24N19S1NfU5eL4U1LrU1L2U1L1U2L1U1LaU1L4U1L1U1L1U6L1U4L1U1L1U1L1U1L3U1L2U1L1U2L1U1L1U1L"
    "1U1L1U1L1U1L2U1L1U2L4U1L7U1L4U1L4U1L1U1LaU1LhU5L3U1L5U1LhU1gS2U7iS18U4S2sUcSfU2SfU1SfU1S11UaNdS4"
    "hU1kStUdS18U4S9U7S2UeS6U4aSrcU4ShU3SdU3S3bU4S2nU6ScU4S1UfScU4S1kU8SaU6S14U8SuU2S2U26S9gUcSeU2SdU"
    "3S9U7S1aU1S7U8SeU4S9U7S9U7S43U1S1jU11NaUsmLwyoUwL37eU6L66U2L4g2UeL5rlUfLhaU1wiLf2U15uL3t7U5L38gU"
    "f975C1UuC2oU3kM6oU1e6oC1ekeU2C1ekeU2"
)

# llama.cpp's whitespace set (Unicode White_Space): what its \s means once text is classified
_WHITESPACE_CODEPOINTS = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B)) + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# C's isspace() in the "C" locale, which llama.cpp uses for lstrip/rstrip and its regex engine uses for \s
_ASCII_SPACE = " \t\n\x0b\x0c\r"

_category_table: bytes | None = None


def _category_of_codepoints() -> bytes:
    """One class letter (as a byte) per code point, 0x110000 entries, decoded once on first use."""
    global _category_table
    if _category_table is None:
        runs = regex.findall(r"([A-Z])([0-9a-z]+)", _UNICODE_CATEGORY_RUNS)
        table = b"".join(letter.encode() * int(length, 36) for letter, length in runs)
        if len(table) != 0x110000:
            raise AssertionError(f"Unicode category table decodes to {len(table)} code points, not 0x110000")
        _category_table = table
    return _category_table


# Pre-tokenizer patterns run over a "class string": ASCII stays itself (the patterns spell out ASCII
# letters, digits and punctuation), every other code point becomes one private-use character that stands
# for its class. This is how llama.cpp's regex fallback works too (it collapses code points to class
# bytes), and it makes llama.cpp's hand-written splitters expressible as ordinary patterns.
_CLASS_CHAR = {
    ord("L"): "\ue001", ord("N"): "\ue002", ord("P"): "\ue003", ord("M"): "\ue004", ord("S"): "\ue005",
}
_OTHER_CLASS_CHAR = "\ue000"   # control, format, private use, unassigned, non-space separators

# what each \p{..} class (and \s, \d) matches in a class string: llama.cpp's ASCII sets plus the class char
_PATTERN_CLASS = {
    "N": "0-9\ue002",
    "L": "A-Za-z\ue001",
    "P": "!-#%-*,-/:-;?-@\\[-\\]_{}\ue003",
    "M": "\ue004",
    "S": "$+<->^`|~\ue005",
    "s": "\\t\\n\\x0b\\x0c\\r ",
    "d": "0-9",
}
# llama.cpp maps the letter subcategories onto "letter" (its tables do not distinguish case)
for _sub in ("Lu", "Ll", "Lt", "Lm", "Lo"):
    _PATTERN_CLASS[_sub] = _PATTERN_CLASS["L"]


class _ClassStringMap(dict):
    """str.translate mapping: code point -> its class character, computed on first sight and kept."""

    def __missing__(self, cp: int) -> str:
        if cp < 0x80:
            ch = chr(cp)
        elif cp in _WHITESPACE_CODEPOINTS:
            ch = "\x0b"   # non-ASCII whitespace: llama.cpp substitutes vertical tab so \s matches it
        else:
            ch = _CLASS_CHAR.get(_category_of_codepoints()[cp], _OTHER_CLASS_CHAR)
        self[cp] = ch
        return ch


class _SpaceOnlyMap(dict):
    """str.translate mapping for patterns without \\p{..}: only non-ASCII whitespace is replaced."""

    def __missing__(self, cp: int) -> str:
        ch = "\x0b" if cp >= 0x80 and cp in _WHITESPACE_CODEPOINTS else chr(cp)
        self[cp] = ch
        return ch


_CLASS_STRING_MAP = _ClassStringMap()
_SPACE_ONLY_MAP = _SpaceOnlyMap()


def _class_string(text: str) -> str:
    return text if text.isascii() else text.translate(_CLASS_STRING_MAP)


def _space_only_string(text: str) -> str:
    return text if text.isascii() else text.translate(_SPACE_ONLY_MAP)


def _translate_pattern(pattern: str) -> tuple[str, bool]:
    """Rewrite one of llama.cpp's pre-tokenizer patterns for Python's `regex` over a class string.

    Returns the pattern and whether it must run on the class string (it uses \\p{..}) or on the text
    itself. \\s and \\d become llama.cpp's ASCII sets, `$` means end of input as in ECMAScript.
    """
    uses_classes = "\\p{" in pattern
    out = []
    inside = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "p" and i + 2 < n and pattern[i + 2] == "{":
                close = pattern.index("}", i)
                name = pattern[i + 3:close]
                if name not in _PATTERN_CLASS:
                    raise ValueError(f"pre-tokenizer pattern uses unsupported class \\p{{{name}}}")
                body = _PATTERN_CLASS[name]
                out.append(body if inside else f"[{body}]")
                i = close + 1
                continue
            if e in "sd":
                body = _PATTERN_CLASS[e]
                out.append(body if inside else f"[{body}]")
            elif e == "S":
                if inside:
                    raise ValueError("pre-tokenizer pattern uses \\S inside a character class")
                out.append(f"[^{_PATTERN_CLASS['s']}]")
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        elif c == "." and not inside:
            raise ValueError("pre-tokenizer pattern uses '.', whose ECMAScript meaning is not mapped")
        out.append(c)
        i += 1
    if uses_classes and any(ord(ch) >= 0x80 for ch in pattern):
        raise ValueError("pre-tokenizer pattern mixes \\p{..} classes with non-ASCII characters")
    return "".join(out), uses_classes


# ---------------------------------------------------------------------------------------------------
# Pre-tokenizers: the word-splitting steps each tokenizer.ggml.pre value selects in llama.cpp.
# Each step refines the current spans: matches and the gaps between them both become spans.
# ---------------------------------------------------------------------------------------------------
_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_JAIS2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
          r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
_ASCII_PUNCT_THEN_WORD = r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
_DEEPSEEK3_MAIN = (_ASCII_PUNCT_THEN_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPARK_MAIN = (_ASCII_PUNCT_THEN_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]"
               r"|\s+(?!\S)|\s+")
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS_CI
                + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                + _CONTRACTIONS_CI + "?")
_YOUTU = _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TINY_AYA = _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# tekken and gpt-4o approximate upper/lower case with lookaheads, since llama.cpp has one letter class
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS_CI
          + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS_CI
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GRANITE_EMB_MULTI = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
                      + _CONTRACTIONS_CI
                      + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
                      + _CONTRACTIONS_CI + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_DEEPSEEK_LLM_LATIN = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")
_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_AFMOE_ASIAN = ("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
                "\u2f00-\u2fdf\u0e00-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f"
                "\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+")
_EXAONE_MOE = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
_SEED_CODER = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_MINICPM5 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")

# a step that is not a pattern: digit runs cut into groups of three from the right, llama.cpp's
# hand-written splitter for afmoe and tiny_aya (it also glues preceding non-digits onto the first group)
_DIGITS_BY_THREE = "digits-by-three"

_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "jais2": [_JAIS2],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LLM_LATIN, _DEEPSEEK_LLM_PUNCT, r"\s+$", _CJK_HANGUL, r"\p{N}+"],
    "deepseek3": [r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_MAIN],
    "spark2_5": [r"\p{N}{1,3}", _CJK_KANA, _SPARK_MAIN, r"\p{N}"],
    "youtu": ["[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
              "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA, _YOUTU],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "digits-then-gpt2": [r"\p{N}", _GPT2],
    "gpt2": [_GPT2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
    "tekken": [_TEKKEN],
    "chameleon": ["<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\\t\\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", _GPT2],
    "gpt4o": [_GPT4O],
    "granite-emb-multi": [_GRANITE_EMB_MULTI],
    "tiny_aya": [_DIGITS_BY_THREE, _TINY_AYA],
    "bailingmoe": [_BAILINGMOE],
    "seed-coder": [_SEED_CODER],
    "ufakzeka": [_UFAKZEKA],
    "afmoe": [_DIGITS_BY_THREE, _AFMOE_ASIAN, _DEEPSEEK3_MAIN],
    "laguna": ["[^\\n]+|[\\n]+", _QWEN2],
    "exaone-moe": [_EXAONE_MOE],
    "minicpm5": [r"\p{N}{1,3}", _MINICPM5],
}


class _Pre:
    """How one tokenizer.ggml.pre value tokenizes: its split steps and the flags llama.cpp sets for it."""

    def __init__(self, split: str, clean_spaces: bool = True, ignore_merges: bool = False,
                 add_bos: bool = False, no_bos: bool = False):
        self.split = split
        self.clean_spaces = clean_spaces
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos
        self.no_bos = no_bos


def _pre_table() -> dict[str, _Pre]:
    t: dict[str, _Pre] = {}

    def add(names: str, *args, **kw):
        for name in names.split():
            t[name] = _Pre(*args, **kw)

    add("default", "default")
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
        ignore_merges=True, add_bos=True)
    add("dbrx smaug-bpe", "llama3")
    add("deepseek-llm", "deepseek-llm", clean_spaces=False)
    add("deepseek-coder", "deepseek-coder", clean_spaces=False)
    add("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", "deepseek3", clean_spaces=False)
    add("spark2_5", "spark2_5", clean_spaces=False)
    add("youtu", "youtu", clean_spaces=False, ignore_merges=True)
    add("falcon", "falcon")
    add("mpt olmo jais exaone4", "gpt2")
    add("starcoder refact codeshell exaone minerva-7b mellum2", "digits-then-gpt2")
    add("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "jina-v1-en jina-v2-code roberta-bpe", "gpt2")
    add("jais-2", "jais2")
    add("command-r smollm", "digits-then-gpt2", clean_spaces=False)
    add("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", "qwen2", clean_spaces=False)
    add("megrez stablelm2", "qwen2")
    add("qwen35", "qwen35", clean_spaces=False)
    add("poro-chat", "poro", clean_spaces=False)
    add("bloom gpt3-finnish", "poro")
    add("chatglm-bpe", "llama3", no_bos=True)
    add("glm4 glm5", "llama3", no_bos=True, ignore_merges=True)
    add("viking", "viking", clean_spaces=False)
    add("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True)
    add("chameleon", "chameleon", clean_spaces=False, add_bos=True)
    add("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", clean_spaces=False)
    add("granite-embed-multi-97m", "granite-emb-multi", clean_spaces=False, ignore_merges=True)
    add("tiny_aya cohere2moe", "tiny_aya", clean_spaces=False)
    add("trillion granite-docling", "gpt2", clean_spaces=False)
    add("bailingmoe bailingmoe2 llada-moe", "bailingmoe", clean_spaces=False)
    add("seed-coder", "seed-coder", clean_spaces=False)
    add("ufakzeka", "ufakzeka", clean_spaces=False)
    add("grok-2", "qwen2", clean_spaces=False)
    add("afmoe", "afmoe", clean_spaces=False)
    add("laguna", "laguna", clean_spaces=False)
    add("exaone-moe", "exaone-moe")
    add("minicpm5", "minicpm5", ignore_merges=True)
    return t


_PRE_TOKENIZERS = _pre_table()
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))
SUPPORTED_MODELS = ("gpt2", "llama")
_compiled_splits: dict[str, list] = {}


def _split_steps(split: str) -> list:
    steps = _compiled_splits.get(split)
    if steps is None:
        steps = []
        for pattern in _SPLITS[split]:
            if pattern is _DIGITS_BY_THREE:
                steps.append((None, True))
            else:
                translated, on_classes = _translate_pattern(pattern)
                steps.append((regex.compile(translated), on_classes))
        _compiled_splits[split] = steps
    return steps


_DIGIT_RUN = regex.compile("[0-9\ue002]+")


def _digits_by_three(cls: str, a: int, b: int, out: list) -> None:
    prev = a   # end of the last span handed out: text since then joins the next cut
    for m in _DIGIT_RUN.finditer(cls, a, b):
        s, e = m.span()
        cut = s + (e - s) % 3
        if cut == s:
            cut += 3
        while cut <= e:
            out.append((prev, cut))
            prev = cut
            cut += 3
    if prev < b:
        out.append((prev, b))


def _split_words(text: str, split: str) -> list[str]:
    """Cut text into the words the BPE merges run on, as llama.cpp's unicode_regex_split does."""
    spans = [(0, len(text))]
    cls = plain = None
    for pattern, on_classes in _split_steps(split):
        if on_classes:
            subject = cls = _class_string(text) if cls is None else cls
        else:
            subject = plain = _space_only_string(text) if plain is None else plain
        refined: list = []
        for a, b in spans:
            if pattern is None:
                _digits_by_three(subject, a, b, refined)
                continue
            last = a
            for m in pattern.finditer(subject, a, b):
                s, e = m.span()
                if s > last:
                    refined.append((last, s))
                if e > s:
                    refined.append((s, e))
                last = e
            if last < b:
                refined.append((last, b))
        spans = refined
    return [text[a:b] for a, b in spans]


def _gpt2_byte_alphabet() -> list[str]:
    """Byte -> the printable code point GPT-2 BPE vocabularies spell it with."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    for b in printable:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_BYTE_TO_UNICODE = _gpt2_byte_alphabet()
_UNICODE_TO_BYTE = {ch: b for b, ch in enumerate(_BYTE_TO_UNICODE)}
_BYTE_ENCODE_TABLE = {b: ch for b, ch in enumerate(_BYTE_TO_UNICODE)}

_SPM_SPACE = "\u2581"   # SentencePiece's visible space

# token texts llama.cpp recognises as end-of-turn / FIM / end-of-generation markers (llama-vocab.cpp)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                  "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                  "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                  "\u2581<MID>", "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
_ALWAYS_RENDERED_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")   # gpt-oss

_SPECIAL_ID_KEYS = ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
                    "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
_SPECIAL_ID_METADATA = [
    ("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"), ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"), ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"), ("mask", "tokenizer.ggml.mask_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"), ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"), ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"), ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    # deprecated spellings, read after the current ones as llama.cpp does
    ("fim_pre", "tokenizer.ggml.prefix_token_id"), ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
]

_WORD_CACHE_LIMIT = 1 << 17


def _token_bytes(text: str) -> bytes:
    # vocabulary strings that were not valid UTF-8 in the file arrive surrogate-escaped; keep their bytes
    return text.encode("utf-8", "surrogateescape")


def _byte_as_text(b: int) -> str:
    """A single byte as the str a vocabulary entry holding exactly that byte would be."""
    return chr(b) if b < 0x80 else chr(0xDC00 + b)


def _merge_pairs(syms: list[str], priority) -> list[str]:
    """Merge adjacent symbols pair by pair, the pair with the smallest priority(left, right) first and
    the leftmost on ties, as llama.cpp's BPE (merge rank) and SentencePiece (minus the merged token's
    score) sessions do; priority None means the pair never merges. Merged-away symbols become ""."""
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = priority(syms[i], syms[i + 1])
        if r is not None:
            heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
            continue   # a stale pair: one side has merged since (symbols only grow)
        syms[left] = merged
        syms[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        p = prv[left]
        if p >= 0:
            r = priority(syms[p], merged)
            if r is not None:
                heapq.heappush(heap, (r, p, left, syms[p] + merged))
        q = nxt[left]
        if q >= 0:
            r = priority(merged, syms[q])
            if r is not None:
                heapq.heappush(heap, (r, left, q, merged + syms[q]))
    return syms


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary, identical to llama.cpp's llama_tokenize/detokenize."""

    kind: str                 # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str | None           # tokenizer.ggml.pre for gpt2 vocabularies
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    unk_id: int | None
    pad_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, md: Mapping) -> "Tokenizer":
        """Build from GGUF metadata (key -> python value). Missing or malformed keys raise ValueError."""
        return cls(md)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        from ggufrun.gguf_file import GGUFFile
        with GGUFFile(path) as f:
            return cls(f.metadata)

    def __init__(self, md: Mapping):
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no 'tokenizer.ggml.model': the file carries no vocabulary")
        if model not in SUPPORTED_MODELS:
            raise ValueError(f"'tokenizer.ggml.model' = {model!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODELS)}")
        self.kind = model
        tokens = _str_list(md, "tokenizer.ggml.tokens", required=True)
        n = len(tokens)
        if n == 0:
            raise ValueError("'tokenizer.ggml.tokens' is empty")
        self.vocab_size = n
        # llama.cpp gives empty vocabulary strings a placeholder text so every id has a distinct one
        self._texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._ids = {t: i for i, t in enumerate(self._texts)}

        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            self._scores = [0.0] * n
        else:
            if not _is_list_like(scores) or len(scores) < n:
                raise ValueError(f"'tokenizer.ggml.scores' must be a list of at least {n} numbers")
            self._scores = [float(s) for s in scores[:n]]

        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            self._attrs = [TokenAttr.NORMAL] * n
        else:
            if not _is_list_like(types) or len(types) < n:
                raise ValueError(f"'tokenizer.ggml.token_type' must be a list of at least {n} ints")
            try:
                self._attrs = [_TOKEN_TYPE_TO_ATTR.get(int(t), TokenAttr.UNDEFINED) for t in types[:n]]
            except (TypeError, ValueError):
                raise ValueError("'tokenizer.ggml.token_type' must be a list of ints") from None

        special = dict.fromkeys(_SPECIAL_ID_KEYS)
        if model == "llama":
            self.pre = None
            self._pre = None
            special.update(bos=1, eos=2, unk=0)
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
            self.clean_spaces = False
            self._ignore_merges = False
        else:
            self._ranks = self._read_merges(md)
            pre = md.get("tokenizer.ggml.pre")
            if pre is None or pre == "":
                pre = "default"   # llama.cpp warns and falls back to the default splits
            if not isinstance(pre, str) or pre not in _PRE_TOKENIZERS:
                raise ValueError(f"'tokenizer.ggml.pre' = {pre!r} is not a supported pre-tokenizer; supported: "
                                 f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
            self.pre = pre
            self._pre = _PRE_TOKENIZERS[pre]
            special.update(bos=11, eos=11)
            if self._pre.no_bos:
                special["bos"] = None
            self.add_space_prefix = False
            self.add_bos, self.add_eos = self._pre.add_bos, False
            self.clean_spaces = self._pre.clean_spaces
            self._ignore_merges = self._pre.ignore_merges
            _split_steps(self._pre.split)   # compile now: a bad pattern should fail at load, not mid-encode

        self.add_space_prefix = _flag(md, "tokenizer.ggml.add_space_prefix", self.add_space_prefix)

        for name in special:
            if special[name] is not None and special[name] >= n:
                special[name] = None   # a default that does not exist in this vocabulary
        for name, key in _SPECIAL_ID_METADATA:
            value = md.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"'{key}' must be an integer token id, got {value!r}")
            if 0 <= value < n:
                special[name] = value   # an out-of-range id is ignored, keeping the default
        self.add_bos = _flag(md, "tokenizer.ggml.add_bos_token", self.add_bos)
        self.add_eos = _flag(md, "tokenizer.ggml.add_eos_token", self.add_eos)

        self._detect_marker_tokens(special)
        self._apply_model_attribute_quirks(md)

        self.bos_id = special["bos"]
        self.eos_id = special["eos"]
        self.eot_id = special["eot"]
        self.eom_id = special["eom"]
        self.unk_id = special["unk"]
        self.pad_id = special["pad"]
        self.fim_ids = {k[4:]: special[k] for k in special if k.startswith("fim_")}

        # special tokens cut out of the text before tokenizing, longest text first
        specials = [i for i, a in enumerate(self._attrs)
                    if a & (TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)]
        specials.sort(key=lambda i: -len(_token_bytes(self._texts[i])))
        self._special_order = {tid: k for k, tid in enumerate(specials)}
        self._specials_by_prefix: dict[str, list[int]] = {}
        for tid in specials:
            self._specials_by_prefix.setdefault(self._texts[tid][:2], []).append(tid)

        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._word_cache: dict[str, list[int]] = {}
        if model == "llama":
            self._init_spm_chunking()

    @staticmethod
    def _read_merges(md: Mapping) -> dict[tuple[str, str], int]:
        merges = _str_list(md, "tokenizer.ggml.merges", required=True)
        ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            cut = merge.find(" ", 1)
            pair = (merge[:cut], merge[cut + 1:]) if cut >= 0 else ("", "")
            ranks.setdefault(pair, rank)   # the first occurrence keeps its rank
        return ranks

    def _detect_marker_tokens(self, special: dict) -> None:
        """Find EOT/EOM/FIM tokens by their text and compute the end-of-generation set, as llama.cpp does.

        llama.cpp takes the first matching text in its hash map's order when several exist; here the
        lowest id wins. Every token it recognises by text is forced to CONTROL.
        """
        attrs = self._attrs
        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pre", _FIM_PRE_TEXTS),
                            ("fim_suf", _FIM_SUF_TEXTS), ("fim_mid", _FIM_MID_TEXTS),
                            ("fim_pad", _FIM_PAD_TEXTS), ("fim_rep", _FIM_REP_TEXTS),
                            ("fim_sep", _FIM_SEP_TEXTS)):
            if special[name] is not None:
                continue
            found = [self._ids[t] for t in texts if t in self._ids]
            if found:
                special[name] = min(found)
                attrs[special[name]] |= TokenAttr.CONTROL

        for i, a in enumerate(attrs):
            if a & TokenAttr.CONTROL and not a & TokenAttr.UNUSED and "unused" in self._texts[i]:
                attrs[i] = a | TokenAttr.UNUSED

        eog = {special[k] for k in ("fim_pad", "fim_rep", "fim_sep") if special[k] is not None}
        for t in _EOG_TEXTS:
            tid = self._ids.get(t)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= TokenAttr.CONTROL
        for t in _ALWAYS_RENDERED_TEXTS:
            tid = self._ids.get(t)
            if tid is not None:
                attrs[tid] = TokenAttr.USER_DEFINED
        for k in ("eos", "eot", "eom"):
            if special[k] is not None:
                eog.add(special[k])

        def eog_with(text):
            return next((i for i in eog if self._texts[i] == text), None)

        # o200k-harmony / solar-open: "<|end|>" ends a message, not the generation
        end_id = eog_with("<|end|>")
        has_call = eog_with("<|call|>") is not None or eog_with("<|calls|>") is not None
        if end_id is not None and has_call and (eog_with("<|return|>") is not None
                                                 or eog_with("<|flush|>") is not None):
            eog.discard(end_id)
            attrs[end_id] = TokenAttr.USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there
        s_id = eog_with("</s>")
        if s_id is not None and (eog_with("<|tool_response>") is not None or eog_with("<|plamo:eos|>") is not None):
            eog.discard(s_id)
            attrs[s_id] = TokenAttr.NORMAL
        self.eog_ids = frozenset(eog)

    def _apply_model_attribute_quirks(self, md: Mapping) -> None:
        """lstrip/rstrip attributes llama.cpp sets by model name (they are missing from GGUF files)."""
        name = str(md.get("general.name", "")).lower()
        pre = str(md.get("tokenizer.ggml.pre", ""))
        arch = str(md.get("general.architecture", ""))
        attrs = self._attrs

        def set_attr(text, bit, on):
            tid = self._ids.get(text)
            if tid is None:
                return
            attrs[tid] = attrs[tid] | bit if on else attrs[tid] & ~bit

        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            set_attr("<mask>", TokenAttr.LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for i, a in enumerate(attrs):
                if a & (TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN):
                    attrs[i] = a | TokenAttr.RSTRIP
            set_attr("</s>", TokenAttr.RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                set_attr(text, TokenAttr.RSTRIP, False)
        elif "modern-bert" in name:
            set_attr("[MASK]", TokenAttr.LSTRIP, True)

    def _init_spm_chunking(self) -> None:
        """SentencePiece merges run over a whole text fragment. A merge can only join two symbols into a
        vocabulary entry, so where no entry contains "c▁" (c not ▁), a "c|▁" boundary is never crossed:
        the fragment can be cut there, each chunk merged alone (and cached) with the same result."""
        bridging = set()
        for t in self._texts:
            k = t.find(_SPM_SPACE, 1)
            while k > 0:
                if t[k - 1] != _SPM_SPACE:
                    bridging.add(t[k - 1])
                k = t.find(_SPM_SPACE, k + 1)
        excluded = regex.escape("".join(sorted(bridging | {_SPM_SPACE})), special_only=False)
        self._spm_cut = regex.compile(f"(?<=[^{excluded}])(?={_SPM_SPACE})")

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for text, as llama_tokenize(vocab, text, add_special, parse_special) returns them."""
        out: list[int] = []
        fragments = self._partition(text, parse_special)
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary asks for a BOS token but has none")
            out.append(self.bos_id)
        if self.kind == "llama":
            prev_special = True   # a space prefix goes before the first text and after each special token
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    self._spm_encode(frag.replace(" ", _SPM_SPACE), out)
                    prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe_encode(frag, out)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise ValueError("this vocabulary asks for an EOS token but has none")
            out.append(self.eos_id)
        return out

    def _present_specials(self, text: str, parse_special: bool) -> list[int]:
        """The special tokens that occur in text, in partition order; the others cannot split anything."""
        if not text:
            return []
        pairs = {text[i:i + 2] for i in range(len(text) - 1)}
        singles = set(text)
        found = []
        skip = TokenAttr.CONTROL | TokenAttr.UNKNOWN
        for prefix, ids in self._specials_by_prefix.items():
            if prefix in pairs or (len(prefix) == 1 and prefix in singles):
                for tid in ids:
                    if (parse_special or not self._attrs[tid] & skip) and self._texts[tid] in text:
                        found.append(tid)
        found.sort(key=self._special_order.__getitem__)
        return found

    def _partition(self, text: str, parse_special: bool) -> list:
        """Split text into raw-text pieces (str) and special token ids (int), like tokenizer_st_partition."""
        specials = self._present_specials(text, parse_special)
        if not specials:
            return [text] if text else []
        fragments: list = [(0, len(text))]
        for tid in specials:
            tok = self._texts[tid]
            lstrip = self._attrs[tid] & TokenAttr.LSTRIP
            rstrip = self._attrs[tid] & TokenAttr.RSTRIP
            refined: list = []
            for frag in fragments:
                if isinstance(frag, int):
                    refined.append(frag)
                    continue
                a, b = frag
                while True:
                    at = text.find(tok, a, b) if a < b else -1
                    if at < 0:
                        if a < b:
                            refined.append((a, b))
                        break
                    left_end = at
                    if lstrip:
                        while left_end > a and text[left_end - 1] in _ASCII_SPACE:
                            left_end -= 1
                    if left_end > a:
                        refined.append((a, left_end))
                    refined.append(tid)
                    a = at + len(tok)
                    if rstrip:
                        while a < b and text[a] in _ASCII_SPACE:
                            a += 1
            fragments = refined
        return [f if isinstance(f, int) else text[f[0]:f[1]] for f in fragments]

    def _bpe_encode(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        if len(cache) > _WORD_CACHE_LIMIT:
            cache.clear()
        for word in _split_words(text, self._pre.split):
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = self._bpe_word(word.encode("utf-8").decode("latin-1").translate(
                    _BYTE_ENCODE_TABLE))
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        """Merge one byte-encoded word by rank (lowest first, leftmost on ties), like llama.cpp."""
        ids = self._ids
        if self._ignore_merges and word in ids:
            return [ids[word]]
        ranks = self._ranks
        syms = _merge_pairs(list(word), lambda a, b: ranks.get((a, b)))
        result = []
        for s in syms:
            if not s:
                continue
            tid = ids.get(s)
            if tid is not None:
                result.append(tid)
                continue
            # no such token: llama.cpp looks up each UTF-8 byte of the piece as a one-byte token and
            # silently drops the bytes that have none
            for b in s.encode("utf-8"):
                tid = ids.get(_byte_as_text(b))
                if tid is not None:
                    result.append(tid)
        return result

    def _spm_encode(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        if len(cache) > _WORD_CACHE_LIMIT:
            cache.clear()
        for chunk in self._spm_cut.split(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = cache[chunk] = self._spm_chunk(chunk)
            out.extend(ids)

    def _spm_chunk(self, text: str) -> list[int]:
        """SentencePiece BPE: merge the highest-scoring adjacent pair first (leftmost on ties)."""
        ids, scores = self._ids, self._scores

        def priority(a, b):   # highest score first
            tid = ids.get(a + b)
            return None if tid is None else -scores[tid]

        syms = _merge_pairs(list(text), priority)
        result = []
        for s in syms:
            if not s:
                continue
            tid = ids.get(s)
            if tid is not None:
                result.append(tid)
            else:
                for b in s.encode("utf-8"):
                    result.append(self._byte_token(b))
        return result

    def _byte_token(self, b: int) -> int:
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._ids.get(_byte_as_text(b))
        if tid is None:
            if self.unk_id is None:
                raise ValueError(f"vocabulary has no token for byte 0x{b:02X} and no unknown token")
            tid = self.unk_id
        return tid

    # -- decoding ----------------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token_id stands for (llama_token_to_piece with lstrip 0). Control and unknown
        tokens give their text when special is true and nothing otherwise. A piece may be part of a
        UTF-8 sequence."""
        key = (token_id, special)
        piece = self._pieces.get(key)
        if piece is None:
            if not 0 <= token_id < self.vocab_size:
                raise IndexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            piece = self._pieces[key] = self._make_piece(token_id, special)
        return piece

    def _make_piece(self, tid: int, special: bool) -> bytes:
        attr = self._attrs[tid]
        text = self._texts[tid]
        if attr & (TokenAttr.UNKNOWN | TokenAttr.CONTROL):
            return _token_bytes(text) if special else b""
        if attr & TokenAttr.USER_DEFINED:
            return _token_bytes(text)
        if attr & TokenAttr.NORMAL:
            if self.kind == "llama":
                return _token_bytes(text.replace(_SPM_SPACE, " "))
            return _gpt2_decode(text)
        if attr & TokenAttr.BYTE:
            return bytes([int(text[3:5], 16)])
        return b""   # unused / undefined tokens render as nothing

    def detokenize(self, ids: Iterable[int], remove_special: bool = False, unparse_special: bool = True) -> bytes:
        """llama_detokenize: pieces joined, a leading space-prefix dropped, and for vocabularies that ask
        for it, spaces before punctuation and contractions cleaned up."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for k, tid in enumerate(ids):
            piece = self.token_to_piece(tid, unparse_special)
            if k == 0 and remove_space and piece.startswith(b" "):
                piece = piece[1:]
            parts.append(piece)
        text = b"".join(parts)
        if self.clean_spaces:
            text = _clean_up_spaces(text)
        return text

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for ids, as llama.cpp's common_detokenize gives it: control tokens are rendered as their
        text unless skip_special. Invalid UTF-8 (a sequence cut off mid-character) becomes U+FFFD."""
        return self.detokenize(ids, remove_special=False, unparse_special=not skip_special).decode(
            "utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """A detokenizer for ids arriving one by one that hands out only complete UTF-8 text."""
        return StreamDecoder(self, skip_special)

    # -- inspection --------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """The vocabulary string of a token (GPT-2 byte alphabet / ▁ spaces as stored in the file)."""
        return self._texts[token_id]

    def token_id(self, text: str) -> int | None:
        """The id whose vocabulary string is exactly text, or None."""
        return self._ids.get(text)

    def token_attr(self, token_id: int) -> int:
        return self._attrs[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control or unknown tokens: what decode(skip_special=True) leaves out."""
        return bool(self._attrs[token_id] & (TokenAttr.CONTROL | TokenAttr.UNKNOWN))

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.pre else ""
        return f"<Tokenizer {self.kind}{pre}, {self.vocab_size} tokens, bos={self.bos_id}, eos={self.eos_id}>"


class StreamDecoder:
    """Feed token ids as they are generated; get back the text they complete.

    Pieces are joined as llama.cpp's streaming front ends do (token_to_piece per token, no leading-space
    removal or space clean-up), and bytes of a character split over several tokens are held back until
    the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_piece(token_id, self._special))

    def feed_many(self, ids: Iterable[int]) -> Iterator[str]:
        for tid in ids:
            text = self.feed(tid)
            if text:
                yield text

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _gpt2_decode(text: str) -> bytes:
    """A byte-level BPE vocabulary string back to its bytes; characters outside the byte alphabet are
    spelled out the way llama.cpp does it rather than dropped."""
    out = bytearray()
    for ch in text:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            raw = _token_bytes(ch)
            out += b"[UNK_BYTE_0x" + raw.hex().encode() + _token_bytes(text) + b"]"
    return bytes(out)


def _clean_up_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_spaces passes: " ?" " !" " ." " ," lose the space, a lone apostrophe between
    spaces loses both, and " 's" " 'm" " 're" " 've" lose the space."""
    buf = bytearray(text)
    # pass 1: space before ? ! . ,
    n, total = len(buf), 1 if buf else 0
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    n, total = total, 1 if total else 0
    i = 1
    while i < n:
        x = buf[i]
        if x == 0x27 and i + 1 < n and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" -> no space (" 't", " 'd", " 'll" keep it)
    n, total = total, 1 if total else 0
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = buf[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n:
                x2 = buf[i + 2]
                if (x1 == 0x72 or x1 == 0x76) and x2 == 0x65:   # 're, 've
                    total -= 1
        buf[total] = x
        total += 1
    return bytes(buf[:total])


def _str_list(md: Mapping, key: str, required: bool) -> list[str]:
    value = md.get(key)
    if value is None:
        if required:
            raise ValueError(f"GGUF metadata is missing '{key}'")
        return []
    if not _is_list_like(value) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of strings")
    return list(value)


def _is_list_like(value) -> bool:
    # python lists from the project loader, or numpy arrays from other GGUF readers
    return hasattr(value, "__len__") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes, Mapping))


def _flag(md: Mapping, key: str, default: bool) -> bool:
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, int)):
        raise ValueError(f"'{key}' must be a boolean, got {value!r}")
    return bool(value)
