"""The native prefill attention (`codeshell.kernels.prefill_attention`, csrc/attention_prefill.cpp):
causal by position over the KV cache read in place, against fp32 attention with the mask the
cache's SDPA path uses, and the engine's prefill with it against the same prefill on SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codeshell.kernels import ISA_LEVELS, available, isa_level
from codeshell.kernels import prefill_attention as pa

needs_bf16 = pytest.mark.skipif(not available() or not pa.prefill_attention_ok(torch.zeros(1, 1, 2, 32, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)),
                                reason="prefill_attention needs the native kernels and AVX-512 (AVX512-BF16, or its emulation)")



@pytest.fixture(autouse=True)
def _vdpbf16ps_kernel(monkeypatch):
    """These tests check the vdpbf16ps kernel (and its switches): on an AMX CPU a 64-key call
    would run the AMX kernel (`pa.use_amx`), which tests/kernels/test_prefill_attention_amx.py checks."""
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_AMX", "0")

def _case(B, H, G, D, T, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = P + T
    kc = torch.randn(B + 2, G, S + 9, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(B + 2, G, S + 9, D, generator=g).to(torch.bfloat16)
    # q as the model makes it: a view of the qkv rows [B, T, H + 2G, D], heads transposed
    q = (torch.randn(B, T, H + 2 * G, D, generator=g) * 2).to(torch.bfloat16).transpose(1, 2)[:, :H]
    slots = torch.tensor([2 * b + 1 for b in range(B)]) % (B + 2)  # not consecutive
    pos = torch.arange(P, S).repeat(B, 1)
    if B > 1:
        pos[1] = torch.arange(T) + P // 2  # a row with a shorter prefix (padding rows of a batch)
    return q, kc, vc, slots, pos


def _reference(q, kc, vc, slots, pos, scale):
    S = int(pos.max()) + 1
    k, v = kc[slots, :, :S].float(), vc[slots, :, :S].float()
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (1, 32, 8, 128, 45, 300), (3, 4, 2, 64, 37, 5),
                                         (2, 8, 8, 64, 33, 0), (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0),
                                         # head dims with D % 64 == 32 (the values' last 32-wide chunk):
                                         # codeshell-mini's 8 heads of 32, and 96
                                         (1, 8, 2, 32, 256, 0), (2, 4, 2, 32, 37, 9), (1, 4, 2, 96, 50, 3)])
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
def test_against_fp32_attention(B, H, G, D, T, P, kb):
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    scale = 1 / math.sqrt(D)
    got = pa.prefill_attention(q, kc, vc, slots, pos, scale, kb)
    _check_against_fp32(got, q, kc, vc, slots, pos, scale,
                        f"avx512_bf16, key block {kb}) B{B} H{H} G{G} D{D} T{T} P{P}")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (2, 4, 2, 32, 37, 9), (1, 8, 2, 128, 100, 0),
                                         (1, 4, 2, 96, 50, 3), (1, 1, 1, 32, 3, 130)])
@pytest.mark.parametrize("qscale", [1.0, 30.0])
@pytest.mark.parametrize("env", ["CODESHELL_PREFILL_ATTN_FEXP=0", "CODESHELL_PREFILL_ATTN_FSUM=0"])
def test_softmax_forms_against_fp32_attention(B, H, G, D, T, P, qscale, env, monkeypatch):
    # The 64-key tile's softmax (block_rows4) by exp16 (CODESHELL_PREFILL_ATTN_FEXP=0, the kernel before
    # session 39) and by exp2_poly4 with the bf16 probabilities' sums (CODESHELL_PREFILL_ATTN_FSUM=0):
    # the default (exp2_poly4, fp32 sums) is test_against_fp32_attention's; each within the same bounds,
    # also on peaked scores (qscale 30: most probabilities 0, the running max moving often).
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    q = (q.float() * qscale).to(torch.bfloat16)
    name, value = env.split("=")
    monkeypatch.setenv(name, value)
    scale = 1 / math.sqrt(D)
    got = pa.prefill_attention(q, kc, vc, slots, pos, scale, 64)
    _check_against_fp32(got, q, kc, vc, slots, pos, scale, f"avx512_bf16, {env}, q x {qscale}) B{B} H{H} G{G} D{D} T{T} P{P}")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (2, 4, 2, 32, 37, 9), (1, 8, 2, 128, 100, 0),
                                         (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0), (1, 4, 2, 96, 50, 3),
                                         (2, 8, 8, 32, 33, 0), (1, 1, 1, 32, 3, 130), (1, 8, 2, 128, 77, 64)])
@pytest.mark.parametrize("qscale", [0.0, 1.0, 30.0, 3000.0])
@pytest.mark.parametrize("group", ["4", "32"])
def test_vector_softmax_and_pv8_keep_bits(B, H, G, D, T, P, qscale, group, monkeypatch):
    # block_rows4's default softmax (exp2_poly4, fp32 sums) with the four rows' maxima, alpha, sums and
    # running max / sum updates in vector lanes (session 40; CODESHELL_PREFILL_ATTN_VSM) against the
    # scalar bookkeeping one row at a time (VSM=0, session 39): the same operations lane for lane, so the
    # same bits, also with rows of a tile past R, prefixes (blocks wholly past no query / every query),
    # zero queries (scores +-0: std::max's operand order), peaked scores (the running max moving often,
    # probabilities 0) and both row-group sizes.
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    q = (q.float() * qscale).to(torch.bfloat16)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_GROUP", group)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_VSM", "0")
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_PV8", "0")
    scalar = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_VSM")
    assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), scalar)
    # and the value product 8 rows at a time at D = 32 (PV8, session 40; rows past a multiple of 8
    # 4 and 1 at a time): each (row, dim) sum the same chain
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_PV8")
    vector = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    assert torch.equal(vector, scalar)
    if qscale == 1.0:
        _check_against_fp32(vector, q, kc, vc, slots, pos, 1 / math.sqrt(D), f"vector softmax bookkeeping, group {group}) "
                            f"B{B} H{H} G{G} D{D} T{T} P{P}")


def _check_against_fp32(got, q, kc, vc, slots, pos, scale, label):
    """got [B, T, H, D] bf16 against fp32 attention: fp32 scores and sums, the probabilities rounded to
    bf16 for the value product (as torch's bf16 CPU attention rounds them) and the result once: no
    further from fp32 attention than torch's own SDPA on the same bf16 tensors (with the cache's mask),
    and close in absolute terms (also the AMX kernel's test, test_prefill_attention_amx.py)."""
    B, H, T, D = q.shape
    assert got.shape == (B, T, H, D) and got.dtype == torch.bfloat16
    ref = _reference(q, kc, vc, slots, pos, scale).transpose(1, 2)
    S = int(pos.max()) + 1
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    torch_bf16 = F.scaled_dot_product_attention(q, kc[slots, :, :S], vc[slots, :, :S], attn_mask=mask, scale=scale,
                                                enable_gqa=True).transpose(1, 2).float()
    err, err_torch = (got.float() - ref).abs(), (torch_bf16 - ref).abs()
    assert err.max() <= 1.5 * err_torch.max() + 1e-3 and err.mean() <= 1.5 * err_torch.mean() + 1e-4
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -6, atol=2e-2)
    print(f"prefill_attention ({label}: max err {err.max():.1e} "
          f"(torch bf16 SDPA {err_torch.max():.1e}), mean {err.mean():.1e} ({err_torch.mean():.1e})")


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
def test_keys_past_a_position_are_never_read(kb):
    # NaN in every cache position past each row's last query: a kernel reading any of them
    # (or the rows of other slots) would return NaN, at every key block size.
    q, kc, vc, slots, pos = _case(2, 8, 2, 64, 40, 10)
    for b in range(2):
        kc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
        vc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
    other = [s for s in range(kc.shape[0]) if s not in slots.tolist()]
    kc[other] = float("nan")
    vc[other] = float("nan")
    got = pa.prefill_attention(q, kc, vc, slots, pos, 0.125, kb)
    assert torch.isfinite(got.float()).all()


