"""RoPE scaling variants, dtypes and devices."""

from __future__ import annotations

import pytest
import torch

from codeshell.config import CodeShellConfig
from codeshell.model import CodeShellForCausalLM, _rotate, apply_rope, rope_cos_sin, rope_inv_freq
from tests.conftest import GOLDEN_CASES, require_shared

CFG = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, num_query_groups=1, n_inner=64)


def test_dynamic_ntk_changes_base_only_past_the_window():
    plain = CodeShellConfig(**CFG)
    dyn = CodeShellConfig(**CFG, rope_scaling_type="dynamic", rope_scaling_factor=2.0)
    assert torch.equal(rope_inv_freq(plain, 10), rope_inv_freq(dyn, 10))
    assert torch.equal(rope_inv_freq(dyn, 16), rope_inv_freq(plain, 16))
    D, L = plain.head_dim, 40
    base = 10000 * ((2.0 * L / 16) - 1.0) ** (D / (D - 2))  # the official formula
    expected = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    assert torch.allclose(rope_inv_freq(dyn, L), expected)


def test_linear_scaling_divides_positions():
    lin = CodeShellConfig(**CFG, rope_scaling_type="linear", rope_scaling_factor=4.0)
    plain = CodeShellConfig(**CFG)
    pos = torch.arange(12)[None]
    c1, s1 = rope_cos_sin(lin, pos * 4, 48)
    c2, s2 = rope_cos_sin(plain, pos, 12)
    assert torch.allclose(c1, c2, atol=1e-5) and torch.allclose(s1, s2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gradient_written_out_matches_autograd(dtype):
    # apply_rope's hand-written backward (the rotation by -t) against autograd through the
    # textbook float32 form, and the forward bit-identical to that form (per-half buffer).
    cfg = CodeShellConfig(**CFG)
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(cfg, torch.arange(7)[None].expand(2, 7), 7)
    x = torch.randn(2, 3, 7, cfg.head_dim, dtype=dtype)
    g = torch.randn_like(x)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    def textbook(t):
        tf, half = t.float(), t.shape[-1] // 2
        return (tf * cos + torch.cat((-tf[..., half:], tf[..., :half]), dim=-1) * sin).to(t.dtype)

    ya, yb = apply_rope(a, cos, sin), textbook(b)
    assert torch.equal(ya, yb) and torch.equal(ya.detach(), apply_rope(x, cos, sin))
    assert torch.equal(_rotate(x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin), yb)  # strided x
    ya.backward(g)
    yb.backward(g)
    assert a.grad.dtype == dtype
    tol = 0 if dtype == torch.float32 else 1e-2
    assert torch.allclose(a.grad, b.grad, atol=tol + 1e-6, rtol=tol)


def test_dynamic_model_runs_past_its_window():
    cfg = CodeShellConfig(**CFG, rope_scaling_type="dynamic", rope_scaling_factor=2.0)
    torch.manual_seed(0)
    m = CodeShellForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        short = m(ids[:, :16])
        long = m(ids)
    assert torch.isfinite(long).all()
    assert torch.allclose(short, long[:, :16], atol=1e-5) is False  # the base changed for all positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_on_cpu(dtype):
    from codeshell import LLM, SamplingParams
    llm = LLM(str(require_shared("golden/rope-mqa")), dtype=dtype)
    assert llm.engine.dtype == dtype  # activations and KV cache (the bf16 embedding may live in kernel panels)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_on_cuda(case):
    from safetensors.torch import load_file

    from codeshell import LLM, SamplingParams
    d = require_shared(f"golden/{case}")
    e = load_file(str(d / "expected.safetensors"))
    llm = LLM(str(d), dtype="float32", device="cuda")
    with torch.no_grad():
        lg = llm.model(e["input_ids"].cuda())[:, -e["logits"].shape[1]:].cpu()
    assert (lg - e["logits"]).abs().max() <= 1e-3  # TF32 may be on
    p = e["greedy_prompt"][0].tolist()
    out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == e["greedy_output"][0, len(p):].tolist()
