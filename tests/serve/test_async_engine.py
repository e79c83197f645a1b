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
