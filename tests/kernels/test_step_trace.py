"""Session 27 helper C: the native decode step's call trace (decode_step.cpp Profile::trace,
`DecodeStep.trace_times`), which benchmarks/bench_decode_phases.py --trace uses to split the time
between two batch-1 tokens: one record per `decode` call while the profile is on, none while it is
off, cleared when the profile is set (on or off); each record's stamps in order (entry <= body start <= body end <=
exit) on the clock of Python's time.perf_counter_ns (inside the window of the Python call around
it), and the wake flag 0 or 1 (0 without a team)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from codeshell.kernels import available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable")

from test_decode_step import tiny, two_threads  # noqa: E402,F401


@pytest.mark.parametrize("team", ["on", "off"])
def test_trace_records_calls_on_the_python_clock(team, monkeypatch, two_threads):  # noqa: F811
    from codeshell.engine.kv_cache import KVCache

    monkeypatch.setenv("CODESHELL_DECODE_TEAM", team)
    m = tiny("int8")
    cache = KVCache(m.cfg, 2, 64, torch.bfloat16)

    def step(tok, pos):
        with torch.inference_mode():
            out = step_mod.decode(m, cache, [tok], [pos], [0])
        assert out is not None
        return out

    step(3, 0)  # builds the step
    st = step_mod._DECODERS[m].step
    step(4, 1)
    assert st.trace_times() == []  # the profile is off
    st.profile = True
    windows = []
    for i in range(12):
        t0 = time.perf_counter_ns()
        step(5 + i, 2 + i)
        windows.append((t0, time.perf_counter_ns()))
    tr = st.trace_times()
    assert len(tr) == len(windows)
    assert all(r[4] in ((0, 1) if team == "on" else (0,)) for r in tr)
    for (t0, t1), (entry, body, body_end, exit_, _) in zip(windows, tr):
        assert t0 <= entry <= body <= body_end <= exit_ <= t1
    st.profile = False  # setting it clears the trace, as the phase sums
    step(20, 14)
    assert st.trace_times() == []  # off: no record
    st.profile = True
    step(21, 15)
    assert len(st.trace_times()) == 1
    st.profile = True  # on again: cleared
    assert st.trace_times() == []
    st.profile = False


def test_team_helper_spins_by_the_clock_then_sleeps(monkeypatch, two_threads):  # noqa: F811
    """CODESHELL_TEAM_IDLE_US (parallel.h Team::set_idle_ns): after a step the team's helper spins that
    long, then sleeps: steps closer than that find it awake (no wake), a step after a longer pause wakes
    it, and an idle process burns no core once the spin is over."""
    from codeshell.engine.kv_cache import KVCache

    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
    monkeypatch.setenv("CODESHELL_STEP_PF", "0")  # no side job keeps the helper busy after a step
    m = tiny("int8")
    cache = KVCache(m.cfg, 2, 64, torch.bfloat16)
    pos = iter(range(64))

    def step():
        with torch.inference_mode():
            assert step_mod.decode(m, cache, [5], [next(pos)], [0]) is not None

    step()
    st = step_mod._DECODERS[m].step
    if not st.uses_team or torch.get_num_threads() < 2:
        pytest.skip("no thread team")
    monkeypatch.setenv("CODESHELL_TEAM_IDLE_US", "200000")  # 0.2 s: steps 10 ms apart never find it asleep
    for _ in range(3):
        step()
    time.sleep(0.05)  # the helper woken by those steps got a core by now (on a loaded host it may wait)
    st.profile = True
    for _ in range(6):
        step()
        time.sleep(0.01)
    # none on a quiet host (at most one). On a loaded one the spin's clock runs while the helper waits
    # for a core (a CI run at load 10 on 2 cores counted 2 of 6, a nice-19 run under that load 4): there
    # only fewer than six. The spin of before session 27 (0.23 ms here) slept before each of the six.
    wakes = sum(r[4] for r in st.trace_times())
    loaded = os.getloadavg()[0] > (os.cpu_count() or 1)
    assert wakes < 6 if loaded else wakes <= 1, (wakes, os.getloadavg())
    monkeypatch.setenv("CODESHELL_TEAM_IDLE_US", "0")  # sleeps right after a step
    step()
    st.profile = True
    for _ in range(4):
        time.sleep(0.02)
        step()
    assert [r[4] for r in st.trace_times()] == [1, 1, 1, 1]
    monkeypatch.setenv("CODESHELL_TEAM_IDLE_US", "1000")  # the default: 1 ms, then asleep
    step()
    time.sleep(0.05)
    c0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - c0 < 0.05  # no core spinning while idle
    st.profile = False


def test_profile_marks_sum_to_the_phase_sums(monkeypatch, two_threads):  # noqa: F811
    """Session 36 helper A: `DecodeStep.profile_marks` (decode_step.cpp Profile::marks, which
    benchmarks/bench_step_bytes.py --calls takes per-call quantiles of) holds every phase mark in order:
    none while the profile is off, cleared when it is set, each linear phase once a layer a call, and the
    marks of a phase sum to its `profile_times` seconds."""
    from codeshell.engine.kv_cache import KVCache

    m = tiny("int4")
    cache = KVCache(m.cfg, 2, 64, torch.bfloat16)

    def step(tok, pos):
        with torch.inference_mode():
            assert step_mod.decode(m, cache, [tok], [pos], [0]) is not None

    step(3, 0)  # builds the step
    st = step_mod._DECODERS[m].step
    step(4, 1)
    assert st.profile_marks() == []  # the profile is off
    st.profile = True
    for i in range(5):
        step(5 + i, 2 + i)
    marks = st.profile_marks()
    calls, sums = st.profile_times()
    assert calls == 5
    by: dict[str, list[int]] = {}
    for name, ns in marks:
        assert ns >= 0
        by.setdefault(name, []).append(ns)
    for name in ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"):
        assert len(by[name]) == 5 * m.cfg.n_layer, name
    for name, sec in sums:
        assert sum(by.get(name, [])) == pytest.approx(sec * 1e9, abs=1.0), name
    st.profile = True  # on again: cleared
    assert st.profile_marks() == []
    st.profile = False
    step(20, 14)
    assert st.profile_marks() == []
