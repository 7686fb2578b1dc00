"""The command line as a user meets it: info, run, pull --list, and chat driven through a pseudo-terminal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

GGUFRUN = [sys.executable, "-m", "ggufrun.cli"]


def run_cli(*args, input_text=None, env=None):
    return subprocess.run(GGUFRUN + list(args), capture_output=True, text=True, input=input_text,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_info_text_and_json(smollm2_path, gemma3_path):
    r = run_cli("info", smollm2_path)
    assert r.returncode == 0, r.stderr
    assert "architecture  llama" in r.stdout and "vocabulary 49152" in r.stdout and "Q4_1" in r.stdout
    r = run_cli("info", gemma3_path, "--json")
    d = json.loads(r.stdout)
    assert d["architecture"] == "gemma3" and d["tensor_count"] == 236
    assert d["hparams"]["attention.sliding_window"] == 512
    assert d["tokenizer"] == {"model": "llama", "pre": "default", "vocab_size": 262144, "chat_template": False}
    assert sum(d["bytes_by_type"].values()) <= d["file_bytes"]
    assert d["bytes_per_token"] == d["always_active_bytes"] + d["embedding_bytes"] // 262144


def test_info_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    r = run_cli("info", str(bad))
    assert r.returncode == 1 and f"{bad}: bad magic" in r.stderr
    r = run_cli("info", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "no such file" in r.stderr


def test_run_greedy_matches_api(smollm2_path):
    import ggufrun
    want = ggufrun.load(smollm2_path).generate("The capital of France is", max_tokens=12, temperature=0)
    r = run_cli("run", "-m", smollm2_path, "-p", "The capital of France is", "-n", "12", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is" + want + "\n"


def test_act_precision_flag(smollm2_path):
    """--act-precision 2 runs two-term activations: the API's greedy text at that precision, and the
    bench says which precision its figures were taken at."""
    import ggufrun
    from ggufrun import native
    with native.act_precision(2):
        want = ggufrun.load(smollm2_path).generate("Once upon a time", max_tokens=16, temperature=0)
    r = run_cli("run", "-m", smollm2_path, "-p", "Once upon a time", "-n", "16", "--temp", "0", "--act-precision", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time" + want + "\n"
    for p in ("1", "2"):
        r = run_cli("bench", "-m", smollm2_path, "-p", "8", "-n", "2", "-r", "1", "--json", "--act-precision", p)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["act_precision"] == int(p)
    r = run_cli("run", "-m", smollm2_path, "-p", "x", "--act-precision", "3")
    assert r.returncode == 2 and "--act-precision" in r.stderr


def test_run_chat_template_and_seeded_sampling(smollm2_path):
    a = run_cli("run", "-m", smollm2_path, "--chat", "-p", "Say hi", "-n", "8", "--temp", "0.9", "--seed", "7")
    b = run_cli("run", "-m", smollm2_path, "--chat", "-p", "Say hi", "-n", "8", "--temp", "0.9", "--seed", "7")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_run_prompt_longer_than_context(smollm2_path):
    r = run_cli("run", "-m", smollm2_path, "-c", "16", "-p", "word " * 40, "-n", "4")
    assert r.returncode == 1
    assert "longer than the context (n_ctx=16)" in r.stderr


def test_pull_list():
    r = run_cli("pull", "--list")
    assert "smollm2-135m" in r.stdout and "(default)" in r.stdout and "gemma3-270m" in r.stdout


@pytest.fixture
def chat(smollm2_path, tmp_path):
    env = {**os.environ, "GGUFRUN_HOME": str(tmp_path), "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "ggufrun.cli", "chat", "-m", smollm2_path, "--temp", "0",
                                           "-n", "400"], env=env, encoding="utf-8", timeout=120,
                          dimensions=(40, 200))
    child.expect_exact(">>> ")
    yield child
    child.terminate(force=True)


def test_chat_reply_stats_commands(chat, tmp_path):
    chat.sendline("What is the capital of France? Answer in one word.")
    chat.expect(r"\[(\d+) tokens, ([\d.]+) t/s; prompt (\d+) tokens")
    assert int(chat.match.group(3)) > 10
    reply = chat.before
    assert "Paris" in reply
    chat.expect_exact(">>> ")
    chat.sendline("/set temp=0.5")
    chat.expect_exact("[temperature = 0.5]")
    chat.sendline("/stats")
    chat.expect(r"KV cache .*\r\n")
    chat.expect_exact(">>> ")
    save = tmp_path / "conv.json"
    chat.sendline(f"/save {save}")
    chat.expect_exact("[saved 2 messages")
    chat.expect_exact(">>> ")
    saved = json.loads(save.read_text())
    assert saved["messages"][0]["role"] == "user" and "Paris" in saved["messages"][1]["content"]
    chat.sendline("/reset")
    chat.expect_exact("[conversation reset]")
    chat.sendline(f"/load {save}")
    chat.expect_exact("[loaded 2 messages")
    chat.sendline("/load /nonexistent/file.json")
    chat.expect_exact("cannot load")
    chat.sendline("/bogus")
    chat.expect_exact("unknown command /bogus")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)


def test_chat_multiline_and_ctrl_c_stops_only_the_reply(chat):
    for line in ('"""', "Write a very long story about a dragon,", "with many chapters."):
        chat.sendline(line)
        chat.expect_exact("... ")    # continuation prompt: the line was read
    chat.sendline('"""')
    chat.expect_exact('"""\r\n')
    chat.expect(r"\w+ \w+ \w+")    # the reply has started streaming
    chat.sendintr()
    chat.expect(r"\[(\d+) tokens, [\d.]+ t/s; prompt \d+ tokens at [\d.]+ t/s interrupted\]")
    assert int(chat.match.group(1)) < 400
    chat.expect_exact(">>> ")
    # the session goes on: a second question is answered
    chat.sendline("What is 2+2?")
    chat.expect(r"\[\d+ tokens, [\d.]+ t/s")
    chat.expect_exact(">>> ")
    # Ctrl-C while a long prompt is evaluated (before any text streams) leaves the session alive too
    chat.sendline("Tell me about the sea. " * 40)
    time.sleep(0.3)
    chat.sendintr()
    chat.expect(r"interrupted\]|Ctrl-C: /quit")
    chat.expect_exact(">>> ")
    chat.sendline("/stats")
    chat.expect_exact("KV cache")
    chat.expect_exact(">>> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)


def test_run_with_mtp_heads_and_a_draft_vocabulary():
    """`run --mtp N --mtp-vocab M` on the trained MTP file: the same greedy text as without MTP, the
    acceptance line with -v; a negative draft vocabulary is refused before the model loads."""
    model = str(Path(__file__).resolve().parent.parent / "models" / "step35-mtp-py-Q8_0.gguf")
    args = ("run", "-m", model, "-p", "def parse(text):\n", "-n", "24", "--temp", "0")
    plain = run_cli(*args, "--mtp", "0")
    spec = run_cli(*args, "--mtp", "3", "--mtp-vocab", "300", "-v")
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr, spec.stderr)
    assert spec.stdout == plain.stdout and "drafts accepted" in spec.stderr
    assert "drafts among ids < 300" in spec.stderr
    r = run_cli(*args, "--mtp-vocab", "-1")
    assert r.returncode == 2 and "--mtp-vocab: must be >= 0, not -1" in r.stderr
