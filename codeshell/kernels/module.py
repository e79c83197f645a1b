"""`PackedLinear`: an inference-only drop-in for `nn.Linear` over a `PackedWeight`, and
`prepare_model`, which swaps a loaded model's linears for it where that is faster.

This is the one place that decides, per device and dtype, which matmul a linear runs:
CPU bfloat16 weights go to the native kernels (the bf16 tensor is shared, not copied);
float32 models keep torch's sgemm (packing them to bf16 would change their numbers); CUDA
keeps cuBLAS. Quantized formats (int8/int4) build `PackedLinear`s directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import linear
from .packing import PackedWeight, prepack


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


def prepare_model(model: nn.Module) -> int:
    """Swap the bf16 CPU linears of a loaded (inference) model for `PackedLinear`s.

    Returns how many were swapped (0 when the native kernels are unavailable, the model is
    not bf16, or it is not on the CPU).
    """
    from .ops import available
    p = model.transformer.wte.weight
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or not available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(prepack(child.weight), child.bias))
    return len(swaps)
