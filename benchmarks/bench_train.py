"""Training throughput of `codeshell train`'s loop beside the Hugging Face Trainer, and LoRA
peak memory on the 7B shape.

Part 1 (throughput): a ~125M CodeShell-shaped model (preset 125m, random init), bf16
autocast, sequence 1024, the same packed data (the stdlib packed with the released tokenizer),
the same batch (micro-batch x accumulation) and the same AdamW settings, for our loop and for
`transformers.Trainer` on `AutoModelForCausalLM` with the same initial weights. Each run is a
fresh process; runs alternate (ours, hf, ours, hf, ...) and the medians are reported, because
the machine is shared. Prints tokens/s, the ratio, MFU against a bf16 matmul peak measured in
the same run, and our step-time breakdown (data, forward, backward, optimizer).

Part 2 (LoRA memory): the 7B width (4096, 32 heads / 8 KV groups, ffn 16384, vocab 70144)
with 2 and 4 layers, bf16 base weights with random values, LoRA r=16 on c_attn/c_proj/c_fc,
activation checkpointing, one optimizer step at --lora-seq tokens; peak RSS of each process,
then a straight-line extrapolation to 42 layers (the full model is never built).

    python benchmarks/bench_train.py --steps 4 --rounds 2
    python benchmarks/bench_train.py --skip-lora      # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CODESHELL_SHARED", REPO.parent / "shared"))
TOKENIZER = SHARED / "codeshell-tokenizer"


def make_data(folder: Path, seq_len: int, rows: int) -> Path:
    """Packed shards of standard-library sources, written by the pipeline's Pack stage."""
    from codeshell.data.packing import Pack
    from codeshell.data.stages.base import StageStats

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "shard-00000.bin").exists():
        return folder
    pack = Pack(Pack.Options(tokenizer=str(TOKENIZER), seq_len=seq_len, fim_rate=0.0))
    pack.setup()
    docs, need = [], rows * seq_len * 5  # ~5 characters per token, generously
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        t = f.read_text(errors="ignore")
        docs.append({"id": str(f), "text": t, "size": len(t)})
        need -= len(t)
        if need <= 0:
            break
    pack.write_shard(docs, folder / "shard-00000", StageStats())
    return folder


def run_ours(a) -> dict:
    from codeshell.train.config import make_config
    from codeshell.train.loop import Trainer, prepare

    cfg = make_config("pretrain", None, data=a.data, preset="125m", output=a.out, max_steps=a.steps + 1,
                      batch_tokens=a.seq * a.micro * a.accum, micro_batch=a.micro, lr=3e-4, warmup_steps=1,
                      save_every=0, shuffle=False, tensorboard=False, compile=a.compile, threads=a.threads)
    import codeshell.train.checkpoint as ck

    ck.save = lambda *x, **k: None  # keep the disk out of the timing
    t = Trainer(prepare(cfg))
    s = t.run()
    t.close()
    return {"tok_per_s": s["tok_per_s"], "mfu": s["mfu"], "step_s": s["step_s"], "breakdown": s["breakdown_s"],
            "peak_tflops": s["peak_flops"] / 1e12}


def run_hf(a) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import codeshell  # noqa: F401
    from codeshell.data.loader import PackedDataset
    from codeshell.hf import CodeShellHFConfig, CodeShellHFForCausalLM
    from codeshell.train.build import new_model
    from codeshell.train.config import PRESETS
    from codeshell.train.metrics import flops_per_token, training_peak_flops

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = PRESETS["125m"]
    d = cfg.to_dict()
    d.pop("architectures", None)
    hcfg = CodeShellHFConfig(**{k: v for k, v in d.items() if k != "model_type"})
    model = CodeShellHFForCausalLM(hcfg)
    model.load_state_dict(new_model(cfg, 0).state_dict(), strict=False)  # the same initial weights as ours
    rows = [torch.from_numpy(r.astype("int64")) for r, _ in zip(PackedDataset(a.data), range(a.micro * a.accum * (a.steps + 1)))]
    ds = [{"input_ids": r, "labels": r} for r in rows]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.accum,
                             max_steps=a.steps + 1, learning_rate=3e-4, adam_beta2=0.95, weight_decay=0.1,
                             warmup_steps=1, lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=True, use_cpu=True,
                             logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=0,
                             disable_tqdm=True)
    tr = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()])
    peak = training_peak_flops(torch.device("cpu"), "bf16")  # the denominator our loop uses
    tr.train()
    step = statistics.median(times[1:])
    tps = a.micro * a.accum * a.seq / step
    return {"tok_per_s": tps, "mfu": tps * flops_per_token(cfg, a.seq) / peak, "step_s": step,
            "optim": str(args.optim), "peak_tflops": peak / 1e12}


