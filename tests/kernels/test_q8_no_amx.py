"""`avx512_vnni:q8` on CPUs without AMX (isa below `amx`), int8 and int4 weights, every M from 1
to ops.ROW_INVARIANT_MAX_M: int8 runs the AMX level's vpdpbusd kernels on the shared epilogue of
csrc/q8_epilogue.h (tile_v at M = 1-2, csrc/q8_rows.h at 3-16, csrc/q8_panel.h above: the bits
`amx:q8` gives); int4 runs qdot.cpp's tile_q4v / tile_q4v_blk, and run_q4r at M = 3-16 (per-lane
epilogue, tile_q4v's bits).

Checked at each AVX-512 level below AMX (CODESHELL_KERNEL_ISA caps the level, so an AMX CPU runs
these kernels too): the kernel's own fp32 output against the reference of its path
(`ops.reference`, int8-rounded x times the dequantised weight) within 2e-5 of the largest output;
each row of every M bit for bit against the same row alone (row invariance), for each kernel split
that the environment overrides select (SPLITS_INT8 / SPLITS_INT4: every kernel that can take a row
must give it the same bits). The shapes cover tails (N not a multiple of the 16-row panels
or of the multi-row tiles), int4 groups of 32 / 64 / 128 / 256 with and without offsets and
bias, and an all-zero row of x (block scales 0).
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1

WEIGHTS = [("int8", {}, 35, 384), ("int8", {}, 37, 1536), ("int8", {}, 19, 4096),
           ("int4", {"group_size": 32, "symmetric": True}, 35, 256),
           ("int4", {"group_size": 32, "symmetric": False}, 17, 2560),
           ("int4", {"group_size": 64, "symmetric": False}, 40, 512),
           ("int4", {"group_size": 128, "symmetric": False}, 23, 1536),
           ("int4", {"group_size": 128, "symmetric": True}, 21, 4096),
           ("int4", {"group_size": 256, "symmetric": True}, 19, 1024),
           ("int4", {"group_size": 256, "symmetric": False}, 33, 2048)]


ENV_VARS = ("CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8_ROWS_MAX_M", "CODESHELL_Q4_ROWS_MAX_M", "CODESHELL_Q4_ROWS",
            "CODESHELL_Q4_ROWS_MIN_M")
# Kernel splits checked against M = 1 alone (default split): int8 by default tile_v at M = 1-2,
# q8_rows.h at 3-16, q8_panel.h above; q8_rows.h from M = 1 (its 16- and 8-quad lane runs);
# q8_panel.h at every M; tile_v at every M. int4: q4_rows.h at 3-16 by default (2-16 with
# CODESHELL_Q4_ROWS_MIN_M=2), run_q4r at 5-16 with CODESHELL_Q4_ROWS=0, or run_q4v throughout.
_TOP = str(ops.ROW_INVARIANT_MAX_M + 1)
SPLITS_INT8 = [{}, {"CODESHELL_Q8_PANEL_MIN_M": "1"},
               {"CODESHELL_Q8_PANEL_MIN_M": "1", "CODESHELL_Q8_ROWS_MAX_M": "0"},
               {"CODESHELL_Q8_PANEL_MIN_M": _TOP}]
SPLITS_INT4 = [{}, {"CODESHELL_Q4_ROWS_MIN_M": "2"}, {"CODESHELL_Q4_ROWS": "0"},
               {"CODESHELL_Q4_ROWS": "0", "CODESHELL_Q4_ROWS_MAX_M": "0"}]


def _levels():
    return [pytest.param(name, id=name) for name in ("avx512_vnni", "avx512_bf16")]


@needs_native
@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind,args,n,k", [pytest.param(*w, id=f"{w[0]}-{w[2]}x{w[3]}-"
                                           f"{'-'.join(str(v) for v in w[1].values())}") for w in WEIGHTS])
def test_rows_kernel_matches_reference_and_m1_at_every_m(level, with_bias, kind, args, n, k, monkeypatch):
    lvl = ops.ISA_LEVELS.index(level)
    if lvl > LEVEL:
        pytest.skip(f"{level} above this CPU's highest kernel ISA ({ops.ISA_LEVELS[LEVEL]})")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", level)
    mod = _ext.get()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    pw = quantize_int8(w) if kind == "int8" else quantize_int4(w, **args)
    path = ops.plan(pw, 1, torch.float32)
    assert path == "avx512_vnni:q8", path
    assert {ops.plan(pw, m, torch.bfloat16) for m in range(1, ops.ROW_INVARIANT_MAX_M + 1)} == {path}
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)) if with_bias else None
    g = torch.Generator().manual_seed(k)
    x = torch.randn(ops.ROW_INVARIANT_MAX_M, k, generator=g) * torch.rand(ops.ROW_INVARIANT_MAX_M, 1, generator=g) * 4
    x[:, ::37] *= 8
    x[3] = 0  # an all-zero row: every block scale 0
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    alone = torch.cat([ops._compute(path, mod, x[i:i + 1], pw, bias) for i in range(x.shape[0])])
    ref = ops.reference(x, pw, bias, path)
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{path} {kind} {n}x{k} {args}: max abs error {err:.3g}"
    shared = kind == "int8"
    kernel = "tile_v (M = 1-2) / q8_rows.h (3-16) / q8_panel.h" if shared else "tile_q4v / q4_rows.h (3-16)"
    for split in (SPLITS_INT8 if shared else SPLITS_INT4):
        for var in ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, val in split.items():
            monkeypatch.setenv(var, val)
        for m in range(1, ops.ROW_INVARIANT_MAX_M + 1):
            y = ops._compute(path, mod, x[:m], pw, bias)
            assert_rows_bitwise(y, alone[:m], f"{path} ({kernel}, {split or 'default split'}) at {level} {kind} "
                                              f"{n}x{k} {args}")
    print(f"{path} ({kernel}) at {level}: {kind} {n}x{k} {args} bias={with_bias}: within {err:.2g} of the "
          f"reference, rows of M = 1..{ops.ROW_INVARIANT_MAX_M} bitwise those of M = 1")
