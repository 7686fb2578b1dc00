"""Vision (step3vl mmproj) at llama.cpp parity, on small random-weight files of the real structure.

Files come from models/step3vl_tiny.py (once per module). llama.cpp's mtmd (tests/mtmd_oracle.py) is
given the same decoded RGB pixels as ggufrun, and the tests hold:
  - the prompt layout (text tokens, image start/end/row tokens, image token counts) equals mtmd's;
  - the preprocessed pixel tensors equal llama.cpp's, value for value, for odd sizes and aspect ratios,
    upscaled and downscaled crops (through the identity "probe" mmproj; llama.cpp's patch convolution
    rounds pixels to float16, so both sides are compared after that rounding);
  - image embeddings of the F32 mmproj: cosine >= 0.9999 per row, relative error <= 1e-3 (measured
    ~1e-4); F16 mmproj: relative error <= 2e-3 (measured ~5e-4);
  - the text model's logits at the image's last position and the text after it: median KL <= 1e-4,
    top-1 agreement >= 98% (the step35 parity bounds for float files);
  - prefix reuse never crosses images, batching does not change the result, bad images are named.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
PIL = pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ggufrun  # noqa: E402
import step3vl_tiny  # noqa: E402
from ggufrun import cli  # noqa: E402
from ggufrun.gguf_file import GGUFError  # noqa: E402
from ggufrun.vision import ImageError, load_image  # noqa: E402
from ggufrun.vision.prompt import MARKER  # noqa: E402
from ggufrun.vision.step3vl import Encoder  # noqa: E402
from mtmd_oracle import CHUNK_TEXT, Mtmd  # noqa: E402


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise: bilinear resampling and rounding both matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 7.0) + np.cos(yy / 5.0)) * 60 + 128
    img = np.stack([base + rng.integers(-40, 40, (h, w)), 255 - base, base / 2 + rng.integers(0, 90, (h, w))], -1)
    return np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return step3vl_tiny.write_all(tmp_path_factory.mktemp("step3vl"), quants=("F32", "F16"))


@pytest.fixture(scope="module")
def oracle(files):
    o = Mtmd(files["text"], files["mmproj-F32"], n_threads=1)
    yield o
    o.close()


@pytest.fixture(scope="module")
def llm(files):
    return ggufrun.load(str(files["text"]), n_ctx=2048, mmproj=files["mmproj-F32"])


def flat_layout(chunks) -> list[int]:
    out = []
    for c in chunks:
        out += c.tokens if c.kind == CHUNK_TEXT else [-1] * c.n_tokens
    return out


# (height, width): overview only, an odd thin one, one upscaled crop, a 3x2 grid with row breaks, a
# 7x1 strip of narrow windows, a tall picture, one past the 3024-pixel cap (17 crops)
LAYOUT_SIZES = [(112, 112), (37, 53), (20, 100), (90, 150), (700, 1300), (150, 1000), (1100, 530), (3100, 200)]


@pytest.mark.parametrize("hw", LAYOUT_SIZES, ids=[f"{w}x{h}" for h, w in LAYOUT_SIZES])
def test_prompt_layout_matches_mtmd(llm, oracle, hw):
    img = picture(*hw)
    prompt = f"Look at {MARKER} and say"
    theirs = flat_layout(oracle.chunks(prompt, [img], encode=False, add_special=True))
    pp = llm.mmproj.preprocess(img)
    n_img = sum(llm.mmproj.n_tokens(*e.shape[1:]) for e in pp.entries)
    assert n_img == theirs.count(-1)
    ids = llm.tokenize_with_images(prompt, [img])
    assert [t if t >= 0 else -1 for t in ids] == theirs


# pixel parity through the probe: each 504-pixel crop costs llama.cpp ~20 s (252 x 252 patches of 2)
PIXEL_SIZES = [(37, 53), (20, 100), (112, 112), (90, 150), (590, 530)]


def test_preprocessing_matches_llama_cpp_pixels(files):
    o = Mtmd(files["text"], files["probe"], n_threads=2, flash_attn=1)   # flash: no 63504^2 score matrix
    enc = Encoder(files["mmproj-F32"])
    try:
        for hw in PIXEL_SIZES:
            img = picture(*hw, seed=hw[0])
            ref = o.image_embeddings(img)
            ours = enc.preprocess(img).entries
            assert len(ref) == len(ours), hw
            for r, e in zip(ref, ours):
                px = step3vl_tiny.probe_pixels(r, e.shape[1], e.shape[2])
                np.testing.assert_array_equal(px, e.astype(np.float16).astype(np.float32), err_msg=str(hw))
    finally:
        o.close()


def embedding_errors(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    return float(cos.min()), float(np.linalg.norm(ref - ours) / np.linalg.norm(ref))


@pytest.mark.parametrize("quant,rel_max", [("F32", 1e-3), ("F16", 2e-3)])
def test_image_embeddings_match_mtmd(files, quant, rel_max):
    o = Mtmd(files["text"], files[f"mmproj-{quant}"], n_threads=1)
    enc = Encoder(files[f"mmproj-{quant}"])
    try:
        for hw in [(200, 300), (112, 112), (61, 47)]:
            img = picture(*hw, seed=7)
            ref = o.image_embeddings(img)
            e = enc.encode_image(img)
            ours = e.crops + [e.overview]
            assert [len(r) for r in ref] == [len(x) for x in ours]
            for r, x in zip(ref, ours):
                cos, rel = embedding_errors(r, x)
                print(f"{quant} {hw}: {r.shape} min cos {cos:.7f} rel {rel:.2e}")
                assert cos >= 0.9999 and rel <= rel_max, (hw, cos, rel)
    finally:
        o.close()


def kl_top1(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    def ls(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = ls(ref), ls(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float(np.median(kl)), float(np.mean(ref.argmax(-1) == ours.argmax(-1)))


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_after_images_match_llama_cpp(llm, oracle, n_images):
    imgs = [picture(200, 300, seed=1), picture(64, 128, seed=2)][:n_images]
    prompt = "Describe " + " then ".join([MARKER] * n_images) + ". What is in it? The answer is"
    cont = llm.tokenize(" a cat sitting on a red mat near the window, looking out at the rain.", add_special=False)
    ref, n_past = oracle.logits_after(prompt, imgs, cont)
    ids = llm.tokenize_with_images(prompt, imgs)
    assert len(ids) == n_past
    ours = llm.logits(ids + cont)[len(ids) - 1:]
    med, top1 = kl_top1(ref, ours)
    print(f"{n_images} image(s), {len(ids)} positions: median KL {med:.2e}, top-1 {top1:.3f}")
    assert med <= 1e-4 and top1 >= 0.98


def test_batch_size_does_not_change_image_prompts(files, llm):
    img = picture(90, 150, seed=3)
    prompt = f"Tell me about {MARKER} please"
    ids = llm.tokenize_with_images(prompt, [img])
    full = llm.logits(ids)
    small = ggufrun.load(str(files["text"]), n_ctx=2048, n_batch=37, mmproj=files["mmproj-F32"])
    ids_small = small.tokenize_with_images(prompt, [img])
    assert ids_small == ids
    np.testing.assert_allclose(small.logits(ids_small), full, rtol=0, atol=2e-3)


def test_prefix_reuse_stops_at_a_different_image(llm):
    a, b = picture(64, 128, seed=4), picture(64, 128, seed=5)
    prompt = f"Question about {MARKER}: what colour?"
    llm.reset()
    llm.generate(prompt, images=[a], max_tokens=1, temperature=0)
    n_prefix = llm.tokenize(prompt.split(MARKER)[0], add_special=True)
    llm.generate(prompt, images=[b], max_tokens=1, temperature=0)
    s = llm.last_stats
    # everything up to <im_start> (or <patch_start>) is shared; no row of image a is reused for b
    assert len(n_prefix) <= s.cached_tokens <= len(n_prefix) + 1
    reused_b = llm.logits(llm.tokenize_with_images(prompt, [b]))[-1]
    llm.reset()
    fresh = llm.generate(prompt, images=[b], max_tokens=3, temperature=0)
    llm.generate(prompt, images=[a], max_tokens=1, temperature=0)
    again = llm.generate(prompt, images=[b], max_tokens=3, temperature=0)
    assert again == fresh
    np.testing.assert_allclose(llm.logits(llm.tokenize_with_images(prompt, [b]))[-1], reused_b, atol=1e-4)
    # the same image again: its rows are reused
    llm.generate(prompt, images=[b], max_tokens=1, temperature=0)
    assert llm.last_stats.cached_tokens >= len(llm.tokenize_with_images(prompt, [b])) - 2


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (no pixel data): decoding it would be the harm."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bad_images_are_named(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image" * 10)
    huge = tmp_path / "huge.png"            # over our limit (50 MP), under Pillow's bomb check (89 MP)
    huge.write_bytes(_png_header_only(8000, 8000))
    bomb = tmp_path / "bomb.png"            # over Pillow's: refused in Image.open
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    for path, words in [(empty, "empty (0 bytes)"), (junk, "cannot be decoded"), (huge, "8000x8000 is 64 megapixels"),
                        (bomb, "megapixels"),
                        (tmp_path / "missing.png", "no such file"), (tmp_path, "directory")]:
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    # formats: PNG, JPEG, WebP, alpha and greyscale decode to RGB
    from PIL import Image
    img = picture(30, 40)
    for ext, mode in [("png", "RGBA"), ("jpg", "RGB"), ("webp", "RGB"), ("png", "L")]:
        p = tmp_path / f"ok-{mode}.{ext}"
        Image.fromarray(img).convert(mode).save(p)
        out = load_image(p)
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(load_image(tmp_path / "ok-RGBA.png"), img)


def test_image_prompt_misuse_is_named(llm):
    ids = llm.tokenize_with_images(MARKER + " what is this?", [picture(20, 20)])
    with pytest.raises(ValueError, match="images go with a text prompt"):
        llm.generate(ids, max_tokens=1, images=[picture(20, 20)])
    # a placeholder id that no tokenize_with_images() call made
    with pytest.raises(ValueError, match="image placeholder id -7 has no embedding"):
        llm.logits(ids[:2] + [-7])


def test_mmproj_checks(files, tmp_path):
    with pytest.raises(GGUFError, match="general.architecture is 'step35'"):
        Encoder(files["text"])
    with pytest.raises(ValueError, match="need a vision projector"):
        ggufrun.load(str(files["text"]), n_ctx=256).tokenize_with_images(MARKER, [picture(20, 20)])
    # a text model without the Step3 image tokens: named
    from ggufrun.vision.prompt import build
    from ggufrun.tokenizer import Tokenizer
    from ggufrun.gguf_file import GGUFFile
    import step35_tiny
    with GGUFFile(step35_tiny.SMOLLM2) as f:
        tok = Tokenizer.from_metadata(f.metadata)
    enc = Encoder(files["mmproj-F32"])
    img = picture(20, 20)
    with pytest.raises(ValueError, match="no '<im_start>' token"):
        build(tok, MARKER, [(img, enc.encode_image(img))])
    with pytest.raises(ValueError, match="2 image markers"):
        build(tok, MARKER * 2, [(img, enc.encode_image(img))])


def test_cli_run_with_images(files, tmp_path, capsys):
    from PIL import Image
    a, b = tmp_path / "a.png", tmp_path / "b.webp"
    Image.fromarray(picture(200, 300)).save(a)
    Image.fromarray(picture(64, 128)).save(b)
    base = ["run", "-m", str(files["text"]), "-n", "4", "--temp", "0", "-v"]
    assert cli.main(base + ["--mmproj", str(files["mmproj-F32"]), "--image", str(a), "--image", str(b),
                            "-p", f"Compare {MARKER} with {MARKER}:"]) == 0
    out, err = capsys.readouterr()
    assert "generated 4 tokens" in err
    # the same as the API
    llm = ggufrun.load(str(files["text"]), n_ctx=4096, mmproj=files["mmproj-F32"])
    expect = llm.generate(f"Compare {MARKER} with {MARKER}:", images=[str(a), str(b)], max_tokens=4, temperature=0)
    assert out.rstrip("\n").endswith(expect)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert cli.main(base + ["--mmproj", str(files["mmproj-F32"]), "--image", str(empty), "-p", "x"]) == 1
    assert f"{empty}: the file is empty" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(a), "-p", "x"]) == 1
    assert "--image needs --mmproj" in capsys.readouterr().err


def test_chat_image_command(files, tmp_path):
    import pexpect
    from PIL import Image
    good = tmp_path / "good.jpg"
    Image.fromarray(picture(90, 150)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    env = {**os.environ, "GGUFRUN_HOME": str(tmp_path), "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    chat = pexpect.spawn(sys.executable, ["-m", "ggufrun.cli", "chat", "-m", str(files["text"]), "--mmproj",
                                          str(files["mmproj-F32"]), "--temp", "0", "-n", "4"],
                         env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        chat.expect_exact(">>> ")
        chat.sendline(f"/image {bad}")
        chat.expect_exact(f"error: {bad}: cannot be decoded")
        chat.sendline(f"/image {tmp_path / 'nope.png'}")
        chat.expect_exact("no such file")
        chat.sendline(f"/image {good}")
        chat.expect_exact(f"[image {good}: 150x90;")
        chat.sendline("What is this?")
        chat.expect(r"\[(\d+) tokens, [\d.]+ t/s; prompt (\d+) tokens")
        assert int(chat.match.group(2)) > 81    # the crop's 81 rows and the overview's 4 were evaluated
        chat.expect_exact(">>> ")
        chat.sendline("And now?")               # the image stays in the history; its rows are reused
        chat.expect(r"\[(\d+) tokens, [\d.]+ t/s; prompt (\d+) tokens")
        assert int(chat.match.group(2)) < 40
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.terminate(force=True)


def _attention_ref(q, k, v, scale):
    """float64 softmax(scale q k^T) v per head: the reference gr_vision_attention is held to"""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("ihd,jhd->hij", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("isa", ["best", "scalar"])
@pytest.mark.parametrize("n,nh,d", [(1, 1, 4), (7, 3, 12), (61, 2, 36), (203, 5, 64), (530, 3, 20)])
def test_vision_attention_kernel(n, nh, d, isa):
    # sizes: one token; fewer queries than a 6-row block; token counts not multiples of the 24-query tile,
    # the 16-key block or the 256-key chunk; head sizes below, between and at multiples of 16
    from ggufrun import native
    from ggufrun.vision.step3vl import attention
    rng = np.random.default_rng(n * 100 + d)
    qkv = (rng.standard_normal((n, 3, nh, d)) * 2).astype(np.float32)   # scores spread well past e^1
    q, k = np.ascontiguousarray(qkv[:, 0]), np.ascontiguousarray(qkv[:, 1])
    ref = _attention_ref(q, k, qkv[:, 2], 0.3)
    with native.force_isa(native.best_isa() if isa == "best" else "scalar"):
        got = attention(q, k, qkv[:, 2], 0.3)                            # v: a token-strided view
        got_views = attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], 0.3)
    assert got.shape == (n, nh * d) and got.dtype == np.float32
    # float32 scores of magnitude ~10 carry ~1e-6 absolute error, which exp turns into relative error of
    # the probabilities: a few 1e-6 (a misplaced tile, padding key or lost row would be off by O(1))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    np.testing.assert_array_equal(got, got_views)


@pytest.mark.parametrize("isa", ["best", "scalar"])
def test_vision_gelu_quick_is_ggmls_float16_table(isa):
    from ggufrun import native
    from ggufrun.vision.step3vl import activation
    rng = np.random.default_rng(3)
    # every float16 value (the table's whole domain) plus float32 values between them, an odd count
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    x = np.concatenate([h[np.isfinite(h)].astype(np.float32),
                        (rng.standard_normal(100_003) * 4).astype(np.float32)])
    hx = x.astype(np.float16).astype(np.float64)
    with np.errstate(over="ignore"):    # exp(1.702 * 65504) is inf, the quotient 0, as in float32
        ref = (hx * (1.0 / (1.0 + np.exp(-1.702 * hx)))).astype(np.float16).astype(np.float32)
    with native.force_isa(native.best_isa() if isa == "best" else "scalar"):
        got = activation(x.copy(), "gelu_quick")
    # the table is built with float32 expf, the reference in float64: at most one float16 step apart,
    # where the float32 value sits on a float16 rounding boundary
    with np.errstate(over="ignore"):    # the step above 65504 is inf: no bound needed there
        ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32)
    diff = np.abs(got - ref)
    assert (diff <= ulp).all() and (diff == 0).mean() > 0.999, (diff / ulp).max()


@pytest.mark.parametrize("isa", ["best", "scalar"])
@pytest.mark.parametrize("qtype", ["F32", "F16"])
@pytest.mark.parametrize("n,rows,cols,bias", [(1, 1, 1, False), (5, 17, 9, True), (103, 40, 37, True),
                                               (250, 33, 300, False)])
def test_vision_matmul_kernel(n, rows, cols, bias, qtype, isa):
    # sizes: a single row/column; token counts not multiples of the 6-row block or 96-row chunk, weight
    # rows not multiples of the 16-row panel, columns not multiples of the 8-float vector
    from gguf import GGMLQuantizationType as QT
    from ggufrun import native
    from ggufrun.gguf_file import QTensor
    from ggufrun.ops import Linear
    from ggufrun.vision.step3vl import Dense
    rng = np.random.default_rng(rows * 1000 + cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    qt = QT[qtype]
    wq = w if qt == QT.F32 else w.astype(np.float16)
    d = Dense.__new__(Dense)    # the layer without a file: its weight and bias set directly
    d.f16, d.lin = False, Linear(QTensor("w", qt, (rows, cols), wq.reshape(-1).view(np.uint8)))
    d.bias = rng.standard_normal(rows).astype(np.float32) if bias else None
    # reference: gr_matmul's act precision 1 numerics in float64 (x rounded to float16 for F16 weights)
    xr = x if qt == QT.F32 else x.astype(np.float16)
    ref = xr.astype(np.float64) @ wq.astype(np.float64).T + (d.bias if bias else 0.0)
    with native.force_isa(native.best_isa() if isa == "best" else "scalar"), native.act_precision(1):
        got = d(x)
        via_matmul = native.matmul(wq.reshape(-1).view(np.uint8), qt, rows, cols, x) + (d.bias if bias else 0.0)
    assert got.shape == (n, rows) and got.dtype == np.float32
    scale = np.abs(xr.astype(np.float64)) @ np.abs(wq.astype(np.float64)).T + 1.0  # float32 summation error
    assert (np.abs(got - ref) / scale).max() < 4e-7 * max(cols, 8) ** 0.5
    np.testing.assert_allclose(got, via_matmul, rtol=0, atol=float(1e-6 * scale.max()))


def test_vision_rope_is_the_numpy_rotation():
    # the previous numpy implementation, element for element: the first half of each head rotates by
    # the column, the second by the row, adjacent pairs; float64 angles, float32 products
    from ggufrun.vision.step3vl import rope_2d, rope_tables
    n, nh, d, gw = 35, 3, 20, 7
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((n, 3, nh, d)).astype(np.float32)
    idx = np.arange(n)
    pos_w, pos_h = idx % gw, idx // gw
    half = d // 2
    inv = 10000.0 ** (-np.arange(0, half, 2, dtype=np.float64) / half)
    x = qkv[:, 1]
    ref = np.empty_like(x)
    for sl, pos in ((slice(0, half), pos_w), (slice(half, d), pos_h)):
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        c, s = np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]
        a, b = x[:, :, sl][..., 0::2], x[:, :, sl][..., 1::2]
        ref[:, :, sl][..., 0::2] = a * c - b * s
        ref[:, :, sl][..., 1::2] = a * s + b * c
    untouched = qkv[:, [0, 2]].copy()
    rope_2d(qkv[:, 1], rope_tables(pos_w, pos_h, d, 10000.0))      # in place, in a token-strided view
    np.testing.assert_array_equal(qkv[:, 1], ref)
    np.testing.assert_array_equal(qkv[:, [0, 2]], untouched)


@pytest.mark.parametrize("affine", [True, False])
def test_vision_layer_norm(affine):
    from ggufrun.vision.step3vl import layer_norm
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((37, 53)) * 3 + 5).astype(np.float32)   # an offset mean, as residuals have
    w, b = (rng.standard_normal(53).astype(np.float32) for _ in range(2))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
    if affine:
        ref = ref * w + b
    got = layer_norm(x, w if affine else None, b if affine else None, 1e-6)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 * (np.abs(w).max() + np.abs(b).max() if affine else 1))
