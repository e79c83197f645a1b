"""The native decode step (csrc/decode_step.cpp, codeshell/kernels/step.py) against the Python
fused path it replaces: the engine's logits (every forward's), greedy tokens and KV cache are
bit for bit those of CODESHELL_DECODE_STEP=off, for bf16, int8 and int4 weights, at batch 1, at
batch 4 with different lengths and in prompt-lookup verify steps, at every ISA level this CPU
has; the step is rebuilt when a weight, bias, LayerNorm or the ISA cap changes; everything the
native step does not take runs the Python path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codeshell.config import CodeShellConfig
from codeshell.engine.engine import Engine
from codeshell.engine.sampling import SamplingParams, first_argmax
from codeshell.kernels import _ext, available, ops, prepack, prepare_model
from codeshell.kernels import step as step_mod
from codeshell.kernels.module import PackedLinear
from codeshell.model import CodeShellForCausalLM
from codeshell.quant.linear import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not available(), reason=f"native kernels unavailable: {_ext.unavailable_reason()}")
LEVEL = ops.isa_level() if available() else -1
VOCAB = 300


def tiny(kind: str = "bf16", group: int = 64, **over) -> CodeShellForCausalLM:
    """A random 2-layer bf16 model (C = 128, GQA 4 heads / 2 groups) with non-trivial
    LayerNorms, its block linears packed bf16 or quantized int8 / int4 (asymmetric groups of
    `group`), the head and the tied embedding packed bf16 (kind "fp32": the plain fp32 model).
    K = 128 and 256: the 512-bit kernels run."""
    kw = dict(n_embd=128, n_layer=2, n_head=4, num_query_groups=2, n_inner=256, vocab_size=VOCAB, n_positions=256)
    kw.update(over)
    torch.manual_seed(0)
    m = CodeShellForCausalLM(CodeShellConfig(**kw)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.1)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.05)
    if kind == "fp32":
        return m
    return packed(m, kind, group)


def filled_cache(m: CodeShellForCausalLM, slots: int, positions: int, seed: int):
    """A bf16 KV cache of `slots` x `positions` for `m`, every key and value random (seeded), so
    attention reads non-trivial history at any position without a prefill first."""
    from codeshell.engine.kv_cache import KVCache

    cache = KVCache(m.cfg, slots, positions, torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(cache.k.dtype))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(cache.v.dtype))
    return cache


def packed(m: CodeShellForCausalLM, kind: str, group: int = 64) -> CodeShellForCausalLM:
    """`m` in bf16 with its block linears packed bf16 (kind "bf16") or quantized int8 / int4
    (asymmetric groups of `group`), the head and the tied embedding packed bf16."""
    m = m.to(torch.bfloat16)
    if kind != "bf16":
        for block in m.transformer.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                lin = getattr(parent, name)
                w, b = lin.weight.float(), lin.bias.float()
                q = Int8Linear.from_float(w, b) if kind == "int8" else \
                    Int4Linear.from_float(w, b, group_size=group, symmetric=False)
                setattr(parent, name, q)
    prepare_model(m)
    return m


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the forwards the native step ran (step.forward or step.decode returned a result)."""
    calls = []
    for name in ("forward", "decode"):
        orig = getattr(step_mod, name)

        def counted(*a, _orig=orig):
            out = _orig(*a)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(step_mod, name, counted)
    return calls


