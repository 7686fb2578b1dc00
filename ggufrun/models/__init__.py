"""One module per architecture; `build` picks it from general.architecture."""
from __future__ import annotations

import importlib

from ..gguf_file import GGUFError, GGUFFile

ARCHITECTURES = {
    "llama": "llama",
    "gemma3": "gemma3",
    "step35": "step35",
}


def build(f: GGUFFile):
    arch = f.arch
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported"
                        f" (supported: {', '.join(sorted(ARCHITECTURES))})")
    module = importlib.import_module(f"{__name__}.{ARCHITECTURES[arch]}")
    return module.Model(f)
