"""Training and fine-tuning of CodeShell-family models (pretrain, full fine-tune, LoRA).

One training loop shared by the three modes, on torch.distributed (DDP / FSDP2 under torchrun).
It reads packed shards through `codeshell.data.loader` and never imports `codeshell.serve`.

Modules: `config` (TrainConfig: flags = YAML keys, size presets), `data` (shards and JSONL
examples -> batches), `loss` (fused output head + cross-entropy), `build` (models, LoRA,
DDP/FSDP2), `loop` (prepare + Trainer), `checkpoint` (atomic checkpoints), `metrics`
(progress, metrics.jsonl, MFU), `merge`, `plot`, `hf` (the Hugging Face Trainer route),
`cli` (`codeshell train`).
"""
