"""Checkpoints of a training run, written atomically.

Layout of a run folder::

    RUN/step-000100/      model.safetensors, config.json (model_type "codeshell"), tokenizer
                          files: a Hugging Face folder that LLM, AutoModelForCausalLM,
                          `codeshell serve|quantize|eval run --model` read as it is.
                          LoRA runs hold adapter_config.json + adapter_model.safetensors
                          (peft's layout) instead, and the last one holds both.
                          train_state.pt (optimizer, scheduler, step, data position, RNG)
                          and trainer_state.json (the same figures, readable).
    RUN/checkpoint  ->    a symlink to the newest complete step folder.

A checkpoint is written into `RUN/.tmp-step-000100` and renamed to `RUN/step-000100` only
when every file is on disk, then the `checkpoint` link is swapped by `os.replace`: a crash
at any point leaves the previous checkpoint complete and still linked, and a half-written
folder never carries a `step-` name. Only rank 0 writes. This module does not gather
distributed state (the loop hands it full tensors).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from codeshell.config import CodeShellConfig
from codeshell.tokenizer import TOKENIZER_FILES

from .config import TrainError

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.pt"
LINK = "checkpoint"


def step_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(run: Path) -> Path | None:
    dirs = [d for d in step_dirs(run) if (d / STATE_FILE).is_file()]
    return dirs[-1] if dirs else None


def model_config_json(cfg: CodeShellConfig, dtype: str) -> dict[str, Any]:
    return {**cfg.to_dict(), "model_type": "codeshell", "architectures": ["CodeShellForCausalLM"],
            "torch_dtype": dtype}


def write_model(folder: Path, state: dict[str, torch.Tensor], cfg: CodeShellConfig,
                tokenizer_dir: Path | None) -> None:
    """model.safetensors + config.json + tokenizer files: the official checkpoint layout."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    (folder / "config.json").write_text(json.dumps(model_config_json(cfg, dtype), indent=2))
    copy_tokenizer(tokenizer_dir, folder)


def copy_tokenizer(tokenizer_dir: Path | None, folder: Path) -> None:
    if tokenizer_dir is None:
        return
    for f in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / f
        if src.exists():
            shutil.copy(src, folder / f)


def save(run: Path, step: int, write: Callable[[Path], None], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically: `write(tmp_folder)` puts the model files, then the
    training state goes beside them; rename; relink; drop all but the last `keep`."""
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".tmp-step-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = run / f".tmp-{name}"
    tmp.mkdir()
    write(tmp)
    torch.save(state, tmp / STATE_FILE)
    readable = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, dict)) and k not in
                ("optimizer", "scheduler", "rng")}
    (tmp / "trainer_state.json").write_text(json.dumps(readable, indent=2, default=str))
    _fsync_dir(tmp)
    final = run / name
    if final.exists():  # the same step saved again (a resumed run that re-saves): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    link_tmp = run / f".{LINK}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(name, link_tmp)
    os.replace(link_tmp, run / LINK)
    _fsync_dir(run)
    for old in step_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(folder: Path) -> dict[str, Any]:
    f = folder / STATE_FILE
    if not f.is_file():
        raise TrainError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"cannot read {f}: {e}") from None


SHAPE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "num_query_groups", "n_inner", "n_positions",
              "position_embedding_type")


def check_same_shape(folder: Path, state: dict[str, Any], cfg: CodeShellConfig, mode: str) -> None:
    """A resume folder must come from the same model shape and mode as this run."""
    theirs = state.get("model_config") or {}
    ours = cfg.to_dict()
    diff = [f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
    if diff:
        raise TrainError(f"resume checkpoint {folder} is from another model shape ({', '.join(diff)}; "
                         "checkpoint vs this run)")
    if state.get("mode") != mode:
        raise TrainError(f"resume checkpoint {folder} is from a {state.get('mode')} run, not {mode}")
