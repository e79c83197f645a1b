"""Pipeline definition and driver: parse a YAML/dict pipeline, plan its steps, run the shard
tasks on an executor, resume from what a previous run finished, and write the report.

Layout of an output folder:
  pipeline.json            the resolved pipeline (a rerun must match it)
  work/NN-<stage>/         one folder per step: shard-XXXXX.jsonl + .stats.json (+ collect
                           files and state.pkl for global stages)
  packed/                  shard-XXXXX.bin + .idx.npz when the pipeline ends with `pack`
  report.md, report.json, report-*.png
Stage logic lives in `codeshell.data.stages`; executors in `codeshell.data.executors`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from codeshell.data.io import (PipelineError, clean_tmp, read_pickle, write_json_atomic,
                               write_pickle_atomic)
from codeshell.data.stages.base import Stage, StageStats, build_stage

TOP_KEYS = {"stages", "workers", "executor", "ray_address", "output"}


@dataclasses.dataclass
class StageSpec:
    label: str  # "NN-name": unique even when a stage appears twice
    name: str
    options: dict
    stage: Stage


@dataclasses.dataclass
class Pipeline:
    stages: list[StageSpec]
    workers: int = 2
    executor: str = "local"
    ray_address: str | None = None
    output: str | None = None
    base_dir: Path | None = None  # relative source paths resolve against the YAML's folder

    def fingerprint(self) -> list:
        return [[s.name, s.options] for s in self.stages]


def _parse_entry(i: int, entry: Any) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        (name, opts), = entry.items()
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise PipelineError(f"stage #{i + 1} '{name}': options must be a mapping, got {opts!r}")
        return str(name), opts
    raise PipelineError(f"stage #{i + 1}: expected `name` or `name: {{options}}`, got {entry!r}")


def load_pipeline(source: str | os.PathLike | dict) -> Pipeline:
    """Parse and validate a pipeline from a YAML file or an equivalent dict."""
    base_dir = None
    if isinstance(source, dict):
        cfg = source
    else:
        import yaml

        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PipelineError(f"cannot read pipeline file {path}: {e.strerror}") from e
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PipelineError(f"pipeline file {path} is not valid YAML: {e}") from e
        base_dir = path.resolve().parent
    if not isinstance(cfg, dict) or "stages" not in cfg:
        raise PipelineError("a pipeline needs a top-level `stages:` list")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise PipelineError(f"unknown pipeline key(s) {sorted(unknown)} (valid: {sorted(TOP_KEYS)})")
    entries = cfg["stages"]
    if not isinstance(entries, list) or not entries:
        raise PipelineError("`stages:` must be a non-empty list")
    specs = []
    for i, entry in enumerate(entries):
        name, opts = _parse_entry(i, entry)
        stage = build_stage(name, opts)
        specs.append(StageSpec(f"{i:02d}-{name.replace(':', '.')}", name, opts, stage))
    if specs[0].stage.kind != "ingest":
        raise PipelineError(f"the first stage must be 'ingest', not '{specs[0].name}'")
    for s in specs[1:]:
        if s.stage.kind == "ingest":
            raise PipelineError("'ingest' may only be the first stage")
    for s in specs[:-1]:
        if s.stage.kind == "sink":
            raise PipelineError(f"'{s.name}' writes the final output and must be the last stage")
    workers = cfg.get("workers", 2)
    if not isinstance(workers, int) or workers < 1:
        raise PipelineError(f"`workers` must be a positive integer, got {workers!r}")
    output = cfg.get("output")
    if output and base_dir is not None and not Path(output).expanduser().is_absolute():
        output = str(base_dir / output)  # like source paths: relative to the pipeline file
    return Pipeline(specs, workers=workers, executor=cfg.get("executor", "local"),
                    ray_address=cfg.get("ray_address"), output=output, base_dir=base_dir)


def _options(stage: Stage) -> dict:
    return dataclasses.asdict(stage.opts)


class _Progress:
    """A rich progress bar per step (quiet when asked)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), transient=False)
            self.p.__enter__()
        return self

    def task(self, desc: str, total: int, done: int):
        if self.quiet:
            return None
        return self.p.add_task(desc, total=total, completed=done)

    def advance(self, tid):
        if tid is not None:
            self.p.advance(tid)

    def __exit__(self, *a):
        if not self.quiet:
            self.p.__exit__(*a)


