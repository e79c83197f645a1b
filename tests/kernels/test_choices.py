"""The measured kernel choices kept on disk (`codeshell.kernels.choices`): a fresh process
reuses a stored winner instead of measuring again; a damaged file, a stale path or another
thread count means measuring again, never a failure.

The rest of the suite runs with CODESHELL_KERNEL_CHOICES=off (tests/conftest.py), so tests
that check a measurement happens do not depend on what an earlier run stored.
"""

from __future__ import annotations

import json

import pytest
import torch

from codeshell.kernels import available, choices, ops
from codeshell.kernels.packing import quantize_int8

needs_native = pytest.mark.skipif(not available(), reason="native kernels unavailable")

# Two paths every native build has for an int8 weight and fp32 x at any M, whatever the ISA:
# the test makes them the candidates, so it measures on an AVX2-only machine as on AMX.
CANDS = ["sgemm:fp32", "avx2:unpack"]
N, K, M = 48, 256, 100


@pytest.fixture
def store(tmp_path, monkeypatch):
    f = tmp_path / "choices.json"
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(f))
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    monkeypatch.setattr(ops, "prefill_candidates", lambda p, dt, level: list(CANDS))
    choices.forget()
    yield f
    choices.forget()


def _fresh_process_state(key):
    # what a new process starts with: no in-memory choice (the file stays)
    ops._CHOICES.pop(key, None)
    ops.CHOICE_TIMES.pop(key, None)
    choices.forget()


MEASURED = (1 + ops.MEASURE_ROUNDS) * len(ops.PREFILL_MEASURE_ROWS) * len(CANDS) + 1  # warm-up + timed rounds, each candidate at each M, then the call


def _case():
    """An int8 weight, x of M rows and their choice key, as a fresh process starts (no choice in memory)."""
    key = ("int8", N, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32")
    _fresh_process_state(key)
    return quantize_int8(torch.randn(N, K)), torch.randn(M, K), key


def _run(pw, x):
    """One native linear: (how many candidate kernel calls it made, its result)."""
    before = sum(ops.PATHS_RUN[("int8", c)] for c in CANDS)
    y = ops.linear(x, pw, impl="native")
    return sum(ops.PATHS_RUN[("int8", c)] for c in CANDS) - before, y


@needs_native
def test_a_fresh_process_reuses_the_stored_choice(store):
    pw, x, key = _case()
    assert _run(pw, x)[0] == MEASURED
    data = json.loads(store.read_text())
    (entry_key, entry), = data.items()
    assert entry["path"] == ops._CHOICES[key] and set(entry["seconds"]) == set(CANDS)
    assert f"threads={torch.get_num_threads()}" in entry_key

    _fresh_process_state(key)
    calls, y = _run(pw, x)
    assert calls == 1  # no measurement: the stored winner ran once
    assert ops._CHOICES[key] == entry["path"] and key not in ops.CHOICE_TIMES
    torch.testing.assert_close(y, ops.linear(x, pw, impl="reference"), rtol=1e-4, atol=1e-4)


@needs_native
def test_a_damaged_file_or_a_stale_path_means_measuring_again(store):
    store.write_text("{not json")
    pw, x, key = _case()
    assert _run(pw, x)[0] == MEASURED
    data = json.loads(store.read_text())  # rewritten whole, valid again
    assert len(data) == 1

    # a path this code no longer offers (an older version's name): ignored, measured again
    (k,), = [tuple(data)]
    data[k]["path"] = "avx1024:gone"
    store.write_text(json.dumps(data))
    _fresh_process_state(key)
    assert _run(pw, x)[0] == MEASURED and ops._CHOICES[key] in CANDS


@needs_native
def test_another_thread_count_is_another_choice(store):
    pw, x, key = _case()
    ops.linear(x, pw, impl="native")
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        _fresh_process_state(key)
        assert _run(pw, x)[0] == MEASURED
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(store.read_text())) == 2


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", "off")
    choices.forget()
    assert choices.path() is None
    choices.store(("bf16", 1, 2, 3), "x:y", {"x:y": 1.0})
    assert choices.lookup(("bf16", 1, 2, 3)) is None


@needs_native
def test_prefill_paths_are_chosen_at_load(tmp_path, monkeypatch):
    # Loading a model measures (or reads) the prefill choice of each weight shape, one path for
    # every prefill M, so a request never pays for it: a prompt of 100 tokens and a padded batch
    # of 4 x 100 afterwards find their choices made. The head is left out (a
    # prefill computes logits for the last rows only, M <= the batch). sgemm:fp32 joins the
    # machine's own candidates so that there is a choice to make on every machine.
    from codeshell import LLM, SamplingParams
    from codeshell.bench import random_model
    from codeshell.config import CodeShellConfig
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(tmp_path / "choices.json"))
    real = ops.prefill_candidates
    monkeypatch.setattr(ops, "prefill_candidates",
                        lambda p, dt, level: list(dict.fromkeys(real(p, dt, level) + ["sgemm:fp32"])))
    choices.forget()
    cfg = CodeShellConfig(vocab_size=512, n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=256,
                          n_positions=1024)
    ops._CHOICES.clear()
    llm = LLM.from_model(random_model(cfg, torch.bfloat16), cfg, max_batch=4)
    made = dict(ops._CHOICES)
    assert {(k[1], k[2]) for k in made} == {(cfg.qkv_dim, 128), (128, 128), (256, 128), (128, 256)}
    assert {k[3] for k in made} == {"prefill"} and llm.engine.prefill_chunk == 512
    prompts = [{"prompt_token_ids": list(range(i, 100 + i))} for i in range(4)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0))
    assert ops._CHOICES == made
    choices.forget()
