"""The engine's bulk bookkeeping (CODESHELL_ENGINE_BULK, session 40): a native call's tokens taken in
one go (`Sequence._append_bulk`) and a lazy decoder fed a run at a time (`IncrementalDecoder.add_many`)
give what appending and decoding one token at a time gives: the same tokens, counts, text, deltas,
stream positions, finish and stop reasons; `LLM.generate` the same outputs on and off."""

from __future__ import annotations

import random

import pytest

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine.sampling import SequenceSampler
from codeshell.engine.sequence import Sequence
from codeshell.testing import make_tiny_checkpoint
from codeshell.tokenizer import IncrementalDecoder, Tokenizer

from .test_lean import _Pairs


class _PairsMany(_Pairs):
    """_Pairs whose decoder also has `add_many` (what IncrementalDecoder offers)."""

    def decoder(self, skip_special_tokens):
        d = super().decoder(skip_special_tokens)
        d.add_many = lambda ids: "".join(d.add(t) for t in ids)
        return d


def _seq(bulk: bool, params: SamplingParams, tokenizer, stop_ids: set[int]) -> Sequence:
    import torch
    s = Sequence("r", 0, [1, 2, 3], params, SequenceSampler(params, [1, 2, 3], None, torch.device("cpu")), 0,
                 tokenizer, None, True, bulk)
    s.stop_ids = stop_ids
    return s


def _state(s: Sequence):
    return (s.output_ids, s.text, s.streamed, s.finish_reason, s.stop_reason, s._fed, s._mark,
            dict(s.sampler.output_counts))


def _drive(bulk: bool, runs, plan, params, tokenizer, stop_ids, mml, stepwise=True):
    """append_many(run, stepwise) per run (stepwise: as Engine._decode_many*; not: as a verify step's
    accepted drafts, Engine._speculate), then an output made or skipped as `plan` says; the final
    output after."""
    s = _seq(bulk, params, tokenizer, stop_ids)
    assert s._bulk == (bulk and s._lazy or bulk and s.decoder is None)
    outs = []
    for run, p in zip(runs, plan):
        n = s.append_many(run, mml, stepwise=stepwise)
        outs.append((n, _state(s)))
        if s.finished:
            break
        if p:
            o = s.output()
            outs.append((o.text, o.delta, o.token_ids, o.finish_reason))
        else:
            s.skip_output()
    o = s.output()
    outs.append((o.text, o.delta, o.token_ids, o.finish_reason, o.stop_reason, _state(s)))
    return outs


@pytest.mark.parametrize("stepwise", [True, False])
@pytest.mark.parametrize("tok", ["pairs", "pairs_many", "none"])
def test_append_bulk_is_append_one_at_a_time(tok, stepwise):
    tokenizer = {"pairs": _Pairs(), "pairs_many": _PairsMany(), "none": None}[tok]
    rng = random.Random(11)
    for _ in range(400):
        runs = [[rng.choice([rng.randint(0, 49), rng.randint(50, 60)]) for _ in range(rng.randint(1, 9))]
                for _ in range(rng.randint(1, 5))]
        stop_ids = set()
        if rng.random() < 0.5:
            stop_ids = {99}
            r = rng.randrange(len(runs))
            runs[r][rng.randrange(len(runs[r]))] = 99
        if rng.random() < 0.3:
            stop_ids.add(rng.randint(0, 60))  # a stop id that may occur anywhere, more than once
        total = sum(map(len, runs))
        params = SamplingParams(temperature=0, max_tokens=rng.choice([None, rng.randint(1, total + 2)]),
                                ignore_eos=True)
        mml = rng.choice([10**6, 3 + rng.randint(1, total + 2)])  # the context window (3 prompt tokens)
        plan = [rng.randint(0, 1) for _ in runs]
        a = _drive(False, runs, plan, params, tokenizer, stop_ids, mml, stepwise)
        b = _drive(True, runs, plan, params, tokenizer, stop_ids, mml, stepwise)
        assert a == b, (runs, plan, stop_ids, params.max_tokens, mml)


