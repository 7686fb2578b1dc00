"""`ggufrun chat`: a terminal REPL in the llama.cpp / ollama manner.

Replies stream as they are decoded; Ctrl-C stops a reply (what was said so far stays in the history)
and a second Ctrl-C at the prompt, or Ctrl-D, leaves. Input lines ending in a backslash continue on the
next line, and a line of three double quotes opens or closes a multi-line block. Arrow keys recall
earlier inputs (readline; history kept in $GGUFRUN_HOME/chat_history).

When the conversation outgrows the context, the oldest turns after the system prompt are dropped
(a context shift, announced on screen), never silently truncated mid-turn.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from .hub import home

HELP = """commands:
  /help              this text
  /reset             forget the conversation (keeps the system prompt)
  /system TEXT       set the system prompt and reset
  /set KEY=VALUE     sampling and limits: temp, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                     frequency_penalty, seed, max_tokens; mtp (draft tokens per step, 0 off)
  /save FILE         save the conversation as JSON
  /load FILE         load a conversation saved with /save
  /stats             model, memory and speed of the last reply
  /image PATH        attach an image to your next message (needs --mmproj)
  /quit              leave (Ctrl-D too)
multi-line input: end a line with \\ or wrap the text in lines of \"\"\"; Ctrl-C stops a reply."""

