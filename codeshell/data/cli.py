"""`codeshell data ...`: run a pipeline, train the perplexity LM and the quality model, and
look inside packed shards. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Build pretraining data: ingest, filter, dedup, decontaminate, tokenize, pack.",
                  no_args_is_help=True)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def run(pipeline: Path = typer.Argument(..., help="pipeline YAML file"),
        output: Path = typer.Option(None, "--output", "-o", help="output folder (default: `output:` in the YAML)"),
        executor: str = typer.Option(None, "--executor", help="local (default) or ray"),
        workers: int = typer.Option(None, "--workers", "-w", help="worker processes / Ray CPUs"),
        overwrite: bool = typer.Option(False, "--overwrite", help="delete the output folder first"),
        quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Run (or resume) PIPELINE; finished shards of an earlier run are not redone."""
    from codeshell.data.io import PipelineError
    from codeshell.data.pipeline import run_pipeline

    try:
        stats = run_pipeline(pipeline, output, executor=executor, workers=workers, overwrite=overwrite, quiet=quiet)
    except PipelineError as e:
        _fail(e)
    labels = [k for k in stats if not k.startswith("_")]
    last = stats[labels[-1]]
    typer.echo(f"done: {last['docs_out']:,} documents, {last['bytes_out'] / 1e6:.2f} MB kept"
               + (f", {last['counters']['tokens']:,} tokens" if "tokens" in last["counters"] else ""))


@app.command()
def stages():
    """List the built-in stages with their options and defaults."""
    import dataclasses

    from codeshell.data.stages.base import REGISTRY, resolve_stage_class

    resolve_stage_class("ingest")  # registers the built-ins
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        typer.echo(f"{name} ({cls.kind}){': ' + doc[0] if doc else ''}")
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            typer.echo(f"    {f.name}: {default!r}")


@app.command("train-lm")
def train_lm(corpus: list[Path] = typer.Argument(..., help="files or folders of text/code"),
             output: Path = typer.Option(..., "--output", "-o", help="ARPA file to write"),
             order: int = typer.Option(4, "--order"),
             max_bytes: int = typer.Option(50_000_000, "--max-bytes")):
    """Train a modified Kneser-Ney n-gram LM (ARPA, readable by kenlm) for the perplexity stage."""
    from codeshell.data.ngram_lm import sentences, train_arpa
    from codeshell.tokenizer_tools.corpus import iter_texts

    budget = max_bytes

    def sents():
        nonlocal budget
        for _, text in iter_texts(corpus):
            if budget <= 0:
                return
            budget -= len(text)
            yield from sentences(text)

    try:
        info = train_arpa(sents(), order, output)
    except (ValueError, OSError) as e:  # FileNotFoundError names the missing corpus path
        _fail(e)
    typer.echo(f"wrote {output}: n-grams per order {info['ngrams']}")


@app.command("train-quality")
def train_quality(good: list[Path] = typer.Option(..., "--good", help="files/folders of good examples"),
                  bad: list[Path] = typer.Option(..., "--bad", help="files/folders of bad examples"),
                  output: Path = typer.Option(..., "--output", "-o")):
    """Train the hashed n-gram logistic-regression quality model."""
    from codeshell.data.io import PipelineError
    from codeshell.data.stages.quality import train_quality_model
    from codeshell.tokenizer_tools.corpus import iter_texts

    try:
        g = [t for _, t in iter_texts(good)]
        b = [t for _, t in iter_texts(bad)]
        train_quality_model(g, b).save(output)
    except (PipelineError, ValueError, OSError) as e:
        _fail(e)
    typer.echo(f"wrote {output} ({len(g)} good, {len(b)} bad examples)")


@app.command()
def inspect(packed: Path = typer.Argument(..., help="a packed folder or shard prefix"),
            tokenizer: Path = typer.Option(None, "--tokenizer", help="decode the first documents with it"),
            docs: int = typer.Option(2, "--docs")):
    """Summarize packed shards (sequences, tokens, documents) and optionally decode a few documents."""
    from codeshell.data.io import PipelineError
    from codeshell.data.loader import find_shards

    try:
        shards = find_shards(packed)
    except PipelineError as e:
        _fail(e)
    tok = None
    if tokenizer:
        from codeshell.data.packing import load_tokenizer

        tok = load_tokenizer(tokenizer)
    for s in shards:
        typer.echo(f"{s.prefix.name}: {s.n_seq} x {s.seq_len} sequences, {s.n_tokens:,} tokens, {len(s.doc_ids)} documents")
        for i in range(min(docs, len(s.doc_ids)) if tok else 0):
            typer.echo(f"--- {s.doc_ids[i]}\n{tok.decode(s.document_tokens(i).tolist(), skip_special_tokens=False)[:500]}")


if __name__ == "__main__":
    app()
