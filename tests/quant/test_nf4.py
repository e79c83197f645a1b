"""bitsandbytes NF4 checkpoints, both layouts, nested and plain statistics, against bitsandbytes itself.

Fixtures are made by bitsandbytes: the transformers layout with `BitsAndBytesConfig(load_in_4bit,
nf4)` + `save_pretrained`, the released CodeShell-7B-Chat-int4 layout with bitsandbytes'
`quantize_4bit` packed into 0.41's list (`write_nf4_checkpoint`). The reference forward is
bitsandbytes' `Linear4bit` on the same file, on its exact path (`gemm_4bit`: dequantize, then
`F.linear`); `support_avx512bf16_for_cpu` is switched off because on AVX512-BF16 CPUs bitsandbytes
otherwise rounds absmax and the weights to bfloat16 (0.08-0.14 in log-probability on these fixtures).
"""

from __future__ import annotations

import json

import bitsandbytes as bnb  # the `test` extra: the other side of every comparison here
import bitsandbytes.functional as bnbf
import pytest
import torch

from codeshell import LLM, SamplingParams
from codeshell.config import CodeShellConfig
from codeshell.quant.load import BLOCK_LINEARS
from codeshell.quant.nf4 import NF4_CODE, NF4Linear, write_nf4_checkpoint
from codeshell.testing import make_tiny_checkpoint, random_state_dict
from codeshell.weights import CheckpointError

CFG = CodeShellConfig(vocab_size=512, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=256,
                      n_positions=256)
LINEARS = [f"transformer.h.{i}.{n}" for i in range(CFG.n_layer) for n in BLOCK_LINEARS]
TOL = 1e-3  # max |difference in log-probability| allowed against bitsandbytes (issue 15)
HF_CASES = [("nested", "float32", "uint8"), ("plain", "float32", "uint8"), ("nested", "bfloat16", "uint8"),
            ("nested", "float32", "bfloat16")]  # (statistics, model dtype, bnb_4bit_quant_storage)
LIST_CASES = ["nested", "plain"]


def _hf_quantize(src, out, nested: bool, dtype: str, storage: str = "uint8"):
    """What a user does today: load with BitsAndBytesConfig(nf4), then save_pretrained."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=getattr(torch, storage))
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, device_map="cpu", dtype=getattr(torch, dtype))
    m.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("nf4") / "src", cfg=CFG, seed=3)


@pytest.fixture(scope="module")
def hf_ckpts(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4hf")
    return {c: _hf_quantize(src, root / "-".join(c), c[0] == "nested", c[1], c[2]) for c in HF_CASES}


@pytest.fixture(scope="module")
def list_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4list")
    sd = random_state_dict(CFG, seed=3)
    return {c: write_nf4_checkpoint(sd, CFG, root / c, nested=c == "nested") for c in LIST_CASES}


# ---- bitsandbytes' side ----------------------------------------------------------------------

def _no_bf16_repack(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def _bnb_hf_model(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    for p in model.parameters():  # a bfloat16 file keeps its unquantized tensors in bfloat16 here
        if p.dtype in (torch.bfloat16, torch.float16) and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.float()
    return _no_bf16_repack(model).eval()


def _quant_state_from_list(s):
    """bitsandbytes' QuantState for a 0.41 list, field by field as bitsandbytes names them."""
    state2 = None
    if s[4] is not None:
        s2 = s[4][1]
        state2 = bnbf.QuantState(absmax=s2[0], code=s2[1], blocksize=s2[2], dtype=s2[4])
    return bnbf.QuantState(absmax=s[0], shape=s[1], code=s[6], blocksize=s[3], quant_type=s[5], dtype=s[2],
                           offset=None if s[4] is None else s[4][0], state2=state2)


