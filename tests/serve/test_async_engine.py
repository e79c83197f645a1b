"""AsyncEngine: requests run concurrently through its loop thread give the greedy text of
`LLM.generate`, and each request's outputs end with one finished output."""

from __future__ import annotations

import asyncio

import pytest

from codeshell.engine import SamplingParams
from codeshell.engine.async_engine import AsyncEngine

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push", "# sort a list\n"]


@pytest.fixture(scope="module")
def tiny_llm(model_dir):
    from codeshell import LLM
    return LLM(model_dir, max_batch=4, threads=1)


def run_requests(llm) -> list[tuple[str, int]]:
    """The PROMPTS through an AsyncEngine, concurrently, greedy: each one's text and how many of
    its outputs said finished."""
    async def main() -> list[tuple[str, int]]:
        ae = AsyncEngine(llm.engine)
        ae.start()
        try:
            async def one(k: int, prompt: str) -> tuple[str, int]:
                text, done = "", 0
                sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
                async for out in ae.generate(f"r{k}", llm.tokenizer.encode(prompt), sp):
                    text = out.outputs[0].text
                    done += out.finished
                return text, done
            return list(await asyncio.gather(*(one(k, p) for k, p in enumerate(PROMPTS))))
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
    return asyncio.run(main())


def test_async_engine_same_text_as_generate(tiny_llm):
    want = [o.outputs[0].text for o in tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                                                  ignore_eos=True))]
    got = run_requests(tiny_llm)
    assert [t for t, _ in got] == want
    assert all(d == 1 for _, d in got)


def _first_admissions(llm, gather_s: float, gap_s: float) -> list[int]:
    """PROMPTS added `gap_s` apart to an idle AsyncEngine: how many requests each admitting step took."""
    eng = llm.engine
    sizes: list[int] = []
    admit = eng._admit

    def recording_admit():
        got = admit()
        if got:
            sizes.append(len(got))
        return got

    async def main() -> None:
        ae = AsyncEngine(eng, gather_s=gather_s)
        ae.start()
        try:
            sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            gens = []
            for k, p in enumerate(PROMPTS):
                gens.append(ae.generate(f"g{k}", llm.tokenizer.encode(p), sp))
                await asyncio.sleep(gap_s)

            async def drain(g):
                async for _ in g:
                    pass
            await asyncio.gather(*(drain(g) for g in gens))
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)

    eng._admit = recording_admit
    try:
        asyncio.run(main())
    finally:
        del eng._admit
    return sizes


def test_idle_engine_gathers_requests_arriving_together(tiny_llm, monkeypatch):
    """Woken from idle, the loop waits while requests keep coming (each within the quiet time of
    the last): three requests 50 ms apart share the first prefill step. Gathering off (0), the
    first request's prefill starts alone (the loop thread wakes well within 50 ms)."""
    import codeshell.engine.async_engine as ae_mod
    monkeypatch.setattr(ae_mod, "GATHER_QUIET_S", 1.0)  # 50 ms gaps are "together" here
    assert _first_admissions(tiny_llm, gather_s=5.0, gap_s=0.05)[0] == len(PROMPTS)
    assert _first_admissions(tiny_llm, gather_s=0.0, gap_s=0.05)[0] == 1


def test_gather_window_setting():
    from codeshell.engine.async_engine import gather_window
    assert gather_window({}) == 0.05
    assert gather_window({"CODESHELL_ADMIT_GATHER_MS": "0"}) == 0.0
    assert gather_window({"CODESHELL_ADMIT_GATHER_MS": "12.5"}) == 0.0125
    for bad in ("x", "-1", "5000"):
        with pytest.raises(ValueError, match="CODESHELL_ADMIT_GATHER_MS"):
            gather_window({"CODESHELL_ADMIT_GATHER_MS": bad})
