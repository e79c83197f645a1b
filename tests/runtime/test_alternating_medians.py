"""`codeshell.bench.alternating_medians`, the timing loop of the kernel A/B scripts: the order of
the candidates' turns, the warm-up round left out, and each candidate's environment switches set
around its own calls only."""

import os

from codeshell.bench import alternating_medians


def _recorder(log, name, var):
    return lambda: log.append((name, os.environ.get(var)))


def test_turns_alternate_warm_up_is_not_counted_and_switches_stay_with_their_candidate(monkeypatch):
    var = "CODESHELL_TEST_AB_SWITCH"
    monkeypatch.setenv(var, "from-the-shell")  # a switch the variants name is cleared for "-"
    log = []
    fns = {n: _recorder(log, n, var) for n in ("-", "on", "two")}
    env = {"-": {}, "on": {var: "1"}, "two": {var: "2"}}
    med = alternating_medians(fns, reps=2, rounds=3, env=env)
    assert set(med) == set(fns) and all(t >= 0 for t in med.values())
    # 1 warm-up + 3 rounds, 2 calls a turn, the candidates taking turns in their order
    assert [n for n, _ in log] == [n for _ in range(4) for n in ("-", "-", "on", "on", "two", "two")]
    assert {n: {v for m, v in log if m == n} for n in fns} == {"-": {None}, "on": {"1"}, "two": {"2"}}
    assert var not in os.environ  # cleared after the last turn


def test_rotate_starts_each_round_at_the_next_candidate():
    log = []
    fns = {n: (lambda n=n: log.append(n)) for n in "abc"}
    alternating_medians(fns, reps=1, rounds=3, rotate=True)
    assert log == list("abc" "bca" "cab" "abc")
