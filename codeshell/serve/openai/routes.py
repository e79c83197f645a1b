"""Routes of the OpenAI-compatible API.

Each handler validates the whole request (body, model name, ranges, context budget) before
it starts any generation, so bad input is a 4xx with OpenAI's error body and costs nothing.
Prompt formats come from `codeshell.prompts`; generation from the `CompletionService`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...engine.outputs import CompletionOutput, RequestOutput
from ...prompts import CHAT, FIM, PromptError, chat_prompt, fim_prompt
from ..errors import ApiError
from ..http import EventStream, begin, service, sse, until_disconnect
from ..schema import both_responses, error_responses, json_response, request_body
from ..service import CompletionService, GenRequest, with_stops
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatRequest, Completion, CompletionRequest,
                       ErrorResponse, ModelList)

router = APIRouter()


def _check_model(svc: CompletionService, name: str) -> None:
    s = svc.settings
    if name not in (s.model_name, s.model):
        raise ApiError(404, f"the model `{name}` does not exist; this server serves `{s.model_name}`",
                       param="model", code="model_not_found")


@router.get("/v1/models", tags=["OpenAI"], summary="The served model",
            responses={200: json_response(ModelList, "the one model this server serves"),
                       **error_responses(ErrorResponse, 401)})
async def models(request: Request) -> JSONResponse:
    svc = service(request)
    s = svc.settings
    data = [{"id": s.model_name, "object": "model", "created": int(svc.started), "owned_by": "codeshell",
             "max_model_len": svc.llm.max_model_len if svc.llm else None}]
    return JSONResponse({"object": "list", "data": data})


def _sampling(svc: CompletionService, body, max_tokens: int | None, logprobs: int | None):
    s = svc.settings
    if not 1 <= body.n <= s.max_n:
        raise ApiError(400, f"n must be between 1 and {s.max_n}, got {body.n}", param="n")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 16:
        raise ApiError(400, f"stop takes at most 16 strings, got {len(stops)}", param="stop")
    kw = dict(n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
              top_p=1.0 if body.top_p is None else body.top_p, stop=stops, seed=body.seed,
              presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
              logprobs=logprobs, ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
              include_stop_str_in_output=body.include_stop_str_in_output, stop_token_ids=body.stop_token_ids)
    if body.top_k is not None:
        kw["top_k"] = body.top_k
    if body.min_p is not None:
        kw["min_p"] = body.min_p
    if body.repetition_penalty is not None:
        kw["repetition_penalty"] = body.repetition_penalty
    if body.stop_token_ids:
        svc.check_ids(body.stop_token_ids, "stop_token_ids")
    return kw


def _fit(svc: CompletionService, ids: list[int], max_tokens: int | None, param: str) -> int:
    if not ids:
        raise ApiError(400, f"{param}: the prompt is empty", param=param)
    window = svc.max_model_len
    if max_tokens is not None and len(ids) + max_tokens > window and len(ids) < window:
        raise ApiError(400, f"this model's context window is {window} tokens, but {len(ids) + max_tokens} were "
                       f"asked for ({len(ids)} in the prompt, {max_tokens} for the completion); "
                       "shorten the prompt or lower max_tokens", param="max_tokens", code="context_length_exceeded")
    return svc.fit_strict(ids, max_tokens, param)


def _finish(o: CompletionOutput) -> str | None:
    if o.finish_reason is None:
        return None
    return "length" if o.finish_reason == "length" else "stop"


def _usage(outs: list[RequestOutput]) -> dict:
    p = sum(len(o.prompt_token_ids) for o in outs)
    c = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _merge(iters: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several generations' outputs as they come, tagged with their index."""
    if len(iters) == 1:
        async with aclosing(iters[0]) as it:
            async for out in it:
                yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(it) as gen:
                async for out in gen:
                    await q.put((k, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((k, e))
        finally:
            await q.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, it)) for k, it in enumerate(iters)]
    try:
        left = len(tasks)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


def _start_all(svc: CompletionService, reqs: list[GenRequest], prefix: str) -> list[AsyncIterator[RequestOutput]]:
    svc.admit(extra=len(reqs) - 1)
    started = []
    try:
        for r in reqs:
            started.append(svc.run(r, svc.new_id(prefix), check_queue=False))
    except BaseException:
        for it in started:
            asyncio.ensure_future(it.aclose())
        raise
    return started


# ---- /v1/completions -----------------------------------------------------------------------------

def _completion_logprobs(svc: CompletionService, o: CompletionOutput, start: int, offset: int) -> dict:
    lps = (o.logprobs or [])[start:]
    tokens = [svc.token_text(lp.token_id) for lp in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{svc.token_text(t): v for t, v in lp.top.items()} for lp in lps],
            "text_offset": offsets}


@router.post("/v1/completions", tags=["OpenAI"], summary="Text completion (FIM with `suffix`)",
             openapi_extra=request_body(CompletionRequest),
             responses={200: both_responses(Completion, Completion, "the completion"),
                        **error_responses(ErrorResponse, 400, 401, 404, 413, 499, 503)})
