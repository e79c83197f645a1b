"""The native decode step: a decode or prompt-lookup verify step's blocks in one native call.

What this is: the Python side of the native decode step (csrc/decode_step.h and the files it names). `forward` is what
`CodeShellModel._forward_inference` calls first: when the step is one the native `DecodeStep`
takes (the engine's `PackedView` cache, bf16 rows, M <= ROW_INVARIANT_MAX_M, every linear a
native `FastLinear`, GELU-tanh, the native attention), it runs every block and ln_f in one call
and returns the result, bit for bit what the Python fused path returns (the same entry points
on the same inputs); else None, and the caller runs the Python path. The `DecodeStep` is built
once per model (the linears' tensors and the kernel `ops.plan` names for each at M <= 64, fixed
per weight there) and rebuilt when a linear's weight or bias, a LayerNorm parameter, the module
structure or the ISA cap (CODESHELL_KERNEL_ISA) changes.
`decode` goes one call further for the engine's packed steps (`Engine._packed`): from the token
ids to the logits and the greedy picks (the embedding rows, RoPE's rows, the blocks, ln_f, the
output head and its argmax in the same native call), for the same bits as the model's forward,
`lm_head` and `sampling.first_argmax`; the engine's Python per step is then the scheduling and
the sequences' bookkeeping.
`CODESHELL_DECODE_STEP=off` forces the Python path (tests, A/B timing);
`CODESHELL_DECODE_TEAM=off|on|auto` whether the step runs in one thread team (on by default; see `team_mode`).

What this is not: a prefill path, an fp32-model path, or a kernel dispatcher (`ops.plan` names
the kernels; this only maps its names to the native codes).
"""

from __future__ import annotations

import math
import operator
import os
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _TORCH_MODULE  # its global forward hooks (`decode`)

from . import _ext, ops
from .module import FastLinear, PackedLinear

# ops.plan's path -> (csrc/decode_step.cpp's Kernel code); the isa is the path's prefix level.
_KERNELS = {("bf16", "amx:bf16"): 0, ("bf16", "avx512_bf16:panel"): 1, ("bf16", "avx2:panel"): 2,
            ("bf16", "avx512_vnni:panel"): 2,
            ("int8", "avx512_vnni:q8"): 3, ("int8", "avx2:q8"): 3, ("int4", "avx512_vnni:q8"): 3,
            ("int4", "avx2:q8"): 3, ("int8", "avx2:unpack"): 4, ("int4", "avx2:unpack"): 4,
            ("int8", "amx:q8"): 3, ("int4", "amx:q8"): 3}
_KINDS = {"bf16": 0, "int8": 1, "int4": 2}

# CodeShellForCausalLM -> _Decoder (`decode`'s step with its checks), weak for the same reason.
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, _Decoder]" = weakref.WeakKeyDictionary()
# model -> (sources, isa cap, DecodeStep or None): weak, so the cache neither keeps a model
# alive nor travels with it (state_dict, deepcopy, pickling never see it).
_STEPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_PACKED_VIEW: list = []  # codeshell.engine.kv_cache.PackedView, imported at first use
# `decode`'s per-step reads, made cheap (it runs before every native call, with the caches cold
# from the step before: docs/kernels-log.md, session 20 helper B): the environment as os.environ's
# own dict (bytes keys and values; os.environ.get encodes the key and decodes the value at each
# call, and `os.putenv` bypasses both alike), ROW_INVARIANT_MAX_M bound once, and the extension's
# `same_entries` for the rebuild check (`_Checks.valid_native`).
_ENV = getattr(os.environ, "_data", None)
if not isinstance(_ENV, dict):  # not CPython's os._Environ: read through os.environ (str keys)
    _ENV, _STEP_KEY, _ISA_KEY, _TEAM_KEY = os.environ, "CODESHELL_DECODE_STEP", "CODESHELL_KERNEL_ISA", "CODESHELL_DECODE_TEAM"
else:
    _STEP_KEY, _ISA_KEY, _TEAM_KEY = (os.fsencode(k) for k in ("CODESHELL_DECODE_STEP", "CODESHELL_KERNEL_ISA",
                                                                "CODESHELL_DECODE_TEAM"))
_MAX_M = ops.ROW_INVARIANT_MAX_M
_SAME: list = []  # the extension's same_entries, set when the first decoder is built
_VERSION = operator.attrgetter("_version")


