"""Text-generation-inference-compatible endpoints, as the CodeShell IDE plugins use them in
"GPU" mode: `POST /generate` (`{"generated_text": new text only}`, UTF-8 JSON) and
`POST /generate_stream` (TGI token events).

The stream holds back one token event so that the last event, the only one with
`generated_text`, also carries a non-empty `token.text`: the IntelliJ chat finishes a
stream only on such an event. Bad input is a 422 `{"error", "error_type": "validation"}`
before the stream starts. A FIM prompt (`<fim_prefix>…<fim_middle>`) counts as an IDE
completion: it supersedes the same client's older one and is truncated at both ends.
"""

from __future__ import annotations

import re
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ...engine.outputs import CompletionOutput
from ...prompts import EOS_TEXT, FIM
from ..errors import ApiError
from ..http import EventStream, begin, service, sse, until_disconnect
from ..schema import SEED, Out, doc, error_responses, json_response, request_body, sse_response
from ..service import CompletionService, GenRequest, with_stops

router = APIRouter()

_FIM_RE = re.compile(re.escape(FIM.prefix) + "(.*)" + re.escape(FIM.suffix) + "(.*)" + re.escape(FIM.middle)
                     + r"\Z", re.DOTALL)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    best_of: int | None = doc(None, minimum=1, maximum=1)
    temperature: float | None = doc(None, exclusiveMinimum=0)
    repetition_penalty: float | None = doc(None, exclusiveMinimum=0)
    frequency_penalty: float | None = None
    top_k: int | None = doc(None, exclusiveMinimum=0)
    top_p: float | None = doc(None, exclusiveMinimum=0, maximum=1)
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = doc(100, minimum=1)
    return_full_text: bool | None = False
    stop: list[str] = doc([], maxItems=32)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = doc(None, **SEED)
    top_n_tokens: int | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: str = Field(json_schema_extra={"minLength": 1})
    parameters: Parameters = Parameters()
    stream: bool = False


# ---- responses (documentation; the routes build plain dicts) --------------------------------------

class Details(Out):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class GenerateResult(Out):
    generated_text: str
    details: Details | None = None


class Token(Out):
    id: int
    text: str
    logprob: float
    special: bool


class StreamToken(Out):
    """One event of /generate_stream; the last one also carries `generated_text`."""
    token: Token
    generated_text: str | None = None
    details: Details | None = None


class TgiError(Out):
    error: str
    error_type: str


def _prepare(request: Request, svc: CompletionService, b: GenerateBody, endpoint: str, stream: bool) -> GenRequest:
    p = b.parameters
    if not b.inputs:
        raise ApiError(422, "`inputs` cannot be empty", param="inputs")
    if p.max_new_tokens is not None and p.max_new_tokens < 1:
        raise ApiError(422, f"`max_new_tokens` must be strictly positive, got {p.max_new_tokens}",
                       param="max_new_tokens")
    if p.best_of not in (None, 1):
        raise ApiError(422, "`best_of` other than 1 is not supported", param="best_of")
    if len(p.stop) > 32:
        raise ApiError(422, f"`stop` supports up to 32 stop sequences, got {len(p.stop)}", param="stop")
    for name in ("temperature", "repetition_penalty", "top_k"):
        v = getattr(p, name)
        if v is not None and v <= 0:
            raise ApiError(422, f"`{name}` must be strictly positive, got {v}", param=name)
    if p.top_p is not None and not 0 < p.top_p <= 1:
        raise ApiError(422, f"`top_p` must be > 0.0 and <= 1.0, got {p.top_p}", param="top_p")
    fim = _FIM_RE.match(b.inputs)
    if fim:
        ids, mt, truncated = svc.fim_ids(fim.group(1), fim.group(2), p.max_new_tokens)
    else:
        ids = svc.encode(b.inputs)
        if p.truncate:
            ids = ids[-p.truncate:]
        ids, mt, truncated = svc.fit_ide(ids, p.max_new_tokens)
    # TGI: without do_sample it is greedy whatever the temperature.
    kw = dict(max_tokens=mt, temperature=(p.temperature or 1.0) if p.do_sample else 0.0,
              top_p=p.top_p or 1.0, top_k=p.top_k or 0, repetition_penalty=p.repetition_penalty or 1.0,
              frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=p.stop,
              logprobs=0 if stream else None)
    params = svc.params(**kw)
    if fim:
        params = with_stops(params, FIM.stop)
    client = request.client.host if request.client else None
    return GenRequest(ids, params, endpoint, prompt=b.inputs, client=client, fim=bool(fim), truncated=truncated)


def _finish(o: CompletionOutput) -> str:
    if o.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(o.stop_reason, str) else "eos_token"


def _details(o: CompletionOutput, seed: int | None) -> dict:
    return {"finish_reason": _finish(o), "generated_tokens": len(o.token_ids), "seed": seed}


@router.post("/generate", tags=["TGI"], summary="Generate (the new text only)",
             openapi_extra=request_body(GenerateBody),
             responses={200: json_response(GenerateResult, "the generated text"),
                        **error_responses(TgiError, 401, 413, 422, 499, 503)})
async def generate(request: Request):
    svc, b = await begin(request, GenerateBody)
    req = _prepare(request, svc, b, "/generate", stream=False)
    out = await until_disconnect(request, svc.collect(svc.run(req)))
    o = out.outputs[0]
    text = (b.inputs if b.parameters.return_full_text else "") + o.text
    body = {"generated_text": text}
    if b.parameters.details:
        body["details"] = _details(o, b.parameters.seed)
    return JSONResponse(body, media_type="application/json; charset=utf-8")


@router.post("/generate_stream", tags=["TGI"], summary="Generate, streamed as token events",
             openapi_extra=request_body(GenerateBody),
             responses={200: sse_response(StreamToken, "token events"),
                        **error_responses(TgiError, 401, 413, 422, 503)})
async def generate_stream(request: Request):
    svc, b = await begin(request, GenerateBody)
    req = _prepare(request, svc, b, "/generate_stream", stream=True)
    gen = svc.run(req)
    tok = svc.llm.tokenizer

    def event(o: CompletionOutput, text: str) -> dict:
        tid = o.token_ids[-1] if o.token_ids else tok.eos_token_id
        lp = o.logprobs[-1].logprob if o.logprobs else 0.0
        return {"token": {"id": tid, "text": text, "logprob": lp, "special": tok.is_special(tid)},
                "generated_text": None, "details": None}

    async def events():
        pending = None
        final = None
        try:
            async with aclosing(gen) as it:
                async for out in it:
                    o = out.outputs[0]
                    final = o
                    if o.delta:
                        if pending is not None:
                            yield sse(pending, space=False)
                        pending = event(o, o.delta)
        except ApiError as e:  # TGI reports errors met mid-stream as an SSE event
            yield sse({"error": e.message, "error_type": "generation"}, space=False)
            return
        if pending is None:  # no text at all: end on the EOS token, as TGI does
            pending = event(final, EOS_TEXT)
            pending["token"].update(id=tok.eos_token_id, special=True)
        pending["generated_text"] = (b.inputs if b.parameters.return_full_text else "") + final.text
        if b.parameters.details:
            pending["details"] = _details(final, b.parameters.seed)
        yield sse(pending, space=False)

    return EventStream(events(), [gen])