def prompts(n: int) -> list[list[int]]:
    """Repetitive prompts of different lengths (the prompt lookup finds drafts in them)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        base = torch.randint(0, VOCAB, (4 + 3 * i,), generator=g).tolist()
        out.append(base * 3 + base[:2])
    return out


def engine_run(m, monkeypatch, native: bool, ps, lookup: int = 0, max_tokens=10):
    """Greedy tokens per request, every forward's logits (prefills' and packed steps') and the
    final KV cache of one engine run. `max_tokens` may be a list (one per request: the batch
    then shrinks as requests finish)."""
    monkeypatch.setenv("CODESHELL_DECODE_STEP", "on" if native else "off")
    logits = []
    eng = Engine(m, m.cfg, max_batch=4, prompt_lookup=lookup)
    eng.draft_budget = None  # every draft runs (the budget's choice depends on timings)
    packed, prefill = eng._packed, eng._prefill

    def recorded_packed(tokens, positions, slots, want_logits=True):
        # the logits of every step are compared, so they are asked for even where every row is
        # plain greedy (the engine then asks for the picks only: test_greedy_picks_without_logits)
        out = packed(tokens, positions, slots, True)
        if out[1] is not None:  # the native step's greedy picks: first_argmax's, row by row
            assert out[1] == first_argmax(out[0]).tolist()
        logits.append(out[0].clone())
        return out

    def recorded_prefill(reqs):
        out = prefill(reqs)
        logits.extend(x.clone() for _, x in out)
        return out

    eng._packed, eng._prefill = recorded_packed, recorded_prefill
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ps)
    for i, (p, n) in enumerate(zip(ps, limits)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out, logits, eng


def assert_same_runs(m, monkeypatch, calls, ps, lookup=0, max_tokens=10):
    start = len(calls)
    want, want_logits, e0 = engine_run(m, monkeypatch, False, ps, lookup, max_tokens)
    mid = len(calls)
    got, got_logits, e1 = engine_run(m, monkeypatch, True, ps, lookup, max_tokens)
    assert not any(calls[start:mid]) and any(calls[mid:])  # the switch works, and the native step ran
    assert got == want
    assert len(got_logits) == len(want_logits)
    for a, b in zip(got_logits, want_logits):
        assert torch.equal(a, b)
    assert torch.equal(e1.cache.k, e0.cache.k) and torch.equal(e1.cache.v, e0.cache.v)
    if lookup:
        assert e1.spec_steps > 0 and e1.spec_steps == e0.spec_steps


def built(m):
    """The native step the engine's last packed step ran (`decode`'s, else `forward`'s)."""
    d = step_mod._DECODERS.get(m)
    return d.step if d is not None and d.step is not None else step_mod._STEPS[m.transformer][2]


def _levels():
    return [pytest.param(name, id=name) for name in ops.ISA_LEVELS]


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_engine_bitwise_equal_to_python_path(kind, level, monkeypatch, native_calls):
    if ops.ISA_LEVELS.index(level) > LEVEL:
        pytest.skip(f"{level} above this CPU's highest kernel ISA ({ops.ISA_LEVELS[LEVEL]})")
    monkeypatch.setenv("CODESHELL_KERNEL_ISA", level)
    m = tiny(kind)
    assert_same_runs(m, monkeypatch, native_calls, prompts(1))              # batch 1
    assert_same_runs(m, monkeypatch, native_calls, prompts(4))              # batch 4, different lengths
    assert_same_runs(m, monkeypatch, native_calls, prompts(4), lookup=5)    # verify steps with drafts
    # the kernels the step was built with are the ones plan names at this level; the engine's
    # steps went from token ids to logits in one call (step.decode)
    d = step_mod._DECODERS[m]
    assert d.cap == level and d.step is not None and d.step.layers == m.cfg.n_layer


def test_learned_positions_without_rope(monkeypatch, native_calls):
    """Learned absolute positions: no RoPE in the step (qkv only rounded to bf16)."""
    m = tiny("bf16", position_embedding_type="learned_absolute")
    assert_same_runs(m, monkeypatch, native_calls, prompts(3), lookup=4)


@pytest.mark.parametrize("kind,over", [
    ("int8", dict(n_embd=72, n_head=3, num_query_groups=1, n_inner=200)),   # K % 32 != 0
    ("int4", dict(n_embd=96, n_head=4, num_query_groups=2, n_inner=160)),   # K % 64 != 0
])
def test_exact_unpacking_kernels(kind, over, monkeypatch, native_calls):
    """Shapes the integer kernels do not take run the fp32-unpacking kernels (`avx2:unpack`)."""
    m = tiny(kind, group=32, **over)
    lin = m.transformer.h[0].attn.c_attn
    assert ops.plan(lin._fast_linear().packed, 1, torch.bfloat16) == "avx2:unpack"
    assert_same_runs(m, monkeypatch, native_calls, prompts(3), lookup=4)


