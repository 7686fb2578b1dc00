"""Write a small random-weight step3vl mmproj (the vision half of Step-3.7-Flash) and the step35 text
model it feeds.

    python models/step3vl_tiny.py OUT_DIR [--quant F32 F16] [--check]

The mmproj carries the keys and tensor names llama.cpp's converter (conversion/step3.py, class
Step3VLVisionModel) writes: `general.architecture = clip`, `clip.projector_type = step3vl`, a
perception-encoder ViT (conv patch embedding without bias, learned position embeddings, pre-layernorm,
fused qkv with bias, layer scales ls1/ls2, quick-GELU MLP), two stride-2 3x3 convolution downsamplers
(mm.0, mm.1, with bias) and a bias-free linear projector (mm.model.fc) whose output width is the text
model's n_embd. Only the widths and the layer count are small; patch size 14 and the processor's fixed
504-pixel crops are the real model's, so slicing behaves exactly as it does for the real file.

The text model is step35_tiny's "gqa" configuration with the Step3 image tokens (<im_start>, <im_end>,
<patch_start>, <patch_end>, <patch_newline>, <im_patch>) appended to SmolLM2's vocabulary as control
tokens: llama.cpp's mtmd looks them up by text and would emit invalid ids without them; it also
carries SmolLM2's chat template, so the chat REPL runs on it.

`write_probe` writes a diagnostic mmproj whose encoder is the identity on pixels (patch 2, one ViT
layer with zero layer scales, 0/1 downsampler kernels that stack each 2x2 neighbourhood into channels, identity projector):
llama.cpp's embeddings of an image through it are exactly its preprocessed pixel tensor, which is how
the tests compare our preprocessing with llama.cpp's, value for value.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quant  # noqa: E402
import step35_tiny as s35  # noqa: E402

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>", "<im_patch>")
TOKEN_TYPE_CONTROL = 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # the converter's default (Step3-VL's processor values)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT = replace(s35.CONFIGS["gqa"], name="vl", n_nextn=0)


@dataclass(frozen=True)
class VisionConfig:
    name: str = "tiny"
    image_size: int = 112      # overview size; multiple of patch * 4 (two stride-2 downsamplers)
    patch: int = 14
    width: int = 64
    n_head: int = 4
    n_layer: int = 2
    n_ff: int = 373            # round(width * 8960 / 1536), the converter's default MLP ratio
    n_embd_text: int = TEXT.n_embd
    eps: float = 1e-5
    seed: int = 11


# for bench/vision_ttft.py: the real image geometry (728-pixel overview: 52 x 52 patches), a narrower and
# shallower ViT (the real one is 1536 wide, 16 heads, 47 layers)
BENCH_VISION = VisionConfig(name="bench", image_size=728, width=384, n_head=6, n_layer=8, n_ff=2240, seed=12)


def text_weights_and_metadata(q: str) -> tuple[dict, dict]:
    """step35_tiny's weights and metadata with the image tokens appended to the vocabulary."""
    w = s35.weights(TEXT)
    rng = np.random.default_rng(TEXT.seed + 100)
    n_new = len(IMAGE_TOKENS)
    E = TEXT.n_embd
    w["token_embd.weight"] = np.concatenate([w["token_embd.weight"],
                                             rng.standard_normal((n_new, E)).astype(np.float32)])
    w["output.weight"] = np.concatenate([w["output.weight"],
                                         (rng.standard_normal((n_new, E)) * (4.0 / math.sqrt(E))).astype(np.float32)])
    md = s35.metadata(TEXT, s35.FILE_TYPES[q])
    md["general.name"] = "step35-tiny-vl"
    # a chat template, so `ggufrun chat` runs on the file: SmolLM2's (its vocabulary's own ChatML)
    with s35.GGUFFile(s35.SMOLLM2) as f:
        md["tokenizer.chat_template"] = f.metadata["tokenizer.chat_template"]
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"]) + list(IMAGE_TOKENS)
    types, vt = md["tokenizer.ggml.token_type"]
    md["tokenizer.ggml.token_type"] = (list(types) + [TOKEN_TYPE_CONTROL] * n_new, vt)
    return w, md


def write_text(q: str, path: str | Path) -> Path:
    w, md = text_weights_and_metadata(q)
    tensors = {}
    for name, arr in w.items():
        t = s35.tensor_type(name, arr.shape, q, TEXT.block_count)
        if t != "F32" and arr.shape[-1] % quant.block_size(t):
            t = "Q8_0" if arr.shape[-1] % 32 == 0 else "F16"
        tensors[name] = (arr, t)
    quant.write_gguf(path, s35.ARCH, md, tensors)
    return Path(path)


