"""The language-model loss: output head and cross-entropy fused, in chunks of tokens.

Hand-written because the plain route (logits [N, V] -> float32 copy -> log_softmax ->
gather, then the same tensors again in backward) moves several N x V float32 arrays
through memory: at sequence 1024 and CodeShell's 70144-token vocabulary that is ~290 MB per
sequence per pass, and on a CPU such passes cost as much as the matmuls. Here each chunk of
tokens computes its logits, its log-sum-exp and its gradient (softmax - one-hot) at once, and
only the gradients w.r.t. the hidden states [N, d] and the head weight [V, d] are kept for
backward. Tokens whose target is ignored never reach the head (SFT prompts cost nothing).

The returned loss is the *sum* over target tokens; callers divide by the global count.
This module knows nothing of models or data.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _chunk_rows(vocab: int) -> int:
    # About 16M float32 logits (64 MB) per chunk: big enough for efficient matmuls, small
    # enough that the softmax pass stays near cache sizes on CPU.
    return max(16, (1 << 24) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                scale: float):
        # h [N, d] (only rows with a target), weight [V, d], targets [N] in [0, V)
        N, _ = h.shape
        V = weight.shape[0]
        dev = h.device
        w = weight.to(dtype)
        gh = torch.empty(h.shape, dtype=dtype, device=dev) if h.requires_grad else None
        gw = None
        total = torch.zeros((), dtype=torch.float32, device=dev)
        step = _chunk_rows(V)
        # In bf16 the head's weight gradient is one matmul per group of rows over the stored
        # bf16 softmax gradients G [rows, V] (at most 256 MB): a per-chunk matmul would write,
        # convert and add a whole [V, d] float32 array for every chunk of ~200 rows.
        low = dtype != torch.float32
        group = max(step, (1 << 27) // V) if low else step
        for gs in range(0, N, group):
            ge = min(N, gs + group)
            G = torch.empty((ge - gs, V), dtype=dtype, device=dev) if weight.requires_grad and low else None
            for s in range(gs, ge, step):
                e = min(ge, s + step)
                hc = h[s:e].to(dtype)
                t = targets[s:e]
                # log_softmax reads the matmul's output once and writes float32 [n, V]; its exp
                # (in place) is the softmax, so the gradient needs no further pass over the logits.
                ls = torch.log_softmax(hc @ w.T, dim=-1, dtype=torch.float32)
                total -= ls.gather(1, t[:, None]).sum()
                g = ls.exp_()  # d(sum of losses)/d(logits) = softmax - one-hot
                g.scatter_add_(1, t[:, None], torch.full((e - s, 1), -1.0, device=dev))
                if G is not None:
                    g = G[s - gs: e - gs].copy_(g)  # the one conversion to bf16
                elif low:
                    g = g.to(dtype)
                if gh is not None:
                    torch.mm(g, w, out=gh[s:e])
                    gh[s:e].mul_(scale)
                if weight.requires_grad and G is None:  # float32: accumulate in place
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
        return (gh.to(ctx.h_dtype) if has_h else None, gw.to(ctx.w_dtype) if has_w else None, None, None, None)


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
        loss = _LinearCrossEntropy.apply(h, weight, targets, dtype, float(scale))
    return loss, n
