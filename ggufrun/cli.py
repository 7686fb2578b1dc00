"""The `ggufrun` command: info, pull, run, chat."""
from __future__ import annotations

import argparse
import json
import sys

from .gguf_file import GGUFError
from .hub import PullError


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("-m", "--model", required=required,
                   help="GGUF path, registry name (see `ggufrun pull --list`) or hf://ORG/REPO/FILE.gguf;"
                        " default: the default model")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens")
    p.add_argument("--act-precision", type=int, choices=(1, 2), default=None,
                   help="activation terms per quantized product: 1 (default) rounds to 8 bits as llama.cpp"
                        " does; 2 adds the rounding residual as a second term (~100x less activation error,"
                        " batched and token-by-token results within ~1e-6 KL), slower where products are"
                        " compute bound (env GGUFRUN_ACT_PRECISION)")


def _add_sampling_args(p: argparse.ArgumentParser, temp: float) -> None:
    p.add_argument("--temp", type=float, default=temp, help="temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert placement (MoE models)")
    g.add_argument("--expert-cache", metavar="SIZE",
                   help="keep SIZE bytes of hot routed experts resident, read cold ones from the file on demand"
                        " (e.g. 600M, 1.5G; K/M/G are powers of 1024, KB/MB/GB of 1000)")
    g.add_argument("--mem-budget", metavar="SIZE",
                   help="total memory to use: always-active weights, KV cache and a runtime reserve first, the"
                        " rest becomes the expert cache (ignored when --expert-cache is given)")
    g.add_argument("--expert-stats-file", metavar="FILE",
                   help="warm start: read expert use counts from FILE if it exists (the most used experts are"
                        " loaded first) and write the updated counts back at exit")
    g.add_argument("--no-prefetch", action="store_true", help="do not predict and read the next layer's experts")
    g.add_argument("--mlock", action="store_true", help="lock the expert cache in RAM")


def placement_kwargs(a: argparse.Namespace) -> dict:
    return dict(expert_cache=a.expert_cache, mem_budget=a.mem_budget if a.expert_cache is None else None,
                expert_stats_file=a.expert_stats_file, prefetch=not a.no_prefetch, mlock=a.mlock)


def check_sizes(a: argparse.Namespace) -> None:
    """Bad SIZE strings fail before a model is opened."""
    from .expert_cache import parse_size
    for v in (getattr(a, "expert_cache", None), getattr(a, "mem_budget", None)):
        if v is not None:
            parse_size(v)


def print_plan(llm) -> None:
    if llm.placement is not None:
        print("placement:", *llm.placement.lines(), sep="\n", file=sys.stderr)


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def _add_mtp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mtp", type=int, default=None, metavar="N",
                   help="speculative decoding with the model's MTP heads: draft up to N tokens per step (0: off;"
                        " default: every head the file has). Output is unchanged; the draft length adapts to"
                        " measured acceptance and step cost")
    p.add_argument("--mtp-vocab", type=_count, default=None, metavar="N",
                   help="drafts are the first N token ids, whose vocabulary-projection rows are all the heads"
                        " compute (0: any id; default: a quarter of the vocabulary, at least 1024)")


def _add_vision_args(p: argparse.ArgumentParser, images: bool) -> None:
    g = p.add_argument_group("images (vision models)")
    g.add_argument("--mmproj", metavar="MMPROJ", help="the model's vision projector GGUF (step3vl)")
    if images:
        g.add_argument("--image", metavar="PATH", action="append", default=[],
                       help="an image (PNG, JPEG, WebP, ...) for the prompt; repeat for several. Each takes the"
                            " place of a <__media__> marker in the prompt, or goes before the text")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repeat_penalty=a.repeat_penalty, presence_penalty=a.presence_penalty,
                frequency_penalty=a.frequency_penalty, seed=a.seed)


def cmd_info(a) -> int:
    from .gguf_file import GGUFFile
    from .hub import resolve
    from .info import describe, format_info
    check_sizes(a)
    with GGUFFile(resolve(a.model, pull_missing=False)) as f:
        d = describe(f)
        p = None
        if a.plan:
            from .expert_cache import parse_size, plan
            if a.mem_budget is None and a.expert_cache is None:
                raise ValueError("--plan needs --mem-budget SIZE (or --expert-cache SIZE)")
            p = plan(f, mem_budget=None if a.mem_budget is None else parse_size(a.mem_budget),
                     expert_cache=None if a.expert_cache is None else parse_size(a.expert_cache), n_ctx=a.ctx_size)
    if a.json:
        if p is not None:
            from dataclasses import asdict
            d["placement"] = asdict(p)
        print(json.dumps(d, indent=2))
    else:
        print(format_info(d))
        if p is not None:
            print("placement plan (not loaded):", *p.lines(), sep="\n")
    return 0


