"""AsyncEngine's hand-off of a step's outputs to the event loop (CODESHELL_SERVE_HANDOFF):
`overlap` (the next step starts at once) and `wait` (the engine thread waits for the loop's turn
over the outputs first) give the same text, and `wait` really lets the loop take each step's
outputs before the next step starts."""

from __future__ import annotations

import asyncio
import threading

import pytest

from codeshell.engine import SamplingParams
from codeshell.engine.async_engine import AsyncEngine, handoff_mode

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push", "# sort a list\n"]


@pytest.fixture(scope="module")
def tiny_llm(model_dir):
    from codeshell import LLM
    return LLM(model_dir, max_batch=4, threads=1)


def run_requests(llm, handoff: str, on_output=None) -> list[str]:
    """The PROMPTS through an AsyncEngine with `handoff`, concurrently, greedy: their texts."""
    async def main() -> list[str]:
        ae = AsyncEngine(llm.engine, handoff=handoff)
        ae.handoff_timeout = 30.0  # a slow CI host must not turn `wait` into `overlap`
        ae.start()
        try:
            async def one(k: int, prompt: str) -> str:
                text = ""
                sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
                async for out in ae.generate(f"r{handoff}{k}", llm.tokenizer.encode(prompt), sp):
                    if on_output is not None:
                        on_output(ae, out)
                    text = out.outputs[0].text
                return text
            return list(await asyncio.gather(*(one(k, p) for k, p in enumerate(PROMPTS))))
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ae.shutdown)
    return asyncio.run(main())


def test_handoff_modes_same_text(tiny_llm):
    want = [o.outputs[0].text for o in tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                                                  ignore_eos=True))]
    assert run_requests(tiny_llm, "overlap") == want
    assert run_requests(tiny_llm, "wait") == want


def test_handoff_wait_outputs_taken_before_next_step(tiny_llm, monkeypatch):
    # Count the engine's steps as they start; with `wait`, a step's outputs reach their request's
    # task while no later step has started (the engine thread waits for the loop's turn).
    started = [0]
    lock = threading.Lock()
    real_step = tiny_llm.engine.step

    def counting_step():
        with lock:
            started[0] += 1
        return real_step()

    monkeypatch.setattr(tiny_llm.engine, "step", counting_step)
    seen = []
    run_requests(tiny_llm, "wait", lambda ae, out: seen.append((started[0], ae.steps)))
    assert seen and all(s == done for s, done in seen), seen


def test_handoff_mode_switch(monkeypatch):
    monkeypatch.delenv("CODESHELL_SERVE_HANDOFF", raising=False)
    assert handoff_mode() == "overlap"
    monkeypatch.setenv("CODESHELL_SERVE_HANDOFF", "wait")
    assert handoff_mode() == "wait"
    monkeypatch.setenv("CODESHELL_SERVE_HANDOFF", "sometimes")
    with pytest.raises(ValueError, match="CODESHELL_SERVE_HANDOFF"):
        handoff_mode()
    with pytest.raises(ValueError):
        AsyncEngine(object(), handoff="sometimes")
