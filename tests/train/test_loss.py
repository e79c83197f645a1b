"""The fused output-head + cross-entropy: the same loss and gradients as the plain route."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codeshell.train.loss import IGNORE, linear_cross_entropy


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
