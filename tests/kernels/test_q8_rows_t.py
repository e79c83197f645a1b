"""Session 29 (helper B): csrc/q8_rows_t.h, the int8 rows kernel at M = 5..8 on a transposed copy of
the weight (32 weight rows a group, each quad's 32 rows side by side, unsigned) that the native
decode step makes once per int8 weight and hints with the block sums (q8_wsum.h SumsHint.packed).
Lanes are weight rows and each output runs q8_epilogue.h's fp32 order, so the bits are q8_rows.h's:
every output with the copy against `CODESHELL_Q8R_TP=0` (q8_rows.h run_rows with the table) and each
row alone (M = 1, tile_v), and near the reference, at M = 5..8, N leaving a partial last group of 32
rows (and of 16), K = 128 .. 4096 (1..32 blocks: tree16's prefix, the full tree and slot reuse),
extreme weights and x, with and without bias, in a 2-thread team (groups split across threads); and
the decode step (bf16 logits and picks) at batch 3 and 8 with the copy against CODESHELL_Q8R_TP=0.
int4 (groups of 128 / 256, with and without offsets) on its byte-a-weight copy (q8rt::Pack4, the
scales / offsets transposed beside it; hinted to q8_rows.h run_q4): against CODESHELL_Q8R_TP4=0
(run_q4) and each row alone, near the reference, and the int4 decode step against CODESHELL_Q8R_TP4=0.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, ops, quantize_int4
from codeshell.testing import assert_rows_bitwise

from test_q8_rows_v2 import q8_rows_case  # noqa: E402  (the same int8 weight, bias and x rows)

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
VNNI = ops.ISA_LEVELS.index("avx512_vnni")
SWITCHES = ("CODESHELL_Q8R_V2", "CODESHELL_Q8R_PF0", "CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8_ROWS_MAX_M",
            "CODESHELL_Q8R_ASM", "CODESHELL_Q8R_EPI", "CODESHELL_Q8R_WSUM", "CODESHELL_Q8R_TP", "CODESHELL_Q8R_TP_PF", "CODESHELL_Q8R_TP_SOLO")
SHAPES = [(37, 1024), (301, 128), (67, 256), (1029, 1280), (45, 2048), (29, 4096), (16, 384), (96, 640), (70, 1920)]


@needs_native
@pytest.mark.parametrize("extreme", [False, True], ids=["randn", "extreme"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", [pytest.param(*s, id=f"{s[0]}x{s[1]}") for s in SHAPES])
def test_q8_rows_t_keeps_the_bits(n, k, with_bias, extreme, monkeypatch, two_threads):
    if LEVEL < VNNI:
        pytest.skip("needs AVX512-VNNI")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")  # below AMX: q8_rows.h runs on an AMX CPU too
    for v in SWITCHES:
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    pw, bias, x = q8_rows_case(n, k, with_bias, extreme, seed=n * 5 + k)

    def call(xx):  # the step's hints: the block sums, and the transposed copy at 5..8 rows
        return mod.decode_int8_q8_wsum(xx.contiguous(), pw.data, pw.scales, bias, VNNI)

    alone = torch.cat([mod.decode_int8_q8(x[i:i + 1].contiguous(), pw.data, pw.scales, bias, VNNI) for i in range(8)])
    ref = ops.reference(x[:8], pw, bias, "avx512_vnni:q8")
    check_rows_5_to_8(monkeypatch, mod, call, x, ref, alone, n * k, "CODESHELL_Q8R_TP", "run_rows", f"int8 {n}x{k}",
                      prefetch=True)


def check_rows_5_to_8(monkeypatch, mod, call, x, ref, alone, nk, switch, against, label, prefetch=False):
    """At M = 5..8: `call` (the copy hinted) near the reference, each row's bits those of the row alone,
    in and out of the thread team the bits of `switch`=0 (the kernel `against`), and with the
    CODESHELL_Q8R_TP_SOLO (and, `prefetch`, _TP_PF) switches the same bits."""
    for m in range(5, 9):
        got = call(x[:m])
        err = (got - ref[:m]).abs().max().item()
        assert err <= 2e-5 * ref.abs().max().item(), f"M={m} {label}: max abs error {err:.3g} against the reference"
        assert_rows_bitwise(got, alone[:m], f"q8_rows_t.h at M={m}, {label}")
        for team in (False, True):  # the groups of 32 split over the team's 2 threads
            if team:
                r = mod.run_in_team(lambda: call(x[:m]))
                assert r is not False, "no thread team to run in"
                got2 = r[0]
            else:
                got2 = got
            monkeypatch.setenv(switch, "0")
            want = call(x[:m])
            monkeypatch.delenv(switch)
            assert_rows_bitwise(got2, want, f"{switch} on / off at M={m}, {label} (team {team})", against=against)
        if prefetch:
            monkeypatch.setenv("CODESHELL_Q8R_TP_PF", "1")  # the software prefetch kept as a switch
            assert_rows_bitwise(call(x[:m]), got, f"TP_PF=1 at M={m}, {label}")
            monkeypatch.delenv("CODESHELL_Q8R_TP_PF")
        monkeypatch.setenv("CODESHELL_Q8R_TP_SOLO", str(nk))  # the whole weight on the calling thread
        assert_rows_bitwise(call(x[:m]), got, f"TP_SOLO at M={m}, {label}")
        monkeypatch.delenv("CODESHELL_Q8R_TP_SOLO")


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_step_with_the_transposed_copy_keeps_the_bits(fmt, monkeypatch, two_threads):
    """The tiny model's native step at batches 1-8, in and out of the team: the copy forced on
    (CODESHELL_Q8R_TP / _TP4 = 1, whatever the LLC rule says) gives the bits of it off (= 0)."""
    from test_step_rows import CASES, decode, model_and_cache, same

    switch = "CODESHELL_Q8R_TP" if fmt == "int8" else "CODESHELL_Q8R_TP4"
    monkeypatch.delenv(switch, raising=False)
    m, cache = model_and_cache(fmt, group=128)  # int4's copy takes groups of 128 / 256
    decode(m, cache, [7], [3], [0], team=False)  # builds the step
    for tokens, positions, slots in CASES:
        for team in (False, True):
            monkeypatch.setenv(switch, "0")
            want = decode(m, cache, tokens, positions, slots, team)
            monkeypatch.setenv(switch, "1")
            got = decode(m, cache, tokens, positions, slots, team)
            assert same(got, want), f"the {fmt} transposed copy at batch {len(tokens)} (team {team})"
    # where decode_step makes the copy (int8: below AMX with AVX-512; int4: the VNNI level only)
    if ops.isa_level() in ((1, 2) if fmt == "int8" else (1,)):
        assert _step(m).copy_bytes_made() > 0  # batch 8 took the copy

@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_no_copy_and_no_table_below_vnni(fmt, monkeypatch, two_threads):
    """A model built at the AVX2 level (an AVX2-only CPU, or CODESHELL_KERNEL_ISA=avx2 on any other)
    makes no transposed copy even when CODESHELL_Q8R_TP / _TP4 = 1 forces it: its kernel never reads
    one, and the copy's packing is AVX-512 code (session 30: codeshell-mini int8 at batch 8 died of
    SIGILL on an AVX2-only AMD Zen 3). The logits are those of the copy switched off."""
    from test_step_rows import CASES, decode, model_and_cache, same

    switch = "CODESHELL_Q8R_TP" if fmt == "int8" else "CODESHELL_Q8R_TP4"
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
    monkeypatch.setenv(switch, "0")
    m, cache = model_and_cache(fmt, group=128)
    batch8 = CASES[2]
    want = decode(m, cache, *batch8, team=False)
    monkeypatch.setenv(switch, "1")
    got = decode(m, cache, *batch8, team=False)
    assert _step(m).copy_bytes_made() == 0, f"a {fmt} copy was made for AVX2 linears"
    assert same(got, want)


W4 = [({"group_size": 128, "symmetric": False}, 23, 1536), ({"group_size": 128, "symmetric": True}, 37, 1024),
      ({"group_size": 128, "symmetric": False}, 70, 4096), ({"group_size": 256, "symmetric": True}, 33, 1024),
      ({"group_size": 256, "symmetric": False}, 96, 2048), ({"group_size": 128, "symmetric": False}, 301, 256),
      ({"group_size": 256, "symmetric": False}, 45, 3840)]


@needs_native
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("args,n,k", [pytest.param(*w, id=f"{w[1]}x{w[2]}-g{w[0]['group_size']}-"
                                      f"{'sym' if w[0]['symmetric'] else 'asym'}") for w in W4])
def test_q4_rows_t_keeps_the_bits(args, n, k, with_bias, monkeypatch, two_threads):
    if LEVEL < VNNI:
        pytest.skip("needs AVX512-VNNI")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx512_vnni")
    monkeypatch.setenv("CODESHELL_Q4_EPI", "1")  # the epilogue's bits (run_q4 takes M = 2..16 there)
    for v in ("CODESHELL_Q8R_TP4", "CODESHELL_Q8R_INT4", "CODESHELL_Q8_PANEL_MIN_M", "CODESHELL_Q8R_TP_SOLO"):
        monkeypatch.delenv(v, raising=False)
    mod = _ext.get()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + 5)) * 0.05
    pw = quantize_int4(w, **args)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9)) if with_bias else None
    g = torch.Generator().manual_seed(k + 11)
    x = torch.randn(8, k, generator=g) * torch.rand(8, 1, generator=g) * 4
    x[:, ::29] *= 8
    x[2] = 0  # an all-zero row

    def call(xx):
        return mod.decode_int4_q8_packed(xx.contiguous(), pw.data, pw.scales, pw.offsets, pw.group_size, bias, VNNI)

    alone = torch.cat([mod.decode_int4_q8(x[i:i + 1].contiguous(), pw.data, pw.scales, pw.offsets, pw.group_size,
                                          bias, VNNI) for i in range(8)])
    ref = ops.reference(x, pw, bias, "avx512_vnni:q8")
    check_rows_5_to_8(monkeypatch, mod, call, x, ref, alone, n * k, "CODESHELL_Q8R_TP4", "run_q4", f"int4 {n}x{k} {args}")


def _step(m):
    from codeshell.kernels import step as step_mod
    return step_mod._DECODERS[m].step


def _l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            v = f.read().strip()
    except OSError:
        return 0
    return int(v[:-1]) * (1 << 20 if v[-1] in "Mm" else 1 << 10) if v[-1] in "KkMm" else int(v)


@needs_native
def test_the_copies_only_where_the_model_and_its_copies_fit_the_llc(monkeypatch, two_threads):
    """Unset, CODESHELL_Q8R_TP / _TP4 make the copies only for a model whose weights and copies take at
    most 3/4 of the LLC (a tiny model here, where sysfs gives the L3 size); 0 makes none; a step whose
    weights alone pass that bound makes none."""
    from test_step_rows import CASES, decode, model_and_cache

    l3, level = _l3_bytes(), ops.isa_level()
    # decode_step's conditions besides the rule (AMX, level 3: where the step takes q8_rows.h at 2..16 rows,
    # a model of at most kAmxVrowsMaxBytes as this one; session 37); int4 below AMX: where int4 takes the
    # epilogue's family (the Ice Lake-class Xeon and, since session 39, Zen 4 by default), forced here
    monkeypatch.setenv("CODESHELL_Q4_EPI", "1")
    makes = {"int8": level in (1, 2, 3), "int4": level in (1, 2, 3)}
    batch8 = CASES[2]
    for fmt in ("int8", "int4"):
        for v in ("CODESHELL_Q8R_TP", "CODESHELL_Q8R_TP4"):
            monkeypatch.setenv(v, "0")
        m, cache = model_and_cache(fmt, group=128)
        decode(m, cache, *batch8, team=False)
        st = _step(m)
        assert st.copies_fit() == (l3 > 0)
        assert st.copy_bytes_made() == 0, "CODESHELL_Q8R_TP(4)=0 made a copy"
        for v in ("CODESHELL_Q8R_TP", "CODESHELL_Q8R_TP4"):
            monkeypatch.delenv(v)
        decode(m, cache, *batch8, team=False)
        assert (st.copy_bytes_made() > 0) == (l3 > 0 and makes[fmt]), fmt
    # a step whose one int8 weight alone takes the whole LLC: never fits
    st = _ext.get().DecodeStep(8, 2, 32, 0)
    n = max(l3, 1 << 20) // 256 + 128
    st.add_linear(1, 3, 0, torch.zeros(n, 256, dtype=torch.int8), torch.ones(n), None, None, 0, n, 256)
    assert not st.copies_fit()


from test_decode_step import two_threads  # noqa: E402,F401  (the fixture: 2 OpenMP threads, restored after)
