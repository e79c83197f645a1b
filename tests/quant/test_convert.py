"""`codeshell quantize`: quantize -> save -> load round trip, shards, errors, and the memory
bound of loading a quantized folder (no full-precision weight is ever built)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from codeshell import LLM
from codeshell.config import CodeShellConfig
from codeshell.quant.cli import app
from codeshell.quant.convert import quantize_checkpoint
from codeshell.quant.scheme import QuantError, QuantScheme
from codeshell.testing import make_tiny_checkpoint
from tests.conftest import REPO

CFG = CodeShellConfig(vocab_size=512, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=256,
                      n_positions=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src"), cfg=CFG)


def _logits(llm, ids):
    with torch.no_grad():
        return llm.model(ids)


@pytest.mark.parametrize("spec", ["int8", "int4-g32", "int4-g64-zp", "int4-g32-head", "int4-g32-head8"])
def test_roundtrip_matches_quantize_on_load(src, tmp_path, spec):
    scheme = QuantScheme.parse(spec)
    out = quantize_checkpoint(src, tmp_path / "q", scheme)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == scheme.to_dict()
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    loaded = LLM(out, dtype="float32")
    direct = LLM(src, dtype="float32", quantization=spec)
    assert loaded.config.quantization == direct.config.quantization
    torch.testing.assert_close(_logits(loaded, ids), _logits(direct, ids), atol=1e-5, rtol=1e-5)
    full = _logits(LLM(src, dtype="float32"), ids)
    rel = ((_logits(loaded, ids) - full).norm() / full.norm()).item()
    assert rel < (0.05 if scheme.bits == 8 else 0.5)
    # Asking for the stored scheme is fine; asking for another is a clear error.
    LLM(out, dtype="float32", quantization=spec)
    other = "int8" if scheme.bits == 4 else "int4-g32"
    with pytest.raises(QuantError, match="already quantized"):
        LLM(out, quantization=other)


def test_int8_head_in_an_int4_checkpoint(tmp_path, tokenizer_dir):
    """head_bits 8: block linears in int4, the output head in int8 per channel (as llama.cpp's
    Q4_0 files keep an 8-bit output matrix); the name, config.json and CLI spelling agree, and a
    GGUF export reads the head as int8 (checked with the gguf package's own reader)."""
    from codeshell.quant.gguf_io import export_gguf
    from codeshell.quant.linear import Int4Linear, Int8Linear, dequantize_int8
    gguf = pytest.importorskip("gguf")
    scheme = QuantScheme.parse("int4-g32-head8")
    assert scheme == QuantScheme(bits=4, group_size=32, quantize_head=True, head_bits=8)
    assert scheme.name == "int4-g32-head8" and QuantScheme.parse(scheme.name) == scheme
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert "head_bits" not in QuantScheme.parse("int4-g32-head").to_dict()  # older files unchanged
    assert QuantScheme(bits=8, quantize_head=True, head_bits=8) == QuantScheme.parse("int8-head")
    with pytest.raises(QuantError, match="unknown head_bits 4"):
        QuantScheme(bits=8, quantize_head=True, head_bits=4)
    src = make_tiny_checkpoint(tmp_path / "src", tokenizer_dir=tokenizer_dir, cfg=CFG.replace(vocab_size=70144))
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--group-size", "32", "--head-bits", "8"])
    assert r.exit_code == 0 and "int4-g32-head8" in r.output, r.output
    out = tmp_path / "q"
    assert json.loads((out / "config.json").read_text())["quantization"]["head_bits"] == 8
    llm = LLM(out, dtype="float32")
    assert isinstance(llm.model.lm_head, Int8Linear) and isinstance(llm.model.transformer.h[0].mlp.c_fc, Int4Linear)
    from safetensors.torch import load_file
    stored = load_file(out / "model.safetensors")
    head = dequantize_int8(stored["lm_head.qweight"], stored["lm_head.scales"])
    path = export_gguf(out, tmp_path / "m.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    got = torch.from_numpy(tensors["output.weight"].data.copy()).reshape(head.shape)
    torch.testing.assert_close(got, head.float(), rtol=0, atol=0)


def test_sharded_output_loads(src, tmp_path):
    out = quantize_checkpoint(src, tmp_path / "q", QuantScheme(bits=8), shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert "transformer.h.0.attn.c_attn.qweight" in index["weight_map"]
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(_logits(LLM(out, dtype="float32"), ids),
                               _logits(LLM(src, dtype="float32", quantization="int8"), ids))


def test_cli_quantize_and_errors(src, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "a"), "--bits", "4", "--group-size", "64"])
    assert r.exit_code == 0, r.output
    assert "int4-g64" in r.output
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "b"), "--bits", "3"])
    assert r.exit_code == 2 and "unknown bits 3" in r.output
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "b"), "--group-size", "48"])
    assert r.exit_code == 2 and "unknown int4 group size 48" in r.output
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "b"), "--group-size", "128"])
    assert r.exit_code == 2 and "group size 128 does not divide the input width 64" in r.output
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "a"), "--bits", "8"])
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "a"), str(tmp_path / "c"), "--bits", "8"])
    assert r.exit_code == 2 and "already quantized" in r.output


