"""The loops that the native decode step's thread team splits since session 17 (docs/kernels-log.md,
"Session 17, helper C"): inside the team (`run_in_team`, csrc/step_bind.cpp: the calling
thread as the team's master, as in a step with CODESHELL_DECODE_TEAM=on) a few LayerNorm rows
(fused.cpp for_rows: chunks of >= 2048 values), GELU row pieces of 1024 values (for_pieces), a batch-1 row of >= 16384
logits cut into segments (sampling.cpp argmax_rows_of) go to the helper threads. Each must give exactly
the bits of the same call outside the team; each case also checks that the call posted loops
to the helpers (the split path ran)."""

from __future__ import annotations

import pytest
import torch

from codeshell import kernels
from codeshell.engine.sampling import first_argmax
from codeshell.kernels import _ext, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


@pytest.fixture
def mod():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the team needs 2 threads (the CI machine's count may be 1)
    yield _ext.get()
    torch.set_num_threads(before)


def in_team(mod, fn):
    """(fn's result, loops posted to the helpers) inside the team."""
    out = mod.run_in_team(fn)
    assert out is not False, "no thread team (another thread holds it?)"
    return out


def _equal(a, b):
    if isinstance(a, (list, tuple)):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("rows,C", [(8, 1024), (2, 4096), (5, 256), (8, 1000), (8, 256), (3, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_rows_in_team(mod, rows, C, dtype):
    g = torch.Generator().manual_seed(rows * C)
    x = torch.randn(rows, C, generator=g).to(dtype)
    r = torch.randn(rows, C, generator=g)  # a linear's fp32 output
    w, b = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    want = mod.fused_add_layer_norm(x, r, w, b, 1e-5)
    got, loops = in_team(mod, lambda: mod.fused_add_layer_norm(x, r, w, b, 1e-5))
    assert _equal(got, want)
    assert (loops >= 1) == (rows * C >= 4096)  # split from 2 items of 2048 values


@pytest.mark.parametrize("rows,N", [(1, 4096), (8, 4096), (3, 1030), (1, 1024), (2, 4000)])
@pytest.mark.parametrize("src", ["f32", "bf16", "f32->bf16"])
def test_gelu_pieces_in_team(mod, rows, N, src, monkeypatch):
    g = torch.Generator().manual_seed(rows * N)
    v = torch.randn(rows, N, generator=g) * 3
    bias = torch.randn(N, generator=g)
    if src == "bf16":
        v = v.to(torch.bfloat16)
    out_bf16 = src != "f32"
    for cap in (["avx2", None] if ops.isa_level() >= 1 else ["avx2"]):  # the 8- and 16-lane GELU
        if cap:
            monkeypatch.setenv("CODESHELL_KERNEL_ISA", cap)
        else:
            monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
        for bb in (None, bias):
            want = mod.fused_gelu_tanh(v, bb, out_bf16)
            got, loops = in_team(mod, lambda: mod.fused_gelu_tanh(v, bb, out_bf16))
            assert torch.equal(got, want)
            assert (loops >= 1) == (rows * N >= 2048)


def _logit_rows(V, seed):
    """fp32 rows [1..3, V]: random, a bf16 tie (a later larger fp32 value of the same bf16) across
    a segment edge, the maximum in the scalar tail, -inf and NaN rows (NaN: the serial pass)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(1, V, generator=g) * 8, torch.randn(1, V, generator=g)]
    one = torch.tensor(1.0).view(torch.int32)
    t = torch.randn(1, V, generator=g)
    t[0, 9000] = (one + 1).view(torch.float32) * 30   # rounds to 30 in bf16
    t[0, V - 5000] = (one + 3).view(torch.float32) * 30  # larger in fp32, same bf16: 9000 wins
    out.append(t)
    t = torch.randn(1, V, generator=g)
    t[0, V - 1] = 50.0
    out.append(t)
    out.append(torch.full((1, V), float("-inf")))
    t = torch.randn(1, V, generator=g)
    t[0, 3] = float("nan")
    out.append(t)
    t = torch.randn(1, V, generator=g)
    t[0, V // 2] = 0.0
    t.clamp_(max=0.0)
    t[0, V // 3] = -0.0  # +0 and -0 tie: the first wins
    out.append(t)
    return out


@pytest.mark.parametrize("V", [16384, 70144, 70141, 40000])
def test_argmax_segments_in_team(mod, V):
    for x in _logit_rows(V, V):
        want = mod.argmax_rows_rounded(x)
        got, loops = in_team(mod, lambda: mod.argmax_rows_rounded(x))
        assert got.tolist() == want.tolist() == first_argmax(x.to(torch.bfloat16)).tolist()
        assert loops >= 1  # one row of >= 16384 values with 2 threads: segments
        b = x.to(torch.bfloat16)
        got_b, loops = in_team(mod, lambda: mod.argmax_rows(b))
        assert got_b.tolist() == mod.argmax_rows(b).tolist() and loops >= 1
    two = torch.cat(_logit_rows(V, V + 1)[:2])  # rows >= threads: a row a chunk, as outside
    assert in_team(mod, lambda: mod.argmax_rows_rounded(two))[0].tolist() == mod.argmax_rows_rounded(two).tolist()



@pytest.mark.parametrize("V", [16384, 70144, 16390, 9998])
def test_argmax_raw_rows_in_team(mod, V, monkeypatch):
    """argmax_rows_rounded at rows >= threads in the team (a row a chunk, session 28's raw-max passes)
    against the rounding passes (CODESHELL_ARGMAX_RAW=0), outside the team and first_argmax of the
    bf16 rows: ties after rounding far apart (the earlier, smaller fp32 value wins), the maximum in
    the tail, -0 / +0, -inf rows and a NaN row among 8."""
    rows = torch.cat(_logit_rows(V, V + 2) + _logit_rows(V, V + 3)[:2])
    one = torch.tensor(1.0).view(torch.int32)
    t = torch.randn(2, V, generator=torch.Generator().manual_seed(V))
    t[0, 17] = (one + 1).view(torch.float32) * 40
    t[0, V - 3] = (one + 5).view(torch.float32) * 40  # larger fp32, the same bf16: 17 wins
    t[1].clamp_(max=-1.0)
    t[1, V // 2 + 1], t[1, V // 3] = 0.0, -0.0
    rows = torch.cat([rows, t]).contiguous()
    want = first_argmax(rows.to(torch.bfloat16)).tolist()
    assert mod.argmax_rows_rounded(rows).tolist() == want
    for sw in ("1", "0"):
        monkeypatch.setenv("CODESHELL_ARGMAX_RAW", sw)
        got, loops = in_team(mod, lambda: mod.argmax_rows_rounded(rows))
        assert got.tolist() == want, f"CODESHELL_ARGMAX_RAW={sw}"
        assert loops >= 1
