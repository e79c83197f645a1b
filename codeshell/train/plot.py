"""`codeshell train plot`: a run's loss (training and held-out) and throughput curves from its
metrics.jsonl, drawn to a PNG with matplotlib (headless). It does not read checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from .config import TrainError
from .metrics import METRICS


def read_metrics(run: str | Path) -> list[dict]:
    f = Path(run) / METRICS
    if not f.is_file():
        raise TrainError(f"{run} has no {METRICS} (is it a `codeshell train` run folder?)")
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    if not rows:
        raise TrainError(f"{f} holds no metrics yet")
    return rows


def plot_run(run: str | Path, output: str | Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise TrainError("plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    train = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "eval_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if ev:
        a.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("loss")
    a.legend()
    a.grid(alpha=0.3)
    b.plot([r["step"] for r in train], [r.get("tok_per_s", 0) for r in train], lw=1, color="tab:green")
    b.set_xlabel("step")
    b.set_ylabel("tokens / s")
    b.set_title("throughput")
    b.grid(alpha=0.3)
    if train and "mfu" in train[-1]:
        m = b.twinx()
        m.plot([r["step"] for r in train], [100 * r.get("mfu", 0) for r in train], lw=0.8, color="tab:gray", alpha=0.6)
        m.set_ylabel("MFU %")
    where = Path(run).resolve()  # "6-pretrain/run" says more than "run"
    fig.suptitle(f"{where.parent.name}/{where.name}" if where.parent.name else where.name)
    fig.tight_layout()
    out = Path(output) if output else Path(run) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
