"""Session 38 helper B: batched decode rows (M = 2..16) on AMX CPUs.

bf16 (`amx:bf16`, panel_bf16_amx_rows.h `decode_amx_rows`): M rows of x on M-row A / C tiles, x read in
place (K % 32 == 0) or the first M rows of pack_a's tiles (else), the tile configuration loaded once a
thread and call, on owned shares or chunks (CODESHELL_AMX_BF16_ROWS_SPLIT); CODESHELL_AMX_BF16_ROWS=0:
decode_amx's 16-row tiles as before.

Checked, at 1 and 2 threads: the switch on and off give the same bits at every M = 2..16 (with and without
a bias, N ending in a partial panel, K not a multiple of 32); each row of every M is bit for bit that row
alone at M = 1 (row invariance: docs/kernels.md "Row invariance"); and the reference within tolerance.
The lower ISA levels keep their paths (CODESHELL_KERNEL_ISA caps): checked to give the reference there."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, prepack
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1


def _amx(monkeypatch):
    if LEVEL < ops.ISA_LEVELS.index("amx"):
        pytest.skip("needs AMX")
    for var in ("CODESHELL_KERNEL_ISA", "CODESHELL_AMX_BF16_M1", "CODESHELL_AMX_BF16_ROWS", "CODESHELL_AMX_BF16_ROWS_SPLIT"):
        monkeypatch.delenv(var, raising=False)
    return _ext.get()


SHAPES = [(45, 37), (149, 100), (384, 256), (1024, 256), (2065, 256), (256, 1024), (300, 2048)]
MS = (2, 3, 5, 8, 9, 13, 16)


def _x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, ::31] *= 8
    x[1] = 0  # a zero row among the others
    return x.to(torch.bfloat16)


@needs_native
@pytest.mark.parametrize("split", ["1", "0"], ids=["owned", "chunks"])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_bf16_rows(n, k, split, threads, monkeypatch):
    mod = _amx(monkeypatch)
    monkeypatch.setenv("CODESHELL_AMX_BF16_ROWS_SPLIT", split)
    g = torch.Generator().manual_seed(n * 7 + k)
    pw = prepack(torch.randn(n, k, generator=g) * 0.05)
    x = _x(16, k, n + k)
    bias = torch.randn(n, generator=g)
    for m in MS:
        assert ops.plan(pw, m, torch.bfloat16) == "amx:bf16"
    alone = torch.cat([ops._compute("amx:bf16", mod, x[i:i + 1], pw, bias) for i in range(16)])
    ref = ops.reference(x, pw, bias, "amx:bf16")
    assert (alone - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    for b in (None, bias):
        alone_b = alone if b is not None else torch.cat(
            [ops._compute("amx:bf16", mod, x[i:i + 1], pw, None) for i in range(16)])
        for m in MS:
            monkeypatch.setenv("CODESHELL_AMX_BF16_ROWS", "0")
            before = ops._compute("amx:bf16", mod, x[:m], pw, b)
            monkeypatch.setenv("CODESHELL_AMX_BF16_ROWS", "1")
            got = ops._compute("amx:bf16", mod, x[:m], pw, b)
            assert torch.equal(got, before), f"{n}x{k} M={m}: {(got - before).abs().max()}"
            assert_rows_bitwise(got, alone_b[:m], f"amx:bf16 rows {n}x{k} M={m}")
        monkeypatch.delenv("CODESHELL_AMX_BF16_ROWS")


@needs_native
@pytest.mark.parametrize("level", ["avx512_bf16", "avx512_vnni", "avx2"])
def test_bf16_rows_lower_levels_keep_their_paths(level, monkeypatch):
    """Capped below amx, M = 8 plans no AMX path and still gives the reference (the rows here are AMX-only)."""
    if LEVEL < ops.ISA_LEVELS.index(level):
        pytest.skip(f"needs {level}")
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", level)
    pw = prepack(torch.randn(384, 256, generator=torch.Generator().manual_seed(5)) * 0.05)
    path = ops.plan(pw, 8, torch.bfloat16)
    assert not path.startswith("amx"), path
    x = _x(8, 256, 11)
    got = ops._compute(path, mod, x if "bf16" in path else x.float(), pw, None)
    ref = ops.reference(x, pw, None, path)
    assert (got - ref).abs().max().item() <= 2e-3 * ref.abs().max().item(), path


@needs_native
@pytest.mark.parametrize("kind,group", [("int8", 64), ("int4", 128)], ids=["int8", "int4g128"])
def test_step_rows_tuning_keeps_bits(kind, group, monkeypatch, capfd):
    """The native step's measured kernel for 2..16 rows (q8_rows_tune.h: q8_panel.h, q8_rows.h and the AMX
    tiles tried in turn on the step's own calls, then the fastest kept per linear and M): every call, while
    measuring and after the choice, gives the bits of the rules before (CODESHELL_Q8_ROWS_TUNE=0), and the
    choices are made (CODESHELL_Q8_ROWS_TUNE_LOG=1 prints them)."""
    if LEVEL < ops.ISA_LEVELS.index("amx"):
        pytest.skip("needs AMX")
    from codeshell.kernels import step as step_mod
    from test_decode_step import filled_cache, tiny

    for var in ("CODESHELL_KERNEL_ISA", "CODESHELL_Q8_AMX_VROWS", "CODESHELL_Q8_AMX_MIN_M", "CODESHELL_Q8_ROWS_TUNE"):
        monkeypatch.delenv(var, raising=False)
    m = tiny(kind, group=group)
    cache = filled_cache(m, 8, 256, seed=7)
    cases = [([1, 2, 3, 4, 5, 6, 7, 8], [16, 20, 31, 47, 2, 100, 64, 33], list(range(8))),
             ([9, 8, 7], [40, 5, 200], [7, 3, 1])]

    def run(case):
        with torch.inference_mode():
            out = step_mod.decode(m, cache, *case)
        assert out is not None, "the native step did not run"
        return out[0].clone().view(torch.int16), list(out[1])

    monkeypatch.setenv("CODESHELL_Q8_ROWS_TUNE", "0")
    for c in cases:  # a round first: each case writes its k, v rows where the other one reads (then steady)
        run(c)
    want = [run(c) for c in cases]
    monkeypatch.setenv("CODESHELL_Q8_ROWS_TUNE", "1")
    monkeypatch.setenv("CODESHELL_Q8_ROWS_TUNE_LOG", "1")
    capfd.readouterr()
    for i in range(3 * 2 * 4 + 3):  # the candidates (<= 3) x kRounds blocks of kBlock calls of each M, then the kept path
        for c, w in zip(cases, want):
            got = run(c)
            assert torch.equal(got[0], w[0]) and got[1] == w[1], f"call {i}, M={len(c[0])}"
    log = capfd.readouterr().err
    for mm in (8, 3):
        assert f" M={mm} tiles:" in log and f" M={mm} q8_panel.h:" in log, log[-2000:]