def _bnb_list_model(path):
    """The transformers model of this config with bitsandbytes Linear4bit layers holding the file's NF4."""
    from transformers import AutoConfig, AutoModelForCausalLM
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in sd.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")},
                          strict=False)
    for prefix in LINEARS:
        parent_name, _, attr = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        state = sd[prefix + ".weight.quant_state"]
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                                compress_statistics=state[4] is not None, quant_type="nf4", device="cpu")
        new.weight = bnb.nn.Params4bit(sd[prefix + ".weight.data"], requires_grad=False, blocksize=state[3],
                                       quant_state=_quant_state_from_list(state), quant_type="nf4",
                                       compress_statistics=state[4] is not None, bnb_quantized=True, module=new)
        new.bias = lin.bias
        setattr(parent, attr, new)
    return _no_bf16_repack(model).eval()


def _ids():
    return torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))


def _compare(llm, ref):
    ids = _ids()
    with torch.no_grad():
        ours = llm.model(ids).float().log_softmax(-1)
        theirs = ref(ids).logits.float().log_softmax(-1)
        prompt = ids[:1, :6]
        want = ref.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)[0, 6:].tolist()
    got = llm.generate({"prompt_token_ids": prompt[0].tolist()},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    return (ours - theirs).abs().max().item(), list(got), want


# ---- the files are what the issue describes ------------------------------------------------

def test_transformers_fixture_is_the_transformers_layout(hf_ckpts):
    from safetensors import safe_open
    path = hf_ckpts[("nested", "float32", "uint8")]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    p = "transformer.h.0.attn.c_attn.weight"
    assert {p, p + ".absmax", p + ".quant_map", p + ".nested_absmax", p + ".nested_quant_map",
            p + ".quant_state.bitsandbytes__nf4"} <= keys
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["bnb_4bit_quant_type"] == "nf4" and q["load_in_4bit"]
    with safe_open(str(hf_ckpts[("plain", "float32", "uint8")] / "model.safetensors"), "pt") as f:
        assert p + ".absmax" in f.keys() and p + ".nested_absmax" not in f.keys()
    with safe_open(str(hf_ckpts[("nested", "float32", "bfloat16")] / "model.safetensors"), "pt") as f:
        assert f.get_tensor(p).dtype == torch.bfloat16  # the packed bytes in bnb_4bit_quant_storage


@pytest.mark.parametrize("case", LIST_CASES)
def test_list_fixture_is_the_041_layout(list_ckpts, case):
    raw = torch.load(list_ckpts[case] / "pytorch_model.bin", weights_only=True)  # torch's allow-list only
    assert "transformer.h.0.attn.c_attn.weight" not in raw and "lm_head.weight" in raw
    assert raw["transformer.h.1.attn.rotary_emb.inv_freq"].dtype == torch.float32  # the released loader reads it
    data = raw["transformer.h.0.mlp.c_fc.weight.data"]
    assert data.dtype == torch.uint8 and data.shape == (CFG.ffn_dim * CFG.n_embd // 2, 1)
    absmax, shape, dtype, blocksize, nested, qt, code = raw["transformer.h.0.mlp.c_fc.weight.quant_state"]
    assert shape == torch.Size([CFG.ffn_dim, CFG.n_embd]) and dtype == torch.float16 and blocksize == 64
    assert qt == "nf4" and torch.equal(code, NF4_CODE)
    if case == "nested":
        offset, state2 = nested
        assert absmax.dtype == torch.uint8 and offset.dim() == 0 and len(state2) == 7
        assert state2[1].numel() == 256 and state2[2:] == [256, False, torch.float32, None, None]
    else:
        assert nested is None and absmax.dtype == torch.float32


# ---- the numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,chunk", [((96, 128), 256), ((3, 50), 1 << 21), ((7, 9), 64), ((5, 64), 1 << 21)])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_packed_equals_bitsandbytes(shape, chunk, nested):
    """Partial last blocks, odd sizes and the chunked path give bitsandbytes' values bit for bit."""
    from codeshell.quant.nf4 import decode_nested_absmax, dequantize_packed
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    data, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    am = qs.absmax if not nested else decode_nested_absmax(qs.absmax, qs.state2.absmax, qs.state2.code,
                                                           qs.state2.blocksize, qs.offset)
    got = dequantize_packed(data, am, qs.code, 64, shape, torch.float32, chunk=chunk)
    assert torch.equal(got, bnbf.dequantize_4bit(data, qs))


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_layout_dequantizes_exactly(hf_ckpts, case):
    llm = LLM(hf_ckpts[case], dtype="float32")
    ref = _bnb_hf_model(hf_ckpts[case])
    for prefix in LINEARS:
        ours, theirs = llm.model.get_submodule(prefix), ref.get_submodule(prefix)
        assert isinstance(ours, NF4Linear)
        want = bnbf.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)  # in the state's dtype
        assert torch.equal(ours.dequantize(want.dtype), want), prefix


@pytest.mark.parametrize("case", LIST_CASES)
def test_list_layout_dequantizes_exactly(list_ckpts, case):
    llm = LLM(list_ckpts[case], dtype="float32")
    raw = torch.load(list_ckpts[case] / "pytorch_model.bin", weights_only=True)
    for prefix in LINEARS:
        qs = _quant_state_from_list(raw[prefix + ".weight.quant_state"])
        want = bnbf.dequantize_4bit(raw[prefix + ".weight.data"], qs)  # float16, the state's dtype
        assert torch.equal(llm.model.get_submodule(prefix).dequantize(torch.float16), want), prefix


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_layout_matches_bitsandbytes(hf_ckpts, case):
    llm = LLM(hf_ckpts[case])  # no dtype: NF4 defaults to float32, bitsandbytes' compute dtype
    assert llm.config.quantization["method"] == "bitsandbytes-nf4"
    assert llm.model.transformer.wte.weight.dtype == torch.float32
    diff, got, want = _compare(llm, _bnb_hf_model(hf_ckpts[case]))
    assert diff <= TOL, diff
    assert got == want


@pytest.mark.parametrize("case", LIST_CASES)
def test_list_layout_matches_bitsandbytes(list_ckpts, case):
    llm = LLM(list_ckpts[case])
    diff, got, want = _compare(llm, _bnb_list_model(list_ckpts[case]))
    assert diff <= TOL, diff
    assert got == want


def test_gpt_bigcode_mha_nf4_matches_transformers_and_bitsandbytes(tmp_path):
    """transformers' own GPTBigCode + bitsandbytes on the file. Without multi_query, c_attn's rows are
    stored per head as [q|k|v]; the NF4 rows (bytes and absmax) are reordered like float ones."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
    hc = GPTBigCodeConfig(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4, multi_query=False,
                          activation_function="gelu_pytorch_tanh", initializer_range=0.2)
    torch.manual_seed(0)
    GPTBigCodeForCausalLM(hc).save_pretrained(tmp_path / "src")
    path = _hf_quantize(tmp_path / "src", tmp_path / "nf4", True, "float32")
    diff, got, want = _compare(LLM(path), _bnb_hf_model(path))
    assert diff <= TOL, diff
    assert got == want


def test_requantizing_is_opt_in_and_stated(hf_ckpts):
    """quantization="int8" re-quantizes the NF4 weights: faster kernels, not bitsandbytes' numbers."""
    path = hf_ckpts[("nested", "float32", "uint8")]
    llm = LLM(path, dtype="float32", quantization="int8")
    assert llm.config.quantization["bits"] == 8
    assert not any(isinstance(m, NF4Linear) for m in llm.model.modules())
    ids = _ids()
    with torch.no_grad():
        ours = llm.model(ids).float()
        theirs = _bnb_hf_model(path)(ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.05


# ---- bad files: one clear line -------------------------------------------------------------

@pytest.mark.parametrize("corrupt,msg", [
    (lambda s: s[:6], "got 6 items"),
    (lambda s: [s[0], s[1], s[2], s[3], s[4], "fp4", s[6]], "quant type 'fp4'"),
    (lambda s: [s[0][:-1], *s[1:]], "absmax should hold"),
    (lambda s: [s[0], s[1], s[2], s[3], s[4], s[5], s[6][:8]], "16 values"),
    (lambda s: [*s[:6], -s[6]], "not bitsandbytes' NF4 table"),
    (lambda s: [s[0], torch.Size([64, 65]), *s[2:]], "should be"),
    (lambda s: [s[0], s[1], s[2], 48, *s[4:]], "blocksize 48"),
    (lambda s: [s[0], s[1], s[2], s[3], [s[4][0]], s[5], s[6]], "nested statistics"),
])
def test_corrupt_quant_state_is_clear(tmp_path, corrupt, msg):
    path = write_nf4_checkpoint(random_state_dict(CFG, seed=3), CFG, tmp_path / "int4", nested=True)
    raw = torch.load(path / "pytorch_model.bin", weights_only=True)
    key = "transformer.h.1.attn.c_proj.weight.quant_state"
    raw[key] = corrupt(raw[key])
    torch.save(raw, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=msg) as e:
        LLM(path)
    assert "transformer.h.1.attn.c_proj" in str(e.value)


def _copy(src_dir, dst):
    import shutil
    shutil.copytree(src_dir, dst)
    return dst


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, edit):
    raw = json.loads((path / "config.json").read_text())
    edit(raw["quantization_config"])
    (path / "config.json").write_text(json.dumps(raw))


P = "transformer.h.1.mlp.c_fc.weight"


@pytest.mark.parametrize("edit_t,edit_c,msg", [
    (lambda sd: sd.pop(P + ".nested_absmax"), None, r"missing tensor\(s\): " + P + r".nested_absmax$"),
    (lambda sd: sd.pop(P + ".quant_map"), None, r"missing tensor\(s\): " + P + r".quant_map$"),
    (lambda sd: sd.update({P + ".quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)}),
     None, "not bitsandbytes' packed JSON"),
    (lambda sd: sd.update({P + ".absmax": sd[P + ".absmax"][:-2]}), None, "absmax should hold"),
    (lambda sd: sd.update({P: sd[P][:100]}), None, "packed bytes"),
    (None, lambda q: q.update(bnb_4bit_quant_type="fp4"), "quant type 'fp4' is not supported"),
    (None, lambda q: q.update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True),
     "8-bit"),
    (None, lambda q: q.update(quant_method="gptq"), "quant_method` is 'gptq'"),
])
def test_corrupt_transformers_checkpoint_is_clear(hf_ckpts, tmp_path, edit_t, edit_c, msg):
    path = _copy(hf_ckpts[("nested", "float32", "uint8")], tmp_path / "ckpt")
    if edit_t:
        _edit_tensors(path, edit_t)
    if edit_c:
        _edit_config(path, edit_c)
    with pytest.raises(CheckpointError, match=msg):
        LLM(path)


def test_cli_says_one_line(hf_ckpts, tmp_path):
    from typer.testing import CliRunner
    from codeshell.cli import app
    path = _copy(hf_ckpts[("nested", "float32", "uint8")], tmp_path / "ckpt")
    _edit_config(path, lambda q: q.update(bnb_4bit_quant_type="fp4"))
    r = CliRunner().invoke(app, ["generate", "x", "--model", str(path)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fp4" in lines[0] and "Traceback" not in r.output


@pytest.mark.parametrize("which", ["hf", "list"])
def test_codeshell_quantize_refuses_nf4(hf_ckpts, list_ckpts, tmp_path, which):
    """Before, `codeshell quantize` read the transformers layout's packed bytes as float weights."""
    from typer.testing import CliRunner
    from codeshell.quant.cli import app
    src = hf_ckpts[("nested", "float32", "uint8")] if which == "hf" else list_ckpts["nested"]
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--bits", "8"])
    assert r.exit_code != 0 and "bitsandbytes NF4 checkpoint" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "config.json").exists()
