"""Tokenizer tools: train a CodeShell-style byte-level BPE tokenizer, extend an existing one
(prune low-frequency tokens, add merges learned on a new corpus), and compare tokenizers'
compression by category. Runtime tokenization is `codeshell.tokenizer`, not this package."""
