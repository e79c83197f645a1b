"""A prompt's last block on the sampled rows only (`CodeShellModel.forward`'s `rows`, the engine's
prefill by default; CODESHELL_PREFILL_LAST_ROWS=0 the whole block): the rows returned are the ones
the whole forward computes for them. Bit for bit where a bf16 prompt row has decode's bits (AVX2:
decode's attention kernel per query, the row-invariant linears); to bf16 rounding elsewhere (the
AVX-512 prefill linears' per-row bits depend on M)."""

from __future__ import annotations

import pytest
import torch

from codeshell import LLM, kernels
from codeshell.engine import SamplingParams
from codeshell.engine import engine as E
from codeshell.engine.kv_cache import KVCache
from codeshell.kernels import ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


def _decode_bits() -> bool:
    """Whether a bf16 prompt row has decode's bits here (test_prefill_decode_bits.py's condition)."""
    from codeshell.kernels.prefill_attention import prefill_attention_ok
    q = torch.zeros(1, 2, 2, 64, dtype=torch.bfloat16)
    return ops.isa_level() < ops.ISA_LEVELS.index("avx512_vnni") and not prefill_attention_ok(q, q)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    if _decode_bits():
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.fixture(scope="module")
def mini():
    return LLM(max_batch=4)  # codeshell-mini: bf16


def _hidden(llm, ids, pos, rows=None):
    cfg = llm.engine.cfg
    cache = KVCache(cfg, 2, 256, torch.bfloat16)
    view = cache.view([1, 0], pos)
    with torch.inference_mode():
        h = llm.engine.model.transformer(ids, pos, None, view, seq_len=int(pos.max()) + 1, rows=rows)
    return h, cache


@pytest.mark.parametrize("T", [9, 150])
@pytest.mark.parametrize("decode_attn", ["1", "0"])
def test_rows_are_the_whole_forwards_rows(mini, T, decode_attn, monkeypatch):
    """Two padded rows (the second after 7 positions), rows picked at their last real tokens and one
    more: the same hidden states as the whole forward's, the same keys and values stored; with
    CODESHELL_PREFILL_ATTN_DECODE=0 (SDPA: no `attend_rows`) the whole attention runs, then the rows."""
    monkeypatch.setenv("CODESHELL_PREFILL_ATTN_DECODE", decode_attn)
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, mini.engine.cfg.vocab_size, (2, T), generator=g)
    pos = torch.stack([torch.arange(T), torch.arange(7, 7 + T)])
    rows = torch.tensor([T - 1, T + T // 2, 2 * T - 1])
    full, c_full = _hidden(mini, ids, pos)
    part, c_part = _hidden(mini, ids, pos, rows)
    assert part.shape == (3, full.shape[-1])
    _same(part, full.reshape(-1, full.shape[-1])[rows])
    assert torch.equal(c_part.k, c_full.k) and torch.equal(c_part.v, c_full.v)


def test_rows_on_the_plain_path(mini):
    """The torch path (grad on: no fused ops) runs everything and picks the rows."""
    ids = torch.randint(0, 100, (1, 12))
    pos = torch.arange(12)[None]
    tr = mini.engine.model.transformer
    with torch.no_grad():
        full = tr(ids, pos)
        part = tr(ids, pos, rows=torch.tensor([11, 3]))
    assert torch.equal(part, full[0, [11, 3]])


def test_engine_switch_same_first_token(mini, monkeypatch):
    """The engine's prefill (alone and three prompts in one padded forward) with and without the
    switch: the same first-token log-probabilities."""
    ids = mini.encode("def add(a, b):\n    return a + b\n\n" * 12)
    ps = [ids[:70], ids[:133], ids[5:200]]
    p = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    caching = mini.engine.prefix_caching
    mini.engine.prefix_caching = False
    try:
        got = {}
        for on in (True, False):
            monkeypatch.setattr(E, "_LAST_ROWS", on)
            alone = [mini.generate([{"prompt_token_ids": x}], p)[0].outputs[0].logprobs[0].top for x in ps]
            together = [o.outputs[0].logprobs[0].top for o in mini.generate([{"prompt_token_ids": x} for x in ps], p)]
            got[on] = (alone, together)
    finally:
        mini.engine.prefix_caching = caching
    if _decode_bits():
        assert got[True] == got[False]
    else:
        for a, b in zip(got[True][0] + got[True][1], got[False][0] + got[False][1]):
            assert max(a, key=a.get) == max(b, key=b.get)
