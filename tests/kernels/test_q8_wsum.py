"""Session 22 (helper C): csrc/q8_wsum.h's weight block sums for q8_rows.h's v2 schedule. The
native decode step makes each int8 weight's table of 128 * sum_b(w) (blocks of 128 k, [N / 8][b][8])
at its first batched call and hints it to the int8 rows kernel for that weight's calls at M > 1;
run_rows then loads the 8 rows' sums of a block instead of computing them (weight_sums). The same
exact integers, so the same bits: every output with the table against the kernel without it
(`CODESHELL_Q8R_WSUM=0`, and `CODESHELL_Q8R_V2=0`, the xor schedule) and M = 1 rows, at M = 2..16,
N leaving a partial last group of 8 rows and chunk ends inside a group, K = 128 .. 4096, extreme
weights and x, with and without bias; and the decode step (bf16 logits and picks) at batch 1, 3
and 8 with the table against `CODESHELL_Q8R_WSUM=0`, in a thread team and outside one.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops
from codeshell.testing import assert_rows_bitwise

from test_q8_rows_v2 import q8_rows_case  # noqa: E402  (the same int8 weight, bias and x rows)

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
SWITCHES = ("CODESHELL_Q8R_V2", "CODESHELL_Q8R_PF0", "CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8_ROWS_MAX_M",
            "CODESHELL_Q8R_ASM", "CODESHELL_Q8R_EPI", "CODESHELL_Q8R_WSUM")
SHAPES = [(37, 1024), (301, 128), (67, 256), (1029, 1024), (45, 2048), (29, 4096), (16, 384), (9, 640)]


@needs_native
@pytest.mark.parametrize("extreme", [False, True], ids=["randn", "extreme"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", [pytest.param(*s, id=f"{s[0]}x{s[1]}") for s in SHAPES])
def test_q8_rows_with_block_sums_keep_the_bits(n, k, with_bias, extreme, monkeypatch):
    if LEVEL < VNNI:
        pytest.skip("needs AVX512-VNNI")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: q8_rows.h runs on an AMX CPU too
    for v in SWITCHES:
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    pw, bias, x = q8_rows_case(n, k, with_bias, extreme, seed=n * 7 + k)

    def call(xx, table=True):
        f = mod.decode_int8_q8_wsum if table else mod.decode_int8_q8
        return f(xx.contiguous(), pw.data, pw.scales, bias, VNNI)

    alone = torch.cat([call(x[i:i + 1], table=False) for i in range(16)])
    ref = ops.reference(x, pw, bias, "avx512_vnni:q8")
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{n}x{k}: max abs error {err:.3g} against the reference"
    monkeypatch.setenv("CODESHELL_Q8_PANEL_MIN_M", "2")  # M = 2 on q8_rows.h too (E = 8)
    for m in range(2, 17):
        want = call(x[:m], table=False)  # the per-block weight_sums
        assert_rows_bitwise(want, alone[:m], f"q8_rows.h at M={m}, int8 {n}x{k}")
        assert_rows_bitwise(call(x[:m]), want, f"q8_rows.h with the table at M={m}, int8 {n}x{k}",
                            against="weight_sums")
        monkeypatch.setenv("CODESHELL_Q8R_WSUM", "0")
        assert_rows_bitwise(call(x[:m]), want, f"CODESHELL_Q8R_WSUM=0 at M={m}, int8 {n}x{k}")
        monkeypatch.setenv("CODESHELL_Q8R_V2", "0")  # the xor schedule: no sums read at all
        monkeypatch.delenv("CODESHELL_Q8R_WSUM")
        assert_rows_bitwise(call(x[:m]), want, f"V2=0 with a table hinted at M={m}, int8 {n}x{k}")
        monkeypatch.delenv("CODESHELL_Q8R_V2")


@needs_native
@pytest.mark.parametrize("kind", ["int8"])
def test_decode_step_with_block_sums_keeps_the_bits(kind, monkeypatch, two_threads):
    from test_step_rows import CASES, decode, model_and_cache, same

    monkeypatch.delenv("CODESHELL_Q8R_WSUM", raising=False)
    m, cache = model_and_cache(kind)
    decode(m, cache, [7], [3], [0], team=False)  # builds the step
    for tokens, positions, slots in CASES:
        for team in (False, True):
            monkeypatch.setenv("CODESHELL_Q8R_WSUM", "0")
            want = decode(m, cache, tokens, positions, slots, team)
            monkeypatch.delenv("CODESHELL_Q8R_WSUM")
            got = decode(m, cache, tokens, positions, slots, team)
            assert same(got, want), f"block sums at batch {len(tokens)} (team {team})"


from test_decode_step import two_threads  # noqa: E402,F401  (the fixture: 2 OpenMP threads, restored after)
