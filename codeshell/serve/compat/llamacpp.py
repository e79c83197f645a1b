"""llama.cpp-server-compatible endpoints, as the CodeShell IDE plugins use them in "CPU" mode.

`POST /infill` is always answered as SSE (the VS Code plugin splits the body on "\\n\\n"
and parses each `data:` line; a JSON body breaks it), `POST /completion` as SSE when
`stream` is true and one JSON object otherwise; also `/tokenize` and `/detokenize`.
Field names and defaults are the CodeShell llama.cpp fork's (n_predict 64, top_k 10,
temperature 0.2, repeat_penalty 1.0); unknown fields such as `repetition_penalty` are
accepted and ignored, as there. Prompts that do not fit are left-truncated (the plugins
cannot show errors). See shared/protocols/ide-plugins.md for the wire format.
"""

from __future__ import annotations

import time
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ...engine.outputs import RequestOutput
from ...prompts import FIM
from ..errors import ApiError
from ..http import EventStream, begin, service, sse, until_disconnect
from ..schema import SEED, Out, both_responses, doc, error_responses, json_response, request_body, sse_response
from ..service import CompletionService, GenRequest, with_stops

router = APIRouter()


class _LlamaOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # llama.cpp ignores unknown fields; so do we
    stream: bool = False
    n_predict: int = doc(64, minimum=-1, description="-1: until the context is full; 0 is refused")
    temperature: float = 0.2
    top_k: int = 10
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = doc(-1, **SEED, description="-1: random")
    stop: list[str] = doc([], maxItems=32)
    ignore_eos: bool = False
    n_probs: int = 0


class CompletionBody(_LlamaOptions):
    prompt: str | list[int]


class InfillBody(_LlamaOptions):
    input_prefix: str = ""
    input_suffix: str = ""


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


# ---- responses (documentation; the routes build plain dicts) --------------------------------------

class Timings(Out):
    """llama.cpp server's timings: the prompt phase ends when the first token is sampled."""
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float | None
    prompt_per_second: float | None
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float | None
    predicted_per_second: float | None


class CompletionResult(Out):
    """A whole /completion answer, or the last event of a stream (`content` empty there)."""
    content: str
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict
    prompt: str
    truncated: bool
    stopped_eos: bool
    stopped_word: bool
    stopped_limit: bool
    stopping_word: str
    tokens_cached: int
    timings: Timings


class StreamEvent(Out):
    """A streamed piece of text (`stop` false); the stream ends with a `CompletionResult`."""
    content: str
    stop: bool


class TokenizeResult(Out):
    tokens: list[int]


class DetokenizeResult(Out):
    content: str


class LlamaErrorDetail(Out):
    code: int
    message: str
    type: str


class LlamaError(Out):
    error: LlamaErrorDetail


def _max_tokens(n_predict: int) -> int | None:
    if n_predict == -1:
        return None  # llama.cpp: until the context is full
    if n_predict < 1:
        raise ApiError(400, f"n_predict must be -1 (no limit) or a positive integer, got {n_predict}",
                       param="n_predict")
    return n_predict


def _params(svc: CompletionService, b: _LlamaOptions, max_tokens: int):
    if len(b.stop) > 32:
        raise ApiError(400, f"stop takes at most 32 strings, got {len(b.stop)}", param="stop")
    return svc.params(max_tokens=max_tokens, temperature=max(b.temperature, 0.0),
                      top_k=max(0, b.top_k), top_p=b.top_p, min_p=b.min_p,
                      repetition_penalty=b.repeat_penalty, presence_penalty=b.presence_penalty,
                      frequency_penalty=b.frequency_penalty, seed=b.seed if b.seed >= 0 else None,
                      stop=b.stop, ignore_eos=b.ignore_eos)


def _final(svc: CompletionService, req: GenRequest, out: RequestOutput, b: _LlamaOptions, t0: float,
           t_first: float | None, content: str) -> dict:
    o = out.outputs[0]
    stopped_word = isinstance(o.stop_reason, str)
    now = time.monotonic()
    t_first = t_first or now
    n_out = len(o.token_ids)
    prompt_n = len(req.ids) - out.num_cached_tokens
    # llama.cpp's two phases: the prompt until the first token is sampled, then the decoding of
    # the rest (its `predicted_n` counts that first token too); together they make the whole time.
    prompt_ms, pred_ms = (t_first - t0) * 1e3, (now - t_first) * 1e3
    return {
        "content": content, "stop": True, "model": svc.settings.model_name,
        "tokens_predicted": n_out, "tokens_evaluated": len(req.ids),
        "generation_settings": {"n_predict": b.n_predict, "temperature": b.temperature, "top_k": b.top_k,
                                "top_p": b.top_p, "repeat_penalty": b.repeat_penalty, "stop": b.stop,
                                "seed": b.seed, "n_ctx": svc.max_model_len, "model": svc.settings.model_name},
        "prompt": req.prompt or "", "truncated": req.truncated,
        "stopped_eos": o.finish_reason == "stop" and not stopped_word,
        "stopped_word": stopped_word, "stopped_limit": o.finish_reason == "length",
        "stopping_word": o.stop_reason if stopped_word else "",
        "tokens_cached": out.num_cached_tokens,
        "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                    "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else None,
                    "prompt_per_second": prompt_n / (prompt_ms / 1e3) if prompt_ms > 0 else None,
                    "predicted_n": n_out, "predicted_ms": pred_ms,
                    "predicted_per_token_ms": pred_ms / n_out if n_out else None,
                    "predicted_per_second": n_out / (pred_ms / 1e3) if pred_ms > 0 else None},
    }


