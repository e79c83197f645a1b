"""`python -m codeshell.train ...` is `codeshell train ...` (for `torchrun -m codeshell.train`)."""

import os

from codeshell.train.cli import app

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
app(prog_name="codeshell train")
