"""Decode and speculative verify steps run single tokens of any sequences packed into one row
(`PackedView`): each token attends to its own slot up to its own position, by the same
one-query attention as plain decoding (bitwise), with no padding rows; greedy picks come from
one reduction over the rows."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM, kernels
from codeshell.config import CodeShellConfig
from codeshell.engine import SamplingParams
from codeshell.engine import kv_cache as kv_mod
from codeshell.engine.kv_cache import KVCache
from codeshell.engine.sampling import SequenceSampler, greedy_picks, sample_rows

CFG = CodeShellConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=128,
                      n_positions=128)


def filled_cache(dtype: torch.dtype) -> KVCache:
    g = torch.Generator().manual_seed(0)
    cache = KVCache(CFG, 3, 40, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


# Tokens of three sequences packed in one row: slot 2 at 10..13 (a last token and three drafts),
# slot 0 at 5 (no draft), slot 1 at 20..21.
SLOTS = [2, 2, 2, 2, 0, 1, 1]
POS = [10, 11, 12, 13, 5, 20, 21]


def qkv(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    M, H, G, D = len(POS), CFG.n_head, CFG.num_query_groups, CFG.head_dim
    return (torch.randn(1, H, M, D, generator=g).to(dtype), torch.randn(1, G, M, D, generator=g).to(dtype),
            torch.randn(1, G, M, D, generator=g).to(dtype))


def reference(cache: KVCache, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch: token i attends to keys 0..POS[i] of slot SLOTS[i] (already stored)."""
    out = []
    rep = CFG.n_head // CFG.num_query_groups
    for i, (s, p) in enumerate(zip(SLOTS, POS)):
        k = cache.k[0, s, :, :p + 1].float().repeat_interleave(rep, 0)  # [H, p+1, D]
        v = cache.v[0, s, :, :p + 1].float().repeat_interleave(rep, 0)
        w = torch.softmax(q[0, :, i].float()[:, None] @ k.transpose(1, 2) * scale, -1)  # [H, 1, p+1]
        out.append((w @ v)[:, 0])
    return torch.stack(out, 1)[None]  # [1, H, M, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_is_plain_decode_attention_bitwise(dtype):
    if not kernels.available():
        pytest.skip("native kernels unavailable: the packed view uses the torch fallback")
    q, k, v = qkv(dtype)
    scale = CFG.head_dim ** -0.5
    packed = filled_cache(dtype)
    got = packed.packed_view(SLOTS, POS).attend(0, q, k, v, scale)
    # plain decode, one token at a time in position order (so each sees the keys before it)
    plain = filled_cache(dtype)
    want = torch.empty_like(got)
    for i in sorted(range(len(POS)), key=lambda i: POS[i]):
        view = plain.view([SLOTS[i]], torch.tensor([[POS[i]]]))
        want[:, :, i:i + 1] = view.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], scale)
    assert torch.equal(got, want)
    assert torch.equal(packed.k, plain.k) and torch.equal(packed.v, plain.v)  # same keys stored
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), reference(packed, q, scale), atol=tol, rtol=tol)


def test_packed_attention_torch_fallback_sees_only_its_own_keys(monkeypatch):
    """Without the native kernel: gathered slots and a per-token mask. The keys stored at the
    later positions of the same forward (and the rest of the cache) must not leak in."""
    monkeypatch.setattr(kernels, "decode_attention_ok", lambda *a: False)
    q, k, v = qkv(torch.float32)
    scale = CFG.head_dim ** -0.5
    cache = filled_cache(torch.float32)
    got = cache.packed_view(SLOTS, POS).attend(0, q, k, v, scale)
    torch.testing.assert_close(got, reference(cache, q, scale), atol=1e-5, rtol=1e-5)
    assert kv_mod.PackedView(cache, SLOTS, POS).mask() is None


def test_greedy_picks_are_the_samplers_picks():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 50, generator=g)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie: the first maximal index, as sample()
    cpu = torch.device("cpu")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.3),  # mutates the logits: per row
              SamplingParams(temperature=0.8, seed=1), SamplingParams(top_k=1, temperature=0.5)]
    samplers = [SequenceSampler(p, [7, 3], p.seed, cpu) for p in params]
    picks = greedy_picks(samplers, logits)
    assert picks[2] is None and picks[3] is None
    assert picks[1] == 7
    for i in (0, 1, 4):
        assert picks[i] == samplers[i].sample(logits[i].clone())
    # sample_rows: the same tokens as each sampler's own sample (the seeded row too)
    again = [SequenceSampler(p, [7, 3], p.seed, cpu) for p in params]
    assert sample_rows(samplers, logits) == [s.sample(logits[i].clone()) for i, s in enumerate(again)]


