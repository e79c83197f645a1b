"""The measured kernel choices kept on disk (`codeshell.kernels.choices`): a fresh process
reuses a stored winner instead of measuring again; a damaged file, a stale path or another
thread count means measuring again, never a failure. Only a measurement to trust is stored
(`measure.measure`: steady repeats, a second look where the first was unsteady or close, a quiet
host): tested with scripted call times (`_Clock`), nothing timed.

The rest of the suite runs with CODESHELL_KERNEL_CHOICES=off (tests/conftest.py), so tests
that check a measurement happens do not depend on what an earlier run stored.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from codeshell.kernels import available, choices, measure, ops
from codeshell.kernels.packing import quantize_int8

needs_native = pytest.mark.skipif(not available(), reason="native kernels unavailable")

# Two paths every native build has for an int8 weight and fp32 x at any M, whatever the ISA:
# the test makes them the candidates, so it measures on an AVX2-only machine as on AMX.
CANDS = ["sgemm:fp32", "avx2:unpack"]
N, K, M = 48, 256, 100
MODES = ["quick", "full"]  # CODESHELL_KERNEL_MEASURE: the measurement of session 33 and the one before


@pytest.fixture(params=MODES)
def store(request, tmp_path, monkeypatch):
    f = tmp_path / "choices.json"
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(f))
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", request.param)
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    monkeypatch.setattr(ops, "prefill_candidates", lambda p, dt, level: list(CANDS))
    # the real kernels run (their calls are counted) but their times are scripted: a clear,
    # steady winner on a quiet host, so one look and a stored entry whatever this host's load
    _install(monkeypatch, _Clock({"sgemm:fp32": 1e-6, "avx2:unpack": 2e-6}, run=True))
    monkeypatch.setattr(measure, "_host_load", lambda: 0.1)
    monkeypatch.setattr(measure, "_others_per_core", lambda mark: 0.0)
    _levels(monkeypatch, 100.0)
    choices.forget()
    yield f
    choices.forget()


def _levels(monkeypatch, *probes):
    """A scripted `measure._host_level`: the given probes in turn, the last repeated; the memo of
    the last probe cleared (a new process's first lookup probes)."""
    seq = list(probes)
    monkeypatch.setattr(measure, "_host_level", lambda: seq.pop(0) if len(seq) > 1 else seq[0])
    monkeypatch.setattr(measure, "_LEVEL", [0.0, -1e9])


def _fresh_process_state(key):
    # what a new process starts with: no in-memory choice or measurement (the file stays)
    ops._CHOICES.pop(key, None)
    ops.CHOICE_TIMES.pop(key, None)
    measure._SLICE_LOOKS.clear()
    choices.forget()


class _Clock:
    """A scripted `measure._time_call`: candidate c's n-th call of a look (its own count, warm-ups
    included) takes per_row[c] x M seconds, times burst(c, look, n) (1 unless the test says).
    run=True also runs the real kernel (so `PATHS_RUN` counts it); `seen` records each call's
    (candidate, rows of the weight it ran on, the weight's data pointer). Installed with
    `_install`, which also tells it where each look starts (the quick measurement's looks make
    a varying number of calls)."""

    def __init__(self, per_row, burst=None, run=False):
        self.per_row, self.burst, self.run = per_row, burst or (lambda c, look, n: 1.0), run
        self.look, self.n, self.seen, self.epilogues = -1, {}, [], []

    def __call__(self, c, mod, x, p, x_dtype, epilogue=None):
        if self.run:
            ops._compute(c, mod, x, p, None)
        self.seen.append((c, p.out_features, p.data.data_ptr() if hasattr(p, "data") else None))
        self.epilogues.append(epilogue)
        n = self.n.get(c, 0)
        self.n[c] = n + 1
        return self.per_row[c] * x.shape[0] * self.burst(c, self.look, n)

    def new_look(self):
        self.look, self.n = self.look + 1, {}


def _install(monkeypatch, clock):
    monkeypatch.setattr(measure, "_time_call", clock)
    look = measure._look

    def counted(*a, **kw):
        clock.new_look()
        return look(*a, **kw)

    monkeypatch.setattr(measure, "_look", counted)
    return clock



def _measured(mode, cands=CANDS, looks=1):
    """Candidate calls of a measurement whose every M has a clear steady lead (scripted), then the call:
    full: a warm-up and MEASURE_ROUNDS rounds at each M; quick: warm-ups at the first M only and
    MEASURE_MIN_ROUNDS rounds."""
    ms = len(measure.PREFILL_MEASURE_ROWS)
    per_look = ((1 + measure.MEASURE_ROUNDS) * ms if mode == "full" else 1 + measure.MEASURE_MIN_ROUNDS * ms) * len(cands)
    return per_look * looks + 1


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
    assert _run(pw, x)[0] == _measured(os.environ['CODESHELL_KERNEL_MEASURE'])
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
    assert _run(pw, x)[0] == _measured(os.environ['CODESHELL_KERNEL_MEASURE'])
    data = json.loads(store.read_text())  # rewritten whole, valid again
    assert len(data) == 1

    # a path this code no longer offers (an older version's name): ignored, measured again
    (k,), = [tuple(data)]
    data[k]["path"] = "avx1024:gone"
    store.write_text(json.dumps(data))
    _fresh_process_state(key)
    assert _run(pw, x)[0] == _measured(os.environ['CODESHELL_KERNEL_MEASURE']) and ops._CHOICES[key] in CANDS


@needs_native
def test_another_thread_count_is_another_choice(store):
    pw, x, key = _case()
    ops.linear(x, pw, impl="native")
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        _fresh_process_state(key)
        assert _run(pw, x)[0] == _measured(os.environ['CODESHELL_KERNEL_MEASURE'])
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(store.read_text())) == 2


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", "off")
    choices.forget()
    assert choices.path() is None
    choices.store(("bf16", 1, 2, 3), "x:y", {"x:y": 1.0}, {"stored": True})
    assert choices.lookup(("bf16", 1, 2, 3)) is None