def run_pipeline(pipeline: Pipeline | str | os.PathLike | dict, output_dir: str | os.PathLike | None = None,
                 executor: str | None = None, workers: int | None = None, overwrite: bool = False,
                 quiet: bool = False, report: bool = True) -> dict:
    """Run (or resume) a pipeline into `output_dir`; returns the merged statistics per stage."""
    from codeshell.data.executors import make_executor, stop_on_signals

    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline)
    if not str(output_dir or pipeline.output or ""):
        raise PipelineError("no output folder: pass one or set `output:` in the pipeline")
    out = Path(output_dir or pipeline.output).expanduser().resolve()  # tasks may run in other processes/nodes
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    fp_path = out / "pipeline.json"
    if fp_path.exists():
        try:
            old = json.loads(fp_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != json.loads(json.dumps(pipeline.fingerprint(), default=str)):
            raise PipelineError(f"{out} holds the output of a different pipeline; use another folder or overwrite=True")
    else:
        write_json_atomic(fp_path, pipeline.fingerprint())
    clean_tmp(out)  # leftovers of a killed run: never read, removed before starting
    with stop_on_signals():  # SIGTERM/SIGHUP: stop workers / our Ray instance, then exit
        ex = make_executor(executor or pipeline.executor, workers or pipeline.workers, pipeline.ray_address)
        ok = False
        try:
            with _Progress(quiet) as prog:
                stats = _run_steps(pipeline, out, ex, prog)
            ok = True
        finally:
            ex.close(abort=not ok)
            clean_tmp(out)  # temporary files of failed tasks are deleted by them; this drops the folders
    write_json_atomic(out / "stats.json", stats)
    if report:
        from codeshell.data.report import write_report

        write_report(out, pipeline, stats)
    clean_tmp(out)
    return stats


def _run_tasks(ex, tasks: list[dict], desc: str, prog: _Progress, results: dict) -> None:
    """Run the unfinished tasks of a step; finished ones contribute their saved stats."""
    todo = []
    for t in tasks:
        marker = t.get("stats") or t["output"]
        if Path(marker).exists():
            if t.get("stats"):
                results[t["stats"]] = json.loads(Path(t["stats"]).read_text())
        else:
            todo.append(t)
    tid = prog.task(desc, len(tasks), len(tasks) - len(todo))

    def done(task, res):
        if task.get("stats"):
            results[task["stats"]] = res
        elif "seconds" in res:  # collect tasks: their time is kept beside their output
            results[task["output"]] = {"_collect": task["stages"][0][0], "seconds": res["seconds"]}
        prog.advance(tid)

    ex.map(todo, done)


def _run_steps(p: Pipeline, out: Path, ex, prog: _Progress) -> dict:
    work = out / "work"
    specs = p.stages
    ingest = specs[0]
    step_dir = work / ingest.label
    plan_path = step_dir / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        plan = ingest.stage.plan(p.base_dir)
        if not plan:
            raise PipelineError("the ingest sources hold no files")
        write_json_atomic(plan_path, plan)
    results: dict[str, dict] = {}
    i = 1
    chain = [ingest]
    while i < len(specs) and specs[i].stage.kind == "map" and not specs[i].stage.is_global():
        chain.append(specs[i])
        i += 1
    tasks = [{"kind": "ingest", "stages": [(s.label, s.name, _options(s.stage)) for s in chain],
              "input": units, "output": str(step_dir / f"shard-{k:05d}.jsonl"),
              "stats": str(step_dir / f"shard-{k:05d}.stats.json")} for k, units in enumerate(plan)]
    _run_tasks(ex, tasks, f"[{ingest.label}] ingest", prog, results)
    shards = [t["output"] for t in tasks]

    while i < len(specs):
        spec = specs[i]
        st = spec.stage
        step_dir = work / spec.label
        if st.kind == "sink":
            pdir = out / "packed"
            tasks = [{"kind": "sink", "stages": [(spec.label, spec.name, _options(st))], "input": s,
                      "output": str(pdir / f"shard-{k:05d}"), "stats": str(pdir / f"shard-{k:05d}.stats.json")}
                     for k, s in enumerate(shards)]
            _run_tasks(ex, tasks, f"[{spec.label}] pack", prog, results)
            break
        state_path = None
        chain = [spec]
        if st.is_global():
            t_prep = time.process_time()
            st.prepare(shards, step_dir)
            t_prep = time.process_time() - t_prep
            state_path = step_dir / "state.pkl"
            if not state_path.exists():
                ctasks = [{"kind": "collect", "stages": [(spec.label, spec.name, _options(st))], "input": s,
                           "output": str(step_dir / f"collect-{k:05d}.pkl")} for k, s in enumerate(shards)]
                _run_tasks(ex, ctasks, f"[{spec.label}] collect", prog, results)
                t0 = time.process_time()
                state = st.reduce([read_pickle(t["output"]) for t in ctasks])
                counters = dict(getattr(st, "reduce_counters", {}))
                counters["collect_seconds"] = round(sum(r["seconds"] for r in results.values()
                                                        if r.get("_collect") == spec.label), 4)
                counters["reduce_seconds"] = round(time.process_time() - t0, 4)
                counters["prepare_seconds"] = round(t_prep, 4)
                write_json_atomic(step_dir / "reduce.json", counters)
                # sets pickle in hash order (salted per process): store them sorted, reproducibly
                write_pickle_atomic(state_path, sorted(state) if isinstance(state, (set, frozenset)) else state)
        i += 1
        while i < len(specs) and specs[i].stage.kind == "map" and not specs[i].stage.is_global():
            chain.append(specs[i])
            i += 1
        tasks = [{"kind": "map", "stages": [(s.label, s.name, _options(s.stage)) for s in chain],
                  "input": s, "output": str(step_dir / f"shard-{k:05d}.jsonl"),
                  "stats": str(step_dir / f"shard-{k:05d}.stats.json"),
                  "state": str(state_path) if state_path else None} for k, s in enumerate(shards)]
        _run_tasks(ex, tasks, f"[{spec.label}] " + "+".join(s.name for s in chain), prog, results)
        shards = [t["output"] for t in tasks]

    merged: dict[str, Any] = {}
    for s in specs:
        per_task = [r[s.label] for _, r in sorted(results.items()) if s.label in r and "_collect" not in r]
        merged[s.label] = StageStats.merge(per_task)
        red = work / s.label / "reduce.json"
        if red.exists():
            merged[s.label]["reduce"] = json.loads(red.read_text())
    merged["_final_shards"] = [str(Path(s).relative_to(out)) for s in shards]
    return merged
