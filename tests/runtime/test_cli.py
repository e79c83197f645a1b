"""The `codeshell` command end to end on a tiny checkpoint made here (a real subprocess)."""

from __future__ import annotations

import os
import re
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
    # without a terminal, one progress line per finished phase, each with its figure
    for phase in ("writing random weights: 4.6 M / 4.6 M values", "prefill (32 tokens): ",
                  "decode, batch 2: ", "memory read bandwidth: "):
        assert f"bench: {phase}" in r.stderr, r.stderr


def run_inproc(*args, stdin=None):
    """The same command in process (typer's runner): fast enough for many error cases."""
    from typer.testing import CliRunner

    from codeshell.cli import app
    return CliRunner().invoke(app, list(args), input=stdin, env={"COLUMNS": "200"})


def test_clear_errors(tiny, tmp_path):
    cases = [
        (("generate", "x", "--model", str(tmp_path / "missing")), "does not exist"),
        (("generate", "x", "--model", tiny, "--temperature", "-1"), "temperature must be >= 0"),
        (("generate", "x", "--model", tiny, "--top-p", "0"), "top_p must be in (0, 1]"),
        (("generate", "x", "--model", tiny, "--max-tokens", "0"), "max_tokens must be a positive integer"),
        (("generate", "x = 1\n" * 400, "--model", tiny), "context window is 512"),
        (("generate", "", "--model", tiny), "the prompt is empty"),
        (("bench", "--model", tiny, "--shape", "tiny"), "not both"),
        (("bench", "--shape", "13b"), "unknown --shape '13b'"),
        (("info", str(tmp_path / "missing")), "does not exist"),
    ]
    for args, message in cases:
        r = run_inproc(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)