@needs_bf16
def test_bad_input_is_one_clear_error():
    q, kc, vc, slots, pos = _case(1, 4, 2, 64, 8, 0)
    with pytest.raises(RuntimeError, match="position .* outside the cache"):
        pa.prefill_attention(q, kc, vc, slots, pos + 1000, 0.125)
    with pytest.raises(RuntimeError, match="slot .* out of range"):
        pa.prefill_attention(q, kc, vc, slots + 100, pos, 0.125)
    assert not pa.prefill_attention_ok(q.float(), kc)  # fp32 models keep SDPA
    assert not pa.prefill_attention_ok(q[:, :, :1], kc)  # one query: decode attention's job
    q48, kc48, _, _, _ = _case(1, 4, 2, 48, 8, 0)
    assert not pa.prefill_attention_ok(q48, kc48)  # head dim not a multiple of 32: SDPA


def engine_native_then_sdpa(monkeypatch) -> tuple[int, int]:
    """The same prompts (alone, a padded batch, after a cached prefix) through the engine with the
    native prefill attention, then with SDPA (and not decode's kernel a query at a time, the bf16
    fallback without a native prefill kernel since session 31): the same greedy tokens and close
    logits. Returns how many [B, 1, T, S] masks each run built (only SDPA needs one: the native
    kernel reads positions). The caller's spies on which kernel ran are installed before the call."""
    from codeshell import LLM, SamplingParams
    from codeshell.bench import random_model
    from codeshell.config import CodeShellConfig
    from codeshell.engine import kv_cache
    cfg = CodeShellConfig(vocab_size=512, n_embd=256, n_layer=2, n_head=4, num_query_groups=2, n_inner=512,
                          n_positions=512)
    llm = LLM.from_model(random_model(cfg, torch.bfloat16), cfg, max_batch=4)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 for j in range(60 + 11 * i)]} for i in range(3)]
    sp = SamplingParams(max_tokens=8, temperature=0, logprobs=1)
    masks = []
    real_mask = kv_cache.CacheView.mask
    monkeypatch.setattr(kv_cache.CacheView, "mask", lambda self: masks.append(1) or real_mask(self))

    def run():
        return [o.outputs[0] for o in llm.generate(prompts, sp)] + [llm.generate(prompts[:1], sp)[0].outputs[0]]

    native = run()
    native_masks = len(masks)
    monkeypatch.setattr(pa, "prefill_attention_ok", lambda q, k: False)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_DECODE", "0")
    sdpa = run()
    for a, b in zip(native, sdpa):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 0.05
    return native_masks, len(masks) - native_masks


