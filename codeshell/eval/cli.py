"""``codeshell eval``: run, score and doctor subcommands (typer).

Imports at module level stay light (typer, rich); the runtime, torch and openai load
inside the commands that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Evaluate code models: HumanEval, MBPP, MultiPL-E, in a sandbox.", no_args_is_help=True)


def _fail(msg: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {msg}")  # one line at any width
    raise typer.Exit(2)


def _exec_opts(workers: Optional[int], timeout_factor: float, java_no_javatuples: bool, unsafe: bool = False):
    from codeshell.eval.execution import ExecOptions

    try:
        return ExecOptions(timeout_factor=timeout_factor, workers=workers, java_javatuples=not java_no_javatuples,
                           allow_unsafe=unsafe)
    except ValueError as e:
        _fail(str(e))


def _check_sandbox(unsafe: bool) -> str:
    """Refuse (exit 2) before any work when programs could not be isolated, unless
    ``--unsafe-no-sandbox``; then warn loudly. Returns the isolation mode."""
    from codeshell.eval.sandbox import probe_isolation, unavailable_message

    info = probe_isolation()
    if info.isolated:
        if unsafe:
            Console(stderr=True).print("[yellow]note: the sandbox works here, so it is used; "
                                       "--unsafe-no-sandbox changes nothing[/yellow]")
        return info.mode
    if not unsafe:
        _fail(unavailable_message(info))
    err = Console(stderr=True)
    for _ in range(2):
        err.print("[bold red]WARNING: --unsafe-no-sandbox: model-written programs will run on this machine "
                  "WITHOUT isolation: they can read your files, reach the network and see other processes "
                  f"(why: {info.message})[/bold red]")
    return "none (--unsafe-no-sandbox)"


def _tasks(names: List[str], data_dir: Optional[Path], mbpp_legacy_setup: bool):
    from codeshell.eval.tasks import get_task

    try:
        return [get_task(n, data_dir, mbpp_legacy_setup=mbpp_legacy_setup) for n in names]
    except ValueError as e:
        _fail(str(e))


WORKERS = typer.Option(None, "--workers", help="Parallel sandboxed programs (default: CPU cores).")
TIMEOUT_FACTOR = typer.Option(1.0, "--timeout-factor", help="Scale every time limit (slow machines: 2 or 3).")
DATA_DIR = typer.Option(None, "--data-dir", envvar="CODESHELL_EVAL_DATA",
                        help="Folder with mbpp.jsonl and multipl-e/humaneval-<lang>.jsonl "
                             "(default: download from the Hugging Face hub).")
MBPP_LEGACY = typer.Option(False, "--mbpp-legacy-setup",
                           help="Ignore MBPP's test_setup_code, as the old harness did.")
JAVA_OLD = typer.Option(False, "--java-no-javatuples",
                        help="Leave javatuples off the Java classpath, as the old harness did.")
UNSAFE = typer.Option(False, "--unsafe-no-sandbox",
                      help="Where no sandbox works (bubblewrap missing), run model-written programs anyway, "
                           "WITHOUT isolation. Without this, run and score refuse.")


@app.command()
def run(
    tasks: List[str] = typer.Argument(..., help="humaneval, humaneval-chat, mbpp, multiple-<lang> ..."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (resumed if it exists)."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint folder or hub id, run in process "
                                        "(default, without --api-base: the built-in codeshell-mini)."),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, ... (auto: cuda when available)."),
    quantization: Optional[str] = typer.Option(None, "--quantization"),
    api_base: Optional[str] = typer.Option(None, "--api-base", help="OpenAI-compatible server, e.g. http://host:8000/v1"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY"),
    api_model: Optional[str] = typer.Option(None, "--api-model", help="Model name on the server (default: its first)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Tokenizer to count prompt tokens for --api-base "
                                                 "(default: ask the server)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Parallel requests to --api-base."),
    n_samples: int = typer.Option(40, "--n-samples"),
    temperature: float = typer.Option(0.2, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_length: int = typer.Option(2048, "--max-length", help="Prompt + completion tokens."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", "--max-new-tokens",
                                                 help="Also cap completion tokens (quick checks; off by default)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of each task."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a run in --output (default)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Requests per engine call."),
    workers: Optional[int] = WORKERS,
    timeout_factor: float = TIMEOUT_FACTOR,
    data_dir: Optional[Path] = DATA_DIR,
    mbpp_legacy_setup: bool = MBPP_LEGACY,
    java_no_javatuples: bool = JAVA_OLD,
    unsafe_no_sandbox: bool = UNSAFE,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Generate with a model or server, run the tests in the sandbox, print pass@k."""
    from codeshell.eval.generation import GenerationSettings, SettingsMismatch
    from codeshell.eval.runner import run_tasks
    from codeshell.eval.tasks import DataError

    if model is not None and api_base is not None:
        _fail("give one of --model (in process) or --api-base (a server), not both")
    if api_base is None:
        from codeshell.mini.package import cli_model

        model = cli_model(model)  # the built-in model, with its note, when neither is given
    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {batch_size}")
    try:
        settings = GenerationSettings(n_samples, temperature, top_p, max_length, seed, max_new_tokens)
    except ValueError as e:
        _fail(str(e))
    opts = _exec_opts(workers, timeout_factor, java_no_javatuples, unsafe_no_sandbox)
    task_objs = _tasks(tasks, data_dir, mbpp_legacy_setup)
    sandbox = _check_sandbox(unsafe_no_sandbox)  # before any generation is spent
    console = Console()
    try:
        if api_base is not None:
            from codeshell.eval.generation import OpenAIBackend

            backend = OpenAIBackend(api_base, api_key, api_model, tokenizer, concurrency)
        else:
            from codeshell.eval.generation import InProcessBackend

            # The engine holds a whole batch: --batch-size requests of up to 10 samples each.
            backend = InProcessBackend(model, dtype=dtype, device=device, quantization=quantization,
                                       max_batch=batch_size * min(n_samples, 10))
    except Exception as e:  # the CLI boundary: a bad path, hub id, dtype or unreachable server
        where = api_base if api_base is not None else model
        _fail(f"could not set up generation with {where}: {type(e).__name__}: {e}")
    try:
        run_tasks(task_objs, backend, settings, output, opts, limit=limit, resume=resume, batch_size=batch_size,
                  console=console, show_progress=progress, sandbox=sandbox)
    except (DataError, SettingsMismatch) as e:
        _fail(str(e))