def test_bulk_only_where_nothing_reads_each_token():
    p = _Pairs()
    assert _seq(True, SamplingParams(temperature=0), p, set())._bulk
    assert not _seq(False, SamplingParams(temperature=0), p, set())._bulk
    assert not _seq(True, SamplingParams(temperature=0, stop=["ab"]), p, set())._bulk  # text at every token
    assert not _seq(True, SamplingParams(temperature=0, logprobs=1), p, set())._bulk


def test_add_many_is_add_one_at_a_time(tokenizer_dir):
    """The real tokenizer (byte-level BPE): random ids, runs of random lengths (partial UTF-8
    characters across the runs' ends included), the same deltas joined and the same state."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    V = tok._tok.get_vocab_size()
    rng = random.Random(5)
    hi = [i for i in range(V) if "\ufffd" in tok.decode([i])][:200]  # ids holding part of a character
    assert hi
    for skip in (False, True):
        for _ in range(60):
            ids = [rng.choice(hi) if rng.random() < 0.4 else rng.randrange(V) for _ in range(rng.randint(1, 40))]
            a, b = IncrementalDecoder(tok, skip), IncrementalDecoder(tok, skip)
            one = "".join(a.add(t) for t in ids)
            many, i = "", 0
            while i < len(ids):
                n = rng.randint(1, 8)
                many += b.add_many(ids[i:i + n])
                i += n
            assert one == many
            assert (a.ids, a.prefix_offset, a.read_offset) == (b.ids, b.prefix_offset, b.read_offset)
            assert a.flush() == b.flush()


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tokenizer_dir):
    return LLM(str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)), max_batch=8)


def _results(outs, delta=True):
    return [(o.prompt_token_ids, o.finished, [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                                               c.delta if delta else None) for c in o.outputs]) for o in outs]


@pytest.mark.parametrize("multi", ["8", "1"])
def test_generate_is_the_same_bulk_or_not(llm, monkeypatch, multi):
    """LLM.generate at batch 8 (several tokens a native call where the native step runs, else one a
    step), greedy with different lengths and an eos stop, and sampled: the same outputs."""
    monkeypatch.setenv("CODESHELL_DECODE_MULTI", multi)
    prompts = ["def fib(n):", "import os\n", "class A:\n    def", "x = [1, 2", "# sum", "for i in", "a", "b = 3\n"]
    params = [[SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=i % 2 == 0) for i in range(8)],
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=20, seed=3),
              # prompt lookup: a verify step's accepted drafts go through append_many (Engine._speculate)
              SamplingParams(temperature=0, max_tokens=24, prompt_lookup_num_tokens=3, ignore_eos=True)]
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("CODESHELL_ENGINE_BULK", mode)
        # with prompt lookup how many tokens a step accepts (so the final delta, and the stream's steps)
        # follows the draft budget's timings (as in test_lean): the tokens and the text must agree
        got[mode] = [_results(llm.generate(prompts, sp), delta=not getattr(sp, "prompt_lookup_num_tokens", 0))
                     for sp in params]
        # the streaming path (Engine.step, every output made) with lookup's bulk appends: the deltas joined
        outs = list(llm.stream_outputs(prompts[0] * 3, params[-1]))
        got[mode].append((_results(outs[-1:], delta=False), "".join(o.outputs[0].delta for o in outs)))
        assert llm.engine.bulk == (mode == "on")
    assert got["on"] == got["off"]


def test_bad_switch_value(llm, monkeypatch):
    monkeypatch.setenv("CODESHELL_ENGINE_BULK", "maybe")
    with pytest.raises(ValueError, match="CODESHELL_ENGINE_BULK"):
        llm.generate(["a"], SamplingParams(max_tokens=2))
