"""Training and fine-tuning of CodeShell-family models (pretrain, full fine-tune, LoRA).

One training loop shared by the three modes, on torch.distributed (DDP / FSDP2 under torchrun).
It reads packed shards through `codeshell.data.loader` and never imports `codeshell.serve`.
"""
