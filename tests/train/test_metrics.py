"""train.metrics' MFU denominator: the matmul peak in the run's precision, and on a CPU in bf16 the
better of the bf16 and fp32 probes (a CPU without bf16 hardware emulates torch's bf16 matmul:
an AVX2-only AMD Zen 3 read a bf16 peak of ~0.02 TFLOP/s against ~0.15 fp32, and a tiny bf16
pretrain an MFU of 7.4)."""

from __future__ import annotations

import torch

from codeshell.train import metrics


def test_training_peak_takes_the_hardware_best_on_cpu(monkeypatch):
    probes = {torch.bfloat16: 2e10, torch.float32: 1.5e11}
    asked = []

    def fake(device, dtype, *a, **k):
        asked.append((device.type, dtype))
        return probes[dtype]

    monkeypatch.setattr(metrics, "measure_peak_flops", fake)
    monkeypatch.setattr(metrics, "bf16_matmul_rate", lambda device: 1e11)  # hardware bf16: the full probe runs
    assert metrics.training_peak_flops(torch.device("cpu"), "bf16") == 1.5e11
    assert metrics.training_peak_flops(torch.device("cpu"), "fp32") == 1.5e11
    # an accelerator keeps its bf16 peak (its bf16 units are the ones a bf16 run uses)
    assert metrics.training_peak_flops(torch.device("cuda"), "bf16") == 2e10
    assert ("cuda", torch.float32) not in asked
    probes[torch.bfloat16] = 4e11  # a CPU with bf16 hardware: the bf16 probe is the better one
    assert metrics.training_peak_flops(torch.device("cpu"), "bf16") == 4e11


def test_real_probe_is_positive_and_cached():
    metrics._PEAKS.clear()
    p = metrics.training_peak_flops(torch.device("cpu"), "bf16")
    assert p > 0 and (("cpu", torch.float32) in {(d, t) for d, t in metrics._PEAKS})


def test_emulated_bf16_skips_the_full_bf16_probe(monkeypatch):
    # torch's emulated bf16 matmul (no AVX512-BF16 / AMX) reads ~1 GFLOP/s: the 2048 probe would
    # take ~90 s and lose to fp32 anyway, so the quick look decides and the bf16 probe never runs
    asked = []

    def fake(device, dtype, *a, **k):
        asked.append(dtype)
        return {torch.bfloat16: 1e9, torch.float32: 1.5e11}[dtype]

    monkeypatch.setattr(metrics, "measure_peak_flops", fake)
    monkeypatch.setattr(metrics, "bf16_matmul_rate", lambda device: 1.2e9)
    assert metrics.training_peak_flops(torch.device("cpu"), "bf16") == 1.5e11
    assert asked == [torch.float32]


def test_quick_bf16_look_is_a_real_positive_rate():
    assert metrics.bf16_matmul_rate(torch.device("cpu"), n=64) > 0
