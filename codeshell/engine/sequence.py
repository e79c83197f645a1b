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
                 sampler: SequenceSampler, slot: int, tokenizer, eos_id: int | None, lazy: bool = True,
                 bulk: bool = True):
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
        # Bulk (`bulk`, the default; the engine passes False under CODESHELL_ENGINE_BULK=off or
        # CODESHELL_ENGINE_LEAN=off): where nothing reads the text or a logprob per token (lazy, or no
        # decoder; no stop strings, no logprobs), `append_many` takes a native call's tokens in one go
        # (`_append_bulk`: one extend, the finish found by one search, the stream mark set once) and the
        # lazy decoder is fed a run of tokens by one call (`IncrementalDecoder.add_many`: the same
        # decodes of the same windows). Why: the per-token Python of LLM.generate's batch-8 greedy steps
        # (codeshell-mini: `append_many` ~65 us of a ~250 us gap between two 8-token calls, the final
        # outputs' detokenization ~2 us a token). Hot this takes ~11 us off such a gap, ~10% off the
        # decoder's time; in the real run the gap's cold first touches dominate and the difference was
        # within the noise (docs/kernels-log.md, session 40 helper B).
        self._bulk = (bulk and params.logprobs is None and not self.max_stop
                      and (self._lazy or self.decoder is None))
        self._add_many = getattr(self.decoder, "add_many", None) if self._bulk and self._lazy else None

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
        if self._add_many is not None:  # bulk: the run in one call (the same deltas, joined)
            if self._fed < n:
                self.text += self._add_many(self.output_ids[self._fed:n])
                self._fed = n
            return
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
        if self._bulk and tokens and self.finish_reason is None:
            return self._append_bulk(tokens, max_model_len, stepwise)
        last = len(tokens) - 1
        for i, t in enumerate(tokens):
            self.append(t, None, max_model_len)
            if self.finish_reason is not None:
                return i + 1
            if stepwise and i < last:
                self.skip_output()
        return len(tokens)

    def _append_bulk(self, tokens: list[int], max_model_len: int, stepwise: bool) -> int:
        """`append_many` for a bulk sequence (see `__init__`): the same tokens appended, the same
        counts, finish and stream mark as appending them one at a time. With no text read per token,
        `append` ends the sequence at the first token in `stop_ids` (a stop) or at the first that
        reaches max_tokens or the context window (a length; the stop wins at the same token), and a
        lazy `skip_output` after token i only records len(output_ids): after a run of n >= 2 tokens
        the last such record is the length before the run's last token."""
        out = self.output_ids
        n0, end = len(out), len(tokens)
        room = max_model_len - len(self.prompt_ids) - n0
        if self.params.max_tokens is not None:
            room = min(room, self.params.max_tokens - n0)
        room = max(room, 1)  # tokens appended when the length ends the sequence (at least the first)
        reason = None
        stop = self.stop_ids
        if stop and not stop.isdisjoint(tokens):
            at = next(i for i, t in enumerate(tokens) if t in stop) + 1
            if at <= room:
                end, reason = at, "stop"
        if reason is None and room <= end:
            end, reason = room, "length"
        toks = tokens if end == len(tokens) else tokens[:end]
        out.extend(toks)
        counts = getattr(self.sampler, "output_counts", None)
        if type(counts) is dict and type(self.sampler) is SequenceSampler:  # observe, inlined
            get = counts.get
            for t in toks:
                counts[t] = get(t, 0) + 1
        else:
            for t in toks:
                self.sampler.observe(t)
        if stepwise and end >= 2 and self._lazy:
            self._mark = n0 + end - 1
        if reason == "stop":
            self.finish("stop", toks[-1])
        elif reason == "length":
            self.finish("length")
        return end

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
