"""codeshell: run, serve, evaluate, tune and build CodeShell-family code LLMs.

`LLM` and `SamplingParams` are the Python API; importing the package also registers the
CodeShell architecture with transformers' Auto classes (see `codeshell.hf`).
"""

__version__ = "0.1.0"

from .config import CodeShellConfig, ConfigError  # noqa: E402
from .engine import RequestOutput, SamplingParams  # noqa: E402
from .llm import LLM  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CodeShellConfig", "ConfigError"]

from .hf import register as _register_hf  # noqa: E402

_register_hf()
