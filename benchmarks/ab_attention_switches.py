"""Same-process A/B of the prefill attention kernel alone with sets of its environment switches
(read per call): one row, T queries at positions 0..T-1 (trace_prefill.py --attention-only's
inputs), 64-key blocks, at codeshell-mini's shape (H 8, G 2, D 32, T 256) and the small shape's
(H 8, G 2, D 128, T 512); the variants alternate call by call; prints per variant the median and
best time, the ratio to the first variant and whether its output has the first variant's bits.

    flock /tmp/bench.lock nice -n -10 python benchmarks/ab_attention_switches.py \\
        masked:CODESHELL_PREFILL_ATTN_FULL=0 full: masked2:CODESHELL_PREFILL_ATTN_FULL=0 full2:

THREADS (default 2) and ROUNDS (default 80) from the environment; THREADS=1 times by the
process's CPU time (a host whose other jobs make wall times meaningless).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def main() -> None:
    from codeshell.kernels import prefill_attention as pa
    threads = int(os.environ.get("THREADS", "2"))
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    variants = [(a.split(":", 1)[0], dict(kv.split("=", 1) for kv in a.split(":", 1)[1].split(",") if kv))
                for a in sys.argv[1:]]
    if not variants:
        raise SystemExit(__doc__)
    rounds = int(os.environ.get("ROUNDS", "80"))
    for H, G, D, T in [(8, 2, 32, 256), (8, 2, 128, 512)]:
        g = torch.Generator().manual_seed(0)
        kc = torch.randn(1, G, T + 8, D, generator=g).bfloat16()
        vc = torch.randn(1, G, T + 8, D, generator=g).bfloat16()
        q = torch.randn(1, T, H + 2 * G, D, generator=g).bfloat16().transpose(1, 2)[:, :H]
        slots, pos = torch.zeros(1, dtype=torch.long), torch.arange(T)[None]

        def call(env):
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                t = clock()
                y = pa.prefill_attention(q, kc, vc, slots, pos, D ** -0.5, 64)
                return clock() - t, y
            finally:
                for k, v in old.items():
                    if v is None:
                        del os.environ[k]
                    else:
                        os.environ[k] = v

        ys = {n: call(e)[1] for n, e in variants}
        ts = {n: [] for n, _ in variants}
        for _ in range(rounds):
            for n, e in variants:
                ts[n].append(call(e)[0])
        first = variants[0][0]
        base = statistics.median(ts[first])
        print(f"H {H} G {G} D {D} T {T}, {threads} threads, {rounds} rounds, load {os.getloadavg()[0]:.1f}: " + "; ".join(
            f"{n} {statistics.median(ts[n]) * 1e3:.3f} ms (best {min(ts[n]) * 1e3:.3f}, "
            f"{statistics.median(ts[n]) / base:.3f}x, bits {'same' if torch.equal(ys[n], ys[first]) else 'DIFFER'})"
            for n, _ in variants), flush=True)


if __name__ == "__main__":
    main()
