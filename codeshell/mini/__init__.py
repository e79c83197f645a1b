"""codeshell-mini: a small CodeShell-architecture model built end to end by this project
(corpus, data pipeline, tokenizer, training), shipped as the default model. Not the 7B runtime.

The shipped weights live in `codeshell/mini/model/` (see `codeshell.mini.package`); every
command and `LLM()` use them when no model is given.
"""

from codeshell.mini.package import MODEL_DIR, PackagedModelMissing, package_checkpoint, packaged_model

__all__ = ["MODEL_DIR", "PackagedModelMissing", "package_checkpoint", "packaged_model"]