@needs_bf16
def test_engine_prefill_matches_the_sdpa_path(monkeypatch):
    calls = []
    real = pa.prefill_attention
    monkeypatch.setattr(pa, "prefill_attention", lambda *a: calls.append(1) or real(*a))
    native_masks, sdpa_masks = engine_native_then_sdpa(monkeypatch)
    assert calls, "the native prefill attention did not run"
    assert not native_masks, "a mask was built for the native prefill attention"
    assert sdpa_masks, "SDPA ran without the view's mask"


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
def test_a_row_does_not_depend_on_the_batch_around_it(kb):
    # A prompt's attention alone (B = 1) and as row 1 of a batch with another prompt: the same
    # bits at every key block (the key blocks a query sees do not depend on the other rows).
    q, kc, vc, slots, pos = _case(2, 8, 2, 128, 70, 6)
    both = pa.prefill_attention(q, kc, vc, slots, pos, 0.1, kb)
    alone = pa.prefill_attention(q[1:], kc, vc, slots[1:], pos[1:], 0.1, kb)
    assert torch.equal(both[1:], alone)


@needs_bf16
def test_key_block_switch(monkeypatch):
    # The default (64 keys) and CODESHELL_PREFILL_ATTN_KB: the A/B switch picks the block the call runs.
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_KB", raising=False)
    assert pa.key_block(128) == pa.DEFAULT_KEY_BLOCK == 64
    q, kc, vc, slots, pos = _case(1, 4, 2, 32, 90, 0)
    for kb in pa.KEY_BLOCKS:
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_KB", str(kb))
        assert pa.key_block(32) == kb
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 0.2), pa.prefill_attention(q, kc, vc, slots, pos, 0.2, kb))
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_KB", "48")
    with pytest.raises(ValueError, match="CODESHELL_PREFILL_ATTN_KB"):
        pa.key_block(32)


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
@pytest.mark.parametrize("D,T,P", [(32, 256, 0), (128, 77, 5), (64, 33, 40)])
def test_partial_key_block_trim_keeps_bits(kb, D, T, P, monkeypatch):
    # A work item's last key block computes only its 16-key chunks that hold keys and the value
    # product only over its key pairs (block_rows); CODESHELL_PREFILL_ATTN_TRIM=0 computes every
    # block whole. The parts left out hold only keys no query sees: the same bits.
    q, kc, vc, slots, pos = _case(1, 4, 2, D, T, P)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_TRIM", "0")
    whole = pa.prefill_attention(q, kc, vc, slots, pos, 0.2, kb)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_TRIM")
    assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 0.2, kb), whole)
    print(f"prefill_attention (avx512_bf16, key block {kb}, last blocks trimmed) D{D} T{T} P{P}: the whole blocks' bits")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (1, 8, 2, 128, 100, 0), (2, 4, 2, 64, 37, 5),
                                         (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0), (1, 4, 2, 96, 50, 3),
                                         (2, 8, 8, 32, 33, 0)])
