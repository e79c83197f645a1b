"""Config reading and checkpoint loading: every layout, and a clear error for each bad input."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from codeshell import LLM
from codeshell.config import CodeShellConfig, ConfigError
from codeshell.testing import make_tiny_checkpoint, random_state_dict
from codeshell.weights import CheckpointError, load_model, resolve_model_path
from tests.conftest import GOLDEN_CASES, require_shared


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_reads_every_golden_config(case):
    raw = json.loads((require_shared(f"golden/{case}") / "config.json").read_text())
    cfg = CodeShellConfig.from_dict(raw)
    assert cfg.model_type == "kclgpt"
    if not raw["group_query_attention"]:
        assert cfg.num_query_groups == cfg.n_head
    if raw["n_inner"] is None:
        assert cfg.ffn_dim == 4 * cfg.n_embd
    if raw["rope_scaling"]:
        assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == ("linear", 2.0)


BASE = dict(model_type="codeshell", n_embd=64, n_layer=1, n_head=4, vocab_size=100,
            group_query_attention=True, num_query_groups=2)


@pytest.mark.parametrize("change, message", [
    (dict(model_type=None), "missing `model_type`"),
    (dict(model_type="llama"), "invalid `model_type`: unknown 'llama'"),
    (dict(n_head=5), "invalid `n_head`: 5 heads do not divide n_embd=64"),
    (dict(num_query_groups=3), "invalid `num_query_groups`: 3 KV groups do not divide n_head=4"),
    (dict(activation_function="swish2"), "invalid `activation_function`: unknown activation 'swish2'"),
    (dict(position_embedding_type="alibi"), "invalid `position_embedding_type`"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "invalid `rope_scaling`: unknown type 'yarn'"),
    (dict(n_layer=0), "invalid `n_layer`: must be a positive integer"),
])
def test_bad_config_names_the_field(change, message):
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CodeShellConfig.from_dict(raw)


def test_config_without_model_type_in_folder(tmp_path):
    make_tiny_checkpoint(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="missing `model_type`"):
        LLM(str(tmp_path))


def test_missing_folder_is_clear():
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path("./no/such/folder")


def test_hub_id_offline_not_cached_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*--model PATH"):
        resolve_model_path("WisdomShell/CodeShell-7B-Chat")


def test_hub_id_from_cache(monkeypatch, tmp_path):
    """An id already in HF_HOME's cache loads offline."""
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = make_tiny_checkpoint(tmp_path / "src")
    snap = tmp_path / "hub" / "models--me--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (tmp_path / "hub" / "models--me--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub._snapshot_download as sd
    monkeypatch.setattr(sd.constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    p = resolve_model_path("me/tiny")
    assert (p / "config.json").exists()


def test_folder_without_weights(tmp_path):
    make_tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_tiny_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read model.safetensors: truncated \(\d+ bytes, the header needs"):
        load_model(tmp_path)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors: truncated"):
        load_model(tmp_path)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:200])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors: corrupt header"):
        load_model(tmp_path)


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path):
    cfg = make_tiny_checkpoint(tmp_path) and CodeShellConfig.from_json(tmp_path / "config.json")
    sd = random_state_dict(cfg)
    bad = dict(sd)
    bad["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.mlp.c_fc.weight'.*shape \(3, 3\), expected \(256, 64\)"):
        load_model(tmp_path)
    bad = dict(sd)
    del bad["transformer.h.0.attn.c_proj.bias"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*transformer.h.0.attn.c_proj.bias"):
        load_model(tmp_path)
    bad = dict(sd)
    bad["transformer.h.7.attn.c_attn.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.7.attn.c_attn.weight'"):
        load_model(tmp_path)


def test_ignored_buffers_and_untied_head(tmp_path):
    cfg = make_tiny_checkpoint(tmp_path) and CodeShellConfig.from_json(tmp_path / "config.json")
    sd = random_state_dict(cfg)
    sd["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["transformer.h.0.attn.bias"] = torch.ones(4, 4)
    sd["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.n_embd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model, _, _ = load_model(tmp_path)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


def test_bin_loading_never_runs_pickled_code(tmp_path):
    make_tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_sharded_bin_golden_loads_as_bin():
    d = require_shared("golden/rope-mha")
    assert (d / "pytorch_model.bin.index.json").exists()
    model, cfg, _ = load_model(d)
    assert cfg.num_query_groups == cfg.n_head == 3


def test_learned_absolute_matches_transformers_gpt_bigcode(tmp_path):
    """learned positions + one KV group is GPTBigCode: load a gpt_bigcode checkpoint and compare."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
    for mq in (True, False):
        hc = GPTBigCodeConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, multi_query=mq,
                              activation_function="gelu_pytorch_tanh")
        torch.manual_seed(0)
        ref = GPTBigCodeForCausalLM(hc).eval()
        d = tmp_path / f"bigcode-{mq}"
        ref.save_pretrained(d)
        model, cfg, _ = load_model(d)
        assert cfg.position_embedding_type == "learned_absolute"
        ids = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            assert (model(ids) - ref(ids).logits).abs().max() < 1e-4
        llm = LLM(str(d), dtype="float32")
        from codeshell import SamplingParams
        out = llm.generate([{"prompt_token_ids": ids[0].tolist()}], SamplingParams(temperature=0, max_tokens=8,
                                                                                   ignore_eos=True))[0]
        with torch.no_grad():
            g = ref.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out.outputs[0].token_ids == g[0, 20:].tolist()


def test_learned_absolute_codeshell_config(tmp_path):
    cfg = CodeShellConfig(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=4, num_query_groups=2,
                          n_inner=64, position_embedding_type="learned_absolute", model_type="codeshell")
    make_tiny_checkpoint(tmp_path, cfg=cfg)
    model, _, _ = load_model(tmp_path)
    assert model.transformer.wpe.weight.shape == (32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 100, (1, 10)))).all()
    with pytest.raises(ValueError, match="past n_positions=32"):
        model(torch.randint(0, 100, (1, 40)))
