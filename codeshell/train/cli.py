"""`codeshell train`: the command-line face of `codeshell.train` (light imports only).

`pretrain`, `sft` and `lora` take the fields of `TrainConfig` as flags (generated from the
dataclass, so flags and YAML keys cannot drift apart), `--config FILE` for a YAML file with
the same keys (flags win), and run the same loop. `merge` folds a LoRA adapter into its
base, `plot` draws a run's curves, `presets` lists the model sizes. Under torchrun every
process runs the command; only rank 0 prints.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Pretrain, fine-tune (full or LoRA) and merge CodeShell-family models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fail(msg: str) -> None:
    if _rank0():
        typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _command(mode: str):
    """A typer command for `mode` whose options are the TrainConfig fields."""
    from .config import FIELDS

    params = [inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                                default=typer.Argument(None, help=FIELDS["data"].metadata["help"],
                                                       show_default=False)),
              inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
                                default=typer.Option(None, "--config", "-c", show_default=False,
                                                     help="YAML file with the same keys as these flags "
                                                          "(flags given here win)."))]
    for name, f in FIELDS.items():
        if name in ("mode", "data") or mode not in f.metadata["modes"]:
            continue
        base = next(t for k, t in _TYPES.items() if str(f.type).startswith(k))
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        if f.metadata.get("short"):
            decls.append(f.metadata["short"])
        default = f.default
        shown = "" if default is None else f" [default: {default}]"
        params.append(inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[base],
            default=typer.Option(None, *decls, help=f.metadata["help"] + shown, show_default=False)))

    def command(**kwargs) -> None:
        config = kwargs.pop("config")
        _train(mode, config, kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _train(mode: str, config: Path | None, flags: dict) -> None:
    from codeshell.weights import CheckpointError

    from .config import TrainError, make_config
    from .loop import Trainer, prepare

    try:
        cfg = make_config(mode, config, **flags)
        plan = prepare(cfg)
    except (TrainError, CheckpointError) as e:
        _fail(str(e))
    trainer = None
    try:
        trainer = Trainer(plan)
        summary = trainer.run()
    except (TrainError, CheckpointError) as e:
        _fail(str(e))
    finally:
        if trainer is not None:
            trainer.close()
    if _rank0():
        typer.echo(f"done: {plan.max_steps} steps, loss {summary.get('final_loss', float('nan')):.4f}"
                   + (f", held-out loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
                   + f", {summary.get('tok_per_s', 0):,.0f} tokens/s, checkpoint {summary['checkpoint']}")


app.command("pretrain", help="Pretrain from packed shards (`codeshell data run`), from a preset, a config.json "
                             "or a checkpoint (continued pretraining).")(_command("pretrain"))
app.command("sft", help="Full fine-tune on JSONL: chat `messages`, `prompt`/`completion` or `text` rows.")(
    _command("sft"))
app.command("lora", help="LoRA fine-tune (peft) on the same JSONL; the last checkpoint also holds merged "
                         "weights.")(_command("lora"))


@app.command()
def merge(base: str = typer.Argument(..., help="The base checkpoint (folder or hub id)."),
          adapter: Path = typer.Argument(..., help="A LoRA checkpoint folder (adapter_config.json)."),
          out: Path = typer.Argument(..., help="Folder to write the merged model to."),
          dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 for the merged weights "
                                                    "(the merge itself is float32).")) -> None:
    """Fold a LoRA adapter into its base: OUT is a full checkpoint folder."""
    from .merge import merge_adapter
    from .config import TrainError

    try:
        path = merge_adapter(base, adapter, out, dtype)
    except TrainError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@app.command()
def plot(run: Path = typer.Argument(..., help="A run folder (holding metrics.jsonl)."),
         output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG file (default RUN/metrics.png).")):
    """Draw loss (train and held-out) and throughput curves of a run to a PNG."""
    from .config import TrainError
    from .plot import plot_run

    try:
        path = plot_run(run, output)
    except TrainError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@app.command()
def presets() -> None:
    """List the model size presets of `pretrain --preset`."""
    from .config import PRESETS

    for name, c in PRESETS.items():
        typer.echo(f"{name:6s} {c.num_parameters() / 1e6:8.1f}M  layers {c.n_layer}, width {c.n_embd}, heads "
                   f"{c.n_head}/{c.num_query_groups} KV, ffn {c.ffn_dim}, context {c.n_positions}")
