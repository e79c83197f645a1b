"""Weights, KV cache and the read probe on transparent huge pages (codeshell/kernels/hugepages.py):
the tensors hold what they should, small ones stay on torch's allocator (256 KiB..2 MiB share chunks), the kernel really backs
an advised tensor with huge pages where the machine offers them, and a model's output does not
change."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from codeshell.kernels import hugepages, prepack

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapped(t: torch.Tensor) -> bool:
    return not t.untyped_storage().resizable()  # torch.frombuffer over the mapping


def _anon_huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds t's first byte (/proc/self/smaps)."""
    addr, found = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            found = lo <= addr < hi
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_big_tensors_are_mapped_small_ones_are_not():
    big = hugepages.empty((1024, 4096), torch.bfloat16)
    assert big.shape == (1024, 4096) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert _mapped(big) and big.data_ptr() % 64 == 0
    small = hugepages.empty((16, 16), torch.float32)
    assert not _mapped(small)


def test_resident_copies_exactly_and_outlives_its_views():
    src = torch.randn(2048, 1024)
    out = hugepages.resident(src)
    assert _mapped(out) and torch.equal(out, src) and out.data_ptr() != src.data_ptr()
    view = out[5:7]
    expect = src[5:7].clone()
    del out
    torch.randn(4096, 1024)  # reuse of freed memory would show in the view
    assert torch.equal(view, expect)
    tiny = torch.randn(8, 8)
    assert hugepages.resident(tiny) is tiny


def test_off_switch(monkeypatch):
    monkeypatch.setenv("CODESHELL_HUGE_PAGES", "0")
    assert not _mapped(hugepages.empty((1024, 4096), torch.bfloat16))
    src = torch.randn(2048, 1024)
    assert hugepages.resident(src) is src


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_the_kernel_backs_an_advised_tensor_with_huge_pages():
    t = hugepages.empty((32 << 20,), torch.uint8)  # 32 MiB: several aligned 2 MiB pages inside
    t.fill_(1)
    kb = _anon_huge_kb(t)
    print(f"AnonHugePages of a 32 MiB tensor: {kb} kB (THP: {THP.read_text().strip()})")
    assert kb >= 2048


def _anon_kb(t: torch.Tensor, field: str) -> int:
    """`field` (kB) summed over the mappings that overlap t's bytes (/proc/self/smaps)."""
    lo_t, hi_t = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < hi_t and lo_t < hi
        elif inside and line.startswith(field + ":"):
            total += int(line.split()[1])
    return total


