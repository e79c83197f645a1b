"""How close and how fast codeshell's NF4 is next to bitsandbytes, on files bitsandbytes writes.

Closeness: for each fixture (the transformers layout, nested and plain statistics, made with
`BitsAndBytesConfig(load_in_4bit, nf4)` + `save_pretrained`; and the CodeShell-7B-Chat-int4
layout made with `write_nf4_checkpoint`), the max |difference in log-probability| over every
position and token of a [2, 17] batch between `LLM(path, dtype="float32")` and bitsandbytes'
`Linear4bit` forward on the same file, on bitsandbytes' exact path (dequantize, then F.linear)
and, on CPUs with AVX512-BF16, on its packed bfloat16 path too; then the same for the opt-in
re-quantizations (`quantization="int8"`, `"int4-g64-zp"`) and for bfloat16 activations. Two
models: the tests' tiny one (64 wide, weights N(0, 0.2)) and a wider one with 7B-like weight
scale (512 wide, N(0, 0.02)).

Speed: one 7B-shaped linear (c_fc, 16384 x 4096) at M = 1 and M = 16: `NF4Linear` (fp32 and
bf16 activations), bitsandbytes' `Linear4bit` (both paths) and the int8 kernel module.

    python benchmarks/bench_nf4.py               # closeness on both models, then the speed table
    python benchmarks/bench_nf4.py --no-speed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _hf_quantize(src: Path, out: Path, nested: bool) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                           bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=q, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(out)
    return out


def _bnb_model(path: Path, exact: bool, layout: str):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoConfig, AutoModelForCausalLM
    from codeshell.quant.load import BLOCK_LINEARS
    if layout == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    else:
        sd = torch.load(path / "pytorch_model.bin", weights_only=True)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        model.load_state_dict({k: v.float() for k, v in sd.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")},
                              strict=False)
        for i in range(model.config.n_layer):
            for n in BLOCK_LINEARS:
                prefix = f"transformer.h.{i}.{n}"
                parent_name, _, attr = prefix.rpartition(".")
                parent, s = model.get_submodule(parent_name), sd[prefix + ".weight.quant_state"]
                lin = getattr(parent, attr)
                st2 = None if s[4] is None else bnbf.QuantState(absmax=s[4][1][0], code=s[4][1][1],
                                                                 blocksize=s[4][1][2], dtype=s[4][1][4])
                qs = bnbf.QuantState(absmax=s[0], shape=s[1], code=s[6], blocksize=s[3], quant_type=s[5], dtype=s[2],
                                     offset=None if s[4] is None else s[4][0], state2=st2)
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                                        compress_statistics=s[4] is not None, quant_type="nf4", device="cpu")
                new.weight = bnb.nn.Params4bit(sd[prefix + ".weight.data"], requires_grad=False, quant_state=qs,
                                               blocksize=s[3], compress_statistics=s[4] is not None,
                                               quant_type="nf4", bnb_quantized=True, module=new)
                new.bias = lin.bias
                setattr(parent, attr, new)
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16) and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.float()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and exact:
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def closeness(width: int, std: float, work: Path) -> None:
    import bitsandbytes.functional as bnbf
    from codeshell import LLM
    from codeshell.config import CodeShellConfig
    from codeshell.quant.nf4 import write_nf4_checkpoint
    from codeshell.testing import make_tiny_checkpoint, random_state_dict
    cfg = CodeShellConfig(vocab_size=512, n_embd=width, n_layer=2, n_head=4, num_query_groups=2,
                          n_inner=4 * width, n_positions=256)
    tag = f"{width}w-std{std}"
    src = make_tiny_checkpoint(work / f"src-{tag}", cfg=cfg, seed=3)
    sd = random_state_dict(cfg, seed=3, std=std)
    from safetensors.torch import save_file
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    files = {
        "transformers nested": ("transformers", _hf_quantize(src, work / f"hf-n-{tag}", True)),
        "transformers plain": ("transformers", _hf_quantize(src, work / f"hf-p-{tag}", False)),
        "0.41 list nested": ("list", write_nf4_checkpoint(sd, cfg, work / f"l-n-{tag}", nested=True)),
        "0.41 list plain": ("list", write_nf4_checkpoint(sd, cfg, work / f"l-p-{tag}", nested=False)),
    }
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    print(f"\n## {cfg.n_embd} wide, weights N(0, {std}): max |d log-prob| against bitsandbytes (Linear4bit)")
    print("| file | ours fp32 vs bnb exact | vs bnb avx512-bf16 path | ours bf16 acts vs bnb exact "
          "| int8 re-quant vs bnb exact | int4-g64-zp vs bnb exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, (layout, path) in files.items():
        with torch.no_grad():
            ref = _bnb_model(path, True, layout)(ids).logits.float().log_softmax(-1)
            packed = (_bnb_model(path, False, layout)(ids).logits.float().log_softmax(-1)
                      if bnbf.has_avx512bf16() else None)
            row = [label]
            for kw in ({"dtype": "float32"}, {"dtype": "bfloat16"}, {"dtype": "float32", "quantization": "int8"},
                       {"dtype": "float32", "quantization": "int4-g64-zp"}):
                lp = LLM(path, **kw).model(ids).float().log_softmax(-1)
                row.append(f"{(lp - ref).abs().max().item():.3g}")
                if len(row) == 2:
                    row.append("n/a (no AVX512-BF16)" if packed is None else f"{(lp - packed).abs().max().item():.3g}")
        print("| " + " | ".join(row) + " |")


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def speed() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from codeshell.quant.linear import Int8Linear
    from codeshell.quant.nf4 import NF4Linear, decode_nested_absmax
    N, K = 16384, 4096
    w = torch.randn(N, K) * 0.02
    data, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Linear(K, N, bias=False)
    ours.set_nf4(data, decode_nested_absmax(qs.absmax, qs.state2.absmax, qs.state2.code, 256, qs.offset), qs.code, 64)
    int8 = Int8Linear.from_float(ours.dequantize(torch.float32), None)

    def bnb_lin(exact: bool):
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
        d, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(d, requires_grad=False, quant_state=s, blocksize=64, quant_type="nf4",
                                       bnb_quantized=True, module=lin)
        lin.support_avx512bf16_for_cpu = lin.support_avx512bf16_for_cpu and not exact
        return lin.eval()

    exact, packed = bnb_lin(True), bnb_lin(False)
    print(f"\n## one c_fc-shaped linear ({N} x {K}), ms per call, {torch.get_num_threads()} threads")
    print("| M | NF4Linear fp32 | NF4Linear bf16 | bnb exact (fp32) | bnb avx512-bf16 path | int8 re-quant (bf16) |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for m in (1, 16):
            x = torch.randn(m, K)
            xb = x.bfloat16()
            row = [_time(lambda: ours(x), 3), _time(lambda: ours(xb), 3), _time(lambda: exact(x), 3),
                   _time(lambda: packed(x), 3) if bnbf.has_avx512bf16() else float("nan"), _time(lambda: int8(xb), 5)]
            print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-closeness", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if not args.no_closeness:
            closeness(64, 0.2, Path(d))
            closeness(512, 0.02, Path(d))
    if not args.no_speed:
        speed()


if __name__ == "__main__":
    main()
