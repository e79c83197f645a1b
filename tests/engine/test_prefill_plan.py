"""The prefill grouping (codeshell/engine/prefill_plan.py): for a given cost table, `plan` finds the
grouping of least estimated cost among all groupings that fit (checked against every partition of
small sets), keeps one forward where the fixed cost outweighs the padding, gives a mostly cached
prompt a forward of its own where its padding costs more, keeps to `fits`, and lists groups in
arrival order; without a cost table it is the rule before session 32 (one forward while they fit).
`first_group` (how many waiting prompts a step admits) is checked the same way: against every split
into consecutive groups, by the summed time to first token it claims to minimise."""

from __future__ import annotations

import random

import pytest

from codeshell.engine.prefill_plan import PrefillCost, first_group, plan


def cost_of(groups, rest, cost):
    return sum(cost.forward(len(g) * max(rest[i] for i in g)) for g in groups)


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        for k in range(len(p)):
            yield p[:k] + [[first] + p[k]] + p[k + 1:]
        yield [[first]] + p


def always(_):
    return True


def test_fixed_cost_dominates_one_forward():
    # the session-31 test group: 130 of its 200 rows padding, one forward on small models
    rest = [3, 40, 1, 17, 9]
    assert plan(rest, PrefillCost(fixed_s=1.0, row_s=1e-3), always) == [[0, 1, 2, 3, 4]]


def test_cached_prompt_gets_its_own_forward():
    # 4 clients after a 1-client round: prompt 0 cached (1 token left), the others ~93 tokens;
    # a 1.7B bf16 forward is ~5 rows' worth of fixed cost: [1] + [3 x 93] (280 rows) beats [4 x 93] (372)
    rest = [1, 93, 92, 93]
    cost = PrefillCost(fixed_s=0.1, row_s=0.02)
    assert plan(rest, cost, always) == [[0], [1, 2, 3]]
    # with a fixed cost of 100 rows the padding is cheaper: one forward
    assert plan(rest, PrefillCost(fixed_s=2.0, row_s=0.02), always) == [[0, 1, 2, 3]]


def test_no_padding_no_split():
    # equal lengths: splitting saves no rows and costs forwards, even at a zero fixed cost
    assert plan([50, 50, 50], PrefillCost(0.0, 1.0), always) == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(30))