@needs_native
def test_prefill_paths_are_chosen_at_load(tmp_path, monkeypatch):
    # Loading a model measures (or reads) the prefill choice of each weight shape, one path for
    # every prefill M, so a request never pays for it: a prompt of 100 tokens and a padded batch
    # of 4 x 100 afterwards find their choices made. The head is left out (a
    # prefill computes logits for the last rows only, M <= the batch). sgemm:fp32 and the
    # AVX2 panel kernel (both run on every machine with the native kernels) join the machine's
    # own candidates so that there is a choice to make on every machine: an AVX-512 CPU
    # without AVX512-BF16 has one candidate of its own for these small bf16 weights.
    from codeshell import LLM, SamplingParams
    from codeshell.bench import random_model
    from codeshell.config import CodeShellConfig
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(tmp_path / "choices.json"))
    real = ops.prefill_candidates
    monkeypatch.setattr(ops, "prefill_candidates",
                        lambda p, dt, level: list(dict.fromkeys(real(p, dt, level) + ["sgemm:fp32", "avx2:panel64"])))
    choices.forget()
    cfg = CodeShellConfig(vocab_size=512, n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=256,
                          n_positions=1024)
    ops._CHOICES.clear()
    llm = LLM.from_model(random_model(cfg, torch.bfloat16), cfg, max_batch=4)
    made = dict(ops._CHOICES)
    assert {(k[1], k[2]) for k in made} == {(cfg.qkv_dim, 128), (128, 128), (256, 128), (128, 256)}
    assert {k[3] for k in made} == {"prefill"} and llm.engine.prefill_chunk == 512
    # c_fc (256 x 128) is a GELU linear (the config's gelu-tanh): planned as one (session 41), the others plain
    assert {k[1:3] for k in made if k[6:] == ("gelu",)} == {(256, 128)}
    assert all(k[6:] in ((), ("gelu",)) for k in made)
    prompts = [{"prompt_token_ids": list(range(i, 100 + i))} for i in range(4)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0))
    assert ops._CHOICES == made
    choices.forget()


# ---- which measurements are stored (scripted times: no kernel runs, nothing timed) ----

GEMM, ONEDNN, PANEL = "avx512_bf16:gemm", "onednn:bf16", "avx512_bf16:panel64"
FAKE_KEY = ("bf16", 16, 8, "prefill", "fake", "bfloat16")


@pytest.fixture(params=MODES)
def fake(request, tmp_path, monkeypatch):
    """Runs `measure.measure` + the store as `_choose` does, on scripted times, in each measuring mode
    (the trust checks hold in both): returns run(per_row, burst=None, load=0.1) -> (winner,
    stored entry or None, checks); others: `_others_per_core`)."""
    f = tmp_path / "choices.json"
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(f))
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", request.param)
    monkeypatch.setattr(ops._ext, "get", lambda: None)
    weight = types.SimpleNamespace(out_features=16, in_features=8)

    def run(per_row, burst=None, load=0.1, others=0.0):
        _install(monkeypatch, _Clock(per_row, burst))
        monkeypatch.setattr(measure, "_host_load", lambda: load)
        monkeypatch.setattr(measure, "_others_per_core", lambda mark: others)
        _levels(monkeypatch, 100.0)
        _fresh_process_state(FAKE_KEY)
        ops._CHOICES.pop(FAKE_KEY, None)
        (ops._CHOICES[FAKE_KEY], ops.CHOICE_TIMES[FAKE_KEY], ops.CHOICE_CHECKS[FAKE_KEY],
         trusted) = measure.measure(FAKE_KEY, list(per_row), weight, torch.bfloat16, ops._CHOICES)
        if trusted:
            choices.store(FAKE_KEY, ops._CHOICES[FAKE_KEY], ops.CHOICE_TIMES[FAKE_KEY], ops.CHOICE_CHECKS[FAKE_KEY])
        choices.forget()
        return ops._CHOICES[FAKE_KEY], choices.lookup(FAKE_KEY), ops.CHOICE_CHECKS[FAKE_KEY]

    choices.forget()
    yield run
    _fresh_process_state(FAKE_KEY)


