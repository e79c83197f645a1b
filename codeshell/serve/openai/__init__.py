"""The OpenAI-compatible API: /v1/models, /v1/completions (with `suffix` for FIM) and
/v1/chat/completions, streamed or not, errors in OpenAI's shape."""

from .routes import router

__all__ = ["router"]
