"""transformers features fine-tuning builds on: labels -> loss, gradient checkpointing, peft LoRA."""

from __future__ import annotations

import pytest
import torch

from codeshell.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_labels_give_the_causal_lm_loss(ckpt):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 16))
    out = m(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)


def test_gradient_checkpointing_same_gradients(ckpt):
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 1000, (2, 16))
    grads = []
    for gc in (False, True):
        m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        m.train()
        if gc:
            m.gradient_checkpointing_enable()
            assert m.transformer.gradient_checkpointing
        m(ids, labels=ids).loss.backward()
        grads.append(m.transformer.h[0].attn.c_attn.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_peft_lora_trains_and_merges(ckpt):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    lm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                 task_type="CAUSAL_LM"))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 1000, (2, 16))
    first = None
    for _ in range(15):
        loss = lm(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    merged = lm.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, lm(input_ids=ids).logits, atol=1e-4)
