"""Prompt formats as data, in one place: the CodeShell chat template, fill-in-the-middle
(FIM) and the stop strings that go with them.

These reproduce the official formats byte for byte (see ../shared/codeshell-tokenizer/
prompts.json). This module builds strings and token lists; it does not generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    human: str = "## human:"
    assistant: str = "## assistant:"
    end: str = "|<end>|"
    # The official code writes "## assistant: {reply}" for past turns and ends the prompt
    # with "## assistant:" (no space): the model produces the space itself.
    reply_sep: str = " "
    system_sep: str = "\n"
    stop: tuple[str, ...] = ("|<end>|", "|end|", "<|endoftext|>", "## human")


@dataclass(frozen=True)
class FimFormat:
    prefix: str = "<fim_prefix>"
    suffix: str = "<fim_suffix>"
    middle: str = "<fim_middle>"
    stop: tuple[str, ...] = ("<|endoftext|>",)


CHAT = ChatFormat()
FIM = FimFormat()
EOS_TEXT = "<|endoftext|>"


class PromptError(ValueError):
    """A malformed chat conversation or FIM request."""


def chat_prompt(messages: Sequence[dict], fmt: ChatFormat = CHAT) -> str:
    """The chat prompt for OpenAI-style messages (roles system, user, assistant).

    Past (user, assistant) pairs become `## human:{q}|<end>|## assistant: {r}|<end>|`; the
    conversation must end with a user message, which becomes `## human:{q}|<end>|## assistant:`.
    System messages are put in front of the first human turn.
    """
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise PromptError(f"message {i} must be an object with `role` and `content`")
        role, content = m["role"], m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise PromptError(f"message {i} has no text `content`")
        if role == "system":
            system.append(content)
        elif role == "user":
            if pending is not None:  # two user messages in a row: join them
                pending += "\n" + content
            else:
                pending = content
        elif role == "assistant":
            if pending is None:
                raise PromptError(f"message {i}: an assistant message must follow a user message")
            turns.append((pending, content))
            pending = None
        else:
            raise PromptError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
    if pending is None:
        raise PromptError("the conversation must end with a user message")
    return chat_prompt_from_history(pending, turns, "\n".join(system) or None, fmt)


def chat_prompt_from_history(query: str, history: Sequence[Sequence[str]] = (),
                             system: str | None = None, fmt: ChatFormat = CHAT) -> str:
    """The official `(query, history)` form: history is a list of (question, answer) pairs."""
    parts = [system + fmt.system_sep] if system else []
    for q, r in history:
        parts.append(f"{fmt.human}{q}{fmt.end}{fmt.assistant}{fmt.reply_sep}{r}{fmt.end}")
    parts.append(f"{fmt.human}{query}{fmt.end}{fmt.assistant}")
    return "".join(parts)


def fim_prompt(prefix: str, suffix: str, fmt: FimFormat = FIM) -> str:
    """Prefix-suffix-middle order, as CodeShell was trained: `<fim_prefix>P<fim_suffix>S<fim_middle>`."""
    return f"{fmt.prefix}{prefix}{fmt.suffix}{suffix}{fmt.middle}"


def left_truncate(ids: list[int], n_positions: int, max_new_tokens: int) -> list[int]:
    """Keep the last `n_positions - max_new_tokens` tokens, as the official chat code does."""
    budget = max(n_positions - max_new_tokens, 1)
    return ids[-budget:]