def test_tensors_start_on_a_huge_page_boundary(monkeypatch):
    # 2 MiB and up: the tensor starts at a 2 MiB boundary of its (over-sized) mapping, so its
    # whole 2 MiB ranges can be huge pages (the small shape's 3.1 MiB c_attn got none when it
    # started at its mapping's 4 KiB-aligned start); below 2 MiB torch's allocator as before.
    for mib in (2, 2.1, 3.15, 8.4):
        n = int(mib * (1 << 20)) // 2
        t = hugepages.empty((n,), torch.bfloat16)
        assert _mapped(t) and t.shape == (n,) and t.data_ptr() % hugepages.HUGE == 0
        assert t.untyped_storage().nbytes() == 2 * n  # the storage is the tensor, not the padding
    monkeypatch.setenv("CODESHELL_HUGE_ARENA", "0")  # below 2 MiB: torch's allocator without the arena
    assert not _mapped(hugepages.empty(((1 << 20) - 8,), torch.bfloat16))
    monkeypatch.delenv("CODESHELL_HUGE_ARENA")
    src = torch.randn(int(3.15 * (1 << 20)) // 4)
    out = hugepages.resident(src)
    assert out.data_ptr() % hugepages.HUGE == 0 and torch.equal(out, src)
    monkeypatch.setattr(hugepages, "ALIGN", False)  # the old placement: at the mapping's start
    t = hugepages.empty((3 << 20,), torch.uint8)
    assert _mapped(t) and t.data_ptr() % mmap.PAGESIZE == 0


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_3_mib_tensor_gets_a_huge_page_and_no_padding_in_memory():
    t = hugepages.empty((int(3.15 * (1 << 20)),), torch.uint8)
    t.fill_(1)
    huge, rss = _anon_kb(t, "AnonHugePages"), _anon_kb(t, "Rss")
    print(f"3.15 MiB tensor: AnonHugePages {huge} kB, Rss {rss} kB")
    assert huge >= 2048
    # only the tensor's own range is advised: its 1.15 MiB tail stays on 4 KiB pages, so the
    # mapping holds no more than the tensor (rounded to 4 KiB) -- not a second whole huge page
    assert rss <= (t.numel() + 4095) // 4096 * 4
    assert bool((t == 1).all())


def test_packed_weights_use_it(monkeypatch):
    # A model's big packed weights land on the mappings (the KV cache does not: faulted in by the
    # first requests, its huge pages would cost them the host's backing in a VM); with the switch
    # off the same model gives the same tokens (placement changes no arithmetic).
    from codeshell import LLM, SamplingParams, kernels
    from codeshell.bench import random_model
    from codeshell.config import CodeShellConfig
    if not kernels.available():
        pytest.skip("native kernels unavailable: bf16 weights are not packed")
    cfg = CodeShellConfig(vocab_size=4096, n_embd=512, n_layer=2, n_head=4, num_query_groups=2, n_inner=4096,
                          n_positions=2048)

    def run():
        torch.manual_seed(0)
        llm = LLM.from_model(random_model(cfg, torch.bfloat16), cfg, max_batch=2)
        out = llm.generate([{"prompt_token_ids": list(range(1, 40))}],
                           SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        return llm, out[0].outputs[0].token_ids

    llm, on = run()
    fc = llm.model.transformer.h[0].mlp.c_fc  # 4096 x 512 bf16 = 4 MiB of panels
    assert _mapped(fc.data)
    assert not _mapped(llm.engine.cache.k)
    monkeypatch.setenv("CODESHELL_HUGE_PAGES", "0")
    llm_off, off = run()
    assert not _mapped(llm_off.model.transformer.h[0].mlp.c_fc.data)
    assert on == off


def test_quantized_linears_keep_their_kernel_tensors_there():
    # int8: qweight itself is what the kernels read (shared, not copied); int4: the repacked nibbles.
    from codeshell import kernels
    from codeshell.quant.linear import Int4Linear, Int8Linear
    if not kernels.available():
        pytest.skip("native kernels unavailable: no kernel layouts are built")
    w = torch.randn(2048, 4096) * 0.02
    x = torch.randn(3, 4096)
    q8 = Int8Linear.from_float(w, None)
    assert _mapped(q8.qweight) and q8._kernel.data.data_ptr() == q8.qweight.data_ptr()
    q4 = Int4Linear.from_float(w, None, group_size=128)
    assert _mapped(q4._kernel.data)
    for lin in (q8, q4):
        ref = x @ lin._kernel.dequantize().T  # the kernels round x to int8 per block: loose bounds
        torch.testing.assert_close(lin(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_tensors_under_2_mib_share_huge_page_chunks(monkeypatch):
    # session 18: 256 KiB .. 2 MiB (the small shape's c_attn / attn.c_proj) go to shared chunks of
    # huge pages, each at a 4 KiB boundary; below 256 KiB, or with CODESHELL_HUGE_ARENA=0, torch's allocator
    monkeypatch.delenv("CODESHELL_HUGE_ARENA", raising=False)
    srcs = [torch.randn(n) for n in (300_000, 262_144 // 4, 500_001, (2 << 20) // 4 - 1)]
    outs = [hugepages.resident(s) for s in srcs]
    for s, o in zip(srcs, outs):
        assert _mapped(o) and o.data_ptr() % mmap.PAGESIZE == 0 and torch.equal(o, s) and o.is_contiguous()
        assert o.untyped_storage().nbytes() == s.numel() * 4  # the tensor's bytes, not the chunk's
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * 4) for o in outs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    view, expect = outs[0][10:20], srcs[0][10:20].clone()
    del outs
    torch.randn(1 << 20)
    assert torch.equal(view, expect)  # a view keeps its chunk alive
    assert not _mapped(hugepages.resident(torch.randn(1000)))
    monkeypatch.setenv("CODESHELL_HUGE_ARENA", "0")
    small = torch.randn(300_000)
    assert hugepages.resident(small) is small


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_a_chunk_of_small_tensors_is_backed_by_huge_pages(monkeypatch):
    monkeypatch.delenv("CODESHELL_HUGE_ARENA", raising=False)
    monkeypatch.setattr(hugepages, "_arena_state", [])  # a fresh chunk for this test
    ts = [hugepages.empty((1 << 20,), torch.uint8) for _ in range(6)]  # 6 x 1 MiB in one chunk
    for t in ts:
        t.fill_(3)
    kb = _anon_huge_kb(ts[0])
    print(f"AnonHugePages of a chunk holding six 1 MiB tensors: {kb} kB")
    assert kb >= 2048 and all(bool((t == 3).all()) for t in ts)


def test_arena_floor_switch(monkeypatch):
    # session 35: CODESHELL_HUGE_ARENA_MIN (bytes) moves the arena's floor (ARENA_MIN_BYTES by default,
    # for the A/B of mini's 64-256 KiB linears on huge pages); a bad value is one clear ValueError
    monkeypatch.delenv("CODESHELL_HUGE_ARENA", raising=False)
    monkeypatch.delenv("CODESHELL_HUGE_ARENA_MIN", raising=False)
    src = torch.randn(16_384)  # 64 KiB
    assert hugepages.arena_min_bytes() == hugepages.ARENA_MIN_BYTES
    assert hugepages.resident(src) is src
    monkeypatch.setenv("CODESHELL_HUGE_ARENA_MIN", "4096")
    out = hugepages.resident(src)
    assert _mapped(out) and torch.equal(out, src) and out.data_ptr() % mmap.PAGESIZE == 0
    tiny = torch.randn(100)
    assert hugepages.resident(tiny) is tiny
    for bad in ("-1", "lots"):
        monkeypatch.setenv("CODESHELL_HUGE_ARENA_MIN", bad)
        with pytest.raises(ValueError, match="CODESHELL_HUGE_ARENA_MIN"):
            hugepages.resident(src)
