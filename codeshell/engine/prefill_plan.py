"""Which of the prompts admitted in one step share a padded prefill forward (session 32).

The engine prefills short prompts together in one right-padded forward (`Engine._prefill_group`):
every row runs as many positions as the longest remaining prompt of its group. One forward for
everything is what small models want (a forward's fixed cost, the Python and the weights' pass,
outweighs many rows of padding), but on a 1.7B model a row is ~20 ms of compute and a prompt that
is (almost) all cached pads to the longest one: 4 clients after a 1-client round ran [4, 93]
= 372 rows where llama-server computed 276 (docs/kernels-log.md, session 31 helper B). A fixed cap on
the padding share split small models' groups into forwards that cost more than the padding.

So the split is chosen by cost: a forward of `rows` rows (batch x padded length) is estimated at
`PrefillCost.fixed_s + PrefillCost.row_s * rows`, both measured once at load
(`Engine.measure_prefill_cost`: forwards of two lengths through the model), and `plan` picks the
grouping that minimises the sum over the step's forwards. Sorted by remaining length, an optimal
grouping is contiguous (a group's cost depends on its longest member only), so a DP over the
sorted prompts finds it. Groups keep the prompts' arrival order inside and run in the order of
their first-arrived prompt. Which group a prompt runs in changes none of its bits (every row of a
prefill forward takes the same kernel path whatever the other rows: tests/engine/
test_batched_prefill.py and test_prefill_decode_bits.py).

Which of the waiting prompts a step admits at all is `first_group`'s choice (session 41): with
the cost table, clients that arrive together are admitted a group a step, the groups chosen in
arrival order to minimise the prompts' summed time to first token (a prompt's first token leaves
with its step's outputs, after its group's forward and every forward before it, with a decode
step of the running sequences between two such steps). One forward for 4 prompts of ~90 tokens on
a 1.7B bf16 model gave every client its first token after all 4 prompts' rows (time to first token
p50 2252 ms against llama-server's 2086); a prompt a step gives the first client its token after
one prompt's rows, the second after two and a decode step, ... Small models, where the forward's
fixed cost outweighs a prompt's rows, still admit all in one forward.

This module neither runs the model nor touches the KV cache.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillCost:
    """A prefill forward's estimated seconds: `fixed_s` a forward plus `row_s` a row (a padded
    position of one prompt counts as a row); past `knee` rows, `far_fixed_s` + `far_row_s` a row.

    The second line (session 41) is for models whose prompt kernels change with the rows: a forward
    of a few rows takes the decode kernels, a longer one the prefill GEMMs, whose per-call work (a
    4-bit weight's repack) is a fixed cost the line through 8 and 72 rows does not see. On the 1.7B
    q4_0 model that line put 5 prompts of 90 tokens in one forward at 4.8 s; it ran in 2.7 s."""

    fixed_s: float
    row_s: float
    knee: int | None = None
    far_fixed_s: float = 0.0
    far_row_s: float = 0.0

    def forward(self, rows: int) -> float:
        if self.knee is not None and rows > self.knee:
            return self.far_fixed_s + self.far_row_s * rows
        return self.fixed_s + self.row_s * rows

    @classmethod
    def from_timings(cls, short: tuple[int, float], long: tuple[int, float],
                     longer: tuple[int, float] | None = None) -> "PrefillCost":
        """The line through two (rows, seconds) timings, the longer forward second, and with a
        third, longer one the line from the second to it past the second's rows (the two meet
        there). A per-row cost that comes out at or below zero (a noisy timing) is taken as a tiny
        one, so that padding never looks free and one forward is kept; a negative fixed cost as zero."""

        def line(a: tuple[int, float], b: tuple[int, float]) -> tuple[float, float]:
            (m0, t0), (m1, t1) = a, b
            row = max((t1 - t0) / (m1 - m0), 1e-9) if m1 > m0 else 1e-9
            return max(t0 - row * m0, 0.0), row

        fixed, row = line(short, long)
        if longer is None or longer[0] <= long[0]:
            return cls(fixed, row)
        far_fixed, far_row = line(long, longer)
        return cls(fixed, row, long[0], far_fixed, far_row)


class _Grouping:
    """`plan`'s DP over a set of prompts that grows a prompt at a time (session 42): `first_group`
    costs the groups i..j-1 for one i and j = i + 1, i + 2, ..., each `plan` of the one before and a
    prompt more, and re-running `plan` for each was ~1 ms of Python an admitting step for 16 waiting
    prompts of 90 tokens and ~8 ms for 16 of 10 (each run O(m^2) `fits` calls of O(m) each).

    The prompts are kept sorted by (length, id) as `plan` sorts them; `best[q]` / `cut[q]` are the DP's
    entries for the first q of them and `lo[q]` the lowest start a of a forward ending at q that the DP
    took (`fits(ids[a:q])` held for a = q - 2 down to `lo[q]`, and failed just below unless lo[q] = 0).
    A prompt inserted at p leaves the entries up to p as they were (the same prompts), and for an end
    past p the forwards that start past p hold the same prompts as before the insertion, one place
    earlier: their `fits` answers are read from the old `lo`; only forwards holding the new prompt ask
    `fits`, and none while the whole set fits in one forward (`fits` is subset-closed: prompts that
    fit together still fit without some of them; the engine's padded budget, context and RoPE rule
    are). 16 prompts of ~10 tokens under a 512-token budget: 136 questions where `plan` run for every
    group asked ~1000. The DP visits the starts in `plan`'s order with its tie rule, so every entry is the one
    `plan` computes over the same prompts (tests/engine/test_prefill_plan.py checks the results
    against the rule written as before, ties included)."""

    def __init__(self, cost: PrefillCost, fits: Callable[[list[int]], bool]):
        self.cost, self.fits = cost, fits
        self.keys: list[tuple[int, int]] = []  # (length, id), sorted
        self.ids: list[int] = []
        # the DP's entries for the first q sorted prompts: estimated seconds, forwards (ties go to
        # fewer), the last forward's start; lists apart, not tuples: this loop is the whole cost
        self.secs: list[float] = [0.0]
        self.fwds: list[int] = [0]
        self.cut: list[int] = [0]
        self.lo: list[int] = [0]
        self.whole = True  # the whole set fits in one forward: then so does every run of it

    def add(self, length: int, ident: int) -> None:
        keys, ids = self.keys, self.ids
        p = bisect.bisect_left(keys, (length, ident))
        keys.insert(p, (length, ident))
        ids.insert(p, ident)
        secs, fwds, cut, old_lo = self.secs, self.fwds, self.cut, self.lo
        del secs[p + 1:], fwds[p + 1:], cut[p + 1:]
        self.lo = lo = old_lo[:p + 1]
        fits, forward = self.fits, self.cost.forward
        if self.whole and len(ids) > 1:  # a set that does not fit stays so as prompts come
            self.whole = fits(ids[:])
        for q in range(p + 1, len(ids) + 1):
            T = keys[q - 1][0]  # the forward's longest: every row pads to it
            if self.whole:
                stop = 0  # every run fits: plan's loop would have heard yes down to the first prompt
            elif q > p + 1 and old_lo[q - 1] > p:
                stop = old_lo[q - 1] + 1  # the first run that did not fit holds no new prompt
            else:  # runs past p fit (as before); those from p down hold the new prompt: ask
                a = min(q - 2, p)
                while a >= 0 and fits(ids[a:q]):
                    a -= 1
                stop = a + 1
            # plan's update, start by start from q - 1 down: strictly less (by more than 1e-9 of
            # it), or as much (within 1e-9) in fewer forwards
            bs, bf, bc = float("inf"), 0, 0
            below, above = bs, bs
            for a in range(q - 1, stop - 1, -1):
                c = secs[a] + forward((q - a) * T)
                if c < below or (c <= above and fwds[a] + 1 < bf):
                    bs, bf, bc = c, fwds[a] + 1, a
                    below, above = c * (1 - 1e-9), c * (1 + 1e-9)
            secs.append(bs)
            fwds.append(bf)
            cut.append(bc)
            lo.append(stop)

    def runs(self) -> list[tuple[int, int]]:
        """The optimal grouping's forwards as (start, end) into the sorted prompts, last first."""
        out, j, cut = [], len(self.ids), self.cut
        while j > 0:
            out.append((cut[j], j))
            j = cut[j]
        return out

    def groups(self) -> list[list[int]]:
        return sorted(sorted(self.ids[i:j]) for i, j in self.runs())

    def total(self) -> float:
        """The grouping's estimated seconds, summed over its forwards in `groups`' order (as `plan`'s
        caller summed them: the same float)."""
        ids, keys, forward = self.ids, self.keys, self.cost.forward
        runs = self.runs()
        if len(runs) == 1:
            return forward(len(ids) * keys[-1][0])
        parts = sorted((min(ids[i:j]), forward((j - i) * keys[j - 1][0])) for i, j in runs)
        return sum(s for _, s in parts)


