"""A bf16 prompt row gets decode's bits where no native prefill attention applies (AVX2): the
prompt's queries attend through decode's kernel one query each (`CacheView.attend`), and the
AVX2 bf16 prefill linears have the decode panel kernel's bits (`ops.prefill_candidates`), so the
first token's log-probabilities after a prompt do not depend on the padded batch around it or on
whether its prefix came from the cache (the last token then runs as a decode step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codeshell import LLM, kernels
from codeshell.config import CodeShellConfig
from codeshell.engine import SamplingParams
from codeshell.engine.kv_cache import KVCache
from codeshell.kernels import ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")




@pytest.mark.parametrize("G,H,D", [(2, 4, 32), (1, 8, 64)])
def test_prompt_queries_get_decode_attention_per_query(G, H, D, monkeypatch):
    """Two padded rows (one after a cached prefix): each query equals decode_attention of that
    query alone over the stored keys (bitwise) and SDPA's fp32 result (to bf16 rounding)."""
    from codeshell.kernels import prefill_attention as pa
    monkeypatch.setattr(pa, "prefill_attention_ok", lambda q, k: False)  # the AVX2 case everywhere
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_DECODE", raising=False)
    cfg = CodeShellConfig(n_layer=1, n_embd=H * D, n_head=H, num_query_groups=G, n_positions=64,
                          vocab_size=64)
    cache = KVCache(cfg, 3, 64, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(torch.bfloat16))  # a cached prefix
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(torch.bfloat16))
    T = 21
    positions = torch.stack([torch.arange(0, T), torch.arange(9, 9 + T)])  # row 1 after 9 cached keys
    view = cache.view([2, 0], positions)
    q = torch.randn(2, H, T, D, generator=g).to(torch.bfloat16)
    k = torch.randn(2, G, T, D, generator=g).to(torch.bfloat16)
    v = torch.randn(2, G, T, D, generator=g).to(torch.bfloat16)
    scale = 1 / math.sqrt(D)
    y = view.attend(0, q, k, v, scale)
    assert y is not None and y.shape == (2, H, T, D)
    slots = torch.tensor([2, 0])
    for b in range(2):
        for t in range(T):
            lens = torch.tensor([int(positions[b, t]) + 1])
            one = ops.decode_attention(q[b:b + 1, :, t:t + 1], cache.k[0], cache.v[0], slots[b:b + 1], lens, scale)
            assert torch.equal(y[b, :, t], one[0, :, 0]), (b, t)
            S = int(lens)
            ks = cache.k[0, int(slots[b]), :, :S].float().repeat_interleave(H // G, 0)
            vs = cache.v[0, int(slots[b]), :, :S].float().repeat_interleave(H // G, 0)
            ref = F.scaled_dot_product_attention(q[b, :, t:t + 1].float(), ks, vs, scale=scale)
            torch.testing.assert_close(y[b, :, t].float(), ref[:, 0], atol=2e-2, rtol=2e-2)


def test_switch_off_keeps_sdpa(monkeypatch):
    from codeshell.kernels import prefill_attention as pa
    monkeypatch.setattr(pa, "prefill_attention_ok", lambda q, k: False)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_DECODE", "0")
    cfg = CodeShellConfig(n_layer=1, n_embd=128, n_head=4, num_query_groups=2, n_positions=16, vocab_size=64)
    cache = KVCache(cfg, 1, 16, torch.bfloat16)
    q = torch.zeros(1, 4, 5, 32, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 5, 32, dtype=torch.bfloat16)
    assert cache.view([0], torch.arange(5)[None]).attend(0, q, kv, kv, 0.1) is None


@pytest.fixture(scope="module")
def mini():
    from codeshell.kernels.prefill_attention import prefill_attention_ok
    q = torch.zeros(1, 2, 2, 64, dtype=torch.bfloat16)
    if ops.isa_level() >= ops.ISA_LEVELS.index("avx512_vnni") or prefill_attention_ok(q, q):
        pytest.skip("AVX-512: prefill runs its own attention and measured linears, not decode's bits")
    return LLM(max_batch=4)  # codeshell-mini: bf16


def _first(llm, prompts, caching: bool):
    llm.engine.prefix_caching = caching
    p = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    return [o.outputs[0].logprobs[0].top for o in llm.generate([{"prompt_token_ids": x} for x in prompts], p)]


def test_first_token_bits_alone_batched_and_after_a_cached_prefix(mini):
    """codeshell-mini, prompts of 70-200 tokens (past ROW_INVARIANT_MAX_M: the prefill paths):
    alone, three in one padded forward, and with all but the last token cached (a decode step)
    give the same log-probabilities bit for bit."""
    llm = mini
    text = "def add(a, b):\n    return a + b\n\n" * 12
    ids = llm.encode(text)
    ps = [ids[:70], ids[:133], ids[5:200]]
    assert min(len(p) for p in ps) > ops.ROW_INVARIANT_MAX_M
    caching = llm.engine.prefix_caching
    try:
        alone = [_first(llm, [p], False)[0] for p in ps]
        together = _first(llm, ps, False)
        assert together == alone
        for p, a in zip(ps, alone):
            _first(llm, [p[:-1]], True)         # caches all but the last prompt token
            hits = llm.engine.prefix_hit_tokens
            assert _first(llm, [p], True)[0] == a
            assert llm.engine.prefix_hit_tokens - hits == len(p) - 1  # the last token ran as decode
    finally:
        llm.engine.prefix_caching = caching