SETTABLE = {"temp": "temperature", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "min_p": "min_p", "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "seed": "seed", "max_tokens": "max_tokens", "mtp": "mtp"}


class ChatSession:
    def __init__(self, llm, *, system: str | None = None, max_tokens: int = 1024, out=None, **sampling):
        self.llm = llm
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                             presence_penalty=0.0, frequency_penalty=0.0, seed=None)
        self.sampling.update({k: v for k, v in sampling.items() if k in self.sampling})
        self.messages: list[dict] = []
        self.out = out or sys.stdout
        self.load_seconds = 0.0
        self.expert_stats_file = None  # written at exit (warm start for the next session)
        self.pending_images: list[str] = []      # /image paths for the next user message
        self._pixels: dict[str, object] = {}     # path -> decoded RGB array

    @classmethod
    def from_args(cls, a) -> "ChatSession":
        from . import api
        from .cli import sampling_kwargs
        t = time.perf_counter()
        print("loading model ...", file=sys.stderr, flush=True)
        from .cli import check_sizes, placement_kwargs, print_plan
        check_sizes(a)
        llm = api.load(a.model, n_threads=a.threads, n_ctx=a.ctx_size, mmproj=getattr(a, "mmproj", None),
                       **placement_kwargs(a))
        print_plan(llm)
        s = cls(llm, system=a.system, max_tokens=a.n_predict, **sampling_kwargs(a))
        if getattr(a, "mtp", None) is not None:
            llm.mtp = a.mtp
        llm.mtp_vocab = getattr(a, "mtp_vocab", None)
        s.load_seconds = time.perf_counter() - t
        s.expert_stats_file = a.expert_stats_file
        return s

    # -- conversation -----------------------------------------------------------------------------
    def _conversation(self) -> list[dict]:
        sys_msgs = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msgs + self.messages

    def _prompt_ids(self) -> list[int]:
        """The templated conversation; drops the oldest turns while it does not fit."""
        while True:
            text = self.llm.apply_chat_template(self._conversation(), add_generation_prompt=True)
            images = [self._image(p) for m in self.messages for p in m.get("images", ())]
            if images:   # each message's images sit at the markers in its content, in order
                ids = self.llm.tokenize_with_images(text, images, add_special=False)
            else:
                ids = self.llm.tokenize(text, add_special=False)
            room = self.llm.n_ctx - min(self.max_tokens, self.llm.n_ctx // 4)
            if len(ids) <= room or len(self.messages) <= 1:
                if len(ids) > self.llm.n_ctx - 1:
                    raise ValueError(f"the message is {len(ids)} tokens, more than the context"
                                     f" ({self.llm.n_ctx}) can hold")
                return ids
            dropped = self.messages[:2]
            self.messages = self.messages[2:]
            self.say(f"[context full: dropped the oldest {len(dropped)} messages]\n")

    def _image(self, path: str):
        if path not in self._pixels:
            from .vision import load_image
            self._pixels[path] = load_image(path)
        return self._pixels[path]

    def reply(self, user_text: str) -> str:
        msg = {"role": "user", "content": user_text}
        if self.pending_images:
            from .vision.prompt import MARKER
            msg = {"role": "user", "content": MARKER * len(self.pending_images) + user_text,
                   "images": list(self.pending_images)}
        self.messages.append(msg)
        try:
            ids = self._prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        self.pending_images = []
        params = dict(self.sampling)
        pieces: list[str] = []
        interrupted = False
        stream = self.llm.generate(ids, max_tokens=self.max_tokens, stream=True, add_special=False, **params)
        try:
            for piece in stream:
                pieces.append(piece)
                self.say(piece)
        except KeyboardInterrupt:
            interrupted = True
            stream.close()
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        s = self.llm.last_stats
        note = " interrupted" if interrupted else ""
        self.say(f"\n\x1b[2m[{s.generated_tokens} tokens, {s.generate_tps:.1f} t/s; prompt {s.prompt_tokens}"
                 f" tokens at {s.prompt_tps:.1f} t/s{note}]\x1b[0m\n" if self._tty() else
                 f"\n[{s.generated_tokens} tokens, {s.generate_tps:.1f} t/s; prompt {s.prompt_tokens} tokens at"
                 f" {s.prompt_tps:.1f} t/s{note}]\n")
        return text

    # -- commands ---------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/bye"):
            return False
        if cmd == "/help":
            self.say(HELP + "\n")
        elif cmd == "/reset":
            self.messages = []
            self.pending_images = []
            self.llm.reset()
            self.say("[conversation reset]\n")
        elif cmd == "/system":
            self.system = arg or None
            self.messages = []
            self.say("[system prompt set; conversation reset]\n" if arg else "[system prompt cleared]\n")
        elif cmd == "/set":
            self._set(arg)
        elif cmd == "/save":
            if not arg:
                self.say("usage: /save FILE\n")
            else:
                with open(arg, "w") as fh:
                    json.dump({"system": self.system, "messages": self.messages, "sampling": self.sampling}, fh,
                              indent=2, ensure_ascii=False)
                self.say(f"[saved {len(self.messages)} messages to {arg}]\n")
        elif cmd == "/load":
            self._load(arg)
        elif cmd == "/stats":
            self.say(self.stats_text() + "\n")
        elif cmd == "/image":
            self._attach(arg)
        else:
            self.say(f"unknown command {cmd}; /help lists them\n")
        return True

    def _attach(self, path: str) -> None:
        from .vision import ImageError
        if not path:
            self.say("usage: /image PATH\n")
        elif self.llm.mmproj is None:
            self.say("error: images need a vision projector: start the chat with --mmproj MMPROJ\n")
        else:
            try:
                img = self._image(path)
            except ImageError as e:
                self.say(f"error: {e}\n")
                return
            self.pending_images.append(path)
            self.say(f"[image {path}: {img.shape[1]}x{img.shape[0]}; goes with your next message]\n")

    def _set(self, arg: str) -> None:
        key, eq, value = arg.partition("=")
        key = key.strip().lower()
        if not eq or key not in SETTABLE:
            self.say(f"usage: /set KEY=VALUE with KEY one of {', '.join(sorted(SETTABLE))}\n")
            return
        name = SETTABLE[key]
        try:
            if name in ("top_k", "max_tokens", "mtp"):
                v = int(value)
                if name == "mtp" and v < 0:
                    raise ValueError
            elif name == "seed":
                v = None if value.strip().lower() in ("", "none", "-1") else int(value)
            else:
                v = float(value)
        except ValueError:
            self.say(f"/set {key}: {value!r} is not a number\n")
            return
        if name == "max_tokens":
            self.max_tokens = v
        elif name == "mtp":   # the LLM's default draft length (capped by the heads the file has)
            self.llm.mtp = v
            if v and not self.llm.mtp_heads:
                self.say("[this model has no MTP heads: mtp has no effect]\n")
        else:
            self.sampling[name] = v
        self.say(f"[{name} = {v}]\n")

    def _load(self, path: str) -> None:
        try:
            with open(path) as fh:
                d = json.load(fh)
            msgs = d["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                       and isinstance(m.get("content"), str) for m in msgs):
                raise ValueError("messages must be {role, content} objects")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.say(f"/load {path}: cannot load: {e}\n")
            return
        self.system = d.get("system")
        self.messages = msgs
        self.sampling.update({k: v for k, v in d.get("sampling", {}).items() if k in self.sampling})
        self.say(f"[loaded {len(msgs)} messages from {path}]\n")

    def stats_text(self) -> str:
        from .progress import human_bytes
        llm, s = self.llm, self.llm.last_stats
        lines = [f"model      {llm.path} ({llm.file.arch})",
                 f"context    {llm.cache.n_past}/{llm.n_ctx} tokens cached, KV cache {human_bytes(llm.cache.nbytes)}",
                 f"mapped     {human_bytes(llm.file.file_size)} (resident: {human_bytes(_rss())} process RSS)",
                 f"last reply {s.generated_tokens} tokens in {s.generate_seconds:.2f}s = {s.generate_tps:.1f} t/s;"
                 f" prompt {s.prompt_tokens} new + {s.cached_tokens} reused tokens at {s.prompt_tps:.1f} t/s",
                 f"sampling   " + ", ".join(f"{k}={v}" for k, v in self.sampling.items())]
        if self.load_seconds:
            lines.append(f"load time  {self.load_seconds:.2f}s")
        if llm.mtp_heads:   # draft acceptance per position in the last reply
            setting = "all" if llm.mtp is None else llm.mtp
            lines.append(f"mtp        {llm.mtp_heads} heads, mtp={setting}; "
                         + (s.mtp.summary().removeprefix("mtp: ") if s.mtp is not None else "off in the last reply"))
        cache = getattr(llm, "expert_cache", None)
        if cache is not None:  # since load: hit rate, bytes read per token, prefetch accuracy
            t = cache.stats.summary()
            lines.append(f"experts    cache {human_bytes(cache.capacity_bytes)} ({cache.n_slots} slots),"
                         f" hit rate {t['hit_rate']:.1%}, read {human_bytes(t['bytes_per_token'])}/token,"
                         f" prefetch recall {t['prefetch_recall']:.1%} precision {t['prefetch_precision']:.1%}")
        return "\n".join(lines)

    # -- terminal ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _tty(self) -> bool:
        return hasattr(self.out, "isatty") and self.out.isatty()

    def read_input(self) -> str | None:
        """One user message (possibly multi-line); None on end of input."""
        lines: list[str] = []
        block = False
        prompt = ">>> "
        while True:
            try:
                line = input(prompt)
            except EOFError:
                return None if not lines else "\n".join(lines)
            if line.strip() == '"""':
                if block:
                    return "\n".join(lines)
                block = True
                prompt = "... "
                continue
            if block:
                lines.append(line)
                continue
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "... "
                continue
            lines.append(line)
            return "\n".join(lines)

    def repl(self) -> int:
        try:
            return self._repl()
        finally:
            if self.expert_stats_file:
                self.llm.save_expert_stats(self.expert_stats_file)

    def _repl(self) -> int:
        # Ctrl-C must reach us even when started from a context that ignores SIGINT (a background job
        # of a non-interactive shell hands that disposition down, and Python then never raises
        # KeyboardInterrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _setup_readline()
        self.say(f"ggufrun chat with {os.path.basename(self.llm.path)} ({self.llm.file.arch}); /help for commands\n")
        while True:
            try:
                text = self.read_input()
            except KeyboardInterrupt:
                self.say("\n[Ctrl-C: /quit or Ctrl-D to leave]\n")
                continue
            if text is None:
                self.say("\n")
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            try:
                self.reply(text)
            except ValueError as e:
                self.say(f"error: {e}\n")
            except KeyboardInterrupt:
                # Ctrl-C before the reply started streaming (templating, prompt evaluation)
                if self.messages and self.messages[-1]["role"] == "user":
                    self.messages.pop()
                self.say("\n[interrupted]\n")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup_readline() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # no readline (Windows): plain input() still works
        return
    path = home() / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
        readline.set_history_length(1000)
        atexit.register(readline.write_history_file, path)
    except OSError:
        pass
