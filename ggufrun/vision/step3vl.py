"""step3vl: the vision encoder of Step-3.7-Flash (and Step3-VL), from its mmproj GGUF.

A perception-encoder ViT (conv patch embedding, learned position embeddings resized to the patch grid,
pre-layernorm, blocks with fused-qkv attention under 2-D rotary positions, layer scales and a
quick-GELU MLP), then two stride-2 3x3 convolutions and a linear projector into the text model's
embedding space: one token per 4x4 patches. Semantics follow llama.cpp's clip_graph_step3vl.

Every product with a weight is one batched native matmul over all patches (ops.Linear, at act
precision 1); convolutions
are im2col (nine strided views, no per-patch loop) then a matmul. Like ggml_conv_2d, whose im2col is
float16, the convolutions round their inputs and kernels to float16 (F32 files included); everything
else is float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType as QT

from .. import native
from ..gguf_file import GGUFError, GGUFFile, QTensor
from ..ops import Linear
from .image import Preprocessed, load_image, preprocess_step3vl

_lib = native._load()
_ffi = native._ffi

_F = np.float32
ROPE_THETA = 10000.0       # llama.cpp's step3vl value (not in the file)


@dataclass(frozen=True)
class Params:
    image_size: int
    patch: int
    n_embd: int
    n_head: int
    n_ff: int
    n_layer: int
    eps: float
    n_embd_out: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    longest_edge: int
    n_merge: int
    act: str                 # "gelu_quick" (the default), "gelu" or "silu"

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Params":
        def key(k, default=None, types=None):
            if k in f.metadata:
                v = f.metadata[k]
                if types and not isinstance(v, types):
                    raise GGUFError(f"{f.path}: key {k!r} is {v!r}, expected {types}")
                return v
            if default is None:
                raise GGUFError(f"{f.path}: missing metadata key {k!r} (a step3vl mmproj has it)")
            return default

        if f.arch != "clip":
            raise GGUFError(f"{f.path}: general.architecture is {f.arch!r}; an mmproj file has 'clip'")
        proj = f.metadata.get("clip.projector_type", f.metadata.get("clip.vision.projector_type"))
        if proj != "step3vl":
            raise GGUFError(f"{f.path}: key 'clip.projector_type' is {proj!r}; only 'step3vl' is supported")
        if not f.metadata.get("clip.has_vision_encoder", False):
            raise GGUFError(f"{f.path}: key 'clip.has_vision_encoder' is not true; the file has no vision encoder")
        mean, std = key("clip.vision.image_mean", types=list), key("clip.vision.image_std", types=list)
        if len(mean) < 3 or len(std) < 3:
            raise GGUFError(f"{f.path}: keys 'clip.vision.image_mean'/'image_std' need 3 values each")
        gelu, silu = f.metadata.get("clip.use_gelu", False), f.metadata.get("clip.use_silu", False)
        p = cls(image_size=key("clip.vision.image_size", types=int), patch=key("clip.vision.patch_size", types=int),
                n_embd=key("clip.vision.embedding_length", types=int),
                n_head=key("clip.vision.attention.head_count", types=int),
                n_ff=key("clip.vision.feed_forward_length", types=int),
                n_layer=key("clip.vision.block_count", types=int),
                eps=float(key("clip.vision.attention.layer_norm_epsilon", types=(int, float))),
                n_embd_out=f.tensor("mm.model.fc.weight").shape[0],
                mean=tuple(float(v) for v in mean[:3]), std=tuple(float(v) for v in std[:3]),
                longest_edge=int(f.metadata.get("clip.vision.preproc_image_size", 0) or 3024),
                n_merge=int(f.metadata.get("clip.vision.projector.scale_factor", 4)),
                act="gelu" if gelu else "silu" if silu else "gelu_quick")
        if p.n_merge != 4:
            raise GGUFError(f"{f.path}: key 'clip.vision.projector.scale_factor' is {p.n_merge}; step3vl's two "
                            f"stride-2 downsamplers make it 4")
        if p.patch <= 0 or p.image_size % (p.patch * 4):
            raise GGUFError(f"{f.path}: image_size {p.image_size} is not a multiple of 4 x patch_size {p.patch}")
        if p.n_head <= 0 or p.n_embd % p.n_head or (p.n_embd // p.n_head) % 4:
            raise GGUFError(f"{f.path}: embedding_length {p.n_embd} over {p.n_head} heads does not give a head "
                            f"size divisible by 4 (2-D rotary rotates pairs in each half)")
        return p


def _small(f: GGUFFile, name: str, n: int, optional: bool = False) -> np.ndarray | None:
    if optional and name not in f:
        return None
    return np.ascontiguousarray(f.tensor(name).dequantize().reshape(-1), dtype=_F) if n is None else \
        np.ascontiguousarray(f.tensor(name, (n,)).dequantize().reshape(n), dtype=_F)


class Dense:
    """y = x @ W^T (+ b) for a weight of any rank flattened to (rows, cols)."""

    def __init__(self, f: GGUFFile, name: str, rows: int, cols: int, bias: str | None = None, f16: bool = False):
        w = f.tensor(name)
        if w.shape[0] != rows or w.n_elements != rows * cols:
            raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(w.shape)}, expected {rows} rows of {cols}")
        w = replace(w, shape=(rows, cols))
        self.f16 = f16
        if f16 and w.qtype != QT.F16:
            # ggml_conv_2d multiplies in float16 whatever the kernel's type
            data = w.dequantize().astype(np.float16).reshape(-1).view(np.uint8)
            w = QTensor(name, QT.F16, (rows, cols), data)
        self.lin = Linear(w)
        self.bias = _small(f, bias, rows, optional=True) if bias else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lin = self.lin
        if lin.qtype in (QT.F32, QT.F16) and native.get_act_precision() == 1:
            # F16/F32 weights (the usual mmproj): gr_vision_matmul, register-blocked for thousands of
            # patches (~2x gr_matmul's per-row dot products there), the float16 rounding of x and the bias
            # inside; its numerics are gr_matmul's at act precision 1, which encode() always sets
            x = np.ascontiguousarray(x, dtype=_F)
            y = np.empty((x.shape[0], lin.rows), _F)
            native._check(_lib.gr_vision_matmul(
                lin.qtype, lin._w, lin.rows, lin.cols, lin.stride, _ffi.from_buffer("float[]", x), x.shape[0],
                _ffi.NULL if self.bias is None else _ffi.from_buffer("float[]", self.bias),
                _ffi.from_buffer("float[]", y, require_writable=True)), f"vision matmul {lin.name}")
            return y
        if self.f16:
            x = x.astype(np.float16).astype(_F)
        y = lin(x)
        if self.bias is not None:
            y += self.bias
        return y


def layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    """Row-wise layer norm of a (n, dim) float32 array into a new one (gr_vision_layer_norm: ggml_norm's
    sums in double, then the weight and bias)."""
    x = np.ascontiguousarray(x, dtype=_F)
    y = np.empty_like(x)
    opt = lambda a: _ffi.NULL if a is None else _ffi.from_buffer("float[]", a)   # noqa: E731
    native._check(_lib.gr_vision_layer_norm(_ffi.from_buffer("float[]", x), opt(w), opt(b),
                                            _ffi.from_buffer("float[]", y, require_writable=True),
                                            x.shape[0], x.shape[1], eps), "layer norm")
    return y


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu_quick":
        # ggml's CPU backend reads quick-GELU from a float16 table (input and output rounded to float16);
        # doing the same keeps the encoder 3x closer to llama.cpp's (relative error ~1e-4, not ~3e-4).
        # Native: numpy's float16 round trips cost as much as the encoder's largest matmul.
        return gelu_quick_f16(np.ascontiguousarray(x, dtype=_F))
    if kind == "silu":
        return x / (_F(1.0) + np.exp(-x))
    # tanh approximation, as ggml_gelu
    return _F(0.5) * x * (_F(1.0) + np.tanh(_F(math.sqrt(2 / math.pi)) * (x + _F(0.044715) * x * x * x)))


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights with antialiasing (a triangle filter widened when shrinking),
    half-pixel centres, rows normalised: ggml_interpolate's BILINEAR | ANTIALIAS, the position-embedding
    resize llama.cpp applies (PyTorch's interpolate(antialias=True))."""
    sf = n_out / n_in
    support = max(1.0, 1.0 / sf)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = (i + 0.5) / sf
        lo, hi = max(int(x - support + 0.5), 0), min(int(x + support + 0.5), n_in)
        s = np.arange(lo, hi)
        w[i, lo:hi] = np.maximum(1.0 - np.abs((s - x + 0.5) / support), 0.0)
        w[i] /= w[i].sum()
    return w


