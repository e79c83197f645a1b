"""The AVX2 prompt attention with 8 queries in lanes (`codeshell.kernels.prefill_attention.prefill_attention_lanes`,
csrc/attention_prefill.cpp's AVX2 section): every query's output row must be, bit for bit, what decode's
kernel (`decode_attention`: one query, its own keys 0..position) gives that query alone -- the engine's
prefill / decode bit tests (tests/engine/test_prefill_decode_bits.py, test_prefill_last_rows.py) rely on
it on AVX2. Shapes: grouped heads 8/2, 4/2, 3/1, 2/2, 8/4 (each score tile form), head dims 32 / 64 /
128, prompts of 1-70 tokens and a long one, rows padded after a prefix, non-consecutive slots, keys past
a row's last position NaN (never read), peaked scores (exp underflow), and the engine's dispatch
(`CacheView.attend` with CODESHELL_PREFILL_ATTN_LANES on and off)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from codeshell.kernels import ISA_LEVELS, available, isa_level
from codeshell.kernels import ops
from codeshell.kernels import prefill_attention as pa


def _avx2() -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return {"avx2", "fma"} <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


needs_avx2 = pytest.mark.skipif(not (_avx2() and available()), reason="the lanes kernel needs AVX2 + FMA and the native kernels")


def _case(B, H, G, D, T, P, seed=0, qscale=2.0):
    """q [B, H, T, D] as the model makes it (a view of the qkv rows), caches with 2 spare slots whose
    positions past each row's last one are NaN, slots not consecutive; row b at positions P..P+T-1,
    row 1 (when B > 1) at P // 2.. (a shorter prefix: a padded batch's row), row 2 at 0.."""
    g = torch.Generator().manual_seed(seed)
    S = P + T
    kc = torch.full((B + 2, G, S + 9, D), float("nan")).to(torch.bfloat16)
    vc = torch.full((B + 2, G, S + 9, D), float("nan")).to(torch.bfloat16)
    q = (torch.randn(B, T, H + 2 * G, D, generator=g) * qscale).to(torch.bfloat16).transpose(1, 2)[:, :H]
    slots = torch.tensor([2 * b + 1 for b in range(B)]) % (B + 2)
    pos = torch.arange(P, S).repeat(B, 1)
    if B > 1:
        pos[1] = torch.arange(T) + P // 2
    if B > 2:
        pos[2] = torch.arange(T)
    for b in range(B):
        n = int(pos[b].max()) + 1
        kc[slots[b], :, :n] = torch.randn(G, n, D, generator=g).to(torch.bfloat16)
        vc[slots[b], :, :n] = torch.randn(G, n, D, generator=g).to(torch.bfloat16)
    return q, kc, vc, slots, pos


def _decode(q, kc, vc, slots, pos, scale):
    """Each query alone through decode's kernel: [B, T, H, D]."""
    B, H, T, D = q.shape
    qt = q.transpose(1, 2).reshape(B * T, H, 1, D).contiguous()
    y = ops.decode_attention(qt, kc, vc, slots.repeat_interleave(T), (pos + 1).reshape(-1), scale)
    return y.view(B, T, H, D)


def _check(q, kc, vc, slots, pos, what):
    D = q.shape[3]
    scale = 1 / math.sqrt(D)
    got = pa.prefill_attention_lanes(q, kc, vc, slots, pos, scale)
    want = _decode(q, kc, vc, slots, pos, scale)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    bad = (got.view(torch.int16) != want.view(torch.int16)).any(dim=-1)  # [B, T, H]
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} (row, query, head) differ from "
                                 f"decode's bits, first at {bad.nonzero()[0].tolist()}; max |diff| "
                                 f"{(got.float() - want.float()).abs().max().item():.3e}")


@needs_avx2
@pytest.mark.parametrize("H,G", [(8, 2), (4, 2), (3, 1), (2, 2), (8, 4)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 70])
def test_bits_as_decode(H, G, D, T):
    q, kc, vc, slots, pos = _case(1, H, G, D, T, 0, seed=T)
    _check(q, kc, vc, slots, pos, f"H{H} G{G} D{D} T{T}")


