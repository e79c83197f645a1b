"""Finding and loading checkpoints: a local folder or a Hugging Face hub id, in every layout
the released CodeShell checkpoints use (single or sharded safetensors, single or sharded
``pytorch_model.bin``).

Tensors are memory-mapped and copied one at a time into a model built with empty storage in
the target dtype, so peak memory stays near the weights' own size. ``.bin`` files are read
with ``torch.load(weights_only=True)``: loading never runs pickled code. This module knows
nothing of generation; quantized formats hook in through `load_model(..., quantization=)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import CodeShellConfig, ConfigError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.gguf"]
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the file or tensor."""


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub;
    None: the codeshell-mini model inside the package (no network, no file outside it).

    Honours HF_HOME and HF_HUB_OFFLINE. Offline with nothing cached is a clear error.
    """
    if model is None:
        from .mini.package import PackagedModelMissing, packaged_model
        try:
            return packaged_model()
        except PackagedModelMissing as e:
            raise CheckpointError(str(e)) from None
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file():
            return p  # a single file (e.g. GGUF) is the caller's business
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p} has no config.json: not a CodeShell checkpoint folder")
        return p
    s = str(model)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"model folder {s!r} does not exist (and it is not a Hugging Face hub id "
                              "of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"cannot fetch {s!r}: huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(s, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model {s!r} is not in the Hugging Face cache and the hub cannot be reached "
            f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}); download it first or pass a local "
            "folder with --model PATH") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"model {s!r} was not found on the Hugging Face hub") from None
    except Exception as e:  # network failures come in many types
        raise CheckpointError(f"could not fetch model {s!r} from the Hugging Face hub: {e}; "
                              "pass a local folder with --model PATH") from None


def load_config(path: Path) -> CodeShellConfig:
    return CodeShellConfig.from_json(path / "config.json")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return [path / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if found:
        return found
    raise CheckpointError(f"{path} has no weights (expected model.safetensors, a sharded "
                          "model-*.safetensors with its index, or pytorch_model*.bin)")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(file: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and where its data starts, validated against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"cannot read {file.name}: truncated (no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 256 << 20:
            raise CheckpointError(f"cannot read {file.name}: corrupt header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {file.name}: corrupt header ({e})") from None
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, e in table.items():
        if not isinstance(e, dict) or e.get("dtype") not in _ST_DTYPES or len(e.get("data_offsets", ())) != 2:
            raise CheckpointError(f"cannot read {file.name}: bad entry for tensor {name!r}")
        begin, end = e["data_offsets"]
        want = math.prod(e["shape"]) * _ST_DTYPES[e["dtype"]].itemsize
        if end - begin != want:
            raise CheckpointError(f"cannot read {file.name}: tensor {name!r} has {end - begin} bytes, its shape "
                                  f"{e['shape']} needs {want}")
    end = max((e["data_offsets"][1] for e in table.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"cannot read {file.name}: truncated ({size} bytes, the header needs {8 + n + end})")
    return table, 8 + n


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, each read straight into its own buffer.

    Hand-written rather than safe_open's mmap: plain reads keep the file's pages out of this
    process's resident set, so loading a 15 GB single-file checkpoint peaks near the model's
    own size instead of model + file.
    """
    table, start = safetensors_header(file)
    with open(file, "rb", buffering=0) as f:
        for name, e in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
            f.seek(start + e["data_offsets"][0])
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(f"cannot read tensor {name!r} from {file.name}: file ended early")
                got += k
            yield name, t


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, memory-mapped where the format allows."""
    if file.suffix == ".safetensors":
        yield from _read_safetensors(file)
        return
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        try:  # old (non-zip) torch.save files cannot be memory-mapped
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"cannot read {file.name}: {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file.name} does not hold a state dict (got {type(sd).__name__})")
    yield from sd.items()


def _bigcode_qkv_to_fused(t: torch.Tensor, cfg: CodeShellConfig) -> torch.Tensor:
    """gpt_bigcode MHA stores c_attn rows per head as [q|k|v]; reorder to [all q | all k | all v]."""
    H, D = cfg.n_head, cfg.head_dim
    return t.reshape(H, 3, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _show_progress(console) -> bool:
    return os.environ.get("CODESHELL_NO_PROGRESS") != "1" and console.is_terminal


@contextmanager
def _progress(total: int, desc: str):
    """A bar on stderr (a terminal only); yields advance(n, desc=None), desc renaming the bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console
    console = Console(stderr=True)  # progress never mixes with generated text on stdout
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True, disable=not _show_progress(console),
                  console=console) as prog:
        task = prog.add_task(desc, total=total)

        def advance(n: int, desc: str | None = None) -> None:
            prog.update(task, advance=n, **({"description": desc} if desc else {}))
        yield advance