def test_rebuilt_when_weights_or_isa_change(monkeypatch, native_calls):
    m = tiny("bf16")
    ps = prompts(2)
    assert_same_runs(m, monkeypatch, native_calls, ps)
    first = built(m)
    assert_same_runs(m, monkeypatch, native_calls, ps)
    assert built(m) is first  # unchanged model: the same step
    logits = engine_run(m, monkeypatch, True, ps)[1]

    def changed_by(mutate):
        before = built(m)
        with torch.no_grad():
            mutate()
        assert_same_runs(m, monkeypatch, native_calls, ps)
        assert built(m) is not before

    g = torch.Generator().manual_seed(3)
    block = m.transformer.h[1]
    # a linear swapped for another
    w = torch.randn(m.cfg.ffn_dim, m.cfg.n_embd, generator=g).to(torch.bfloat16) * 0.2
    changed_by(lambda: setattr(block.mlp, "c_fc", PackedLinear(prepack(w), block.mlp.c_fc.bias)))
    # a bias changed in place (PackedLinear's call cache follows its version)
    changed_by(lambda: block.attn.c_attn.bias.add_(0.5))
    # a LayerNorm weight replaced, and loaded in place by load_state_dict (no rebuild needed:
    # the step holds the tensor itself), then a weight swapped to a quantized linear
    changed_by(lambda: setattr(block.ln_2, "weight", nn.Parameter(block.ln_2.weight * 1.5)))
    sd = m.state_dict()
    sd["transformer.h.0.ln_1.bias"] = sd["transformer.h.0.ln_1.bias"] + 0.3
    m.load_state_dict(sd, strict=False)
    assert_same_runs(m, monkeypatch, native_calls, ps)
    lin = block.attn.c_proj
    changed_by(lambda: setattr(block.attn, "c_proj", Int8Linear.from_float(
        torch.randn(lin.out_features, lin.in_features, generator=g) * 0.1, lin.bias.float())))
    assert not torch.equal(engine_run(m, monkeypatch, True, ps)[1][-1], logits[-1])  # they changed the model
    # the ISA cap is part of the key
    if LEVEL >= 1:
        before = built(m)
        monkeypatch.setenv("CODESHELL_KERNEL_ISA", "avx2")
        assert_same_runs(m, monkeypatch, native_calls, ps)
        assert built(m) is not before


def test_fallbacks_take_the_python_path(monkeypatch, native_calls):
    ps = prompts(2)
    # an fp32 model (x is fp32; prepare_model packs nothing)
    engine_run(tiny("fp32"), monkeypatch, True, ps)
    assert native_calls and not any(native_calls)
    native_calls.clear()
    # a bf16 model whose linears stay nn.Linear (no prepare_model), e.g. a LoRA-wrapped module
    m = tiny("bf16")
    m.transformer.h[0].mlp.c_fc = nn.Linear(m.cfg.n_embd, m.cfg.ffn_dim).to(torch.bfloat16)
    engine_run(m, monkeypatch, True, ps)
    assert native_calls and not any(native_calls)
    native_calls.clear()
    # an activation the step does not run
    m = tiny("bf16", activation_function="relu")
    engine_run(m, monkeypatch, True, ps)
    assert native_calls and not any(native_calls)
    native_calls.clear()
    # prefill and plain cache views never reach the step; more than 64 packed rows neither
    m = tiny("bf16")
    engine_run(m, monkeypatch, True, ps)
    assert any(native_calls) and not all(native_calls)  # prefills ran the Python path
    from codeshell.engine.kv_cache import KVCache
    kv = KVCache(m.cfg, 1, 128, torch.bfloat16)
    n = ops.ROW_INVARIANT_MAX_M + 1
    view = kv.packed_view([0] * n, list(range(n)))
    x = torch.randn(1, n, m.cfg.n_embd).to(torch.bfloat16)
    rope = m.transformer._rope_rows(view.positions, n)
    assert step_mod.forward(m.transformer, x, rope, None, view) is None
    view = kv.packed_view([0] * 3, [0, 1, 2])
    rope = m.transformer._rope_rows(view.positions, 3)
    assert step_mod.forward(m.transformer, x[:, :3], rope, None, view) is not None
    assert step_mod.forward(m.transformer, x[:, :3], rope, None, kv.view([0], view.positions)) is None
    monkeypatch.setenv("CODESHELL_DECODE_STEP", "off")
    assert step_mod.forward(m.transformer, x[:, :3], rope, None, view) is None
    monkeypatch.setenv("CODESHELL_DECODE_STEP", "fast")
    with pytest.raises(ValueError, match="CODESHELL_DECODE_STEP='fast': expected on or off"):
        step_mod.forward(m.transformer, x[:, :3], rope, None, view)


