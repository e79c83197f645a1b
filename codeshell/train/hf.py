"""The Hugging Face Trainer route (for an existing DeepSpeed or accelerate setup): the same
SFT examples as `codeshell train sft` (official chat format, loss on the assistant turns) as a
torch Dataset of `input_ids` / `labels`, and a collator that pads each batch to its longest
row. The model is `AutoModelForCausalLM` (registered by `import codeshell`), which takes
`labels`, gradient checkpointing and peft. This module does not run a training loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import IGNORE, Tokenized, read_rows


class SFTDataset(torch.utils.data.Dataset):
    """JSONL rows (messages, prompt/completion, text) -> {"input_ids", "labels"} (-100 = no loss)."""

    def __init__(self, path: str | Path, tokenizer_dir: str | Path, seq_len: int = 2048, fim_rate: float = 0.0,
                 seed: int = 0):
        tok = Tokenized(tokenizer_dir, fim_rate, 0.5, seed)
        self.pad_id = tok.eot
        self.rows = []
        for e in tok.examples(read_rows(path)):
            ids = torch.from_numpy(e.ids[:seq_len])
            lab = torch.where(torch.from_numpy(e.labels[:seq_len]), ids, torch.full_like(ids, IGNORE))
            self.rows.append({"input_ids": ids, "labels": lab})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def collate(self, batch: list[dict]) -> dict:
        """Right-pad to the longest row of the batch; padding is masked out and not learned."""
        T = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
