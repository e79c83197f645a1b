"""Where one prompt's prefill time goes, part by part, as a % of the machine's bf16 matmul peak.

Builds a model of a named shape with fewer layers (random bf16 weights: a 7B-width model with
2-4 layers fits in a few GiB where the whole 7B does not), wraps it in `codeshell.LLM` and
runs one `--prompt-len`-token prompt (batch 1, greedy, 1 new token) through `LLM.generate`,
as `benchmarks/bench_quant.py` times a prompt. Each timed round is one of two kinds,
alternating:

* plain: the prompt untouched; its TFLOP/s (`codeshell.bench.prompt_flops` of this shape and
  layer count) over the peak (`codeshell.bench.bf16_matmul_peak`, measured in this process) is
  the figure issue 14 sets at >= 80%;
* traced: the same prompt with `time.perf_counter` around every part the model's inference
  path calls (each linear by name, `fused_add_layer_norm`, the RoPE cast, the KV-cache write,
  the prefill attention kernel (on AVX2 `prefill_attention_lanes`, or decode's `packed_attention` one
  query a token with CODESHELL_PREFILL_ATTN_LANES=0, and for the last block's sampled rows), GELU, the residual copies, the embedding, the RoPE tables, the
  output head); "rest" is the prompt's time less the parts (engine, Python between calls).

Every part runs on torch's thread count and returns when done, so wall time per call adds up.

    flock /tmp/bench.lock nice -n -10 python benchmarks/trace_prefill.py --shape 7b --layers 2
    python benchmarks/trace_prefill.py --shape small --layers 8 --rounds 5
    python benchmarks/trace_prefill.py --model codeshell-mini --prompt-len 256 --rounds 20
    python benchmarks/trace_prefill.py --shape 7b --attention-only --rounds 40
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

PARTS = collections.defaultdict(float)  # part name -> seconds in the current traced round
CLOCK = [time.perf_counter]  # the clock of every part and prompt (--cpu: this thread's CPU time)


@contextlib.contextmanager
def _timed(name: str):
    clock = CLOCK[0]
    t = clock()
    try:
        yield
    finally:
        PARTS[name] += clock() - t


def _wrap(fn, name):
    def timed(*a, **kw):
        with _timed(name):
            return fn(*a, **kw)
    return timed


class _FusedProxy:
    """The native module as `model._fused_ops` returns it, each fused op timed under its name."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        return _wrap(getattr(self._mod, name), name)


def install_tracing(llm) -> list:
    """Patch the inference path's callees with timers (module attributes looked up per call);
    returns what `remove_tracing` needs to put the originals back."""
    from codeshell import model as M
    from codeshell.engine import engine as E
    from codeshell.engine import kv_cache as KV
    from codeshell.kernels import attention as AT
    from codeshell.kernels import prefill_attention as PA
    names = {id(mod): name.split(".", 3)[-1] for name, mod in llm.model.named_modules()
             if name.endswith(("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"))}
    lin, fused = M._linear_rows, M._fused_ops
    wte = llm.model.transformer.wte
    from codeshell.kernels import module as KM
    gelu = KM.PackedLinear.forward_gelu
    saved = [(KM.PackedLinear, "forward_gelu", gelu), (M, "_cached_sdpa", M._cached_sdpa), (M, "_linear_rows", lin), (M, "_fused_ops", fused), (M, "_residual", M._residual),
             (KV.CacheView, "_store", KV.CacheView._store), (PA, "prefill_attention", PA.prefill_attention),
             (AT, "packed_attention", AT.packed_attention),
             (PA, "prefill_attention_lanes", PA.prefill_attention_lanes),
             (E.Engine, "_logits", E.Engine._logits), (M.CodeShellModel, "_rope_rows", M.CodeShellModel._rope_rows),
             (wte, "forward", None)]
    M._linear_rows = lambda linear, x: _wrap(lin, names.get(id(linear), "linear (other)"))(linear, x)
    KM.PackedLinear.forward_gelu = lambda lin, x: _wrap(gelu, names.get(id(lin), "?") + " + GELU")(lin, x)
    M._fused_ops = lambda: (lambda f: None if f is None else _FusedProxy(f))(fused())
    M._residual = _wrap(M._residual, "residual copy")
    M._cached_sdpa = _wrap(M._cached_sdpa, "attention (cache update + SDPA)")
    KV.CacheView._store = _wrap(KV.CacheView._store, "KV-cache write")
    PA.prefill_attention = _wrap(PA.prefill_attention, "attention kernel")
    AT.packed_attention = _wrap(AT.packed_attention, "attention kernel")  # AVX2: one decode query a token
    PA.prefill_attention_lanes = _wrap(PA.prefill_attention_lanes, "attention kernel")  # AVX2 (session 42)
    E.Engine._logits = _wrap(E.Engine._logits, "output head")
    M.CodeShellModel._rope_rows = _wrap(M.CodeShellModel._rope_rows, "RoPE tables")
    wte.forward = _wrap(wte.forward, "embedding")
    return saved


