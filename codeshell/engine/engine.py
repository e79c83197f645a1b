"""The engine: requests in, token and text deltas out, with continuous batching.

One `step()` is: schedule (admit waiting requests into free KV slots), forward (prefill the
admitted prompts, then one batched decode step for the others), sample, update (stop checks,
detokenization, finishing). With prompt lookup on (`SamplingParams.prompt_lookup_num_tokens`
or the engine's `prompt_lookup` default), the decode step also runs each sequence's drafted
tokens (copied from its own earlier n-grams, see `lookup.py`) in the same forward and keeps
the accepted ones, so a step may add several tokens to a sequence. `add_request` and `abort`
may be called from another thread; they only enqueue, and `step` applies them. Nothing here
knows of HTTP or the CLI.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..config import CodeShellConfig
from ..model import CodeShellModel
from .kv_cache import KVCache
from .lookup import DraftBudget, NgramLookup, cap_rows, verify_token
from .outputs import CompletionOutput, Logprob, RequestOutput
from .prefill_plan import PrefillCost, first_group, plan
from .sampling import MAX_LOOKUP, SamplingParams, SequenceSampler, greedy_picks, sample_rows, token_logprob
from .sequence import Sequence


# A request sharing more prompt tokens than this with one in a pending prefill group waits for
# that group, so its prefix comes from the cache instead of being computed twice.
_SHARE = 16

# CODESHELL_LOOKUP_SHARE_RATE=1: the draft budget's odds as session 25 had them (a moving average of
# each draft's accepted share) instead of lookup.AcceptRate's per-token odds; read once (A/B runs).
_SHARE_RATE = os.environ.get("CODESHELL_LOOKUP_SHARE_RATE") == "1"


# CODESHELL_PREFILL_LAST_ROWS=0: a prompt's last block runs all its rows (attention output, MLP,
# final LayerNorm) and the sampled rows are picked after, as before session 36; default 1: only the
# sampled rows go on past that block's keys and values (`CodeShellModel.forward`'s `rows`: the same
# bits for those rows, ~1/n_layer less work a prompt). Read once (A/B runs).
_LAST_ROWS = os.environ.get("CODESHELL_PREFILL_LAST_ROWS", "1") not in ("0", "off")


def _prefill_groups() -> str:
    """CODESHELL_PREFILL_GROUPS=one: a step's short prompts share one padded prefill forward while
    they fit (the rule before session 32) instead of the grouping of least estimated cost
    (`prefill_plan.plan`, the cost measured at load by `Engine.measure_prefill_cost`); read when an
    engine is made (a bad value is that engine's error, not an import failure of the package)."""
    v = os.environ.get("CODESHELL_PREFILL_GROUPS", "cost")
    if v not in ("cost", "one"):
        raise ValueError(f"CODESHELL_PREFILL_GROUPS={v!r}: expected 'cost' or 'one'")
    return v


class RequestError(ValueError):
    """A request the engine cannot run (empty prompt, too long for the context, ...)."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache
    own_cache: list[int] = field(default_factory=list)  # what its first slot held when admitted

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class Engine:
    def __init__(self, model: torch.nn.Module, cfg: CodeShellConfig, tokenizer=None, *,
                 max_batch: int = 8, max_model_len: int | None = None, prefill_chunk: int = 512,
                 kv_max_len: int | None = None, prefix_caching: bool = False, prompt_lookup: int = 0):
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = min(max_model_len or cfg.n_positions, cfg.n_positions) \
            if cfg.position_embedding_type == "learned_absolute" else (max_model_len or cfg.n_positions)
        self.prefill_chunk = prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, _compute_dtype(model)
        self.cache = KVCache(cfg, max_batch, kv_max_len or 64, self.dtype, self.device)
        self.free_slots = list(range(max_batch))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[str, _Request] = {}
        self._aborts: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        # Prefix caching: a freed slot keeps its KV, and `slot_tokens[slot]` says which tokens
        # it holds (positions 0..len-1). A new prompt that starts with those tokens (or with
        # tokens a running sequence has already computed) skips them in prefill.
        self.prefix_caching = prefix_caching
        self.slot_tokens: dict[int, list[int]] = {}
        self.slot_used: dict[int, int] = {}  # slot -> tick of last release (LRU eviction)
        self._tick = 0
        self.prefix_hits = 0            # requests that reused at least one cached token
        self.prefix_hit_tokens = 0      # prompt tokens not recomputed thanks to the cache
        # Prompt lookup: draft tokens per step for requests that leave
        # `prompt_lookup_num_tokens` unset (0: off). Counters say how well drafts are accepted.
        if not isinstance(prompt_lookup, int) or not 0 <= prompt_lookup <= MAX_LOOKUP:
            raise ValueError(f"prompt_lookup must be an integer in [0, {MAX_LOOKUP}], got {prompt_lookup!r}")
        self.prompt_lookup = prompt_lookup
        self.spec_steps = 0      # decode steps that verified drafts
        self.spec_drafted = 0    # draft tokens run through the model
        self.spec_accepted = 0   # draft tokens accepted
        # How many drafted tokens a verify step runs, by their odds and the measured cost of
        # the step's rows (`lookup.DraftBudget`); None: every draft, up to the row cap.
        self.draft_budget: DraftBudget | None = DraftBudget()
        # A prefill forward's cost (fixed + per row) that splits a step's prompts into padded
        # forwards (`prefill_plan.plan`); None: one forward while they fit. `measure_prefill_cost`
        # sets it (the server at load). Not measured on its own at a first batch: LLM.generate's
        # callers (the benchmarks' timed batches) would pay 2-5 s of a 1.7B model inside their clock.
        self.prefill_cost: PrefillCost | None = None
        self._groups = _prefill_groups()
        # The last decode step's wall seconds: what a prompt admitted a step later waits beyond the
        # forwards before it (`_admit`'s split of prompts that arrive together); 0 until one ran.
        self._decode_s = 0.0
        self.eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        # The per-step Python trimmed (session 20: at the small shape ~0.25 ms a token ran between two
        # native steps, every object it touched cold): no abort / admission / draft-clock work when
        # none can apply, lazy detokenization (`Sequence`), the native rebuild check
        # (kernels/step.py). `set_lean(False)` (CODESHELL_ENGINE_LEAN=off in `LLM`) restores the
        # earlier path for A/B timing; the outputs are the same either way.
        self.lean = True
        self.multi_step = _multi_step()
        self.multi_budget_ns = _multi_budget_ns()
        self.multi_rows = _multi_rows()

    # ---- the public surface ---------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        ids = self.check_prompt(prompt_token_ids, params)
        if params.n > self.max_batch:
            raise RequestError(f"n={params.n} is more than this engine's max batch ({self.max_batch})")
        with self._lock:
            if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
                raise RequestError(f"request id {request_id!r} is already in use")
            self.waiting.append(_Request(request_id, prompt, ids, params))

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    def set_lean(self, on: bool) -> None:
        """The trimmed per-step path on or off (`lean`; this engine's native steps' rebuild check
        follows: `kernels.step.decode`'s `lean`). Reads CODESHELL_DECODE_MULTI (`_decode_many`),
        _MULTI_MS and _MULTI_ROWS (`_decode_many_rows`) again."""
        self.lean = bool(on)
        self.multi_step = _multi_step()
        self.multi_budget_ns = _multi_budget_ns()
        self.multi_rows = _multi_rows()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._aborts)

    def num_running(self) -> int:
        return sum(len(r.seqs) for r in self.running.values())

    def check_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """Validate (and, if asked, left-truncate) a prompt against the context window."""
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        limit = self.max_model_len - 1  # room for at least one new token
        if len(ids) > limit:
            if not params.truncate_prompt:
                raise RequestError(f"the prompt has {len(ids)} tokens but the context window is "
                                   f"{self.max_model_len} tokens (at most {limit} for the prompt); "
                                   "shorten it or ask for truncation")
            keep = max(1, self.max_model_len - (params.max_tokens or 1))
            ids = ids[-min(keep, limit):]
        return list(ids)

    # ---- the loop -------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Schedule, forward, sample, update. Returns an output for each request that changed
        (`final_only`: for each that finished; the others' outputs are not made, their streams
        advance as if they were: `Sequence.skip_output`)."""
        if self.lean and torch.is_inference_mode_enabled():  # the caller's (LLM._run) already
            return self._step(final_only)
        with torch.inference_mode():
            return self._step(final_only)

    def _step(self, final_only: bool) -> list[RequestOutput]:
        changed: dict[str, _Request] = {}
        lean = self.lean
        if self._aborts or not lean:
            self._apply_aborts(changed)
        if self.waiting or not lean:  # `_admit` admits nothing without waiting requests
            for req, logits in self._prefill(self._admit()):  # schedule + prefill
                for seq in req.seqs:
                    self._append(seq, logits)
                changed[req.request_id] = req
        fresh = set(changed)
        decoding = [s for r in self.running.values() if r.request_id not in fresh for s in r.seqs
                    if not s.finished]
        decoding.sort(key=lambda s: s.slot)              # slot order: the cache reads as a view
        # A verify step's cost for the draft budget: CPU time from here (after any prefill) to
        # its outputs, so the per-step Python (drafting, outputs) counts with the forward. Lean:
        # taken only when some sequence may draft (a system call: ~5-10 us in place, cold).
        lookup_k, drafts, t0 = self._lookup_k, (), 0.0
        if not lean or any(lookup_k(s.params) > 0 for s in decoding):
            t0 = DraftBudget.clock()
            drafts = self._drafts(decoding)
        rows, many = 0, None
        t_decode = time.perf_counter()
        if any(drafts):                                  # last token + drafts, verified in one forward
            rows = self._speculate(decoding, drafts)
            running = self.running
            for seq in decoding:
                changed[seq.request_id] = running[seq.request_id]
        elif decoding:                                   # forward one token for everyone else
            plain = all(s.plain_greedy for s in decoding)
            if (final_only and lean and self.multi_step > 1 and plain and not self.waiting and not self._aborts
                    and all(lookup_k(s.params) <= 0 for s in decoding)):
                if len(decoding) == 1:
                    many = self._decode_many(decoding[0])
                    many = None if many is None else [many]
                elif self.multi_rows:
                    many = self._decode_many_rows(decoding)
            if many is not None:                         # several greedy tokens in one native call
                for seq, toks in zip(decoding, many):
                    seq.cached += seq.append_many(toks, self.max_model_len, stepwise=True)
                    changed[seq.request_id] = self.running[seq.request_id]
            else:
                logits, picks = self._decode(decoding, not plain)
                mml, running = self.max_model_len, self.running
                if picks is not None and plain:
                    for seq, tok in zip(decoding, picks):    # the native greedy picks as they are
                        seq.append(tok, None, mml)
                        changed[seq.request_id] = running[seq.request_id]
                else:
                    toks = sample_rows([s.sampler for s in decoding], logits, picks)  # sample
                    for i, seq in enumerate(decoding):       # update
                        if lean and seq.params.logprobs is None:  # `_append` without the row's view
                            seq.append(toks[i], None, mml)
                        else:
                            self._append(seq, logits[i], toks[i])
                        changed[seq.request_id] = running[seq.request_id]
        if decoding and many is None:  # a step of one token (or one verify) a sequence: `_admit_take`
            self._decode_s = time.perf_counter() - t_decode
        if not final_only:
            outs = [self._output(r) for r in changed.values()]
        else:
            outs = []
            for r in changed.values():
                if r.aborted or (r.seqs and r.finished):  # `_output`'s finished
                    outs.append(self._output(r))
                else:
                    for s in r.seqs:
                        s.skip_output()
        for r in changed.values():
            if r.finished:
                self._release(r)
        if rows and self.draft_budget is not None:
            self.draft_budget.observe(rows, DraftBudget.clock() - t0)
        return outs

    # ---- pieces of the loop ---------------------------------------------------------------
    def _apply_aborts(self, changed: dict[str, _Request]) -> None:
        while self._aborts:
            rid = self._aborts.popleft()
            with self._lock:
                for r in list(self.waiting):
                    if r.request_id == rid:
                        self.waiting.remove(r)
                        r.aborted = True
                        changed[rid] = r
            r = self.running.get(rid)
            if r is not None:
                for s in r.seqs:
                    if not s.finished:
                        s.finish("abort")
                changed[rid] = r

    def _admit(self) -> list[_Request]:
        """Move waiting requests to running while slots are free, up to `prefill_chunk` prompt
        tokens a step (at least one request): the rest wait for the next step, so 16 prompts
        arriving together are prefilled a group per step, interleaved with the decode steps of
        the ones admitted before, and the first groups stream their first tokens while the later
        ones prefill (vLLM's chunked prefill does the same with its token budget). Admitting all
        at once put every first token after the last group's forward: 16 clients of ~90 tokens
        on a 1.7B bf16 model, time to first token p50 7.8 s against llama-server's 4.8 s.
        With a measured prefill cost (the server), fewer may go in a step: the first group of the
        split that minimises the prompts' summed time to first token (`prefill_plan.first_group`;
        4 prompts of ~90 tokens on the 1.7B bf16 model: one a step, p50 ~1.7 s instead of ~2.25 s).
        Greedy bits do not depend on the grouping (tests/engine/test_batched_prefill.py)."""
        admitted = []
        if not self.waiting:  # the common decode step (a request added meanwhile: next step)
            return admitted
        budget = self.prefill_chunk
        with self._lock:
            take = self._admit_take()
            while self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
                n = len(self.waiting[0].prompt_ids)  # an upper bound: a cached prefix is not run
                if admitted and (n > budget or len(admitted) >= take):
                    break
                budget -= n
                req = self.waiting.popleft()
                p = req.params
                for i in range(p.n):
                    seed = None if p.seed is None else p.seed + i
                    sampler = SequenceSampler(p, req.prompt_ids, seed, self.device)
                    slot = self._pick_slot(req.prompt_ids if i == 0 else None)
                    own = self.slot_tokens.pop(slot, [])  # the slot is no longer a free cache
                    if i == 0:
                        req.own_cache = own
                    req.seqs.append(Sequence(req.request_id, i, req.prompt_ids, p, sampler,
                                             slot, self.tokenizer, self.eos_id, self.lean))
                self.running[req.request_id] = req
                admitted.append(req)
        return admitted

    def _admit_take(self) -> int:
        """How many waiting requests this step may admit by the time-to-first-token split
        (`prefill_plan.first_group` over those the free slots can take: the step's token budget as
        the loop below has it, which prompts may share a forward as `_fits` says, nothing cached
        assumed); unbounded without a measured prefill cost, with CODESHELL_PREFILL_GROUPS=one
        or with CODESHELL_PREFILL_ADMIT=budget (the rule before session 41, read per step: A/B)."""
        if (self.prefill_cost is None or self._groups == "one" or len(self.waiting) < 2
                or os.environ.get("CODESHELL_PREFILL_ADMIT") == "budget"):
            return len(self.waiting) or 1
        reqs, seqs = [], 0
        for req in self.waiting:
            seqs += req.params.n
            if seqs > len(self.free_slots):
                break
            reqs.append(req)
        if len(reqs) < 2:
            return 1
        cost = self.prefill_cost
        # the decode step between two admitting steps: the last one measured, else a one-row forward
        between = self._decode_s or cost.forward(1)
        return first_group([len(r.prompt_ids) for r in reqs], cost,
                           lambda idx: self._fits([(reqs[i], 0) for i in idx]), between, self.prefill_chunk)

    def _pick_slot(self, prompt_ids: list[int] | None) -> int:
        """A free slot: the one whose cached tokens share the longest prefix with the prompt,
        else the least recently used (so useful caches survive longest)."""
        if not self.prefix_caching:
            return self.free_slots.pop(0)
        best = min(self.free_slots, key=lambda s: (-_common_prefix(self.slot_tokens.get(s, []), prompt_ids or []),
                                                   self.slot_used.get(s, -1), s))
        self.free_slots.remove(best)
        return best

    def _reuse_prefix(self, req: _Request, slot: int) -> int:
        """Bring the longest cached prefix of the prompt into `slot`; returns its length.

        Sources: what `slot` itself held, any other free slot, or a running sequence (the
        positions it has already computed). At least one prompt token is always recomputed:
        its logits are needed to sample the first new token.
        """
        own, req.own_cache = req.own_cache, []
        if not self.prefix_caching:
            return 0
        ids = req.prompt_ids
        limit = len(ids) - 1
        best, src = min(_common_prefix(own, ids), limit), slot
        candidates = [(s, t) for s, t in self.slot_tokens.items()]
        candidates += [(q.slot, q.cached_tokens()) for r in self.running.values() if r is not req
                       for q in r.seqs if q.slot is not None]
        for s, toks in candidates:
            m = min(_common_prefix(toks, ids), limit)
            if m > best:
                best, src = m, s
        if best and src != slot:
            self.cache.copy_prefix(src, slot, best)
        if best:
            self.prefix_hits += 1
            self.prefix_hit_tokens += best
        return best

    def _ensure_cache(self, need: int) -> None:
        # Grown (a copy of everything stored) at least twofold and in whole 256-position blocks,
        # so that a long first prompt does not grow it again at its first decoded token.
        if need > self.cache.max_len:
            grow = min(max(-(-need // 256) * 256, 2 * self.cache.max_len), self.max_model_len)
            self.cache.ensure(self.max_batch, max(grow, need))

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: list[int], seq_len: int,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, n_embd] at index `last` [B] of each row (default: the last one)."""
        view = self.cache.view(slots, pos)
        B, T = ids.shape
        idx = torch.arange(B, device=ids.device)
        if _LAST_ROWS and isinstance(self.model.transformer, CodeShellModel):  # only the sampled rows
            rows = idx * T + (T - 1 if last is None else last)              # past the last block's KV
            return self.model.transformer(ids, pos, None, view, seq_len=seq_len, rows=rows)
        h = self.model.transformer(ids, pos, None, view, seq_len=seq_len)  # the view's mask, if SDPA runs
        return h[:, -1] if last is None else h[idx, last]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] in the model's dtype, as the head returns them. Not widened to float32
        here: greedy picks read bf16 rows as they are (the same maxima), and the samplers widen
        only the rows they process (`sampling.as_float32`). The whole-block copy cost a 64-row
        verify step ~0.4 ms with codeshell-mini's 16k vocabulary (18 MB at 70k)."""
        return self.model.lm_head(h)

    def _prefill(self, reqs: list[_Request]) -> list[tuple[_Request, torch.Tensor]]:
        """Prefill newly admitted requests; returns each with its next-token logits [vocab], in
        admission order.

        Short prompts go through right-padded forwards together (16 IDE or chat requests
        arriving at once cost a forward or a few instead of 16, and the output head runs once
        per forward); which prompts share a forward is `prefill_plan.plan`'s choice by
        `prefill_cost` (a prompt whose rest is much shorter than the others', e.g. one mostly
        cached, gets a forward of its own where its padding would cost more than a forward).
        A prompt longer than `prefill_chunk` runs alone in chunks. A request that shares more
        than `_SHARE` tokens with one pending waits until the pending ones ran, so that its
        prefix can come from the cache.
        """
        out: list[tuple[_Request, torch.Tensor]] = []
        pending: list[tuple[_Request, int]] = []  # (request, prompt tokens reused from the cache)

        def flush() -> None:
            if not pending:
                return
            rest = [len(r.prompt_ids) - u for r, u in pending]
            for g in plan(rest, self.prefill_cost, lambda idx: self._fits([pending[i] for i in idx])):
                group = [pending[i] for i in g]
                out.extend(zip([r for r, _ in group], self._prefill_group(group)))
            pending.clear()

        for req in reqs:
            if any(_common_prefix(g.prompt_ids, req.prompt_ids) > _SHARE for g, _ in pending):
                flush()
            n = len(req.prompt_ids)
            # room for the prompt and the reply it asks for (one growth, not one per step)
            self._ensure_cache(max(n + 1, min(n + (req.params.max_tokens or 1), self.max_model_len)))
            reused = self._reuse_prefix(req, req.seqs[0].slot)
            req.num_cached = reused
            if n - reused > self.prefill_chunk:
                flush()
                out.append((req, self._prefill_chunked(req, reused)))
                continue
            pending.append((req, reused))
        flush()
        if len(out) > 1:
            order = {id(r): i for i, r in enumerate(reqs)}
            out.sort(key=lambda o: order[id(o[0])])
        return out

    def measure_prefill_cost(self, short: int = 8, long: int = 72, longer: int = 216) -> PrefillCost | None:
        """Time prefill forwards of `short`, `long` and `longer` positions (one row each; `long`
        past the row-invariant decode kernels' 64 rows, where prompts of a few clients run;
        `longer`, a few prompts' rows in one forward, on the same prefill kernels as `long`)
        through a free slot, and set `prefill_cost` to the lines through them (`PrefillCost`: the
        shorter one's best of two; a first forward of 4 positions goes before, untimed: first
        touches). CPU seconds of this
        thread, as the draft budget's timings (lookup.DraftBudget.clock: the thread takes part in
        every parallel region, and another process's load does not count). 4-7 s on the 1.7B
        bf16 shape (measured), milliseconds on small models. Off the CPU, with CODESHELL_PREFILL_GROUPS=one or
        no free slot: left as it is. The slot's KV is left as junk that no prompt is told it
        holds (`slot_tokens`; a free slot without a cached prompt is taken if there is one).
        Returns `prefill_cost`."""
        if self._groups == "one" or self.device.type != "cpu" or not self.free_slots:
            return self.prefill_cost
        long = min(long, self.max_model_len - 1)
        short = min(short, long - 1)
        if short < 1:
            return self.prefill_cost
        longer = min(longer, self.max_model_len - 1, self.prefill_chunk)
        slot = min(self.free_slots, key=lambda q: (q in self.slot_tokens, self.slot_used.get(q, -1), q))
        self.slot_tokens.pop(slot, None)
        self._ensure_cache(max(long, longer) + 1)
        clock = DraftBudget.clock

        def timed(T: int) -> float:
            ids = torch.zeros(1, T, dtype=torch.long, device=self.device)
            pos = torch.arange(T, device=self.device)[None]
            t0 = clock()
            self._logits(self._forward(ids, pos, [slot], seq_len=T))
            return clock() - t0

        with torch.inference_mode():
            timed(min(4, short))
            t_short = timed(short)
            t_long = timed(long)
            t_short = min(t_short, timed(short))
            far = (longer, timed(longer)) if longer > long else None
        self.prefill_cost = PrefillCost.from_timings((short, t_short), (long, t_long), far)
        return self.prefill_cost

    def _fits(self, group: list[tuple[_Request, int]]) -> bool:
        """Whether these prompts may share one padded forward: at most `prefill_chunk` tokens
        with padding, padding inside the context, and one RoPE base (dynamic NTK scaling
        depends on the sequence length once it passes n_positions)."""
        T = max(len(r.prompt_ids) - u for r, u in group)
        if len(group) * T > self.prefill_chunk or any(u + T > self.max_model_len for _, u in group):
            return False
        return self.cfg.rope_scaling_type != "dynamic" or \
            all(len(r.prompt_ids) <= self.cfg.n_positions for r, _ in group)

    def _prefill_group(self, group: list[tuple[_Request, int]]) -> list[torch.Tensor]:
        """One forward over the rest of each prompt, right-padded to the longest: row i holds
        positions u_i .. u_i + T - 1. Padding sits after the real tokens, so the causal mask
        hides it from them; its keys land in the slot past the prompt, where decode overwrites
        them before any query can reach them."""
        T = max(len(r.prompt_ids) - u for r, u in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        pos = torch.empty(len(group), T, dtype=torch.long)
        last = torch.empty(len(group), dtype=torch.long)
        for i, (r, u) in enumerate(group):
            rest = r.prompt_ids[u:]
            ids[i, :len(rest)] = torch.tensor(rest)
            pos[i] = torch.arange(u, u + T)
            last[i] = len(rest) - 1
        self._ensure_cache(int(pos.max()) + 1)
        h = self._forward(ids.to(self.device), pos.to(self.device), [r.seqs[0].slot for r, _ in group],
                          seq_len=max(len(r.prompt_ids) for r, _ in group), last=last.to(self.device))
        for r, _ in group:
            self._fan_out(r)
        return list(self._logits(h))

    def _prefill_chunked(self, req: _Request, reused: int) -> torch.Tensor:
        """A long prompt through its first sequence's slot, `prefill_chunk` tokens at a time."""
        n = len(req.prompt_ids)
        first = req.seqs[0]
        ids = torch.tensor(req.prompt_ids, device=self.device)
        h = None
        for start in range(reused, n, self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk][None]
            pos = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            h = self._forward(chunk, pos, [first.slot], seq_len=start + chunk.shape[1])
        self._fan_out(req)
        return self._logits(h)[0]

    def _fan_out(self, req: _Request) -> None:
        """The prompt is in the first sequence's slot: copy it to the others (n > 1)."""
        n, first = len(req.prompt_ids), req.seqs[0]
        for s in req.seqs:
            if s is not first:
                self.cache.copy_prefix(first.slot, s.slot, n)
            s.cached = n

    def _packed(self, tokens: list[int], positions: list[int], slots: list[int],
                want_logits: bool = True) -> tuple[torch.Tensor | None, list | None]:
        """Logits [M, vocab] of single tokens of any sequences packed into one row of the forward
        (see `PackedView`: token i at positions[i] of slot slots[i]) and, where the native step
        ran, each row's first maximal index (the greedy pick `sampling.first_argmax` would
        give; else None). The native step
        (`kernels.step.decode`: embedding to logits in one call) takes the bf16 models whose
        modules it runs; any other model runs its transformer and head here. want_logits False
        (every row plain greedy): where the native step ran, the logits are None (only its picks
        are made; the bf16 [M, V] copy cost ~2-5 us a row at a 16k vocabulary on Zen 4, docs/kernels-log.md
        session 13)."""
        need = max(positions) + 1
        self._ensure_cache(need)
        got = _native_decode(self.model, self.cache, tokens, positions, slots, want_logits, self.lean)
        if got is not None:
            return got
        view = self.cache.packed_view(slots, positions)
        ids = torch.tensor(tokens, device=self.device)[None]
        h = self.model.transformer(ids, view.positions, None, view, seq_len=need)   # [1, M, n_embd]
        return self._logits(h[0]), None

    def _decode_many(self, seq: Sequence) -> list[int] | None:
        """Up to `multi_step` greedy tokens of the one decoding sequence in one native call
        (kernels.step.decode_greedy: each pick fed back, stopping at one of its stop ids), at most
        what its max_tokens and the context window leave; None where that is under 2 tokens or the
        native step does not run (the caller runs one step). Only for `final_only` steps (LLM.generate:
        nobody sees the tokens between two steps) of one plain-greedy sequence without drafts, and
        no request waiting. Why: at the small shape ~0.29 ms of Python, pybind and the team's
        hand-over ran between two tokens, ~0.22 ms of it cache misses after the weights streamed
        through the caches (docs/kernels-log.md, session 27 helper C); here they run once per call.
        CODESHELL_DECODE_MULTI (read by `set_lean`, i.e. at each LLM.generate): the tokens a call
        (1: one a step, as before). CODESHELL_DECODE_MULTI_MS (also read there; default 100): a call
        also stops after the token that passes that many ms (a Ctrl-C, or a request that arrives, waits
        at most about that plus one token; 0: no time cap, as in session 27)."""
        n = self._greedy_room(seq)
        if n < 2 or self.cache.device.type != "cpu":
            return None
        self._ensure_cache(seq.cached + n)
        if not _STEP:
            from ..kernels import step
            _STEP.append(step)
        return _STEP[0].decode_greedy(self.model, self.cache, seq.last_token, seq.cached, seq.slot, n, seq.stop_ids,
                                      self.multi_budget_ns)

    def _greedy_room(self, seq: Sequence) -> int:
        """Tokens one multi-token call may make for `seq`: what its max_tokens and the context
        window leave, at most `multi_step`."""
        n = self.max_model_len - len(seq.prompt_ids) - len(seq.output_ids)
        if seq.params.max_tokens is not None:
            n = min(n, seq.params.max_tokens - len(seq.output_ids))
        return min(n, self.multi_step)

    def _decode_many_rows(self, seqs: list[Sequence]) -> list[list[int]] | None:
        """`_decode_many` for several decoding sequences (session 28, lead): up to `multi_step`
        greedy tokens of each in one native call (kernels.step.decode_greedy_rows; a sequence that
        stops leaves the call's batch), under the same conditions (final_only, all plain greedy, no
        drafts, no request waiting) and the same time cap. None where no sequence has 2 tokens left
        or the native step does not run. CODESHELL_DECODE_MULTI_ROWS=0 (read by `set_lean`): one
        token a step whenever more than one sequence decodes, as before."""
        ns = [max(1, self._greedy_room(seq)) for seq in seqs]
        if max(ns) < 2 or len(seqs) > _max_rows() or self.cache.device.type != "cpu":
            return None
        self._ensure_cache(max(s.cached + n for s, n in zip(seqs, ns)))
        if not _STEP:
            from ..kernels import step
            _STEP.append(step)
        return _STEP[0].decode_greedy_rows(self.model, self.cache, [s.last_token for s in seqs],
                                           [s.cached for s in seqs], [s.slot for s in seqs], ns,
                                           [s.stop_ids for s in seqs], self.multi_budget_ns)

    def _decode(self, seqs: list[Sequence], want_logits: bool = True) -> tuple[torch.Tensor | None, list | None]:
        got = self._packed([s.last_token for s in seqs], [s.cached for s in seqs], [s.slot for s in seqs],
                           want_logits)
        for s in seqs:
            s.cached += 1
        return got

    def _lookup_k(self, p: SamplingParams) -> int:
        return self.prompt_lookup if p.prompt_lookup_num_tokens is None else p.prompt_lookup_num_tokens

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each sequence's draft (empty when lookup is off for it or nothing matched), at most
        one token short of its remaining budget and of the context window (the verify step
        emits up to len(draft) + 1 tokens)."""
        out = []
        for s in seqs:
            k = self._lookup_k(s.params)
            if k <= 0:
                out.append([])
                continue
            if s.lookup is None:
                p = s.params
                s.lookup = NgramLookup(s.prompt_ids, p.prompt_lookup_max_ngram, p.prompt_lookup_min_ngram)
                s.draft_len = k
            # transformers' heuristic: 2 more after a fully accepted draft, 1 fewer after a
            # rejection (each drafted position costs a row of the forward and of the 70k head)
            k = min(k, s.draft_len)
            s.lookup.sync(s.prompt_ids, s.output_ids)
            total = len(s.prompt_ids) + len(s.output_ids)
            if s.params.max_tokens is not None:
                k = min(k, s.params.max_tokens - len(s.output_ids) - 1)
            k = min(k, self.max_model_len - total - 1)
            out.append(s.lookup.propose(k) if k > 0 else [])
        if not any(out):
            return out
        if self.draft_budget is None:
            return cap_rows(out, _max_rows())
        # a seeded sampled request's text depends on which tokens are drafted: its draft is
        # not left to the budget's timings
        keep = self.draft_budget.choose(out, [s.accept_rate for s in seqs],
                                        [s.params.seed is not None and not s.params.greedy for s in seqs], _max_rows())
        if not _SHARE_RATE:
            for s, d, n in zip(seqs, out, keep):
                if d and not n:  # a draft the budget dropped: its odds age (lookup.AcceptRate.idle)
                    s.accept_odds.idle()
                    s.accept_rate = s.accept_odds.rate
        return [d[:n] for d, n in zip(out, keep)]

    def _speculate(self, seqs: list[Sequence], drafts: list[list[int]]) -> int:
        """One forward over [last token, draft...] of every decoding sequence, packed into one
        row (`PackedView`: no padding, a sequence without a draft costs one token), then per
        sequence: accept drafted tokens in order while `verify_token` accepts them, emit the
        correction (or, all accepted, the token after the last draft), and keep the KV of the
        accepted positions only.

        KV rollback needs no copy: `cached` drops back to the accepted length and the rejected
        positions are overwritten by later steps before any query can see them, since a query
        at position p attends to keys 0..p only and each forward stores its keys before
        attending. Returns the forward's rows (tokens).
        """
        limit = self.max_model_len
        if self.cfg.position_embedding_type == "rope" and self.cfg.rope_scaling_type == "dynamic":
            # Past n_positions the RoPE base depends on the forward's length: stay below it so
            # that every position sees the base plain decoding would give it.
            limit = min(limit, self.cfg.n_positions)
        drafts = [d[:max(limit - s.cached - 1, 0)] for s, d in zip(seqs, drafts)]
        tokens, positions, slots = [], [], []
        for s, d in zip(seqs, drafts):
            n, c = 1 + len(d), s.cached
            tokens.append(s.last_token)
            tokens += d
            positions += range(c, c + n)
            slots += [s.slot] * n
        plain = all(s.plain_greedy for s in seqs)
        logits, argmax = self._packed(tokens, positions, slots, not plain)         # [M, V] or None
        if any(drafts):
            self.spec_steps += 1
        fast = argmax is not None and plain
        # Greedy rows whose sampler leaves the logits as they are: every row's pick in one
        # reduction (the first maximal index, as `SequenceSampler.sample`), not one per row.
        picks = argmax if fast else \
            greedy_picks([s.sampler for s, d in zip(seqs, drafts) for _ in range(1 + len(d))], logits, argmax)
        mml, lookup_k = self.max_model_len, self._lookup_k
        drafted = accepted_all = off = 0
        for s, d in zip(seqs, drafts):
            n, base = len(d), off
            off += n + 1
            start = s.cached
            if fast or (s.plain_greedy and picks[base] is not None):
                # the drafts equal to the picks in one comparison, then the accepted ones and
                # the pick after them (the correction, or the next token after a full match)
                row = picks[base:base + n + 1]
                a = 0
                while a < n and row[a] == d[a]:
                    a += 1
                accepted = min(a, s.append_many(row[:a + 1], mml))
            else:
                accepted = self._verify_rows(s, d, logits[base:base + n + 1], picks[base:base + n + 1])
            # KV is valid for the last token and the accepted drafts (inputs 0..accepted).
            s.cached = start + 1 + accepted
            if d:
                k = lookup_k(s.params)
                s.draft_len = min(k, s.draft_len + 2) if accepted == n else max(1, s.draft_len - 1)
                if _SHARE_RATE:  # session 25's estimate: a moving average of the accepted share
                    s.accept_rate += 0.3 * (accepted / n - s.accept_rate)
                else:  # the per-token odds (lookup.AcceptRate); a stop inside the draft is no rejection
                    s.accept_odds.update(accepted, accepted < n and not s.finished)
                    s.accept_rate = s.accept_odds.rate
            drafted += n
            accepted_all += accepted
        self.spec_drafted += drafted
        self.spec_accepted += accepted_all
        return len(tokens)

    def _verify_rows(self, s: Sequence, d: list[int], rows: torch.Tensor, picks: list[int | None]) -> int:
        """Accept the drafted tokens `d` of one sequence in order while `verify_token` accepts
        them (rows [1 + len(d), V]: the logits of its last token and each draft; picks: each
        row's greedy pick or None), emitting the correction (or, all accepted, the token after
        the last draft); returns how many drafts were accepted."""
        accepted = 0
        for j in range(len(d) + 1):
            pick = picks[j]
            if j < len(d):
                tok, ok = (pick, pick == d[j]) if pick is not None else verify_token(s.sampler, rows[j], d[j])
            else:  # every draft accepted: the next token comes free from the last row
                tok, ok = (pick if pick is not None else s.sampler.sample(rows[j])), False
            self._append(s, rows[j], tok)
            accepted += ok
            if not ok or s.finished:
                break
        return accepted

    def _append(self, seq: Sequence, logits: torch.Tensor, tok: int | None = None) -> None:
        """Add the sampled token (sampled here from `logits` [V] unless given)."""
        if tok is None:
            tok = seq.sampler.sample(logits)
        lp = None
        if seq.params.logprobs is not None:
            v, top = token_logprob(logits, tok, seq.params.logprobs)
            lp = Logprob(tok, v, top)
        seq.append(tok, lp, self.max_model_len)

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs or [None] * req.params.n:
            if s is None:  # aborted while waiting
                outs.append(CompletionOutput(0, "", [], "abort"))
                continue
            outs.append(s.output())
        finished = req.aborted or (bool(req.seqs) and req.finished)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             num_cached_tokens=req.num_cached)

    def _release(self, req: _Request) -> None:
        self.running.pop(req.request_id, None)
        self._tick += 1
        for s in req.seqs:
            if s.slot is not None:
                if self.prefix_caching:
                    self.slot_tokens[s.slot] = s.cached_tokens()
                    self.slot_used[s.slot] = self._tick
                self.free_slots.append(s.slot)
                s.slot = None
        self.free_slots.sort()


_STEP: list = []  # codeshell.kernels.step, imported at the first native step (an import statement
                  # per step cost ~10 us in place: the import machinery's objects are cold by then)


def _native_decode(model, cache, tokens, positions, slots, want_logits=True, lean=True):
    """kernels.step.decode (None off the CPU); the kernels package is imported at first use."""
    if cache.device.type != "cpu":
        return None
    if not _STEP:
        from ..kernels import step
        _STEP.append(step)
    if lean:  # the default spelled as before (callers' and tests' wrappers of `decode` keep working)
        return _STEP[0].decode(model, cache, tokens, positions, slots, want_logits)
    return _STEP[0].decode(model, cache, tokens, positions, slots, want_logits, lean=False)


def _multi_step() -> int:
    """CODESHELL_DECODE_MULTI: the greedy tokens one native call may make for LLM.generate's
    plain-greedy decode (`Engine._decode_many`, `_decode_many_rows`); 1 (or less): one a step, as
    before session 27. Default 64 since session 40 (8 before): the engine's Python between two calls
    runs with the caches the call left cold (codeshell-mini: ~140 us at batch 1, ~200-250 at batch 8
    a call on the loaded Zen 4, against ~55 hot), so fewer calls cut it; the call's time cap
    (CODESHELL_DECODE_MULTI_MS, 100 ms) still bounds how long a Ctrl-C waits (~13 tokens of the small
    shape, ~64 of codeshell-mini's batch-8 steps in ~40 ms)."""
    v = os.environ.get("CODESHELL_DECODE_MULTI", "64")
    try:
        return max(1, int(v))
    except ValueError:
        raise ValueError(f"CODESHELL_DECODE_MULTI={v!r}: expected a whole number of tokens") from None


def _multi_budget_ns() -> int:
    """CODESHELL_DECODE_MULTI_MS (default 100, fractions allowed): the time after which one native
    call of several greedy tokens (`Engine._decode_many`) stops, after the token that passes it, in
    ns; 0 (or less): no time cap (only CODESHELL_DECODE_MULTI's count, as in session 27). Why: a
    Ctrl-C in LLM.generate is seen between two native calls only, and 8 tokens of a 7B on CPU are
    seconds (~0.16 s a token of a 7B int4 at 25 GB/s: one token a call); 100 ms is ~250 tokens of
    codeshell-mini and ~13 of the small shape (7.7 ms), so their 8-token calls are unchanged."""
    v = os.environ.get("CODESHELL_DECODE_MULTI_MS", "100")
    try:
        ms = float(v)
    except ValueError:
        raise ValueError(f"CODESHELL_DECODE_MULTI_MS={v!r}: expected a number of milliseconds") from None
    return max(0, int(ms * 1e6))


def _multi_rows() -> bool:
    """CODESHELL_DECODE_MULTI_ROWS (default 1): whether LLM.generate's plain-greedy decode of
    several sequences also runs several tokens a native call (`Engine._decode_many_rows`); 0: one
    token a step whenever more than one sequence decodes, as before session 28."""
    return os.environ.get("CODESHELL_DECODE_MULTI_ROWS", "1") not in ("0", "off")


@functools.cache  # the import once, not at every verify step
def _max_rows() -> int:
    """Most tokens one packed forward may hold: the linear kernels give each row the same bits
    whatever the other rows only up to `ROW_INVARIANT_MAX_M` rows per call (kernels/ops.py), and
    greedy text with prompt lookup must equal plain decoding's."""
    from ..kernels import ROW_INVARIANT_MAX_M
    return ROW_INVARIANT_MAX_M


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The activation dtype: that of the embeddings (quantized linears keep integer weights;
    a `PackedEmbedding` has no `weight` but a dtype)."""
    wte = model.transformer.wte
    return wte.weight.dtype if isinstance(wte, torch.nn.Embedding) else wte.dtype
