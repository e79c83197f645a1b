"""The one training loop of `codeshell train` (pretrain, sft and lora differ only in data and
in which parameters train).

`prepare(cfg)` checks every input (data, shapes, batch split, LoRA targets, resume folder)
and fails with a `TrainError` before any work; `train(cfg)` then runs under torchrun or as
one process: AdamW (fused) with warmup + cosine decay, gradient accumulation, gradient
clipping, bf16 autocast, activation checkpointing, DDP or FSDP2, held-out loss, atomic
checkpoints and exact resume. Progress, metrics and MFU are in `codeshell.train.metrics`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from codeshell.config import CodeShellConfig, ConfigError
from codeshell.tokenizer import eot_id

from . import checkpoint as ckpt
from .build import LMLoss, add_lora, check_lora_targets, distribute, load_model, merged_state, new_model
from .casts import step_casts
from .config import PRESETS, TrainConfig, TrainError
from .data import ExampleRows, ShardRows, Tokenized, check_path, read_rows
from .metrics import Meter, flops_per_token, training_peak_flops


@dataclass
class Plan:
    """Everything `prepare` resolved: the model to build, the data and the step arithmetic."""
    cfg: TrainConfig
    model_cfg: CodeShellConfig
    model_path: Path | None       # checkpoint to load (None: new model)
    tokenizer_dir: Path | None
    rank: int
    world: int
    train: Any                    # ShardRows | ExampleRows
    eval: Any | None
    seq_len: int
    rows_per_step: int            # global sequences per optimizer step
    accum: int                    # micro-batches per step per rank
    max_steps: int
    warmup: int
    resume_dir: Path | None
    resume_state: dict | None


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; one process otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _model_config(cfg: TrainConfig) -> tuple[CodeShellConfig, Path | None]:
    from codeshell.weights import CheckpointError, resolve_model_path

    try:
        if cfg.preset:
            return PRESETS[cfg.preset], None
        if cfg.model_config:
            p = Path(cfg.model_config)
            return CodeShellConfig.from_json(p / "config.json" if p.is_dir() else p), None
        path = resolve_model_path(cfg.model)
        if path.is_file():
            raise TrainError(f"--model {cfg.model} is a file; expected a checkpoint folder")
        return CodeShellConfig.from_json(path / "config.json"), path
    except (CheckpointError, ConfigError) as e:
        raise TrainError(str(e)) from None


def _tokenizer_dir(cfg: TrainConfig, model_path: Path | None) -> Path | None:
    if cfg.tokenizer:
        p = Path(cfg.tokenizer)
        if not (p / "tokenizer.json").is_file():
            raise TrainError(f"--tokenizer {p} has no tokenizer.json")
        return p
    if model_path is not None and (model_path / "tokenizer.json").is_file():
        return model_path
    if cfg.mode != "pretrain":
        raise TrainError(f"{cfg.mode} needs a tokenizer: the model folder has none, give --tokenizer")
    return None


def _rows(cfg: TrainConfig, path: str, mcfg: CodeShellConfig, tok_dir: Path | None, rank: int, world: int,
          seq_len: int | None, shuffle: bool):
    if cfg.mode == "pretrain":
        src = ShardRows(path, rank, world, shuffle, cfg.seed)
        src.check(mcfg.vocab_size, mcfg.n_positions, path)
        return src
    tok = Tokenized(tok_dir, cfg.fim_rate, cfg.fim_spm_rate, cfg.seed)
    examples = tok.examples(read_rows(path))
    hi = max(int(e.ids.max()) for e in examples if len(e.ids))
    if hi >= mcfg.vocab_size:
        raise TrainError(f"data {path}: the tokenizer gives token id {hi}, outside the model's vocabulary "
                         f"of {mcfg.vocab_size}")
    return ExampleRows(examples, seq_len, cfg.packing, rank, world, shuffle, cfg.seed, cfg.micro_batch, tok.eot)


def prepare(cfg: TrainConfig) -> Plan:
    """Check every input and work out the run; raises TrainError naming the problem."""
    rank, world, _ = dist_env()
    run = Path(cfg.output)
    for d in (cfg.data, cfg.eval_data):  # the cheapest check first (before any hub download)
        if d is not None:
            check_path(d)
    mcfg, model_path = _model_config(cfg)
    tok_dir = _tokenizer_dir(cfg, model_path)
    if model_path is None and tok_dir is not None:
        # A new model ends text where its tokenizer does: the packed data closes every document
        # with the tokenizer's <|endoftext|>, and generation stops at config.eos_token_id (the
        # presets' default 70000 is the released vocabulary's, not a custom tokenizer's).
        eot = eot_id(tok_dir)
        if eot is not None:
            if eot >= mcfg.vocab_size:
                raise TrainError(f"--tokenizer {tok_dir}: its <|endoftext|> id {eot} is outside the model's "
                                 f"vocabulary of {mcfg.vocab_size}")
            mcfg = mcfg.replace(bos_token_id=eot, eos_token_id=eot)
    if cfg.mode == "lora":
        check_lora_targets(mcfg, cfg.targets)
        if cfg.dist == "fsdp" and world > 1:
            raise TrainError("lora runs with --dist ddp (the frozen base is replicated; FSDP2 is for full training)")
    resume_dir = resume_state = None
    if not (cfg.resume or cfg.resume_from) and ckpt.latest(run) is not None:
        raise TrainError(f"{run} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another --output")
    if cfg.resume or cfg.resume_from:
        resume_dir = Path(cfg.resume_from) if cfg.resume_from else ckpt.latest(run)
        if resume_dir is None:
            raise TrainError(f"--resume: no checkpoint in {run} to resume from")
        if not resume_dir.is_dir():
            raise TrainError(f"--resume-from {resume_dir} does not exist")
        resume_state = ckpt.load_state(resume_dir)
        ckpt.check_same_shape(resume_dir, resume_state, mcfg, cfg.mode)
    seq_len = cfg.seq_len
    if cfg.mode != "pretrain":
        seq_len = seq_len or min(2048, mcfg.n_positions)
        if seq_len > mcfg.n_positions:
            raise TrainError(f"--seq-len {seq_len} is more than the model's n_positions={mcfg.n_positions}")
    train_rows = _rows(cfg, cfg.data, mcfg, tok_dir, rank, world, seq_len, cfg.shuffle)
    if cfg.mode == "pretrain":
        if seq_len is not None and seq_len != train_rows.seq_len:
            raise TrainError(f"--seq-len {seq_len} differs from the shards' sequence length {train_rows.seq_len}")
        seq_len = train_rows.seq_len
    eval_rows = None
    if cfg.eval_data:
        eval_rows = _rows(cfg, cfg.eval_data, mcfg, tok_dir, rank, world, seq_len, False)
    if cfg.batch_tokens % seq_len:
        raise TrainError(f"--batch-tokens {cfg.batch_tokens} is not a multiple of the sequence length {seq_len}")
    rows = cfg.batch_tokens // seq_len
    if rows % (world * cfg.micro_batch):
        raise TrainError(f"the world size {world} x --micro-batch {cfg.micro_batch} does not divide the batch of "
                         f"{rows} sequences (--batch-tokens {cfg.batch_tokens} / sequence length {seq_len})")
    accum = rows // (world * cfg.micro_batch)
    if cfg.max_steps:
        steps = cfg.max_steps
    elif cfg.tokens:
        steps = math.ceil(cfg.tokens / cfg.batch_tokens)
    else:  # one epoch
        steps = max(1, train_rows.per_epoch * world // rows)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else steps // 20
    if resume_state is not None and resume_state.get("rows_per_step") not in (None, rows):
        raise TrainError(f"resume checkpoint {resume_dir} used {resume_state['rows_per_step']} sequences per step, "
                         f"this run {rows}: keep --batch-tokens and --seq-len to resume")
    return Plan(cfg, mcfg, model_path, tok_dir, rank, world, train_rows, eval_rows, seq_len, rows, accum,
                steps, warmup, resume_dir, resume_state)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` (multiplier of --lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; fused kernel when the build has it."""
    decay = [p for n, p in params if p.ndim >= 2]
    other = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.decay}, {"params": other, "weight_decay": 0.0}]
    kw = dict(lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # dtype/device without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw)


class Trainer:
    """One run: build, (resume), loop, save. `run()` returns a summary dict."""

    def __init__(self, plan: Plan):
        self.plan = p = plan
        cfg = p.cfg
        self.cfg, self.run_dir = cfg, Path(cfg.output)
        self.device = self._device()
        self._threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if p.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self._build()

    def _device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise TrainError("--device cuda but no CUDA device is available")
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
            return dev
        return torch.device("cpu")

    # ---- model --------------------------------------------------------------------------
    def _build(self) -> None:
        p, cfg = self.plan, self.cfg
        from codeshell.weights import resolve_dtype

        base_dtype = resolve_dtype(cfg.base_dtype or "bfloat16") if cfg.mode == "lora" else torch.float32
        if p.model_path is not None:
            model = load_model(p.model_path, p.model_cfg, base_dtype)
        else:
            model = new_model(p.model_cfg, cfg.seed)
        core = model
        if cfg.mode == "lora":
            model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets,
                             str(p.model_path) if p.model_path else None)
        else:
            model.requires_grad_(True)
        if cfg.activation_checkpointing:
            core.transformer.gradient_checkpointing = True
        model.train()
        self.core, self.peft = core, model if cfg.mode == "lora" else None
        module = LMLoss(model, core).to(self.device)
        self.trainable = [(n, q) for n, q in module.named_parameters() if q.requires_grad]
        if p.resume_state is not None:
            self._load_weights(module)
        self.module = distribute(module, cfg.dist, p.world, self.device)
        if cfg.compile:  # after DDP / fully_shard, as torch recommends (DDP's graph breaks at buckets)
            self.module = torch.compile(self.module)
        self.trainable = [(n, q) for n, q in self.module.named_parameters() if q.requires_grad]
        self.opt = make_optimizer(self.trainable, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_lambda(s, p.warmup, p.max_steps, cfg.min_lr_ratio))
        self.step = 0
        if p.resume_state is not None:
            self._load_state(p.resume_state)

    def _load_weights(self, module: LMLoss) -> None:
        d = self.plan.resume_dir
        if self.cfg.mode == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.peft, load_file(str(d / "adapter_model.safetensors")))
        else:
            from codeshell.weights import load_state_into

            load_state_into(self.core, d, self.plan.model_cfg)

    def _load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if self.plan.world > 1:
            set_optimizer_state_dict(self.module, self.opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(_by_index(self.opt, state["optimizer"], self.trainable))
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng) == self.plan.world:  # dropout draws continue where they were (same world size)
            mine = rng[self.plan.rank]
            torch.set_rng_state(mine["cpu"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)

    def _rng(self) -> dict:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    # ---- data ---------------------------------------------------------------------------
    def _micro_batches(self, step: int):
        """The micro-batches of this rank for optimizer step `step` (deterministic in `step`)."""
        p, src = self.plan, self.plan.train
        per_rank = p.rows_per_step // p.world
        mb = self.cfg.micro_batch
        out = []
        for m in range(p.accum):
            rows = []
            for j in range(mb):
                k = step * per_rank + m * mb + j
                rows.append(src.row(k // src.per_epoch, k % src.per_epoch))
            out.append(src.collate(rows))
        return out

    def _all_sum(self, *xs: float) -> list[float]:
        if self.plan.world == 1:
            return list(xs)
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- one step -----------------------------------------------------------------------
    def train_step(self, meter: Meter) -> dict:
        p = self.plan
        t0 = time.perf_counter()
        batches = self._micro_batches(self.step)
        n_total, n_in = self._all_sum(float(sum(b.n_targets for b in batches)),
                                      float(sum(b.input_ids.numel() for b in batches)))
        meter.lap("data", t0)
        loss_sum = 0.0
        # bf16: each weight is cast once per step, not once per micro-batch (casts.py).
        with step_casts(self.autocast["enabled"] and not (p.world > 1 and self.cfg.dist == "fsdp")):
            for i, b in enumerate(batches):
                b = b.to(self.device)
                last = i == len(batches) - 1
                sync = self._sync_grads(last)
                with sync:
                    t1 = meter.now()
                    # DDP and FSDP average gradients over ranks: scale so the result is the mean
                    # over every target token of the global batch.
                    scale = p.world / max(n_total, 1.0)
                    with torch.autocast(**self.autocast):
                        loss, _ = self.module(b.input_ids, b.targets, b.position_ids, b.mask, scale=scale)
                    meter.lap("forward", t1)
                    t2 = meter.now()
                    loss.backward()
                    meter.lap("backward", t2)
                loss_sum += float(loss.detach()) / scale
        t3 = meter.now()
        params = [q for _, q in self.trainable]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"),
                                              foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        meter.lap("optimizer", t3)
        (loss_all,) = self._all_sum(loss_sum)
        self.step += 1
        return {"loss": loss_all / max(n_total, 1.0), "lr": lr, "grad_norm": float(norm), "targets": int(n_total),
                "tokens_step": int(n_in)}

    def _sync_grads(self, last: bool):
        import contextlib

        m = self.module
        if self.plan.world == 1 or last:
            if hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if hasattr(m, "no_sync"):  # DDP
            return m.no_sync()
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        src = self.plan.eval
        if src is None:
            return None
        self.module.eval()
        n_rows = min(src.per_epoch, -(-self.cfg.eval_rows // self.plan.world))
        tot = cnt = 0.0
        mb = self.cfg.micro_batch
        # Rows spread evenly over the held-out set rather than its first n_rows: held-out data is
        # read in file order, and its first rows are often one document source.
        ks = [i * src.per_epoch // n_rows for i in range(n_rows)]
        for s in range(0, n_rows, mb):
            b = src.collate([src.row(0, k) for k in ks[s: s + mb]]).to(self.device)
            with torch.autocast(**self.autocast):
                ls, n = self.module(b.input_ids, b.targets, b.position_ids, b.mask)
            tot += float(ls)
            cnt += n
        self.module.train()
        tot, cnt = self._all_sum(tot, cnt)
        return tot / max(cnt, 1.0)

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, final: bool = False) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        p, cfg = self.plan, self.cfg
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if p.world > 1:
            osd = get_optimizer_state_dict(self.module, self.opt, options=opts)
            msd = get_model_state_dict(self.module, options=opts) if cfg.mode != "lora" else None
            rng = [None] * p.world
            dist.all_gather_object(rng, self._rng())
        else:
            osd = _by_name(self.opt.state_dict(), self.trainable)
            msd = None if cfg.mode == "lora" else self.core.state_dict()
            rng = [self._rng()]
        path = None
        if p.rank == 0:
            if msd is not None:
                msd = {_strip(k): v for k, v in msd.items()}
            state = {"mode": cfg.mode, "step": self.step, "rows_per_step": p.rows_per_step,
                     "rows_per_rank": self.step * (p.rows_per_step // p.world), "world_size": p.world,
                     "tokens": self.step * cfg.batch_tokens, "optimizer": osd, "scheduler": self.sched.state_dict(),
                     "rng": rng, "model_config": p.model_cfg.to_dict(), "train_config": cfg.to_dict()}
            path = ckpt.save(self.run_dir, self.step, lambda d: self._write(d, msd, final), state, cfg.keep)
        if p.world > 1:
            dist.barrier()
        return path

    def _write(self, folder: Path, msd: dict | None, final: bool) -> None:
        if self.cfg.mode != "lora":
            ckpt.write_model(folder, msd, self.plan.model_cfg, self.plan.tokenizer_dir)
            return
        self.peft.save_pretrained(str(folder))
        (folder / "README.md").unlink(missing_ok=True)  # peft's model card template
        if final:  # the last LoRA checkpoint is also a full model folder (merged weights)
            _, sd = merged_state(self.peft)
            ckpt.write_model(folder, sd, self.plan.model_cfg, self.plan.tokenizer_dir)
        else:
            ckpt.copy_tokenizer(self.plan.tokenizer_dir, folder)

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        p, cfg = self.plan, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        peak = training_peak_flops(self.device, cfg.precision)
        fpt = flops_per_token(p.model_cfg, p.seq_len, lora=cfg.mode == "lora")
        meter = Meter(self.run_dir, cfg, p, peak, fpt, start_step=self.step, primary=p.rank == 0,
                      device=self.device)
        summary: dict[str, Any] = {"steps": p.max_steps, "start_step": self.step}
        try:
            while self.step < p.max_steps:
                meter.begin()
                row = self.train_step(meter)
                ev = None
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < p.max_steps:
                    t_ev = meter.now()
                    ev = self.evaluate()
                    meter.lap("eval", t_ev)  # kept out of the step's tokens/s (no dip in the curve)
                meter.end_step(self.step, row, ev)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < p.max_steps:
                    self.save()
            ev = self.evaluate()
            if ev is not None:
                meter.log_eval(self.step, ev)
                summary["eval_loss"] = ev
            path = self.save(final=True)
        finally:
            meter.close()
        summary.update(meter.summary())
        summary["checkpoint"] = str(path) if path else None
        return summary

    def close(self) -> None:
        torch.set_num_threads(self._threads)  # in-process callers (tests, notebooks) get theirs back
        if self.plan.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _strip(name: str) -> str:
    """Checkpoint (weight) names: drop the wrappers' prefixes (DDP, compile, LMLoss `model.`)."""
    name = _fqn(name)
    return name[len("model."):] if name.startswith("model.") else name


def _fqn(name: str) -> str:
    """Optimizer-state names: LMLoss's own names, as torch.distributed.checkpoint spells them."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _by_name(osd: dict, named: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """A one-process optimizer state keyed by parameter names (the distributed layout)."""
    names = [_fqn(n) for n, _ in named]
    state = {names[i]: s for i, s in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _by_index(opt: torch.optim.Optimizer, osd: dict, named: list[tuple[str, torch.nn.Parameter]]) -> dict:
    names = [_fqn(n) for n, _ in named]
    index = {n: i for i, n in enumerate(names)}
    missing = [n for g in osd["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise TrainError(f"the checkpoint's optimizer state names parameters this model lacks: {missing[:3]}")
    state = {index[n]: s for n, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def train(cfg: TrainConfig) -> dict:
    """Check, build, train, save. Under torchrun every process calls this."""
    plan = prepare(cfg)
    trainer = Trainer(plan)
    try:
        return trainer.run()
    finally:
        trainer.close()
