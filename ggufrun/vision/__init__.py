"""Vision input: image decoding and preprocessing (image.py) and mmproj encoders (one file per
projector type; step3vl.py for Step-3.7-Flash)."""
from .image import ImageError, load_image
from .step3vl import Encoder, ImageEmbeddings


def load_mmproj(path) -> Encoder:
    """Open an mmproj GGUF; the projector type decides the encoder (only step3vl so far)."""
    return Encoder(path)


__all__ = ["Encoder", "ImageEmbeddings", "ImageError", "load_image", "load_mmproj"]
