"""The official CodeShell-7B-Chat-int4 layout (bitsandbytes NF4), nested and plain statistics."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM
from codeshell.config import CodeShellConfig
from codeshell.quant.load import BLOCK_LINEARS
from codeshell.quant.nf4 import NF4_CODE, dequantize_nf4, dynamic_map, quantize_nf4, write_nf4_checkpoint
from codeshell.testing import random_state_dict
from codeshell.weights import CheckpointError, build_empty

CFG = CodeShellConfig(vocab_size=512, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=256,
                      n_positions=256)


def test_code_tables():
    assert NF4_CODE.shape == (16,) and NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    dm = dynamic_map()
    assert dm.shape == (256,) and dm.min() >= -1
    assert torch.all(dm[1:] >= dm[:-1]) and dm.max() == 1.0


def test_layout_high_nibble_first_and_exact_levels():
    w = torch.tensor([[1.0, -1.0, 0.0, 0.5]] * 16)  # 64 values: one block, absmax 1
    data, state = quantize_nf4(w, nested=False)
    assert data.dtype == torch.uint8 and data.shape == (32, 1)
    assert int(data[0, 0]) == (15 << 4) | 0  # 1.0 -> index 15 (high nibble), -1.0 -> 0
    absmax, shape, dtype, bs, nested, qt, code = state
    assert shape == torch.Size([16, 4]) and dtype == torch.float32 and bs == 64 and nested is None and qt == "nf4"
    back = dequantize_nf4("w", data, state)
    assert back[0, 0] == 1 and back[0, 1] == -1 and back[0, 2] == 0
    assert abs(back[0, 3] - 0.5) < 0.07


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_error_is_small(nested):
    w = torch.randn(96, 128) * 0.02
    data, state = quantize_nf4(w, nested)
    if nested:
        assert state[0].dtype == torch.uint8 and state[4][1][1].numel() == 256
    back = dequantize_nf4("w", data, state)
    assert ((back - w).norm() / w.norm()) < 0.12


def _dequantized_float_model(sd, cfg):
    """A float32 model holding exactly the NF4-dequantized weights (what the checkpoint means)."""
    m = build_empty(cfg, torch.float32)
    m.load_state_dict({k: v for k, v in sd.items()}, strict=False)
    for i in range(cfg.n_layer):
        for n in BLOCK_LINEARS:
            name = f"transformer.h.{i}.{n}.weight"
            d, s = quantize_nf4(sd[name].to(torch.bfloat16), nested=True)
            m.get_submodule(f"transformer.h.{i}.{n}").weight.data = dequantize_nf4(name, d, s)
    for k, v in sd.items():
        if not k.endswith(tuple(f"{n}.weight" for n in BLOCK_LINEARS)):
            m.get_parameter(k).data = v.to(torch.bfloat16).float()
    return m


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_checkpoint_loads_and_runs(tmp_path, nested):
    sd = random_state_dict(CFG, seed=3)
    path = write_nf4_checkpoint(sd, CFG, tmp_path / "int4", nested=nested)
    raw = torch.load(path / "pytorch_model.bin", weights_only=True)  # nothing beyond torch's allow-list
    assert "transformer.h.0.attn.c_attn.weight.data" in raw and "transformer.h.0.attn.c_attn.weight" not in raw
    assert raw["transformer.h.1.mlp.c_fc.weight.quant_state"][5] == "nf4"
    assert raw["transformer.wte.weight"].dtype == torch.bfloat16
    llm = LLM(path, dtype="float32")
    q = llm.config.quantization
    assert q["bits"] == 4 and q["group_size"] == 64 and not q["symmetric"]
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _dequantized_float_model(sd, CFG)
    with torch.no_grad():
        got, want = llm.model(ids), ref(ids)
    rel = ((got - want).norm() / want.norm()).item()
    # Re-quantizing NF4's 16 non-uniform levels onto int4's uniform grid (groups of 64 with zero
    # points) costs about as much again as NF4 itself on these 64-wide random rows (~0.25).
    assert rel < 0.35, rel
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       __import__("codeshell").SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
    # Re-quantizing NF4 into int8 instead is nearly exact.
    with torch.no_grad():
        got8 = LLM(path, dtype="float32", quantization="int8").model(ids)
    assert ((got8 - want).norm() / want.norm()).item() < 0.05


@pytest.mark.parametrize("corrupt,msg", [
    (lambda s: s[:6], "got 6 items"),
    (lambda s: [s[0], s[1], s[2], s[3], s[4], "fp4", s[6]], "quant type 'fp4'"),
    (lambda s: [s[0][:-1], *s[1:]], "absmax should hold"),
    (lambda s: [s[0], s[1], s[2], s[3], s[4], s[5], s[6][:8]], "16 values"),
    (lambda s: [s[0], torch.Size([64, 65]), *s[2:]], "should be"),
    (lambda s: [s[0], s[1], s[2], s[3], [s[4][0]], s[5], s[6]], "nested statistics"),
])
def test_corrupt_quant_state_is_clear(tmp_path, corrupt, msg):
    sd = random_state_dict(CFG, seed=3)
    path = write_nf4_checkpoint(sd, CFG, tmp_path / "int4", nested=True)
    raw = torch.load(path / "pytorch_model.bin", weights_only=True)
    key = "transformer.h.1.attn.c_proj.weight.quant_state"
    raw[key] = corrupt(raw[key])
    torch.save(raw, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=msg) as e:
        LLM(path)
    assert "transformer.h.1.attn.c_proj" in str(e.value)
