"""The pretraining data pipeline: ingest, identify languages, filter, deduplicate, decontaminate,
redact, tokenize and pack code into training shards, on one machine or on a Ray cluster.

Python API: `load_pipeline(path_or_dict)` then `run_pipeline(pipeline, output_dir)`; the CLI is
`codeshell data run PIPELINE.yaml`. Tokenizer training lives in `codeshell.tokenizer_tools`.
Names are imported lazily so that `import codeshell.data.cli` stays fast.
"""

from codeshell.data.io import CorruptShardError, PipelineError

__all__ = ["CorruptShardError", "Pipeline", "PipelineError", "load_pipeline", "run_pipeline"]


def __getattr__(name: str):
    if name in ("Pipeline", "load_pipeline", "run_pipeline"):
        from codeshell.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
