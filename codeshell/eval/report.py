"""Progress bars and the end-of-run summary table (rich). Presentation only."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, unit: str, console: Console | None = None,
                 enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done, total)``; shows rate and ETA."""
    if not enabled:
        yield lambda done, total: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=False) as prog:
        tid = prog.add_task(description, total=None)
        started = {"first": None}

        def update(done: int, total: int) -> None:
            # Samples found on disk (resume) are not work done now: start the rate after them.
            if started["first"] is None:
                started["first"] = done
                prog.update(tid, total=total, completed=done)
                prog.reset(tid, total=total, completed=done)
            else:
                prog.update(tid, total=total, completed=done)

        yield update


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def summary_table(scores: Sequence[dict]) -> Table:
    t = Table(title="codeshell eval")
    # pass@k in %; "CodeShell-7B" is the published pass@1 of the released model, for reference.
    for col in ("task", "problems", "n", "pass@1", "pass@10", "pass@100", "CodeShell-7B", "note"):
        t.add_column(col, justify="left" if col in ("task", "note") else "right", no_wrap=col != "note",
                     overflow="fold")
    for s in scores:
        pub = s.get("published")
        t.add_row(s["task"], str(s.get("n_problems", 0)), str(s.get("n_samples", 0)), _fmt(s.get("pass@1")),
                  _fmt(s.get("pass@10")), _fmt(s.get("pass@100")), "-" if pub is None else f"{pub:.2f}",
                  s.get("note", ""))
    return t
