"""int8 / int4 at M = 1 on the AVX2 level (`avx2:q8`): the thread split and the int8 M = 1 kernel's switches
change no bits (session 34 helper A).

Since session 34 the AVX2 M = 1 calls split a small weight's rows into one contiguous share a thread
(parallel.h parallel_owned: int8 up to kQ8SplitMaxBytes, int4 under kQ4SplitMaxBytes, as the VNNI CPUs did),
larger ones keep parallel_chunks; CODESHELL_Q8_M1_SPLIT / CODESHELL_Q4_M1_SPLIT = 0 / 1 force either. The int8
M = 1 kernel (csrc/q8_m1_avx2.h) also takes CODESHELL_Q8_AVX2_M1_MAX_MB (which weights it runs; above it
tile_q8) and CODESHELL_Q8_M1_PF / CODESHELL_Q8_M1_PFH (the prefetch's distance and hint). Each output is one
weight row's dot product in a fixed order whatever thread or chunk computes it, so every setting must give the
default's bits, at 2 threads (a real split) and 1; and M = 1 must keep the rows' bits of every batch M (the
batch row is checked against M = 1 here at M = 5; tests/kernels/test_q8_rows_avx2.py / test_q4_rows_avx2.py
check every M).
Runs at the avx2 level on any AVX2 CPU (CODESHELL_KERNEL_ISA=avx2 caps an AVX-512 one).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
AVX2 = ops.ISA_LEVELS.index("avx2")
SWITCHES = ("CODESHELL_Q8_M1_SPLIT", "CODESHELL_Q8_M1_SPLIT_MAX_MB", "CODESHELL_Q4_M1_SPLIT", "CODESHELL_Q8_AVX2_M1",
            "CODESHELL_Q8_AVX2_M1_MAX_MB", "CODESHELL_Q8_M1_PF", "CODESHELL_Q8_M1_PFH", "CODESHELL_Q8_AVX2_LANES")
SHAPES = [(1000, 1024), (77, 256), (264, 4096)]  # N not a multiple of the splits' 16-row alignment


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _case(n: int, k: int, kind: str):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    pw = quantize_int8(w) if kind == "int8" else quantize_int4(w, group_size=128)
    x = torch.randn(5, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    return pw, x, bias


def _call(mod, kind, pw, x, bias):
    if kind == "int8":
        return mod.decode_int8_q8(x, pw.data, pw.scales, bias, AVX2)
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, AVX2)


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_m1_switches_keep_bits(n, k, kind, monkeypatch, threads):
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    for var in SWITCHES:
        monkeypatch.delenv(var, raising=False)
    mod = _ext.get()
    pw, x, bias = _case(n, k, kind)
    assert ops.plan(pw, 1, torch.float32) == "avx2:q8"
    torch.set_num_threads(2)
    base = _call(mod, kind, pw, x[:1], bias)
    batch = _call(mod, kind, pw, x, bias)
    assert_rows_bitwise(batch[:1], base, f"{kind} {n}x{k}: M = 5's first row against M = 1")
    if kind == "int8":
        variants = [{"CODESHELL_Q8_M1_SPLIT": "0"}, {"CODESHELL_Q8_M1_SPLIT": "1"}, {"CODESHELL_Q8_M1_SPLIT_MAX_MB": "0"},
                    {"CODESHELL_Q8_AVX2_M1_MAX_MB": "0"}, {"CODESHELL_Q8_AVX2_M1": "0"},
                    {"CODESHELL_Q8_M1_PF": "0"}, {"CODESHELL_Q8_M1_PF": "8192"}]
        variants += [{"CODESHELL_Q8_M1_PFH": str(h)} for h in (1, 2, 3)]
    else:
        variants = [{"CODESHELL_Q4_M1_SPLIT": "0"}, {"CODESHELL_Q4_M1_SPLIT": "1"}]
    for t in (2, 1):
        torch.set_num_threads(t)
        for v in variants:
            for name, val in v.items():
                monkeypatch.setenv(name, val)
            got = _call(mod, kind, pw, x[:1], bias)
            for name in v:
                monkeypatch.delenv(name)
            assert_rows_bitwise(got, base, f"{kind} {n}x{k} threads={t} {v}")