def vision_weights(c: VisionConfig) -> dict[str, np.ndarray]:
    """Float32 weights in numpy order; conv kernels are (out, in, kh, kw) as PyTorch stores them."""
    rng = np.random.default_rng(c.seed)
    W, P = c.width, c.patch

    def mat(*shape, gain=1.0):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * (gain / math.sqrt(fan_in))).astype(np.float32)

    def vec(n, scale=0.1, mean=0.0):
        return (mean + scale * rng.standard_normal(n)).astype(np.float32)

    n_side = c.image_size // P
    w = {"v.patch_embd.weight": mat(W, 3, P, P, gain=2.0),
         "v.position_embd.weight": vec(n_side * n_side * W, 0.5).reshape(n_side * n_side, W),
         "v.pre_ln.weight": vec(W, 0.1, 1.0), "v.pre_ln.bias": vec(W)}
    for i in range(c.n_layer):
        p = f"v.blk.{i}."
        w.update({p + "ln1.weight": vec(W, 0.1, 1.0), p + "ln1.bias": vec(W),
                  p + "attn_qkv.weight": mat(3 * W, W, gain=1.5), p + "attn_qkv.bias": vec(3 * W),
                  p + "attn_out.weight": mat(W, W, gain=0.7), p + "attn_out.bias": vec(W),
                  p + "ls1.weight": vec(W, 0.1, 0.5),
                  p + "ln2.weight": vec(W, 0.1, 1.0), p + "ln2.bias": vec(W),
                  p + "ffn_up.weight": mat(c.n_ff, W), p + "ffn_up.bias": vec(c.n_ff),
                  p + "ffn_down.weight": mat(W, c.n_ff, gain=0.7), p + "ffn_down.bias": vec(W),
                  p + "ls2.weight": vec(W, 0.1, 0.5)})
    w.update({"mm.0.weight": mat(2 * W, W, 3, 3, gain=1.5), "mm.0.bias": vec(2 * W),
              "mm.1.weight": mat(4 * W, 2 * W, 3, 3, gain=1.5), "mm.1.bias": vec(4 * W),
              "mm.model.fc.weight": mat(c.n_embd_text, 4 * W)})
    return w


def mmproj_metadata(c: VisionConfig, file_type: int, n_embd: int, n_ff: int, n_head: int, n_layer: int) -> dict:
    return {
        "general.type": "mmproj",
        "general.name": f"step3vl-{c.name}",
        "general.file_type": file_type,
        "clip.projector_type": "step3vl",
        "clip.has_vision_encoder": True,
        "clip.vision.projection_dim": c.n_embd_text,
        "clip.vision.image_size": c.image_size,
        "clip.vision.patch_size": c.patch,
        "clip.vision.embedding_length": n_embd,
        "clip.vision.feed_forward_length": n_ff,
        "clip.vision.block_count": n_layer,
        "clip.vision.attention.head_count": n_head,
        "clip.vision.image_mean": list(CLIP_MEAN),
        "clip.vision.image_std": list(CLIP_STD),
        "clip.vision.attention.layer_norm_epsilon": c.eps,
        "clip.vision.projector.scale_factor": 4,
        "clip.vision.preproc_image_size": 3024,
    }


def mmproj_tensor_type(name: str, shape: tuple[int, ...], q: str) -> str:
    """The converter's choice: 1-D tensors and the position embeddings F32, the rest the file type."""
    if q == "F32" or len(shape) == 1 or ".position_embd." in name:
        return "F32"
    return q


def write_mmproj(c: VisionConfig, q: str, path: str | Path) -> Path:
    assert q in ("F32", "F16"), q
    tensors = {n: (a, mmproj_tensor_type(n, a.shape, q)) for n, a in vision_weights(c).items()}
    md = mmproj_metadata(c, s35.FILE_TYPES[q], c.width, c.n_ff, c.n_head, c.n_layer)
    quant.write_gguf(path, "clip", md, tensors)
    return Path(path)


PROBE_PATCH = 2
PROBE_FF = 4


