"""GGUF both ways, following llama.cpp's CodeShell conventions (``convert_hf_to_gguf.py``'s
``CodeShellModel`` and ``src/models/codeshell.cpp``'s loader).

Export (`export_gguf`): architecture ``codeshell``; tensors ``token_embd``, ``output_norm``,
``output``, ``blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}`` with
``.weight`` and ``.bias``, in the checkpoint's own [out, in] layout (llama.cpp applies RoPE in
NeoX style to the fused QKV, as CodeShell does, so nothing is permuted); 1-D tensors stay F32.
``output.weight`` is written even when the head is tied to the embedding (as CodeShell-7B's
is): llama.cpp's CodeShell loader requires it (``check_tensor_dims: tensor 'output.weight' not
found`` otherwise), so a tied head is stored twice. ``feed_forward_length`` is the real
``n_inner`` (llama.cpp checks ``ffn_up`` against it). The tokenizer is ``gpt2`` BPE with
pre-tokenizer ``codeshell``, one entry per vocabulary row (the 20 specials CONTROL, rows without
a token ``[PAD{id}]`` UNUSED), merges, and bos/eos/pad 70000. With ``q4_0`` the token embedding
and the output head stay Q8_0.

Import (`load_gguf`): F32/F16/BF16/Q8_0/Q4_0 files in GGUF v2 or v3: ours, llama.cpp's own
converter's (which writes no ``output.weight`` for a tied checkpoint and ``feed_forward_length``
as 4 * n_embd), and the older CodeShell llama.cpp fork's (GGUF v2, no ``tokenizer.ggml.pre``,
``codeshell.rope.scale_linear``, every token typed NORMAL). For the CodeShell architecture the
20 special tokens at ids 70000-70019 are special whatever type the file gives them, so a FIM
prompt tokenizes the same from every file. An ``output.weight`` identical to ``token_embd``
loads as a tied head (one copy in memory); ``n_inner`` comes from the ``ffn_up`` tensor's
shape. Q4_0 linears map losslessly onto our int4 (groups of 32, symmetric: both are
(q - 8) * d); Q8_0 linears are re-quantized into int8 per channel; float files load as float
unless ``quantization=`` asks otherwise. The tokenizer is rebuilt from the file. This module
does not quantize with K-quants or write other architectures.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import CodeShellConfig
from ..tokenizer import Tokenizer
from ..weights import (IGNORED_SUFFIXES, CheckpointError, _bigcode_qkv_to_fused, _progress, build_empty,
                       iter_tensors, load_config, resolve_dtype, resolve_model_path, weight_files)
from .linear import QuantLinear, dequantize_int4, dequantize_int8, pack_int4
from .load import build_quantized_empty, finalize, quantized_scheme_of
from .gguf_reader import _GGUF_MAGIC, GGUFError, _Tensor, read_gguf
from .scheme import QuantScheme

__all__ = ["GGUFError", "export_gguf", "load_gguf", "read_gguf", "is_gguf", "tokenizer_from_gguf"]

log = logging.getLogger(__name__)

ARCH = "codeshell"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_BLOCK_NAMES = {  # our suffix after transformer.h.N. -> llama.cpp's after blk.N.
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
              "transformer.ln_f": "output_norm", "lm_head": "output"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF support needs the `gguf` package: pip install 'codeshell[quant]'") from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def to_gguf_name(name: str) -> str:
    """Checkpoint tensor name -> GGUF tensor name."""
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"blk.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    prefix, _, kind = name.rpartition(".")
    if prefix in _TOP_NAMES:
        return f"{_TOP_NAMES[prefix]}.{kind}"
    raise GGUFError(f"tensor {name!r} has no GGUF name in llama.cpp's CodeShell layout")


def from_gguf_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    inv_block = {v: k for k, v in _BLOCK_NAMES.items()}
    if m and m.group(2) in inv_block:
        return f"transformer.h.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"
    prefix, _, kind = name.rpartition(".")
    inv_top = {v: k for k, v in _TOP_NAMES.items()}
    if prefix in inv_top and kind in ("weight", "bias"):
        return f"{inv_top[prefix]}.{kind}"
    raise GGUFError(f"tensor {name!r} is not part of llama.cpp's CodeShell layout")


# ---- reading a source checkpoint one float tensor at a time ------------------------------

def _float_tensors(path: Path, cfg: CodeShellConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, float tensor); a `codeshell quantize` folder is dequantized per linear."""
    scheme = quantized_scheme_of(cfg)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in weight_files(path):
        for name, t in iter_tensors(file):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"entry {name!r} in {file.name} is not a tensor (an NF4 checkpoint? "
                                      "load it with LLM and export from a `codeshell quantize` folder)")
            if scheme is not None and name.endswith((".qweight", ".scales", ".zeros")):
                prefix, _, part = name.rpartition(".")
                parts = pending.setdefault(prefix, {})
                parts[part] = t
                s = scheme.module_scheme(prefix)  # an int8 head in an int4 checkpoint (head_bits 8)
                if "qweight" in parts and "scales" in parts and (s.bits == 8 or s.symmetric or "zeros" in parts):
                    del pending[prefix]
                    if s.bits == 8:
                        w = dequantize_int8(parts["qweight"], parts["scales"])
                    else:
                        w = dequantize_int4(parts["qweight"], parts["scales"], parts.get("zeros"), s.group_size)
                    yield prefix + ".weight", w
                continue
            if cfg.bigcode_interleaved_qkv and name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                t = _bigcode_qkv_to_fused(t, cfg)
            yield name, t
    if pending:
        raise CheckpointError(f"quantized checkpoint {path} has incomplete tensors: {', '.join(sorted(pending))}")


