"""Prompt-lookup decoding: drafts copied from the sequence's own n-grams, and their verification.

A sequence whose last n tokens (n from `max_ngram` down to `min_ngram`) occurred before, in
its prompt or its output, is likely to continue as it did there: code edits, refactors and
answers quoting the question copy long runs. `NgramLookup` proposes the tokens that followed
the most recent earlier occurrence of the longest such suffix (vLLM's ``ngram`` method,
transformers' ``prompt_lookup_num_tokens``). The engine runs the last token and the draft
through the model in one forward and keeps the accepted prefix (`accept`).

Acceptance is speculative sampling for a deterministic proposer (the draft token has
probability 1 under the proposal): draft token d is accepted with probability p(d) under the
target distribution (penalties, temperature and truncations applied); on rejection the token
is drawn from the residual, p with d removed and renormalised. Each emitted token is then
distributed exactly as p, so sampled output has the same distribution as plain decoding,
and greedy output (accept iff d is the argmax) is the same text. A seeded request draws its
uniforms in a different order than plain decoding, so its text differs from a plain run's
with the same seed; its distribution does not.

How many of the drafted tokens a step runs is `DraftBudget`'s choice: each drafted token
costs a row of the verify forward, accepted or not, and the step's cost grows with its rows
(measured per row count as the engine runs), so it keeps the drafted tokens that most raise
the expected tokens per second of the step.

This module neither runs the model nor touches the KV cache.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
import time

import torch

from .sampling import SequenceSampler, as_float32


class NgramLookup:
    """The n-gram index of one sequence's tokens (prompt then output).

    `index[n]` maps each n-gram to the position of the token that followed its most recent
    occurrence. An n-gram ending at the last token has no follower yet, so it is not in the
    index: a lookup of the current suffix finds an earlier occurrence, never itself.
    """

    def __init__(self, prompt_ids: list[int], max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self.extend(prompt_ids)

    def extend(self, tokens: list[int]) -> None:
        toks, items = self.tokens, self.index.items()
        start = len(toks)
        toks.extend(tokens)
        end = len(toks)
        # the new tokens' positions i in [start, end): the n-gram ending at i - 1 continues at i
        if end - start <= 8:  # a verify step's few tokens: one assignment each
            for i in range(start, end):
                for n, idx in items:
                    if i >= n:
                        idx[tuple(toks[i - n:i])] = i
            return
        # A prompt: one dict.update of zipped slices per n, in position order (the most recent
        # occurrence wins, as one assignment per token leaves it), 1.5-4x the loop above, which
        # took ~0.3 ms for a 300-token prompt at a sequence's first draft.
        for n, idx in items:
            lo = max(start, n)
            if lo < end:
                grams = zip(*(toks[lo - n + j:end - n + j] for j in range(n)))
                idx.update(zip(grams, range(lo, end)))

    def sync(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Index the output tokens added since the last call."""
        have = len(self.tokens) - len(prompt_ids)
        if have < len(output_ids):
            self.extend(output_ids[have:])

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest
        matching suffix (empty if none matched).

        Where that continuation runs into the end of the text (the suffix matched d tokens
        back: the last d tokens repeat what came before them), the copy goes on through its
        own tokens, as if the text kept repeating with period d: what the lookup would find
        at the next step anyway, one step sooner. A model stuck in a loop ("y = y\\n" over
        and over) or text that repeats a short pattern then drafts k tokens, not d. On the
        code-editing benchmark's greedy codeshell-mini answers (bench_lookup.py) this took a
        quarter of the verify steps of a batch-1 run away (871 -> 709, replayed).

        How many of these a step runs is the `DraftBudget`'s choice; the old cap of 2**n - 1
        tokens after an n-token match is left to it (a short match's later tokens are
        rejected more often, which the sequence's acceptance rate tells the budget)."""
        toks, L = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            j = self.index[n].get(tuple(toks[L - n:]))
            if j is not None:
                out = toks[j:j + k]
                period = L - j
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []


class DraftBudget:
    """How many drafted tokens a verify step runs: those that raise the step's expected
    tokens per second, by the measured cost of a forward of M rows.

    A step over B sequences with r drafted tokens emits E = B + (expected accepted) tokens
    and costs C(B + r). Drafted token j (0-based) of a sequence whose tokens are accepted at
    rate a is accepted with probability ~ a**(j + 1) (it needs the ones before it), so the
    candidates, best first, are nested prefixes of each draft; the step keeps the r that
    maximises E / C(B + r). With few sequences the per-step cost dominates and long drafts pay;
    with many, each row costs real compute (codeshell-mini bf16: ~60 us a row up to 16 rows,
    ~115 us beyond, against ~2 ms a step: AMX tiles of 16 rows; ~200-300 us a row against ~2.7 ms
    at 8 rows on an AVX-512 CPU without bf16 instructions, session 26) and only likely tokens pay.
    The odds a come from each sequence's verified drafts as per-token odds (`AcceptRate`).

    C comes from the engine's own verify steps (`observe(M, seconds)`, CPU seconds of the
    step's thread from drafting to the step's outputs: the per-step Python counts too): per row count M the
    mean of its first timings, then a moving average (a value far above it counts as 3x it);
    an M not seen yet is interpolated between the nearest seen ones and extrapolated past them
    by the slope of a least-squares line through them, and exploration (EXPLORE) retimes the
    row counts just past the choice. Until two row counts are known every draft runs (the row
    cap still applies).

    The choice depends on timings, so which tokens are drafted is not reproducible; that
    changes no greedy text (every kept draft is verified) and no distribution. Sequences marked
    `fixed` (seeded sampled requests, whose text depends on which tokens are drafted) keep
    their whole draft, so their text is the same from run to run of the same batch.
    """

    ALPHA = 0.2  # weight of a new timing in its row count's moving average
    # CPU seconds of the calling thread: the forward's own work (the calling thread takes part
    # in every parallel region), without the time the OS gave the core to other processes,
    # which on a shared machine swamps the difference of a few rows in wall-clock time
    clock = staticmethod(time.thread_time)
    # Every EXPLORE-th step with drafts runs 1, 2, ..., EXPLORE_ROWS (in turn) more drafted
    # tokens than the choice, if there are: the row counts just past the choice stay measured
    # (a first timing that came out high on a busy machine is retimed), and a choice of none is
    # revisited. Running every draft instead (up to 64 rows) cost more than it taught: at
    # batch 8 such a step took ~12 ms against ~3.5 ms.
    EXPLORE, EXPLORE_ROWS = 4, 8

    def __init__(self) -> None:
        self.cost_s: dict[int, float] = {}  # row count -> moving average of a step's seconds
        self.count: dict[int, int] = {}  # row count -> timings seen
        self.steps = 0
        self._stale = 0  # observations since the slope was fitted
        self._fit: tuple[list[int], float] | None = None  # (sorted known M, slope): cached

    def observe(self, rows: int, seconds: float) -> None:
        old = self.cost_s.get(rows)
        n = self.count[rows] = self.count.get(rows, 0) + 1
        if old is None:
            self.cost_s[rows] = seconds
            self._fit = None
        else:  # the mean of the first timings, then a moving average
            self.cost_s[rows] = old + max(1.0 / n, self.ALPHA) * (min(seconds, 3.0 * old) - old)
            self._stale += 1
            if self._stale >= 16:  # the slope follows the averages now and then
                self._fit = None

    def ready(self) -> bool:
        return len(self.cost_s) >= 2

    def _known(self) -> tuple[list[int], float]:
        """The row counts measured (sorted) and the least-squares slope of cost over them."""
        if self._fit is None:
            ms = sorted(self.cost_s)
            n = len(ms)
            mx = sum(ms) / n
            my = sum(self.cost_s[m] for m in ms) / n
            var = sum((m - mx) ** 2 for m in ms)
            slope = sum((m - mx) * (self.cost_s[m] - my) for m in ms) / var if var else 0.0
            self._fit, self._stale = (ms, max(slope, 0.0)), 0
        return self._fit

    def cost(self, rows: int) -> float:
        """Estimated seconds of a step of `rows` rows (needs `ready()`)."""
        c = self.cost_s.get(rows)
        if c is not None:
            return c
        ms, slope = self._known()
        i = bisect.bisect_left(ms, rows)
        if i == 0:
            hi = self.cost_s[ms[0]]
            return max(hi - slope * (ms[0] - rows), 0.5 * hi)
        lo = self.cost_s[ms[i - 1]]
        if i == len(ms):
            return lo + slope * (rows - ms[-1])
        w = (rows - ms[i - 1]) / (ms[i] - ms[i - 1])
        return (1 - w) * lo + w * self.cost_s[ms[i]]

    def costs(self, lo: int, hi: int) -> list[float]:
        """[cost(m) for m in lo..hi] (needs `ready()`), in one walk over the measured row
        counts instead of a search per m (the draft budget asks for up to 64 a step)."""
        cs = self.cost_s
        ms, slope = self._known()
        first, last = ms[0], ms[-1]
        out, i = [], 0
        for m in range(lo, hi + 1):
            c = cs.get(m)
            if c is None:
                if m < first:
                    hi_c = cs[first]
                    c = max(hi_c - slope * (first - m), 0.5 * hi_c)
                elif m > last:
                    c = cs[last] + slope * (m - last)
                else:
                    while ms[i + 1] < m:
                        i += 1
                    a, b = ms[i], ms[i + 1]
                    w = (m - a) / (b - a)
                    c = (1 - w) * cs[a] + w * cs[b]
            out.append(c)
        return out

    def choose(self, drafts: list[list[int]], rates: list[float], fixed: list[bool], cap: int) -> list[int]:
        """How many tokens of each draft to run: drafts[i] of sequence i (accepted at rate
        rates[i]), each sequence one row of its own plus its kept draft, at most `cap` rows in
        all; fixed[i] keeps draft i whole (shortened only by the cap, longest first)."""
        keep = [len(d) if f else 0 for d, f in zip(drafts, fixed)]
        rows = len(drafts) + sum(keep)
        if rows > cap:  # the fixed drafts alone overflow: the longest shortened first
            return [len(d) for d in cap_rows([d[:n] for d, n in zip(drafts, keep)], cap)]
        cand = []  # (probability that the token is accepted, sequence)
        for i, (d, a, f) in enumerate(zip(drafts, rates, fixed)):
            if d and not f:
                a = min(max(a, 0.05), 0.97)
                cand += zip(itertools.accumulate([a] * len(d), operator.mul), [i] * len(d))
        if not cand:
            return keep
        if not self.ready():  # nothing measured yet: every draft, up to the cap
            return [len(d) for d in cap_rows(drafts, cap)]
        self.steps += 1
        cand.sort(key=lambda c: -c[0])
        fixed_gain = sum(_expected(len(d), a) for d, a, f in zip(drafts, rates, fixed) if f and d)
        e = len(drafts) + fixed_gain
        top = cand[:cap - rows]
        costs = self.costs(rows, rows + len(top))
        best, best_r = e / costs[0], 0
        for r, (p, _) in enumerate(top, 1):
            e += p
            v = e / costs[r]
            if v > best:
                best, best_r = v, r
        if self.steps % self.EXPLORE == 0:
            best_r = min(best_r + 1 + (self.steps // self.EXPLORE) % self.EXPLORE_ROWS, len(cand), cap - rows)
        for _, i in cand[:best_r]:
            keep[i] += 1
        return keep


class AcceptRate:
    """A sequence's odds that its next drafted token is accepted given that the ones before it
    were (the `a` of DraftBudget's a**(j + 1)), from its verified drafts.

    Each verified draft is a run of Bernoulli trials that stops at the first rejection: `accepted`
    successes, then one failure unless every token was accepted (or the sequence stopped first).
    The estimate is successes over trials, both decayed by DECAY a draft so that recent drafts
    weigh most, with a prior of PRIOR worth one trial. (Until session 26 the engine kept a moving
    average of the accepted *share* of each draft: an 8-token draft accepted for 5 tokens then
    rejected scored 5/8 = 0.63 where the per-token odds are 5/6 = 0.83, and the budget, taking
    the share for the odds, kept far fewer drafted rows at batch 8 than paid; a sequence whose
    drafts it then dropped kept its low figure, as nothing was verified to raise it.)
    """

    DECAY = 0.7
    IDLE_DECAY = float(os.environ.get("CODESHELL_LOOKUP_IDLE_DECAY", "0.8"))  # 1: no ageing (A/B runs)
    PRIOR = 0.7

    __slots__ = ("hits", "trials")

    def __init__(self) -> None:
        self.hits = 0.0
        self.trials = 0.0

    def idle(self) -> None:
        """A step whose draft the budget dropped: the evidence ages (the odds drift back to
        PRIOR), so that a sequence once rejected is not left out for good on an old figure
        (with the odds frozen, the simulated batch-8 runs of session 26 ended up drafting nothing
        but what the budget's exploration forced)."""
        self.hits *= self.IDLE_DECAY
        self.trials *= self.IDLE_DECAY

    def update(self, accepted: int, rejected: bool) -> None:
        self.hits = self.DECAY * self.hits + accepted
        self.trials = self.DECAY * self.trials + accepted + (1 if rejected else 0)

    @property
    def rate(self) -> float:
        return (self.hits + self.PRIOR) / (self.trials + 1.0)


def _expected(n: int, a: float) -> float:
    """Expected accepted tokens of an n-token draft accepted at rate a: a + a^2 + ... + a^n."""
    a = min(max(a, 0.05), 0.97)
    return a * (1 - a ** n) / (1 - a)


def cap_rows(drafts: list[list[int]], cap: int) -> list[list[int]]:
    """Shorten drafts so that the verify forward (each sequence's last token + its draft)
    holds at most `cap` tokens: one token at a time off the end of the longest draft (a
    draft's later tokens are the least likely to be accepted). With more sequences than
    `cap`, no drafts."""
    total = sum(1 + len(d) for d in drafts)
    if total <= cap:
        return drafts
    lens = [len(d) for d in drafts]
    excess = total - cap
    while excess > 0 and any(lens):
        top = max(lens)
        for i, n in enumerate(lens):
            if n == top and excess > 0:
                lens[i] -= 1
                excess -= 1
    return [d[:n] for d, n in zip(drafts, lens)]


def verify_token(sampler: SequenceSampler, logits: torch.Tensor, draft: int) -> tuple[int, bool]:
    """The token to emit at a position whose raw logits [V] are `logits` and whose drafted
    token is `draft`: (draft, True) if accepted, else (a token drawn from the residual, False).

    Greedy: accepted iff the draft is what plain decoding would pick (else that pick). Sampled:
    accepted with probability p(draft); the residual is p with the draft removed, which for a
    deterministic proposer is max(p - q, 0) normalised (q = one-hot of the draft).
    """
    p = sampler.params
    if p.greedy:
        tok = sampler.sample(logits)
        return tok, tok == draft
    x = sampler.process(as_float32(logits, copy=sampler._mutates))
    probs = torch.softmax(x, -1)  # [V]
    u = sampler.uniform()
    if u < float(probs[draft]):
        return draft, True
    probs[draft] = 0.0
    cdf = probs.cumsum(-1)
    if float(cdf[-1]) <= 0.0:  # p(draft) was 1 up to rounding: nothing else to draw
        return draft, True
    target = torch.tensor(sampler.uniform(), dtype=cdf.dtype) * cdf[-1]
    tok = int(torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.numel() - 1))
    if float(probs[tok]) == 0.0:  # landed on a zero-width step through float rounding at the top
        tok = int(torch.nonzero(probs).max())
    return tok, False
