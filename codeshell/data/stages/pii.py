"""PII and secrets redaction: e-mail addresses, public IP addresses, and keys/tokens/passwords
are replaced by placeholders (`<EMAIL>`, `<IP_ADDRESS>`, `<KEY>`, `<PASSWORD>`), with a count
per kind in the report.

Detection is regex-based, after detect-secrets' plugins (AWS, GitHub, Slack, Stripe, Google,
private keys, JWT) and BigCode's PII patterns, plus rules with file context that no line
scanner has: key-value assignments in any syntax judged by the words of the key (a
password whatever its entropy, a token or key only when random-looking; names of fields and
templates left alone), unquoted values in configuration files, passwords in URLs, and
version strings that look like addresses. detect-secrets itself (about 0.7 ms per line)
then runs its service-token plugins (SendGrid, Twilio, npm, ...) on the few lines holding a
long run with a digit. It redacts; it never drops a document. It is not a name/address
detector.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections import Counter

from codeshell.data.io import PipelineError
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
# Literal substrings that each pattern needs: `in` checks cost ~1 ms/MB, a regex scan ~50.
SECRET_HINTS = {
    "private_key": ("PRIVATE KEY",), "aws_access_key": ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), "slack_token": ("xox",),
    "stripe_key": ("k_live_",), "google_api_key": ("AIza",), "openai_key": ("sk-",), "jwt": ("eyJ",),
}
KEYWORD_HINTS = ("pass", "pwd", "secret", "key", "token", "credential")
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


# Key-value assignments whose key may name a secret: `key = "v"`, `"key": "v"`, Go's `key := "v"`,
# Ruby's `key => "v"`. The key is judged by its words (`_key_kind`), the value by `_secret_value`.
KEYWORD = re.compile(
    r"""(?i)\b([\w.-]*(?:passw|pwd|secret|key|token|credential|passphrase)[\w.-]*)"""
    r"""(\s*["']?\s*(?::=|=>|[:=])\s*)(["'`])([^"'`\s]{4,200})\3""")
# The same with an unquoted value, in configuration files only (YAML, .env, INI, properties,
# shell): `password: hunter22`, `DB_PASSWORD=hunter22`. In code an unquoted value is a name.
KEYWORD_BARE = re.compile(
    r"""(?im)^(\s*(?:-\s+)?(?:export\s+)?["']?([\w.-]*(?:passw|pwd|secret|key|token|credential|passphrase)"""
    r"""[\w.-]*)["']?\s*[:=]\s*)([^\s"'#!|>&*][^\s#]{3,199})[ \t]*(?:\s#.*)?$""")
CONFIG_SUFFIXES = (".env", ".yml", ".yaml", ".ini", ".cfg", ".conf", ".properties", ".sh", ".bash", ".zsh")
CONFIG_LANGS = {"yaml", "ini", "properties", "shell", "dotenv", "java-properties"}
# scheme://user:password@host (database URLs, git remotes, brokers): the password only.
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{1,20}://[^\s:/@'\"<>]{1,128}:)([^\s@/'\"<>]{1,256})(@)")
# Words of a key that make it a password, a token, or a name/label *about* a secret.
_PASSWORD_WORDS = {"password", "passwd", "passwort", "pwd", "pass", "passphrase", "secret"}
_TOKEN_WORDS = {"token", "apikey", "credential", "credentials"}
_KEY_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "token"),
              ("client", "secret"), ("app", "key"), ("master", "key"), ("signing", "key"), ("encryption", "key")}
_NOT_A_VALUE = {"field", "label", "name", "names", "env", "var", "variable", "path", "file", "dir", "prompt",
                "message", "msg", "placeholder", "length", "len", "size", "min", "max", "regex", "pattern",
                "type", "types", "header", "param", "policy", "hint", "help", "text", "title", "id", "ids",
                "column", "col", "attr", "attribute", "prefix", "suffix", "url", "uri", "endpoint", "mode",
                "format", "hash", "hasher", "algorithm", "algo", "count", "expiry", "expires", "ttl", "timeout",
                "index", "idx", "required", "enabled", "class", "cls", "fn", "func", "ref", "query", "char",
                "chars", "word", "words", "store", "manager", "provider", "service", "tokenizer", "length"}
_PLACEHOLDERS = {"none", "null", "nil", "true", "false", "undefined", "password", "passwd", "secret", "token",
                 "changeme", "example", "your_password", "yourpassword", "your-password", "required", "optional",
                 "string", "str", "redacted", "hidden", "env", "default", "empty", "na", "n/a", "todo", "tbd"}
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def _key_kind(key: str) -> str | None:
    """'password', 'token' or None for a key such as `dbPassword`, `DB_PASSWORD`, `db.password`,
    `api_key`, `password_field` (None: it names the field, it does not hold the password)."""
    words = [w.lower() for w in _WORD.findall(key)]
    if not words:
        return None
    if words[-1] in _NOT_A_VALUE:
        return None
    if any(w in _PASSWORD_WORDS or "passw" in w for w in words):
        return "password"
    if any(w in _TOKEN_WORDS for w in words) or any(p in _KEY_PAIRS for p in zip(words, words[1:])):
        return "token"
    joined = "".join(words)  # `apikey`, `accesskey`, `dbpassword` written as one word
    if any(a + b in joined for a, b in _KEY_PAIRS):
        return "token"
    return None


def _placeholder(val: str) -> bool:
    low = val.lower().strip(",;")
    return (low in _PLACEHOLDERS or val[0] in "<${%[(" or "{{" in val or val.startswith(("os.", "process.env"))
            or len(set(low)) == 1 or re.fullmatch(r"[x*.\-_#]+", low) is not None)


def _secret_value(kind: str, key: str, val: str, min_entropy: float) -> bool:
    if _placeholder(val):
        return False
    if re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", val):  # the name of an environment variable
        return False
    if kind == "password":  # a password may be a plain word or have little entropy ("hunter22")
        return len(val) >= 5 and val.lower() != key.lower()
    # tokens and keys are random strings: an entropy check keeps `token = "Authorization"` out
    return len(val) >= 8 and entropy(val) >= min_entropy and (len(val) >= 16 or re.search(r"\d", val) is not None)


def _keyword_secret(key: str, val: str, min_entropy: float) -> bool:
    """Whether `val`, assigned to `key`, is a secret: the key names a password or token
    (`_key_kind`) and the value is one (`_secret_value`)."""
    kind = _key_kind(key)
    return kind is not None and _secret_value(kind, key, val, min_entropy)


def config_file(path: str | None, lang: str | None) -> bool:
    """Whether unquoted `key: value` / `KEY=value` lines are literal settings (YAML, .env, INI, ...)."""
    name = (path or "").rsplit("/", 1)[-1].lower()
    return (lang in CONFIG_LANGS or name.endswith(CONFIG_SUFFIXES) or name.startswith(".env")
            or name in ("credentials", "config", ".npmrc", ".pypirc", ".netrc"))


# An IPv4-looking number that is a version: `version = "1.2.3.4"`, `pkg==1.2.3.4`, `AssemblyVersion("1.0.0.0")`.
_VERSION_BEFORE = re.compile(r"(?i)(?:version|\bver|release|build|revision|\brev|[=~!<>]=|\bv)[\w\]'\"]{0,2}"
                             r"[\s\"'(:=,\[]{0,6}$")
# A long token-like run with a digit in it: the lines detect-secrets looks at.
_CANDIDATE = re.compile(r"[A-Za-z0-9_+/=.\-]{20,}")
# detect-secrets plugins for services the regexes above do not know (Artifactory, Azure, Discord,
# GitLab, IBM, Mailchimp, npm, PyPI, SendGrid, Square, Telegram, Twilio, ...). Its keyword,
# entropy, IP and basic-auth plugins are left out: the rules above do those with file context.
_DS_SKIP = {"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector",
            "BasicAuthDetector"}
_DS_STATE: dict = {}


def _detect_secrets_ready() -> bool:
    if "ok" not in _DS_STATE:
        try:
            from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
            from detect_secrets.settings import get_settings

            names = sorted(c.__name__ for c in get_mapping_from_secret_type_to_class().values()
                           if c.__name__ not in _DS_SKIP)
            get_settings().configure_plugins([{"name": n} for n in names])
            _DS_STATE["ok"] = True
        except ImportError:
            _DS_STATE["ok"] = False
    return _DS_STATE["ok"]


def _detect_secrets(text: str, counts: Counter) -> str:
    """Run detect-secrets' service-token plugins on the lines that hold a long run with a digit
    (it costs ~0.7 ms per line and plugin set, so not on every line)."""
    starts = set()
    for m in _CANDIDATE.finditer(text):
        if any(c.isdigit() for c in m.group()):
            starts.add(text.rfind("\n", 0, m.start()) + 1)
    if not starts:
        return text
    from detect_secrets.core.scan import scan_line

    out, pos = [], 0
    for a in sorted(starts):
        b = text.find("\n", a)
        b = len(text) if b < 0 else b
        line = text[a:b]
        for sec in scan_line(line):
            val = sec.secret_value
            if val and len(val) >= 8 and val in line:
                line = line.replace(val, "<KEY>")
                counts["secret:" + re.sub(r"\W+", "_", sec.type.lower()).strip("_")] += 1
        out.append(text[pos:a])
        out.append(line)
        pos = b
    out.append(text[pos:])
    return "".join(out)


@register
class Pii(Stage):
    """Redact e-mails, public IPs, keys, tokens and passwords; counts per kind."""

    name = "pii"

    @dataclasses.dataclass
    class Options:
        emails: bool = True
        ip_addresses: bool = True
        secrets: bool = True
        min_entropy: float = 3.0  # bits/char for keyword-assigned tokens and keys (not passwords)
        detect_secrets: bool = True  # also run detect-secrets' service-token plugins (a dependency of [data])
        email_allowlist: list = dataclasses.field(
            default_factory=lambda: ["example.com", "example.org", "example.net", "localhost"])

        def validate(self) -> None:
            if self.detect_secrets and self.secrets and not _detect_secrets_ready():
                raise PipelineError("stage 'pii': detect_secrets needs `pip install detect-secrets` "
                                    "(in the codeshell[data] extra), or set `detect_secrets: false`")

    def process(self, doc: Doc, stats: StageStats) -> Doc | None:
        text, counts = redact(text=doc["text"], opts=self.opts, config=config_file(doc.get("path"), doc.get("lang")))
        if counts:
            for k, v in counts.items():
                stats.count(k, v)
            doc["text"] = text
            doc["size"] = len(text.encode("utf-8", "surrogatepass"))
        return doc


def _in_url_authority(text: str, start: int) -> bool:
    """Whether `start` lies in the `user:password@` part of a URL (`postgres://admin:pw@host`)."""
    i = text.rfind("://", max(0, start - 300), start)
    return i >= 0 and not any(c in text[i + 3:start] for c in " \t\n/\"'<>")


def redact(text: str, opts=None, config: bool = False) -> tuple[str, Counter]:
    """Redact `text`; returns the new text and counts per kind (`secret:aws_access_key`, ...).
    `config`: the text is a configuration file (YAML, .env, INI, ...), where unquoted values of
    password/token keys are literal secrets too."""
    opts = opts or Pii.Options()
    counts: Counter = Counter()
    if opts.secrets:
        for kind, rx in SECRETS.items():
            if not any(h in text for h in SECRET_HINTS[kind]):
                continue
            text, n = rx.subn("<KEY>", text)
            if n:
                counts[f"secret:{kind}"] += n

        if "://" in text:
            def url(m: re.Match) -> str:
                if _placeholder(m.group(2)):
                    return m.group(0)
                counts["secret:url_password"] += 1
                return f"{m.group(1)}<PASSWORD>{m.group(3)}"

            text = URL_CREDENTIALS.sub(url, text)

        def kw(m: re.Match) -> str:
            key, val = m.group(1), m.group(4)
            if not _keyword_secret(key, val, opts.min_entropy):
                return m.group(0)  # names, labels, placeholders, already redacted
            counts["secret:keyword"] += 1
            return f"{key}{m.group(2)}{m.group(3)}<PASSWORD>{m.group(3)}"

        def bare(m: re.Match) -> str:
            key, val = m.group(2), m.group(3)
            if not _keyword_secret(key, val, opts.min_entropy):
                return m.group(0)
            counts["secret:keyword"] += 1
            return m.group(1) + "<PASSWORD>" + m.group(0)[len(m.group(1)) + len(val):]

        if _keyword_hint(text):  # the keyword regex backtracks a lot: run it on candidate lines only
            lines = text.split("\n")
            for i, line in enumerate(lines):
                if _keyword_hint(line):
                    line = KEYWORD.sub(kw, line)
                    if config:
                        line = KEYWORD_BARE.sub(bare, line)
                    lines[i] = line
            text = "\n".join(lines)
        if opts.detect_secrets and _detect_secrets_ready():
            text = _detect_secrets(text, counts)
    if opts.emails and "@" in text:
        allow = tuple("@" + d for d in opts.email_allowlist) + tuple("." + d for d in opts.email_allowlist)

        def em(m: re.Match) -> str:
            if m.group(0).lower().endswith(allow) or _in_url_authority(text, m.start()):
                return m.group(0)  # allowed domains; `user:pw@host` of a URL is not an address
            counts["pii:email"] += 1
            return "<EMAIL>"

        text = EMAIL.sub(em, text)
    if opts.ip_addresses:
        def ip(m: re.Match) -> str:
            if not _public_ip(m.group(0)):
                return m.group(0)  # private, loopback and documentation ranges are not PII
            line_start = text.rfind("\n", 0, m.start()) + 1
            if _VERSION_BEFORE.search(text, max(line_start, m.start() - 40), m.start()):
                return m.group(0)  # `version = "1.2.3.4"`, `pkg==1.2.3.4`: a version, not an address
            counts["pii:ip_address"] += 1
            return "<IP_ADDRESS>"

        if IPV4_HINT.search(text):
            text = IPV4.sub(ip, text)
        if text.count(":") >= 7:
            text = IPV6.sub(ip, text)
    return text, counts
