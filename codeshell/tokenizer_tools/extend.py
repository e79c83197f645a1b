"""Extend a byte-level BPE tokenizer the way CodeShell built its own from StarCoder's: prune the
base vocabulary's low-frequency tokens, then add merges learned on a new corpus (for example
Chinese text), editing `vocab` and `merges` of tokenizer.json consistently.

`tokenizers` cannot continue training from an existing vocabulary, so the merge learning is
written here (a standard incremental BPE trainer: pair counts kept up to date per merge, a
lazy max-heap picks the next pair). Guarantees, all tested:
- every kept token stays reachable: each non-byte token is the result of a kept merge whose
  two parts are kept (pruning closes over the parts of every merge of a kept token);
- text whose base encoding uses only kept tokens, and in which no new merge applies, encodes
  to the same token strings (base merges keep their relative order, new merges rank after
  them, and a new merge never produces a string the base vocabulary already has);
- ids are compact: kept base tokens in base order, then byte tokens the base lacked (the
  released CodeShell tokenizer lacks 42 control bytes; the extended one has all 256), then
  the new tokens, then the special tokens under their own names.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from codeshell.tokenizer_tools.train import bytes_to_unicode


def _split_merge(m) -> tuple[str, str]:
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


def load_tokenizer_json(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {p} not found")
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{p}: not a BPE tokenizer")
    return data


def token_counts(tok, texts: Iterable[str]) -> Counter:
    """How often each token id occurs when `tok` encodes `texts`."""
    c: Counter = Counter()
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == 256:
            for e in tok.encode_batch(batch, add_special_tokens=False):
                c.update(e.ids)
            batch = []
    if batch:
        for e in tok.encode_batch(batch, add_special_tokens=False):
            c.update(e.ids)
    return c


def prune(vocab: dict[str, int], merges: list[tuple[str, str]], counts: Counter, min_count: int,
          protect: set[str]) -> tuple[list[str], list[tuple[str, str]], dict]:
    """Drop tokens seen fewer than `min_count` times (bytes and `protect` excepted), keep the
    parts of every merge of a kept token, drop merges of dropped tokens and unreachable tokens."""
    by_result: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, b in merges:
        by_result[a + b].append((a, b))
    keep = {t for t, i in vocab.items() if counts.get(i, 0) >= min_count} | (protect & set(vocab))
    stack = list(keep)
    while stack:  # closure: parts of any merge producing a kept token are kept
        t = stack.pop()
        for pair in by_result.get(t, ()):
            for x in pair:
                if x not in keep and x in vocab:
                    keep.add(x)
                    stack.append(x)
    reach = set(protect)
    changed = True
    while changed:  # reachable = built from bytes by kept merges (one pass usually suffices)
        changed = False
        for a, b in merges:
            r = a + b
            if r in keep and r not in reach and a in reach and b in reach:
                reach.add(r)
                changed = True
    kept = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t in keep and t in reach]
    kept_set = set(kept)
    new_merges, seen = [], set()
    for a, b in merges:
        if a + b in kept_set and a in kept_set and b in kept_set and (a, b) not in seen:
            new_merges.append((a, b))
            seen.add((a, b))
    info = {"base_tokens": len(vocab), "pruned_low_frequency": len(vocab) - len(keep),
            "pruned_unreachable": len(keep) - len(kept_set), "kept": len(kept),
            "merges_before": len(merges), "merges_after": len(new_merges)}
    return kept, new_merges, info


def learn_merges(words: Counter, segment, vocab: set[str], n: int, min_count: int = 2,
                 progress=None) -> list[tuple[str, str]]:
    """Learn up to `n` merges over `words` (byte-level pre-tokens with counts), starting from
    their current segmentation `segment(word) -> list[str]`. Pairs whose result is already in
    `vocab` are skipped (see the module docstring)."""
    seqs = [segment(w) for w in words]
    freqs = [words[w] for w in words]
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (s, f) in enumerate(zip(seqs, freqs)):
        for p in zip(s, s[1:]):
            pair_count[p] += f
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    out: list[tuple[str, str]] = []
    vocab = set(vocab)
    while heap and len(out) < n:
        negc, p = heapq.heappop(heap)
        c = pair_count.get(p, 0)
        if c != -negc:  # stale entry: push the current count back if still positive
            if c > 0:
                heapq.heappush(heap, (-c, p))
            continue
        if c < min_count:
            break
        new = p[0] + p[1]
        if new in vocab:
            pair_count[p] = 0  # never produce an existing string (would re-route old encodings)
            continue
        out.append(p)
        vocab.add(new)
        if progress:
            progress()
        touched: Counter = Counter()
        for i in list(where.get(p, ())):
            s, f = seqs[i], freqs[i]
            for q in zip(s, s[1:]):
                touched[q] -= f
            merged, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == p[0] and s[j + 1] == p[1]:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(s[j])
                    j += 1
            seqs[i] = merged
            for q in zip(merged, merged[1:]):
                touched[q] += f
                where[q].add(i)
        for q, d in touched.items():
            if d:
                pair_count[q] += d
                if pair_count[q] > 0:
                    heapq.heappush(heap, (-pair_count[q], q))
        pair_count[p] = 0
        where.pop(p, None)
    return out


def extend_tokenizer(base: str | Path, corpus: Iterable[str], add: int, prune_below: int = 0,
                     prune_corpus: Iterable[str] | None = None, min_pair_count: int = 2,
                     progress=None) -> tuple[str, dict]:
    """Return (tokenizer.json text of the extended tokenizer, summary)."""
    from tokenizers import Tokenizer, models

    data = load_tokenizer_json(base)
    base_tok = Tokenizer.from_str(json.dumps(data))
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [_split_merge(m) for m in data["model"]["merges"]]
    specials = [t for t in data.get("added_tokens", []) if t.get("special")]
    bytes_ = set(bytes_to_unicode().values())
    corpus = list(corpus)
    if prune_below > 0:
        counts = token_counts(base_tok, prune_corpus if prune_corpus is not None else corpus)
        kept, merges, info = prune(vocab, merges, counts, prune_below, bytes_)
    else:
        kept, merges, info = prune(vocab, merges, Counter({i: 1 for i in vocab.values()}), 1, bytes_)
    missing_bytes = sorted(bytes_ - set(kept))
    kept += missing_bytes
    info["added_byte_tokens"] = len(missing_bytes)
    # segment the new corpus with the pruned model (its merges in base order), then learn
    pruned_model = models.BPE({t: i for i, t in enumerate(kept)}, merges)
    pre = base_tok.pre_tokenizer
    words: Counter = Counter()
    for text in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    new_merges = learn_merges(words, lambda w: [t.value for t in pruned_model.tokenize(w)], set(kept), add,
                              min_pair_count, progress)
    final = kept + [a + b for a, b in new_merges]
    info.update(added_tokens=len(new_merges), vocab_size=len(final) + len(specials))
    new_vocab = {t: i for i, t in enumerate(final)}
    out = dict(data)
    out["model"] = dict(data["model"], vocab=new_vocab,
                        merges=[[a, b] for a, b in merges + new_merges]
                        if data["model"]["merges"] and not isinstance(data["model"]["merges"][0], str)
                        else [f"{a} {b}" for a, b in merges + new_merges])
    out["added_tokens"] = [dict(t, id=len(final) + k) for k, t in enumerate(specials)]
    text = json.dumps(out, ensure_ascii=False)
    Tokenizer.from_str(text)  # raises if vocab and merges disagree
    return text, info
