"""The engine's Python per decode step at batch 1 or --batch B: what runs between two native step calls.

Not a test: prints figures. Loads a checkpoint with `LLM`, then, in rounds, greedily generates
TOKENS + 1 tokens of B 16-token prompts per variant (variants alternate, the order rotating
each round, all in one process): the native calls (`DecodeStep.decode`, what `kernels.step.decode`
calls, and the several-token `decode_greedy` / `decode_greedy_rows` that LLM.generate's plain-greedy
steps take, `Engine._decode_many*`) are wrapped to record when each call starts and ends, so per token

* gap: from the end of one native call to the start of the next (all of the Python: the
  LLM's loop, `Engine.step`, the sequence's bookkeeping and detokenization, the outputs, the
  step's own Python checks before the call); "between calls" is the gap over the decode steps
  a call makes (up to CODESHELL_DECODE_MULTI, 64, in LLM.generate's plain-greedy calls), in wall and in the thread's CPU time,
* after the last call: from the last native call's end to generate's return (the last tokens'
  bookkeeping, the final outputs and their detokenization), over TOKENS,
* native: the call itself (pybind's argument conversion, the thread team, the kernels),
* token: start to start (a whole token),
* generate: (t(TOKENS + 1) - t(1)) / TOKENS of `LLM.generate`, no wrapper (what bench_quant and
  bench_decode_phases time), a decode step of B rows,
* outside: generate less the native calls' time a step (the same run with the wrapper: its
  t(TOKENS + 1) - t(1) less the calls' summed time, over TOKENS), i.e. everything of a step that is
  not the native call: the engine's Python, the outputs, the detokenization, pybind's conversion.
  With CODESHELL_DECODE_MULTI=1 every step is one native call (the server's and a sampled batch's
  path); by default LLM.generate's greedy batch makes up to 64 tokens a call (`calls` a step says
  which ran). Also as the main thread's CPU time (`time.thread_time`: the same less the 1-token run's
  and the calls' CPU time), which a loaded host's preemption does not lengthen.

Medians over the tokens of a generation, then over the rounds; the gap's p10 too (the host's
other jobs lengthen some gaps). With --stub the native call is replaced by one that returns the
same picks at once (recorded from a real generation), so the engine's Python runs alone: its
per-token time without the native call's cache eviction, and with --cprofile where it goes.

    python benchmarks/bench_engine_python.py --model /work/ckpt/qsmall/int4 --tokens 32 --rounds 6 \
        --ab CODESHELL_ENGINE_LEAN=off -
    python benchmarks/bench_engine_python.py --model codeshell-mini --stub --cprofile
    python benchmarks/bench_engine_python.py --batch 8 --ab - CODESHELL_DECODE_MULTI=1
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
        object.__setattr__(self, "cpu", [0.0])  # the calling thread's CPU time inside the calls
        object.__setattr__(self, "cstarts", [])  # the thread's CPU clock at each call's start and end
        object.__setattr__(self, "cends", [])

    def _timed(self, call):
        """call() with its start and end recorded by the wall clock and the thread's CPU clock."""
        c = time.thread_time()
        t = time.perf_counter()
        out = call()
        self.ends.append(time.perf_counter())
        e = time.thread_time()
        self.cpu[0] += e - c
        self.cstarts.append(c), self.cends.append(e)
        self.starts.append(t)
        return out

    def decode(self, *a):
        def call():
            if self.stub is not None:
                i = len(self.starts) % len(self.stub)
                return self.stub_rows[i], [self.stub[i]] * len(a[0])
            out = self._step.decode(*a)
            self.rows.append(out[0])
            return out

        out = self._timed(call)
        self.picks.append(out[1][0])
        return out

    def decode_greedy(self, *a):
        return self._timed(lambda: self._step.decode_greedy(*a))

    def decode_greedy_rows(self, *a):
        return self._timed(lambda: self._step.decode_greedy_rows(*a))

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
    ap.add_argument("--batch", type=int, default=1, help="requests generated together (16-token prompts each)")
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

    if a.stub:  # the stub replays `decode` calls: one token a step (LLM.generate's several-token calls otherwise)
        os.environ.setdefault("CODESHELL_DECODE_MULTI", "1")
    model = a.model
    if model == "codeshell-mini":
        from codeshell.mini import MODEL_DIR
        model = str(MODEL_DIR)
    base_env = dict(os.environ)
    llm = LLM(model, dtype="bfloat16", threads=a.threads, max_batch=a.batch, max_model_len=a.tokens + 64)
    lm = llm.model
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, min(lm.cfg.vocab_size, 70000), (16,), generator=g).tolist()}
               for _ in range(a.batch)]
    if a.stub and a.batch != 1:
        sys.exit("--stub runs at batch 1 only")

    cpu = [0.0, 0.0, 0.0]  # the last gen's CPU time of this thread; its wall and CPU clocks at the end

    def gen(n: int) -> tuple[float, list]:
        c = time.thread_time()
        t = time.perf_counter()
        out = llm.generate(prompts, SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=1,
                                                   max_tokens=n, ignore_eos=True))
        e, ce = time.perf_counter(), time.thread_time()
        t = e - t
        cpu[:] = ce - c, e, ce
        return t, [(o.outputs[0].token_ids, o.outputs[0].text) for o in out]

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
    print(f"{model}: batch {a.batch}, {a.threads} threads, {a.tokens} tokens, {a.rounds} rounds"
          f"{', native call stubbed' if a.stub else ''}; "
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
            w1, c1 = min((gen(1)[0], cpu[0]) for _ in range(2))
            n1 = len(w.starts)
            w.starts.clear(), w.ends.clear()
            w.cpu[0] = 0.0
            tw, out2 = gen(a.tokens + 1)
            cw, cnat = cpu[0], w.cpu[0]
            tail, ctail = cpu[1] - w.ends[-1], cpu[2] - w.cends[-1]  # after the last call (the final outputs)
            per = a.tokens / len(w.starts)  # decode steps a call
            kstep._DECODERS[lm].step = real
            set_env("-", base_env)
            if n1 and stub is None:
                sys.exit(f"error: a 1-token generate made {n1} native decode calls (expected none)")
            if ref is None:
                ref = out
            if out != ref or out2 != ref:
                if not (a.temperature > 0 and a.top_k > 0):
                    sys.exit(f"error: variant {v} gave another output")
                # a lean top-k row draws from its k largest logits: the same token but where a
                # sum's rounding differs at a boundary (engine/sampling.py `_draw_top_k`)
                print(f"note: variant {v} gave another sampled output (a top-k rounding boundary)")
            s, e = w.starts, w.ends
            gaps = [s[i + 1] - e[i] for i in range(len(s) - 1)] or [float("nan")]
            nat = sum(y - x for x, y in zip(s, e))
            res[v].append(dict(gap=statistics.median(gaps), gap10=sorted(gaps)[len(gaps) // 10],
                               native=statistics.median(y - x for x, y in zip(s, e)),
                               token=statistics.median(s[i + 1] - s[i] for i in range(len(s) - 1)) if len(s) > 1
                               else float("nan"),
                               gen=(tn - t1) / a.tokens, calls=len(s) / a.tokens,
                               nat_step=nat / a.tokens, outside=(tw - w1 - nat) / a.tokens,
                               cpu_out=(cw - cnat - c1) / a.tokens,
                               # between two calls (one engine step of `per` decode steps), a decode step
                               mid=statistics.median(gaps) / per,
                               cmid=statistics.median(w.cstarts[i + 1] - w.cends[i] for i in range(len(s) - 1)) / per
                               if len(s) > 1 else float("nan"),
                               tail=tail / a.tokens, ctail=ctail / a.tokens))
        print(f"round {r}: " + "; ".join(f"[{v}] between calls {res[v][-1]['mid'] * 1e6:.1f} us a step "
                                          f"(CPU {res[v][-1]['cmid'] * 1e6:.1f}), after the last "
                                          f"{res[v][-1]['tail'] * 1e6:.1f} (CPU {res[v][-1]['ctail'] * 1e6:.1f}); "
                                          f"outside {res[v][-1]['outside'] * 1e6:.1f} us a step "
                                          f"(CPU {res[v][-1]['cpu_out'] * 1e6:.1f}), native "
                                          f"{res[v][-1]['nat_step'] * 1e3:.3f} ms a step, "
                                          f"generate {res[v][-1]['gen'] * 1e3:.3f} ms" for v in a.ab), flush=True)
    first = res[a.ab[0]]
    for v, rs in res.items():
        def med(k):
            return statistics.median(x[k] for x in rs)
        print(f"== {v}: between two native calls {med('mid') * 1e6:.1f} us a decode step (least "
              f"{min(x['mid'] for x in rs) * 1e6:.1f}; the thread's CPU {med('cmid') * 1e6:.1f}, least "
              f"{min(x['cmid'] for x in rs) * 1e6:.1f}), after the last call {med('tail') * 1e6:.1f} us a step (CPU "
              f"{med('ctail') * 1e6:.1f}); paired vs first: between calls "
              f"{statistics.median((b['mid'] - x['mid']) * 1e6 for x, b in zip(rs, first)):+.1f} us, its CPU "
              f"{statistics.median((b['cmid'] - x['cmid']) * 1e6 for x, b in zip(rs, first)):+.1f} us")
        print(f"   {v}: outside the native calls {med('outside') * 1e6:.1f} us a step (least "
              f"{min(x['outside'] for x in rs) * 1e6:.1f}; the thread's CPU time {med('cpu_out') * 1e6:.1f}, least "
              f"{min(x['cpu_out'] for x in rs) * 1e6:.1f}), native {med('nat_step') * 1e3:.3f} ms a step "
              f"({med('calls'):.3f} calls a step), generate {med('gen') * 1e3:.3f} ms a step "
              f"of {a.batch} rows ({a.batch / med('gen'):.0f} tok/s); between two calls {med('gap') * 1e6:.1f} us "
              f"(p10 {med('gap10') * 1e6:.1f}), a call {med('native') * 1e3:.3f} ms; paired vs first: generate "
              f"{statistics.median(b['gen'] / x['gen'] for x, b in zip(rs, first)):.3f}x, outside "
              f"{statistics.median((b['outside'] - x['outside']) * 1e6 for x, b in zip(rs, first)):+.1f} us, its CPU "
              f"{statistics.median((b['cpu_out'] - x['cpu_out']) * 1e6 for x, b in zip(rs, first)):+.1f} us")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