def test_hub_model_offline_says_how_to_pass_a_path(tmp_path):
    r = cli("generate", "x", "--model", "WisdomShell/CodeShell-7B-Chat",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "WisdomShell/CodeShell-7B-Chat" in r.stderr and "--model PATH" in r.stderr


def test_missing_built_in_model_is_one_line(monkeypatch, tmp_path):
    """A broken install (the package's model files gone): each command that would fall back to
    the built-in model, and `LLM()`, say so in one line naming --model."""
    from codeshell.weights import CheckpointError
    monkeypatch.setattr("codeshell.mini.package.MODEL_DIR", tmp_path / "model")
    for args in (("generate", "x"), ("infill", "--prefix", "x"), ("chat",), ("info",), ("bench",), ("serve",),
                 ("quantize", str(tmp_path / "q")), ("export-gguf", str(tmp_path / "x.gguf")),
                 ("eval", "run", "humaneval", "--output", str(tmp_path / "e"))):
        r = run_inproc(*args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
        assert lines[0].startswith("error: the built-in codeshell-mini model is missing"), (args, r.output)
        assert "--model WisdomShell/CodeShell-7B-Chat" in lines[0], (args, r.output)
    with pytest.raises(CheckpointError, match="built-in codeshell-mini model is missing"):
        LLM()


# ---- issue 16: one-line errors, truncation, context notes, speeds, --version, help, --model ----

@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny):
    """Bad inputs: a model folder without tokenizer files, one with a corrupt tokenizer.json, a
    truncated GGUF file and a file that is no checkpoint."""
    import shutil
    root = tmp_path_factory.mktemp("bad")
    notok, badtok = root / "notok", root / "badtok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny, f), notok / f)
    shutil.copytree(tiny, badtok)
    (badtok / "tokenizer.json").write_text('{"model": ')
    (root / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # ends inside its header
    (root / "notes.txt").write_text("hello")
    return {"notok": str(notok), "badtok": str(badtok), "gguf": str(root / "cut.gguf"),
            "txt": str(root / "notes.txt"), "root": root}


BAD_INPUTS = [  # (args with placeholders, a fragment of the one error line)
    (("generate", "x", "--model", "{notok}"), "pass --tokenizer FOLDER"),
    (("infill", "--prefix", "x", "--model", "{notok}"), "pass --tokenizer FOLDER"),
    (("chat", "--model", "{notok}"), "pass --tokenizer FOLDER"),
    (("generate", "x", "--model", "{badtok}"), "not a valid tokenizer.json"),
    (("generate", "x", "--model", "{tiny}", "--tokenizer", "{notok}"), "no tokenizer.json in"),
    (("generate", "x", "--model", "{tiny}", "-n", "abc"), "--max-tokens"),
    (("generate", "--bogus"), "--bogus"),
    (("info", "{gguf}"), "cut.gguf is truncated"),
    (("info", "{txt}"), "neither GGUF nor safetensors"),
    (("info", "{tiny}", "--model", "{notok}"), "give the model once"),
    (("bench", "--shape", "13b"), "unknown --shape '13b'"),
    (("quantize", "--model", "{tiny}"), "give OUT"),
    (("export-gguf", "--model", "{tiny}", "{root}/x.gguf", "--type", "q5_k"), "unknown GGUF type"),
    (("serve", "--model", "{root}/missing"), "no checkpoint folder"),
    (("eval", "run", "humaneval", "--output", "{root}/out", "--model", "{tiny}", "--api-base", "http://127.0.0.1:9"),
     "--model"),
    (("eval", "score", "no-such-task", "--samples", "{txt}"), "unknown task"),
    (("data", "run", "{root}/missing.yaml"), "missing.yaml"),
    (("tokenizer", "eval", "{notok}"), "--corpus"),
    (("train", "plot", "{root}/missing-run"), "metrics.jsonl"),
]


@pytest.mark.parametrize("args,fragment", BAD_INPUTS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in
                                                          enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_and_exit_2(tiny, bad, args, fragment):
    args = [a.format(tiny=tiny, **bad) for a in args]
    r = run_inproc(*args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, (args, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.output)
    assert fragment in lines[0], (args, r.output)
    assert "Traceback" not in r.output and "LLM(" not in r.output


def test_real_process_error_is_one_line(bad):
    r = cli("generate", "x", "--model", bad["notok"])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--tokenizer" in r.stderr, r.stderr


def test_version():
    import codeshell
    r = run_inproc("--version")
    assert r.exit_code == 0 and r.output.strip() == f"codeshell {codeshell.__version__}"


def test_help_screens_read_like_click():
    """No Python types (`<str>`, `<list[str]>`, `--help <bool>`) and no COMMAND placeholder on a
    command without subcommands, on every help screen of the CLI."""
    import typer.main

    from codeshell.cli import app
    root = typer.main.get_command(app)
    screens = []

    def walk(cmd, path):
        screens.append(path)
        for name in getattr(cmd, "commands", {}) or {}:
            walk(cmd.commands[name], path + [name])
    walk(root, [])
    assert ["serve"] in screens and ["eval", "run"] in screens and len(screens) > 20
    for path in screens:
        r = run_inproc(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        for bad_text in ("<bool>", "<str>", "<int>", "<float>", "<list[", "<path>", "range>"):
            assert bad_text not in r.output, (path, bad_text, r.output)
        usage = next(ln for ln in r.output.splitlines() if "Usage:" in ln)
        has_sub = any(len(p) > len(path) and p[:len(path)] == path for p in screens)
        assert ("COMMAND" in usage) == has_sub, (path, usage)
        assert "{" not in usage and not re.search(r"\[[a-z_]+\]", usage), (path, usage)  # arguments as click names them
    r = run_inproc("generate", "--help")
    assert "--max-tokens" in r.output and "INTEGER" in r.output and "--truncate-prompt" in r.output


def test_info_on_gguf_and_safetensors_files(tiny, tmp_path):
    import shutil

    from codeshell.quant.gguf_io import export_gguf
    gguf = export_gguf(tiny, tmp_path / "t.gguf", "q8_0")
    r = run_inproc("info", str(gguf))
    assert r.exit_code == 0, r.output
    assert "GGUF v3" in r.output and "Q8_0" in r.output and "4,580,992" in r.output and "in the file" in r.output
    r = run_inproc("info", "--model", os.path.join(tiny, "model.safetensors"))
    assert r.exit_code == 0, r.output
    assert "safetensors, 27 tensors" in r.output and "kclgpt" in r.output and "4,580,992" in r.output
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(tiny, "model.safetensors"), alone / "w.safetensors")
    r = run_inproc("info", str(alone / "w.safetensors"))
    assert r.exit_code == 0 and "no config.json beside the file" in r.output and "4,580,992" in r.output


def test_model_option_everywhere(tiny, tmp_path):
    r = run_inproc("info", "--model", tiny)
    assert r.exit_code == 0 and "kclgpt" in r.output
    r = run_inproc("quantize", "--model", tiny, str(tmp_path / "q8"), "--bits", "8")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q8" / "config.json").exists()
    r = run_inproc("export-gguf", "--model", tiny, str(tmp_path / "m.gguf"), "--type", "f32")
    assert r.exit_code == 0 and (tmp_path / "m.gguf").exists(), r.output


def test_speeds_after_each_answer_and_quiet(tiny):
    line = re.compile(r"^prompt: \d+ tokens, [\d.]+ tokens/s \| generated: 5 tokens, [\d.]+ tokens/s "
                      r"\| finish: length$", re.M)
    r = run_inproc("generate", "def f(x):", "--model", tiny, "-t", "0", "-n", "5")
    assert r.exit_code == 0 and line.search(r.stderr), r.stderr
    assert "tokens/s" not in r.stdout  # the completion alone on stdout
    r = run_inproc("generate", "def f(x):", "--model", tiny, "-t", "0", "-n", "5", "--quiet")
    assert r.exit_code == 0 and "tokens/s" not in r.stderr, r.stderr
    r = run_inproc("chat", "--model", tiny, "-t", "0", "-n", "5", stdin="hi\nmore\n")
    assert r.exit_code == 0 and len(re.findall(r"^prompt: .*\| generated: ", r.stderr, re.M)) == 2, r.stderr
    r = run_inproc("infill", "--prefix", "def add(a, b):\n    ", "--model", tiny, "-t", "0", "-n", "3")
    assert r.exit_code == 0 and "| generated: " in r.output


def test_truncate_prompt_and_context_limit(tiny):
    long = "x = 1\n" * 120  # 600 tokens: more than the 512-token context
    r = run_inproc("generate", long, "--model", tiny, "-t", "0", "-n", "4")
    assert r.exit_code == 2 and "ask for truncation" in r.output
    r = run_inproc("generate", long, "--model", tiny, "-t", "0", "-n", "4", "--truncate-prompt", "-q")
    assert r.exit_code == 0, r.output
    llm = LLM(tiny)
    want = llm.generate(long, SamplingParams(temperature=0, max_tokens=4, truncate_prompt=True))[0]
    assert r.stdout == want.outputs[0].text + "\n"
    assert "cut the prompt from 600 to 508 tokens" in r.stderr
    # 500 prompt tokens + 64 wanted > 512: the context ends it after 12, and the CLI says so
    near = "x = 1\n" * 100
    want = llm.generate(near, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert len(want.token_ids) == 12 and want.finish_reason == "length"
    r = run_inproc("generate", near, "--model", tiny, "-t", "0", "-n", "64")
    assert r.exit_code == 0 and "stopped at the context limit (512 tokens" in r.stderr, r.stderr
    assert "finish reason `length`" in r.stderr
    r = run_inproc("generate", near, "--model", tiny, "-t", "0", "-n", "8")
    assert "context limit" not in r.stderr


def test_infill_truncation_keeps_the_code_next_to_the_cursor(tiny):
    from codeshell.cli import _fit_fim
    from codeshell.prompts import FIM
    llm = LLM(tiny)
    pre, suf = "a = 1\n" * 100 + "def tail():", "    return 0\n" + "b = 2\n" * 100
    ids, dropped = _fit_fim(llm, pre, suf, 200)
    assert len(ids) == 200 and dropped == len(llm.encode(pre)) + len(llm.encode(suf)) - 197
    head, mid, tail = (llm.encode(t)[0] for t in (FIM.prefix, FIM.suffix, FIM.middle))
    assert ids[0] == head and ids[-1] == tail and ids.count(mid) == 1
    cut = ids.index(mid)
    assert llm.decode(ids[1:cut]).endswith("def tail():") and llm.decode(ids[cut + 1:-1]).startswith("    return 0")
    assert cut - 1 >= 98  # the suffix gets at most half
    r = run_inproc("infill", "--prefix", pre * 2, "--suffix", suf * 2, "--model", tiny, "-t", "0", "-n", "4",
                   "--truncate-prompt")
    assert r.exit_code == 0 and "--truncate-prompt cut the prompt" in r.stderr, r.output


def test_readme_says_which_commands_take_model():
    """README's command-line paragraph is exact: each command it names takes --model, the
    positional ones also take MODEL, and the defaults are as it says."""
    import typer.main

    from codeshell.cli import app
    from tests.conftest import REPO
    readme = (REPO / "README.md").read_text()
    assert "The commands that run or convert a model take it with `--model`" in readme
    root = typer.main.get_command(app)

    def command(path):
        cmd = root
        for name in path.split():
            cmd = cmd.commands[name]
        return cmd
    for path in ("generate", "infill", "chat", "info", "serve", "quantize", "export-gguf", "bench", "eval run",
                 "train sft", "train lora", "train pretrain"):
        opts = {o for p in command(path).params for o in getattr(p, "opts", [])}
        assert "--model" in opts, path
        assert ("-m" in opts) == (path.split()[0] not in ("eval", "train")), path  # "All but eval run and train"
        assert f"`{path}`" in readme or path.startswith("train"), path
    assert "`train sft|lora`" in readme and "`train pretrain`" in readme and "`train merge BASE ADAPTER OUT`" in readme
    assert [p.name for p in command("train merge").params if p.param_type_name == "argument"][:1] == ["base"]
    for path in ("info", "quantize", "export-gguf"):
        args = [p.name for p in command(path).params if p.param_type_name == "argument"]
        assert args[0] == "model_arg" if path == "info" else args[0] == "model", (path, args)
    for path in ("generate", "infill", "chat", "serve", "bench", "eval run"):  # default: the built-in model
        model = next(p for p in command(path).params if p.name == "model")
        assert model.default is None and not model.required, path