def test_least_cost_of_all_groupings(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    rest = [rng.randint(1, 120) for _ in range(n)]
    cost = PrefillCost(fixed_s=rng.choice([0.0, 0.5, 3.0, 20.0, 200.0]), row_s=1.0)
    limit = rng.choice([10 ** 9, 150, 250])

    def fits(idx):
        return len(idx) * max(rest[i] for i in idx) <= limit

    got = plan(rest, cost, fits)
    assert sorted(i for g in got for i in g) == list(range(n))  # every prompt once
    assert all(len(g) == 1 or fits(g) for g in got)
    assert [g[0] for g in got] == sorted(g[0] for g in got) and all(g == sorted(g) for g in got)
    best = min(cost_of(p, rest, cost) for p in partitions(list(range(n)))
               if all(len(g) == 1 or fits(g) for g in p))
    assert cost_of(got, rest, cost) == pytest.approx(best)


def test_without_a_cost_the_old_rule():
    rest = [10, 10, 10, 20, 5]

    def fits(idx):
        return len(idx) * max(rest[i] for i in idx) <= 32

    # in arrival order into the current group while it fits (test_batched_prefill's budget case)
    assert plan(rest, None, fits) == [[0, 1, 2], [3], [4]]
    assert plan([3, 40, 1, 17, 9], None, always) == [[0, 1, 2, 3, 4]]


def test_cost_from_timings():
    c = PrefillCost.from_timings((8, 0.3), (72, 1.58))
    assert c.row_s == pytest.approx(0.02) and c.fixed_s == pytest.approx(0.14)
    # noise: a longer forward timed no slower keeps padding from looking free, the fixed cost >= 0
    c = PrefillCost.from_timings((8, 0.3), (72, 0.2))
    assert c.row_s > 0 and c.fixed_s >= 0
    c = PrefillCost.from_timings((8, 0.1), (72, 10.0))
    assert c.fixed_s == 0.0


def test_cost_with_a_knee():
    # the 1.7B q4_0 model's shape: 8 rows on the decode kernels, 72 and 216 on the prefill GEMMs with
    # a per-call repack: the line through 8 and 72 overstates 5 prompts of 90 tokens by ~2x
    c = PrefillCost.from_timings((8, 0.13), (72, 0.80), (216, 1.50))
    assert c.knee == 72 and c.row_s == pytest.approx(0.67 / 64)
    assert c.far_row_s == pytest.approx(0.70 / 144) and c.far_fixed_s == pytest.approx(0.80 - 72 * 0.70 / 144)
    assert c.forward(72) == pytest.approx(0.80) and c.forward(216) == pytest.approx(1.50)
    assert c.forward(8) == pytest.approx(0.13) and c.forward(450) == pytest.approx(c.far_fixed_s + 450 * c.far_row_s)
    # a third timing no longer than the second: one line, as before
    assert PrefillCost.from_timings((8, 0.1), (72, 0.5), (72, 0.6)).knee is None
    # the knee changes the admission: 5 prompts of 90 arriving together share steps where the far
    # line says a forward's repack outweighs a prompt's rows; one line: a prompt a step
    assert first_group([90] * 5, c, always, 0.08) == 3
    assert first_group([90] * 5, PrefillCost.from_timings((8, 0.13), (72, 0.80)), always, 0.08) == 1


def ttft_sum(sizes, lengths, cost, between_s, fits):
    """Summed time to first token of the prompts admitted in consecutive groups of `sizes`, one
    step a group (its forwards as `plan` splits it), a decode step of `between_s` between steps."""
    t, total, i = 0.0, 0.0, 0
    for g, k in enumerate(sizes):
        sub = lengths[i:i + k]
        step = sum(cost.forward(len(f) * max(sub[m] for m in f))
                   for f in plan(sub, cost, lambda idx, i=i: fits([i + m for m in idx])))
        t += (between_s if g else 0.0) + step
        total += k * t
        i += k
    return total


def compositions(n):
    if n == 0:
        yield []
        return
    for k in range(1, n + 1):
        for rest in compositions(n - k):
            yield [k] + rest


def test_first_group_one_prompt_a_step_where_rows_dominate():
    # 4 clients of ~90 tokens on the 1.7B bf16 model (a row ~7 ms, a forward ~50 ms fixed, a
    # decode step ~80 ms): a prompt a step (p50 of the first tokens after 2 and 3 prompts' rows,
    # not all 4 prompts' rows)
    assert first_group([90, 91, 89, 90], PrefillCost(0.05, 0.007), always, 0.08) == 1
    # small models: the fixed cost outweighs a prompt's rows, all in one forward
    assert first_group([90, 91, 89, 90], PrefillCost(1.0, 1e-4), always, 0.002) == 4
    assert first_group([], PrefillCost(0.05, 0.007), always) == 0
    assert first_group([40], PrefillCost(0.05, 0.007), always) == 1


def test_first_group_keeps_to_the_budget():
    lengths = [30, 30, 30, 30]
    # a huge fixed cost wants one step; the step's budget takes two prompts
    assert first_group(lengths, PrefillCost(100.0, 1e-3), always, budget=60) == 2
    # the padded rule splits a step into forwards, it does not end the step: [20, 5] in one step
    # (two forwards) where a decode step between two steps costs as much as a forward
    fits = lambda idx: len(idx) * max([20, 5, 40][i] for i in idx) <= 32  # noqa: E731
    assert first_group([20, 5, 40], PrefillCost(1.0, 1e-3), fits, 1.0, budget=32) == 2
    # with no decode step between, [20] alone: its first token leaves a forward sooner
    assert first_group([20, 5, 40], PrefillCost(1.0, 1e-3), fits, 0.0, budget=32) == 1


@pytest.mark.parametrize("seed", range(40))
def test_first_group_least_summed_ttft(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    lengths = [rng.randint(1, 120) for _ in range(n)]
    cost = PrefillCost(fixed_s=rng.choice([0.0, 0.5, 3.0, 20.0, 200.0]), row_s=1.0)
    between = rng.choice([0.0, 5.0, 50.0, 500.0])
    limit = rng.choice([10 ** 9, 150, 250])
    budget = rng.choice([None, 200, 400])

    def fits(idx):
        return len(idx) * max(lengths[i] for i in idx) <= limit

    def ok(sizes):
        i = 0
        for k in sizes:
            if k > 1 and budget is not None and sum(lengths[i:i + k]) > budget:
                return False
            i += k
        return True

    k = first_group(lengths, cost, fits, between, budget)
    assert 1 <= k <= n and (k == 1 or budget is None or sum(lengths[:k]) <= budget)
    best = min(ttft_sum(c, lengths, cost, between, fits) for c in compositions(n) if ok(c))
    mine = min(ttft_sum(c, lengths, cost, between, fits) for c in compositions(n) if ok(c) and c[0] == k)
    assert mine == pytest.approx(best)
