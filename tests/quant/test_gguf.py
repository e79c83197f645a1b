"""GGUF export -> import round trips, the exported file's metadata and tensor list (read back
with gguf.GGUFReader), files written as the older CodeShell fork's converter writes them, the
rebuilt tokenizer, and bad files. llama.cpp itself runs in test_gguf_llamacpp.py."""

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
from codeshell.quant.gguf_io import GGUFError, export_gguf, from_gguf_name, read_gguf, to_gguf_name  # noqa: E402
from codeshell.quant.scheme import QuantScheme  # noqa: E402
from codeshell.kernels.ops import ROW_INVARIANT_MAX_M  # noqa: E402
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
    want.add("output.weight")  # a tied head too: llama.cpp's CodeShell loader requires it
    assert set(names) == want
    assert names["output.weight"].tensor_type == Q.Q8_0
    assert np.array_equal(names["output.weight"].data, names["token_embd.weight"].data)
    assert names["blk.0.attn_qkv.weight"].tensor_type == Q.Q4_0
    assert list(names["blk.0.attn_qkv.weight"].shape) == [cfg.n_embd, cfg.qkv_dim]  # ggml order: ne0 = in
    assert list(names["blk.1.ffn_down.weight"].shape) == [cfg.ffn_dim, cfg.n_embd]
    assert names["token_embd.weight"].tensor_type == Q.Q8_0
    assert names["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert all(from_gguf_name(n) for n in names)


def test_q4_0_import_is_exact(exported, monkeypatch):
    """Q4_0 linears become our int4-g32 without loss: same logits as the file's dequantized weights
    (with the file's Q8_0 head widened to bf16, CODESHELL_GGUF_HEAD=bf16; by default it loads in
    int8: tests/engine/test_gguf_head.py)."""
    monkeypatch.setenv("CODESHELL_GGUF_HEAD", "bf16")
    # 2 x 40 tokens: a forward of more than ops.ROW_INVARIANT_MAX_M rows takes the exact fp32
    # path; up to that many rows fp32 x is rounded to int8 as one decode row is (row-invariant
    # kernels), which is the activations' rounding, not the import's.
    ids = torch.randint(0, 70000, (2, 40), generator=torch.Generator().manual_seed(0))
    assert ids.numel() > ROW_INVARIANT_MAX_M
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


def write_fork_gguf(src, out, ftype: int = 0):
    """The file `convert-codeshell-hf-to-gguf.py MODEL FTYPE` of WisdomShell/llama_cpp_for_codeshell
    writes, step by step as that script does with the fork's gguf-py (GGUF_VERSION = 2): its keys
    in its order (feed_forward_length 4 * n_embd, rope.freq_base 10000, rope.scale_linear 1.0, no
    rope.dimension_count, no tokenizer.ggml.pre), AutoTokenizer's vocab padded with "[PAD{i}]",
    scores 0.0 and every token NORMAL, SpecialVocab's merges and bos/eos/unk/pad ids, then
    pytorch_model.bin's tensors in file order, squeezed, 2-D .weight F16 when ftype is 1 and
    everything else F32; no output.weight for a tied checkpoint."""
    from transformers import AutoTokenizer
    hp = json.loads((src / "config.json").read_text())
    assert hp["architectures"][0] == "CodeShellForCausalLM"
    w = gguf.GGUFWriter(str(out), "codeshell")
    w.add_name("CodeShell")
    w.add_context_length(hp["n_positions"])
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(4 * hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["num_query_groups"])
    w.add_layer_norm_eps(hp["layer_norm_epsilon"])
    w.add_file_type(ftype)
    w.add_rope_freq_base(10000.0)
    w.add_float32("codeshell.rope.scale_linear", 1.0)
    w.add_tokenizer_model("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(src)
    vocab_size = hp.get("vocab_size", len(tokenizer.vocab))
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    w.add_token_list([reverse[i] if i in reverse else f"[PAD{i}]" for i in range(vocab_size)])
    w.add_token_scores([0.0] * vocab_size)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * vocab_size)
    tj = json.loads((src / "tokenizer.json").read_text())  # gguf.SpecialVocab(dir, load_merges=True)
    w.add_token_merges(tj["model"]["merges"])
    tc = json.loads((src / "tokenizer_config.json").read_text())
    for typ in ("bos", "eos", "unk", "sep", "pad"):
        content = tc.get(f"{typ}_token")
        content = content.get("content") if isinstance(content, dict) else content
        ids = [a["id"] for a in tj["added_tokens"] if a["content"] == content]
        if ids:
            key = {"sep": "seperator", "pad": "padding", "unk": "unknown"}.get(typ, typ)
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", ids[0])
    for name, data in torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True).items():
        if data.dtype not in (torch.float16, torch.float32):
            data = data.to(torch.float32)
        data = data.squeeze().numpy()
        if ftype == 0 and data.dtype == np.float16:
            data = data.astype(np.float32)
        if ftype == 1 and data.dtype == np.float16 and data.ndim == 1:
            data = data.astype(np.float32)
        if ftype == 1 and data.dtype == np.float32 and name.endswith(".weight") and data.ndim == 2:
            data = data.astype(np.float16)
        w.add_tensor(to_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(out, "r+b") as f:  # the fork's gguf-py wrote version 2 (v3 differs only in the number)
        f.seek(4)
        f.write((2).to_bytes(4, "little"))
    return out


@pytest.fixture(scope="module")
def fork_src(tmp_path_factory, tokenizer_dir):
    """A tiny checkpoint as the fork's converter reads it (pytorch_model.bin), n_inner 192 (not 4 * 64)."""
    from safetensors.torch import load_file
    cfg = SHAPES["tiny"].replace(n_inner=192)
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("fork_src"), tokenizer_dir=tokenizer_dir, cfg=cfg, seed=5)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_fork_file_fim_prompt_and_greedy(fork_src, tmp_path, tokenizer_dir):
    """A file of the old CodeShell fork: v2, no pre-tokenizer, every token NORMAL. The specials
    still tokenize as specials, so a FIM prompt gives the official ids and the same greedy output."""
    path = write_fork_gguf(fork_src, tmp_path / "fork.gguf", ftype=0)
    version, fields, tensors = read_gguf(path)
    assert version == 2 and "tokenizer.ggml.pre" not in fields and "output.weight" not in tensors
    assert set(fields["tokenizer.ggml.token_type"]) == {int(gguf.TokenType.NORMAL)}
    assert fields["codeshell.feed_forward_length"] == 256 and fields["codeshell.rope.scale_linear"] == 1.0
    llm = LLM(str(path), dtype="float32")
    assert llm.config.n_inner == 192 and llm.config.tie_word_embeddings
    fim = json.loads((tokenizer_dir / "prompts.json").read_text())["fim"]
    for case in fim:
        assert llm.tokenizer.encode(case["prompt"]) == case["ids"]
    assert llm.tokenizer.is_special(70001) and llm.tokenizer.encode("<fim_middle>") == [70002]
    ref = LLM(fork_src, dtype="float32")
    sp = __import__("codeshell").SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = fim[0]["prompt"]
    assert llm.generate(prompt, sp)[0].outputs[0].token_ids == ref.generate(prompt, sp)[0].outputs[0].token_ids