@contextmanager
def status(message: str):
    """A spinner with `message` on stderr while a step of unknown length runs (a terminal only)."""
    from rich.console import Console
    console = Console(stderr=True)
    if not _show_progress(console):
        yield
        return
    with console.status(message):
        yield


# A loader hook sees each (name, tensor) first; it returns the parameter/buffer names it filled
# (the tensor is then consumed), or None to let the plain copy below handle it. Quantized
# formats (codeshell.quant) use it to quantize or unpack tensors on the fly.
LoadHook = Callable[[str, object], "list[str] | None"]


def load_state_into(model: torch.nn.Module, path: Path, cfg: CodeShellConfig,
                    hook: LoadHook | None = None) -> None:
    """Copy every tensor of the checkpoint at `path` into `model`, checking names and shapes."""
    files = weight_files(path)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    tied = cfg.tie_word_embeddings and getattr(model.lm_head, "weight", None) is model.transformer.wte.weight
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    seen: set[str] = set()
    total = sum(f.stat().st_size for f in files)
    with _progress(total, f"Loading {path.name}") as advance:
        for i, file in enumerate(files):
            if len(files) > 1:
                advance(0, f"Loading {path.name}: shard {i + 1}/{len(files)} ({file.name})")
            for name, t in iter_tensors(file):
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                filled = hook(name, t) if hook is not None else None
                if filled is not None:
                    seen.update(filled)
                    advance(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0)
                    del t
                    continue
                if name == "lm_head.weight" and tied:
                    # The checkpoint carries its own head: untie so it gets its own storage.
                    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.transformer.wte.weight),
                                                              requires_grad=False)
                    params["lm_head.weight"] = model.lm_head.weight
                    expected.add(name)
                    tied = False
                if name not in params:
                    raise CheckpointError(f"unexpected tensor {name!r} in {file.name}: not part of a "
                                          f"{cfg.model_type} model with this config.json")
                if cfg.bigcode_interleaved_qkv and name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                    t = _bigcode_qkv_to_fused(t, cfg)
                dst = params[name]
                if tuple(t.shape) != tuple(dst.shape):
                    raise CheckpointError(f"tensor {name!r} in {file.name} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(dst.shape)} from config.json")
                with torch.no_grad():
                    dst.copy_(t)
                seen.add(name)
                advance(t.numel() * t.element_size())
                del t
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {', '.join(missing[:5])}{more}")


def build_empty(cfg: CodeShellConfig, dtype: torch.dtype, device: str | torch.device = "cpu", *,
                swap: Iterable[str] = (),
                make: Callable[[str, torch.nn.Linear], torch.nn.Module] | None = None) -> torch.nn.Module:
    """A CodeShellForCausalLM with uninitialised storage of `dtype` on `device` (no init cost).
    The linears named in `swap` are replaced by `make(name, linear)` while still on meta (the
    quantized formats' linears); a swapped `lm_head` is not tied to the embedding."""
    from .model import CodeShellForCausalLM
    swap = list(swap)
    with torch.device("meta"):
        model = CodeShellForCausalLM(cfg)
        model = model.to(dtype)  # free on meta; real storage is made once, in the target dtype
        for name in swap:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, make(name, getattr(parent, attr)))
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings and "lm_head" not in swap:  # to_empty breaks the tie's identity: restore it
        model.lm_head.weight = model.transformer.wte.weight
    model.requires_grad_(False)
    return model.eval()


def load_model(model: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, CodeShellConfig, Path]:
    """Load a checkpoint into a CodeShellForCausalLM. Returns (model, config, resolved folder)."""
    path = resolve_model_path(model)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder with config.json")
    cfg = load_config(path)
    dt = resolve_dtype(dtype, default=torch.float32)
    m = build_empty(cfg, dt, device)
    load_state_into(m, path, cfg)
    return m, cfg, path


__all__ = ["CheckpointError", "ConfigError", "load_model", "resolve_model_path", "resolve_dtype",
           "weight_files", "iter_tensors", "build_empty"]
