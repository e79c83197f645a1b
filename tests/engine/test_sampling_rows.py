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
