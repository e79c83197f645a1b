"""Row invariance of `linear` (ops.ROW_INVARIANT_MAX_M): for every M up to the cap, each row of
a call gives exactly the bits that the same row gives alone, for every weight kind, x dtype
and ISA level this CPU has (CODESHELL_KERNEL_ISA caps the level, so the lower levels' kernels
run here too).

Why it matters: batched decode runs M = batch rows and a prompt-lookup verify step packs all
sequences' drafts into one call of up to 64 rows; greedy tokens must not depend on which
other rows shared the call. A kernel that sums a row in an order that depends on M (two
accumulator chains at M = 1, one at M >= 2), or a dispatcher that takes a differently-rounding
path for some M (AMX tiles vs vdpbf16ps, the int8/int4 prefill paths from M = 17), fails here.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, linear, ops, prepack, quantize_int4, quantize_int8
from codeshell.testing import assert_rows_bitwise

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
MS = [1, 2, 3, 4, 7, 8, 9, 16, 17, 31, 33, ops.ROW_INVARIANT_MAX_M]

# (kind, quantiser args, N, K): N not a multiple of 16; realistic K; for bf16 also a K that is
# not a multiple of 32 (a partial k-tile) and a 4096 x 4096-wide K (several k-blocks of the
# panel kernel); int8 K = 416 (activation blocks of 32), int8 K = 200 and int4 K = 96 (shapes
# the integer kernels do not take: the fp32-unpacking kernels run).
WEIGHTS = [("bf16", {}, 45, 512), ("bf16", {}, 37, 100), ("bf16", {}, 19, 4096),
           ("int8", {}, 35, 384), ("int8", {}, 70, 416), ("int8", {}, 21, 200),
           ("int4", {"group_size": 128, "symmetric": False}, 21, 512),
           ("int4", {"group_size": 32, "symmetric": True}, 35, 256),
           ("int4", {"group_size": 32, "symmetric": False}, 19, 96),
           # the mid shape's K (12 blocks: the tables' and affine sums' scalar tails) with N
           # leaving 1 weight row after the blocked kernels' 3-row (int8) / 2-row (int4) tiles,
           # and int4 groups of 256 (two 128-weight steps per group)
           ("int8", {}, 37, 1536), ("int4", {"group_size": 128, "symmetric": False}, 23, 1536),
           ("int4", {"group_size": 256, "symmetric": True}, 19, 1024)]


def _weight(kind, args, n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    return prepack(w) if kind == "bf16" else quantize_int8(w) if kind == "int8" else quantize_int4(w, **args)


def _x(k: int, dtype: torch.dtype) -> torch.Tensor:
    """64 rows of different scales (each row's own int8 block scales differ) with outliers."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(ops.ROW_INVARIANT_MAX_M, k, generator=g) * torch.rand(ops.ROW_INVARIANT_MAX_M, 1, generator=g) * 4
    x[:, ::37] *= 8
    return x.to(dtype)


def _levels():
    return [pytest.param(name, id=name) for name in ops.ISA_LEVELS]


@needs_native
@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("kind,args,n,k", [pytest.param(*w, id=f"{w[0]}-{w[2]}x{w[3]}") for w in WEIGHTS])
def test_rows_are_bitwise_those_of_m1(level, kind, args, n, k, monkeypatch):
    lvl = ops.ISA_LEVELS.index(level)
    if lvl > LEVEL:
        pytest.skip(f"{level} above this CPU's highest kernel ISA ({ops.ISA_LEVELS[LEVEL]})")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", level)
    assert ops.isa_level() == lvl
    pw = _weight(kind, args, n, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7))
    for dtype in (torch.bfloat16, torch.float32):
        # one path for every M up to the cap (a per-M choice between paths that round
        # differently is what breaks invariance; this names it when it happens)
        paths = {m: ops.plan(pw, m, dtype) for m in range(1, ops.ROW_INVARIANT_MAX_M + 1)}
        assert len(set(paths.values())) == 1, f"{kind} {dtype}: several paths below the cap: {paths}"
        x = _x(k, dtype)
        alone = torch.cat([linear(x[i:i + 1], pw, bias, impl="native") for i in range(x.shape[0])])
        for m in MS:
            y = linear(x[:m], pw, bias, impl="native")
            bad = (y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
                   != alone[:m].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)).any(dim=1)
            assert not bad.any(), (f"{kind} {n}x{k} x {dtype} at {level} ({paths[1]}): rows "
                                   f"{bad.nonzero().flatten().tolist()} of M={m} differ from M=1, max abs diff "
                                   f"{(y.float() - alone[:m].float()).abs().max().item():.3g}")


