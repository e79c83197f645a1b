"""IDE re-completion: a FIM prompt, then the same file with characters typed at the cursor.
The second request's prefill forwards only the tokens from the point where its token ids
leave those cached (token-granular, not rounded to any block), and its first token and
log-probabilities equal those of a cold run."""

from __future__ import annotations

import pytest

from codeshell import LLM
from codeshell.engine import SamplingParams
from codeshell.engine.engine import _common_prefix
from codeshell.prompts import fim_prompt
from codeshell.testing import make_tiny_checkpoint

FIRST = SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)


@pytest.fixture(scope="module")
def cached(ckpt):
    llm = LLM(str(ckpt), max_batch=2)
    llm.engine.prefix_caching = True
    return llm


@pytest.fixture(scope="module")
def cold(ckpt):
    return LLM(str(ckpt), max_batch=2)


def source(n: int) -> str:
    return "".join(f"def helper_{k}(items, factor={k}):\n    total = 0\n    for x in items:\n"
                   f"        total += x * factor + {k}\n    return total\n\n" for k in range(n))


def prefill(llm, rid: str, ids: list[int], monkeypatch) -> tuple[int, object]:
    """Submit, run the first engine step (the prefill) counting the tokens the model is given,
    then finish; returns (tokens forwarded by the prefill, final output)."""
    eng = llm.engine
    seen = []
    real = llm.model.transformer.forward

    def spy(input_ids, *a, **kw):
        seen.append(input_ids.numel())
        return real(input_ids, *a, **kw)

    monkeypatch.setattr(llm.model.transformer, "forward", spy)
    eng.add_request(rid, ids, FIRST)
    outs = {o.request_id: o for o in eng.step()}
    forwarded = sum(seen)
    monkeypatch.undo()
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    return forwarded, outs[rid]


@pytest.mark.parametrize("where", ["middle", "end"])
def test_retyped_fim_prompt_recomputes_only_from_the_edit(cached, cold, monkeypatch, where):
    text = source(6)
    cut = len(text) // 2 if where == "middle" else len(text) - 60
    cut = text.index("\n", cut) + 5  # the cursor after an indent, inside a line
    typed = "helper_3(data) + hel"  # 20 characters
    first = cached.encode(fim_prompt(f"# {where}\n" + text[:cut], text[cut:]))
    second = cached.encode(fim_prompt(f"# {where}\n" + text[:cut] + typed, text[cut:]))
    assert 150 < len(first) < 400

    n1, out1 = prefill(cached, f"a-{where}", first, monkeypatch)
    # a cold start: all of it, but for the "<fim_prefix>#" an earlier test may have left
    assert n1 == len(first) - out1.num_cached_tokens and out1.num_cached_tokens <= 2
    n2, out2 = prefill(cached, f"b-{where}", second, monkeypatch)
    common = _common_prefix(first, second)  # where the token ids part
    assert 0 < common < len(first) - 3
    assert out2.num_cached_tokens == common
    assert n2 == len(second) - common  # only the tokens from the divergence point
    if where == "middle":
        assert n2 > len(second) // 3  # the suffix after the cursor is recomputed, and must be
    else:
        assert n2 < 60

    _, ref = prefill(cold, f"c-{where}", second, monkeypatch)  # a cold run of the second prompt
    a, b = out2.outputs[0], ref.outputs[0]
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
        assert x.top.keys() == y.top.keys()
        assert max(abs(x.top[t] - y.top[t]) for t in x.top) < 1e-4
