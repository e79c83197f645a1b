"""Every kernel path this CPU has (AVX2, AVX512-VNNI, AVX512-BF16, AMX, torch's oneDNN bf16)
against the fp32 reference on the dequantised weight, at edge shapes; and the dispatch: what
`plan` picks per ISA level, and that CODESHELL_KERNEL_ISA caps it so the lower paths run here.

The paths are called by name (`ops._compute`), so each is checked whatever `plan` would pick;
the session summary (conftest.py) lists the paths that ran. Paths above this CPU's level are
skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available, linear, measure, ops, prepack, quantize_int4, quantize_int8
from codeshell.kernels.packing import activation_block

needs_native = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
MS = [1, 2, 3, 4, 15, 16, 17, 63, 64, 65, 512]

# (path, minimum ISA level, x dtype, largest M it takes)
PATHS = {
    "bf16": [("avx2:panel", 0, torch.float32, 64), ("avx2:panel64", 0, torch.float32, None),
             ("sgemm:fp32", 0, torch.float32, None), ("avx512_vnni:panel", 1, torch.float32, 64),
             ("avx512_vnni:panel64", 1, torch.float32, None), ("avx512_bf16:panel", 2, torch.bfloat16, 64),
             ("avx512_bf16:panel64", 2, torch.bfloat16, None), ("amx:bf16", 3, torch.bfloat16, None),
             ("onednn:bf16", 2, torch.bfloat16, None)],
    "int8": [("avx2:q8", 0, torch.float32, None), ("avx2:unpack", 0, torch.float32, None),
             ("sgemm:fp32", 0, torch.float32, None), ("avx512_vnni:q8", 1, torch.float32, None),
             ("amx:q8", 3, torch.bfloat16, None), ("amx:bf16", 3, torch.bfloat16, None),
             ("onednn:bf16", 2, torch.bfloat16, None)],
    "int4": [("avx2:q8", 0, torch.float32, None), ("avx2:unpack", 0, torch.float32, None),
             ("sgemm:fp32", 0, torch.float32, None), ("avx512_vnni:q8", 1, torch.float32, None),
             ("amx:q8", 3, torch.bfloat16, None), ("amx:bf16", 3, torch.bfloat16, None),
             ("onednn:bf16", 2, torch.bfloat16, None)],
}
# (kind, quantiser args, N, K): N not a multiple of 16 / 32; K not a multiple of the AMX depth
# (32) for bf16, and K % 128 == 0 where the 512-bit integer kernels need it; int8 K = 416
# (blocks of 32: AMX-INT8 tiles of depth 32, K not a multiple of 64) and N = 70 (a partial
# last panel paired with a full one in the AMX-INT8 kernel).
WEIGHTS = [("bf16", {}, 37, 100), ("bf16", {}, 50, 384), ("int8", {}, 35, 384), ("int8", {}, 70, 416),
           ("int4", {"group_size": 32, "symmetric": True}, 35, 384),
           ("int4", {"group_size": 64, "symmetric": False}, 19, 256),
           ("int4", {"group_size": 128, "symmetric": False}, 21, 256),
           ("int4", {"group_size": 256, "symmetric": True}, 17, 512)]


def _weight(kind, args, n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    return prepack(w) if kind == "bf16" else quantize_int8(w) if kind == "int8" else quantize_int4(w, **args)


def _cases():
    for kind, args, n, k in WEIGHTS:
        for path, lvl, dtype, max_m in PATHS[kind]:
            if path.endswith(":q8") and activation_block(_weight(kind, args, n, k)) is None:
                continue
            yield pytest.param(kind, args, n, k, path, lvl, dtype, max_m,
                               id=f"{path}-{kind}-{n}x{k}-{'-'.join(f'{v}' for v in args.values())}")


@needs_native
@pytest.mark.parametrize("kind,args,n,k,path,lvl,dtype,max_m", list(_cases()))
def test_path_matches_reference(kind, args, n, k, path, lvl, dtype, max_m, record_property):
    if LEVEL < lvl:
        pytest.skip(f"{path} needs {ops.ISA_LEVELS[lvl]}; this CPU's highest kernel ISA is {ops.ISA_LEVELS[LEVEL]}")
    record_property("isa_path", path)
    pw = _weight(kind, args, n, k)
    bias = torch.randn(n)
    mod = _ext.get()
    gen = torch.Generator().manual_seed(1)
    for m in MS:
        if max_m is not None and m > max_m:
            continue
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = ops._compute(path, mod, x, pw, bias)
        ref = ops.reference(x, pw, bias, path)
        # fp32 accumulation in another order: 2e-5 of the largest output; torch's bf16 matmul
        # rounds its output to bf16 (2^-8 relative).
        rel = 1e-2 if y.dtype == torch.bfloat16 else 2e-5
        err = (y.float() - ref).abs().max().item()
        assert err <= rel * ref.abs().max().item(), f"{path} M={m}: max abs err {err:.3g}"


@needs_native
def test_dispatch_table_and_isa_cap(monkeypatch, record_property):
    """plan() per level: the highest path this CPU has, and each lower one under the cap."""
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    b16, i8, i4 = _weight("bf16", {}, 50, 384), _weight("int8", {}, 35, 384), _weight("int4", {"group_size": 128}, 21, 256)
    want = {  # level -> (bf16 x bf16 decode, int8 decode, int4 decode, bf16 x fp32 decode)
        "avx2": ("avx2:panel", "avx2:q8", "avx2:q8", "avx2:panel"),
        "avx512_vnni": ("avx512_vnni:panel", "avx512_vnni:q8", "avx512_vnni:q8", "avx512_vnni:panel"),
        "avx512_bf16": ("avx512_bf16:panel", "avx512_vnni:q8", "avx512_vnni:q8", "avx512_vnni:panel"),
        "amx": ("avx512_bf16:panel", "amx:q8", "amx:q8", "avx512_vnni:panel"),
    }
    table = {}
    for lvl, name in enumerate(ops.ISA_LEVELS):
        if lvl > LEVEL:
            break
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", name)
        assert ops.isa_level() == lvl
        got = (ops.plan(b16, 8, torch.bfloat16), ops.plan(i8, 8), ops.plan(i4, 1), ops.plan(b16, 8, torch.float32))
        if name == "amx":  # batched bf16 decode: vdpbf16ps or AMX tiles, whichever measured faster
            assert got[0] in ("avx512_bf16:panel", "amx:bf16") and got[1:] == want[name][1:], got
        else:
            assert got == want[name], name
        table[name] = got + (ops.plan(b16, 512, torch.bfloat16),)
        x = torch.randn(3, 384).bfloat16()
        torch.testing.assert_close(linear(x, b16, impl="native"), linear(x, b16, impl="reference"), rtol=1e-2, atol=1e-2)
    record_property("dispatch_table", repr(table))
    print("dispatch per ISA cap:", table)
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx1024")
    with pytest.raises(ValueError, match="CODESHELL_KERNEL_ISA"):
        ops.isa_level()


@needs_native
def test_prefill_choice_is_measured_once_and_cached(monkeypatch):
    """With two candidates (our bf16 kernel and torch's bf16 matmul) the first call of a shape
    measures both; later calls reuse the choice."""
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    pw = _weight("bf16", {}, 50, 384)
    cands = ops.prefill_candidates(pw, torch.bfloat16, LEVEL)
    if len(cands) < 2:
        pytest.skip(f"one prefill candidate at {ops.ISA_LEVELS[LEVEL]}: {cands}")
    key = ("bf16", 50, 384, "prefill", ops.ISA_LEVELS[LEVEL], "bfloat16")  # one choice for every prefill M
    ops._CHOICES.pop(key, None)
    # (a GEMM with a bf16 epilogue is timed through it since session 41: its calls count as "+bf16")
    runs = lambda: sum(ops.PATHS_RUN[("bf16", c)] + ops.PATHS_RUN[("bf16", c + "+bf16")] for c in cands)
    before = runs()
    x = torch.randn(100, 384).bfloat16()
    y = linear(x, pw, impl="native")
    assert set(ops.CHOICE_TIMES[key]) == set(cands) and ops._CHOICES[key] in cands
    after = runs()
    # the measurement's calls (warm-ups and timed rounds, each candidate at each measured M, a
    # look or two, measure.measure: `calls` in its checks), then the call itself
    looks = ops.CHOICE_CHECKS[key]["looks"]
    assert looks in (1, 2)
    assert after - before == ops.CHOICE_CHECKS[key]["calls"] + 1
    per_look = len(cands) * len(measure.PREFILL_MEASURE_ROWS) * (1 + measure.MEASURE_ROUNDS)  # the most a look takes
    assert 0 < ops.CHOICE_CHECKS[key]["calls"] <= per_look * looks
    linear(x, pw, impl="native")
    assert runs() == after + 1
    torch.testing.assert_close(y, linear(x, pw, impl="reference"), rtol=1e-2, atol=1e-2)


def test_features_name_the_isa():
    feats = _ext.features()
    assert "max_isa" in feats
    if available():
        assert feats["avx2"] and feats["fma"] and 0 <= feats["max_isa"] < len(ops.ISA_LEVELS)
        if feats["max_isa"] >= 3:
            assert feats["amx_permitted"]


def test_zen4_is_amd_family_19h_with_avx512():
    # CpuFeatures::zen4 (session 39: the Zen 4 read-loop defaults) against /proc/cpuinfo's first processor
    feats = _ext.features()
    if "zen4" not in feats:
        pytest.skip("native kernels unavailable")
    try:
        info = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    fields = dict(ln.split(":", 1) for ln in info.splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    want = (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split() and feats["os_avx512"])
    assert feats["zen4"] == want


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_prefill_measures_amx_int8(kind, monkeypatch, record_property):
    """On an AMX machine an int8/int4 prefill with bf16 x measures AMX-INT8 (`amx:q8`) against
    the bf16 paths and sgemm, and whichever wins matches its own reference (amx:q8: x rounded
    to int8 in decode's blocks)."""
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    if LEVEL < ops.ISA_LEVELS.index("amx"):
        pytest.skip(f"no AMX here: this CPU's highest kernel ISA is {ops.ISA_LEVELS[LEVEL]}")
    pw = _weight(kind, {} if kind == "int8" else {"group_size": 128, "symmetric": False}, 70, 512)
    cands = ops.prefill_candidates(pw, torch.bfloat16, LEVEL)
    assert cands[0] == "amx:q8" and {"amx:bf16", "onednn:bf16", "sgemm:fp32"} <= set(cands)
    x = torch.randn(80, 512).bfloat16()
    y = linear(x, pw, impl="native")
    key = (kind, 70, 512, "prefill", "amx", "bfloat16")
    assert set(ops.CHOICE_TIMES[key]) == set(cands)
    path = ops.plan(pw, 80, torch.bfloat16)
    record_property("prefill_choice", f"{kind}: {path} of {ops.CHOICE_TIMES[key]}")
    print(f"{kind} prefill M=80: {path} chosen, times {ops.CHOICE_TIMES[key]}")
    ref = linear(x, pw, impl="reference")
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.float().abs().max().item())
    # fp32 x keeps exact weight-only math at prefill (never rounded to int8 or bf16)
    assert ops.prefill_candidates(pw, torch.float32, LEVEL) == ["sgemm:fp32"]