# the small shape's 4096 x 1024 in a quiet minute (session 22: 1.27 / 2.13 / 1.99 ms at M = 128)
QUIET = {GEMM: 1.0e-5, ONEDNN: 1.3e-5, PANEL: 1.6e-5}


def test_a_steady_clear_winner_is_stored_after_one_look(fake):
    winner, stored, checks = fake(QUIET)
    assert winner == stored == GEMM
    assert checks["looks"] == 1 and checks["stored"] and checks["scatter"] == [0.0]


def test_a_burst_in_the_first_look_gets_a_second_one(fake):
    # session 21's case: another process's work lands on the GEMM's calls of the first look, so
    # oneDNN wins it (and its repeats scatter); the second look, quiet, finds the GEMM again
    burst = lambda c, look, n: (1.5 if n % 3 == 0 else 3.0) if (c == GEMM and look == 0) else 1.0
    winner, stored, checks = fake(QUIET, burst)
    assert checks["winners"][0] == ONEDNN and checks["scatter"][0] > measure.MEASURE_SCATTER_MAX
    assert checks["looks"] == 2 and winner == stored == GEMM  # the unsteady look has no vote


def test_a_uniformly_slowed_candidate_in_the_first_look_is_not_stored_if_the_second_disagrees(fake):
    # every GEMM call of look 1 slowed 1.6x: steady, and oneDNN wins it clearly (23%), so one
    # look. That is the case the load check is for (a steadily loaded minute): not stored.
    burst = lambda c, look, n: 1.6 if (c == GEMM and look == 0) else 1.0
    winner, stored, checks = fake(QUIET, burst, load=2.5)
    assert winner == ONEDNN and stored is None and checks["looks"] == 1 and not checks["stored"]
    # a fresh process in a quiet minute measures again and stores the GEMM
    winner, stored, checks = fake(QUIET)
    assert winner == stored == GEMM


def test_repeats_that_keep_scattering_are_not_stored(fake):
    burst = lambda c, look, n: 2.0 if n % 2 else 1.0  # every candidate, both looks
    winner, stored, checks = fake(QUIET, burst)
    assert checks["looks"] == 2 and min(checks["scatter"]) > measure.MEASURE_SCATTER_MAX
    assert winner == GEMM and stored is None  # the winner holds for this process only


def test_a_close_call_gets_a_second_look_and_is_stored_when_both_agree(fake):
    close = {GEMM: 1.0e-5, ONEDNN: 1.05e-5}
    winner, stored, checks = fake(close)
    assert checks["looks"] == 2 and winner == stored == GEMM


def test_a_lead_short_of_clear_gets_a_second_look(fake):
    # session 36: a 15% lead (above MEASURE_CLOSE, below MEASURE_CLEAR) on one look was stored before;
    # now it gets a second look, and is stored when both agree
    winner, stored, checks = fake({GEMM: 1.0e-5, ONEDNN: 1.15e-5})
    assert checks["looks"] == 2 and winner == stored == GEMM
    # the GEMM's calls of the first look all slowed 1.3x (its clean calls missed): oneDNN leads it by
    # 13%; the second look finds the GEMM's clean calls: each candidate's least puts the GEMM ahead,
    # the looks disagree, nothing is stored (the next process measures again)
    burst = lambda c, look, n: 1.3 if (c == GEMM and look == 0) else 1.0
    winner, stored, checks = fake({GEMM: 1.0e-5, ONEDNN: 1.15e-5}, burst)
    assert checks["looks"] == 2 and checks["winners"] == [ONEDNN, GEMM] and winner == GEMM and not checks["stored"]


def test_looks_that_disagree_clearly_are_not_stored(fake):
    # look 1: GEMM by 5% (close, so a second look); look 2: oneDNN by 40% (the GEMM slowed)
    close = {GEMM: 1.0e-5, ONEDNN: 1.05e-5}
    burst = lambda c, look, n: 1.5 if (c == GEMM and look == 1) else 1.0
    winner, stored, checks = fake(close, burst)
    assert checks["looks"] == 2 and checks["winners"] == [GEMM, ONEDNN]
    assert winner == GEMM and stored is None  # each candidate's best over both looks: the GEMM