def test_verify_step_packs_rows_without_padding(monkeypatch):
    """One forward holds each decoding sequence's last token and its draft, nothing more: a
    sequence without a draft adds one token, not a padded row of the longest draft."""
    llm = LLM(max_batch=4)  # the built-in codeshell-mini
    eng = llm.engine
    drafts = {0: [11, 12, 13, 14, 15], 1: [], 2: [21]}
    sizes = []
    transformer = eng.model.transformer
    forward = transformer.forward

    def spy(ids, pos, mask, cache, seq_len=None, **kw):  # kw: the prefill's `rows`
        sizes.append((tuple(ids.shape), mask is None and pos.shape == ids.shape))
        return forward(ids, pos, mask, cache, seq_len=seq_len, **kw)

    monkeypatch.setattr(transformer, "forward", spy)
    monkeypatch.setattr(eng, "_drafts", lambda seqs: [drafts[int(s.request_id)] for s in seqs])
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_lookup_num_tokens=5)
    for i, p in enumerate(["def f(x):", "import os\n", "class A:"]):
        eng.add_request(str(i), llm.encode(p), sp)
    eng.step()  # prefill
    sizes.clear()
    before = eng.spec_drafted
    eng.step()  # the verify step
    assert sizes == [((1, 1 + 5 + 1 + 1 + 1), True)]
    assert eng.spec_drafted - before == 6
    while eng.has_unfinished():
        eng.step()


def test_cap_rows_shortens_the_longest_drafts_first():
    from codeshell.engine.engine import _max_rows
    from codeshell.engine.lookup import cap_rows
    assert _max_rows() == kernels.ROW_INVARIANT_MAX_M  # the linear kernels' row-invariant limit
    drafts = [[1] * 8, [2] * 3, [], [3] * 8]
    assert cap_rows(drafts, 23) == drafts                            # 4 + 19 drafted: fits
    assert cap_rows(drafts, 16) == [[1] * 4, [2] * 3, [], [3] * 5]   # 7 fewer, off the longest
    assert cap_rows(drafts, 3) == [[], [], [], []]                   # fewer rows than sequences


def test_verify_steps_stay_within_the_row_invariant_cap(monkeypatch):
    """No packed forward holds more tokens than the linear kernels keep row-invariant
    (`ROW_INVARIANT_MAX_M`, here patched to 5 for 3 sequences drafting up to 6 tokens each),
    and the greedy text is still plain decoding's."""
    from tests.conftest import require_shared
    from codeshell.engine import engine as engine_mod
    from codeshell.engine import lookup as lookup_mod
    llm = LLM(str(require_shared("golden/rope-gqa")), dtype="float32", max_batch=4)
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 500, (20,), generator=g).tolist()
    prompts = [{"prompt_token_ids": p} for p in (base * 2, base[:7] * 3, base[3:15])]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    monkeypatch.setattr(engine_mod, "_max_rows", lambda: 5)
    monkeypatch.setattr(llm.engine, "draft_budget", None)  # every draft, up to the cap
    monkeypatch.setattr(lookup_mod.NgramLookup, "propose", lambda self, k: self.tokens[-6:][:k])
    sizes = []
    transformer = llm.engine.model.transformer
    forward = transformer.forward

    def spy(ids, pos, mask, cache, seq_len=None, **kw):  # kw: the prefill's `rows`
        if isinstance(cache, kv_mod.PackedView):
            sizes.append(ids.shape[1])
        return forward(ids, pos, mask, cache, seq_len=seq_len, **kw)

    monkeypatch.setattr(transformer, "forward", spy)
    drafted = llm.engine.spec_drafted
    spec = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_lookup_num_tokens=6)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, spec)]
    assert got == want
    assert llm.engine.spec_drafted > drafted and max(sizes) == 5


def test_first_argmax_is_max_indices_with_ties_and_odd_vocabularies():
    from codeshell.engine.sampling import first_argmax
    g = torch.Generator().manual_seed(7)
    for V in (16384, 70144, 1000, 130):
        x = torch.randn(9, V, generator=g)
        x[1, 5] = x[1, V - 3] = x[1].max() + 1          # a tie across blocks: the first wins
        x[2, 300 % V] = x[2, 301 % V] = x[2].max() + 2  # a tie inside a block
        x[3] = 0.5                                       # a flat row: index 0
        assert torch.equal(first_argmax(x), x.max(-1).indices), V
        assert torch.equal(first_argmax(x.bfloat16()), x.bfloat16().max(-1).indices), V


@pytest.mark.parametrize("slots,positions", [([2], [list(range(5, 12))]), ([1], [[3, 4, 6, 7]]), ([0, 2], [[0, 1, 2], [4, 5, 6]]),
                                             ([3], [[9]])])
def test_cache_view_store_fast_path_stores_what_index_put_stores(slots, positions):
    # CacheView._store copies one prompt at consecutive positions as a slice (kv_cache.py `_run`),
    # else index_put: both leave the cache with the same contents.
    from codeshell.config import CodeShellConfig
    from codeshell.engine.kv_cache import KVCache
    cfg = CodeShellConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=128, n_positions=64)
    pos = torch.tensor(positions)
    B, T = pos.shape
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, T, 4, 16, generator=g).to(torch.bfloat16).transpose(1, 2)[:, :2]  # [B, G, T, D], a view
    v = torch.randn(B, 2, T, 16, generator=g).to(torch.bfloat16)
    fast, ref = KVCache(cfg, 4, 32, torch.bfloat16), KVCache(cfg, 4, 32, torch.bfloat16)
    view = fast.view(slots, pos)
    assert (view._run is not None) == (B == 1 and T > 1 and positions[0] == list(range(positions[0][0], positions[0][0] + T)))
    view._store(1, k, v)
    rv = ref.view(slots, pos)
    rv._run = None
    rv._store(1, k, v)
    assert torch.equal(fast.k, ref.k) and torch.equal(fast.v, ref.v) and fast.k.abs().sum() > 0