@pytest.mark.parametrize("zeros", [False, True])
def test_four_row_softmax_keeps_bits(B, H, G, D, T, P, zeros, monkeypatch):
    # The 64-key tile's softmax four rows at a time (block_rows4: the maxima and sums by reduce4,
    # the same reduction trees as _mm512_reduce_max_ps / _mm512_reduce_add_ps; the running max's
    # exp only where it moved) against one row at a time (CODESHELL_PREFILL_ATTN_R4=0): the same
    # bits, also with rows of a tile past R (R % 4 != 0) and on zero queries (scores of +-0). With
    # exp16 (CODESHELL_PREFILL_ATTN_FEXP=0): the one-row softmax has no exp2_poly4 form (session 39).
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_FEXP", "0")
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    if zeros:
        q = q * 0
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_R4", "0")
    one = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_R4")
    four = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    assert torch.equal(four, one)
    print(f"prefill_attention (avx512_bf16, 64-key tile, softmax of 4 rows a step) B{B} H{H} G{G} D{D} T{T} P{P}: "
          "the one-row softmax's bits")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (1, 8, 2, 128, 100, 0), (2, 4, 2, 64, 37, 5),
                                         (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0), (1, 4, 2, 96, 50, 3),
                                         (2, 8, 8, 32, 33, 0), (1, 1, 1, 32, 3, 130)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("fexp", ["0", "1"])
def test_full_tiles_without_masks_keep_bits(B, H, G, D, T, P, zeros, fexp, monkeypatch):
    # block_rows4 leaves out the visibility masks of a tile whose keys are all visible to its four
    # rows (session 22) against the masks everywhere (CODESHELL_PREFILL_ATTN_FULL=0): a masked move
    # under an all-ones mask is the value itself, so the same bits; with prefixes (P > 0: whole
    # blocks before every query), R % 4 != 0 tiles (masked), and zero queries; with either softmax
    # (fexp: exp2_poly4, session 39, or exp16). Also, with exp16, the one-row softmax's bits
    # (CODESHELL_PREFILL_ATTN_R4=0).
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_FEXP", fexp)
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    if zeros:
        q = q * 0
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_FULL", "0")
    masked = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_FULL")
    full = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    assert torch.equal(full, masked)
    if fexp == "0":
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_R4", "0")
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), full)
    print(f"prefill_attention (avx512_bf16, 64-key tile, unmasked full tiles) B{B} H{H} G{G} D{D} T{T} P{P}: "
          "the masked tiles' bits")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (1, 8, 2, 128, 100, 0), (2, 4, 2, 64, 37, 5),
                                         (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0), (1, 4, 2, 96, 50, 3),
                                         (2, 8, 8, 32, 33, 0), (1, 1, 1, 32, 3, 130), (1, 8, 2, 128, 77, 64)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("fexp", ["0", "1"])
def test_row_groups_keep_bits(B, H, G, D, T, P, zeros, fexp, monkeypatch):
    # block_rows4's row groups (session 27: the score tiles of `group` rows, then their softmax, then
    # one value product over the group, so each key / value block streams from L2 once a group)
    # against four rows a group (CODESHELL_PREFILL_ATTN_GROUP=4, the kernel before): rows are
    # independent and each row's operations are the same, so the same bits for every group size,
    # also where a group or a tile is cut short by R (R = 4 x 25, 2 x 37, ..), with prefixes (whole
    # blocks before every query) and zero queries. Out-of-range values are clamped to 4..32. Either
    # softmax (fexp); the one-row softmax (exp16 only) with exp16.
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_FEXP", fexp)
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    if zeros:
        q = q * 0
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_GROUP", "4")
    four = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
    for group in ["", "8", "12", "16", "32", "1000"]:
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_GROUP", group)
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), four), group
    if fexp == "0":
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_R4", "0")  # the one-row softmax (no groups): the same bits
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), four)
    print(f"prefill_attention (64-key tile, row groups 8-32) B{B} H{H} G{G} D{D} T{T} P{P}: the 4-row groups' bits")


@needs_bf16
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (2, 4, 2, 64, 37, 5), (2, 4, 1, 256, 70, 20),
                                         (1, 4, 2, 96, 50, 3), (2, 8, 8, 32, 33, 0), (1, 1, 1, 32, 3, 130)])
