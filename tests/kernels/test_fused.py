"""The fused inference ops (csrc/fused.cpp) against their torch definitions, the `FastLinear`
call cache against `ops.linear`, and the model's fused inference path against its plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codeshell.kernels import FastLinear, PackedLinear, available, linear, prepack, quantize_int8
from codeshell.kernels import _ext

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable on this machine")

SHAPES = [(1, 8), (1, 256), (3, 13), (5, 1536), (17, 1000), (300, 129)]  # odd widths: vector tails


def _mod():
    return _ext.get()


def _bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to one bf16 rounding step of the fp32 result (a tie rounded the other way)."""
    assert a.dtype == b.dtype == torch.bfloat16
    diff = (a.float() - b.float()).abs()
    ulp = b.float().abs().clamp(min=1e-30) * 2.0 ** -7
    assert bool((diff <= ulp + 1e-6).all()), f"max diff {diff.max()}"  # 1e-6: torch rounds the far tail of GELU to 0
    assert (diff > 1e-6).float().mean() < 0.01  # ties are rare: nearly every value is equal


@pytest.mark.parametrize("rows,C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_add_layer_norm_matches_torch(rows, C, dtype, residual):
    g = torch.Generator().manual_seed(rows * 1000 + C)
    x = (torch.randn(rows, C, generator=g) * 3 + 0.5).to(dtype)
    r = torch.randn(rows, C, generator=g).to(dtype) if residual else None
    w = (torch.randn(C, generator=g) * 0.2 + 1).to(dtype)
    b = (torch.randn(C, generator=g) * 0.1).to(dtype)
    h, y = _mod().fused_add_layer_norm(x, r, w, b, 1e-5)
    h_ref = x + r if residual else x
    if residual and dtype == torch.bfloat16:  # r as a linear's fp32 output: rounded first
        r32 = r.float() + torch.randn(r.shape, generator=g) * 1e-3
        h2, y2 = _mod().fused_add_layer_norm(x, r32, w, b, 1e-5)
        h2_ref, _ = _mod().fused_add_layer_norm(x, r32.to(dtype), w, b, 1e-5)
        assert torch.equal(h2, x + r32.to(dtype)) and torch.equal(h2, h2_ref)
    y_ref = F.layer_norm(h_ref, (C,), w, b, 1e-5)
    assert torch.equal(h, h_ref)  # the residual is torch's add, bit for bit
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-6)
    else:
        _bf16_close(y, y_ref)


@pytest.mark.parametrize("rows,C", [(256, 256), (300, 257), (64, 1024)])
def test_add_layer_norm_prefill_split_keeps_bits(rows, C, monkeypatch):
    # A prefill's LayerNorm of >= 65536 values splits over the threads (fused.cpp
    # prefill_row_grain; codeshell-mini's 256 x 256 was one task); CODESHELL_PREFILL_LN_SPLIT=off
    # is the single task of before. Rows are independent: the same bits either way.
    g = torch.Generator().manual_seed(rows + C)
    x = (torch.randn(rows, C, generator=g) * 3).to(torch.bfloat16)
    r = torch.randn(rows, C, generator=g)  # a linear's fp32 output
    w, b = torch.randn(C, generator=g).to(torch.bfloat16), torch.randn(C, generator=g).to(torch.bfloat16)
    monkeypatch.setenv("CODESHELL_PREFILL_LN_SPLIT", "off")
    h0, y0 = _mod().fused_add_layer_norm(x, r, w, b, 1e-5)
    monkeypatch.delenv("CODESHELL_PREFILL_LN_SPLIT")
    h1, y1 = _mod().fused_add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(h0, h1) and torch.equal(y0, y1)
    _bf16_close(y1, F.layer_norm(x + r.to(torch.bfloat16), (C,), w, b, 1e-5))


