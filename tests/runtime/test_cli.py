"""The `codeshell` command end to end on a tiny checkpoint made here (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codeshell import LLM, SamplingParams
from codeshell.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), tokenizer_dir))


def cli(*args, stdin=None, env=None, timeout=120):
    e = {**os.environ, "CODESHELL_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "codeshell.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=e)


def test_generate_streams_the_greedy_completion(tiny):
    r = cli("generate", "def fib(n):", "--model", tiny, "-t", "0", "-n", "12")
    assert r.returncode == 0, r.stderr
    expected = LLM(tiny).generate("def fib(n):", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert r.stdout == expected + "\n"
    r2 = run_inproc("generate", "-", "--model", tiny, "-t", "0", "-n", "12")  # stdin is empty here
    assert r2.exit_code == 2 and "the prompt is empty" in r2.output


def test_infill_from_arguments_and_files(tiny, tmp_path):
    (tmp_path / "pre.py").write_text("def add(a, b):\n    ")
    r = run_inproc("infill", "--prefix-file", str(tmp_path / "pre.py"), "--suffix", "\n", "--model", tiny,
                   "-t", "0", "-n", "8")
    assert r.exit_code == 0, r.output
    expected = LLM(tiny).infill("def add(a, b):\n    ", "\n", SamplingParams(temperature=0, max_tokens=8))
    assert r.stdout == expected.outputs[0].text + "\n"
    bad = run_inproc("infill", "--prefix-file", str(tmp_path / "nope.py"), "--model", tiny)
    assert bad.exit_code == 2 and "cannot read --prefix-file" in bad.output


def test_chat_through_a_pipe_is_multi_turn(tiny):
    llm = LLM(tiny)
    sp = SamplingParams(temperature=0, max_tokens=6)
    first = llm.chat([{"role": "user", "content": "hi"}], sp)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first.strip()},
                       {"role": "user", "content": "more"}], sp)[0].outputs[0].text
    fresh = llm.chat([{"role": "user", "content": "more"}], sp)[0].outputs[0].text
    r = cli("chat", "--model", tiny, "-t", "0", "-n", "6", stdin="hi\nmore\n/clear\nmore\n/exit\nignored\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == [first, second, fresh]
    assert "history cleared" in r.stderr


def test_info_and_bench(tiny):
    r = run_inproc("info", tiny)
    assert r.exit_code == 0, r.output
    assert "kclgpt" in r.output and "4,580,992" in r.output and "KV cache per token" in r.output
    r = run_inproc("bench", "--shape", "tiny", "--prompt-len", "32", "--decode-tokens", "4", "--batch", "2")
    assert r.exit_code == 0, r.output
    assert "decode, batch 1" in r.output and "tokens/s" in r.output


def run_inproc(*args):
    """The same command in process (typer's runner): fast enough for many error cases."""
    from typer.testing import CliRunner

    from codeshell.cli import app
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_clear_errors(tiny, tmp_path):
    cases = [
        (("generate", "x", "--model", str(tmp_path / "missing")), "does not exist"),
        (("generate", "x", "--model", tiny, "--temperature", "-1"), "temperature must be >= 0"),
        (("generate", "x", "--model", tiny, "--top-p", "0"), "top_p must be in (0, 1]"),
        (("generate", "x", "--model", tiny, "--max-tokens", "0"), "max_tokens must be a positive integer"),
        (("generate", "x = 1\n" * 400, "--model", tiny), "context window is 512"),
        (("generate", "", "--model", tiny), "the prompt is empty"),
        (("bench",), "--shape"),
        (("bench", "--shape", "13b"), "unknown --shape '13b'"),
        (("info", str(tmp_path / "missing")), "does not exist"),
    ]
    for args, message in cases:
        r = run_inproc(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)


def test_default_model_offline_says_how_to_pass_a_path(tmp_path):
    r = cli("generate", "x", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "WisdomShell/CodeShell-7B-Chat" in r.stderr and "--model PATH" in r.stderr