def enabled() -> bool:
    """False when CODESHELL_DECODE_STEP=off (the Python path then runs every step)."""
    v = os.environ.get("CODESHELL_DECODE_STEP")
    if v is None or v == "on":
        return True
    if v == "off":
        return False
    raise ValueError(f"CODESHELL_DECODE_STEP={v!r}: expected on or off")


_TEAM = {"off": 0, "on": 1, "auto": 2}


def team_mode() -> int:
    """CODESHELL_DECODE_TEAM (on by default since session 19): whether the native step runs in one
    thread team for the whole call (csrc/decode_step.cpp `set_team`: 0 off, 1 on, 2 auto = on where
    every layer's weights are small, codeshell-mini's size). On by default: with any other runnable
    process on the 2-core machine (an IDE, a browser, another job) each OpenMP fork of the `off`
    path may wait ~8 ms for its second thread to get a core (codeshell-mini: 240 ms a step in one
    process of three against 0.3 ms with the team), while the team's master takes the chunks of a
    helper that is not running; quiet, the team measured faster at codeshell-mini and the small
    shape and within the noise at the 1.7B (docs/kernels-log.md, session 19 helper A). `off` keeps each
    kernel's own OpenMP fork (the default before session 19)."""
    v = os.environ.get("CODESHELL_DECODE_TEAM", "on")
    if v not in _TEAM:
        raise ValueError(f"CODESHELL_DECODE_TEAM={v!r}: expected auto, on or off")
    return _TEAM[v]


def _fast(linear: nn.Module) -> FastLinear | None:
    """The linear's native call cache (rebuilt by the module itself when its buffers change),
    or None for anything else (nn.Linear, a LoRA wrapper, a QuantLinear on torch's kernels)."""
    if type(linear) is PackedLinear:
        return linear.fast
    get = getattr(type(linear), "_fast_linear", None)  # codeshell.quant.linear.QuantLinear
    if get is not None and linear.__dict__.get("_kernel") is not None:
        return get(linear)
    return None


def _sources(model: nn.Module) -> list | None:
    """Every object the step is built from, in order: per block its 4 FastLinears and its 2
    LayerNorms' weight, bias and eps, then ln_f's. The step is rebuilt when any of them is not
    the one it was built from (a swapped module or tensor; a PackedLinear's bias changed in
    place gives a new FastLinear). None when a module is not one the native step runs.
    This runs every step: plain dict reads (`_modules`, `_parameters`) instead of nn.Module's
    attribute fallback, ~4x cheaper (codeshell-mini: ~10 us a step)."""
    out = []
    for block in model.h:
        mods = block._modules
        ln1, ln2 = mods["ln_1"], mods["ln_2"]
        if type(ln1) is not nn.LayerNorm or type(ln2) is not nn.LayerNorm:
            return None
        am, mm = mods["attn"]._modules, mods["mlp"]._modules
        for lin in (am["c_attn"], am["c_proj"], mm["c_fc"], mm["c_proj"]):
            f = _fast(lin)
            if f is None:
                return None
            out.append(f)
        p1, p2 = ln1._parameters, ln2._parameters
        out += (p1["weight"], p1["bias"], ln1.eps, p2["weight"], p2["bias"], ln2.eps)
    ln = model._modules["ln_f"]
    if type(ln) is not nn.LayerNorm:
        return None
    p = ln._parameters
    out += (p["weight"], p["bias"], ln.eps)
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))  # identity (an eps set anew: a rebuild)


def _build(model: nn.Module, src: list):
    """A DecodeStep for these sources, or None when some linear's path is not one it runs."""
    from ..model import _GELU_TANH  # the activations the fused GELU-tanh computes (model.py's list)
    cfg = model.cfg
    if cfg.activation_function not in _GELU_TANH:
        return None
    mod = _ext.get()
    step = mod.DecodeStep(cfg.n_head, cfg.num_query_groups, cfg.head_dim, ops.isa_level())
    step.team = team_mode()
    per = 4 + 6
    for i in range(len(model.h)):
        s = src[i * per:(i + 1) * per]
        ids = [_add_linear(step, f) for f in s[:4]]
        if None in ids:
            return None
        w1, b1, e1, w2, b2, e2 = s[4:]
        step.add_layer(_t(w1), _t(b1), e1, ids[0], ids[1], _t(w2), _t(b2), e2, ids[2], ids[3])
    w, b, e = src[-3:]
    step.set_final(_t(w), _t(b), e)
    return step


