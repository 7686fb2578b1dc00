"""ggufrun: a quantized GGUF inference runtime for sparse MoE models, CPU first."""
from .api import LLM, load

__all__ = ["LLM", "load"]
__version__ = "0.1.0"
