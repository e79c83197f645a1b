"""The prefill attention on AMX-BF16 tiles (session 37; csrc/attention_prefill.cpp `run_item_amx`,
`prefill_attention.use_amx`): the default for 64-key blocks on an AMX CPU. Against fp32 attention
(as close as torch's own bf16 SDPA), keys past a position never read, a row independent of the batch
around it, the prepacked key blocks and the item order keeping its bits, the engine's prefill with it
against SDPA, and the switch that keeps the vdpbf16ps kernel."""

from __future__ import annotations

import math

import pytest
import torch

from codeshell.kernels import ISA_LEVELS, available, isa_level
from codeshell.kernels import prefill_attention as pa

from test_prefill_attention import _case, _check_against_fp32, engine_native_then_sdpa  # noqa: E402  (the same cases and checks)

needs_amx = pytest.mark.skipif(not available() or isa_level() < ISA_LEVELS.index("amx"),
                               reason="the AMX prefill attention needs the native kernels and AMX")


@pytest.fixture(autouse=True)
def _amx_kernel(monkeypatch):
    monkeypatch.delenv("CODESHELL_PREFILL_ATTN_AMX", raising=False)


@needs_amx
def test_the_switch_and_the_key_block_pick_the_kernel(monkeypatch):
    assert pa.use_amx(64) and not pa.use_amx(32) and not pa.use_amx(16)
    q, kc, vc, slots, pos = _case(1, 8, 2, 64, 90, 0)
    amx = pa.prefill_attention(q, kc, vc, slots, pos, 0.125)
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_AMX", "0")
    assert not pa.use_amx(64)
    dot = pa.prefill_attention(q, kc, vc, slots, pos, 0.125)
    assert not torch.equal(amx, dot)  # another kernel (other last bits) ran
    torch.testing.assert_close(amx.float(), dot.float(), rtol=2 ** -6, atol=2e-2)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_bf16")  # the ISA cap keeps the vdpbf16ps kernel
    assert not pa.use_amx(64)


@needs_amx
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 100, 0), (1, 32, 8, 128, 45, 300), (3, 4, 2, 64, 37, 5),
                                         (2, 8, 8, 64, 33, 0), (2, 4, 1, 256, 70, 20), (1, 2, 2, 64, 2, 0),
                                         (1, 8, 2, 32, 256, 0), (2, 4, 2, 32, 37, 9), (1, 4, 2, 96, 50, 3),
                                         (1, 8, 2, 128, 512, 0), (1, 4, 4, 32, 17, 64), (2, 6, 3, 160, 65, 1)])
def test_against_fp32_attention(B, H, G, D, T, P):
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    scale = 1 / math.sqrt(D)
    got = pa.prefill_attention(q, kc, vc, slots, pos, scale)
    _check_against_fp32(got, q, kc, vc, slots, pos, scale, f"amx, key block 64) B{B} H{H} G{G} D{D} T{T} P{P}")


@needs_amx
def test_keys_past_a_position_are_never_read():
    # NaN in every cache position past each row's last query and in the other slots: a kernel reading
    # any of them would return NaN (a probability of 0 times NaN is NaN in a tile too).
    for D, T, P in [(64, 40, 10), (32, 70, 0), (128, 100, 3)]:
        q, kc, vc, slots, pos = _case(2, 8, 2, D, T, P)
        for b in range(2):
            kc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
            vc[slots[b], :, int(pos[b].max()) + 1:] = float("nan")
        other = [s for s in range(kc.shape[0]) if s not in slots.tolist()]
        kc[other] = float("nan")
        vc[other] = float("nan")
        assert torch.isfinite(pa.prefill_attention(q, kc, vc, slots, pos, 0.125).float()).all()