def _add_linear(step, f: FastLinear) -> int | None:
    """Registers a linear with the step; its id, or None when its kernel path is not one the
    step runs or differs between M = 1 and ROW_INVARIANT_MAX_M (one path for every M: row
    invariance, so one step serves them all)."""
    p = f.packed
    path = ops.plan(p, 1, torch.bfloat16)
    code = _KERNELS.get((p.kind, path))
    if code is None or path != ops.plan(p, ops.ROW_INVARIANT_MAX_M, torch.bfloat16):
        return None
    isa = ops.ISA_LEVELS.index(path.partition(":")[0])
    return step.add_linear(_KINDS[p.kind], code, isa, p.data, p.scales, p.offsets, f.bias,
                           p.group_size if p.kind == "int4" else 0, p.out_features, p.in_features)


def _t(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def step_for(model: nn.Module):
    """The model's (`CodeShellModel`) DecodeStep for the current weights and ISA cap, built or
    rebuilt as needed, or None when its modules or kernels are not ones the native step runs."""
    src = _sources(model)
    if src is None:
        return None
    cap, team = os.environ.get("CODESHELL_KERNEL_ISA"), os.environ.get("CODESHELL_DECODE_TEAM")
    hit = _STEPS.get(model)
    if hit is not None and hit[1] == cap and hit[3] == team and _same(hit[0], src):
        return hit[2]
    step = _build(model, src)
    _STEPS[model] = (src, cap, step, team)
    return step


def forward(model: nn.Module, x: torch.Tensor, rope, mask, cache) -> torch.Tensor | None:
    """ln_f's output [1, M, C] for the embedded rows x [1, M, C] of a packed decode / verify
    step (`CodeShellModel._forward_inference`'s arguments), or None where the native step does
    not apply (the caller runs the Python path)."""
    if not _PACKED_VIEW:
        from ..engine.kv_cache import PackedView
        _PACKED_VIEW.append(PackedView)
    if type(cache) is not _PACKED_VIEW[0] or mask is not None or not enabled():
        return None
    B, M, C = x.shape
    if B != 1 or M > ops.ROW_INVARIANT_MAX_M or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    kv = cache.cache
    k, v = kv.k, kv.v
    if (k.dtype != torch.bfloat16 or k.device.type != "cpu" or not k.is_contiguous()
            or not v.is_contiguous() or _ext.get() is None):
        return None
    cos = sin = None
    if rope is not None:
        cos, sin = rope  # fp32 [M, D/2] (CodeShellModel._rope_rows)
    step = step_for(model)
    if step is None:
        return None
    scale = 1.0 / math.sqrt(model.cfg.head_dim)  # as CodeShellAttention's
    out = step.run(x.reshape(M, C).contiguous(), cos, sin, k, v, cache.slot_index, cache.positions[0],
                   cache.lens, scale)
    return out.view(1, M, C)


class _Checks:
    """What a step was built from, as (dict, key, object) triples and (tensor, version) pairs,
    checked by identity in C-level loops: `valid()` is False once a module, parameter or
    buffer it holds was replaced, an eps set anew, a bias changed in place, or a QuantLinear
    finalized again -- what `_sources` / `_same` compare, ~5x cheaper (every step runs it)."""

    __slots__ = ("dicts", "keys", "objs", "tensors", "versions")

    def __init__(self):
        self.dicts, self.keys, self.objs, self.tensors, self.versions = [], [], [], [], []

    def add(self, d: dict, key: str):
        obj = d.get(key)
        self.dicts.append(d)
        self.keys.append(key)
        self.objs.append(obj)
        return obj

    def linear(self, lin: nn.Module) -> FastLinear | None:
        """The linear's FastLinear (as `_fast`), its rebuild conditions recorded."""
        f = _fast(lin)
        if f is None:
            return None
        if type(lin) is PackedLinear:
            for k in ("data", "scales", "offsets"):
                self.add(lin._buffers, k)
            b = self.add(lin._buffers, "bias")
            if b is not None:
                self.tensors.append(b)
                self.versions.append(b._version)
        else:  # QuantLinear: _fast_linear's cache follows its kernel layout and fp32 bias
            self.add(lin.__dict__, "_kernel")
            self.add(lin.__dict__, "_bias_f32")
        return f

    def valid(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objs))
                and list(map(_VERSION, self.tensors)) == self.versions)

    def valid_native(self, same_entries) -> bool:
        """`valid()` by the extension's `same_entries` (the same answer): after a step has streamed
        the weights through the caches the ~200 dicts read here are cold, and Python's loop takes
        their misses one at a time (small shape: ~65 us a token in place against ~11 in a hot loop;
        docs/kernels-log.md, session 20 helper B); the native loop overlaps them."""
        return same_entries(self.dicts, self.keys, self.objs, self.tensors, self.versions)