def remove_tracing(saved: list) -> None:
    for owner, attr, orig in saved:
        if orig is None:
            del owner.__dict__[attr]  # an instance attribute over the class's method
        else:
            setattr(owner, attr, orig)


@contextlib.contextmanager
def _before(change: str):
    """The prefill path as it was before one change (for alternating A/B rounds in one process):
    gelu (c_fc's GELU in the GEMM epilogue off), attn32 (no native prefill attention at head dims
    % 64 == 32), attnkb (the prefill attention's 16-key blocks, session 15's kernel)."""
    from codeshell.kernels import module as KM
    from codeshell.kernels import prefill_attention as PA
    if change == "lastrows":  # every row through the last block (CODESHELL_PREFILL_LAST_ROWS=0)
        from codeshell.engine import engine as E
        was, E._LAST_ROWS = E._LAST_ROWS, False
        try:
            yield
        finally:
            E._LAST_ROWS = was
        return
    if change in ("attnkb", "s18") or "=" in change:  # environment switches the kernels read each call
        if change == "s18":  # all of session 18's prefill changes off (helper C): the three switches and
            pairs = [("CODESHELL_PREFILL_ATTN_KB", "16"), ("CODESHELL_DOT_ITEM", "8"),  # the KV-cache index_put
                     ("CODESHELL_PREFILL_LN_SPLIT", "off"), ("CODESHELL_DOT_XPACK", "1"), ("CODESHELL_GELU_X4", "0"),
                     ("CODESHELL_PREFILL_ATTN_TRIM", "0")]
        else:
            pairs = ([("CODESHELL_PREFILL_ATTN_KB", "16")] if change == "attnkb"  # NAME=V[,NAME=V...]
                     else [tuple(kv.split("=", 1)) for kv in change.split(",") if kv])
        old = {name: os.environ.get(name) for name, _ in pairs}
        os.environ.update(dict(pairs))
        from codeshell.engine import kv_cache as KV
        init = KV.CacheView.__init__
        if change == "s18":
            def plain_store(view, *a):
                init(view, *a)
                view._run = None
            KV.CacheView.__init__ = plain_store
        try:
            yield
        finally:
            KV.CacheView.__init__ = init
            for name, value in old.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
        return
    owner, attr = (KM.PackedLinear, "forward_gelu") if change == "gelu" else (PA, "prefill_attention_ok")
    on = getattr(owner, attr)
    if change == "gelu":
        setattr(owner, attr, lambda lin, x: None)
    else:
        setattr(owner, attr, lambda q, k: q.shape[3] % 64 == 0 and on(q, k))
    try:
        yield
    finally:
        setattr(owner, attr, on)


def attention_only(cfg, T: int, rounds: int, save: str | None, kbs: list[int] | None = None) -> None:
    """The prefill attention kernel alone at this shape (one row, T queries at positions 0..T-1):
    best and median ms of `rounds` calls per key block (`kbs`, alternating in the process; default
    the kernel's own choice); `save` writes the first key block's output (to compare two builds' bits)."""
    from codeshell.kernels import prefill_attention as pa
    H, G, D = cfg.n_head, cfg.num_query_groups, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(1, G, T + 8, D, generator=g).bfloat16()
    vc = torch.randn(1, G, T + 8, D, generator=g).bfloat16()
    q = torch.randn(1, T, H + 2 * G, D, generator=g).bfloat16().transpose(1, 2)[:, :H]  # a view of qkv, as the model's
    slots, pos = torch.zeros(1, dtype=torch.long), torch.arange(T)[None]
    kbs = kbs or [pa.key_block(D)]
    ys = {kb: pa.prefill_attention(q, kc, vc, slots, pos, D ** -0.5, kb) for kb in kbs}
    ts = {kb: [] for kb in kbs}
    for _ in range(rounds):
        for kb in kbs:
            t = time.perf_counter()
            pa.prefill_attention(q, kc, vc, slots, pos, D ** -0.5, kb)
            ts[kb].append(time.perf_counter() - t)
    for kb in kbs:
        diff = (ys[kb].float() - ys[kbs[0]].float()).abs().max().item()
        print(f"prefill attention H {H} G {G} D {D} T {T} key block {kb}: best {min(ts[kb]) * 1e3:.3f} ms, median "
              f"{statistics.median(ts[kb]) * 1e3:.3f} ms ({2.0 * T * T * H * D / statistics.median(ts[kb]) / 1e12:.3f} "
              f"TFLOP/s causal at the median); max |diff| to key block {kbs[0]}: {diff:.2e}")
    if save:
        torch.save(ys[kbs[0]], save)


