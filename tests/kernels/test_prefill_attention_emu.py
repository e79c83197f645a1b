"""The prefill attention's AVX512-BF16 emulation (session 23; csrc/attention_prefill.cpp `dpbf16`,
`to_bf16`): the kernel with vdpbf16ps as two fp32 FMAs on the widened pairs and vcvtneps2bf16 as
integer rounding, what runs on AVX-512 CPUs without AVX512-BF16 (Ice Lake / Cascade Lake Xeons).
Forced by CODESHELL_PREFILL_ATTN_EMU=1 on a CPU with the instructions, so it is checked there too;
CODESHELL_PREFILL_ATTN_NOBF16=0 keeps PyTorch's SDPA on a CPU without them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codeshell.kernels import ISA_LEVELS, available, isa_level
from codeshell.kernels import prefill_attention as pa

from test_prefill_attention import _case  # noqa: E402  (the same q, KV cache, slots and positions)

needs_avx512 = pytest.mark.skipif(not available() or isa_level() < ISA_LEVELS.index("avx512_vnni"),
                                  reason="the emulated prefill attention needs the native kernels and AVX-512")



@pytest.fixture(autouse=True)
def _vdpbf16ps_kernel(monkeypatch):
    """These tests check the emulated vdpbf16ps kernel: on an AMX CPU a 64-key call would run
    the AMX kernel (`pa.use_amx`), which tests/kernels/test_prefill_attention_amx.py checks."""
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_AMX", "0")

def _emulated_scores(q, k):
    """vdpbf16ps as the emulation computes it, in torch: per lane (a dim pair), the odd element's
    product added first, then the even one's, each a rounded fp32 add of an exact product."""
    qf, kf = q.float(), k.float()
    acc = torch.zeros(q.shape[0], k.shape[0])
    for d2 in range(q.shape[1] // 2):
        acc = acc + qf[:, 2 * d2 + 1, None] * kf[None, :, 2 * d2 + 1]
        acc = acc + qf[:, 2 * d2, None] * kf[None, :, 2 * d2]
    return acc


@needs_avx512
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (2, 4, 2, 32, 37, 9), (1, 4, 1, 64, 70, 20)])
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
def test_emulation_against_fp32_attention(B, H, G, D, T, P, kb, monkeypatch):
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_EMU", "1")
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    scale = 1 / math.sqrt(D)
    got = pa.prefill_attention(q, kc, vc, slots, pos, scale, kb).float()
    S = int(pos.max()) + 1
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q.float(), kc[slots, :, :S].float(), vc[slots, :, :S].float(),
                                         attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    err = (got - ref).abs().max().item()
    assert err < 0.05, err  # the probabilities and the output rounded to bf16 (~2^-8 relative each)


@needs_avx512
def test_emulated_scores_are_the_fma_pairs(monkeypatch):
    """One key per query and V = identity rows: y = the probability-weighted value = exactly the value
    when one key is visible; with two keys the softmax of the emulated scores decides y. Scores of
    the first query (sees key 0 only) give y = v0 exactly: the softmax of one score is 1."""
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_EMU", "1")
    q, kc, vc, slots, pos = _case(1, 2, 1, 64, 2, 0, seed=3)
    y = pa.prefill_attention(q, kc, vc, slots, pos, 0.125, 16)
    assert torch.equal(y[0, 0], vc[1, 0, 0].expand(2, 64))  # one visible key: its value, bit for bit
    # the second query: softmax over the two emulated scores (fp32), probabilities rounded to bf16
    s = _emulated_scores(q[0, :, 1].float().bfloat16(), kc[1, 0, :2]) * 0.125
    p = torch.exp(s - s.max(1, keepdim=True).values).bfloat16().float()
    ref = (p @ vc[1, 0, :2].float()) / p.sum(1, keepdim=True)
    assert (y[0, 1].float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item() + 1e-6


@needs_avx512
def test_sdpa_switch(monkeypatch):
    q, kc, vc, slots, pos = _case(1, 2, 1, 64, 5, 0)
    if isa_level() >= ISA_LEVELS.index("avx512_bf16"):
        assert pa.prefill_attention_ok(q, kc)  # the instructions themselves: the switch does not apply
    else:
        assert pa.prefill_attention_ok(q, kc)
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_NOBF16", "0")
        assert not pa.prefill_attention_ok(q, kc)


@needs_avx512
def test_forced_emulation_is_the_default_here(monkeypatch):
    """Without AVX512-BF16 the default is the emulation: forcing it gives the same bits (with the
    instructions, forcing it runs the other path: the bits may differ, the results stay close)."""
    q, kc, vc, slots, pos = _case(2, 8, 2, 128, 64, 3)
    a = pa.prefill_attention(q, kc, vc, slots, pos, 0.09, 64)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_EMU", "1")
    b = pa.prefill_attention(q, kc, vc, slots, pos, 0.09, 64)
    if isa_level() < ISA_LEVELS.index("avx512_bf16"):
        assert torch.equal(a, b)
    else:
        assert (a.float() - b.float()).abs().max().item() < 0.03


@needs_avx512
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (2, 4, 2, 32, 37, 9), (1, 4, 1, 64, 70, 20),
                                         (1, 2, 1, 96, 130, 3)])
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
@pytest.mark.parametrize("switch", ["", "CODESHELL_PREFILL_ATTN_PREPACK=0", "CODESHELL_PREFILL_ATTN_R4=0",
                                    "CODESHELL_PREFILL_ATTN_TRIM=0", "CODESHELL_PREFILL_ATTN_FULL=0"])
def test_widened_operands_are_the_same_bits(B, H, G, D, T, P, kb, switch, monkeypatch):
    """Session 25: the emulation with keys, values, queries and probabilities widened to fp32 once
    (CODESHELL_PREFILL_ATTN_WIDE, default) against the widening in the inner loops (=0): the same
    FMAs in the same order, so the same bits, at every key block and with each other switch."""
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_EMU", "1")
    if switch:
        monkeypatch.setenv(*switch.split("="))
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    scale = 1 / math.sqrt(D)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_WIDE", "0")
    want = pa.prefill_attention(q, kc, vc, slots, pos, scale, kb)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_WIDE", "1")
    got = pa.prefill_attention(q, kc, vc, slots, pos, scale, kb)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max().item()
