"""The codeshell-mini model shipped inside the package (`codeshell/mini/model/`): where it is,
the one-line note and the one-line error the commands give when they fall back to it, and
`package_checkpoint`, which writes a trained checkpoint there (or anywhere) as bf16.

Finding the model reads nothing outside the package and needs no network: the folder is
resolved from this module's own location (the same as `importlib.resources.files` gives for a
regular package). This module does not load or evaluate the model (see `codeshell.llm`), and
imports only the standard library at module level so `codeshell --help` stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

NAME = "codeshell-mini"
# The real CodeShell: one `--model` away, named in the note and in the error.
HUB_MODEL = "WisdomShell/CodeShell-7B-Chat"
MODEL_DIR = Path(__file__).resolve().parent / "model"
# What loading needs: the weights, their config and the tokenizer (CodeShell's FIM and chat
# special tokens live in tokenizer.json).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class PackagedModelMissing(RuntimeError):
    """The package's model files are not there (a broken install, or a checkout before the
    weights were committed); the message is one line that says what to do."""


def packaged_model() -> Path:
    """The folder of the built-in model; `PackagedModelMissing` when a needed file is absent."""
    missing = [f for f in REQUIRED if not (MODEL_DIR / f).is_file()]
    if missing:
        raise PackagedModelMissing(
            f"the built-in {NAME} model is missing from this install ({MODEL_DIR} has no {', '.join(missing)}): "
            f"reinstall codeshell, or give --model, e.g. --model {HUB_MODEL}")
    return MODEL_DIR


def default_note(path: Path) -> str:
    return f"using the built-in {NAME} model ({path}); give --model for another, e.g. --model {HUB_MODEL}"


def cli_model(model: str | None) -> str:
    """For a command's `--model`: the model given, else the built-in one after one note on
    stderr; a missing built-in model ends the command with one `error:` line (exit code 2)."""
    if model is not None:
        return model
    import typer

    try:
        path = packaged_model()
    except PackagedModelMissing as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.secho(default_note(path), fg="cyan", err=True)
    return str(path)


def package_checkpoint(src: str | os.PathLike, dest: str | os.PathLike | None = None,
                       tokenizer: str | os.PathLike | None = None) -> dict:
    """Write the checkpoint folder `src` (config.json + safetensors weights) as a bf16
    checkpoint in `dest` (default: the package's `codeshell/mini/model/`): model.safetensors,
    config.json with torch_dtype bfloat16, and the tokenizer files of `tokenizer` (default:
    those in `src`). Returns {"checkpoint", "bytes", "parameters"}.

    Each file is written beside its final name and renamed into place, so a reader never sees
    half a file. `codeshell.mini.recipe.Recipe.final` writes its final checkpoint with this.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from codeshell.tokenizer import TOKENIZER_FILES
    from codeshell.train.checkpoint import copy_tokenizer
    from codeshell.weights import weight_files

    src = Path(src).expanduser()
    out = Path(dest).expanduser() if dest is not None else MODEL_DIR
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: not a checkpoint folder")
    files = weight_files(src)
    if any(f.suffix != ".safetensors" for f in files):
        raise ValueError(f"{src} holds {files[0].name}: package_checkpoint reads safetensors weights only")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    # bf16 halves the float32 training checkpoint; integer tensors (none today) would stay as they are.
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".package-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        copy_tokenizer(Path(tokenizer) if tokenizer is not None else src, tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {tokenizer if tokenizer is not None else src}: "
                             "the packaged model needs its tokenizer (pass tokenizer=FOLDER)")
        _fix_special_ids(cfg, tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        for name in ("model.safetensors", "config.json", *TOKENIZER_FILES):
            if (tmp / name).exists():
                # readable by all (safetensors writes 0600; copies keep a read-only source's
                # mode): a system-wide install is read by other users
                os.chmod(tmp / name, 0o644)
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
            "parameters": sum(v.numel() for v in state.values())}


def _fix_special_ids(cfg: dict, tokenizer_json: Path) -> None:
    """bos/eos ids outside the vocabulary become the tokenizer's `<|endoftext|>` id.

    `codeshell train` gives new models their tokenizer's id (`codeshell.tokenizer.eot_id`);
    this guards checkpoints made elsewhere, whose config kept CodeShellConfig's default (70000,
    the 7B vocabulary's) for a smaller vocabulary and so would never stop at the end of text
    (the engine stops at config.eos_token_id). Ids inside the vocabulary are left as they are.
    """
    from codeshell.tokenizer import eot_id

    eot = eot_id(tokenizer_json.parent)
    vocab = cfg.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id"):
        if eot is not None and vocab is not None and not (isinstance(cfg.get(key), int) and 0 <= cfg[key] < vocab):
            cfg[key] = eot
