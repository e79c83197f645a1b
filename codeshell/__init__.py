"""codeshell: run, serve, evaluate, tune and build CodeShell-family code LLMs.

`LLM` and `SamplingParams` are the Python API. Importing the package also makes
transformers' Auto classes know the CodeShell architecture (see `codeshell.hf`).

Exports load lazily, and the transformers registration runs when transformers itself is
imported: `import codeshell` (and so `codeshell --help`) stays fast, where importing torch
and transformers up front costs several seconds.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "codeshell.llm",
    "SamplingParams": "codeshell.engine.sampling",
    "RequestOutput": "codeshell.engine.outputs",
    "CompletionOutput": "codeshell.engine.outputs",
    "CodeShellConfig": "codeshell.config",
    "ConfigError": "codeshell.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'codeshell' has no attribute {name!r}")


def _register_hf() -> None:
    from .hf import register
    register()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs `_register_hf` right after the top-level `transformers` module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register_hf()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_hf()
elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformersImport())