@needs_native
def test_fp32_output_of_each_decode_path_is_row_invariant(monkeypatch):
    """The kernels' own fp32 output (before `linear` rounds to x's dtype): a bf16 result can hide
    a last-bit difference of the fp32 sum, so each path this CPU has is also checked unrounded."""
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    mod = _ext.get()
    cases = [("bf16", {}, 45, 512, "avx2:panel", 0, torch.float32),
             ("bf16", {}, 45, 512, "avx512_bf16:panel", 2, torch.bfloat16),
             ("bf16", {}, 37, 100, "avx512_bf16:panel", 2, torch.bfloat16),
             ("bf16", {}, 45, 512, "amx:bf16", 3, torch.bfloat16),
             ("bf16", {}, 19, 4096, "amx:bf16", 3, torch.bfloat16),
             ("int8", {}, 35, 384, "avx2:q8", 0, torch.float32),
             ("int8", {}, 35, 384, "avx512_vnni:q8", 1, torch.float32),
             ("int8", {}, 21, 200, "avx2:unpack", 0, torch.float32),
             ("int4", {"group_size": 128, "symmetric": False}, 21, 512, "avx2:q8", 0, torch.float32),
             ("int4", {"group_size": 128, "symmetric": False}, 21, 512, "avx512_vnni:q8", 1, torch.float32),
             ("int4", {"group_size": 32, "symmetric": True}, 35, 256, "avx512_vnni:q8", 1, torch.float32),
             ("int8", {}, 37, 1536, "avx512_vnni:q8", 1, torch.float32),
             ("int4", {"group_size": 128, "symmetric": False}, 23, 1536, "avx512_vnni:q8", 1, torch.float32),
             ("int4", {"group_size": 256, "symmetric": True}, 19, 1024, "avx512_vnni:q8", 1, torch.float32),
             ("int4", {"group_size": 32, "symmetric": False}, 19, 96, "avx2:unpack", 0, torch.float32),
             ("int8", {}, 37, 1536, "amx:q8", 3, torch.float32),
             ("int4", {"group_size": 128, "symmetric": False}, 23, 1536, "amx:q8", 3, torch.float32),
             ("int4", {"group_size": 32, "symmetric": True}, 35, 256, "amx:q8", 3, torch.float32)]
    ran = 0
    for kind, args, n, k, path, lvl, dtype in cases:
        if lvl > LEVEL:
            continue
        pw = _weight(kind, args, n, k)
        x = _x(k, dtype)
        alone = torch.cat([ops._compute(path, mod, x[i:i + 1], pw, None) for i in range(x.shape[0])])
        for m in MS:
            y = ops._compute(path, mod, x[:m], pw, None)
            assert torch.equal(y.view(torch.int32), alone[:m].view(torch.int32)), f"{path} {kind} {n}x{k} M={m}"
        ran += 1
    assert ran >= 4


# int8/int4 weights for the AMX-INT8 rows: every block kind of the shared epilogue
# (csrc/q8_epilogue.h): int8 with 3 / 12 / 32 blocks of 128 (fewer and more than the 16 lanes),
# int4 groups of 32 / 64 / 128 / 256 with and without offsets (groups per 128-run 4 / 2 / 1, a
# group over two runs), N leaving a partial last panel of 16 weight rows (odd N too).
Q8_WEIGHTS = [("int8", {}, 35, 384), ("int8", {}, 37, 1536), ("int8", {}, 33, 4096),
              ("int4", {"group_size": 32, "symmetric": True}, 35, 256),
              ("int4", {"group_size": 32, "symmetric": False}, 17, 2560),
              ("int4", {"group_size": 64, "symmetric": False}, 40, 512),
              ("int4", {"group_size": 128, "symmetric": False}, 23, 1536),
              ("int4", {"group_size": 256, "symmetric": True}, 19, 1024)]
Q8_MS = [1, 2, 5, 8, 16, 17, 33, 48, ops.ROW_INVARIANT_MAX_M]


def _q8_call(mod, pw, x, bias, isa):
    if pw.kind == "int8":
        return mod.decode_int8_q8(x, pw.data, pw.scales, bias, isa)
    return mod.decode_int4_q8(x, pw.data, pw.scales, pw.offsets, pw.group_size, bias, isa)


@needs_native
@pytest.mark.skipif(LEVEL < ops.ISA_LEVELS.index("amx"), reason="needs AMX-INT8 (this CPU: "
                    f"{ops.ISA_LEVELS[LEVEL] if LEVEL >= 0 else 'no native kernels'})")
@pytest.mark.parametrize("kind,args,n,k", [pytest.param(*w, id=f"{w[0]}-{w[2]}x{w[3]}-"
                                           f"{'-'.join(str(v) for v in w[1].values())}") for w in Q8_WEIGHTS])
