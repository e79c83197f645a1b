"""The extension's `same_entries` (kernels/step.py `_Checks.valid_native`, the rebuild check the
engine's lean path runs before every native decode step) answers as `_Checks.valid`'s Python
loops: dict entries by identity (an absent key reads as None, as dict.get), tensor versions."""

from __future__ import annotations

import pytest
import torch

from codeshell.kernels import _ext
from codeshell.kernels.step import _Checks

mod = _ext.get()
pytestmark = pytest.mark.skipif(mod is None or not hasattr(mod, "same_entries"), reason="native kernels unavailable")


def _both(ch: _Checks) -> bool:
    a, b = ch.valid(), ch.valid_native(mod.same_entries)
    assert a == b
    return a


def test_same_entries_answers_as_the_python_check():
    lin = torch.nn.Linear(4, 4)
    ln = torch.nn.LayerNorm(4)
    holder = {"x": object(), "none": None}
    ch = _Checks()
    ch.add(lin._parameters, "weight")
    ch.add(ln.__dict__, "eps")
    ch.add(holder, "x")
    ch.add(holder, "none")
    ch.add(holder, "absent")  # recorded as None
    b = lin._parameters["bias"]
    ch.tensors.append(b)
    ch.versions.append(b._version)
    assert _both(ch)
    with torch.no_grad():
        b.add_(1)  # in place: a new version
    assert not _both(ch)
    ch.versions[0] = b._version
    assert _both(ch)
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # a swapped parameter
    assert not _both(ch)
    ch.objs[0] = lin.weight
    assert _both(ch)
    ln.eps = 1e-5 + 0.0  # an eps set anew: a new float object
    assert not _both(ch)
    ch.objs[1] = ln.eps
    holder["absent"] = 3  # present now
    assert not _both(ch)
    holder["absent"] = None  # present as None: dict.get's None as well
    assert _both(ch)
    del holder["none"]  # absent: None
    assert _both(ch)
    holder["x"] = object()
    assert not _both(ch)


def test_same_entries_on_many_entries_and_bad_input():
    ds = [{"k": object()} for _ in range(300)]  # past the prefetch distance
    ch = _Checks()
    for d in ds:
        ch.add(d, "k")
    assert _both(ch)
    for i in (0, 7, 8, 150, 299):
        old = ds[i]["k"]
        ds[i]["k"] = object()
        assert not _both(ch)
        ds[i]["k"] = old
        assert _both(ch)
    with pytest.raises(RuntimeError, match="one entry each"):
        mod.same_entries([{}], [], [], [], [])
    with pytest.raises(RuntimeError, match="not a dict"):
        mod.same_entries([[]], ["k"], [None], [], [])
    with pytest.raises(RuntimeError, match="not a tensor"):
        mod.same_entries([], [], [], [3], [0])


def test_codeshell_mini_generates_the_same_lean_or_not(monkeypatch):
    from codeshell import LLM, SamplingParams
    from codeshell.kernels import step as kstep
    llm = LLM(max_batch=2)
    ps = [{"prompt_token_ids": [5, 9, 200, 31, 7]}, "def add(a, b):"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # which rebuild check each step ran: the engine's own `lean` picks it (no process-wide state)
    ran = []
    valid, native = _Checks.valid, _Checks.valid_native
    monkeypatch.setattr(_Checks, "valid", lambda self: ran.append("py") or valid(self))
    monkeypatch.setattr(_Checks, "valid_native", lambda self, f: ran.append("native") or native(self, f))
    got = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("CODESHELL_ENGINE_LEAN", mode)
        ran.clear()
        got[mode] = [(c.text, c.token_ids, c.finish_reason, c.delta) for o in llm.generate(ps, sp) for c in o.outputs]
        d = kstep._DECODERS.get(llm.model)
        assert d is not None and d.step is not None  # the native step ran
        assert ran and set(ran) == {"native" if mode == "on" else "py"}, ran
        assert llm.engine.lean == (mode == "on")
    assert got["on"] == got["off"]
    # engines are independent: one set lean off after another set it on leaves the first one's
    # steps on the native check, and its own on the Python one (driven by step(), not generate,
    # which sets lean from the environment)
    other = LLM(max_batch=1)
    llm.engine.set_lean(True)
    other.engine.set_lean(False)
    for eng, want in ((llm.engine, "native"), (other.engine, "py"), (llm.engine, "native")):
        ran.clear()
        eng.add_request(f"r-{want}-{len(got)}", [5, 9, 200], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        got[len(got)] = True
        while eng.has_unfinished():
            eng.step()
        assert ran and set(ran) == {want}, (want, ran)