@app.command()
def score(
    task: str = typer.Argument(..., help="The task the samples answer."),
    samples: Path = typer.Option(..., "--samples",
                                 help="human-eval JSONL ({\"task_id\": ..., \"completion\": ...} per line, the "
                                      "completion continuing the dataset's prompt), or with --format bigcode the "
                                      "bigcode harness's generations.json."),
    fmt: str = typer.Option("human-eval", "--format",
                            help="human-eval (JSON lines) or bigcode (a JSON list per problem of full programs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the scores here."),
    results: Optional[Path] = typer.Option(None, "--results",
                                           help="Per-sample outcomes (default: <samples>.results.jsonl)."),
    workers: Optional[int] = WORKERS,
    timeout_factor: float = TIMEOUT_FACTOR,
    data_dir: Optional[Path] = DATA_DIR,
    mbpp_legacy_setup: bool = MBPP_LEGACY,
    java_no_javatuples: bool = JAVA_OLD,
    unsafe_no_sandbox: bool = UNSAFE,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score an existing samples file (human-eval format, or bigcode's) without any model."""
    from codeshell.eval.report import summary_table
    from codeshell.eval.runner import SamplesError, read_samples, score_samples, write_score
    from codeshell.eval.tasks import DataError

    if fmt not in ("human-eval", "bigcode"):
        _fail(f"--format must be human-eval or bigcode, got {fmt!r}")
    (task_obj,) = _tasks([task], data_dir, mbpp_legacy_setup)
    opts = _exec_opts(workers, timeout_factor, java_no_javatuples, unsafe_no_sandbox)
    try:
        problems = task_obj.problems()
        rows = read_samples(samples, fmt, problems)
    except (SamplesError, DataError) as e:
        _fail(str(e))
    sandbox = _check_sandbox(unsafe_no_sandbox)
    try:
        result = score_samples(task_obj, problems, rows, opts, Console(stderr=True), progress)
    except (SamplesError, DataError) as e:
        _fail(str(e))
    result.summary["sandbox"] = sandbox
    results = results or samples.with_name(samples.name.removesuffix(".jsonl").removesuffix(".json")
                                           + ".results.jsonl")
    write_score(result, json_out, results)
    Console().print(summary_table([result.summary]))


@app.command()
def doctor() -> None:
    """List each language's toolchain (found / missing, with the install command) and the sandbox."""
    from codeshell.eval import languages as L
    from codeshell.eval.sandbox import probe_isolation

    console = Console()
    t = Table(title="toolchains")
    for col in ("task", "language", "status", "tools / install"):
        t.add_column(col)
    for key, lang in L.LANGUAGES.items():
        task = "humaneval, mbpp" if key == "py" else f"multiple-{key}"
        tc = L.find_toolchain(key)
        if tc is not None:
            detail = ", ".join(tc.tools.values())
            if key == "java":
                detail += ("; javatuples: " + tc.extra["javatuples"]) if "javatuples" in tc.extra else \
                    "; javatuples jar missing (apt-get install libjavatuples-java): tasks using tuples will fail"
            t.add_row(task, lang.name, "[green]found[/green]", detail)
        else:
            t.add_row(task, lang.name, "[yellow]missing (tasks skipped)[/yellow]", L.missing_reason(key))
    console.print(t)
    info = probe_isolation()
    if info.isolated:
        console.print(f"[green]sandbox: {info.message}[/green]")
    else:
        console.print(f"[red]sandbox: NONE: {info.message}. `eval run` and `eval score` refuse to execute "
                      "programs (or run them unisolated with --unsafe-no-sandbox)[/red]")
        raise typer.Exit(1)