def decoded(calls_before: int, calls: list, m) -> bool:
    """Whether the engine's packed steps since `calls_before` ran `step.decode` (token ids to
    logits natively): its decoder for m holds a step."""
    d = step_mod._DECODERS.get(m)
    return d is not None and d.step is not None and any(calls[calls_before:])


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_decode_untied_embedding_and_int8_head(kind, monkeypatch, native_calls):
    """An untied model: the embedding stays a plain bf16 nn.Embedding (a row table) and the
    head its own linear, packed bf16 or quantized int8 per channel (bench_quant's --head int8)."""
    m = tiny(kind, tie_word_embeddings=False)
    assert type(m.transformer.wte) is nn.Embedding and type(m.lm_head) is PackedLinear
    start = len(native_calls)
    # 16 tokens (not 10): whether the random model's greedy text repeats within reach of the lookup
    # depends on the prompt's last bits (session 38's AMX softmax exp moved it past 10 tokens here)
    assert_same_runs(m, monkeypatch, native_calls, prompts(3), lookup=4, max_tokens=16)
    assert decoded(start, native_calls, m)
    w = m.lm_head.packed
    g = torch.Generator().manual_seed(5)
    m.lm_head = Int8Linear.from_float(torch.randn(w.out_features, w.in_features, generator=g) * 0.1)
    before = built(m)
    assert_same_runs(m, monkeypatch, native_calls, prompts(3))
    assert built(m) is not before and step_mod._DECODERS[m].step is not None  # rebuilt with the new head
    # the embedding table replaced: rebuilt, and the same logits as the Python path again
    before = built(m)
    m.transformer.wte.weight = nn.Parameter(m.transformer.wte.weight * 2)
    assert_same_runs(m, monkeypatch, native_calls, prompts(2))
    assert built(m) is not before


def test_decode_batch_size_changes(monkeypatch, native_calls):
    """Requests finishing at different steps: the packed steps' M shrinks 4 -> 3 -> 2 -> 1
    between calls of the same step object, with drafts (verify steps of varying M) too."""
    m = tiny("bf16")
    start = len(native_calls)
    assert_same_runs(m, monkeypatch, native_calls, prompts(4), max_tokens=[2, 5, 9, 12])
    assert_same_runs(m, monkeypatch, native_calls, prompts(4), lookup=3, max_tokens=[12, 3, 7, 1])
    assert decoded(start, native_calls, m)


def test_decode_fallbacks(monkeypatch, native_calls):
    """Where `step.decode` does not apply the engine runs the model (its forward and head): a
    hook on the head or the transformer, a forward patched onto one, learned positions, scaled RoPE, CODESHELL_DECODE_STEP=off;
    the blocks may still take the native step (`step.forward`)."""
    kv_args = ([1], [3], [0])

    def try_decode(m):
        from codeshell.engine.kv_cache import KVCache
        return step_mod.decode(m, KVCache(m.cfg, 1, 64, torch.bfloat16), *kv_args)

    m = tiny("bf16")
    with torch.inference_mode():
        assert try_decode(m) is not None
        h = m.lm_head.register_forward_hook(lambda *a: None)
        assert try_decode(m) is None
        h.remove()
        h = m.transformer.register_forward_pre_hook(lambda *a: None)
        assert try_decode(m) is None
        h.remove()
        m.lm_head.forward = lambda x: x  # a forward set on the instance (a test's spy, a patch)
        assert try_decode(m) is None
        del m.lm_head.forward
        assert try_decode(m) is not None
        monkeypatch.setenv("CODESHELL_DECODE_STEP", "off")
        assert try_decode(m) is None
        monkeypatch.delenv("CODESHELL_DECODE_STEP")
        for over in (dict(position_embedding_type="learned_absolute"),
                     dict(rope_scaling_type="linear", rope_scaling_factor=2.0)):
            assert try_decode(tiny("bf16", **over)) is None
    with torch.no_grad():  # grad off but not inference mode: still the native step
        assert try_decode(m) is not None
    assert try_decode(m) is None  # grad enabled: the model's autograd path
    # scaled RoPE and hooks give the Python path's results (the engine runs the model)
    m = tiny("bf16", rope_scaling_type="linear", rope_scaling_factor=2.0)
    assert_same_runs(m, monkeypatch, native_calls, prompts(2))
    assert step_mod._DECODERS[m].step is None