def test_fork_file_f16_loads(fork_src, tmp_path, ids):
    path = write_fork_gguf(fork_src, tmp_path / "fork16.gguf", ftype=1)
    assert read_gguf(path)[2]["blk.0.attn_qkv.weight"].tensor_type == Q.F16
    with torch.no_grad():
        got = LLM(str(path), dtype="float32").model(ids)
        want = LLM(fork_src, dtype="float32").model(ids)
    assert _rel(got, want) <= TOL["f16"]


def test_tied_head_exports_output_and_loads_tied(exported, src):
    """output.weight (llama.cpp needs it) holds token_embd's bytes; ours loads it back as one tied tensor."""
    llm = LLM(str(exported("f32")), dtype="float32")
    assert llm.config.tie_word_embeddings
    assert llm.model.lm_head.weight.data_ptr() == llm.model.transformer.wte.weight.data_ptr()


def test_feed_forward_length_is_real_n_inner(tmp_path, tokenizer_dir, ids):
    cfg = SHAPES["tiny"].replace(n_inner=192)
    src = make_tiny_checkpoint(tmp_path / "ffn", tokenizer_dir=tokenizer_dir, cfg=cfg, seed=3)
    path = export_gguf(src, tmp_path / "ffn.gguf", "f32")
    fields, tensors = read_gguf(path)[1:]
    assert fields["codeshell.feed_forward_length"] == 192 == tensors["blk.0.ffn_up.weight"].shape[0]
    with torch.no_grad():
        torch.testing.assert_close(LLM(str(path), dtype="float32").model(ids), LLM(src, dtype="float32").model(ids))


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
