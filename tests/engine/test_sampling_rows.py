"""`sample_rows` (one decode step's rows sampled together, temperature-only rows in one native
call) gives each sequence the tokens its own sampler would give, for every kind of sampler in a
mixed batch, and keeps each generator's stream (reproducible seeds)."""

from __future__ import annotations

import copy

import torch

from codeshell.engine import SamplingParams
from codeshell.engine.sampling import SequenceSampler, sample_rows

KINDS = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0),                       # greedy
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=0.9, repetition_penalty=1.3),
    SamplingParams(temperature=1.5, min_p=0.05),
    SamplingParams(temperature=0.3),
]


def samplers(kinds):
    return [SequenceSampler(p, [1, 2, 3], seed=100 + i, device=torch.device("cpu")) for i, p in enumerate(kinds)]


def test_rows_equal_one_sampler_at_a_time():
    g = torch.Generator().manual_seed(0)
    batch, alone = samplers(KINDS), samplers(KINDS)
    for _ in range(20):  # several steps: each generator must advance exactly as alone
        logits = torch.randn(len(KINDS), 5000, generator=g) * 3
        got = sample_rows(batch, logits)
        want = [s.sample(logits[i].clone()) for i, s in enumerate(alone)]
        assert got == want
        for s, t in zip(batch + alone, got + want):
            s.observe(t)


def test_only_temperature_rows_and_logits_are_not_changed():
    g = torch.Generator().manual_seed(3)
    kinds = [SamplingParams(temperature=t) for t in (0.4, 0.8, 1.6)]
    logits = torch.randn(3, 70144, generator=g)
    keep = logits.clone()
    a, b = samplers(kinds), samplers(kinds)
    assert sample_rows(a, logits) == [s.sample(logits[i]) for i, s in enumerate(b)]
    assert torch.equal(logits, keep)
    assert copy.deepcopy(a[0].gen.get_state()).equal(b[0].gen.get_state())


def test_rows_of_bf16_logits_equal_their_float32_copy():
    """The engine hands the head's bf16 logits over as they are: every kind of sampler gives
    what it gives on the exact float32 copy (greedy picks included)."""
    g = torch.Generator().manual_seed(1)
    a, b = samplers(KINDS), samplers(KINDS)
    for _ in range(10):
        logits = (torch.randn(len(KINDS), 3001, generator=g) * 3).bfloat16()
        got, want = sample_rows(a, logits), sample_rows(b, logits.float())
        assert got == want
        for s, t in zip(a + b, got + want):
            s.observe(t)


def test_native_argmax_is_the_first_maximal_index():
    """`kernels.argmax_rows` against torch's first maximal index, fp32 and bf16, with ties
    (bf16 rounding makes many), -inf, widths that are not a multiple of the vector width, and
    the fallback `first_argmax` takes when the kernel does not apply."""
    from codeshell.engine.sampling import first_argmax
    from codeshell.kernels import argmax_rows, available
    if not available():
        import pytest
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(2)
    for V in (1, 7, 8, 33, 1000, 16384, 70144):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(9, V, generator=g) * 4).to(dtype)
            x[1] = x[1].round()                       # many ties
            x[2, : V // 2] = float("-inf")
            x[3] = 5.0                                # all equal: index 0
            x[4, -1] = 1e4                            # the maximum in the tail
            want = torch.tensor([int(torch.nonzero(r == r.max())[0]) for r in x])
            assert torch.equal(argmax_rows(x), want), (V, dtype)
            assert torch.equal(first_argmax(x), want)
    xs = torch.randn(4, 2048, generator=g)[:, ::2]
    assert argmax_rows(xs) is None                                  # not contiguous: torch's path
    assert torch.equal(first_argmax(xs), xs.max(-1).indices)