@pytest.fixture
def two_threads():
    """2 OpenMP threads (the team needs more than one), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("team", ["on", "off", "on-nosplit", "on-attnsplit"])
@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_team_and_step_buffers_bitwise(kind, team, monkeypatch, native_calls, two_threads):
    """The step in one thread team (CODESHELL_DECODE_TEAM=on: the helper thread takes chunks of
    every kernel's loop, a batch's queries split between the threads, since session 17 a few
    LayerNorm rows and GELU pieces too; "on-nosplit": CODESHELL_SMALL_SPLIT=off, the team as
    before session 17; "on-attnsplit": CODESHELL_TEAM_ATTN_MIN=1, a batch-1 query's KV groups split
    over the team at every context length, session 19) and without it, its per-step buffers reused
    as the batch size changes between steps (verify steps of varying rows, requests finishing): bit
    for bit the Python path. (tests/kernels/test_team_splits.py checks the split loops at the small
    shape's widths.)"""
    if team == "on-nosplit":
        monkeypatch.setenv("CODESHELL_SMALL_SPLIT", "off")
        team = "on"
    if team == "on-attnsplit":
        monkeypatch.setenv("CODESHELL_TEAM_ATTN_MIN", "1")
        team = "on"
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", team)
    m = tiny(kind)
    assert_same_runs(m, monkeypatch, native_calls, prompts(1))
    assert_same_runs(m, monkeypatch, native_calls, prompts(4), lookup=5)
    assert_same_runs(m, monkeypatch, native_calls, prompts(4), max_tokens=[2, 9, 5, 7])
    s = built(m)
    assert s.team == {"off": 0, "on": 1}[team] and s.uses_team == (team == "on")
    # the blocks-only call (`run`, learned positions: no RoPE), in the team too
    assert_same_runs(tiny("bf16", position_embedding_type="learned_absolute"), monkeypatch, native_calls,
                     prompts(3), lookup=4)


def test_team_mode_auto_and_switch(monkeypatch, native_calls, two_threads):
    """on by default (session 19; off before); off: no team; auto: the team where every layer's
    weights are <= 4 MiB (codeshell-mini's size), not above; a change of CODESHELL_DECODE_TEAM
    rebuilds the step; a bad value is one clear error."""
    monkeypatch.delenv("CODESHELL_DECODE_TEAM", raising=False)
    m = tiny("bf16")
    assert_same_runs(m, monkeypatch, native_calls, prompts(2))
    s = built(m)
    assert s.team == 1 and s.uses_team
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "off")
    assert_same_runs(m, monkeypatch, native_calls, prompts(2))
    assert built(m) is not s and built(m).team == 0 and not built(m).uses_team
    s = built(m)
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "auto")
    assert_same_runs(m, monkeypatch, native_calls, prompts(2))
    assert built(m) is not s and built(m).team == 2 and built(m).uses_team
    # the threshold, on a step's own bookkeeping (C = 256, one layer of 5 MiB of weights)
    mod = _ext.get()

    def layer_of(mib_fc):
        st = mod.DecodeStep(8, 2, 32, 0)
        st.team = 2
        ids = [st.add_linear(0, 2, 0, torch.empty(n << 20, dtype=torch.uint8), None, None, None, 0, N, K)
               for n, N, K in ((1, 384, 256), (1, 256, 256), (mib_fc, 1024, 256), (1, 256, 1024))]
        st.add_layer(None, None, 1e-5, ids[0], ids[1], None, None, 1e-5, ids[2], ids[3])
        return st

    assert layer_of(1).uses_team and not layer_of(2).uses_team
    big = layer_of(2)
    big.team = 1
    assert big.uses_team
    with pytest.raises(RuntimeError, match="mode must be 0"):
        big.team = 3
    monkeypatch.setenv("CODESHELL_DECODE_TEAM", "fast")
    with pytest.raises(ValueError, match="CODESHELL_DECODE_TEAM='fast': expected auto, on or off"):
        step_mod.team_mode()


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_team_attention_group_split(kind, monkeypatch, two_threads):
    """Session 19: in a team at batch 1, a query whose context has at least CODESHELL_TEAM_ATTN_MIN
    positions (default 512) has its KV groups split over the team's threads (one packed_attention a
    group): the same logits and picks as unsplit (CODESHELL_TEAM_ATTN_MIN=0) and as outside a team,
    bit for bit, at short and long contexts, in slot 0 and a later slot; the split posts one more loop
    a layer, and only from the threshold on."""
    mod = _ext.get()
    m = tiny(kind)
    cache = filled_cache(m, 3, 256, seed=3)
    layers = m.cfg.n_layer

    def run(pos, slot):
        with torch.inference_mode():
            out = step_mod.decode(m, cache, [7], [pos], [slot])
        assert out is not None
        return out

    def loops(env, pos, slot):
        monkeypatch.setenv("CODESHELL_TEAM_ATTN_MIN", env)
        got = mod.run_in_team(lambda: run(pos, slot))
        assert got is not False
        return got

    run(3, 0)  # builds the step
    for pos, slot in ((3, 0), (40, 2), (200, 1), (255, 2)):
        st = step_mod._DECODERS[m].step
        st.team = 0
        alone = run(pos, slot)  # outside a team: packed_attention's own split (OpenMP)
        st.team = 1
        (plain, n0), (split, n1) = loops("0", pos, slot), loops("1", pos, slot)
        (at, n2), (below, n3) = loops(str(pos + 1), pos, slot), loops(str(pos + 2), pos, slot)
        for a, b in ((plain, alone), (split, alone), (at, alone), (below, alone)):
            assert torch.equal(a[0], b[0]) and list(a[1]) == list(b[1])  # the bf16 logits, the picks
        assert n1 == n0 + layers and n2 == n0 + layers and n3 == n0  # the context is pos + 1 positions


