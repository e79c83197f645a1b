"""One generated sequence: its tokens, its text, its stop rules and its streaming state.

Stop strings are caught even when they span tokens and are cut from the text; text that
could still turn out to be the start of a stop string is held back from the stream.
"""

from __future__ import annotations

from .lookup import AcceptRate
from .outputs import CompletionOutput, Logprob
from .sampling import SamplingParams, SequenceSampler


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 sampler: SequenceSampler, slot: int, tokenizer, eos_id: int | None, lazy: bool = True):
        self.request_id = request_id
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.sampler = sampler
        self.slot: int | None = slot
        self.cached = 0  # positions whose KV is in the cache
        self.lookup = None  # its n-gram index (engine/lookup.py), made at its first draft
        self.draft_len = 0  # the current draft length limit (adapted to how drafts fare)
        self.accept_odds = AcceptRate()  # its verified drafts, as per-token odds
        self.accept_rate = self.accept_odds.rate  # DraftBudget's odds (the engine keeps it current)
        self.output_ids: list[int] = []
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.streamed = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.decoder = tokenizer.decoder(params.skip_special_tokens) if tokenizer is not None else None
        stop_ids = set(params.stop_token_ids or [])
        if eos_id is not None and not params.ignore_eos:
            stop_ids.add(eos_id)
        self.stop_ids = stop_ids
        self.max_stop = max((len(s) for s in params.stops), default=0)
        # every non-empty prefix of a stop string: `_held_back` runs for each running sequence at
        # every step, and a set lookup per tail length is ~5x cheaper than `startswith` over the
        # stops (12 -> ~2 us with the chat stops)
        self._stop_prefixes = {s[:k] for s in params.stops for k in range(1, len(s) + 1)}
        # greedy without penalties and without logprobs: its token is the native step's greedy
        # pick as it is (`Engine` then skips the sampler and the logits row: ~10 us a token)
        self.plain_greedy = params.greedy and not getattr(sampler, "_mutates", True) and params.logprobs is None
        # Lazy detokenization (`lazy`, the default; the engine passes False under
        # CODESHELL_ENGINE_LEAN=off): without stop strings nothing needs `text` before an output is
        # made, so `append` only records the token and `output` / `finish` feed the decoder the
        # tokens since (the same calls in the same order: the same text). `skip_output` (an output
        # nobody reads, `Engine.step(final_only=True)`) records where the stream would have been, so
        # the final delta is what streaming gives. Per token at the small shape the decoder's two
        # decodes cost ~20 us in place (cold after the native step) against ~4 in a batch at the end.
        self._lazy = lazy and self.decoder is not None and not self.max_stop
        self._fed = 0    # output_ids fed to the decoder (lazy)
        self._mark = -1  # lazy: len(output_ids) at the last skipped output (-1: none since)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def cached_tokens(self) -> list[int]:
        """The tokens whose KV sits in this sequence's slot, positions 0..cached-1."""
        return (self.prompt_ids + self.output_ids)[:self.cached]

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if self.decoder is not None and not isinstance(stop_reason, str):
            if self._lazy:  # a stop token ends output_ids and is never decoded
                self._apply_mark()
                n = len(self.output_ids)
                self._sync(n - 1 if reason == "stop" else n)
                self._fed = n
            self.text += self.decoder.flush()

    def _sync(self, n: int) -> None:
        """Lazy: feed the decoder output_ids[_fed:n], as `append` would have one at a time."""
        ids, add = self.output_ids, self.decoder.add
        while self._fed < n:
            self.text += add(ids[self._fed])
            self._fed += 1

    def _apply_mark(self) -> None:
        """Lazy: the stream position the last skipped output left (its text decoded up to there)."""
        if self._mark >= 0:
            self._sync(self._mark)
            self.streamed = max(self.streamed, len(self.text))  # nothing held back: no stop strings
            self._mark = -1

    def append(self, token: int, logprob: Logprob | None, max_model_len: int) -> None:
        self.output_ids.append(token)
        self.sampler.observe(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.finish("stop", token)
            return
        if self.decoder is not None and not self._lazy:
            before = len(self.text)
            self.text += self.decoder.add(token)
            if self.max_stop and len(self.text) > before and self._check_stop(before):
                return
        if self.params.max_tokens is not None and len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")
        elif len(self.prompt_ids) + len(self.output_ids) >= max_model_len:
            self.finish("length")

    def append_many(self, tokens: list[int], max_model_len: int, stepwise: bool = False) -> int:
        """`append` each of `tokens` (no logprobs) until the sequence finishes; returns how many
        were appended (a verify step's accepted drafts and the token after them). `stepwise`: as
        many one-token steps of LLM.generate would leave the stream (`skip_output` after each token
        but the last), so the final output's delta is the last token's text whatever the number of
        tokens a native call made (Engine._decode_many / _decode_many_rows)."""
        last = len(tokens) - 1
        for i, t in enumerate(tokens):
            self.append(t, None, max_model_len)
            if self.finish_reason is not None:
                return i + 1
            if stepwise and i < last:
                self.skip_output()
        return len(tokens)

    def _check_stop(self, before: int) -> bool:
        start = max(0, before - self.max_stop + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.streamed = min(self.streamed, len(self.text))
        self.finish("stop", s)
        return True

    def _held_back(self) -> int:
        """Characters at the end of `text` that may be the beginning of a stop string."""
        if self.finished or not self.max_stop:
            return 0
        text, prefixes = self.text, self._stop_prefixes
        for k in range(min(len(text), self.max_stop - 1), 0, -1):
            if text[-k:] in prefixes:
                return k
        return 0

    def skip_output(self) -> None:
        """What `output` does to the stream, without making the output (nobody reads it)."""
        if self._lazy:
            self._mark = len(self.output_ids)
            return
        upto = len(self.text) - self._held_back()
        self.streamed = max(self.streamed, upto)

    def output(self) -> CompletionOutput:
        if self._lazy:
            self._apply_mark()
            self._sync(len(self.output_ids))
        upto = len(self.text) - self._held_back()
        delta = self.text[self.streamed:upto] if upto > self.streamed else ""
        self.streamed = max(self.streamed, upto)
        return CompletionOutput(self.index, self.text[:upto] if not self.finished else self.text,
                                list(self.output_ids), self.finish_reason, self.stop_reason,
                                list(self.logprobs) if self.logprobs is not None else None, delta)