def rope_tables(pos_w: np.ndarray, pos_h: np.ndarray, d: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (n, d/2) float32, of step3vl's 2-D rotary for heads of d: pair i < d/4 (the first half
    of the head) turns by the column, the rest by the row, with frequencies theta^(-2i / (d/2)). Angles
    in float64, rounded once; computed once per image, not per layer."""
    half = d // 2
    inv = theta ** (-np.arange(0, half, 2, dtype=np.float64) / half)        # (half/2,)
    ang = np.concatenate([pos_w[:, None] * inv, pos_h[:, None] * inv], axis=1)
    return np.ascontiguousarray(np.cos(ang), dtype=_F), np.ascontiguousarray(np.sin(ang), dtype=_F)


def rope_2d(x: np.ndarray, tables: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """In place on x (n, n_head, d), heads contiguous, tokens possibly strided (q or k inside the fused
    qkv output): adjacent pairs (x[2i], x[2i+1]) rotated by rope_tables' angles (gr_vision_rope_pairs)."""
    n, nh, d = x.shape
    cos, sin = tables
    if x.dtype != _F or x.strides[1:] != (4 * d, 4) or x.strides[0] % 4 or cos.shape != (n, d // 2):
        raise ValueError(f"rope_2d: expected float32 ({n}, {nh}, {d}) with contiguous heads and ({n}, {d // 2}) tables")
    # a raw address (x outlives the call); from_buffer would refuse a strided view
    native._check(_lib.gr_vision_rope_pairs(_ffi.cast("float *", x.__array_interface__["data"][0]), x.strides[0] // 4,
                                            n, nh, d, _ffi.from_buffer("float[]", cos),
                                            _ffi.from_buffer("float[]", sin)), "vision rope")
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Non-causal softmax attention, all heads: q, k, v (n, n_head, d) -> (n, n_head * d), float32, in
    one native call (gr_vision_attention: tiled over heads x query blocks on the thread pool, no (n, n)
    score matrix in memory). Each array may be a token-strided view (v straight out of the fused qkv
    product): only the last two axes must be contiguous."""
    n, nh, d = q.shape
    args = []
    for a in (q, k, v):
        if a.dtype != _F or a.shape != (n, nh, d) or a.strides[1:] != (4 * d, 4) or a.strides[0] % 4:
            raise ValueError(f"attention: expected float32 ({n}, {nh}, {d}) arrays with contiguous heads")
        # a raw address (the arrays outlive the call); from_buffer would refuse a strided view
        args += [_ffi.cast("float *", a.__array_interface__["data"][0]), a.strides[0] // 4]
    out = np.empty((n, nh * d), _F)
    native._check(_lib.gr_vision_attention(*args, _ffi.from_buffer("float[]", out, require_writable=True),
                                            nh * d, n, nh, d, scale), "vision attention")
    return out


def gelu_quick_f16(x: np.ndarray) -> np.ndarray:
    """ggml's quick-GELU in place on a contiguous float32 array: the input rounded to float16 and looked
    up in a float16 table (gr_vision_gelu_quick_f16)."""
    native._check(_lib.gr_vision_gelu_quick_f16(_ffi.from_buffer("float[]", x, require_writable=True),
                                                _ffi.from_buffer("float[]", x, require_writable=True), x.size),
                  "gelu_quick")
    return x


class Block:
    def __init__(self, f: GGUFFile, i: int, p: Params):
        pre, E = f"v.blk.{i}.", p.n_embd
        self.p = p
        self.ln1_w, self.ln1_b = _small(f, pre + "ln1.weight", E, True), _small(f, pre + "ln1.bias", E, True)
        self.ln2_w, self.ln2_b = _small(f, pre + "ln2.weight", E, True), _small(f, pre + "ln2.bias", E, True)
        self.qkv = Dense(f, pre + "attn_qkv.weight", 3 * E, E, pre + "attn_qkv.bias")
        self.out = Dense(f, pre + "attn_out.weight", E, E, pre + "attn_out.bias")
        self.ls1 = _small(f, pre + "ls1.weight", E, True)
        self.ls2 = _small(f, pre + "ls2.weight", E, True)
        self.up = Dense(f, pre + "ffn_up.weight", p.n_ff, E, pre + "ffn_up.bias")
        self.down = Dense(f, pre + "ffn_down.weight", E, p.n_ff, pre + "ffn_down.bias")

    def __call__(self, x: np.ndarray, rope: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        p = self.p
        n, dh = x.shape[0], p.n_embd // p.n_head
        qkv = self.qkv(layer_norm(x, self.ln1_w, self.ln1_b, p.eps)).reshape(n, 3, p.n_head, dh)
        # q and k rotated in place in the qkv output, which the attention then reads without copies
        q, k = rope_2d(qkv[:, 0], rope), rope_2d(qkv[:, 1], rope)
        a = self.out(attention(q, k, qkv[:, 2], 1.0 / math.sqrt(dh)))
        if self.ls1 is not None:
            a *= self.ls1
        x = x + a
        m = self.down(activation(self.up(layer_norm(x, self.ln2_w, self.ln2_b, p.eps)), p.act))
        if self.ls2 is not None:
            m *= self.ls2
        return x + m


def im2col_3x3_s2(x: np.ndarray) -> np.ndarray:
    """(h, w, c) -> (oh * ow, c * 9) for a 3x3 kernel, stride 2, padding 1, columns ordered (c, ky, kx)
    like a PyTorch kernel (out, c, ky, kx) flattened."""
    h, w, c = x.shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = np.zeros((h + 2, w + 2, c), _F)
    xp[1:-1, 1:-1] = x
    taps = [xp[ky:ky + 2 * oh:2, kx:kx + 2 * ow:2] for ky in range(3) for kx in range(3)]
    return np.stack(taps, axis=-1).reshape(oh * ow, c * 9), oh, ow


class Encoder:
    """The mmproj: encode(pixels (3, h, w)) -> (tokens, n_embd_out) image embeddings."""

    def __init__(self, path_or_file):
        f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        self.file = f
        p = self.params = Params.from_gguf(f)
        E, P = p.n_embd, p.patch
        if "v.class_embd" in f:
            raise GGUFError(f"{f.path}: tensor 'v.class_embd' is present; step3vl has no class token")
        self.patch_embd = Dense(f, "v.patch_embd.weight", E, 3 * P * P, "v.patch_embd.bias", f16=True)
        pos = f.tensor("v.position_embd.weight")
        n_pos = pos.shape[0]
        self.pos_side = int(round(math.sqrt(n_pos)))
        if self.pos_side ** 2 != n_pos or pos.n_elements != n_pos * E:
            raise GGUFError(f"{f.path}: tensor 'v.position_embd.weight' has shape {list(pos.shape)}, expected "
                            f"(side * side, {E})")
        self.pos = pos.dequantize().reshape(self.pos_side, self.pos_side, E).astype(_F)
        self._pos_cache: dict[tuple[int, int], np.ndarray] = {}
        self.pre_w, self.pre_b = _small(f, "v.pre_ln.weight", E, True), _small(f, "v.pre_ln.bias", E, True)
        self.post_w, self.post_b = _small(f, "v.post_ln.weight", E, True), _small(f, "v.post_ln.bias", E, True)
        self.blocks = [Block(f, i, p) for i in range(p.n_layer)]
        self.down0 = self._conv(f, 0, E)
        self.down1 = self._conv(f, 1, self.down0.lin.rows)
        self.proj = Dense(f, "mm.model.fc.weight", p.n_embd_out, self.down1.lin.rows)

    @staticmethod
    def _conv(f: GGUFFile, k: int, c_in: int) -> Dense:
        w = f.tensor(f"mm.{k}.weight")
        if len(w.shape) != 4 or w.shape[1:] != (c_in, 3, 3):
            raise GGUFError(f"{f.path}: tensor 'mm.{k}.weight' has shape {list(w.shape)}, expected "
                            f"(out, {c_in}, 3, 3)")
        return Dense(f, f"mm.{k}.weight", w.shape[0], c_in * 9, f"mm.{k}.bias", f16=True)

    def positions(self, gh: int, gw: int) -> np.ndarray:
        """Learned position embeddings resized to a gh x gw patch grid, (gh * gw, n_embd)."""
        key = (gh, gw)
        if key not in self._pos_cache:
            if (gh, gw) == (self.pos_side, self.pos_side):
                out = self.pos
            else:
                wy, wx = resize_weights(self.pos_side, gh), resize_weights(self.pos_side, gw)
                # separable, rows then columns: one unoptimised three-operand einsum took 2-3 s per new
                # grid (the first image of a session paid it); this is milliseconds
                rows = np.tensordot(wy, self.pos.astype(np.float64), axes=(1, 0))    # (gh, side, E)
                out = np.matmul(wx, rows).astype(_F)                                   # (gh, gw, E)
            self._pos_cache[key] = np.ascontiguousarray(out.reshape(gh * gw, -1))
        return self._pos_cache[key]

    def n_tokens(self, h: int, w: int) -> int:
        s = self.params.patch * 4
        return (h // s) * (w // s)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        # act precision 1: activations meet float16/quantized weights rounded exactly as ggml rounds them
        # (float16 for an F16 file), one pass instead of two: ~1.6x faster products, and no further from
        # llama.cpp's encoder. F32 weights are unaffected; the text model's setting is restored after.
        with native.act_precision(1):
            return self._encode(pixels)

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        p = self.params
        c, h, w = pixels.shape
        P = p.patch
        if c != 3 or h % (4 * P) or w % (4 * P):
            raise ValueError(f"encode: pixels must be (3, h, w) with h and w multiples of {4 * P}, got {pixels.shape}")
        gh, gw = h // P, w // P
        patches = pixels.reshape(3, gh, P, gw, P).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3 * P * P)
        x = self.patch_embd(np.ascontiguousarray(patches, dtype=_F))
        x += self.positions(gh, gw)
        if self.pre_w is not None:
            x = layer_norm(x, self.pre_w, self.pre_b, p.eps)
        idx = np.arange(gh * gw, dtype=np.int64)
        rope = rope_tables(idx % gw, idx // gw, p.n_embd // p.n_head, ROPE_THETA)
        for blk in self.blocks:
            x = blk(x, rope)
        if self.post_w is not None:
            x = layer_norm(x, self.post_w, self.post_b, p.eps)
        cols, oh, ow = im2col_3x3_s2(x.reshape(gh, gw, -1))
        x = self.down0(cols)
        cols, oh, ow = im2col_3x3_s2(x.reshape(oh, ow, -1))
        x = self.down1(cols)
        return self.proj(x)

    # -- images -----------------------------------------------------------------------------------
    def preprocess(self, img: np.ndarray) -> Preprocessed:
        p = self.params
        return preprocess_step3vl(img, p.image_size, p.mean, p.std, p.longest_edge)

    def encode_image(self, src, what: str | None = None) -> "ImageEmbeddings":
        """Decode (if needed), preprocess and encode one image: embeddings of its crops and overview."""
        img = load_image(src, what)
        pp = self.preprocess(img)
        return ImageEmbeddings(crops=[self.encode(e) for e in pp.crops], grid_x=pp.grid_x, grid_y=pp.grid_y,
                               overview=self.encode(pp.overview), size=(img.shape[1], img.shape[0]))


@dataclass
class ImageEmbeddings:
    crops: list[np.ndarray]     # row-major over the grid
    grid_x: int
    grid_y: int
    overview: np.ndarray
    size: tuple[int, int]       # the decoded image's (width, height)

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.crops) + len(self.overview)
