"""`codeshell train`: the command-line face of `codeshell.train` (light imports only)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Pretrain, fine-tune (full or LoRA) and merge CodeShell-family models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