# ---- tokenizer -------------------------------------------------------------------------------

def _tokenizer_entries(path: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges of the checkpoint's tokenizer.json, padded to vocab_size."""
    gguf = _gguf()
    f = path / "tokenizer.json"
    if not f.exists():
        raise GGUFError(f"{path} has no tokenizer.json; GGUF files carry the tokenizer, so export needs it")
    tj = json.loads(f.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{f}: expected a BPE tokenizer, got {model.get('type')!r}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: set[int] = set()
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        if a.get("special"):
            special.add(a["id"])
    if max(by_id) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else
                             gguf.TokenType.USER_DEFINED if i > len(model["vocab"]) else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


CODESHELL_SPECIAL_IDS = range(70000, 70020)  # <|endoftext|>, <fim_prefix>, ..., <|end|>


def _is_pad(token: str, i: int) -> bool:
    return token == f"[PAD{i}]"


def tokenizer_from_gguf(fields: dict, eos_token_id: int | None) -> Tokenizer:
    """Rebuild CodeShell's byte-level BPE (digits split one by one) from GGUF tokenizer keys."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {model!r}; a CodeShell file uses 'gpt2' (byte-level BPE)")
    pre = fields.get("tokenizer.ggml.pre", "codeshell")  # the older fork wrote no pre-tokenizer key
    if pre not in ("codeshell", "default", "gpt2", "starcoder"):
        raise GGUFError(f"tokenizer.ggml.pre {pre!r} is not CodeShell's")
    tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise GGUFError("the GGUF file has no tokenizer (tokenizer.ggml.tokens / merges)")
    types = list(types or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"the GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    special = {i for i, ty in enumerate(types) if ty == 3}  # 3: CONTROL
    if fields.get("general.architecture") == ARCH:
        # The older CodeShell fork typed every token NORMAL, specials included: for CodeShell the
        # 20 specials are special whatever the file says (else a FIM prompt is BPE'd as text).
        special |= {i for i in CODESHELL_SPECIAL_IDS if i < len(tokens) and not _is_pad(tokens[i], i)}
    # Rows without a token: UNUSED in our files and llama.cpp's, NORMAL "[PAD{id}]" in the fork's.
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 5 and not _is_pad(t, i)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], unk_token=None,
                     fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    if pre == "codeshell" or pre == "default":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]
    tok.add_special_tokens(specials)
    return Tokenizer.from_object(tok, eos_token_id)


# ---- export ------------------------------------------------------------------------------------

def _gguf_type(name: str, t: torch.Tensor, out_type: str):
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if t.ndim == 1 or out_type == "f32":
        return Q.F32
    if out_type in ("f16", "bf16"):
        return Q.F16 if out_type == "f16" else Q.BF16
    qt = Q.Q8_0 if out_type == "q8_0" or name.startswith(("token_embd", "output.", "position_embd")) else Q.Q4_0
    if t.shape[-1] % 32:
        log.warning("%s: width %d is not a multiple of 32; stored as F16", name, t.shape[-1])
        return Q.F16
    return qt


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return t.float().contiguous().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return gguf.quants.quantize(t.float().contiguous().numpy(), qtype)


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16", *,
                overwrite: bool = False) -> Path:
    """Write checkpoint `model` as a GGUF file that llama.cpp loads as a CodeShell model."""
    gguf = _gguf()
    if out_type not in TYPES:
        raise GGUFError(f"unknown GGUF type {out_type!r}: choose one of {', '.join(TYPES)}")
    src = resolve_model_path(model)
    if src.is_file():
        raise GGUFError(f"{src} is a file; export-gguf takes a checkpoint folder")
    cfg = load_config(src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} exists (use --overwrite to replace it)")
    tokens, types, merges = _tokenizer_entries(src, cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type]
    w = gguf.GGUFWriter(str(out) + ".part", ARCH)
    w.add_name(src.name)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.num_query_groups)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(int(ftype))
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling_type == "dynamic":
        log.warning("llama.cpp has no dynamic-NTK RoPE for CodeShell: exported without scaling "
                    "(identical up to n_positions=%d)", cfg.n_positions)
    factor = cfg.rope_scaling_factor if cfg.rope_scaling_type == "linear" else 1.0
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(factor)
    if out_type in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("codeshell")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.eos_token_id)):
        if tid is not None:
            {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id}[key](tid)
    w.add_add_bos_token(False)

    # Pass 1 (shapes only, from a meta-device model): tensor infos must precede the data.
    order = _export_order(cfg, src)
    for gname, shape in order:
        fake = torch.empty(shape, device="meta")
        qt = _gguf_type(gname, fake, out_type)
        bshape = gguf.quant_shape_to_byte_shape(shape, qt) if qt not in (gguf.GGMLQuantizationType.F32,
                                                                         gguf.GGMLQuantizationType.F16) else shape
        itemsize = 4 if qt == gguf.GGMLQuantizationType.F32 else 2 if qt == gguf.GGMLQuantizationType.F16 else 1
        nbytes = int(np.prod(bshape)) * itemsize
        dt = np.float32 if itemsize == 4 else np.float16 if qt == gguf.GGMLQuantizationType.F16 else np.uint8
        w.add_tensor_info(gname, bshape, np.dtype(dt), nbytes, raw_dtype=None if dt != np.uint8 else qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Pass 2: tensors in that order, one at a time (the source is read by name).
    wanted = [g for g, _ in order]
    tied_copy = not _has_untied_head(src, cfg)
    buffered: dict[str, torch.Tensor] = {}
    it = _float_tensors(src, cfg)
    embd_encoded = None
    with _progress(len(wanted), f"Writing {out.name} ({out_type})") as advance:
        for gname in wanted:
            if gname == "output.weight" and tied_copy and embd_encoded is not None:
                w.write_tensor_data(embd_encoded)  # the same type as token_embd (both Q8_0 in q4_0)
                embd_encoded = None
                advance(1)
                continue
            while gname not in buffered:
                try:
                    name, t = next(it)
                except StopIteration:
                    raise CheckpointError(f"checkpoint {src} is missing the tensor for {gname}") from None
                buffered[to_gguf_name(name)] = t
            t = buffered.pop(gname)
            data = _encode(t, _gguf_type(gname, t, out_type))
            w.write_tensor_data(data)
            if gname == "token_embd.weight" and tied_copy:
                embd_encoded = data
            advance(1)
    w.close()
    os.replace(str(out) + ".part", out)
    return out


def _export_order(cfg: CodeShellConfig, src: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape) of every tensor, in the checkpoint's own order (so pass 2 streams)."""
    from ..model import CodeShellForCausalLM
    with torch.device("meta"):
        m = CodeShellForCausalLM(cfg)
    # remove_duplicate=False: a tied config still names lm_head.weight, which a checkpoint with a
    # quantized head (`codeshell quantize --quantize-head`) stores apart and exports as output
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters(remove_duplicate=False)}
    untied = _has_untied_head(src, cfg)
    names = [n for n in shapes if n != "lm_head.weight" or untied]
    # Stream order: checkpoint order where known (index files list names), else model order.
    order = [(to_gguf_name(n), shapes[n]) for n in _checkpoint_order(src, names)]
    if not untied:  # llama.cpp requires output.weight: the tied head's copy follows token_embd
        at = [g for g, _ in order].index("token_embd.weight")
        order.insert(at + 1, ("output.weight", shapes["transformer.wte.weight"]))
    return order


def _has_untied_head(src: Path, cfg: CodeShellConfig) -> bool:
    if not cfg.tie_word_embeddings:
        return True
    return "lm_head.weight" in _checkpoint_names(src)


def _checkpoint_names(src: Path) -> list[str]:
    names: list[str] = []
    for file in weight_files(src):
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                names += list(f.keys())
        else:
            names += list(torch.load(str(file), map_location="cpu", weights_only=True, mmap=True).keys())
    out = []
    for n in names:
        for suf in (".qweight", ".scales", ".zeros"):
            if n.endswith(suf):
                n = n[: -len(suf)] + ".weight"
        if n not in out:
            out.append(n)
    return out


def _checkpoint_order(src: Path, names: list[str]) -> list[str]:
    pos = {n: i for i, n in enumerate(_checkpoint_names(src))}
    return sorted(names, key=lambda n: pos.get(n, len(pos)))


# ---- import --------------------------------------------------------------------------------------

def config_from_gguf(fields: dict, tensors: dict) -> CodeShellConfig:
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"this GGUF file is for architecture {arch!r}; only {ARCH!r} (CodeShell) models load here")

    def need(key: str):
        v = fields.get(f"{ARCH}.{key}")
        if v is None:
            raise GGUFError(f"GGUF metadata key {ARCH}.{key} is missing")
        return v

    n_embd = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    if "token_embd.weight" not in tensors:
        raise GGUFError("the GGUF file has no token_embd.weight tensor")
    vocab = _shape(tensors["token_embd.weight"])[0]
    rs_type, rs_factor = None, 1.0
    if f"{ARCH}.rope.scale_linear" in fields:  # the older fork's key
        rs_factor = float(fields[f"{ARCH}.rope.scale_linear"])
        rs_type = "linear" if rs_factor != 1.0 else None
    elif fields.get(f"{ARCH}.rope.scaling.type") == "linear":
        rs_factor = float(fields.get(f"{ARCH}.rope.scaling.factor", 1.0))
        rs_type = "linear" if rs_factor != 1.0 else None
    elif fields.get(f"{ARCH}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"rope scaling {fields[f'{ARCH}.rope.scaling.type']!r} is not supported for CodeShell")
    bos = fields.get("tokenizer.ggml.bos_token_id", 70000)
    eos = fields.get("tokenizer.ggml.eos_token_id", 70000)
    # llama.cpp's converter and the fork write feed_forward_length as 4 * n_embd whatever n_inner
    # is; the tensors say what it really is.
    n_inner = int(fields.get(f"{ARCH}.feed_forward_length", 4 * n_embd))
    if "blk.0.ffn_up.weight" in tensors:
        n_inner = _shape(tensors["blk.0.ffn_up.weight"])[0]
    # The key is a float32: 1e-5 comes back as 9.99999975e-06; take the float32's shortest decimal.
    eps = float(str(np.float32(fields.get(f"{ARCH}.attention.layer_norm_epsilon", 1e-5))))
    return CodeShellConfig(
        vocab_size=vocab, n_positions=int(need("context_length")), n_embd=n_embd,
        n_layer=int(need("block_count")), n_head=n_head,
        num_query_groups=int(fields.get(f"{ARCH}.attention.head_count_kv", n_head)),
        n_inner=n_inner,
        layer_norm_epsilon=eps,
        position_embedding_type="learned_absolute" if "position_embd.weight" in tensors else "rope",
        rope_scaling_type=rs_type, rope_scaling_factor=rs_factor,
        rope_theta=float(fields.get(f"{ARCH}.rope.freq_base", 10000.0)),
        bos_token_id=int(bos), eos_token_id=int(eos),
        tie_word_embeddings=_head_is_tied(tensors), model_type="codeshell")


def _head_is_tied(tensors: dict) -> bool:
    """No output.weight (llama.cpp's converter on a tied checkpoint), or one holding exactly
    token_embd's bytes (our export of a tied checkpoint: llama.cpp needs the copy)."""
    out, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None:
        return True
    return (emb is not None and out.tensor_type == emb.tensor_type and out.shape == emb.shape
            and np.array_equal(out.data, emb.data))


def _shape(t: _Tensor) -> tuple[int, ...]:
    return t.shape


def _to_float(t) -> torch.Tensor:
    """Any supported reader tensor -> float32 torch tensor of its logical shape."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    shape = _shape(t)
    raw = torch.from_numpy(np.array(t.data))  # copy: the memory map is read-only
    if t.tensor_type == Q.F32:
        return raw.view(torch.float32).reshape(shape)
    if t.tensor_type in (Q.F16, Q.BF16):
        return raw.view(torch.float16 if t.tensor_type == Q.F16 else torch.bfloat16).reshape(shape).float()
    if t.tensor_type in (Q.Q8_0, Q.Q4_0):
        blocks = np.asarray(t.data).reshape(shape[0], -1)
        return torch.from_numpy(gguf.quants.dequantize(blocks, t.tensor_type)).reshape(shape)
    raise GGUFError(f"tensor {t.name!r} has GGML type {t.tensor_type.name}; supported: F32, F16, BF16, Q8_0, Q4_0")


def _q4_0_to_int4(t) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 blocks (fp16 d, 16 bytes: value j in the low nibble of byte j, j + 16 in the high one)
    -> our int4 g32 symmetric (qweight, scales): both mean (q - 8) * d, so this is exact."""
    N, K = _shape(t)
    blocks = torch.from_numpy(np.array(t.data)).reshape(N, K // 32, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(N, K // 32)
    qs = blocks[..., 2:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(N, K)  # [N, K/32, 32] -> [N, K]
    return pack_int4(q), d.clone()


def _default_scheme(tensors: dict[str, _Tensor]) -> QuantScheme | None:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    kinds = {t.tensor_type for t in tensors.values() if re.fullmatch(r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)"
                                                                    r"\.weight", t.name)}
    if Q.Q4_0 in kinds:
        return QuantScheme(bits=4, group_size=32, symmetric=True)
    if Q.Q8_0 in kinds:
        return QuantScheme(bits=8)
    return None


def load_gguf(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
              quantization: "str | dict | QuantScheme | None" = None, choose_scheme=None):
    """(model, config, path, tokenizer) from a CodeShell GGUF file.

    Without `quantization`, `choose_scheme(tensors)` (the file's tensor records, read once here)
    names the scheme, or None for the default (`_default_scheme`: the file's own blocks, the
    head widened to bf16); `codeshell.llm.gguf_head_scheme` is the caller's choice."""
    gguf = _gguf()
    path = Path(path)
    _, fields, tensors = read_gguf(path)
    cfg = config_from_gguf(fields, tensors)
    if quantization is None and choose_scheme is not None:
        quantization = choose_scheme(tensors)
    scheme = QuantScheme.parse(quantization) or _default_scheme(tensors)
    dt = resolve_dtype(dtype, default=torch.bfloat16)
    model = build_quantized_empty(cfg, dt, scheme, device) if scheme else build_empty(cfg, dt, device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    seen: set[str] = set()
    with _progress(len(tensors), f"Loading {path.name}") as advance:
        for gname, t in tensors.items():
            if (gname in ("rope_freqs.weight",) or gname.endswith(".attn_rot_embd")
                    or (gname == "output.weight" and cfg.tie_word_embeddings)):  # the tied head's copy
                advance(1)
                continue
            name = from_gguf_name(gname)
            prefix = name[: -len(".weight")]
            m = qmods.get(prefix) if name.endswith(".weight") else None
            if m is not None:
                if _shape(t) != (m.out_features, m.in_features):
                    raise GGUFError(f"tensor {gname!r} has shape {_shape(t)}, expected {(m.out_features, m.in_features)}")
                if (t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and scheme.bits == 4
                        and scheme.group_size == 32 and scheme.symmetric):
                    q, s = _q4_0_to_int4(t)
                    m.qweight.copy_(q)
                    m.scales.copy_(s)
                else:
                    m.set_weight(_to_float(t))
                seen.update([f"{prefix}.qweight", f"{prefix}.scales"]
                            + ([f"{prefix}.zeros"] if getattr(m, "zeros", None) is not None else []))
            else:
                if name not in params:
                    raise GGUFError(f"tensor {gname!r} does not fit this model")
                dst = params[name]
                if _shape(t) != tuple(dst.shape):
                    raise GGUFError(f"tensor {gname!r} has shape {_shape(t)}, expected {tuple(dst.shape)} "
                                    "from the file's metadata")
                w = _to_float(t)
                with torch.no_grad():
                    dst.copy_(w)
                seen.add(name)
                if name == "transformer.wte.weight" and "lm_head" in qmods and cfg.tie_word_embeddings:
                    qmods["lm_head"].set_weight(w)  # a quantized copy of the tied head
                    seen.update(f"lm_head.{b}" for b, v in qmods["lm_head"].named_buffers() if v is not None)
            advance(1)
    expected = {n for n in params if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    missing = sorted(expected - seen)
    if missing:
        raise GGUFError(f"{path.name} is missing tensor(s) for: {', '.join(missing[:5])}")
    finalize(model)
    if scheme is not None:
        cfg = cfg.replace(quantization=scheme.to_dict())
    tok = tokenizer_from_gguf(fields, cfg.eos_token_id)
    return model, cfg, path, tok
