"""`LLM`: the offline Python API, in the shape vLLM users know.

Loads a checkpoint (folder or hub id), owns an `Engine`, and turns prompts (text, token ids,
chat messages, FIM prefix/suffix) into `RequestOutput`s or streamed text. It is a thin layer:
prompt formats live in `codeshell.prompts`, generation in `codeshell.engine`.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .omp import library_spin

try:  # before torch loads libgomp: a prompt's OpenMP worker must not spin through the next decode steps
    library_spin()
except ValueError:
    pass  # a bad CODESHELL_OMP_WAIT: the CLI reports it (`omp.wait_policy`); the library keeps libgomp's default

import torch  # noqa: E402

from .engine import Engine, RequestOutput, SamplingParams
from .engine.engine import RequestError
from .prompts import CHAT, FIM, chat_prompt, fim_prompt, left_truncate
from .tokenizer import Tokenizer, TokenizerMissingError, load_tokenizer
from .weights import load_model, resolve_dtype

PromptType = str | dict[str, Any]


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LLM:
    """A loaded model ready to generate.

    >>> llm = LLM("WisdomShell/CodeShell-7B-Chat", dtype="bfloat16")
    >>> llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text

    `LLM()` with no model loads the codeshell-mini model shipped in the package
    (`codeshell/mini/model/`): no network, no download.
    """

    def __init__(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "auto",
                 device: str = "cpu", tokenizer: str | os.PathLike | None = None, *,
                 max_batch: int = 8, max_model_len: int | None = None,
                 quantization: str | dict | None = None, threads: int | None = None, kernels: bool = True):
        if device.startswith("cpu"):
            torch.set_num_threads(threads or default_threads())
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        self.model, self.config, self.path, file_tok = _load(model, dtype, device, quantization)
        tok_path = Path(tokenizer) if tokenizer is not None else self.path
        tok = (file_tok if tokenizer is None and file_tok is not None  # a GGUF file carries its tokenizer
               else load_tokenizer(tok_path, self.config.eos_token_id))
        if tokenizer is not None and tok is None:
            raise TokenizerMissingError(f"no tokenizer.json in {tokenizer}")
        if kernels:
            _prepare_kernels(self.model)
        self._setup(tok, max_batch, max_model_len)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config, tokenizer: Tokenizer | None = None, *,
                   max_batch: int = 8, max_model_len: int | None = None, threads: int | None = None,
                   kernels: bool = True) -> "LLM":
        """Wrap an already built model (e.g. random weights for a benchmark)."""
        self = cls.__new__(cls)
        if next(model.parameters()).device.type == "cpu":
            torch.set_num_threads(threads or default_threads())
        self.model, self.config, self.path = model.eval(), config, Path("<in-memory>")
        if kernels:
            from .kernels import prepare_model
            prepare_model(self.model)
        self._setup(tokenizer, max_batch, max_model_len)
        return self

    def _setup(self, tokenizer: Tokenizer | None, max_batch: int, max_model_len: int | None) -> None:
        self.tokenizer: Tokenizer | None = tokenizer
        self.engine = Engine(self.model, self.config, self.tokenizer, max_batch=max_batch,
                             max_model_len=max_model_len)
        _choose_prefill_paths(self.model, self.engine.prefill_chunk)
        self.max_model_len = self.engine.max_model_len
        self._ids = itertools.count()
        # The loaded model and tokenizer are long-lived objects: moved out of the cyclic GC's
        # reach, so its passes during generation (the engine's per-step objects trigger them)
        # do not walk them again and again: 3.7% of a `small`-shape bf16 decode (perf, session
        # 14) was gc_collect_main. The server does the same once it is ready.
        gc.collect()
        gc.freeze()

    # ---- prompts -> token ids --------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerMissingError(
                f"text prompts need a tokenizer, and {self.path} has no tokenizer.json: pass token ids "
                "({'prompt_token_ids': [...]}) or LLM(..., tokenizer=PATH)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids))

    def _to_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty: give some text")
            return prompt, self.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise RequestError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._to_ids(prompt["prompt"])
        raise RequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (batched); outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        encoded = [self._to_ids(p) for p in prompts]
        return self._run([(text, ids, sp) for (text, ids), sp in zip(encoded, plist)], use_tqdm)

    def _run(self, items: list[tuple[str | None, list[int], SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        rids = []
        try:
            for text, ids, sp in items:
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, ids, sp, prompt=text)
                rids.append(rid)
            final: dict[str, RequestOutput] = {}
            # Only the finished outputs are kept: lean (the default), the engine makes no others
            # (final_only), and the loop runs inside one inference_mode instead of one a step.
            # CODESHELL_ENGINE_LEAN=off: every output made, as before session 20 (A/B timing).
            lean = _lean()
            self.engine.set_lean(lean)
            with _progress(len(rids), use_tqdm) as advance, torch.inference_mode():
                step = self.engine.step
                while len(final) < len(rids):
                    for out in step(lean):
                        if out.finished:
                            final[out.request_id] = out
                            advance()
            return [final[r] for r in rids]
        except BaseException:
            for r in rids:
                self.engine.abort(r)
            while self.engine.has_unfinished():
                self.engine.step()
            raise

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are produced (joined: the final text)."""
        return _deltas(self.stream_outputs(prompt, sampling_params))

    def stream_outputs(self, prompt: PromptType, sampling_params: SamplingParams | None = None
                       ) -> Iterator[RequestOutput]:
        """Each `RequestOutput` of one completion as it changes: `.outputs[0].delta` is the new
        text; the last one is finished (its finish reason, and the prompt as the engine ran it,
        truncated or not)."""
        text, ids = self._to_ids(prompt)
        yield from self._stream_ids(text, ids, sampling_params or SamplingParams())

    def _stream_ids(self, text: str | None, ids: list[int], sp: SamplingParams) -> Iterator[RequestOutput]:
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, ids, sp, prompt=text)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    yield out
                    done = out.finished
        finally:
            if not done:
                self.engine.abort(rid)
                self.engine.step()

    def chat_ids(self, messages: Sequence[dict], max_tokens: int | None) -> tuple[str, list[int]]:
        """The chat prompt for `messages`, left-truncated like the official code."""
        prompt = chat_prompt(messages)
        ids = self.encode(prompt)
        return prompt, left_truncate(ids, self.max_model_len, max_tokens or 0)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Reply to one conversation (a list of messages) or several (a list of such lists)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        sp = with_stops(sampling_params or SamplingParams(max_tokens=512), CHAT.stop)
        items = []
        for conv in convs:
            prompt, ids = self.chat_ids(conv, sp.max_tokens)
            items.append((prompt, ids, sp))
        return self._run(items, use_tqdm)

    def chat_stream(self, messages: Sequence[dict], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        return _deltas(self.chat_stream_outputs(messages, sampling_params))

    def chat_stream_outputs(self, messages: Sequence[dict], sampling_params: SamplingParams | None = None
                            ) -> Iterator[RequestOutput]:
        """`stream_outputs` for a conversation (the reply to its last message)."""
        sp = with_stops(sampling_params or SamplingParams(max_tokens=512), CHAT.stop)
        prompt, ids = self.chat_ids(messages, sp.max_tokens)
        yield from self._stream_ids(prompt, ids, sp)

    def infill(self, prefix: str, suffix: str = "", sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Fill in the middle between `prefix` and `suffix` (CodeShell's FIM tokens)."""
        sp = with_stops(sampling_params or SamplingParams(max_tokens=64), FIM.stop)
        return self.generate([fim_prompt(prefix, suffix)], sp)[0]


def _lean() -> bool:
    """CODESHELL_ENGINE_LEAN (on by default): the engine's trimmed per-step path (`Engine.set_lean`)."""
    v = os.environ.get("CODESHELL_ENGINE_LEAN", "on")
    if v not in ("on", "off"):
        raise ValueError(f"CODESHELL_ENGINE_LEAN={v!r}: expected on or off")
    return v == "on"


def _prepare_kernels(model: torch.nn.Module) -> None:
    """`kernels.prepare_model`, with a spinner on a terminal: the first use compiles the kernels
    (minutes) and packing a 7B model's weights takes a while."""
    from .kernels import available, prepare_model
    from .weights import status
    p = model.transformer.wte.weight
    if p.device.type == "cpu" and p.dtype == torch.bfloat16:
        with status("Loading the native kernels (compiled on first use: a few minutes)"):
            available()
    with status("Packing the weights for the native kernels"):
        prepare_model(model)


def _choose_prefill_paths(model: torch.nn.Module, max_rows: int) -> None:
    """`kernels.choose_prefill_paths` (the per-shape prefill choices measured at load, once per
    machine: later loads read them from disk), with a spinner on a terminal."""
    from .kernels import choose_prefill_paths
    from .weights import status
    with status("Choosing this machine's prefill kernels (measured once, then kept)"):
        choose_prefill_paths(model, max_rows)


def _deltas(outputs: Iterator[RequestOutput]) -> Iterator[str]:
    try:
        for out in outputs:
            if out.outputs[0].delta:
                yield out.outputs[0].delta
    finally:
        outputs.close()  # closing the text stream aborts the request in the engine


def with_stops(sp: SamplingParams, stops: Sequence[str]) -> SamplingParams:
    """A copy of `sp` that also stops at `stops` (the prompt format's own stop strings)."""
    import dataclasses
    merged = list(dict.fromkeys([*(sp.stop or []), *stops]))
    return dataclasses.replace(sp, stop=merged)


def _load(model, dtype, device, quantization=None):
    """(model, config, path, tokenizer from the file or None).

    A ``.gguf`` file, a folder written by `codeshell quantize`, the official NF4 checkpoint
    or any checkpoint with `quantization=` go through `codeshell.quant`.
    """
    from .weights import load_config, resolve_model_path
    path = resolve_model_path(model)
    if path.is_file():
        from .quant.gguf_io import is_gguf, load_gguf
        if is_gguf(path):  # the head's scheme from the tensor records load_gguf reads anyway
            return load_gguf(path, dtype, device, quantization, choose_scheme=gguf_head_scheme)
    from .quant.scheme import QuantScheme
    QuantScheme.parse(quantization)  # an unknown scheme fails before any weight is read
    if path.is_dir():
        from .quant.load import load_quantized
        loaded = load_quantized(path, load_config(path), dtype, device, quantization)
        if loaded is not None:
            return (*loaded, path, None)
    if dtype in (None, "auto") and path.is_dir():
        cfg = load_config(path)
        dtype = cfg.torch_dtype if cfg.torch_dtype in ("float32", "bfloat16", "float16") else "float32"
        if dtype == "float16" and str(device).startswith("cpu"):
            dtype = "bfloat16"  # fp16 matmuls on CPU are slow and overflow-prone
    return (*load_model(path, resolve_dtype(dtype), device), None)


GGUF_HEADS = ("int8", "bf16")


def gguf_head_scheme(path: "Path | dict", environ=os.environ):
    """The scheme a GGUF file loads with when the caller names none: the file's own (Q4_0 blocks:
    int4 g32, their bits as they are; Q8_0: int8), with the output head in int8 where the file
    stores it in Q8_0 (llama.cpp's Q4_0 and Q8_0 files do), instead of widened to bf16. None:
    the loader's own default (`gguf_io._default_scheme`: the head in bf16).

    Why: the head is a sixth of a 1.7B model's weights (70,144 x 4,096): widened to bf16 it was
    575 MB read per decode token, 11.1 ms of the 1.7B q4_0 server's ~30 ms step, where llama-server
    reads the file's Q8_0 head (305 MB); in int8 it is 287 MB (docs/kernels-log.md, session 21 A).
    The int8 head is the Q8_0 values requantized per output row (one scale a row where Q8_0 has
    one a 32-value block): not bit for bit the file's values, as the bf16 widening nearly was.
    CODESHELL_GGUF_HEAD=bf16 keeps the head in bf16 (the behaviour before session 21).
    `path`: the file, or its tensor records as `gguf_reader.read_gguf` gives them (`load_gguf`
    passes those, so the header is read once)."""
    mode = environ.get("CODESHELL_GGUF_HEAD", "int8")
    if mode not in GGUF_HEADS:
        raise ValueError(f"CODESHELL_GGUF_HEAD={mode!r}: expected {' or '.join(GGUF_HEADS)}")
    if mode == "bf16":
        return None
    from .quant.gguf_io import _default_scheme, _gguf
    from .quant.gguf_reader import read_gguf
    from .quant.scheme import QuantScheme
    tensors = path if isinstance(path, dict) else read_gguf(Path(path))[2]
    scheme = _default_scheme(tensors)
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if scheme is None or head is None or head.tensor_type != _gguf().GGMLQuantizationType.Q8_0:
        return None
    return QuantScheme(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric,
                       quantize_head=True, head_bits=8)


class _progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and total > 1

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
        self._p = Progress("[bold]Generating", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=Console(stderr=True))
        self._p.__enter__()
        task = self._p.add_task("gen", total=self.total)
        return lambda: self._p.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)
