"""Sampling parameters and the sampler: penalties, temperature, top-k, top-p, min-p, seeded
draws, optional log-probabilities.

Parameters follow vLLM's names and meanings (``repetition_penalty`` is transformers'
multiplicative penalty over prompt and output; ``presence_penalty`` and
``frequency_penalty`` are OpenAI's additive penalties over the output). Each sequence has
its own `torch.Generator`, so a seeded request draws the same tokens whatever else is in
the batch. This module does not run the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


MAX_LOOKUP = 64  # most draft tokens per step: one verify forward runs 1 + this many positions
# Uniform numbers a CPU sequence generator draws at a time (`SequenceSampler.uniform`): torch's
# CPU `rand` fills a tensor serially, one number per generator step, so rand(64) gives the next
# 64 numbers that 64 calls of rand(1) give (tested: tests/engine/test_sampler_lean.py), for
# ~0.2 us a number against ~10 us a call (measured on the 2-core Zen 5, torch 2.13).
UNIFORM_BLOCK = 64
TOP_K_MAX = 1024  # a lean top-k row up to this k samples from its k largest logits (`_draw_top_k`)


def sampler_lean() -> bool:
    """CODESHELL_SAMPLE_LEAN (on by default, session 21): temperature-only rows drawn natively
    straight from the model's bf16 logits and seeded uniforms drawn UNIFORM_BLOCK at a time (no
    torch op between two native decode steps at one client: the float32 widening forked an
    OpenMP region whose worker then spun through the next step; docs/kernels-log.md, sessions 20-21).
    `off`: widened with torch and one `rand` call a draw, as before (A/B timing); the same
    tokens either way. Read once per sequence (its sampler)."""
    v = os.environ.get("CODESHELL_SAMPLE_LEAN", "on")
    if v not in ("on", "off"):
        raise ValueError(f"CODESHELL_SAMPLE_LEAN={v!r}: expected on or off")
    return v == "on"


_EXT: list = []  # the kernel extension module (or None: not built), resolved at first use


def _ext():
    if not _EXT:
        from ..kernels import _ext as ext
        _EXT.append(ext.get())
    return _EXT[0]


def _native_draw(logits: torch.Tensor, temperature: float, u: float) -> int | None:
    """`kernels.sample_temperature`'s draw on a CPU fp32 or bf16 row [V] as it is (a bf16 row
    draws what its fp32 widening draws, without the widening); None where the native kernels
    cannot take it (the caller widens and draws with torch ops)."""
    if (logits.dtype not in (torch.bfloat16, torch.float32) or logits.dim() != 1 or logits.device.type != "cpu"
            or not logits.is_contiguous()):
        return None
    mod = _ext()
    return None if mod is None else int(mod.sample_temperature(logits, temperature, u))


class SamplingError(ValueError):
    """An out-of-range sampling parameter; the message names it."""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context window
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token plus the k most likely
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt: bool = False  # left-truncate a too-long prompt instead of an error
    # Prompt-lookup decoding (see engine/lookup.py): draft up to this many tokens per step from
    # an earlier occurrence of the sequence's last n-gram. None: the engine's default; 0: off.
    prompt_lookup_num_tokens: int | None = None
    prompt_lookup_max_ngram: int = 3  # longest suffix n-gram looked up (tried first)
    prompt_lookup_min_ngram: int = 1  # shortest suffix n-gram looked up
    _stops: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self._stops = tuple(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise SamplingError(f"{name} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature is None or self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                bad(name, f"must be in [-2, 2], got {v!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        # torch.Generator.manual_seed overflows past 64 bits, inside the engine step where it
        # would fail every request batched with this one; the server's routes use the same range.
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            bad("seed", f"must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        k = self.prompt_lookup_num_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOOKUP):
            bad("prompt_lookup_num_tokens", f"must be None or an integer in [0, {MAX_LOOKUP}], got {k!r}")
        lo, hi = self.prompt_lookup_min_ngram, self.prompt_lookup_max_ngram
        if not isinstance(lo, int) or not isinstance(hi, int) or not 1 <= lo <= hi <= 32:
            bad("prompt_lookup_min_ngram/prompt_lookup_max_ngram",
                f"must be integers with 1 <= min <= max <= 32, got {lo!r} and {hi!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops


class SequenceSampler:
    """Per-sequence sampling state: its generator and its token counts for penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], seed: int | None, device: torch.device):
        self.params = params
        self.gen: torch.Generator | None = None
        if not params.greedy:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.prompt_ids = prompt_ids
        self.output_counts: dict[int, int] = {}
        # Lean (CODESHELL_SAMPLE_LEAN): the next uniform numbers, last first (`uniform`), on a CPU
        # generator; `fused`: a sampled temperature-only row (the native draw from the raw row).
        self.lean = sampler_lean()
        self._block = UNIFORM_BLOCK if self.lean and self.gen is not None and self.gen.device.type == "cpu" else 0
        self._us: list[float] = []
        self.fused = not params.greedy and self._temperature_only
        # lean: a top-k row (no penalties, no min-p) sampled from its k largest logits (`_draw_top_k`)
        self.top_k_only = (self.lean and not params.greedy and not self._mutates and 0 < params.top_k <= TOP_K_MAX
                           and params.min_p == 0)

    def observe(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply penalties, temperature and truncations to one row of float32 logits [V]."""
        p = self.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(self.prompt_ids) | set(self.output_counts)), dtype=torch.long,
                               device=logits.device)
            if len(ids):
                sel = logits[ids]
                logits[ids] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.output_counts:
            ids = torch.tensor(list(self.output_counts), dtype=torch.long, device=logits.device)
            cnt = torch.tensor(list(self.output_counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * cnt
        if p.greedy:
            return logits
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.min_p > 0:
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1.0:
            # stable: of equal logits at the cut, the lower token id is kept (as `_draw_top_k`)
            sorted_logits, idx = torch.sort(logits, descending=True, stable=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            remove = cum - torch.softmax(sorted_logits, -1) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.empty_like(logits).scatter_(0, idx, sorted_logits)
        return logits

    def sample(self, logits: torch.Tensor, u: float | None = None) -> int:
        """The next token from one row of raw logits [V] (float32, or the model's bf16: widened
        here); `u`, if given, is this sampler's uniform number already drawn (see `sample_rows`)."""
        p = self.params
        if self.fused and self.lean:  # the native draw on the row as it is (bf16: no widening)
            if u is None:
                u = self.uniform()
            tok = _native_draw(logits, p.temperature, u)
            if tok is not None:
                return tok
        elif self.top_k_only and logits.dim() == 1 and logits.numel() > p.top_k:
            if u is None:
                u = self.uniform()
            return _draw_top_k(logits, p.temperature, p.top_k, p.top_p, u)
        logits = as_float32(logits, copy=self._mutates)
        if p.greedy:
            # the first maximal index, as the batched greedy picks take it (native argmax)
            return int(first_argmax(self.process(logits)[None])[0])
        # Inverse-CDF draw with one uniform number: the same distribution as torch.multinomial,
        # ~10x faster on a 70k vocabulary on CPU (multinomial spends ~2 ms a row, which at
        # batch 16 was a fifth of a decode step). Zero-probability tokens are never picked.
        if u is None:
            u = self.uniform()
        if self._temperature_only:  # the fused native draw (~5x the torch ops below), if built
            from ..kernels import sample_temperature
            tok = sample_temperature(logits, p.temperature, u)
            if tok is not None:
                return tok
        x = self.process(logits)
        cdf = torch.softmax(x, -1).cumsum(-1)
        target = torch.tensor(u, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
        return int(torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.numel() - 1))

    def uniform(self) -> float:
        """The next uniform number of this sequence's generator (one per sampled token): the
        numbers of successive `torch.rand(1, generator=gen)` calls, drawn UNIFORM_BLOCK at a
        time on a CPU generator when lean (the same numbers in the same order)."""
        us = self._us
        if us:
            return us.pop()
        if self._block:
            us += reversed(torch.rand(self._block, generator=self.gen).tolist())
            return us.pop()
        return float(torch.rand(1, generator=self.gen, device=self.gen.device))

    @property
    def _temperature_only(self) -> bool:
        p = self.params
        return not self._mutates and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p == 0

    @property
    def _mutates(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def _draw_top_k(row: torch.Tensor, temperature: float, k: int, top_p: float, u: float) -> int:
    """`SequenceSampler.process` + the inverse-CDF draw for a top-k row (no penalties, no min-p),
    on its k largest logits instead of the whole row: the same steps (logits / T; top-p over them
    sorted, the first always kept; softmax; the cumulative sum in token order; the first token
    past u x total) on the tokens the whole-row path leaves finite, which are exactly these k
    (and any more equal to the k-th largest: the whole-row path keeps every tie; bf16 logits tie
    often). The same distribution; the same token for the same u but
    where the sums' rounding differs at a boundary (the whole-row softmax adds 70k terms, most of
    them exact zeros, in another order).

    Why: the whole-row ops (divide, topk, masked_fill, sort, softmax twice, scatter, cumsum over
    70,144 logits, each an OpenMP region on 2 threads) put ~2.0 ms between two ~26 ms decode steps
    of the 1.7B q4_0 engine, ~0.6 ms this way (docs/kernels-log.md, session 21 A): the
    llama.cpp-compatible /completion route's defaults (top_k 10, top_p 0.95: the IDE plugin's
    requests) take this path. Here: one topk over the row (one slice: no OpenMP region) and
    ops on k values."""
    V, n = row.numel(), k + 1
    while True:  # the whole-row path keeps every logit equal to the k-th largest: take the ties too
        vals, idx = torch.topk(row, min(n, V))   # sorted, largest first
        if n >= V or vals[-1] < vals[k - 1]:
            break
        n *= 2
    m = k + int((vals[k:] == vals[k - 1]).sum())
    keep = idx[:m].sort().values                 # the survivors in token order
    x = row[keep].float() / temperature           # as the whole row's fp32 logits / T
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, stable=True)  # ties: lower id first, as `process`
        probs = torch.softmax(sorted_x, -1)
        remove = probs.cumsum(-1) - probs >= top_p
        x = torch.empty_like(x).scatter_(0, order, sorted_x.masked_fill(remove, float("-inf")))
    cdf = torch.softmax(x, -1).cumsum(-1)
    target = torch.tensor(u, dtype=cdf.dtype) * cdf[-1]
    return int(keep[torch.searchsorted(cdf, target, right=True).clamp_(max=m - 1)])


def as_float32(logits: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """float32 logits: a widened copy of bf16 ones (exact), or float32 ones as they are (a copy
    when `copy`: the caller changes them in place)."""
    if logits.dtype != torch.float32:
        return logits.float()
    return logits.clone() if copy else logits


def greedy_picks(samplers: list[SequenceSampler], logits: torch.Tensor,
                 argmax: list[int] | None = None) -> list[int | None]:
    """For each row of logits [N, V]: the greedy pick where samplers[i] is greedy and leaves the
    logits as they are (no penalties), else None. One reduction over those rows instead of one
    call per row; the same first maximal index as `SequenceSampler.sample`. `argmax`, when
    given, is every row's first maximal index already (the native decode step's)."""
    rows = [i for i, s in enumerate(samplers) if s.params.greedy and not s._mutates]
    out: list[int | None] = [None] * len(samplers)
    if rows and argmax is not None:
        for i in rows:
            out[i] = argmax[i]
    elif rows:
        x = logits if len(rows) == len(samplers) else logits[rows]
        for i, t in zip(rows, first_argmax(x).tolist()):
            out[i] = t
    return out


def first_argmax(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The first maximal index of each row of x [N, V], as `x.max(-1).indices`, in two passes:
    the maximum of each `block`-wide block (a vectorised reduction that tracks no index), then
    the first maximal index inside the first block that holds the row's maximum. A verify step
    picks a token for every row (up to 64 here): on torch 2.13's CPU kernels, one thread, rows
    of 16384 fp32 logits cost ~5 us each this way against ~10 us by max(-1). The native kernel
    (`kernels.argmax_rows`: one max pass and a compare pass) does the same ~5-10x faster again,
    on bf16 rows too (torch's reductions run slower on bf16 than fp32); this is its fallback."""
    from ..kernels import argmax_rows
    got = argmax_rows(x)
    if got is not None:
        return got
    N, V = x.shape
    if N < 4 or V % block or V < 8 * block or not x.is_contiguous():  # 1-3 rows: max(-1) is as fast
        return x.max(-1).indices
    blocks = x.view(N, V // block, block)
    top = blocks.amax(-1).max(-1).indices                                   # [N] first block with the max
    inner = blocks[torch.arange(N, device=x.device), top].max(-1).indices   # [N] first max inside it
    return top * block + inner


def sample_rows(samplers: list[SequenceSampler], logits: torch.Tensor, argmax: list[int] | None = None) -> list[int]:
    """The next token of each row of logits [B, V] (row i with samplers[i]): the same tokens as
    calling each sampler's `sample` on its row. Greedy rows without penalties are picked by one
    reduction (or from `argmax`, every row's first maximal index when the caller has it);
    temperature-only rows are drawn by one native call, in parallel over the threads; the
    others one by one."""
    if len(samplers) == 1 and samplers[0].lean:  # one row (the 1-client server): straight to its sampler
        s = samplers[0]
        if s.fused or not (s.params.greedy and not s._mutates) or argmax is None:
            return [s.sample(logits[0])]
        return [argmax[0]]
    toks = greedy_picks(samplers, logits, argmax)
    fused = [i for i, s in enumerate(samplers) if not s.params.greedy and s._temperature_only]
    us = {i: samplers[i].uniform() for i in fused}
    if len(fused) > 1 and samplers[fused[0]].lean:  # bf16 or fp32 rows as they are, no widening
        mod = _ext()
        if mod is not None and logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32):
            rows = logits if len(fused) == len(samplers) else logits[fused]
            t = torch.tensor([samplers[i].params.temperature for i in fused], dtype=torch.float64)
            u = torch.tensor([us[i] for i in fused], dtype=torch.float64)
            for i, tok in zip(fused, mod.sample_temperature_rows(rows, t, u).tolist()):
                toks[i] = tok
    elif len(fused) > 1:
        from ..kernels import sample_temperature_rows
        rows = as_float32(logits if len(fused) == len(samplers) else logits[fused])
        got = sample_temperature_rows(rows, [samplers[i].params.temperature for i in fused], [us[i] for i in fused])
        if got is not None:
            for i, t in zip(fused, got):
                toks[i] = t
    return [t if t is not None else s.sample(logits[i], us.get(i)) for i, (s, t) in enumerate(zip(samplers, toks))]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float]]:
    """Log-probability of `token` under the model's raw distribution, and the `top` best."""
    lp = torch.log_softmax(logits.float(), -1)
    best: dict[int, float] = {}
    if top > 0:
        v, i = torch.topk(lp, top)
        best = {int(a): float(b) for a, b in zip(i, v)}
    return float(lp[token]), best
