"""Session 26 helper C: the batch-1 decode step's prefetch side jobs (step_state.h StepPf,
parallel.h Team::prefetch_async): while the master runs a serial stretch alone, the team's helper
prefetches the next linear's first bytes. Prefetches only: the engine's logits, greedy tokens and KV
cache are bit for bit the Python path's with the jobs on (every hint, the helpers' shares only, a
budget smaller than a share and larger than the linear) and off; the jobs are posted exactly where
they are meant to (3 a layer and 1 after the argmax at batch 1, none at batch > 1 or with
CODESHELL_STEP_PF=0), a helper takes at most those, and the team's loop count (Team::loops, which other tests
count) does not include them."""

from __future__ import annotations

import os

import pytest
import torch

from codeshell.kernels import _ext, available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable")

from test_decode_step import assert_same_runs, native_calls, prompts, tiny, two_threads  # noqa: E402,F401


@pytest.mark.parametrize("env", [
    {"CODESHELL_STEP_PF": "0"},
    {},  # the defaults
    {"CODESHELL_STEP_PF_HINT": "0", "CODESHELL_STEP_PF_KB": "1"},
    {"CODESHELL_STEP_PF_HINT": "1", "CODESHELL_STEP_PF_OWN": "1", "CODESHELL_STEP_PF_END_KB": "0"},
    {"CODESHELL_STEP_PF_HINT": "3", "CODESHELL_STEP_PF_KB": "100000", "CODESHELL_STEP_PF_END_KB": "100000"},
], ids=["off", "default", "t0-1k", "t1-own-noend", "nta-huge"])
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_prefetch_jobs_bitwise(kind, env, monkeypatch, native_calls, two_threads):  # noqa: F811
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
    m = tiny(kind)
    assert_same_runs(m, monkeypatch, native_calls, prompts(1))  # batch 1: the jobs run
    assert_same_runs(m, monkeypatch, native_calls, prompts(3), max_tokens=[2, 9, 5])  # batch 3 -> 1


def test_prefetch_jobs_posted_where_meant(monkeypatch, two_threads):  # noqa: F811
    from codeshell.engine.kv_cache import KVCache

    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
    m = tiny("int8")
    layers = m.cfg.n_layer
    cache = KVCache(m.cfg, 4, 64, torch.bfloat16)

    def step(tokens, pos, slots):
        with torch.inference_mode():
            out = step_mod.decode(m, cache, tokens, pos, slots)
        assert out is not None
        return out

    step([3], [0], [0])  # builds the step
    assert step_mod._DECODERS[m].step.uses_team
    for env, rows, want in (("1", 1, 3 * layers + 1), ("0", 1, 0), ("1", 3, 0)):
        monkeypatch.setenv("CODESHELL_STEP_PF", env)
        posts0, runs0 = mod.team_side_jobs()
        n = 20
        for i in range(n):
            step([5 + r for r in range(rows)], [1 + i] * rows, list(range(rows)))
        posts, runs = mod.team_side_jobs()
        assert posts - posts0 == n * want
        # a job a helper did not take before the master's next loop is withdrawn (how many it takes
        # depends on the scheduler: a loaded host may never run the helper in time)
        assert 0 <= runs - runs0 <= posts - posts0
        # the side jobs never run the step's own loops: the results are the same either way
    # unset, the jobs run only for a model larger than 3/4 of the last-level cache (a tiny model's
    # weights are already there); where the cache size is unknown, they run
    monkeypatch.delenv("CODESHELL_STEP_PF")
    posts0, _ = mod.team_side_jobs()
    step([5], [25], [0])
    posts, _ = mod.team_side_jobs()
    l3_known = os.path.exists("/sys/devices/system/cpu/cpu0/cache/index3/size")
    assert posts - posts0 == (0 if l3_known else 3 * layers + 1)
    monkeypatch.setenv("CODESHELL_STEP_PF", "1")
    a = step([7], [30], [1])
    monkeypatch.setenv("CODESHELL_STEP_PF", "0")
    b = step([7], [30], [1])
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_side_jobs_not_counted_as_loops(monkeypatch, two_threads):  # noqa: F811
    """run_in_team's loop count (Team::loops) leaves the side jobs out: a batch-1 step in the team
    posts the same loops with the jobs on and off."""
    from codeshell.engine.kv_cache import KVCache

    mod = _ext.get()
    m = tiny("int8")
    cache = KVCache(m.cfg, 2, 64, torch.bfloat16)

    def run():
        with torch.inference_mode():
            return step_mod.decode(m, cache, [9], [4], [0])

    run()
    loops = {}
    for env in ("0", "1"):
        monkeypatch.setenv("CODESHELL_STEP_PF", env)
        posts0, _ = mod.team_side_jobs()
        got = mod.run_in_team(run)
        assert got is not False
        loops[env] = got[1]
        posts, _ = mod.team_side_jobs()
        assert (posts > posts0) == (env == "1")
    assert loops["0"] == loops["1"] > 0


def test_many_steps_with_side_jobs(monkeypatch, two_threads):  # noqa: F811
    """Thousands of batch-1 steps posting side jobs between the team's loops (the pattern that hit
    the Team's claim race of an older loop against the next loop's fields, fixed by open_post's
    marker: a crash in int8_q8's body every few thousand small-shape tokens before): every step's
    logits equal the same step's with the jobs off."""
    from codeshell.engine.kv_cache import KVCache

    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "on")
    m = tiny("int8")
    cache = KVCache(m.cfg, 2, 256, torch.bfloat16)

    def step(tok, pos):
        with torch.inference_mode():
            return step_mod.decode(m, cache, [tok], [pos], [0])

    step(1, 0)
    for i in range(3000):
        pos = i % 200
        monkeypatch.setenv("CODESHELL_STEP_PF", "1")
        a = step(i % 250, pos)
        if i % 100 == 0:
            monkeypatch.setenv("CODESHELL_STEP_PF", "0")
            b = step(i % 250, pos)
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
