"""`PackedLinear` / `prepare_model`: the model-level wiring of the native kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codeshell.kernels import PackedEmbedding, PackedLinear, available, prepack, prepare_model
from codeshell.weights import load_model
from tests.conftest import require_shared


def test_packed_linear_matches_nn_linear_for_bf16_weights():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40).to(torch.bfloat16)
    pl = PackedLinear(prepack(lin.weight), lin.bias)
    for m in (1, 3, 8, 33):
        x = torch.randn(2, m, 96, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        assert torch.allclose(pl(x).float(), ref, atol=2e-2, rtol=2e-2)


def test_prepare_model_frees_each_old_weight_before_packing_the_next(monkeypatch):
    """Peak memory stays near one copy of the model: when a linear is packed, the weights of
    the linears packed before it are already gone."""
    import weakref

    from codeshell.kernels import module
    if not available():
        pytest.skip("native kernels unavailable here")
    d = require_shared("golden/rope-gqa")
    model, cfg, _ = load_model(d, dtype="bfloat16")
    refs = [weakref.ref(m.weight) for m in model.modules() if type(m) is nn.Linear]
    ids = {id(r()) for r in refs}
    alive_at_call = []
    real = module.prepack

    def spy(w):
        alive_at_call.append(sum(r() is not None for r in refs))
        return real(w)
    monkeypatch.setattr(module, "prepack", spy)
    assert prepare_model(model) == len(refs) == len(ids)
    # call i sees only the not-yet-packed weights; the tied head's weight is also the embedding
    # (it is the last swapped), so it stays alive until the very end
    assert alive_at_call == [len(refs) - i for i in range(len(refs))]
    assert all(r() is None for r in refs)


def test_packed_embedding_equals_the_embedding_it_replaces():
    torch.manual_seed(0)
    emb = nn.Embedding(37, 24).to(torch.bfloat16)  # 37: the last panel is partly padding
    pe = PackedEmbedding(prepack(emb.weight))
    ids = torch.tensor([[0, 36, 15, 16], [8, 7, 31, 32]])
    assert pe(ids).dtype == torch.bfloat16 and torch.equal(pe(ids), emb(ids))
    many = torch.randint(0, 37, (3, 9))  # 27 rows: past the row-by-row copies, one gather
    assert torch.equal(pe(many), emb(many)) and torch.equal(pe(ids[:1, :1]), emb(ids[:1, :1]))
    with pytest.raises(IndexError, match="token id 37 is out of range"):
        pe(torch.tensor([[37]]))


@pytest.mark.parametrize("k", [24, 25, 1024])
def test_packed_embedding_native_gather(k, monkeypatch):
    # A prompt's rows (> 16) by the native gather (gather_bf16: the next row's lines prefetched,
    # rows over the threads) and by bf16_rows' advanced indexing (CODESHELL_EMBED_NATIVE=0): the
    # embedding's rows either way, any order, repeats, odd K (the last k-pair's half), the last
    # panel's padding rows never read; an id out of range is the IndexError of the short path.
    if not available():
        pytest.skip("native kernels unavailable here")
    torch.manual_seed(1)
    emb = nn.Embedding(37, k).to(torch.bfloat16)
    pe = PackedEmbedding(prepack(emb.weight))
    ids = torch.randint(0, 37, (3, 100))
    ids[0, :5] = torch.tensor([36, 0, 36, 16, 15])
    native = pe(ids)
    monkeypatch.setenv("CODESHELL_EMBED_NATIVE", "0")
    assert torch.equal(pe(ids), emb(ids)) and torch.equal(native, emb(ids))
    monkeypatch.delenv("CODESHELL_EMBED_NATIVE")
    bad = ids.clone()
    bad[2, 50] = 37
    with pytest.raises(IndexError, match="token id 37 is out of range"):
        pe(bad)


def test_prepare_model_swaps_bf16_cpu_linears_only():
    d = require_shared("golden/rope-gqa")
    fp32, cfg, _ = load_model(d, dtype="float32")
    assert prepare_model(fp32) == 0  # float32 keeps torch's sgemm: exact numbers
    bf16, _, _ = load_model(d, dtype="bfloat16")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        before = bf16(ids).float()
    n = prepare_model(bf16)
    if not available():
        assert n == 0
        pytest.skip("native kernels unavailable here")
    assert n == 4 * cfg.n_layer + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block + lm_head
    assert isinstance(bf16.transformer.h[0].attn.c_attn, PackedLinear)
    # tied: the embedding reads the head's panels, so the vocabulary matrix is held once
    assert isinstance(bf16.transformer.wte, PackedEmbedding)
    assert bf16.lm_head.data.data_ptr() == bf16.transformer.wte.data.data_ptr()
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 2 for p in bf16.parameters())  # no stale copies
    with torch.no_grad():
        after = bf16(ids).float()
    assert (after - before).abs().max() <= 0.05 * before.abs().max()


def test_stale_build_lock_from_a_killed_build_does_not_hang(tmp_path, monkeypatch):
    """torch's file lock, left by a killed build, is cleared under our flock before building."""
    from torch.utils import cpp_extension

    from codeshell.kernels import _ext
    monkeypatch.setenv("CODESHELL_KERNELS_CACHE", str(tmp_path))
    monkeypatch.delenv("CODESHELL_KERNELS_DISABLE", raising=False)
    if not {"avx2", "fma"} <= _ext._cpu_flags():
        pytest.skip("needs AVX2/FMA")
    d = _ext.cache_dir()
    d.mkdir(parents=True)
    (d / "lock").write_text("")
    seen = {}

    def fake_load(**kw):
        seen["lock_present"] = (d / "lock").exists()
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _ext._build() == "built"
    assert seen == {"lock_present": False}
