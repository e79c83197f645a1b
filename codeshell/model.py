"""The CodeShell transformer, with the checkpoint's own parameter names.

Pre-LayerNorm GPT-2 blocks with biases, a fused ``c_attn`` projection split as
[query n_embd | key kv_dim | value kv_dim], RoPE (rotate-half, linear or dynamic-NTK scaling)
or learned absolute positions, grouped-query attention, GELU-tanh MLP, final LayerNorm and an
output head tied to ``transformer.wte`` unless the checkpoint stores its own.

This module is the math only: it neither owns a KV cache nor samples. A caller hands
``forward`` a cache object (anything with ``update(layer, k, v) -> (k_all, v_all)``) and,
when the batch is not plainly causal, a boolean attention mask. The engine
(``codeshell.engine``) and the transformers wrapper (``codeshell.hf``) are such callers.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import CodeShellConfig


class LayerCache(Protocol):
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, G, T, D] for `layer`; return every cached key and value [B, G, S, D]."""

    # Optional: `attend(layer, q, k, v, scale)` stores k, v and returns the attention output
    # [B, H, T, D] computed by the cache's own kernel, or None to fall back to `update` + SDPA.
    # Optional: `mask()` -> bool [B, 1, T, S], the mask for the keys `update` returns, used when
    # the caller passed none (the engine's views build theirs only where SDPA runs).


def _cached_sdpa(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, cache: LayerCache | None) -> torch.Tensor:
    """Attention by torch's SDPA over the cache's keys: q [B, H, T, D], new k, v [B, G, T, D]
    (stored first); the mask is the caller's, else the cache's own (`mask()`), else causal."""
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [B, G, S, D]
        if mask is None and hasattr(cache, "mask"):
            mask = cache.mask()
    # SDPA with a boolean mask (True = attend); softmax accumulates in float32 inside the
    # fused CPU/CUDA kernels. GQA: query head h reads KV group h // (H / G).
    H, T, D, G = q.shape[1], q.shape[2], q.shape[3], k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
        scale=1.0 / math.sqrt(D), enable_gqa=G != H)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in _GELU_TANH:
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation_function {name!r}")


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _fused_ops():
    """The native extension (its fused ops: csrc/fused.cpp) when this process has loaded it
    already, else None. Never triggers the build: a model that runs without the kernels (a
    training job, a machine without a compiler) keeps the plain torch path."""
    from .kernels import _ext
    return _ext._state.get("mod")


