"""`codeshell quantize` and `codeshell export-gguf` (mounted by codeshell.cli).

Only typer is imported at module level so that `codeshell --help` stays fast; the commands
import torch and gguf when they run.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Quantize checkpoints and convert them to GGUF.", no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


MODEL_OPT = typer.Option(None, "--model", "-m", help="MODEL as an option: `--model MODEL OUT`.")


def _model_out(model: str | None, out: str | None, model_opt: str | None, command: str) -> tuple[str, Path]:
    """`MODEL OUT`, `--model MODEL OUT` (every command takes --model) or just `OUT` (the built-in model)."""
    from codeshell.mini.package import cli_model

    if model_opt is not None:
        if out is not None:
            _fail(f"give the model once: `codeshell {command} MODEL OUT` or `codeshell {command} --model MODEL OUT`")
        model, out = model_opt, model
    elif out is None:  # one argument: OUT, for the built-in model
        model, out = None, model
    if out is None:
        _fail(f"give OUT: `codeshell {command} OUT` (the built-in model), `codeshell {command} MODEL OUT` "
              f"or `codeshell {command} --model MODEL OUT`")
    return cli_model(model), Path(out)


@app.command("quantize")
def quantize(
    model: str = typer.Argument(None, metavar="MODEL", help="Checkpoint folder or Hugging Face hub id (full precision; "
                                "default: the built-in codeshell-mini)."),
    out: str = typer.Argument(None, metavar="OUT", help="Output folder for the quantized checkpoint."),
    model_opt: str = MODEL_OPT,
    bits: int = typer.Option(4, "--bits", help="8 (int8, per output channel) or 4 (int4, group-wise)."),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size: 32, 64 or 128 (16, 256 too)."),
    zero_point: bool = typer.Option(False, "--zero-point/--symmetric", help="int4 with a zero point per group."),
    quantize_head: bool = typer.Option(False, "--quantize-head", help="Quantize the output head too."),
    head_bits: int = typer.Option(None, "--head-bits", help="Quantize the output head in 8 bits (int8 per "
                                  "channel) whatever --bits is, as llama.cpp's Q4_0 files do; implies --quantize-head."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write a weight-only quantized copy of MODEL to OUT (safetensors; the scheme in config.json).

    `codeshell quantize OUT` quantizes the built-in codeshell-mini model."""
    from ..weights import CheckpointError
    from .convert import quantize_checkpoint
    from .scheme import QuantError, QuantScheme
    model, out = _model_out(model, out, model_opt, "quantize")
    try:
        scheme = QuantScheme(bits=bits, group_size=group_size if bits == 4 else None,
                             symmetric=not zero_point, quantize_head=quantize_head or head_bits is not None,
                             head_bits=head_bits)
        path = quantize_checkpoint(model, out, scheme, overwrite=overwrite)
    except (QuantError, CheckpointError, ValueError) as e:
        _fail(str(e))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    typer.echo(f"wrote {path} ({scheme.name}, {size / 2**30:.2f} GiB)")


@app.command("export-gguf")
def export_gguf(
    model: str = typer.Argument(None, metavar="MODEL", help="Checkpoint folder (full precision or `codeshell quantize` "
                                "output; default: the built-in codeshell-mini)."),
    out: str = typer.Argument(None, metavar="OUT", help="Output .gguf file."),
    model_opt: str = MODEL_OPT,
    type: str = typer.Option("f16", "--type", help="f32, f16, bf16, q8_0 or q4_0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write MODEL as a GGUF file that llama.cpp runs as a CodeShell model.

    `codeshell export-gguf OUT` exports the built-in codeshell-mini model."""
    from ..weights import CheckpointError
    from .gguf_io import GGUFError, export_gguf as _export
    from .scheme import QuantError
    model, out = _model_out(model, out, model_opt, "export-gguf")
    try:
        path = _export(model, out, type, overwrite=overwrite)
    except (GGUFError, QuantError, CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path} ({type}, {path.stat().st_size / 2**30:.2f} GiB)")
