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


def plan(rest: list[int], cost: PrefillCost | None,
         fits: Callable[[list[int]], bool]) -> list[list[int]]:
    """The prompts' indices (into `rest`, each prompt's remaining length) split into groups, one
    padded forward each. `fits(indices)`: whether those prompts may share one forward (the token
    budget, the context window); a single prompt always may. Without a cost: the rule before
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
    order = sorted(range(n), key=lambda i: (rest[i], i))
    # best[j]: (estimated seconds, forwards) of the first j sorted prompts; ties go to fewer forwards
    best: list[tuple[float, int]] = [(0.0, 0)] + [(float("inf"), 0)] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        T = rest[order[j - 1]]  # the group's longest: every row pads to it
        for i in range(j - 1, -1, -1):
            if i < j - 1 and not fits(order[i:j]):
                break  # a longer group (more prompts, same length) fits even less
            c, f = best[i]
            cand = (c + cost.forward((j - i) * T), f + 1)
            if cand[0] < best[j][0] * (1 - 1e-9) or (cand[0] <= best[j][0] * (1 + 1e-9) and cand[1] < best[j][1]):
                best[j], cut[j] = cand, i
    groups = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    groups.sort(key=lambda g: g[0])
    return groups


def first_group(lengths: list[int], cost: PrefillCost, fits: Callable[[list[int]], bool],
                between_s: float = 0.0, budget: int | None = None) -> int:
    """How many of the waiting prompts (`lengths`: their token counts in arrival order, only those
    free slots can take) to admit this step: the first group of the split into consecutive groups,
    one step each, that minimises the summed time to first token. A group runs as `plan` splits it
    into forwards (`fits(indices)`: whether prompts may share a forward), costs those forwards'
    estimate and delays itself and every prompt after it; `between_s` (the running sequences'
    decode step between two admitting steps) delays every prompt after a group. `budget`: the most
    prompt tokens a step admits (more than one prompt). Groups stay in arrival order: no prompt is
    overtaken by a shorter one that came later. Returns at least 1 (0 for no prompts)."""
    n = len(lengths)
    if n <= 1:
        return n

    def group_s(i: int, j: int) -> float:  # prompts i..j-1 in one step: plan's forwards
        sub = lengths[i:j]
        return sum(cost.forward(len(g) * max(sub[k] for k in g))
                   for g in plan(sub, cost, lambda idx: fits([i + k for k in idx])))

    # best[i]: (summed time to first token of prompts i..n-1, counted from the step that admits i,
    # the first group's size) - filled from the back: a group i..j-1 waits for nothing before it
    best: list[tuple[float, int]] = [(0.0, 0)] * (n + 1)
    for i in range(n - 1, -1, -1):
        cand_best, tokens = (float("inf"), 1), 0
        for j in range(i + 1, n + 1):
            tokens += lengths[j - 1]
            if j > i + 1 and budget is not None and tokens > budget:
                break
            after = n - j  # prompts that wait for this group's step and the decode step after it
            t = group_s(i, j) * (n - i) + (between_s * after if after else 0.0) + best[j][0]
            if t < cand_best[0] * (1 - 1e-9):  # ties: the smaller group (its first tokens leave sooner)
                cand_best = (t, j - i)
        best[i] = cand_best
    return best[0][1]