def test_a_close_call_both_looks_close_is_stored_whichever_wins(fake):
    # both candidates at the same speed: either winner is right, so it is stored
    same = {GEMM: 1.0e-5, ONEDNN: 1.0e-5 * 1.02}
    burst = lambda c, look, n: 1.04 if (c == GEMM and look == 1) else 1.0
    winner, stored, checks = fake(same, burst)
    assert checks["looks"] == 2 and checks["winners"] == [GEMM, ONEDNN] and stored == winner


def test_an_entry_without_checks_is_measured_again(fake, tmp_path):
    # an entry written before session 22 (no record of its measurement's checks)
    f = tmp_path / "choices.json"
    f.write_text(json.dumps({choices.entry_key(FAKE_KEY): {"path": ONEDNN, "seconds": {ONEDNN: 1.0}}}))
    choices.forget()
    assert choices.lookup(FAKE_KEY) is None
    winner, stored, _ = fake(QUIET)
    assert winner == stored == GEMM
    assert json.loads(f.read_text())[choices.entry_key(FAKE_KEY)]["checks"]["stored"] is True


# ---- the quick measurement (session 33): a slice of the weight, one measurement per slice shape ----

SLICE_ROWS = 128


@pytest.fixture
def sliced(tmp_path, monkeypatch):
    """Quick mode with a slice of SLICE_ROWS rows at K (the real kernels run, times scripted)."""
    f = tmp_path / "choices.json"
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(f))
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", "quick")
    monkeypatch.delenv("CODESHELL_KERNEL_ISA", raising=False)
    monkeypatch.setattr(ops, "prefill_candidates", lambda p, dt, level: list(CANDS))
    monkeypatch.setattr(measure, "MEASURE_SLICE_WEIGHTS", SLICE_ROWS * K)
    monkeypatch.setattr(measure, "MEASURE_SLICE_MIN_ROWS", 64)
    monkeypatch.setattr(measure, "_host_load", lambda: 0.1)
    monkeypatch.setattr(measure, "_others_per_core", lambda mark: 0.0)
    _levels(monkeypatch, 100.0)
    measure._SLICE_LOOKS.clear()
    choices.forget()
    yield f
    measure._SLICE_LOOKS.clear()
    choices.forget()


