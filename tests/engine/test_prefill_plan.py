"""The prefill grouping (codeshell/engine/prefill_plan.py): for a given cost table, `plan` finds the
grouping of least estimated cost among all groupings that fit (checked against every partition of
small sets), keeps one forward where the fixed cost outweighs the padding, gives a mostly cached
prompt a forward of its own where its padding costs more, keeps to `fits`, and lists groups in
arrival order; without a cost table it is the rule before session 32 (one forward while they fit).
`first_group` (how many waiting prompts a step admits) is checked the same way: against every split
into consecutive groups, by the summed time to first token it claims to minimise. Both keep the
results of the rule as written before session 42 (`plan` re-run for every candidate group, kept here
as `plan_before` / `first_group_before`) on random sets, ties and odd `fits` included, with fewer
`fits` calls."""

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


# ---- session 42: the group cost grown a prompt at a time (prefill_plan._Grouping) -------------------
def plan_before(rest, cost, fits):
    """`plan` with a cost as written before session 42 (one DP over the sorted prompts)."""
    n = len(rest)
    order = sorted(range(n), key=lambda i: (rest[i], i))
    best = [(0.0, 0)] + [(float("inf"), 0)] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        T = rest[order[j - 1]]
        for i in range(j - 1, -1, -1):
            if i < j - 1 and not fits(order[i:j]):
                break
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


def first_group_before(lengths, cost, fits, between_s=0.0, budget=None):
    """`first_group` as written before session 42: `plan_before` re-run for every candidate group."""
    n = len(lengths)
    if n <= 1:
        return n

    def group_s(i, j):
        sub = lengths[i:j]
        return sum(cost.forward(len(g) * max(sub[k] for k in g))
                   for g in plan_before(sub, cost, lambda idx: fits([i + k for k in idx])))

    best = [(0.0, 0)] * (n + 1)
    for i in range(n - 1, -1, -1):
        cand_best, tokens = (float("inf"), 1), 0
        for j in range(i + 1, n + 1):
            tokens += lengths[j - 1]
            if j > i + 1 and budget is not None and tokens > budget:
                break
            after = n - j
            t = group_s(i, j) * (n - i) + (between_s * after if after else 0.0) + best[j][0]
            if t < cand_best[0] * (1 - 1e-9):
                cand_best = (t, j - i)
        best[i] = cand_best
    return best[0][1]


class Counted:
    """A `fits` that counts its calls; `kind` picks the rule: the engine's padded budget, a budget on
    the summed tokens, or pairs of prompts that may not share a forward (drawn at random: fits that
    follow no length order). All subset-closed, as `plan` asks."""

    def __init__(self, lengths, kind, limit, seed):
        self.lengths, self.kind, self.limit, self.calls = lengths, kind, limit, 0
        rng = random.Random(seed)
        n = len(lengths)
        self.apart = {(a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.1}

    def __call__(self, idx):
        self.calls += 1
        if self.kind == "padded":
            return len(idx) * max(self.lengths[i] for i in idx) <= self.limit
        if self.kind == "summed":
            return sum(self.lengths[i] for i in idx) <= self.limit
        return not any((a, b) in self.apart for a in idx for b in idx)


def random_case(rng):
    n = rng.randint(1, 16)
    spread = rng.choice([0, 1, 3, 40, 200])  # 0: all one length (ties everywhere)
    base = rng.choice([1, 10, 30, 90])
    lengths = [base + rng.randint(0, spread) for _ in range(n)]
    fixed = rng.choice([0.0, 0.01, 0.06, 0.5, 5.0])
    row = rng.choice([1e-4, 0.0065, 0.02])
    if rng.random() < 0.4:
        cost = PrefillCost.from_timings((8, fixed + 8 * row), (72, fixed + 72 * row),
                                        (216, rng.uniform(0.3, 1.2) * (fixed + 216 * row)))
    else:
        cost = PrefillCost(fixed, row)
    return lengths, cost


@pytest.mark.parametrize("seed", range(300))
def test_grouping_keeps_the_results_before(seed):
    # the same groups and admissions as the rule before (exact equality: ties, float sums), for the
    # engine's padded budget and two other subset-closed rules
    rng = random.Random(1000 + seed)
    lengths, cost = random_case(rng)
    kind = rng.choice(["padded", "summed", "apart"])
    limit = rng.choice([10 ** 9, 150, 512])
    between = rng.choice([0.0, 0.005, 0.08, 0.25, 2.0])
    budget = rng.choice([None, 200, 512])
    new, old = Counted(lengths, kind, limit, seed), Counted(lengths, kind, limit, seed)
    assert plan(lengths, cost, new) == plan_before(lengths, cost, old)
    assert new.calls <= old.calls + len(lengths)  # at most one whole-set question more a prompt
    assert first_group(lengths, cost, new, between, budget) == first_group_before(lengths, cost, old, between, budget)


def test_grouping_fewer_fits_calls_on_a_burst():
    # 16 prompts of ~10 tokens under the engine's 512-token budget (every group fits): the rule before
    # asked fits for every run of every candidate group (~1000 questions); grown, a group whose whole
    # set fits asks once (136)
    rng = random.Random(7)
    lengths = [10 + rng.randint(-2, 3) for _ in range(16)]
    cost = PrefillCost(0.06, 0.0065)
    new, old = Counted(lengths, "padded", 512, 0), Counted(lengths, "padded", 512, 0)
    assert first_group(lengths, cost, new, 0.25, 512) == first_group_before(lengths, cost, old, 0.25, 512)
    assert new.calls <= 136 < old.calls // 5, (new.calls, old.calls)


def test_grouping_grown_in_any_order_is_plan():
    # the group's DP after prompts added in arrival order (inserted anywhere in the sorted order)
    # equals plan's over the same prompts, groups and summed cost
    from codeshell.engine.prefill_plan import _Grouping
    rng = random.Random(3)
    for _ in range(200):
        lengths, cost = random_case(rng)
        fits = Counted(lengths, "padded", rng.choice([150, 512, 10 ** 9]), 0)
        g = _Grouping(cost, fits)
        for i, n in enumerate(lengths):
            g.add(n, i)
            sub = lengths[:i + 1]
            want = plan_before(sub, cost, fits)
            assert g.groups() == want
            assert g.total() == sum(cost.forward(len(x) * max(sub[k] for k in x)) for x in want)
