"""What a run reports: the progress line (step, loss, tokens/s, MFU, learning rate, ETA),
`metrics.jsonl` in the run folder (one JSON object per logged step, plus `eval_loss` rows),
TensorBoard events when `tensorboard` is installed, the step-time breakdown, and MFU
against a matmul peak measured on this machine when the run starts.

Only rank 0 writes. This module does not train.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from codeshell.config import CodeShellConfig

METRICS = "metrics.jsonl"
_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.25,
                       min_runs: int = 3) -> float:
    """FLOP/s of a large square matmul in `dtype` (best of repeated runs): the machine's
    practical peak that MFU is measured against. Measured once per process.

    At least `min_runs` runs besides `seconds` of them: a 2048 matmul takes ~0.1-0.5 s on one
    or two CPU cores, so a 0.25 s probe was one or two runs, and one scheduler-delayed run on a
    busy host made the peak low enough for a training step to read an MFU over 1 (1.058 seen on
    a loaded 2-core host). A smaller matrix would take more runs in the time but read ~8% under
    the peak (1024: 206 against 225 GFLOP/s fp32 on 2 cores)."""
    key = (str(device), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    n = 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, runs, t_end = float("inf"), 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or runs < min_runs:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    _PEAKS[key] = 2 * n ** 3 / best
    return _PEAKS[key]



def training_peak_flops(device: torch.device, precision: str) -> float:
    """The peak a run's MFU is measured against: the matmul peak in the run's precision (bf16 or
    fp32); on a CPU in bf16, the better of the bf16 and the fp32 probe. Why: a CPU without bf16
    hardware (no AVX512-BF16 / AMX: an AVX2-only AMD Zen 3, session 30) emulates torch's bf16
    matmul at ~0.02 TFLOP/s against ~0.15 in fp32, while a bf16 run's small matmuls reach fp32-like
    speeds, so the bf16 probe alone read an MFU of 7.4 there. The hardware's best matmul is the
    honest denominator."""
    if precision != "bf16":
        return measure_peak_flops(device, torch.float32)
    if device.type != "cpu":
        return measure_peak_flops(device, torch.bfloat16)
    fp32 = measure_peak_flops(device, torch.float32)
    # A quick look before the bf16 probe: where torch emulates bf16 (no AVX512-BF16 / AMX) its
    # bf16 matmul runs ~1 GFLOP/s (AMD Zen 3, session 32: 1.0-1.3 at n = 512-1024, fp32 56-150),
    # so the 2048 probe's 5 runs of 17 GFLOP held every bf16 CPU run ~90 s before its first
    # step, for a figure the fp32 one beats anyway. Hardware bf16 reads well above fp32 / 8 at
    # n = 256 (the emulation ~100x below it), so the look cannot mistake one for the other.
    if bf16_matmul_rate(device) < fp32 / 8:
        return fp32
    return max(fp32, measure_peak_flops(device, torch.bfloat16))


def bf16_matmul_rate(device: torch.device, n: int = 256) -> float:
    """FLOP/s of one n x n bf16 matmul after a warm-up call (~70 ms where bf16 is emulated): the
    quick look `training_peak_flops` takes before the full bf16 probe on a CPU."""
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    a @ b
    t0 = time.perf_counter()
    a @ b
    return 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9)

def flops_per_token(cfg: CodeShellConfig, seq_len: int, lora: bool = False) -> float:
    """Training FLOPs per token: 6N + 12 L d T (PaLM's count, attention not halved for the
    causal mask; recomputation under activation checkpointing not counted). N counts the
    matmul weights, the output head included, the embedding lookup not. LoRA skips the base
    weight gradients: 4N + 8 L d T."""
    n = cfg.num_parameters()
    if cfg.position_embedding_type == "learned_absolute":
        n -= cfg.n_positions * cfg.n_embd
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.n_embd  # the input embedding is a lookup
    fwd = 2 * n + 4 * cfg.n_layer * cfg.n_embd * seq_len
    return (2 if lora else 3) * fwd


def _fmt_eta(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Meter:
    """Times the phases of each step, logs metrics and shows progress (rank 0)."""

    def __init__(self, run_dir: Path, cfg, plan, peak: float, fpt: float, start_step: int, primary: bool,
                 device: torch.device):
        self.cfg, self.plan, self.peak, self.fpt = cfg, plan, peak, fpt
        self.primary, self.start_step, self.device = primary, start_step, device
        self.rows: list[dict] = []
        self.acc: dict[str, float] = {}
        self.tb = self.progress = self.file = None
        self.t_run = time.perf_counter()
        if not primary:
            return
        path = run_dir / METRICS
        kept = []
        if start_step and path.exists():  # a resumed run: drop what came after its checkpoint
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass
        path.write_text("".join(k + "\n" for k in kept))
        self.file = open(path, "a", buffering=1)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                self.tb = None
        self._start_progress()
        self.log(f"training {cfg.mode}: {plan.model_cfg.num_parameters() / 1e6:.1f}M parameters, {plan.max_steps} steps "
                 f"of {plan.rows_per_step} x {plan.seq_len} tokens ({plan.world} process(es) x {plan.accum} "
                 f"micro-batch(es) of {cfg.micro_batch}), matmul peak {peak / 1e12:.2f} TFLOP/s per process"
                 + (f", resuming at step {start_step}" if start_step else ""))

    def _start_progress(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(stderr=True)
        if os.environ.get("CODESHELL_NO_PROGRESS") == "1" or not console.is_terminal:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.progress.add_task("train", total=self.plan.max_steps, completed=self.start_step, info="")
        self.progress.start()

    def log(self, msg: str) -> None:
        if not self.primary:
            return
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---- timing -------------------------------------------------------------------------
    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str, t0: float) -> None:
        self.acc[name] = self.acc.get(name, 0.0) + self.now() - t0

    def begin(self) -> None:
        self.acc = {}
        self.t_step = self.now()

    def end_step(self, step: int, row: dict, eval_loss: float | None) -> None:
        # The step's own time: a held-out evaluation after it is logged as eval_s, not counted.
        dt = self.now() - self.t_step - self.acc.get("eval", 0.0)
        tokens = self.plan.rows_per_step * self.plan.seq_len
        tps = row.get("tokens_step", tokens) / dt
        mfu = tps * self.fpt / (self.peak * self.plan.world)
        rec = {"step": step, "loss": round(row["loss"], 6), "lr": row["lr"], "grad_norm": round(row["grad_norm"], 5),
               "tokens": step * tokens, "tok_per_s": round(tps, 1), "mfu": round(mfu, 5), "step_s": round(dt, 4),
               **{f"{k}_s": round(v, 4) for k, v in self.acc.items()}, "time": round(time.time(), 2)}
        if eval_loss is not None:
            rec["eval_loss"] = round(eval_loss, 6)
        self.rows.append(rec)
        if not self.primary:
            return
        if step % self.cfg.log_every == 0 or step == self.plan.max_steps or eval_loss is not None:
            self.file.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k in ("loss", "lr", "tok_per_s", "mfu", "grad_norm", "eval_loss"):
                    if k in rec:
                        self.tb.add_scalar(f"train/{k}", rec[k], step)
        times = [r["step_s"] for r in self.rows[1:]] or [dt]  # the first step includes warm-up
        eta = statistics.median(times) * (self.plan.max_steps - step)
        info = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {tps:,.0f} tok/s  MFU {100 * mfu:.1f}%  "
                f"ETA {_fmt_eta(eta)}" + (f"  eval {eval_loss:.4f}" if eval_loss is not None else ""))
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step % self.cfg.log_every == 0 or step == self.plan.max_steps:
            print(f"step {step}/{self.plan.max_steps}  {info}", file=sys.stderr, flush=True)

    def log_eval(self, step: int, loss: float) -> None:
        if self.primary:
            self.file.write(json.dumps({"step": step, "eval_loss": round(loss, 6)}) + "\n")
            if self.tb is not None:
                self.tb.add_scalar("train/eval_loss", loss, step)
            self.log(f"step {step}: held-out loss {loss:.4f}")

    def summary(self) -> dict[str, Any]:
        rows = self.rows[1:] or self.rows
        if not rows:
            return {}
        med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
        return {"final_loss": self.rows[-1]["loss"], "tok_per_s": med("tok_per_s"), "mfu": med("mfu"),
                "step_s": med("step_s"), "breakdown_s": {k: med(f"{k}_s") for k in
                                                          ("data", "forward", "backward", "optimizer")},
                "peak_flops": self.peak, "wall_s": time.perf_counter() - self.t_run}

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
