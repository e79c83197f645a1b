"""Long work reports progress as it goes: the bench's phases with their running figures, and
checkpoint loading shard by shard (the callbacks behind the rich displays)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

from codeshell import LLM
from codeshell.bench import BenchProgress, measure_engine, random_model, read_bandwidth_gbs
from codeshell.config import SHAPES
from codeshell.testing import make_tiny_checkpoint


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, int, int | None, str]] = []

    def __call__(self, phase, done, total, figure=""):
        self.calls.append((phase, done, total, figure))

    def phases(self) -> list[str]:
        return list(dict.fromkeys(c[0] for c in self.calls))

    def of(self, phase):
        return [c for c in self.calls if c[0] == phase]


def test_bench_phases_report_counts_and_running_figures():
    rec = Recorder()
    cfg = SHAPES["tiny"]
    m = random_model(cfg, torch.float32, progress=rec)
    llm = LLM.from_model(m, cfg, max_batch=2, kernels=False)
    res = measure_engine(llm, prompt_len=16, decode_tokens=3, batch=2, progress=rec)
    read_bandwidth_gbs(gib=0.01, repeats=2, progress=rec)
    assert rec.phases() == ["writing random weights", "warm-up", "prefill (16 tokens)", "decode, batch 1",
                            "decode, batch 2", "memory read bandwidth"]
    for phase in rec.phases():
        calls = rec.of(phase)
        assert calls[0][1] == 0 and calls[-1][1] == calls[-1][2], (phase, calls)  # starts at 0, ends at total
        assert [c[1] for c in calls] == sorted(c[1] for c in calls)  # never goes back
    writes = rec.of("writing random weights")
    assert writes[-1][2] == sum(p.numel() for p in m.parameters()) and len(writes) > 10  # tensor by tensor
    for b in (1, 2):
        steps = rec.of(f"decode, batch {b}")
        assert len(steps) == 3 + 2 and steps[-1][2] == 4  # start + one per engine step
        assert steps[-1][3] == f"{res[f'decode_b{b}_tok_s']:.2f} tokens/s"  # the running figure ends at the result
        assert all(c[3].endswith("tokens/s") for c in steps[2:])
    assert rec.of("prefill (16 tokens)")[-1][3] == f"{res['prefill_tok_s']:.1f} tokens/s"
    assert rec.of("memory read bandwidth")[-1][3].endswith("GB/s")


def test_bench_samples_take_the_best_and_progress_never_goes_back(monkeypatch):
    """`samples` (codeshell bench --compare-llamacpp: as many as llama-bench's -r): each figure is the
    best of that many runs, and each phase's progress counts every run's steps once, ending at the
    best run's figure."""
    rec = Recorder()
    cfg = SHAPES["tiny"]
    llm = LLM.from_model(random_model(cfg, torch.float32), cfg, max_batch=2, kernels=False)
    runs = []
    add = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request", lambda rid, p, sp: (runs.append(len(p)), add(rid, p, sp))[1])
    res = measure_engine(llm, prompt_len=16, decode_tokens=3, batch=2, progress=rec, samples=3)
    assert runs == [8] + [16] * 3 + [16] * 3 + [16] * 6  # warm-up, 3 prompts, 3 x b1, 3 x b2 (2 rows each)
    prefill = rec.of("prefill (16 tokens)")
    assert [c[1] for c in prefill] == [0, 1, 2, 3] and prefill[-1][2] == 3
    assert prefill[-1][3] == f"{res['prefill_tok_s']:.1f} tokens/s"
    for b in (1, 2):
        steps = rec.of(f"decode, batch {b}")
        assert [c[1] for c in steps] == sorted(c[1] for c in steps) and steps[-1][1] == steps[-1][2] == 3 * 4
        assert steps[-1][3] == f"{res[f'decode_b{b}_tok_s']:.2f} tokens/s"


def test_bench_progress_without_a_terminal_prints_one_line_per_finished_phase():
    from io import StringIO

    from rich.console import Console
    out = StringIO()
    with BenchProgress(Console(file=out, force_terminal=False, width=200), enabled=True) as report:
        report("decode, batch 1", 0, 3, "")
        report("decode, batch 1", 2, 3, "1.00 tokens/s")
        report("decode, batch 1", 3, 3, "2.50 tokens/s")
        report("packing", 0, None, "")
        report.finish("packing")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("bench: decode, batch 1: 2.50 tokens/s, ") and \
        lines[1].startswith("bench: packing: ")
    out = StringIO()
    with BenchProgress(Console(file=out, force_terminal=True, width=120), enabled=True) as report:
        report("decode, batch 1", 0, 3, "")
        report("decode, batch 1", 3, 3, "2.50 tokens/s")
    assert "decode, batch 1" in out.getvalue() and "2.50 tokens/s" in out.getvalue()  # the live display


def test_loading_reports_each_shard(tmp_path, monkeypatch):
    """A sharded checkpoint: the load bar names each shard in turn and advances by every byte."""
    from safetensors.torch import load_file, save_file

    from codeshell import weights
    src = make_tiny_checkpoint(tmp_path / "one")
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    dst = tmp_path / "sharded"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(dst / f))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    seen: list[tuple[int, str | None]] = []

    @contextmanager
    def recording(total, desc):
        seen.append((total, desc))
        yield lambda n, desc=None: seen.append((n, desc))
    monkeypatch.setattr(weights, "_progress", recording)
    weights.load_model(dst)
    descs = [d for _, d in seen[1:] if d]
    assert descs == ["Loading sharded: shard 1/2 (model-00001-of-00002.safetensors)",
                     "Loading sharded: shard 2/2 (model-00002-of-00002.safetensors)"]
    assert sum(n for n, _ in seen[1:]) == sum(t.numel() * t.element_size() for t in sd.values())