def _respond(request: Request, svc: CompletionService, req: GenRequest, b: _LlamaOptions, stream: bool):
    t0 = time.monotonic()
    gen = svc.run(req)

    async def events():
        t_first, final = None, None
        async with aclosing(gen) as it:
            async for out in it:
                d = out.outputs[0].delta
                if out.outputs[0].token_ids and t_first is None:
                    t_first = time.monotonic()
                if d:  # each event is written as one chunk and holds whole characters
                    yield sse({"content": d, "stop": False})
                final = out
        yield sse(_final(svc, req, final, b, t0, t_first, ""))

    if stream:
        return EventStream(events(), [gen])

    async def whole():
        t_first, final = None, None
        async with aclosing(gen) as it:
            async for out in it:
                if out.outputs[0].token_ids and t_first is None:
                    t_first = time.monotonic()  # the prompt phase ends with the first token
                final = out
        return _final(svc, req, final, b, t0, t_first, final.outputs[0].text)

    return whole()


@router.post("/infill", tags=["llama.cpp"], summary="Fill in the middle (always streamed)",
             openapi_extra=request_body(InfillBody),
             responses={200: sse_response(StreamEvent, "the middle, then a final `CompletionResult` event"),
                        **error_responses(LlamaError, 400, 401, 413, 503)})
async def infill(request: Request):
    svc, b = await begin(request, InfillBody)
    if not b.input_prefix and not b.input_suffix:
        raise ApiError(400, "input_prefix and input_suffix are both empty: nothing to complete",
                       param="input_prefix")
    ids, mt, truncated = svc.fim_ids(b.input_prefix, b.input_suffix, _max_tokens(b.n_predict))
    params = with_stops(_params(svc, b, mt), FIM.stop)
    client = request.client.host if request.client else None
    req = GenRequest(ids, params, "/infill", prompt=svc.decode(ids), client=client, fim=True, truncated=truncated)
    return _respond(request, svc, req, b, stream=True)  # always SSE, like the reference server


@router.post("/completion", tags=["llama.cpp"], summary="Completion (streamed when `stream` is true)",
             openapi_extra=request_body(CompletionBody),
             responses={200: both_responses(CompletionResult, StreamEvent, "the completion"),
                        **error_responses(LlamaError, 400, 401, 413, 499, 503)})
async def completion(request: Request):
    svc, b = await begin(request, CompletionBody)
    if isinstance(b.prompt, str):
        if not b.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = svc.encode(b.prompt)
    else:
        svc.check_ids(b.prompt)
        ids = list(b.prompt)
    ids, mt, truncated = svc.fit_ide(ids, _max_tokens(b.n_predict))
    req = GenRequest(ids, _params(svc, b, mt), "/completion", prompt=b.prompt if isinstance(b.prompt, str) else None,
                     truncated=truncated)
    res = _respond(request, svc, req, b, stream=b.stream)
    if b.stream:
        return res
    return JSONResponse(await until_disconnect(request, res))


@router.post("/tokenize", tags=["llama.cpp"], summary="Text to token ids",
             openapi_extra=request_body(TokenizeBody),
             responses={200: json_response(TokenizeResult, "the token ids"),
                        **error_responses(LlamaError, 400, 401, 413, 503)})
async def tokenize(request: Request):
    svc, b = await begin(request, TokenizeBody)
    return JSONResponse({"tokens": svc.encode(b.content)})


@router.post("/detokenize", tags=["llama.cpp"], summary="Token ids to text",
             openapi_extra=request_body(DetokenizeBody),
             responses={200: json_response(DetokenizeResult, "the text"),
                        **error_responses(LlamaError, 400, 401, 413, 503)})
async def detokenize(request: Request):
    svc, b = await begin(request, DetokenizeBody)
    svc.check_ids(b.tokens, "tokens")
    return JSONResponse({"content": svc.decode(b.tokens)})