def _weights(*ns):
    for n in ns:
        ops._CHOICES.pop(("int8", n, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32"), None)
    return [quantize_int8(torch.randn(n, K)) for n in ns]


def _entry(f, n):
    data = json.loads(f.read_text())
    (hit,) = [v for k, v in data.items() if k.startswith(f"int8|{n}|{K}|prefill|")]
    return hit


@needs_native
def test_quick_measures_a_slice_shared_by_the_weights_of_one_kind_and_k(sliced, monkeypatch):
    # Two int8 weights of K columns and 512 / 1024 rows: the first measures the candidates on a
    # view of its first 128 rows (dequantizing sgemm:fp32 expands those rows only), the second
    # takes that measurement without a call; each has its own entry, times scaled to its N.
    clock = _install(monkeypatch, _Clock({"sgemm:fp32": 1e-6, "avx2:unpack": 2e-6}, run=True))
    a, b = _weights(512, 1024)
    x = torch.randn(M, K)
    ops.linear(x, a, impl="native")
    assert clock.seen and {(r, ptr) for _, r, ptr in clock.seen} == {(SLICE_ROWS, a.data.data_ptr())}
    ea = _entry(sliced, 512)
    assert ea["path"] == "sgemm:fp32" and ea["checks"]["rows"] == SLICE_ROWS and ea["checks"]["shared"] is False
    assert ea["checks"]["stored"] and ea["checks"]["calls"] == len(clock.seen) == _measured("quick") - 1
    per_row = len(measure.PREFILL_MEASURE_ROWS) * 1e-6  # each M's best per row, summed
    assert ea["seconds"]["sgemm:fp32"] == pytest.approx(per_row * 512 / SLICE_ROWS)

    seen = len(clock.seen)
    y = ops.linear(x, b, impl="native")
    assert len(clock.seen) == seen  # shared: nothing measured for the second weight
    eb = _entry(sliced, 1024)
    assert eb["path"] == ea["path"] and eb["checks"]["shared"] is True and eb["checks"]["rows"] == SLICE_ROWS
    assert eb["seconds"]["sgemm:fp32"] == pytest.approx(per_row * 1024 / SLICE_ROWS)
    torch.testing.assert_close(y, ops.linear(x, b, impl="reference"), rtol=1e-4, atol=1e-4)

    # a fresh process reads both entries; the full measurement (A/B) does not take a slice's entry
    measure._SLICE_LOOKS.clear()
    choices.forget()
    key = ("int8", 512, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32")
    assert choices.lookup(key, CANDS) == ea["path"] and choices.lookup(key, CANDS, whole=True) is None


@needs_native
def test_full_measures_every_weight_whole(sliced, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", "full")
    clock = _install(monkeypatch, _Clock({"sgemm:fp32": 1e-6, "avx2:unpack": 2e-6}, run=True))
    a, b = _weights(512, 1024)
    x = torch.randn(M, K)
    ops.linear(x, a, impl="native")
    ops.linear(x, b, impl="native")
    assert {r for _, r, _ in clock.seen} == {512, 1024} and len(clock.seen) == 2 * (_measured("full") - 1)
    ea = _entry(sliced, 512)
    assert ea["checks"]["rows"] == 512 and ea["checks"]["shared"] is False
    key = ("int8", 512, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32")
    choices.forget()
    assert choices.lookup(key, CANDS, whole=True) == choices.lookup(key, CANDS) == ea["path"]


@needs_native
def test_an_untrusted_slice_measurement_is_stored_for_no_weight(sliced, monkeypatch):
    # a loaded host: the shared measurement holds for this process (both weights, no second
    # measurement) and is stored for neither
    monkeypatch.setattr(measure, "_host_load", lambda: 2.5)
    monkeypatch.setattr(ops, "CHOICE_CHECKS", {})  # only this test's checks (earlier tests' entries of these shapes stay out)
    clock = _install(monkeypatch, _Clock({"sgemm:fp32": 1e-6, "avx2:unpack": 2e-6}, run=True))
    a, b = _weights(512, 1024)
    x = torch.randn(M, K)
    ops.linear(x, a, impl="native")
    seen = len(clock.seen)
    ops.linear(x, b, impl="native")
    assert len(clock.seen) == seen
    assert {c["stored"] for k, c in ops.CHOICE_CHECKS.items() if k[1] in (512, 1024) and k[2] == K} == {False}
    # kept as provisional entries only (session 36: no process takes them without measuring)
    choices.forget()
    for n in (512, 1024):
        key = ("int8", n, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32")
        assert choices.lookup(key, CANDS) is None and _entry(sliced, n)["checks"]["stored"] is False


@needs_native
def test_an_unsteady_slice_look_is_not_stored(sliced, monkeypatch):
    # every other call of every candidate twice as slow, in every look: no early stop where an M's
    # calls scatter, the look is unsteady, a second look, nothing stored
    _install(monkeypatch, _Clock({"sgemm:fp32": 1e-6, "avx2:unpack": 2e-6}, lambda c, look, n: 2.0 if n % 2 else 1.0,
                                 run=True))
    (a,) = _weights(512)
    ops.linear(torch.randn(M, K), a, impl="native")
    key = ("int8", 512, K, "prefill", ops.ISA_LEVELS[ops.isa_level()], "float32")
    checks = ops.CHOICE_CHECKS[key]
    choices.forget()
    assert checks["looks"] == 2 and not checks["stored"] and choices.lookup(key, CANDS) is None
    # at an M whose three calls read steady by chance (2, 1, 2 x: median 2) the rounds go on
    assert 2 * (_measured("quick") - 1) < checks["calls"] <= 2 * len(CANDS) * (1 + measure.MEASURE_ROUNDS * 3)


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_a_row_slice_is_a_view_giving_the_first_rows(kind):
    from codeshell.kernels import _ext
    from codeshell.kernels.packing import prepack, quantize_int4
    w = torch.randn(320, K)
    p = {"bf16": prepack, "int8": quantize_int8, "int4": lambda t: quantize_int4(t, 128, symmetric=False)}[kind](w)
    part = measure._row_slice(p, 128)
    assert part.out_features == 128 and part.data.data_ptr() == p.data.data_ptr()
    assert part.data.untyped_storage().data_ptr() == p.data.untyped_storage().data_ptr()  # no copy
    x = torch.randn(M, K)
    for path in ["sgemm:fp32"] + ([] if kind == "bf16" else ["avx2:unpack"]):
        torch.testing.assert_close(ops._compute(path, _ext.get(), x, part, None),
                                   ops._compute(path, _ext.get(), x, p, None)[:, :128], rtol=1e-5, atol=1e-5)


def test_slice_rows():
    # at least MEASURE_SLICE_WEIGHTS weights, in MEASURE_SLICE_ALIGN rows, the whole weight
    # where the slice would be 3/4 of it or more
    pw = lambda n, k: types.SimpleNamespace(out_features=n, in_features=k)
    assert measure._measure_rows(pw(16384, 4096)) == max(measure.MEASURE_SLICE_MIN_ROWS, measure.MEASURE_SLICE_WEIGHTS // 4096)
    assert measure._measure_rows(pw(300, 4096)) == 300
    r = measure._measure_rows(pw(100000, 1000))
    assert r % measure.MEASURE_SLICE_ALIGN == 0 and r * 1000 >= measure.MEASURE_SLICE_WEIGHTS


def test_a_bad_switch_value_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", "fast")
    with pytest.raises(ValueError, match="CODESHELL_KERNEL_MEASURE='fast': expected quick or full") as e:
        measure.mode()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(tmp_path))  # a folder
    choices.forget()
    with pytest.raises(ValueError, match="is a folder") as e:
        choices.lookup(FAKE_KEY)
    assert "\n" not in str(e.value)


def test_other_processes_during_the_measurement_mean_not_stored(fake):
    # a steady clear winner, a quiet load average, but other processes took 0.5 of each core while
    # it measured (a burst the 1-minute average has not caught up with): held, not stored
    winner, stored, checks = fake(QUIET, others=0.5)
    assert winner == GEMM and stored is None and not checks["stored"] and checks["others_per_core"] == 0.5


def test_others_per_core_reads_this_host():
    mark = measure._cpu_mark()
    sum(i * i for i in range(200000))  # this process's own work is not another's
    assert 0.0 <= measure._others_per_core(mark) <= 1.0 + 1e-9 or mark is None


# ---- the host's level (session 36): the host moves between speed levels over seconds ----
# The scripted case is session 36's: at the slow level the GEMM slows more than the other paths (its
# calls 1.9x, oneDNN's 1.2x), so a measurement wholly inside it finds oneDNN ahead, steadily and
# clearly; at the fast level the GEMM leads by 30%.

SLOW = {GEMM: 1.9, ONEDNN: 1.2, PANEL: 1.2}


@pytest.fixture(params=MODES)
def proc(request, tmp_path, monkeypatch):
    """`ops._choose` for a fake bf16 weight as a fresh process runs it, in each measuring mode:
    returns run(level_probes, slow) -> (the path chosen, the stored entry or None, the process's
    checks or None where nothing was measured, the scripted calls made). slow(look, n) -> whether
    call n of a candidate in that look runs at the slow level."""
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(tmp_path / "choices.json"))
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", request.param)
    monkeypatch.setattr(ops._ext, "get", lambda: None)
    monkeypatch.setattr(measure, "_host_load", lambda: 0.1)
    monkeypatch.setattr(measure, "_others_per_core", lambda mark: 0.0)
    weight = types.SimpleNamespace(kind="bf16", out_features=16, in_features=8)
    key = ("bf16", 16, 8, "prefill", ops.ISA_LEVELS[0], "bfloat16")
    cands = [GEMM, ONEDNN, PANEL]

    def run(probes, slow=lambda look, n: False, load=0.1, burst=lambda c, look, n: 1.0):
        clock = _install(monkeypatch, _Clock(QUIET, lambda c, look, n: (SLOW[c] if slow(look, n) else 1.0)
                                             * burst(c, look, n)))
        monkeypatch.setattr(measure, "_host_load", lambda: load)
        _levels(monkeypatch, *probes)
        _fresh_process_state(key)
        ops.CHOICE_CHECKS.pop(key, None)
        path = ops._choose(weight, 100, torch.bfloat16, 0, cands)
        choices.forget()
        return path, choices.entry(key, cands), ops.CHOICE_CHECKS.get(key), len(clock.seen)

    choices.forget()
    yield run
    _fresh_process_state(key)
    ops.CHOICE_CHECKS.pop(key, None)


def test_a_choice_stored_at_a_slow_level_is_overturned_by_a_faster_process(proc):
    # process 1 measures wholly at the slow level (probe 60): oneDNN, steady and clear, stored
    path, entry, checks, _ = proc([60.0], lambda look, n: True)
    assert path == ONEDNN and entry["path"] == ONEDNN and checks["level"] == 60.0 and checks["looks"] == 1
    # process 2 reads the host at 100 (> 60 x 1.25): it measures again, at the fast level; the
    # merged times (each candidate's least over both processes) put the GEMM ahead: overturned, stored
    path, entry, checks, calls = proc([100.0])
    assert calls > 0 and path == GEMM == entry["path"]
    assert checks["relook"] == ONEDNN and checks["overturned"] and checks["merged"] == 2
    assert entry["checks"]["level"] == 100.0 and entry["checks"]["level_before"] == 60.0
    # process 3, back at the slow level (or at the same level): the stored GEMM, nothing measured
    for probe in (60.0, 110.0):
        path, entry, checks, calls = proc([probe])
        assert (path, calls, checks) == (GEMM, 0, None)


def test_a_faster_process_confirms_a_choice_stored_at_a_slower_level(proc):
    path, entry, _, _ = proc([75.0])  # the right path, at a slower level
    assert path == GEMM and entry["checks"]["level"] == 75.0
    path, entry, checks, calls = proc([100.0])
    assert calls > 0 and path == GEMM and checks["relook"] == GEMM and not checks["overturned"]
    assert entry["checks"]["level"] == 100.0 and entry["checks"]["merged"] == 2
    assert proc([100.0])[3] == 0  # settled: not measured again at the same level


def test_an_entry_without_a_level_is_measured_again_once(proc, tmp_path):
    # an entry of a version before the levels (checks without "level"): one re-look records its level
    proc([100.0])
    f = tmp_path / "choices.json"
    data = json.loads(f.read_text())
    (k,), = [tuple(data)]
    del data[k]["checks"]["level"]
    f.write_text(json.dumps(data))
    choices.forget()
    path, entry, checks, calls = proc([100.0])
    assert calls > 0 and checks["relook"] == GEMM and entry["checks"]["level"] == 100.0
    assert proc([100.0])[3] == 0


def test_no_level_probe_means_no_relook(proc):
    # a host without the probe (no native kernels: level 0) keeps the stored choice as before
    proc([0.0])
    assert proc([0.0])[3] == 0


def test_a_level_change_after_the_first_look_gets_a_second_look_and_only_the_fast_one_votes(proc):
    # the first look runs at the slow level and finds oneDNN clearly ahead (one look before session
    # 36: oneDNN stored); the probe after it reads the host 1.67x faster, so a second look, at the
    # fast level: the slow look has no vote, each candidate keeps its least time, the GEMM is stored
    path, entry, checks, _ = proc([60.0, 100.0], lambda look, n: look == 0)
    assert checks["looks"] == 2 and checks["winners"] == [ONEDNN, GEMM] and checks["levels"] == [60.0, 100.0, 100.0]
    assert path == GEMM == entry["path"] and checks["level"] == 100.0


def test_a_level_change_back_to_slow_after_the_first_look_keeps_the_fast_times(proc):
    # the other way round: the first look fast (GEMM), the second slow (oneDNN). Which level the
    # first look ran at is not known (the host moved during or after it: its level is the lesser
    # probe), so both vote, they disagree, nothing is stored; this process keeps the least times: the GEMM
    path, entry, checks, _ = proc([100.0, 60.0], lambda look, n: look == 1)
    assert checks["looks"] == 2 and checks["winners"] == [GEMM, ONEDNN]
    assert path == GEMM and entry is None and not checks["stored"]


def test_a_level_change_inside_a_look_does_not_pick_the_slower_path(proc):
    # the host goes fast after each candidate's first two calls of the look (the warm-up and the first
    # round, every candidate alike, as the calls alternate): each candidate's best is a fast call
    path, entry, checks, _ = proc([100.0], lambda look, n: n < 2)
    assert path == GEMM
    assert entry is None or entry["path"] == GEMM


def test_untrusted_measurements_are_merged_by_the_next_process(proc):
    # a loaded host (load average 2.5 a core: nothing is trusted) and another process's work on
    # different candidates in each process. Before session 36 each process took its own winner.
    # Now each measurement is kept as a provisional entry and the next one merges its times (each
    # candidate's least): from the second process on, every process takes the GEMM.
    on = lambda victim: (lambda c, look, n: 2.0 if c == victim else 1.0)
    path, entry, checks, _ = proc([100.0], load=2.5, burst=on(GEMM))
    assert path == ONEDNN and entry is None and not checks["stored"] and checks["merged"] == 1
    paths = []
    for i, victim in enumerate([ONEDNN, GEMM, GEMM, PANEL]):
        path, entry, checks, calls = proc([100.0], load=2.5, burst=on(victim))
        assert calls > 0 and entry is None and checks["merged"] == i + 2  # measured every time, never trusted
        paths.append(path)
    assert paths == [GEMM] * 4
    # a quiet process then measures, merges and stores the GEMM as trusted; the next one takes it
    path, entry, checks, calls = proc([100.0])
    assert path == GEMM == entry["path"] and "relook" not in checks and checks["merged"] == 6
    assert proc([100.0])[3] == 0


def test_a_provisional_entry_never_replaces_a_trusted_one(proc):
    proc([60.0])  # trusted GEMM at level 60
    # a faster process re-looks on a loaded host: untrusted, so the stored entry stays as it was
    path, entry, checks, calls = proc([100.0], load=2.5, burst=lambda c, look, n: 2.0 if c == GEMM else 1.0)
    assert calls > 0 and not checks["stored"] and checks["relook"] == GEMM
    assert entry["path"] == GEMM and entry["checks"]["level"] == 60.0 and entry["checks"]["stored"]
    # (each candidate's least over the stored and new times: the GEMM still, in this process too)
    assert path == GEMM


def test_a_measurement_that_cannot_be_stored_looks_again_only_as_before(proc):
    # a loaded host (load average 2.5 a core): the level moved and the lead is short of clear, but
    # nothing will be stored, so no second look for either (the first load's cost on a loaded host
    # stays what it was); the process keeps its look's winner, kept as a provisional entry
    path, entry, checks, _ = proc([60.0, 100.0], lambda look, n: look == 0, load=2.5)
    assert checks["looks"] == 1 and path == ONEDNN and entry is None and not checks["stored"]


# ---- a GELU linear's own choice (session 41) ----

def _gelu_clock(seen):
    """Scripted `measure._time_call` for the three bf16 candidates: bare, oneDNN leads the GEMM by 20%;
    with the GELU (epilogue "gelu") the GEMM's epilogue adds 10% and the others' separate pass 60%,
    which turns the order. Records (candidate, epilogue) of each call in `seen`."""
    def clock(c, mod, x, p, x_dtype, epilogue=None):
        seen.append((c, epilogue))
        base = {GEMM: 1.2e-6, ONEDNN: 1.0e-6, PANEL: 3.0e-6}[c]
        return base * x.shape[0] * ((1.1 if c == GEMM else 1.6) if epilogue == "gelu" else 1.0)
    return clock


@pytest.fixture(params=MODES)
def gelu_case(request, tmp_path, monkeypatch):
    """A fake bf16 weight, its plain and GELU choice keys and the candidates, on a quiet scripted host
    with a choices file in tmp_path, in each measuring mode; yields (weight, plain key, gelu key,
    cands, seen calls, the file)."""
    f = tmp_path / "choices.json"
    monkeypatch.setenv("CODESHELL_KERNEL_CHOICES", str(f))
    monkeypatch.setenv("CODESHELL_KERNEL_MEASURE", request.param)
    monkeypatch.setattr(ops._ext, "get", lambda: None)
    monkeypatch.setattr(measure, "_host_load", lambda: 0.1)
    monkeypatch.setattr(measure, "_others_per_core", lambda mark: 0.0)
    _levels(monkeypatch, 100.0)
    seen: list = []
    monkeypatch.setattr(measure, "_time_call", _gelu_clock(seen))
    weight = types.SimpleNamespace(kind="bf16", out_features=16, in_features=8)
    plain = ("bf16", 16, 8, "prefill", ops.ISA_LEVELS[0], "bfloat16")
    gelu = plain + ("gelu",)
    for key in (plain, gelu):
        _fresh_process_state(key)
    yield weight, plain, gelu, [GEMM, ONEDNN, PANEL], seen, f
    for key in (plain, gelu):
        _fresh_process_state(key)
        ops.CHOICE_CHECKS.pop(key, None)


def test_a_gelu_linear_is_planned_with_its_gelu_apart_from_the_plain_choice(gelu_case):
    # ops.plan(..., epilogue="gelu") (c_fc, FastLinear.raw_gelu) is a choice of its own, every candidate
    # timed with the GELU (the GEMM's epilogue, the others' separate pass: measure._time_call's
    # epilogue); the plain choice of the same weight shape is measured apart (not shared as a slice
    # shape either: the quick measurement keys its slice looks by the epilogue too)
    weight, plain, gelu, cands, seen, f = gelu_case
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands) == ONEDNN
    assert seen and {e for _, e in seen} == {None}
    seen.clear()
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands, "gelu") == GEMM
    assert {c for c, _ in seen} == set(cands) and {e for _, e in seen} == {"gelu"}
    t = ops.CHOICE_TIMES[gelu]
    assert t[GEMM] < t[ONEDNN] < t[PANEL] and ops.CHOICE_TIMES[plain][ONEDNN] < ops.CHOICE_TIMES[plain][GEMM]
    # both stored, apart, marked as timed with their epilogues; a fresh process reads each, measuring nothing
    data = json.loads(f.read_text())
    assert {data[choices.entry_key(k)]["path"] for k in (plain, gelu)} == {ONEDNN, GEMM}
    assert all(k.endswith(f"|timed={choices.MEASURED}") for k in data)
    for key in (plain, gelu):
        _fresh_process_state(key)
    seen.clear()
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands) == ONEDNN
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands, "gelu") == GEMM
    assert not seen


def test_entries_of_an_older_file_are_measured_again_not_misread(gelu_case):
    # a file written before session 41: its keys have no `|timed=` mark (the candidates were timed
    # bare), trusted entries naming panel64 for this weight; they are left unread: both choices
    # measured again and stored under the new keys, the old entries kept as they were, nothing raised
    weight, plain, gelu, cands, seen, f = gelu_case
    old_key = choices.entry_key(plain).rsplit("|timed=", 1)[0]
    entry = {"path": PANEL, "seconds": {c: 1e-6 for c in cands}, "checks": {"stored": True, "level": 1e9}}
    f.write_text(json.dumps({old_key: entry, old_key.replace("|bfloat16|", "|bfloat16|gelu|"): entry,
                             "not|a|key": [1, 2]}))
    choices.forget()
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands) == ONEDNN
    assert ops._choose(weight, 100, torch.bfloat16, 0, cands, "gelu") == GEMM
    assert {e for _, e in seen} == {None, "gelu"}
    data = json.loads(f.read_text())
    assert data[old_key] == entry and data[choices.entry_key(gelu)]["path"] == GEMM
