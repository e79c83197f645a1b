"""PII and secrets redaction: e-mail addresses, public IP addresses, and keys/tokens/passwords
are replaced by placeholders (`<EMAIL>`, `<IP_ADDRESS>`, `<KEY>`, `<PASSWORD>`), with a count
per kind in the report.

Detection is regex-based, after detect-secrets' plugins (AWS, GitHub, Slack, Stripe, Google,
private keys, JWT, keyword assignments with an entropy check) and BigCode's PII patterns;
detect-secrets itself runs one Python call per line per plugin, which would dominate the
pipeline's cost. It redacts; it never drops a document. It is not a name/address detector.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections import Counter

from codeshell.data.stages.base import Doc, Stage, StageStats, register

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
SECRETS: dict[str, re.Pattern] = {
    "private_key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]+?-----END (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "aws_access_key": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[0-9A-Z]{16}\b"),
    "github_token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})\b"),
    "slack_token": re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}\b"),
    "stripe_key": re.compile(r"\b[rs]k_live_[0-9a-zA-Z]{24,}\b"),
    "google_api_key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "openai_key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}\b"),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),
}
# key = "value" where the key names a secret; the value must look random (entropy check).
KEYWORD = re.compile(
    r"""(?i)\b([\w-]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token|private[_-]?key)[\w-]*)"""
    r"""(\s*["']?\s*[:=]\s*)(["'])([^"'\s]{8,200})\3""")


# Literal substrings that each pattern needs: `in` checks cost ~1 ms/MB, a regex scan ~50.
SECRET_HINTS = {
    "private_key": ("PRIVATE KEY",), "aws_access_key": ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), "slack_token": ("xox",),
    "stripe_key": ("k_live_",), "google_api_key": ("AIza",), "openai_key": ("sk-",), "jwt": ("eyJ",),
}
KEYWORD_HINTS = ("pass", "pwd", "secret", "key", "token")
IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")


def _keyword_hint(s: str) -> bool:
    low = s.lower()
    return any(k in low for k in KEYWORD_HINTS)


def entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _public_ip(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return ip.is_global


@register
class Pii(Stage):
    """Redact e-mails, public IPs, keys, tokens and passwords; counts per kind."""

    name = "pii"

    @dataclasses.dataclass
    class Options:
        emails: bool = True
        ip_addresses: bool = True
        secrets: bool = True
        min_entropy: float = 3.0  # bits/char for keyword-assigned values
        email_allowlist: list = dataclasses.field(
            default_factory=lambda: ["example.com", "example.org", "example.net", "localhost"])

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        text, counts = redact(text=doc["text"], opts=self.opts)
        if counts:
            for k, v in counts.items():
                stats.count(k, v)
            doc["text"] = text
            doc["size"] = len(text.encode("utf-8", "surrogatepass"))
        return doc


def redact(text: str, opts=None) -> tuple[str, Counter]:
    """Redact `text`; returns the new text and counts per kind (`secret:aws_access_key`, ...)."""
    opts = opts or Pii.Options()
    counts: Counter = Counter()
    if opts.secrets:
        for kind, rx in SECRETS.items():
            if not any(h in text for h in SECRET_HINTS[kind]):
                continue
            text, n = rx.subn("<KEY>", text)
            if n:
                counts[f"secret:{kind}"] += n

        def kw(m: re.Match) -> str:
            val = m.group(4)
            if val.startswith("<") or entropy(val) < opts.min_entropy or not re.search(r"\d", val):
                return m.group(0)  # placeholders, plain words, already redacted
            counts["secret:keyword"] += 1
            return f"{m.group(1)}{m.group(2)}{m.group(3)}<PASSWORD>{m.group(3)}"

        if _keyword_hint(text):  # the keyword regex backtracks a lot: run it on candidate lines only
            text = "\n".join(KEYWORD.sub(kw, line) if _keyword_hint(line) else line for line in text.split("\n"))
    if opts.emails and "@" in text:
        allow = tuple("@" + d for d in opts.email_allowlist) + tuple("." + d for d in opts.email_allowlist)

        def em(m: re.Match) -> str:
            if m.group(0).lower().endswith(allow):
                return m.group(0)
            counts["pii:email"] += 1
            return "<EMAIL>"

        text = EMAIL.sub(em, text)
    if opts.ip_addresses:
        def ip(m: re.Match) -> str:
            if not _public_ip(m.group(0)):
                return m.group(0)  # private, loopback and documentation ranges are not PII
            counts["pii:ip_address"] += 1
            return "<IP_ADDRESS>"

        if IPV4_HINT.search(text):
            text = IPV4.sub(ip, text)
        if text.count(":") >= 7:
            text = IPV6.sub(ip, text)
    return text, counts
