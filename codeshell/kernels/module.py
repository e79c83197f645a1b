"""`PackedLinear`: an inference-only drop-in for `nn.Linear` over a `PackedWeight`;
`PackedEmbedding`, the token embedding read from the same panels when the output head is
tied to it; and `prepare_model`, which swaps a loaded model's linears for them where that is
faster.

This is the one place that decides, per device and dtype, which matmul a linear runs:
CPU bfloat16 weights go to the native kernels (re-laid out into panels, one layer at a time,
so the model's size does not double; a tied embedding shares the head's panels); float32
models keep torch's sgemm (packing them to bf16 would change their numbers); CUDA keeps
cuBLAS. Quantized formats (int8/int4) build `PackedLinear`s directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import linear
from .packing import PackedWeight, bf16_rows, prepack


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W packed (bf16, int8 or int4); no autograd."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.kind, self.in_features, self.out_features = packed.kind, packed.in_features, packed.out_features
        self.group_size = packed.group_size
        self.register_buffer("data", packed.data, persistent=False)
        self.register_buffer("scales", packed.scales, persistent=False)
        self.register_buffer("offsets", packed.offsets, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.kind, self.out_features, self.in_features, self.data, self.scales,
                            self.offsets, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class PackedEmbedding(nn.Module):
    """Token embedding looked up from a bf16 `PackedWeight` (the tied output head's panels),
    so a tied model keeps one copy of the vocabulary matrix. Inference only."""

    def __init__(self, packed: PackedWeight):
        super().__init__()
        if packed.kind != "bf16":
            raise ValueError(f"PackedEmbedding takes a bf16 PackedWeight, got {packed.kind}")
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        self.register_buffer("data", packed.data, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = PackedWeight("bf16", self.num_embeddings, self.embedding_dim, self.data)
        return bf16_rows(p, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16 panels shared with the output head"


def prepare_model(model: nn.Module) -> int:
    """Swap the bf16 CPU linears of a loaded (inference) model for `PackedLinear`s.

    Returns how many were swapped (0 when the native kernels are unavailable, the model is
    not bf16, or it is not on the CPU).
    """
    from .ops import available
    p = model.transformer.wte.weight
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or not available():
        return 0
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, nn.Linear) and head.weight is p
    del p
    # (parent, name) only: holding the old modules here would keep every old weight alive
    # until the end, doubling peak memory (the 7B model would need 30 GiB).
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16]
    del head
    for parent, name in swaps:  # one at a time: the old weight is freed before the next copy
        child = getattr(parent, name)
        is_head = tied and parent is model and name == "lm_head"
        packed = PackedLinear(prepack(child.weight), child.bias)
        del child
        setattr(parent, name, packed)
        if is_head:
            model.transformer.wte = PackedEmbedding(packed.packed)
    return len(swaps)