def plan(rest: list[int], cost: PrefillCost | None,
         fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """The prompts' indices (into `rest`, each prompt's remaining length) split into groups, one
    padded forward each. `fits(indices)`: whether those prompts may share one forward (the token
    budget, the context window; subset-closed: prompts that fit together fit without some of them);
    a single prompt always may. Without a cost: the rule before
    session 32, prompts in arrival order into the current group while it fits."""
    n = len(rest)
    if cost is None:
        groups: list[list[int]] = []
        for i in range(n):
            if groups and fits(groups[-1] + [i]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    # added longest last, each prompt only extends the DP by its own entry
    grouping = _Grouping(cost, fits)
    for i in sorted(range(n), key=lambda i: (rest[i], i)):
        grouping.add(rest[i], i)
    return grouping.groups()


def first_group(lengths: list[int], cost: PrefillCost, fits: Callable[[list[int]], bool],
                between_s: float = 0.0, budget: int | None = None) -> int:
    """How many of the waiting prompts (`lengths`: their token counts in arrival order, only those
    free slots can take) to admit this step: the first group of the split into consecutive groups,
    one step each, that minimises the summed time to first token. A group runs as `plan` splits it
    into forwards (`fits(indices)`: whether prompts may share a forward), costs those forwards'
    estimate and delays itself and every prompt after it; `between_s` (the running sequences'
    decode step between two admitting steps) delays every prompt after a group. `budget`: the most
    prompt tokens a step admits (more than one prompt). Groups stay in arrival order: no prompt is
    overtaken by a shorter one that came later. Returns at least 1 (0 for no prompts). `fits` is
    asked once for each set of prompts (its answer must depend on the prompts only)."""
    n = len(lengths)
    if n <= 1:
        return n
    # best[i]: (summed time to first token of prompts i..n-1, counted from the step that admits i,
    # the first group's size) - filled from the back: a group i..j-1 waits for nothing before it.
    # The group i..j-1's forwards are plan's over those prompts, grown a prompt at a time (_Grouping).
    # The same runs of prompts come up in the groups of many starts i (16 prompts of ~10 tokens:
    # 680 questions, 120 sets): `fits` is asked once a set (it answers by the prompts alone).
    answers: dict[tuple[int, ...], bool] = {}

    def fits_once(idx: list[int]) -> bool:
        key = tuple(idx)  # a set's prompts come in one order (sorted by length, then index)
        ok = answers.get(key)
        if ok is None:
            ok = answers[key] = fits(idx)
        return ok

    best: list[tuple[float, int]] = [(0.0, 0)] * (n + 1)
    for i in range(n - 1, -1, -1):
        cand_best, tokens = (float("inf"), 1), 0
        grouping = _Grouping(cost, fits_once)
        for j in range(i + 1, n + 1):
            tokens += lengths[j - 1]
            if j > i + 1 and budget is not None and tokens > budget:
                break
            grouping.add(lengths[j - 1], j - 1)
            after = n - j  # prompts that wait for this group's step and the decode step after it
            t = grouping.total() * (n - i) + (between_s * after if after else 0.0) + best[j][0]
            if t < cand_best[0] * (1 - 1e-9):  # ties: the smaller group (its first tokens leave sooner)
                cand_best = (t, j - i)
        best[i] = cand_best
    return best[0][1]