def _rounded_argmax_cases() -> list[torch.Tensor]:
    """fp32 logit rows whose bf16 rounding has ties the fp32 values do not: a later fp32 value
    larger than an earlier one that rounds to the same bf16 (the first index must win), NaN,
    -inf and +inf, rows of V not a multiple of 8 (the scalar tail), and the maximum in the tail."""
    g = torch.Generator().manual_seed(5)
    out = [torch.randn(7, 300, generator=g) * 4, torch.randn(3, 16384, generator=g) * 8,
           torch.randn(2, 13, generator=g)]
    t = torch.randn(6, 301, generator=g)
    one = torch.tensor(1.0).view(torch.int32)
    for r, (i, j) in enumerate([(10, 200), (3, 4), (0, 300), (299, 300), (64, 65), (8, 296)]):
        t[r, i] = (one + 1).view(torch.float32) * 30   # 30 * (1 + 2^-23): rounds to 30 in bf16
        t[r, j] = (one + 3).view(torch.float32) * 30   # larger in fp32, the same bf16 value
    t[1, 7] = float("nan")
    t[2, 5] = float("-inf")
    t[3, 0] = float("nan")
    out.append(t)
    inf = torch.randn(2, 40, generator=g)
    inf[0, 33] = inf[0, 39] = float("inf")
    inf[1] = float("nan")
    out.append(inf)
    return out


def test_rounded_argmax_is_argmax_rows_of_the_bf16_logits():
    """argmax_rows_rounded (decode's picks without bf16 logits) on fp32 rows equals argmax_rows
    and first_argmax on the rows rounded to bf16, ties (equal after rounding) included."""
    mod = _ext.get()
    for x in _rounded_argmax_cases():
        got = mod.argmax_rows_rounded(x.contiguous())
        b = x.to(torch.bfloat16)
        assert got.tolist() == mod.argmax_rows(b).tolist()
        assert got.tolist() == first_argmax(b).tolist()
    # the crafted tie: the earlier index wins although the later fp32 value is larger
    t = _rounded_argmax_cases()[3]
    assert int(mod.argmax_rows_rounded(t)[0]) == 10 and int(t[0].argmax()) == 200


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_greedy_picks_without_logits(kind, monkeypatch, native_calls):
    """Greedy engine steps ask the native step for its picks only (logits None) and give the
    tokens and KV cache of the Python path, plain and with prompt lookup (verify steps)."""
    m = tiny(kind)
    asked = []
    orig = step_mod.decode

    def spy(lm, cache, tokens, positions, slots, logits=True):
        out = orig(lm, cache, tokens, positions, slots, logits)
        asked.append((logits, out is not None and out[0] is None))
        return out

    monkeypatch.setattr(step_mod, "decode", spy)
    for lookup in (0, 5):
        ps = prompts(4)
        runs = {}
        for native in (False, True):
            monkeypatch.setenv("CODESHELL_DECODE_STEP", "on" if native else "off")
            eng = Engine(m, m.cfg, max_batch=4, prompt_lookup=lookup)
            eng.draft_budget = None
            for i, p in enumerate(ps):
                eng.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            out = {}
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        out[o.request_id] = o.outputs[0].token_ids
            runs[native] = (out, eng)
        assert runs[True][0] == runs[False][0]
        e0, e1 = runs[False][1], runs[True][1]
        assert torch.equal(e1.cache.k, e0.cache.k) and torch.equal(e1.cache.v, e0.cache.v)
        if lookup:
            assert e1.spec_steps > 0
    # every step was greedy: the picks only were asked for, and the native runs gave no logits
    assert asked and not any(want for want, _ in asked) and any(none for _, none in asked)