async def completions(request: Request):
    svc, body = await begin(request, CompletionRequest)
    _check_model(svc, body.model)
    if body.best_of not in (None, body.n):
        raise ApiError(400, "best_of is only supported equal to n", param="best_of")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo together with logprobs (prompt logprobs) is not supported", param="echo")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise ApiError(400, f"logprobs must be in [0, 20], got {body.logprobs}", param="logprobs")
    kw = _sampling(svc, body, body.max_tokens, body.logprobs)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ApiError(400, "prompt: give at least one prompt", param="prompt")
    if len(prompts) * body.n > svc.settings.max_n * 4:
        raise ApiError(400, f"too many completions asked for ({len(prompts)} prompts x n={body.n})", param="prompt")
    reqs, texts = [], []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            if p == "" and body.suffix is None:
                raise ApiError(400, f"{param}: the prompt is empty", param=param)
            text = fim_prompt(p, body.suffix) if body.suffix is not None else p
            ids = svc.encode(text)
        else:
            if body.suffix is not None:
                raise ApiError(400, "suffix needs a text prompt, not token ids", param="suffix")
            svc.check_ids(p, param)
            ids, text = list(p), None
        mt = _fit(svc, ids, body.max_tokens, param)
        params = svc.params(max_tokens=mt, **kw)
        if body.suffix is not None:
            params = with_stops(params, FIM.stop)
        texts.append(p if isinstance(p, str) else svc.decode(ids))
        reqs.append(GenRequest(ids, params, "/v1/completions", prompt=text, client=None, fim=False))
    iters = _start_all(svc, reqs, "cmpl")
    rid, created, name, n = svc.new_id("cmpl"), int(time.time()), svc.settings.model_name, body.n
    if not body.stream:
        async def collect():
            return [await svc.collect(it) for it in iters]
        try:
            outs = await until_disconnect(request, collect())
        except BaseException:
            for it in iters:
                await it.aclose()
            raise
        choices = []
        for k, out in enumerate(outs):
            for o in out.outputs:
                text = (texts[k] if body.echo else "") + o.text
                lp = _completion_logprobs(svc, o, 0, 0) if body.logprobs is not None else None
                choices.append({"index": k * n + o.index, "text": text, "logprobs": lp,
                                "finish_reason": _finish(o)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": choices, "usage": _usage(outs)})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream():
        sent_lp: dict[tuple[int, int], int] = {}
        sent_txt: dict[tuple[int, int], int] = {}
        done: set[tuple[int, int]] = set()
        finals: dict[int, RequestOutput] = {}
        if body.echo:
            for k in range(len(reqs)):
                for j in range(n):
                    yield sse(_chunk(rid, created, name, k * n + j, texts[k], None))
        async with aclosing(_merge(iters)) as merged:
            async for k, out in merged:
                for o in out.outputs:
                    key = (k, o.index)
                    fin = _finish(o)
                    if key in done or (not o.delta and fin is None):
                        continue
                    if fin is not None:
                        done.add(key)
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(svc, o, sent_lp.get(key, 0), sent_txt.get(key, 0))
                        sent_lp[key] = len(o.logprobs or [])
                    sent_txt[key] = sent_txt.get(key, 0) + len(o.delta)
                    yield sse(_chunk(rid, created, name, k * n + o.index, o.delta, fin, lp))
                if out.finished:
                    finals[k] = out
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": _usage(list(finals.values()))})
        yield sse("[DONE]")

    return EventStream(stream(), iters)


def _chunk(rid, created, name, index, text, finish, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


# ---- /v1/chat/completions -------------------------------------------------------------------------

def _chat_logprobs(svc: CompletionService, o: CompletionOutput, start: int) -> dict:
    def entry(tid: int, v: float) -> dict:
        t = svc.token_text(tid)
        return {"token": t, "logprob": v, "bytes": list(t.encode())}

    content = []
    for lp in (o.logprobs or [])[start:]:
        e = entry(lp.token_id, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in lp.top.items()]
        content.append(e)
    return {"content": content}


@router.post("/v1/chat/completions", tags=["OpenAI"], summary="Chat completion",
             openapi_extra=request_body(ChatRequest),
             responses={200: both_responses(ChatCompletion, ChatCompletionChunk, "the answer"),
                        **error_responses(ErrorResponse, 400, 401, 404, 413, 499, 503)})
async def chat_completions(request: Request):
    svc, body = await begin(request, ChatRequest)
    _check_model(svc, body.model)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise ApiError(400, f"top_logprobs must be in [0, 20], got {body.top_logprobs}", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    kw = _sampling(svc, body, max_tokens, logprobs)
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text or "" for p in m.content if p.type == "text")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        prompt = chat_prompt(messages)
    except PromptError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    ids = svc.encode(prompt)
    mt = _fit(svc, ids, max_tokens, "messages")
    params = with_stops(svc.params(max_tokens=mt, **kw), CHAT.stop)
    gen = svc.run(GenRequest(ids, params, "/v1/chat/completions", prompt=prompt))
    rid, created, name = svc.new_id("chatcmpl"), int(time.time()), svc.settings.model_name
    if not body.stream:
        out = await until_disconnect(request, svc.collect(gen))
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(svc, o, 0) if logprobs is not None else None,
                    "finish_reason": _finish(o)} for o in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                             "choices": choices, "usage": _usage([out])})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish: str | None, lp: dict | None = None) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    async def stream():
        for j in range(body.n):  # the first delta of each choice carries the role
            yield chunk(j, {"role": "assistant", "content": ""}, None)
        sent_lp: dict[int, int] = {}
        final = None
        async with aclosing(gen) as it:
            async for out in it:
                for o in out.outputs:
                    lp = None
                    if logprobs is not None and o.logprobs:
                        lp = _chat_logprobs(svc, o, sent_lp.get(o.index, 0))
                        sent_lp[o.index] = len(o.logprobs)
                    if o.delta:
                        yield chunk(o.index, {"content": o.delta}, None, lp)
                final = out
        for o in final.outputs:  # the last delta of each choice carries the finish reason
            yield chunk(o.index, {}, _finish(o) or "stop")
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [], "usage": _usage([final])})
        yield sse("[DONE]")

    return EventStream(stream(), [gen])
