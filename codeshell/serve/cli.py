"""`codeshell serve`: the command line of the server (typer). Imports stay light at the top
so `codeshell --help` is fast; the app, torch and uvicorn load inside the command."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Annotated

import typer


def omp_wait_policy(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """`codeshell.omp.wait_policy` (OMP_WAIT_POLICY=passive before torch loads, unless
    CODESHELL_OMP_WAIT=keep, a policy the user set, or the decode team off), a bad switch value as
    the command line's one-line error."""
    from ..omp import wait_policy

    try:
        return wait_policy(environ)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


# One command, mounted as a group (`codeshell serve ...`): no `COMMAND [ARGS]...` in its usage line.
app = typer.Typer(help="Serve a CodeShell model over HTTP (OpenAI API, IDE plugins, web UI).",
                  subcommand_metavar="")


def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Checkpoint folder or hub id (default: the built-in codeshell-mini).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 8080 is what both IDE plugins expect.")] = 8080,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    quantization: Annotated[str | None, typer.Option(
        help="Quantize weights at load: int8, int4 (groups of 128) or e.g. int4-g32-zp.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder, if not beside the weights.")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="Require `Authorization: Bearer KEY` (repeatable). The IDE plugins send no key.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before new ones get 503.")] = 64,
    max_model_len: Annotated[int | None, typer.Option(min=16, help="Context window (default: the model's).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Allowed browser origins (repeatable; default any).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model name in the OpenAI API.")] = None,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache",
                                               help="Reuse KV of shared prompt prefixes.")] = True,
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes.")] = 4 * 1024 * 1024,
    prompt_lookup: Annotated[int, typer.Option(
        "--prompt-lookup", min=0, max=64,
        help="Prompt-lookup decoding: draft up to N tokens a step from the prompt's n-grams (0: off).")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch.")] = None,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help=(
        "Run one short request before /health says ready, so the first client does not pay "
        "one-time costs (as llama-server's warm-up)."))] = True,
    shutdown_timeout: Annotated[float, typer.Option(
        help="Seconds to let in-flight requests finish on SIGTERM/Ctrl-C before aborting them.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a model to IDE plugins (llama.cpp and TGI APIs), OpenAI clients and a web page."""
    torch_loaded = "torch" in sys.modules  # then libgomp has read its settings already
    omp_wait = omp_wait_policy()
    import logging
    from pathlib import Path

    import uvicorn

    from codeshell.mini.package import NAME, cli_model

    from .app import build_app
    from .service import ServeSettings
    if model is None:
        served_model_name = served_model_name or NAME  # not the folder's name, `model`
    model = cli_model(model)
    local = Path(model).expanduser()
    if (local.is_absolute() or model.startswith(".")) and not local.exists():
        raise typer.BadParameter(f"no checkpoint folder at {model}", param_hint="--model")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if omp_wait and torch_loaded:
        logging.getLogger("codeshell.serve").warning(
            "OMP_WAIT_POLICY=%s comes too late: torch was imported before `serve` ran", omp_wait)
    settings = ServeSettings(model=model, host=host, port=port, dtype=dtype, device=device, tokenizer=tokenizer,
                             quantization=quantization, api_keys=list(api_key or []), max_batch=max_batch, max_queue=max_queue,
                             max_model_len=max_model_len, cors_origins=list(cors_origin or ["*"]),
                             served_model_name=served_model_name, prefix_caching=prefix_cache, prompt_lookup=prompt_lookup,
                             max_body_bytes=max_body, threads=threads, shutdown_timeout=shutdown_timeout,
                             warmup=warmup)
    logging.getLogger("codeshell.serve").info(
        "serving %s on http://%s:%d (loading the model; /health says `loading` until it is ready)",
        settings.model_name, host, port)
    config = uvicorn.Config(build_app(settings), host=host, port=port, log_level=log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=shutdown_timeout)
    server = _GracefulServer(config)
    server.run()
    if not server.started:
        raise typer.Exit(1)


def _graceful_server_class():
    import contextlib

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would
        die by the signal; a server that stopped cleanly should exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                if hasattr(self, "_captured_signals"):
                    self._captured_signals.clear()

    return GracefulServer


def _GracefulServer(config):
    return _graceful_server_class()(config)


# Mounted by the project CLI either as a command (`main.command("serve")(serve)`) or as a
# sub-app (`main.add_typer(app, name="serve")`): both give `codeshell serve --model ...`.
app.callback(invoke_without_command=True)(serve)


def main() -> None:
    typer.run(serve)
