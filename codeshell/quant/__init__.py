"""Weight-only quantization and quantized file formats for CodeShell models.

- `scheme`: the ``quantization`` entry of config.json (int8 per channel, int4 group-wise);
- `linear`: the quantized linears, their reference math and the fast CPU kernels;
- `load`: building and filling quantized models from float, quantized or NF4 checkpoints;
- `convert`: `codeshell quantize`, streaming a checkpoint into a quantized folder;
- `nf4`: bitsandbytes NF4 checkpoints (the released int4 model's and transformers' layouts);
- `gguf_io`: GGUF export and import (llama.cpp's CodeShell conventions);
- `gguf_reader`: a fast reader of GGUF headers and tensor tables.

Heavy modules (torch, gguf) are imported by the submodules, not here.
"""

from .scheme import QuantError, QuantScheme

__all__ = ["QuantError", "QuantScheme"]
