"""Images in: decoding (Pillow) and the step3vl preprocessor (llama.cpp's
mtmd_image_preprocessor_step3vl, after Step3-VL's processing_step3.py).

An image becomes an overview (the whole picture squashed to image_size x image_size) and, when it is
larger than that or elongated, a grid of fixed 504-pixel crops on a window grid. All arithmetic that
decides sizes is float32, as in llama.cpp, so the same image gives the same grid; pixel values are
normalised with the mmproj's mean/std. Pixel tensors are float32 (3, height, width).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

MAX_PIXELS = 50_000_000        # a decoded image larger than this is refused (a 7071 x 7071 picture)
CROP_SIZE = 504                # processing_step3.py's crop; fixed, whatever the mmproj's image_size
SMALL_ASPECT_LIMIT = 1.5
WIDE_ASPECT_LIMIT = 4.0
CROP_ROUNDING = 0.2
_F = np.float32


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong."""


def load_image(src, what: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode `src` (a path, bytes, a PIL image or an (h, w, 3) uint8 array) to RGB uint8 (h, w, 3).

    Alpha is dropped and palettes/greyscale expanded (what stb_image does for llama.cpp); EXIF
    orientation is not applied (llama.cpp does not either). Empty, undecodable, 0x0 or over-large
    images raise ImageError naming `what` (default: the path)."""
    if isinstance(src, np.ndarray):
        name = what or "image array"
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise ImageError(f"{name}: expected an (height, width, 3) uint8 array, got {src.dtype} {src.shape}")
        _check_size(name, src.shape[1], src.shape[0], max_pixels)
        return np.ascontiguousarray(src)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover - Pillow is a dependency
        raise ImageError("images need Pillow (pip install pillow)") from e
    if isinstance(src, Image.Image):
        name = what or "PIL image"
        _check_size(name, src.width, src.height, max_pixels)
        return np.asarray(src.convert("RGB"), dtype=np.uint8)
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, data = what or "image bytes", bytes(src)
    else:
        name = what or os.fspath(src)
        try:
            with open(src, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a directory, not an image") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    try:
        # Image.open reads only the header: the size is checked before any pixel is decoded
        with Image.open(io.BytesIO(data)) as im:
            _check_size(name, im.width, im.height, max_pixels)
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: cannot be decoded as an image (not a PNG, JPEG, WebP or other format"
                         f" Pillow reads)") from None
    except Image.DecompressionBombError as e:   # Pillow's own check, in Image.open, fires first
        raise ImageError(f"{name}: more than the limit of {max_pixels / 1e6:.0f} megapixels ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:   # truncated or corrupt data
        raise ImageError(f"{name}: cannot be decoded: {e}") from None


def _check_size(name: str, w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the image is empty ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, more than the limit of "
                         f"{max_pixels / 1e6:.0f}; scale it down first")


# -- resampling --------------------------------------------------------------------------------------

def _pillow_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: the input indices (n_out, ksize) and fixed-point weights of Pillow's bilinear
    filter (triangle support 1, widened by the scale when shrinking; 22 fractional bits)."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = fs
    ksize = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((n_out, ksize), np.int64)
    wts = np.zeros((n_out, ksize), np.int64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        x = np.arange(lo, hi)
        w = np.maximum(1.0 - np.abs((x - center + 0.5) / fs), 0.0)
        ww = w.sum()
        if ww != 0.0:
            w = w / ww
        f = w * (1 << _PRECISION_BITS)
        wts[xx, :hi - lo] = np.trunc(f + np.where(f < 0, -0.5, 0.5)).astype(np.int64)
        idx[xx, :hi - lo] = x
        idx[xx, hi - lo:] = lo
    return idx, wts


_PRECISION_BITS = 22


def _resample_axis(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    idx, wts = _pillow_taps(img.shape[axis], n_out)
    acc = np.full(img.shape[:axis] + (n_out,) + img.shape[axis + 1:], 1 << (_PRECISION_BITS - 1), np.int64)
    src = img.astype(np.int64)
    for t in range(idx.shape[1]):
        w = wts[:, t].reshape((n_out,) + (1,) * (img.ndim - axis - 1))
        acc += np.take(src, idx[:, t], axis=axis) * w
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_u8(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's bilinear resample (separable: all rows horizontally, then vertically; fixed point,
    rounded to uint8 between the passes), which llama.cpp's img_tool::resize ports. Vectorised over
    pixels, one step per filter tap."""
    if width <= 0 or height <= 0 or width > 65536 or height > 65536:
        raise ImageError(f"resize target {width}x{height} is out of range")
    if img.shape[1] != width:
        img = _resample_axis(img, width, 1)
    if img.shape[0] != height:
        img = _resample_axis(img, height, 0)
    return img


def resize_normalize(img: np.ndarray, width: int, height: int, mean, std) -> np.ndarray:
    """uint8 (h, w, 3) -> normalised float32 (3, height, width): each source pixel is normalised, then
    interpolated bilinearly with half-pixel centres and edge clamping (the step3vl preprocessor's own
    float resize, not Pillow's)."""
    mean, std = np.asarray(mean, _F), np.asarray(std, _F)
    v = (img.astype(_F) / _F(255.0) - mean) / std                 # (h, w, 3)
    sh, sw = img.shape[:2]
    if sh == height and sw == width:
        return np.ascontiguousarray(v.transpose(2, 0, 1))

    def axis(n_src, n_dst):
        src = (np.arange(n_dst, dtype=_F) + _F(0.5)) * (_F(n_src) / _F(n_dst)) - _F(0.5)
        f = np.floor(src)
        i0 = np.clip(f.astype(np.int64), 0, n_src - 1)
        i1 = np.clip(f.astype(np.int64) + 1, 0, n_src - 1)
        return i0, i1, (src - f).astype(_F)

    y0, y1, ly = axis(sh, height)
    x0, x1, lx = axis(sw, width)
    lx = lx[None, :, None]
    top = v[y0][:, x0] + (v[y0][:, x1] - v[y0][:, x0]) * lx
    bot = v[y1][:, x0] + (v[y1][:, x1] - v[y1][:, x0]) * lx
    out = top + (bot - top) * ly[:, None, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


# -- the step3vl preprocessor ------------------------------------------------------------------------

@dataclass
class Preprocessed:
    """What the encoder runs on, in prompt order: the crops row by row (grid_x per row), then the
    overview. Each is float32 (3, h, w)."""
    crops: list[np.ndarray] = field(default_factory=list)
    grid_x: int = 0
    grid_y: int = 0
    overview: np.ndarray | None = None

    @property
    def entries(self) -> list[np.ndarray]:
        return self.crops + [self.overview]


def prepare(img: np.ndarray, longest_edge: int) -> np.ndarray:
    """Pad very thin small images to a square (black, top-left aligned), then cap the longer side."""
    h, w = img.shape[:2]
    aspect = _F(w) / _F(h)
    if min(w, h) < 32 and (aspect > _F(WIDE_ASPECT_LIMIT) or aspect < _F(1.0) / _F(WIDE_ASPECT_LIMIT)):
        s = max(w, h)
        sq = np.zeros((s, s, 3), np.uint8)
        sq[:h, :w] = img
        img, (h, w) = sq, (s, s)
    if max(w, h) > longest_edge:
        scale = _F(longest_edge) / _F(max(w, h))
        img = resize_u8(img, max(1, math.floor(_F(w) * scale)), max(1, math.floor(_F(h) * scale)))
    return img


def window_size(image_size: int, longer: int, shorter: int) -> int:
    aspect = _F(longer) / _F(shorter)
    if longer <= image_size:
        return shorter if aspect > _F(SMALL_ASPECT_LIMIT) else 0
    return min(shorter, CROP_SIZE) if aspect > _F(WIDE_ASPECT_LIMIT) else CROP_SIZE


def crop_extent(length: int, window: int) -> int:
    ratio = _F(length) / _F(window)
    if ratio < 1:
        return length
    whole = math.floor(ratio)
    return window * (whole + 1 if ratio - _F(whole) > _F(CROP_ROUNDING) else whole)


def grid_starts(length: int, window: int) -> list[int]:
    n = 1 if length <= window else math.ceil(_F(length - window) / _F(window) + _F(1.0))
    starts = [window * i for i in range(n)]
    if n > 1 and starts[-1] + window > length:
        starts[-1] = length - window
    return starts


def crop_padded(img: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + size), min(h, y + size)
    if x0 < x1 and y0 < y1:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
    return out


def preprocess_step3vl(img: np.ndarray, image_size: int, mean, std, longest_edge: int = 3024) -> Preprocessed:
    """RGB uint8 (h, w, 3) -> the overview and the crops llama.cpp's step3vl preprocessor makes."""
    img = prepare(img, longest_edge)
    h, w = img.shape[:2]
    out = Preprocessed(overview=resize_normalize(img, image_size, image_size, mean, std))
    win = window_size(image_size, max(w, h), min(w, h))
    if win <= 0:
        return out
    cw, ch = crop_extent(w, win), crop_extent(h, win)
    xs, ys = grid_starts(cw, win), grid_starts(ch, win)
    refined = resize_u8(img, cw, ch)
    for y in ys:
        for x in xs:
            out.crops.append(resize_normalize(crop_padded(refined, x, y, win), CROP_SIZE, CROP_SIZE, mean, std))
    out.grid_x, out.grid_y = len(xs), len(ys)
    return out
