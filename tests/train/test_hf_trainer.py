"""The documented Hugging Face Trainer route (docs/train.md): AutoModelForCausalLM with
gradient checkpointing, `codeshell.train.hf.SFTDataset` for the labels, a couple of steps, and
the saved folder loads through LLM."""

from __future__ import annotations

import json
import math

import torch


def test_trainer_route_from_the_docs(tiny_ckpt, tokenizer_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                       {"role": "assistant", "content": f"{i}"}]}) for i in range(8)))
    # --- as in docs/train.md ---
    import codeshell  # noqa: F401  (registers model_type codeshell / kclgpt with transformers)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from codeshell.train.hf import SFTDataset

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    model.activation_checkpointing_enable()  # gradient_checkpointing_enable() before transformers 5
    ds = SFTDataset(data, tokenizer_dir, seq_len=64)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, lr_scheduler_type="cosine",
                             warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=ds.collate)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    # ---
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(x) and x > 0 for x in logged)
    assert model.transformer.gradient_checkpointing
    from codeshell import LLM, SamplingParams

    llm = LLM(str(tmp_path / "final"), dtype="float32", tokenizer=str(tokenizer_dir))
    assert llm.generate(["Say 3."], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids
