"""The unit of work every executor runs: one shard through one step of the pipeline.

A task is a plain dict (picklable, JSON-able) naming its stages with resolved options, its
input and its outputs. Outputs are written atomically and the task's completion marker
(its stats file, or the collect file) is written last, so a rerun can skip finished tasks and
redo the rest. Stages are rebuilt once per worker process and kept in a cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from codeshell.data.io import read_jsonl, read_pickle, write_json_atomic, write_jsonl_atomic, write_pickle_atomic
from codeshell.data.stages.base import Doc, Stage, StageStats, build_stage

BATCH = 256
_STAGES: dict[str, Stage] = {}
_STATES: dict[str, object] = {}


def get_stage(name: str, options: dict) -> Stage:
    key = name + json.dumps(options, sort_keys=True, default=str)
    st = _STAGES.get(key)
    if st is None:
        st = build_stage(name, options)
        st.setup()
        _STAGES[key] = st
    return st


def _state(path: str):
    if path not in _STATES:
        state = read_pickle(path)
        _STATES[path] = set(state) if isinstance(state, list) else state  # sets are stored sorted
    return _STATES[path]


def _chain(docs: Iterator[Doc], steps: list[tuple[Stage, object]], stats: list[StageStats]) -> Iterator[Doc]:
    """Run documents through the stages in batches; `state` is set for a global stage's apply."""
    batch: list[Doc] = []

    def flush(batch: list[Doc]) -> list[Doc]:
        for (stage, state), st in zip(steps, stats):
            t0 = time.process_time()
            for d in batch:
                st.seen(d)
            if state is not None:
                out = [stage.apply(d, state, st) for d in batch]
            elif hasattr(stage, "process_batch"):
                out = stage.process_batch(batch, st) if batch else []
            else:
                out = [stage.process(d, st) for d in batch]
            batch = [d for d in out if d is not None]
            for d in batch:
                st.kept(d)
            st.seconds += time.process_time() - t0
        return batch

    for d in docs:
        batch.append(d)
        if len(batch) >= BATCH:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def _fault_point() -> None:
    """Test hook: CODESHELL_DATA_TASK_DELAY slows each task down so a test can kill a run."""
    delay = os.environ.get("CODESHELL_DATA_TASK_DELAY")
    if delay:
        time.sleep(float(delay))


def run_task(task: dict) -> dict:
    """Run one task; returns {stage label: stats dict} (empty for collect tasks)."""
    kind = task["kind"]
    labels = [s[0] for s in task["stages"]]
    stages = [get_stage(name, opts) for _, name, opts in task["stages"]]
    stats = [StageStats() for _ in stages]
    _fault_point()
    t0 = time.process_time()
    if kind == "collect":
        stage = stages[0]
        write_pickle_atomic(task["output"], stage.collect(read_jsonl(task["input"])))
        return {"seconds": time.process_time() - t0}
    if kind == "ingest":
        ingest, rest = stages[0], stages[1:]
        docs = ingest.read(task["input"], stats[0])
        steps = [(s, None) for s in rest]
        write_jsonl_atomic(task["output"], _chain(docs, steps, stats[1:]))
        stats[0].seconds = time.process_time() - t0 - sum(s.seconds for s in stats[1:])  # reading + writing
    elif kind == "map":
        state = _state(task["state"]) if task.get("state") else None
        steps = [(s, state if i == 0 and state is not None else None) for i, s in enumerate(stages)]
        write_jsonl_atomic(task["output"], _chain(read_jsonl(task["input"]), steps, stats))
    elif kind == "sink":
        stages[0].write_shard(read_jsonl(task["input"]), Path(task["output"]), stats[0])
        stats[0].seconds = time.process_time() - t0
    else:
        raise ValueError(f"unknown task kind {kind}")
    result = {label: st.to_dict() for label, st in zip(labels, stats)}
    write_json_atomic(task["stats"], result)  # the completion marker: written last
    return result