@pytest.mark.parametrize("qscale", [0.0, 1.0, 30.0, 3000.0])
def test_rounding_and_dims_outside_keep_bits(B, H, G, D, T, P, qscale, monkeypatch):
    # Session 27's changes to the widened kernel against the kernel before them: the keys packed by
    # 16 x 16 transposes (CODESHELL_PREFILL_ATTN_KPACK=0: a value at a time; partial last blocks
    # zeroed past the keys, D = 32..256) and in the row groups
    # the probabilities' bf16 rounding by round_bf16_pos (CODESHELL_PREFILL_ATTN_ROUND=0: to_bf16 and
    # the widening back) and the value product dims outside (CODESHELL_PREFILL_ATTN_DOUT=1, off by default: rows
    # outside). The same bits, on zero queries (scores +-0), ordinary ones, and queries scaled so
    # that most probabilities of a row are denormal before the rounding (x - max below -87: flushed
    # to +0) or exp16's clamp (below -88), and the largest round up.
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    q = (q.float() * qscale).bfloat16()
    for key, old, new in (("CODESHELL_PREFILL_ATTN_ROUND", "0", "1"), ("CODESHELL_PREFILL_ATTN_DOUT", "0", "1"),
                          ("CODESHELL_PREFILL_ATTN_KPACK", "0", "1")):
        monkeypatch.setenv(key, old)
        before = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64)
        monkeypatch.setenv(key, new)
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), before), key
        monkeypatch.delenv(key)
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), before), key
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_WIDE", "0")  # the kernel before session 25's widening
    assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), 64), before)


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
@pytest.mark.parametrize("prepack", ["0", "1"])
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (3, 4, 2, 64, 37, 5), (2, 8, 8, 32, 200, 0),
                                         (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0)])
def test_costliest_items_first_keep_bits(B, H, G, D, T, P, kb, prepack, monkeypatch):
    # The work items claimed costliest first (session 27: the last query blocks of every (row, group)
    # first) against the (row, group, query block) order (CODESHELL_PREFILL_ATTN_ORDER=0): items are
    # independent and a key block shared by a (row, group)'s items holds the same keys whichever item
    # packs it, so the same bits; with and without the shared packing, several rows (one with a
    # shorter prefix) and on 1 and 2 threads.
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_PREPACK", prepack)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            monkeypatch.setenv("CODESHELL_PREFILL_ATTN_ORDER", "0")
            old = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb)
            monkeypatch.delenv("CODESHELL_PREFILL_ATTN_ORDER")
            assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb), old)
    finally:
        torch.set_num_threads(threads)


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
@pytest.mark.parametrize("prepack", ["0", "1"])
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (1, 8, 2, 128, 100, 0), (3, 4, 2, 64, 37, 5),
                                         (2, 4, 1, 256, 70, 20), (1, 4, 2, 96, 50, 3), (2, 8, 8, 32, 33, 0)])
def test_lean_setup_keeps_bits(B, H, G, D, T, P, kb, prepack, monkeypatch, record_property):
    # Each thread's scratch kept between calls (not a fresh zero-filled vector per chunk) and o not
    # zero-filled (the first key block's value sums start from zero: pv_chunk's `first`) against
    # the old setup (CODESHELL_PREFILL_ATTN_SETUP=0): the same bits, after a call that left NaN in
    # the kept scratch (NaN queries: scores, probabilities and o all NaN), so nothing reads a part
    # of the scratch it did not write.
    record_property("isa_path", "avx512_bf16 prefill attention (kept scratch, no o fill)")
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_PREPACK", prepack)
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_SETUP", "0")
    old = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_SETUP")
    assert torch.isnan(pa.prefill_attention(q * float("nan"), kc, vc, slots, pos, 1 / math.sqrt(D), kb)).all()
    new = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb)
    assert torch.equal(new, old)


@needs_bf16
@pytest.mark.parametrize("kb", pa.KEY_BLOCKS)
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (1, 8, 2, 128, 100, 0), (3, 4, 2, 64, 37, 5),
                                         (2, 4, 1, 256, 70, 20), (1, 4, 2, 96, 50, 3), (2, 8, 8, 32, 33, 0)])
def test_prepacked_key_blocks(B, H, G, D, T, P, kb, monkeypatch):
    # Each (row, group)'s key blocks packed once for all its query items (CODESHELL_PREFILL_ATTN_PREPACK,
    # on by default) against every item packing its own: the same values (keys past an item's last
    # query get probability 0 either way; equal also holds for -0 against +0), and NaN past each row's
    # last position is never read (the _case rows with a shorter prefix included).
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    for b in range(B):
        kc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
        vc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_PREPACK", "0")
    own = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb)
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_PREPACK")
    shared = pa.prefill_attention(q, kc, vc, slots, pos, 1 / math.sqrt(D), kb)
    assert not shared.isnan().any() and torch.equal(shared, own)
    print(f"prefill_attention (avx512_bf16, key block {kb}, blocks packed once per row and group) "
          f"B{B} H{H} G{G} D{D} T{T} P{P}: the per-item packing's values")