def test_amx_int8_tiles_give_the_vnni_rows(kind, args, n, k, monkeypatch):
    """`amx:q8` (isa 3) runs two kernels that must give every row the same bits: the vpdpbusd
    kernel on the shared epilogue of csrc/q8_epilogue.h below the AMX row threshold and the
    AMX-INT8 tiles from it. Checked bit for bit, fp32 output (before any rounding to x's dtype),
    with a bias, against that vpdpbusd kernel at M = 1 row by row: the tiles at every M <= 64
    (`prefill_q8_amx` runs them from M = 1), the vpdpbusd kernel at every M
    (CODESHELL_Q8_AMX_MIN_M=65 keeps it below the tiles' threshold), the default split; then
    `linear` at the `amx` cap on fp32 and bf16 x against its own M = 1 rows. `avx512_vnni:q8`
    (isa 1, CPUs without AMX) runs the same kernels for int8 (tile_v at M = 1-2, the panel from
    3: the same bits); for int4 it keeps the per-lane epilogue: other last bits, only near the
    reference (its own row invariance: test_q8_no_amx.py, test_rows_are_bitwise_those_of_m1). CODESHELL_Q8_PANEL_MIN_M = 1 / 65 runs
    int4's panel kernel / tile_v at every M below the tiles."""
    mod = _ext.get()
    amx = ops.ISA_LEVELS.index("amx")
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    monkeypatch.delenv("CODESHELL_Q8_AMX_MIN_M", raising=False)
    monkeypatch.delenv("CODESHELL_Q8_PANEL_MIN_M", raising=False)
    monkeypatch.delenv("CODESHELL_Q8_AMX_VROWS", raising=False)
    pw = _weight(kind, args, n, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    x = _x(k, torch.float32)
    epi1 = torch.cat([_q8_call(mod, pw, x[i:i + 1].contiguous(), bias, amx) for i in range(x.shape[0])])
    ref = ops.reference(x, pw, bias, "avx512_vnni:q8")
    assert (epi1 - ref).abs().max() <= 2e-5 * ref.abs().max(), "vpdpbusd rows (shared epilogue) vs the reference"
    vnni1 = torch.cat([_q8_call(mod, pw, x[i:i + 1].contiguous(), bias, 1) for i in range(x.shape[0])])
    if kind == "int8":  # tile_v (M = 1-2 without AMX) / csrc/q8_panel.h at both levels: the same bits
        assert torch.equal(vnni1.view(torch.int32), epi1.view(torch.int32)), "avx512_vnni:q8 vs amx:q8 at M=1"
    else:  # int4 without AMX: tile_q4v's per-lane epilogue
        assert (vnni1 - ref).abs().max() <= 2e-5 * ref.abs().max(), "vpdpbusd rows (per-lane epilogue) vs the reference"
    group = pw.group_size if kind == "int4" else 0
    for m in Q8_MS:
        xm = x[:m].contiguous()
        outs = {"amx tiles (prefill_q8_amx)": mod.prefill_q8_amx(xm, pw.data, pw.scales, pw.offsets, group, bias),
                "amx:q8 (default split)": _q8_call(mod, pw, xm, bias, amx)}
        monkeypatch.setenv("CODESHELL_Q8_AMX_MIN_M", str(ops.ROW_INVARIANT_MAX_M + 1))
        for panel in ("1", str(ops.ROW_INVARIANT_MAX_M + 1)):  # int4: q8_panel.h / tile_v at every M
            monkeypatch.setenv("CODESHELL_Q8_PANEL_MIN_M", panel)
            outs[f"vpdpbusd, shared epilogue (amx:q8 below the tiles, panel from {panel})"] = _q8_call(
                mod, pw, xm, bias, amx)
        monkeypatch.delenv("CODESHELL_Q8_PANEL_MIN_M")
        for vrows in ("0", "1"):  # session 37: q8_rows.h (int8, int4 run_q4) at M = 2..16 on AMX CPUs, or not
            monkeypatch.setenv("CODESHELL_Q8_AMX_VROWS", vrows)
            outs[f"vpdpbusd below the tiles, CODESHELL_Q8_AMX_VROWS={vrows}"] = _q8_call(mod, pw, xm, bias, amx)
        monkeypatch.delenv("CODESHELL_Q8_AMX_VROWS")
        monkeypatch.delenv("CODESHELL_Q8_AMX_MIN_M")
        for name, y in outs.items():
            assert_rows_bitwise(y, epi1[:m], f"{kind} {n}x{k} {args}: {name}", "vpdpbusd at M=1")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "amx")
    assert ops.plan(pw, 8, torch.bfloat16) == "amx:q8"
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        alone = torch.cat([linear(xd[i:i + 1], pw, bias, impl="native") for i in range(xd.shape[0])])
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        for m in Q8_MS:
            y = linear(xd[:m], pw, bias, impl="native")
            assert torch.equal(y.view(bits), alone[:m].view(bits)), f"{kind} {n}x{k} {dtype} M={m}: amx:q8 rows"
    print(f"{kind} {n}x{k} {args}: amx tiles, vpdpbusd (shared epilogue) and linear at amx:q8 give the M=1 bits, "
          f"M in {Q8_MS}")
