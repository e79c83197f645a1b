"""Helpers for the training tests: packed shards made by the pipeline's own packer, tiny
checkpoints with the released tokenizer, and helpers to run `codeshell train` in process or
under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from typer.testing import CliRunner

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ENV = {**os.environ, "CODESHELL_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def make_shards(out: Path, tokenizer_dir: Path, seq_len: int = 64, files: str = "json/*.py",
                max_chars: int | None = None) -> Path:
    """Packed shards of some standard-library files, written by the pipeline's Pack stage."""
    from codeshell.data.packing import Pack
    from codeshell.data.stages.base import StageStats

    out.mkdir(parents=True, exist_ok=True)
    pack = Pack(Pack.Options(tokenizer=str(tokenizer_dir), seq_len=seq_len, fim_rate=0.0))
    pack.setup()
    docs = [{"id": str(f), "text": f.read_text()[:max_chars], "size": 1} for f in sorted(STDLIB.glob(files))]
    pack.write_shard(docs, out / "shard-00000", StageStats())
    return out


def train_cli(*args: str):
    """`codeshell train ARGS` in this process; returns the CliRunner result."""
    from codeshell.train.cli import app

    old = os.environ.get("CODESHELL_NO_PROGRESS")
    os.environ["CODESHELL_NO_PROGRESS"] = "1"
    try:
        return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    finally:
        if old is None:
            os.environ.pop("CODESHELL_NO_PROGRESS", None)
        else:
            os.environ["CODESHELL_NO_PROGRESS"] = old


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m codeshell.train ARGS` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "codeshell.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
