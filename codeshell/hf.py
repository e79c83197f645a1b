"""transformers integration: `AutoConfig` / `AutoModelForCausalLM` for CodeShell checkpoints
(``model_type`` ``kclgpt`` or ``codeshell``) with no ``trust_remote_code``.

The model is a thin `PreTrainedModel` wrapper around the engine's own modules
(`codeshell.model.CodeShellModel`), so both paths compute the same numbers. It supports
`.generate()`, `labels` for the loss, gradient checkpointing and peft LoRA (fine-tuning
builds on it). Registered when `codeshell` is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import CodeShellConfig
from .model import CodeShellBlock, CodeShellModel, padding_mask, positions_from_mask


class CodeShellHFConfig(PreTrainedConfig):
    # transformers 5 configs are dataclasses: fields are declared, not set in __init__.
    model_type = "codeshell"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_hidden_layers": "n_layer", "max_position_embeddings": "n_positions"}

    vocab_size: int = 70144
    n_positions: int = 8192
    n_embd: int = 4096
    n_layer: int = 42
    n_head: int = 32
    group_query_attention: bool = True
    num_query_groups: int | None = 8
    n_inner: int | None = None
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    position_embedding_type: str = "rope"
    rope_scaling: dict | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 70000
    eos_token_id: int | None = 70000
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def to_codeshell(self) -> CodeShellConfig:
        d = {k: getattr(self, k) for k in (
            "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "group_query_attention",
            "num_query_groups", "n_inner", "activation_function", "layer_norm_epsilon",
            "position_embedding_type", "rope_scaling", "bos_token_id", "eos_token_id")}
        d["model_type"] = self.model_type
        d["tie_word_embeddings"] = getattr(self, "tie_word_embeddings", True)
        return CodeShellConfig.from_dict(d)


class KCLGPTConfig(CodeShellHFConfig):
    """The `model_type` the released CodeShell checkpoints carry."""
    model_type = "kclgpt"


class _DynamicCacheAdapter:
    """Our layers call `update(layer, k, v)`; transformers' caches take `update(k, v, layer)`."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(k, v, layer)


class CodeShellHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CodeShellHFConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CodeShellBlock"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"attn\.bias", r"attn\.masked_bias"]
    _supports_sdpa = True

    def __init__(self, config: CodeShellHFConfig):
        super().__init__(config)
        self.cs_config = config.to_codeshell()
        self.transformer = CodeShellModel(self.cs_config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                cache_position: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        # transformers 5 calls the KV cache `cache` (formerly `past_key_values`).
        past_key_values = cache if cache is not None else kwargs.pop("past_key_values", None)
        ref = input_ids if input_ids is not None else inputs_embeds
        B, T = ref.shape[:2]
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=ref.device).expand(B, T)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask[:, -(past + T):], past)
        elif past > 0 and T > 1:
            mask = padding_mask(torch.ones(B, past + T, dtype=torch.bool, device=ref.device), past)
        else:
            mask = None  # plain causal (or a single new token that sees everything)
        cache = _DynamicCacheAdapter(past_key_values) if use_cache else None
        h = self.transformer(input_ids, position_ids, mask, cache, seq_len=past + T, inputs_embeds=inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=past_key_values if use_cache else None)


class KCLGPTForCausalLM(CodeShellHFForCausalLM):
    config_class = KCLGPTConfig


_registered = False


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `codeshell` and `kclgpt` (idempotent)."""
    global _registered
    if _registered:
        return
    for cfg_cls, model_cls in ((CodeShellHFConfig, CodeShellHFForCausalLM), (KCLGPTConfig, KCLGPTForCausalLM)):
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _registered = True


__all__ = ["CodeShellHFConfig", "KCLGPTConfig", "CodeShellHFForCausalLM", "KCLGPTForCausalLM",
           "CodeShellBlock", "register"]
