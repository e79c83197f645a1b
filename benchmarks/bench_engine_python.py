"""The engine's Python per decode token at batch 1: what runs between two native step calls.

Not a test: prints figures. Loads a checkpoint with `LLM`, then, in rounds, greedily generates
TOKENS + 1 tokens of one 16-token prompt per variant (variants alternate, the order rotating
each round, all in one process): the native call (`DecodeStep.decode`, what `kernels.step.decode`
calls) is wrapped to record when each call starts and ends, so per token

* gap: from the end of one native call to the start of the next (all of the Python: the
  LLM's loop, `Engine.step`, the sequence's bookkeeping and detokenization, the outputs, the
  step's own Python checks before the call),
* native: the call itself (pybind's argument conversion, the thread team, the kernels),
* token: start to start (a whole token),
* generate: (t(TOKENS + 1) - t(1)) / TOKENS of `LLM.generate`, no wrapper (what bench_quant and
  bench_decode_phases time).

Medians over the tokens of a generation, then over the rounds; the gap's p10 too (the host's
other jobs lengthen some gaps). With --stub the native call is replaced by one that returns the
same picks at once (recorded from a real generation), so the engine's Python runs alone: its
per-token time without the native call's cache eviction, and with --cprofile where it goes.

    python benchmarks/bench_engine_python.py --model /work/ckpt/qsmall/int4 --tokens 32 --rounds 6 \
        --ab CODESHELL_ENGINE_LEAN=off -
    python benchmarks/bench_engine_python.py --model codeshell-mini --stub --cprofile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class _Timed:
    """Stands for a DecodeStep: its decode timed, everything else forwarded."""

    def __init__(self, step, stub: list[int] | None = None):
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "starts", [])
        object.__setattr__(self, "ends", [])
        object.__setattr__(self, "picks", [])
        object.__setattr__(self, "rows", [])  # each call's logits (None when not asked for)
        object.__setattr__(self, "stub", stub)

    def decode(self, *a):
        pc = time.perf_counter
        t = pc()
        if self.stub is not None:
            i = len(self.starts) % len(self.stub)
            out = (self.stub_rows[i], [self.stub[i]] * len(a[0]))
        else:
            out = self._step.decode(*a)
            self.rows.append(out[0])
        self.ends.append(pc())
        self.starts.append(t)
        self.picks.append(out[1][0])
        return out

    def __getattr__(self, k):
        return getattr(self._step, k)

    def __setattr__(self, k, v):
        setattr(self._step, k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="codeshell-mini", help="checkpoint folder or codeshell-mini")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: 'NAME=V,NAME=V' or '-' (as the environment)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: a seeded sampled request (the sampler runs between native calls, as in the "
                         "server's requests at temperature 0.8); 0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="with --temperature: top-k (the IDE route's default is 10)")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: top-p (the IDE route's default is 0.95)")
    ap.add_argument("--stub", action="store_true", help="the native call replaced by its recorded picks")
    ap.add_argument("--cprofile", action="store_true", help="with --stub: cProfile of the first variant's loop")
    a = ap.parse_args()
    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as kstep

    from bench_kernels import set_env

    model = a.model
    if model == "codeshell-mini":
        from codeshell.mini import MODEL_DIR
        model = str(MODEL_DIR)
    base_env = dict(os.environ)
    llm = LLM(model, dtype="bfloat16", threads=a.threads, max_batch=1, max_model_len=a.tokens + 64)
    lm = llm.model
    g = torch.Generator().manual_seed(1)
    prompt = {"prompt_token_ids": torch.randint(0, min(lm.cfg.vocab_size, 70000), (16,), generator=g).tolist()}

    def gen(n: int) -> tuple[float, list]:
        t = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=1,
                                                    max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t, out[0].outputs[0]

    gen(4)
    d = kstep._DECODERS.get(lm)
    if d is None or d.step is None:
        sys.exit("the native decode step does not run this model")
    stub = None
    if a.stub:
        w = _Timed(d.step)
        d.step = w
        gen(a.tokens + 1)
        stub, stub_rows, d.step = list(w.picks), list(w.rows), w._step
    print(f"{model}: {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds{', native call stubbed' if a.stub else ''}; "
          f"load average {os.getloadavg()}", flush=True)
    res: dict[str, list[dict]] = {v: [] for v in a.ab}
    ref = None
    for r in range(a.rounds):
        for v in a.ab[r % len(a.ab):] + a.ab[:r % len(a.ab)]:
            set_env(v, base_env)
            gen(2)
            d = kstep._DECODERS[lm]
            t1 = min(gen(1)[0] for _ in range(2))
            tn, out = gen(a.tokens + 1)
            real = d.step
            w = _Timed(real, stub)
            if stub is not None:
                object.__setattr__(w, "stub_rows", stub_rows)
            d.step = w
            if a.cprofile and r == 0 and v == a.ab[0]:
                import cProfile
                import pstats
                pr = cProfile.Profile()
                pr.enable()
                gen(a.tokens + 1)
                pr.disable()
                pstats.Stats(pr).sort_stats("tottime").print_stats(25)
                w.starts.clear(), w.ends.clear()
            _, out2 = gen(a.tokens + 1)
            kstep._DECODERS[lm].step = real
            set_env("-", base_env)
            if ref is None:
                ref = (out.token_ids, out.text)
            if (out.token_ids, out.text) != ref or (out2.token_ids, out2.text) != ref:
                if not (a.temperature > 0 and a.top_k > 0):
                    sys.exit(f"error: variant {v} gave another output")
                # a lean top-k row draws from its k largest logits: the same token but where a
                # sum's rounding differs at a boundary (engine/sampling.py `_draw_top_k`)
                print(f"note: variant {v} gave another sampled output (a top-k rounding boundary)")
            s, e = w.starts, w.ends
            gaps = [s[i + 1] - e[i] for i in range(len(s) - 1)]
            res[v].append(dict(gap=statistics.median(gaps), gap10=sorted(gaps)[len(gaps) // 10],
                               native=statistics.median(y - x for x, y in zip(s, e)),
                               token=statistics.median(s[i + 1] - s[i] for i in range(len(s) - 1)),
                               gen=(tn - t1) / a.tokens))
        print(f"round {r}: " + "; ".join(f"[{v}] gap {res[v][-1]['gap'] * 1e6:.1f} us, token {res[v][-1]['token'] * 1e3:.3f} ms, "
                                          f"generate {res[v][-1]['gen'] * 1e3:.3f} ms" for v in a.ab), flush=True)
    first = res[a.ab[0]]
    for v, rs in res.items():
        def med(k):
            return statistics.median(x[k] for x in rs)
        print(f"== {v}: Python between native calls {med('gap') * 1e6:.1f} us a token (p10 {med('gap10') * 1e6:.1f}), "
              f"native call {med('native') * 1e3:.3f} ms, token {med('token') * 1e3:.3f} ms, "
              f"generate {med('gen') * 1e3:.3f} ms a token; paired generate ratio vs first "
              f"{statistics.median(b['gen'] / x['gen'] for x, b in zip(rs, first)):.3f}x, "
              f"gap {statistics.median((b['gap'] - x['gap']) * 1e6 for x, b in zip(rs, first)):+.1f} us")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
