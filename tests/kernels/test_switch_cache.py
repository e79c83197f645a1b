"""Session 29 helper C: the switches' cache (codeshell/kernels/csrc/switches.h). env_flag / env_int /
env_is read a CODESHELL_* variable through a per-thread cache valid while `environ`'s fingerprint (its
address, entry count and entry pointers) is unchanged; inside an EnvScope (a decode step's call) the
fingerprint is checked once. A switch set, unset, set again with another value or replaced between
calls in one process (os.environ / monkeypatch, i.e. glibc's setenv / unsetenv) is seen by the next
call; CODESHELL_ENV_CACHE=0 reads with getenv as before; a decode step's switch (CODESHELL_STEP_PF: the
prefetch side jobs, counted) follows the environment from one call to the next."""

from __future__ import annotations

import os

import pytest
import torch

from codeshell.kernels import _ext, available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable")

from test_decode_step import tiny, two_threads  # noqa: E402,F401

A, B = "CODESHELL_TEST_SWITCH_A", "CODESHELL_TEST_SWITCH_B"


def test_set_unset_set_again(monkeypatch):
    mod = _ext.get()
    monkeypatch.delenv(A, raising=False)
    monkeypatch.delenv(B, raising=False)
    assert mod.env_switches([A, B]) == [None, None]
    assert mod.env_switches([A, B]) == [None, None]  # cached: the same answer
    monkeypatch.setenv(A, "1")
    assert mod.env_switches([A, B]) == ["1", None]
    monkeypatch.delenv(A)
    assert mod.env_switches([A, B]) == [None, None]
    monkeypatch.setenv(A, "7")  # set again, another value
    assert mod.env_switches([A, B]) == ["7", None]
    monkeypatch.setenv(A, "8")  # replaced in place (the entry count unchanged)
    assert mod.env_switches([A]) == ["8"]
    monkeypatch.setenv(A, "7")  # back to a value set before (glibc may reuse its string)
    assert mod.env_switches([A]) == ["7"]
    monkeypatch.setenv(B, "off")
    assert mod.env_switches([A, B]) == ["7", "off"]
    monkeypatch.delenv(A)  # an entry removed before B's: the entries after it shift down
    assert mod.env_switches([A, B]) == [None, "off"]
    monkeypatch.setenv(A, "")
    assert mod.env_switches([A, B]) == ["", "off"]


def test_many_changes_against_getenv(monkeypatch):
    """A random walk of sets, replaces and unsets over a few names (and another variable's churn),
    each read through the cache equal to os.environ."""
    import random

    mod = _ext.get()
    rng = random.Random(29)
    names = [f"CODESHELL_TEST_SWITCH_{i}" for i in range(6)]
    for n in names:
        monkeypatch.delenv(n, raising=False)
    for _ in range(400):
        n = rng.choice(names)
        if rng.random() < 0.35:
            monkeypatch.delenv(n, raising=False)
        else:
            monkeypatch.setenv(n, str(rng.randrange(4)))
        assert mod.env_switches(names) == [os.environ.get(x) for x in names]


def test_cache_hits_and_fingerprint(monkeypatch):
    mod = _ext.get()
    monkeypatch.setenv(A, "3")
    mod.env_switches([A])
    checks0, changes0, lookups0, off = mod.env_cache_stats()
    assert not off
    for _ in range(10):
        assert mod.env_switches([A, B]) == ["3", os.environ.get(B)]
    checks, changes, lookups, _ = mod.env_cache_stats()
    assert changes == changes0  # nothing changed: no re-read
    assert checks - checks0 == 20 and lookups - lookups0 == 20
    monkeypatch.setenv(A, "4")
    assert mod.env_switches([A]) == ["4"]
    assert mod.env_cache_stats()[1] == changes + 1


def test_cache_off_switch(monkeypatch):
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_ENV_CACHE", "0")
    monkeypatch.setenv(A, "5")
    assert mod.env_switches([A]) == ["5"]
    _, _, lookups0, off = mod.env_cache_stats()
    assert off
    monkeypatch.setenv(A, "6")
    assert mod.env_switches([A]) == ["6"]
    assert mod.env_cache_stats()[2] == lookups0  # getenv, not the table
    monkeypatch.delenv("CODESHELL_ENV_CACHE")
    assert mod.env_switches([A]) == ["6"]
    assert not mod.env_cache_stats()[3]


def test_scope_reads_once(monkeypatch):
    """Inside a scope (one native call) the switches are those of the call's start; the next read
    outside sees the change."""
    mod = _ext.get()
    monkeypatch.setenv(A, "1")

    def change():
        os.environ[A] = "2"

    before, after = mod.env_switches_scoped([A], change)
    assert before == ["1"] and after == ["1"]
    assert mod.env_switches([A]) == ["2"]
    before, after = mod.env_switches_scoped([A], lambda: os.environ.pop(A))
    assert before == ["2"] and after == ["2"]
    assert mod.env_switches([A]) == [None]


def test_decode_step_follows_the_switch(monkeypatch, two_threads):  # noqa: F811
    """A switch the decode step reads in its call (CODESHELL_STEP_PF: side jobs posted at batch 1)
    set, unset, and set again between calls: each call follows the environment of its start."""
    from codeshell.engine.kv_cache import KVCache

    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
    m = tiny("int8")
    layers = m.cfg.n_layer
    cache = KVCache(m.cfg, 2, 64, torch.bfloat16)

    def posts_of_one_step(pos):
        p0, _ = mod.team_side_jobs()
        with torch.inference_mode():
            assert step_mod.decode(m, cache, [5], [pos], [0]) is not None
        return mod.team_side_jobs()[0] - p0

    posts_of_one_step(0)  # builds the step
    assert step_mod._DECODERS[m].step.uses_team
    l3_known = os.path.exists("/sys/devices/system/cpu/cpu0/cache/index3/size")
    unset = 0 if l3_known else 3 * layers + 1
    seq = [("1", 3 * layers + 1), (None, unset), ("0", 0), ("1", 3 * layers + 1), ("0", 0), (None, unset),
           ("1", 3 * layers + 1)]
    for i, (v, want) in enumerate(seq):
        if v is None:
            monkeypatch.delenv("CODESHELL_STEP_PF", raising=False)
        else:
            monkeypatch.setenv("CODESHELL_STEP_PF", v)
        assert posts_of_one_step(1 + i) == want, (i, v)
