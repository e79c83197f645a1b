"""CodeShell model configuration: one frozen dataclass read from a checkpoint's ``config.json``.

Covers every released CodeShell variant (``model_type`` ``kclgpt`` or ``codeshell``) and
StarCoder-family checkpoints (``gpt_bigcode``), which are the same architecture with learned
absolute positions and one KV group. This module validates and normalises; it does not load
weights or build modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

CODESHELL_MODEL_TYPES = ("kclgpt", "codeshell")
BIGCODE_MODEL_TYPES = ("gpt_bigcode",)
SUPPORTED_MODEL_TYPES = CODESHELL_MODEL_TYPES + BIGCODE_MODEL_TYPES
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu", "silu")
POSITION_TYPES = ("rope", "learned_absolute")
ROPE_SCALING_TYPES = ("linear", "dynamic")


class ConfigError(ValueError):
    """A config.json value that is missing, unknown or inconsistent; the message names the field."""


@dataclass(frozen=True)
class CodeShellConfig:
    vocab_size: int = 70144
    n_positions: int = 8192
    n_embd: int = 4096
    n_layer: int = 42
    n_head: int = 32
    num_query_groups: int = 8
    n_inner: int | None = 16384
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    position_embedding_type: str = "rope"
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    rope_theta: float = 10000.0
    bos_token_id: int | None = 70000
    eos_token_id: int | None = 70000
    tie_word_embeddings: bool = True
    model_type: str = "kclgpt"
    # gpt_bigcode without multi_query stores c_attn per head as [q|k|v]; the loader reorders it.
    bigcode_interleaved_qkv: bool = False
    torch_dtype: str | None = None
    # An optional weight-only quantization scheme (written by `codeshell quantize`).
    quantization: dict | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config.json: invalid `{field}`: {msg}")

        for f in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_query_groups"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.n_embd % self.n_head == 0, "n_head", f"{self.n_head} heads do not divide n_embd={self.n_embd}")
        need(self.head_dim % 2 == 0 or self.position_embedding_type != "rope", "n_head",
             f"RoPE needs an even head size, got {self.head_dim}")
        need(self.n_head % self.num_query_groups == 0, "num_query_groups",
             f"{self.num_query_groups} KV groups do not divide n_head={self.n_head}")
        need(self.n_inner is None or (isinstance(self.n_inner, int) and self.n_inner > 0), "n_inner",
             f"must be null or a positive integer, got {self.n_inner!r}")
        need(self.activation_function in ACTIVATIONS, "activation_function",
             f"unknown activation {self.activation_function!r}; supported: {', '.join(ACTIVATIONS)}")
        need(self.position_embedding_type in POSITION_TYPES, "position_embedding_type",
             f"unknown {self.position_embedding_type!r}; supported: {', '.join(POSITION_TYPES)}")
        need(self.rope_scaling_type is None or self.rope_scaling_type in ROPE_SCALING_TYPES, "rope_scaling",
             f"unknown type {self.rope_scaling_type!r}; supported: {', '.join(ROPE_SCALING_TYPES)}")
        need(self.rope_scaling_factor > 0, "rope_scaling", f"factor must be > 0, got {self.rope_scaling_factor}")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", f"must be > 0, got {self.layer_norm_epsilon}")
        need(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
             f"unknown {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_query_groups

    @property
    def ffn_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def qkv_dim(self) -> int:
        return self.n_embd + 2 * self.kv_dim

    def replace(self, **kw: Any) -> "CodeShellConfig":
        return dataclasses.replace(self, **kw)

    def num_parameters(self) -> int:
        d, f, v = self.n_embd, self.ffn_dim, self.vocab_size
        per_layer = 4 * d + d * self.qkv_dim + self.qkv_dim + d * d + d + d * f + f + f * d + d
        n = v * d + self.n_layer * per_layer + 2 * d
        if self.position_embedding_type == "learned_absolute":
            n += self.n_positions * d
        if not self.tie_word_embeddings:
            n += v * d
        return n

    # ---- reading and writing config.json -------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CodeShellConfig":
        if "model_type" not in raw:
            raise ConfigError(
                "config.json: missing `model_type`; expected one of " + ", ".join(SUPPORTED_MODEL_TYPES))
        mt = raw["model_type"]
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json: invalid `model_type`: unknown {mt!r}; supported: "
                              + ", ".join(SUPPORTED_MODEL_TYPES))
        for req in ("n_embd", "n_layer", "n_head", "vocab_size"):
            if req not in raw:
                raise ConfigError(f"config.json: missing `{req}`")
        n_head = raw["n_head"]
        if mt in BIGCODE_MODEL_TYPES:
            mq = bool(raw.get("multi_query", True))
            groups = 1 if mq else n_head
            pos = "learned_absolute"
            interleaved = not mq
        else:
            gqa = raw.get("group_query_attention", False)
            groups = raw.get("num_query_groups", 1) if gqa else n_head
            if groups is None:
                raise ConfigError("config.json: invalid `num_query_groups`: null with group_query_attention true")
            pos = raw.get("position_embedding_type", "rope")
            interleaved = False
        rs = raw.get("rope_scaling")
        rs_type, rs_factor = None, 1.0
        if rs is not None:
            if not isinstance(rs, dict) or "type" not in rs and "rope_type" not in rs:
                raise ConfigError(f"config.json: invalid `rope_scaling`: expected {{'type': ..., 'factor': ...}}, got {rs!r}")
            rs_type = rs.get("type", rs.get("rope_type"))
            try:
                rs_factor = float(rs.get("factor", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"config.json: invalid `rope_scaling`: factor {rs.get('factor')!r} is not a number")
        tie = raw.get("tie_word_embeddings", True)
        return cls(
            vocab_size=raw["vocab_size"],
            n_positions=raw.get("n_positions", raw.get("max_position_embeddings", 8192)),
            n_embd=raw["n_embd"],
            n_layer=raw["n_layer"],
            n_head=n_head,
            num_query_groups=groups,
            n_inner=raw.get("n_inner"),
            activation_function=raw.get("activation_function", "gelu_pytorch_tanh"),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            position_embedding_type=pos,
            rope_scaling_type=rs_type,
            rope_scaling_factor=rs_factor,
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            tie_word_embeddings=bool(tie),
            model_type=mt,
            bigcode_interleaved_qkv=interleaved,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            quantization=raw.get("quantization"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CodeShellConfig":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The official CodeShell config.json layout (what `from_dict` reads back)."""
        d: dict[str, Any] = {
            "model_type": "codeshell" if self.model_type in BIGCODE_MODEL_TYPES else self.model_type,
            "architectures": ["CodeShellForCausalLM"],
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "n_head": self.n_head,
            "group_query_attention": self.num_query_groups != self.n_head,
            "num_query_groups": self.num_query_groups, "n_inner": self.n_inner,
            "activation_function": self.activation_function, "layer_norm_epsilon": self.layer_norm_epsilon,
            "position_embedding_type": self.position_embedding_type,
            "rope_scaling": None if self.rope_scaling_type is None
            else {"type": self.rope_scaling_type, "factor": self.rope_scaling_factor},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.rope_theta != 10000.0:
            d["rope_theta"] = self.rope_theta
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        if self.quantization:
            d["quantization"] = self.quantization
        return d


SHAPES: dict[str, CodeShellConfig] = {
    # The released CodeShell-7B.
    "7b": CodeShellConfig(),
    # A ~1B model of the same family, for quick benchmarks.
    "1b": CodeShellConfig(n_embd=2048, n_layer=24, n_head=16, num_query_groups=4, n_inner=8192),
    "tiny": CodeShellConfig(n_embd=64, n_layer=2, n_head=4, num_query_groups=2, n_inner=256, n_positions=512),
}