@needs_avx2
@pytest.mark.parametrize("B,H,G,D,T,P", [(3, 8, 2, 32, 37, 9), (3, 4, 2, 64, 21, 13), (2, 3, 1, 128, 19, 40),
                                         (3, 2, 2, 32, 70, 5), (2, 8, 4, 64, 12, 100), (1, 8, 2, 32, 600, 0),
                                         (1, 4, 2, 128, 300, 211)])
def test_bits_padded_rows_and_prefix(B, H, G, D, T, P):
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P, seed=B * 1000 + T)
    _check(q, kc, vc, slots, pos, f"B{B} H{H} G{G} D{D} T{T} P{P}")


@needs_avx2
@pytest.mark.parametrize("qscale", [0.05, 30.0])
def test_bits_flat_and_peaked_scores(qscale):
    # near-uniform probabilities and peaked ones (most exps 0: exp8's underflow, the sums' order)
    q, kc, vc, slots, pos = _case(2, 8, 2, 32, 45, 3, seed=7, qscale=qscale)
    _check(q, kc, vc, slots, pos, f"q x {qscale}")


@needs_avx2
def test_bits_any_positions():
    # queries of one item with unrelated lengths (not a prompt's consecutive positions): each lane its own keys
    q, kc, vc, slots, pos = _case(2, 8, 2, 32, 19, 60, seed=3)
    g = torch.Generator().manual_seed(5)
    pos = torch.stack([torch.randperm(79, generator=g)[:19] for _ in range(2)])
    pos[1] = pos[1].clamp(max=30 + 19 - 1)  # row 1's keys are stored up to 30 + 18
    _check(q, kc, vc, slots, pos, "shuffled positions")


@needs_avx2
def test_rejects_bad_arguments():
    q, kc, vc, slots, pos = _case(1, 8, 2, 32, 5, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa.prefill_attention_lanes(q, kc, vc, slots, pos + 100, 0.1)
    q2, kc2, vc2, _, _ = _case(1, 4, 2, 40, 5, 0)  # D % 16 != 0: decode's scalar path, not this kernel's
    with pytest.raises(RuntimeError, match="multiple of 16"):
        pa.prefill_attention_lanes(q2, kc2, vc2, slots, pos, 0.1)


@needs_avx2
@pytest.mark.skipif(not available() or isa_level() != ISA_LEVELS.index("avx2"),
                    reason="the engine dispatches to the lanes kernel at the AVX2 level only")
def test_engine_dispatch_switch(monkeypatch):
    # CacheView.attend (engine/kv_cache.py) with the lanes kernel and with decode's kernel per query
    # (CODESHELL_PREFILL_ATTN_LANES=0): the same bits, and the lanes kernel is what runs by default.
    from codeshell.config import CodeShellConfig
    from codeshell.engine.kv_cache import KVCache
    H, G, D, T = 8, 2, 32, 40
    cfg = CodeShellConfig(n_layer=1, n_embd=H * D, n_head=H, num_query_groups=G, n_positions=64, vocab_size=64)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, T, H + 2 * G, D, generator=g).bfloat16().transpose(1, 2)
    q, k, v = qkv[:, :H], qkv[:, H:H + G], qkv[:, H + G:]
    pos = torch.stack([torch.arange(T) + 3, torch.arange(T)])
    calls = []
    real = pa.prefill_attention_lanes
    monkeypatch.setattr(pa, "prefill_attention_lanes", lambda *a: calls.append(1) or real(*a))
    prefix_k, prefix_v = torch.randn(2, 1, 3, G, 64, D, generator=g).bfloat16()  # row 0's prefix: positions 0..2
    out = {}
    for lanes in ("1", "0"):
        monkeypatch.setenv("CODESHELL_PREFILL_ATTN_LANES", lanes)
        cache = KVCache(cfg, 3, 64, torch.bfloat16)
        cache.k.copy_(prefix_k)
        cache.v.copy_(prefix_v)
        out[lanes] = cache.view([2, 0], pos).attend(0, q, k, v, D ** -0.5)
        assert len(calls) == 1  # the lanes kernel with the switch on, not with it off
    assert torch.equal(out["1"].view(torch.int16), out["0"].view(torch.int16))
