"""The language-model loss: output head and cross-entropy fused, in chunks of tokens.

Hand-written because the plain route (logits [N, V] -> float32 copy -> log_softmax ->
gather, then the same tensors again in backward) moves several N x V float32 arrays
through memory: at sequence 1024 and CodeShell's 70144-token vocabulary that is ~290 MB per
sequence per pass, and on a CPU such passes cost as much as the matmuls. Here each chunk of
tokens computes its logits, its loss and its gradient (softmax - one-hot) at once, and
only the gradients w.r.t. the hidden states [N, d] and the head weight [V, d] are kept for
backward. Tokens whose target is ignored never reach the head (SFT prompts cost nothing).

In float32 the softmax is a float32 log_softmax (exact, as the plain route). In bf16 the
logits are bf16 (as the plain route under autocast) and the gradient is written by one bf16
softmax pass (float32 max and sum inside the kernel, one rounding at the end) instead of four
float32 passes; the loss comes from the same probabilities (see `_softmax_grad_`).

The returned loss is the *sum* over target tokens; callers divide by the global count.
This module knows nothing of models or data.
"""

from __future__ import annotations

import torch

from .casts import cached_cast

IGNORE = -100


def _chunk_rows(vocab: int) -> int:
    # About 16M logits per chunk (64 MB in float32, 32 MB in bf16): big enough for efficient
    # matmuls, small enough that the softmax pass stays near cache sizes on CPU.
    return max(16, (1 << 24) // vocab)


def _softmax_grad_(logits: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[n, V] (logits' low-precision dtype) = softmax(logits) - one_hot(t); returns the
    per-row losses -log softmax(logits)[t] in float32 [n].

    One softmax kernel pass (float32 max and sum inside, one rounding to bf16 at the end) and
    one bf16 sum pass, where a float32 log_softmax, exp and copy took four passes over float32
    [n, V] arrays (~4x the time). The loss is read from the rounded probabilities p without
    losing precision where it matters: -log p_t for p_t <= 1/2 (relative error of p_t <= 2^-8,
    so <= 0.004 absolute, unbiased rounding), and -log1p(-sum_{j != t} p_j) for p_t > 1/2,
    where 1 - p_t itself would round away (p_t = 0.999 is 1.0 in bf16); the target's gradient
    p_t - 1 is that same sum, negated. Rows whose p_t falls below bf16's normal range (a loss
    above ~69) get their loss recomputed exactly from their logits.
    """
    n = logits.shape[0]
    p = torch.ops.aten._softmax.out(logits, -1, False, out=out)
    rows = torch.arange(n, device=logits.device)
    pt = p[rows, t].float()
    p[rows, t] = 0
    other = p.sum(-1).float()  # sum over j != t: accumulated in float32, rounded once
    loss = torch.where(pt > 0.5, -torch.log1p(-other), -torch.log(pt))
    tiny = (pt < 1e-30).nonzero().squeeze(1)
    if tiny.numel():
        lg = logits.index_select(0, tiny).float()
        loss[tiny] = torch.logsumexp(lg, -1) - lg.gather(1, t[tiny, None]).squeeze(1)
    # The target's gradient p_t - 1 is -(the others' sum) where p_t > 1/2: bf16(p_t) - 1 would
    # keep only multiples of 2^-8 (0.99 - 1 became -0.0078 or -0.0117).
    p[rows, t] = torch.where(pt > 0.5, -other, pt - 1).to(p.dtype)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                scale: float, grad: bool):
        # h [N, d] (only rows with a target), weight [V, d], targets [N] in [0, V); grad: whether
        # gradients are wanted at all (False under no_grad, e.g. held-out loss)
        N, _ = h.shape
        V = weight.shape[0]
        dev = h.device
        need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
        w = cached_cast(weight, dtype)
        gh = torch.empty(h.shape, dtype=dtype, device=dev) if need_h else None
        gw = None
        total = torch.zeros((), dtype=torch.float32, device=dev)
        step = _chunk_rows(V)
        # In bf16 the head's weight gradient is one matmul per group of rows over the stored
        # bf16 softmax gradients G [rows, V] (at most 256 MB): a per-chunk matmul would write,
        # convert and add a whole [V, d] float32 array for every chunk of ~200 rows.
        low = dtype != torch.float32
        group = max(step, (1 << 27) // V) if low and need_w else step
        if low:  # logits [n, V] of a chunk; G's rows when no weight gradient is kept
            logits = torch.empty((min(N, step), V), dtype=dtype, device=dev)
            gbuf = None if need_w else torch.empty_like(logits)
        for gs in range(0, N, group):
            ge = min(N, gs + group)
            G = torch.empty((ge - gs, V), dtype=dtype, device=dev) if low and need_w else None
            for s in range(gs, ge, step):
                e = min(ge, s + step)
                hc = h[s:e].to(dtype)
                t = targets[s:e]
                if low:
                    g = G[s - gs: e - gs] if G is not None else gbuf[: e - s]
                    total += _softmax_grad_(torch.mm(hc, w.T, out=logits[: e - s]), t, g).sum()
                else:
                    # log_softmax reads the matmul's output once and writes float32 [n, V]; its
                    # exp (in place) is the softmax, so the gradient needs no further pass.
                    ls = torch.log_softmax(hc @ w.T, dim=-1, dtype=torch.float32)
                    total -= ls.gather(1, t[:, None]).sum()
                    if not (need_h or need_w):
                        continue
                    g = ls.exp_()  # d(sum of losses)/d(logits) = softmax - one-hot
                    g.scatter_add_(1, t[:, None], torch.full((e - s, 1), -1.0, device=dev))
                if gh is not None:
                    torch.mm(g, w, out=gh[s:e])
                    gh[s:e].mul_(scale)
                if need_w and not low:  # float32: accumulate in place
                    if gw is None:
                        gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
                    gw.addmm_(g.T, hc, alpha=scale)
            if G is not None:
                part = G.T @ (h[gs:ge] * scale).to(dtype)  # [V, d], scaled on the small side
                gw = part.float() if gw is None else gw.add_(part)
        ctx.save_for_backward(gh if gh is not None else torch.empty(0), gw if gw is not None else torch.empty(0))
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.has = (gh is not None, gw is not None)
        return total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gh, gw = ctx.saved_tensors
        has_h, has_w = ctx.has
        if float(grad) != 1.0:  # the loop passes its scale in forward, so this is rare
            gh, gw = gh * grad, gw * grad
        return (gh.to(ctx.h_dtype) if has_h else None, gw.to(ctx.w_dtype) if has_w else None, None, None, None,
                None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         dtype: torch.dtype | None = None, scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """scale x the sum of -log softmax(h @ weight.T)[target] over targets != -100, and their count.

    Giving the loss's scale (e.g. 1 / tokens in the batch) here rather than multiplying the
    result spares backward a pass over the [V, d] head gradient.

    h [N, d], weight [V, d], targets [N]. `dtype` is the matmul dtype (default: the active
    autocast dtype, else the weight's); softmax and the sum are float32.
    """
    if dtype is None:
        dtype = (torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type)
                 else weight.dtype)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    n = int(keep.numel())
    if n == 0:
        return (h.sum() + weight.sum()) * 0.0, 0  # keeps the graph (DDP wants every grad)
    if n < targets.numel():
        h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    with torch.autocast(h.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(h, weight, targets, dtype, float(scale), torch.is_grad_enabled())
    return loss, n