def run_ab(a) -> dict:
    """Forward + backward of one micro-batch (sequence a.seq), ours (LMLoss: fused head + loss)
    and the transformers model with `labels`, same weights, alternating in one process."""
    import torch
    import transformers  # noqa: F401  (before codeshell.hf, as an application would)

    from codeshell.hf import CodeShellHFConfig, CodeShellHFForCausalLM
    from codeshell.train.build import LMLoss, new_model
    from codeshell.train.config import PRESETS

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = PRESETS["125m"]
    m = new_model(cfg, 0).requires_grad_(True).train()
    lm = LMLoss(m, m)
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    hf = CodeShellHFForCausalLM(CodeShellHFConfig(**d))
    hf.load_state_dict(m.state_dict(), strict=False)
    hf.train()
    ids = torch.randint(0, 70000, (1, a.seq), generator=torch.Generator().manual_seed(0))
    tgt, pos = torch.roll(ids, -1, 1), torch.arange(a.seq)[None]

    def ours():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, _ = lm(ids, tgt, pos, scale=1 / a.seq)
        s.backward()

    def theirs():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    times = {"ours": [], "hf": []}
    ours(), theirs()  # warm-up
    for _ in range(a.steps + 2):
        for k, f in (("ours", ours), ("hf", theirs)):
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_lora_memory(a) -> dict:
    """One LoRA step on the 7B width with a.layers layers; peak RSS in GiB."""
    import torch

    from codeshell.config import SHAPES
    from codeshell.train.build import LMLoss, add_lora
    from codeshell.train.loop import make_optimizer
    from codeshell.train.config import make_config
    from codeshell.weights import build_empty

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = SHAPES["7b"].replace(n_layer=a.layers)
    model = build_empty(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # random values, filled in place (no float32 copy)
            p.normal_(0, 0.02, generator=g)
    model.transformer.gradient_checkpointing = True
    pm = add_lora(model, 16, 32, 0.05, ["c_attn", "c_proj", "c_fc"], None)
    pm.train()
    lm = LMLoss(pm, model)
    tc = make_config("lora", None, data="x", model="x")
    opt = make_optimizer([(n, p) for n, p in lm.named_parameters() if p.requires_grad], tc)
    ids = torch.randint(0, 70000, (1, a.lora_seq))
    tgt = torch.roll(ids, -1, 1)
    pos = torch.arange(a.lora_seq)[None]
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = lm(ids, tgt, pos)
    (s / n).backward()
    opt.step()
    return {"layers": a.layers, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_s": time.perf_counter() - t0,
            "trainable_m": sum(p.numel() for p in lm.parameters() if p.requires_grad) / 1e6}


def child(kind: str, a, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", a.data, "--steps", str(a.steps), "--seq", str(a.seq),
           "--micro", str(a.micro), "--accum", str(a.accum), "--lora-seq", str(a.lora_seq), *extra]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.compile:
        cmd += ["--compile"]
    env = {**os.environ, "CODESHELL_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run (plus one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, hf)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="our loop with torch.compile")
    ap.add_argument("--lora-seq", type=int, default=1024)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        a.out = a.out or tempfile.mkdtemp(prefix="bench-train-")
        fn = {"ours": run_ours, "hf": run_hf, "lora": run_lora_memory, "ab": run_ab}[a.child]
        print(json.dumps(fn(a)))
        return
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), threads {a.threads or torch.get_num_threads()}; "
          "the machine is shared: figures are medians of alternating runs")
    if not a.skip_throughput:
        if not TOKENIZER.is_dir():
            raise SystemExit(f"needs the released tokenizer at {TOKENIZER} (set CODESHELL_SHARED)")
        need = a.micro * a.accum * (a.steps + 1)
        a.data = a.data or str(make_data(Path(tempfile.gettempdir()) / f"bench-train-data-{a.seq}", a.seq, need))
        ours, hf = [], []
        for r in range(a.rounds):
            ours.append(child("ours", a, []))
            hf.append(child("hf", a, []))
            print(f"round {r + 1}: ours {ours[-1]['tok_per_s']:.0f} tok/s, HF Trainer {hf[-1]['tok_per_s']:.0f} tok/s")
        med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
        o, h = med(ours, "tok_per_s"), med(hf, "tok_per_s")
        # One peak for both (the median of every run's own measurement): a single run's peak
        # swings with the machine's load as much as its throughput does.
        from codeshell.train.config import PRESETS
        from codeshell.train.metrics import flops_per_token

        peak = med(ours + hf, "peak_tflops") * 1e12
        fpt = flops_per_token(PRESETS["125m"], a.seq)
        mfu = lambda tps: 100 * tps * fpt / peak  # noqa: E731
        print(f"\n125m preset ({'~129M'} parameters), bf16 autocast, sequence {a.seq}, batch {a.micro} x {a.accum} "
              f"accumulation = {a.micro * a.accum * a.seq} tokens/step, {a.steps} measured steps per run")
        print(f"  ours        {o:8.0f} tokens/s   MFU {mfu(o):.1f}%   step {med(ours, 'step_s'):.2f} s"
              + ("  (torch.compile)" if a.compile else ""))
        print(f"  HF Trainer  {h:8.0f} tokens/s   MFU {mfu(h):.1f}%   step {med(hf, 'step_s'):.2f} s"
              f"   (optim {hf[0]['optim']})")
        print(f"  ratio       {o / h:.2f}x   (target >= 1.3x)")
        print(f"  MFU against the bf16 matmul peak measured in these runs (median of their own measurements): "
              f"{peak / 1e12:.2f} TFLOP/s per process; {fpt / 1e9:.2f} GFLOP per token")
        bd = {k: statistics.median(x["breakdown"][k] for x in ours) for k in ours[0]["breakdown"]}
        total = sum(bd.values())
        print("  our step breakdown: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in bd.items()))
        ab = child("ab", a, [])
        print(f"  one micro-batch forward + backward, alternating in one process (medians of {a.steps + 2}): "
              f"ours {ab['ours']:.2f} s, transformers model with labels {ab['hf']:.2f} s -> {ab['hf'] / ab['ours']:.2f}x")
    if not a.skip_lora:
        rows = [child("lora", a, ["--layers", str(n)]) for n in (2, 4)]
        per_layer = (rows[1]["peak_gib"] - rows[0]["peak_gib"]) / 2
        base = rows[0]["peak_gib"] - 2 * per_layer
        full = base + 42 * per_layer
        print(f"\nLoRA on the 7B width (bf16 base, random weights, r=16 on c_attn/c_proj/c_fc, activation "
              f"checkpointing, sequence {a.lora_seq}, one optimizer step):")
        for r in rows:
            print(f"  {r['layers']} layers: peak RSS {r['peak_gib']:.2f} GiB, step {r['step_s']:.1f} s, "
                  f"{r['trainable_m']:.1f}M trainable")
        print(f"  extrapolated (straight line through the two, not measured) to 42 layers: {full:.1f} GiB "
              f"({per_layer:.2f} GiB per layer) -> {'fits' if full < 24 else 'does not fit'} in 24 GiB")


if __name__ == "__main__":
    main()
