"""`package_checkpoint`: a float32 training checkpoint written as the bf16 folder the package
ships (weights, config, tokenizer), without needing the shipped weights themselves."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from codeshell.config import CodeShellConfig
from codeshell.mini.package import package_checkpoint
from codeshell.testing import make_tiny_checkpoint

CFG = CodeShellConfig(vocab_size=70144, n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=128,
                      n_positions=256)


def test_bf16_copy_with_its_tokenizer_and_a_stopping_eos(tmp_path, tokenizer_dir):
    src = make_tiny_checkpoint(tmp_path / "src", tokenizer_dir, cfg=CFG)
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = cfg["bos_token_id"] = 10**6  # outside the vocabulary: would never stop
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pkg"
    info = package_checkpoint(src, out)

    got, want = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert got.keys() == want.keys() and all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    new = json.loads((out / "config.json").read_text())
    assert new["torch_dtype"] == "bfloat16" and new["n_layer"] == 2
    assert new["eos_token_id"] == new["bos_token_id"] == 70000  # the tokenizer's <|endoftext|>
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert info["parameters"] == sum(v.numel() for v in want.values())
    assert info["bytes"] == sum(f.stat().st_size for f in out.iterdir())
    for f in out.iterdir():  # readable by every user of a system-wide install; no scratch left
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert names <= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"}, names

    from codeshell import LLM, SamplingParams
    o = LLM(str(out), kernels=False).generate("def f(x):", SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(o.outputs[0].token_ids) >= 1


def test_refuses_a_folder_without_a_tokenizer(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", None, cfg=CFG)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        package_checkpoint(src, tmp_path / "pkg")
    assert not (tmp_path / "pkg" / "model.safetensors").exists()  # nothing half-written in place