def test_logits_are_made_when_a_row_samples(monkeypatch):
    """A batch with a sampled row asks for the logits (its sampler needs them); greedy rows in
    the same step still take the picks, and their text is that of a greedy-only run."""
    monkeypatch.setenv("CODESHELL_DECODE_STEP", "on")
    m = tiny("bf16")
    asked = []
    orig = step_mod.decode

    def spy(lm, cache, tokens, positions, slots, logits=True):
        asked.append(logits)
        out = orig(lm, cache, tokens, positions, slots, logits)
        assert out is None or (out[0] is None) == (not logits)
        return out

    monkeypatch.setattr(step_mod, "decode", spy)
    ps = prompts(2)

    def run(params):
        eng = Engine(m, m.cfg, max_batch=4, prompt_lookup=4)
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(f"r{i}", p, sp)
        out = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        return out

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run([greedy, greedy])
    assert asked and not any(asked)
    asked.clear()
    mixed = run([greedy, SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True)])
    assert asked and all(asked)
    assert mixed["r0"] == alone["r0"]


@pytest.mark.parametrize("raw", ["1", "0"])
def test_rounded_argmax_raw_max_pass(raw, monkeypatch):
    """argmax_rows_rounded's raw-max passes (sampling.cpp row_argmax_rounded512: the maximum of the
    fp32 row, rounded once, then the first value >= the smallest float rounding to it) against the
    rounding passes (CODESHELL_ARGMAX_RAW=0) and first_argmax of the bf16 rows: values on both sides
    of every rounding boundary near the maximum (ties to even, ties after rounding at the front and
    the back), -0 / +0 maxima, all-negative, all -inf, values rounding to inf, subnormals, NaN rows
    (row_argmax's fallback), lengths with and without a 16-value tail."""
    mod = _ext.get()
    monkeypatch.setenv("CODESHELL_ARGMAX_RAW", raw)
    g = torch.Generator().manual_seed(28)
    rows = []
    for V in (16384, 16390, 7, 33, 300):
        for scale in (1.0, 1e-3, 1e30, 1e-40):
            base = torch.randn(6, V, generator=g) * scale
            rows.append(base)
        # boundaries: a bf16 value b and the fp32 values just below / above its rounding edges
        for b in (1.0, 1.0078125, -3.0, -3.015625, 0.0, 3.3895314e38, -3.3895314e38, 9.2e-41):
            bb = torch.tensor([b], dtype=torch.bfloat16).float().view(torch.int32)
            near = torch.cat([bb + d for d in (-0x8001, -0x8000, -0x7FFF, 0, 0x7FFF, 0x8000, 0x8001)]).view(torch.float32)
            t = torch.full((len(near), V), -1e38)
            for r in range(len(near)):
                j = torch.randint(0, V, (3,), generator=g)
                t[r, j] = near[torch.randperm(len(near), generator=g)[:3]]
            rows.append(t)
    z = torch.full((4, 40), -5.0)
    z[0, 9], z[0, 20] = -0.0, 0.0
    z[1, 3], z[1, 30] = 1e-45, -1e-45  # subnormals round to +-0: a tie with the first
    z[2] = float("-inf")
    z[3, 17] = float("nan")
    rows.append(z)
    for x in rows:
        x = x.contiguous()
        got = mod.argmax_rows_rounded(x).tolist()
        b = x.to(torch.bfloat16)
        assert got == first_argmax(b).tolist()
        assert got == mod.argmax_rows(b).tolist()
