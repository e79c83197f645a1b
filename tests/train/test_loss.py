"""The fused output-head + cross-entropy: the same loss and gradients as the plain route."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codeshell.train.loss import IGNORE, _softmax_grad_, linear_cross_entropy


def test_matches_matmul_then_cross_entropy_with_ignored_targets():
    g = torch.Generator().manual_seed(0)
    N, d, V = 700, 32, 3000  # several chunks of rows
    h = torch.randn(N, d, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(V, d, generator=g)).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = IGNORE
    loss, n = linear_cross_entropy(h, w, t, scale=0.5)
    (4.0 * loss).backward()  # backward with a gradient other than 1 as well
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, ignore_index=IGNORE, reduction="sum")
    (2.0 * ref).backward()
    assert n == int((t != IGNORE).sum())
    assert torch.allclose(2 * loss, ref, rtol=1e-6)
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)
    assert gh[::4].abs().max() == 0  # ignored rows get no gradient


def test_bf16_autocast_stays_close_and_frozen_weight_gets_no_grad():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(500, 16, generator=g)  # frozen (a LoRA base head)
    t = torch.randint(0, 500, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t, scale=1 / 64)
    loss.backward()
    loss = loss * 64
    w2 = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l2, _ = linear_cross_entropy(h.detach(), w2, t, scale=1 / 64)
    l2.backward()
    ref_gw = torch.autograd.grad(F.cross_entropy(h.detach() @ w2.T, t), w2)[0]
    assert torch.allclose(w2.grad, ref_gw, atol=2e-3)  # bf16 matmuls, float32 softmax
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2
    assert h.grad is not None and w.grad is None


def test_bf16_softmax_gradient_and_loss_at_every_probability():
    # Targets at every probability: near 1 (where 1 - p_t rounds away in bf16), ordinary, and
    # below bf16's normal range (those rows are recomputed from the logits).
    g = torch.Generator().manual_seed(2)
    n, V = 200, 3000
    x = 3 * torch.randn(n, V, generator=g)
    t = torch.randint(0, V, (n,), generator=g)
    x[:50].scatter_(1, t[:50, None], torch.linspace(8, 40, 50)[:, None])  # p_t from ~0.3 to 1 - 1e-14
    x[50:55].scatter_(1, t[50:55, None], torch.full((5, 1), -150.0))  # p_t ~ e^-160
    x = x.bfloat16()
    ref = torch.log_softmax(x.double(), -1)  # float64: the losses near 0 are below float32's reach
    ref_loss = -ref.gather(1, t[:, None]).squeeze(1)
    ref_grad = ref.exp().scatter_add(1, t[:, None], -torch.ones(n, 1, dtype=torch.float64))
    out = torch.empty_like(x)
    loss = _softmax_grad_(x, t, out).double()
    err = (loss - ref_loss).abs()
    # bf16 probabilities carry a relative rounding of 2^-8: <= 0.004 on -log p_t, and twice
    # that on log1p(-(sum of the others)) with its own rounding
    assert err.max() < 8e-3, err.max()
    assert (err[:50] / ref_loss[:50]).max() < 2e-2  # relative where the loss is near 0 (down to 1e-14)
    assert err[50:55].max() < 1e-3 and ref_loss[50:55].min() > 100  # the exact recomputation
    assert abs(float((loss - ref_loss).mean())) < 1e-3  # rounding, not a bias
    # one bf16 rounding (two on the others' sum), also on the target's p_t - 1 near p_t = 1
    assert torch.allclose(out.double(), ref_grad, rtol=1e-2, atol=1e-12)


def test_no_grad_computes_the_same_loss_without_gradient_matmuls():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMM.n += func.overloadpacket.__name__ in ("mm", "addmm", "addmm_")
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    h = torch.randn(100, 16, generator=g)
    w = torch.randn(700, 16, generator=g, requires_grad=True)  # a trained head
    t = torch.randint(0, 700, (100,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        with CountMM():
            with_grad, _ = linear_cross_entropy(h, w, t, dtype=dtype)
        n_grad, CountMM.n = CountMM.n, 0
        with torch.no_grad(), CountMM():
            without, _ = linear_cross_entropy(h, w, t, dtype=dtype)
        assert without.item() == with_grad.item()
        assert without.grad_fn is None and CountMM.n == 1 and n_grad == 2, (dtype, CountMM.n, n_grad)
        CountMM.n = 0