def build(shape: str, layers: int, threads: int, prompt_len: int, model: str | None = None):
    from codeshell import LLM
    if model is not None:  # a checkpoint as it is (codeshell-mini: the package's own), all its layers
        llm = LLM(None if model == "codeshell-mini" else model, dtype="bfloat16", threads=threads, max_batch=1, max_model_len=prompt_len + 8)
        return llm, llm.config
    from codeshell.bench import random_model
    from codeshell.config import SHAPES
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_quant import shape_config
    cfg = (SHAPES.get(shape) or shape_config(shape)).replace(n_layer=layers)
    m = random_model(cfg, torch.bfloat16)
    llm = LLM.from_model(m, cfg, max_batch=1, threads=threads, max_model_len=prompt_len + 8)
    return llm, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", help="a codeshell.config.SHAPES name, or small / mid")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model", default=None, help="a checkpoint (e.g. codeshell-mini) instead of --shape / --layers")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="plain + traced pairs")
    ap.add_argument("--attention-only", action="store_true", help="time the prefill attention kernel alone")
    ap.add_argument("--cpu", action="store_true",
                    help="time prompts and parts by this thread's CPU time (time.thread_time; meant with --threads 1 "
                         "on a loaded host, where the wall clock counts the other jobs' slices)")
    ap.add_argument("--save", default=None, help="with --attention-only: torch.save its output here")
    ap.add_argument("--kb", type=int, nargs="*", default=None,
                    help="with --attention-only: the key blocks to time, alternating (default: the kernel's choice)")
    ap.add_argument("--ab", default=None,
                    help="also time each round with one change off, alternating: gelu (c_fc's GELU in the GEMM "
                         "epilogue), attn32 (the native prefill attention at head dims %% 64 == 32), attnkb (the "
                         "prefill attention's 64-key blocks: 16 as before), lastrows (the prompt's last "
                         "block on every row, CODESHELL_PREFILL_LAST_ROWS=0), s18 (all of session 18's prefill "
                         "changes: CODESHELL_PREFILL_ATTN_KB=16, CODESHELL_DOT_ITEM=8, CODESHELL_PREFILL_LN_SPLIT=off, "
                         "CODESHELL_DOT_XPACK=1, CODESHELL_GELU_X4=0, CODESHELL_PREFILL_ATTN_TRIM=0 and the KV cache's "
                         "index_put), or NAME=VALUE[,NAME=VALUE...] (environment switches "
                         "the kernels read each call: CODESHELL_DOT_ITEM=8, CODESHELL_PREFILL_LN_SPLIT=off)")
    args = ap.parse_args()
    if args.attention_only:
        from codeshell.config import SHAPES
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_quant import shape_config
        torch.set_num_threads(args.threads)
        if args.model is not None:  # a checkpoint's own shape (codeshell-mini: the package's)
            from codeshell.config import CodeShellConfig
            from codeshell.mini import MODEL_DIR
            cfg = CodeShellConfig.from_json(os.path.join(MODEL_DIR if args.model == "codeshell-mini" else args.model,
                                                         "config.json"))
        else:
            cfg = SHAPES.get(args.shape) or shape_config(args.shape)
        attention_only(cfg, args.prompt_len, args.rounds, args.save, args.kb)
        return
    from codeshell import SamplingParams
    from codeshell.bench import bf16_matmul_peak, prompt_flops
    llm, cfg = build(args.shape, args.layers, args.threads, args.prompt_len, args.model)
    if args.model is not None:
        args.shape = args.model
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    if args.cpu:
        CLOCK[0] = time.thread_time

    def prompt():
        ids = torch.randint(0, min(cfg.vocab_size, 60000), (args.prompt_len,), generator=g).tolist()
        t = CLOCK[0]()
        llm.generate([{"prompt_token_ids": ids}], sp)
        return CLOCK[0]() - t

    prompt(), prompt()  # warm-up: first touch of the cache and scratch
    peak = bf16_matmul_peak()["peak"]
    flops = prompt_flops(cfg, args.prompt_len)
    plain, traced, parts, before = [], [], collections.defaultdict(list), []
    for _ in range(args.rounds):
        plain.append(prompt())
        if args.ab:
            with _before(args.ab):
                before.append(prompt())
        saved = install_tracing(llm)
        PARTS.clear()
        traced.append(prompt())
        remove_tracing(saved)
        for k, v in PARTS.items():
            parts[k].append(v)
    if before:
        for name, ts in ((f"{args.ab} off", before), (f"{args.ab} on ", plain)):
            print(f"{name}, alternating (% of peak): " + ", ".join(f"{100 * flops / t / 1e12 / peak:.1f}" for t in ts)
                  + f"; median {statistics.median(ts) * 1e3:.2f} ms")
    report(cfg, args, peak, flops, plain, traced, parts)


