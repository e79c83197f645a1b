"""Small random-weight checkpoints in the official CodeShell layout, for tests and demos.

`make_tiny_checkpoint` writes config.json + model.safetensors (and copies a tokenizer when
given one). The weights are random: useful to exercise code paths, not to produce sense.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import SHAPES, CodeShellConfig
from .tokenizer import TOKENIZER_FILES


def random_state_dict(cfg: CodeShellConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.2) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors with N(0, std) weights (LayerNorms near 1), no lm_head (tied)."""
    from .model import CodeShellForCausalLM
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        m = CodeShellForCausalLM(cfg)
    sd = {}
    for name, p in m.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            base = 1.0 if name.endswith("weight") else 0.0
            t = base + 0.05 * torch.randn(p.shape, generator=g)
        else:
            t = std * torch.randn(p.shape, generator=g)
        sd[name] = t.to(dtype).contiguous()
    return sd


def make_tiny_checkpoint(path: str | Path, tokenizer_dir: str | Path | None = None,
                         cfg: CodeShellConfig | None = None, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny CodeShell checkpoint folder (vocab 70144 so the real tokenizer fits), in
    `dtype` ("float32", or "bfloat16" like the released checkpoints)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = cfg or SHAPES["tiny"]
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": dtype}, indent=2))
    save_file(random_state_dict(cfg, seed, dtype=getattr(torch, dtype)), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / f
            if src.exists():
                shutil.copy(src, path / f)
    return path


def assert_rows_bitwise(y: torch.Tensor, ref: torch.Tensor, what: str, against: str = "M=1") -> None:
    """Row invariance checks: y [M, N] fp32 must equal ref [M, N] bit for bit, row by row; the
    message names `what` ran, the rows that differ and by how much."""
    bad = (y.view(torch.int32) != ref.view(torch.int32)).any(dim=1)
    assert not bad.any(), (f"{what}: rows {bad.nonzero().flatten().tolist()} of M={y.shape[0]} differ from "
                           f"{against}, max abs diff {(y - ref).abs().max().item():.3g}")


def assert_m1_rows_and_reference(old: torch.Tensor, rows: dict, x1: torch.Tensor, packed, bias,
                                 path: str, tol: float = 2e-5, *, call=None, x: torch.Tensor | None = None,
                                 ms: tuple[int, ...] = ()) -> None:
    """The M = 1 kernel tests' common tail: row 0 of every batched call in `rows` ({M: output
    [M, N]}) has the M = 1 bits `old` [1, N], and `old` is within `tol` (relative to the largest
    output) of `ops.reference` for `path` on x1 [1, K].
    With `call` (x [m, K] -> output [m, N], the kernels on their default switches: the caller
    clears its own first) and `x` [>= max(ms), K] whose row 0 is x1, the tail's calls too: the
    defaults at M = 1 must give `old` (the new kernels keep the earlier bits), and row 0 of
    call(x[:m]) for every m in `ms` joins `rows`."""
    from .kernels import ops

    if call is not None:
        assert torch.equal(call(x1), old), "the default M = 1 kernel's bits differ from the earlier kernels'"
        rows = {**rows, **{m: call(x[:m].contiguous()) for m in ms}}
    for m, out in rows.items():
        assert torch.equal(out[:1], old), f"row 0 of M={m} differs from M = 1"
    ref = ops.reference(x1, packed, bias, path)
    err = (old - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max abs error {err:.3g} against the reference"


def int4_rows_case(n: int, k: int, group: int, sym: bool, with_bias: bool, seeds: tuple[int, int, int],
                   spike_every: int, zero_row: int):
    """The int4 batched-rows tests' case (tests/kernels/test_q4_rows*.py): weights [n, k] (N(0, 0.05), seed
    seeds[0]) packed to int4 with `group`, `sym`; a bias (seed seeds[1]) or None; x [16, k] (seed seeds[2])
    with rows of different sizes, every `spike_every`-th column x8 and row `zero_row` all zero; each row
    alone (M = 1) through the path `ops.plan` picks, checked within 2e-5 (of the largest output) of
    `ops.reference`. The caller sets the ISA level and clears the switches first.
    Returns (mod, path, packed, bias, x, alone)."""
    from .kernels import _ext, ops, quantize_int4

    mod = _ext.get()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seeds[0])) * 0.05
    pw = quantize_int4(w, group_size=group, symmetric=sym)
    path = ops.plan(pw, 1, torch.float32)
    assert path == "avx512_vnni:q8", path
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seeds[1])) if with_bias else None
    g = torch.Generator().manual_seed(seeds[2])
    x = torch.randn(16, k, generator=g) * torch.rand(16, 1, generator=g) * 4
    x[:, ::spike_every] *= 8
    x[zero_row] = 0
    alone = torch.cat([ops._compute(path, mod, x[i:i + 1], pw, bias) for i in range(16)])
    ref = ops.reference(x, pw, bias, path)
    err = (alone - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"{n}x{k} g{group}: max abs error {err:.3g}"
    return mod, path, pw, bias, x, alone
