"""The --ab variants of the decode-step benchmarks (bench_decode_step.py --profile, bench_loaded.py).

A variant is '-' (as loaded: the defaults), `team=N` (the native decode step's thread team,
`DecodeStep.team`, set on the built step; the last one given wins) and / or comma-separated
ENV=V settings the kernels read per call (CODESHELL_Q8R_ASM=0, ...), e.g. `team=0,CODESHELL_CHUNKS_TEAM=1`.
What this is not: bench_kernels.py's --sweep variants (environment only; `set_env`, which this uses).
Also the decode-step benchmarks' common load and profiled round (`load_step_model`, `profiled_step`).
"""

from __future__ import annotations

import sys
import time

from bench_kernels import set_env

HELP = "'-' (as loaded), team=0|1|2, or ENV=V[,ENV=V] the kernels read per call (combinable: team=1,ENV=V)"


def add_ab_argument(ap, default: list[str], help: str = HELP) -> None:
    """The --ab option: one or more variants, alternating round by round in one process."""
    ap.add_argument("--ab", nargs="+", default=default, metavar="VARIANT", help=help)


def parse_variant(v: str) -> tuple[int | None, str]:
    """'-' or 'team=N,ENV=V,...' -> (the team, or None for the step's own; the ENV=V part for set_env)."""
    items = [] if v == "-" else v.split(",")
    teams = [int(kv.split("=", 1)[1]) for kv in items if kv.startswith("team=")]
    return (teams[-1] if teams else None), ",".join(kv for kv in items if not kv.startswith("team="))


def apply_variant(v: str, step, team0: int, env0: dict[str, str]) -> None:
    """Set variant `v` on the built decode step and the environment (`env0` plus its ENV=V settings)."""
    team, env = parse_variant(v)
    step.team = team0 if team is None else team
    set_env(env, env0)


def restore(step, team0: int, env0: dict[str, str]) -> None:
    """Back to the step's own team and the environment as it was (`env0`)."""
    set_env("-", env0)
    step.team = team0


# ---- the decode-step benchmarks' common load and round (bench_batch_phases.py, bench_step_bytes.py,
# bench_decode_phases.py had the same ~25 lines each: session 34 folded them here)

def add_step_args(ap, rounds: int, tokens: int) -> None:
    """FOLDER, --rounds, --tokens, --threads (2) and --ab (ENV=V[,ENV=V] or '-')."""
    ap.add_argument("folder")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", nargs="+", default=["-"], help="variants: 'NAME=V,NAME=V' or '-' (none)")


def load_step_model(folder: str, threads: int, batch: int, tokens: int):
    """Loads `folder` in bf16 activations for `batch` random 16-token prompts (seed 1) and runs one
    warm-up generation; returns (llm, its model, gen, the prompts) where gen(n) is the seconds of n
    greedy tokens of every prompt. Exits with one line when the native decode step does not run the model."""
    import torch

    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as kstep

    llm = LLM(folder, dtype="bfloat16", threads=threads, max_batch=batch, max_model_len=tokens + 64)
    lm = llm.model
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, min(lm.cfg.vocab_size, 70000), (16,), generator=g).tolist()}
               for _ in range(batch)]

    def gen(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    gen(4)
    dec = kstep._DECODERS.get(lm)
    if dec is None or dec.step is None:
        sys.exit("the native decode step does not run this model")
    return llm, lm, gen, prompts


def profiled_step(lm, gen, tokens: int, marks: dict[str, list[int]] | None = None) -> tuple[float, dict[str, float]]:
    """One measurement of the variant set now: seconds a decode step (a `tokens + 1`-token run less
    the best of two 1-token runs, over `tokens`) and the native step's phases per call
    (`DecodeStep.profile`) over that run. marks: a dict that takes every phase mark's nanoseconds of
    the run, by phase (`DecodeStep.profile_marks`: per-call quantiles, bench_step_bytes.py --calls)."""
    from codeshell.kernels import step as kstep

    gen(2)
    st = kstep._DECODERS[lm].step
    t1 = min(gen(1) for _ in range(2))
    st.profile = True
    tn = gen(tokens + 1)
    n, phases = st.profile_times()
    if marks is not None:
        for k, ns in st.profile_marks():
            marks.setdefault(k, []).append(ns)
    st.profile = False
    return (tn - t1) / tokens, {k: t / max(n, 1) for k, t in phases}
