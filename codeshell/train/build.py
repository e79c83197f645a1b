"""Models for training: a new model of a preset or config.json (GPT-2-style initialisation)
or a loaded checkpoint, optionally with peft LoRA adapters, wrapped in the module the loop
calls (`LMLoss`), then in DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`).

The model is `codeshell.model.CodeShellForCausalLM`, the same modules the runtime and the
transformers wrapper use, so a checkpoint's parameter names are the released ones. This
module does not read data or write checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from codeshell.config import CodeShellConfig

from .config import TrainError
from .loss import linear_cross_entropy


def init_weights(model: nn.Module, cfg: CodeShellConfig, seed: int) -> None:
    """N(0, 0.02) weights, zero biases, unit LayerNorms; the residual output projections
    (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 n_layer) as GPT-2 does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def new_model(cfg: CodeShellConfig, seed: int) -> nn.Module:
    from codeshell.weights import build_empty

    model = build_empty(cfg, torch.float32)
    init_weights(model, cfg, seed)
    return model


def load_model(path: Path, cfg: CodeShellConfig, dtype: torch.dtype) -> nn.Module:
    from codeshell.weights import build_empty, load_state_into

    model = build_empty(cfg, dtype)
    load_state_into(model, path, cfg)
    return model


def check_lora_targets(cfg: CodeShellConfig, targets: list[str]) -> None:
    """Each target must name (the last part of) at least one Linear of the model."""
    from codeshell.model import CodeShellForCausalLM

    with torch.device("meta"):
        m = CodeShellForCausalLM(cfg)
    linear = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    names = {n for n, _ in m.named_modules()}
    for t in targets:
        if t not in linear and not any(n == t or n.endswith("." + t) for n in names):
            raise TrainError(f"LoRA target {t!r} matches no module of the model; linear layers are: "
                             + ", ".join(sorted(linear)))


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str], base: str | None):
    """peft LoRA on `targets`; only the adapter parameters stay trainable."""
    try:
        import peft
    except ImportError:
        raise TrainError("lora needs peft: pip install 'codeshell[train]'") from None
    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    model.name_or_path = base  # peft records it in adapter_config.json (base_model_name_or_path)
    pm = peft.get_peft_model(model, lcfg)
    for n, p in pm.named_parameters():  # adapters train in float32 whatever the base dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return pm


class LMLoss(nn.Module):
    """forward(batch tensors, scale) -> (scale x sum of next-token losses, number of targets).

    The loop calls this module (not the model) so that DDP and FSDP2 see the whole step,
    head and loss included, inside one forward."""

    def __init__(self, model: nn.Module, core: nn.Module):
        super().__init__()
        self.model = model  # the trained module: CodeShellForCausalLM or a peft model around it
        object.__setattr__(self, "core", core)  # the CodeShellForCausalLM inside (not registered twice)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, scale: float = 1.0):
        core = self.core
        h = core.transformer(input_ids, position_ids, mask, seq_len=input_ids.shape[1])  # [b, T, d]
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), core.lm_head.weight, targets.reshape(-1),
                                    scale=scale)


def distribute(module: LMLoss, kind: str, world: int, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with each block sharded and the rest at the root; plain for one process."""
    if world == 1:
        return module
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in module.core.transformer.h:
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def merged_state(peft_model) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Fold the adapters into the base weights (peft's merge) -> (plain model, state dict)."""
    model = peft_model.merge_and_unload()
    return model, {k: v for k, v in model.state_dict().items()}
