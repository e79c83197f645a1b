"""Weight casts once per optimizer step (codeshell.train.casts): the same gradients as autocast
casting per micro-batch, half the casts with two micro-batches, nothing kept after the step."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from codeshell.train.casts import cached_cast, step_casts
from tests.train.helpers import losses, train_cli


class _WeightCasts(TorchDispatchMode):
    """Counts float32 -> bf16 copies of 2-D tensors (the weights; activations here are 3-D)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket.__name__ == "_to_copy" and args[0].dim() == 2 and out.dtype == torch.bfloat16:
            self.n += 1
        return out


def _accumulate(model: nn.Module, xs: list[torch.Tensor], share: bool) -> int:
    with _WeightCasts() as count, step_casts(share):
        for x in xs:  # micro-batches: forward under autocast, backward outside it (as the loop)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            y.float().square().sum().backward()
    return count.n


def test_same_gradients_with_half_the_casts_and_fresh_casts_next_step():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    b = copy.deepcopy(a)
    xs = [torch.randn(2, 4, 16) for _ in range(2)]
    assert _accumulate(a, xs, share=False) == 4  # 2 weights x 2 micro-batches
    assert _accumulate(b, xs, share=True) == 2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():  # an optimizer step between two steps: the next step casts anew
        for m in (a, b):
            for p in m.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
    _accumulate(a, xs, share=False)
    assert _accumulate(b, xs, share=True) == 2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_cached_cast_keeps_one_copy_per_step_and_sees_in_place_changes():
    w = torch.randn(8, 4, requires_grad=True)
    assert cached_cast(w, torch.bfloat16) is not cached_cast(w, torch.bfloat16)  # outside a step
    assert cached_cast(w, torch.float32) is w
    with step_casts():
        c = cached_cast(w, torch.bfloat16)
        assert cached_cast(w, torch.bfloat16) is c
        with torch.no_grad():
            w.add_(1.0)  # bumps the version: cast again
        c2 = cached_cast(w, torch.bfloat16)
        assert c2 is not c and torch.equal(c2, w.detach().bfloat16())
    assert cached_cast(w, torch.bfloat16) is not c2


def test_bf16_loop_with_accumulation_is_unchanged(shards, tmp_path, monkeypatch):
    import contextlib

    import codeshell.train.loop as loop

    args = ["--preset", "tiny", "--batch-tokens", "256", "--micro-batch", "1", "--max-steps", "3", "--lr", "3e-3",
            "--warmup-steps", "1", "--precision", "bf16", "--save-every", "0", "--threads", "1", "--no-tensorboard"]
    r = train_cli("pretrain", shards, "-o", tmp_path / "shared", *args)  # 4 micro-batches per step
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(loop, "step_casts", lambda enabled=True: contextlib.nullcontext())
    r = train_cli("pretrain", shards, "-o", tmp_path / "per-micro-batch", *args)
    assert r.exit_code == 0, r.output
    assert losses(tmp_path / "shared") == losses(tmp_path / "per-micro-batch")
