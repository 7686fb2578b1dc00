"""Chat templates against llama.cpp: Jinja templates as llama-cpp-python renders them, the built-in gemma
format as llama_chat_apply_template produces it, and the sandbox holding against hostile templates."""
from __future__ import annotations

import ctypes

import pytest

from ggufrun.chat_template import BUILTIN_TEMPLATES, ChatTemplateError, for_model, render
from ggufrun.gguf_file import GGUFFile

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "  Rule one.\n"}, {"role": "system", "content": "\tRule two. "},
     {"role": "user", "content": "  padded  \n"}, {"role": "assistant", "content": "\nok\n"}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Fine."}],
    [{"role": "system", "content": "Only a system message."}],
    [{"role": "system", "content": "Sys"}, {"role": "assistant", "content": "model turn"},
     {"role": "user", "content": "user after model"}],
    [{"role": "user", "content": "Unicode: 日本語 😀 naïve\u00a0nbsp"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "<start_of_turn>literal markers<end_of_turn>"}],
    [],
]

_md: dict[str, dict] = {}


def metadata_of(path) -> dict:
    if str(path) not in _md:
        _md[str(path)] = GGUFFile(str(path)).metadata
    return _md[str(path)]


def llama_cpp_builtin(template: str, messages, add_ass: bool) -> str:
    """llama.cpp's llama_chat_apply_template with a template name or text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    arr = (llama_cpp.llama_chat_message * max(1, len(messages)))()
    keep = []
    for i, m in enumerate(messages):
        role, content = m["role"].encode(), m["content"].encode()
        keep += [role, content]
        arr[i].role, arr[i].content = role, content
    cap = 4096
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_ass, buf, cap)
    assert n >= 0, f"llama.cpp does not know template {template[:40]!r}"
    if n > cap:
        buf = ctypes.create_string_buffer(n)
        n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), add_ass, buf, n)
    return buf.raw[:n].decode()


def jinja_formatter(template: str, messages, add_generation_prompt: bool) -> str:
    """llama-cpp-python's Jinja2ChatFormatter, what Llama.create_chat_completion renders with."""
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    fmt = chat_format.Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                          add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_template_renders_like_llama_cpp_python(smollm2_path, conv, add_generation_prompt):
    template = for_model(metadata_of(smollm2_path))
    messages = CONVERSATIONS[conv]
    ours = render(template, messages, add_generation_prompt=add_generation_prompt,
                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert ours == jinja_formatter(template, messages, add_generation_prompt)


def test_smollm2_template_with_system_message_is_llama_cpp_chatml(smollm2_path):
    # llama.cpp's own engine sees a ChatML template; with a system message given (so the template's default
    # system prompt is not added) its built-in chatml output and the Jinja output are the same text
    template = for_model(metadata_of(smollm2_path))
    for messages in (CONVERSATIONS[1], CONVERSATIONS[3]):
        assert render(template, messages) == llama_cpp_builtin(template, messages, True)
        assert render(BUILTIN_TEMPLATES["chatml"], messages) == llama_cpp_builtin("chatml", messages, True)


def test_smollm2_template_adds_its_default_system_prompt(smollm2_path):
    text = render(for_model(metadata_of(smollm2_path)), CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")


def test_gemma3_file_has_no_template_and_gets_the_builtin(gemma3_path):
    md = metadata_of(gemma3_path)
    assert "tokenizer.chat_template" not in md
    assert for_model(md) == BUILTIN_TEMPLATES["gemma"]


@pytest.mark.parametrize("add_ass", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_gemma_builtin_matches_llama_cpp(conv, add_ass):
    messages = CONVERSATIONS[conv]
    ours = render(BUILTIN_TEMPLATES["gemma"], messages, add_generation_prompt=add_ass)
    assert ours == llama_cpp_builtin("gemma", messages, add_ass)


def test_gemma_builtin_folds_system_into_first_user_turn():
    text = render(BUILTIN_TEMPLATES["gemma"], CONVERSATIONS[3])
    assert text == ("<start_of_turn>user\nRule one.Rule two.\n\npadded<end_of_turn>\n"
                    "<start_of_turn>model\nok<end_of_turn>\n<start_of_turn>model\n")


def test_for_model_without_template_or_known_family_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match=r"tokenizer\.chat_template.*'mamba'"):
        for_model({"general.architecture": "mamba"})
    with pytest.raises(ChatTemplateError, match=r"tokenizer\.chat_template"):
        for_model({"general.architecture": "llama", "tokenizer.chat_template": ["not", "a", "string"]})


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ (1).__class__.__base__ }}",
])
def test_hostile_templates_are_refused(template):
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render(template, [{"role": "user", "content": "hi"}])


def test_template_helpers_work_as_in_transformers():
    messages = [{"role": "user", "content": "é"}, {"role": "assistant", "content": "b"}]
    t = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
         "|{{ strftime_now('%Y') | length }}|{{ tools }}|{{ bos_token }}{{ eos_token }}|{{ custom }}")
    assert render(t, messages, bos_token="<s>", eos_token="</s>", custom=7) == \
        '{"role": "user", "content": "é"}|4|None|<s></s>|7'
    # trim_blocks / lstrip_blocks: block tags leave no stray whitespace
    assert render("  {% if true %}\nx\n  {% endif %}\n", messages) == "x\n"
    # {% generation %} (Hugging Face training marker) renders its body
    assert render("{% generation %}body{% endgeneration %}", messages) == "body"


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="refused the conversation: only user roles"):
        render("{{ raise_exception('only user roles') }}", [])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for %}", [])
    with pytest.raises(ChatTemplateError):
        render("{{ 1 / 0 }}", [])