def cmd_pull(a) -> int:
    from .hub import pull, registry
    if a.list or not a.name:
        reg = registry()
        for name, e in reg["models"].items():
            mark = " (default)" if name == reg["default"] else ""
            print(f"{name:<16} {e['description']}{mark}")
        return 0
    path = pull(a.name, sha256=a.sha256)
    print(path)
    return 0


def cmd_run(a) -> int:
    from . import api
    from .vision import load_image
    from .vision.prompt import MARKER
    check_sizes(a)
    if a.image and not a.mmproj:
        raise ValueError("--image needs --mmproj MMPROJ (the model's vision projector)")
    images = [load_image(p) for p in a.image]   # a bad image fails before the model loads
    llm = api.load(a.model, n_threads=a.threads, n_ctx=a.ctx_size, mmproj=a.mmproj, **placement_kwargs(a))
    llm.mtp_vocab = a.mtp_vocab
    print_plan(llm)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    add_special = True
    if a.chat:
        content = prompt if MARKER in prompt or not images else MARKER * len(images) + prompt
        prompt = llm.apply_chat_template([{"role": "user", "content": content}])
        add_special = False  # the template already placed BOS where the model wants it
    if images:
        ids = llm.tokenize_with_images(prompt, images, add_special=add_special)
    else:
        ids = llm.tokenize(prompt, add_special=add_special)
    if not a.chat:
        sys.stdout.write(prompt)
    for piece in llm.generate(ids, max_tokens=a.n_predict, stream=True, mtp=a.mtp, **sampling_kwargs(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = llm.last_stats
    if a.verbose or sys.stderr.isatty():
        print(f"[prompt {s.prompt_tokens} tokens {s.prompt_tps:.1f} t/s | generated {s.generated_tokens} tokens"
              f" {s.generate_tps:.1f} t/s | stop: {s.stop_reason}]", file=sys.stderr)
    if a.verbose and s.mtp is not None:   # acceptance per draft position
        print(f"[{s.mtp.summary()}]", file=sys.stderr)
    if a.expert_stats:
        experts = getattr(llm.model, "experts", None)
        lines = experts.report(top=8) if experts is not None and experts.layers else ["(no routed experts in this model)"]
        print("expert use (prompt and generated tokens):", *lines, sep="\n", file=sys.stderr)
        if llm.expert_cache is not None:
            print("expert placement (prompt and generated tokens):", *llm.expert_cache.report(), sep="\n",
                  file=sys.stderr)
    if a.expert_stats_file:
        llm.save_expert_stats(a.expert_stats_file)
    llm.close()
    return 0


def cmd_chat(a) -> int:
    from .chat import ChatSession
    return ChatSession.from_args(a).repl()


def cmd_bench(a) -> int:
    from .bench import main_from_args
    return main_from_args(a)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ggufrun", description="Run quantized GGUF models on the CPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="what a GGUF file holds and what it costs per token")
    p.add_argument("model", help="GGUF path or registry name (already pulled)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plan", action="store_true",
                   help="show where weights would go under --mem-budget / --expert-cache, without loading")
    p.add_argument("--mem-budget", metavar="SIZE", help="total memory for --plan (e.g. 800M)")
    p.add_argument("--expert-cache", metavar="SIZE", help="expert cache size for --plan instead of a total")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context the KV cache is sized for (--plan)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("pull", help="fetch a model into the model cache")
    p.add_argument("name", nargs="?", help="registry name, hf://ORG/REPO/FILE.gguf or http(s) URL")
    p.add_argument("--sha256", help="expected sha256 for URL downloads")
    p.add_argument("--list", action="store_true", help="list the registry")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("run", help="complete a prompt")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", help="prompt text (default: read stdin)")
    p.add_argument("-n", "--n-predict", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("-v", "--verbose", action="store_true", help="speed and (with MTP) draft acceptance to stderr")
    _add_mtp_arg(p)
    p.add_argument("--expert-stats", action="store_true",
                   help="after generating, print per-layer routed-expert use (top experts, skew) and, with an"
                        " expert cache, its hit rate, bytes read per token and prefetch accuracy to stderr"
                        " (to save the counts for a warm start use --expert-stats-file FILE)")
    _add_placement_args(p)
    _add_vision_args(p, images=True)
    _add_sampling_args(p, temp=0.8)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="prompt processing and generation tokens/s, llama-bench style")
    _add_model_args(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("chat", help="interactive chat")
    _add_model_args(p)
    p.add_argument("-n", "--n-predict", type=int, default=1024, help="max tokens per reply")
    p.add_argument("--system", help="system prompt")
    _add_mtp_arg(p)
    _add_placement_args(p)
    _add_vision_args(p, images=False)
    _add_sampling_args(p, temp=0.8)
    p.set_defaults(fn=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "act_precision", None):
            from . import native
            native.set_act_precision(a.act_precision)
        return a.fn(a)
    except (GGUFError, PullError, FileNotFoundError, ValueError) as e:
        print(f"ggufrun: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
