"""The prompt FLOP count and the bf16 matmul peak that `benchmarks/bench_quant.py` reports its
prompt speed against (`codeshell.bench.prompt_flops`, `bf16_matmul_peak`), and the bytes a decode
step reads that the decode bound divides the bandwidth by (`weight_bytes_per_token`)."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from codeshell import LLM
from codeshell.bench import best_peaks, bf16_matmul_peak, prompt_flops, weight_bytes_per_token
from codeshell.config import CodeShellConfig
from codeshell.model import CodeShellForCausalLM

CFG = CodeShellConfig(vocab_size=512, n_embd=64, n_layer=3, n_head=4, num_query_groups=2, n_inner=160)


def test_prompt_flops_agrees_with_torch_flop_counter():
    # torch's own counter over a training-path forward (plain F.linear): it counts the head at
    # every position, where a prefill needs the last position's. It does not see the CPU SDPA
    # kernel, so attention is counted on its matmul form (q @ k^T, then p @ v, per head) and
    # halved: a causal prefill computes the lower triangle.
    T = 24
    model = CodeShellForCausalLM(CFG)
    ids = torch.randint(0, CFG.vocab_size, (1, T))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    linears_and_heads = counter.get_total_flops()
    H, D = CFG.n_head, CFG.head_dim
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    attention = CFG.n_layer * counter.get_total_flops() // 2
    head_rows_not_needed = 2 * (T - 1) * CFG.vocab_size * CFG.n_embd
    whole = linears_and_heads - head_rows_not_needed + attention
    assert prompt_flops(CFG, T, last_rows=False) == whole
    # the engine's prefill (default): the last block past its keys and values on the sampled row
    # only, counted from torch's counter over that block's three linears at T - 1 rows and the
    # attention of one query over T keys (QK^T and PV: q [1, H, 1, D] against [1, H, T, D])
    block = model.transformer.h[-1]
    x = torch.randn(T - 1, CFG.n_embd)
    with FlopCounterMode(display=False) as counter:
        block.attn.c_proj(x), block.mlp.c_proj(block.mlp.c_fc(x))
    rows_not_needed = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2), -1) @ v
    one_query = counter.get_total_flops()
    assert prompt_flops(CFG, T) == whole - rows_not_needed - (attention // CFG.n_layer - one_query)


def test_bf16_matmul_peak_is_the_best_measured_figure():
    peak = bf16_matmul_peak(16, CFG, repeats=1)
    assert peak["torch"] > 0
    assert peak["peak"] == max(v for k, v in peak.items() if k != "peak")


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_per_token_counts_what_decode_reads(tied):
    # Every weight once (a tied embedding is the head, read whole); an untied embedding is only
    # looked up. The kernels' packed layouts (bf16 panels, the tied head's PackedEmbedding) hold
    # the same values at these widths (multiples of 32), so packing must not change the count.
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    model = CodeShellForCausalLM(cfg).to(torch.bfloat16)
    expected = sum(p.numel() * 2 for p in model.parameters())  # parameters() yields a tied one once
    if not tied:
        expected -= cfg.vocab_size * cfg.n_embd * 2
    assert weight_bytes_per_token(model) == expected
    llm = LLM.from_model(model, cfg, max_batch=1)
    assert weight_bytes_per_token(llm.model) == expected


def test_read_stream_reads_every_byte():
    # The bandwidth probe's native read (`read_stream`) must touch every word of the buffer on all
    # threads: its result is the OR of all 64-bit words, so one set bit anywhere shows.
    from codeshell.kernels import _ext
    mod = _ext.get()
    if mod is None:
        pytest.skip("native kernels unavailable")
    buf = torch.zeros(1 << 20, dtype=torch.uint8)
    assert mod.read_stream(buf, 2) == 0
    for pos in (0, 77, (1 << 19) + 5, (1 << 20) - 1):
        buf.zero_()
        buf[pos] = 1 << (pos % 8)
        for pf in (2048, 0, 512):  # the prefetching loop, the one without (session 39), another distance
            assert mod.read_stream(buf, 1, pf) % (1 << 64) == 1 << (8 * (pos % 8) + pos % 8), (pos, pf)  # int64 -> its bits
    with pytest.raises(RuntimeError, match="multiple of 128 bytes"):
        mod.read_stream(torch.zeros(100, dtype=torch.uint8), 1)


def test_read_bandwidth_takes_the_faster_probe(monkeypatch):
    # The figure is the better of torch's sum and the native read: with the sum made slow (a
    # 50 ms sleep per call: under 0.45 GB/s for this buffer), the native read still gives more
    # than twice that (a 20 MiB read in under 21 ms: met with room at nice 19 on a busy machine).
    import time as _time

    from codeshell.bench import read_bandwidth_gbs
    from codeshell.kernels import _ext
    if _ext.get() is None:
        pytest.skip("native kernels unavailable")
    real_sum = torch.Tensor.sum

    def slow_sum(self, *a, **k):
        _time.sleep(0.05)
        return real_sum(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "sum", slow_sum)
    assert read_bandwidth_gbs(gib=0.02, repeats=2) > 1.0


def test_bench_quant_1p7b_shape_is_bench_serves():
    # bench_quant --shape 1.7b times the served 1.7B model's decode (8 layers of CodeShell-7B's width)
    import importlib.util
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
    mods = {}
    for name in ("bench_quant", "bench_serve"):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    cfg = mods["bench_quant"].shape_config("1.7b")
    want = {k: v for k, v in mods["bench_serve"].SHAPES["1.7b"].items() if k != "n_positions"}
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.vocab_size == 70144


def test_best_peaks_takes_each_candidates_best_probe():
    # bench_quant measures the peak before and after its formats; a slow minute in one probe
    # must not lower the denominator (it would flatter the prompt's % of peak)
    nan = float("nan")
    before = {"torch": 0.06, "torch_fp32": 0.26, "fma_kernel": 0.23, "dot_kernel": nan, "peak": 0.26}
    after = {"torch": 0.05, "torch_fp32": 0.25, "fma_kernel": 0.33, "dot_kernel": nan, "peak": 0.33}
    got = best_peaks(before, after)
    assert got["fma_kernel"] == 0.33 and got["torch"] == 0.06 and got["torch_fp32"] == 0.26
    assert got["peak"] == 0.33 and "dot_kernel" not in got
    assert best_peaks(before) == {k: v for k, v in before.items() if v == v}
