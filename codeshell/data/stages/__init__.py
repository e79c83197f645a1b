"""Built-in pipeline stages; importing this package registers them by name."""

from codeshell.data.stages import (  # noqa: F401
    base,
    decontam,
    dedup,
    filters,
    ingest,
    langid,
    license,
    perplexity,
    pii,
    quality,
)
from codeshell.data import packing  # noqa: F401,E402  (registers the `pack` sink)
