"""Parity with the official implementation's outputs in ../shared/golden, through both the
engine (`codeshell.LLM`) and transformers (`AutoModelForCausalLM`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from codeshell import LLM, SamplingParams
from codeshell.model import padding_mask, positions_from_mask
from codeshell.weights import load_model
from tests.conftest import GOLDEN_CASES, require_shared

TOL = 1e-4


def golden(case):
    d = require_shared(f"golden/{case}")
    return d, load_file(str(d / "expected.safetensors")), json.loads((d / "expected.json").read_text())


def tail(x, ref):
    return x[:, -ref.shape[1]:]


@pytest.fixture(scope="module", params=GOLDEN_CASES)
def case(request):
    d, e, meta = golden(request.param)
    model, cfg, _ = load_model(d, dtype="float32")
    return request.param, d, e, meta, model


def test_full_and_padded_logits(case):
    _, _, e, _, model = case
    ids, am = e["input_ids"], e["attention_mask"]
    with torch.no_grad():
        full = tail(model(ids), e["logits"])
        pos = positions_from_mask(am)
        masked = tail(model(ids, pos, padding_mask(am)), e["logits_masked"])
    assert (full - e["logits"]).abs().max() <= TOL
    keep = tail(am, e["logits_masked"]).bool()
    assert (masked[keep] - e["logits_masked"][keep]).abs().max() <= TOL


def test_kv_cache_step_logits_match(case):
    """Prefill 30 tokens into the engine's KV cache, then one token at a time."""
    from codeshell.engine.kv_cache import KVCache
    _, _, e, _, model = case
    ids = e["input_ids"]
    B, T = ids.shape
    cache = KVCache(model.cfg, B, T, torch.float32)
    steps = []
    with torch.no_grad():
        pos = torch.arange(30).expand(B, 30)
        v = cache.view([0, 1], pos)
        model.transformer(ids[:, :30], pos, v.mask(), v)
        for t in range(30, T):
            pos = torch.full((B, 1), t)
            v = cache.view([0, 1], pos)
            steps.append(model.lm_head(model.transformer(ids[:, t:t + 1], pos, v.mask(), v))[:, -1])
    assert (torch.stack(steps, 1) - e["step_logits"]).abs().max() <= TOL


def test_greedy_through_llm(case):
    _, d, e, _, _ = case
    llm = LLM(str(d), dtype="float32")
    prompt = e["greedy_prompt"][0].tolist()
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == e["greedy_output"][0, len(prompt):].tolist()
    assert out.outputs[0].finish_reason == "length"


def test_bfloat16_close_to_reference(case):
    """bfloat16 cannot be exact; report its gap and bound it loosely."""
    name, d, e, _, _ = case
    model, _, _ = load_model(d, dtype="bfloat16")
    with torch.no_grad():
        full = tail(model(e["input_ids"]), e["logits"]).float()
    diff = (full - e["logits"]).abs().max().item()
    scale = e["logits"].abs().max().item()
    print(f"\n{name}: bfloat16 max abs logit difference {diff:.4f} (logit scale {scale:.2f})")
    assert diff <= 0.05 * scale + 0.05


def test_transformers_automodel_parity():
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    for name in GOLDEN_CASES:
        d, e, _ = golden(name)
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.model_type == "kclgpt"
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ids, am = e["input_ids"], e["attention_mask"]
        with torch.no_grad():
            assert (tail(m(ids).logits, e["logits"]) - e["logits"]).abs().max() <= TOL
            masked = tail(m(ids, attention_mask=am).logits, e["logits_masked"])
            keep = tail(am, e["logits_masked"]).bool()
            assert (masked[keep] - e["logits_masked"][keep]).abs().max() <= TOL
            out = m(ids[:, :30], use_cache=True)
            cache, steps = out.cache, []
            for t in range(30, ids.shape[1]):
                out = m(ids[:, t:t + 1], cache=cache, use_cache=True)
                cache = out.cache
                steps.append(out.logits[:, -1])
            assert (torch.stack(steps, 1) - e["step_logits"]).abs().max() <= TOL
            g = m.generate(e["greedy_prompt"], max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(g, e["greedy_output"]), name
