"""Session 21 (helper D): the native decode step's batch-8 paths give the bits of the paths they
replace, each named by the switch that restores the old one (docs/kernels-log.md, "Session 21, helper D"):

* `rope_table`: decode's RoPE cos / sin rows copied from a per-step table of every position
  (csrc/decode_step.cpp `rope_table`) against torch's cos / sin on the step's [M, D/2] rows
  (`CODESHELL_ROPE_TABLE=0`), in a thread team and outside one, at batch 1, 3 and 8, with positions
  that make the table grow (256 -> 512 -> 1024 rows) and after `set_rope` replaced the frequencies;
* `attn_rows`: a team's shares of a step's queries through `packed_attention_rows` into the step's
  buffer against packed_attention on narrowed tensors (`CODESHELL_ATTN_ROWS=0`), and against the
  step outside a team, with slots out of order, a slot twice and different lengths.
"""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext, available
from codeshell.kernels import step as step_mod

pytestmark = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")


from test_decode_step import two_threads  # noqa: E402,F401  (the fixture: 2 OpenMP threads, restored after)


def model_and_cache(kind: str, positions: int = 1024, slots: int = 8, group: int = 64):
    from test_decode_step import filled_cache, tiny  # the tests' random 2-layer model (C = 128, 4 heads / 2 groups)

    m = tiny(kind, group=group, n_positions=positions)
    return m, filled_cache(m, slots, positions, seed=5)


def decode(m, cache, tokens, positions, slots, team: bool):
    """(bf16 logits, picks) of one native step; `team`: as the master of the thread team."""
    def run():
        with torch.inference_mode():
            out = step_mod.decode(m, cache, tokens, positions, slots)
        assert out is not None
        return out[0].clone(), list(out[1])

    if not team:
        return run()
    got = _ext.get().run_in_team(run)
    assert got is not False, "no thread team"
    return got[0]


def same(a, b) -> bool:
    return torch.equal(a[0].view(torch.int16), b[0].view(torch.int16)) and a[1] == b[1]


# (tokens, positions, slots): batch 1, 3 and 8; positions that grow the table (<= 255, then 300
# and 700: 512 and 1024 rows); slots out of order and one slot twice (a verify step's shape)
CASES = [
    ([7], [3], [0]),
    ([5, 9, 11], [0, 17, 255], [2, 0, 1]),
    ([1, 2, 3, 4, 5, 6, 7, 8], [16, 20, 31, 47, 2, 100, 64, 33], [3, 1, 0, 2, 7, 6, 5, 4]),
    ([4, 8, 15, 16, 23, 42, 99, 7], [300, 12, 299, 1, 0, 250, 40, 41], [0, 1, 2, 3, 4, 5, 6, 6]),
    ([9, 8, 7], [700, 5, 1023], [7, 3, 1]),
]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_rope_table_is_torch_cos_sin_of_the_rows(kind, monkeypatch, two_threads):
    m, cache = model_and_cache(kind)
    decode(m, cache, [7], [3], [0], team=False)  # builds the step
    for tokens, positions, slots in CASES:
        for team in (False, True):
            monkeypatch.setenv("CODESHELL_ROPE_TABLE", "0")
            want = decode(m, cache, tokens, positions, slots, team)
            monkeypatch.delenv("CODESHELL_ROPE_TABLE")
            got = decode(m, cache, tokens, positions, slots, team)
            assert same(got, want), f"rope table at positions {positions} (team {team})"
    # new frequencies (set_rope) drop the table: rows of the new ones, not the old
    from codeshell.model import rope_inv_freq

    st = step_mod._DECODERS[m].step
    st.set_rope((rope_inv_freq(m.cfg, m.cfg.n_positions) * 0.5).contiguous())
    tokens, positions, slots = CASES[2]
    monkeypatch.setenv("CODESHELL_ROPE_TABLE", "0")
    want = decode(m, cache, tokens, positions, slots, True)
    monkeypatch.delenv("CODESHELL_ROPE_TABLE")
    assert same(decode(m, cache, tokens, positions, slots, True), want)


def test_rope_table_positions_outside_fall_back(monkeypatch):
    """A negative position is the cache check's error either way (no table row is read)."""
    m, cache = model_and_cache("bf16", positions=256, slots=2)
    decode(m, cache, [7], [3], [0], team=False)
    for env in ("0", "1"):
        monkeypatch.setenv("CODESHELL_ROPE_TABLE", env)
        with pytest.raises(RuntimeError, match="outside the cache"):
            with torch.inference_mode():
                step_mod._DECODERS[m].step.decode([1], [-1], [0], cache.k, cache.v, 0.1)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_attention_rows_in_team_are_packed_attention(kind, monkeypatch, two_threads):
    m, cache = model_and_cache(kind)
    decode(m, cache, [7], [3], [0], team=False)
    for tokens, positions, slots in CASES[1:]:
        alone = decode(m, cache, tokens, positions, slots, team=False)  # packed_attention's own split
        monkeypatch.setenv("CODESHELL_ATTN_ROWS", "0")
        old = decode(m, cache, tokens, positions, slots, team=True)
        monkeypatch.delenv("CODESHELL_ATTN_ROWS")
        new = decode(m, cache, tokens, positions, slots, team=True)
        assert same(new, old) and same(new, alone), f"attention rows at {positions}"
