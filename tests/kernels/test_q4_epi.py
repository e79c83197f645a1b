"""int4 weights at `avx512_vnni:q8` on the shared epilogue's bits (CODESHELL_Q4_EPI=1: the default
on CPUs whose highest kernel level is avx512_vnni, e.g. the Ice Lake-class Xeon; csrc/qdot_int4.cpp
q4_epi_kind) and on tile_q4v's per-lane bits (CODESHELL_Q4_EPI=0: the default elsewhere below AMX).

With the epilogue family int4 runs tile_r16_q4e at M = 1 (16 weight rows a tile, groups of 128 /
256; CODESHELL_Q4_M1_R16E=0: tile_v; CODESHELL_Q4_M1_SCT=0: its scales / offsets gathered instead of
transposed once a span; CODESHELL_Q4_M1_R16E_G=64: the tile at K = 4096 too), tile_v at M = 1-2 otherwise and q8_panel.h from
CODESHELL_Q8_PANEL_MIN_M (3) rows, where q8_rows.h's run_q4 takes M up to 16 (session 27;
CODESHELL_Q8R_INT4=0: q8_panel.h there; CODESHELL_Q8R_INT4_PF0: its L1 prefetch distance;
CODESHELL_Q8R_INT4_T8=0: its scalar result stores at M = 5..8; CODESHELL_Q8R_PREP=0: x's layout by
gathers): checked here, per family, the kernel's fp32 output against the
reference of its path (`ops.reference`) within 2e-5 of the largest output, and each row of every
M up to ops.ROW_INVARIANT_MAX_M bit for bit against the same row alone, for every split of the
kernels the switches select (every kernel that can take a row must give it the same bits). Also:
the two families differ only in rounding (not a test of speed), and the test prints which ran.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1

WEIGHTS = [({"group_size": 128, "symmetric": False}, 23, 1536),
           ({"group_size": 128, "symmetric": True}, 37, 1024),
           ({"group_size": 128, "symmetric": False}, 48, 4096),
           ({"group_size": 256, "symmetric": True}, 19, 1024),
           ({"group_size": 256, "symmetric": False}, 33, 2048),
           ({"group_size": 32, "symmetric": False}, 17, 2560),
           ({"group_size": 64, "symmetric": True}, 40, 512)]

ENV_VARS = ("CODESHELL_Q4_EPI", "CODESHELL_Q4_M1_R16E", "CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q4_M1_PF",
            "CODESHELL_Q4_ROWS", "CODESHELL_Q4_ROWS_MAX_M", "CODESHELL_Q4_M1_SCT",
            "CODESHELL_Q4_M1_R16E_G", "CODESHELL_Q8R_INT4", "CODESHELL_Q8R_INT4_PF0",
            "CODESHELL_Q8R_INT4_T8", "CODESHELL_Q8R_PREP")
_TOP = str(ops.ROW_INVARIANT_MAX_M + 1)
# Splits per family: epilogue (tile_r16_q4e / tile_v at M = 1-2, run_q4 at 3-16, q8_panel.h above; tile_v
# at M = 1; the panel at every M; tile_v at every M; tile_r16_q4e without its prefetch; the panel at
# 3-16 instead of run_q4; run_q4 from M = 2 without its L1 prefetch; run_q4's scalar result stores; the gathered x layout), per-lane (tile_q4v /
# q4_rows.h; run_q4v throughout).
SPLITS = {"1": [{}, {"CODESHELL_Q4_M1_R16E": "0"}, {"CODESHELL_Q8_PANEL_MIN_M": "1"},
                {"CODESHELL_Q8_PANEL_MIN_M": _TOP}, {"CODESHELL_Q4_M1_PF": "0"},
                {"CODESHELL_Q4_M1_R16E": "0", "CODESHELL_Q8_PANEL_MIN_M": "2"}, {"CODESHELL_Q4_M1_SCT": "0"},
                {"CODESHELL_Q4_M1_R16E_G": "64"}, {"CODESHELL_Q8R_INT4": "0"},
                {"CODESHELL_Q8_PANEL_MIN_M": "2", "CODESHELL_Q8R_INT4_PF0": "0"}, {"CODESHELL_Q8R_INT4_T8": "0"},
                {"CODESHELL_Q8R_PREP": "0"}],
          "0": [{}, {"CODESHELL_Q4_ROWS": "0", "CODESHELL_Q4_ROWS_MAX_M": "0"}]}


@needs_native
@pytest.mark.parametrize("family", ["1", "0"], ids=["epilogue", "per_lane"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("args,n,k", [pytest.param(*w, id=f"{w[1]}x{w[2]}-g{w[0]['group_size']}-"
                                      f"{'sym' if w[0]['symmetric'] else 'asym'}") for w in WEIGHTS])
def test_int4_family_matches_reference_and_m1_at_every_m(family, with_bias, args, n, k, monkeypatch):
    if LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("needs avx512_vnni")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    mod = _ext.get()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + 1)) * 0.05
    pw = quantize_int4(w, **args)
    path = ops.plan(pw, 1, torch.float32)
    assert path == "avx512_vnni:q8", path
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)) if with_bias else None
    g = torch.Generator().manual_seed(k + 3)
    x = torch.randn(ops.ROW_INVARIANT_MAX_M, k, generator=g) * torch.rand(ops.ROW_INVARIANT_MAX_M, 1, generator=g) * 4
    x[:, ::29] *= 8
    x[2] = 0  # an all-zero row: every group scale 0

    def setenv(split):
        for var in ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("CODESHELL_Q4_EPI", family)
        for var, val in split.items():
            monkeypatch.setenv(var, val)

    setenv({})
    alone = torch.cat([ops._compute(path, mod, x[i:i + 1], pw, bias) for i in range(x.shape[0])])
    ref = ops.reference(x, pw, bias, path)
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"family {family} {n}x{k} {args}: max abs error {err:.3g}"
    for split in SPLITS[family]:
        setenv(split)
        for m in range(1, ops.ROW_INVARIANT_MAX_M + 1):
            y = ops._compute(path, mod, x[:m], pw, bias)
            assert_rows_bitwise(y, alone[:m], f"int4 family {family} ({split or 'default split'}) {n}x{k} {args}")
    name = "epilogue (tile_r16_q4e / tile_v, q8_panel.h)" if family == "1" else "per-lane (tile_q4v, q4_rows.h)"
    print(f"{path} int4 {name}: {n}x{k} {args} bias={with_bias}: within {err:.2g} of the reference, rows of "
          f"M = 1..{ops.ROW_INVARIANT_MAX_M} bitwise those of M = 1")


@needs_native
def test_families_differ_only_in_rounding(monkeypatch):
    """The two int4 families are two fp32 orders of the same exact integer sums: close, not equal."""
    if LEVEL < ops.ISA_LEVELS.index("avx512_vnni"):
        pytest.skip("needs avx512_vnni")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    mod = _ext.get()
    pw = quantize_int4(torch.randn(64, 2048, generator=torch.Generator().manual_seed(3)) * 0.05, group_size=128)
    x = torch.randn(8, 2048, generator=torch.Generator().manual_seed(4))
    ys = {}
    for fam in ("0", "1"):
        monkeypatch.setenv("CODESHELL_Q4_EPI", fam)
        ys[fam] = ops._compute("avx512_vnni:q8", mod, x, pw, None)
    d = (ys["0"] - ys["1"]).abs().max().item()
    assert d <= 1e-5 * ys["0"].abs().max().item()
    assert not torch.equal(ys["0"], ys["1"]), "the switch did not change the kernel family"
