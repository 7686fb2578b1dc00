"""llama.cpp's mtmd (through llama-cpp-python's bindings) as the vision oracle: chunk layout, image
embeddings and the text model's logits after an image, for the same RGB pixels ggufrun is given.

Images go in as decoded RGB bytes (mtmd_bitmap_init), so both sides see identical pixels whatever
the decoders do. The encoder runs with flash attention off: the F32 path (flash attention casts K and
V to float16)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

import llama_cpp
from llama_cpp import mtmd_cpp as M

CHUNK_TEXT, CHUNK_IMAGE = 0, 1
FLASH_ATTN_DISABLED = 0


@dataclass
class Chunk:
    kind: int                      # CHUNK_TEXT or CHUNK_IMAGE
    tokens: list[int] | None       # text chunks
    n_tokens: int
    embd: np.ndarray | None = None  # image chunks, after encode


class Mtmd:
    def __init__(self, text_path, mmproj_path, n_threads: int = 2, flash_attn: int = FLASH_ATTN_DISABLED,
                 n_ctx: int = 2048, n_batch: int = 512):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {text_path}")
        cp = M.mtmd_context_params_default()
        cp.use_gpu, cp.print_timings, cp.warmup = False, False, False
        cp.n_threads, cp.flash_attn_type = n_threads, flash_attn
        self.ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp's mtmd could not load {mmproj_path}")
        self.n_threads, self.n_ctx, self.n_batch = n_threads, n_ctx, n_batch
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

    def close(self) -> None:
        if self.ctx:
            M.mtmd_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def _tokenize(self, prompt: str, images: list[np.ndarray], add_special: bool):
        bmps = []
        for img in images:
            img = np.ascontiguousarray(img, dtype=np.uint8)
            h, w = img.shape[:2]
            bmps.append(M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes())))
        chunks = M.mtmd_input_chunks_init()
        raw = prompt.encode()
        text = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=add_special, parse_special=True)
        arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bmps)))(*bmps)
        rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), arr, len(bmps))
        for b in bmps:
            M.mtmd_bitmap_free(b)
        if rc != 0:
            M.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        return chunks

    def chunks(self, prompt: str, images: list[np.ndarray], encode: bool = True, add_special: bool = False) -> list[Chunk]:
        """The prompt's chunks in order; image chunks carry their embeddings (n_tokens, n_embd)."""
        chunks = self._tokenize(prompt, images, add_special)
        out = []
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                ch = M.mtmd_input_chunks_get(chunks, i)
                kind = M.mtmd_input_chunk_get_type(ch)
                n = M.mtmd_input_chunk_get_n_tokens(ch)
                if kind == CHUNK_TEXT:
                    n_tok = ctypes.c_size_t()
                    p = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_tok))
                    out.append(Chunk(kind, [p[j] for j in range(n_tok.value)], n))
                    continue
                c = Chunk(kind, None, n)
                if encode:
                    if M.mtmd_encode_chunk(self.ctx, ch) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    e = M.mtmd_get_output_embd(self.ctx)
                    c.embd = np.ctypeslib.as_array(ctypes.cast(e, ctypes.POINTER(ctypes.c_float)),
                                                   shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
                out.append(c)
        finally:
            M.mtmd_input_chunks_free(chunks)
        return out

    def image_embeddings(self, img: np.ndarray) -> list[np.ndarray]:
        """The embeddings of each encoder entry of one image, in prompt order."""
        return [c.embd for c in self.chunks(M.mtmd_default_marker().decode(), [img]) if c.kind == CHUNK_IMAGE]

    def logits_after(self, prompt: str, images: list[np.ndarray], continuation: list[int] = (),
                     add_special: bool = True) -> tuple[np.ndarray, int]:
        """Evaluate the prompt (text and images) with mtmd_helper_eval_chunks in a fresh context, then
        `continuation` tokens in one batch; returns the logits of the prompt's last position and of every
        continuation position (1 + len(continuation), n_vocab), and the prompt's position count."""
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = self.n_ctx, self.n_batch, self.n_batch
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        lctx = llama_cpp.llama_init_from_model(self.model, cparams)
        chunks = self._tokenize(prompt, images, add_special)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        try:
            new_n_past = llama_cpp.llama_pos(0)
            rc = M.mtmd_helper_eval_chunks(self.ctx, lctx, chunks, 0, 0, self.n_batch, True, ctypes.byref(new_n_past))
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")
            n_past = int(new_n_past.value)
            rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,)).copy()]
            if continuation:
                n = len(continuation)
                batch = llama_cpp.llama_batch_init(n, 0, 1)
                try:
                    for i, t in enumerate(continuation):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, n_past + i, 1
                        batch.seq_id[i][0], batch.logits[i] = 0, True
                    batch.n_tokens = n
                    if llama_cpp.llama_decode(lctx, batch) != 0:
                        raise RuntimeError("llama_decode of the continuation failed")
                    for i in range(n):
                        rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, i), shape=(n_vocab,)).copy())
                finally:
                    llama_cpp.llama_batch_free(batch)
            return np.stack(rows), n_past
        finally:
            M.mtmd_input_chunks_free(chunks)
            llama_cpp.llama_free(lctx)
