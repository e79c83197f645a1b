"""An interpolated modified Kneser-Ney n-gram trainer that writes ARPA, and an ARPA scorer.

Why our own trainer and not KenLM's `lmplz`: `lmplz` needs Boost and a CMake build (minutes
and a system package on every machine); the `kenlm` PyPI package only *queries* models. A
corpus-sized code LM (a few MB to a few hundred MB of tokens) trains fine in Python, and the
ARPA it writes loads in `kenlm.Model` (which the perplexity stage uses when installed) as well
as in the small scorer here. The estimates follow Chen & Goodman's modified Kneser-Ney with
KenLM's conventions: adjusted (continuation) counts for lower orders except n-grams starting
with <s>, three discounts per order from counts-of-counts, interpolation with the uniform
distribution at the unigram level, <unk> given the leftover unigram mass, and <s> never
predicted (-99). It is not a pruned or quantized model builder.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


def tokenize_line(line: str) -> list[str]:
    """Words, numbers and single symbols: the LM's unit for code and prose alike."""
    return TOKEN.findall(line)


def sentences(text: str, max_chars: int | None = None) -> Iterator[list[str]]:
    """One sentence per non-blank line."""
    if max_chars is not None:
        text = text[:max_chars]
    for line in text.splitlines():
        toks = tokenize_line(line)
        if toks:
            yield toks


