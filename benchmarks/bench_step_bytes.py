"""A batch-1 decode step's phases against the bytes they read and the read probe, in one process and minute.

What this measures (session 34 helper A, issue 14's "b1 >= 90% of the read bound"): a loaded checkpoint's
native decode step (`DecodeStep.profile`, per call) at batch 1, and per round, in turn with it, the read probe
(kernels.cpp read_stream over 1 GiB on huge pages, best of 3: the bound's denominator, codeshell.bench); per
linear phase (c_attn, attn.c_proj, c_fc, mlp.c_proj summed over the layers, the head) its weight bytes (the
packed tensors the kernels stream: data, scales, offsets) over its time = GB/s and % of the same round's
probe; the non-linear phases' share of the step. Variants (--ab: environment switches the kernels read per
call) alternate inside each round; medians over the rounds.

    flock /work/notes/bench.lock python benchmarks/bench_step_bytes.py /work/ckpt/qsmall/int8 --ab - CODESHELL_X=1

--calls (session 36 helper A) adds, per linear phase, a call's own time as quantiles over every call of the
variant's rounds (`DecodeStep.profile_marks`: each mark's nanoseconds): q25 / median us a call and the q25's
GB/s (% of the rounds' median probe). The sums above count every call a scheduler cut into on a shared host;
the standalones (benchmarks/standalone/q4avx2_m1_cold.cpp) report a call's q25, which this compares with.

Not a test: prints figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ab_variant import add_step_args, load_step_model, profiled_step  # noqa: E402
from bench_kernels import read_probe, set_env  # noqa: E402

LINEARS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "head"]


def linear_bytes(lm) -> dict[str, int]:
    """Bytes a batch-1 token streams per linear phase: every tensor of the matching modules (weights, scales,
    offsets, bias), summed over the layers."""
    import torch
    out = {k: 0 for k in LINEARS}
    for name, mod in lm.named_modules():
        key = "head" if name.endswith("lm_head") else next(
            (k for k in LINEARS[:4] if name.endswith(k)), None)
        if key is None or any(True for _ in mod.children()):
            continue
        pw = getattr(mod, "_kernel", None)  # the packed weight the kernels stream, where the module holds one
        if pw is not None and hasattr(pw, "data"):
            ts = [t for t in (pw.data, pw.scales, pw.offsets, getattr(mod, "bias", None)) if isinstance(t, torch.Tensor)]
        else:
            ts = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)) + [
                v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
        seen = set()
        for t in ts:
            if id(t) not in seen:
                seen.add(id(t))
                out[key] += t.numel() * t.element_size()
    return out


def quantile(v: list[float], f: float) -> float:
    v = sorted(v)
    return v[int(f * (len(v) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(ap, rounds=5, tokens=16)
    ap.add_argument("--calls", action="store_true",
                    help="also per linear: a call's q25 / median us over every call (DecodeStep.profile_marks)")
    a = ap.parse_args()
    import torch

    from codeshell.kernels import hugepages

    base_env = dict(os.environ)
    _, lm, gen, _ = load_step_model(a.folder, a.threads, 1, a.tokens)
    nbytes = linear_bytes(lm)
    probe_buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1.0)
    print("bytes a token: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in nbytes.items())
          + f"; total {sum(nbytes.values()) / 1e6:.1f} MB", flush=True)
    res: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in a.ab}
    calls: dict[str, dict[str, list[int]]] = {v: {} for v in a.ab}
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            p = read_probe(probe_buf)
            set_env(v, base_env)
            sec, ph = profiled_step(lm, gen, a.tokens, calls[v])  # the marks join calls[v]
            res[v].append((p, sec, ph))
            set_env("-", base_env)
    total = sum(nbytes.values())
    for v, rows in res.items():
        pr = statistics.median(p for p, _, _ in rows)
        step = statistics.median(s for _, s, _ in rows)
        pct = statistics.median(100 * total / s / 1e9 / p for p, s, _ in rows)
        print(f"[{v}] probe {pr:.1f} GB/s; step {step * 1e3:.2f} ms ({1 / step:.1f} tok/s, {pct:.0f}% of the "
              f"round's bound {total / pr / 1e6:.2f} ms)", flush=True)
        names = list(rows[0][2])
        cells = []
        for k in names:
            us = statistics.median(ph.get(k, 0.0) for _, _, ph in rows) * 1e6
            if k in nbytes and nbytes[k]:
                gbs = statistics.median(nbytes[k] / max(ph.get(k, 1e-9), 1e-9) / 1e9 for _, _, ph in rows)
                pp = statistics.median(100 * nbytes[k] / max(ph.get(k, 1e-9), 1e-9) / 1e9 / p for p, _, ph in rows)
                cells.append(f"{k} {us:.0f} us {gbs:.1f} GB/s ({pp:.0f}%)")
            else:
                cells.append(f"{k} {us:.0f} us")
        lin = statistics.median(sum(ph.get(k, 0.0) for k in nbytes) for _, _, ph in rows) * 1e6
        allp = statistics.median(sum(ph.values()) for _, _, ph in rows) * 1e6
        print("   " + "; ".join(cells), flush=True)
        print(f"   linears {lin:.0f} us of the phases' {allp:.0f} us ({100 * lin / allp:.0f}%); "
              f"non-linear {allp - lin:.0f} us", flush=True)
        if a.calls:
            layers = lm.cfg.n_layer
            cells = []
            for k in LINEARS:
                ns = calls[v].get(k, [])
                if not ns:
                    continue
                per = nbytes[k] / (1 if k == "head" else layers)  # a call's bytes
                q25, q50 = quantile(ns, 0.25) / 1e3, quantile(ns, 0.5) / 1e3
                cells.append(f"{k} {q25:.1f} / {q50:.1f} us {per / q25 / 1e3:.1f} GB/s ({100 * per / q25 / 1e3 / pr:.0f}%)")
            print("   a call, q25 / median (q25's GB/s, % of the probe): " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