def probe_weights(c: VisionConfig) -> dict[str, np.ndarray]:
    """Identity encoder: a ViT layer that adds nothing, patch embedding copies the 3x2x2 patch into 12 channels; each downsampler's
    output channel t*C + i is input channel i at kernel tap (1 + t // 2, 1 + t % 2), i.e. the 2x2
    neighbourhood (2y + dy, 2x + dx) stacked; the projector is the identity on the 192 channels (zero beyond)."""
    P = PROBE_PATCH
    C0 = 3 * P * P
    w = {"v.patch_embd.weight": np.eye(C0, dtype=np.float32).reshape(C0, 3, P, P)}
    n_side = c.image_size // P
    w["v.position_embd.weight"] = np.zeros((n_side * n_side, C0), dtype=np.float32)
    # one ViT layer whose layer scales are 0: x + 0 * attn + 0 * mlp is x exactly (with no layer at all
    # llama.cpp's graph drops the rotary inputs and the encode aborts)
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    w.update({"v.blk.0.ln1.weight": np.ones(C0, np.float32), "v.blk.0.ln1.bias": z(C0),
              "v.blk.0.attn_qkv.weight": z(3 * C0, C0), "v.blk.0.attn_out.weight": z(C0, C0),
              "v.blk.0.ls1.weight": z(C0), "v.blk.0.ln2.weight": np.ones(C0, np.float32), "v.blk.0.ln2.bias": z(C0),
              "v.blk.0.ffn_up.weight": z(PROBE_FF, C0), "v.blk.0.ffn_down.weight": z(C0, PROBE_FF),
              "v.blk.0.ls2.weight": z(C0)})
    cin = C0
    for k in range(2):
        k_w = np.zeros((4 * cin, cin, 3, 3), dtype=np.float32)
        for t in range(4):
            k_w[t * cin + np.arange(cin), np.arange(cin), 1 + t // 2, 1 + t % 2] = 1.0
        w[f"mm.{k}.weight"] = k_w
        cin *= 4
    # identity into the first 192 of the text model's n_embd outputs (mtmd requires the widths to match)
    w["mm.model.fc.weight"] = np.eye(c.n_embd_text, cin, dtype=np.float32)
    return w


def probe_pixels(embd: np.ndarray, ny: int, nx: int, patch: int = PROBE_PATCH) -> np.ndarray:
    """Undo probe_weights: (tokens, 192) embeddings of an image of ny x nx pixels -> its (3, ny, nx)
    pixel tensor."""
    ty, tx = ny // (4 * patch), nx // (4 * patch)
    v = embd[:, :3 * patch * patch * 16].reshape(ty, tx, 2, 2, 2, 2, 3, patch, patch)      # ty tx dy2 dx2 dy1 dx1 c ky kx
    return v.transpose(6, 0, 2, 4, 7, 1, 3, 5, 8).reshape(3, ny, nx)


def write_probe(c: VisionConfig, path: str | Path) -> Path:
    assert c.n_embd_text >= 3 * PROBE_PATCH ** 2 * 16
    pc = replace(c, name="probe", patch=PROBE_PATCH)
    tensors = {n: (a, "F32") for n, a in probe_weights(pc).items()}
    md = mmproj_metadata(pc, 0, 3 * PROBE_PATCH ** 2, PROBE_FF, 1, 1)
    quant.write_gguf(path, "clip", md, tensors)
    return Path(path)


def write_all(out_dir: str | Path, quants=("F32",), probe: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = VisionConfig()
    files = {"text": write_text("F32", out / "step35-tiny-vl-F32.gguf")}
    for q in quants:
        files[f"mmproj-{q}"] = write_mmproj(c, q, out / f"mmproj-step3vl-tiny-{q}.gguf")
    if probe:
        files["probe"] = write_probe(c, out / "mmproj-step3vl-probe.gguf")
    return files


def check_llama_cpp(text_path: Path, mmproj_path: Path) -> dict:
    """Load both files in llama.cpp's mtmd and encode a gradient image: the image's chunk layout."""
    import ctypes
    import llama_cpp
    from llama_cpp import mtmd_cpp as M
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mp)
    cp = M.mtmd_context_params_default()
    cp.use_gpu, cp.print_timings, cp.warmup = False, False, False
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, cp)
    if not ctx:
        raise RuntimeError(f"llama.cpp's mtmd could not load {mmproj_path}")
    img = (np.arange(200 * 300 * 3) % 251).astype(np.uint8)
    bmp = M.mtmd_bitmap_init(300, 200, (ctypes.c_uint8 * img.size).from_buffer(img))
    chunks = M.mtmd_input_chunks_init()
    prompt = b"Look: " + M.mtmd_default_marker()
    text = M.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=False, parse_special=True)
    rc = M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1)
    out = {"tokenize_rc": rc, "chunks": []}
    for i in range(M.mtmd_input_chunks_size(chunks)):
        ch = M.mtmd_input_chunks_get(chunks, i)
        out["chunks"].append((M.mtmd_input_chunk_get_type(ch), M.mtmd_input_chunk_get_n_tokens(ch)))
    M.mtmd_input_chunks_free(chunks)
    M.mtmd_bitmap_free(bmp)
    M.mtmd_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--quant", nargs="*", default=["F32", "F16"], choices=["F32", "F16"])
    ap.add_argument("--check", action="store_true", help="load the files in llama.cpp's mtmd")
    a = ap.parse_args(argv)
    files = write_all(a.out_dir, a.quant)
    for k, p in files.items():
        print(f"{k:12s} {p} {p.stat().st_size / 1e6:.1f} MB")
    if a.check:
        for q in a.quant:
            print(f"llama.cpp mtmd {q}:", check_llama_cpp(files["text"], files[f"mmproj-{q}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