@pytest.mark.parametrize("rows,C", [(1, 8), (2, 1024), (3, 13), (5, 1536), (7, 33), (9, 48), (17, 1000), (66, 129)])
@pytest.mark.parametrize("dtype,wdtype,rkind", [(torch.bfloat16, torch.bfloat16, "f32"), (torch.bfloat16, torch.bfloat16, "same"),
                                                (torch.bfloat16, torch.float32, "f32"), (torch.bfloat16, torch.bfloat16, None),
                                                (torch.float32, torch.float32, "same"), (torch.float32, torch.bfloat16, None)])
def test_add_layer_norm_rows_at_once_keep_bits(rows, C, dtype, wdtype, rkind, monkeypatch):
    # fused.cpp add_ln_rows16 (session 28: 2 or 4 rows' passes interleaved, w and b widened once,
    # 32 bf16 a store) against add_ln_row16 row by row (CODESHELL_LN_ROWS=1): the same bits,
    # NaN and inf residuals, tails of 1-31 values, with and without each affine parameter.
    # (without AVX-512 every setting runs add_ln_row: equal trivially)
    g = torch.Generator().manual_seed(rows * 31 + C)
    x = (torch.randn(rows, C, generator=g) * 3 + 0.5).to(dtype)
    r = None if rkind is None else torch.randn(rows, C, generator=g) * 2
    if r is not None:
        r = r if rkind == "f32" else r.to(dtype)
        if rows >= 3:
            r[1, C // 2] = float("nan")
            r[2, C - 1] = float("inf")
    for w, b in [(torch.randn(C, generator=g).to(wdtype), torch.randn(C, generator=g).to(wdtype)),
                 (torch.randn(C, generator=g).to(wdtype), None), (None, torch.randn(C, generator=g).to(wdtype))]:
        out = {}
        for n in ("1", "2", "4"):
            monkeypatch.setenv("CODESHELL_LN_ROWS", n)
            out[n] = _mod().fused_add_layer_norm(x, r, w, b, 1e-5)
        bits = (lambda t: t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32))
        for n in ("2", "4"):
            assert all(torch.equal(bits(a), bits(c)) for a, c in zip(out["1"], out[n])), (n, w is None, b is None)


def test_add_layer_norm_mixed_and_no_affine():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 77, generator=g).to(torch.bfloat16)
    w, b = torch.randn(77, generator=g), torch.randn(77, generator=g)
    _, y = _mod().fused_add_layer_norm(x, None, w, b, 1e-5)  # bf16 rows, fp32 affine parameters
    _bf16_close(y, F.layer_norm(x.float(), (77,), w, b, 1e-5).to(torch.bfloat16))
    xf = x.float()
    _, y = _mod().fused_add_layer_norm(xf, None, None, None, 1e-6)
    torch.testing.assert_close(y, F.layer_norm(xf, (77,), eps=1e-6), rtol=1e-5, atol=2e-6)


