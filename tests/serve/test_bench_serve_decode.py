"""benchmarks/bench_serve.py's decode figure apart from tok/s (`decode_ms`: a request's time after its first
token, a token) and its wait for a quiet host before a round (`quiet`, codeshell.bench.wait_quiet). Session 40
helper A: the 1-client tok/s of the 1.7B shape holds the prefill too, and a round that starts while another job
takes a core reads that job, not the code."""

from __future__ import annotations

import math
import sys
import types

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
bench_serve = pytest.importorskip("bench_serve")


def test_decode_ms_is_the_time_after_the_first_token_a_token():
    # 64 tokens in 4.3 s with the first at 0.7 s: 3.6 s for the 63 after it
    assert bench_serve.decode_ms(0.7, 64, 4.3) == pytest.approx(3600 / 63)
    assert bench_serve.decode_ms(0.5, 2, 0.6) == pytest.approx(100.0)


@pytest.mark.parametrize("ttft, tokens", [(None, 64), (0.5, 1), (0.5, 0), (0.5, None)])
def test_decode_ms_needs_a_first_token_and_one_after_it(ttft, tokens):
    assert bench_serve.decode_ms(ttft, tokens, 1.0) is None


def test_median_or_nan_skips_requests_without_a_figure():
    assert bench_serve.median_or_nan([None, 3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(bench_serve.median_or_nan([None]))


def test_quiet_is_off_by_default_and_notes_its_wait(monkeypatch):
    assert bench_serve.quiet(types.SimpleNamespace(quiet_wait=0.0, quiet_cores=0.2)) == ""
    calls = []

    def fake_wait(max_cores, window_s, timeout_s):
        calls.append((max_cores, window_s, timeout_s))
        return 3.2, 0.05

    monkeypatch.setattr(bench_serve, "wait_quiet", fake_wait)
    note = bench_serve.quiet(types.SimpleNamespace(quiet_wait=30.0, quiet_cores=0.15))
    assert calls == [(0.15, 1.0, 30.0)]
    assert note == "; waited 3 s for quiet (last 0.05 cores)"


def test_cli_takes_the_quiet_options():
    src = (REPO / "benchmarks" / "bench_serve.py").read_text()
    assert '"--quiet-wait"' in src and '"--quiet-cores"' in src


def test_read_probe_reads_a_rate_and_the_note_says_it(monkeypatch):
    assert bench_serve.read_probe(mib=8) > 0
    monkeypatch.setattr(bench_serve, "read_probe", lambda: 41.25)
    assert bench_serve.quiet(types.SimpleNamespace(quiet_wait=0, read_probe=True)) == "; read probe 41.2 GB/s"
