"""Chat templates: turning a list of messages into the prompt text a model was trained on.

A GGUF file usually carries its Hugging Face Jinja template in ``tokenizer.chat_template``; it is rendered
here the way llama-cpp-python and transformers render it (Jinja2, ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII).

A template is untrusted input: it runs in Jinja2's ImmutableSandboxedEnvironment, and any attempt to reach
an internal attribute (``''.__class__``...) or to mutate a list or dict raises ChatTemplateError at once
rather than quietly rendering as empty.

Files without a template (Gemma 3's GGUF among them) get a built-in one for their family, written to
produce exactly what llama.cpp's built-in template of that name produces.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render", "for_model", "BUILTIN_TEMPLATES"]


class ChatTemplateError(ValueError):
    """A chat template that cannot be used: unparsable, unsafe, or one that rejected the messages."""


# llama.cpp's built-in "gemma" format (llama-chat.cpp): no system role, so system messages are trimmed,
# concatenated and put at the top of the next non-model turn; "assistant" is called "model"; every
# message is trimmed of ASCII whitespace (C isspace), and BOS is left to the tokenizer.
GEMMA_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for message in messages -%}\n"
    "{%- set content = message['content'].strip(' \\t\\n\\r\\x0b\\x0c') -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- set ns.system = ns.system + content -%}\n"
    "{%- else -%}\n"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "{{- '<start_of_turn>' + role + '\\n' -}}\n"
    "{%- if ns.system and role != 'model' -%}\n"
    "{{- ns.system + '\\n\\n' -}}\n"
    "{%- set ns.system = '' -%}\n"
    "{%- endif -%}\n"
    "{{- content + '<end_of_turn>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<start_of_turn>model\\n' -}}\n"
    "{%- endif -%}\n"
)

# llama.cpp's built-in "chatml" format, its fallback for files without a template
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}

# general.architecture values whose files may lack a template, and the built-in their family uses
_ARCH_BUILTIN = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's {% generation %}...{% endgeneration %} marks assistant text for training masks;
    for rendering it is a pass-through."""
    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The sandbox normally turns an unsafe attribute into an undefined value that renders as nothing,
    so a probing template would "work". Refuse it outright instead."""

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_ENV = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "", **kwargs: Any) -> str:
    """Render a chat template over messages ([{"role": ..., "content": ...}, ...]).

    Extra keyword arguments (tools, documents, enable_thinking...) are passed to the template as variables,
    as llama-cpp-python and transformers do.
    """
    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template is a string, got {type(template).__name__}")
    compiled = _compile(template)
    context = dict(tools=None, tool_choice=None, functions=None, function_call=None)
    context.update(kwargs)
    context.update(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token)
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as e:
        # a template bug (or a conversation it cannot handle) surfaces as one error type for callers
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


def for_model(md: Mapping) -> str:
    """The chat template for a GGUF file: its own tokenizer.chat_template, else a built-in for its family."""
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return template
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"'tokenizer.chat_template' must be a string, got {type(template).__name__}")
    arch = md.get("general.architecture")
    builtin = _ARCH_BUILTIN.get(arch)
    if builtin is None:
        raise ChatTemplateError(
            f"the file has no 'tokenizer.chat_template' and there is no built-in template for architecture "
            f"{arch!r} (built-ins exist for: {', '.join(sorted(_ARCH_BUILTIN))}); pass a template explicitly")
    return BUILTIN_TEMPLATES[builtin]