def test_add_layer_norm_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="r must match"):
        _mod().fused_add_layer_norm(x, torch.randn(2, 9), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        _mod().fused_add_layer_norm(torch.randn(8, 2).t(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"\[8\]"):
        _mod().fused_add_layer_norm(x, None, torch.ones(7), None, 1e-5)


@pytest.mark.parametrize("rows,N", SHAPES)
@pytest.mark.parametrize("out_bf16", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_tanh_matches_torch(rows, N, out_bf16, with_bias):
    g = torch.Generator().manual_seed(rows + N)
    v = torch.randn(rows, N, generator=g) * 4  # reaches far into both tails
    v[0, 0], v[-1, -1] = -30.0, 30.0
    bias = torch.randn(N, generator=g) if with_bias else None
    out = _mod().fused_gelu_tanh(v, bias, out_bf16)
    pre = v if bias is None else v + bias
    if out_bf16:  # the plain bf16 path: the linear's fp32 result cast to bf16, then F.gelu
        _bf16_close(out, F.gelu(pre.to(torch.bfloat16), approximate="tanh"))
        # bf16 in -> bf16 out gives the same
        assert torch.equal(_mod().fused_gelu_tanh(pre.to(torch.bfloat16), None, True), out)
    else:
        torch.testing.assert_close(out, F.gelu(pre, approximate="tanh"), rtol=2e-6, atol=1e-6)


def test_gelu_rejects_bf16_in_fp32_out():
    with pytest.raises(RuntimeError, match="bfloat16 v"):
        _mod().fused_gelu_tanh(torch.zeros(1, 8, dtype=torch.bfloat16), None, False)


@pytest.mark.parametrize("B,T,H,G,D", [(1, 1, 8, 2, 32), (1, 8, 12, 4, 128), (2, 5, 4, 2, 8), (1, 3, 2, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_matches_model_bits(B, T, H, G, D, dtype):
    from codeshell.config import CodeShellConfig
    from codeshell.model import _rotate, rope_cos_sin
    cfg = CodeShellConfig(n_embd=H * D, n_head=H, num_query_groups=G, n_layer=1, n_inner=4 * H * D,
                          vocab_size=64)
    g = torch.Generator().manual_seed(B * T * D)
    qkv = (torch.randn(B, T, (H + 2 * G) * D, generator=g) * 2).to(dtype)
    pos = torch.randint(0, 3000, (B, T), generator=g)
    cos, sin = rope_cos_sin(cfg, pos, 4096)
    ref = _rotate(qkv[..., :(H + G) * D].view(B, T, H + G, D).transpose(1, 2), cos, sin)  # [B, H+G, T, D]
    out = qkv.clone()
    _mod().fused_rope_(out.view(B * T, -1), cos.reshape(B * T, D), sin.reshape(B * T, D), H + G, D)
    got = out[..., :(H + G) * D].view(B, T, H + G, D).transpose(1, 2)
    assert torch.equal(got, ref)  # the same fp32 products and sums: the same bits
    assert torch.equal(out[..., (H + G) * D:], qkv[..., (H + G) * D:])  # v untouched
    if dtype == torch.bfloat16:  # from a linear's fp32 output: the cast and the rotation at once
        y32 = qkv.float() + torch.randn(qkv.shape, generator=g) * 1e-3  # not bf16-exact
        want = y32.to(torch.bfloat16)
        _mod().fused_rope_(want.view(B * T, -1), cos.reshape(B * T, D), sin.reshape(B * T, D), H + G, D)
        got = _mod().fused_rope_bf16(y32.view(B * T, -1), cos.reshape(B * T, D), sin.reshape(B * T, D), H + G, D)
        assert torch.equal(got.view(qkv.shape), want)
    half = qkv.clone()  # cos, sin given as their first halves only (the model's fused path)
    c2, s2 = (t.reshape(B * T, D)[:, :D // 2].contiguous() for t in (cos, sin))
    _mod().fused_rope_(half.view(B * T, -1), c2, s2, H + G, D)
    assert torch.equal(half, out)


@pytest.mark.parametrize("rows,heads,D,C", [(1, 10, 128, 1536), (7, 3, 64, 256), (5, 2, 34, 100), (9, 4, 20, 97),
                                          (64, 1, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_16_lanes_keep_bits(rows, heads, D, C, dtype, monkeypatch):
    # fused.cpp rope_row16 (session 28) against the 8-lane loop (CODESHELL_ROPE16=0): in place,
    # fp32 -> bf16 with the v columns copied, halves of D % 16 != 0, NaN and inf values.
    g = torch.Generator().manual_seed(rows * C + D)
    qkv = (torch.randn(rows, C, generator=g) * 2).to(dtype)
    qkv[0, 0], qkv[-1, D // 2] = float("nan"), float("inf")
    y32 = qkv.float() + torch.randn(qkv.shape, generator=g) * 1e-3
    cos, sin = torch.randn(rows, D // 2, generator=g), torch.randn(rows, D // 2, generator=g)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("CODESHELL_ROPE16", flag)
        a = qkv.clone()
        _mod().fused_rope_(a, cos, sin, heads, D)
        out[flag] = [a, _mod().fused_rope_bf16(y32, cos, sin, heads, D)]
    bits = (lambda t: t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(out["0"], out["1"]))


# ---- FastLinear / PackedLinear --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 3), (2, 4), (70,)])
def test_fast_linear_equals_ops_linear(dtype, lead):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 160, generator=g)
    b = torch.randn(48, generator=g).to(torch.bfloat16)
    x = torch.randn(*lead, 160, generator=g).to(dtype)
    for packed in (prepack(w), quantize_int8(w)):
        pl = PackedLinear(packed, b)
        want = linear(x, packed, b)
        assert torch.equal(pl(x), want)
        assert torch.equal(pl(x), want)  # the cached path
        assert torch.equal(pl.forward_raw(x).to(dtype).reshape(want.shape), want)


def test_packed_linear_follows_replaced_buffers_and_bias():
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    pl = PackedLinear(prepack(w), b.clone())
    x = torch.randn(2, 64, generator=g)
    y0 = pl(x)
    with torch.no_grad():
        pl.bias.add_(1.0)  # in place: the cached fp32 bias must follow
    torch.testing.assert_close(pl(x), y0 + 1.0)
    pl.data = prepack(2 * w).data  # a replaced buffer
    torch.testing.assert_close(pl(x), 2 * y0 + 1.0 - b, rtol=1e-4, atol=1e-3)


def test_fast_linear_bad_input_is_the_checked_error():
    fl = FastLinear(prepack(torch.randn(16, 32)), None)
    with pytest.raises(ValueError, match="in_features 31"):
        fl(torch.randn(1, 31))


def test_fast_linear_follows_the_isa_cap(monkeypatch):
    from codeshell.kernels import ops
    p = prepack(torch.randn(32, 64))
    fl = FastLinear(p, None)
    x = torch.randn(1, 64).to(torch.bfloat16)
    fl(x)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    before = ops.PATHS_RUN[("bf16", "avx2:panel")]
    fl(x)
    assert ops.PATHS_RUN[("bf16", "avx2:panel")] == before + 1


# ---- the model's inference path ------------------------------------------------------------

def _tiny_model(dtype, **over):
    from codeshell.config import CodeShellConfig
    from codeshell.model import CodeShellForCausalLM
    kw = dict(n_embd=96, n_layer=3, n_head=6, num_query_groups=2, n_inner=200, vocab_size=300, n_positions=256)
    kw.update(over)
    torch.manual_seed(0)
    m = CodeShellForCausalLM(CodeShellConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so the affine part is tested
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.1)
    return m.to(dtype)


def _logits(model, ids, fused: bool, monkeypatch):
    from codeshell import model as model_mod
    monkeypatch.setattr(model_mod, "_fused_ops", (lambda: _ext.get()) if fused else (lambda: None))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("pos", ["rope", "learned_absolute"])
def test_model_fused_path_agrees_with_plain_fp32(pos, monkeypatch):
    m = _tiny_model(torch.float32, position_embedding_type=pos)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    plain, fused = _logits(m, ids, False, monkeypatch), _logits(m, ids, True, monkeypatch)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_model_fused_path_greedy_tokens_equal(monkeypatch):
    """Greedy decoding through the engine (KV cache, packed decode rows) gives the same tokens
    with the fused inference path as with the plain one, fp32 and bf16 with packed linears."""
    from codeshell import model as model_mod
    from codeshell.engine.engine import Engine
    from codeshell.engine.sampling import SamplingParams
    from codeshell.kernels import prepare_model

    def run(dtype, fused):
        monkeypatch.setattr(model_mod, "_fused_ops", (lambda: _ext.get()) if fused else (lambda: None))
        m = _tiny_model(dtype)
        prepare_model(m)
        eng = Engine(m, m.cfg, max_batch=4)
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        g = torch.Generator().manual_seed(5)
        for i in range(3):
            eng.add_request(f"r{i}", torch.randint(0, 300, (5 + 3 * i,), generator=g).tolist(), sp)
        out = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        return out

    for dtype in (torch.float32, torch.bfloat16):
        assert run(dtype, True) == run(dtype, False)


def test_model_training_path_keeps_autograd(monkeypatch):
    m = _tiny_model(torch.float32).train()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    loss = m(ids).logsumexp(-1).mean()
    loss.backward()  # the fused ops have no autograd: the grad-enabled path must not take them
    assert m.transformer.h[0].ln_1.weight.grad is not None
