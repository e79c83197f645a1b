"""GGUF both ways with llama.cpp itself in the loop (its llama-server and its own converter,
built by .ci/install-llamacpp.sh): our export (f32, f16, q8_0, q4_0) loads in llama.cpp, which
tokenizes a FIM prompt as the official tokenizer does and, on f32, picks the same greedy tokens
as we do; a file written by llama.cpp's `convert_hf_to_gguf.py` loads in ours with the same
greedy tokens (and llama.cpp itself refuses that file: its converter writes no output.weight
for a tied head, which its loader requires; our export writes one). Skips without the binaries ($CODESHELL_LLAMACPP_BIN or the install script's
cache), fails instead when CODESHELL_REQUIRE_LLAMACPP=1 (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")

from codeshell import LLM, SamplingParams  # noqa: E402
from codeshell.llamacpp import LlamaCppError, LlamaServer, converter, find_bin_dir  # noqa: E402
from codeshell.quant.gguf_io import export_gguf, read_gguf  # noqa: E402
from codeshell.testing import make_tiny_checkpoint  # noqa: E402

N_NEW = 16
# llama.cpp's KV cache in f32 too, so that f32 on both sides differs only in summation order.
F32_CACHE = ("-ctk", "f32", "-ctv", "f32")
# f16 / q8_0 / q4_0: the two sides round differently (llama.cpp's activations to Q8_0 per block
# of 32 and an F16 intermediate; our Q8_0 import re-quantizes to int8 per channel; Q4_0 is the
# same int4 on both), so a near-tie may go either way. Teacher-forced on llama.cpp's own tokens,
# our argmax must equal its pick wherever its top-2 log-probability margin exceeds this (on this
# model margins run 0.006-0.5 and 32 of 32 steps agreed in each type when this was written; a
# wrong tensor layout would agree at ~1 / vocab).
MARGIN = {"f16": 0.02, "q8_0": 0.05, "q4_0": 0.05}


@pytest.fixture(scope="module")
def bin_dir():
    try:
        d = find_bin_dir()
    except LlamaCppError as e:
        d, why = None, str(e)
    else:
        why = "llama.cpp binaries not found (run .ci/install-llamacpp.sh, or set CODESHELL_LLAMACPP_BIN)"
    if d is None:
        if os.environ.get("CODESHELL_REQUIRE_LLAMACPP") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return d


@pytest.fixture(scope="module")
def src(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src"), tokenizer_dir=tokenizer_dir, seed=11)


@pytest.fixture(scope="module")
def fim(tokenizer_dir):
    return json.loads((tokenizer_dir / "prompts.json").read_text())["fim"][0]


def ours_greedy(model, prompt_ids: list[int], n: int = N_NEW) -> list[int]:
    llm = model if isinstance(model, LLM) else LLM(str(model), dtype="float32")
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return list(llm.generate({"prompt_token_ids": prompt_ids}, sp)[0].outputs[0].token_ids)


@pytest.mark.parametrize("ty", ["f32", "f16", "q8_0", "q4_0"])
def test_our_export_runs_in_llamacpp(bin_dir, src, fim, tmp_path, ty):
    path = export_gguf(src, tmp_path / f"m-{ty}.gguf", ty)
    with LlamaServer(bin_dir, path, threads=1, ctx=256, extra=F32_CACHE) as srv:
        assert srv.tokenize(fim["prompt"]) == fim["ids"]  # pre-tokenizer and specials as the official one
        theirs = srv.greedy(fim["ids"], N_NEW, n_probs=2)
    assert len(theirs["tokens"]) == N_NEW
    llm = LLM(str(path), dtype="float32")
    if ty == "f32":
        assert theirs["tokens"] == ours_greedy(llm, fim["ids"]) == ours_greedy(src, fim["ids"])
        return
    _agrees_where_clear(llm, fim, theirs, ty)


def test_quantized_head_exports_and_runs_in_llamacpp(bin_dir, src, fim, tmp_path):
    """A `codeshell quantize --head-bits 8` folder (int4 linears, int8 head, tied config): the
    export writes the stored head as output.weight (it once left it out, which llama.cpp's
    loader refuses), and llama.cpp picks the tokens we pick from the same file where its top-1
    is clear. (Not against the folder itself: Q4_0 re-quantizes our int4 groups on its own grid.)"""
    from codeshell.quant.convert import quantize_checkpoint
    from codeshell.quant.scheme import QuantScheme
    q = quantize_checkpoint(src, tmp_path / "q", QuantScheme.parse("int4-g32-head8"))
    path = export_gguf(q, tmp_path / "m-q4_0.gguf", "q4_0")
    with LlamaServer(bin_dir, path, threads=1, ctx=256, extra=F32_CACHE) as srv:
        theirs = srv.greedy(fim["ids"], N_NEW, n_probs=2)
    assert len(theirs["tokens"]) == N_NEW
    _agrees_where_clear(LLM(str(path), dtype="float32"), fim, theirs, "q4_0")


def _agrees_where_clear(llm, fim, theirs, ty):
    # Teacher-forced on llama.cpp's sequence: one forward, our argmax at each generated position.
    seq = torch.tensor([fim["ids"] + theirs["tokens"][:-1]])
    with torch.no_grad():
        mine = llm.model(seq)[0, len(fim["ids"]) - 1:].argmax(-1).tolist()
    checked = 0
    for step, (t, m, top) in enumerate(zip(theirs["tokens"], mine, theirs["probs"])):
        if top is None:  # llama-server reports no probabilities for a token ending mid-character
            continue
        assert top[0][0] == t  # greedy: llama.cpp took its own top-1
        if top[0][1] - top[1][1] > MARGIN[ty]:
            checked += 1
            assert m == t, f"step {step}: llama.cpp picked {t} by a margin {top[0][1] - top[1][1]:.3f}, ours {m}"
    assert checked >= N_NEW // 2, f"only {checked} of {N_NEW} steps had a clear top-1; the check would be weak"


def test_real_n_inner_loads_in_llamacpp(bin_dir, tokenizer_dir, fim, tmp_path):
    """feed_forward_length is the real n_inner (192 here, not 4 * 64): llama.cpp checks ffn_up
    against it, loads the file and picks our greedy tokens."""
    from codeshell.config import SHAPES
    src = make_tiny_checkpoint(tmp_path / "ffn", tokenizer_dir=tokenizer_dir,
                               cfg=SHAPES["tiny"].replace(n_inner=192), seed=12)
    path = export_gguf(src, tmp_path / "ffn.gguf", "f32")
    assert read_gguf(path)[1]["codeshell.feed_forward_length"] == 192
    with LlamaServer(bin_dir, path, threads=1, ctx=256, extra=F32_CACHE) as srv:
        assert srv.greedy(fim["ids"], N_NEW)["tokens"] == ours_greedy(src, fim["ids"])


def test_llamacpp_converter_file_loads_in_ours(bin_dir, src, fim, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (with its gguf-py) on the checkpoint: ours loads the
    file and its greedy tokens equal ours on the checkpoint."""
    conv = converter(bin_dir)
    if conv is None:
        msg = f"convert_hf_to_gguf.py not found beside {bin_dir} (the install script's cache has it)"
        if os.environ.get("CODESHELL_REQUIRE_LLAMACPP") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    script, gguf_py = conv
    out = tmp_path / "converted.gguf"
    env = {**os.environ, "PYTHONPATH": str(gguf_py), "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""}
    r = subprocess.run([sys.executable, str(script), str(src), "--outfile", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    fields, tensors = read_gguf(out)[1:]
    assert fields["tokenizer.ggml.pre"] == "codeshell"  # its hash of the real tokenizer
    assert "output.weight" not in tensors  # its CodeShell converter writes none for a tied checkpoint
    llm = LLM(str(out), dtype="float32")
    assert llm.tokenizer.encode(fim["prompt"]) == fim["ids"]
    assert ours_greedy(llm, fim["ids"]) == ours_greedy(src, fim["ids"])
    # And the reason our export writes output.weight for a tied head: llama.cpp refuses this file.
    with pytest.raises(LlamaCppError, match="output.weight"):
        LlamaServer(bin_dir, out, threads=1, ctx=256).stop()


def test_bench_compare_without_llamacpp_is_one_line(tmp_path):
    """`codeshell bench --compare-llamacpp DIR` on a folder without llama.cpp: one error line, exit 2."""
    from typer.testing import CliRunner

    from codeshell.cli import app
    r = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--compare-llamacpp", str(tmp_path)])
    assert r.exit_code == 2
    assert f"error: {tmp_path} has no llama-bench" in r.output and "Traceback" not in r.output


def test_llama_bench_reports_its_best_sample(bin_dir, src, tmp_path):
    """`llamacpp.llama_bench` on llama-bench's own JSON: the figures are the best of its
    repetitions (as bench_quant's figures for our side), its mean kept beside them."""
    from codeshell.llamacpp import llama_bench
    path = export_gguf(src, tmp_path / "m-q8_0.gguf", "q8_0")
    r = llama_bench(bin_dir, path, threads=1, prompt_len=32, decode_tokens=8, repeats=3)
    for kind in ("prompt", "decode"):
        assert r[f"{kind}_mean_tps"] > 0, r
        assert r[f"{kind}_tps"] >= r[f"{kind}_mean_tps"], r
