"""Resuming: a run killed (SIGKILL) mid-way and resumed gives the losses and final weights of
an uninterrupted run; a crash inside checkpoint writing leaves the previous checkpoint
complete, linked and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.train.helpers import ENV, losses, train_cli, weights

ARGS = ["--preset", "tiny", "--batch-tokens", "256", "--micro-batch", "2", "--max-steps", "12", "--lr", "3e-3",
        "--warmup-steps", "2", "--precision", "fp32", "--save-every", "3", "--keep", "10", "--threads", "1",
        "--no-tensorboard"]


def test_killed_then_resumed_equals_uninterrupted(shards, tmp_path):
    ref = tmp_path / "ref"
    r = train_cli("pretrain", shards, "-o", ref, *ARGS)
    assert r.exit_code == 0, r.output

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "codeshell.train", "pretrain", str(shards), "-o", str(run), *ARGS]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "step-000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "step-000012").exists()

    r = train_cli("pretrain", shards, "-o", run, *ARGS, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming at step" in r.output
    a, b = losses(ref), losses(run)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    wa, wb = weights(ref / "checkpoint"), weights(run / "checkpoint")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(shards, tmp_path, monkeypatch):
    from codeshell.train import checkpoint
    from codeshell.weights import load_model

    run = tmp_path / "run"
    args = ["--preset", "tiny", "--batch-tokens", "256", "--micro-batch", "2", "--max-steps", "4", "--save-every", "2",
            "--threads", "1"]
    real = checkpoint.write_model
    calls = []

    def failing(folder, state, cfg, tok):
        calls.append(folder)
        if len(calls) == 2:  # the step-4 checkpoint: half the files, then the "crash"
            (folder / "config.json").write_text("{}")
            raise OSError("disk full (injected)")
        real(folder, state, cfg, tok)

    monkeypatch.setattr(checkpoint, "write_model", failing)
    r = train_cli("pretrain", shards, "-o", run, *args)
    assert isinstance(r.exception, OSError)
    assert (run / ".tmp-step-000004").is_dir()  # the half-written one, never named step-*
    assert [p.name for p in checkpoint.step_dirs(run)] == ["step-000002"]
    assert os.readlink(run / "checkpoint") == "step-000002"
    model, cfg, _ = load_model(run / "checkpoint")  # complete and loadable
    assert cfg.n_layer == 2
    monkeypatch.setattr(checkpoint, "write_model", real)
    r = train_cli("pretrain", shards, "-o", run, *args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming at step 2" in r.output
    assert [p.name for p in checkpoint.step_dirs(run)] == ["step-000002", "step-000004"]
    assert not list(run.glob(".tmp-*"))