class _Decoder:
    __slots__ = ("step", "checks", "cap", "scale", "hooks", "attrs", "raw_cap", "raw_team")

    def __init__(self, step, checks: _Checks, cap, scale: float, hooks: tuple, attrs: tuple):
        self.step, self.checks, self.cap, self.scale = step, checks, cap, scale
        # CODESHELL_KERNEL_ISA and CODESHELL_DECODE_TEAM when built, as `decode` reads them (os.environ's
        # own values): a change rebuilds
        self.raw_cap = self.raw_team = None
        self.hooks = hooks  # the modules' forward (pre-)hook dicts: any entry -> the model runs
        self.attrs = attrs  # their __dict__s: a `forward` set on the instance -> the model runs

    def skip(self) -> bool:
        return any(self.hooks) or any("forward" in d for d in self.attrs)


def _build_decoder(lm: nn.Module, cap) -> _Decoder:
    """`decode`'s step for a CodeShellForCausalLM (step None where it does not apply), with
    the checks that say when to rebuild it."""
    from ..model import _GELU_TANH, rope_inv_freq
    from .module import PackedEmbedding
    ch = _Checks()
    model, head = ch.add(lm._modules, "transformer"), ch.add(lm._modules, "lm_head")
    mods = [m for m in (lm, model, head) if m is not None]
    hooks = tuple(getattr(m, a) for m in mods for a in ("_forward_hooks", "_forward_pre_hooks"))
    attrs = tuple(m.__dict__ for m in mods)
    none = _Decoder(None, ch, cap, 0.0, hooks, attrs)
    cfg = getattr(model, "cfg", None)
    if (cfg is None or cfg.position_embedding_type != "rope" or cfg.rope_scaling_type is not None
            or cfg.activation_function not in _GELU_TANH or _ext.get() is None):
        return none
    # the transformer's step, built as `step_for` builds it, from the same sources
    h, ln_f, wte = ch.add(model._modules, "h"), ch.add(model._modules, "ln_f"), ch.add(model._modules, "wte")
    src = []
    for key in list(h._modules):
        block = ch.add(h._modules, key)
        mods = block._modules
        ln1, attn, ln2, mlp = (ch.add(mods, k) for k in ("ln_1", "attn", "ln_2", "mlp"))
        if type(ln1) is not nn.LayerNorm or type(ln2) is not nn.LayerNorm:
            return none
        for parent, k in ((attn, "c_attn"), (attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")):
            f = ch.linear(ch.add(parent._modules, k))
            if f is None:
                return none
            src.append(f)
        for ln in (ln1, ln2):
            src += (ch.add(ln._parameters, "weight"), ch.add(ln._parameters, "bias"), ch.add(ln.__dict__, "eps"))
    if type(ln_f) is not nn.LayerNorm:
        return none
    src += (ch.add(ln_f._parameters, "weight"), ch.add(ln_f._parameters, "bias"), ch.add(ln_f.__dict__, "eps"))
    step = _build(model, src)
    if step is None:
        return none
    # the output head: one kernel path for every M <= ROW_INVARIANT_MAX_M, as the blocks' linears
    f = ch.linear(head) if head is not None else None
    if f is None or f.packed.in_features != cfg.n_embd:
        return none
    head_id = _add_linear(step, f)
    if head_id is None:
        return none
    step.set_head(head_id)
    # the token embedding: the head's panels, or a plain bf16 table
    if type(wte) is PackedEmbedding:
        step.set_embedding(0, ch.add(wte._buffers, "data"), wte.num_embeddings)
    elif type(wte) is nn.Embedding and wte.max_norm is None:
        w = ch.add(wte._parameters, "weight")
        ch.add(wte.__dict__, "max_norm")
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            return none
        step.set_embedding(1, w.detach(), w.shape[0])
    else:
        return none
    step.set_rope(rope_inv_freq(cfg, cfg.n_positions).contiguous())
    same = getattr(_ext.get(), "same_entries", None)
    if same is not None and not _SAME:
        _SAME.append(same)
    return _Decoder(step, ch, cap, 1.0 / math.sqrt(cfg.head_dim), hooks, attrs)


def _ready(lm: nn.Module, cache, lean: bool = True):
    """The model's native decoder, (re)built when its weights, the ISA cap or the team switch
    changed, or None where the native step does not apply (switched off, the model's hooks, grad or
    autocast on, a KV cache it cannot read). Shared by `decode` and `decode_greedy`."""
    env = _ENV.get  # os.environ's own dict (bytes keys): the same values as os.environ.get, ~10x cheaper
    step_env, cap, team = env(_STEP_KEY), env(_ISA_KEY), env(_TEAM_KEY)
    if step_env is not None and step_env != b"on" and not enabled():
        return None
    d = _DECODERS.get(lm)
    if d is None or d.raw_cap != cap or d.raw_team != team or not (
            d.checks.valid_native(_SAME[0]) if _SAME and lean else d.checks.valid()):
        d = _DECODERS[lm] = _build_decoder(lm, os.environ.get("CODESHELL_KERNEL_ISA"))
        d.raw_cap, d.raw_team = cap, team
    if d.step is None or d.skip() or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    if _TORCH_MODULE._global_forward_hooks or _TORCH_MODULE._global_forward_pre_hooks:
        return None  # global hooks: the model's forward would run them
    k, v = cache.k, cache.v
    if k.dtype != torch.bfloat16 or k.device.type != "cpu" or not k.is_contiguous() or not v.is_contiguous():
        return None
    return d


def decode(lm: nn.Module, cache, tokens: list[int], positions: list[int], slots: list[int], logits: bool = True,
           lean: bool = True):
    """(logits [M, V] bf16, greedy picks [M]) of a packed step (`Engine._packed`: token i is
    tokens[i] at positions[i] of slot slots[i] of the engine's KVCache `cache`, which holds
    room for them), bit for bit what `lm`'s transformer + lm_head + `first_argmax` give; or
    None where the native step does not apply (the caller runs the model). With `logits`
    False the first item is None: the caller needs only the picks (every row plain greedy),
    and the step skips the bf16 [M, V] copy of the head's output. `lean` False: the rebuild
    check in Python (`_Checks.valid`), as before session 20 (the caller's engine's `lean`, for
    A/B timing; the same answer as the native check)."""
    if len(tokens) > _MAX_M:
        return None
    d = _ready(lm, cache, lean)
    if d is None:
        return None
    k, v = cache.k, cache.v
    return d.step.decode(tokens, positions, slots, k, v, d.scale, logits)


def decode_greedy(lm: nn.Module, cache, token: int, position: int, slot: int, n: int, stop,
                  budget_ns: int = 0) -> list[int] | None:
    """Up to `n` greedy tokens of one sequence in one native call (session 27, helper C): `token` at
    `position` of slot `slot` of the engine's KVCache `cache` (which holds room for positions up to
    position + n - 1), then each pick fed back at the next position, stopping after a pick in `stop`
    (token ids); the picks, bit for bit what n `decode` calls of one row each give (`decode`'s rows
    and picks, csrc/decode_step.cpp `decode_greedy`); or None where the native step does not apply
    (the caller runs one step its usual way). Why: the engine's Python and the native call's entry
    and exit between two tokens (~0.29 ms of a small-shape int8 token, mostly cache misses after the
    weights streamed through the caches; bench_decode_phases.py --trace) run once per call.
    `budget_ns` > 0 caps the call by time too (session 28, helper C): it returns after the first token
    that ends that many ns or more after the call began (at least one token; the same bits), so a
    Ctrl-C waits about one budget plus one token, not n tokens."""
    d = _ready(lm, cache)
    if d is None:
        return None
    k, v = cache.k, cache.v
    if budget_ns > 0:
        return d.step.decode_greedy(token, position, slot, n, list(stop), k, v, d.scale, budget_ns)
    return d.step.decode_greedy(token, position, slot, n, list(stop), k, v, d.scale)


def decode_greedy_rows(lm: nn.Module, cache, tokens: list[int], positions: list[int], slots: list[int],
                       ns: list[int], stops: list, budget_ns: int = 0) -> list[list[int]] | None:
    """`decode_greedy` for several sequences in one native call (session 28, lead): row r's token at
    positions[r] of slot slots[r], up to ns[r] picks each fed back, the row stopping after a pick in
    stops[r] (a stopped row leaves the batch, the others go on); each row's picks bit for bit what
    one `decode` call a step gives (csrc/decode_step.cpp `decode_greedy_rows`). None where the native
    step does not apply. Why: an LLM.generate step of 8 codeshell-mini rows spent ~160 us outside its
    ~710 us native call (docs/kernels-log.md, session 28, lead)."""
    d = _ready(lm, cache)
    if d is None:
        return None
    return d.step.decode_greedy_rows(list(tokens), list(positions), list(slots), list(ns),
                                     [list(s) for s in stops], cache.k, cache.v, d.scale, budget_ns)