"""`codeshell train merge`: fold a peft LoRA adapter into its base checkpoint and write a full
checkpoint folder (safetensors + config.json + tokenizer), atomically. The merge runs in
float32 whatever the base's dtype; the output dtype is a choice. It does not train.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import TrainError


def merge_adapter(base: str, adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    from codeshell.weights import CheckpointError, load_config, resolve_dtype, resolve_model_path

    from . import checkpoint as ckpt
    from .build import load_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise TrainError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"output folder {out} exists and is not empty")
    try:
        out_dtype = resolve_dtype(dtype)
        path = resolve_model_path(base)
        cfg = load_config(path)
        model = load_model(path, cfg, torch.float32)
    except (CheckpointError, ValueError) as e:
        raise TrainError(str(e)) from None
    try:
        from peft import PeftModel
    except ImportError:
        raise TrainError("merge needs peft: pip install 'codeshell[train]'") from None
    try:
        ad = json.loads((adapter / "adapter_config.json").read_text())
        pm = PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:  # peft raises many types for a mismatched adapter
        raise TrainError(f"cannot apply adapter {adapter} to {base}: {e}") from None
    if ad.get("peft_type") != "LORA":
        raise TrainError(f"{adapter} holds a {ad.get('peft_type')} adapter, not LoRA")
    merged = pm.merge_and_unload()
    sd = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in merged.state_dict().items()}
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = path if (path / "tokenizer.json").is_file() else adapter if (adapter / "tokenizer.json").is_file() else None
    ckpt.write_model(tmp, sd, cfg, tok)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out