def report(cfg, args, peak, flops, plain, traced, parts) -> None:
    lf = {"attn.c_attn": cfg.qkv_dim, "attn.c_proj": cfg.n_embd, "mlp.c_fc": cfg.ffn_dim, "mlp.c_proj": cfg.n_embd}
    kin = {"attn.c_attn": cfg.n_embd, "attn.c_proj": cfg.n_embd, "mlp.c_fc": cfg.n_embd, "mlp.c_proj": cfg.ffn_dim}
    lf["mlp.c_fc + GELU"], kin["mlp.c_fc + GELU"] = lf["mlp.c_fc"], kin["mlp.c_fc"]
    T = args.prompt_len
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = statistics.median(traced)
    print(f"shape {args.shape} x {cfg.n_layer} layers, prompt {T}, {args.threads} threads, peak {peak:.3f} TFLOP/s")
    if plain:
        p = statistics.median(plain)
        print(f"plain prompt (median of {len(plain)}; best {min(plain) * 1e3:.1f} ms): {p * 1e3:.1f} ms = {flops / p / 1e12:.3f} TFLOP/s = {100 * flops / p / 1e12 / peak:.1f}% of peak")
    print(f"traced prompt: {total * 1e3:.1f} ms (median of {len(traced)})")
    rows = sorted(med.items(), key=lambda kv: -kv[1])
    from codeshell.engine import engine as E
    # the rows each linear ran on: with the engine's CODESHELL_PREFILL_LAST_ROWS (default on) the last
    # block's linears past c_attn run on the sampled row only (the flops counted are the work done)
    done = {k: T * cfg.n_layer for k in lf}
    if E._LAST_ROWS:
        for k in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj", "mlp.c_fc + GELU"):
            done[k] = T * (cfg.n_layer - 1) + 1
    for k, v in rows:
        extra = ""
        if k in lf:  # per linear: its own rate against the peak
            tf = 2.0 * done[k] * lf[k] * kin[k] / v / 1e12
            extra = f"  {tf:.3f} TFLOP/s = {100 * tf / peak:.0f}% of peak"
        elif k == "attention kernel":
            layers = cfg.n_layer - 1 if E._LAST_ROWS else cfg.n_layer  # the last block's: one query
            tf = 2.0 * T * T * cfg.n_embd * layers / v / 1e12
            extra = f"  {tf:.3f} TFLOP/s (causal, as prompt_flops counts it)"
        print(f"  {k:24s} {v * 1e3:8.2f} ms  {100 * v / total:5.1f}%{extra}")
    rest = total - sum(med.values())
    print(f"  {'rest (engine, Python)':24s} {rest * 1e3:8.2f} ms  {100 * rest / total:5.1f}%")
    from codeshell.kernels import ops
    for key, path in sorted(ops._CHOICES.items(), key=str):  # the prefill paths chosen at load (or read from disk)
        if key[0] == "bf16" or path != "avx512_vnni:q8":
            print(f"  prefill path {key[0]} {key[1]}x{key[2]}: {path}")


if __name__ == "__main__":
    main()
