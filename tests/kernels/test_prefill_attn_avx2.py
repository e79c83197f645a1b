"""The AVX2 prompt attention (`prefill_attention` with key block 0, csrc/attention_prefill.cpp
`avx2_prompt`): every query of a prompt gets decode's bits (`ops.decode_attention` of that query
alone over its keys 0..position), for any head count per group, head dims 32..128, prompt lengths
around the 8-key chunks, padded rows in other slots and a cached prefix; and the engine's
`CacheView.attend` gives the same with CODESHELL_PREFILL_ATTN_AVX2 on and off."""

from __future__ import annotations

import math

import pytest
import torch

from codeshell import kernels
from codeshell.config import CodeShellConfig
from codeshell.engine.kv_cache import KVCache
from codeshell.kernels import _ext, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


def _case(G, H, D, T, prefix, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots_n, L = 3, prefix + T + 5
    kc = torch.randn(slots_n, G, L, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(slots_n, G, L, D, generator=g).to(torch.bfloat16)
    qkv = torch.randn(2, T, H + 2 * G, D, generator=g).to(torch.bfloat16).transpose(1, 2)  # a view, as the model's
    q = qkv[:, :H]
    slots = torch.tensor([2, 0])
    pos = torch.stack([torch.arange(T), torch.arange(prefix, prefix + T)])  # row 1 after a cached prefix
    return q, kc, vc, slots, pos


@pytest.mark.parametrize("G,H,D", [(2, 8, 32), (2, 4, 32), (1, 3, 64), (2, 2, 128), (4, 8, 96)])
@pytest.mark.parametrize("T", [2, 7, 8, 9, 33, 70])
def test_each_query_has_decode_bits(G, H, D, T):
    q, kc, vc, slots, pos = _case(G, H, D, T, prefix=11, seed=T + D)
    scale = 1 / math.sqrt(D)
    y = _ext.get().prefill_attention(q, kc, vc, slots, pos, scale, 0)  # [B, T, H, D]
    assert y.shape == (2, T, H, D) and y.dtype == torch.bfloat16
    for b in range(2):
        qt = q[b].transpose(0, 1).reshape(T, H, 1, D)
        one = ops.decode_attention(qt, kc, vc, slots[b].repeat(T), pos[b] + 1, scale)  # [T, H, 1, D]
        assert torch.equal(y[b], one[:, :, 0]), b


def test_cache_view_switch_same_bits(monkeypatch):
    """`CacheView.attend` on the AVX2 path (no native prefill kernel) with the prompt kernel and with
    decode's packed_attention a query at a time: the same bits."""
    from codeshell.kernels import prefill_attention as pa
    monkeypatch.setattr(pa, "prefill_attention_ok", lambda q, k: False)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_DECODE", raising=False)
    H, G, D, T = 8, 2, 32, 45
    cfg = CodeShellConfig(n_layer=1, n_embd=H * D, n_head=H, num_query_groups=G, n_positions=128, vocab_size=64)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, T, H, D, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, G, T, D, generator=g).to(torch.bfloat16)
    v = torch.randn(2, G, T, D, generator=g).to(torch.bfloat16)
    pos = torch.stack([torch.arange(T), torch.arange(20, 20 + T)])
    out = {}
    for on in ("1", "0"):
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_AVX2", on)
        cache = KVCache(cfg, 3, 128, torch.bfloat16)
        cache.k[:, 0, :, :20] = 0.5  # a cached prefix in slot 0
        out[on] = cache.view([1, 0], pos).attend(0, q, k, v, 1 / math.sqrt(D))
    assert out["1"] is not None and torch.equal(out["1"], out["0"])


def test_bad_head_dim_is_one_error_line():
    q, kc, vc, slots, pos = _case(1, 2, 32, 4, prefix=0)
    with pytest.raises(RuntimeError, match="head dim"):
        _ext.get().prefill_attention(q[..., :16].contiguous(), kc[..., :16].contiguous(), vc[..., :16].contiguous(),
                                     slots, pos, 0.25, 0)
