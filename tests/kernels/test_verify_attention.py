"""`packed_attention` (codeshell/kernels/attention.py): single queries of any KV-cache slots,
consecutive queries of one slot sharing their keys, must give each query exactly the bits of
`decode_attention` (plain decoding's kernel) on both of its paths (8-lane AVX2 and 16-lane
AVX-512 registers), for bf16 and fp32 caches, grouped-query shapes, draft lengths and cache
lengths around the kernels' block sizes."""

from __future__ import annotations

import pytest
import torch

from codeshell import kernels
from codeshell.kernels import ops
from codeshell.kernels.attention import packed_attention

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


def isas() -> list[int]:
    """The kernel's paths this CPU runs: AVX2 (0), and the 16-lane one from AVX512-VNNI (1) on."""
    return [0, 1] if kernels.available() and ops.isa_level() >= 1 else [0]


def case(dtype, H, G, D, runs, max_len=300, seed=0):
    """Caches [4, G, max_len, D] and queries for `runs` = [(slot, first position, queries)]:
    query j of a run is at position first + j and sees keys 0..first + j."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(4, G, max_len, D, generator=g).to(dtype)
    vc = torch.randn(4, G, max_len, D, generator=g).to(dtype)
    slots, lens = [], []
    for slot, p0, n in runs:
        slots += [slot] * n
        lens += range(p0 + 1, p0 + 1 + n)
    q = torch.randn(len(slots), H, 1, D, generator=g).to(dtype)
    return q, kc, vc, torch.tensor(slots), torch.tensor(lens)


def per_token(q, kc, vc, slots, lens, scale):
    """Plain decoding: one `decode_attention` call per query."""
    return torch.cat([kernels.decode_attention(q[i:i + 1], kc, vc, slots[i:i + 1], lens[i:i + 1], scale)
                      for i in range(q.shape[0])])


def reference(q, kc, vc, slots, lens, scale):
    out = []
    H, G = q.shape[1], kc.shape[1]
    for i in range(q.shape[0]):
        n = int(lens[i])
        k = kc[slots[i], :, :n].float().repeat_interleave(H // G, 0)  # [H, n, D]
        v = vc[slots[i], :, :n].float().repeat_interleave(H // G, 0)
        w = torch.softmax(q[i].float() @ k.transpose(1, 2) * scale, -1)   # [H, 1, n]
        out.append(w @ v)
    return torch.stack(out)


# runs around the block sizes (8 / 16 keys, 128-key fp32 blocks at D = 32): one-key caches,
# drafts of 0..12 tokens, a run crossing a block edge, the same slot twice, non-adjacent
RUNS = [(0, 0, 1), (1, 5, 9), (2, 14, 3), (3, 126, 13), (1, 120, 1), (2, 250, 49), (0, 31, 2), (3, 16, 1)]


@pytest.mark.parametrize("transposed", ["1", "0", "pairs off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,G,D", [(8, 2, 32), (12, 4, 64), (4, 1, 128), (6, 6, 16), (10, 2, 48), (4, 2, 24)])
def test_packed_attention_is_decode_attention_bitwise(dtype, H, G, D, transposed, monkeypatch):
    """Both layouts of a run's keys (CODESHELL_ATTN_RUN_T: the transposed keys and vertical sums of
    session 38 for bf16 at D % 32 == 0, or keys_paired + hsum8x16), and the transposed scores two heads
    at a time or one (CODESHELL_ATTN_RUN_T2; odd head counts per group included), give decode's bits."""
    monkeypatch.setenv("CODESHELL_ATTN_RUN_T", "1" if transposed == "pairs off" else transposed)
    monkeypatch.setenv("CODESHELL_ATTN_RUN_T2", "0" if transposed == "pairs off" else "1")
    q, kc, vc, slots, lens = case(dtype, H, G, D, RUNS)
    scale = D ** -0.5
    want = per_token(q, kc, vc, slots, lens, scale)
    for isa in isas():
        got = packed_attention(q, kc, vc, slots, lens, scale, isa=isa)
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.equal(got, want), f"isa {isa}: max diff {(got.float() - want.float()).abs().max()}"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(want.float(), reference(q, kc, vc, slots, lens, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("transposed", ["1", "0"])
@pytest.mark.parametrize("drafts", [0, 1, 2, 7, 15, 16, 17, 40])
@pytest.mark.parametrize("first", [0, 7, 15, 16, 127, 128, 200])
def test_one_sequence_and_its_drafts_at_many_lengths(drafts, first, transposed, monkeypatch):
    """A verify step of one sequence: its last token at `first` and `drafts` drafts after it."""
    monkeypatch.setenv("CODESHELL_ATTN_RUN_T", transposed)
    q, kc, vc, slots, lens = case(torch.bfloat16, 8, 2, 32, [(1, first, 1 + drafts)], max_len=first + drafts + 1,
                                  seed=first * 100 + drafts)
    want = per_token(q, kc, vc, slots, lens, 0.17)
    for isa in isas():
        assert torch.equal(packed_attention(q, kc, vc, slots, lens, 0.17, isa=isa), want)


def test_lens_need_not_be_consecutive_and_bad_arguments_raise():
    """A run is consecutive queries of one slot, whatever their lengths; bad slots/lengths
    are one clear error (the kernel's checks are decode_attention's)."""
    q, kc, vc, _, _ = case(torch.float32, 8, 2, 32, [(2, 0, 5)])
    slots, lens = torch.tensor([2, 2, 2, 2, 2]), torch.tensor([40, 3, 299, 17, 1])
    want = per_token(q, kc, vc, slots, lens, 0.3)
    for isa in isas():
        assert torch.equal(packed_attention(q, kc, vc, slots, lens, 0.3, isa=isa), want)
    with pytest.raises(RuntimeError, match="outside the cache"):
        packed_attention(q, kc, vc, slots, torch.tensor([1, 2, 3, 4, 301]), 0.3)
    with pytest.raises(RuntimeError, match="outside the cache"):
        packed_attention(q, kc, vc, torch.tensor([2, 2, 4, 2, 2]), lens, 0.3)
