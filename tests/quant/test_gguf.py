"""GGUF export -> import round trips, the exported file's metadata and tensor list (read back
with gguf.GGUFReader), the older fork's v2 flavour, the rebuilt tokenizer, and bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from codeshell import LLM  # noqa: E402
from codeshell.config import SHAPES  # noqa: E402
from codeshell.quant.cli import app  # noqa: E402
from codeshell.quant.convert import quantize_checkpoint  # noqa: E402
from codeshell.quant.gguf_io import GGUFError, export_gguf, from_gguf_name, read_gguf  # noqa: E402
from codeshell.quant.scheme import QuantScheme  # noqa: E402
from codeshell.testing import make_tiny_checkpoint  # noqa: E402
from codeshell.weights import build_empty  # noqa: E402

Q = gguf.GGMLQuantizationType
# Relative L2 error of the logits after export -> import, per type (tiny 64-wide random model).
TOL = {"f32": 1e-6, "f16": 3e-3, "bf16": 2e-2, "q8_0": 0.04, "q4_0": 0.4}


@pytest.fixture(scope="module")
def src(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    """type -> exported file, written once per module (each export takes seconds)."""
    d = tmp_path_factory.mktemp("gguf")
    cache: dict[str, object] = {}

    def get(ty: str):
        if ty not in cache:
            cache[ty] = export_gguf(src, d / f"m-{ty}.gguf", ty)
        return cache[ty]
    return get


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 70000, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref_logits(src, ids):
    with torch.no_grad():
        return LLM(src, dtype="float32").model(ids)


def _field(r, key):
    f = r.get_field(key)
    return None if f is None else f.contents()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("ty", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_import_roundtrip(exported, ids, ref_logits, ty):
    path = exported(ty)
    llm = LLM(str(path), dtype="float32")
    with torch.no_grad():
        got = llm.model(ids)
    assert _rel(got, ref_logits) <= TOL[ty]
    bits = {"q8_0": 8, "q4_0": 4}.get(ty)
    assert (llm.config.quantization or {}).get("bits") == bits
    out = llm.generate({"prompt_token_ids": ids[0].tolist()},
                       __import__("codeshell").SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].outputs[0].token_ids) == 3


def test_exported_metadata_and_tensors(exported):
    path = exported("q4_0")
    r = gguf.GGUFReader(str(path))
    cfg = SHAPES["tiny"]
    assert _field(r, "general.architecture") == "codeshell"
    assert _field(r, "codeshell.block_count") == cfg.n_layer
    assert _field(r, "codeshell.embedding_length") == cfg.n_embd
    assert _field(r, "codeshell.feed_forward_length") == cfg.ffn_dim
    assert _field(r, "codeshell.attention.head_count") == cfg.n_head
    assert _field(r, "codeshell.attention.head_count_kv") == cfg.num_query_groups
    assert _field(r, "codeshell.context_length") == cfg.n_positions
    assert abs(_field(r, "codeshell.attention.layer_norm_epsilon") - 1e-5) < 1e-12
    assert _field(r, "codeshell.rope.freq_base") == 10000.0
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "codeshell"
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 70144
    assert tokens[70000] == "<|endoftext|>" and tokens[70019] == "<|end|>" and tokens[70020] == "[PAD70020]"
    assert all(types[i] == gguf.TokenType.CONTROL for i in range(70000, 70020))
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(70020, 70144))
    assert types[100] == gguf.TokenType.NORMAL
    assert len(_field(r, "tokenizer.ggml.merges")) == 72075
    for k in ("bos", "eos", "padding"):
        assert _field(r, f"tokenizer.ggml.{k}_token_id") == 70000
    names = {t.name: t for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(cfg.n_layer):
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            want |= {f"blk.{i}.{part}.weight", f"blk.{i}.{part}.bias"}
    assert set(names) == want  # tied head: no output.weight, llama.cpp reuses token_embd
    assert names["blk.0.attn_qkv.weight"].tensor_type == Q.Q4_0
    assert list(names["blk.0.attn_qkv.weight"].shape) == [cfg.n_embd, cfg.qkv_dim]  # ggml order: ne0 = in
    assert list(names["blk.1.ffn_down.weight"].shape) == [cfg.ffn_dim, cfg.n_embd]
    assert names["token_embd.weight"].tensor_type == Q.Q8_0
    assert names["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert all(from_gguf_name(n) for n in names)


def test_q4_0_import_is_exact(exported, ids):
    """Q4_0 linears become our int4-g32 without loss: same logits as the file's dequantized weights."""
    path = exported("q4_0")
    model = build_empty(SHAPES["tiny"], torch.float32)
    sd = {}
    for t in read_gguf(path)[2].values():
        if t.tensor_type == Q.F32:
            arr = np.array(t.data).view(np.float32)
        else:
            arr = gguf.quants.dequantize(np.array(t.data).reshape(t.shape[0], -1), t.tensor_type)
        sd[from_gguf_name(t.name)] = torch.from_numpy(arr).reshape(t.shape).float()
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        want = model(ids)
        got = LLM(str(path), dtype="float32").model(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_tokenizer_rebuilt_from_file(exported, tokenizer_dir):
    path = exported("f16")
    tok = LLM(str(path)).tokenizer
    prompts = json.loads((tokenizer_dir / "prompts.json").read_text())
    cases = [(c["prompt"], c["ids"]) for c in prompts["chat"] + prompts["fim"]]
    cases += [(c["text"], c["ids"]) for c in prompts["encode"]]
    for text, want in cases:
        assert tok.encode(text) == want, text
    for c in prompts["encode"]:
        assert tok.decode(c["ids"]) == c["decoded"]
    assert tok.eos_token_id == 70000 and tok.is_special(70001)


def test_v2_fork_style_file_loads(tmp_path, tokenizer_dir, ids):
    cfg = SHAPES["tiny"].replace(rope_scaling_type="linear", rope_scaling_factor=2.0)
    src = make_tiny_checkpoint(tmp_path / "lin", tokenizer_dir=tokenizer_dir, cfg=cfg, seed=5)
    path = export_gguf(src, tmp_path / "fork.gguf", "f32", legacy_fork=True)
    version, fields, _ = read_gguf(path)
    assert version == 2
    assert "tokenizer.ggml.pre" not in fields and "codeshell.rope.scaling.type" not in fields
    assert fields["codeshell.rope.scale_linear"] == 2.0
    llm = LLM(str(path), dtype="float32")
    assert llm.config.rope_scaling_type == "linear" and llm.config.rope_scaling_factor == 2.0
    with torch.no_grad():
        want = LLM(src, dtype="float32").model(ids)
        torch.testing.assert_close(llm.model(ids), want, atol=1e-5, rtol=1e-5)
    assert llm.tokenizer.encode("x = 12345") == LLM(src).tokenizer.encode("x = 12345")


def test_export_from_quantized_folder(src, tmp_path, ids, ref_logits):
    q = quantize_checkpoint(src, tmp_path / "q", QuantScheme(bits=8))
    path = export_gguf(q, tmp_path / "m.gguf", "q8_0")
    with torch.no_grad():
        got = LLM(str(path), dtype="float32").model(ids)
    assert _rel(got, ref_logits) <= 0.06  # int8, then Q8_0, then int8 again


def test_other_architecture_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'llama'; only 'codeshell'"):
        LLM(str(tmp_path / "llama.gguf"))


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file_is_clear(exported, tmp_path, keep):
    path = exported("f16")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated"):
        LLM(str(cut))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04not gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        LLM(str(p))


def test_cli_export(src, tmp_path):
    r = CliRunner().invoke(app, ["export-gguf", str(src), str(tmp_path / "a.gguf"), "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert read_gguf(tmp_path / "a.gguf")[1]["general.architecture"] == "codeshell"
    r = CliRunner().invoke(app, ["export-gguf", str(src), str(tmp_path / "b.gguf"), "--type", "q5_k"])
    assert r.exit_code == 2 and "unknown GGUF type 'q5_k'" in r.output
    r = CliRunner().invoke(app, ["export-gguf", str(src), str(tmp_path / "a.gguf")])
    assert r.exit_code == 2 and "exists" in r.output