def _discounts(counts: Counter, order: int) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ from counts-of-counts (clamped when sparse)."""
    t = Counter()
    for c in counts.values():
        if c <= 4:
            t[c] += 1
    t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return 0.5, 1.0, 1.5  # too little data for the estimate: conventional fallbacks
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    return tuple(min(max(x, 0.05), k + 1.0 - 0.05) for k, x in enumerate(d))  # type: ignore[return-value]


def train_arpa(corpus: Iterable[list[str]], order: int, out: str | Path) -> dict:
    """Count n-grams of `corpus` (an iterable of token lists), estimate, write ARPA.

    Returns a summary: n-gram counts per order and the discounts used.
    """
    if order < 2:
        raise ValueError("order must be >= 2 (KenLM reads bigram models and up)")
    adj: list[Counter] = [Counter() for _ in range(order + 1)]
    bos_raw: list[Counter] = [Counter() for _ in range(order + 1)]
    top = adj[order]  # the top order keeps raw counts
    for toks in corpus:
        seq = (BOS, *toks, EOS)
        for i in range(len(seq) - order + 1):
            top[seq[i: i + order]] += 1
        for n in range(1, min(order, len(seq) + 1)):
            if n < order:
                bos_raw[n][seq[:n]] += 1  # n-grams at <s> have no left context: raw counts
    # lower orders: adjusted count = number of distinct left extensions (continuation count);
    # the keys of adj[n+1] are exactly the distinct (n+1)-grams of the corpus.
    for n in range(order - 1, 0, -1):
        cur = adj[n]
        for k in adj[n + 1]:
            cur[k[1:]] += 1
        for k, v in bos_raw[n].items():
            cur[k] = v
    vocab = {w for (w,) in adj[1]} | {EOS}
    vocab.discard(BOS)
    adj[1].pop((BOS,), None)

    disc = [None] + [_discounts(adj[n], n) for n in range(1, order + 1)]
    prob: list[dict] = [dict() for _ in range(order + 1)]
    bow: list[dict] = [dict() for _ in range(order + 1)]

    def D(n: int, c: int) -> float:
        d1, d2, d3 = disc[n]
        return d1 if c == 1 else d2 if c == 2 else d3

    # unigrams: discounted continuation counts + uniform interpolation over vocab + <unk>
    total = sum(adj[1].values())
    nk = Counter(min(c, 3) for c in adj[1].values())
    gamma0 = (disc[1][0] * nk[1] + disc[1][1] * nk[2] + disc[1][2] * nk[3]) / total if total else 1.0
    V = len(vocab) + 1  # + <unk>
    for w in vocab:
        c = adj[1].get((w,), 0)
        prob[1][(w,)] = (max(c - D(1, c), 0.0) / total if total else 0.0) + gamma0 / V
    prob[1][(UNK,)] = gamma0 / V

    for n in range(2, order + 1):
        by_ctx: dict[tuple, list] = defaultdict(list)
        for k, c in adj[n].items():
            by_ctx[k[:-1]].append((k[-1], c))
        for ctx, items in by_ctx.items():
            denom = sum(c for _, c in items)
            nk = Counter(min(c, 3) for _, c in items)
            d1, d2, d3 = disc[n]
            gamma = (d1 * nk[1] + d2 * nk[2] + d3 * nk[3]) / denom
            bow[n - 1][ctx] = gamma
            for w, c in items:
                lower = _interp(prob, bow, ctx[1:] + (w,))
                prob[n][ctx + (w,)] = (c - D(n, c)) / denom + gamma * lower

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        counts = [len(prob[1]) + 1] + [len(prob[n]) for n in range(2, order + 1)]
        f.write("\\data\\\n")
        for n, c in enumerate(counts, 1):
            f.write(f"ngram {n}={c}\n")
        for n in range(1, order + 1):
            f.write(f"\n\\{n}-grams:\n")
            if n == 1:
                f.write(f"-99\t{BOS}\t{math.log10(bow[1].get((BOS,), 1.0)):.6f}\n")
            for k, p in prob[n].items():
                line = f"{math.log10(p):.6f}\t{' '.join(k)}"
                if n < order:
                    line += f"\t{math.log10(bow[n].get(k, 1.0)):.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    tmp.replace(out)
    return {"order": order, "ngrams": counts, "discounts": [list(d) for d in disc[1:]]}


def _interp(prob: list[dict], bow: list[dict], k: tuple) -> float:
    """p(k[-1] | k[:-1]) from already-estimated lower orders (backing off through bows)."""
    n = len(k)
    if n == 1:
        return prob[1].get(k, prob[1][(UNK,)])
    p = prob[n].get(k)
    if p is not None:
        return p
    return bow[n - 1].get(k[:-1], 1.0) * _interp(prob, bow, k[1:])


class ArpaModel:
    """A pure-Python ARPA scorer (log10), the fallback when the `kenlm` package is absent."""

    def __init__(self, path: str | Path):
        self.order = 0
        self.p: dict[tuple, float] = {}
        self.b: dict[tuple, float] = {}
        n = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("\\") and line.endswith("-grams:"):
                    n = int(line[1:].split("-")[0])
                    self.order = max(self.order, n)
                    continue
                if not n or not line or line.startswith("\\"):
                    continue
                parts = line.split("\t")
                key = tuple(parts[1].split(" "))
                self.p[key] = float(parts[0])
                if len(parts) > 2:
                    self.b[key] = float(parts[2])
        if not self.order:
            raise ValueError(f"{path}: not an ARPA file")

    def _logp(self, hist: tuple, w: str) -> float:
        if (w,) not in self.p:
            w = UNK
        acc = 0.0
        for start in range(len(hist) + 1):
            k = hist[start:] + (w,)
            if k in self.p:
                return acc + self.p[k]
            acc += self.b.get(hist[start:], 0.0)
        return acc + self.p.get((UNK,), -99.0)

    def score(self, sentence: str, bos: bool = True, eos: bool = True) -> float:
        """Total log10 probability, like `kenlm.Model.score`."""
        words = sentence.split()
        if eos:
            words.append(EOS)
        hist: tuple = (BOS,) if bos else ()
        total = 0.0
        for w in words:
            total += self._logp(hist[-(self.order - 1):] if self.order > 1 else (), w)
            hist = hist + (w,)
        return total


def load_lm(path: str | Path, prefer_kenlm: bool = True):
    """`kenlm.Model` when the package is installed (fast, reads .arpa and binary), else ours."""
    if prefer_kenlm:
        try:
            import kenlm

            cfg = kenlm.Config()
            cfg.show_progress = False  # its loader draws a progress bar on stderr otherwise
            cfg.arpa_complain = kenlm.ARPALoadComplain.NONE if hasattr(kenlm, "ARPALoadComplain") else cfg.arpa_complain
            return kenlm.Model(str(path), cfg)
        except ImportError:
            pass
    return ArpaModel(path)


def doc_perplexity(model, text: str, max_chars: int | None = 100_000) -> float:
    """Perplexity per token (with one </s> per line) of a document; inf for empty text."""
    logp, n = 0.0, 0
    for toks in sentences(text, max_chars):
        logp += model.score(" ".join(toks), bos=True, eos=True)
        n += len(toks) + 1
    return 10 ** (-logp / n) if n else math.inf