@needs_amx
@pytest.mark.parametrize("D,T,P", [(128, 70, 6), (32, 300, 0), (64, 33, 64)])
def test_a_row_does_not_depend_on_the_batch_around_it(D, T, P):
    q, kc, vc, slots, pos = _case(2, 8, 2, D, T, P)
    both = pa.prefill_attention(q, kc, vc, slots, pos, 0.1)
    alone = pa.prefill_attention(q[1:], kc, vc, slots[1:], pos[1:], 0.1)
    assert torch.equal(both[1:], alone)
    first = pa.prefill_attention(q[:1], kc, vc, slots[:1], pos[:1], 0.1)
    assert torch.equal(both[:1], first)


@needs_amx
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 128, 200, 0), (2, 4, 2, 32, 77, 9), (1, 4, 1, 64, 40, 3),
                                         (1, 8, 2, 32, 512, 0), (2, 4, 2, 64, 100, 70)])
def test_prepack_threads_and_order_keep_bits(B, H, G, D, T, P, monkeypatch):
    # Key blocks packed once per (row, group) or per item, the items in either order, on 1 or 2
    # threads, full blocks with or without masks: each row's sums are the same sequence, so the same bits.
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    base = pa.prefill_attention(q, kc, vc, slots, pos, 0.1)
    # (and CODESHELL_PREFILL_ATTN_FULL=0: the masks on every block, also where all keys are visible)
    for env in ("CODESHELL_PREFILL_ATTN_PREPACK", "CODESHELL_PREFILL_ATTN_ORDER", "CODESHELL_PREFILL_ATTN_FULL"):
        monkeypatch.setenv(env, "0")
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 0.1), base), env
        monkeypatch.delenv(env)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(pa.prefill_attention(q, kc, vc, slots, pos, 0.1), base)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_a_query_alone_gets_its_bits_in_a_longer_prompt():
    # Query t's result depends on its own query and keys only: the same query as the last row of a
    # shorter call (the first t + 1 tokens) gives the same bits as in the whole prompt.
    q, kc, vc, slots, pos = _case(1, 8, 2, 64, 150, 0)
    whole = pa.prefill_attention(q, kc, vc, slots, pos, 0.1)
    for t in (1, 40, 63, 64, 100):
        part = pa.prefill_attention(q[:, :, :t + 1], kc, vc, slots, pos[:, :t + 1], 0.1)
        assert torch.equal(part, whole[:, :t + 1]), t


@needs_amx
def test_engine_prefill_matches_the_sdpa_path(monkeypatch):
    amx = []
    real = pa.use_amx
    monkeypatch.setattr(pa, "use_amx", lambda kb: amx.append(real(kb)) or amx[-1])
    native_masks, sdpa_masks = engine_native_then_sdpa(monkeypatch)
    assert amx and all(amx), "the AMX prefill attention did not run"
    assert not native_masks and sdpa_masks


@needs_amx
@pytest.mark.parametrize("B,H,G,D,T,P", [(1, 8, 2, 32, 256, 0), (2, 4, 2, 32, 37, 9), (1, 8, 2, 128, 512, 0),
                                         (2, 4, 1, 256, 70, 20), (1, 4, 4, 32, 17, 64)])
def test_the_softmax_exp_switch_both_against_fp32(B, H, G, D, T, P, monkeypatch):
    # Session 38: the AMX kernel's softmax takes exp2_poly4 on one fmsub of the raw score by default
    # (other last bits); CODESHELL_PREFILL_ATTN_FEXP=0 keeps exp16. Both as close to fp32 attention
    # as torch's own bf16 SDPA, and the switch runs another exp.
    q, kc, vc, slots, pos = _case(B, H, G, D, T, P)
    scale = 1 / math.sqrt(D)
    fast = pa.prefill_attention(q, kc, vc, slots, pos, scale)
    _check_against_fp32(fast, q, kc, vc, slots, pos, scale, f"amx, exp2_poly4) B{B} H{H} G{G} D{D} T{T} P{P}")
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_FEXP", "0")
    old = pa.prefill_attention(q, kc, vc, slots, pos, scale)
    _check_against_fp32(old, q, kc, vc, slots, pos, scale, f"amx, exp16) B{B} H{H} G{G} D{D} T{T} P{P}")
    assert not torch.equal(fast, old)