def _linear_rows(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear's output [M, N] for x [..., K] as its kernel returns it: fp32 from the packed
    and quantized linears (`forward_raw`, before their cast to x's dtype), else the module's
    own output. The fused ops take it and round it where the plain path casts it."""
    raw = getattr(linear, "forward_raw", None)
    if raw is not None:
        return raw(x)
    y = linear(x)
    return y.reshape(-1, y.shape[-1])


def rope_inv_freq(cfg: CodeShellConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2] for a sequence of total length `seq_len`.

    Dynamic NTK scaling (as the official code) raises the base once the sequence outgrows
    `n_positions`: base * (f * L / n_positions - (f - 1)) ** (D / (D - 2)).
    """
    dim = cfg.head_dim
    base = cfg.rope_theta
    if cfg.rope_scaling_type == "dynamic" and seq_len > cfg.n_positions:
        f = cfg.rope_scaling_factor
        base = base * ((f * seq_len / cfg.n_positions) - (f - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rope_cos_sin(cfg: CodeShellConfig, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, D] (float32) for integer positions [B, T]."""
    inv_freq = rope_inv_freq(cfg, seq_len, positions.device)
    t = positions.to(torch.float32)
    if cfg.rope_scaling_type == "linear":
        t = t / cfg.rope_scaling_factor
    freqs = t[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, D], computed in float32 and returned in x's dtype:
    y = x * cos + cat(-x2, x1) * sin for the halves x1, x2 of the last dimension.

    Written per half into one float32 buffer: the same float32 products and sums (so the same
    bits) as the textbook form, but x is read in its own dtype (bf16 -> float32 is exact) and
    neither x's float32 copy nor the rotated copy is made: 6 half-width passes instead of 7
    full-width ones. cos/sin [B, 1, T, D] repeat their halves (see `rope_cos_sin`)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).sub_(x2 * s)  # x1 c - x2 s  (== x1 c + (-x2) s exactly)
    torch.mul(x2, c, out=o2).add_(x1 * s)  # x2 c + x1 s
    return out.to(x.dtype)


class _RopeFn(torch.autograd.Function):
    """RoPE with its gradient written out. The rotation by angle t has the rotation by -t as its
    transpose, so the gradient is `_rotate(grad, cos, -sin)`: one pass, the same float32 math
    autograd would do, but nothing of x saved. Autograd through `_rotate` keeps x's float32
    copy and its rotated copy alive until backward (2 x 4 bytes per element of q and k, every
    layer) and replays the cat/neg/mul/add chain; training time and memory both drop."""

    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: D102 (x [B, H, T, D]; cos, sin [B, 1, T, D] float32)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, D], computed in float32 and returned in x's dtype (the
    same numbers with or without autograd; `_RopeFn` only changes how the gradient is made)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _RopeFn.apply(x, cos, sin)
    return _rotate(x, cos, sin)


class CodeShellAttention(nn.Module):
    def __init__(self, cfg: CodeShellConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.c_attn = nn.Linear(cfg.n_embd, cfg.qkv_dim)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: LayerCache | None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.n_head, cfg.num_query_groups, cfg.head_dim
        qkv = self.c_attn(x)  # [B, T, (H + 2G) * D]: query heads, key heads, value heads
        qk_dim = cfg.n_embd + cfg.kv_dim
        if rope is not None:
            # q and k rotated in one pass as the first H + G heads of qkv: the same elementwise
            # math as rotating each (the same bits), half the calls; at decode sizes each call
            # costs more than its arithmetic (8M codeshell-mini, M = 1: ~25 us a layer saved).
            qk = apply_rope(qkv[..., :qk_dim].view(B, T, H + G, D).transpose(1, 2), *rope)
            q, k = qk[:, :H], qk[:, H:]  # [B, H, T, D], [B, G, T, D]
        else:
            q = qkv[..., :cfg.n_embd].view(B, T, H, D).transpose(1, 2)
            k = qkv[..., cfg.n_embd:qk_dim].view(B, T, G, D).transpose(1, 2)
        v = qkv[..., qk_dim:].view(B, T, G, D).transpose(1, 2)
        attend = getattr(cache, "attend", None)
        y = attend(self.layer, q, k, v, 1.0 / math.sqrt(D)) if attend is not None else None
        if y is None:
            y = _cached_sdpa(self.layer, q, k, v, mask, cache)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_embd)
        return self.c_proj(y)

    def forward_inference(self, x: torch.Tensor, rope_rows: tuple[torch.Tensor, torch.Tensor] | None,
                          mask: torch.Tensor | None, cache: LayerCache | None, f,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without autograd, with RoPE done by one native call instead of ~12 torch
        ops (`f.fused_rope_bf16` from the kernel's fp32 qkv: the cast and the rotation in one
        pass; `f.fused_rope_` in place otherwise; the same fp32 math as `_rotate`, the same
        bits); q, k, v are then views of qkv. rope_rows: cos, sin [B*T, D/2] float32.
        Returns c_proj's output rows [B*T, C] as the kernel gives them (fp32 in a bf16 model:
        the caller's fused add rounds them as the plain path's cast would).
        rows (int64 [R], flat indices into the B*T rows; the prompt's last block, see
        `CodeShellModel.forward`): every row's keys and values are stored, but only these
        queries attend (the cache's `attend_rows` where it has one: decode's kernel per query,
        whose bits do not depend on the other queries; else the whole attention, then these
        rows) and c_proj runs on these R rows only: returns [R, C]."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.n_head, cfg.num_query_groups, cfg.head_dim
        qkv = _linear_rows(self.c_attn, x).contiguous()  # [B*T, (H + 2G) * D]
        if rope_rows is not None and qkv.dtype != x.dtype:  # fp32 out of a bf16 model's kernel:
            qkv = f.fused_rope_bf16(qkv, rope_rows[0], rope_rows[1], H + G, D)  # cast + rotate q, k
        elif rope_rows is not None:
            f.fused_rope_(qkv, rope_rows[0], rope_rows[1], H + G, D)  # q and k heads, in place
        elif qkv.dtype != x.dtype:
            qkv = qkv.to(x.dtype)
        heads = qkv.view(B, T, H + 2 * G, D).transpose(1, 2)  # [B, H + 2G, T, D], a view
        q, k, v = heads[:, :H], heads[:, H:H + G], heads[:, H + G:]
        if rows is not None:
            attend_rows = getattr(cache, "attend_rows", None)
            y = attend_rows(self.layer, q, k, v, 1.0 / math.sqrt(D), rows) if attend_rows is not None else None
            if y is not None:  # [R, C]
                return _linear_rows(self.c_proj, y)
        attend = getattr(cache, "attend", None)
        y = attend(self.layer, q, k, v, 1.0 / math.sqrt(D)) if attend is not None else None
        if y is None:
            y = _cached_sdpa(self.layer, q, k, v, mask, cache)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_embd)
        if rows is not None:
            y = y.reshape(B * T, cfg.n_embd)[rows]
        return _linear_rows(self.c_proj, y)  # [B*T, C] (or [R, C])


class CodeShellMLP(nn.Module):
    def __init__(self, cfg: CodeShellConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd)
        self.act = _activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))

    def forward_inference(self, x: torch.Tensor, f, gelu_tanh: bool) -> torch.Tensor:
        """x [M, C] -> [M, C] without autograd (c_proj's rows as its kernel returns them, see
        `_linear_rows`). With a GELU-tanh activation it runs natively on c_fc's fp32 kernel
        output, rounded to the model's dtype first exactly where the plain path casts it: one
        call for cast + GELU."""
        if not gelu_tanh:
            return _linear_rows(self.c_proj, self.act(self.c_fc(x)))
        # A bf16 prefill GEMM applies the GELU in its epilogue (the same bits, see
        # `PackedLinear.forward_gelu`): c_fc's fp32 output is never written out.
        gelu = getattr(self.c_fc, "forward_gelu", None)
        h = gelu(x) if gelu is not None else None
        if h is not None:
            return _linear_rows(self.c_proj, h)
        y = _linear_rows(self.c_fc, x)
        if y.dtype != x.dtype and y.dtype != torch.float32:
            y = y.to(x.dtype)
        return _linear_rows(self.c_proj, f.fused_gelu_tanh(y.contiguous(), None, x.dtype == torch.bfloat16))


class CodeShellBlock(nn.Module):
    def __init__(self, cfg: CodeShellConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CodeShellAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = CodeShellMLP(cfg)

    def forward(self, x: torch.Tensor, rope, mask, cache) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class CodeShellModel(nn.Module):
    """`transformer.*`: embeddings, blocks, final LayerNorm. Returns hidden states."""

    def __init__(self, cfg: CodeShellConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.position_embedding_type == "learned_absolute":
            self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(CodeShellBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        # transformers' gradient_checkpointing_enable() sets these two attributes.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerCache | None = None,
                seq_len: int | None = None, inputs_embeds: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], position_ids [B, T] -> hidden [B, T, n_embd].

        rows: int64 [R] flat indices into the B*T positions (row b, position t: b * T + t); then
        only those positions' hidden states are returned, [R, n_embd] (the engine's prefill
        samples one position a row). On the fused inference path the last block then runs its
        attention output, MLP and the final LayerNorm on those R rows only (every position's
        keys and values are still stored): each of those ops' per-row bits do not depend on the
        other rows (the row-invariant linears, decode's attention kernel per query on AVX2), so
        the returned rows are what the whole forward gives them, for ~1/n_layer less work.
        Elsewhere the whole forward runs and the rows are picked from it.

        mask: bool [B, 1, T, S] (True = attend) over the S keys this call attends to (cache
        plus new tokens), or None for plain causal attention over the T new tokens.
        seq_len: the total sequence length, for dynamic NTK scaling (default max position + 1).
        """
        cfg = self.cfg
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        # Not under autocast (a training job's held-out pass): there the linears return bf16
        # into an fp32 residual, and the plain path's autocast rules are the ones to follow.
        f = None if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) else _fused_ops()
        fused = f is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        rope = None
        if cfg.position_embedding_type == "rope":
            L = seq_len if seq_len is not None else int(position_ids.max()) + 1
            rope = self._rope_rows(position_ids, L) if fused else rope_cos_sin(cfg, position_ids, L)
        else:
            if int(position_ids.max()) >= cfg.n_positions:
                raise ValueError(f"position {int(position_ids.max())} is past n_positions={cfg.n_positions} "
                                 "(learned absolute position embeddings cannot extrapolate)")
            x = x + self.wpe(position_ids)
        if fused:
            return self._forward_inference(x, rope, mask, cache, f, rows)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if checkpointing:
                fn = self._gradient_checkpointing_func or _default_checkpoint
                x = fn(block.__call__, x, rope, mask, cache)
            else:
                x = block(x, rope, mask, cache)
        x = self.ln_f(x)
        return x if rows is None else x.reshape(-1, x.shape[-1])[rows]


    def _rope_rows(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B*T, D/2] float32 for the fused RoPE: `rope_cos_sin`'s first halves (the
        same float32 products, so the same values) without the concatenated copy, with the
        inverse frequencies kept between calls (they change only with a dynamic-NTK base)."""
        cfg = self.cfg
        dynamic = cfg.rope_scaling_type == "dynamic" and seq_len > cfg.n_positions
        key = (positions.device, seq_len if dynamic else None)
        cached = self.__dict__.get("_inv_freq")
        if cached is None or cached[0] != key:
            cached = self._inv_freq = (key, rope_inv_freq(cfg, seq_len, positions.device))
        t = positions.to(torch.float32)
        if cfg.rope_scaling_type == "linear":
            t = t / cfg.rope_scaling_factor
        freqs = (t[..., None] * cached[1]).reshape(-1, cached[1].shape[0])  # [B*T, D/2]
        return freqs.cos(), freqs.sin()

    def _forward_inference(self, x: torch.Tensor, rope, mask, cache, f, rows=None) -> torch.Tensor:
        """The blocks and the final LayerNorm without autograd (grad disabled: the engine, HF
        generate), on rows [B*T, C] with fused native ops (csrc/fused.cpp): each residual add
        and the LayerNorm after it in one pass (`fused_add_layer_norm`: the block's
        `x + attn(...)`, then ln_2; `x + mlp(...)`, then the next ln_1 or ln_f), RoPE in place
        (`CodeShellAttention.forward_inference`) and cast + GELU in one call. Per layer at decode
        that is ~20 fewer torch ops (each a few microseconds at any model size). The same math
        as `CodeShellBlock.forward` (the adds rounded as torch rounds them); tests/kernels/
        test_fused.py compares the two paths. `rows` (see `forward`): the last block past its
        keys and values, and the final LayerNorm, on those rows only; returns [R, C]."""
        from .kernels import step as native_step
        out = native_step.forward(self, x, rope, mask, cache)  # a packed decode / verify step in one
        if out is not None:                                     # native call (kernels/step.py), else None
            return out if rows is None else out.reshape(-1, out.shape[-1])[rows]
        cfg = self.cfg
        B, T, C = x.shape
        rope_rows = rope  # cos, sin [B*T, D/2] (`_rope_rows`) or None
        gelu_tanh = cfg.activation_function in _GELU_TANH
        h, pending = x.reshape(B * T, C).contiguous(), None
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            ln = block.ln_1
            h, a = f.fused_add_layer_norm(h, pending, ln.weight, ln.bias, ln.eps)
            sel = rows if i == last else None
            y = block.attn.forward_inference(a.view(B, T, C), rope_rows, mask, cache, f, sel)
            if sel is not None:  # the residual of the rows that go on ([R, C], contiguous)
                h = h[sel]
            ln = block.ln_2
            h, a = f.fused_add_layer_norm(h, _residual(y, h), ln.weight, ln.bias, ln.eps)
            pending = _residual(block.mlp.forward_inference(a, f, gelu_tanh), h)
        ln = self.ln_f
        _, out = f.fused_add_layer_norm(h, pending, ln.weight, ln.bias, ln.eps)
        return out.view(B, T, C) if rows is None else out if last >= 0 else out[rows]


def _residual(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A block's output rows as `fused_add_layer_norm` takes them: contiguous, h's dtype or fp32
    (fp32 into a bf16 residual is rounded to bf16 first, as the plain path's cast)."""
    if y.dtype != h.dtype and y.dtype != torch.float32:
        y = y.to(h.dtype)
    return y.contiguous()


def _default_checkpoint(fn, *args):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(fn, *args, use_reentrant=False)


class CodeShellForCausalLM(nn.Module):
    """The whole model: `transformer` plus `lm_head` (tied to `transformer.wte` by default)."""

    def __init__(self, cfg: CodeShellConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = CodeShellModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: LayerCache | None = None,
                seq_len: int | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for every position (see `CodeShellModel.forward`)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.lm_head(self.transformer(input_ids, position_ids, mask, cache, seq_len))


def padding_mask(attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Causal + padding mask [B, 1, T, past+T] from a 0/1 mask [B, past+T] over all keys.

    A padded query position may always see itself, so no softmax row is empty (an empty row
    gives NaN, which would leak into later layers through the padded keys' values).
    """
    am = attention_mask.bool()
    B, S = am.shape
    T = S - past
    q_pos = torch.arange(past, S, device=am.device)[:, None]
    k_pos = torch.arange(S, device=am.device)[None, :]
    causal = k_pos <= q_pos  # [T, S]
    mask = causal[None] & am[:, None, :]  # [B, T, S]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] that count only real tokens (left padding gets position 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)
