"""The training configuration: one frozen dataclass whose fields are at once the YAML keys and
the command-line flags of `codeshell train` (``batch_tokens`` is ``--batch-tokens`` and
``batch_tokens:`` or ``batch-tokens:`` in YAML), plus the model size presets.

This module validates values and merges defaults < YAML < flags. It does not look at data,
checkpoints or devices (that is `codeshell.train.setup`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codeshell.config import SHAPES, CodeShellConfig

MODES = ("pretrain", "sft", "lora")


class TrainError(ValueError):
    """Bad input to training (a flag, a YAML key, data, a checkpoint): the message says what is wrong."""


# Size presets for new models. All use the released tokenizer's vocabulary (70144) so any
# CodeShell tokenizer fits; the 1B and 7B shapes are the project's own (`codeshell.config.SHAPES`).
PRESETS: dict[str, CodeShellConfig] = {
    "tiny": SHAPES["tiny"],  # the tests' shape: 2 layers, 64 wide (~4.6M, nearly all embedding)
    "25m": CodeShellConfig(n_embd=256, n_layer=10, n_head=8, num_query_groups=2, n_inner=1024, n_positions=2048),
    "125m": CodeShellConfig(n_embd=768, n_layer=12, n_head=12, num_query_groups=4, n_inner=3072, n_positions=2048),
    "1b": SHAPES["1b"],
    "7b": SHAPES["7b"],
}

# Per-mode defaults for the fields left as None below.
MODE_DEFAULTS = {
    "pretrain": {"lr": 3e-4, "weight_decay": 0.1},
    "sft": {"lr": 2e-5, "weight_decay": 0.0},
    "lora": {"lr": 2e-4, "weight_decay": 0.0},
}


def _f(default: Any, help: str, *, modes: tuple[str, ...] = MODES, short: str | None = None) -> Any:
    """A field with its CLI help; `modes` lists the commands that show it as a flag."""
    return field(default=default, metadata={"help": help, "modes": modes, "short": short})


@dataclass(frozen=True)
class TrainConfig:
    mode: str = _f("pretrain", "pretrain, sft or lora (set by the command).", modes=())
    data: str | None = _f(None, "Training data: a folder of packed shards (pretrain) or JSONL file/folder (sft, lora).")
    output: str = _f("runs/train", "Run folder: checkpoints, metrics.jsonl, config.yaml.", short="-o")
    model: str | None = _f(None, "Checkpoint to start from (folder or hub id). Required for sft and lora.")
    preset: str | None = _f(None, "New model of this size: " + ", ".join(PRESETS) + " (pretrain).",
                            modes=("pretrain",))
    model_config: str | None = _f(None, "New model from this config.json (pretrain).", modes=("pretrain",))
    tokenizer: str | None = _f(None, "Tokenizer folder (default: the model's). Copied into every checkpoint.")
    seq_len: int | None = _f(None, "Sequence length (pretrain: the shards'; sft/lora default 2048, at most n_positions).")
    batch_tokens: int = _f(32768, "Tokens per optimizer step, over all processes (a multiple of seq_len).")
    micro_batch: int = _f(1, "Sequences per forward pass per process (gradient accumulation makes up the rest).")
    max_steps: int | None = _f(None, "Optimizer steps (default: --tokens, else one epoch).")
    tokens: int | None = _f(None, "Training tokens in all (steps = tokens / batch_tokens).")
    lr: float | None = _f(None, "Peak learning rate (default 3e-4 pretrain, 2e-5 sft, 2e-4 lora).")
    min_lr_ratio: float = _f(0.1, "Cosine decay ends at lr x this.")
    warmup_steps: int | None = _f(None, "Linear warmup steps (default: 5% of the steps).")
    weight_decay: float | None = _f(None, "AdamW weight decay on matrices (default 0.1 pretrain, 0 sft/lora).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    seed: int = _f(0, "Seed for initialisation, data order and dropout.")
    precision: str = _f("bf16", "bf16 (autocast, float32 master weights) or fp32.")
    activation_checkpointing: bool = _f(False, "Recompute each block in the backward pass (less memory).")
    dist: str = _f("ddp", "ddp or fsdp (FSDP2 fully_shard) when run under torchrun.")
    device: str = _f("auto", "cpu, cuda or auto.")
    compile: bool = _f(False, "torch.compile the model.")
    threads: int | None = _f(None, "CPU threads per process (default: torch's).")
    save_every: int = _f(500, "Checkpoint every N steps (and always at the end).")
    keep: int = _f(3, "Keep the last K checkpoints.")
    eval_data: str | None = _f(None, "Held-out data in the same format as --data.")
    eval_every: int = _f(0, "Held-out loss every N steps (0: only at the end; needs --eval-data).")
    eval_rows: int = _f(64, "At most this many held-out sequences per evaluation.")
    log_every: int = _f(1, "Write metrics every N steps.")
    resume: bool = _f(False, "Continue from the latest checkpoint in --output.")
    resume_from: str | None = _f(None, "Continue from this checkpoint folder.")
    shuffle: bool = _f(True, "Shuffle the data each epoch (seeded).")
    packing: str = _f("pack", "sft/lora: pack examples into sequences (pack) or batch by length (bucket).",
                      modes=("sft", "lora"))
    fim_rate: float = _f(0.0, "sft/lora: rewrite this share of text rows as fill-in-the-middle (the pipeline's scheme).",
                         modes=("sft", "lora"))
    fim_spm_rate: float = _f(0.5, "Share of FIM rows in SPM order.", modes=("sft", "lora"))
    lora_r: int = _f(16, "LoRA rank.", modes=("lora",))
    lora_alpha: float = _f(32.0, "LoRA alpha (scale alpha / r).", modes=("lora",))
    lora_dropout: float = _f(0.05, "LoRA dropout.", modes=("lora",))
    lora_targets: str = _f("c_attn,c_proj,c_fc", "Comma-separated module names LoRA adapts.", modes=("lora",))
    base_dtype: str | None = _f(None, "dtype of the frozen base weights for lora (default bfloat16).", modes=("lora",))
    tensorboard: bool = _f(True, "Also write TensorBoard events when tensorboard is installed.")

    # ---- derived ------------------------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else MODE_DEFAULTS[self.mode]["lr"]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else MODE_DEFAULTS[self.mode]["weight_decay"]

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainError(msg)

        need(self.mode in MODES, f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        need(self.data is not None, "no training data: give DATA (or `data:` in the YAML file)")
        for k in ("batch_tokens", "micro_batch", "keep", "eval_rows", "log_every"):
            need(getattr(self, k) >= 1, f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        for k in ("max_steps", "tokens", "seq_len"):
            v = getattr(self, k)
            need(v is None or v >= 1, f"--{k.replace('_', '-')} must be >= 1, got {v}")
        need(self.seq_len is None or self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}")
        need(self.peak_lr > 0, f"--lr must be > 0, got {self.peak_lr}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(self.decay >= 0, f"--weight-decay must be >= 0, got {self.decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        need(self.save_every >= 0 and self.eval_every >= 0, "--save-every and --eval-every must be >= 0")
        need(self.precision in ("bf16", "fp32"), f"--precision must be bf16 or fp32, got {self.precision!r}")
        need(self.dist in ("ddp", "fsdp"), f"--dist must be ddp or fsdp, got {self.dist!r}")
        need(self.packing in ("pack", "bucket"), f"--packing must be pack or bucket, got {self.packing!r}")
        need(0 <= self.fim_rate <= 1 and 0 <= self.fim_spm_rate <= 1, "--fim-rate and --fim-spm-rate must be in [0, 1]")
        need(self.base_dtype in (None, "float32", "bfloat16", "float16"),
             f"--base-dtype must be float32, bfloat16 or float16, got {self.base_dtype!r}")
        need(not (self.resume and self.resume_from), "give --resume or --resume-from, not both")
        if self.mode == "pretrain":
            chosen = [k for k in ("model", "preset", "model_config") if getattr(self, k)]
            need(len(chosen) == 1, "pretrain needs exactly one of --model (continue a checkpoint), "
                 f"--preset ({', '.join(PRESETS)}) or --model-config (a config.json)"
                 + (f"; got {', '.join('--' + c.replace('_', '-') for c in chosen)}" if chosen else ""))
            need(self.preset is None or self.preset in PRESETS,
                 f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        else:
            need(self.model is not None, f"{self.mode} needs --model (the checkpoint to fine-tune)")
        if self.mode == "lora":
            need(self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}")
            need(self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
            need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            need(bool(self.targets), "--lora-targets names no module")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML config file, `-` spelled as `_`; unknown keys are an error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TrainError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TrainError(f"config file {p} must be a mapping of keys to values")
    out = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS or key == "mode":
            raise TrainError(f"config file {p}: unknown key {k!r}; valid keys: "
                             + ", ".join(n for n in FIELDS if n != "mode"))
        out[key] = v
    return out


def _coerce(name: str, value: Any) -> Any:
    """YAML values into the field's type (YAML reads 3e-4 as a string, ints as ints...)."""
    f = FIELDS[name]
    default = f.default
    typ = str(f.type)
    if value is None:
        return None
    try:
        if "bool" in typ:
            if isinstance(value, bool):
                return value
            raise ValueError
        if "int" in typ and "float" not in typ:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if "float" in typ:
            return float(value)
        if "str" in typ:
            if isinstance(value, (list, tuple)) and name == "lora_targets":
                return ",".join(map(str, value))
            return str(value)
    except (TypeError, ValueError):
        pass
    raise TrainError(f"`{name}` must be {typ.replace(' | None', '')}, got {value!r} (default {default!r})")


def make_config(mode: str, yaml_path: str | Path | None = None, **flags: Any) -> TrainConfig:
    """defaults < YAML < flags (flags left as None are not given)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(read_yaml(yaml_path))
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise TrainError(f"unknown option(s): {', '.join(unknown)}")
    values = {k: _coerce(k, v) for k, v in values.items()}
    values["mode"] = mode
    return TrainConfig(**values).validate()