def test_unknown_quantization_argument(src):
    with pytest.raises(QuantError, match="unknown quantization 'int3'"):
        LLM(src, quantization="int3")
    with pytest.raises(QuantError, match="group size 128 does not divide the input width 64"):
        LLM(src, quantization="int4")


def test_unknown_scheme_in_config_is_clear(src, tmp_path):
    out = quantize_checkpoint(src, tmp_path / "q", QuantScheme(bits=8))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"]["bits"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match="unknown bits 2"):
        LLM(out)


_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    from codeshell.weights import load_config
    from codeshell.quant.load import load_quantized
    from pathlib import Path

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak = [0]
    stop = False
    def watch():
        while not stop:
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.002)
    path = Path(sys.argv[1])
    cfg = load_config(path)
    # torch imports more of itself on first module construction (~70 MiB): not loading memory.
    from codeshell.config import SHAPES
    from codeshell.model import CodeShellForCausalLM
    with torch.device("meta"):
        CodeShellForCausalLM(SHAPES["tiny"])
    base = anon_kb()
    t = threading.Thread(target=watch); t.start()
    model, _ = load_quantized(path, cfg, "bfloat16", "cpu", None)
    stop = True; t.join()
    held = sum(b.numel() * b.element_size() for b in model.buffers() if b is not None)
    held += sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():  # kernel layouts are plain attributes, not buffers
        for t in (m.kernel_tensors() if hasattr(m, "kernel_tensors") else []):
            held += t.numel() * t.element_size()
    print(json.dumps({"peak_kb": max(peak[0], anon_kb()) - base, "held": held}))
""")


def _child_env():
    """A bare environment for the memory probe, keeping where the compiled kernels live.

    Without HOME / CODESHELL_KERNELS_CACHE the child would look for (and, when absent, compile)
    the extension in another cache than this test run's: minutes of compiling inside the timeout.
    """
    env = {"CODESHELL_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    for k in ("HOME", "CODESHELL_KERNELS_CACHE"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def test_loading_quantized_folder_never_builds_float_weights(tmp_path):
    """A ~60M-parameter model: loading its int4 folder peaks far below its bf16 size."""
    cfg = CodeShellConfig(vocab_size=2048, n_embd=1024, n_layer=5, n_head=16, num_query_groups=4,
                          n_inner=4096, n_positions=512)
    from codeshell.testing import random_state_dict
    from safetensors.torch import save_file
    src = tmp_path / "mid"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}))
    save_file(random_state_dict(cfg, dtype=torch.bfloat16), str(src / "model.safetensors"))
    bf16_bytes = cfg.num_parameters() * 2
    out = quantize_checkpoint(src, tmp_path / "q4", QuantScheme(bits=4, group_size=128))
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(out)], capture_output=True, text=True,
                       cwd=REPO, env=_child_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    peak, held = res["peak_kb"] * 1024, res["held"]
    # The loaded model (int4 linears, bf16 embeddings) is about a third of bf16; loading peaks at
    # that plus one linear's repack temporaries (int32 [4096, 1024]: 16 MiB), far below a float copy.
    assert held < 0.35 * bf16_bytes
    assert peak < held + 32 * 2**20, f"peak anonymous memory {peak / 2**20:.0f} MiB, model {held / 2**20:.0f} MiB"
    assert peak < 0.6 * bf16_bytes
