"""Session 22 helper A: the native decode step's batch-1 attention in a team without
packed_attention's tensors (step_layers.cpp `attend`, CODESHELL_ATTN_M1; attention.cpp
packed_attention_rows / packed_attention_groups): the logits and picks bit for bit those of the
packed_attention calls it replaces (CODESHELL_ATTN_M1=0) and of the step outside a team, at short and
long contexts, in slot 0 and later slots, for a KV group split at every length (=2), from
CODESHELL_TEAM_ATTN_MIN on (=1, the default) and never (CODESHELL_TEAM_ATTN_MIN=0); the split posts
one team loop a layer exactly where it is meant to."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable")

from test_decode_step import two_threads  # noqa: E402,F401  (the fixture: 2 OpenMP threads, restored after)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_batch1_attention_modes_bitwise(kind, monkeypatch, two_threads):  # noqa: F811
    from test_decode_step import filled_cache, tiny  # the tests' random 2-layer model (C = 128, 4 heads / 2 groups)

    mod = _ext.get()
    m = tiny(kind)
    cache = filled_cache(m, 3, 256, seed=11)
    layers = m.cfg.n_layer

    def run(pos, slot):
        with torch.inference_mode():
            out = step_mod.decode(m, cache, [5], [pos], [slot])
        assert out is not None
        return out

    def in_team(mode, attn_min, pos, slot):
        monkeypatch.setenv("CODESHELL_ATTN_M1", mode)
        if attn_min is None:
            monkeypatch.delenv("CODESHELL_TEAM_ATTN_MIN", raising=False)
        else:
            monkeypatch.setenv("CODESHELL_TEAM_ATTN_MIN", attn_min)
        got = mod.run_in_team(lambda: run(pos, slot))
        assert got is not False
        return got

    run(0, 0)  # builds the step
    for pos, slot in ((0, 0), (1, 1), (17, 2), (40, 0), (200, 1), (255, 2)):
        st = step_mod._DECODERS[m].step
        st.team = 0
        alone = run(pos, slot)  # outside a team: packed_attention with its own OpenMP split
        st.team = 1
        old, n_old = in_team("0", "0", pos, slot)  # packed_attention on the master (before)
        runs = {
            ("1", None): 0,  # the default threshold (512) is above these contexts: on the master
            ("1", "0"): 0,
            ("1", str(pos + 1)): layers,  # the context is pos + 1 positions: split from there on
            ("1", str(pos + 2)): 0,
            ("2", None): layers,  # split at every length
            ("2", "0"): layers,
            ("0", "1"): layers,  # the old per-group packed_attention split
        }
        for (mode, attn_min), extra in runs.items():
            got, n = in_team(mode, attn_min, pos, slot)
            assert torch.equal(got[0], alone[0]) and list(got[1]) == list(alone[1]), (mode, attn_min, pos)
            assert torch.equal(got[0], old[0])
            assert n == n_old + extra, (mode, attn_min, pos, n, n_old)
